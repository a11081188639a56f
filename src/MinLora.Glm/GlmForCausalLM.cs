using MinLora.Glm.Modeling;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MinLora.Glm;

/// <summary>
/// The GLM transformer (ChatGLM-6B, v1): embeddings, blocks, final LayerNorm and the optional P-tuning v2 prefix.
/// Its state-dict keys are the checkpoint's under <c>transformer.</c>.
/// </summary>
public sealed class GlmModel : nn.Module
{
    private readonly nn.Module<Tensor, Tensor> word_embeddings;
    private readonly ModuleList<GlmBlock> layers = new();
    private readonly nn.Module<Tensor, Tensor> final_layernorm;
    private readonly PrefixEncoder? prefix_encoder;
    private readonly GlmConfig _config;

    internal GlmModel(GlmConfig config, GlmBuildOptions o) : base("ChatGLMModel")
    {
        _config = config;
        word_embeddings = GlmLayers.Embedding(config.VocabSize, config.HiddenSize, o);
        for (int i = 0; i < config.NumLayers; i++) layers.Add(new GlmBlock(config, i, o));
        final_layernorm = GlmLayers.LayerNorm(config.HiddenSize, config.LayernormEpsilon, o);
        if (config.PreSeqLen is not null) prefix_encoder = new PrefixEncoder(config, o);
        RegisterComponents();
    }

    /// <summary>The float embedding table [vocab, hidden].</summary>
    /// <exception cref="InvalidOperationException">The table is quantized (see <see cref="QuantizedWordEmbeddings"/>).</exception>
    public Parameter WordEmbeddings => word_embeddings is GlmEmbedding e
        ? e.Weight
        : throw new InvalidOperationException("The word embeddings are quantized (GlmBuildOptions.QuantizeEmbeddings): use QuantizedWordEmbeddings.");

    /// <summary>The quantized embedding table when built with <see cref="GlmBuildOptions.QuantizeEmbeddings"/>, else null.</summary>
    public MinLora.Quantization.QuantizedEmbedding? QuantizedWordEmbeddings => word_embeddings as MinLora.Quantization.QuantizedEmbedding;

    /// <summary>
    /// Recompute each block in backward instead of keeping its activations (training without a cache or prefix
    /// only). See <see cref="GlmForCausalLM.GradientCheckpointing"/>.
    /// </summary>
    internal bool GradientCheckpointing { get; set; }

    internal IEnumerable<GlmBlock> Layers => layers;

    internal bool HasPrefix => prefix_encoder is not null;

    /// <summary>Runs the transformer; returns the final hidden states [s, b, h] and optional extras.</summary>
    /// <remarks>
    /// Each block runs in its own dispose scope and the previous block's output is released as soon as the next one
    /// exists, so the managed side holds one block's temporaries at a time (what autograd saved stays alive natively).
    /// </remarks>
    internal (Tensor Hidden, GlmKvCache? Present, List<Tensor>? HiddenStates, List<Tensor>? Attentions) Forward(
        Tensor ids, Tensor positionIds, Tensor? mask, GlmKvCache? past, bool useCache, bool outputHidden, bool outputAttentions)
    {
        long b = ids.shape[0], s = ids.shape[1];
        var h = word_embeddings.call(ids).transpose(0, 1);                         // [s, b, h]
        var pasts = new (Tensor Key, Tensor Value)?[_config.NumLayers];
        long pastLength = 0;
        if (past is not null)
        {
            if (past.Count != _config.NumLayers) throw new ArgumentException($"The cache has {past.Count} layers; the model has {_config.NumLayers}.", nameof(past));
            pastLength = past.Length;
        }
        else if (prefix_encoder is not null)
        {
            var prompt = prefix_encoder.KeyValues(b, h.dtype, h.device, training);
            for (int i = 0; i < pasts.Length; i++) pasts[i] = prompt[i];
            pastLength = _config.PreSeqLen!.Value;
        }
        if (prefix_encoder is not null && mask is not null)
        {
            // The prefix is visible to every position.
            var prefixMask = zeros(new[] { b, 1, mask.shape[2], (long)_config.PreSeqLen!.Value }, dtype: ScalarType.Bool, device: mask.device);
            mask = cat(new[] { prefixMask, mask }, 3);
        }

        // The cache: continue the past's buffers in place when this call extends the newest cache of them, else
        // new buffers with the past copied in (first call, a P-tuning prefix, or a branch from an older cache).
        bool fresh = false;
        var storage = useCache
            ? KvStorage.Acquire(past, pastLength, s, b, _config.NumLayers, _config.NumAttentionHeads, _config.HeadDim, h.dtype, h.device, out fresh)
            : null;
        if (past is not null)
        {
            for (int i = 0; i < pasts.Length; i++) pasts[i] = past[i];
        }

        try
        {
            // One set of rotary angles for all layers (their tables are identical): one host sync per forward, not per layer.
            var angles = layers[0].Attention.Rotary.Angles(positionIds);
            var hidden = outputHidden ? new List<Tensor>() : null;
            var attentions = outputAttentions ? new List<Tensor>() : null;
            int index = 0;
            foreach (var layer in layers)
            {
                hidden?.Add(h);
                KvSlot? slot = storage?.Slot(index, pastLength, fresh, pasts[index]);
                Tensor next;
                using (var layerScope = NewDisposeScope())
                {
                    if (GradientCheckpointing && training && is_grad_enabled() && slot is null && pasts[index] is null && attentions is null)
                    {
                        // The recorded node needs an input that wants gradients, or the parameters inside the block
                        // (which are not inputs of the node) would get none: a frozen embedding's output does not.
                        if (!h.requires_grad) h = h.detach().requires_grad_(true);
                        next = BlockCheckpoint.apply(h, angles.CosPosition, angles.SinPosition, angles.CosBlock, angles.SinBlock, mask!, layer).MoveToOuterDisposeScope();
                    }
                    else
                    {
                        var (n, _, probs) = layer.Forward(h, angles, mask, pasts[index], slot, needProbs: attentions is not null);
                        next = n.MoveToOuterDisposeScope();
                        if (attentions is not null) attentions.Add(probs!.MoveToOuterDisposeScope());
                    }
                }
                if (hidden is null) h.Dispose();
                h = next;
                index++;
            }
            h = final_layernorm.call(h);
            hidden?.Add(h);
            GlmKvCache? present = null;
            if (storage is not null)
            {
                if (fresh) storage.MarkUsed(pastLength + s);
                present = new GlmKvCache(storage, pastLength + s);
            }
            return (h, present, hidden, attentions);
        }
        finally
        {
            if (fresh) storage!.Release();
        }
    }

    /// <summary>Fills the P-tuning prefix encoder with a fresh random initialisation (a base checkpoint has none).</summary>
    internal void InitializePrefixEncoder() => prefix_encoder?.Reinitialize();

    /// <summary>Recomputes the rotary buffers (after a checkpoint wrote into them: the reference ignores their saved values).</summary>
    internal void ResetRotary()
    {
        foreach (var l in layers) l.Attention.Rotary.Reset(_config.HeadDim / 2);
    }
}

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
    /// <exception cref="InvalidDataException">A corrupt file, or missing/unexpected keys or wrong shapes (named in the message).</exception>
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
    private static Tensor V2Mask(Tensor padding, long s, long pastLength)
    {
        long b = padding.shape[0];
        var pad = padding.to(ScalarType.Float32);
        var full = ones(new[] { b, s, s }, dtype: ScalarType.Float32, device: padding.device).tril();
        if (pastLength > 0) full = cat(new[] { ones(new[] { b, s, pastLength }, dtype: ScalarType.Float32, device: padding.device), full }, -1);
        full = full.mul(pad.unsqueeze(1));
        if (pastLength == 0) full = full.sub(pad.narrow(1, pastLength, s).unsqueeze(-1).sub(1));
        return full.lt(0.5).unsqueeze(1);
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
