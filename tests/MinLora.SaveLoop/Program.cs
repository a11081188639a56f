using MinLora;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.SaveLoop;

/// <summary>Two adapter versions of different ranks on one small base, rebuilt identically by the child and the test.</summary>
public static class SaveLoopModels
{
    /// <summary>The base model (fixed seed).</summary>
    public static nn.Module<Tensor, Tensor> Base()
    {
        manual_seed(5);
        return nn.Sequential(("fc1", nn.Linear(32, 48)), ("act", nn.Tanh()), ("fc2", nn.Linear(48, 16)));
    }

    /// <summary>The base with adapter version <paramref name="version"/> (0: rank 4, 1: rank 8), every adapter value set.</summary>
    public static nn.Module<Tensor, Tensor> WithAdapter(int version)
    {
        var model = Base();
        model.AddLora(new LoraConfig { TargetModules = new[] { "fc1", "fc2" }, Rank = version == 0 ? 4 : 8, Alpha = 8 });
        using var noGrad = no_grad();
        manual_seed(100 + version);
        foreach (var (_, t) in model.GetLoraStateDict()) t.copy_(randn_like(t));
        return model;
    }
}

internal static class Program
{
    /// <summary>save-loop DIR: writes version 0, 1, 0, … into DIR until killed; prints "ready" after the first save.</summary>
    private static int Main(string[] args)
    {
        if (args.Length != 1) { Console.Error.WriteLine("usage: MinLora.SaveLoop DIR"); return 2; }
        var models = new[] { SaveLoopModels.WithAdapter(0), SaveLoopModels.WithAdapter(1) };
        for (long i = 0; ; i++)
        {
            models[i % 2].SaveLoraAdapter(args[0]);
            if (i == 0) Console.WriteLine("ready");
        }
    }
}
