using MinLora.Glm.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Tests;

/// <summary>
/// The preallocated cache: continuing in place, branching from an older cache (copied, never overwritten), growing
/// past the buffers' capacity, P-tuning prefixes, and logits for the last position only. Each decoded step is
/// compared with a full recomputation of the same sequence (float32 on a tiny random model: rounding ~1e-6).
/// </summary>
public class KvCacheTests
{
    private const double Tol = 1e-4;

    private static GlmForCausalLM Model(int? preSeqLen = null)
    {
        manual_seed(7);
        var config = TinyGlm.V1(32, 4) with { PreSeqLen = preSeqLen };
        var model = new GlmForCausalLM(config);
        model.eval();
        return model;
    }

    private static Tensor Prompt(GlmConfig c, int length)
    {
        var ids = Enumerable.Range(0, length).Select(i => (long)(5 + (i * 37) % 250)).ToArray();
        ids[^2] = c.GmaskTokenId;
        ids[^1] = c.BosTokenId;
        return tensor(ids, new long[] { 1, length });
    }

    /// <summary>Decodes <paramref name="tokens"/> from (<paramref name="cache"/>, mask, positions) and checks each step against a full forward.</summary>
    private static (GlmKvCache Cache, Tensor Mask, Tensor Positions, Tensor All) Continue(GlmForCausalLM model, GlmKvCache cache, Tensor mask, Tensor positions, Tensor all, long[] tokens, bool inPlace = false)
    {
        foreach (var t in tokens)
        {
            using var next = tensor(new[] { t }, new long[] { 1, 1 });
            all = cat(new[] { all, next }, 1);
            mask = GlmMasks.AppendTokenToMask(mask);
            positions = GlmMasks.AppendTokenToPositions(positions);
            using var stepMask = mask.narrow(2, mask.shape[2] - 1, 1);
            using var stepPos = positions.narrow(2, positions.shape[2] - 1, 1);
            using var output = model.call(new GlmInput(next) { AttentionMask = stepMask, PositionIds = stepPos, PastKeyValues = cache, UseCache = true, LogitsToKeep = 1 });
            using var full = model.call(new GlmInput(all) { AttentionMask = mask, PositionIds = positions });
            var diff = (output.Logits.select(1, -1) - full.Logits.select(1, -1)).abs().max().item<float>();
            Assert.True(diff < Tol, $"cached step differs from the full recompute by {diff} at length {all.shape[1]}");
            var previous = cache;
            cache = output.PresentKeyValues!;
            Assert.Equal(all.shape[1] + (model.Config.PreSeqLen ?? 0), cache.Length);
            // Continuing the newest cache within capacity writes into its buffers (no copy of the past).
            if (inPlace && previous.Length % 256 != 0 && (previous.Length + 1) % 256 != 0) Assert.Same(previous.Storage, cache.Storage);
            inPlace = true;
        }
        return (cache, mask, positions, all);
    }

    [Fact]
    public void InPlaceContinuation_AndBranchesFromAnOlderCache_EqualFullRecompute()
    {
        using var model = Model();
        var ids = Prompt(model.Config, 6);
        var mask = GlmMasks.BuildAttentionMask(ids, model.Config);
        var pos = GlmMasks.BuildPositionIds(ids, model.Config);
        using var first = model.call(new GlmInput(ids) { AttentionMask = mask, PositionIds = pos, UseCache = true });
        var root = first.PresentKeyValues!;
        var rootKey = root[0].Key.clone();

        var (a, _, _, allA) = Continue(model, root, mask, pos, ids, new long[] { 11, 12, 13 }, inPlace: true);
        // A second branch from the same root: its positions 6.. must not be the first branch's.
        var (b, _, _, _) = Continue(model, root, mask, pos, ids, new long[] { 21, 22 });
        // The root still holds exactly what it held.
        Assert.Equal(0f, (root[0].Key - rootKey).abs().max().item<float>());
        Assert.Equal(6, root.Length);
        // Continuing branch A after branch B was written still gives the right logits (A's buffers are A's).
        var (a2, _, _, _) = Continue(model, a, GlmMasks.BuildAttentionMask(allA, model.Config), GlmMasks.BuildPositionIds(allA, model.Config), allA, new long[] { 14 }, inPlace: true);
        Assert.Same(a.Storage, a2.Storage);
        Assert.NotSame(a.Storage, b.Storage);
        foreach (var c in new[] { root, a, b, a2 }) c.Dispose();
    }

    [Fact]
    public void GrowingPastTheBufferCapacity_KeepsEveryPosition()
    {
        using var model = Model();
        // 250 prompt positions leave 6 free in the first 256-position buffers; 12 more steps cross the boundary.
        var ids = Prompt(model.Config, 250);
        var mask = GlmMasks.BuildAttentionMask(ids, model.Config);
        var pos = GlmMasks.BuildPositionIds(ids, model.Config);
        using var first = model.call(new GlmInput(ids) { AttentionMask = mask, PositionIds = pos, UseCache = true, LogitsToKeep = 1 });
        Assert.Equal(1, first.Logits.shape[1]);
        var (cache, _, _, _) = Continue(model, first.PresentKeyValues!, mask, pos, ids, Enumerable.Range(0, 12).Select(i => (long)(40 + i)).ToArray());
        Assert.Equal(262, cache.Length);
        cache.Dispose();
    }

    [Fact]
    public void PTuningPrefix_IsCopiedIntoTheCache()
    {
        using var model = Model(preSeqLen: 3);
        var ids = Prompt(model.Config, 5);
        var mask = GlmMasks.BuildAttentionMask(ids, model.Config);
        var pos = GlmMasks.BuildPositionIds(ids, model.Config);
        using var first = model.call(new GlmInput(ids) { AttentionMask = mask, PositionIds = pos, UseCache = true });
        Assert.Equal(8, first.PresentKeyValues!.Length);
        var (cache, _, _, _) = Continue(model, first.PresentKeyValues!, mask, pos, ids, new long[] { 7, 8, 9 });
        cache.Dispose();
    }

    [Fact]
    public void LogitsToKeep_IsValidated()
    {
        using var model = Model();
        using var ids = Prompt(model.Config, 4);
        Assert.Throws<ArgumentException>(() => model.call(new GlmInput(ids) { LogitsToKeep = 0 }));
        Assert.Throws<ArgumentException>(() => model.call(new GlmInput(ids) { LogitsToKeep = 1, Labels = ids }));
        using var all = model.call(new GlmInput(ids));
        using var last2 = model.call(new GlmInput(ids) { LogitsToKeep = 2 });
        Assert.True((all.Logits.narrow(1, 2, 2) - last2.Logits).abs().max().item<float>() < 1e-6);
    }

    /// <summary>Built directly quantized with random weights: usable at once (kernel ready), head quantized on request.</summary>
    [Theory]
    [InlineData(8, false)]
    [InlineData(4, true)]
    public void BuiltQuantized_IsUsableAtOnce(int bits, bool quantizeHead)
    {
        manual_seed(8);
        var config = new GlmConfig
        {
            VocabSize = 320,
            HiddenSize = 64,
            NumLayers = 2,
            NumAttentionHeads = 4,
            MaxSequenceLength = 64,
            BosTokenId = 290,
            EosTokenId = 291,
            MaskTokenId = 292,
            GmaskTokenId = 293,
            PadTokenId = 0,
        };
        using var model = new GlmForCausalLM(config, new GlmBuildOptions(ScalarType.BFloat16) { QuantizationBit = bits, QuantizeLmHead = quantizeHead });
        var quantized = model.named_modules().Where(m => m.module is MinLora.Quantization.QuantizedLinear).Select(m => m.name).ToList();
        Assert.Equal(2 * 4 + (quantizeHead ? 1 : 0), quantized.Count);
        Assert.Equal(quantizeHead, quantized.Contains("lm_head"));
        Assert.All(model.modules().OfType<MinLora.Quantization.QuantizedLinear>(), q =>
        {
            Assert.NotEqual(MinLora.Quantization.QuantizedKernel.Dequantize, q.Kernel);
            // Random codes, not an all-zero skeleton.
            Assert.True(q.QuantizedWeight.Weight.ne(0).any().item<bool>());
        });
        using var ids = Prompt(config, 6);
        using var noGrad = no_grad();
        using var output = model.call(new GlmInput(ids));
        Assert.Equal(new long[] { 1, 6, 320 }, output.Logits.shape);
        Assert.True(output.Logits.isfinite().all().item<bool>());
        Assert.True(output.Logits.to(ScalarType.Float32).std().item<float>() > 0);
    }
}
