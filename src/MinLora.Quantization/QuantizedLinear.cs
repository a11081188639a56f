using System.Runtime.InteropServices;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MinLora.Quantization;

/// <summary>Which implementation computes a <see cref="QuantizedLinear"/>'s product for small row counts.</summary>
public enum QuantizedKernel
{
    /// <summary>Dequantize the weight, then <c>linear</c> (the reference path; always used for gradients and many rows).</summary>
    Dequantize,
    /// <summary>libtorch's <c>_weight_int8pack_mm</c> (CPU vectorised; CUDA).</summary>
    Int8Pack,
    /// <summary>libtorch's <c>_weight_int4pack_mm_for_cpu</c> on a CPU-packed copy of the weight.</summary>
    Int4PackCpu,
    /// <summary>libtorch's CUDA tinygemm <c>_weight_int4pack_mm</c> (sm80+) on a CUDA-packed copy of the weight.</summary>
    Int4PackCuda,
    /// <summary>
    /// MinLora's own AVX-512 matrix-vector product on the stored bytes (CPU): no packed copy, any shape; int8 and int4
    /// with int8 activations on CPUs with AVX-512 BW/VL (see <see cref="QuantizedLinearOptions.Int8Activations"/>), float32
    /// activations otherwise. Used on CPUs with AVX-512; elsewhere libtorch's kernels.
    /// </summary>
    CpuGemv,
}

/// <summary>Settings of a <see cref="QuantizedLinear"/> that do not change its stored weights.</summary>
public sealed record QuantizedLinearOptions
{
    /// <summary>
    /// Element type activations are cast to for the quantized product (the output is cast back to the input's
    /// type). libtorch's quantized CPU kernels are vectorised for bfloat16 only (15–50× slower in float32), so
    /// bfloat16 is the default; <c>Float32</c> selects the exact dequantize path everywhere.
    /// </summary>
    /// <value>The default value is <c>BFloat16</c>.</value>
    public ScalarType ComputeDtype { get; init; } = ScalarType.BFloat16;

    /// <summary>
    /// Up to this many rows (tokens) per call the fused kernel is used; above it the weight is dequantized to
    /// <see cref="ComputeDtype"/> and multiplied by a GEMM (on the CPU in bfloat16, one tile of the weight at a time),
    /// which is faster for large batches. Null picks the
    /// measured crossover for the device: 32 rows on the CPU (4096×4096, 2 cores: int8 kernel 4.9 ms vs dequantize +
    /// linear 4.8 ms at 32 rows), 8 on CUDA (H100: int4 tinygemm 0.8–1.4× bf16 linear at 16 rows).
    /// </summary>
    /// <value>The default value is null (per device).</value>
    public int? KernelMaxRows { get; init; }

    /// <summary>The row threshold in effect on <paramref name="device"/>.</summary>
    /// <param name="device">The weights' device.</param>
    /// <returns>The threshold.</returns>
    public int KernelMaxRowsFor(DeviceType device) => KernelMaxRows ?? (device == DeviceType.CUDA ? 8 : 32);

    /// <summary>
    /// Up to this many rows <see cref="QuantizedKernel.CpuGemv"/> is used (it reads the weight once per call but
    /// converts every weight once per row, so it pays off for decoding, not for prompts). Null: 8 rows; 0: never use
    /// the managed kernel (libtorch's kernels are chosen instead, where they apply).
    /// </summary>
    /// <value>The default value is null (8).</value>
    public int? CpuGemvMaxRows { get; init; }

    /// <summary>
    /// For int4 and int8 layers in <see cref="QuantizedKernel.CpuGemv"/> (CPUs with AVX-512 BW/VL): quantize the activations
    /// to int8 per 32-column block (symmetric, max|x|/127) and multiply with integer dot products, as ggml's
    /// q4_0 × q8_0 and q8_0 × q8_0 do, at an added error of at most max|x_block|/254 per activation. int4: about 1.7×
    /// the throughput of float32 unpacking on a Xeon with AVX-VNNI and 1.3–1.4× on a Zen 4 without it, the error far
    /// below the int4 weights' own rounding; int8: ~15 % faster decoding on that Xeon and 1.3–1.4× on the Zen 4, the
    /// error of the order of the int8 weights' own rounding (max|w_row|/254 per weight). On other CPUs without AVX-VNNI
    /// (older Intel AVX-512 parts) the int8 × int8 form takes 7 instructions per 32 weights against 6 for float32
    /// conversion and has not been measured: set this to false if it decodes slower there.
    /// False: float32 activations on the exact stored values.
    /// </summary>
    /// <value>The default value is true.</value>
    public bool Int8Activations { get; init; } = true;

    /// <summary>
    /// For per-row formats (<see cref="QuantizationFormat.Int8PerRow"/>, <see cref="QuantizationFormat.Int4PerRowChatGlm"/>)
    /// on the CPU, products with more rows than the decoding kernel takes (prompts, training), and every input gradient,
    /// multiply int8 by int8: each row of activations (forward) or of the output gradient (backward) is quantized to
    /// int8 with its own scale max|row|/127, and libtorch's integer GEMM (oneDNN: AMX or VNNI) replaces dequantizing the
    /// weight and a bfloat16 GEMM (int4 codes are widened to int8 a tile at a time). An opt-in accuracy trade (W8A8 per
    /// token): the added error is at most max|row|/254 per activation, of the order of the int8 weights' own rounding,
    /// where the default path adds only bfloat16 rounding. Measured at ChatGLM-6B's shape on a 2-core Xeon with AMX: int8
    /// prefill 1.2–2.2× the bfloat16 model's, against 0.5–0.8× without it (docs/measurements/cpu-model-6b.md).
    /// Applies only with a bfloat16 <see cref="ComputeDtype"/>, on CPUs with AVX-512 and integer dot products (VNNI or
    /// AMX: without them oneDNN's int8 GEMM can saturate), and where libtorch's TorchScript kernels load; ignored for
    /// group-wise int4 (its scales vary along K) and on CUDA. A call whose rows are not finite, or whose summed length
    /// exceeds what an int32 sum holds exactly (132,104 terms for int8 codes), takes the bfloat16 path.
    /// </summary>
    /// <value>The default value is false.</value>
    public bool Int8Gemm { get; init; }

    /// <summary>
    /// For <see cref="Int8Gemm"/> forward products: input columns (features) whose largest |x| in the call exceeds this
    /// many times the median over all columns of that largest |x| are taken out of the int8 product and multiplied in
    /// float32 with the dequantized weight columns, as LLM.int8() does with its outlier features. Large models' hidden
    /// states carry a few such features, tens of times larger than the rest; left in, one of them sets its row's int8
    /// step and rounds every other activation of the row to a handful of levels. Split off, each row is quantized at
    /// max|row without them|/127, and the outlier columns add no error beyond float32 rounding. The threshold is
    /// relative, so it means the same at any activation scale (bitsandbytes' <c>llm_int8_threshold</c> is an absolute
    /// 6.0, which assumes activations of order 1: in layers whose inputs are larger every column would exceed it). At 6
    /// Gaussian activations give no outliers from 2 rows up (their largest column maximum is 1.7–4.3× the median at
    /// K = 4,096–16,384); the cut-off is 6× the typical column's largest |x|, which for Gaussian activations of standard
    /// deviation σ lies at about 17σ over 128 rows, 19σ over 512 and 21σ over 2,048 (features whose largest values
    /// reach 20–60σ are split at those sizes). A call with more than K/64 outlier columns takes the
    /// bfloat16 path (the float32 side product would cost more than the int8 GEMM saves; LLM.int8() found the
    /// outliers of a 6.7B model in about 6 of its 4,096 features). The input gradient is not split: its rows are quantized whole.
    /// <see cref="float.PositiveInfinity"/> turns the split off.
    /// </summary>
    /// <value>The default value is 6.</value>
    /// <exception cref="ArgumentOutOfRangeException">The value is NaN, zero or negative.</exception>
    public float Int8GemmOutlierThreshold
    {
        get => _int8GemmOutlierThreshold;
        init
        {
            if (float.IsNaN(value) || value <= 0)
                throw new ArgumentOutOfRangeException(nameof(Int8GemmOutlierThreshold), value, "The outlier threshold must be positive (PositiveInfinity turns the outlier split off).");
            _int8GemmOutlierThreshold = value;
        }
    }

    private readonly float _int8GemmOutlierThreshold = 6f;

    /// <summary>Use libtorch's fused kernels where they apply (false: always dequantize).</summary>
    /// <value>The default value is true.</value>
    public bool UseKernels { get; init; } = true;
}

/// <summary>
/// A weight-only quantized linear layer <c>y = x·dequant(W)ᵀ + b</c> holding packed integer weights, scales (and
/// zero points for group-wise int4) and the float bias; see <see cref="QuantizationFormat"/> for the layouts.
/// Gradients flow to the input (not to the frozen weights), so LoRA and prefix tuning can train on top of it.
/// </summary>
/// <remarks>
/// State-dict keys: <c>weight</c>, <c>weight_scale</c>, <c>weight_zero</c> (group-wise int4 only) and <c>bias</c>, as in
/// ChatGLM's quantized checkpoints. The fast-kernel form of the weight (libtorch's packed int4 layouts, which depend on
/// the device and CPU instruction set) is derived from those and never saved, as are the weight columns that
/// <see cref="QuantizedLinearOptions.Int8Gemm"/> keeps for outlier features. After copying new values into the
/// buffers directly (e.g. <c>load_state_dict</c>), call <see cref="RefreshKernel"/> or use
/// <see cref="QuantizeExtensions.LoadQuantizedStateDict"/>.
/// </remarks>
public sealed class QuantizedLinear : nn.Module<Tensor, Tensor>, ILinearLayer
{
    private Tensor weight;
    private Tensor weight_scale;
    private Tensor? weight_zero;
    private Parameter? bias;
    private KernelPlan _kernel = KernelPlan.Unbuilt;

    private QuantizedLinear(QuantizedWeight q, long inFeatures, long outFeatures, Tensor? biasValue, ScalarType outputDtype, QuantizedLinearOptions options, bool buildKernel = true)
        : base(nameof(QuantizedLinear))
    {
        Format = q.Format;
        GroupSize = q.GroupSize;
        InFeatures = inFeatures;
        OutFeatures = outFeatures;
        OutputDtype = outputDtype;
        Options = options;
        weight = q.Weight.DetachFromDisposeScope();
        weight_scale = q.Scale.DetachFromDisposeScope();
        weight_zero = q.Zero?.DetachFromDisposeScope();
        if (biasValue is not null)
            bias = new Parameter(biasValue.detach().clone().DetachFromDisposeScope(), requires_grad: false);
        RegisterComponents();
        if (buildKernel) RefreshKernel();
        else _kernel = KernelPlan.CpuGemv(this) ?? KernelPlan.Dequantize("an empty skeleton: call RefreshKernel after loading weights into it", Options.KernelMaxRowsFor(weight.device_type));
    }

    /// <summary>The layout of the stored weight.</summary>
    public QuantizationFormat Format { get; }

    /// <summary>Group size along the input dimension (in_features for per-row formats).</summary>
    public int GroupSize { get; }

    /// <inheritdoc />
    public long InFeatures { get; }

    /// <inheritdoc />
    public long OutFeatures { get; }

    /// <summary>The floating type of the layer this one replaced (the default type of LoRA adapters on it).</summary>
    public ScalarType OutputDtype { get; private set; }

    /// <summary>Compute settings.</summary>
    public QuantizedLinearOptions Options { get; }

    /// <summary>The implementation chosen at construction (or at the last <see cref="RefreshKernel"/>).</summary>
    public QuantizedKernel Kernel => _kernel.Kind;

    /// <summary>Why the fused kernel is not used, when <see cref="Kernel"/> is <see cref="QuantizedKernel.Dequantize"/>.</summary>
    public string? KernelFallbackReason => _kernel.Reason;

    /// <summary>
    /// Why <see cref="QuantizedLinearOptions.Int8Gemm"/> is ignored for this layer, wholly (format, compute type,
    /// device or CPU) or for its forward or input-gradient products (a summed length beyond what an int32 sum holds
    /// exactly), or null when the option is off or takes effect. Calls with non-finite rows, and forward calls with more
    /// than K/64 outlier columns (<see cref="QuantizedLinearOptions.Int8GemmOutlierThreshold"/>; for K below 64, any),
    /// fall back one by one.
    /// </summary>
    public string? Int8GemmFallbackReason
    {
        get
        {
            if (!Options.Int8Gemm) return null;
            if (MinLora.Quantization.Int8Gemm.Unavailable(this) is { } reason) return reason;
            long depth = MinLora.Quantization.Int8Gemm.MaxDepth(Format);
            if (InFeatures > depth) return $"the forward sums {InFeatures} terms, more than an int32 sum of these codes holds exactly ({depth})";
            if (OutFeatures > depth) return $"the input gradient sums {OutFeatures} terms, more than an int32 sum of these codes holds exactly ({depth})";
            return null;
        }
    }

    /// <inheritdoc />
    public Device WeightDevice => weight.device;

    /// <summary>Bits per weight element of the stored format.</summary>
    public int Bits => Format.Bits();

    /// <summary>Quantizes a <c>Linear</c> layer. A layer on the <c>meta</c> device gives an empty skeleton on <paramref name="skeletonDevice"/> to load a checkpoint into.</summary>
    /// <param name="linear">The float layer (left unchanged).</param>
    /// <param name="format">The layout.</param>
    /// <param name="groupSize">Group size for <see cref="QuantizationFormat.Int4Grouped"/>.</param>
    /// <param name="options">Compute settings; null for the defaults.</param>
    /// <param name="skeletonDevice">Where a meta-device layer's empty buffers are allocated (default CPU).</param>
    /// <returns>The quantized layer, on the linear's device.</returns>
    /// <exception cref="ArgumentException">Non-floating weights, odd in_features for int4, or a group size that does not divide in_features.</exception>
    public static QuantizedLinear FromLinear(Linear linear, QuantizationFormat format, int groupSize = 128, QuantizedLinearOptions? options = null, Device? skeletonDevice = null)
    {
        ArgumentNullException.ThrowIfNull(linear);
        var w = linear.weight;
        if (!w.is_floating_point())
            throw new ArgumentException($"Cannot quantize a Linear with {w.dtype} weights: expected a floating type.", nameof(linear));
        options ??= new QuantizedLinearOptions();
        using var scope = NewDisposeScope();
        if (w.device_type == DeviceType.META)
        {
            return Empty(linear.in_features, linear.out_features, linear.bias is not null, format, groupSize, w.dtype, skeletonDevice ?? CPU, options);
        }
        var q = QuantizationMath.Quantize(w, format, groupSize);
        var layer = new QuantizedLinear(q, linear.in_features, linear.out_features, linear.bias, w.dtype, options);
        return layer;
    }

    /// <summary>An empty layer of the given shape and format (all zeros), to load a quantized checkpoint into.</summary>
    /// <param name="inFeatures">K.</param>
    /// <param name="outFeatures">N.</param>
    /// <param name="hasBias">Whether the layer has a bias.</param>
    /// <param name="format">The layout.</param>
    /// <param name="groupSize">Group size for <see cref="QuantizationFormat.Int4Grouped"/>.</param>
    /// <param name="outputDtype">The float type of the bias and of outputs.</param>
    /// <param name="device">Where to allocate.</param>
    /// <param name="options">Compute settings.</param>
    /// <returns>The skeleton.</returns>
    /// <exception cref="ArgumentException">Bad sizes for the format.</exception>
    public static QuantizedLinear Empty(long inFeatures, long outFeatures, bool hasBias, QuantizationFormat format, int groupSize = 128, ScalarType outputDtype = ScalarType.Float32, Device? device = null, QuantizedLinearOptions? options = null)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(inFeatures);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(outFeatures);
        device ??= CPU;
        if (format != QuantizationFormat.Int8PerRow && inFeatures % 2 != 0)
            throw new ArgumentException($"int4 packing needs an even in_features, got {inFeatures}.", nameof(inFeatures));
        if (format == QuantizationFormat.Int4Grouped && (!QuantizationMath.SupportedGroupSizes.Contains(groupSize) || inFeatures % groupSize != 0))
            throw new ArgumentException($"Group size {groupSize} must be one of {string.Join(", ", QuantizationMath.SupportedGroupSizes)} and divide in_features {inFeatures}.", nameof(groupSize));
        // Buffers of the stored shapes, allocated directly (no float weight, no quantization work): a checkpoint
        // fills them, then RefreshKernel (LoadQuantizedStateDict does it) builds the kernel form.
        using var scope = NewDisposeScope();
        QuantizedWeight q = format switch
        {
            QuantizationFormat.Int8PerRow => new(format, zeros(new[] { outFeatures, inFeatures }, ScalarType.Int8, device), zeros(new[] { outFeatures }, ScalarType.Float16, device), null, (int)inFeatures),
            QuantizationFormat.Int4PerRowChatGlm => new(format, zeros(new[] { outFeatures, inFeatures / 2 }, ScalarType.Int8, device), zeros(new[] { outFeatures }, ScalarType.Float16, device), null, (int)inFeatures),
            _ => new(format, zeros(new[] { outFeatures, inFeatures / 2 }, ScalarType.Byte, device),
                zeros(new[] { outFeatures, inFeatures / groupSize }, ScalarType.BFloat16, device),
                zeros(new[] { outFeatures, inFeatures / groupSize }, ScalarType.BFloat16, device), groupSize),
        };
        var b = hasBias ? zeros(outFeatures, dtype: outputDtype, device: device) : null;
        return new QuantizedLinear(q, inFeatures, outFeatures, b, outputDtype, options ?? new QuantizedLinearOptions(), buildKernel: false);
    }

    /// <summary>The stored quantized weight (the live buffers).</summary>
    public QuantizedWeight QuantizedWeight => new(Format, weight, weight_scale, weight_zero, GroupSize);

    /// <summary>The bias, if any (frozen).</summary>
    public Parameter? Bias => bias;

    /// <summary>The weight dequantized to <paramref name="dtype"/> [out, in].</summary>
    /// <param name="dtype">Element type of the result.</param>
    /// <returns>A new tensor.</returns>
    public Tensor Dequantize(ScalarType dtype = ScalarType.Float32) => QuantizationMath.Dequantize(QuantizedWeight, dtype);

    /// <summary>
    /// Bytes of the stored state (weights, scales, zeros, bias) plus the kernel's packed copy, if any, and the float32
    /// weight columns kept for <see cref="QuantizedLinearOptions.Int8Gemm"/>'s outlier features (at most K·N/16 bytes).
    /// </summary>
    /// <returns>The byte count.</returns>
    public long GetSizeInBytes()
    {
        long bytes = Bytes(weight) + Bytes(weight_scale) + (weight_zero is null ? 0 : Bytes(weight_zero)) + (bias is null ? 0 : Bytes(bias));
        return bytes + KernelBytes + (OutlierWeights?.Bytes ?? 0);
    }

    /// <summary>Bytes of the derived kernel form (packed weight, converted scales and bias), which are not registered buffers.</summary>
    internal long KernelBytes => _kernel.Bytes;

    // The stored buffers, for the kernel plan.
    internal Tensor WeightBuffer => weight;

    internal Tensor ScaleBuffer => weight_scale;

    internal Tensor? ZeroBuffer => weight_zero;

    /// <summary>
    /// The dequantized weight columns of the last <see cref="Int8Gemm"/> call's outlier features (a managed, pinned array,
    /// so a concurrent call may replace it while another reads it): large models' outliers sit in the same few features
    /// call after call. Dropped with the kernel plan whenever the stored weights may change.
    /// </summary>
    internal Int8Gemm.OutlierCache? OutlierWeights;

    /// <summary>
    /// Counts <see cref="DropPlan"/> calls: <see cref="OutlierWeights"/> built from the weights of an earlier generation
    /// (a product that ran while the weights changed) are neither used nor kept.
    /// </summary>
    internal int WeightGeneration;

    /// <inheritdoc />
    /// <remarks>
    /// When gradients are needed, the product runs inside a custom autograd function that keeps only a reference to
    /// this layer: backward dequantizes the weight again (as ChatGLM's own <c>quantization.py</c> does), so a
    /// quantized model never holds its weights in float form for the backward pass.
    /// </remarks>
    public override Tensor forward(Tensor input)
    {
        ArgumentNullException.ThrowIfNull(input);
        if (input.shape.Length == 0 || input.shape[^1] != InFeatures)
            throw new ArgumentException($"QuantizedLinear expects inputs [..., {InFeatures}], got [{string.Join(", ", input.shape)}].", nameof(input));
        if (input.requires_grad && is_grad_enabled())
            return QuantizedLinearFunction.apply(input, this);
        return Product(input);
    }

    /// <summary>y = x·dequant(W)ᵀ + b without recording anything for autograd; the output has the input's type.</summary>
    internal Tensor Product(Tensor input)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        long rows = input.numel() / InFeatures;
        var outShape = input.shape.ToArray();
        outShape[^1] = OutFeatures;
        Tensor y;
        if (_kernel.Kind == QuantizedKernel.CpuGemv && rows <= _kernel.MaxRows)
        {
            return _kernel.GemvProduct(this, input).MoveToOuterDisposeScope();
        }
        else if (_kernel.Kind is not (QuantizedKernel.Dequantize or QuantizedKernel.CpuGemv) && rows <= _kernel.MaxRows)
        {
            var x = input.reshape(rows, InFeatures).to(Options.ComputeDtype).contiguous();
            y = _kernel.Mm(this, x);
            if (_kernel.Bias is not null) y = y.add(_kernel.Bias);
            y = y.reshape(outShape);
        }
        else if (Int8Gemm.Applies(this) && Int8Gemm.Forward(this, Rows(input, rows, InFeatures), bias) is { } product)
        {
            y = product.reshape(outShape);
        }
        else if (TiledProduct.Applies(this))
        {
            var x = input.reshape(rows, InFeatures).to(ScalarType.BFloat16).contiguous();
            y = TiledProduct.Forward(this, x, bias).reshape(outShape);
        }
        else
        {
            var dt = Options.ComputeDtype;
            var w = Dequantize(dt);
            y = nn.functional.linear(input.to(dt), w, bias?.to(dt));
        }
        return (y.dtype == input.dtype ? y : y.to(input.dtype)).MoveToOuterDisposeScope();
    }

    /// <summary>[rows, width] in float32 or bfloat16 (the input's own type where it is one of them), contiguous.</summary>
    private static Tensor Rows(Tensor t, long rows, long width)
    {
        var r = t.reshape(rows, width);
        return (r.dtype is ScalarType.Float32 or ScalarType.BFloat16 ? r : r.to(ScalarType.Float32)).contiguous();
    }

    /// <summary>dL/dx = dL/dy · dequant(W), the weight dequantized again for this call only.</summary>
    internal Tensor InputGradient(Tensor gradOutput, ScalarType inputDtype)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var dt = Options.ComputeDtype;
        var shape = gradOutput.shape.ToArray();
        shape[^1] = InFeatures;
        // An explicit 2-D product: matmul of a non-contiguous [s, b, N] gradient (what a permute after the layer gives
        // back, e.g. ChatGLM's head) takes libtorch's batched path, which expands W to [s, N, K] and materializes it —
        // 17 GB for ChatGLM's head at 64 tokens instead of 0.13 GB.
        long rows = gradOutput.numel() / OutFeatures;
        Tensor g;
        if (Int8Gemm.Applies(this) && Int8Gemm.InputGradient(this, Rows(gradOutput, rows, OutFeatures)) is { } product)
        {
            g = product;
        }
        else
        {
            // Contiguous once: a broadcast gradient (e.g. of a sum) would otherwise be copied again for every column window.
            var g2d = gradOutput.to(dt).reshape(rows, OutFeatures).contiguous();
            if (TiledProduct.Applies(this))
            {
                g = TiledProduct.InputGradient(this, g2d);
            }
            else
            {
                using var w = Dequantize(dt);
                g = g2d.mm(w);
            }
        }
        g = g.reshape(shape);
        return (g.dtype == inputDtype ? g : g.to(inputDtype)).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Rebuilds the fused-kernel form of the weight from the stored buffers and chooses the kernel for this device
    /// (checking libtorch's kernels once against the dequantize path). Call it after writing into the buffers directly.
    /// </summary>
    public void RefreshKernel()
    {
        DropPlan();
        _kernel = KernelPlan.Choose(this);
    }

    /// <summary>Disposes the kernel plan, leaving the unbuilt one in place first (never a disposed plan, even if what follows throws).</summary>
    private void DropPlan()
    {
        Interlocked.Increment(ref WeightGeneration);
        OutlierWeights = null;   // derived from the stored weights, like the plan
        var old = _kernel;
        _kernel = KernelPlan.Unbuilt;
        old.Dispose();
    }

    /// <inheritdoc />
    public bool AddToWeight(Tensor delta)
    {
        ArgumentNullException.ThrowIfNull(delta);
        if (!delta.shape.SequenceEqual(new[] { OutFeatures, InFeatures }))
            throw new ArgumentException($"Expected a delta of shape [{OutFeatures}, {InFeatures}], got [{string.Join(", ", delta.shape)}].", nameof(delta));
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var merged = Dequantize(ScalarType.Float32).add_(delta.to(ScalarType.Float32).to(weight.device));
        if (!isfinite(merged).all().item<bool>())
            throw new InvalidOperationException("Merging would make the weight non-finite; refusing to change it.");
        var q = QuantizationMath.Quantize(merged, Format, GroupSize);
        weight.copy_(q.Weight);
        weight_scale.copy_(q.Scale);
        if (weight_zero is not null) weight_zero.copy_(q.Zero!);
        RefreshKernel();
        return false; // re-quantized: rounding changes outputs beyond float rounding
    }

    /// <inheritdoc />
    /// <remarks>
    /// A dtype change converts only the bias and the output type: the scales and zero points keep the element types
    /// of the stored format (rounding a ChatGLM float16 scale to bfloat16 would change every weight).
    /// </remarks>
    protected override void _toEpilog(ScalarType? dtype, Device? device, bool non_blocking)
    {
        DropPlan();
        if (device is not null) base._toEpilog(null, device, non_blocking);
        if (dtype is { } t)
        {
            if (bias is not null && bias.dtype != t)
            {
                var converted = new Parameter(bias.detach().to(t), requires_grad: false);
                bias.Dispose();
                bias = (Parameter)converted.DetachFromDisposeScope();
                ConditionallyRegisterParameter("bias", bias);
            }
            OutputDtype = t;
        }
        RefreshKernel();
    }

    /// <inheritdoc />
    protected override void Dispose(bool disposing)
    {
        if (disposing) DropPlan();
        base.Dispose(disposing);
    }

    private static long Bytes(Tensor t) => t.numel() * t.element_size();
}
