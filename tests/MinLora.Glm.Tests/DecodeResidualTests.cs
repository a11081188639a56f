using MinLora.Glm.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Tests;

/// <summary>ChatGLM-6B's scaled residual on a decoding step's bf16 rows in one pass, against libtorch's two ops.</summary>
public class DecodeResidualTests
{
    /// <summary>
    /// Values over many binades (so that both roundings go every way), NaN, ±∞ and a column count with a scalar tail:
    /// bit for bit (NaN as NaN) libtorch's <c>x.mul(alpha).add(y)</c> in bf16, with ChatGLM's alpha √56 and an alpha whose float32
    /// rounding matters.
    /// </summary>
    [SkippableTheory]
    [InlineData(1, 4096, 7.483314773547883)]
    [InlineData(3, 37, 7.483314773547883)]
    [InlineData(2, 5, 0.1)]
    public void Apply_EqualsTheLibtorchOps(int rows, int columns, double alpha)
    {
        Skip.IfNot(System.Runtime.Intrinsics.X86.Avx512F.IsSupported, "needs AVX-512 F (elsewhere the libtorch path runs)");
        manual_seed(601 + columns);
        using var x = randn(rows, columns).mul(exp(randn(rows, columns).mul(4))).to(ScalarType.BFloat16);
        using var y = randn(rows, columns).mul(exp(randn(rows, columns).mul(4))).to(ScalarType.BFloat16);
        x[0, 0] = tensor(float.NaN).to(ScalarType.BFloat16);
        y[rows - 1, columns - 1] = tensor(float.PositiveInfinity).to(ScalarType.BFloat16);
        x[rows - 1, 0] = tensor(float.NegativeInfinity).to(ScalarType.BFloat16);
        using var noGrad = no_grad();
        Assert.True(DecodeResidual.Applies(x, y, rows * columns));
        using var fused = DecodeResidual.Apply(x, alpha, y);
        using var expected = x.mul(alpha).add(y);
        Assert.Equal(ScalarType.BFloat16, fused.dtype);
        Assert.Equal(x.shape, fused.shape);
        byte[] got = fused.bytes.ToArray(), want = expected.bytes.ToArray();
        // Bit for bit, a NaN's sign and payload aside (the hardware's NaN propagation decides them).
        static bool IsNaN(ushort b) => (b & 0x7FFF) > 0x7F80;
        var differing = Enumerable.Range(0, got.Length / 2)
            .Where(i => BitConverter.ToUInt16(got, 2 * i) != BitConverter.ToUInt16(want, 2 * i) && !(IsNaN(BitConverter.ToUInt16(got, 2 * i)) && IsNaN(BitConverter.ToUInt16(want, 2 * i))))
            .Select(i => $"{i}: {BitConverter.ToUInt16(got, 2 * i):X4} against {BitConverter.ToUInt16(want, 2 * i):X4}").ToList();
        Assert.True(differing.Count == 0, $"the fused residual differs from libtorch's two ops at {string.Join(", ", differing.Take(5))}");
    }

    [Fact]
    public void Applies_RefusesWhatItCannotRead()
    {
        using var x = randn(2, 64).to(ScalarType.BFloat16);
        using var y = randn(2, 64).to(ScalarType.BFloat16);
        bool avx512 = System.Runtime.Intrinsics.X86.Avx512F.IsSupported;
        Assert.Equal(avx512, DecodeResidual.Applies(x, y, 128));
        Assert.False(DecodeResidual.Applies(x, y, 127));                                         // too many values
        using var other = randn(1, 128).to(ScalarType.BFloat16);
        Assert.False(DecodeResidual.Applies(x, other, 128));                                     // another shape
        using var f32 = randn(2, 64);
        Assert.False(DecodeResidual.Applies(x, f32, 128));                                       // not bf16
        using var strided = randn(64, 2).to(ScalarType.BFloat16).t();
        Assert.False(DecodeResidual.Applies(strided, y, 128));                                   // not contiguous
        using var wanted = randn(2, 64).to(ScalarType.BFloat16).requires_grad_();
        Assert.False(DecodeResidual.Applies(x, wanted, 128));                                    // a gradient is wanted
        using (no_grad()) Assert.Equal(avx512, DecodeResidual.Applies(x, wanted, 128));
    }
}

/// <summary>The fused GELU and residual inside a model: a tiny bf16 ChatGLM-6B-architecture model's forward on a few
/// rows (where they run) with them on and off.</summary>
public class DecodeFusionModelTests
{
    /// <summary>A two-layer ChatGLM-6B-architecture config of the given width.</summary>
    private static GlmConfig Tiny(int hidden, int heads) => new()
    {
        VocabSize = 320,
        HiddenSize = hidden,
        NumLayers = 2,
        NumAttentionHeads = heads,
        MaxSequenceLength = 64,
        BosTokenId = 290,
        EosTokenId = 291,
        MaskTokenId = 292,
        GmaskTokenId = 293,
        PadTokenId = 0,
    };

    [Fact]
    public void FewRowForward_EqualsTheLibtorchOps()
    {
        manual_seed(602);
        var config = Tiny(64, 4);
        using var model = new GlmForCausalLM(config, new GlmBuildOptions(ScalarType.BFloat16));
        using var ids = randint(0, 280, new long[] { 1, 6 });
        using var prompt = cat(new[] { ids, tensor(new long[] { 293, 290 }).unsqueeze(0) }, 1);
        using var noGrad = no_grad();
        Tensor Logits(bool gelu, bool residual)
        {
            DecodeGelu.Enabled = gelu;
            DecodeResidual.Enabled = residual;
            try
            {
                using var output = model.call(new GlmInput(prompt));
                return output.Logits.detach().clone();
            }
            finally
            {
                DecodeGelu.Enabled = DecodeResidual.Enabled = true;
            }
        }
        using var libtorch = Logits(false, false);
        using var residualOnly = Logits(false, true);
        using var both = Logits(true, true);
        Assert.True(libtorch.isfinite().all().item<bool>());
        // The residual is libtorch's arithmetic exactly; the GELU too but for its tanh (one bf16 ulp, rarely), which the
        // two layers may carry to a few logits: bounded by 2 % of the logits' range.
        Assert.True(residualOnly.bytes.SequenceEqual(libtorch.bytes), "the fused residual changed the logits");
        using var difference = (both.to(ScalarType.Float32) - libtorch.to(ScalarType.Float32)).abs().max();
        using var range = libtorch.to(ScalarType.Float32).abs().max();
        Assert.True(difference.item<float>() <= 0.02f * range.item<float>(), $"the fused GELU moved a logit by {difference.item<float>()}");
    }

    /// <summary>
    /// The fused LayerNorm (every block's two and the final one) leaves a few-row forward's logits bit-identical, and the
    /// forward does take it. (Toggling the static flags is safe: AssemblyInfo.cs turns off test parallelisation.)
    /// </summary>
    [SkippableFact]
    public void FewRowForward_LayerNormPassChangesNothing()
    {
        Skip.IfNot(System.Runtime.Intrinsics.X86.Avx512F.IsSupported && System.Runtime.Intrinsics.X86.Fma.IsSupported, "needs AVX-512 F and FMA (elsewhere the libtorch path runs)");
        manual_seed(603);
        var config = Tiny(72, 3);          // the rows' tail (72 = 4·16 + 8) runs too
        using var model = new GlmForCausalLM(config, new GlmBuildOptions(ScalarType.BFloat16));
        using (no_grad())
        {
            // Non-trivial LayerNorm weights and biases (they are built as ones and zeros).
            foreach (var (name, p) in model.named_parameters().Where(n => n.name.Contains("layernorm")))
                p.copy_(name.EndsWith("weight") ? rand(p.shape).add(0.5) : randn(p.shape).mul(0.1));
        }
        using var ids = randint(0, 280, new long[] { 1, 6 });
        using var prompt = cat(new[] { ids, tensor(new long[] { 293, 290 }).unsqueeze(0) }, 1);
        using var noGrad = no_grad();
        Tensor Logits(bool layerNorm)
        {
            DecodeLayerNorm.Enabled = layerNorm;
            try
            {
                using var output = model.call(new GlmInput(prompt));
                return output.Logits.detach().clone();
            }
            finally
            {
                DecodeLayerNorm.Enabled = true;
            }
        }
        long before = DecodeLayerNorm.Applied;
        using var libtorch = Logits(false);
        Assert.Equal(before, DecodeLayerNorm.Applied);
        using var fused = Logits(true);
        // Two LayerNorms per block and the final one.
        Assert.Equal(before + 2 * config.NumLayers + 1, DecodeLayerNorm.Applied);
        Assert.True(libtorch.isfinite().all().item<bool>());
        Assert.True(fused.bytes.SequenceEqual(libtorch.bytes), "the fused LayerNorm changed the logits");
    }
}
