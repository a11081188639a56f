using MinLora.Glm.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Data;

/// <summary>How (source, target) text pairs become training sequences.</summary>
public sealed record FineTuningOptions
{
    /// <summary>An instruction put before every source text (empty: none).</summary>
    public string Prompt { get; init; } = "";

    /// <summary>Most tokens of prompt + source (the source is truncated).</summary>
    /// <value>The default value is 256.</value>
    public int MaxSourceLength { get; init; } = 256;

    /// <summary>Most tokens of the target (truncated).</summary>
    /// <value>The default value is 128.</value>
    public int MaxTargetLength { get; init; } = 128;
}

/// <summary>A training sequence: <c>prompt text [gMASK] &lt;sop&gt; answer &lt;eop&gt;</c>, labels −100 before <c>&lt;sop&gt;</c>.</summary>
/// <param name="InputIds">The ids.</param>
/// <param name="Labels">The labels (−100 = ignored).</param>
/// <param name="SourceTruncated">Whether the text was cut.</param>
/// <param name="TargetTruncated">Whether the answer was cut.</param>
public sealed record FineTuningExample(int[] InputIds, int[] Labels, bool SourceTruncated, bool TargetTruncated);

/// <summary>A padded training batch.</summary>
/// <param name="InputIds">int64 [batch, sequence], left-padded.</param>
/// <param name="AttentionMask">bool [batch, 1, sequence, sequence].</param>
/// <param name="PositionIds">int64 [batch, 2, sequence].</param>
/// <param name="Labels">int64 [batch, sequence], −100 on padding and context.</param>
public sealed record GlmTrainingBatch(Tensor InputIds, Tensor AttentionMask, Tensor PositionIds, Tensor Labels) : IDisposable
{
    /// <inheritdoc />
    public void Dispose()
    {
        InputIds.Dispose();
        AttentionMask.Dispose();
        PositionIds.Dispose();
        Labels.Dispose();
    }
}

/// <summary>
/// Supervised fine-tuning data for any GLM generation: (source, target) text pairs → the generation's input layout
/// (ChatGLM-6B <c>prompt source [gMASK] &lt;sop&gt; target &lt;eop&gt;</c>; ChatGLM2/3 and GLM-4 theirs) with labels −100
/// before the target, truncation budgets, and left-padded batches with the generation's masks and positions.
/// </summary>
public sealed class FineTuningDatasetBuilder
{
    private readonly IGlmTextTokenizer _tokenizer;
    private readonly FineTuningOptions _options;
    private readonly IReadOnlyList<int> _promptIds;

    /// <summary>Creates the builder.</summary>
    /// <param name="tokenizer">The tokenizer of the model's generation (ChatGLM-6B, ChatGLM2/3 or GLM-4).</param>
    /// <param name="options">Lengths and prompt.</param>
    /// <exception cref="ArgumentException">The prompt alone exceeds MaxSourceLength, or a length is not positive.</exception>
    public FineTuningDatasetBuilder(IGlmTextTokenizer tokenizer, FineTuningOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        _tokenizer = tokenizer;
        _options = options ?? new FineTuningOptions();
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(_options.MaxSourceLength, nameof(options));
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(_options.MaxTargetLength, nameof(options));
        ArgumentNullException.ThrowIfNull(_options.Prompt, nameof(options));
        _promptIds = _options.Prompt.Length == 0 ? [] : tokenizer.EncodeText(_options.Prompt);
        if (_promptIds.Count >= _options.MaxSourceLength)
            throw new ArgumentException($"The prompt takes {_promptIds.Count} tokens, not less than MaxSourceLength {_options.MaxSourceLength}.", nameof(options));
    }

    /// <summary>The options in use.</summary>
    public FineTuningOptions Options => _options;

    /// <summary>The prompt + source ids (truncated), as used for generation: append the generation's suffix with <see cref="IGlmTextTokenizer.BuildInputs"/>.</summary>
    /// <param name="source">The source text.</param>
    /// <returns>The source ids and whether the source was cut.</returns>
    public (IReadOnlyList<int> Ids, bool Truncated) Source(string source)
    {
        ArgumentNullException.ThrowIfNull(source);
        var textIds = _tokenizer.EncodeText(source);
        int room = _options.MaxSourceLength - _promptIds.Count;
        bool cut = textIds.Count > room;
        return (_promptIds.Concat(textIds.Take(room)).ToList(), cut);
    }

    /// <summary>Builds one training sequence.</summary>
    /// <param name="source">The source text (after the prompt).</param>
    /// <param name="target">The target text the model learns to produce.</param>
    /// <returns>Ids and labels.</returns>
    public FineTuningExample Build(string source, string target)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(target);
        var (sourceIds, sourceCut) = Source(source);
        var targetIds = _tokenizer.EncodeText(target);
        bool targetCut = targetIds.Count > _options.MaxTargetLength;
        var ids = _tokenizer.BuildInputs(sourceIds, targetIds.Take(_options.MaxTargetLength).ToList()).ToArray();
        int context = _tokenizer.LabelStart(ids, sourceIds.Count);
        var labels = ids.Select((id, i) => i < context ? -100 : id).ToArray();
        return new FineTuningExample(ids, labels, sourceCut, targetCut);
    }

    /// <summary>Builds every pair and counts truncations.</summary>
    /// <param name="pairs">(source, target) pairs.</param>
    /// <returns>The sequences and how many sources and targets were cut.</returns>
    public (IReadOnlyList<FineTuningExample> Examples, int TruncatedSources, int TruncatedTargets) BuildAll(IEnumerable<(string Source, string Target)> pairs)
    {
        ArgumentNullException.ThrowIfNull(pairs);
        var built = pairs.Select(p => Build(p.Source, p.Target)).ToList();
        return (built, built.Count(e => e.SourceTruncated), built.Count(e => e.TargetTruncated));
    }

    /// <summary>
    /// Left-pads sequences into a batch (ids with the pad id, labels with −100) with the model generation's masks and
    /// positions (ChatGLM-6B: bool [b, 1, s, s] and 2-D positions; v2: padding mask [b, s] and positions [b, s]).
    /// </summary>
    /// <param name="batch">The sequences.</param>
    /// <param name="config">The model config.</param>
    /// <param name="device">Where to put the tensors.</param>
    /// <returns>The batch.</returns>
    public static GlmTrainingBatch Collate(IReadOnlyList<FineTuningExample> batch, GlmConfig config, Device? device = null)
    {
        ArgumentNullException.ThrowIfNull(batch);
        ArgumentNullException.ThrowIfNull(config);
        if (batch.Count == 0) throw new ArgumentException("Empty batch.", nameof(batch));
        int length = batch.Max(b => b.InputIds.Length);
        var ids = new long[batch.Count * length];
        var labels = new long[batch.Count * length];
        for (int r = 0; r < batch.Count; r++)
        {
            int pad = length - batch[r].InputIds.Length;
            for (int i = 0; i < length; i++)
            {
                ids[r * length + i] = i < pad ? config.PadTokenId : batch[r].InputIds[i - pad];
                labels[r * length + i] = i < pad ? -100 : batch[r].Labels[i - pad];
            }
        }
        var idsT = tensor(ids, new long[] { batch.Count, length }, device: device);
        var labelsT = tensor(labels, new long[] { batch.Count, length }, device: device);
        if (config.Version == GlmVersion.ChatGlm2)
        {
            // v2: a padding mask [b, s] (1 = token) and positions 0… after each row's padding (the reference tokenizer's _pad).
            var padding = new long[batch.Count * length];
            var positions = new long[batch.Count * length];
            for (int r = 0; r < batch.Count; r++)
            {
                int pad = length - batch[r].InputIds.Length;
                for (int i = pad; i < length; i++)
                {
                    padding[r * length + i] = 1;
                    positions[r * length + i] = i - pad;
                }
            }
            return new GlmTrainingBatch(idsT, tensor(padding, new long[] { batch.Count, length }, device: device), tensor(positions, new long[] { batch.Count, length }, device: device), labelsT);
        }
        return new GlmTrainingBatch(idsT, GlmMasks.BuildAttentionMask(idsT, config), GlmMasks.BuildPositionIds(idsT, config), labelsT);
    }
}

