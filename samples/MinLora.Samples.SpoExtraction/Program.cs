using System.Globalization;
using MinLora;
using MinLora.Distributed;
using MinLora.Glm.Data;
using MinLora.Samples.SpoExtraction;

// The book's job: INT8 base + LoRA on query_key_value, fine-tuned for subject_predicate_object extraction.
//   dotnet run --project samples/MinLora.Samples.SpoExtraction                        (built-in small model and data)
//   dotnet run --project samples/MinLora.Samples.SpoExtraction -- --model /models/chatglm-6b --data spo_0.json --test spo_1.json
//   mpirun -np 2 dotnet samples/MinLora.Samples.SpoExtraction/bin/Release/net10.0/MinLora.Samples.SpoExtraction.dll   (data parallel)
// Maintenance commands (the repo ships their output): generate-data DIR, build-base OUT TOKENIZER_DIR.
NativeAllocator.RetainFreedMemory();
var o = new SpoOptions();
try
{
    if (args.Length > 0 && args[0] == "generate-data")
    {
        var dir = args.Length > 1 ? args[1] : "data";
        Directory.CreateDirectory(dir);
        SpoData.WriteJsonLines(Path.Combine(dir, "train.jsonl"), SyntheticSpo.Generate(600, seed: 1));
        SpoData.WriteJsonLines(Path.Combine(dir, "test.jsonl"), SyntheticSpo.Generate(60, seed: 2));
        Console.WriteLine($"wrote {dir}/train.jsonl (600) and {dir}/test.jsonl (60)");
        return 0;
    }
    if (args.Length > 0 && args[0] == "build-base")
    {
        if (args.Length < 3) throw new ArgumentException("usage: build-base OUT_DIR TOKENIZER_DIR [STEPS]");
        int steps = args.Length > 3 ? int.Parse(args[3], CultureInfo.InvariantCulture) : 1500;
        SpoPipeline.BuildBase(args[1], args[2], SpoData.ReadJsonLines(o.TrainFile), steps, Console.Out);
        Console.WriteLine($"wrote the base model to {args[1]}");
        return 0;
    }
    for (int i = 0; i < args.Length; i++)
    {
        string Value() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{args[i]} needs a value");
        // Plain numbers only: no thousands separators ("1,5" is not 15), finite values.
        int Int()
        {
            var name = args[i];
            var v = Value();
            return int.TryParse(v, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var r) ? r : throw new ArgumentException($"{name} needs an integer, got '{v}'");
        }
        double Real()
        {
            var name = args[i];
            var v = Value();
            return double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture, out var r) && double.IsFinite(r) ? r : throw new ArgumentException($"{name} needs a finite number, got '{v}'");
        }
        o = args[i] switch
        {
            "--model" => o with { ModelDirectory = Value() },
            "--data" => o with { TrainFile = Value() },
            "--test" => o with { TestFile = Value() },
            "--out" => o with { OutputDirectory = Value() },
            "--rank" => o with { Rank = Int() },
            "--alpha" => o with { Alpha = Real() },
            "--dropout" => o with { Dropout = Real() },
            "--lr" => o with { LearningRate = Real() },
            "--epochs" => o with { Epochs = Int() },
            "--batch" => o with { BatchSize = Int() },
            "--max-source" => o with { MaxSourceLength = Int() },
            "--max-target" => o with { MaxTargetLength = Int() },
            "--bits" => o with { Bits = Int() },
            "--seed" => o with { Seed = Int() },
            "--max-train" => o with { MaxTrainExamples = Int() },
            "--max-test" => o with { MaxTestExamples = Int() },
            "-h" or "--help" => throw new OperationCanceledException(),
            _ => throw new ArgumentException($"unknown option {args[i]}"),
        };
    }
    o.Validate();
}
catch (OperationCanceledException)
{
    Console.WriteLine("options: --model DIR --data FILE --test FILE --out DIR --rank R --alpha A --dropout P --lr LR --epochs N --batch N --max-source N --max-target N --bits 0|4|8 --seed S --max-train N --max-test N");
    return 0;
}
catch (Exception ex) when (ex is ArgumentException or FormatException or OverflowException)
{
    Console.Error.WriteLine($"error: {ex.Message} (try --help)");
    return 2;
}

// Under mpirun every rank runs this program with the same options; without a launcher no MPI is loaded.
using var dp = DataParallel.Initialize();
// Several ranks on one machine share its cores.
if (dp.LocalWorldSize > 1) TorchSharp.torch.set_num_threads(Math.Max(1, Environment.ProcessorCount / dp.LocalWorldSize));
if (dp.IsMainProcess) Console.WriteLine("MinLora: LoRA fine-tuning of a GLM for subject-predicate-object extraction (CPU)");
try
{
    var r = SpoPipeline.Run(o, dp);
    if (!dp.IsMainProcess) return r.ReloadMatches ? 0 : 1;
    Console.WriteLine();
    Console.WriteLine("| measure | value |");
    Console.WriteLine("|---|---|");
    Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"| triple F1 before fine-tuning | {r.F1Before:F4} |"));
    Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"| triple F1 after (reloaded LoRA-only file) | {r.F1After:F4} (P {r.ScoresAfter.Precision:F4}, R {r.ScoresAfter.Recall:F4}) |"));
    Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"| training loss, first → last 10 % of steps | {r.FirstLoss:F4} → {r.FinalLoss:F4} |"));
    Console.WriteLine($"| parameters | {r.Count} |");
    Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"| time (training / total) | {r.TrainSeconds:F0} s / {r.TotalSeconds:F0} s |"));
    if (r.Ranks > 1) Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"| data-parallel ranks (rank 0's time in collectives) | {r.Ranks} ({r.CommunicationSeconds:F1} s) |"));
    Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"| peak memory{(r.Ranks > 1 ? " (rank 0)" : "")} | {r.PeakWorkingSetBytes / 1e6:F0} MB |"));
    Console.WriteLine($"| reloaded LoRA reproduces the trained model | {(r.ReloadMatches ? "yes" : "NO")} |");
    return r.ReloadMatches ? 0 : 1;
}
catch (Exception ex) when (ex is IOException or InvalidDataException or UnauthorizedAccessException or ArgumentException or InvalidOperationException or NotSupportedException or DistributedException)
{
    Console.Error.WriteLine(dp.WorldSize > 1 ? $"error (rank {dp.Rank}): {ex.Message}" : $"error: {ex.Message}");
    // The other ranks may be waiting for this one in a collective: end the whole job rather than let them time out.
    if (dp.WorldSize > 1) dp.Abort(1);
    return 1;
}
catch (Exception ex) when (dp.WorldSize > 1)
{
    // Anything else (native errors, out of memory) on one rank: report it and end the job too.
    Console.Error.WriteLine($"error (rank {dp.Rank}): {ex}");
    dp.Abort(1);
    return 1;
}
