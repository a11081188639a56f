using static TorchSharp.torch;

namespace MinLora;

/// <summary>A key whose tensor differs in shape (or element kind) between a state dict and the model.</summary>
/// <param name="Key">The key.</param>
/// <param name="Expected">The model's shape.</param>
/// <param name="Actual">The dictionary's shape.</param>
/// <param name="Reason">Why they differ when the shapes agree (e.g. an integer tensor where the model holds floats); null for a shape difference.</param>
public sealed record ShapeMismatch(string Key, long[] Expected, long[] Actual, string? Reason = null)
{
    /// <inheritdoc />
    public override string ToString() =>
        $"{Key}: model [{string.Join(", ", Expected)}] vs file [{string.Join(", ", Actual)}]" + (Reason is null ? "" : $" ({Reason})");
}

/// <summary>
/// How a state dict fits what a model expects — the one comparison behind every load (adapters, quantized state dicts,
/// checkpoints): which keys match, which the dictionary lacks, which the model lacks, which differ in shape.
/// </summary>
/// <param name="MatchedKeys">Keys present in both with the same shape (loaded, or loadable).</param>
/// <param name="MissingKeys">Keys of the model that the dictionary lacks.</param>
/// <param name="UnexpectedKeys">Keys of the dictionary that the model lacks.</param>
/// <param name="ShapeMismatches">Keys present in both that do not fit.</param>
public sealed record StateDictFit(
    IReadOnlyList<string> MatchedKeys,
    IReadOnlyList<string> MissingKeys,
    IReadOnlyList<string> UnexpectedKeys,
    IReadOnlyList<ShapeMismatch> ShapeMismatches)
{
    /// <summary>True when every model key matched and nothing was left over.</summary>
    public bool IsComplete => MissingKeys.Count == 0 && UnexpectedKeys.Count == 0 && ShapeMismatches.Count == 0;

    /// <summary>Compares the model's tensors with a dictionary's by key and shape.</summary>
    /// <param name="expected">The model's tensors (or state dict) by key.</param>
    /// <param name="found">The dictionary's tensors by key.</param>
    /// <returns>The fit, keys in the model's order (unexpected keys in the dictionary's).</returns>
    public static StateDictFit Compare(IReadOnlyDictionary<string, Tensor> expected, IReadOnlyDictionary<string, Tensor> found)
    {
        ArgumentNullException.ThrowIfNull(expected);
        ArgumentNullException.ThrowIfNull(found);
        return Compare(expected.Select(kv => (kv.Key, kv.Value.shape)), found.ToDictionary(kv => kv.Key, kv => kv.Value.shape, StringComparer.Ordinal));
    }

    /// <summary>Compares shapes by key (e.g. from safetensors headers, before any data is read).</summary>
    /// <param name="expected">The model's (key, shape) pairs, in order.</param>
    /// <param name="found">The dictionary's shapes by key.</param>
    /// <returns>The fit.</returns>
    public static StateDictFit Compare(IEnumerable<(string Key, long[] Shape)> expected, IReadOnlyDictionary<string, long[]> found)
    {
        ArgumentNullException.ThrowIfNull(expected);
        ArgumentNullException.ThrowIfNull(found);
        var matched = new List<string>();
        var missing = new List<string>();
        var mismatched = new List<ShapeMismatch>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (key, shape) in expected)
        {
            seen.Add(key);
            if (!found.TryGetValue(key, out var actual)) missing.Add(key);
            else if (!actual.SequenceEqual(shape)) mismatched.Add(new ShapeMismatch(key, shape, actual));
            else matched.Add(key);
        }
        return new StateDictFit(matched, missing, found.Keys.Where(k => !seen.Contains(k)).ToList(), mismatched);
    }

    /// <summary>Each kind of problem with at most <paramref name="max"/> keys, joined by <paramref name="separator"/> (empty when complete).</summary>
    /// <param name="max">Keys listed per kind.</param>
    /// <param name="includeUnexpected">Whether unexpected keys count as a problem (not in non-strict loads).</param>
    /// <param name="includeMissing">Whether missing keys count as a problem (not in non-strict loads).</param>
    /// <param name="separator">Between the kinds (default " | ": one line).</param>
    /// <returns>The description.</returns>
    public string Describe(int max = 20, bool includeUnexpected = true, bool includeMissing = true, string separator = " | ")
    {
        var parts = new List<string>();
        if (ShapeMismatches.Count > 0) parts.Add($"wrong shapes or types ({ShapeMismatches.Count}): {string.Join("; ", ShapeMismatches.Take(max))}{(ShapeMismatches.Count > max ? "; …" : "")}");
        if (includeMissing && MissingKeys.Count > 0) parts.Add($"missing keys ({MissingKeys.Count}): {string.Join(", ", MissingKeys.Take(max))}{(MissingKeys.Count > max ? ", …" : "")}");
        if (includeUnexpected && UnexpectedKeys.Count > 0) parts.Add($"unexpected keys ({UnexpectedKeys.Count}): {string.Join(", ", UnexpectedKeys.Take(max))}{(UnexpectedKeys.Count > max ? ", …" : "")}");
        return string.Join(separator, parts);
    }
}

/// <summary>
/// A state dict (a file, or tensors in memory) does not fit the model: the message names the source, each missing and
/// unexpected key, and each key with the model's and the file's shape; <see cref="Fit"/> holds the full comparison.
/// The one exception type for "does not fit", from every loader (an <see cref="ArgumentException"/>: the dictionary or
/// the file given does not fit the model given).
/// </summary>
public sealed class StateDictMismatchException : ArgumentException
{
    /// <summary>Creates the exception.</summary>
    /// <param name="fit">The comparison that failed.</param>
    /// <param name="sourcePath">The file or directory the tensors came from (null: a dictionary in memory).</param>
    /// <param name="what">What did not fit, e.g. "The LoRA state dict does not match the model's adapters (nothing was loaded)".</param>
    /// <param name="missingIsProblem">Whether the message names missing keys (not when the load allows them).</param>
    /// <param name="unexpectedIsProblem">Whether the message names unexpected keys (not when the load allows them).</param>
    /// <param name="inner">The exception this one explains further, if any.</param>
    public StateDictMismatchException(StateDictFit fit, string? sourcePath, string what, bool missingIsProblem = true, bool unexpectedIsProblem = true, Exception? inner = null)
        : base((sourcePath is null ? "" : sourcePath + ": ") + what + ": " + fit?.Describe(includeUnexpected: unexpectedIsProblem, includeMissing: missingIsProblem) + ".", inner)
    {
        ArgumentNullException.ThrowIfNull(fit);
        Fit = fit;
        SourcePath = sourcePath;
    }

    /// <summary>The comparison that failed.</summary>
    public StateDictFit Fit { get; }

    /// <summary>The file or directory the tensors came from (null for a dictionary in memory).</summary>
    public string? SourcePath { get; }
}
