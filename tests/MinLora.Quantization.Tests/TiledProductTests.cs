using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Quantization.Tests;

/// <summary>
/// The many-row CPU products (prompts, training) that dequantize the weight a tile at a time: tiles of 64 rows or 256
/// columns here, so every case has several tiles and a short last one.
/// </summary>
public class TiledProductTests
{
    public static TheoryData<QuantizationFormat, long, long, int> Cases => new()
    {
        { QuantizationFormat.Int8PerRow, 200, 608, 0 },
        { QuantizationFormat.Int8PerRow, 67, 301, 0 },        // odd K: the dequantizer's scalar tail
        { QuantizationFormat.Int4PerRowChatGlm, 200, 608, 0 },
        { QuantizationFormat.Int4Grouped, 200, 608, 32 },     // column windows 256, 256, 96: three groups of 32 in the last
        { QuantizationFormat.Int4Grouped, 130, 1024, 128 },
    };

    /// <summary>
    /// y = x·dequant_bf16(W)ᵀ + b equals the float64 product of the same bfloat16 operands within the bfloat16 rounding
    /// of each output (2⁻⁸ relative) plus float32 accumulation over K terms (K·2⁻²⁴·Σ|x·w| ≤ 2⁻¹⁴·Σ|x·w| for K ≤ 1024).
    /// A wrong tile (offset, scale row, group) is off by the size of a whole product, far beyond that.
    /// </summary>
    [Theory]
    [MemberData(nameof(Cases))]
    public void Forward_IsTheFloat64ProductOfTheBf16Weight(QuantizationFormat format, long n, long k, int group)
    {
        manual_seed(61);
        using var linear = nn.Linear(k, n);
        using var layer = QuantizedLinear.FromLinear(linear, format, group == 0 ? 128 : group);
        var q = layer.QuantizedWeight;
        using var wbf = QuantizationMath.Dequantize(q, ScalarType.BFloat16).to(ScalarType.Float64);
        foreach (var rows in new[] { 1L, 37L })
        {
            foreach (var withBias in new[] { false, true })
            {
                using var x = randn(rows, k).to(ScalarType.BFloat16);
                using var b = withBias ? layer.Bias!.to(ScalarType.BFloat16) : null;
                using var y = TiledProduct.Forward(layer, x, b, tileElements: 64 * k);
                Assert.Equal(new[] { rows, n }, y.shape);
                Assert.Equal(ScalarType.BFloat16, y.dtype);
                using var x64 = x.to(ScalarType.Float64);
                using var reference = withBias ? x64.matmul(wbf.t()).add(b!.to(ScalarType.Float64)) : x64.matmul(wbf.t());
                using var magnitude = x64.abs().matmul(wbf.abs().t());
                AssertWithin(y, reference, magnitude, $"{format} {n}x{k} rows {rows} bias {withBias}");
            }
        }
    }

    /// <summary>dL/dx = g·dequant_bf16(W), the same bound with the sum over N.</summary>
    [Theory]
    [MemberData(nameof(Cases))]
    public void InputGradient_IsTheFloat64ProductOfTheBf16Weight(QuantizationFormat format, long n, long k, int group)
    {
        manual_seed(62);
        using var linear = nn.Linear(k, n, hasBias: false);
        using var layer = QuantizedLinear.FromLinear(linear, format, group == 0 ? 128 : group);
        var q = layer.QuantizedWeight;
        using var wbf = QuantizationMath.Dequantize(q, ScalarType.BFloat16).to(ScalarType.Float64);
        foreach (var rows in new[] { 1L, 37L })
        {
            using var g = randn(rows, n).to(ScalarType.BFloat16);
            using var gx = TiledProduct.InputGradient(layer, g, tileElements: 64 * k);
            Assert.Equal(new[] { rows, k }, gx.shape);
            using var g64 = g.to(ScalarType.Float64);
            using var reference = g64.matmul(wbf);
            using var magnitude = g64.abs().matmul(wbf.abs());
            AssertWithin(gx, reference, magnitude, $"{format} {n}x{k} rows {rows}");
        }
    }

    /// <summary>
    /// Through the layer: more rows than the kernel takes go through the tiled product, forward and backward (bfloat16
    /// compute), for a [s, b, K] input whose output is permuted (ChatGLM's head), and agree with float64.
    /// </summary>
    [Theory]
    [InlineData(QuantizationFormat.Int8PerRow)]
    [InlineData(QuantizationFormat.Int4PerRowChatGlm)]
    [InlineData(QuantizationFormat.Int4Grouped)]
    public void Layer_ManyRows_ForwardAndInputGradient_AgreeWithFloat64(QuantizationFormat format)
    {
        manual_seed(63);
        using var linear = nn.Linear(256, 96);
        using var layer = QuantizedLinear.FromLinear(linear, format, 32);
        using var wbf = layer.Dequantize(ScalarType.BFloat16).to(ScalarType.Float64);
        using var x = randn(20, 3, 256).to(ScalarType.BFloat16).to(ScalarType.Float32).requires_grad_();
        using var r = randn(3, 20, 96).to(ScalarType.BFloat16).to(ScalarType.Float32);
        using var y = layer.call(x);
        using var bias = linear.bias!.to(ScalarType.BFloat16).to(ScalarType.Float64);
        using var x64 = x.detach().to(ScalarType.Float64);
        using var reference = x64.matmul(wbf.t()).add(bias);
        using var magnitude = x64.abs().matmul(wbf.abs().t());
        AssertWithin(y.detach().to(ScalarType.BFloat16), reference, magnitude, $"{format} forward");
        (y.permute(1, 0, 2).contiguous() * r).sum().backward();
        // The gradient reaching the layer is r permuted back, rounded to bfloat16 by the compute type.
        using var g64 = r.permute(1, 0, 2).to(ScalarType.Float64);
        using var expected = g64.matmul(wbf);
        using var gradMagnitude = g64.abs().matmul(wbf.abs());
        AssertWithin(x.grad!.to(ScalarType.BFloat16), expected, gradMagnitude, $"{format} input gradient");
    }

    /// <summary>No rows in, no rows out: empty products of the right shape, forward and backward.</summary>
    [Fact]
    public void ZeroRows_GiveEmptyResultsOfTheRightShape()
    {
        manual_seed(64);
        using var linear = nn.Linear(96, 70);
        using var layer = QuantizedLinear.FromLinear(linear, QuantizationFormat.Int8PerRow);
        using var x = empty(0, 96, dtype: ScalarType.BFloat16);
        using var y = TiledProduct.Forward(layer, x, linear.bias!, tileElements: 64 * 96);
        Assert.Equal(new long[] { 0, 70 }, y.shape);
        using var g = empty(0, 70, dtype: ScalarType.BFloat16);
        using var gx = TiledProduct.InputGradient(layer, g, tileElements: 64 * 96);
        Assert.Equal(new long[] { 0, 96 }, gx.shape);
    }

    /// <summary>
    /// A block of rows × a column window, dequantized in several row blocks on the thread pool, is bit for bit that
    /// block of the whole-matrix bfloat16 dequantization (itself checked against libtorch's rounding elsewhere).
    /// </summary>
    [Theory]
    [MemberData(nameof(Cases))]
    public unsafe void ParallelBlockWindow_IsThatBlockOfTheWholeDequantization(QuantizationFormat format, long n, long k, int group)
    {
        manual_seed(65);
        using var linear = nn.Linear(k, n, hasBias: false);
        using var layer = QuantizedLinear.FromLinear(linear, format, group == 0 ? 128 : group);
        var q = layer.QuantizedWeight;
        using var whole = QuantizationMath.Dequantize(q, ScalarType.BFloat16);
        using var source = new FastDequantize.Source(q);
        long r0 = 5, r1 = n - 3, c0 = 256, c1 = k;
        foreach (var blocks in new[] { 1, 3, 7 })
        {
            using var block = full(new[] { r1 - r0, c1 - c0 }, float.NaN, dtype: ScalarType.BFloat16);
            source.DequantizeParallel(r0, r1, c0, c1, (ushort*)TensorMemory.Pointer(block), blocks);
            using var expected = whole.narrow(0, r0, r1 - r0).narrow(1, c0, c1 - c0);
            using var e = expected.contiguous();
            Assert.True(block.bytes.SequenceEqual(e.bytes), $"{format} {n}x{k}, {blocks} blocks: the window differs");
        }
    }

    /// <summary>A backward through the layer with no rows (an empty batch) gives an empty input gradient.</summary>
    [Fact]
    public void Layer_ZeroRows_BackwardGivesAnEmptyGradient()
    {
        manual_seed(66);
        using var linear = nn.Linear(64, 48);
        using var layer = QuantizedLinear.FromLinear(linear, QuantizationFormat.Int4PerRowChatGlm);
        using var x = zeros(new long[] { 0, 2, 64 }).requires_grad_();
        using var y = layer.call(x);
        Assert.Equal(new long[] { 0, 2, 48 }, y.shape);
        y.sum().backward();
        Assert.Equal(new long[] { 0, 2, 64 }, x.grad!.shape);
    }

    private static void AssertWithin(Tensor actual, Tensor reference, Tensor magnitude, string what)
    {
        using var a = actual.to(ScalarType.Float64);
        using var bound = reference.abs().mul(Math.Pow(2, -8)).add(magnitude.mul(Math.Pow(2, -14)));
        var excess = ((a - reference).abs() - bound).max().item<double>();
        Assert.True(excess <= 0, $"{what}: an element is {excess} beyond the bound");
    }
}
