using System.Globalization;
using MinLora;
using MinLora.Samples.LoraBasics;

// dotnet run --project samples/MinLora.Samples.LoraBasics [-- --steps N --rank R --alpha A --lr LR --seed S --out DIR]
var options = new DemoOptions();
try
{
    for (int i = 0; i < args.Length; i++)
    {
        string Value() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{args[i]} needs a value");
        options = args[i] switch
        {
            "--steps" => options with { LoraSteps = int.Parse(Value(), CultureInfo.InvariantCulture) },
            "--pretrain-steps" => options with { PretrainSteps = int.Parse(Value(), CultureInfo.InvariantCulture) },
            "--rank" => options with { Rank = int.Parse(Value(), CultureInfo.InvariantCulture) },
            "--alpha" => options with { Alpha = double.Parse(Value(), CultureInfo.InvariantCulture) },
            "--lr" => options with { LearningRate = double.Parse(Value(), CultureInfo.InvariantCulture) },
            "--seed" => options with { Seed = int.Parse(Value(), CultureInfo.InvariantCulture) },
            "--out" => options with { OutputDirectory = Value() },
            "-h" or "--help" => throw new OperationCanceledException(),
            _ => throw new ArgumentException($"unknown option {args[i]}"),
        };
    }
}
catch (OperationCanceledException)
{
    Console.WriteLine("options: --steps N --pretrain-steps N --rank R --alpha A --lr LR --seed S --out DIR");
    return 0;
}
catch (Exception ex) when (ex is ArgumentException or FormatException or OverflowException)
{
    Console.Error.WriteLine($"error: {ex.Message} (try --help)");
    return 2;
}

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
