using MinLora.Samples.SpoExtraction;
using System.Diagnostics;

namespace MinLora.Glm.Tests;

/// <summary>
/// The SPO sample's command line as a user meets it: every class of bad option is refused before any work with exit
/// code 2 and one line on stderr, and an existing <c>--out</c> is left exactly as it was; empty data is refused before
/// the model loads, also without touching <c>--out</c>.
/// </summary>
public sealed class SpoCliTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "minlora-spo-cli-" + Guid.NewGuid().ToString("N"));
    private readonly string _out;
    private readonly string _marker;

    public SpoCliTests()
    {
        _out = Path.Combine(_dir, "out");
        Directory.CreateDirectory(Path.Combine(_out, "lora"));
        _marker = Path.Combine(_out, "lora", "adapter_config.json");
        File.WriteAllText(_marker, "{\"previous\": true}");
    }

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, true);
    }

    private static (int Code, string StdErr, string StdOut) Run(params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardError = true, RedirectStandardOutput = true, WorkingDirectory = AppContext.BaseDirectory };
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "MinLora.Samples.SpoExtraction.dll"));
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync();
        var stdout = p.StandardOutput.ReadToEnd();
        if (!p.WaitForExit(120_000)) { p.Kill(true); throw new TimeoutException("the sample did not exit"); }
        return (p.ExitCode, stderr.Result, stdout);
    }

    public static TheoryData<string[], string> BadOptions => new()
    {
        { new[] { "--batch", "0" }, "--batch" },
        { new[] { "--rank", "0" }, "--rank" },
        { new[] { "--dropout", "1" }, "--dropout" },
        { new[] { "--lr", "-1" }, "--lr" },
        { new[] { "--lr", "1,5" }, "--lr" },
        { new[] { "--lr", "NaN" }, "--lr" },
        { new[] { "--alpha", "Infinity" }, "--alpha" },
        { new[] { "--epochs", "0" }, "--epochs" },
        { new[] { "--max-train", "0" }, "--max-train" },
        { new[] { "--max-test", "-3" }, "--max-test" },
        { new[] { "--bits", "3" }, "--bits" },
        { new[] { "--epochs", "1e3" }, "--epochs" },
        { new[] { "--data", "/nonexistent/train.jsonl" }, "--data" },
        { new[] { "--model", "/nonexistent/model" }, "--model" },
        { new[] { "--frobnicate" }, "unknown option" },
        { new[] { "--rank" }, "needs a value" },
    };

    [Theory]
    [MemberData(nameof(BadOptions))]
    public void BadOption_ExitsTwoWithOneLine_AndLeavesOutAlone(string[] args, string mentions)
    {
        var (code, stderr, _) = Run(new[] { "--out", _out }.Concat(args).ToArray());
        Assert.Equal(2, code);
        var lines = stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Single(lines);
        Assert.Contains(mentions, lines[0], StringComparison.Ordinal);
        Assert.Equal("{\"previous\": true}", File.ReadAllText(_marker));
        Assert.Single(Directory.GetFileSystemEntries(_out));
    }

    [Fact]
    public void UnwritableOut_IsFoundBeforeTraining()
    {
        var file = Path.Combine(_dir, "a-file");
        File.WriteAllText(file, "x");
        var (code, stderr, _) = Run("--out", Path.Combine(file, "sub"));
        Assert.Equal(2, code);
        Assert.Contains("--out", stderr, StringComparison.Ordinal);
        (code, stderr, _) = Run("--out", file);
        Assert.Equal(2, code);
        Assert.Contains("is a file", stderr, StringComparison.Ordinal);
    }

    [Fact]
    public void EmptyTrainingData_IsRefusedBeforeTheModelLoads_AndOutIsUntouched()
    {
        var empty = Path.Combine(_dir, "empty.jsonl");
        File.WriteAllText(empty, "");
        var (code, stderr, stdout) = Run("--data", empty, "--out", _out);
        Assert.Equal(1, code);
        Assert.Contains("no training examples", stderr, StringComparison.Ordinal);
        Assert.DoesNotContain("base:", stdout, StringComparison.Ordinal);
        Assert.Equal("{\"previous\": true}", File.ReadAllText(_marker));
    }
}

/// <summary>The sample's command line parsed in-process (System.CommandLine, invariant numbers, defaults).</summary>
public sealed class SpoCommandLineTests
{
    [Fact]
    public void Parse_GivesTypedOptions_DefaultsOtherwise_AndOneLineErrors()
    {
        var defaults = new SpoOptions();
        var command = new SpoCommandLine(defaults);
        var parsed = command.Parse(["--lr", "0.001", "--max-train", "5", "--bits", "4", "--dropout", "0", "--seed", "-3"]);
        Assert.Null(command.FirstError(parsed));
        var o = command.Options(parsed);
        Assert.Equal((0.001, 5, 4, 0.0, -3), (o.LearningRate, o.MaxTrainExamples!.Value, o.Bits, o.Dropout, o.Seed));
        Assert.Equal((defaults.Rank, defaults.Alpha, defaults.BatchSize, defaults.ModelDirectory, defaults.OutputDirectory), (o.Rank, o.Alpha, o.BatchSize, o.ModelDirectory, o.OutputDirectory));
        Assert.Null(o.MaxTestExamples);
        Assert.False(o.Int8Gemm);
        Assert.True(command.Options(command.Parse(["--int8-gemm"])).Int8Gemm);
        Assert.Equal("--int8-gemm needs --bits 8, got --bits 4", Assert.Throws<ArgumentException>(() => command.Options(command.Parse(["--int8-gemm", "--bits", "4"])).Validate()).Message);

        Assert.IsType<System.CommandLine.Help.HelpAction>(command.Parse(["--help"]).Action);
        Assert.Equal("--lr needs a finite number, got '1,5'", command.FirstError(command.Parse(["--lr", "1,5"])));
        var zeroAlpha = command.Parse(["--alpha", "0"]);
        Assert.Null(command.FirstError(zeroAlpha)); // well-formed; the range is SpoOptions.Validate's
        Assert.Equal("--alpha must be a positive number, got 0", Assert.Throws<ArgumentException>(() => command.Options(zeroAlpha).Validate()).Message);
        Assert.Equal("--epochs needs an integer, got '2.5'", command.FirstError(command.Parse(["--epochs", "2.5"])));
        Assert.Equal("--rank needs a value", command.FirstError(command.Parse(["--rank"])));
        Assert.Equal("unknown option --nope", command.FirstError(command.Parse(["--nope"])));
        Assert.Equal("unknown option --version", command.FirstError(command.Parse(["--version"])));
        Assert.Equal("@dir", command.Options(command.Parse(["--model", "@dir"])).ModelDirectory);
    }
}
