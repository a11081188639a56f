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
        for (; i + 16 <= count; i += 16) StoreBFloat16Values(pr + i, Residual(LoadBFloat16(px + i), a, LoadBFloat16(py + i)));
        if (i < count)
        {
            // The tail through padded vectors, with the same arithmetic.
            int rest = (int)(count - i);
            StoreBFloat16Partial(pr + i, Residual(LoadBFloat16Partial(px + i, rest), a, LoadBFloat16Partial(py + i, rest)), rest);
        }
        GC.KeepAlive(x);
        GC.KeepAlive(y);
        return result;
    }

    /// <summary>bf16(bf16(x·alpha) + y) on 16 values.</summary>
    private static Vector512<float> Residual(Vector512<float> x, Vector512<float> alpha, Vector512<float> y) =>
        RoundedToBFloat16(RoundedToBFloat16(x * alpha) + y);
}
