using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Tests;

/// <summary>PEFT-layout adapter files: round trip, per-module ranks, and failures that lose nothing.</summary>
public sealed class LoraAdapterFilesTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "minlora-tests-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    [Fact]
    public void SaveThenLoad_IntoAFreshBase_ReproducesOutputs_WithPerModuleRanks()
    {
        manual_seed(21);
        using var trained = new ToyNet();
        var baseState = Snapshot.Clone(trained);
        trained.AddLora(new LoraConfig { Rank = 4, Alpha = 8, Init = LoraInit.Random, TargetModules = new[] { "fc1" } });
        trained.AddLora(new LoraConfig { Rank = 2, Alpha = 8, Init = LoraInit.Random, TargetModules = new[] { "fc2" } }); // same adapter name, other layer
        trained.eval();
        var files = trained.SaveLoraAdapter(_dir, baseModelNameOrPath: "toy");
        Assert.All(files, f => Assert.True(File.Exists(f)));
        Assert.Empty(Directory.GetFiles(_dir, "*.tmp"));

        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(_dir, LoraAdapterFiles.ConfigFileName)))!;
        Assert.Equal("LORA", config["peft_type"]!.GetValue<string>());
        Assert.Equal(4, config["r"]!.GetValue<int>());
        Assert.Equal(2, config["rank_pattern"]!["fc2"]!.GetValue<int>());
        Assert.Single(config["rank_pattern"]!.AsObject());
        var keys = TorchSharp.PyBridge.Safetensors.LoadStateDict(files[1]).Keys.OrderBy(k => k, StringComparer.Ordinal).ToList();
        Assert.Equal(new[] { "base_model.model.fc1.lora_A.weight", "base_model.model.fc1.lora_B.weight", "base_model.model.fc2.lora_A.weight", "base_model.model.fc2.lora_B.weight" }, keys);

        using var fresh = new ToyNet();
        fresh.load_state_dict(baseState);
        var adapted = fresh.LoadLoraAdapter(_dir);
        Assert.Equal(new[] { "fc1", "fc2" }, adapted.OrderBy(p => p, StringComparer.Ordinal));
        Assert.Equal(2, ((LoraLayer)fresh.GetLoraLayers().Single(l => l.Path == "fc2").Layer).GetAdapterInfo("default").Rank);
        fresh.eval();
        using var ids = randint(0, 50, new long[] { 2, 6 });
        using var a = trained.call(ids);
        using var b = fresh.call(ids);
        Assert.True(Snapshot.Identical(a, b));
    }

    [Fact]
    public void Load_WithWrongShapes_ThrowsAndLeavesTheModelUnchanged()
    {
        manual_seed(22);
        using var source = new ToyNet();
        source.AddLora(new LoraConfig { Rank = 4 });
        source.SaveLoraAdapter(_dir);
        var configPath = Path.Combine(_dir, LoraAdapterFiles.ConfigFileName);
        var json = JsonNode.Parse(File.ReadAllText(configPath))!;
        json["r"] = 3; // the tensors are rank 4
        File.WriteAllText(configPath, json.ToJsonString());

        using var target = new ToyNet();
        var keys = target.state_dict().Keys.ToList();
        var ex = Assert.Throws<StateDictMismatchException>(() => target.LoadLoraAdapter(_dir));
        Assert.NotEmpty(ex.Fit.ShapeMismatches);
        Assert.Empty(target.GetLoraLayers());
        Assert.Equal(keys, target.state_dict().Keys.ToList());
    }

    [Fact]
    public void FailedLoad_KeepsTheActiveAdapterAndTheTrainableFlags()
    {
        manual_seed(24);
        using var source = new ToyNet();
        source.AddLora(new LoraConfig { Rank = 4 });
        source.SaveLoraAdapter(_dir);
        var configPath = Path.Combine(_dir, LoraAdapterFiles.ConfigFileName);
        var json = JsonNode.Parse(File.ReadAllText(configPath))!;
        json["r"] = 2;
        File.WriteAllText(configPath, json.ToJsonString());

        using var model = new ToyNet();
        model.AddLora(new LoraConfig { AdapterName = "a", Init = LoraInit.Random, FreezeBase = false });
        var grads = model.named_parameters().ToDictionary(p => p.name, p => p.parameter.requires_grad);
        using var ids = randint(0, 50, new long[] { 1, 4 });
        using var before = model.call(ids);
        Assert.Throws<StateDictMismatchException>(() => model.LoadLoraAdapter(_dir, "b"));
        Assert.Equal(new[] { "a" }, model.GetLoraAdapterNames());
        Assert.Equal(new[] { "a" }, model.GetLoraLayers()[0].Layer.ActiveAdapters);
        Assert.Equal(grads, model.named_parameters().ToDictionary(p => p.name, p => p.parameter.requires_grad));
        using var after = model.call(ids);
        Assert.True(Snapshot.Identical(before, after));
    }

    [Fact]
    public void Load_MissingOrCorruptFiles_GiveTypedErrors()
    {
        using var model = new ToyNet();
        Assert.Throws<FileNotFoundException>(() => model.LoadLoraAdapter(_dir));
        Directory.CreateDirectory(_dir);
        File.WriteAllText(Path.Combine(_dir, LoraAdapterFiles.ConfigFileName), "{ not json");
        Assert.Throws<InvalidDataException>(() => model.LoadLoraAdapter(_dir));
        File.WriteAllText(Path.Combine(_dir, LoraAdapterFiles.ConfigFileName), "{\"peft_type\":\"LORA\",\"r\":4,\"target_modules\":[\"fc1\"]}");
        Assert.Throws<FileNotFoundException>(() => model.LoadLoraAdapter(_dir));
        File.WriteAllBytes(Path.Combine(_dir, LoraAdapterFiles.WeightsFileName), new byte[] { 1, 2, 3 });
        Assert.Throws<InvalidDataException>(() => model.LoadLoraAdapter(_dir));
        Assert.Empty(model.GetLoraLayers());
    }

    [Fact]
    public void Save_OverExistingAdapter_ReplacesItWhole()
    {
        manual_seed(23);
        using var model = new ToyNet();
        model.AddLora(new LoraConfig { Init = LoraInit.Random });
        model.SaveLoraAdapter(_dir);
        var first = File.ReadAllBytes(Path.Combine(_dir, LoraAdapterFiles.WeightsFileName));
        LoraIdentityTests.TrainSteps(model, 1);
        model.SaveLoraAdapter(_dir);
        var second = File.ReadAllBytes(Path.Combine(_dir, LoraAdapterFiles.WeightsFileName));
        Assert.NotEqual(first, second);
        Assert.Equal(2, Directory.GetFiles(_dir).Length);
    }
}
