using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Quantization.Tests;

/// <summary>
/// The conversions the kernels use instead of libtorch's (bfloat16/float16 → float32, float32 → bfloat16), exact
/// against .NET's own <see cref="Half"/> conversion and libtorch's rounding on every 16-bit code, and the kernel call
/// path they serve.
/// </summary>
public unsafe class TensorMemoryTests
{
    [Fact]
    public void Widen_EveryCode_EqualsTheScalarConversion()
    {
        // 65,536 codes and 7 more, so the vector loop and the scalar tail both run.
        const int count = 65536 + 7;
        var codes = new ushort[count];
        for (int i = 0; i < count; i++) codes[i] = (ushort)(i * 40503);   // odd multiplier: a permutation of all codes
        var half = new float[count];
        var brain = new float[count];
        fixed (ushort* c = codes)
        fixed (float* h = half, b = brain)
        {
            TensorMemory.WidenFloat16(c, h, count);
            TensorMemory.WidenBFloat16(c, b, count);
        }
        for (int i = 0; i < count; i++)
        {
            float expected = (float)BitConverter.UInt16BitsToHalf(codes[i]);
            if (float.IsNaN(expected)) Assert.True(float.IsNaN(half[i]), $"float16 0x{codes[i]:X4}: NaN expected, got {half[i]}");
            else Assert.True(BitConverter.SingleToUInt32Bits(expected) == BitConverter.SingleToUInt32Bits(half[i]), $"float16 0x{codes[i]:X4}: {expected} expected, got {half[i]}");
            Assert.Equal((uint)codes[i] << 16, BitConverter.SingleToUInt32Bits(brain[i]));
        }
    }

    [Fact]
    public void NarrowToBFloat16_RoundsAsLibtorch()
    {
        manual_seed(301);
        // Random magnitudes over the whole float range, exact ties (odd and even), the largest float, subnormals,
        // ±0, ±∞ and NaN; a length that leaves a scalar tail.
        using var random = randn(4093).mul(exp(randn(4093).mul(20)));
        var specials = new[]
        {
            0f, -0f, float.PositiveInfinity, float.NegativeInfinity, float.NaN, -float.NaN, float.MaxValue, -float.MaxValue, float.Epsilon,
            BitConverter.UInt32BitsToSingle(0x3F808000), BitConverter.UInt32BitsToSingle(0x3F818000), BitConverter.UInt32BitsToSingle(0x7F7F8000),
            BitConverter.UInt32BitsToSingle(0x00018000), BitConverter.UInt32BitsToSingle(0x7FFFFFFF), BitConverter.UInt32BitsToSingle(0xFFFFFFFF),
        };
        using var values = cat(new[] { tensor(specials), random });   // the specials in the vector loop
        var source = values.data<float>().ToArray();
        using var reference = values.to(ScalarType.BFloat16);
        var expected = reference.bytes.ToArray();
        var actual = new ushort[source.Length];
        fixed (float* s = source)
        fixed (ushort* d = actual)
            TensorMemory.NarrowToBFloat16(s, d, source.Length);
        for (int i = 0; i < source.Length; i++)
        {
            ushort e = BitConverter.ToUInt16(expected, 2 * i);
            if (float.IsNaN(source[i])) Assert.True((actual[i] & 0x7FFF) > 0x7F80, $"NaN 0x{BitConverter.SingleToUInt32Bits(source[i]):X8} became 0x{actual[i]:X4}");
            else Assert.True(e == actual[i], $"0x{BitConverter.SingleToUInt32Bits(source[i]):X8}: libtorch 0x{e:X4}, ours 0x{actual[i]:X4}");
        }
    }

    /// <summary>
    /// A bf16 input through the kernel: its own conversions (input, bias, row scales; result rounded to bf16) must give
    /// exactly what the float32 call gives after libtorch rounds it to bf16, since the inputs widen exactly and the
    /// same float32 products run either way. Per-row scales stay float16; the bias is float32, or bf16 after
    /// <c>to(bfloat16)</c>.
    /// </summary>
    [SkippableTheory]
    [InlineData(QuantizationFormat.Int4PerRowChatGlm, false)]
    [InlineData(QuantizationFormat.Int4PerRowChatGlm, true)]
    [InlineData(QuantizationFormat.Int8PerRow, false)]
    [InlineData(QuantizationFormat.Int8PerRow, true)]
    [InlineData(QuantizationFormat.Int4Grouped, true)]
    public void BFloat16Call_EqualsTheFloat32CallRounded(QuantizationFormat format, bool bf16Module)
    {
        Skip.IfNot(CpuGemv.IsSupported, "needs AVX-512 F/BW (elsewhere libtorch's kernels run)");
        manual_seed(302);
        long k = format == QuantizationFormat.Int4Grouped ? 192 : 200;   // groups of 64; per row a 8-column tail
        using var linear = nn.Linear(k, 77);
        using var q = QuantizedLinear.FromLinear(linear, format, 64);
        if (bf16Module) q.to(ScalarType.BFloat16);
        Assert.Equal(bf16Module ? ScalarType.BFloat16 : ScalarType.Float32, q.Bias!.dtype);
        if (format != QuantizationFormat.Int4Grouped)
            Assert.Equal(ScalarType.Float16, q.ScaleBuffer.dtype);   // kept in float16 (ChatGLM's layout) by to()
        Assert.Equal(QuantizedKernel.CpuGemv, q.Kernel);
        foreach (var rows in new[] { 1L, 3L })
        {
            using var x = randn(rows, 1, k).mul(3).to(ScalarType.BFloat16);
            using var grad = no_grad();
            using var y = q.call(x);
            using var y32 = q.call(x.to(ScalarType.Float32));
            Assert.Equal(ScalarType.BFloat16, y.dtype);
            Assert.Equal(new[] { rows, 1L, 77L }, y.shape);
            using var rounded = y32.to(ScalarType.BFloat16);
            Assert.True(T.Identical(rounded, y), $"{format}, bf16 module {bf16Module}, {rows} rows: the bf16 call differs from the float32 call rounded");
        }
    }
}
