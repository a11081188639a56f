using MinLora.Glm.Modeling;
using MinLora.Quantization;
using TorchSharp;
using TorchSharp.PyBridge;
using static TorchSharp.torch;

namespace MinLora.Glm.Tests;

/// <summary>
/// Artifacts whose licences forbid committing them (the real ChatGLM-6B config and index) are read from the shared
/// folder beside the repository: MINLORA_SHARED_DIR, or a "shared" folder next to any ancestor of the test binaries
/// (CI clones the repo beside it). Tests that need them are skipped, saying so, when it is absent.
/// </summary>
internal static class SharedData
{
    public static string? Find(string relative)
    {
        var env = Environment.GetEnvironmentVariable("MINLORA_SHARED_DIR");
        if (!string.IsNullOrEmpty(env) && File.Exists(Path.Combine(env, relative))) return Path.Combine(env, relative);
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            var candidate = Path.Combine(dir.FullName, "shared", relative);
            if (File.Exists(candidate)) return candidate;
        }
        return null;
    }
}

public sealed class CheckpointTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "minlora-glm-" + Guid.NewGuid().ToString("N"));

    public CheckpointTests() => Directory.CreateDirectory(_dir);

    public void Dispose() => Directory.Delete(_dir, true);

    private static GlmConfig Tiny => GlmConfig.FromFile(Path.Combine(Fixtures.Dir("v1"), "config.json"));

    [SkippableFact]
    public void RealChatGlm6B_MetaModelHasExactlyTheCheckpointKeys_AndTheBooksCount()
    {
        var configPath = SharedData.Find(Path.Combine("data", "chatglm-6b", "config.json"));
        var indexPath = SharedData.Find(Path.Combine("data", "chatglm-6b", "pytorch_model.bin.index.json"));
        Skip.If(configPath is null || indexPath is null, "the real ChatGLM-6B config/index are not beside the repo (../shared/data/chatglm-6b); they may not be committed");
        var config = GlmConfig.FromFile(configPath!);
        Assert.Equal(28, config.NumLayers);
        Assert.Equal(16384, config.MlpHiddenSize);
        using var model = new GlmForCausalLM(config, new GlmBuildOptions(ScalarType.Float16, new Device(DeviceType.META)));
        var keys = model.state_dict();
        using var index = System.Text.Json.JsonDocument.Parse(File.ReadAllText(indexPath!));
        var expected = index.RootElement.GetProperty("weight_map").EnumerateObject().Select(p => p.Name).OrderBy(k => k, StringComparer.Ordinal).ToList();
        Assert.Equal(expected, keys.Keys.OrderBy(k => k, StringComparer.Ordinal).ToList());
        Assert.Equal(new long[] { 12288, 4096 }, keys["transformer.layers.27.attention.query_key_value.weight"].shape);
        Assert.Equal(new long[] { 4096, 16384 }, keys["transformer.layers.0.mlp.dense_4h_to_h.weight"].shape);
        Assert.Equal(new long[] { 130528, 4096 }, keys["lm_head.weight"].shape);
        Assert.All(keys.Values, t => Assert.Equal(DeviceType.META, t.device_type));

        Assert.Equal(6_707_929_088L, model.CountParameters().Total);
        model.AddLora(new LoraConfig { TargetModules = new[] { "query_key_value" } });
        var count = model.CountParameters();
        Assert.Equal(6_709_764_096L, count.Total);
        Assert.Equal(1_835_008L, count.Trainable);
    }

    [Fact]
    public void Config_ReadsSnakeCase_IgnoresUnknownKeys_AndRejectsWhatItCannotRun()
    {
        var c = GlmConfig.FromJson("""{"model_type":"chatglm","vocab_size":100,"hidden_size":32,"num_layers":2,"num_attention_heads":4,"bos_token_id":9,"eos_token_id":8,"mask_token_id":5,"gmask_token_id":6,"pad_token_id":3,"pre_seq_len":4,"prefix_projection":true,"something_new":{"x":1}}""");
        Assert.Equal(128, c.MlpHiddenSize);
        Assert.Equal(4, c.PreSeqLen);
        Assert.True(c.PrefixProjection);
        Assert.Equal(c, GlmConfig.FromJson(c.ToJson()));
        Assert.Throws<NotSupportedException>(() => GlmConfig.FromJson("""{"model_type":"llama"}"""));
        // v2 configs are read as v2 (issue 13); one with multi-query attention but no group count is refused by name.
        Assert.Contains("multi_query_group_num", Assert.Throws<InvalidDataException>(() => GlmConfig.FromJson("""{"model_type":"chatglm","multi_query_attention":true,"padded_vocab_size":65024,"eos_token_id":2,"pad_token_id":0}""")).Message, StringComparison.Ordinal);
        Assert.Equal(GlmVersion.ChatGlm2, GlmConfig.FromJson("""{"model_type":"chatglm","multi_query_attention":true,"multi_query_group_num":2,"kv_channels":128,"padded_vocab_size":65024,"eos_token_id":2,"pad_token_id":0,"bos_token_id":null}""").Version);
        Assert.Contains("num_attention_heads", Assert.Throws<InvalidDataException>(() => GlmConfig.FromJson("""{"hidden_size":30,"num_attention_heads":4,"vocab_size":200000}""")).Message, StringComparison.Ordinal);
        Assert.Contains("bos_token_id", Assert.Throws<InvalidDataException>(() => GlmConfig.FromJson("""{"vocab_size":1000}""")).Message, StringComparison.Ordinal);
        Assert.Throws<InvalidDataException>(() => GlmConfig.FromJson("{ not json"));
        Assert.Throws<FileNotFoundException>(() => GlmConfig.FromFile(Path.Combine(_dir, "none.json")));
    }

    /// <summary>The same weights as float32 safetensors, float32 .bin, float16 .bin and float16 shards + index.</summary>
    [Fact]
    public void AllCheckpointLayouts_GiveTheSameModel()
    {
        var reference = GlmCheckpoint.ReadFile(Path.Combine(Fixtures.Dir("v1"), "model.safetensors"));
        var dir = Fixtures.Dir("v1");
        using var fromBin = Load(Path.Combine(dir, "pytorch_model.bin"));
        using var fromFp16 = Load(Path.Combine(dir, "pytorch_model_fp16.bin"));
        var shardedDir = Path.Combine(_dir, "sharded_fp16");
        Directory.CreateDirectory(shardedDir);
        File.Copy(Path.Combine(dir, "config.json"), Path.Combine(shardedDir, "config.json"));
        foreach (var f in Directory.GetFiles(Path.Combine(dir, "sharded_fp16"))) File.Copy(f, Path.Combine(shardedDir, Path.GetFileName(f)));
        var (sharded, report) = GlmCheckpoint.FromPretrained(shardedDir, new GlmLoadOptions());
        using (sharded)
        {
            Assert.Equal(2, report.Files.Count);
            Assert.Contains(report.IgnoredKeys, k => k.EndsWith("rotary_emb.inv_freq", StringComparison.Ordinal));
            var a = fromBin.state_dict();
            var b = fromFp16.state_dict();
            var c = sharded.state_dict();
            foreach (var (k, t) in reference)
            {
                if (k.EndsWith("inv_freq", StringComparison.Ordinal)) continue;
                Assert.True(Fixtures.Identical(t, a[k]), $"{k} differs when loaded from pytorch_model.bin");
                using var half = t.to(ScalarType.Float16).to(ScalarType.Float32);
                Assert.True(Fixtures.Identical(half, b[k]), $"{k} differs when loaded from the float16 .bin");
                Assert.True(Fixtures.Identical(half, c[k]), $"{k} differs when loaded from the float16 shards");
            }
        }
    }

    private GlmForCausalLM Load(string weights)
    {
        var d = Path.Combine(_dir, Path.GetFileNameWithoutExtension(weights));
        Directory.CreateDirectory(d);
        File.Copy(Path.Combine(Fixtures.Dir("v1"), "config.json"), Path.Combine(d, "config.json"));
        File.Copy(weights, Path.Combine(d, Path.GetFileName(weights)));
        return GlmCheckpoint.FromPretrained(d).Model;
    }

    [Fact]
    public void WrittenShardsAndSafetensors_LoadBack_AndBrokenFilesGiveClearErrors()
    {
        manual_seed(5);
        var config = Tiny;
        using var model = new GlmForCausalLM(config);
        var sd = model.state_dict();
        var keys = sd.Keys.ToList();
        // HF-style shards (pickle) + index, and safetensors shards + index.
        WriteShards(Path.Combine(_dir, "bin"), config, sd, keys, safetensors: false);
        WriteShards(Path.Combine(_dir, "st"), config, sd, keys, safetensors: true);
        using var ids = randint(5, 80, new long[] { 2, 7 });
        using var expected = model.call(new GlmInput(ids));
        foreach (var variant in new[] { "bin", "st" })
        {
            var (loaded, report) = GlmCheckpoint.FromPretrained(Path.Combine(_dir, variant));
            using (loaded)
            {
                Assert.Equal(3, report.Files.Count);
                using var y = loaded.call(new GlmInput(ids));
                Assert.True(Fixtures.Identical(expected.Logits, y.Logits), $"{variant}: outputs differ after a save/load round trip");
            }
        }

        // Missing shard named by the index.
        var st = Path.Combine(_dir, "st");
        File.Move(Path.Combine(st, "model-00002-of-00003.safetensors"), Path.Combine(_dir, "moved.safetensors"));
        Assert.Contains("model-00002-of-00003.safetensors", Assert.Throws<FileNotFoundException>(() => GlmCheckpoint.FromPretrained(st)).Message, StringComparison.Ordinal);
        // Corrupt (truncated) shard.
        File.WriteAllBytes(Path.Combine(st, "model-00002-of-00003.safetensors"), File.ReadAllBytes(Path.Combine(_dir, "moved.safetensors")).Take(100).ToArray());
        Assert.Contains("model-00002-of-00003.safetensors", Assert.Throws<InvalidDataException>(() => GlmCheckpoint.FromPretrained(st)).Message, StringComparison.Ordinal);
        File.Move(Path.Combine(_dir, "moved.safetensors"), Path.Combine(st, "model-00002-of-00003.safetensors"), true);

        // A wrong shape and a missing key are named.
        var broken = Path.Combine(_dir, "broken");
        var bad = sd.ToDictionary(kv => kv.Key, kv => kv.Value);
        bad["transformer.layers.1.mlp.dense_4h_to_h.weight"] = zeros(64, 100);
        bad.Remove("transformer.final_layernorm.bias");
        WriteShards(broken, config, bad, bad.Keys.ToList(), safetensors: true);
        var ex = Assert.Throws<StateDictMismatchException>(() => GlmCheckpoint.FromPretrained(broken));
        Assert.Contains("transformer.layers.1.mlp.dense_4h_to_h.weight", ex.Message, StringComparison.Ordinal);
        Assert.Contains("transformer.final_layernorm.bias", ex.Message, StringComparison.Ordinal);
        Assert.Throws<DirectoryNotFoundException>(() => GlmCheckpoint.FromPretrained(Path.Combine(_dir, "nowhere")));
    }

    private static void WriteShards(string dir, GlmConfig config, Dictionary<string, Tensor> sd, List<string> keys, bool safetensors)
    {
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJson());
        var map = new Dictionary<string, string>();
        int shards = 3;
        for (int s = 0; s < shards; s++)
        {
            var name = safetensors ? $"model-{s + 1:00000}-of-{shards:00000}.safetensors" : $"pytorch_model-{s + 1:00000}-of-{shards:00000}.bin";
            var part = keys.Where((_, i) => i % shards == s).ToDictionary(k => k, k => sd[k].detach().contiguous());
            foreach (var k in part.Keys) map[k] = name;
            if (safetensors) Safetensors.SaveStateDict(Path.Combine(dir, name), part);
            else PyTorchPickler.PickleStateDict(Path.Combine(dir, name), new System.Collections.Hashtable(part));
        }
        var index = System.Text.Json.JsonSerializer.Serialize(new { metadata = new { total_size = 0 }, weight_map = map });
        File.WriteAllText(Path.Combine(dir, safetensors ? "model.safetensors.index.json" : "pytorch_model.bin.index.json"), index);
    }

    [Fact]
    public void PreSeqLenOverride_OnABaseCheckpoint_StartsARandomPrefix_WithOnlyThePrefixTrainable()
    {
        var (model, _) = GlmCheckpoint.FromPretrained(Fixtures.Dir("v1"), new GlmLoadOptions { PreSeqLen = 3 });
        using (model)
        {
            var prefix = model.named_parameters().Where(p => p.name.StartsWith("transformer.prefix_encoder.", StringComparison.Ordinal)).ToList();
            Assert.NotEmpty(prefix);
            Assert.All(model.named_parameters(), p => Assert.Equal(p.name.StartsWith("transformer.prefix_encoder.", StringComparison.Ordinal), p.parameter.requires_grad));
            Assert.All(prefix, p => Assert.True(p.parameter.isfinite().all().item<bool>() && p.parameter.abs().sum().item<float>() > 0));
            var g = Fixtures.Golden("v1");
            using var o = model.call(new GlmInput(g["A.input_ids"]));
            Assert.True(o.Logits.isfinite().all().item<bool>());
        }
    }

    [Fact]
    public void CheckpointWithoutLmHead_TiesItToTheEmbedding()
    {
        var dir = Path.Combine(_dir, "tied");
        Directory.CreateDirectory(dir);
        File.Copy(Path.Combine(Fixtures.Dir("v1"), "config.json"), Path.Combine(dir, "config.json"));
        var sd = GlmCheckpoint.ReadFile(Path.Combine(Fixtures.Dir("v1"), "model.safetensors"));
        sd.Remove("lm_head.weight");
        Safetensors.SaveStateDict(Path.Combine(dir, "chatglm6b.pth.safetensors"), sd);
        var (model, report) = GlmCheckpoint.FromPretrained(dir);
        using (model)
        {
            Assert.True(report.TiedLmHead);
            var state = model.state_dict();
            Assert.True(Fixtures.Identical(state["transformer.word_embeddings.weight"], state["lm_head.weight"]));
        }
    }

    [Theory]
    [InlineData(8)]
    [InlineData(4)]
    public void PreQuantizedCheckpoint_LoadsIntoQuantizedSkeleton(int bits)
    {
        manual_seed(6);
        var config = Tiny with { HiddenSize = 128, NumAttentionHeads = 4, InnerHiddenSize = 256 };
        using var model = new GlmForCausalLM(config);
        model.Quantize(bits, new QuantizeOptions { Int4Format = QuantizationFormat.Int4PerRowChatGlm });
        var dir = Path.Combine(_dir, $"q{bits}");
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "config.json"), (config with { QuantizationBit = bits }).ToJson());
        Safetensors.SaveStateDict(Path.Combine(dir, "model.safetensors"), model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().contiguous()));
        var (loaded, _) = GlmCheckpoint.FromPretrained(dir);
        using (loaded)
        {
            Assert.Equal(8, loaded.modules().OfType<QuantizedLinear>().Count());
            using var ids = randint(5, 80, new long[] { 2, 6 });
            model.eval();
            using var a = model.call(new GlmInput(ids));
            using var b = loaded.call(new GlmInput(ids));
            Assert.True(Fixtures.Identical(a.Logits, b.Logits));
        }
        // A float checkpoint cannot be loaded as quantized: the error says why.
        var floatDir = Path.Combine(_dir, $"f{bits}");
        Directory.CreateDirectory(floatDir);
        using var plain = new GlmForCausalLM(config);
        File.WriteAllText(Path.Combine(floatDir, "config.json"), (config with { QuantizationBit = bits }).ToJson());
        Safetensors.SaveStateDict(Path.Combine(floatDir, "model.safetensors"), plain.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().contiguous()));
        Assert.Throws<StateDictMismatchException>(() => GlmCheckpoint.FromPretrained(floatDir));
    }

    [Fact]
    public void QuantizeOnLoad_AndLoraOnTheGlm()
    {
        var (model, _) = GlmCheckpoint.FromPretrained(Fixtures.Dir("v1"), new GlmLoadOptions { QuantizationBit = 8, Quantization = new QuantizeOptions() });
        using (model)
        {
            Assert.Equal(8, model.modules().OfType<QuantizedLinear>().Count());
            var g = Fixtures.Golden("v1");
            using var q = model.call(new GlmInput(g["A.input_ids"]));
            var rel = (q.Logits - g["A.logits"]).norm().item<float>() / g["A.logits"].norm().item<float>();
            Assert.True(rel < 0.05, $"int8 logits are {rel} away from the float reference");

            Tensor before;
            using (no_grad()) before = model.call(new GlmInput(g["A.input_ids"])).Logits;
            Assert.Equal(2, model.AddLora(new LoraConfig { TargetModules = new[] { "query_key_value" } }).Count);
            using (no_grad())
            {
                using var after = model.call(new GlmInput(g["A.input_ids"]));
                Assert.True(Fixtures.Identical(before, after.Logits), "a fresh adapter on the quantized GLM changes nothing");
            }
        }
    }

    /// <summary>
    /// Quantizing while loading (each file's complete projections right after it) gives exactly the model that loading
    /// the whole float checkpoint and quantizing it gives: same keys, identical tensors. The shards put a projection's
    /// weight and bias in different files; one case quantizes a head that is tied to the embedding (filled after the last file).
    /// </summary>
    [Theory]
    [InlineData(8, QuantizationFormat.Int4Grouped, false)]
    [InlineData(4, QuantizationFormat.Int4Grouped, true)]
    [InlineData(4, QuantizationFormat.Int4PerRowChatGlm, false)]
    public void QuantizeOnLoad_EqualsLoadingTheFloatModelThenQuantizing(int bits, QuantizationFormat int4, bool tiedHeadTarget)
    {
        manual_seed(11);
        var config = Tiny with { HiddenSize = 128, NumAttentionHeads = 4, InnerHiddenSize = 256 };
        using var source = new GlmForCausalLM(config);
        var sd = source.state_dict();
        var keys = sd.Keys.Where(k => !tiedHeadTarget || k != "lm_head.weight").ToList();
        var dir = Path.Combine(_dir, $"qol-{bits}-{int4}-{tiedHeadTarget}");
        WriteShards(dir, config, sd, keys, safetensors: true);
        var quantize = new QuantizeOptions
        {
            Int4Format = int4,
            GroupSize = 32,
            TargetModules = tiedHeadTarget ? new[] { "query_key_value", "dense_4h_to_h", "lm_head" } : QuantizeOptions.ChatGlmTargets,
        };

        var (reference, _) = GlmCheckpoint.FromPretrained(dir);
        var (streamed, report) = GlmCheckpoint.FromPretrained(dir, new GlmLoadOptions { QuantizationBit = bits, Quantization = quantize });
        using (reference)
        using (streamed)
        {
            var swapped = reference.Quantize(bits, quantize);
            Assert.Equal(tiedHeadTarget, report.TiedLmHead);
            Assert.Equal(swapped.Count, streamed.modules().OfType<QuantizedLinear>().Count());
            Assert.Equal(tiedHeadTarget, streamed.named_modules().Any(m => m.name == "lm_head" && m.module is QuantizedLinear));
            var expected = reference.state_dict();
            var actual = streamed.state_dict();
            Assert.Equal(expected.Keys.Order(StringComparer.Ordinal), actual.Keys.Order(StringComparer.Ordinal));
            Assert.All(expected, kv => Assert.True(Fixtures.Identical(kv.Value, actual[kv.Key]), kv.Key));
            using var ids = randint(5, 80, new long[] { 1, 5 });
            using var a = reference.call(new GlmInput(ids));
            using var b = streamed.call(new GlmInput(ids));
            Assert.True(Fixtures.Identical(a.Logits, b.Logits));
        }
    }

    /// <summary>
    /// A projection holds no float memory until its file is read, and is quantized right after the file that completes
    /// it, not after the whole checkpoint: with weight and bias in different shards, none is complete after the first
    /// file, some after the second, all after the third; every projection still in float waits on a meta placeholder.
    /// </summary>
    [Fact]
    public void QuantizeOnLoad_SwapsEachProjectionRightAfterTheFileThatCompletesIt()
    {
        manual_seed(12);
        var config = Tiny with { HiddenSize = 128, NumAttentionHeads = 4, InnerHiddenSize = 256 };
        using var source = new GlmForCausalLM(config);
        var sd = source.state_dict();
        var dir = Path.Combine(_dir, "qol-order");
        WriteShards(dir, config, sd, sd.Keys.ToList(), safetensors: true);
        using var model = new GlmForCausalLM(config, new GlmBuildOptions(ScalarType.Float32, CPU, GlmInit.Empty));
        var quantizer = new QuantizeWhileLoading(model, 8, new QuantizeOptions(), CPU);
        var targets = model.named_modules().Where(m => QuantizeOptions.ChatGlmTargets.Contains(m.name[(m.name.LastIndexOf('.') + 1)..])).Select(m => m.name).ToList();
        Assert.Equal(8, targets.Count);
        var counts = new List<int>();
        var progress = new InlineProgress(_ =>
        {
            counts.Add(model.modules().OfType<QuantizedLinear>().Count());
            var modules = model.named_modules().ToDictionary(m => m.name, m => m.module);
            foreach (var name in targets)
            {
                if (modules[name] is TorchSharp.Modules.Linear l)
                    Assert.True(l.parameters().Any(p => p.device_type == DeviceType.META), name + " is complete but still float");
            }
        });
        GlmCheckpoint.LoadInto(model, GlmCheckpoint.FindWeightFiles(dir), new GlmLoadOptions { Progress = progress }, Microsoft.Extensions.Logging.Abstractions.NullLogger.Instance, quantizer);
        quantizer.Finish();
        Assert.Equal(new[] { 0, counts[1], 8 }, counts);
        Assert.InRange(counts[1], 1, 7);
        Assert.Equal(8, quantizer.Quantized);
        Assert.DoesNotContain(model.parameters().Concat(model.buffers()), t => t.device_type == DeviceType.META);
    }

    private sealed class InlineProgress(Action<(int Done, int Total)> report) : IProgress<(int Done, int Total)>
    {
        public void Report((int Done, int Total) value) => report(value);
    }

    /// <summary>A tensor stored in two shards is refused with its name, not silently overwritten (or handed to the quantizer twice).</summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void ATensorStoredTwice_IsRefused(bool quantizeOnLoad)
    {
        manual_seed(13);
        var config = Tiny with { HiddenSize = 128, NumAttentionHeads = 4, InnerHiddenSize = 256 };
        using var source = new GlmForCausalLM(config);
        var sd = source.state_dict();
        var dir = Path.Combine(_dir, $"twice-{quantizeOnLoad}");
        WriteShards(dir, config, sd, sd.Keys.ToList(), safetensors: true);
        const string key = "transformer.layers.0.attention.query_key_value.weight";
        var shard = Directory.GetFiles(dir, "model-*.safetensors").Order(StringComparer.Ordinal).First(f => !Safetensors.LoadStateDict(f).ContainsKey(key));
        var extra = Safetensors.LoadStateDict(shard);
        extra[key] = sd[key].detach().contiguous();
        Safetensors.SaveStateDict(shard, extra);
        var ex = Assert.Throws<InvalidDataException>(() => GlmCheckpoint.FromPretrained(dir, new GlmLoadOptions { QuantizationBit = quantizeOnLoad ? 8 : null }));
        Assert.Contains(key, ex.Message, StringComparison.Ordinal);
    }

    /// <summary>Bad quantization settings fail before any weight file is read (the file here is not even readable).</summary>
    [Fact]
    public void QuantizeOnLoad_BadSettings_FailBeforeReadingTheWeights()
    {
        var dir = Path.Combine(_dir, "qol-bad");
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "config.json"), Tiny.ToJson());
        File.WriteAllBytes(Path.Combine(dir, "pytorch_model.bin"), new byte[] { 1, 2, 3, 4 });
        Assert.Throws<InvalidDataException>(() => GlmCheckpoint.FromPretrained(dir));
        Assert.Throws<ArgumentOutOfRangeException>(() => GlmCheckpoint.FromPretrained(dir, new GlmLoadOptions { QuantizationBit = 3 }));
        var ex = Assert.Throws<ArgumentException>(() => GlmCheckpoint.FromPretrained(dir, new GlmLoadOptions { QuantizationBit = 4, Quantization = new QuantizeOptions { TargetModules = new[] { "no_such_layer" } } }));
        Assert.Contains("no_such_layer", ex.Message, StringComparison.Ordinal);
        Assert.Throws<ArgumentException>(() => GlmCheckpoint.FromPretrained(dir, new GlmLoadOptions { QuantizationBit = 4, Quantization = new QuantizeOptions { Int4Format = QuantizationFormat.Int8PerRow } }));
        Assert.Contains("Group size 100", Assert.Throws<ArgumentException>(() => GlmCheckpoint.FromPretrained(dir, new GlmLoadOptions { QuantizationBit = 4, Quantization = new QuantizeOptions { GroupSize = 100 } })).Message, StringComparison.Ordinal);
        Assert.Contains("not a Linear", Assert.Throws<ArgumentException>(() => GlmCheckpoint.FromPretrained(dir, new GlmLoadOptions { QuantizationBit = 8, Quantization = new QuantizeOptions { TargetModules = new[] { "input_layernorm" } } })).Message, StringComparison.Ordinal);
    }

    /// <summary>bfloat16 and float16 models run; logits stay within the half types' rounding of the float32 reference.</summary>
    [Theory]
    [InlineData(ScalarType.BFloat16, 0.15)]
    [InlineData(ScalarType.Float16, 0.02)]
    public void HalfPrecisionModels_StayCloseToTheReference(ScalarType dtype, double bound)
    {
        var (model, _) = GlmCheckpoint.FromPretrained(Fixtures.Dir("v1"), new GlmLoadOptions { Dtype = dtype });
        using (model)
        {
            Assert.All(model.parameters(), p => Assert.Equal(dtype, p.dtype));
            var g = Fixtures.Golden("v1");
            using var o = model.call(new GlmInput(g["A.input_ids"]) { Labels = g["A.labels"] });
            Assert.Equal(dtype, o.Logits.dtype);
            Assert.Equal(ScalarType.Float32, o.Loss!.dtype);
            var err = Fixtures.MaxDiff(o.Logits, g["A.logits"]);
            Assert.True(err < bound, $"{dtype}: logits differ by {err}");
        }
    }

    /// <summary>
    /// quantization_embeddings: a model built with quantized projections and embedding table saves, and loads back
    /// from config.json's flags into the same quantized modules with identical logits; the table is the format's size.
    /// </summary>
    [Theory]
    [InlineData(8)]
    [InlineData(4)]
    public void QuantizedEmbeddings_BuildSaveAndLoadBack(int bits)
    {
        manual_seed(9);
        var config = Tiny with { HiddenSize = 128, NumAttentionHeads = 4, InnerHiddenSize = 256, QuantizationBit = bits, QuantizationEmbeddings = true };
        using var model = new GlmForCausalLM(config, new GlmBuildOptions { QuantizationBit = bits, QuantizeEmbeddings = true });
        var table = model.Transformer.QuantizedWordEmbeddings;
        Assert.NotNull(table);
        Assert.Throws<InvalidOperationException>(() => model.Transformer.WordEmbeddings);
        Assert.Equal(config.VocabSize * (bits == 8 ? 128L : 64L) + config.VocabSize * 2L, table.GetSizeInBytes());
        Assert.True(table.QuantizedWeight.Weight.ne(0).any().item<bool>(), "random codes, not an empty table");

        var dir = Path.Combine(_dir, $"qe{bits}");
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJson());
        var sd = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().contiguous());
        Assert.Contains("transformer.word_embeddings.weight_scale", sd.Keys);
        Safetensors.SaveStateDict(Path.Combine(dir, "model.safetensors"), sd);
        var (loaded, _) = GlmCheckpoint.FromPretrained(dir);
        using (loaded)
        {
            Assert.NotNull(loaded.Transformer.QuantizedWordEmbeddings);
            using var ids = randint(5, 80, new long[] { 2, 6 });
            model.eval();
            using var a = model.call(new GlmInput(ids));
            using var b = loaded.call(new GlmInput(ids));
            Assert.True(Fixtures.Identical(a.Logits, b.Logits));
        }
        // The flag without quantized weights is refused when the config is read.
        File.WriteAllText(Path.Combine(dir, "config.json"), (config with { QuantizationBit = 0 }).ToJson());
        Assert.Throws<InvalidDataException>(() => GlmCheckpoint.FromPretrained(dir));
    }
}
