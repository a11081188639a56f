using System.Text;
using System.Text.Json.Nodes;
using MinLora.Glm.Generation;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Tests;

/// <summary>
/// Loaders that do not trust their input: configs checked (bounds, finite values) and checked against the weight
/// files' headers before the model is allocated, index paths confined to the checkpoint, mutated index, config and
/// pickle files giving only the documented exceptions; and generation's input checks.
/// </summary>
public sealed class LoaderRobustnessTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "minlora-loader-" + Guid.NewGuid().ToString("N"));

    public LoaderRobustnessTests() => Directory.CreateDirectory(_dir);

    public void Dispose() => Directory.Delete(_dir, true);

    /// <summary>A copy of the golden v1 checkpoint (config.json + model.safetensors) with its config edited.</summary>
    private string Checkpoint(string name, Action<JsonObject>? edit = null, string weights = "model.safetensors")
    {
        var dir = Path.Combine(_dir, name);
        Directory.CreateDirectory(dir);
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures.Dir("v1"), "config.json")))!.AsObject();
        edit?.Invoke(config);
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJsonString());
        File.Copy(Path.Combine(Fixtures.Dir("v1"), weights), Path.Combine(dir, weights));
        return dir;
    }

    [Theory]
    [InlineData("num_layers", "1000000", "num_layers 1000000 is above")]
    [InlineData("hidden_size", "2000000000", "hidden_size 2000000000 is above")]
    [InlineData("vocab_size", "-5", "vocab_size must be positive")]
    [InlineData("layernorm_epsilon", "-1", "layernorm_epsilon")]
    [InlineData("layernorm_epsilon", "\"NaN\"", "layernorm_epsilon")]
    [InlineData("num_layers", "\"many\"", "not a valid GLM config")]
    public void HostileConfig_IsRefusedBeforeAllocating(string key, string json, string expected)
    {
        var dir = Checkpoint("bad", c => c[key] = JsonNode.Parse(json));
        var ex = Assert.Throws<InvalidDataException>(() => GlmCheckpoint.FromPretrained(dir));
        Assert.Contains(expected, ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void ConfigDisagreeingWithTheWeightFiles_IsRefusedBeforeAllocating()
    {
        var layers = Checkpoint("layers", c => c["num_layers"] = 500);
        var ex = Assert.Throws<InvalidDataException>(() => GlmCheckpoint.FromPretrained(layers));
        Assert.Contains("num_layers 500, the weight files hold 2 layers", ex.Message, StringComparison.Ordinal);
        var vocab = Checkpoint("vocab", c => c["vocab_size"] = 4000);
        ex = Assert.Throws<InvalidDataException>(() => GlmCheckpoint.FromPretrained(vocab));
        Assert.Contains("word_embeddings", ex.Message, StringComparison.Ordinal);
        Assert.Contains("model.safetensors", ex.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("\"/etc/passwd\"", "outside the checkpoint directory")]
    [InlineData("\"../model.safetensors\"", "outside the checkpoint directory")]
    [InlineData("5", "is not a file name")]
    [InlineData("null", "is not a file name")]
    public void IndexEntries_AreConfinedToTheCheckpoint(string value, string expected)
    {
        var dir = Checkpoint("index");
        File.WriteAllText(Path.Combine(dir, "model.safetensors.index.json"), $"{{\"weight_map\":{{\"lm_head.weight\":{value}}}}}");
        var ex = Assert.Throws<InvalidDataException>(() => GlmCheckpoint.FromPretrained(dir));
        Assert.Contains(expected, ex.Message, StringComparison.Ordinal);
        Assert.Contains("index.json", ex.Message, StringComparison.Ordinal);
    }

    private static byte[] Mutate(byte[] bytes, Random rng, string alphabet)
    {
        if (rng.Next(4) == 0) return bytes[..rng.Next(bytes.Length)];
        var copy = (byte[])bytes.Clone();
        for (int m = rng.Next(1, 4); m > 0; m--)
            copy[rng.Next(copy.Length)] = rng.Next(2) == 0 ? (byte)rng.Next(256) : (byte)alphabet[rng.Next(alphabet.Length)];
        return copy;
    }

    /// <summary>
    /// Mutated/truncated index files, config files and pickle weight files (time-bounded, about 3,000 in all): loading
    /// either succeeds or throws one of the documented exceptions (InvalidDataException, FileNotFoundException,
    /// NotSupportedException) — never anything else, and never a native crash.
    /// </summary>
    [Fact]
    public void Fuzz_IndexConfigAndPickle_OnlyDocumentedExceptions()
    {
        var rng = new Random(99);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        int refused = 0, total = 0;
        void Expect(Action load)
        {
            total++;
            try
            {
                load();
            }
            catch (Exception ex) when (ex is InvalidDataException or FileNotFoundException or NotSupportedException)
            {
                refused++;
            }
        }

        var sharded = Path.Combine(_dir, "sharded");
        Directory.CreateDirectory(sharded);
        foreach (var f in Directory.GetFiles(Path.Combine(Fixtures.Dir("v1"), "sharded_fp16"))) File.Copy(f, Path.Combine(sharded, Path.GetFileName(f)));
        var indexPath = Path.Combine(sharded, "pytorch_model.bin.index.json");
        var index = File.ReadAllBytes(indexPath);
        for (int i = 0; i < 1500 && clock.Elapsed < TimeSpan.FromSeconds(15); i++)
        {
            File.WriteAllBytes(indexPath, Mutate(index, rng, "{}[]\":,./0123456789abc"));
            Expect(() => GlmCheckpoint.FindWeightFiles(sharded));
        }

        var configText = Encoding.UTF8.GetBytes(File.ReadAllText(Path.Combine(Fixtures.Dir("v1"), "config.json")));
        for (int i = 0; i < 1500 && clock.Elapsed < TimeSpan.FromSeconds(30); i++)
            Expect(() => GlmConfig.FromJson(Encoding.UTF8.GetString(Mutate(configText, rng, "{}[]\":,-.0123456789eE"))));

        var pickle = File.ReadAllBytes(Path.Combine(Fixtures.Dir("v1"), "pytorch_model_fp16.bin"));
        var picklePath = Path.Combine(_dir, "fuzz.bin");
        for (int i = 0; i < 500 && clock.Elapsed < TimeSpan.FromSeconds(60); i++)
        {
            File.WriteAllBytes(picklePath, Mutate(pickle, rng, "\u0080()[]}qX0123456789"));
            Expect(() =>
            {
                foreach (var t in GlmCheckpoint.ReadFile(picklePath).Values) t.Dispose();
            });
        }
        Assert.True(total >= 1000, $"only {total} mutated files tried");
        Assert.True(refused > total / 4, $"only {refused} of {total} refused");
    }

    private static GlmForCausalLM TinyModel()
    {
        manual_seed(4);
        var config = TinyGlm.V1(32, 4, maxSequenceLength: 256);
        return new GlmForCausalLM(config);
    }

    [Fact]
    public void Generate_ChecksIds_RefusesStopStrings_AndTakesTemperatureZeroAsGreedy()
    {
        using var model = TinyModel();
        var prompt = new[] { 5, 17, 293, 290 };
        var ex = Assert.Throws<ArgumentException>(() => model.Generate(new[] { new[] { 5, 300, 293, 290 } }, new GenerationOptions { DoSample = false, MaxNewTokens = 2 }));
        Assert.Contains("token id 300 is outside the vocabulary", ex.Message, StringComparison.Ordinal);
        Assert.Throws<ArgumentException>(() => model.Generate(new[] { new[] { -1, 293, 290 } }, new GenerationOptions { DoSample = false, MaxNewTokens = 2 }));
        Assert.Contains("StopStrings", Assert.Throws<ArgumentException>(() => model.Generate(new[] { prompt }, new GenerationOptions { StopStrings = new[] { "\n" } })).Message, StringComparison.Ordinal);

        var greedy = model.Generate(new[] { prompt }, new GenerationOptions { DoSample = false, MaxNewTokens = 4 });
        var zero = model.Generate(new[] { prompt }, new GenerationOptions { DoSample = false, Temperature = 0, MaxNewTokens = 4 });
        Assert.Equal(greedy[0].TokenIds, zero[0].TokenIds);
        Assert.Throws<ArgumentOutOfRangeException>(() => model.Generate(new[] { prompt }, new GenerationOptions { DoSample = true, Temperature = 0 }));
    }

    [Fact]
    public void HugeMask_IsRefusedWithAClearMessage()
    {
        var config = new GlmConfig { VocabSize = 300, HiddenSize = 32, NumLayers = 1, NumAttentionHeads = 4, BosTokenId = 290, EosTokenId = 291, MaskTokenId = 292, GmaskTokenId = 293, PadTokenId = 0 };
        using var ids = zeros(new long[] { 2, 40_000 }, dtype: ScalarType.Int64);
        var ex = Assert.Throws<ArgumentException>(() => GlmMasks.BuildAttentionMask(ids, config));
        Assert.Contains("does not fit one array", ex.Message, StringComparison.Ordinal);
    }
}
