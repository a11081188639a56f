using System.CommandLine;

using static MinLora.Samples.SampleCommandLine;

namespace MinLora.Samples.SpoExtraction;

/// <summary>
/// The sample's command line (System.CommandLine): typed options with descriptions, defaults and ranges, numbers in
/// the invariant culture only ("1,5" is not 15, "1e3" is not an integer), and the first problem as one line.
/// </summary>
public sealed class SpoCommandLine
{
    private readonly Option<string> _model, _data, _test, _out;
    private readonly Option<int> _rank, _epochs, _batch, _maxSource, _maxTarget, _bits, _seed;
    private readonly Option<int?> _maxTrain, _maxTest;
    private readonly Option<double> _alpha, _dropout, _lr;
    private readonly Option<bool> _int8Gemm;

    /// <summary>Builds the command with <paramref name="defaults"/> as the option defaults.</summary>
    /// <param name="defaults">The defaults (the built-in model and data).</param>
    public SpoCommandLine(SpoOptions defaults)
    {
        ArgumentNullException.ThrowIfNull(defaults);
        // Types here; ranges, files and the output location are SpoOptions.Validate's (one place for both the command
        // line and code that builds SpoOptions itself).
        _model = Text("--model", "A GLM checkpoint directory (config.json, weights, tokenizer)", defaults.ModelDirectory);
        _data = Text("--data", "Training data, JSON lines ({\"text\", \"answer\"} or DuIE spo_list)", defaults.TrainFile);
        _test = Text("--test", "Held-out data, JSON lines", defaults.TestFile);
        _out = Text("--out", "Output directory (replaced in one step once training has a result)", defaults.OutputDirectory);
        _rank = Integer("--rank", "LoRA rank", defaults.Rank);
        _alpha = Real("--alpha", "LoRA alpha", defaults.Alpha);
        _dropout = Real("--dropout", "LoRA dropout, in [0, 1)", defaults.Dropout);
        _lr = Real("--lr", "Peak learning rate (cosine decay to 10 %)", defaults.LearningRate);
        _epochs = Integer("--epochs", "Passes over the training data", defaults.Epochs);
        _batch = Integer("--batch", "Sequences per optimizer step (the global batch under mpirun)", defaults.BatchSize);
        _maxSource = Integer("--max-source", "Prompt + text token budget", defaults.MaxSourceLength);
        _maxTarget = Integer("--max-target", "Answer token budget (also the generation limit)", defaults.MaxTargetLength);
        _bits = Integer("--bits", "Weight bits of the base: 8, 4, or 0 for float", defaults.Bits);
        _seed = Integer("--seed", "Random seed", defaults.Seed);
        _int8Gemm = Flag("--int8-gemm", "With --bits 8: multiply prompts and training batches int8 × int8 (activations quantized per token; faster on CPUs with AMX or VNNI, an accuracy trade)");
        _maxTrain = OptionalInteger("--max-train", "Use at most this many training examples");
        _maxTest = OptionalInteger("--max-test", "Evaluate on at most this many held-out examples");
        Root = new RootCommand("MinLora: LoRA fine-tuning of a GLM for subject-predicate-object extraction (the book's job).");
        foreach (Option option in new Option[] { _model, _data, _test, _out, _rank, _alpha, _dropout, _lr, _epochs, _batch, _maxSource, _maxTarget, _bits, _seed, _int8Gemm, _maxTrain, _maxTest })
            Root.Options.Add(option);
    }

    /// <summary>The command.</summary>
    public RootCommand Root { get; }

    /// <summary>Parses a command line (no <c>--version</c>, no <c>@file</c> response files: see <see cref="SampleCommandLine.Parse"/>).</summary>
    /// <param name="args">The arguments.</param>
    /// <returns>The parse result.</returns>
    public ParseResult Parse(IReadOnlyList<string> args) => SampleCommandLine.Parse(Root, args);

    /// <summary>The first problem of a parse as one line, or null: unknown options, missing values, bad numbers.</summary>
    /// <param name="parsed">The parse result.</param>
    /// <returns>The message, or null when the command line is well-formed.</returns>
    public string? FirstError(ParseResult parsed)
    {
        ArgumentNullException.ThrowIfNull(parsed);
        return SampleCommandLine.FirstError(Root, parsed);
    }

    /// <summary>The settings a well-formed parse gives.</summary>
    /// <param name="parsed">The parse result.</param>
    /// <returns>The options (not yet validated: see <see cref="SpoOptions.Validate"/>).</returns>
    public SpoOptions Options(ParseResult parsed)
    {
        ArgumentNullException.ThrowIfNull(parsed);
        return new SpoOptions
        {
            ModelDirectory = parsed.GetValue(_model)!,
            TrainFile = parsed.GetValue(_data)!,
            TestFile = parsed.GetValue(_test)!,
            OutputDirectory = parsed.GetValue(_out)!,
            Rank = parsed.GetValue(_rank),
            Alpha = parsed.GetValue(_alpha),
            Dropout = parsed.GetValue(_dropout),
            LearningRate = parsed.GetValue(_lr),
            Epochs = parsed.GetValue(_epochs),
            BatchSize = parsed.GetValue(_batch),
            MaxSourceLength = parsed.GetValue(_maxSource),
            MaxTargetLength = parsed.GetValue(_maxTarget),
            Bits = parsed.GetValue(_bits),
            Seed = parsed.GetValue(_seed),
            Int8Gemm = parsed.GetValue(_int8Gemm),
            MaxTrainExamples = parsed.GetValue(_maxTrain),
            MaxTestExamples = parsed.GetValue(_maxTest),
        };
    }
}
