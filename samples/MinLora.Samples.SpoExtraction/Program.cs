using System.Globalization;
using MinLora;
using MinLora.Distributed;
using MinLora.Glm.Data;
using MinLora.Samples.SpoExtraction;

// The book's job: INT8 base + LoRA on query_key_value, fine-tuned for subject_predicate_object extraction.
//   dotnet run --project samples/MinLora.Samples.SpoExtraction                        (built-in small model and data)
//   dotnet run --project samples/MinLora.Samples.SpoExtraction -- --model /models/chatglm-6b --data spo_0.json --test spo_1.json
//   mpirun -np 2 dotnet samples/MinLora.Samples.SpoExtraction/bin/Release/net10.0/MinLora.Samples.SpoExtraction.dll   (data parallel)
// The assets it ships (synthetic data, base model) are rebuilt by tools/spo (MinLora.Tools.Spo).
NativeAllocator.RetainFreedMemory();
var defaults = new SpoOptions();
var command = new SpoCommandLine(defaults);
var parsed = command.Parse(args);
if (parsed.Action is System.CommandLine.Help.HelpAction)
{
    // --help: System.CommandLine prints the options with their descriptions and defaults.
    return parsed.Invoke();
}
SpoOptions o;
try
{
    // One line per bad command line, exit code 2, before anything loads (every option and the output location).
    if (command.FirstError(parsed) is { } error) throw new ArgumentException(error);
    o = command.Options(parsed);
    o.Validate();
}
catch (ArgumentException ex)
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
