using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using MinLora.Quantization;
using TorchSharp;
using static MinLora.Quantization.TensorMemory;
using static TorchSharp.torch;

namespace MinLora.Glm.Modeling;

/// <summary>
/// The v2 SwiGLU (ChatGLM2/3, GLM-4), <c>silu(a)·b</c> for each row [a | b] of <c>dense_h_to_4h</c>'s output, on a few
/// bf16 rows in one managed pass: a grad-free call of at most <see cref="CpuLinear.MaxRows"/> rows (a decoding step, a
/// short prompt).
/// </summary>
/// <remarks>
/// libtorch runs it as two bf16 element-wise ops (silu, then the product), each converting to float32 and back:
/// bf16(bf16(a / (1 + exp(−a)))·b) in float32. Here the arithmetic and both roundings are libtorch's; the exponential
/// is computed in float64 and rounded to float32 (libtorch's vectorised expf, SLEEF's, is within one float32 ulp of
/// that value, which moves the silu's bf16 value only when it lies within that ulp of a bf16 rounding boundary). The
/// tests hold the kernel exactly to libtorch's ops with that exponential, and to libtorch's own within one bf16 ulp.
/// </remarks>
internal static unsafe class DecodeSwiGlu
{
    /// <summary>Whether decoding uses this kernel (the default); a field so that tests and A/Bs can take the libtorch ops.</summary>
    internal static bool Enabled = true;

    /// <summary>
    /// Whether <see cref="Apply"/> applies: AVX-512, a contiguous bf16 CPU input of at most <paramref name="maxValues"/>
    /// values whose last dimension is 2·<paramref name="half"/>, no gradient wanted.
    /// </summary>
    internal static bool Applies(Tensor h, long half, long maxValues) =>
        Enabled && Avx512F.IsSupported && half > 0 && DecodeRows.Accept(h, 2 * half, maxValues);

    /// <summary>silu(first half)·second half of each row of <paramref name="h"/>, a new tensor whose last dimension is
    /// <paramref name="half"/>.</summary>
    internal static Tensor Apply(Tensor h, long half)
    {
        var shape = h.shape;
        shape[^1] = half;
        var result = empty(shape, dtype: ScalarType.BFloat16, device: CPU);   // Applies: h is on the CPU
        long rows = h.numel() / (2 * half);
        var source = (ushort*)TensorMemory.Pointer(h);
        var target = (ushort*)TensorMemory.Pointer(result);
        for (long r = 0; r < rows; r++)
        {
            var a = source + r * 2 * half;
            var b = a + half;
            var output = target + r * half;
            long i = 0;
            for (; i + 16 <= half; i += 16) StoreBFloat16Values(output + i, SwiGlu(LoadBFloat16(a + i), LoadBFloat16(b + i)));
            if (i < half)
            {
                // The tail through padded vectors, with the same arithmetic.
                int rest = (int)(half - i);
                StoreBFloat16Partial(output + i, SwiGlu(LoadBFloat16Partial(a + i, rest), LoadBFloat16Partial(b + i, rest)), rest);
            }
        }
        GC.KeepAlive(h);
        return result;
    }

    /// <summary>bf16(bf16(a / (1 + exp(−a)))·b) on 16 values.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> SwiGlu(Vector512<float> a, Vector512<float> b)
    {
        var silu = RoundedToBFloat16(a / (Vector512<float>.One + Exp(-a)));
        return RoundedToBFloat16(silu * b);
    }

    /// <summary>exp in float64, rounded once to float32 (∞ past float32's range, 0 below it; NaN stays NaN).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector512<float> Exp(Vector512<float> x)
    {
        var (lo, hi) = Vector512.Widen(x);
        return Vector512.Narrow(Vector512.Exp(lo), Vector512.Exp(hi));
    }
}
