using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MinLora.Tests;

/// <summary>Algebraic identities of LoRA on random models of several shapes and dtypes.</summary>
public class LoraIdentityTests
{
    public static TheoryData<ScalarType> Dtypes => new() { ScalarType.Float32, ScalarType.Float64, ScalarType.BFloat16, ScalarType.Float16 };

    private static Tensor Ids(long batch = 3, long seq = 5, long vocab = 50) => randint(0, vocab, new[] { batch, seq }, dtype: ScalarType.Int64);

    /// <summary>
    /// Tolerance of merged-vs-unmerged outputs: merging rounds W + ΔW to the weight dtype once, so outputs differ by
    /// about (machine epsilon of the dtype) × Σ|w·x| ≈ eps × a few units for these tiny layers. eps: fp64 2.2e-16,
    /// fp32 1.2e-7, bf16 7.8e-3, fp16 9.8e-4. We allow ~64 eps (fp32/fp64) and a few eps of the half types, scaled by
    /// the magnitude of the outputs (about 1 here).
    /// </summary>
    private static double MergeTolerance(ScalarType t) => t switch
    {
        ScalarType.Float64 => 1e-12,
        ScalarType.Float32 => 1e-5,
        ScalarType.Float16 => 1e-2,
        _ => 6e-2,
    };

    [Theory]
    [MemberData(nameof(Dtypes))]
    public void FreshAdapter_ChangesNoOutput(ScalarType dtype)
    {
        manual_seed(1);
        using var model = new ToyNet(dtype: dtype);
        using var ids = Ids();
        using var before = model.call(ids);
        var adapted = model.AddLora(new LoraConfig { Rank = 3, Alpha = 6, TargetTypes = LoraTargetTypes.All });
        Assert.Equal(new[] { "emb", "fc1", "fc2" }, adapted);
        using var after = model.call(ids);
        Assert.True(Snapshot.Identical(before, after), "a fresh adapter (B = 0, or A = 0 for embeddings) must not change outputs");
    }

    [Theory]
    [MemberData(nameof(Dtypes))]
    public void Merge_EqualsUnmerged_WithinDtypeRounding(ScalarType dtype)
    {
        manual_seed(2);
        using var model = new ToyNet(dtype: dtype);
        model.AddLora(new LoraConfig { Rank = 4, Alpha = 8, Init = LoraInit.Random, TargetTypes = LoraTargetTypes.All, AdapterDtype = dtype is ScalarType.Float64 ? null : ScalarType.Float32 });
        model.eval();
        using var ids = Ids();
        using var unmerged = model.call(ids).to(ScalarType.Float64);
        using (model.DisableLora())
        {
            using var baseOut = model.call(ids).to(ScalarType.Float64);
            Assert.True((unmerged - baseOut).abs().max().item<double>() > 10 * MergeTolerance(dtype), "the random adapter must change outputs, or this test proves nothing");
        }
        var result = model.MergeLora();
        Assert.True(result.Exact);
        Assert.True(result.Unloaded);
        Assert.Empty(model.GetLoraLayers());
        using var merged = model.call(ids).to(ScalarType.Float64);
        var diff = (merged - unmerged).abs().max().item<double>();
        Assert.True(diff <= MergeTolerance(dtype), $"merged differs from unmerged by {diff} in {dtype}");
    }

    [Fact]
    public void Conv2d_MergeEqualsUnmerged_AndFreshAdapterIsIdentity()
    {
        manual_seed(3);
        using var model = new ConvNet(ScalarType.Float64);
        using var x = randn(2, 3, 9, 7, dtype: ScalarType.Float64);
        using var before = model.call(x);
        model.AddLora(new LoraConfig { Rank = 2, TargetTypes = LoraTargetTypes.Conv2d });
        using var fresh = model.call(x);
        Assert.True(Snapshot.Identical(before, fresh));

        foreach (var (_, layer) in model.GetLoraLayers())
        {
            using var noGrad = no_grad();
            foreach (var (_, p) in layer.named_parameters()) if (p.shape.Length == 4 && p.shape[2] == 1) p.normal_();
        }
        using var unmerged = model.call(x);
        Assert.True((unmerged - before).abs().max().item<double>() > 1e-3);
        model.MergeLora();
        using var merged = model.call(x);
        Assert.True((merged - unmerged).abs().max().item<double>() < 1e-10);
    }

    [Fact]
    public void MergeWithoutUnload_ThenUnmerge_RestoresOutputs()
    {
        manual_seed(4);
        using var model = new ToyNet(dtype: ScalarType.Float64);
        using var ids = Ids();
        using var baseOut = model.call(ids);
        model.AddLora(new LoraConfig { Init = LoraInit.Random, TargetTypes = LoraTargetTypes.All });
        using var adapted = model.call(ids);
        var r = model.MergeLora(unload: false);
        Assert.False(r.Unloaded);
        using var merged = model.call(ids);
        Assert.True((merged - adapted).abs().max().item<double>() < 1e-12, "merged adapters are skipped in forward, not added twice");
        Assert.Throws<InvalidOperationException>(() => model.DisableLora());
        model.UnmergeLora();
        using var unmerged = model.call(ids);
        Assert.True((unmerged - adapted).abs().max().item<double>() < 1e-12);
        using (model.DisableLora())
        {
            using var again = model.call(ids);
            Assert.True((again - baseOut).abs().max().item<double>() < 1e-12, "unmerge must give back the base weights");
        }
    }

    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    public void Remove_GivesBackTheExactOriginalTensorsAndModules(ScalarType dtype)
    {
        manual_seed(5);
        using var model = new ToyNet(dtype: dtype);
        var original = Snapshot.Clone(model);
        var fc1 = model.Fc1;
        var fc1Weight = ((Linear)fc1).weight;
        model.AddLora(new LoraConfig { Init = LoraInit.Random, TargetTypes = LoraTargetTypes.All });
        Assert.IsAssignableFrom<LoraLayer>(model.Fc1);
        // Train a little, merge and unmerge: remove must still restore the exact base.
        TrainSteps(model, 2);
        var removed = model.RemoveLora();
        Assert.Equal(3, removed.Count);
        Assert.Same(fc1, model.Fc1);
        Assert.Same(fc1Weight, ((Linear)model.Fc1).weight);
        var after = model.state_dict();
        Assert.Equal(original.Keys.OrderBy(k => k, StringComparer.Ordinal), after.Keys.OrderBy(k => k, StringComparer.Ordinal));
        Snapshot.AssertEqual(original, after);
    }

    [Fact]
    public void OptimizerSteps_OverLoraParameters_ChangeOnlyLoraTensors()
    {
        manual_seed(6);
        using var model = new ToyNet();
        var baseKeys = model.state_dict().Keys.ToList();
        model.AddLora(new LoraConfig { Rank = 2, Init = LoraInit.Random, TargetTypes = LoraTargetTypes.All, Dropout = 0.1 });
        var before = Snapshot.Clone(model);
        var loraKeys = before.Keys.Except(baseKeys).ToList();
        Assert.Equal(6, loraKeys.Count); // emb: 2 embedding factors; fc1, fc2: A and B each
        Assert.All(baseKeys, k => Assert.False(model.state_dict()[k].requires_grad, $"{k} should be frozen"));
        TrainSteps(model, 3);
        var after = model.state_dict();
        Snapshot.AssertEqual(before, after, baseKeys);
        Assert.All(loraKeys, k => Assert.False(Snapshot.Identical(before[k], after[k]), $"LoRA tensor {k} did not change"));
    }

    [Fact]
    public void LoraOnlyDict_RoundTripsIntoAFreshlyAdaptedModel()
    {
        manual_seed(7);
        using var trained = new ToyNet();
        var baseState = Snapshot.Clone(trained);
        var config = new LoraConfig { Rank = 3, Alpha = 2, TargetTypes = LoraTargetTypes.All };
        trained.AddLora(config with { Init = LoraInit.Random });
        TrainSteps(trained, 2);
        trained.eval();
        var loraDict = trained.GetLoraStateDict();
        Assert.Contains("fc1.lora_A.weight", loraDict.Keys);
        Assert.Contains("fc1.lora_B.weight", loraDict.Keys);
        Assert.Contains("emb.lora_embedding_A", loraDict.Keys);
        Assert.Equal(new long[] { 3, 16 }, loraDict["fc1.lora_A.weight"].shape);
        Assert.Equal(new long[] { 24, 3 }, loraDict["fc1.lora_B.weight"].shape);

        manual_seed(70);
        using var fresh = new ToyNet();
        fresh.load_state_dict(baseState);
        fresh.AddLora(config);
        var result = fresh.LoadLoraStateDict(loraDict);
        Assert.True(result.IsComplete);
        fresh.eval();
        using var ids = Ids();
        using var a = trained.call(ids);
        using var b = fresh.call(ids);
        Assert.True(Snapshot.Identical(a, b));
    }

    [Fact]
    public void FullStateDict_RoundTrips_AndBaseCheckpointLoadsBeforeAndAfterAddLora()
    {
        manual_seed(8);
        using var source = new ToyNet();
        var baseCheckpoint = Snapshot.Clone(source);
        source.AddLora(new LoraConfig { Init = LoraInit.Random });
        var full = Snapshot.Clone(source);
        Assert.True(baseCheckpoint.Keys.All(full.ContainsKey), "AddLora must keep every base key");

        manual_seed(80);
        using var target = new ToyNet();
        target.AddLora(new LoraConfig { Init = LoraInit.Random });
        target.load_state_dict(full, strict: true);
        using var ids = Ids();
        using var a = source.call(ids);
        using var b = target.call(ids);
        Assert.True(Snapshot.Identical(a, b));

        // A plain base checkpoint loads into the adapted model: only LoRA keys are missing.
        manual_seed(81);
        using var other = new ToyNet();
        other.AddLora();
        var (missing, unexpected) = other.load_state_dict(baseCheckpoint, strict: false);
        Assert.Empty(unexpected);
        Assert.All(missing, k => Assert.Contains(".lora_", k, StringComparison.Ordinal));
        Snapshot.AssertEqual(baseCheckpoint, other.state_dict(), baseCheckpoint.Keys);
    }

    [Fact]
    public void ModuleTo_MovesBaseAndAdapters_AndKeepsKeys()
    {
        manual_seed(9);
        using var model = new ToyNet();
        model.AddLora(new LoraConfig { Init = LoraInit.Random, TargetTypes = LoraTargetTypes.All });
        var keys = model.state_dict().Keys.ToList();
        model.to(ScalarType.Float64);
        var sd = model.state_dict();
        Assert.Equal(keys, sd.Keys.ToList());
        Assert.All(sd.Values, t => Assert.Equal(ScalarType.Float64, t.dtype));
        var layer = (LoraLinear)model.Fc1;
        Assert.Same(((Linear)layer.BaseLayer).weight, sd["fc1.weight"]);
        using var ids = Ids();
        using var y = model.call(ids);
        Assert.Equal(ScalarType.Float64, y.dtype);
    }

    internal static void TrainSteps(nn.Module<Tensor, Tensor> model, int steps)
    {
        model.train();
        var optimizer = optim.Adam(model.GetLoraParameters(), lr: 0.05);
        for (int i = 0; i < steps; i++)
        {
            using var scope = NewDisposeScope();
            optimizer.zero_grad();
            var ids = Ids();
            var y = model.call(ids);
            var loss = y.to(ScalarType.Float32).pow(2).mean();
            loss.backward();
            optimizer.step();
        }
    }
}
