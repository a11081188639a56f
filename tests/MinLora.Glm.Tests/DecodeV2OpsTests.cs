using MinLora.Glm.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Tests;

/// <summary>
/// The v2 (ChatGLM2/3, GLM-4) RMSNorm on a decoding step's bf16 rows in one managed pass, against libtorch's ops it
/// replaces (bit for bit: the same float32 sum order and roundings) and against float64.
/// </summary>
public class DecodeRmsNormTests
{
    private static Tensor Libtorch(Tensor x, Tensor weight, double eps)
    {
        using var variance = x.to(ScalarType.Float32).square().mean(new long[] { -1 }, keepdim: true);
        using var normalized = x.mul(variance.add(eps).rsqrt());
        return weight.mul(normalized).to(x.dtype);
    }

    /// <summary>bf16 values whose magnitudes spread over ±2¹² around 1 (so that the sum order matters), some exact zeros.</summary>
    private static Tensor Spread(long rows, long width, int seed)
    {
        using var g = new Generator((ulong)seed);
        using var raw = randn(new[] { rows, width }, generator: g).mul(exp2(randn(new[] { rows, width }, generator: g).mul(4)));
        using var zeros = rand(new[] { rows, width }, generator: g).lt(0.02);
        return raw.masked_fill(zeros, 0).to(ScalarType.BFloat16);
    }

    /// <summary>
    /// The sum of squares in libtorch's cascade order: equal bit for bit to libtorch's float32 <c>sum</c> over rows long
    /// enough to use every level of the cascade (with 8-float vectors, 32 floats a group and 16 groups a level step:
    /// 2,049 and 8,192 groups reach the third and fourth levels), with leftover vectors and floats.
    /// </summary>
    [SkippableTheory]
    [InlineData(16)]
    [InlineData(20)]
    [InlineData(100)]
    [InlineData(104)]
    [InlineData(1024)]
    [InlineData(1041)]
    [InlineData(4096)]
    [InlineData(4120)]
    [InlineData(13696)]
    [InlineData(65536 + 48 + 5)]
    [InlineData(262144 + 17)]
    public void SumOfSquares_IsLibtorchsSum(int width)
    {
        Skip.IfNot(System.Runtime.Intrinsics.X86.Avx512F.IsSupported, "needs AVX-512 F (elsewhere the libtorch path runs)");
        // Rows of spread magnitudes and rows of plain normal values (where every lane's partial sums are alike in size,
        // so that any change of order shows in the last bits).
        using var spread = Spread(16, width, 40 + width);
        using var g = new Generator((ulong)width);
        using var plain = randn(new long[] { 16, width }, generator: g).to(ScalarType.BFloat16);
        using var x = cat(new[] { spread, plain }, 0);
        int rows = 32;
        using var libtorch = x.to(ScalarType.Float32).square().sum(new long[] { -1 });
        var expected = libtorch.data<float>().ToArray();
        var bits = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ushort>(x.bytes.ToArray().AsSpan()).ToArray();
        for (int r = 0; r < rows; r++)
        {
            float sum = DecodeRmsNorm.SumOfSquares(bits.AsSpan(r * width, width));
            Assert.True(BitConverter.SingleToInt32Bits(sum) == BitConverter.SingleToInt32Bits(expected[r]),
                $"width {width}, row {r}: {sum:R} against libtorch's {expected[r]:R}");
        }
        // Not vacuous: a plain left-to-right float32 sum differs from the cascade on these rows.
        if (width >= 4096)
        {
            var values = x.to(ScalarType.Float32).data<float>().ToArray();
            int differing = 0;
            for (int r = 0; r < rows; r++)
            {
                float leftToRight = 0;
                for (int i = 0; i < width; i++) leftToRight += values[(long)r * width + i] * values[(long)r * width + i];
                if (leftToRight != expected[r]) differing++;
            }
            Assert.True(differing > 0, "the rows do not tell summation orders apart");
        }
    }

    /// <summary>
    /// 1, 3 and 8 rows, widths with tails: bit for bit libtorch's eight ops (ε as the checkpoints' 1e-5 and a large
    /// 0.5 that dominates small rows), and within one bf16 rounding (2⁻⁹ relative, plus float32's few ulps of
    /// mean and rsqrt, far below it: bounded by 2⁻⁸ relative) of a float64 computation.
    /// </summary>
    [SkippableTheory]
    [InlineData(1, 4096, 1e-5)]
    [InlineData(3, 100, 1e-5)]
    [InlineData(8, 4096, 1e-5)]
    [InlineData(2, 1041, 0.5)]
    [InlineData(1, 16, 1e-5)]
    public void Apply_EqualsTheLibtorchOps(int rows, int width, double eps)
    {
        Skip.IfNot(System.Runtime.Intrinsics.X86.Avx512F.IsSupported, "needs AVX-512 F (elsewhere the libtorch path runs)");
        using var x3 = Spread(rows, width, 7 * width + rows);
        using var x = x3.view(rows, 1, width);                                   // [s, b, h] as in the model
        using var weight = Spread(1, width, width).view(width);
        using var noGrad = no_grad();
        Assert.True(DecodeRmsNorm.Applies(x, weight, width, 8L * width));
        using var fused = DecodeRmsNorm.Apply(x, weight, (float)eps);
        using var libtorch = Libtorch(x, weight, eps);
        Assert.Equal(libtorch.shape, fused.shape);
        Assert.True(fused.bytes.SequenceEqual(libtorch.bytes), "the fused RMSNorm differs from libtorch's ops");
        using var x64 = x.to(ScalarType.Float64);
        using var reference = weight.to(ScalarType.Float64).mul(x64.mul(x64.square().mean(new long[] { -1 }, keepdim: true).add(eps).rsqrt()));
        using var error = (fused.to(ScalarType.Float64) - reference).abs();
        using var bound = reference.abs().mul(Math.Pow(2, -8)).add(1e-37);
        Assert.True(error.le(bound).all().item<bool>(), $"off the float64 RMSNorm by up to {error.max().item<double>()}");
    }

    /// <summary>Zeros give zeros (ε keeps the rsqrt finite); ∞ and NaN give what libtorch's ops give.</summary>
    [SkippableFact]
    public void Apply_SpecialRows_AsLibtorch()
    {
        Skip.IfNot(System.Runtime.Intrinsics.X86.Avx512F.IsSupported, "needs AVX-512 F (elsewhere the libtorch path runs)");
        using var x = Spread(3, 64, 3);
        x[0] = 0;
        x[1, 5] = float.PositiveInfinity;
        x[2, 63] = float.NaN;
        using var weight = ones(64, dtype: ScalarType.BFloat16);
        using var noGrad = no_grad();
        using var fused = DecodeRmsNorm.Apply(x, weight, 1e-5f);
        using var libtorch = Libtorch(x, weight, 1e-5);
        Assert.True(fused[0].eq(0).all().item<bool>());
        // ∞ makes the mean ∞ and rsqrt 0: ∞·0 is NaN, the rest 0; a NaN makes the whole row NaN.
        Assert.True(fused[1, 5].isnan().item<bool>() && fused[1].isnan().sum().item<long>() == 1 && fused[1].nan_to_num().eq(0).all().item<bool>());
        Assert.True(fused[2].isnan().all().item<bool>());
        Assert.True(fused.isnan().eq(libtorch.isnan()).all().item<bool>());
        using var finite = fused.isfinite();
        Assert.True(fused.masked_select(finite).bytes.SequenceEqual(libtorch.masked_select(finite).bytes));
    }

    [Fact]
    public void Applies_RefusesWhatItCannotRead()
    {
        using var x = ones(new long[] { 1, 1, 64 }, dtype: ScalarType.BFloat16);
        using var weight = ones(64, dtype: ScalarType.BFloat16);
        using var noGrad = no_grad();
        Assert.Equal(System.Runtime.Intrinsics.X86.Avx512F.IsSupported, DecodeRmsNorm.Applies(x, weight, 64, 512));
        using var f32 = x.to(ScalarType.Float32);
        Assert.False(DecodeRmsNorm.Applies(f32, weight, 64, 512));
        using var w32 = weight.to(ScalarType.Float32);
        Assert.False(DecodeRmsNorm.Applies(x, w32, 64, 512));
        Assert.False(DecodeRmsNorm.Applies(x, weight, 64, 63));                 // more values than allowed
        Assert.False(DecodeRmsNorm.Applies(x, weight, 32, 512));                // last dimension not the width
        using var short8 = ones(new long[] { 2, 8 }, dtype: ScalarType.BFloat16);
        using var weight8 = ones(8, dtype: ScalarType.BFloat16);
        Assert.False(DecodeRmsNorm.Applies(short8, weight8, 8, 512));           // narrower than one vector
        using var wide = ones(new long[] { 64, 2 }, dtype: ScalarType.BFloat16);
        using var strided = wide.t();
        Assert.False(DecodeRmsNorm.Applies(strided, weight, 64, 512));          // not contiguous
        using var weight65 = ones(65, dtype: ScalarType.BFloat16);
        Assert.False(DecodeRmsNorm.Applies(x, weight65, 64, 512));
        using var weights2 = ones(new long[] { 64, 2 }, dtype: ScalarType.BFloat16);
        using var stridedWeight = weights2.select(1, 0);
        Assert.False(DecodeRmsNorm.Applies(x, stridedWeight, 64, 512));          // weight not contiguous
        using var wideRow = ones(new long[] { 1, 32768 }, dtype: ScalarType.BFloat16);
        using var wideWeight = ones(32768, dtype: ScalarType.BFloat16);
        Assert.False(DecodeRmsNorm.Applies(wideRow, wideWeight, 32768, 32768));  // libtorch splits such a row's sum
        using var learned = ones(new long[] { 1, 1, 64 }, dtype: ScalarType.BFloat16).requires_grad_();
        Assert.Equal(System.Runtime.Intrinsics.X86.Avx512F.IsSupported, DecodeRmsNorm.Applies(learned, weight, 64, 512));   // no grad wanted
        using (enable_grad())
        {
            using var trained = ones(64, dtype: ScalarType.BFloat16).requires_grad_();
            Assert.False(DecodeRmsNorm.Applies(x, trained, 64, 512));
            Assert.False(DecodeRmsNorm.Applies(learned, weight, 64, 512));
        }
    }
}

/// <summary>
/// The v2 SwiGLU on a decoding step's bf16 rows in one managed pass, against libtorch's silu and product (the same
/// roundings) with the exponential in float64, and against libtorch's own silu.
/// </summary>
public class DecodeSwiGluTests
{
    /// <summary>libtorch's ops with only exp(−a) taken in float64 and rounded to float32, as the kernel takes it.</summary>
    private static Tensor LibtorchWithFloat64Exp(Tensor a, Tensor b)
    {
        using var a32 = a.to(ScalarType.Float32);
        using var e = a32.neg().to(ScalarType.Float64).exp().to(ScalarType.Float32);
        using var silu = a32.div(e.add(1.0)).to(ScalarType.BFloat16);
        return silu.mul(b);
    }

    /// <summary>
    /// Every bfloat16 value (all 65,536 bit patterns) as the gate: bit for bit libtorch's ops with the float64 exponential
    /// (NaN as NaN), and with b = 1 (the silu alone) within one bf16 ulp of libtorch's own silu, whose float32 exp may
    /// round the other way (here: how many differ is reported, and must stay a small fraction).
    /// </summary>
    [SkippableFact]
    public void Apply_EqualsTheLibtorchOpsOnEveryBFloat16()
    {
        Skip.IfNot(System.Runtime.Intrinsics.X86.Avx512F.IsSupported, "needs AVX-512 F (elsewhere the libtorch path runs)");
        const int half = 16384;
        using var a = empty(new long[] { 4, half }, dtype: ScalarType.BFloat16);
        var patterns = new byte[65536 * 2];
        for (int i = 0; i < 65536; i++) BitConverter.TryWriteBytes(patterns.AsSpan(2 * i), (ushort)i);
        a.bytes = patterns;
        using var g = new Generator(11);
        using var b = randn(new long[] { 4, half }, generator: g).mul(3).to(ScalarType.BFloat16);
        using var h = cat(new[] { a, b }, 1).view(4, 1, 2 * half);
        using var noGrad = no_grad();
        Assert.True(DecodeSwiGlu.Applies(h, half, 8L * 2 * half));
        using var fused = DecodeSwiGlu.Apply(h, half);
        Assert.Equal(new long[] { 4, 1, half }, fused.shape);
        using var expected = LibtorchWithFloat64Exp(a, b).view(4, 1, half);
        using var nan = fused.isnan();
        Assert.True(nan.eq(expected.isnan()).all().item<bool>(), "NaN where the reference is not, or the other way");
        Assert.True(fused.masked_fill(nan, 0).bytes.SequenceEqual(expected.masked_fill(nan, 0).bytes), "the fused SwiGLU differs from libtorch's ops");

        // The silu alone (b = 1) against libtorch's silu: at most one bf16 ulp apart, rarely.
        using var unit = ones(new long[] { 4, half }, dtype: ScalarType.BFloat16);
        using var hs = cat(new[] { a, unit }, 1);
        using var silu = DecodeSwiGlu.Apply(hs, half);
        using var libtorch = nn.functional.silu(a);
        var mine = Patterns(silu);
        var theirs = Patterns(libtorch);
        int differing = 0;
        for (int i = 0; i < mine.Length; i++)
        {
            float x = BFloat(mine[i]), y = BFloat(theirs[i]);
            if (float.IsNaN(x) || float.IsNaN(y))
            {
                Assert.True(float.IsNaN(x) && float.IsNaN(y), $"silu of pattern {i}: {x} against libtorch's {y}");
                continue;
            }
            if (x == y) continue;                                                // ±0 alike
            differing++;
            // Same sign, neighbouring patterns: one bf16 ulp.
            Assert.True(Math.Sign(x) == Math.Sign(y) && Math.Abs(mine[i] - theirs[i]) == 1, $"silu of pattern {i}: {x} against libtorch's {y}");
        }
        Assert.True(differing <= 65536 / 1000, $"{differing} of 65,536 silu values differ from libtorch's");
    }

    private static ushort[] Patterns(Tensor t)
    {
        var bytes = t.bytes.ToArray();
        var result = new ushort[bytes.Length / 2];
        for (int i = 0; i < result.Length; i++) result[i] = BitConverter.ToUInt16(bytes, 2 * i);
        return result;
    }

    private static float BFloat(ushort pattern) => BitConverter.UInt32BitsToSingle((uint)pattern << 16);

    [SkippableTheory]
    [InlineData(1, 20)]
    [InlineData(3, 13696)]
    [InlineData(8, 7)]
    public void Apply_HandlesTails(int rows, int half)
    {
        Skip.IfNot(System.Runtime.Intrinsics.X86.Avx512F.IsSupported, "needs AVX-512 F (elsewhere the libtorch path runs)");
        using var g = new Generator((ulong)(rows * half));
        using var h = randn(new long[] { rows, 1, 2 * half }, generator: g).mul(4).to(ScalarType.BFloat16);
        using var noGrad = no_grad();
        using var fused = DecodeSwiGlu.Apply(h, half);
        using var expected = LibtorchWithFloat64Exp(h.narrow(-1, 0, half), h.narrow(-1, half, half));
        Assert.True(fused.bytes.SequenceEqual(expected.bytes));
    }

    [Fact]
    public void Applies_RefusesWhatItCannotRead()
    {
        using var h = ones(new long[] { 1, 1, 64 }, dtype: ScalarType.BFloat16);
        using var noGrad = no_grad();
        Assert.Equal(System.Runtime.Intrinsics.X86.Avx512F.IsSupported, DecodeSwiGlu.Applies(h, 32, 512));
        Assert.False(DecodeSwiGlu.Applies(h, 16, 512));                          // last dimension not 2·half
        Assert.False(DecodeSwiGlu.Applies(h, 32, 63));                           // more values than allowed
        Assert.False(DecodeSwiGlu.Applies(h, 0, 512));
        using var f32 = h.to(ScalarType.Float32);
        Assert.False(DecodeSwiGlu.Applies(f32, 32, 512));
        using var wide = ones(new long[] { 64, 2 }, dtype: ScalarType.BFloat16);
        using var strided = wide.t();
        Assert.False(DecodeSwiGlu.Applies(strided, 32, 512));
        using (enable_grad())
        {
            using var trained = ones(new long[] { 1, 64 }, dtype: ScalarType.BFloat16).requires_grad_();
            Assert.False(DecodeSwiGlu.Applies(trained, 32, 512));
        }
    }
}

/// <summary>The fused RMSNorm, SwiGLU and residuals inside a tiny bf16 v2 model, on and off.</summary>
public class DecodeV2FusionModelTests
{
    [SkippableFact]
    public void FewRowForward_EqualsTheLibtorchOps()
    {
        Skip.IfNot(System.Runtime.Intrinsics.X86.Avx512F.IsSupported, "needs AVX-512 F (elsewhere the libtorch path runs)");
        manual_seed(603);
        var config = TinyGlm.V2(64, 4, 16, 2, ffn: 96);
        using var model = new GlmForCausalLM(config, new GlmBuildOptions(ScalarType.BFloat16));
        // Random RMSNorm weights (the build gives ones), so that the weight's product is exercised.
        using (var noGradInit = no_grad())
        {
            foreach (var (name, p) in model.named_parameters())
                if (name.EndsWith("layernorm.weight", StringComparison.Ordinal)) p.copy_(rand_like(p).add(0.5));
        }
        using var prompt = randint(0, 280, new long[] { 1, 7 });
        using var noGrad = no_grad();
        // The passes do run on this forward's shapes: 7 rows of the hidden size and of dense_h_to_4h's output.
        using (var hidden = ones(new long[] { 7, 1, 64 }, dtype: ScalarType.BFloat16))
        using (var normWeight = ones(64, dtype: ScalarType.BFloat16))
        using (var mlp = ones(new long[] { 7, 1, 192 }, dtype: ScalarType.BFloat16))
        {
            Assert.True(DecodeRmsNorm.Applies(hidden, normWeight, 64, 8 * 64));
            Assert.True(DecodeSwiGlu.Applies(mlp, 96, 8 * 192));
            Assert.True(DecodeResidual.Applies(hidden, hidden, 8 * 64));
        }
        Tensor Logits(bool swiGlu, bool others)
        {
            DecodeSwiGlu.Enabled = swiGlu;
            DecodeRmsNorm.Enabled = DecodeResidual.Enabled = others;
            try
            {
                using var output = model.call(new GlmInput(prompt));
                return output.Logits.detach().clone();
            }
            finally
            {
                DecodeSwiGlu.Enabled = DecodeRmsNorm.Enabled = DecodeResidual.Enabled = true;
            }
        }
        using var libtorch = Logits(false, false);
        using var normsAndResiduals = Logits(false, true);
        using var all = Logits(true, true);
        Assert.True(libtorch.isfinite().all().item<bool>());
        // The RMSNorm and the residuals are libtorch's arithmetic exactly; the SwiGLU too but for its exp (one bf16 ulp
        // of a silu, rarely; none on the dev VM, where the logits come out equal), which the two layers may carry to a
        // few logits: bounded by 2 % of the logits' range. The roundings are the unit tests' business; this bound
        // catches a mis-wired hook (the halves swapped, a residual scaled), which moves the logits far more.
        Assert.True(normsAndResiduals.bytes.SequenceEqual(libtorch.bytes), "the fused RMSNorm or residual changed the logits");
        using var difference = (all.to(ScalarType.Float32) - libtorch.to(ScalarType.Float32)).abs().max();
        using var range = libtorch.to(ScalarType.Float32).abs().max();
        Assert.True(difference.item<float>() <= 0.02f * range.item<float>(), $"the fused SwiGLU moved a logit by {difference.item<float>()}");
    }
}
