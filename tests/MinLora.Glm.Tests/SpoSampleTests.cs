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
