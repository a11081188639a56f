using MinLora.Glm.Modeling;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MinLora.Glm;

/// <summary>
/// ChatGLM-6B with its language-model head: <c>transformer</c> (<see cref="GlmModel"/>) and <c>lm_head</c>, computing
/// exactly what the reference <c>modeling_chatglm.py</c> computes. State-dict keys are the checkpoint's
/// (<c>transformer.layers.N.attention.query_key_value.weight</c>, …); projections are swappable for LoRA and
/// quantization.
/// </summary>
public sealed class GlmForCausalLM : nn.Module<GlmInput, GlmOutput>
{
    // v1: transformer (GlmModel) + lm_head; v2: transformer (GlmV2Model, its head is transformer.output_layer).
    private readonly nn.Module transformer;
    private readonly nn.Module<Tensor, Tensor>? lm_head;

    /// <summary>Builds the model from a config.</summary>
    /// <param name="config">The architecture.</param>
    /// <param name="options">Element type, device (use <c>meta</c> for a shape-only model) and initialisation.</param>
    /// <exception cref="InvalidDataException">An invalid config.</exception>
    /// <exception cref="NotSupportedException">An unsupported architecture.</exception>
    public GlmForCausalLM(GlmConfig config, GlmBuildOptions? options = null) : base("ChatGLMForConditionalGeneration")
    {
        ArgumentNullException.ThrowIfNull(config);
        config.Validate();
        Config = config;
        var o = options ?? new GlmBuildOptions();
        if (config.Version == GlmVersion.ChatGlm2)
        {
            transformer = new GlmV2Model(config, o);
        }
        else
        {
            transformer = new GlmModel(config, o);
            lm_head = o.QuantizeLmHead && o.QuantizationBit > 0
                ? GlmLayers.Projection(config.HiddenSize, config.VocabSize, false, o)
                : GlmLayers.Linear(config.HiddenSize, config.VocabSize, false, o);
        }
        RegisterComponents();
        if (config.PreSeqLen is not null)
        {
            // As the reference: with a P-tuning prefix only the prefix encoder trains.
            foreach (var (name, p) in named_parameters())
                p.requires_grad = name.StartsWith("transformer.prefix_encoder.", StringComparison.Ordinal);
        }
        // Before a load writes into the (still untouched) weights, or right after random initialisation (CPU tensors only).
        if (o.HugePages && !o.DeferHugePages) MinLora.Quantization.CpuMemory.UseHugePages(this);
    }

    /// <summary>The architecture.</summary>
    public GlmConfig Config { get; }

    /// <summary>What loading read, when the model came from <see cref="FromPretrained"/> (null for a model built in code).</summary>
    public GlmLoadReport? LoadReport { get; internal set; }

    /// <summary>
    /// Loads a checkpoint directory (see <see cref="GlmCheckpoint.FromPretrained"/>) and returns the model, so that
    /// <c>using var model = GlmForCausalLM.FromPretrained(dir);</c> works; the load report is <see cref="LoadReport"/>.
    /// </summary>
    /// <param name="directory">The checkpoint directory.</param>
    /// <param name="options">Element type, device, quantization, logging.</param>
    /// <returns>The model, in eval mode.</returns>
    /// <exception cref="DirectoryNotFoundException">No such directory.</exception>
    /// <exception cref="FileNotFoundException">No config, no weights, or a shard named by the index is missing.</exception>
    /// <exception cref="InvalidDataException">A corrupt file, or a config that disagrees with the weight files.</exception>
    /// <exception cref="StateDictMismatchException">Missing or (strict) unexpected keys, or wrong shapes or types (each named in the message).</exception>
    /// <exception cref="ArgumentOutOfRangeException"><see cref="GlmLoadOptions.QuantizationBit"/> is not 4 or 8 (checked before any file is read).</exception>
    /// <exception cref="ArgumentException">Quantization options that do not fit the model (checked before any file is read).</exception>
    public static GlmForCausalLM FromPretrained(string directory, GlmLoadOptions? options = null) => GlmCheckpoint.FromPretrained(directory, options).Model;

    /// <summary>
    /// Gradient checkpointing per block (Hugging Face's <c>gradient_checkpointing_enable()</c>): in training, each
    /// block keeps only its input and is run again during backward, trading one extra forward for the activations of
    /// every block (at 1,024 tokens ChatGLM-6B's float32 attention scores alone are 134 MB per block and copy). Applies
    /// when training with gradients and without a KV cache, P-tuning prefix or attention outputs.
    /// </summary>
    /// <value>The default value is false.</value>
    public bool GradientCheckpointing
    {
        get => transformer is GlmModel v1 ? v1.GradientCheckpointing : ((GlmV2Model)transformer).GradientCheckpointing;
        set
        {
            if (transformer is GlmModel v1) v1.GradientCheckpointing = value;
            else ((GlmV2Model)transformer).GradientCheckpointing = value;
        }
    }

    /// <summary>The v1 transformer (ChatGLM-6B).</summary>
    /// <exception cref="InvalidOperationException">The model is a v2 (ChatGLM2/3, GLM-4) model.</exception>
    public GlmModel Transformer => transformer as GlmModel ?? throw new InvalidOperationException("This is a v2-architecture model (ChatGLM2/3, GLM-4); its transformer has another layout.");

    /// <summary>The architecture generation (from the config).</summary>
    public GlmVersion Version => Config.Version;

    /// <inheritdoc />
    public override GlmOutput forward(GlmInput input)
    {
        ArgumentNullException.ThrowIfNull(input);
        var ids = input.InputIds;
        if (ids.dim() != 2 || ids.dtype != ScalarType.Int64)
            throw new ArgumentException($"InputIds must be int64 [batch, sequence], got {ids.dtype} [{string.Join(", ", ids.shape)}].", nameof(input));
        long b = ids.shape[0], s = ids.shape[1];
        if (transformer is GlmV2Model v2) return ForwardV2(v2, input, b, s);
        if (input.PastKeyValues is not null && (input.AttentionMask is null || input.PositionIds is null))
            throw new ArgumentException("With PastKeyValues, give AttentionMask and PositionIds for the new positions (see GlmMasks).", nameof(input));
        using var scope = NewDisposeScope();
        var mask = input.AttentionMask ?? GlmMasks.BuildAttentionMask(ids, Config);
        var positions = input.PositionIds ?? GlmMasks.BuildPositionIds(ids, Config);
        if (!positions.shape.SequenceEqual(new[] { b, 2, s }))
            throw new ArgumentException($"PositionIds must be [{b}, 2, {s}], got [{string.Join(", ", positions.shape)}].", nameof(input));
        long pastLength = input.PastKeyValues?.Length ?? 0;
        long prefix = input.PastKeyValues is null ? 0 : Config.PreSeqLen ?? 0;
        if (mask.dim() != 4 || mask.shape[0] != b || mask.shape[2] != s || mask.shape[3] != pastLength - prefix + s)
            throw new ArgumentException($"AttentionMask must be [{b}, 1, {s}, {pastLength - prefix + s}], got [{string.Join(", ", mask.shape)}].", nameof(input));
        if (mask.dtype != ScalarType.Bool) mask = mask.to(ScalarType.Bool);

        var (hidden, present, hiddenStates, attentions) = ((GlmModel)transformer).Forward(
            ids, positions, mask, input.PastKeyValues, input.UseCache, input.OutputHiddenStates, input.OutputAttentions);
        if (input.LogitsToKeep is { } keep)
        {
            if (keep < 1) throw new ArgumentException($"LogitsToKeep must be at least 1, got {keep}.", nameof(input));
            if (input.Labels is not null) throw new ArgumentException("LogitsToKeep cannot be combined with Labels (the loss needs every position's logits).", nameof(input));
            if (keep < s) hidden = hidden.narrow(0, s - keep, keep);
        }
        var logits = MinLora.Quantization.CpuLinear.Forward(lm_head!, hidden).permute(1, 0, 2).contiguous();                  // [b, s, V]
        var loss = Loss(logits, input.Labels, b, s);
        return new GlmOutput(
            logits.MoveToOuterDisposeScope(),
            loss,
            present,
            hiddenStates?.Select(t => t.MoveToOuterDisposeScope()).ToList(),
            attentions?.Select(t => t.MoveToOuterDisposeScope()).ToList());
    }

    /// <summary>The shifted cross-entropy over labels ≠ −100, in float32 (null without labels).</summary>
    private static Tensor? Loss(Tensor logits, Tensor? labels, long b, long s)
    {
        if (labels is null) return null;
        if (!labels.shape.SequenceEqual(new[] { b, s }))
            throw new ArgumentException($"Labels must be [{b}, {s}], got [{string.Join(", ", labels.shape)}].", nameof(labels));
        var shiftLogits = logits.to(ScalarType.Float32).narrow(1, 0, s - 1).reshape(-1, logits.shape[^1]);
        var shiftLabels = labels.narrow(1, 1, s - 1).reshape(-1);
        return nn.functional.cross_entropy(shiftLogits, shiftLabels, ignore_index: -100).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The v2 forward. Masks as the reference builds them: causal; with a padding mask [b, sk] (1 = token) padded keys
    /// are masked and padded query rows see everything; a bool [b, 1, s, sk] mask (true = masked) is used as given.
    /// Positions [b, s]; default 0…s−1 (with a cache they must be given, as for v1).
    /// </summary>
    private GlmOutput ForwardV2(GlmV2Model v2, GlmInput input, long b, long s)
    {
        var ids = input.InputIds;
        var past = input.PastKeyValues;
        if (past is not null && input.PositionIds is null)
            throw new ArgumentException("With PastKeyValues, give PositionIds [batch, new positions] for the new tokens.", nameof(input));
        using var scope = NewDisposeScope();
        // A P-tuning prefix counts as past positions (always visible); masks given by the caller do not include it.
        long prefix = Config.PreSeqLen ?? 0;
        long pastLength = past?.Length ?? prefix;
        if (past is not null && past.Count != Config.NumLayers) throw new ArgumentException($"The cache has {past.Count} layers; the model has {Config.NumLayers}.", nameof(input));
        var positions = input.PositionIds ?? arange(s, dtype: ScalarType.Int64, device: ids.device).unsqueeze(0).expand(b, s);
        if (!positions.shape.SequenceEqual(new[] { b, s }))
            throw new ArgumentException($"PositionIds must be [{b}, {s}] for a v2 model, got [{string.Join(", ", positions.shape)}].", nameof(input));
        long total = pastLength + s;
        Tensor? mask = null;
        if (input.AttentionMask is { } m)
        {
            if (m.dim() == 2)
            {
                if (m.shape[0] != b || m.shape[1] != total - prefix)
                    throw new ArgumentException($"A padding AttentionMask must be [{b}, {total - prefix}], got [{string.Join(", ", m.shape)}].", nameof(input));
                if (prefix > 0) m = cat(new[] { ones(new[] { b, prefix }, dtype: m.dtype, device: m.device), m }, 1);
                mask = V2Mask(m, s, pastLength);
            }
            else
            {
                if (m.dim() != 4 || m.shape[0] != b || m.shape[2] != s || m.shape[3] != total - prefix)
                    throw new ArgumentException($"AttentionMask must be [{b}, {total - prefix}] (padding) or [{b}, 1, {s}, {total - prefix}] (bool), got [{string.Join(", ", m.shape)}].", nameof(input));
                mask = m.dtype == ScalarType.Bool ? m : m.to(ScalarType.Bool);
                if (prefix > 0) mask = cat(new[] { zeros(new[] { b, 1, s, prefix }, dtype: ScalarType.Bool, device: mask.device), mask }, 3);
            }
        }
        else if (pastLength > 0 && s > 1)
        {
            mask = V2Mask(ones(b, total, dtype: ScalarType.Int64, device: ids.device), s, pastLength);
        }
        var (hidden, cache, hiddenStates, attentions) = v2.Forward(ids, positions, mask, past, input.UseCache, input.OutputHiddenStates, input.OutputAttentions);
        if (input.LogitsToKeep is { } keep)
        {
            if (keep < 1) throw new ArgumentException($"LogitsToKeep must be at least 1, got {keep}.", nameof(input));
            if (input.Labels is not null) throw new ArgumentException("LogitsToKeep cannot be combined with Labels (the loss needs every position's logits).", nameof(input));
            if (keep < s) hidden = hidden.narrow(0, s - keep, keep);
        }
        var logits = MinLora.Quantization.CpuLinear.Forward(v2.OutputLayer, hidden).permute(1, 0, 2).contiguous();
        var loss = Loss(logits, input.Labels, b, s);
        return new GlmOutput(
            logits.MoveToOuterDisposeScope(),
            loss,
            cache,
            hiddenStates?.Select(t => t.MoveToOuterDisposeScope()).ToList(),
            attentions?.Select(t => t.MoveToOuterDisposeScope()).ToList());
    }

    /// <summary>The reference's <c>get_masks</c>: causal over [past | new], times the padding mask; without a past, padded query rows see everything. True = masked.</summary>
    private static readonly Scalar One = 1.0, Half = 0.5; // fields, not temporaries (see GlmModules.SelfAttention)

    private static Tensor V2Mask(Tensor padding, long s, long pastLength)
    {
        long b = padding.shape[0];
        var pad = padding.to(ScalarType.Float32);
        var full = ones(new[] { b, s, s }, dtype: ScalarType.Float32, device: padding.device).tril();
        if (pastLength > 0) full = cat(new[] { ones(new[] { b, s, pastLength }, dtype: ScalarType.Float32, device: padding.device), full }, -1);
        full = full.mul(pad.unsqueeze(1));
        if (pastLength == 0) full = full.sub(pad.narrow(1, pastLength, s).unsqueeze(-1).sub(One));
        return full.lt(Half).unsqueeze(1);
    }

    /// <summary>Recomputes derived buffers after loading a checkpoint (the rotary frequencies, which the reference never loads).</summary>
    internal void AfterLoad() => (transformer as GlmModel)?.ResetRotary();

    /// <summary>A fresh random P-tuning prefix encoder (a base checkpoint has none).</summary>
    internal void InitializePrefixEncoder()
    {
        if (transformer is GlmModel v1) v1.InitializePrefixEncoder();
        else ((GlmV2Model)transformer).InitializePrefixEncoder();
    }
}
