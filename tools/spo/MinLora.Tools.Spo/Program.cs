using System.CommandLine;
using MinLora;
using MinLora.Samples.SpoExtraction;

// Rebuilds what the SPO sample ships (run from the repository root):
//   dotnet run --project tools/spo/MinLora.Tools.Spo -- generate-data samples/MinLora.Samples.SpoExtraction/data
//   python3 tools/spo/make_tokenizer.py     (the tokenizer, with Debian's spm_train; writes into assets/base)
//   dotnet run --project tools/spo/MinLora.Tools.Spo -- build-base samples/MinLora.Samples.SpoExtraction/assets/base samples/MinLora.Samples.SpoExtraction/assets/base
NativeAllocator.RetainFreedMemory();
var root = new RootCommand("Maintenance of the SPO sample's shipped assets.");

var dataDir = new Argument<string>("directory") { Description = "Where train.jsonl (600 rows) and test.jsonl (60 rows) go", DefaultValueFactory = _ => "data" };
var generate = new Command("generate-data", "Writes the synthetic car-fault SPO data (fixed seeds).") { dataDir };
generate.SetAction(parsed =>
{
    var dir = parsed.GetValue(dataDir)!;
    Directory.CreateDirectory(dir);
    SpoData.WriteJsonLines(Path.Combine(dir, "train.jsonl"), SyntheticSpo.Generate(600, seed: 1));
    SpoData.WriteJsonLines(Path.Combine(dir, "test.jsonl"), SyntheticSpo.Generate(60, seed: 2));
    Console.WriteLine($"wrote {dir}/train.jsonl (600) and {dir}/test.jsonl (60)");
    return 0;
});

var outDir = new Argument<string>("out") { Description = "The base model's directory (replaced in one step)" };
var tokenizerDir = new Argument<string>("tokenizer") { Description = "Where ice_text.model and tokenizer_config.json are (tools/spo/make_tokenizer.py)" };
var steps = new Option<int>("--steps") { Description = "Pre-training steps", DefaultValueFactory = _ => 1500 };
steps.Validators.Add(r =>
{
    if (r.GetValueOrDefault<int>() < 1) r.AddError("--steps must be at least 1");
});
var trainFile = new Option<string>("--data") { Description = "The texts to pre-train on", DefaultValueFactory = _ => new SpoOptions().TrainFile };
var build = new Command("build-base", "Pre-trains the small ChatGLM-architecture base model (copying and part listing, never extraction).") { outDir, tokenizerDir, steps, trainFile };
build.SetAction(parsed =>
{
    var output = parsed.GetValue(outDir)!;
    SpoPipeline.BuildBase(output, parsed.GetValue(tokenizerDir)!, SpoData.ReadJsonLines(parsed.GetValue(trainFile)!), parsed.GetValue(steps), Console.Out);
    Console.WriteLine($"wrote the base model to {output}");
    return 0;
});

root.Subcommands.Add(generate);
root.Subcommands.Add(build);
try
{
    return root.Parse(args, new ParserConfiguration { ResponseFileTokenReplacer = null }).Invoke(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
}
catch (Exception ex) when (ex is IOException or InvalidDataException or UnauthorizedAccessException or ArgumentException)
{
    Console.Error.WriteLine($"error: {ex.Message}");
    return 1;
}
