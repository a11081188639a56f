using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MinLora.Quantization.Tests;

/// <summary>The layer: kernel selection, kernel vs reference, swapping, checkpoints, memory, LoRA on top.</summary>
public class QuantizedLinearTests
{
    public static TheoryData<QuantizationFormat, long, long, int, QuantizedKernel> KernelCases => new()
    {
        { QuantizationFormat.Int8PerRow, 64, 256, 128, QuantizedKernel.Int8Pack },
        { QuantizationFormat.Int8PerRow, 37, 64, 128, QuantizedKernel.Int8Pack },
        { QuantizationFormat.Int8PerRow, 37, 50, 128, QuantizedKernel.Dequantize },     // K % 16 != 0: libtorch's CPU kernel is wrong there
        { QuantizationFormat.Int4Grouped, 64, 256, 128, QuantizedKernel.Int4PackCpu },
        { QuantizationFormat.Int4Grouped, 48, 64, 32, QuantizedKernel.Int4PackCpu },
        { QuantizationFormat.Int4Grouped, 40, 64, 32, QuantizedKernel.Dequantize },     // N % 16 != 0: the CPU kernel refuses
        { QuantizationFormat.Int4PerRowChatGlm, 64, 256, 0, QuantizedKernel.Int4PackCpu },
        { QuantizationFormat.Int4PerRowChatGlm, 32, 40, 0, QuantizedKernel.Dequantize }, // K = 40 fits no group size
    };

    /// <summary>
    /// libtorch's kernels (chosen when the managed kernel is switched off, as on CPUs without AVX-512/AVX2) equal the
    /// float64 reference within 1 % of the largest output (bf16 activations and outputs, bf16 scales), and the plan
    /// falls back with a reason exactly where libtorch's kernels are known not to apply.
    /// </summary>
    [Theory]
    [MemberData(nameof(KernelCases))]
    public void LibtorchKernel_EqualsDequantizeThenMatmul(QuantizationFormat format, long n, long k, int group, QuantizedKernel expected)
    {
        manual_seed(42);
        using var linear = nn.Linear(k, n);
        using var q = QuantizedLinear.FromLinear(linear, format, group == 0 ? 128 : group, new QuantizedLinearOptions { CpuGemvMaxRows = 0 });
        Assert.Equal(expected, q.Kernel);
        Assert.Equal(expected == QuantizedKernel.Dequantize, !string.IsNullOrEmpty(q.KernelFallbackReason));
        foreach (var rows in new[] { 1L, 3L, 40L })
        {
            using var x = randn(rows, k).to(ScalarType.BFloat16).to(ScalarType.Float32);
            using var y = q.call(x);
            using var reference = x.to(ScalarType.Float64).matmul(q.Dequantize(ScalarType.Float64).t()).add(linear.bias!.to(ScalarType.Float64));
            var err = (y.to(ScalarType.Float64) - reference).abs().max().item<double>();
            var mag = reference.abs().max().item<double>();
            Assert.True(err <= 0.01 * mag, $"{format} {n}x{k} rows {rows} ({q.Kernel}): max error {err} vs magnitude {mag}");
        }
        // A device or dtype change rebuilds the plan; the kernel form is counted in the size.
        if (expected is QuantizedKernel.Int4PackCpu) Assert.True(q.GetSizeInBytes() > q.QuantizedWeight.Weight.numel(), "the packed copy is counted");
    }

    /// <summary>
    /// The fused kernel equals x·dequant(W)ᵀ + b computed in float64 from the same bf16 inputs, within bf16 output
    /// rounding (2⁻⁸ relative) plus bf16 rounding of the scales (ChatGLM's are float16): 1 % of the largest output.
    /// </summary>
    [Theory]
    [MemberData(nameof(KernelCases))]
    public void Kernel_EqualsDequantizeThenMatmul(QuantizationFormat format, long n, long k, int group, QuantizedKernel expected)
    {
        manual_seed(41);
        using var linear = nn.Linear(k, n);
        using var q = QuantizedLinear.FromLinear(linear, format, group == 0 ? 128 : group);
        // On AVX-512 CPUs MinLora's own kernel handles every shape; elsewhere libtorch's kernels (or the fallback).
        if (CpuGemv.IsSupported) expected = QuantizedKernel.CpuGemv;
        Assert.Equal(expected, q.Kernel);
        if (expected == QuantizedKernel.Dequantize) Assert.False(string.IsNullOrEmpty(q.KernelFallbackReason));
        foreach (var rows in new[] { 1L, 3L, 8L, 40L })
        {
            using var x = randn(rows, k).to(ScalarType.BFloat16).to(ScalarType.Float32);
            using var y = q.call(x);
            Assert.Equal(ScalarType.Float32, y.dtype);
            using var deq = q.Dequantize(ScalarType.Float64);
            using var reference = x.to(ScalarType.Float64).matmul(deq.t()).add(linear.bias!.to(ScalarType.Float64));
            var err = (y.to(ScalarType.Float64) - reference).abs().max().item<double>();
            var mag = reference.abs().max().item<double>();
            Assert.True(err <= 0.01 * mag, $"{format} {n}x{k} rows {rows}: max error {err} vs magnitude {mag}");
        }
    }

    [Fact]
    public void Float32ComputeDtype_UsesTheExactDequantizePath()
    {
        manual_seed(42);
        using var linear = nn.Linear(64, 32);
        using var q = QuantizedLinear.FromLinear(linear, QuantizationFormat.Int8PerRow, options: new QuantizedLinearOptions { ComputeDtype = ScalarType.Float32 });
        Assert.Equal(QuantizedKernel.Dequantize, q.Kernel);
        using var x = randn(5, 64);
        using var y = q.call(x);
        using var reference = x.to(ScalarType.Float64).matmul(q.Dequantize(ScalarType.Float64).t()).add(linear.bias!.to(ScalarType.Float64));
        Assert.True((y.to(ScalarType.Float64) - reference).abs().max().item<double>() < 1e-5);
    }

    [Fact]
    public void GradientsFlowToTheInput()
    {
        manual_seed(43);
        using var linear = nn.Linear(64, 32);
        using var q = QuantizedLinear.FromLinear(linear, QuantizationFormat.Int4Grouped, 32, new QuantizedLinearOptions { ComputeDtype = ScalarType.Float32 });
        using var x = randn(3, 64).requires_grad_();
        q.call(x).sum().backward();
        // d(sum(x Wᵀ + b))/dx = column sums of W.
        using var expected = q.Dequantize().sum(dim: 0L).expand(3, 64);
        Assert.Equal(ScalarType.Float32, expected.dtype);
        Assert.Equal(ScalarType.Float32, x.grad!.dtype);
        var gradErr = (x.grad! - expected).abs().max().item<float>();
        Assert.True(gradErr < 1e-4, $"input gradient off by {gradErr}: {string.Join(",", x.grad![0].data<float>().ToArray().Take(4))} vs {string.Join(",", expected[0].data<float>().ToArray().Take(4))}");
        Assert.DoesNotContain(q.parameters(), p => p.requires_grad);
    }

    [Fact]
    public void FormatFromBits_IsTheOneRule_AndQuantizeTakesAFormat()
    {
        Assert.Equal(QuantizationFormat.Int8PerRow, QuantizationFormats.FromBits(8, QuantizationFormat.Int4Grouped));
        Assert.Equal(QuantizationFormat.Int4PerRowChatGlm, QuantizationFormats.FromBits(4, QuantizationFormat.Int4PerRowChatGlm));
        Assert.Equal(QuantizationFormat.Int4Grouped, QuantizationFormats.FromBits(4, QuantizationFormat.Int4Grouped));
        Assert.Throws<ArgumentOutOfRangeException>(() => QuantizationFormats.FromBits(3, QuantizationFormat.Int4Grouped));
        Assert.Throws<ArgumentException>(() => QuantizationFormats.FromBits(4, QuantizationFormat.Int8PerRow));
        Assert.Equal(new[] { 8, 4, 4 }, new[] { QuantizationFormat.Int8PerRow, QuantizationFormat.Int4Grouped, QuantizationFormat.Int4PerRowChatGlm }.Select(f => f.Bits()));

        manual_seed(46);
        using var byBits = new GlmLike();
        using var byFormat = new GlmLike();
        byFormat.load_state_dict(byBits.state_dict());
        var a = byBits.Quantize(4, new QuantizeOptions { Int4Format = QuantizationFormat.Int4PerRowChatGlm });
        var b = byFormat.Quantize(QuantizationFormat.Int4PerRowChatGlm);
        Assert.Equal(a, b);
        Assert.All(byFormat.modules().OfType<QuantizedLinear>(), q => Assert.Equal(QuantizationFormat.Int4PerRowChatGlm, q.Format));
        var sa = byBits.state_dict();
        foreach (var (k, t) in byFormat.state_dict()) Assert.True(t.eq(sa[k]).all().item<bool>(), k);
        Assert.Throws<ArgumentOutOfRangeException>(() => new GlmLike().Quantize((QuantizationFormat)99));
    }

    [Theory]
    [InlineData(QuantizationFormat.Int8PerRow)]
    [InlineData(QuantizationFormat.Int4PerRowChatGlm)]
    public void InputGradient_OfAPermutedOutput_IsGradientTimesW(QuantizationFormat format)
    {
        // ChatGLM's head: [s, b, K] → [s, b, N], then permute(1, 0, 2): the gradient that comes back is a
        // non-contiguous [s, b, N] (the case that made libtorch's matmul expand W per position).
        manual_seed(45);
        using var linear = nn.Linear(48, 80, hasBias: false);
        using var q = QuantizedLinear.FromLinear(linear, format, options: new QuantizedLinearOptions { ComputeDtype = ScalarType.Float32 });
        using var x = randn(7, 3, 48).requires_grad_();
        using var r = randn(3, 7, 80);
        (q.call(x).permute(1, 0, 2).contiguous() * r).sum().backward();
        // d/dx Σ r·(x Wᵀ) = r (back in [s, b, N]) · W, in float64.
        using var expected = r.permute(1, 0, 2).to(ScalarType.Float64).matmul(q.Dequantize(ScalarType.Float64));
        Assert.Equal(new long[] { 7, 3, 48 }, x.grad!.shape);
        double err = (x.grad!.to(ScalarType.Float64) - expected).abs().max().item<double>();
        // float32 products of 80 terms of size ~3: ~1e-5.
        Assert.True(err < 1e-4, $"input gradient off by {err}");
    }

    [Theory]
    [InlineData(8, 0.03)]
    [InlineData(4, 0.2)]
    public void Quantize_SwapsChatGlmProjections_AndOutputsStayClose(int bits, double bound)
    {
        manual_seed(44);
        using var model = new GlmLike();
        using var ids = randint(0, 40, new long[] { 2, 5 });
        using var reference = model.call(ids);
        var floatBytes = model.GetSizeInBytes();
        var swapped = model.Quantize(bits, new QuantizeOptions { GroupSize = 32 });
        Assert.Equal(8, swapped.Count);
        Assert.Contains("layers.1.mlp.dense_4h_to_h", swapped);
        Assert.DoesNotContain(swapped, p => p.Contains("lm_head", StringComparison.Ordinal) || p.Contains("embeddings", StringComparison.Ordinal));
        Assert.IsType<Linear>(model.named_modules().Single(m => m.name == "lm_head").module);
        using var y = model.call(ids);
        // Relative output error: int8 steps are max|w|/127 (rms error ≈ 0.7 % of the weights' spread, plus bf16
        // activations); group-wise int4 steps are range/15 (≈ 9 %). The bounds leave ~3x margin.
        var rel = T.RelErr(y, reference);
        Assert.True(rel < bound, $"{bits}-bit relative error {rel}");
        Assert.True(rel > 1e-4, "quantization must change something, or the swap did not happen");
        Assert.True(model.GetSizeInBytes() < floatBytes * (bits == 8 ? 0.45 : 0.4), "the quantized model must be smaller");
    }

    [Theory]
    [InlineData(8, QuantizationFormat.Int4Grouped)]
    [InlineData(4, QuantizationFormat.Int4Grouped)]
    [InlineData(4, QuantizationFormat.Int4PerRowChatGlm)]
    public void QuantizedStateDict_LoadsIntoAMetaSkeleton(int bits, QuantizationFormat int4)
    {
        manual_seed(45);
        var options = new QuantizeOptions { GroupSize = 32, Int4Format = int4 };
        using var source = new GlmLike();
        source.Quantize(bits, options);
        var sd = source.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.clone());
        Assert.Equal(bits == 8 || int4 == QuantizationFormat.Int4PerRowChatGlm ? ScalarType.Int8 : ScalarType.Byte, sd["layers.0.attention.query_key_value.weight"].dtype);
        Assert.Contains("layers.0.attention.query_key_value.weight_scale", sd.Keys);
        Assert.Contains("layers.0.attention.query_key_value.bias", sd.Keys);

        // The transformer blocks are built on the meta device (no memory); quantizing them allocates only the
        // quantized buffers, on the CPU, ready to be filled.
        using var skeleton = new GlmLike(blockDevice: new Device(DeviceType.META));
        Assert.Contains(skeleton.parameters(), p => p.device_type == DeviceType.META);
        skeleton.Quantize(bits, options);
        Assert.DoesNotContain(skeleton.parameters(), p => p.device_type == DeviceType.META);
        Assert.All(skeleton.named_buffers(), b => Assert.Equal(DeviceType.CPU, b.buffer.device_type));
        skeleton.LoadQuantizedStateDict(sd);
        using var ids = randint(0, 40, new long[] { 2, 5 });
        using var a = source.call(ids);
        using var b = skeleton.call(ids);
        Assert.True(T.Identical(a, b));

        var bad = new Dictionary<string, Tensor>(sd) { ["layers.0.attention.dense.weight_scale"] = zeros(3) };
        var ex = Assert.Throws<StateDictMismatchException>(() => skeleton.LoadQuantizedStateDict(bad));
        Assert.Contains("layers.0.attention.dense.weight_scale", ex.Message, StringComparison.Ordinal);
        using (var allMeta = new GlmLike(device: new Device(DeviceType.META)))
        {
            allMeta.Quantize(bits, options);
            var metaEx = Assert.Throws<ArgumentException>(() => allMeta.LoadQuantizedStateDict(sd));
            Assert.Contains("meta device", metaEx.Message, StringComparison.Ordinal);
        }
        sd.Remove("lm_head.weight");
        Assert.Contains("lm_head.weight", Assert.Throws<StateDictMismatchException>(() => skeleton.LoadQuantizedStateDict(sd)).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Quantize_BadArguments_ThrowAndLeaveTheModelUnchanged()
    {
        using var model = new GlmLike();
        Assert.Throws<ArgumentOutOfRangeException>(() => model.Quantize(3));
        Assert.Throws<ArgumentException>(() => model.Quantize(4, new QuantizeOptions { GroupSize = 48 }));
        // 4·64 = 256 and 64 are divisible by 128 only for dense_4h_to_h: the first mismatch stops everything.
        var ex = Assert.Throws<ArgumentException>(() => model.Quantize(4, new QuantizeOptions { GroupSize = 128 }));
        Assert.Contains("does not divide in_features 64", ex.Message, StringComparison.Ordinal);
        Assert.Throws<ArgumentException>(() => model.Quantize(8, new QuantizeOptions { TargetModules = new[] { "nothing_like_this" } }));
        Assert.Throws<ArgumentException>(() => model.Quantize(8, new QuantizeOptions { TargetModules = new[] { "word_embeddings" } }));
        Assert.Empty(model.modules().OfType<QuantizedLinear>());
    }

    [Fact]
    public void Quantize_CancelledThroughProgress_LeavesTheModelAsItWas()
    {
        manual_seed(47);
        using var model = new GlmLike();
        var before = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.clone());
        var progress = new ThrowingProgress(throwAt: 3);
        Assert.Throws<OperationCanceledException>(() => model.Quantize(8, new QuantizeOptions { Progress = progress }));
        Assert.Equal(3, progress.Reports);
        Assert.Empty(model.modules().OfType<QuantizedLinear>());
        var after = model.state_dict();
        Assert.Equal(before.Keys, after.Keys);
        foreach (var (k, t) in before) Assert.True(t.equal(after[k]).all().item<bool>(), k);
    }

    private sealed class ThrowingProgress(int throwAt) : IProgress<(int Done, int Total)>
    {
        public int Reports { get; private set; }

        public void Report((int Done, int Total) value)
        {
            if (++Reports == throwAt) throw new OperationCanceledException("cancelled by the caller");
        }
    }

    [Fact]
    public void Quantize_NonFloatWeights_ThrowsNamingTheLayer()
    {
        using var model = new GlmLike();
        var qkv = (Linear)model.named_modules().Single(m => m.name == "layers.1.attention.query_key_value").module;
        qkv.weight = new Parameter(ones(new long[] { 192, 64 }, dtype: ScalarType.Int32), requires_grad: false);
        var ex = Assert.Throws<ArgumentException>(() => model.Quantize(8));
        Assert.Contains("layers.1.attention.query_key_value", ex.Message, StringComparison.Ordinal);
        Assert.Empty(model.modules().OfType<QuantizedLinear>());
    }

    [Fact]
    public void KernelRowThreshold_DefaultsPerDevice()
    {
        var o = new QuantizedLinearOptions();
        Assert.Equal(32, o.KernelMaxRowsFor(DeviceType.CPU));
        Assert.Equal(8, o.KernelMaxRowsFor(DeviceType.CUDA));
        Assert.Equal(4, (o with { KernelMaxRows = 4 }).KernelMaxRowsFor(DeviceType.CPU));
    }

    [Fact]
    public void Quantize_AllLinear_IncludesTheHeadOnlyWhenAsked()
    {
        using var model = new GlmLike();
        var all = model.Quantize(8, new QuantizeOptions { TargetModules = null });
        Assert.Equal(8, all.Count);
        using var withHead = new GlmLike();
        Assert.Contains("lm_head", withHead.Quantize(8, new QuantizeOptions { TargetModules = new[] { "query_key_value", "lm_head" } }));
    }

    [Fact]
    public void LoraOnQuantizedBase_FreshIsIdentity_TrainingChangesOnlyLora_MergeIsReported()
    {
        manual_seed(46);
        using var model = new GlmLike();
        model.Quantize(8, new QuantizeOptions { GroupSize = 32 });
        using var ids = randint(0, 40, new long[] { 2, 5 });
        // Compare under no_grad: with gradients wanted, a quantized layer takes the dequantize path (different
        // rounding), and AddLora freezes the embedding, which changes whether its output wants gradients.
        Tensor before;
        using (no_grad()) before = model.call(ids);
        long floatTotal;
        using (var reference = new GlmLike()) floatTotal = reference.CountParameters().Total;
        Assert.Equal(floatTotal, model.CountParameters().Total); // quantized weights still count as (frozen) weights
        var adapted = model.AddLora(new LoraConfig { TargetModules = new[] { "query_key_value" }, Rank = 4, Alpha = 8 });
        Assert.Equal(2, adapted.Count);
        Assert.Equal(floatTotal + 2 * 4 * (64 + 192), model.CountParameters().Total);
        Assert.IsType<QuantizedLinear>(model.GetLoraLayers()[0].Layer.BaseLayer);
        Tensor fresh;
        using (no_grad()) fresh = model.call(ids);
        Assert.True(T.Identical(before, fresh), "a fresh adapter on a quantized base must change nothing");

        var frozen = model.state_dict().Where(kv => !kv.Key.Contains("lora_", StringComparison.Ordinal)).ToDictionary(kv => kv.Key, kv => kv.Value.clone());
        model.train();
        var opt = optim.AdamW(model.GetLoraParameters(), lr: 0.01);
        for (int i = 0; i < 3; i++)
        {
            using var scope = NewDisposeScope();
            opt.zero_grad();
            model.call(ids).square().mean().backward();
            opt.step();
        }
        model.eval();
        var after = model.state_dict();
        Assert.All(frozen, kv => Assert.True(T.Identical(kv.Value, after[kv.Key]), $"{kv.Key} changed"));
        Assert.Contains(model.GetLoraStateDict().Values, t => t.abs().sum().item<float>() > 0 && t.shape[1] == 4); // B moved off zero

        using var adaptedOut = model.call(ids);
        var merged = model.MergeLora(unload: false);
        Assert.False(merged.Exact);
        using var mergedOut = model.call(ids);
        Assert.True(T.RelErr(mergedOut, adaptedOut) < 0.05, "re-quantized merge stays within int8 rounding of the adapted model");
        model.UnmergeLora();
    }

    [Fact]
    public void MergeIntoAFloatCopy_IsExact()
    {
        manual_seed(47);
        using var model = new GlmLike();
        model.Quantize(4, new QuantizeOptions { GroupSize = 32 });
        model.AddLora(new LoraConfig { TargetModules = new[] { "dense_h_to_4h" }, Init = LoraInit.Random });
        using var ids = randint(0, 40, new long[] { 1, 4 });
        var replaced = model.Dequantize(ScalarType.Float32);
        Assert.Equal(8, replaced.Count);
        Assert.Empty(model.modules().OfType<QuantizedLinear>());
        using var adaptedOut = model.call(ids);
        var r = model.MergeLora();
        Assert.True(r.Exact);
        using var mergedOut = model.call(ids);
        Assert.True((mergedOut - adaptedOut).abs().max().item<float>() < 1e-4);
    }

    [Fact]
    public void ToDtype_ConvertsTheBiasOnly_NotTheStoredScales()
    {
        manual_seed(48);
        using var linear = nn.Linear(64, 32);
        using var q = QuantizedLinear.FromLinear(linear, QuantizationFormat.Int4PerRowChatGlm);
        var scale = q.QuantizedWeight.Scale.clone();
        q.to(ScalarType.BFloat16);
        Assert.Equal(ScalarType.Float16, q.QuantizedWeight.Scale.dtype);
        Assert.True(T.Identical(scale, q.QuantizedWeight.Scale));
        Assert.Equal(ScalarType.BFloat16, q.Bias!.dtype);
        Assert.Equal(ScalarType.BFloat16, q.OutputDtype);
        using var x = randn(2, 64).to(ScalarType.BFloat16);
        using var y = q.call(x);
        Assert.Equal(ScalarType.BFloat16, y.dtype);
    }

    [Fact]
    public void FieldTypedLinear_CannotHoldAQuantizedLayer()
    {
        using var model = new Rigid();
        var ex = Assert.Throws<InvalidOperationException>(() => model.Quantize(8, new QuantizeOptions { TargetModules = null }));
        Assert.Contains("Module<Tensor, Tensor>", ex.Message, StringComparison.Ordinal);
        Assert.Empty(model.modules().OfType<QuantizedLinear>());
    }

    private sealed class Rigid : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module<Tensor, Tensor> a = nn.Linear(32, 32);
        private readonly Linear b = nn.Linear(32, 32);

        public Rigid() : base(nameof(Rigid)) => RegisterComponents();

        public override Tensor forward(Tensor x) => b.call(a.call(x));
    }
}
