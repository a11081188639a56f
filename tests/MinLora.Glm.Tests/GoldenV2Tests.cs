using MinLora.Glm.Generation;
using MinLora.Quantization;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Tests;

/// <summary>
/// The v2 architecture (ChatGLM2/3, GLM-4) against the unmodified ChatGLM2 reference on its golden tiny model
/// (multi-query attention with 2 groups, kv_channels 16, RMSNorm, SwiGLU; shared/golden/v2 copied into Fixtures):
/// logits within 1e-5 (the reference's own float32-vs-float64 difference is 3e-6), losses, hidden states, the grouped
/// cache, a left-padded batch, greedy decoding with the cache step by step, and a 120-token row.
/// </summary>
public class GoldenV2Tests
{
    private const double Tol = 1e-5;

    private static GlmForCausalLM Load() => GlmCheckpoint.FromPretrained(Fixtures.Dir("v2")).Model;

    [Fact]
    public void Config_IsV2_AndTheModelHasTheCheckpointsKeys()
    {
        using var model = Load();
        Assert.Equal(GlmVersion.ChatGlm2, model.Version);
        var keys = model.state_dict().Keys.ToHashSet();
        var meta = Fixtures.Meta("v2").GetProperty("state_dict");
        foreach (var entry in meta.EnumerateArray()) Assert.Contains(entry[0].GetString()!, keys);
        Assert.Equal(meta.GetArrayLength(), keys.Count);
        Assert.Contains("transformer.encoder.layers.1.self_attention.query_key_value.bias", keys);
        Assert.Contains("transformer.output_layer.weight", keys);
    }

    [Fact]
    public void CaseA_LogitsLossHiddenStatesAndGroupedCache()
    {
        using var model = Load();
        var g = Fixtures.Golden("v2");
        var meta = Fixtures.Meta("v2");
        using var output = model.call(new GlmInput(g["A.input_ids"]) { Labels = g["A.labels"], UseCache = true, OutputHiddenStates = true });
        Assert.True(Fixtures.MaxDiff(output.Logits, g["A.logits"]) < Tol, $"logits differ by {Fixtures.MaxDiff(output.Logits, g["A.logits"])}");
        Assert.Equal(meta.GetProperty("A.loss").GetDouble(), output.Loss!.item<float>(), 5);
        for (int i = 0; i < 3; i++)
            Assert.True(Fixtures.MaxDiff(output.HiddenStates![i], g[$"A.hidden_states.{i}"]) < Tol, $"hidden state {i} differs by {Fixtures.MaxDiff(output.HiddenStates![i], g[$"A.hidden_states.{i}"])}");
        for (int i = 0; i < 2; i++)
        {
            // The cache keeps the 2 key/value groups, not 4 repeated heads: [s, b, groups, kv_channels].
            Assert.Equal(g[$"A.present.{i}.key"].shape, output.PresentKeyValues![i].Key.shape);
            Assert.True(Fixtures.MaxDiff(output.PresentKeyValues![i].Key, g[$"A.present.{i}.key"]) < Tol, $"key {i} differs");
            Assert.True(Fixtures.MaxDiff(output.PresentKeyValues![i].Value, g[$"A.present.{i}.value"]) < Tol, $"value {i} differs");
        }
        output.PresentKeyValues!.Dispose();
    }

    [Fact]
    public void CaseB_LeftPaddedBatch_AndCaseD_LongRow()
    {
        using var model = Load();
        var g = Fixtures.Golden("v2");
        var meta = Fixtures.Meta("v2");
        using (var output = model.call(new GlmInput(g["B.input_ids"]) { AttentionMask = g["B.attention_mask"], PositionIds = g["B.position_ids"], Labels = g["B.labels"] }))
        {
            Assert.True(Fixtures.MaxDiff(output.Logits, g["B.logits"]) < Tol, $"B logits differ by {Fixtures.MaxDiff(output.Logits, g["B.logits"])}");
            Assert.Equal(meta.GetProperty("B.loss").GetDouble(), output.Loss!.item<float>(), 5);
        }
        // The reference's full mask given directly gives the same.
        using (var output = model.call(new GlmInput(g["B.input_ids"]) { AttentionMask = g["B.full_attention_mask"], PositionIds = g["B.position_ids"] }))
            Assert.True(Fixtures.MaxDiff(output.Logits, g["B.logits"]) < Tol);
        using (var output = model.call(new GlmInput(g["D.input_ids"]) { Labels = g["D.labels"] }))
        {
            Assert.True(Fixtures.MaxDiff(output.Logits, g["D.logits"]) < Tol, $"D logits differ by {Fixtures.MaxDiff(output.Logits, g["D.logits"])}");
            Assert.Equal(meta.GetProperty("D.loss").GetDouble(), output.Loss!.item<float>(), 5);
        }
    }

    /// <summary>Greedy decoding from left-padded prompts, one token per step with the cache, as the reference's generate does.</summary>
    [Fact]
    public void CaseC_GreedyDecodingWithTheCache()
    {
        using var model = Load();
        var g = Fixtures.Golden("v2");
        var ids = g["C.input_ids"];
        var padding = g["C.attention_mask"];
        var positions = g["C.position_ids"];
        var stepLogits = g["C.step_logits"];
        long b = ids.shape[0];
        using var noGrad = no_grad();
        var first = model.call(new GlmInput(ids) { AttentionMask = padding, PositionIds = positions, UseCache = true });
        var cache = first.PresentKeyValues!;
        var logits = first.Logits.select(1, -1);
        var all = ids;
        for (int step = 0; step < stepLogits.shape[0]; step++)
        {
            Assert.True(Fixtures.MaxDiff(logits, stepLogits[step]) < Tol, $"step {step} logits differ by {Fixtures.MaxDiff(logits, stepLogits[step])}");
            var next = logits.argmax(-1).unsqueeze(1);
            all = cat(new[] { all, next }, 1);
            if (step == stepLogits.shape[0] - 1) break;
            padding = cat(new[] { padding, ones(b, 1, dtype: ScalarType.Int64) }, 1);
            positions = positions.narrow(1, positions.shape[1] - 1, 1).add(1);
            var output = model.call(new GlmInput(next) { AttentionMask = padding, PositionIds = positions, PastKeyValues = cache, UseCache = true });
            cache = output.PresentKeyValues!;
            logits = output.Logits.select(1, -1);
        }
        Assert.True(Fixtures.Identical(g["C.generated_ids"], all), "generated ids differ from the reference's");
    }

    /// <summary>The library's Generate (batched, left-padded, greedy) on v2 gives the reference's tokens.</summary>
    [Fact]
    public void Generate_MatchesTheReferenceGreedyDecoding()
    {
        using var model = Load();
        var g = Fixtures.Golden("v2");
        var ids = g["C.input_ids"];
        var prompts = Enumerable.Range(0, (int)ids.shape[0])
            .Select(r => (IReadOnlyList<int>)ids[r].data<long>().ToArray().SkipWhile(t => t == model.Config.PadTokenId).Select(t => (int)t).ToList()).ToList();
        var generated = model.Generate(prompts, new Generation.GenerationOptions { DoSample = false, MaxNewTokens = 8 });
        var expected = g["C.generated_ids"];
        for (int r = 0; r < prompts.Count; r++)
        {
            var tail = expected[r].data<long>().ToArray().Skip((int)ids.shape[1]).Select(t => (int)t).ToList();
            Assert.Equal(tail, generated[r].TokenIds);
        }
    }

    [Fact]
    public void PickleCheckpoints_LoadTheSameModel_AndLoraAndQuantizationWork()
    {
        var g = Fixtures.Golden("v2");
        var dir = Path.Combine(Path.GetTempPath(), "minlora-v2-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            File.Copy(Path.Combine(Fixtures.Dir("v2"), "config.json"), Path.Combine(dir, "config.json"));
            File.Copy(Path.Combine(Fixtures.Dir("v2"), "pytorch_model.bin"), Path.Combine(dir, "pytorch_model.bin"));
            using var model = GlmCheckpoint.FromPretrained(dir).Model;
            using (var output = model.call(new GlmInput(g["A.input_ids"])))
                Assert.True(Fixtures.MaxDiff(output.Logits, g["A.logits"]) < Tol);

            // LoRA on the fused projection: a fresh adapter changes nothing, and the default target exists.
            Assert.Equal(2, model.AddLora(new LoraConfig { TargetModules = new[] { "query_key_value" } }).Count);
            using (var output = model.call(new GlmInput(g["A.input_ids"])))
                Assert.True(Fixtures.MaxDiff(output.Logits, g["A.logits"]) < Tol);
            model.RemoveLora();

            // int8 weights: the same function up to the quantization error (relative norm well under 5 %).
            Assert.Equal(8, model.Quantize(8).Count);
            using var q = model.call(new GlmInput(g["A.input_ids"]));
            var rel = (q.Logits - g["A.logits"]).norm().item<float>() / g["A.logits"].norm().item<float>();
            Assert.True(rel < 0.05, $"int8 logits are {rel} away");
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }
}

/// <summary>The v2 architecture at real size, on the meta device: ChatGLM2-6B's real config and index, and GLM-4-9B's published dimensions.</summary>
public class RealV2ShapeTests
{
    [SkippableFact]
    public void ChatGlm2_6B_MetaModelHasExactlyTheIndexKeys_AndItsParameterCount()
    {
        var configPath = SharedData.Find(Path.Combine("data", "chatglm2-6b", "config.json"));
        var indexPath = SharedData.Find(Path.Combine("data", "chatglm2-6b", "pytorch_model.bin.index.json"));
        Skip.If(configPath is null || indexPath is null, "the real ChatGLM2-6B config/index are not beside the repo (../shared/data/chatglm2-6b)");
        var config = GlmConfig.FromFile(configPath!);
        Assert.Equal(GlmVersion.ChatGlm2, config.Version);
        using var model = new GlmForCausalLM(config, new Modeling.GlmBuildOptions(ScalarType.Float16, new Device(DeviceType.META)));
        var keys = model.state_dict();
        using var index = System.Text.Json.JsonDocument.Parse(File.ReadAllText(indexPath!));
        var expected = index.RootElement.GetProperty("weight_map").EnumerateObject().Select(p => p.Name).OrderBy(k => k, StringComparer.Ordinal).ToList();
        Assert.Equal(expected, keys.Keys.OrderBy(k => k, StringComparer.Ordinal).ToList());
        Assert.Equal(new long[] { 4608, 4096 }, keys["transformer.encoder.layers.0.self_attention.query_key_value.weight"].shape);
        Assert.Equal(new long[] { 27392, 4096 }, keys["transformer.encoder.layers.27.mlp.dense_h_to_4h.weight"].shape);
        Assert.Equal(new long[] { 4096, 13696 }, keys["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"].shape);
        Assert.Equal(new long[] { 65024, 4096 }, keys["transformer.output_layer.weight"].shape);
        // The index's total_size is the fp16 bytes of every tensor, the 32-value rotary buffer included.
        long totalBytes = index.RootElement.GetProperty("metadata").GetProperty("total_size").GetInt64();
        Assert.Equal((totalBytes - 32 * 2) / 2, model.CountParameters().Total);
    }

    [Fact]
    public void V2ConfigWithoutMultiQueryAttention_IsRefused()
    {
        Assert.Throws<NotSupportedException>(() => GlmConfig.FromJson("{\"model_type\":\"chatglm\",\"multi_query_attention\":false,\"kv_channels\":16,\"padded_vocab_size\":100,\"eos_token_id\":2,\"pad_token_id\":0}"));
    }

    [Fact]
    public void Glm4_9B_BuildsOnMeta_WithItsPublishedDimensions()
    {
        var config = GlmConfig.FromJson("""
            {"model_type":"chatglm","num_layers":40,"hidden_size":4096,"num_attention_heads":32,"kv_channels":128,
             "multi_query_attention":true,"multi_query_group_num":2,"ffn_hidden_size":13696,"padded_vocab_size":151552,
             "layernorm_epsilon":1.5625e-07,"rope_ratio":500,"seq_length":131072,"rmsnorm":true,"add_qkv_bias":true,
             "add_bias_linear":false,"post_layer_norm":true,"eos_token_id":[151329,151336,151338],"pad_token_id":151329}
            """);
        Assert.Equal(151329, config.EosTokenId);
        using var model = new GlmForCausalLM(config, new Modeling.GlmBuildOptions(ScalarType.BFloat16, new Device(DeviceType.META)));
        long h = 4096, qkv = 4096 + 2 * 2 * 128, ffn = 13696, vocab = 151552;
        long perLayer = h * qkv + qkv + h * h + h * 2 * ffn + ffn * h + 2 * h;
        Assert.Equal(40 * perLayer + h + 2 * vocab * h, model.CountParameters().Total);   // 9.40 B
        Assert.Equal(new long[] { qkv, h }, model.state_dict()["transformer.encoder.layers.39.self_attention.query_key_value.weight"].shape);
    }
}

/// <summary>
/// P-tuning v2 on the v2 architecture: the prefix keys and values per key/value group (kv size L·kv·groups·2, with and
/// without the projection MLP), always visible, decoded with the cache exactly as recomputed, and only the prefix
/// encoder trains.
/// </summary>
public class PTuningV2Tests
{
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Prefix_CachedDecodingEqualsRecompute_AndOnlyThePrefixTrains(bool projection)
    {
        manual_seed(12);
        var config = GlmConfig.FromFile(Path.Combine(Fixtures.Dir("v2"), "config.json")) with { PreSeqLen = 4, PrefixProjection = projection };
        using var model = new GlmForCausalLM(config);
        var trainable = model.named_parameters().Where(p => p.parameter.requires_grad).Select(p => p.name).ToList();
        Assert.NotEmpty(trainable);
        Assert.All(trainable, n => Assert.StartsWith("transformer.prefix_encoder.", n, StringComparison.Ordinal));
        long kv = 2L * config.NumLayers * config.KvChannelsOrHeadDim * config.KvGroups;
        Assert.Equal(kv, model.state_dict()[projection ? "transformer.prefix_encoder.trans.2.weight" : "transformer.prefix_encoder.embedding.weight"].shape[0 + (projection ? 0 : 1)]);

        model.eval();
        using var noGrad = no_grad();
        var ids = tensor(new long[] { 901, 903, 431, 488, 514, 13 }, new long[] { 1, 6 });
        using var first = model.call(new GlmInput(ids) { UseCache = true });
        var cache = first.PresentKeyValues!;
        Assert.Equal(4 + 6, cache.Length);
        var all = ids;
        var logits = first.Logits.select(1, -1);
        for (int step = 0; step < 4; step++)
        {
            var next = logits.argmax(-1).unsqueeze(1);
            all = cat(new[] { all, next }, 1);
            long n = all.shape[1];
            using var full = model.call(new GlmInput(all));
            using var output = model.call(new GlmInput(next) { PositionIds = tensor(new[] { n - 1 }, new long[] { 1, 1 }), AttentionMask = ones(1, n, dtype: ScalarType.Int64), PastKeyValues = cache, UseCache = true });
            Assert.True(Fixtures.MaxDiff(output.Logits.select(1, -1), full.Logits.select(1, -1)) < 1e-5, $"step {step} differs by {Fixtures.MaxDiff(output.Logits.select(1, -1), full.Logits.select(1, -1))}");
            cache = output.PresentKeyValues!;
            logits = output.Logits.select(1, -1);
        }

        // Training (also with UseCache, whose in-place path must not cut the prefix off): gradients reach the prefix encoder only.
        using var grad = enable_grad();
        model.train();
        using var o = model.call(new GlmInput(all) { Labels = all, UseCache = true });
        o.Loss!.backward();
        o.PresentKeyValues!.Dispose();
        foreach (var (name, p) in model.named_parameters())
        {
            if (name.StartsWith("transformer.prefix_encoder.", StringComparison.Ordinal)) Assert.True(p.grad is not null && p.grad.abs().max().item<float>() > 0, $"{name} got no gradient");
            else Assert.Null(p.grad);
        }
    }
}
