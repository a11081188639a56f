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
