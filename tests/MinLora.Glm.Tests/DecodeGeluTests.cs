using MinLora.Glm.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Tests;

/// <summary>
/// ChatGLM-6B's tanh-GELU on a decoding step's bf16 rows in one managed pass, against the nine libtorch ops it replaces
/// (the same bf16 roundings in the same order) and its tanh against float64.
/// </summary>
public class DecodeGeluTests
{
    private static Tensor Libtorch(Tensor h) =>
        h.mul(0.5).mul(h.mul(0.7978845608028654).mul(h.square().mul(0.044715).add(1.0)).tanh().add(1.0));

    /// <summary>
    /// Every bfloat16 value (all 65,536 bit patterns: zeros, subnormals, ±∞, NaN): equal to libtorch's ops bit for bit
    /// except where libtorch's tanhf (SLEEF, within 1 float32 ulp) and the float64 tanh rounded to float32 fall on
    /// the two sides of a bfloat16 rounding boundary. There the two differ by one bfloat16 ulp, and that may happen for
    /// at most 1 value in 2,000 (two float32 results an ulp apart straddle one of the 2¹⁶ bfloat16 boundaries of a
    /// binade with probability ~2⁻¹⁵ each, far below this bound; a wrong rounding step or constant moves thousands).
    /// </summary>
    [SkippableFact]
    public void Apply_EqualsTheLibtorchOpsOnEveryBFloat16()
    {
        Skip.IfNot(System.Runtime.Intrinsics.X86.Avx512F.IsSupported, "needs AVX-512 F (elsewhere the libtorch path runs)");
        using var h = empty(new long[] { 4, 16384 }, dtype: ScalarType.BFloat16);
        var patterns = new byte[65536 * 2];
        for (int i = 0; i < 65536; i++) BitConverter.TryWriteBytes(patterns.AsSpan(2 * i), (ushort)i);
        h.bytes = patterns;
        using var noGrad = no_grad();
        Assert.True(DecodeGelu.Applies(h, 65536));
        using var fused = DecodeGelu.Apply(h);
        using var expected = Libtorch(h);
        Assert.Equal(h.shape, fused.shape);
        Assert.Equal(ScalarType.BFloat16, fused.dtype);
        short[] got = Bits(fused), want = Bits(expected);
        int differing = 0;
        for (int i = 0; i < got.Length; i++)
        {
            if (got[i] == want[i]) continue;
            float g = BitConverter.UInt32BitsToSingle((uint)(ushort)got[i] << 16), w = BitConverter.UInt32BitsToSingle((uint)(ushort)want[i] << 16);
            if (float.IsNaN(g) && float.IsNaN(w)) continue;
            differing++;
            Assert.True(Math.Abs(got[i] - want[i]) == 1 && (got[i] ^ want[i]) >= 0,
                $"input bits 0x{i:X4}: {g} against libtorch's {w}, more than one bf16 ulp apart");
        }
        Assert.True(differing <= got.Length / 2000, $"{differing} of {got.Length} values differ from libtorch's by one ulp");
    }

    private static short[] Bits(Tensor t)
    {
        byte[] b = t.bytes.ToArray();
        var s = new short[b.Length / 2];
        Buffer.BlockCopy(b, 0, s, 0, b.Length);
        return s;
    }

    /// <summary>A row length that is not a multiple of 16 (the padded tail) and a few rows, as a decoding step has.</summary>
    [SkippableTheory]
    [InlineData(1, 37)]
    [InlineData(3, 16389)]
    [InlineData(1, 5)]
    public void Apply_HandlesTails(int rows, int columns)
    {
        Skip.IfNot(System.Runtime.Intrinsics.X86.Avx512F.IsSupported, "needs AVX-512 F (elsewhere the libtorch path runs)");
        manual_seed(501 + columns);
        using var h = randn(rows, columns).mul(3).to(ScalarType.BFloat16);
        using var noGrad = no_grad();
        using var fused = DecodeGelu.Apply(h);
        using var expected = Libtorch(h);
        using var difference = (fused.to(ScalarType.Float32) - expected.to(ScalarType.Float32)).abs();
        // At most a one-ulp tanh difference (≤ 2⁻⁸ relative of a value ≤ |x|) on a rare element, none elsewhere.
        using var allowed = expected.to(ScalarType.Float32).abs().mul(1.0 / 128);
        Assert.True((difference <= allowed).all().item<bool>(), "the fused GELU differs from libtorch's by more than a bf16 ulp");
        using var equal = fused.to(ScalarType.Float32).eq(expected.to(ScalarType.Float32));
        Assert.True(equal.to(ScalarType.Float64).mean().item<double>() >= 0.999, "more than 1 in 1,000 values differ from libtorch's");
    }

    /// <summary>The vector tanh: float64 rounded once to float32, as (float)Math.Tanh(x), over magnitudes 2⁻³⁰–2⁶.</summary>
    [SkippableFact]
    public void Tanh_IsTheFloat64TanhRoundedToFloat32()
    {
        Skip.IfNot(System.Runtime.Intrinsics.X86.Avx512F.IsSupported, "needs AVX-512 F");
        var random = new Random(502);
        float[] x = new float[1 << 16];
        for (int i = 0; i < x.Length; i++) x[i] = (float)((random.Next(2) * 2 - 1) * Math.Pow(2, random.NextDouble() * 36 - 30));
        x[0] = 0f;
        x[1] = -0f;
        x[2] = float.PositiveInfinity;
        x[3] = float.NegativeInfinity;
        x[4] = 1f / 4096;
        int wrong = 0;
        for (int i = 0; i < x.Length; i += 16)
        {
            var r = DecodeGelu.Tanh(System.Runtime.Intrinsics.Vector512.Create(x, i));
            for (int j = 0; j < 16; j++)
            {
                if (BitConverter.SingleToInt32Bits(r[j]) != BitConverter.SingleToInt32Bits((float)Math.Tanh(x[i + j]))) wrong++;
            }
        }
        Assert.True(wrong == 0, $"{wrong} of {x.Length} tanh values differ from float64's rounded to float32");
        Assert.True(float.IsNaN(DecodeGelu.Tanh(System.Runtime.Intrinsics.Vector512.Create(float.NaN))[0]));
    }

    [Fact]
    public void Applies_RefusesWhatItCannotRead()
    {
        using var h = randn(2, 64).to(ScalarType.BFloat16);
        Assert.Equal(System.Runtime.Intrinsics.X86.Avx512F.IsSupported, DecodeGelu.Applies(h, 128));
        Assert.False(DecodeGelu.Applies(h, 127));                                   // more values than the limit
        using var f32 = randn(2, 64);
        Assert.False(DecodeGelu.Applies(f32, 128));                                 // not bf16
        using var strided = randn(64, 2).to(ScalarType.BFloat16).t();
        Assert.False(DecodeGelu.Applies(strided, 128));                             // not contiguous
        using var wanted = randn(2, 64).to(ScalarType.BFloat16).requires_grad_();
        Assert.False(DecodeGelu.Applies(wanted, 128));                              // a gradient is wanted
        using (no_grad()) Assert.Equal(System.Runtime.Intrinsics.X86.Avx512F.IsSupported, DecodeGelu.Applies(wanted, 128));
    }
}
