using MinLora.Glm.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Tests;

/// <summary>
/// ChatGLM-6B's LayerNorm on a decoding step's bf16 rows in one managed pass, against libtorch's <c>layer_norm</c> it
/// replaces (bit for bit: the same Welford cascade, fused products and roundings) and against float64.
/// </summary>
public class DecodeLayerNormTests
{
    private static bool Supported => System.Runtime.Intrinsics.X86.Avx512F.IsSupported && System.Runtime.Intrinsics.X86.Fma.IsSupported;

    /// <summary>Rows of normal values scaled over 2^±4 around offsets up to ±64 (so that the mean matters and the
    /// variance is a difference of large sums), a few exact zeros and repeated values.</summary>
    private static Tensor Rows(long rows, long width, int seed)
    {
        using var g = new Generator((ulong)seed);
        using var raw = randn(new[] { rows, width }, generator: g).mul(exp2(randn(new[] { rows, 1L }, generator: g).mul(4)));
        using var offset = randn(new[] { rows, 1L }, generator: g).mul(32);
        using var zeros = rand(new[] { rows, width }, generator: g).lt(0.02);
        return raw.add(offset).masked_fill(zeros, 0).to(ScalarType.BFloat16);
    }

    /// <summary>Rows like <see cref="Rows"/> but with offsets of at most a few standard deviations: well-conditioned
    /// moments (a mean far above the spread costs float32 moments, libtorch's and the pass's alike, relative accuracy in
    /// the variance roughly in proportion to (mean/spread)).</summary>
    private static Tensor Conditioned(long rows, long width, int seed)
    {
        using var g = new Generator((ulong)seed);
        using var scale = exp2(randn(new[] { rows, 1L }, generator: g).mul(4));
        using var raw = randn(new[] { rows, width }, generator: g).mul(scale);
        using var offset = randn(new[] { rows, 1L }, generator: g).mul(2).mul(scale);
        return raw.add(offset).to(ScalarType.BFloat16);
    }

    private static (Tensor Weight, Tensor Bias) Affine(long width, int seed)
    {
        using var g = new Generator((ulong)seed);
        return (randn(new[] { width }, generator: g).mul(0.5).add(1).to(ScalarType.BFloat16),
            randn(new[] { width }, generator: g).mul(0.1).to(ScalarType.BFloat16));
    }

    private static ushort[] Bits(Tensor t) => System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ushort>(t.contiguous().bytes.ToArray().AsSpan()).ToArray();

    /// <summary>This libtorch's kernel is the one the pass follows (else every decoding step silently takes libtorch's op).</summary>
    [SkippableFact]
    public void Probe_FindsLibtorchsArithmetic()
    {
        Skip.IfNot(Supported, "needs AVX-512 F and FMA (elsewhere the libtorch path runs)");
        Assert.True(DecodeLayerNorm.MatchesLibtorch, "libtorch's layer_norm is not the arithmetic DecodeLayerNorm follows: the pass is off");
    }

    /// <summary>
    /// Bit for bit libtorch's <c>layer_norm</c>, over widths that reach every part of its moments (no 16-value step,
    /// one chunk, leftover steps, a cascade of 1 to 9 levels with leftover chunks, leftover values) and its output's
    /// scalar tail, 1, 3 and 8 rows, and ε 1e-5 (ChatGLM-6B's) and 0.5.
    /// </summary>
    [SkippableTheory]
    [InlineData(1, 1, 1e-5)]
    [InlineData(3, 7, 1e-5)]
    [InlineData(8, 16, 1e-5)]
    [InlineData(3, 17, 1e-5)]
    [InlineData(1, 255, 1e-5)]
    [InlineData(3, 256, 0.5)]
    [InlineData(8, 257, 1e-5)]
    [InlineData(1, 4096, 1e-5)]
    [InlineData(8, 4096, 1e-5)]
    [InlineData(3, 4099, 1e-5)]
    [InlineData(3, 4096 + 256 + 16 + 5, 0.5)]
    [InlineData(2, 12293, 1e-5)]
    [InlineData(1, 65536 + 4096 + 31, 1e-5)]
    public void Apply_IsLibtorchsLayerNorm(int rows, int width, double eps)
    {
        Skip.IfNot(Supported, "needs AVX-512 F and FMA (elsewhere the libtorch path runs)");
        using var x = Rows(rows, width, 700 + width);
        var (weight, bias) = Affine(width, 701 + width);
        using var w = weight;
        using var b = bias;
        using var noGrad = no_grad();
        Assert.True(DecodeLayerNorm.Applies(x, w, b, width, rows * width));
        using var fused = DecodeLayerNorm.Apply(x, w, b, (float)eps);
        using var libtorch = nn.functional.layer_norm(x, new long[] { width }, w, b, eps);
        Assert.Equal(ScalarType.BFloat16, fused.dtype);
        Assert.Equal(x.shape, fused.shape);
        ushort[] got = Bits(fused), want = Bits(libtorch);
        var differing = Enumerable.Range(0, got.Length).Where(i => got[i] != want[i])
            .Select(i => $"{i}: {got[i]:X4} against {want[i]:X4}").ToList();
        Assert.True(differing.Count == 0, $"{differing.Count} values differ from libtorch's layer_norm, e.g. {string.Join(", ", differing.Take(5))}");
    }

    /// <summary>
    /// The moments themselves, bit for bit libtorch's: its <c>native_layer_norm</c> (through TorchScript: TorchSharp
    /// binds no op that returns them) gives a bf16 input's float32 mean and 1/√(σ² + ε) when the weight and bias are
    /// float32, from the same moments code as the bf16-weight kernel. The output's bf16 rounding hides most float32
    /// differences in the moments (the test above would pass with another merge order), this does not: 64 rows of each
    /// width, ε 0 so that 1/σ carries the variance's last bits.
    /// </summary>
    [SkippableTheory]
    [InlineData(7)]
    [InlineData(16)]
    [InlineData(300)]
    [InlineData(4096)]
    [InlineData(4099)]
    [InlineData(4096 + 256 + 16 + 5)]
    [InlineData(12293)]
    [InlineData(65536 + 4096 + 31)]
    public void Moments_AreLibtorchs(int width)
    {
        Skip.IfNot(Supported, "needs AVX-512 F and FMA (elsewhere the libtorch path runs)");
        const int rows = 64;
        using var x = Rows(rows, width, 707 + width);
        using var w = ones(width);
        using var b = zeros(width);
        using var unit = jit.compile(@"
def moments(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    out, mean, rstd = torch.native_layer_norm(x, [x.size(-1)], w, b, eps)
    return torch.cat([mean.flatten(), rstd.flatten()])
");
        using var result = (Tensor)unit.invoke("moments", x, w, b, 0.0);
        Assert.Equal(ScalarType.Float32, result.dtype);
        var libtorch = result.data<float>().ToArray();
        var bits = Bits(x);
        var differing = new List<string>();
        for (int row = 0; row < rows; row++)
        {
            var (mean, variance) = DecodeLayerNorm.Moments(bits.AsSpan(row * width, width));
            float inverse = 1f / MathF.Sqrt(variance);
            if (BitConverter.SingleToUInt32Bits(mean) != BitConverter.SingleToUInt32Bits(libtorch[row]))
                differing.Add($"row {row}: mean {mean:R} against {libtorch[row]:R}");
            if (BitConverter.SingleToUInt32Bits(inverse) != BitConverter.SingleToUInt32Bits(libtorch[rows + row]))
                differing.Add($"row {row}: 1/σ {inverse:R} against {libtorch[rows + row]:R}");
        }
        Assert.True(differing.Count == 0, $"{differing.Count} moments differ from libtorch's, e.g. {string.Join("; ", differing.Take(4))}");
    }

    /// <summary>
    /// The pass is not exact by accident: a LayerNorm computed exactly (float64 moments and output, one rounding to
    /// bf16) differs from libtorch's, and so from the pass, in some values of these rows; so bit equality above pins
    /// libtorch's float32 order and roundings, not just the formula.
    /// </summary>
    [SkippableFact]
    public void ExactLayerNorm_DiffersFromLibtorchsSomewhere()
    {
        Skip.IfNot(Supported, "needs AVX-512 F and FMA (elsewhere the libtorch path runs)");
        const int width = 4096;
        using var x = Rows(8, width, 702);
        var (weight, bias) = Affine(width, 703);
        using var w = weight;
        using var b = bias;
        using var noGrad = no_grad();
        using var x64 = x.to(ScalarType.Float64);
        using var mean = x64.mean(new long[] { -1 }, keepdim: true);
        using var variance = x64.sub(mean).square().mean(new long[] { -1 }, keepdim: true);
        using var exact = x64.sub(mean).div(variance.add(1e-5).sqrt()).mul(w.to(ScalarType.Float64)).add(b.to(ScalarType.Float64)).to(ScalarType.BFloat16);
        using var fused = DecodeLayerNorm.Apply(x, w, b, 1e-5f);
        Assert.False(Bits(exact).SequenceEqual(Bits(fused)));
    }

    /// <summary>
    /// Against float64 on well-conditioned rows (<see cref="Conditioned"/>): the result within half a bf16 ulp of the
    /// exact value (its one rounding) plus 2⁻¹⁶ of the magnitudes its float32 steps combine (|x|·r·|w|, |μ|·r·|w|, |b|:
    /// each step's float32 error is a few 2⁻²⁴ of them, the moments' error a few hundred times 2⁻²⁴ at these widths and
    /// conditions, far under 2⁻¹⁶).
    /// </summary>
    [SkippableTheory]
    [InlineData(17)]
    [InlineData(4096)]
    [InlineData(12293)]
    public void Apply_IsWithinItsRoundingOfFloat64(int width)
    {
        Skip.IfNot(Supported, "needs AVX-512 F and FMA (elsewhere the libtorch path runs)");
        using var x = Conditioned(8, width, 704 + width);
        var (weight, bias) = Affine(width, 705 + width);
        using var w = weight;
        using var b = bias;
        using var noGrad = no_grad();
        using var fused = DecodeLayerNorm.Apply(x, w, b, 1e-5f).to(ScalarType.Float64);
        using var x64 = x.to(ScalarType.Float64);
        using var w64 = w.to(ScalarType.Float64);
        using var b64 = b.to(ScalarType.Float64);
        using var mean = x64.mean(new long[] { -1 }, keepdim: true);
        using var r = x64.sub(mean).square().mean(new long[] { -1 }, keepdim: true).add(1e-5).rsqrt();
        using var exact = x64.sub(mean).mul(r).mul(w64).add(b64);
        using var halfUlp = exact.abs().mul(Math.Pow(2, -8));   // bf16: 8 significant bits, half an ulp ≤ 2⁻⁸ relative
        using var terms = x64.abs().add(mean.abs()).mul(r).mul(w64.abs()).add(b64.abs()).mul(Math.Pow(2, -16));
        using var excess = fused.sub(exact).abs().sub(halfUlp.add(terms)).max();
        Assert.True(excess.item<double>() <= 0, $"a value is {excess.item<double>()} beyond its bound");
    }

    /// <summary>The moments (mean, biased variance) against float64: relative errors within 2⁻¹⁶ (float32 Welford
    /// merges, each a few 2⁻²⁴, over at most a few hundred steps per value).</summary>
    [SkippableTheory]
    [InlineData(7)]
    [InlineData(300)]
    [InlineData(12293)]
    public void Moments_AreFloat64sWithinFloat32Error(int width)
    {
        Skip.IfNot(Supported, "needs AVX-512 F and FMA (elsewhere the libtorch path runs)");
        using var x = Rows(4, width, 706 + width);
        var bits = Bits(x);
        using var x64 = x.to(ScalarType.Float64);
        var means = x64.mean(new long[] { -1 }).data<double>().ToArray();
        var variances = x64.var(new long[] { -1 }, unbiased: false).data<double>().ToArray();
        for (int row = 0; row < 4; row++)
        {
            var (mean, variance) = DecodeLayerNorm.Moments(bits.AsSpan(row * width, width));
            double spread = Math.Sqrt(variances[row]);
            Assert.True(Math.Abs(mean - means[row]) <= Math.Pow(2, -16) * (Math.Abs(means[row]) + spread), $"row {row}: mean {mean} against {means[row]}");
            Assert.True(Math.Abs(variance - variances[row]) <= Math.Pow(2, -16) * (variances[row] + means[row] * means[row]), $"row {row}: variance {variance} against {variances[row]}");
        }
    }

    /// <summary>
    /// Rows libtorch handles specially by arithmetic alone: a constant row (variance 0: 1/√ε), zeros, a row holding ∞
    /// and one holding NaN (all NaN out): as libtorch's <c>layer_norm</c>, a NaN's sign and payload aside (libtorch's
    /// vector conversion writes 0xFFFF, the pass a quiet NaN of the same sign).
    /// </summary>
    [SkippableFact]
    public void SpecialRows_AreAsLibtorchs()
    {
        Skip.IfNot(Supported, "needs AVX-512 F and FMA (elsewhere the libtorch path runs)");
        const int width = 4099;
        using var x = Rows(5, width, 708);
        using (NewDisposeScope())
        {
            x[0].fill_(3.25);
            x[1].fill_(0);
            x[2, 17] = tensor(float.PositiveInfinity).to(ScalarType.BFloat16);
            x[3, 4000] = tensor(float.NaN).to(ScalarType.BFloat16);
            x[4, width - 1] = tensor(float.NegativeInfinity).to(ScalarType.BFloat16);   // in the scalar leftovers
        }
        var (weight, bias) = Affine(width, 709);
        using var w = weight;
        using var b = bias;
        using var noGrad = no_grad();
        using var fused = DecodeLayerNorm.Apply(x, w, b, 1e-5f);
        using var libtorch = nn.functional.layer_norm(x, new long[] { width }, w, b, 1e-5);
        ushort[] got = Bits(fused), want = Bits(libtorch);
        static bool IsNaN(ushort v) => (v & 0x7FFF) > 0x7F80;
        var differing = Enumerable.Range(0, got.Length).Where(i => got[i] != want[i] && !(IsNaN(got[i]) && IsNaN(want[i])))
            .Select(i => $"{i}: {got[i]:X4} against {want[i]:X4}").ToList();
        Assert.True(differing.Count == 0, $"{differing.Count} values differ from libtorch's layer_norm, e.g. {string.Join(", ", differing.Take(5))}");
        Assert.True(Enumerable.Range(2 * width, 3 * width).All(i => IsNaN(got[i])), "a row holding ∞ or NaN normalises to NaN");
        Assert.True(Enumerable.Range(0, width).All(i => !IsNaN(got[i])), "a constant row is finite");
    }

    /// <summary>What the pass refuses: other dtypes, strides, sizes, gradients (then libtorch's op runs).</summary>
    [SkippableFact]
    public void Applies_RefusesWhatItCannotTake()
    {
        Skip.IfNot(Supported, "needs AVX-512 F and FMA (elsewhere the libtorch path runs)");
        using var x = ones(new long[] { 1, 1, 64 }, dtype: ScalarType.BFloat16);
        using var w = ones(64, dtype: ScalarType.BFloat16);
        using var b = zeros(64, dtype: ScalarType.BFloat16);
        Assert.True(DecodeLayerNorm.Applies(x, w, b, 64, 8 * 64));
        using var x32 = ones(new long[] { 1, 1, 64 });
        Assert.False(DecodeLayerNorm.Applies(x32, w, b, 64, 8 * 64));
        using var w32 = ones(64);
        Assert.False(DecodeLayerNorm.Applies(x, w32, b, 64, 8 * 64));
        Assert.False(DecodeLayerNorm.Applies(x, w, w32, 64, 8 * 64));
        using var wide = ones(new long[] { 64, 2 }, dtype: ScalarType.BFloat16);
        using var strided = wide.t();
        Assert.False(DecodeLayerNorm.Applies(strided, w, b, 64, 8 * 64));
        using var w65 = ones(65, dtype: ScalarType.BFloat16);
        Assert.False(DecodeLayerNorm.Applies(x, w65, b, 64, 8 * 64));
        using var w2d = ones(new long[] { 2, 32 }, dtype: ScalarType.BFloat16);
        Assert.False(DecodeLayerNorm.Applies(x, w2d, b, 64, 8 * 64));
        Assert.False(DecodeLayerNorm.Applies(x, w, b, 65, 8 * 64));
        using var many = ones(new long[] { 9, 64 }, dtype: ScalarType.BFloat16);
        Assert.False(DecodeLayerNorm.Applies(many, w, b, 64, 8 * 64));
        using var learned = ones(new long[] { 1, 1, 64 }, dtype: ScalarType.BFloat16).requires_grad_();
        Assert.False(DecodeLayerNorm.Applies(learned, w, b, 64, 8 * 64));
        using var trained = ones(64, dtype: ScalarType.BFloat16).requires_grad_();
        Assert.False(DecodeLayerNorm.Applies(x, w, trained, 64, 8 * 64));
        using (no_grad()) Assert.True(DecodeLayerNorm.Applies(learned, w, b, 64, 8 * 64));
    }
}
