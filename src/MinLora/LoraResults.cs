using System.Globalization;

namespace MinLora;

/// <summary>Parameter counts of a model, as PEFT's and the book's <c>print_trainable_parameters</c> print them.</summary>
/// <param name="Trainable">Number of elements in parameters with <c>requires_grad</c>.</param>
/// <param name="Total">Number of elements in all parameters.</param>
public readonly record struct ParameterCount(long Trainable, long Total)
{
    /// <summary>100 · Trainable / Total (0 for an empty model).</summary>
    public double TrainablePercent => Total == 0 ? 0 : 100.0 * Trainable / Total;

    /// <summary>
    /// <c>trainable params: 1835008 || all params: 6709764096 || trainable%: 0.027348…</c>, with the percentage in
    /// shortest round-trip form as Python prints a float.
    /// </summary>
    /// <returns>The formatted line.</returns>
    public override string ToString() =>
        string.Create(CultureInfo.InvariantCulture, $"trainable params: {Trainable} || all params: {Total} || trainable%: {TrainablePercent:R}");
}

/// <summary>What <see cref="LoraExtensions.MergeLora"/> did.</summary>
/// <param name="Modules">Paths of the layers whose base weights received adapters.</param>
/// <param name="Adapters">The adapters merged.</param>
/// <param name="Exact">
/// False when some base layer had to round the merged weight beyond float rounding (a quantized base re-quantizes
/// <c>W + ΔW</c>), so the merged model's outputs differ from the adapted model's by more than float rounding.
/// </param>
/// <param name="Unloaded">True when the LoRA wrappers were removed, leaving plain base layers.</param>
public sealed record LoraMergeResult(IReadOnlyList<string> Modules, IReadOnlyList<string> Adapters, bool Exact, bool Unloaded);

/// <summary>A key whose tensor shape differs between a LoRA state dict and the model.</summary>
/// <param name="Key">The key.</param>
/// <param name="Expected">The model's shape.</param>
/// <param name="Actual">The dictionary's shape.</param>
public sealed record ShapeMismatch(string Key, long[] Expected, long[] Actual)
{
    /// <inheritdoc />
    public override string ToString() => $"{Key}: model [{string.Join(", ", Expected)}] vs file [{string.Join(", ", Actual)}]";
}

/// <summary>The outcome of <see cref="LoraExtensions.LoadLoraStateDict"/>.</summary>
/// <param name="Loaded">Keys copied into the model.</param>
/// <param name="MissingKeys">Adapter keys of the model that the dictionary lacks.</param>
/// <param name="UnexpectedKeys">Keys of the dictionary that the model has no adapter tensor for.</param>
/// <param name="ShapeMismatches">Keys present in both with different shapes (not loaded).</param>
public sealed record LoraLoadResult(
    IReadOnlyList<string> Loaded,
    IReadOnlyList<string> MissingKeys,
    IReadOnlyList<string> UnexpectedKeys,
    IReadOnlyList<ShapeMismatch> ShapeMismatches)
{
    /// <summary>True when every model key was loaded and nothing was left over.</summary>
    public bool IsComplete => MissingKeys.Count == 0 && UnexpectedKeys.Count == 0 && ShapeMismatches.Count == 0;

    /// <summary>A multi-line description of every problem (empty when complete).</summary>
    /// <returns>The description.</returns>
    public string Describe()
    {
        var lines = new List<string>();
        if (MissingKeys.Count > 0) lines.Add($"missing keys ({MissingKeys.Count}): {string.Join(", ", MissingKeys.Take(20))}{(MissingKeys.Count > 20 ? ", …" : "")}");
        if (UnexpectedKeys.Count > 0) lines.Add($"unexpected keys ({UnexpectedKeys.Count}): {string.Join(", ", UnexpectedKeys.Take(20))}{(UnexpectedKeys.Count > 20 ? ", …" : "")}");
        if (ShapeMismatches.Count > 0) lines.Add($"shape mismatches ({ShapeMismatches.Count}): {string.Join("; ", ShapeMismatches.Take(20))}");
        return string.Join(Environment.NewLine, lines);
    }
}

/// <summary>Thrown when a LoRA state dict does not fit the model in strict mode; nothing was loaded.</summary>
public sealed class LoraStateDictMismatchException : ArgumentException
{
    /// <summary>Creates the exception from a load result.</summary>
    /// <param name="result">The comparison that failed.</param>
    /// <param name="paramName">The argument that held the dictionary.</param>
    public LoraStateDictMismatchException(LoraLoadResult result, string? paramName = null)
        : base("The LoRA state dict does not match the model's adapters (nothing was loaded):" + Environment.NewLine + result?.Describe(), paramName)
    {
        Result = result!;
    }

    /// <summary>The comparison that failed.</summary>
    public LoraLoadResult Result { get; }
}
