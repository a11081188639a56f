using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Quantization.Tests;

/// <summary>The formats against a float64 reference and against the published packing formulas.</summary>
public class QuantizationMathTests
{
    public static TheoryData<QuantizationFormat, long, long, int> Shapes => new()
    {
        { QuantizationFormat.Int8PerRow, 32, 256, 0 },
        { QuantizationFormat.Int8PerRow, 7, 33, 0 },
        { QuantizationFormat.Int4PerRowChatGlm, 32, 256, 0 },
        { QuantizationFormat.Int4PerRowChatGlm, 5, 18, 0 },
        { QuantizationFormat.Int4Grouped, 48, 256, 128 },
        { QuantizationFormat.Int4Grouped, 24, 96, 32 },
        { QuantizationFormat.Int4Grouped, 16, 512, 256 },
    };

    /// <summary>
    /// Every element is within half a quantization step of the original (float64 arithmetic). Per-row formats store
    /// the scale in float16 as ChatGLM does; when rounding lowered it, the largest value may be clamped at ±qmax,
    /// adding at most qmax·(s_exact − s) — the bound includes that term.
    /// </summary>
    [Theory]
    [MemberData(nameof(Shapes))]
    public void QuantizeDequantize_ErrorWithinHalfAStep(QuantizationFormat format, long n, long k, int group)
    {
        manual_seed(31);
        using var w = randn(n, k).mul(0.05);
        w[0, 0] = 0.3f; // one outlier row
        using var zero = zeros(1, k);
        using var w2 = cat(new[] { w, zero.expand(1, k) }, 0); // and one all-zero row
        var q = QuantizationMath.Quantize(w2, format, group == 0 ? 128 : group);
        using var deq = QuantizationMath.Dequantize(q, ScalarType.Float64);
        using var err = (deq - w2.to(ScalarType.Float64)).abs();
        using var ws = w2.to(ScalarType.Float64);
        Tensor bound;
        if (format == QuantizationFormat.Int4Grouped)
        {
            bound = q.Scale.to(ScalarType.Float64).mul(0.5).repeat_interleave(group, 1);
        }
        else
        {
            double qmax = format == QuantizationFormat.Int8PerRow ? 127 : 7;
            var s = q.Scale.to(ScalarType.Float64);
            var exact = ws.abs().amax(new long[] { 1 }).div(qmax);
            bound = s.mul(0.5).add(exact.sub(s).clamp_min(0).mul(qmax)).unsqueeze(1).expand(n + 1, k);
        }
        var excess = (err - bound - 1e-7).max().item<double>();
        Assert.True(excess <= 0, $"{format}: an element is {excess} beyond half a step");
        Assert.Equal(0.0, err[n].max().item<double>()); // the zero row stays exactly zero
    }

    /// <summary>
    /// The bfloat16 dequantization (SIMD on the CPU) is the exact value rounded once: within half a bfloat16 ulp
    /// (2⁻⁹ relative) plus float32 arithmetic before the rounding (~2⁻²³); 2⁻⁸ relative is asserted.
    /// </summary>
    [Theory]
    [MemberData(nameof(Shapes))]
    public void BFloat16Dequantize_IsTheExactValueRoundedOnce(QuantizationFormat format, long n, long k, int group)
    {
        manual_seed(34);
        using var w = randn(n, k);
        var q = QuantizationMath.Quantize(w, format, group == 0 ? 128 : group);
        using var fast = QuantizationMath.Dequantize(q, ScalarType.BFloat16);
        Assert.Equal(ScalarType.BFloat16, fast.dtype);
        Assert.Equal(new[] { n, k }, fast.shape);
        using var exact = QuantizationMath.Dequantize(q, ScalarType.Float64);
        var excess = ((fast.to(ScalarType.Float64) - exact).abs() - exact.abs() * Math.Pow(2, -8) - 1e-30).max().item<double>();
        Assert.True(excess <= 0, $"{format} {n}x{k}: bf16 dequantization off by {excess} beyond one rounding");
    }

    /// <summary>
    /// int8 → bfloat16 on the CPU is q·s computed in float32 and rounded once to nearest-even, bit for bit the same as
    /// libtorch's float32 → bfloat16 conversion of that product (odd K: the vector loop and the scalar tail).
    /// </summary>
    [Theory]
    [InlineData(7, 1000)]
    [InlineData(33, 4099)]
    [InlineData(3, 15)]
    public void BFloat16Dequantize_Int8_EqualsFloat32ProductRoundedByLibtorch(long n, long k)
    {
        manual_seed(35);
        using var w = randn(n, k).mul(3);
        var q = QuantizationMath.Quantize(w, QuantizationFormat.Int8PerRow);
        using var fast = QuantizationMath.Dequantize(q, ScalarType.BFloat16);
        using var product = q.Weight.to(ScalarType.Float32).mul(q.Scale.to(ScalarType.Float32).unsqueeze(1));
        using var reference = product.to(ScalarType.BFloat16);
        Assert.True(T.Identical(reference, fast));
    }

    /// <summary>
    /// The SIMD bfloat16 dequantization equals the float32 dequantization rounded once by libtorch, bit for bit, in every
    /// format (int4: group tables looked up per nibble; odd group counts and a K that leaves a 16-byte remainder).
    /// </summary>
    [Theory]
    [InlineData(QuantizationFormat.Int4PerRowChatGlm, 5, 4098, 0)]
    [InlineData(QuantizationFormat.Int4PerRowChatGlm, 3, 20, 0)]
    [InlineData(QuantizationFormat.Int4Grouped, 9, 96, 32)]
    [InlineData(QuantizationFormat.Int4Grouped, 4, 768, 256)]
    [InlineData(QuantizationFormat.Int8PerRow, 6, 77, 0)]
    public void BFloat16Dequantize_EqualsFloat32DequantizeRoundedByLibtorch(QuantizationFormat format, long n, long k, int group)
    {
        manual_seed(36);
        using var w = randn(n, k);
        var q = QuantizationMath.Quantize(w, format, group == 0 ? 128 : group);
        using var fast = QuantizationMath.Dequantize(q, ScalarType.BFloat16);
        using var f32 = QuantizationMath.Dequantize(q, ScalarType.Float32);
        using var reference = f32.to(ScalarType.BFloat16);
        Assert.True(T.Identical(reference, fast));
    }

    [Fact]
    public void ChatGlmInt4Layout_MatchesThePublishedFormula_BitForBit()
    {
        manual_seed(32);
        const int n = 6, k = 20;
        using var w = randn(n, k);
        var wv = w.data<float>().ToArray();
        var q = QuantizationMath.Quantize(w, QuantizationFormat.Int4PerRowChatGlm);
        var bytes = q.Weight.data<sbyte>().ToArray();
        var scales = q.Scale.to(ScalarType.Float32).data<float>().ToArray();
        Assert.Equal(ScalarType.Float16, q.Scale.dtype);
        for (int r = 0; r < n; r++)
        {
            // scale = half(max|w| / 7); q = round(w / scale); byte j = (q[2j] << 4) | (q[2j+1] & 0xF).
            float max = 0;
            for (int c = 0; c < k; c++) max = Math.Max(max, Math.Abs(wv[r * k + c]));
            float scale = (float)(Half)(max / 7f);
            Assert.Equal(scale, scales[r]);
            for (int j = 0; j < k / 2; j++)
            {
                int hi = (int)Math.Clamp(MathF.Round(wv[r * k + 2 * j] / scale, MidpointRounding.ToEven), -7, 7);
                int lo = (int)Math.Clamp(MathF.Round(wv[r * k + 2 * j + 1] / scale, MidpointRounding.ToEven), -7, 7);
                sbyte expected = unchecked((sbyte)((hi << 4) | (lo & 0xF)));
                Assert.Equal(expected, bytes[r * (k / 2) + j]);
            }
        }
    }

    [Fact]
    public void Int8Layout_MatchesThePublishedFormula()
    {
        manual_seed(33);
        using var w = randn(4, 10);
        var wv = w.data<float>().ToArray();
        var q = QuantizationMath.Quantize(w, QuantizationFormat.Int8PerRow);
        var qs = q.Weight.data<sbyte>().ToArray();
        var scales = q.Scale.to(ScalarType.Float32).data<float>().ToArray();
        for (int r = 0; r < 4; r++)
        {
            float max = 0;
            for (int c = 0; c < 10; c++) max = Math.Max(max, Math.Abs(wv[r * 10 + c]));
            float scale = (float)(Half)(max / 127f);
            Assert.Equal(scale, scales[r]);
            for (int c = 0; c < 10; c++)
                Assert.Equal((sbyte)Math.Clamp(MathF.Round(wv[r * 10 + c] / scale, MidpointRounding.ToEven), -127, 127), qs[r * 10 + c]);
        }
    }

    [Fact]
    public void SignedNibbles_UnpackEveryByteAsChatGlmDoes()
    {
        var all = Enumerable.Range(-128, 256).Select(i => (sbyte)i).ToArray();
        using var packed = tensor(all, dtype: ScalarType.Int8).reshape(1, 256);
        var u = QuantizationMath.UnpackSignedNibbles(packed).data<sbyte>().ToArray();
        for (int i = 0; i < 256; i++)
        {
            sbyte b = all[i];
            int hi = b >> 4;                                  // arithmetic shift
            int lo = unchecked((sbyte)(byte)(b << 4)) >> 4;   // ((b << 4) as int8) >> 4
            Assert.Equal(hi, u[2 * i]);
            Assert.Equal(lo, u[2 * i + 1]);
        }
        using var repacked = QuantizationMath.PackSignedNibbles(QuantizationMath.UnpackSignedNibbles(packed));
        Assert.True(T.Identical(packed, repacked));
    }

    [Fact]
    public void UnsignedNibbles_EvenColumnInTheHighNibble_RoundTrip()
    {
        var values = Enumerable.Range(0, 32).Select(i => (short)(i % 16)).ToArray(); // 0..15, 0..15
        using var u = tensor(values, dtype: ScalarType.Int16).reshape(1, 32);
        using var packed = QuantizationMath.PackUnsignedNibbles(u);
        var bytes = packed.data<byte>().ToArray();
        for (int j = 0; j < 16; j++) Assert.Equal((byte)(((ushort)values[2 * j] << 4) | (ushort)values[2 * j + 1]), bytes[j]);
        using var back = QuantizationMath.UnpackUnsignedNibbles(packed);
        Assert.Equal(ScalarType.Byte, back.dtype);
        Assert.True(T.Identical(u, back.to(ScalarType.Int16)));
    }

    [Fact]
    public void BadArguments_Throw()
    {
        using var ints = ones(new long[] { 4, 8 }, dtype: ScalarType.Int32);
        Assert.Throws<ArgumentException>(() => QuantizationMath.Quantize(ints, QuantizationFormat.Int8PerRow));
        using var odd = randn(4, 9);
        Assert.Throws<ArgumentException>(() => QuantizationMath.Quantize(odd, QuantizationFormat.Int4PerRowChatGlm));
        using var w = randn(4, 96);
        Assert.Throws<ArgumentException>(() => QuantizationMath.Quantize(w, QuantizationFormat.Int4Grouped, 64));
        Assert.Throws<ArgumentException>(() => QuantizationMath.Quantize(w, QuantizationFormat.Int4Grouped, 48));
        using var v = randn(8);
        Assert.Throws<ArgumentException>(() => QuantizationMath.Quantize(v, QuantizationFormat.Int8PerRow));
    }
}
