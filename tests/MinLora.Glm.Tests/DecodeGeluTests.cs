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

    /// <summary>libtorch's nine ops with only the tanh taken in float64 and rounded to float32, then to bf16, as the kernel
    /// takes it: the kernel must equal this bit for bit.</summary>
    private static Tensor LibtorchWithFloat64Tanh(Tensor h)
    {
        using var d = h.mul(0.7978845608028654).mul(h.square().mul(0.044715).add(1.0));
        using var t = d.to(ScalarType.Float64).tanh().to(ScalarType.Float32).to(ScalarType.BFloat16);
        return h.mul(0.5).mul(t.add(1.0));
    }

    /// <summary>
    /// Every bfloat16 value (all 65,536 bit patterns: zeros, subnormals, ±∞, NaN): bit for bit libtorch's nine ops with
    /// the tanh in float64 (NaN as NaN), and within one tanh rounding of libtorch's own ops: a tanh one bf16 ulp (2⁻⁸)
    /// off moves the output by at most 0.5·|x|·2⁻⁸ and one output rounding (2⁻⁸ relative).
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
        using var exact = LibtorchWithFloat64Tanh(h);
        using var libtorch = Libtorch(h);
        Assert.Equal(h.shape, fused.shape);
        Assert.Equal(ScalarType.BFloat16, fused.dtype);
        short[] got = Bits(fused), want = Bits(exact), theirs = Bits(libtorch);
        for (int i = 0; i < got.Length; i++)
        {
            float g = Value(got[i]), w = Value(want[i]), l = Value(theirs[i]), x = Value((short)i);
            if (float.IsNaN(g) || float.IsNaN(w))
            {
                Assert.True(float.IsNaN(g) && float.IsNaN(w), $"input bits 0x{i:X4}: {g} against {w}");
                continue;
            }
            Assert.True(got[i] == want[i], $"input bits 0x{i:X4}: {g} against {w} (libtorch's ops, float64 tanh)");
            if (float.IsFinite(l) && float.IsFinite(g))
                Assert.True(Math.Abs(g - l) <= Math.Abs(x) * Math.Pow(2, -9) + Math.Abs(l) * Math.Pow(2, -8),
                    $"input bits 0x{i:X4}: {g} against libtorch's {l}, beyond one tanh rounding");
            else
                Assert.True(g.Equals(l), $"input bits 0x{i:X4}: {g} against libtorch's {l}");
        }
    }

    private static float Value(short bits) => BitConverter.UInt32BitsToSingle((uint)(ushort)bits << 16);

    private static short[] Bits(Tensor t)
    {
        byte[] b = t.bytes.ToArray();
        var s = new short[b.Length / 2];
        Buffer.BlockCopy(b, 0, s, 0, b.Length);
        return s;
    }

    /// <summary>A row length that is not a multiple of 16 (the padded tail) and a few rows, as a decoding step has: bit
    /// for bit libtorch's ops with the float64 tanh.</summary>
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
        using var expected = LibtorchWithFloat64Tanh(h);
        Assert.True(fused.bytes.SequenceEqual(expected.bytes), "the fused GELU differs from libtorch's ops with a float64 tanh");
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
