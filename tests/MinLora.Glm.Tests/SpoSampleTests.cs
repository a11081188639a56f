using MinLora.Samples.SpoExtraction;

namespace MinLora.Glm.Tests;

/// <summary>README's main job on a very small configuration (seconds): the whole path runs and the saved LoRA-only file reproduces the trained model.</summary>
public sealed class SpoSampleTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "minlora-spo-sample-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, true);
    }

    [Theory]
    [InlineData(8)]
    [InlineData(0)]
    public void Pipeline_RunsEndToEnd_AndTheReloadedAdapterReproducesIt(int bits)
    {
        var log = new StringWriter();
        var r = SpoPipeline.Run(new SpoOptions { OutputDirectory = _dir, MaxTrainExamples = 48, MaxTestExamples = 6, Epochs = 1, BatchSize = 8, Bits = bits, Log = log });
        Assert.True(r.ReloadMatches, "the LoRA-only file must reproduce the trained model's predictions");
        Assert.True(r.F1Before < 0.05, $"the base was never trained on the extraction format, F1 before = {r.F1Before}");
        Assert.True(r.FinalLoss < r.FirstLoss, $"loss did not fall: {r.FirstLoss} → {r.FinalLoss}");
        Assert.True(File.Exists(Path.Combine(_dir, "lora", "adapter_model.safetensors")));
        Assert.True(File.Exists(Path.Combine(_dir, "model_with_lora.safetensors")));
        Assert.Contains("trainable params:", log.ToString(), StringComparison.Ordinal);
        Assert.True(r.Count.Trainable > 0 && r.Count.Trainable < r.Count.Total);
    }
}

/// <summary>The fine-tuning data builder and the SPO job on a v2 (ChatGLM2-style) checkpoint: ChatGLM2's sequence layout and labels, v2 batches, and the whole job end to end.</summary>
public sealed class SpoV2Tests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "minlora-spo-v2-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, true);
    }

    private string V2Base()
    {
        var dir = Path.Combine(_dir, "base");
        Directory.CreateDirectory(dir);
        foreach (var f in new[] { "config.json", "model.safetensors" }) File.Copy(Path.Combine(Fixtures.Dir("v2"), f), Path.Combine(dir, f));
        File.Copy(Path.Combine(Fixtures.Dir("tokenizer"), "tiny_v2_bpe.model"), Path.Combine(dir, "tokenizer.model"));
        return dir;
    }

    [Fact]
    public void Builder_UsesChatGlm2Layout_AndLabelsFromTheAnswer()
    {
        using var s = File.OpenRead(Path.Combine(Fixtures.Dir("tokenizer"), "tiny_v2_bpe.model"));
        var tok = MinLora.Glm.Tokenization.ChatGlm2Tokenizer.Create(s);
        var builder = new SpoDatasetBuilder(tok, new SpoTrainingOptions { MaxSourceLength = 40, MaxTargetLength = 20 });
        var example = builder.Build(new SpoExample("刹车片烧蚀", "刹车片_部件故障_烧蚀"));
        var (source, _) = builder.Source("刹车片烧蚀");
        Assert.Equal(tok.GmaskId, example.InputIds[0]);
        Assert.Equal(tok.SopId, example.InputIds[1]);
        Assert.Equal(tok.EosId, example.InputIds[^1]);
        Assert.All(example.Labels.Take(2 + source.Count), l => Assert.Equal(-100, l));
        Assert.Equal(example.InputIds.Skip(2 + source.Count), example.Labels.Skip(2 + source.Count));
        var config = GlmConfig.FromFile(Path.Combine(Fixtures.Dir("v2"), "config.json"));
        using var batch = SpoDatasetBuilder.Collate(new[] { example, builder.Build(new SpoExample("轮胎异响", "轮胎_部件故障_异响")) }, config);
        Assert.Equal(2, batch.AttentionMask.dim());
        Assert.Equal(batch.InputIds.shape, batch.PositionIds.shape);
    }

    [Theory]
    [InlineData(8)]
    [InlineData(0)]
    public void Pipeline_RunsOnAV2Checkpoint_AndTheReloadedAdapterReproducesIt(int bits)
    {
        var log = new StringWriter();
        var r = MinLora.Samples.SpoExtraction.SpoPipeline.Run(new MinLora.Samples.SpoExtraction.SpoOptions
        {
            ModelDirectory = V2Base(),
            OutputDirectory = Path.Combine(_dir, "out"),
            MaxTrainExamples = 16,
            MaxTestExamples = 4,
            Epochs = 1,
            BatchSize = 8,
            Bits = bits,
            Log = log,
            MaxSourceLength = 64,
            MaxTargetLength = 16,
        });
        Assert.True(r.ReloadMatches, "the LoRA-only file must reproduce the trained model's predictions");
        Assert.True(double.IsFinite(r.FirstLoss) && double.IsFinite(r.FinalLoss));
        Assert.True(File.Exists(Path.Combine(_dir, "out", "lora", "adapter_model.safetensors")));
    }
}
