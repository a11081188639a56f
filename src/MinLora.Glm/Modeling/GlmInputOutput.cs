using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm;

/// <summary>The inputs of <see cref="GlmForCausalLM"/>.</summary>
/// <param name="InputIds">Token ids. Shape: [batch, sequence]. DType: int64.</param>
public sealed record GlmInput(Tensor InputIds)
{
    /// <summary>
    /// Attention mask, True = masked. Shape: [batch, 1, query length, key length] (key length includes cached
    /// positions, but not a P-tuning prefix, which is always visible). DType: bool. Null: built from the ids as the
    /// reference does (bidirectional up to <c>&lt;sop&gt;</c>, causal after it, left padding masked); only valid without a cache.
    /// </summary>
    public Tensor? AttentionMask { get; init; }

    /// <summary>2-D positions (position, block position). Shape: [batch, 2, sequence]. DType: int64. Null: built from the ids.</summary>
    public Tensor? PositionIds { get; init; }

    /// <summary>Keys and values of earlier positions (incremental decoding), or null.</summary>
    public GlmKvCache? PastKeyValues { get; init; }

    /// <summary>Targets for the shifted cross-entropy loss, −100 = ignored. Shape: [batch, sequence]. DType: int64.</summary>
    public Tensor? Labels { get; init; }

    /// <summary>Return the keys and values for incremental decoding.</summary>
    public bool UseCache { get; init; }

    /// <summary>
    /// Compute logits for the last this many positions only (null: all). Generation needs the last position's: for a
    /// 1,024-token prompt this skips 1,023 rows of the vocabulary-sized head product. Not allowed with <see cref="Labels"/>.
    /// </summary>
    public int? LogitsToKeep { get; init; }

    /// <summary>Return the hidden states (the input of each block and the final normalized output), each [sequence, batch, hidden].</summary>
    public bool OutputHiddenStates { get; init; }

    /// <summary>Return each block's attention probabilities, each [batch·heads, query, key].</summary>
    public bool OutputAttentions { get; init; }
}

/// <summary>The outputs of <see cref="GlmForCausalLM"/>; dispose it to free its tensors.</summary>
public sealed class GlmOutput : IDisposable
{
    internal GlmOutput(Tensor logits, Tensor? loss, GlmKvCache? present, IReadOnlyList<Tensor>? hidden, IReadOnlyList<Tensor>? attentions)
    {
        Logits = logits;
        Loss = loss;
        PresentKeyValues = present;
        HiddenStates = hidden;
        Attentions = attentions;
    }

    /// <summary>Next-token logits. Shape: [batch, sequence, vocab] ([batch, LogitsToKeep, vocab] when asked). DType: the model's.</summary>
    public Tensor Logits { get; }

    /// <summary>Mean shifted cross-entropy over labels ≠ −100, in float32 (when labels were given).</summary>
    public Tensor? Loss { get; }

    /// <summary>Keys and values including this call's positions (when <see cref="GlmInput.UseCache"/>).</summary>
    public GlmKvCache? PresentKeyValues { get; }

    /// <summary>Hidden states (when asked).</summary>
    public IReadOnlyList<Tensor>? HiddenStates { get; }

    /// <summary>Attention probabilities (when asked).</summary>
    public IReadOnlyList<Tensor>? Attentions { get; }

    /// <inheritdoc />
    public void Dispose()
    {
        Logits.Dispose();
        Loss?.Dispose();
        if (HiddenStates is not null) foreach (var t in HiddenStates) t.Dispose();
        if (Attentions is not null) foreach (var t in Attentions) t.Dispose();
        // The cache is handed to the caller to continue decoding; it is disposed separately.
    }
}
