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
