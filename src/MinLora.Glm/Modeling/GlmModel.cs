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
    private readonly bool _hugePages;

    internal GlmModel(GlmConfig config, GlmBuildOptions o) : base("ChatGLMModel")
    {
        _config = config;
        _hugePages = o.HugePages;
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
            ? KvStorage.Acquire(past, pastLength, s, b, _config.NumLayers, _config.NumAttentionHeads, _config.HeadDim, h.dtype, h.device, _hugePages, out fresh)
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
                        var (n, probs) = layer.Forward(h, angles, mask, pasts[index], slot, needProbs: attentions is not null);
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
