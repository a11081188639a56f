using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using MinLora.Quantization;
using TorchSharp;
using static MinLora.Quantization.TensorMemory;
using static TorchSharp.torch;

namespace MinLora.Glm.Modeling;

/// <summary>
/// ChatGLM-6B's scaled residual, <c>x.mul(alpha).add(y)</c>, on a few bf16 rows in one managed pass (a grad-free call
/// of at most <see cref="CpuLinear.MaxRows"/> rows: a decoding step, a short prompt): bf16(bf16(x·alpha) + y), alpha
/// as float32, as libtorch's two bf16 kernels round (identical bit for bit; a NaN is NaN, its sign and payload aside).
/// The two libtorch ops cost ~14 µs each on 4,096 values on a 2-core Zen 5 VM, two residuals per layer.
/// </summary>
internal static unsafe class DecodeResidual
{
    /// <summary>Whether decoding uses this kernel (the default); a field so that tests and A/Bs can take the libtorch ops.</summary>
    internal static bool Enabled = true;

    /// <summary>Whether <see cref="Apply"/> applies: AVX-512, contiguous bf16 CPU tensors of one shape and at most
    /// <paramref name="maxValues"/> values, no gradient wanted.</summary>
    internal static bool Applies(Tensor x, Tensor y, long maxValues) =>
        Enabled && Avx512F.IsSupported && x.device_type == DeviceType.CPU && y.device_type == DeviceType.CPU &&
        x.dtype == ScalarType.BFloat16 && y.dtype == ScalarType.BFloat16 && x.is_contiguous() && y.is_contiguous() &&
        x.numel() is > 0 and var n && n <= maxValues && !(is_grad_enabled() && (x.requires_grad || y.requires_grad)) && x.shape.SequenceEqual(y.shape);

    /// <summary>bf16(bf16(<paramref name="x"/>·<paramref name="alpha"/>) + <paramref name="y"/>), a new tensor of x's shape.</summary>
    internal static Tensor Apply(Tensor x, double alpha, Tensor y)
    {
        var result = empty_like(x);
        long count = x.numel();
        var px = (ushort*)TensorMemory.Pointer(x);
        var py = (ushort*)TensorMemory.Pointer(y);
        var pr = (ushort*)TensorMemory.Pointer(result);
        var a = Vector512.Create((float)alpha);
        long i = 0;
        for (; i + 16 <= count; i += 16)
        {
            var scaled = RoundedToBFloat16(TensorMemory.LoadBFloat16(px + i) * a);
            Avx512F.ConvertToVector256UInt16(TensorMemory.RoundToBFloat16(scaled + TensorMemory.LoadBFloat16(py + i))).Store(pr + i);
        }
        float s = (float)alpha;
        for (; i < count; i++)
        {
            float scaled = Widen(FastDequantize.RoundToBf16(Widen(px[i]) * s));
            pr[i] = FastDequantize.RoundToBf16(scaled + Widen(py[i]));
        }
        GC.KeepAlive(x);
        GC.KeepAlive(y);
        return result;
    }

    private static float Widen(ushort bits) => BitConverter.UInt32BitsToSingle((uint)bits << 16);
}
