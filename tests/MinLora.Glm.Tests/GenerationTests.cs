using MinLora.Glm.Generation;
using MinLora.Glm.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Tests;

public class GenerationTests
{
    private static GlmForCausalLM Model() => GlmCheckpoint.FromPretrained(Fixtures.Dir("v1")).Model;

    private static GlmTokenizer Tokenizer()
    {
        using var s = File.OpenRead(Path.Combine(Fixtures.Dir("tokenizer"), "tiny_unigram.model"));
        return GlmTokenizer.Create(s);
    }

    private static List<IReadOnlyList<int>> GoldenPrompts(Dictionary<string, Tensor> g) =>
        Enumerable.Range(0, 3).Select(r => (IReadOnlyList<int>)g["C.input_ids"][r].data<long>().ToArray().SkipWhile(t => t == 3).Select(t => (int)t).ToArray()).ToList();

    /// <summary>Greedy batched generation (left padding, KV cache) reproduces the reference's greedy ids exactly.</summary>
    [Fact]
    public void Greedy_MatchesTheReferenceIds()
    {
        using var model = Model();
        var g = Fixtures.Golden("v1");
        var result = model.Generate(GoldenPrompts(g), new GenerationOptions { DoSample = false, MaxNewTokens = 8, StopTokenIds = Array.Empty<int>() });
        for (int r = 0; r < 3; r++)
        {
            var expected = g["C.generated_ids"][r].data<long>().ToArray().Skip(19).Select(t => (int)t);
            Assert.Equal(expected, result[r].TokenIds);
            Assert.Equal(FinishReason.Length, result[r].Reason);
        }
    }

    /// <summary>Every step's tensors are freed: the live-tensor count after 4 or 24 generated tokens is the same.</summary>
    [Fact]
    public void Generation_LeavesNoTensorsBehind_WhateverTheLength()
    {
        using var model = Model();
        var prompts = GoldenPrompts(Fixtures.Golden("v1"));
        var options = new GenerationOptions { DoSample = false, StopTokenIds = Array.Empty<int>(), MaxLength = 128 };
        model.Generate(prompts, options with { MaxNewTokens = 30 });            // warm caches (rotary tables) to the longest length
        long Live() => DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        long before = Live();
        model.Generate(prompts, options with { MaxNewTokens = 4 });
        long afterShort = Live();
        model.Generate(prompts, options with { MaxNewTokens = 24 });
        long afterLong = Live();
        Assert.True(before == afterShort && before == afterLong, $"live tensors: {before} before, {afterShort} after 4 tokens, {afterLong} after 24");
    }

    [Fact]
    public void StopToken_EndsTheSequence_WithoutTheStopToken()
    {
        using var model = Model();
        var g = Fixtures.Golden("v1");
        var prompts = GoldenPrompts(g);
        int stop = (int)g["C.generated_ids"][0][19 + 3].item<long>();           // row 0's 4th greedy token
        var result = model.Generate(prompts.Take(1).ToList(), new GenerationOptions { DoSample = false, MaxNewTokens = 8, StopTokenIds = new[] { stop } });
        Assert.Equal(FinishReason.StopToken, result[0].Reason);
        Assert.Equal(g["C.generated_ids"][0].data<long>().ToArray().Skip(19).Take(3).Select(t => (int)t), result[0].TokenIds);
    }

    [Fact]
    public void Sampling_WithASeed_IsReproducible()
    {
        using var model = Model();
        var prompts = GoldenPrompts(Fixtures.Golden("v1"));
        var options = new GenerationOptions { DoSample = true, TopP = 0.9, Temperature = 1.0, TopK = 50, MaxNewTokens = 10, Seed = 1234, StopTokenIds = Array.Empty<int>() };
        var a = model.Generate(prompts, options);
        var b = model.Generate(prompts, options);
        Assert.Equal(a.Select(x => x.TokenIds.ToArray()), b.Select(x => x.TokenIds.ToArray()));
        var c = model.Generate(prompts, options with { Seed = 99 });
        Assert.NotEqual(a.Select(x => string.Join(",", x.TokenIds)), c.Select(x => string.Join(",", x.TokenIds)));
    }

    /// <summary>Top-p as the book's sample_top_p: probabilities .5 .3 .15 .05 with p = .7 keep {.5, .3} (the mass before .15 is .8 > .7).</summary>
    [Fact]
    public void TopPAndTopK_KeepTheHandComputedSets_AndSamplingFollowsTheRenormalisedDistribution()
    {
        using var logits = tensor(new[] { 0.15f, 0.5f, 0.05f, 0.3f }).log().unsqueeze(0);
        using var p = LogitsProcessing.ApplyTopP(logits, 0.7);
        Assert.Equal(new[] { false, true, false, true }, p[0].data<float>().ToArray().Select(float.IsFinite));
        using var k = LogitsProcessing.ApplyTopK(logits, 3);
        Assert.Equal(new[] { true, true, false, true }, k[0].data<float>().ToArray().Select(float.IsFinite));
        using var p1 = LogitsProcessing.ApplyTopP(logits, 0.4);
        Assert.Equal(new[] { false, true, false, false }, p1[0].data<float>().ToArray().Select(float.IsFinite));

        // 20 000 draws from {.625, .375}: the frequency of token 1 is within 4.5 σ (σ = √(.625·.375/n) ≈ .0034).
        using var gen = new Generator(7);
        using var many = p.expand(20000, 4).contiguous();
        var draws = LogitsProcessing.Sample(many, gen).data<long>().ToArray();
        Assert.DoesNotContain(draws, d => d is 0 or 2);
        double f1 = draws.Count(d => d == 1) / 20000.0;
        Assert.InRange(f1, 0.625 - 0.016, 0.625 + 0.016);
    }

    [Fact]
    public void RepetitionPenalty_AndInvalidScoreGuard()
    {
        using var logits = tensor(new[] { 2f, -2f, 1f, 0.5f }).unsqueeze(0);
        using var r = LogitsProcessing.ApplyRepetitionPenalty(logits, new[] { new[] { 0, 1 } }, 2.0);
        Assert.Equal(new[] { 1f, -4f, 1f, 0.5f }, r[0].data<float>().ToArray());
        using var bad = tensor(new[] { 1f, float.NaN, 3f, 0f, 0f, 0f, 0f }).unsqueeze(0);
        using var fixedLogits = LogitsProcessing.ReplaceInvalid(bad, 5);
        Assert.Equal(5L, fixedLogits.argmax(-1).item<long>());
        Assert.Equal(5, LogitsProcessing.NextTokens(bad, new[] { Array.Empty<int>() }, new GenerationOptions { DoSample = false }, new Generator(1))[0]);
    }

    [Fact]
    public async Task Streaming_YieldsTheSameTextAsNonStreaming()
    {
        using var model = Model();
        var tok = Tokenizer();
        var options = new GenerationOptions { DoSample = false, MaxNewTokens = 12, StopTokenIds = Array.Empty<int>() };
        var text = model.GenerateText(tok, "你好", options);
        var pieces = new List<string>();
        await foreach (var piece in model.GenerateStreamAsync(tok, "你好", options)) pieces.Add(piece);
        Assert.True(pieces.Count > 1, "text should arrive in several pieces");
        Assert.Equal(text, string.Concat(pieces));
        Assert.DoesNotContain('\uFFFD', text);
        var ids = model.Generate(new[] { tok.EncodePrompt("你好") }, options)[0].TokenIds;
        Assert.Equal(tok.Decode(ids), text);
    }

    [Fact]
    public void StopString_CutsTheText()
    {
        using var model = Model();
        var tok = Tokenizer();
        var options = new GenerationOptions { DoSample = false, MaxNewTokens = 12, StopTokenIds = Array.Empty<int>() };
        var full = model.GenerateText(tok, "你好", options);
        Assert.True(full.Length >= 4, $"need some text to cut: '{full}'");
        var stop = full.Substring(2, 2);
        var cut = model.GenerateText(tok, "你好", options with { StopStrings = new[] { stop } });
        Assert.Equal(full[..full.IndexOf(stop, StringComparison.Ordinal)], cut);
    }

    [Fact]
    public void ChatPrompt_AndResponse_FollowChatGlm()
    {
        var history = new[] { new ChatTurn("你好", "你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你，欢迎问我任何问题。") };
        Assert.Equal("[Round 0]\n问：你好\n答：你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你，欢迎问我任何问题。\n[Round 1]\n问：晚上睡不着应该怎么办\n答：",
            GlmGeneration.BuildChatPrompt("晚上睡不着应该怎么办", history));
        Assert.Equal("你好", GlmGeneration.BuildChatPrompt("你好", null));
        Assert.Equal("你好，世界！ok, fine", GlmGeneration.ProcessResponse("  你好,世界! ok, fine ".Replace(" ok", "ok", StringComparison.Ordinal)));

        using var model = Model();
        var tok = Tokenizer();
        var (response, turns) = model.Chat(tok, "你好", history, new GenerationOptions { DoSample = false, MaxNewTokens = 6 });
        Assert.Equal(2, turns.Count);
        Assert.Equal(response, turns[1].Response);
    }

    [Fact]
    public void Cancellation_AndBadOptions()
    {
        using var model = Model();
        var prompts = GoldenPrompts(Fixtures.Golden("v1"));
        using var cts = new CancellationTokenSource();
        cts.Cancel();
        Assert.Throws<OperationCanceledException>(() => model.Generate(prompts, new GenerationOptions(), cts.Token));
        Assert.Throws<ArgumentOutOfRangeException>(() => model.Generate(prompts, new GenerationOptions { TopP = 0 }));
        Assert.Throws<ArgumentOutOfRangeException>(() => model.Generate(prompts, new GenerationOptions { Temperature = 0 }));
        Assert.Throws<ArgumentException>(() => model.Generate(prompts, new GenerationOptions { MaxLength = 10 }));
        Assert.Throws<ArgumentException>(() => model.Generate(new List<IReadOnlyList<int>>(), new GenerationOptions()));
    }
}
