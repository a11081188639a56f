using MinLora.Quantization;
using static TorchSharp.torch;

namespace MinLora.Glm.Tests;

/// <summary>
/// SavePretrained → FromPretrained round trips: identical logits for v1 and v2, sharded with an index, quantized
/// (config says quantization_bit and the skeleton reloads the stored codes), a LoRA-merged model, and refusals that
/// leave nothing half-written.
/// </summary>
public sealed class SavePretrainedTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "minlora-save-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, true);
    }

    private static void AssertSameLogits(GlmForCausalLM a, GlmForCausalLM b, Tensor ids)
    {
        using var x = a.call(new GlmInput(ids));
        using var y = b.call(new GlmInput(ids));
        Assert.True(Fixtures.Identical(x.Logits, y.Logits), $"logits differ by {Fixtures.MaxDiff(x.Logits, y.Logits)}");
    }

    [Theory]
    [InlineData("v1")]
    [InlineData("v2")]
    public void FloatModel_RoundTrips_ShardedWithAnIndex(string name)
    {
        using var model = GlmCheckpoint.FromPretrained(Fixtures.Dir(name)).Model;
        var target = Path.Combine(_dir, name);
        var files = model.SavePretrained(target, new GlmSaveOptions { MaxShardBytes = 300_000, TokenizerDirectory = Fixtures.Dir("tokenizer") });
        Assert.Contains("model.safetensors.index.json", files);
        Assert.True(files.Count(f => f.StartsWith("model-", StringComparison.Ordinal)) >= 2);
        using var loaded = GlmForCausalLM.FromPretrained(target);
        Assert.NotNull(loaded.LoadReport);
        Assert.True(loaded.LoadReport.Files.Count >= 2);
        AssertSameLogits(model, loaded, Fixtures.Golden(name)["A.input_ids"]);
    }

    /// <summary>A single-file save over an earlier sharded save leaves no stale index or shards to load instead.</summary>
    [Fact]
    public void SaveOverAnEarlierCheckpoint_LeavesNoStaleWeights()
    {
        using var model = GlmCheckpoint.FromPretrained(Fixtures.Dir("v1")).Model;
        var target = Path.Combine(_dir, "over");
        model.SavePretrained(target, new GlmSaveOptions { MaxShardBytes = 300_000 });
        File.WriteAllText(Path.Combine(target, "notes.txt"), "kept");
        model.AddLora(new LoraConfig { TargetModules = new[] { "query_key_value" }, Init = LoraInit.Random });
        model.MergeLora();
        model.SavePretrained(target);
        Assert.Equal(new[] { "config.json", "model.safetensors", "notes.txt" }, Directory.GetFiles(target).Select(Path.GetFileName).OrderBy(f => f, StringComparer.Ordinal));
        using var loaded = GlmCheckpoint.FromPretrained(target).Model;
        AssertSameLogits(model, loaded, Fixtures.Golden("v1")["A.input_ids"]);
    }

    [Fact]
    public void QuantizedModel_RoundTrips_AsAPreQuantizedCheckpoint()
    {
        using var model = GlmCheckpoint.FromPretrained(Fixtures.Dir("v1")).Model;
        model.Quantize(4, new QuantizeOptions { Int4Format = QuantizationFormat.Int4PerRowChatGlm });
        var target = Path.Combine(_dir, "q4");
        model.SavePretrained(target);
        Assert.Equal(4, GlmConfig.FromFile(Path.Combine(target, "config.json")).QuantizationBit);
        using var loaded = GlmCheckpoint.FromPretrained(target).Model;
        Assert.Equal(8, loaded.modules().OfType<QuantizedLinear>().Count());
        AssertSameLogits(model, loaded, Fixtures.Golden("v1")["A.input_ids"]);

        model.Dequantize();
        model.Quantize(4, new QuantizeOptions { Int4Format = QuantizationFormat.Int4Grouped, GroupSize = 32 });   // grouped int4: not a ChatGLM layout
        Assert.Throws<NotSupportedException>(() => model.SavePretrained(Path.Combine(_dir, "g128")));
        Assert.False(Directory.Exists(Path.Combine(_dir, "g128")));
    }

    /// <summary>A v2 model quantized to int8 goes out as a pre-quantized ChatGLM2-style checkpoint and comes back the same.</summary>
    [Fact]
    public void QuantizedV2Model_RoundTrips()
    {
        using var model = GlmCheckpoint.FromPretrained(Fixtures.Dir("v2")).Model;
        model.Quantize(8);
        var target = Path.Combine(_dir, "v2q8");
        model.SavePretrained(target);
        var config = GlmConfig.FromFile(Path.Combine(target, "config.json"));
        Assert.Equal(8, config.QuantizationBit);
        Assert.Equal(GlmVersion.ChatGlm2, config.Version);
        using var loaded = GlmCheckpoint.FromPretrained(target).Model;
        Assert.Equal(8, loaded.modules().OfType<QuantizedLinear>().Count());
        AssertSameLogits(model, loaded, Fixtures.Golden("v2")["A.input_ids"]);
    }

    [Fact]
    public void LoraModel_IsRefused_UntilMerged_AndAPreviousCheckpointSurvivesARefusal()
    {
        using var model = GlmCheckpoint.FromPretrained(Fixtures.Dir("v1")).Model;
        var target = Path.Combine(_dir, "merged");
        model.SavePretrained(target);
        var before = File.ReadAllBytes(Path.Combine(target, "model.safetensors"));
        model.AddLora(new LoraConfig { TargetModules = new[] { "query_key_value" }, Init = LoraInit.Random });
        Assert.Throws<InvalidOperationException>(() => model.SavePretrained(target));
        Assert.Equal(before, File.ReadAllBytes(Path.Combine(target, "model.safetensors")));
        model.MergeLora();
        model.SavePretrained(target);
        using var loaded = GlmCheckpoint.FromPretrained(target).Model;
        AssertSameLogits(model, loaded, Fixtures.Golden("v1")["A.input_ids"]);
    }
}
