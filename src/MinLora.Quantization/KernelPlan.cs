using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Quantization;

/// <summary>
/// How a <see cref="QuantizedLinear"/> multiplies: which product (<see cref="QuantizedKernel"/>), the tensors it derived
/// for it (libtorch's packed int4 layout, scales and bias in the compute type; never saved), and up to how many rows
/// it is used. <see cref="Choose"/> decides by plain checks that return the dequantize plan with the reason; only
/// failures of libtorch itself (a native error while packing or probing) are caught.
/// </summary>
internal sealed class KernelPlan : IDisposable
{
    private KernelPlan(QuantizedKernel kind, string? reason, int maxRows)
    {
        Kind = kind;
        Reason = reason;
        MaxRows = maxRows;
    }

    /// <summary>A layer whose plan was not built yet (or was dropped by a device/dtype change).</summary>
    public static KernelPlan Unbuilt { get; } = new(QuantizedKernel.Dequantize, "not built yet", 0);

    public QuantizedKernel Kind { get; }

    /// <summary>Why the dequantize path is used (null when a kernel is).</summary>
    public string? Reason { get; }

    /// <summary>The kernel is used up to this many rows; more rows dequantize and call <c>linear</c>.</summary>
    public int MaxRows { get; }

    /// <summary>Packed int4 (CPU or CUDA layout); null for int8 (reads the stored buffer) and the managed kernel.</summary>
    public Tensor? Weight { get; private init; }

    /// <summary>int8: scales in the compute type; int4: scales-and-zeros [K/g, N, 2] bf16.</summary>
    public Tensor? Scales { get; private init; }

    /// <summary>The bias in the compute type (not converted on every call).</summary>
    public Tensor? Bias { get; private set; }

    /// <summary>The int4 kernels' group.</summary>
    public int Group { get; private init; }

    /// <summary>Bytes of the derived tensors.</summary>
    public long Bytes => Size(Weight) + Size(Scales) + Size(Bias);

    public static KernelPlan Dequantize(string reason, int maxRows) => new(QuantizedKernel.Dequantize, reason, maxRows);

    /// <summary>The managed few-row kernel when the layer and this CPU allow it (it derives nothing), else null.</summary>
    public static KernelPlan? CpuGemv(QuantizedLinear layer)
    {
        var o = layer.Options;
        if (!o.UseKernels || o.CpuGemvMaxRows == 0 || o.ComputeDtype is ScalarType.Float32 or ScalarType.Float64) return null;
        var (weight, scale, zero) = (layer.WeightBuffer, layer.ScaleBuffer, layer.ZeroBuffer);
        if (weight.device_type != DeviceType.CPU || !MinLora.Quantization.CpuGemv.IsSupported) return null;
        if (layer.InFeatures > int.MaxValue / 2 || layer.OutFeatures > int.MaxValue) return null;
        // The grouped format reads bf16 scales and zeros in place.
        if (layer.Format == QuantizationFormat.Int4Grouped && (scale.dtype != ScalarType.BFloat16 || zero!.dtype != ScalarType.BFloat16)) return null;
        if (!weight.is_contiguous() || !scale.is_contiguous() || (zero is not null && !zero.is_contiguous())) return null;
        return new KernelPlan(QuantizedKernel.CpuGemv, null, o.CpuGemvMaxRows ?? 8);
    }

    /// <summary>Chooses and builds the plan for the layer's device, format and options (probing libtorch's kernels once).</summary>
    public static KernelPlan Choose(QuantizedLinear layer)
    {
        var o = layer.Options;
        var weight = layer.WeightBuffer;
        int maxRows = o.KernelMaxRowsFor(weight.device_type);
        if (!o.UseKernels) return Dequantize("kernels disabled by options", maxRows);
        if (o.ComputeDtype is ScalarType.Float32 or ScalarType.Float64)
            return Dequantize($"compute dtype {o.ComputeDtype}: libtorch's quantized kernels are only fast for bfloat16/float16 activations", maxRows);
        if (CpuGemv(layer) is { } gemv) return gemv;
        var device = weight.device_type;
        if (device is not (DeviceType.CPU or DeviceType.CUDA)) return Dequantize($"no kernel for device {device}", maxRows);
        if (!QuantizationKernels.Available) return Dequantize("TorchScript kernels unavailable: " + QuantizationKernels.CompileError, maxRows);
        if (Unsupported(layer, device) is { } reason) return Dequantize(reason, maxRows);

        KernelPlan? plan = null;
        try
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            plan = layer.Format == QuantizationFormat.Int8PerRow
                ? new KernelPlan(QuantizedKernel.Int8Pack, null, maxRows) { Scales = layer.ScaleBuffer.to(o.ComputeDtype).DetachFromDisposeScope() }
                : BuildInt4(layer, device, maxRows);
            if (Probe(layer, plan) is { } disagreement)
            {
                plan.Dispose();
                return Dequantize(disagreement, maxRows);
            }
            if (layer.Bias is { } bias) plan.Bias = bias.detach().to(o.ComputeDtype).DetachFromDisposeScope();
            return plan;
        }
        catch (Exception ex) when (ex is ExternalException or InvalidOperationException or ArgumentException or NotSupportedException)
        {
            // libtorch refused (a native error surfaced by TorchSharp): keep the exact path.
            plan?.Dispose();
            return Dequantize(ex.Message.Split('\n')[0], maxRows);
        }
    }

    /// <summary>The limits of libtorch's kernels we know of, checked before calling them (null: none applies).</summary>
    private static string? Unsupported(QuantizedLinear layer, DeviceType device)
    {
        long k = layer.InFeatures, n = layer.OutFeatures;
        if (layer.Format == QuantizationFormat.Int8PerRow)
        {
            // Measured on an H100 (PyTorch 2.11): the CUDA int8 kernel is a naive one, 4× slower than bf16 linear
            // at 1 row and far worse beyond (docs/measurements/h100-cuda-kernels.json).
            if (device == DeviceType.CUDA) return "libtorch's CUDA int8 kernel is slower than dequantize + bf16 linear (measured 4–200× on an H100)";
            // Measured on libtorch 2.10 (AVX-512): with in_features not a multiple of 16 the CPU kernel returns
            // garbage for one row and crashes the process for several. Never call it there.
            if (k % 16 != 0) return $"libtorch's CPU int8 kernel needs in_features divisible by 16 (got {k})";
            return null;
        }
        if (layer.Options.ComputeDtype != ScalarType.BFloat16) return "libtorch's int4 kernels take bfloat16 activations only";
        if (layer.Format != QuantizationFormat.Int4Grouped && PerRowGroup(k) is null)
            return $"in_features {k} is not divisible by any int4 kernel group size (32–256)";
        if (device == DeviceType.CPU && n % 16 != 0) return $"the CPU int4 kernel needs out_features divisible by 16 (got {n})";
        if (device == DeviceType.CUDA && (k % (CudaInnerKTiles * 16) != 0 || n % 8 != 0))
            return $"the CUDA int4 kernel needs in_features % 128 == 0 and out_features % 8 == 0 (got {k}, {n})";
        return null;
    }

    private const int CudaInnerKTiles = 8;

    private static KernelPlan BuildInt4(QuantizedLinear layer, DeviceType device, int maxRows)
    {
        var (weight, scale, zero) = (layer.WeightBuffer, layer.ScaleBuffer, layer.ZeroBuffer);
        long n = layer.OutFeatures;
        int group = layer.Format == QuantizationFormat.Int4Grouped ? layer.GroupSize : PerRowGroup(layer.InFeatures)!.Value;
        long groups = layer.InFeatures / group;
        // scales-and-zeros [K/g, N, 2] bf16 with w = (u − 8)·scale + zero.
        Tensor scales, zerosT, u;
        if (layer.Format == QuantizationFormat.Int4Grouped)
        {
            scales = scale.t();
            zerosT = zero!.t();
            u = QuantizationMath.UnpackUnsignedNibbles(weight);
        }
        else
        {
            // ChatGLM: w = q·s with q ∈ [−7, 7]  ⇒  u = q + 8, zero = 0, the row scale repeated over the groups.
            scales = scale.unsqueeze(0).expand(groups, n);
            zerosT = zeros(groups, n, dtype: ScalarType.BFloat16, device: weight.device);
            u = QuantizationMath.UnpackSignedNibbles(weight).to(ScalarType.Int16).add(8);
        }
        var scalesAndZeros = stack(new[] { scales.to(ScalarType.BFloat16), zerosT.to(ScalarType.BFloat16) }, 2).contiguous();
        var packed = device == DeviceType.CPU
            ? QuantizationKernels.Int4PackCpu(u.to(ScalarType.Int32).contiguous())
            : QuantizationKernels.Int4PackCuda(QuantizationMath.PackUnsignedNibbles(u), CudaInnerKTiles);
        // Out of the caller's dispose scope only once both exist (a failed pack leaves nothing behind).
        return new KernelPlan(device == DeviceType.CPU ? QuantizedKernel.Int4PackCpu : QuantizedKernel.Int4PackCuda, null, maxRows)
        {
            Scales = scalesAndZeros.DetachFromDisposeScope(),
            Weight = packed.DetachFromDisposeScope(),
            Group = group,
        };
    }

    /// <summary>
    /// Runs the kernel once on a small input and compares it with the dequantize path on a random subset of output
    /// rows (guards against layout surprises without dequantizing the whole weight); returns why not, or null.
    /// </summary>
    private static string? Probe(QuantizedLinear layer, KernelPlan plan)
    {
        using var scope = NewDisposeScope();
        var weight = layer.WeightBuffer;
        var gen = new Generator(1234, weight.device);
        var x = randn(new long[] { 2, layer.InFeatures }, generator: gen, device: weight.device).to(layer.Options.ComputeDtype);
        var fast = plan.Mm(layer, x);
        var rows = randperm(layer.OutFeatures, generator: gen, device: weight.device).narrow(0, 0, Math.Min(layer.OutFeatures, 64));
        var subset = new QuantizedWeight(layer.Format, weight.index_select(0, rows), layer.ScaleBuffer.index_select(0, rows), layer.ZeroBuffer?.index_select(0, rows), layer.GroupSize);
        var reference = x.to(ScalarType.Float32).matmul(QuantizationMath.Dequantize(subset).t());
        var err = fast.to(ScalarType.Float32).index_select(1, rows).sub(reference).abs().max().item<float>();
        var mag = reference.abs().max().item<float>();
        // bf16 activations and scales: relative rounding ~2⁻⁸ per term; 2 % of the largest output is far above
        // rounding and far below a layout error (which scrambles the whole result).
        return err <= 0.02f * mag + 1e-6f ? null
            : $"kernel {plan.Kind} disagrees with the dequantized reference (max error {err} vs magnitude {mag}); using the dequantize path";
    }

    /// <summary>libtorch's fused product of x [rows, K] (compute type, contiguous) without the bias.</summary>
    public Tensor Mm(QuantizedLinear layer, Tensor x) => Kind switch
    {
        QuantizedKernel.Int8Pack => QuantizationKernels.Int8Mm(x, layer.WeightBuffer, Scales!),
        QuantizedKernel.Int4PackCpu => QuantizationKernels.Int4MmCpu(x, Weight!, Group, Scales!),
        QuantizedKernel.Int4PackCuda => QuantizationKernels.Int4MmCuda(x, Weight!, Group, Scales!),
        _ => throw new InvalidOperationException($"The {Kind} plan has no fused product."),
    };

    /// <summary>The managed kernel on x [..., K] (any floating type), including the bias, in the input's type.</summary>
    public unsafe Tensor GemvProduct(QuantizedLinear layer, Tensor input)
    {
        int k = (int)layer.InFeatures, n = (int)layer.OutFeatures;
        var format = layer.Format;
        // Row scales (ChatGLM float16, or bf16 after a dtype change) and the bias are read from the live buffers on
        // every call (N values: negligible), so writes into the buffers never leave a stale copy behind.
        using var rowScales = format == QuantizationFormat.Int4Grouped ? default : Float32Values.Of(layer.ScaleBuffer);
        var w = TensorMemory.Pointer(layer.WeightBuffer);
        var ps = (nint)rowScales.Pointer;
        int group = layer.GroupSize;
        bool int8Activations = layer.Options.Int8Activations;
        var scales = TensorMemory.Pointer(layer.ScaleBuffer);
        var zeros = layer.ZeroBuffer is null ? 0 : TensorMemory.Pointer(layer.ZeroBuffer);
        return MinLora.Quantization.CpuGemv.Apply(input, k, n, layer.Bias, (x, rows, b, y) =>
        {
            switch (format)
            {
                case QuantizationFormat.Int8PerRow:
                    MinLora.Quantization.CpuGemv.Int8(x, rows, k, (sbyte*)w, (float*)ps, b, y, n, int8Activations);
                    break;
                case QuantizationFormat.Int4PerRowChatGlm:
                    MinLora.Quantization.CpuGemv.Int4(x, rows, k, (byte*)w, k, null, null, (float*)ps, true, b, y, n, int8Activations);
                    break;
                default:
                    MinLora.Quantization.CpuGemv.Int4(x, rows, k, (byte*)w, group, (ushort*)scales, (ushort*)zeros, null, false, b, y, n, int8Activations);
                    break;
            }
        });
    }

    /// <summary>The largest int4 kernel group dividing <paramref name="k"/> (ChatGLM's per-row format is run as groups), or null.</summary>
    private static int? PerRowGroup(long k)
    {
        foreach (var g in new[] { 128, 256, 64, 32 })
        {
            if (k % g == 0) return g;
        }
        return null;
    }

    private static long Size(Tensor? t) => t is null ? 0 : t.numel() * t.element_size();

    public void Dispose()
    {
        if (ReferenceEquals(this, Unbuilt)) return;
        Weight?.Dispose();
        Scales?.Dispose();
        Bias?.Dispose();
    }
}
