using TorchSharp;
using TorchSharp.PyBridge;
using static TorchSharp.torch;

namespace MinLora.Tests;

/// <summary>
/// An adapter written by Hugging Face PEFT itself (Fixtures/peft, see its README) loads through LoadLoraAdapter and
/// reproduces PEFT's outputs: adapted, disabled and merged.
/// </summary>
public class PeftInteropTests
{
    private static string Fixture(string name) => Path.Combine(AppContext.BaseDirectory, "Fixtures", "peft", name);

    /// <summary>Both sides compute in float32 with the same operations; 1e-5 absolute covers summation-order differences on outputs of order 1.</summary>
    [Fact]
    public void PeftAdapter_LoadsAndReproducesPeftOutputs()
    {
        var io = Safetensors.LoadStateDict(Fixture("peft_io.safetensors"));
        using var model = new ToyNet();
        model.load_state_dict(Safetensors.LoadStateDict(Fixture("peft_base.safetensors")));
        model.eval();
        using (var baseOut = model.call(io["ids"]))
        {
            Assert.True((baseOut - io["base"]).abs().max().item<float>() < 1e-5, "the base model must already match PEFT's base outputs");
        }

        var adapted = model.LoadLoraAdapter(Fixture("adapter"));
        Assert.Equal(new[] { "emb", "fc1", "fc2" }, adapted);
        var info = model.GetLoraLayers()[1].Layer.GetAdapterInfo("default");
        Assert.Equal(4, info.Rank);
        Assert.Equal(2.0, info.Scaling);

        using var y = model.call(io["ids"]);
        var err = (y - io["adapted"]).abs().max().item<float>();
        Assert.True(err < 1e-5, $"adapted outputs differ from PEFT's by {err}");
        Assert.True((io["adapted"] - io["base"]).abs().max().item<float>() > 0.1, "PEFT's adapter changes outputs, so this test can fail");

        using (model.DisableLora())
        {
            using var off = model.call(io["ids"]);
            Assert.True((off - io["base"]).abs().max().item<float>() < 1e-5);
        }

        model.MergeLora();
        using var merged = model.call(io["ids"]);
        Assert.True((merged - io["merged"]).abs().max().item<float>() < 1e-5);
    }

    [Fact]
    public void OurAdapterFiles_UseExactlyPeftsKeysAndShapes()
    {
        var peftKeys = Safetensors.LoadStateDict(Fixture(Path.Combine("adapter", "adapter_model.safetensors")))
            .ToDictionary(kv => kv.Key, kv => kv.Value.shape);
        using var model = new ToyNet();
        model.AddLora(new LoraConfig { Rank = 4, Alpha = 8, TargetModules = new[] { "emb", "fc1", "fc2" } });
        var dir = Path.Combine(Path.GetTempPath(), "minlora-peft-" + Guid.NewGuid().ToString("N"));
        try
        {
            model.SaveLoraAdapter(dir);
            var ours = Safetensors.LoadStateDict(Path.Combine(dir, LoraAdapterFiles.WeightsFileName)).ToDictionary(kv => kv.Key, kv => kv.Value.shape);
            Assert.Equal(peftKeys.Keys.OrderBy(k => k, StringComparer.Ordinal), ours.Keys.OrderBy(k => k, StringComparer.Ordinal));
            Assert.All(peftKeys, kv => Assert.Equal(kv.Value, ours[kv.Key]));
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }
}
