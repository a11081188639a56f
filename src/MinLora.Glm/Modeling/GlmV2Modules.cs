using MinLora.Quantization;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MinLora.Glm.Modeling;

// The v2 architecture (ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B): RMSNorm, pre-norm residuals, multi-query attention with
// key/value groups and the [Q | K | V] fused layout, rotary embedding on the first half of each head with interleaved
// pairs, SwiGLU, causal masks. Module and parameter names are the checkpoint's (transformer.embedding.word_embeddings,
// transformer.encoder.layers.N.self_attention.query_key_value, …, transformer.output_layer).

/// <summary>RMSNorm: x·rsqrt(mean(x²) + ε)·weight, the mean in float32, the result in the input's type.</summary>
internal sealed class RmsNorm : nn.Module<Tensor, Tensor>
{
    private readonly Parameter weight;
    // Held as a Scalar field, not an implicit temporary (see SelfAttention in GlmModules.cs: TorchSharp may finalise a
    // temporary Scalar during the native call).
    private readonly Scalar _eps;
    private readonly float _epsValue;
    private readonly long _width;

    public RmsNorm(long size, double eps, GlmBuildOptions o) : base("RMSNorm")
    {
        var device = o.Device ?? CPU;
        weight = new Parameter(o.Init == GlmInit.Random && device.type != DeviceType.META
            ? ones(size, dtype: o.Dtype, device: device)
            : empty(size, dtype: o.Dtype, device: device));
        _eps = eps;
        _epsValue = (float)eps;   // libtorch adds the Scalar to the float32 mean as a float32
        _width = size;
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        // A decoding step's few bf16 rows in one managed pass (libtorch's arithmetic, see DecodeRmsNorm).
        if (DecodeRmsNorm.Applies(x, weight, _width, CpuLinear.MaxRows * _width)) return DecodeRmsNorm.Apply(x, weight, _epsValue);
        using var scope = NewDisposeScope();
        var variance = x.to(ScalarType.Float32).square().mean(new long[] { -1 }, keepdim: true);
        var normalized = x.mul(variance.add(_eps).rsqrt());
        return weight.mul(normalized).to(x.dtype).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// v2 rotary table: θ_i = 1 / base^(2i/n) for n = head size / 2 (i &lt; n/2: the first n dimensions rotate in pairs), cos and sin of position·θ in float32, cast to the
/// model's half type when it has one (as the reference's cache); <c>inv_freq</c> is kept as the checkpoint's buffer but
/// never read (the reference recomputes the table from the config).
/// </summary>
internal sealed class V2Rotary : nn.Module
{
    private readonly Tensor inv_freq;
    private readonly int _elements;
    private readonly double _base;
    private Tensor? _cache;
    private Tensor? _typed;

    /// <param name="elements">n: the number of rotated dimensions (half the head size, as the reference's <c>RotaryEmbedding(rotary_dim // 2)</c>).</param>
    /// <param name="ropeRatio">Base multiplier (base = 10,000·ratio).</param>
    /// <param name="o">Dtype and device of the <c>inv_freq</c> buffer.</param>
    public V2Rotary(int elements, double ropeRatio, GlmBuildOptions o) : base("RotaryEmbedding")
    {
        _elements = elements;
        _base = 10000.0 * ropeRatio;
        var device = o.Device ?? CPU;
        var freq = arange(0, _elements, 2, dtype: ScalarType.Float32).div(_elements);
        inv_freq = pow(_base, freq).reciprocal().to(o.Dtype).to(device).DetachFromDisposeScope();
        RegisterComponents();
    }

    /// <summary>The cache rows [positions…] as [b, s, n/2, 2] (cos, sin) in <paramref name="dtype"/>'s table type.</summary>
    public Tensor Angles(Tensor positions, ScalarType dtype)
    {
        long needed = positions.numel() == 0 ? 1 : positions.max().item<long>() + 1;
        if (_cache is null || _cache.shape[0] < needed || _cache.device_type != positions.device_type)
        {
            _cache?.Dispose();
            using var scope = NewDisposeScope();
            long length = Math.Max(needed, 256);
            var theta = pow(_base, arange(0, _elements, 2, dtype: ScalarType.Float32, device: positions.device).div(_elements)).reciprocal();
            var seq = arange(length, dtype: ScalarType.Float32, device: positions.device);
            var angles = outer(seq, theta);
            _cache = stack(new[] { angles.cos(), angles.sin() }, -1).DetachFromDisposeScope();
        }
        // The table in the model's half type (as the reference's cache), converted once per table, not per step.
        var table = _cache;
        if (dtype is ScalarType.Float16 or ScalarType.BFloat16)
        {
            if (_typed is null || _typed.dtype != dtype || _typed.shape[0] != _cache.shape[0] || _typed.device_type != _cache.device_type)
            {
                _typed?.Dispose();
                _typed = _cache.to(dtype).DetachFromDisposeScope();
            }
            table = _typed;
        }
        return table.index_select(0, positions.reshape(-1)).view(positions.shape[0], positions.shape[1], -1, 2);
    }

    /// <summary>x [s, b, heads, hd]: the first n dims rotate in interleaved pairs by <paramref name="angles"/> [s, b, n/2, 2]; the rest pass.</summary>
    public static Tensor Apply(Tensor x, Tensor angles)
    {
        long s = x.shape[0], b = x.shape[1], heads = x.shape[2];
        long half = angles.shape[2];
        long rot = half * 2;
        var xr = x.narrow(3, 0, rot).reshape(s, b, heads, half, 2);
        var c = angles.narrow(-1, 0, 1).squeeze(-1).view(s, b, 1, half);
        var n = angles.narrow(-1, 1, 1).squeeze(-1).view(s, b, 1, half);
        var x0 = xr.select(-1, 0);
        var x1 = xr.select(-1, 1);
        var rotated = stack(new[] { x0.mul(c).sub(x1.mul(n)), x1.mul(c).add(x0.mul(n)) }, -1).flatten(3);
        return rot == x.shape[3] ? rotated : cat(new[] { rotated, x.narrow(3, rot, x.shape[3] - rot) }, 3);
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _cache?.Dispose();
            _typed?.Dispose();
        }
        base.Dispose(disposing);
    }
}

/// <summary>v2 self-attention: [Q | K | V] projection, grouped keys and values, layer-scaled scores, −∞ masking.</summary>
internal sealed class V2SelfAttention : nn.Module
{
    private readonly nn.Module<Tensor, Tensor> query_key_value;
    private readonly nn.Module<Tensor, Tensor> dense;
    private readonly int _heads, _groups, _headDim;
    private readonly double _norm;
    // The same values as Scalar fields for the libtorch calls (no implicit temporaries on the hot path).
    private readonly Scalar _normScalar, _coeffScalar;
    private static readonly Scalar NegativeInfinity = float.NegativeInfinity;

    public V2SelfAttention(GlmConfig c, int layerNumber, GlmBuildOptions o) : base("SelfAttention")
    {
        _heads = c.NumAttentionHeads;
        _groups = c.KvGroups;
        _headDim = c.KvChannelsOrHeadDim;
        int layer = Math.Max(1, layerNumber);
        long projection = (long)_heads * _headDim;
        long qkv = projection + 2L * _groups * _headDim;
        query_key_value = GlmLayers.Projection(c.HiddenSize, qkv, c.AddBiasLinear == true || c.AddQkvBias == true, o);
        dense = GlmLayers.Projection(projection, c.HiddenSize, c.AddBiasLinear == true, o);
        bool scaling = c.ApplyQueryKeyLayerScaling ?? true;
        _norm = Math.Sqrt(_headDim) * (scaling ? layer : 1);
        Coeff = scaling ? layer : 1;
        _normScalar = _norm;
        _coeffScalar = Coeff;
        RegisterComponents();
    }

    private int Coeff { get; }

    /// <summary>
    /// x [s, b, h]; angles [s, b, n/2, 2]; mask [b, 1, s, sk] (true = masked) or null for plain causal; past (k, v)
    /// [sp, b, groups, hd]; slot: cache buffers [b, groups, capacity, hd] holding the past, written in place. Returns the
    /// output [s, b, h] and the attention probabilities (null when not asked for and the one-position kernel ran).
    /// </summary>
    public (Tensor Output, Tensor? Probs) Forward(Tensor x, Tensor angles, Tensor? mask, (Tensor Key, Tensor Value)? past, KvSlot? slot = null, bool needProbs = true)
    {
        var xs = x.shape;   // read once: a native call that allocates, per layer and step
        long s = xs[0], b = xs[1];
        var mixed = CpuLinear.Forward(query_key_value, x);
        long qSize = (long)_heads * _headDim, kvSize = (long)_groups * _headDim;
        if (slot is { } step && s == 1 && !needProbs && !(is_grad_enabled() && (mixed.requires_grad || (past is { } pp && (pp.Key.requires_grad || pp.Value.requires_grad)))))
        {
            // One decoding position: rotary and cache writes in one managed pass, then the attention kernel (checked
            // on shapes: no view of the projection is made, each a native tensor costing ~15–25 µs in a decoding step).
            long length = step.Offset + 1;
            if (DecodeRotary.AppliesV2(mixed, angles, step.Keys, step.Values, step.Offset, _heads, _groups) &&
                DecodeAttention.Applies(stackalloc long[] { 1, b, _heads, _headDim }, step.Keys, step.Values, length, mask))
            {
                var rotated = DecodeRotary.RotateV2(mixed, angles, step.Keys, step.Values, step.Offset, _heads, _groups);
                return (CpuLinear.Forward(dense, DecodeAttention.Run(rotated, step.Keys, step.Values, length, mask, _norm, Coeff, float.NegativeInfinity)), null);
            }
        }
        var q = mixed.narrow(-1, 0, qSize).view(s, b, _heads, _headDim);
        var k = mixed.narrow(-1, qSize, kvSize).view(s, b, _groups, _headDim);
        var v = mixed.narrow(-1, qSize + kvSize, kvSize).view(s, b, _groups, _headDim);
        q = V2Rotary.Apply(q, angles);
        k = V2Rotary.Apply(k, angles);
        int repeat = _heads / _groups;
        Tensor ks, vs;                                                   // [b·heads, sk, hd]
        long sk;
        // The in-place cache path reads detached copies: whenever gradients must flow (to k and v, or to a P-tuning
        // prefix in the past), compute on the concatenation instead.
        bool needGrad = is_grad_enabled() && (k.requires_grad || v.requires_grad || (past is { } pg && (pg.Key.requires_grad || pg.Value.requires_grad)));
        if (slot is { } sl && !needGrad)
        {
            // The cache buffers hold the past at [0, offset): this call's positions go after it, in place.
            sk = sl.Offset + s;
            sl.Keys.narrow(2, sl.Offset, s).copy_(k.detach().permute(1, 2, 0, 3));
            sl.Values.narrow(2, sl.Offset, s).copy_(v.detach().permute(1, 2, 0, 3));
            var keyBuffer = sl.Keys.narrow(2, 0, sk);
            var valueBuffer = sl.Values.narrow(2, 0, sk);
            if (s == 1 && !needProbs && DecodeAttention.Applies(q, sl.Keys, sl.Values, sk, mask))
                return (CpuLinear.Forward(dense, DecodeAttention.Run(q, sl.Keys, sl.Values, sk, mask, _norm, Coeff, float.NegativeInfinity)), null);
            ks = keyBuffer.unsqueeze(2).expand(b, _groups, repeat, sk, _headDim).reshape(b * _heads, sk, _headDim);
            vs = valueBuffer.unsqueeze(2).expand(b, _groups, repeat, sk, _headDim).reshape(b * _heads, sk, _headDim);
        }
        else
        {
            if (slot is { } sg)
            {
                // Gradients must reach k and v: compute on the concatenation; the cache keeps detached copies.
                sg.Keys.narrow(2, sg.Offset, s).copy_(k.detach().permute(1, 2, 0, 3));
                sg.Values.narrow(2, sg.Offset, s).copy_(v.detach().permute(1, 2, 0, 3));
            }
            if (past is { } p)
            {
                k = cat(new[] { p.Key, k }, 0);
                v = cat(new[] { p.Value, v }, 0);
            }
            sk = k.shape[0];
            // Grouped keys and values serve repeat heads each: [sk, b, g, hd] → [b·heads, sk, hd].
            ks = k.unsqueeze(3).expand(sk, b, _groups, repeat, _headDim).reshape(sk, b * _heads, _headDim).transpose(0, 1);
            vs = v.unsqueeze(3).expand(sk, b, _groups, repeat, _headDim).reshape(sk, b * _heads, _headDim).transpose(0, 1);
        }
        var qs = q.reshape(s, b * _heads, _headDim).transpose(0, 1);
        var scores = qs.bmm(ks.transpose(1, 2)).div(_normScalar).view(b, _heads, s, sk).to(ScalarType.Float32);
        if (Coeff != 1) scores = scores.mul(_coeffScalar);
        if (mask is null && s == sk) mask = ones(new[] { s, sk }, dtype: ScalarType.Bool, device: x.device).tril().logical_not().view(1, 1, s, sk);
        if (mask is not null) scores = scores.masked_fill(mask, NegativeInfinity);
        var probs = scores.softmax(-1).to(v.dtype);
        var flat = probs.view(b * _heads, s, sk);
        var context = flat.bmm(vs).view(b, _heads, s, _headDim).permute(2, 0, 1, 3).reshape(s, b, _heads * _headDim);
        return (CpuLinear.Forward(dense, context), flat);
    }
}

/// <summary>v2 MLP: dense_h_to_4h → SwiGLU (silu(first half)·second half) → dense_4h_to_h.</summary>
internal sealed class V2Mlp : nn.Module<Tensor, Tensor>
{
    private readonly nn.Module<Tensor, Tensor> dense_h_to_4h;
    private readonly nn.Module<Tensor, Tensor> dense_4h_to_h;

    public V2Mlp(GlmConfig c, GlmBuildOptions o) : base("MLP")
    {
        long ffn = c.FfnHiddenSize ?? 4L * c.HiddenSize;
        dense_h_to_4h = GlmLayers.Projection(c.HiddenSize, 2 * ffn, c.AddBiasLinear == true, o);
        dense_4h_to_h = GlmLayers.Projection(ffn, c.HiddenSize, c.AddBiasLinear == true, o);
        _ffn = ffn;
        RegisterComponents();
    }

    private readonly long _ffn;

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var h = CpuLinear.Forward(dense_h_to_4h, x);
        // A decoding step's few bf16 rows in one managed pass (libtorch's roundings, see DecodeSwiGlu).
        var g = DecodeSwiGlu.Applies(h, _ffn, CpuLinear.MaxRows * 2 * _ffn)
            ? DecodeSwiGlu.Apply(h, _ffn)
            : nn.functional.silu(h.narrow(-1, 0, _ffn)).mul(h.narrow(-1, _ffn, _ffn));
        return CpuLinear.Forward(dense_4h_to_h, g).MoveToOuterDisposeScope();
    }
}

/// <summary>A v2 block: h + attn(norm(h)), then + mlp(norm(·)).</summary>
internal sealed class V2Block : nn.Module
{
    private readonly nn.Module<Tensor, Tensor> input_layernorm;
    private readonly V2SelfAttention self_attention;
    private readonly nn.Module<Tensor, Tensor> post_attention_layernorm;
    private readonly V2Mlp mlp;

    public V2Block(GlmConfig c, int layerNumber, GlmBuildOptions o) : base("GLMBlock")
    {
        input_layernorm = new RmsNorm(c.HiddenSize, c.LayernormEpsilon, o);
        self_attention = new V2SelfAttention(c, layerNumber, o);
        post_attention_layernorm = new RmsNorm(c.HiddenSize, c.LayernormEpsilon, o);
        mlp = new V2Mlp(c, o);
        _hidden = c.HiddenSize;
        RegisterComponents();
    }

    private readonly long _hidden;

    /// <summary>x + y; a decoding step's few bf16 rows in one managed pass (bf16(x·1 + y), libtorch's rounding).</summary>
    private Tensor Residual(Tensor x, Tensor y) =>
        DecodeResidual.Applies(x, y, CpuLinear.MaxRows * _hidden) ? DecodeResidual.Apply(x, 1.0, y) : x.add(y);

    public (Tensor Hidden, Tensor? Probs) Forward(Tensor h, Tensor angles, Tensor? mask, (Tensor Key, Tensor Value)? past, KvSlot? slot, bool needProbs)
    {
        var (a, probs) = self_attention.Forward(input_layernorm.call(h), angles, mask, past, slot, needProbs);
        var h1 = Residual(h, a);
        var outp = Residual(h1, mlp.call(post_attention_layernorm.call(h1)));
        return (outp, probs);
    }
}

/// <summary>The v2 encoder: <c>layers</c> and the optional <c>final_layernorm</c>.</summary>
internal sealed class V2Encoder : nn.Module
{
    private readonly ModuleList<V2Block> layers = new();
    private readonly nn.Module<Tensor, Tensor>? final_layernorm;

    public V2Encoder(GlmConfig c, GlmBuildOptions o) : base("GLMTransformer")
    {
        for (int i = 0; i < c.NumLayers; i++) layers.Add(new V2Block(c, i + 1, o));
        if (c.PostLayerNorm ?? true) final_layernorm = new RmsNorm(c.HiddenSize, c.LayernormEpsilon, o);
        RegisterComponents();
    }

    public IList<V2Block> Layers => layers;

    public Tensor FinalNorm(Tensor h) => final_layernorm is null ? h : final_layernorm.call(h);
}

/// <summary>The v2 embedding module (<c>transformer.embedding.word_embeddings</c>).</summary>
internal sealed class V2Embedding : nn.Module<Tensor, Tensor>
{
    private readonly nn.Module<Tensor, Tensor> word_embeddings;

    public V2Embedding(GlmConfig c, GlmBuildOptions o) : base("Embedding")
    {
        word_embeddings = GlmLayers.Embedding(c.ModelVocabSize, c.HiddenSize, o);
        RegisterComponents();
    }

    public nn.Module<Tensor, Tensor> WordEmbeddings => word_embeddings;

    // Looked up from the transposed ids, so [s, b, h] has ordinary strides: transposing the [b, s, h] output instead
    // gives batch 1 a stride of s·h on its size-1 dimension, which every following op keeps and with which bf16 linear
    // with frozen weights ran ~200× slower (measured: one ChatGLM3-6B block at 256 tokens, 0.14 s vs 33 s).
    public override Tensor forward(Tensor ids) => word_embeddings.call(ids.t());   // [s, b, h]
}

/// <summary>
/// The v2 transformer (ChatGLM2/3, GLM-4 <c>ChatGLMModel</c>): embedding, rotary table, encoder and <c>output_layer</c>.
/// </summary>
internal sealed class GlmV2Model : nn.Module
{
    private readonly V2Embedding embedding;
    private readonly V2Rotary rotary_pos_emb;
    private readonly V2Encoder encoder;
    private readonly nn.Module<Tensor, Tensor> output_layer;
    private readonly PrefixEncoder? prefix_encoder;
    private readonly GlmConfig _config;

    private readonly bool _hugePages;

    public GlmV2Model(GlmConfig c, GlmBuildOptions o) : base("ChatGLMModel")
    {
        _config = c;
        _hugePages = o.HugePages;
        embedding = new V2Embedding(c, o);
        rotary_pos_emb = new V2Rotary(c.KvChannelsOrHeadDim / 2, c.RopeRatio ?? 1.0, o);
        encoder = new V2Encoder(c, o);
        output_layer = o.QuantizeLmHead && o.QuantizationBit > 0
            ? GlmLayers.Projection(c.HiddenSize, c.ModelVocabSize, false, o)
            : GlmLayers.Linear(c.HiddenSize, c.ModelVocabSize, false, o);
        if (c.PreSeqLen is not null) prefix_encoder = new PrefixEncoder(c, o);
        RegisterComponents();
    }

    /// <summary>Fills the P-tuning prefix encoder with a fresh random initialisation (a base checkpoint has none).</summary>
    internal void InitializePrefixEncoder() => prefix_encoder?.Reinitialize();

    public nn.Module<Tensor, Tensor> OutputLayer => output_layer;

    /// <summary>Recompute each block in backward (training without a cache or attention outputs).</summary>
    public bool GradientCheckpointing { get; set; }

    public nn.Module<Tensor, Tensor> WordEmbeddings => embedding.WordEmbeddings;

    /// <summary>
    /// ids [b, s], positions [b, s], mask [b, 1, s, sk] (true = masked) or null (causal), an earlier cache; returns the
    /// hidden states [s, b, h] after the final norm, the cache including this call (grouped keys and values, written in
    /// place after <paramref name="past"/> when it is the newest cache of its buffers), the hidden states (each block's
    /// input and the last block's output, before the final norm, as the reference) and attention probabilities when asked.
    /// </summary>
    public (Tensor Hidden, GlmKvCache? Present, List<Tensor>? HiddenStates, List<Tensor>? Attentions) Forward(
        Tensor ids, Tensor positions, Tensor? mask, GlmKvCache? past, bool useCache, bool outputHidden, bool outputAttentions)
    {
        long b = ids.shape[0], s = ids.shape[1];
        var h = embedding.call(ids);
        var angles = rotary_pos_emb.Angles(positions, h.dtype).transpose(0, 1).contiguous();    // [s, b, n/2, 2]
        var hidden = outputHidden ? new List<Tensor>() : null;
        var attentions = outputAttentions ? new List<Tensor>() : null;
        long pastLength = past?.Length ?? 0;
        (Tensor Key, Tensor Value)[]? prefix = null;
        if (past is null && prefix_encoder is not null)
        {
            prefix = prefix_encoder.KeyValues(b, h.dtype, h.device, training);
            pastLength = _config.PreSeqLen!.Value;
        }
        bool fresh = false;
        var storage = useCache
            ? KvStorage.Acquire(past, pastLength, s, b, _config.NumLayers, _config.KvGroups, _config.KvChannelsOrHeadDim, h.dtype, h.device, _hugePages, out fresh)
            : null;
        try
        {
            for (int i = 0; i < encoder.Layers.Count; i++)
            {
                hidden?.Add(h);
                (Tensor Key, Tensor Value)? layerPast = past is not null ? past[i] : prefix?[i];
                KvSlot? slot = storage?.Slot(i, pastLength, fresh, layerPast);
                using var layerScope = NewDisposeScope();
                Tensor next;
                if (GradientCheckpointing && training && is_grad_enabled() && slot is null && layerPast is null && attentions is null)
                {
                    // The recorded node needs an input that wants gradients, or the block's own parameters get none.
                    if (!h.requires_grad) h = h.detach().requires_grad_(true);
                    next = V2BlockCheckpoint.apply(h, angles, mask!, encoder.Layers[i]);
                }
                else
                {
                    var (n, probs) = encoder.Layers[i].Forward(h, angles, mask, layerPast, slot, needProbs: attentions is not null);
                    next = n;
                    if (attentions is not null) attentions.Add(probs!.MoveToOuterDisposeScope());
                }
                next.MoveToOuterDisposeScope();
                if (hidden is null) h.Dispose();
                h = next;
            }
            hidden?.Add(h);
            GlmKvCache? present = null;
            if (storage is not null)
            {
                if (fresh) storage.MarkUsed(pastLength + s);
                present = new GlmKvCache(storage, pastLength + s);
            }
            return (encoder.FinalNorm(h), present, hidden, attentions);
        }
        finally
        {
            if (fresh) storage!.Release();
        }
    }
}
