using System.CommandLine;
using MinLora;
using MinLora.Samples;
using MinLora.Samples.LoraBasics;

// dotnet run --project samples/MinLora.Samples.LoraBasics [-- --steps N --rank R --alpha A --lr LR --seed S --out DIR]
var d = new DemoOptions();
var loraSteps = SampleCommandLine.Integer("--steps", "LoRA fine-tuning steps", d.LoraSteps, min: 1);
var pretrainSteps = SampleCommandLine.Integer("--pretrain-steps", "Pre-training steps of the base network", d.PretrainSteps, min: 1);
var rank = SampleCommandLine.Integer("--rank", "LoRA rank", d.Rank, min: 1);
var alpha = SampleCommandLine.Real("--alpha", "LoRA alpha", d.Alpha, positive: true);
var lr = SampleCommandLine.Real("--lr", "Learning rate", d.LearningRate, positive: true);
var seed = SampleCommandLine.Integer("--seed", "Random seed", d.Seed);
var outDir = SampleCommandLine.Text("--out", "Where the adapter is saved", d.OutputDirectory);
var root = new RootCommand("LoRA on a plain TorchSharp network: pretrain, adapt, save/reload, merge.") { loraSteps, pretrainSteps, rank, alpha, lr, seed, outDir };
var parsed = SampleCommandLine.Parse(root, args);
if (parsed.Action is System.CommandLine.Help.HelpAction) return parsed.Invoke();
if (SampleCommandLine.FirstError(root, parsed) is { } error)
{
    Console.Error.WriteLine($"error: {error} (try --help)");
    return 2;
}
var options = d with
{
    LoraSteps = parsed.GetValue(loraSteps),
    PretrainSteps = parsed.GetValue(pretrainSteps),
    Rank = parsed.GetValue(rank),
    Alpha = parsed.GetValue(alpha),
    LearningRate = parsed.GetValue(lr),
    Seed = parsed.GetValue(seed),
    OutputDirectory = parsed.GetValue(outDir)!,
};

Console.WriteLine("MinLora: LoRA fine-tuning of a small network (CPU)");
NativeAllocator.RetainFreedMemory(); // reuse freed native memory (see NativeAllocator's docs)
try
{
    var result = LoraBasicsDemo.Run(options);
    Console.WriteLine();
    Console.WriteLine($"Task-B loss: base {result.BaseLossOnB:F5} -> LoRA {result.LoraLossOnB:F5} ({result.BaseLossOnB / result.LoraLossOnB:F1}x lower)");
    Console.WriteLine(result.Count);
    return result.LoraLossOnB < result.BaseLossOnB ? 0 : 1;
}
catch (Exception ex) when (ex is ArgumentException or InvalidOperationException or IOException)
{
    Console.Error.WriteLine($"error: {ex.Message}");
    return 1;
}
