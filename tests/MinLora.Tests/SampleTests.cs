using MinLora.Samples.LoraBasics;

namespace MinLora.Tests;

public sealed class SampleTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "minlora-sample-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    [Fact]
    public void LoraBasicsDemo_LossFalls_ReloadIsExact_MergeIsWithinFloatRounding()
    {
        var log = new StringWriter();
        var r = LoraBasicsDemo.Run(new DemoOptions { PretrainSteps = 150, LoraSteps = 120, OutputDirectory = _dir, Log = log, Seed = 7 });
        Assert.True(r.LoraLossOnB < r.BaseLossOnB / 5, $"LoRA should cut the task-B loss at least 5x: {r.BaseLossOnB} -> {r.LoraLossOnB}");
        Assert.True(r.LossCurve.TakeLast(10).Average() < r.LossCurve.Take(10).Average());
        Assert.Equal(0.0, r.ReloadMaxDiff);
        Assert.True(r.MergeMaxDiff < 1e-5, $"merge changed outputs by {r.MergeMaxDiff}");
        Assert.True(r.Count.Trainable > 0 && r.Count.Trainable < r.Count.Total);
        Assert.Contains("trainable params:", log.ToString(), StringComparison.Ordinal);
        Assert.True(File.Exists(Path.Combine(_dir, LoraAdapterFiles.WeightsFileName)));
    }
}
