using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MinLora.Tests;

/// <summary>Forward reference, configuration, targeting, multiple adapters, mixed precision and strict loading.</summary>
public class LoraBehaviourTests
{
    private sealed class OneLinear : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module<Tensor, Tensor> proj;

        public OneLinear(long i, long o, ScalarType dtype) : base(nameof(OneLinear))
        {
            proj = nn.Linear(i, o, dtype: dtype);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x) => proj.call(x);
    }

    /// <summary>
    /// y = x Wᵀ + b + scale·(dropout(x) Aᵀ) Bᵀ, computed in float64 from the layer's own float32 tensors. The
    /// dropout mask is reproduced by re-seeding the generator (the layer draws nothing else). Float32 vs float64
    /// over K = 20 terms: |error| ≲ K·eps32·Σ|terms| ≈ 1e-5 for values of order 1, so 2e-5 absolute.
    /// </summary>
    [Theory]
    [InlineData(0.0, false)]
    [InlineData(0.3, true)]
    [InlineData(0.3, false)]
    public void Forward_MatchesFloat64Reference(double dropout, bool training)
    {
        manual_seed(11);
        using var model = new OneLinear(20, 7, ScalarType.Float32);
        model.AddLora(new LoraConfig { Rank = 5, Alpha = 3, Dropout = dropout, Init = LoraInit.Random });
        var layer = (LoraLinear)model.GetLoraLayers().Single().Layer;
        model.train(training);
        using var x = randn(4, 3, 20);

        manual_seed(99);
        using var y = model.call(x);

        manual_seed(99);
        using var dropped = training && dropout > 0 ? nn.functional.dropout(x, dropout, true) : x.alias();
        var sd = model.state_dict();
        using var w = sd["proj.weight"].to(ScalarType.Float64);
        using var b = sd["proj.bias"].to(ScalarType.Float64);
        using var a = sd["proj.lora_A.default.weight"].to(ScalarType.Float64);
        using var bb = sd["proj.lora_B.default.weight"].to(ScalarType.Float64);
        using var x64 = x.to(ScalarType.Float64);
        using var d64 = dropped.to(ScalarType.Float64);
        double scale = 3.0 / 5.0;
        Assert.Equal(scale, layer.GetAdapterInfo("default").Scaling);
        using var expected = x64.matmul(w.t()) + b + d64.matmul(a.t()).matmul(bb.t()) * scale;
        var diff = (y.to(ScalarType.Float64) - expected).abs().max().item<double>();
        Assert.True(diff < 2e-5, $"max |y - y_ref| = {diff}");
    }

    [Fact]
    public void RsLora_ScalesByAlphaOverSqrtRank()
    {
        var c = new LoraConfig { Rank = 16, Alpha = 8, UseRsLora = true };
        Assert.Equal(2.0, c.Scaling);
        Assert.Equal(0.5, (c with { UseRsLora = false }).Scaling);
    }

    [Theory]
    [InlineData(0, 1, 0)]
    [InlineData(-2, 1, 0)]
    [InlineData(4, 0, 0)]
    [InlineData(4, -1, 0)]
    [InlineData(4, double.NaN, 0)]
    [InlineData(4, 1, 1)]
    [InlineData(4, 1, -0.1)]
    public void Config_OutOfRange_Throws(int rank, double alpha, double dropout)
    {
        using var model = new ToyNet();
        var c = new LoraConfig { Rank = rank, Alpha = alpha, Dropout = dropout };
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() => model.AddLora(c));
        Assert.Contains(ex.ParamName!, new[] { "Rank", "Alpha", "Dropout" });
        Assert.Empty(model.GetLoraLayers());
    }

    [Fact]
    public void Targets_UseExactOrDotSuffixMatch_NotSubstrings()
    {
        using var model = new Stack(2, 8);
        var adapted = model.AddLora(new LoraConfig { TargetModules = new[] { "query_key_value" } });
        Assert.Equal(new[] { "layers.0.query_key_value", "layers.1.query_key_value" }, adapted);

        using var other = new Stack(1, 8);
        // "value" is a suffix of "query_key_value" as a string but not as a dotted name: only head.value matches.
        Assert.Equal(new[] { "head.value" }, other.AddLora(new LoraConfig { TargetModules = new[] { "value" } }));
        Assert.Equal(new[] { "layers.0.dense" }, other.AddLora(new LoraConfig { AdapterName = "p", TargetPredicate = (n, m) => n.EndsWith("dense", StringComparison.Ordinal) }));
    }

    [Fact]
    public void Targets_NoMatch_ThrowsAndListsCandidates()
    {
        using var model = new Stack(1, 8);
        var ex = Assert.Throws<ArgumentException>(() => model.AddLora(new LoraConfig { TargetModules = new[] { "q_proj" } }));
        Assert.Contains("No module matched", ex.Message, StringComparison.Ordinal);
        Assert.Contains("layers.0.query_key_value", ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Targets_UnsupportedModule_Throws()
    {
        using var model = new Stack(1, 8);
        var ex = Assert.Throws<ArgumentException>(() => model.AddLora(new LoraConfig { TargetModules = new[] { "act" } }));
        Assert.Contains("head.act", ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void SequentialAndModuleListParents_AreSwappedAndUsedInForward()
    {
        manual_seed(12);
        using var model = new Stack(2, 8);
        using var x = randn(3, 8);
        using var before = model.call(x);
        var adapted = model.AddLora(new LoraConfig { Init = LoraInit.Random });
        Assert.Equal(6, adapted.Count); // 2 blocks × (query_key_value, dense) + head.proj + head.value
        using var after = model.call(x);
        Assert.False(Snapshot.Identical(before, after), "the wrappers inside ModuleList/Sequential must be the ones called");
        model.RemoveLora();
        using var restored = model.call(x);
        Assert.True(Snapshot.Identical(before, restored));
    }

    [Fact]
    public void FieldTypedLinear_ThrowsClearly_AndLeavesModelUnchanged()
    {
        using var model = new RigidNet();
        var keys = model.state_dict().Keys.ToList();
        var ex = Assert.Throws<InvalidOperationException>(() => model.AddLora());
        Assert.Contains("Module<Tensor, Tensor>", ex.Message, StringComparison.Ordinal);
        Assert.Empty(model.GetLoraLayers());
        Assert.Equal(keys, model.state_dict().Keys.ToList());
        Assert.IsType<Linear>(model.named_children().Single(c => c.name == "other").module);
    }

    [Fact]
    public void AddingTheSameAdapterTwice_Throws()
    {
        using var model = new ToyNet();
        model.AddLora();
        Assert.Throws<InvalidOperationException>(() => model.AddLora());
    }

    [Fact]
    public void NamedAdapters_SelectDisableAndDelete()
    {
        manual_seed(13);
        using var model = new ToyNet(dtype: ScalarType.Float64);
        using var ids = randint(0, 50, new long[] { 2, 4 });
        using var baseOut = model.call(ids);
        model.AddLora(new LoraConfig { AdapterName = "a", Init = LoraInit.Random });
        using var withA = model.call(ids);
        model.AddLora(new LoraConfig { AdapterName = "b", Init = LoraInit.Random, Rank = 2 });
        Assert.Equal(new[] { "a", "b" }, model.GetLoraAdapterNames());
        using var withB = model.call(ids);
        Assert.False(Snapshot.Identical(withA, withB));

        model.SetActiveLoraAdapters("a");
        using var again = model.call(ids);
        Assert.True(Snapshot.Identical(withA, again), $"diff {(withA - again).abs().max().item<double>()} {withA.dtype} {again.dtype}");

        model.SetActiveLoraAdapters("a", "b");
        using var both = model.call(ids);
        Assert.False(Snapshot.Identical(both, withA));
        Assert.False(Snapshot.Identical(both, withB));

        using (model.DisableLora())
        {
            using var off = model.call(ids);
            Assert.True(Snapshot.Identical(baseOut, off));
        }
        using var on = model.call(ids);
        Assert.True(Snapshot.Identical(both, on));

        Assert.Throws<KeyNotFoundException>(() => model.SetActiveLoraAdapters("c"));
        Assert.Throws<InvalidOperationException>(() => model.GetLoraStateDict());
        Assert.Equal(new long[] { 2, 16 }, model.GetLoraStateDict("b")["fc1.lora_A.weight"].shape);

        model.DeleteLoraAdapter("b");
        Assert.Equal(new[] { "a" }, model.GetLoraAdapterNames());
        using var onlyA = model.call(ids);
        Assert.True(Snapshot.Identical(withA, onlyA));
        model.DeleteLoraAdapter("a");
        Assert.Empty(model.GetLoraLayers());
    }

    [Fact]
    public void TwoActiveAdapters_AddIndependently()
    {
        manual_seed(17);
        using var model = new OneLinear(6, 5, ScalarType.Float64);
        using var x = randn(3, 6, dtype: ScalarType.Float64);
        using var baseOut = model.call(x);
        model.AddLora(new LoraConfig { AdapterName = "a", Init = LoraInit.Random });
        using var withA = model.call(x);
        model.AddLora(new LoraConfig { AdapterName = "b", Init = LoraInit.Random, Rank = 2, Alpha = 3 });
        using var withB = model.call(x);
        model.SetActiveLoraAdapters("a", "b");
        using var both = model.call(x);
        // On one linear layer: (a+b) - base == (a - base) + (b - base), up to float64 rounding (~1e-15).
        var err = ((both - baseOut) - ((withA - baseOut) + (withB - baseOut))).abs().max().item<double>();
        Assert.True(err < 1e-12, $"adapters do not add independently: {err}");
        var merged = model.MergeLora(adapterNames: new[] { "a", "b" });
        Assert.Equal(new[] { "a", "b" }, merged.Adapters);
        using var m = model.call(x);
        Assert.True((m - both).abs().max().item<double>() < 1e-12);
    }

    [Theory]
    [InlineData(ScalarType.BFloat16)]
    [InlineData(ScalarType.Float16)]
    public void HalfBase_WithFloat32Adapters_TrainsAndKeepsOutputDtype(ScalarType dtype)
    {
        manual_seed(14);
        using var model = new ToyNet(dtype: dtype);
        model.AddLora(new LoraConfig { AdapterDtype = ScalarType.Float32, Init = LoraInit.Random });
        Assert.All(model.GetLoraParameters(), p => Assert.Equal(ScalarType.Float32, p.dtype));
        using var ids = randint(0, 50, new long[] { 2, 4 });
        using var y = model.call(ids);
        Assert.Equal(dtype, y.dtype);
        var before = model.GetLoraParameters().Select(p => p.detach().clone()).ToList();
        LoraIdentityTests.TrainSteps(model, 2);
        var after = model.GetLoraParameters();
        Assert.Contains(Enumerable.Range(0, before.Count), i => !Snapshot.Identical(before[i], after[i]));
    }

    [Fact]
    public void Merge_RefusesNonFiniteUpdate_AndLeavesWeightsUnchanged()
    {
        using var model = new ToyNet();
        model.AddLora(new LoraConfig { Init = LoraInit.Random });
        var baseBefore = Snapshot.Clone(model);
        using (no_grad()) model.GetLoraStateDict()["fc2.lora_B.weight"][0, 0] = float.NaN;
        var ex = Assert.Throws<InvalidOperationException>(() => model.MergeLora());
        Assert.Contains("non-finite", ex.Message, StringComparison.Ordinal);
        Snapshot.AssertEqual(baseBefore, model.state_dict(), new[] { "fc2.weight", "fc2.bias" });
    }

    [Fact]
    public void Merge_RefusesOverflowOfHalfWeights()
    {
        using var model = new ToyNet(dtype: ScalarType.Float16);
        model.AddLora(new LoraConfig { AdapterDtype = ScalarType.Float32, Init = LoraInit.Random });
        var w = model.state_dict()["fc2.weight"].clone();
        using (no_grad()) model.GetLoraStateDict()["fc2.lora_B.weight"].fill_(1e6f);
        Assert.Throws<InvalidOperationException>(() => model.MergeLora());
        Assert.True(Snapshot.Identical(w, model.state_dict()["fc2.weight"]));
    }

    [Fact]
    public void LoadLoraStateDict_Strict_ReportsEveryProblemByName_AndLoadsNothing()
    {
        manual_seed(15);
        using var model = new ToyNet();
        model.AddLora(new LoraConfig { Rank = 4 });
        var good = Snapshot.Clone(model).Where(kv => kv.Key.Contains("lora", StringComparison.Ordinal)).ToDictionary(kv => kv.Key, kv => kv.Value);
        var current = model.GetLoraStateDict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());

        var bad = new Dictionary<string, Tensor>
        {
            ["fc1.lora_A.weight"] = randn(3, 16),           // wrong rank
            ["fc1.lora_B.weight"] = randn(24, 4),
            ["fc9.lora_A.weight"] = randn(4, 16),           // unexpected
        };
        var ex = Assert.Throws<StateDictMismatchException>(() => model.LoadLoraStateDict(bad));
        Assert.Contains("fc2.lora_A.weight", ex.Fit.MissingKeys);
        Assert.Contains("fc9.lora_A.weight", ex.Fit.UnexpectedKeys);
        Assert.Equal("fc1.lora_A.weight", ex.Fit.ShapeMismatches.Single().Key);
        Assert.Contains("fc9.lora_A.weight", ex.Message, StringComparison.Ordinal);
        Assert.Contains("[4, 16]", ex.Message, StringComparison.Ordinal);
        Snapshot.AssertEqual(current, model.GetLoraStateDict());

        var partial = model.LoadLoraStateDict(bad, strict: false);
        Assert.Equal(new[] { "fc1.lora_B.weight" }, partial.MatchedKeys);
        Assert.False(partial.IsComplete);
    }

    [Fact]
    public void LoadLoraStateDict_AcceptsPeftPrefix()
    {
        manual_seed(16);
        using var a = new ToyNet();
        a.AddLora(new LoraConfig { Init = LoraInit.Random });
        var peft = a.GetLoraStateDict().ToDictionary(kv => LoraExtensions.PeftKeyPrefix + kv.Key, kv => kv.Value);
        using var b = new ToyNet();
        b.AddLora();
        Assert.True(b.LoadLoraStateDict(peft).IsComplete);
        Snapshot.AssertEqual(a.GetLoraStateDict(), b.GetLoraStateDict());
    }

    [Fact]
    public void Adapters_KeepTheirOrder_AndAFailedMergeChangesNoWeight()
    {
        using var model = new OneLinear(6, 5, ScalarType.Float32);
        model.AddLora(new LoraConfig { AdapterName = "a" });
        model.AddLora(new LoraConfig { AdapterName = "b" });
        model.DeleteLoraAdapter("a");
        model.AddLora(new LoraConfig { AdapterName = "c", Init = LoraInit.Random });
        Assert.Equal(new[] { "b", "c" }, model.GetLoraAdapterNames());

        var w = model.state_dict()["proj.weight"].clone();
        using (no_grad()) model.GetLoraStateDict("b")["proj.lora_B.weight"].fill_(float.NaN);
        Assert.Throws<InvalidOperationException>(() => model.MergeLora(unload: false, adapterNames: new[] { "c", "b" }));
        Assert.True(Snapshot.Identical(w, model.state_dict()["proj.weight"]), "adapter c must not be merged when b is refused");
        Assert.Empty(model.GetLoraLayers()[0].Layer.MergedAdapters);
    }

    [Fact]
    public void LoadLoraStateDict_NonFloatingTensor_LoadsNothing()
    {
        using var model = new ToyNet();
        model.AddLora(new LoraConfig { Init = LoraInit.Random });
        var before = model.GetLoraStateDict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
        var dict = before.ToDictionary(kv => kv.Key, kv => kv.Value.mul(2));
        dict["fc2.lora_B.weight"] = dict["fc2.lora_B.weight"].to(ScalarType.Int64);
        Assert.Throws<ArgumentException>(() => model.LoadLoraStateDict(dict));
        Snapshot.AssertEqual(before, model.GetLoraStateDict());
    }

    [Fact]
    public void Api_RejectsNullsAndModelsWithoutLora()
    {
        Assert.Throws<ArgumentNullException>(() => ((nn.Module)null!).AddLora());
        using var model = new ToyNet();
        Assert.Throws<InvalidOperationException>(() => model.MergeLora());
        Assert.Throws<InvalidOperationException>(() => model.GetLoraStateDict());
        Assert.Throws<InvalidOperationException>(() => model.RemoveLora());
        Assert.Throws<ArgumentNullException>(() => model.LoadLoraStateDict(null!));
    }
}
