using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MinLora.Quantization.Tests;

/// <summary>
/// The opt-in int8 × int8 many-row products (<see cref="QuantizedLinearOptions.Int8Gemm"/>): per-row activation
/// quantization, libtorch's integer GEMM and the rescale, each against a float64 reference on odd shapes.
/// </summary>
public class Int8GemmTests
{
    private const string NeedsInt8Gemm = "needs AVX-512 and AVX-VNNI or AMX, and the int8 GEMM kernel (elsewhere the bf16 path runs, covered by the other tests)";

    private static bool Supported
    {
        get
        {
            using var layer = MakeLayer(8, 16, out var linear, int8Gemm: true);
            using var _ = linear;
            return Int8Gemm.Applies(layer);   // AVX-512 CPU (the dev and CI machines); elsewhere the option is ignored
        }
    }

    /// <summary>A layer from a fresh Linear; the outlier split off unless <paramref name="split"/> (the checks from codes model whole rows).</summary>
    private static QuantizedLinear MakeLayer(long n, long k, out Linear linear, bool int8Gemm, bool bias = true, QuantizationFormat format = QuantizationFormat.Int8PerRow, bool split = false)
    {
        linear = nn.Linear(k, n, hasBias: bias);
        return QuantizedLinear.FromLinear(linear, format, options: new QuantizedLinearOptions
        {
            Int8Gemm = int8Gemm,
            Int8GemmOutlierThreshold = split ? 6f : float.PositiveInfinity,
        });
    }

    /// <summary>The stored codes as float64 [N, K]: dequant(W)/s_w is exact in float64 (q·s is, and so is its quotient).</summary>
    private static Tensor Codes(QuantizedLinear layer)
    {
        using var w = layer.Dequantize(ScalarType.Float64);
        using var s = layer.ScaleBuffer.to(ScalarType.Float64).unsqueeze(1);
        return w.div(s);
    }

    /// <summary>The formats the int8 GEMM takes: per-row scales only.</summary>
    public static TheoryData<QuantizationFormat> PerRowFormats => new() { QuantizationFormat.Int8PerRow, QuantizationFormat.Int4PerRowChatGlm };

    public static TheoryData<QuantizationFormat, long, long> Shapes => new()
    {
        { QuantizationFormat.Int8PerRow, 67, 302 },
        { QuantizationFormat.Int8PerRow, 130, 64 },
        { QuantizationFormat.Int8PerRow, 33, 301 },          // odd K
        { QuantizationFormat.Int4PerRowChatGlm, 67, 302 },   // tiles of 64 rows / 64 columns: several, and short last ones
        { QuantizationFormat.Int4PerRowChatGlm, 130, 192 },
    };

    /// <summary>
    /// Each row gets the scale max|x·c|/127 of its own (float32, exactly as computed from the same float32 products), and
    /// each code is that row's value divided by it, rounded: |q·s − x·c| ≤ s/2 (plus float32 rounding of x·c·127/max: 127·2⁻²² steps), |q| ≤ 127,
    /// and some code reaches ±127. An all-zero row gets scale 0 and zero codes. Widths with a scalar tail, both input types.
    /// </summary>
    [SkippableTheory]
    [InlineData(ScalarType.BFloat16, 301, false)]
    [InlineData(ScalarType.Float32, 301, false)]
    [InlineData(ScalarType.BFloat16, 64, true)]
    [InlineData(ScalarType.Float32, 45, true)]
    public void Quantize_RoundsEachRowToItsOwnScale(ScalarType dtype, long width, bool columnScaled)
    {
        Skip.IfNot(Supported, NeedsInt8Gemm);
        manual_seed(71);
        using var x32 = randn(40, width).mul(arange(40).add(1).unsqueeze(1));   // rows of very different magnitude
        x32[5].zero_();
        using var x = x32.to(dtype);
        using var c = columnScaled ? rand(width).add(0.01) : null;
        using var codes = Int8Gemm.Quantize(x, c, out var scales);
        Assert.NotNull(codes);
        Assert.Equal(new[] { 40L, width }, codes!.shape);
        using var product = c is null ? x.to(ScalarType.Float32) : x.to(ScalarType.Float32).mul(c);
        using var expectedScale = product.abs().amax(new long[] { 1 }).div(127f);
        var expected = expectedScale.data<float>().ToArray();
        Assert.Equal(expected, scales);
        Assert.Equal(0f, scales[5]);
        using var q = codes.to(ScalarType.Float64);
        Assert.Equal(0, q[5].abs().sum().item<double>());
        Assert.True(q.abs().max().item<double>() <= 127);
        using var s = tensor(scales).to(ScalarType.Float64).unsqueeze(1);
        using var error = q.mul(s).sub(product.to(ScalarType.Float64)).abs();
        using var bound = s.mul(0.5 + Math.Pow(2, -14));   // x·(127/amax) in float32: |error| ≤ 127·2⁻²² steps
        Assert.True((error - bound).max().item<double>() <= 0, "a code is more than half a step from its value");
        using var rowMax = q.abs().amax(new long[] { 1 });
        Assert.Equal(39, rowMax.eq(127).sum().item<long>());   // every row but the zero one reaches ±127
    }

    /// <summary>
    /// Forward: y = s_x·s_w·Σ q_x·q_w + b equals that expression in float64 from the same codes within bfloat16's
    /// rounding of the output (2⁻⁸ relative) plus float32 rounding of the int32 sum and the scale products (a few 2⁻²⁴
    /// of Σ|terms|): the integer sum itself is exact. Odd N and K (no multiple of 16), 1, 3, 8 and 130 rows; int4 codes
    /// widened in tiles of 64 rows.
    /// </summary>
    [SkippableTheory]
    [MemberData(nameof(Shapes))]
    public void Forward_IsTheExactIntegerProductRescaled(QuantizationFormat format, long n, long k)
    {
        Skip.IfNot(Supported, NeedsInt8Gemm);
        manual_seed(72);
        using var layer = MakeLayer(n, k, out var linear, int8Gemm: true, format: format);
        using var _ = linear;
        foreach (long rows in new[] { 1L, 3L, 8L, 130L })
        {
            using var x = randn(rows, k).to(ScalarType.BFloat16);
            using var y = Int8Gemm.Forward(layer, x, layer.Bias, tileElements: 64 * k);
            Assert.NotNull(y);
            Assert.Equal(new[] { rows, n }, y!.shape);
            Assert.Equal(ScalarType.BFloat16, y.dtype);
            AssertForwardFromCodes(layer, x, y, $"{n}x{k} rows {rows}");
        }
    }

    /// <summary>
    /// Input gradient: the weight's row scales are folded into the gradient before it is quantized, so
    /// dx = s_g·Σ_n q_g·q_w with q_g the codes of g·s_w; the same bound against float64 from the same codes.
    /// </summary>
    [SkippableTheory]
    [MemberData(nameof(Shapes))]
    public void InputGradient_IsTheExactIntegerProductRescaled(QuantizationFormat format, long n, long k)
    {
        Skip.IfNot(Supported, NeedsInt8Gemm);
        manual_seed(73);
        using var layer = MakeLayer(n, k, out var linear, int8Gemm: true, bias: false, format: format);
        using var _ = linear;
        foreach (long rows in new[] { 1L, 8L, 130L })
        {
            using var g = randn(rows, n).to(ScalarType.BFloat16);
            using var gx = Int8Gemm.InputGradient(layer, g, tileElements: 64 * n);
            Assert.NotNull(gx);
            Assert.Equal(new[] { rows, k }, gx!.shape);
            AssertGradientFromCodes(layer, g, gx, $"{n}x{k} rows {rows}");
        }
    }

    /// <summary>
    /// The accuracy trade against the exact product of the stored weights: rounding a row to int8 moves each activation
    /// by at most s/2 = max|row|/254, so |y − x·dequant(W)ᵀ| ≤ (s/2)·Σ_k|w| plus the output's bfloat16 rounding. Through
    /// the layer ([4, 10, K]: more rows than the decoding kernel takes), forward and backward.
    /// </summary>
    [SkippableTheory]
    [MemberData(nameof(PerRowFormats))]
    public void ThroughTheLayer_TheErrorIsBoundedByTheActivationRounding(QuantizationFormat format)
    {
        Skip.IfNot(Supported, NeedsInt8Gemm);
        manual_seed(74);
        long n = 96, k = 200;
        using var layer = MakeLayer(n, k, out var linear, int8Gemm: true, format: format);
        using var _ = linear;
        using var wd = layer.Dequantize(ScalarType.Float64);
        using var x = randn(4, 10, k).to(ScalarType.BFloat16).requires_grad_(true);
        using var y = layer.forward(x);
        using var x64 = x.detach().to(ScalarType.Float64).reshape(40, k);
        using var exact = x64.matmul(wd.t()).add(layer.Bias!.to(ScalarType.Float64));
        using var step = x64.abs().amax(new long[] { 1 }, keepdim: true).div(127);
        using var bound = step.mul(0.5).matmul(wd.abs().sum(1).unsqueeze(0)).add(exact.abs().mul(Math.Pow(2, -8))).mul(1.001);
        using var y2 = y.detach().to(ScalarType.Float64).reshape(40, n);
        Assert.True(((y2 - exact).abs() - bound).max().item<double>() <= 0, "forward error beyond the activation rounding");
        // It is the int8 path (the bfloat16 path's error is ~100× smaller than this bound, and these differ from it).
        using var viaGemm = Int8Gemm.Forward(layer, x.detach().reshape(40, k), layer.Bias)!;
        Assert.Equal(0, (viaGemm.reshape(4, 10, n) - y.detach()).abs().max().to(ScalarType.Float32).item<float>());

        using var r = randn(4, 10, n).to(ScalarType.BFloat16);
        using var loss = y.mul(r).sum();
        loss.backward();
        using var r64 = r.to(ScalarType.Float64).reshape(40, n);
        using var exactGrad = r64.matmul(wd);
        using var scaled = r64.mul(layer.ScaleBuffer.to(ScalarType.Float32).to(ScalarType.Float64));
        using var gStep = scaled.abs().amax(new long[] { 1 }, keepdim: true).div(127);
        // |Δ(g·s_w)| ≤ s_g/2 per element, times |q_w[n, k]| summed over n.
        using var codes = Codes(layer);
        using var gBound = gStep.mul(0.5).mul(codes.abs().sum(new long[] { 0 }).unsqueeze(0)).add(exactGrad.abs().mul(Math.Pow(2, -8))).mul(1.001);
        using var grad = x.grad!.to(ScalarType.Float64).reshape(40, k);
        using var viaGradient = Int8Gemm.InputGradient(layer, r.reshape(40, n))!;
        Assert.Equal(0, (viaGradient.to(ScalarType.Float64) - grad).abs().max().item<double>());   // the int8 path
        Assert.True(((grad - exactGrad).abs() - gBound).max().item<double>() <= 0, "input-gradient error beyond the activation rounding");
    }

    /// <summary>
    /// Without the option (the default) the same layer takes the bfloat16 path: its output differs from the int8 one.
    /// Group-wise int4 never takes it.
    /// </summary>
    [SkippableFact]
    public void IsOptIn()
    {
        Skip.IfNot(Supported, NeedsInt8Gemm);
        manual_seed(75);
        using var layer = MakeLayer(64, 128, out var linear, int8Gemm: false);
        using var _ = linear;
        Assert.False(Int8Gemm.Applies(layer));
        using var x = randn(40, 128).to(ScalarType.BFloat16);
        using var y = layer.forward(x);
        using var tiled = TiledProduct.Forward(layer, x, layer.Bias);
        Assert.Equal(0, (y - tiled).abs().max().to(ScalarType.Float32).item<float>());
        using var viaGemm = Int8Gemm.Forward(layer, x, layer.Bias)!;
        Assert.True((y - viaGemm).abs().max().to(ScalarType.Float32).item<float>() > 0);
        using var grouped = QuantizedLinear.FromLinear(linear, QuantizationFormat.Int4Grouped, options: new QuantizedLinearOptions { Int8Gemm = true });
        Assert.False(Int8Gemm.Applies(grouped));   // group scales along K do not factor out of one integer GEMM
    }

    /// <summary>
    /// The layer says why the option is ignored: null when it is off or takes effect, a reason naming the cause for
    /// group-wise int4, a float32 compute type and a forward longer than an exact int32 sum (on any CPU), and on CPUs
    /// without the int8 GEMM for every layer.
    /// </summary>
    [Fact]
    public void FallbackReason_NamesWhyTheOptionIsIgnored()
    {
        using var linear = nn.Linear(128, 16);
        using var off = QuantizedLinear.FromLinear(linear, QuantizationFormat.Int8PerRow);
        Assert.Null(off.Int8GemmFallbackReason);
        using var on = QuantizedLinear.FromLinear(linear, QuantizationFormat.Int8PerRow, options: new QuantizedLinearOptions { Int8Gemm = true });
        Assert.Equal(Supported, on.Int8GemmFallbackReason is null);
        Assert.Equal(Int8Gemm.Applies(on), on.Int8GemmFallbackReason is null);
        using var grouped = QuantizedLinear.FromLinear(linear, QuantizationFormat.Int4Grouped, options: new QuantizedLinearOptions { Int8Gemm = true });
        Assert.Contains("group-wise", grouped.Int8GemmFallbackReason, StringComparison.Ordinal);
        Assert.False(Int8Gemm.Applies(grouped));
        using var float32 = QuantizedLinear.FromLinear(linear, QuantizationFormat.Int8PerRow,
            options: new QuantizedLinearOptions { Int8Gemm = true, ComputeDtype = ScalarType.Float32 });
        Assert.Contains("bfloat16", float32.Int8GemmFallbackReason, StringComparison.Ordinal);
        Assert.False(Int8Gemm.Applies(float32));
        // A forward longer than an exact int32 sum: the layer takes the option, but that product never can.
        long depth = Int8Gemm.MaxDepth(QuantizationFormat.Int8PerRow);
        using var wide = nn.Linear(depth + 1, 2);
        using var deep = QuantizedLinear.FromLinear(wide, QuantizationFormat.Int8PerRow, options: new QuantizedLinearOptions { Int8Gemm = true });
        if (Supported) Assert.Contains("forward sums", deep.Int8GemmFallbackReason, StringComparison.Ordinal);
        else Assert.NotNull(deep.Int8GemmFallbackReason);
    }

    /// <summary>
    /// A row with NaN or ∞ cannot be scaled: the call takes the bfloat16 path, so only that row's outputs are NaN; with the
    /// outlier split too.
    /// </summary>
    [SkippableFact]
    public void NonFiniteRows_TakeTheBf16Path()
    {
        Skip.IfNot(Supported, NeedsInt8Gemm);
        manual_seed(76);
        foreach (bool split in new[] { false, true })
            foreach (var bad in new[] { float.NaN, float.PositiveInfinity })
            {
                // With the split an ∞ makes its column an outlier: zeroed in the rows, 0·∞ = NaN still rejects the row.
                using var layer = MakeLayer(48, 80, out var linear, int8Gemm: true, split: split);
                using var _ = linear;
                using var x = randn(20, 80);
                x[7, 33] = bad;
                if (split && float.IsInfinity(bad)) Assert.Equal(new[] { 33 }, Int8Gemm.OutlierColumns(x, 6f));
                Assert.Null(Int8Gemm.Forward(layer, x, null));
                using var y = layer.forward(x);
                using var finite = y.isfinite();
                Assert.Equal(0, finite[7].sum().item<long>());
                Assert.Equal(19 * 48, finite.sum().item<long>());
            }
    }

    /// <summary>
    /// Widening int4 codes: every byte value 0..255 (so every nibble, −8 included) in every row, any column window with an
    /// even start and vector and scalar parts, against a scalar decoding of the same bytes.
    /// </summary>
    [Fact]
    public unsafe void WidenInt4_GivesTheSignedNibblesInColumnOrder()
    {
        long n = 5, k = 600;
        using var linear = nn.Linear(k, n, hasBias: false);
        using var layer = QuantizedLinear.FromLinear(linear, QuantizationFormat.Int4PerRowChatGlm);
        var bytes = new byte[n * k / 2];
        for (int i = 0; i < bytes.Length; i++) bytes[i] = (byte)((i * 7 + i / 300) % 256);
        using (no_grad()) layer.WeightBuffer.copy_(tensor(bytes.Select(b => (sbyte)b).ToArray()).view(n, k / 2));
        static sbyte Nibble(int u) => (sbyte)(u >= 8 ? u - 16 : u);
        foreach (var (c0, c1) in new[] { (0L, 600L), (64L, 192L), (2L, 131L), (128L, 600L) })
        {
            var dst = new sbyte[3 * (c1 - c0)];
            fixed (sbyte* pd = dst)
                Int8Gemm.WidenInt4((byte*)TensorMemory.Pointer(layer.WeightBuffer), k, 1, 4, c0, c1, pd);
            for (long r = 1; r < 4; r++)
            {
                for (long c = c0; c < c1; c++)
                {
                    byte b = bytes[r * k / 2 + c / 2];
                    var expected = Nibble((c & 1) == 0 ? b >> 4 : b & 15);
                    Assert.True(expected == dst[(r - 1) * (c1 - c0) + c - c0], $"row {r} column {c} (window {c0}..{c1})");
                }
            }
        }
        Assert.Contains(bytes, b => b >> 4 == 8);
    }

    /// <summary>
    /// Calls large enough for the quantize, widen and rescale passes to run in parallel blocks (300 × 1024: beyond their
    /// 256 K-element threshold), whole-K tiles as in production: the same float64 check from the same codes.
    /// </summary>
    [SkippableTheory]
    [MemberData(nameof(PerRowFormats))]
    public void LargeCalls_RunInParallelBlocks_AndAgree(QuantizationFormat format)
    {
        Skip.IfNot(Supported, NeedsInt8Gemm);
        manual_seed(78);
        long n = 1024, k = 1024, rows = 300;
        using var layer = MakeLayer(n, k, out var linear, int8Gemm: true, format: format);
        using var _ = linear;
        using var x = randn(rows, k).to(ScalarType.BFloat16);
        using var y = Int8Gemm.Forward(layer, x, layer.Bias)!;
        AssertForwardFromCodes(layer, x, y, $"{format} forward");
        using var g = randn(rows, n).to(ScalarType.BFloat16);
        using var gx = Int8Gemm.InputGradient(layer, g)!;
        AssertGradientFromCodes(layer, g, gx, $"{format} input gradient");
    }

    /// <summary>
    /// Rows of tiny values (127/max overflows float32 below ~3.7e-37) still get codes within ±127 that reach ±127, and
    /// scales max/127: they are multiplied by 2⁶⁴ before they are quantized.
    /// </summary>
    [SkippableFact]
    public void TinyRows_AreQuantizedLikeOthers()
    {
        Skip.IfNot(Supported, NeedsInt8Gemm);
        manual_seed(79);
        using var x = randn(3, 70);
        x[0].mul_(1e-38f);
        x[1].mul_(1e-36f);
        x[2].mul_(1e-20f);
        using var codes = Int8Gemm.Quantize(x, null, out var scales)!;
        using var q = codes.to(ScalarType.Float64);
        using var rowMax = q.abs().amax(new long[] { 1 });
        Assert.Equal(new[] { 127.0, 127.0, 127.0 }, rowMax.data<double>().ToArray());
        using var expected = x.abs().amax(new long[] { 1 }).div(127f);
        Assert.Equal(expected.data<float>().ToArray(), scales);
        using var s = tensor(scales).to(ScalarType.Float64).unsqueeze(1);
        using var error = q.mul(s).sub(x.to(ScalarType.Float64)).abs();
        // Where max/127 is subnormal (row 0) the scale itself is rounded to a multiple of 2⁻¹⁴⁹: allow 127 of those.
        using var bound = s.mul(0.5 + Math.Pow(2, -14)).add(127 * Math.Pow(2, -149));
        Assert.True((error - bound).max().item<double>() <= 0);
    }

    /// <summary>
    /// Sums longer than an int32 holds exactly for int8 codes (132,105 terms and more) take the bfloat16 path, forward (over K) and
    /// backward (over N); ChatGLM's int4 codes (|q| ≤ 8) allow 16× longer sums, so the same K stays on the int8 path.
    /// </summary>
    [SkippableFact]
    public void SumsBeyondTheExactInt32Depth_TakeTheBf16Path()
    {
        Skip.IfNot(Supported, NeedsInt8Gemm);
        manual_seed(80);
        long depth = Int8Gemm.MaxDepth(QuantizationFormat.Int8PerRow) + 2;   // even, for the int4 layer below
        Assert.Equal(132_106, depth);
        using var wide = MakeLayer(16, depth, out var linear, int8Gemm: true);
        using var x = randn(20, depth).to(ScalarType.BFloat16);
        Assert.Null(Int8Gemm.Forward(wide, x, wide.Bias));
        using var y = wide.forward(x);
        using var tiled = TiledProduct.Forward(wide, x, wide.Bias);
        Assert.Equal(0, (y - tiled).abs().max().to(ScalarType.Float32).item<float>());
        using var int4 = QuantizedLinear.FromLinear(linear, QuantizationFormat.Int4PerRowChatGlm, options: new QuantizedLinearOptions { Int8Gemm = true });
        using var y4 = Int8Gemm.Forward(int4, x, null);
        Assert.NotNull(y4);
        linear.Dispose();

        using var tall = MakeLayer(depth, 16, out var linear2, int8Gemm: true, bias: false);
        using var _ = linear2;
        using var g = randn(20, depth).to(ScalarType.BFloat16);
        Assert.Null(Int8Gemm.InputGradient(tall, g));
    }

    [SkippableFact]
    public void ZeroRows_GiveEmptyResults()
    {
        Skip.IfNot(Supported, NeedsInt8Gemm);
        using var layer = MakeLayer(24, 40, out var linear, int8Gemm: true);
        using var _ = linear;
        using var y = Int8Gemm.Forward(layer, empty(0, 40, dtype: ScalarType.BFloat16), null);
        Assert.Equal(new long[] { 0, 24 }, y!.shape);
        using var gx = Int8Gemm.InputGradient(layer, empty(0, 24, dtype: ScalarType.BFloat16));
        Assert.Equal(new long[] { 0, 40 }, gx!.shape);
    }

    /// <summary>
    /// Activations with outlier features (a few columns 5–40× the rest, as large models' hidden states carry): the columns
    /// above the threshold are found exactly, left out of the int8 rows (their codes are 0, the rows' scales come from
    /// the other columns) and multiplied in float32 with the dequantized weight columns: y equals
    /// s_x·s_w·Σ q_x·q_w + x_O·dequant(W)_Oᵀ + b in float64 within the output's bfloat16 rounding. Odd shapes, int4 columns
    /// in both nibbles, 1, 3, 8 and 130 rows; outlier columns in only some rows.
    /// </summary>
    [SkippableTheory]
    [InlineData(QuantizationFormat.Int8PerRow, 67, 302)]
    [InlineData(QuantizationFormat.Int8PerRow, 33, 517)]          // odd K
    [InlineData(QuantizationFormat.Int4PerRowChatGlm, 67, 302)]   // tiles of 64 rows: several, and a short last one
    [InlineData(QuantizationFormat.Int4PerRowChatGlm, 130, 640)]
    public void Forward_SplitsOutlierColumns_IntoAFloatProduct(QuantizationFormat format, long n, long k)
    {
        Skip.IfNot(Supported, NeedsInt8Gemm);
        manual_seed(81);
        using var layer = MakeLayer(n, k, out var linear, int8Gemm: true, format: format, split: true);
        using var _ = linear;
        // Odd and even (both int4 nibbles), the last column; five where K/64 allows (the side sums' 4-wide loop and its tail).
        var columns = k / Int8Gemm.MaxOutlierShare >= 5 ? new long[] { 1, 6, 33, k / 2 + 1, k - 1 } : new long[] { 1, 6, k / 2 + 1, k - 1 };
        foreach (long rows in new[] { 1L, 3L, 8L, 130L })
        {
            using var x32 = randn(rows, k).clamp(-2, 2);   // even one row's largest |x| stays under 6× its median (≈ 0.67)
            foreach (long c in columns)
                x32[TensorIndex.Slice(0, null, 2), c] = x32[TensorIndex.Slice(0, null, 2), c].abs().mul(40).add(20).mul(c % 2 == 0 ? 1 : -1);
            using var x = x32.to(ScalarType.BFloat16);
            Assert.Equal(columns.Select(c => (int)c).ToArray(), Int8Gemm.OutlierColumns(x, 6f));
            using var y = Int8Gemm.Forward(layer, x, layer.Bias, tileElements: 64 * k);
            Assert.NotNull(y);

            using var keep = ones(k);
            foreach (long c in columns) keep[c] = 0f;
            using var codes = Int8Gemm.Quantize(x, keep, out var scales)!;
            using var q = codes.to(ScalarType.Float64);
            Assert.Equal(0, q.index_select(1, tensor(columns)).abs().sum().item<double>());
            using var sx = tensor(scales).to(ScalarType.Float64).unsqueeze(1);
            using var w64 = Codes(layer);
            using var sw = layer.ScaleBuffer.to(ScalarType.Float32).to(ScalarType.Float64);
            using var wd = layer.Dequantize(ScalarType.Float32).to(ScalarType.Float64);
            using var xo = x.to(ScalarType.Float64).index_select(1, tensor(columns));
            using var wo = wd.index_select(1, tensor(columns));
            using var reference = q.matmul(w64.t()).mul(sx).mul(sw).add(xo.matmul(wo.t())).add(layer.Bias!.to(ScalarType.Float64));
            using var magnitude = q.abs().matmul(w64.abs().t()).mul(sx).mul(sw).add(xo.abs().matmul(wo.abs().t()));
            AssertWithin(y!, reference, magnitude, $"{format} {n}x{k} rows {rows}");
        }
    }

    /// <summary>
    /// The point of the split, against the exact product of the stored weights: with the outliers split off, each
    /// activation moves by at most max|row without them|/254, so |y − x·dequant(W)ᵀ| ≤ that·Σ_k|w| plus bfloat16
    /// rounding; the same call with the split turned off (+∞) breaks that bound (one outlier sets the row's step) and
    /// errs several times more in the mean.
    /// </summary>
    [SkippableTheory]
    [MemberData(nameof(PerRowFormats))]
    public void OutlierSplit_BoundsTheErrorByTheOrdinaryActivations(QuantizationFormat format)
    {
        Skip.IfNot(Supported, NeedsInt8Gemm);
        manual_seed(82);
        long n = 96, k = 256;
        using var linear = nn.Linear(k, n);
        using var split = QuantizedLinear.FromLinear(linear, format, options: new QuantizedLinearOptions { Int8Gemm = true });
        using var whole = QuantizedLinear.FromLinear(linear, format,
            options: new QuantizedLinearOptions { Int8Gemm = true, Int8GemmOutlierThreshold = float.PositiveInfinity });
        using var x32 = randn(4, 10, k).clamp(-4, 4);
        x32[TensorIndex.Ellipsis, 17] = x32[TensorIndex.Ellipsis, 17].mul(20).add(60);
        x32[TensorIndex.Ellipsis, 200] = x32[TensorIndex.Ellipsis, 200].mul(20).sub(60);
        using var x = x32.to(ScalarType.BFloat16);
        using var noGrad = no_grad();
        using var ySplit = split.forward(x);
        using var yWhole = whole.forward(x);
        using var wd = split.Dequantize(ScalarType.Float64);
        using var x64 = x.to(ScalarType.Float64).reshape(40, k);
        using var exact = x64.matmul(wd.t()).add(split.Bias!.to(ScalarType.Float64));
        using var ordinary = x64.clone();
        ordinary[TensorIndex.Colon, 17] = 0;
        ordinary[TensorIndex.Colon, 200] = 0;
        using var step = ordinary.abs().amax(new long[] { 1 }, keepdim: true).div(127);
        using var bound = step.mul(0.5).matmul(wd.abs().sum(1).unsqueeze(0)).add(exact.abs().mul(Math.Pow(2, -8))).mul(1.001);
        using var errorSplit = (ySplit.to(ScalarType.Float64).reshape(40, n) - exact).abs();
        using var errorWhole = (yWhole.to(ScalarType.Float64).reshape(40, n) - exact).abs();
        Assert.True((errorSplit - bound).max().item<double>() <= 0, "with the split, an error beyond the ordinary activations' rounding");
        Assert.True((errorWhole - bound).max().item<double>() > 0, "without the split the same bound should break");
        double ratio = errorWhole.mean().item<double>() / errorSplit.mean().item<double>();
        Assert.True(ratio > 3, $"the split should cut the mean error several times, got {ratio:F2}×");
    }

    /// <summary>
    /// The outlier weight columns are kept for the next call with the same columns (bit-identical results), replaced for
    /// other columns, and dropped when the stored weights change (<see cref="QuantizedLinear.AddToWeight"/>,
    /// <see cref="QuantizedLinear.RefreshKernel"/>): a changed weight is never multiplied through stale columns.
    /// </summary>
    [SkippableFact]
    public void OutlierWeights_AreReusedForTheSameColumns_AndDroppedWhenTheWeightChanges()
    {
        Skip.IfNot(Supported, NeedsInt8Gemm);
        manual_seed(84);
        long n = 40, k = 256;
        using var layer = MakeLayer(n, k, out var linear, int8Gemm: true, split: true);
        using var _ = linear;
        Tensor Input(long column, int seed)
        {
            manual_seed(seed);
            using var x32 = randn(12, k).clamp(-4, 4);
            x32[TensorIndex.Colon, column] = 30f;
            return x32.to(ScalarType.BFloat16);
        }
        using var a = Input(9, 1);
        using var ya = Int8Gemm.Forward(layer, a, layer.Bias)!;
        var cached = layer.OutlierWeights;
        Assert.NotNull(cached);
        Assert.Equal(new[] { 9 }, cached!.Columns);
        using var again = Int8Gemm.Forward(layer, a, layer.Bias)!;
        Assert.Same(cached, layer.OutlierWeights);
        Assert.Equal(0, (again - ya).abs().max().to(ScalarType.Float32).item<float>());
        using var b = Input(100, 2);
        using var yb = Int8Gemm.Forward(layer, b, layer.Bias)!;
        Assert.Equal(new[] { 100 }, layer.OutlierWeights!.Columns);

        using var delta = zeros(n, k);
        delta[TensorIndex.Colon, 100] = 0.5f;   // changes exactly the cached column
        layer.AddToWeight(delta);
        Assert.Null(layer.OutlierWeights);
        using var changed = Int8Gemm.Forward(layer, b, layer.Bias)!;
        using var fresh = QuantizedLinear.FromLinear(linear, QuantizationFormat.Int8PerRow, options: layer.Options);
        using (no_grad()) fresh.WeightBuffer.copy_(layer.WeightBuffer);
        using (no_grad()) fresh.ScaleBuffer.copy_(layer.ScaleBuffer);
        fresh.RefreshKernel();
        using var expected = Int8Gemm.Forward(fresh, b, layer.Bias)!;
        Assert.Equal(0, (changed - expected).abs().max().to(ScalarType.Float32).item<float>());
        Assert.True((changed - yb).abs().max().to(ScalarType.Float32).item<float>() > 1);   // 30·0.5 moved through column 100
        layer.RefreshKernel();
        Assert.Null(layer.OutlierWeights);

        // Columns read before a weight change but stored after it (a product racing DropPlan) carry the old generation
        // and are never used: here garbage columns of generation − 1.
        using var before = Int8Gemm.Forward(layer, b, layer.Bias)!;
        var junk = GC.AllocateArray<float>((int)n, pinned: true);
        Array.Fill(junk, 1e6f);
        layer.OutlierWeights = new Int8Gemm.OutlierCache(new[] { 100 }, junk, layer.WeightGeneration - 1);
        using var after = Int8Gemm.Forward(layer, b, layer.Bias)!;
        Assert.Equal(0, (after - before).abs().max().to(ScalarType.Float32).item<float>());
        Assert.Equal(layer.WeightGeneration, layer.OutlierWeights!.Generation);
    }

    /// <summary>More than K/64 outlier columns: the call takes the bfloat16 path (the layer's output is the tiled product's).</summary>
    [SkippableFact]
    public void ManyOutlierColumns_TakeTheBf16Path()
    {
        Skip.IfNot(Supported, NeedsInt8Gemm);
        manual_seed(83);
        long k = 160;
        using var layer = MakeLayer(32, k, out var linear, int8Gemm: true, split: true);
        using var _ = linear;
        using var x32 = randn(20, k).clamp(-4, 4);
        for (long c = 0; c < k / Int8Gemm.MaxOutlierShare; c++) x32[3, c * 7] = 50f;   // exactly K/64: still split
        Assert.NotNull(Int8Gemm.Forward(layer, x32, null));
        x32[5, 1] = -50f;                                                               // one more
        Assert.Null(Int8Gemm.Forward(layer, x32, null));
        using var y = layer.forward(x32);
        using var xb = x32.to(ScalarType.BFloat16);
        using var tiled = TiledProduct.Forward(layer, xb, layer.Bias);
        Assert.Equal(0, (y.to(ScalarType.BFloat16) - tiled).abs().max().to(ScalarType.Float32).item<float>());
    }

    /// <summary>The threshold must be positive; +∞ turns the split off (no column is ever an outlier).</summary>
    [Fact]
    public void OutlierThreshold_IsValidated()
    {
        foreach (var bad in new[] { float.NaN, 0f, -1f, float.NegativeInfinity })
        {
            var e = Assert.Throws<ArgumentOutOfRangeException>(() => new QuantizedLinearOptions { Int8GemmOutlierThreshold = bad });
            Assert.Equal(nameof(QuantizedLinearOptions.Int8GemmOutlierThreshold), e.ParamName);
        }
        Assert.Equal(6f, new QuantizedLinearOptions().Int8GemmOutlierThreshold);
        Assert.Equal(0.5f, new QuantizedLinearOptions { Int8GemmOutlierThreshold = 0.5f }.Int8GemmOutlierThreshold);
    }

    /// <summary>
    /// Outlier columns are relative to the median column maximum: the same at any scale, strictly above the threshold,
    /// an ∞ among them; none at +∞ or without a typical column (median 0).
    /// </summary>
    [SkippableFact]
    public void OutlierColumns_AreRelativeToTheMedianColumn()
    {
        Skip.IfNot(Supported, NeedsInt8Gemm);
        // Relative to the median column maximum: the same at any scale, strictly above, none without a typical column.
        foreach (float scale in new[] { 1e-30f, 1f, 1e30f })
        {
            using var x = ones(3, 41).mul(scale);
            x[1, 5] = 6.5f * scale;
            x[2, 17] = -6f * scale;
            x[0, 40] = float.PositiveInfinity;
            Assert.Equal(new[] { 5, 40 }, Int8Gemm.OutlierColumns(x, 6f));
            Assert.Equal(new[] { 5, 17, 40 }, Int8Gemm.OutlierColumns(x, 5.5f));
            Assert.Empty(Int8Gemm.OutlierColumns(x, float.PositiveInfinity));
        }
        using var sparse = zeros(4, 40);
        sparse[2, 3] = 1f;
        Assert.Empty(Int8Gemm.OutlierColumns(sparse, 6f));   // median 0: no scale to measure outliers by
    }

    /// <summary>The selection median equals the sorted array's lower middle element: odd and even lengths, ties, NaN as 0.</summary>
    [Fact]
    public void Median_IsTheLowerMiddleOfTheSortedValues()
    {
        var random = new Random(85);
        foreach (int length in new[] { 1, 2, 3, 10, 257, 4096 })
        {
            for (int trial = 0; trial < 5; trial++)
            {
                var values = Enumerable.Range(0, length).Select(_ => (float)random.Next(0, trial + 2) * (trial % 2 == 0 ? 1f : (float)random.NextDouble())).ToArray();
                if (length > 3 && trial == 4) values[1] = float.NaN;
                var sorted = values.Select(v => float.IsNaN(v) ? 0f : v).OrderBy(v => v).ToArray();
                var copy = values.ToArray();
                Assert.Equal(sorted[(length - 1) / 2], Int8Gemm.Median(values));
                Assert.Equal(copy, values);   // the input is left as it was
            }
        }
    }

    /// <summary>y against s_x·s_w·Σ q_x·q_w + b in float64, from the codes <see cref="Int8Gemm.Quantize"/> gives for x.</summary>
    private static void AssertForwardFromCodes(QuantizedLinear layer, Tensor x, Tensor y, string what)
    {
        using var w64 = Codes(layer);
        using var sw = layer.ScaleBuffer.to(ScalarType.Float32).to(ScalarType.Float64);
        using var codes = Int8Gemm.Quantize(x, null, out var scales)!;
        using var q = codes.to(ScalarType.Float64);
        using var sx = tensor(scales).to(ScalarType.Float64).unsqueeze(1);
        using var reference = q.matmul(w64.t()).mul(sx).mul(sw).add(layer.Bias!.to(ScalarType.Float64));
        using var magnitude = q.abs().matmul(w64.abs().t()).mul(sx).mul(sw);
        AssertWithin(y, reference, magnitude, what);
    }

    /// <summary>dx against s_g·Σ_n q_g·q_w in float64, q_g the codes of g·s_w.</summary>
    private static void AssertGradientFromCodes(QuantizedLinear layer, Tensor g, Tensor gx, string what)
    {
        using var w64 = Codes(layer);
        using var sw = layer.ScaleBuffer.to(ScalarType.Float32);
        using var codes = Int8Gemm.Quantize(g, sw, out var scales)!;
        using var q = codes.to(ScalarType.Float64);
        using var sg = tensor(scales).to(ScalarType.Float64).unsqueeze(1);
        using var reference = q.matmul(w64).mul(sg);
        using var magnitude = q.abs().matmul(w64.abs()).mul(sg);
        AssertWithin(gx, reference, magnitude, what);
    }

    private static void AssertWithin(Tensor actual, Tensor reference, Tensor magnitude, string what)
    {
        using var a = actual.to(ScalarType.Float64);
        using var bound = reference.abs().mul(Math.Pow(2, -8)).add(magnitude.mul(Math.Pow(2, -20)));
        var excess = ((a - reference).abs() - bound).max().item<double>();
        Assert.True(excess <= 0, $"{what}: an element is {excess} beyond the bound");
    }
}
