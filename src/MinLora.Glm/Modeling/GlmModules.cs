using TorchSharp;
using TorchSharp.Modules;
using MinLora.Quantization;
using static TorchSharp.torch;

namespace MinLora.Glm.Modeling;

/// <summary>How new parameters are filled.</summary>
public enum GlmInit
{
    /// <summary>Random initialisation (PyTorch's defaults), for training from scratch and tests.</summary>
    Random,
    /// <summary>Uninitialised memory, to be overwritten by a checkpoint (fast: no random numbers drawn).</summary>
    Empty,
}

/// <summary>Where and how a GLM model is built.</summary>
/// <param name="Dtype">Element type of the parameters.</param>
/// <param name="Device">Device of the parameters (<c>meta</c> for shape-only models).</param>
/// <param name="Init">How parameters are filled.</param>
public sealed record GlmBuildOptions(ScalarType Dtype = ScalarType.Float32, Device? Device = null, GlmInit Init = GlmInit.Random)
{
    /// <summary>
    /// Build the block projections (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) directly as empty
    /// quantized layers of this many bits (0: float), to load a pre-quantized checkpoint without ever allocating
    /// the float weights.
    /// </summary>
    public int QuantizationBit { get; init; }

    /// <summary>The 4-bit layout of such projections (ChatGLM's int4 checkpoints use <see cref="MinLora.Quantization.QuantizationFormat.Int4PerRowChatGlm"/>).</summary>
    public MinLora.Quantization.QuantizationFormat Int4Format { get; init; } = MinLora.Quantization.QuantizationFormat.Int4PerRowChatGlm;

    /// <summary>Compute settings of such quantized projections.</summary>
    public MinLora.Quantization.QuantizedLinearOptions? QuantizedLayer { get; init; }

    /// <summary>
    /// With <see cref="QuantizationBit"/>, build <c>lm_head</c> quantized too (chatglm.cpp and ChatGLM's
    /// <c>quantization_embeddings</c> do the same): at int4 the bf16 head is 1.07 GB of the 3.9 GB a decoding step
    /// reads. Not for checkpoints that tie the head to the embedding (the tie copies a float table into it).
    /// </summary>
    /// <value>The default value is false.</value>
    public bool QuantizeLmHead { get; init; }

    /// <summary>
    /// With <see cref="QuantizationBit"/>, build <c>word_embeddings</c> as a <see cref="MinLora.Quantization.QuantizedEmbedding"/>
    /// in the projections' format (ChatGLM's <c>quantization_embeddings</c>; state dict keys <c>weight</c> and
    /// <c>weight_scale</c>): at int4, 0.27 GB instead of 1.07 GB. Each step dequantizes only the rows it looks up.
    /// Not for checkpoints that tie the head to the embedding.
    /// </summary>
    /// <value>The default value is false.</value>
    public bool QuantizeEmbeddings { get; init; }

    /// <summary>
    /// Place the large CPU weights (when built, and after a load quantizes them) and the KV cache of generation on
    /// transparent huge pages (<see cref="MinLora.Quantization.CpuMemory.UseHugePages(nn.Module)"/>): decoding streams
    /// every weight once per token, and 2 MiB pages spare a page walk per 4 KiB. Best effort; ignored on other devices
    /// and operating systems. A model quantized later with <c>Quantize</c> can call <c>UseHugePages()</c> itself.
    /// </summary>
    /// <value>The default value is true.</value>
    public bool HugePages { get; init; } = true;

    /// <summary>
    /// Keep <see cref="HugePages"/> for the KV caches but do not place the weights at build: the loader places them
    /// once the projections it quantizes on load are placeholders (placing now would fault the float model in).
    /// </summary>
    internal bool DeferHugePages { get; init; }
}

/// <summary>Factories that allocate parameters directly where they belong (no CPU detour, no init when empty).</summary>
internal static class GlmLayers
{
    private static readonly Device Meta = new(DeviceType.META);

    internal static Linear Linear(long inFeatures, long outFeatures, bool bias, GlmBuildOptions o)
    {
        var device = o.Device ?? CPU;
        if (o.Init == GlmInit.Random || device.type == DeviceType.META)
            return nn.Linear(inFeatures, outFeatures, bias, device, o.Dtype);
        var linear = nn.Linear(inFeatures, outFeatures, bias, Meta, o.Dtype);
        linear.weight = new Parameter(empty(new[] { outFeatures, inFeatures }, dtype: o.Dtype, device: device));
        if (bias) linear.bias = new Parameter(empty(new[] { outFeatures }, dtype: o.Dtype, device: device));
        return linear;
    }

    /// <summary>A block projection: a float Linear, or an empty quantized layer when <see cref="GlmBuildOptions.QuantizationBit"/> is set.</summary>
    internal static nn.Module<Tensor, Tensor> Projection(long inFeatures, long outFeatures, bool bias, GlmBuildOptions o)
    {
        if (o.QuantizationBit == 0) return Linear(inFeatures, outFeatures, bias, o);
        var format = MinLora.Quantization.QuantizationFormats.FromBits(o.QuantizationBit, o.Int4Format);
        var device = o.Device ?? CPU;
        bool random = o.Init == GlmInit.Random && device.type != DeviceType.META;
        if (device.type == DeviceType.META) device = CPU;
        var layer = MinLora.Quantization.QuantizedLinear.Empty(inFeatures, outFeatures, bias, format, 128, o.Dtype, device, o.QuantizedLayer);
        if (random)
        {
            RandomizeQuantized(layer);
            layer.RefreshKernel();
        }
        return layer;
    }

    /// <summary>
    /// The word embedding table: float, or (with <see cref="GlmBuildOptions.QuantizeEmbeddings"/> and
    /// <see cref="GlmBuildOptions.QuantizationBit"/>) quantized in the projections' format, random codes with unit
    /// spread when <see cref="GlmInit.Random"/> (as the float table's normal initialisation).
    /// </summary>
    internal static nn.Module<Tensor, Tensor> Embedding(long rows, long dim, GlmBuildOptions o)
    {
        if (!o.QuantizeEmbeddings || o.QuantizationBit == 0) return new GlmEmbedding(rows, dim, o);
        var format = MinLora.Quantization.QuantizationFormats.FromBits(o.QuantizationBit, o.Int4Format);
        var device = o.Device ?? CPU;
        bool random = o.Init == GlmInit.Random && device.type != DeviceType.META;
        if (device.type == DeviceType.META) device = CPU;
        var table = MinLora.Quantization.QuantizedEmbedding.Empty(rows, dim, format, 128, o.Dtype, device);
        if (random) RandomizeQuantized(table.QuantizedWeight, Math.Sqrt(3));
        return table;
    }

    /// <summary>
    /// Random integer codes with scales that give the spread of PyTorch's default Linear initialisation
    /// (uniform in ±1/√in), drawn directly in the stored format: no float weight is ever allocated.
    /// </summary>
    private static void RandomizeQuantized(MinLora.Quantization.QuantizedLinear layer)
    {
        RandomizeQuantized(layer.QuantizedWeight, 1.0 / Math.Sqrt(layer.InFeatures));
        using var noGrad = no_grad();
        double bound = 1.0 / Math.Sqrt(layer.InFeatures);
        layer.Bias?.uniform_(-bound, bound);
    }

    /// <summary>Random codes in the stored format, values spread about uniformly in ±<paramref name="bound"/>.</summary>
    private static void RandomizeQuantized(MinLora.Quantization.QuantizedWeight q, double bound)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var w = q.Weight;
        switch (q.Format)
        {
            case MinLora.Quantization.QuantizationFormat.Int8PerRow:
                w.copy_(randint(-127, 128, w.shape, dtype: ScalarType.Int8, device: w.device));
                q.Scale.fill_(bound / 127);
                break;
            case MinLora.Quantization.QuantizationFormat.Int4PerRowChatGlm:
                // Every byte pattern is two valid nibbles in [−8, 7].
                w.copy_(randint(-128, 128, w.shape, dtype: ScalarType.Int8, device: w.device));
                q.Scale.fill_(bound / 7.5);
                break;
            default:
                w.copy_(randint(0, 256, w.shape, dtype: ScalarType.Byte, device: w.device));
                q.Scale.fill_(bound / 7.5);
                q.Zero!.fill_(bound / 15);
                break;
        }
    }

    internal static GlmLayerNorm LayerNorm(long size, double eps, GlmBuildOptions o) => new(size, eps, o);

    internal static Parameter Table(long rows, long dim, GlmBuildOptions o)
    {
        var device = o.Device ?? CPU;
        var t = empty(new[] { rows, dim }, dtype: o.Dtype, device: device);
        if (o.Init == GlmInit.Random && device.type != DeviceType.META)
        {
            using var noGrad = no_grad();
            nn.init.normal_(t);
        }
        return (Parameter)new Parameter(t).DetachFromDisposeScope();
    }
}

/// <summary>
/// An embedding table (<c>weight</c> [rows, dim]) looked up with <c>index_select</c>. Unlike TorchSharp's native
/// Embedding it is created directly on any device, including <c>meta</c> (the native one is built on the CPU first:
/// 2 GiB and 6 s for ChatGLM-6B's table).
/// </summary>
internal sealed class GlmEmbedding : nn.Module<Tensor, Tensor>
{
    private Parameter weight;

    public GlmEmbedding(long rows, long dim, GlmBuildOptions o) : base("Embedding")
    {
        weight = GlmLayers.Table(rows, dim, o);
        RegisterComponents();
    }

    public Parameter Weight => weight;

    /// <summary>ids [...] → [..., dim].</summary>
    public override Tensor forward(Tensor ids)
    {
        using var scope = NewDisposeScope();
        var shape = ids.shape.Append(weight.shape[1]).ToArray();
        return weight.index_select(0, ids.reshape(-1)).reshape(shape).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// ChatGLM-6B's rotary table: <c>inv_freq = 1 / 10000^(2i/d)</c> computed in float32 and rounded to float16 (as the
/// reference's <c>precision=torch.half</c> does), kept as the buffer <c>inv_freq</c> (its checkpoint value is
/// ignored on load, as the reference ignores it), and cos/sin tables computed in the buffer's element type.
/// </summary>
internal sealed class RotaryEmbedding : nn.Module
{
    private Tensor inv_freq;
    private (long Length, Tensor Cos, Tensor Sin)? _cache;
    private readonly List<(Tensor Cos, Tensor Sin)> _retired = new();

    public RotaryEmbedding(int dim, GlmBuildOptions o) : base(nameof(RotaryEmbedding))
    {
        inv_freq = Frequencies(dim, o.Dtype, o.Device ?? CPU);
        RegisterComponents();
    }

    internal static Tensor Frequencies(int dim, ScalarType dtype, Device device)
    {
        using var scope = NewDisposeScope();
        var exponent = arange(0, dim, 2, dtype: ScalarType.Float32).div(dim);
        var f = pow(10000.0, exponent).reciprocal().to(ScalarType.Float16).to(dtype);
        return f.to(device).MoveToOuterDisposeScope().DetachFromDisposeScope();
    }

    /// <summary>Restores the computed frequencies (after a checkpoint wrote into the buffer).</summary>
    public void Reset(int dim)
    {
        using var noGrad = no_grad();
        if (inv_freq.device_type == DeviceType.META) return;
        using var f = Frequencies(dim, inv_freq.dtype, inv_freq.device);
        inv_freq.copy_(f);
        lock (_retired)
        {
            if (_cache is { } old) _retired.Add((old.Cos, old.Sin));
            _cache = null;
        }
    }

    /// <summary>
    /// cos and sin tables [length, dim] for positions 0..length−1, in the buffer's element type. Tables only grow;
    /// replaced ones are kept until the module is disposed, so a concurrent caller never sees its tables freed.
    /// </summary>
    public (Tensor Cos, Tensor Sin) Tables(long length)
    {
        lock (_retired)
        {
            if (_cache is { } c && c.Length >= length && c.Cos.dtype == inv_freq.dtype &&
                c.Cos.device_type == inv_freq.device_type && c.Cos.device_index == inv_freq.device_index)
                return (c.Cos, c.Sin);
            if (_cache is { } old) _retired.Add((old.Cos, old.Sin));
            using var scope = NewDisposeScope();
            var t = arange(length, dtype: inv_freq.dtype, device: inv_freq.device);
            var freqs = t.unsqueeze(1).mul(inv_freq.unsqueeze(0));   // einsum('i,j->ij')
            var emb = cat(new[] { freqs, freqs }, 1);
            var cos = emb.cos().MoveToOuterDisposeScope().DetachFromDisposeScope();
            var sin = emb.sin().MoveToOuterDisposeScope().DetachFromDisposeScope();
            _cache = (length, cos, sin);
            return (cos, sin);
        }
    }

    /// <summary>
    /// The cos/sin of the positions and block positions of <paramref name="positionIds"/> [b, 2, s], each [s, b, 1, d].
    /// Every layer's table is the same, so the model computes these once per forward and shares them.
    /// </summary>
    public RotaryAngles Angles(Tensor positionIds)
    {
        var (cos, sin) = Tables(positionIds.max().item<long>() + 1);
        long s = positionIds.shape[2], b = positionIds.shape[0], d = cos.shape[1];
        Tensor Gather(Tensor table, Tensor positions) => table.index_select(0, positions.reshape(-1)).view(s, b, 1, d);
        var position = positionIds.select(1, 0).t();                                       // [s, b]
        var block = positionIds.select(1, 1).t();
        return new RotaryAngles(Gather(cos, position), Gather(sin, position), Gather(cos, block), Gather(sin, block));
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _cache?.Cos.Dispose();
            _cache?.Sin.Dispose();
            _cache = null;
            foreach (var (c, n) in _retired)
            {
                c.Dispose();
                n.Dispose();
            }
            _retired.Clear();
        }
        base.Dispose(disposing);
    }
}

/// <summary>Where a layer writes its new keys and values: cache buffers [capacity, b, heads, d] holding the past at [0, Offset).</summary>
internal readonly record struct KvSlot(Tensor Keys, Tensor Values, long Offset);

/// <summary>cos/sin at the positions and block positions, each [s, b, 1, d].</summary>
internal sealed record RotaryAngles(Tensor CosPosition, Tensor SinPosition, Tensor CosBlock, Tensor SinBlock);

/// <summary>ChatGLM-6B self-attention: fused per-head-interleaved QKV, 2-D rotary positions, layer-scaled scores.</summary>
internal sealed class GlmSelfAttention : nn.Module
{
    private readonly nn.Module<Tensor, Tensor> query_key_value;
    private readonly nn.Module<Tensor, Tensor> dense;
    private readonly RotaryEmbedding rotary_emb;
    private readonly int _heads;
    private readonly int _headDim;
    private readonly int _layerId;

    // TorchSharp passes a Scalar's native handle without keeping the Scalar alive, so an implicit temporary can be
    // finalised during the native call (seen as "Expected false to be true" in masked_fill during long training).
    // Hot-path constants are therefore held in fields.
    private static readonly Scalar MaskValue = -10000.0;
    private readonly Scalar _norm;
    private readonly Scalar _coeff;
    private readonly double _normValue;

    public GlmSelfAttention(GlmConfig c, int layerId, GlmBuildOptions o) : base("SelfAttention")
    {
        _heads = c.NumAttentionHeads;
        _headDim = c.HeadDim;
        _layerId = layerId;
        query_key_value = GlmLayers.Projection(c.HiddenSize, 3L * c.HiddenSize, true, o);
        dense = GlmLayers.Projection(c.HiddenSize, c.HiddenSize, true, o);
        rotary_emb = new RotaryEmbedding(_headDim / 2, o);
        _coeff = (double)(layerId + 1);
        _normValue = Math.Sqrt(_headDim) * (layerId + 1);
        _norm = _normValue;
        RegisterComponents();
    }

    public RotaryEmbedding Rotary => rotary_emb;

    /// <summary>
    /// x [s, b, h]; angles from <see cref="RotaryEmbedding.Angles"/>; mask [b, 1, s, sk] (True = masked) or null; past
    /// (k, v) [sp, b, heads, d]; slot: cache buffers [b, heads, capacity, d] holding the past, written in place. Returns
    /// the output [s, b, h] and the attention probabilities [b·heads, s, sk] (null when not asked for and the
    /// one-position kernel ran).
    /// </summary>
    public (Tensor Output, Tensor? Probs) Forward(Tensor x, RotaryAngles angles, Tensor? mask, (Tensor Key, Tensor Value)? past, KvSlot? slot = null, bool needProbs = true)
    {
        var xs = x.shape;
        long s = xs[0], b = xs[1];
        var projection = CpuLinear.Forward(query_key_value, x);                                          // [s, b, 3·h]
        if (slot is { } step && s == 1 && !needProbs && !(is_grad_enabled() && projection.requires_grad))
        {
            // One decoding position: rotary and cache writes in one managed pass, then the attention kernel (checked
            // on shapes: no view of the projection is made, each a native tensor costing ~15–25 µs in a decoding step).
            long length = step.Offset + 1;
            if (DecodeRotary.Applies(projection, _heads, angles, step.Keys, step.Values, step.Offset) &&
                DecodeAttention.Applies(stackalloc long[] { s, b, _heads, _headDim }, step.Keys, step.Values, length, mask))
            {
                var rotated = DecodeRotary.Rotate(projection, _heads, angles, step.Keys, step.Values, step.Offset);
                return (CpuLinear.Forward(dense, DecodeAttention.Run(rotated, step.Keys, step.Values, length, mask, _normValue, _layerId + 1)), null);
            }
        }
        var mixed = projection.view(s, b, _heads, 3 * _headDim);                                        // [s, b, np, 3·hn]
        var q = mixed.narrow(3, 0, _headDim);
        var k = mixed.narrow(3, _headDim, _headDim);
        var v = mixed.narrow(3, 2 * _headDim, _headDim);

        // 2-D rotary: the first half of each head rotates by position, the second by block position.
        int half = _headDim / 2;
        var (q1, k1) = Rotate(q.narrow(3, 0, half), k.narrow(3, 0, half), angles.CosPosition, angles.SinPosition);
        var (q2, k2) = Rotate(q.narrow(3, half, half), k.narrow(3, half, half), angles.CosBlock, angles.SinBlock);
        q = cat(new[] { q1, q2 }, 3);
        k = cat(new[] { k1, k2 }, 3);
        // ks, vs: [b·np, sk, hn] (possibly strided views of the cache buffers, read in place by the products).
        Tensor ks, vs;
        if (slot is { } sl)
        {
            // The cache buffers [b, np, capacity, hn] hold the past at [0, offset): write this call's positions after
            // it, in place.
            long total = sl.Offset + s;
            var keyBuffer = sl.Keys.narrow(2, 0, total);
            var valueBuffer = sl.Values.narrow(2, 0, total);
            keyBuffer.narrow(2, sl.Offset, s).copy_(k.detach().permute(1, 2, 0, 3));
            valueBuffer.narrow(2, sl.Offset, s).copy_(v.detach().permute(1, 2, 0, 3));
            if (is_grad_enabled() && (k.requires_grad || v.requires_grad))
            {
                // Gradients must reach k and v: compute on the concatenation; the cache keeps detached copies.
                if (past is { } pg)
                {
                    k = cat(new[] { pg.Key, k }, 0);
                    v = cat(new[] { pg.Value, v }, 0);
                }
                ks = k.reshape(total, b * _heads, _headDim).transpose(0, 1);
                vs = v.reshape(total, b * _heads, _headDim).transpose(0, 1);
            }
            else
            {
                // One decoding position and no probabilities wanted: the managed kernel streams each head's cache block.
                if (s == 1 && !needProbs && DecodeAttention.Applies(q, sl.Keys, sl.Values, total, mask))
                    return (CpuLinear.Forward(dense, DecodeAttention.Run(q, sl.Keys, sl.Values, total, mask, _normValue, _layerId + 1)), null);
                ks = keyBuffer.reshape(b * _heads, total, _headDim);
                vs = valueBuffer.reshape(b * _heads, total, _headDim);
            }
        }
        else
        {
            if (past is { } p)
            {
                k = cat(new[] { p.Key, k }, 0);
                v = cat(new[] { p.Value, v }, 0);
            }
            long total = k.shape[0];
            ks = k.reshape(total, b * _heads, _headDim).transpose(0, 1);                                 // [b·np, sk, hn]
            vs = v.reshape(total, b * _heads, _headDim).transpose(0, 1);                                 // [b·np, sk, hn]
        }

        // Scores: q / (√d · (layer+1)), masked with −10000, then × (layer+1) in float32, softmax.
        long sk = ks.shape[1];
        var qs = q.div(_norm).reshape(s, b * _heads, _headDim).transpose(0, 1);                          // [b·np, s, hn]
        // With the cache's strided keys, K·qᵀ reads them in place while q·Kᵀ copies them first (measured at 1,025
        // positions for 28 layers: 32 vs 105 ms); the same dot products either way.
        var scores = (slot is null ? qs.bmm(ks.transpose(1, 2)) : ks.bmm(qs.transpose(1, 2)).transpose(1, 2)).reshape(b, _heads, s, sk);
        if (mask is not null) scores = scores.masked_fill(mask, MaskValue);
        var dtype = scores.dtype;
        var probs = scores.to(ScalarType.Float32).mul(_coeff).softmax(-1).to(dtype);      // [b, np, s, sk]
        var flatProbs = probs.view(b * _heads, s, sk);
        var context = flatProbs.bmm(vs).view(b, _heads, s, _headDim).permute(2, 0, 1, 3).reshape(s, b, _heads * _headDim);
        return (CpuLinear.Forward(dense, context), flatProbs);
    }

    /// <summary>x·cos + rotate_half(x)·sin with cos/sin [s, b, 1, d] already gathered at the positions.</summary>
    internal static (Tensor Q, Tensor K) Rotate(Tensor q, Tensor k, Tensor c, Tensor n) =>
        (q.mul(c).add(RotateHalf(q).mul(n)), k.mul(c).add(RotateHalf(k).mul(n)));

    private static Tensor RotateHalf(Tensor x)
    {
        long h = x.shape[^1] / 2;
        return cat(new[] { x.narrow(-1, h, h).neg(), x.narrow(-1, 0, h) }, -1);
    }
}

/// <summary>ChatGLM-6B's MLP ("GLU" in the reference): dense_h_to_4h → tanh-GELU → dense_4h_to_h.</summary>
internal sealed class GlmMlp : nn.Module<Tensor, Tensor>
{
    private readonly nn.Module<Tensor, Tensor> dense_h_to_4h;
    private readonly nn.Module<Tensor, Tensor> dense_4h_to_h;

    public GlmMlp(GlmConfig c, GlmBuildOptions o) : base("GLU")
    {
        dense_h_to_4h = GlmLayers.Projection(c.HiddenSize, c.MlpHiddenSize, true, o);
        dense_4h_to_h = GlmLayers.Projection(c.MlpHiddenSize, c.HiddenSize, true, o);
        _width = c.MlpHiddenSize;
        RegisterComponents();
    }

    private readonly long _width;

    private static readonly Scalar Half = 0.5, Sqrt2OverPi = 0.7978845608028654, Cubic = 0.044715, One = 1.0;

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var h = CpuLinear.Forward(dense_h_to_4h, x);
        // 0.5·x·(1 + tanh(0.7978845608028654·x·(1 + 0.044715·x²))); a decoding step's few rows in one managed pass.
        var g = DecodeGelu.Applies(h, CpuLinear.MaxRows * _width)
            ? DecodeGelu.Apply(h)
            : h.mul(Half).mul(h.mul(Sqrt2OverPi).mul(h.square().mul(Cubic).add(One)).tanh().add(One));
        return CpuLinear.Forward(dense_4h_to_h, g).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// ChatGLM-6B's LayerNorm over the last dimension, with the checkpoint's <c>weight</c> (ones when built) and
/// <c>bias</c> (zeros): libtorch's <c>layer_norm</c>, or for a decoding step's few bf16 rows the same arithmetic in
/// one managed pass (<see cref="DecodeLayerNorm"/>).
/// </summary>
internal sealed class GlmLayerNorm : nn.Module<Tensor, Tensor>
{
    private readonly Parameter weight;
    private readonly Parameter bias;
    private readonly long[] _shape;
    private readonly double _eps;
    private readonly float _epsValue;
    private readonly long _width;

    public GlmLayerNorm(long size, double eps, GlmBuildOptions o) : base("LayerNorm")
    {
        var device = o.Device ?? CPU;
        weight = new Parameter(ones(size, dtype: o.Dtype, device: device));
        bias = new Parameter(zeros(size, dtype: o.Dtype, device: device));
        _shape = new[] { size };
        _eps = eps;
        _epsValue = (float)eps;   // libtorch's kernel takes ε as a float32
        _width = size;
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) =>
        DecodeLayerNorm.Applies(x, weight, bias, _width, CpuLinear.MaxRows * _width)
            ? DecodeLayerNorm.Apply(x, weight, bias, _epsValue)
            : nn.functional.layer_norm(x, _shape, weight, bias, _eps);
}

/// <summary>A ChatGLM-6B block: the residual adds the LayerNorm output times √(2·28).</summary>
internal sealed class GlmBlock : nn.Module
{
    private const int ReferenceLayers = 28;

    private readonly nn.Module<Tensor, Tensor> input_layernorm;
    private readonly GlmSelfAttention attention;
    private readonly nn.Module<Tensor, Tensor> post_attention_layernorm;
    private readonly GlmMlp mlp;
    private readonly Scalar _alpha;
    private readonly double _alphaValue;
    private readonly long _hidden;

    public GlmBlock(GlmConfig c, int layerId, GlmBuildOptions o) : base("GLMBlock")
    {
        input_layernorm = GlmLayers.LayerNorm(c.HiddenSize, c.LayernormEpsilon, o);
        attention = new GlmSelfAttention(c, layerId, o);
        post_attention_layernorm = GlmLayers.LayerNorm(c.HiddenSize, c.LayernormEpsilon, o);
        mlp = new GlmMlp(c, o);
        // The reference's GLMBlock takes num_layers=28 as a default argument that ChatGLMModel never passes, so
        // alpha is √56 for every ChatGLM-6B-architecture model, whatever its depth (the golden tiny models confirm it).
        _alphaValue = Math.Sqrt(2.0 * ReferenceLayers);
        _alpha = _alphaValue;
        _hidden = c.HiddenSize;
        RegisterComponents();
    }

    public GlmSelfAttention Attention => attention;

    /// <summary>x·alpha + y; a decoding step's few bf16 rows in one managed pass (the same bf16 roundings).</summary>
    private Tensor Residual(Tensor x, Tensor y) =>
        DecodeResidual.Applies(x, y, CpuLinear.MaxRows * _hidden) ? DecodeResidual.Apply(x, _alphaValue, y) : x.mul(_alpha).add(y);

    public (Tensor Hidden, Tensor? Probs) Forward(Tensor h, RotaryAngles angles, Tensor? mask, (Tensor Key, Tensor Value)? past, KvSlot? slot = null, bool needProbs = true)
    {
        var x = input_layernorm.call(h);
        var (a, probs) = attention.Forward(x, angles, mask, past, slot, needProbs);
        var h1 = Residual(x, a);
        var y = post_attention_layernorm.call(h1);
        var outp = Residual(y, mlp.call(y));
        return (outp, probs);
    }
}

/// <summary>P-tuning v2 prefix: keys and values for every layer from a learned table (optionally through an MLP).</summary>
internal sealed class PrefixEncoder : nn.Module<Tensor, Tensor>
{
    private readonly GlmEmbedding embedding;
    private readonly nn.Module<Tensor, Tensor>? trans;

    private readonly GlmConfig _config;

    public PrefixEncoder(GlmConfig c, GlmBuildOptions o) : base(nameof(PrefixEncoder))
    {
        _config = c;
        bool v2 = c.Version == GlmVersion.ChatGlm2;
        // v1: keys and values of every head (2·L·h); v2: of every key/value group (L·kv_channels·groups·2).
        long kv = v2 ? 2L * c.NumLayers * c.KvChannelsOrHeadDim * c.KvGroups : 2L * c.NumLayers * c.HiddenSize;
        if (c.PrefixProjection)
        {
            // v1: Embedding(P, h) → Linear(h, h) → Tanh → Linear(h, kv); v2: Embedding(P, kv) → Linear(kv, h) → Tanh → Linear(h, kv).
            embedding = new GlmEmbedding(c.PreSeqLen!.Value, v2 ? kv : c.HiddenSize, o);
            trans = nn.Sequential(
                GlmLayers.Linear(v2 ? kv : c.HiddenSize, c.HiddenSize, true, o),
                nn.Tanh(),
                GlmLayers.Linear(c.HiddenSize, kv, true, o));
        }
        else
        {
            embedding = new GlmEmbedding(c.PreSeqLen!.Value, kv, o);
        }
        RegisterComponents();
    }

    public override Tensor forward(Tensor prefix)
    {
        using var scope = NewDisposeScope();
        var e = embedding.call(prefix);
        return (trans is null ? e : trans.call(e)).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The prefix as per-layer keys and values [pre, b, heads, hd] (v1) or [pre, b, groups, kv] (v2), as the reference's
    /// <c>get_prompt</c> makes them (dropout 0.1 in training).
    /// </summary>
    public (Tensor Key, Tensor Value)[] KeyValues(long batch, ScalarType dtype, Device device, bool training)
    {
        int pre = _config.PreSeqLen!.Value;
        bool v2 = _config.Version == GlmVersion.ChatGlm2;
        var tokens = arange(pre, dtype: ScalarType.Int64, device: device).unsqueeze(0).expand(batch, pre);
        var kv = call(tokens).to(dtype).view(batch, pre, _config.NumLayers * 2,
            v2 ? _config.KvGroups : _config.NumAttentionHeads, v2 ? _config.KvChannelsOrHeadDim : _config.HeadDim);
        kv = nn.functional.dropout(kv, 0.1, training);
        kv = kv.permute(2, 1, 0, 3, 4);                                                     // [2L, pre, b, heads, hd]
        var result = new (Tensor, Tensor)[_config.NumLayers];
        for (int i = 0; i < _config.NumLayers; i++) result[i] = (kv[2 * i], kv[2 * i + 1]);
        return result;
    }

    /// <summary>Overwrites the parameters with a fresh random initialisation (a base checkpoint has no prefix encoder).</summary>
    public void Reinitialize()
    {
        var first = parameters().First();
        using var fresh = new PrefixEncoder(_config, new GlmBuildOptions(first.dtype, first.device, GlmInit.Random));
        using var noGrad = no_grad();
        var target = state_dict();
        foreach (var (k, v) in fresh.state_dict()) target[k].copy_(v);
    }
}
