using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Tests;

/// <summary>The module-surgery seam shared by LoRA and quantization.</summary>
public sealed class ModuleSurgeryTests
{
    [Theory]
    [InlineData("transformer.layers.0.attention.dense", "dense", true)]
    [InlineData("dense", "dense", true)]
    [InlineData("transformer.layers.0.mlp.dense_h_to_4h", "dense", false)]
    [InlineData("transformer.layers.0.xdense", "dense", false)]
    [InlineData("transformer.layers.0.attention.dense", "attention.dense", true)]
    [InlineData("transformer.layers.0.attention.dense", "0.attention.dense", true)]
    [InlineData("transformer.layers.10.attention.dense", "0.attention.dense", false)]
    [InlineData("de", "dense", false)]
    public void NameMatches_ExactOrDottedSuffix(string path, string name, bool expected) =>
        Assert.Equal(expected, ModuleSelector.NameMatches(path, name));

    [Fact]
    public void Selector_NamesOrPredicate()
    {
        using var m = nn.Linear(2, 2);
        var byName = new ModuleSelector(["fc"], null);
        Assert.True(byName.IsExplicit);
        Assert.True(byName.Matches("a.fc", m));
        Assert.False(byName.Matches("a.fc2", m));
        var byPredicate = new ModuleSelector(null, (path, _) => path.StartsWith("a.", StringComparison.Ordinal));
        Assert.True(byPredicate.Matches("a.fc2", m));
        Assert.False(byPredicate.Matches("b.fc", m));
        Assert.False(new ModuleSelector(null, null).IsExplicit);
        Assert.False(new ModuleSelector(null, null).Matches("fc", m));
    }

    [Fact]
    public void SwapAll_FailureUndoesTheDoneSwapsInReverse_AndPropagates()
    {
        using var model = nn.Sequential(("a", nn.Linear(2, 2)), ("b", nn.Linear(2, 2)), ("c", nn.Linear(2, 2)));
        var sites = ModuleTree.Walk(model).ToList();
        var originals = sites.Select(s => s.Module).ToList();
        var log = new List<string>();
        var ex = Assert.Throws<InvalidOperationException>(() => ModuleTree.SwapAll(sites, site =>
        {
            if (site.Name == "c") throw new InvalidOperationException("third swap fails");
            var replacement = nn.Linear(2, 2);
            site.ReplaceBaseLayer(replacement);
            log.Add("swap " + site.Name);
            return () =>
            {
                site.ReplaceBaseLayer(site.Module);
                log.Add("undo " + site.Name);
            };
        }));
        Assert.Equal("third swap fails", ex.Message);
        Assert.Equal(new[] { "swap a", "swap b", "undo b", "undo a" }, log);
        Assert.Equal(originals, ModuleTree.Walk(model).Select(s => s.Module));
    }

    [Fact]
    public void Site_BaseLayerAndReplaceBaseLayer_GoUnderTheLoraWrapper()
    {
        using var model = nn.Sequential(("fc", nn.Linear(4, 3)));
        model.AddLora(new LoraConfig { Rank = 2 });
        var site = ModuleTree.Walk(model).Single(s => s.Name == "fc");
        Assert.IsAssignableFrom<LoraLayer>(site.Module);
        Assert.IsType<TorchSharp.Modules.Linear>(site.BaseLayer);
        using var other = nn.Linear(4, 3);
        site.ReplaceBaseLayer(other);
        Assert.Same(site.Module, ModuleTree.Walk(model).Single(s => s.Name == "fc").Module); // the wrapper stays
        Assert.Same(other, ((LoraLayer)site.Module).BaseLayer);
        Assert.Single(model.GetLoraLayers());
    }
}

/// <summary>The one state-dict fit check.</summary>
public sealed class StateDictFitTests
{
    [Fact]
    public void Compare_SortsKeysIntoMatchedMissingUnexpectedAndMismatched()
    {
        var expected = new (string, long[])[] { ("a", [2, 3]), ("b", [4]), ("c", [1]) };
        var found = new Dictionary<string, long[]> { ["a"] = [2, 3], ["b"] = [5], ["z"] = [1] };
        var fit = StateDictFit.Compare(expected, found);
        Assert.Equal(["a"], fit.MatchedKeys);
        Assert.Equal(["c"], fit.MissingKeys);
        Assert.Equal(["z"], fit.UnexpectedKeys);
        var m = Assert.Single(fit.ShapeMismatches);
        Assert.Equal("b", m.Key);
        Assert.Equal(new long[] { 4 }, m.Expected);
        Assert.Equal(new long[] { 5 }, m.Actual);
        Assert.False(fit.IsComplete);
        Assert.True(StateDictFit.Compare(expected.Take(1), new Dictionary<string, long[]> { ["a"] = [2, 3] }).IsComplete);

        var ex = new StateDictMismatchException(fit, "/models/x/adapter_model.safetensors", "The weights do not fit");
        Assert.StartsWith("/models/x/adapter_model.safetensors: The weights do not fit: wrong shapes or types (1): b: model [4] vs file [5] | missing keys (1): c | unexpected keys (1): z.", ex.Message, StringComparison.Ordinal);
        Assert.DoesNotContain('\n', ex.Message); // one line
        Assert.Contains("b: model [4] vs file [5]", ex.Message, StringComparison.Ordinal);
        Assert.Contains("missing keys (1): c", ex.Message, StringComparison.Ordinal);
        Assert.Contains("unexpected keys (1): z", ex.Message, StringComparison.Ordinal);
        var lenient = new StateDictMismatchException(fit, null, "x", missingIsProblem: false, unexpectedIsProblem: false).Message;
        Assert.DoesNotContain("unexpected", lenient, StringComparison.Ordinal);
        Assert.DoesNotContain("missing", lenient, StringComparison.Ordinal);
        Assert.Contains("b: model [4] vs file [5]", lenient, StringComparison.Ordinal);
        Assert.Same(fit, ex.Fit);
        Assert.Equal("/models/x/adapter_model.safetensors", ex.SourcePath);
    }
}
