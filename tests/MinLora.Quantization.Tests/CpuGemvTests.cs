using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Quantization.Tests;

/// <summary>
/// MinLora's own matrix-vector kernel against the float64 product with the dequantized weight, on shapes that hit
/// every tail: K not a multiple of 16, 32 or 64, N not a multiple of the parallel block, 1/3/8 rows; and the custom
/// autograd function that recomputes the weight in backward.
/// </summary>
public class CpuGemvTests
{
    public static TheoryData<QuantizationFormat, long, long, int> Shapes => new()
    {
        { QuantizationFormat.Int8PerRow, 37, 50, 0 },      // K % 16 != 0
        { QuantizationFormat.Int8PerRow, 5, 1, 0 },        // K = 1: only the scalar tail
        { QuantizationFormat.Int8PerRow, 130, 4100, 0 },   // main loop, 16-wide loop and tail; N over several blocks
        { QuantizationFormat.Int8PerRow, 1000, 96, 0 },    // many blocks
        { QuantizationFormat.Int4Grouped, 37, 96, 32 },    // odd number of 32-column chunks per group
        { QuantizationFormat.Int4Grouped, 19, 256, 128 },
        { QuantizationFormat.Int4Grouped, 67, 512, 256 },
        { QuantizationFormat.Int4Grouped, 300, 192, 64 },
        { QuantizationFormat.Int4Grouped, 40, 4096, 128 },
        { QuantizationFormat.Int4Grouped, 21, 384, 128 },  // three groups of one 128-column quad (the 512-bit loop)
        { QuantizationFormat.Int4Grouped, 13, 640, 64 },   // groups of one 64-column pair: the 256-bit loop
        { QuantizationFormat.Int4Grouped, 23, 2432, 128 }, // 19 groups: vector and scalar zero term, an odd last group
        { QuantizationFormat.Int4Grouped, 9, 4352, 256 },  // 17 groups of two quads
        { QuantizationFormat.Int4PerRowChatGlm, 37, 40, 0 },  // K % 32 != 0: byte tail
        { QuantizationFormat.Int4PerRowChatGlm, 9, 2, 0 },    // K = 2: one byte
        { QuantizationFormat.Int4PerRowChatGlm, 33, 4098, 0 },
        { QuantizationFormat.Int4PerRowChatGlm, 257, 160, 0 },    // 2 pairs of blocks + 32-column tail
        { QuantizationFormat.Int4PerRowChatGlm, 7, 64, 0 },
        { QuantizationFormat.Int4PerRowChatGlm, 11, 456, 0 },     // 3 quads (odd), a last pair and an 8-column tail
        { QuantizationFormat.Int4PerRowChatGlm, 6, 1024, 0 },     // 8 quads, no tail
    };

    /// <summary>
    /// float32 accumulation of K products: the rounding error is at most ~K·2⁻²⁴·Σ|x·w| and typically √K·2⁻²⁴·Σ|x·w|;
    /// 1e-5·Σ|x·w| sits above the typical error for every K here and orders of magnitude below any indexing or
    /// nibble-order mistake, which changes results by O(Σ|x·w|).
    /// </summary>
    /// <remarks>
    /// With <see cref="QuantizedLinearOptions.Int8Activations"/> (CPUs with AVX-512 BW/VL) each activation in the first
    /// ⌊K/64⌋·64 columns is replaced by its int8 rounding, off by at most max|x_block|/254 (32-column blocks), so the
    /// bound gains Σₖ |w_nk|·max|x_block(k)|/254: the exact worst case of that rounding, still far below any layout
    /// mistake. The test also checks the int8 path is really taken (its error exceeds the float32 bound somewhere).
    /// </remarks>
    [SkippableTheory]
    [MemberData(nameof(Shapes))]
    public void Kernel_EqualsFloat64Reference(QuantizationFormat format, long n, long k, int group)
    {
        Skip.IfNot(CpuGemv.IsSupported, "needs AVX-512 F/BW (elsewhere libtorch's kernels run, covered by QuantizedLinearTests)");
        // int8 activations take vpdpbusd on AVX-VNNI CPUs and vpmaddubsw + vpmaddwd elsewhere: both where the CPU has both.
        // Each with the kernels' two-row form (the default) and where it applies also the one-row form.
        var paths = new List<(bool Int8Activations, bool AvxVnni, bool TwoStreams)> { (false, false, true), (true, false, true), (true, false, false) };
        if (System.Runtime.Intrinsics.X86.AvxVnni.IsSupported) paths.Add((true, true, true));
        foreach (var (int8Activations, avxVnni, twoStreams) in paths)
        {
            using var path = new ByteProducts(avxVnni);
            using var streams = new Streams(twoStreams);
            manual_seed(101 + n + k);
            using var linear = nn.Linear(k, n);
            var options = new QuantizedLinearOptions { Int8Activations = int8Activations };
            using var q = QuantizedLinear.FromLinear(linear, format, group == 0 ? 128 : group, options);
            Assert.Equal(QuantizedKernel.CpuGemv, q.Kernel);
            using var deq = q.Dequantize(ScalarType.Float64);
            using var bias = linear.bias!.to(ScalarType.Float64);
            bool vnni = int8Activations && CpuGemv.Int8ActivationsSupported && (format == QuantizationFormat.Int8PerRow
                ? k >= 32
                : k >= 64 && (format == QuantizationFormat.Int4PerRowChatGlm || group % 64 == 0));
            bool exceededFloatBound = false;
            // Activations centred on 0 and shifted by +2: with a shift the block sums Σxq are large, so a wrong offset
            // correction (int8: 128·Σxq, int4: 8·Σxq) shows far beyond the rounding bound.
            foreach (var (rows, shift) in new[] { (1L, 0.0), (3L, 0.0), (8L, 0.0), (3L, 2.0) })
            {
                using var x = randn(rows, k).add(shift);
                using var y = q.call(x);
                Assert.Equal(ScalarType.Float32, y.dtype);
                Assert.Equal(new[] { rows, n }, y.shape);
                using var x64 = x.to(ScalarType.Float64);
                using var reference = x64.matmul(deq.t()).add(bias);
                using var floatBound = x64.abs().matmul(deq.abs().t()).mul(1e-5).add(1e-6);
                using var err = (y.to(ScalarType.Float64) - reference).abs();
                var bound = floatBound;
                if (vnni)
                {
                    long covered = format == QuantizationFormat.Int8PerRow ? k / 32 * 32 : k / 64 * 64; // int8: 32-column blocks
                    using var blockMax = x64.narrow(1, 0, covered).abs().view(rows, covered / 32, 32).amax(new long[] { 2 }, keepdim: true)
                        .expand(rows, covered / 32, 32).reshape(rows, covered).div(254.0);
                    using var rounding = blockMax.matmul(deq.narrow(1, 0, covered).abs().t());
                    bound = floatBound.add(rounding);
                    exceededFloatBound |= (err - floatBound).max().item<double>() > 0;
                }
                var worst = (err - bound).max().item<double>();
                Assert.True(worst <= 0, $"{format} {n}x{k} g{group} rows {rows} int8 activations {int8Activations}, two streams {twoStreams}: error exceeds the bound by {worst}");
            }
            if (vnni) Assert.True(exceededFloatBound, "the int8-activation kernel was expected to run (its rounding shows)");
        }
    }

    /// <summary>
    /// int4 × int8 through <c>vpdpbusd</c> and through <c>vpmaddubsw</c> + <c>vpmaddwd</c>: the same int32 sums (no
    /// nibble pair can saturate 16 bits), so bit-identical outputs, on every loop that differs between the two forms
    /// (the 512-bit quads are the same code in both): a ChatGLM row's last odd 64-column pair, with and without a byte
    /// tail, and grouped rows in groups of 64 columns (one pair per group; groups of 128 and 256 take the quads).
    /// </summary>
    [SkippableTheory]
    [InlineData(QuantizationFormat.Int4PerRowChatGlm, 11L, 456L, 0)]     // 3 quads, a last pair, an 8-column tail
    [InlineData(QuantizationFormat.Int4PerRowChatGlm, 33L, 4162L, 0)]    // ChatGLM's 32 quads + 1 pair + 2 columns
    [InlineData(QuantizationFormat.Int4Grouped, 13L, 640L, 64)]
    [InlineData(QuantizationFormat.Int4Grouped, 21L, 192L, 64)]
    public void Int4ByteProducts_AreTheSameWithAndWithoutAvxVnni(QuantizationFormat format, long n, long k, int group)
    {
        Skip.IfNot(CpuGemv.Int8ActivationsSupported && System.Runtime.Intrinsics.X86.AvxVnni.IsSupported, "needs both forms: AVX-512 BW/VL and AVX-VNNI");
        manual_seed(104);
        using var linear = nn.Linear(k, n);
        using var q = QuantizedLinear.FromLinear(linear, format, group == 0 ? 128 : group);
        // Activations shifted to mostly one sign: each block's largest quantizes to ±127 and the 16-bit pair sums of
        // large nibbles get close to their bound of 2·15·127.
        using var x = randn(3, k).add(3);
        Tensor a, b;
        using (new ByteProducts(true)) a = q.call(x);
        using (new ByteProducts(false)) b = q.call(x);
        Assert.True(T.Identical(a, b), "the two forms of the int4 × int8 products differ");
        a.Dispose();
        b.Dispose();
    }

    /// <summary>
    /// The int8 code −128, which <see cref="QuantizedLinear.FromLinear"/> never makes (it clamps to ±127) but a loaded
    /// checkpoint may hold, against activations at ±127 after quantization: without AVX-VNNI its magnitude is the
    /// unsigned operand (128, at most 2·128·127 per 16-bit pair: no saturation), with it the +128 flip makes it 0. Each
    /// 32-column block's largest |x| is 1, so the int8 activations are exact and float32 rounding is the only error.
    /// </summary>
    [SkippableFact]
    public unsafe void Int8Weights_AtMinus128_AreExactInEveryForm()
    {
        Skip.IfNot(CpuGemv.Int8ActivationsSupported, "needs AVX-512 BW/VL");
        const int n = 3, k = 96 + 5;   // three 32-column blocks and a float32 tail
        var rng = new Random(7);
        var w = new sbyte[n * k];
        var x = new float[k];
        for (int c = 0; c < k; c++)
        {
            w[c] = -128;                                                 // a row of −128
            w[k + c] = c % 2 == 0 ? (sbyte)-128 : (sbyte)127;            // the extremes alternating
            w[2 * k + c] = (sbyte)rng.Next(-128, 128);
            x[c] = c % 3 == 0 ? -1f : 1f;
        }
        float[] scales = [0.5f, 0.25f, 1f / 127];
        var forms = new List<bool> { false };
        if (System.Runtime.Intrinsics.X86.AvxVnni.IsSupported) forms.Add(true);
        foreach (bool avxVnni in forms)
        {
            using var form = new ByteProducts(avxVnni);
            var y = new float[n];
            fixed (float* px = x, ps = scales, py = y)
            fixed (sbyte* pw = w)
                CpuGemv.Int8(px, 1, k, pw, ps, null, py, n, int8Activations: true);
            for (int r = 0; r < n; r++)
            {
                double expected = 0, magnitude = 0;
                for (int c = 0; c < k; c++)
                {
                    expected += (double)x[c] * w[r * k + c] * scales[r];
                    magnitude += Math.Abs((double)x[c] * w[r * k + c] * scales[r]);
                }
                Assert.True(Math.Abs(y[r] - expected) <= 1e-6 * magnitude, $"row {r}, AVX-VNNI {avxVnni}: {y[r]} against {expected}");
            }
        }
    }

    /// <summary>The two-row form of the kernels gives each row exactly what the one-row form gives it (the same terms in
    /// the same order): bit-identical outputs, on N odd (a row left for the one-row loop) and even, K with tails.</summary>
    [SkippableTheory]
    [InlineData(QuantizationFormat.Int4PerRowChatGlm, 37L, 4162L, true)]
    [InlineData(QuantizationFormat.Int4PerRowChatGlm, 64L, 456L, false)]
    [InlineData(QuantizationFormat.Int8PerRow, 37L, 4100L, false)]
    [InlineData(QuantizationFormat.Int8PerRow, 50L, 96L, true)]
    public void TwoStreams_GiveTheOneRowResults(QuantizationFormat format, long n, long k, bool hasBias)
    {
        Skip.IfNot(CpuGemv.Int8ActivationsSupported, "needs AVX-512 BW/VL");
        manual_seed(106);
        using var linear = nn.Linear(k, n, hasBias);
        using var q = QuantizedLinear.FromLinear(linear, format);
        using var bf16 = nn.Linear(k, n, hasBias, dtype: ScalarType.BFloat16);
        using var x = randn(3, k).add(1);
        using var noGrad = no_grad();
        // Both byte-product forms where the CPU has both.
        var forms = new List<bool> { false };
        if (System.Runtime.Intrinsics.X86.AvxVnni.IsSupported) forms.Add(true);
        foreach (bool avxVnni in forms)
        {
            using var form = new ByteProducts(avxVnni);
            Tensor a, b, c, d;
            using (new Streams(true))
            {
                a = q.call(x);
                c = CpuLinear.Forward(bf16, x);
            }
            using (new Streams(false))
            {
                b = q.call(x);
                d = CpuLinear.Forward(bf16, x);
            }
            Assert.True(T.Identical(a, b), $"{format}, AVX-VNNI {avxVnni}: the two-row form differs from the one-row form");
            Assert.True(T.Identical(c, d), "bf16: the two-row form differs from the one-row form");
            foreach (var t in new[] { a, b, c, d }) t.Dispose();
        }
    }

    /// <summary>Selects the bf16 kernel's bf16-pair (default) or float32 activation loop for a scope.</summary>
    private sealed class Bf16Activations : IDisposable
    {
        private readonly bool _previous = CpuGemv.Bf16Activations;

        public Bf16Activations(bool pairs) => CpuGemv.Bf16Activations = pairs;

        public void Dispose() => CpuGemv.Bf16Activations = _previous;
    }

    /// <summary>Selects the kernels' two-row (default) or one-row form for a scope.</summary>
    private sealed class Streams : IDisposable
    {
        private readonly bool _previous = CpuGemv.TwoStreams;

        public Streams(bool two) => CpuGemv.TwoStreams = two;

        public void Dispose() => CpuGemv.TwoStreams = _previous;
    }

    /// <summary>Selects the byte-product form for a scope and restores the CPU's default after.</summary>
    private sealed class ByteProducts : IDisposable
    {
        private readonly bool _previous = CpuGemv.UseAvxVnni;

        public ByteProducts(bool avxVnni) => CpuGemv.UseAvxVnni = avxVnni;

        public void Dispose() => CpuGemv.UseAvxVnni = _previous;
    }

    [SkippableFact]
    public void BatchedInput_KeepsItsShapeAndType()
    {
        Skip.IfNot(CpuGemv.IsSupported, "needs AVX-512 F/BW (elsewhere libtorch's kernels run, covered by QuantizedLinearTests)");
        manual_seed(102);
        using var linear = nn.Linear(64, 48);
        using var q = QuantizedLinear.FromLinear(linear, QuantizationFormat.Int4Grouped, 32);
        using var x = randn(2, 3, 64).to(ScalarType.BFloat16);
        using var y = q.call(x);
        Assert.Equal(new long[] { 2, 3, 48 }, y.shape);
        Assert.Equal(ScalarType.BFloat16, y.dtype);
        using var flat = q.call(x.reshape(6, 64));
        Assert.True(T.Identical(flat.reshape(2, 3, 48), y));
    }

    [SkippableFact]
    public void EmptySkeleton_UsesTheKernelRightAway_AndSeesLoadedValues()
    {
        Skip.IfNot(CpuGemv.IsSupported, "needs AVX-512 F/BW (elsewhere libtorch's kernels run, covered by QuantizedLinearTests)");
        manual_seed(103);
        using var linear = nn.Linear(96, 40);
        using var source = QuantizedLinear.FromLinear(linear, QuantizationFormat.Int4Grouped, 32);
        using var skeleton = QuantizedLinear.Empty(96, 40, true, QuantizationFormat.Int4Grouped, 32);
        Assert.Equal(QuantizedKernel.CpuGemv, skeleton.Kernel);
        // Values written into the buffers directly (no RefreshKernel) are used: nothing is derived from them.
        using (no_grad())
        {
            foreach (var (name, t) in source.named_buffers()) skeleton.named_buffers().Single(b => b.name == name).buffer.copy_(t);
            skeleton.Bias!.copy_(source.Bias!);
        }
        using var x = randn(1, 96);
        using var a = source.call(x);
        using var b = skeleton.call(x);
        Assert.True(T.Identical(a, b));
    }

    /// <summary>
    /// Backward through the custom function: dL/dx = dL/dy·dequant(W) with bf16 compute (the default), against float64
    /// within bf16 rounding of the weight and of dL/dy (2⁻⁸ relative each, summed over K terms of either sign: 2 % of
    /// the largest gradient leaves margin and still catches a transposed or missing weight).
    /// </summary>
    [Theory]
    [InlineData(QuantizationFormat.Int8PerRow, 2L)]
    [InlineData(QuantizationFormat.Int4Grouped, 2L)]
    [InlineData(QuantizationFormat.Int4PerRowChatGlm, 2L)]
    [InlineData(QuantizationFormat.Int8PerRow, 64L)]
    public void Backward_RecomputesTheWeight(QuantizationFormat format, long rows)
    {
        manual_seed(104);
        using var linear = nn.Linear(64, 96);
        using var q = QuantizedLinear.FromLinear(linear, format, 32);
        using var x = randn(rows, 64).requires_grad_();
        using var g = randn(rows, 96);
        using var y = q.call(x);
        Assert.True(y.requires_grad);
        y.backward(new[] { g });
        using var expected = g.to(ScalarType.Float64).matmul(q.Dequantize(ScalarType.Float64));
        var err = (x.grad!.to(ScalarType.Float64) - expected).abs().max().item<double>();
        var mag = expected.abs().max().item<double>();
        Assert.True(err <= 0.02 * mag, $"{format} rows {rows}: gradient error {err} vs magnitude {mag}");
        // The forward value under autograd is the no-grad value.
        using (no_grad())
        {
            using var plain = q.call(x.detach());
            Assert.True(T.Identical(plain, y.detach()));
        }
    }

    /// <summary>The bf16 kernel for plain Linear layers: exact bf16 weights, float32 accumulation (the float32 bound above).</summary>
    [Theory]
    [InlineData(37, 50)]
    [InlineData(5, 1)]
    [InlineData(130, 4100)]
    [InlineData(64, 32)]
    [InlineData(40, 96)]    // one 64-column step, then one 32-column chunk
    [InlineData(17, 200)]   // three 64-column steps and an 8-column tail
    public void BFloat16Linear_EqualsFloat64Reference(long n, long k)
    {
        manual_seed(105 + n);
        using var linear = nn.Linear(k, n, dtype: ScalarType.BFloat16);
        using var w = linear.weight!.to(ScalarType.Float64);
        using var bias = linear.bias!.to(ScalarType.Float64);
        foreach (var (rows, twoStreams) in new[] { (1L, true), (3L, true), (8L, true), (1L, false), (3L, false) })
        {
            using var streams = new Streams(twoStreams);
            using var x = randn(rows, k);
            using var noGrad = no_grad(); // the weights want gradients: the kernel runs for inference only
            using var y = CpuLinear.Forward(linear, x);
            Assert.Equal(ScalarType.Float32, y.dtype);
            using var x64 = x.to(ScalarType.Float64);
            using var reference = x64.matmul(w.t()).add(bias);
            using var bound = x64.abs().matmul(w.abs().t()).mul(1e-5).add(1e-6);
            var worst = ((y.to(ScalarType.Float64) - reference).abs() - bound).max().item<double>();
            Assert.True(worst <= 0, $"{n}x{k} rows {rows}: error exceeds the float32 bound by {worst}");
        }
    }

    /// <summary>
    /// bf16 activations (a bf16 input, every value exactly a bfloat16) take the loop on bfloat16 pairs: the same terms
    /// summed in the same order as the float32-activation loop, so the outputs are bit-identical to it, and within the
    /// float32 bound of the float64 reference; both stream forms, 1/3/8 rows, K with and without 64- and 32-column tails.
    /// </summary>
    [SkippableTheory]
    [InlineData(37, 50)]
    [InlineData(130, 4100)]
    [InlineData(40, 96)]
    [InlineData(17, 200)]
    [InlineData(33, 4096)]
    [InlineData(21, 33)]      // odd K: the rows of activations start at odd offsets
    [InlineData(9, 4097)]
    public void BFloat16Linear_Bf16ActivationsGiveTheFloat32Results(long n, long k)
    {
        Skip.IfNot(CpuGemv.IsSupported, "needs AVX-512 F/BW");
        manual_seed(107 + n);
        using var linear = nn.Linear(k, n, dtype: ScalarType.BFloat16);
        using var w = linear.weight!.to(ScalarType.Float64);
        using var bias = linear.bias!.to(ScalarType.Float64);
        using var noGrad = no_grad();
        foreach (var (rows, twoStreams) in new[] { (1L, true), (3L, true), (8L, true), (1L, false), (3L, false) })
        {
            using var streams = new Streams(twoStreams);
            using var x = randn(rows, k).to(ScalarType.BFloat16).to(ScalarType.Float32);   // float32 holding bf16 values
            Tensor pairs, wide;
            using (new Bf16Activations(true)) pairs = CpuLinear.Forward(linear, x);
            using (new Bf16Activations(false)) wide = CpuLinear.Forward(linear, x);
            using (pairs)
            using (wide)
            {
                Assert.True(T.Identical(pairs, wide), $"{n}x{k} rows {rows}: the bf16-pair loop differs from the float32 loop");
                using var x64 = x.to(ScalarType.Float64);
                using var reference = x64.matmul(w.t()).add(bias);
                using var bound = x64.abs().matmul(w.abs().t()).mul(1e-5).add(1e-6);
                var worst = ((pairs.to(ScalarType.Float64) - reference).abs() - bound).max().item<double>();
                Assert.True(worst <= 0, $"{n}x{k} rows {rows}: error exceeds the float32 bound by {worst}");
            }
        }
    }

    /// <summary>The pair loop runs exactly when every activation is a bfloat16 (it reports whether it ran).</summary>
    [SkippableFact]
    public unsafe void BFloat16Pairs_RunsOnBFloat16ActivationsOnly()
    {
        Skip.IfNot(CpuGemv.IsSupported, "needs AVX-512 F/BW");
        const int rows = 2, k = 67, n = 5;
        var random = new Random(109);
        float[] x = new float[rows * k];
        for (int i = 0; i < x.Length; i++) x[i] = BitConverter.UInt32BitsToSingle(BitConverter.SingleToUInt32Bits((float)random.NextDouble() - 0.5f) & 0xFFFF0000u);
        ushort[] w = new ushort[n * k];
        for (int i = 0; i < w.Length; i++) w[i] = (ushort)(BitConverter.SingleToUInt32Bits((float)random.NextDouble() - 0.5f) >> 16);
        float[] y = new float[rows * n];
        fixed (float* px = x, py = y)
        fixed (ushort* pw = w)
        {
            Assert.True(CpuGemv.BFloat16Pairs(px, rows, k, pw, null, py, n));
            Assert.Contains(y, v => v != 0);
            x[rows * k - 1] += 1e-3f;   // no longer a bfloat16 (the scalar tail)
            Array.Clear(y);
            Assert.False(CpuGemv.BFloat16Pairs(px, rows, k, pw, null, py, n));
            Assert.All(y, v => Assert.Equal(0f, v));   // refused before any work
            x[rows * k - 1] = 0.5f;
            x[3] = BitConverter.UInt32BitsToSingle(BitConverter.SingleToUInt32Bits(x[3]) | 1);   // a vector lane
            Assert.False(CpuGemv.BFloat16Pairs(px, rows, k, pw, null, py, n));
        }
    }

    /// <summary>
    /// One activation that is not a bfloat16, wherever it sits (first column, a vector lane, the scalar tail, the last
    /// row), keeps the whole call on float32 activations: truncating it to a bfloat16 would change the result.
    /// </summary>
    [SkippableFact]
    public void BFloat16Linear_Float32ActivationsAreNotTruncated()
    {
        Skip.IfNot(CpuGemv.IsSupported, "needs AVX-512 F/BW");
        manual_seed(108);
        const long k = 100, rows = 3;   // 300 values: 18 vectors of 16 and a 12-value tail
        using var linear = nn.Linear(k, 29, dtype: ScalarType.BFloat16);
        using var noGrad = no_grad();
        foreach (long at in new[] { 0L, 37L, 290L, rows * k - 1 })
        {
            using var exact = randn(rows, k).to(ScalarType.BFloat16).to(ScalarType.Float32);
            float[] values = exact.data<float>().ToArray();
            values[at] += 1e-3f * (1 + MathF.Abs(values[at]));
            using var x = tensor(values).reshape(rows, k);
            Tensor pairs, wide;
            using (new Bf16Activations(true)) pairs = CpuLinear.Forward(linear, x);
            using (new Bf16Activations(false)) wide = CpuLinear.Forward(linear, x);
            using (pairs)
            using (wide)
                Assert.True(T.Identical(pairs, wide), $"a float32 activation at {at} was rounded to bf16");
        }
    }

    [Fact]
    public void BFloat16Linear_FallsBackWhereTheKernelDoesNotApply()
    {
        manual_seed(106);
        using var linear = nn.Linear(64, 48, dtype: ScalarType.BFloat16);
        // Many rows, gradients wanted, float32 weights: the module's own forward (identical to call()).
        using var many = randn(9, 64).to(ScalarType.BFloat16);
        Assert.True(T.Identical(CpuLinear.Forward(linear, many), linear.call(many)));
        using var x = randn(2, 64).to(ScalarType.BFloat16).requires_grad_();
        using var y = CpuLinear.Forward(linear, x);
        Assert.True(y.requires_grad);
        y.sum().backward();
        Assert.NotNull(x.grad);
        using var f32 = nn.Linear(64, 48);
        using var one = randn(1, 64);
        Assert.True(T.Identical(CpuLinear.Forward(f32, one), f32.call(one)));
        // A batched bf16 input keeps its shape and type through the kernel.
        using var batched = randn(2, 1, 64).to(ScalarType.BFloat16);
        using var noGrad = no_grad();
        using var out3 = CpuLinear.Forward(linear, batched);
        using var expected3 = linear.call(batched);
        Assert.True((out3.to(ScalarType.Float32) - expected3.to(ScalarType.Float32)).abs().max().item<float>() <= 0.02f * expected3.to(ScalarType.Float32).abs().max().item<float>());
        Assert.Equal(new long[] { 2, 1, 48 }, out3.shape);
        Assert.Equal(ScalarType.BFloat16, out3.dtype);
    }

    [Fact]
    public void LimitOpenMpSpinning_RefusesOnceLibtorchIsLoaded()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => CpuThreads.LimitOpenMpSpinning(-1));
        using var loaded = ones(1); // libtorch (and its OpenMP runtime) is in the process now
        // Too late to change libgomp's setting (or an explicit setting is left alone): it must say so.
        Assert.False(CpuThreads.LimitOpenMpSpinning());
    }
}
