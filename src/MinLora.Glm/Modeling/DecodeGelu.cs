using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using MinLora.Quantization;
using TorchSharp;
using static MinLora.Quantization.TensorMemory;
using static TorchSharp.torch;

namespace MinLora.Glm.Modeling;

/// <summary>
/// ChatGLM-6B's tanh-GELU, 0.5·x·(1 + tanh(0.7978845608028654·x·(1 + 0.044715·x²))), on a few bf16 rows in one
/// managed pass: a grad-free call of at most <see cref="CpuLinear.MaxRows"/> rows (a decoding step, a short prompt).
/// </summary>
/// <remarks>
/// <para>
/// The libtorch expression runs nine bf16 element-wise ops, each converting to float32 and back: on a 2-core Zen 5 VM
/// 4.9 ms per token at 28 layers of 16,384 values, about 175 µs a layer. Here every op's float32 arithmetic is
/// libtorch's and every intermediate is rounded to bfloat16 where libtorch rounds it (the scalars as float32, as
/// libtorch's bf16 kernels take them), so all but the tanh are identical to that path bit for bit.
/// </para>
/// <para>
/// The tanh is computed in float64 (tanh(d) = (e^{2d} − 1)/(e^{2d} + 1), with tanh(d) = d below |d| = 2⁻¹², where the
/// float32 result is d itself) and rounded to float32, then to bfloat16. libtorch's vectorised tanhf (SLEEF, within 1
/// ulp of float32) can differ from that float32 value by one ulp, which changes the tanh's bfloat16 value only when
/// it lies within an ulp of a bfloat16 rounding boundary: then by one bfloat16 ulp (2⁻⁸ at most), and the output by
/// up to |x|·2⁻⁹ and one rounding. On the dev VM no bf16 input differs at all (all 65,536 tested); the tests hold the
/// kernel to libtorch's ops with this tanh exactly, and to libtorch's own within that bound. NaN results are NaN, their
/// sign and payload aside.
/// </para>
/// </remarks>
internal static unsafe class DecodeGelu
{
    /// <summary>Whether decoding uses this kernel (the default); a field so that the benchmark's A/B can take the libtorch ops.</summary>
    internal static bool Enabled = true;

    /// <summary>Whether <see cref="Apply"/> applies: AVX-512, a contiguous bf16 CPU tensor of at most <paramref name="maxValues"/>
    /// values, no gradient wanted.</summary>
    internal static bool Applies(Tensor x, long maxValues) =>
        Enabled && Avx512F.IsSupported && x.device_type == DeviceType.CPU && x.dtype == ScalarType.BFloat16 && x.is_contiguous() &&
        x.numel() is > 0 and var n && n <= maxValues && !(is_grad_enabled() && x.requires_grad);

    /// <summary>The GELU of <paramref name="x"/> (see <see cref="DecodeGelu"/>), a new tensor of its shape.</summary>
    internal static Tensor Apply(Tensor x)
    {
        var result = empty_like(x);
        long count = x.numel();
        var source = (ushort*)TensorMemory.Pointer(x);
        var target = (ushort*)TensorMemory.Pointer(result);
        long i = 0;
        for (; i + 16 <= count; i += 16) StoreBFloat16Values(target + i, Gelu(TensorMemory.LoadBFloat16(source + i)));
        if (i < count)
        {
            // The tail through one padded vector.
            int rest = (int)(count - i);
            StoreBFloat16Partial(target + i, Gelu(LoadBFloat16Partial(source + i, rest)), rest);
        }
        GC.KeepAlive(x);
        return result;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Gelu(Vector512<float> h)
    {
        var one = Vector512.Create(1f);
        var a = RoundedToBFloat16(h * Vector512.Create(0.5f));                                   // h.mul(0.5)
        var b = RoundedToBFloat16(h * Vector512.Create((float)0.7978845608028654));              // h.mul(√(2/π))
        var c = RoundedToBFloat16(h * h);                                                         // h.square()
        c = RoundedToBFloat16(c * Vector512.Create((float)0.044715));                            // .mul(0.044715)
        c = RoundedToBFloat16(c + one);                                                           // .add(1)
        var d = RoundedToBFloat16(b * c);                                                         // b.mul(…)
        var t = RoundedToBFloat16(Tanh(d));                                                       // .tanh()
        return RoundedToBFloat16(a * RoundedToBFloat16(t + one));                                             // a.mul(t.add(1))
    }

    /// <summary>tanh in float64, rounded once to float32 (see the remarks on <see cref="DecodeGelu"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector512<float> Tanh(Vector512<float> d)
    {
        var (lo, hi) = Vector512.Widen(d);
        var r = Vector512.Narrow(Tanh(lo), Tanh(hi));
        // Below 2⁻¹² tanh(d) rounds to d in float32 (its relative correction d²/3 is under 2⁻²⁵); NaN stays NaN.
        return Vector512.ConditionalSelect(Vector512.LessThan(Vector512.Abs(d), Vector512.Create(1f / 4096)), d, r);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<double> Tanh(Vector512<double> d)
    {
        // tanh(|d|) = (e^{2|d|} − 1)/(e^{2|d|} + 1), 1 from |d| = 20 on (e^{40} would still be finite; the quotient is
        // 1 in float64 far earlier), the sign restored after.
        var magnitude = Vector512.Min(Vector512.Abs(d), Vector512.Create(20.0));
        var e = Vector512.Exp(magnitude + magnitude);
        var r = (e - Vector512<double>.One) / (e + Vector512<double>.One);
        return Vector512.CopySign(r, d);
    }
}
