using System.Diagnostics;
using TorchSharp;
using TorchSharp.PyBridge;
using static TorchSharp.torch;

namespace MinLora.Distributed.Tests;

/// <summary>
/// The worker (tests/MinLora.DataParallelWorker: LoRA steps on a small GLM) run alone and under
/// <c>mpirun -np 2</c> on this machine (shared memory and loopback only). CI installs Open MPI; without mpirun these skip.
/// </summary>
public sealed class MpiTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), $"minlora-mpi-{Guid.NewGuid():N}");

    public MpiTests() => Directory.CreateDirectory(_dir);

    public void Dispose()
    {
        try { Directory.Delete(_dir, recursive: true); } catch (IOException) { }
    }

    private static readonly string? Mpirun = Environment.GetEnvironmentVariable("PATH")?.Split(':')
        .Select(d => Path.Combine(d, "mpirun")).FirstOrDefault(File.Exists);

    // One machine: "plm isolated" starts the ranks without an ssh/rsh agent (a fresh container may have none, and
    // Open MPI's default launcher then refuses to start at all).
    private static readonly string[] MpirunOptions = ["--oversubscribe", "--bind-to", "none", "--mca", "plm", "isolated", "--mca", "btl", "self,vader",
        "--mca", "btl_vader_single_copy_mechanism", "none", "--mca", "oob_tcp_if_include", "lo"];

    /// <summary>Null when <c>mpirun -np 2</c> can start a trivial job here with the tests' options, else why not.</summary>
    private static readonly Lazy<string?> MpiUnavailable = new(() =>
    {
        if (Mpirun is null) return "mpirun is not installed (CI installs openmpi-bin)";
        var psi = new ProcessStartInfo(Mpirun) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in new[] { "-np", "2" }.Concat(MpirunOptions).Append("true")) psi.ArgumentList.Add(a);
        psi.Environment["OMPI_ALLOW_RUN_AS_ROOT"] = "1";
        psi.Environment["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1";
        using var p = Process.Start(psi)!;
        var output = p.StandardOutput.ReadToEndAsync();
        var error = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromSeconds(60)))
        {
            p.Kill(entireProcessTree: true);
            return "mpirun -np 2 true did not finish within 60 s on this machine";
        }
        return p.ExitCode == 0 ? null : $"mpirun -np 2 true fails on this machine (exit {p.ExitCode}): {output.Result}{error.Result}";
    });

    private static string Worker => Path.Combine(AppContext.BaseDirectory, "MinLora.DataParallelWorker.dll");

    /// <summary>Runs the worker (under mpirun with <paramref name="ranks"/> &gt; 0); a run past <paramref name="limit"/> is killed and fails the test as a hang.</summary>
    private static (int Code, string Output) Run(int ranks, TimeSpan limit, params string[] args) => RunProgram(Worker, ranks, limit, args);

    private static (int Code, string Output) RunProgram(string program, int ranks, TimeSpan limit, params string[] args)
    {
        var psi = new ProcessStartInfo(ranks > 0 ? Mpirun! : "dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        if (ranks > 0)
        {
            foreach (var a in new[] { "-np", ranks.ToString(System.Globalization.CultureInfo.InvariantCulture) }.Concat(MpirunOptions).Append("dotnet"))
                psi.ArgumentList.Add(a);
            // CI runs as root; Open MPI refuses root unless told twice.
            psi.Environment["OMPI_ALLOW_RUN_AS_ROOT"] = "1";
            psi.Environment["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1";
        }
        else
        {
            foreach (var k in new[] { "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK" }) psi.Environment.Remove(k);
        }
        psi.ArgumentList.Add(program);
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(limit))
        {
            p.Kill(entireProcessTree: true);
            p.WaitForExit();
            Assert.Fail($"the job did not end within {limit.TotalSeconds} s (hang):\n{stdout.Result}\n{stderr.Result}");
        }
        return (p.ExitCode, stdout.Result + stderr.Result);
    }

    private static readonly TimeSpan Limit = TimeSpan.FromMinutes(3);

    /// <summary>A state dict with PEFT's "base_model.model." prefix removed (adapter files and dumps then share keys).</summary>
    private static Dictionary<string, Tensor> Load(string path) =>
        Safetensors.LoadStateDict(path).ToDictionary(kv => kv.Key.StartsWith("base_model.model.", StringComparison.Ordinal) ? kv.Key["base_model.model.".Length..] : kv.Key, kv => kv.Value);

    private static double MaxDifference(Dictionary<string, Tensor> a, Dictionary<string, Tensor> b)
    {
        Assert.Equal(a.Keys.Order(), b.Keys.Order());
        return a.Keys.Max(k => (a[k].to(ScalarType.Float64) - b[k].to(ScalarType.Float64)).abs().max().ToDouble());
    }

    [SkippableFact]
    public void TwoRanks_SameGlobalBatch_GiveTheSingleProcessAdapter()
    {
        Skip.If(MpiUnavailable.Value is not null, MpiUnavailable.Value);
        var (code1, out1) = Run(0, Limit, "--out", Path.Combine(_dir, "one"), "--dump");
        Assert.True(code1 == 0, out1);
        Assert.Contains("done world 1 mpi False", out1, StringComparison.Ordinal);
        // Global batch 5 over 2 ranks: shares of 3 and 2 sequences with different label-token counts.
        var (code2, out2) = Run(2, Limit, "--out", Path.Combine(_dir, "two"), "--dump");
        Assert.True(code2 == 0, out2);
        Assert.Contains("done world 2 mpi True", out2, StringComparison.Ordinal);
        // Both ranks hold bit-identical parameters (same averaged gradients, same AdamW).
        var rank0 = Load(Path.Combine(_dir, "two-rank0.safetensors"));
        var rank1 = Load(Path.Combine(_dir, "two-rank1.safetensors"));
        Assert.Equal(0.0, MaxDifference(rank0, rank1));

        var single = Load(Path.Combine(_dir, "one", "adapter_model.safetensors"));
        var two = Load(Path.Combine(_dir, "two", "adapter_model.safetensors"));
        var singleDump = Load(Path.Combine(_dir, "one-rank0.safetensors"));
        double diff = MaxDifference(single, two);
        // Tolerance: the two runs differ only in the order of float32 sums (per-rank partial means recombined by
        // Σ wᵣgᵣ/Σ wᵣ, a different padding length per share): relative gradient differences ~1e-6, and AdamW's
        // normalized steps of lr = 1e-2 move each value by at most ~1e-2 per step, so 4 steps agree to ~1e-6 of the
        // 4e-2 the values can move. 1e-5 leaves room for reduction order; a wrong average (below) is 100× further off.
        Console.WriteLine($"2 ranks vs 1 process: max |Δ| = {diff:E3}");
        Assert.True(diff < 1e-5, $"2 ranks vs 1 process: max |Δ| = {diff:E3}");
        Assert.True(MaxDifference(two, rank0) == 0, "rank 0 saved the parameters it holds");
        Assert.True(MaxDifference(single, singleDump) == 0, "the saved adapter is the one the process holds");

        // The test can fail: a plain mean over ranks (wrong for shares with different token counts) is visibly off.
        var (code3, out3) = Run(2, Limit, "--out", Path.Combine(_dir, "unweighted"), "--unweighted");
        Assert.True(code3 == 0, out3);
        double wrong = MaxDifference(single, Load(Path.Combine(_dir, "unweighted", "adapter_model.safetensors")));
        Console.WriteLine($"unweighted: max |Δ| = {wrong:E3}");
        Assert.True(wrong > 100 * Math.Max(diff, 1e-7), $"unweighted average: max |Δ| = {wrong:E3} vs {diff:E3}");
    }

    [SkippableFact]
    public void GradientAccumulation_UnderMpi_GivesTheSingleProcessAdapter()
    {
        Skip.If(MpiUnavailable.Value is not null, MpiUnavailable.Value);
        var (code1, out1) = Run(0, Limit, "--out", Path.Combine(_dir, "one"), "--global-batch", "7");
        Assert.True(code1 == 0, out1);
        // 7 sequences → shares of 4 and 3, each in 2 micro-batches (2+2 and 2+1).
        var (code2, out2) = Run(2, Limit, "--out", Path.Combine(_dir, "acc"), "--global-batch", "7", "--accumulate", "2");
        Assert.True(code2 == 0, out2);
        double diff = MaxDifference(Load(Path.Combine(_dir, "one", "adapter_model.safetensors")), Load(Path.Combine(_dir, "acc", "adapter_model.safetensors")));
        Assert.True(diff < 1e-5, $"accumulated 2 ranks vs 1 process: max |Δ| = {diff:E3}");
    }

    [SkippableFact]
    public void EmptyShareAndParameterWithoutGradient_MatchTheSingleProcess()
    {
        Skip.If(MpiUnavailable.Value is not null, MpiUnavailable.Value);
        // Global batch 1: rank 1's share is empty every step (weight 0, no gradients). The extra parameter is in the
        // optimizer but never gets a gradient: AdamW skips it alone, so it must stay exactly 1 under MPI too (a zero
        // gradient would apply weight decay to it).
        string[] Options(string dir) => ["--out", Path.Combine(_dir, dir), "--dump", "--global-batch", "1", "--extra-param"];
        var (code1, out1) = Run(0, Limit, Options("one"));
        Assert.True(code1 == 0, out1);
        var (code2, out2) = Run(2, Limit, Options("two"));
        Assert.True(code2 == 0, out2);
        var one = Load(Path.Combine(_dir, "one-rank0.safetensors"));
        var two0 = Load(Path.Combine(_dir, "two-rank0.safetensors"));
        var two1 = Load(Path.Combine(_dir, "two-rank1.safetensors"));
        Assert.Equal(0.0, MaxDifference(two0, two1));
        double diff = MaxDifference(one, two0);
        Assert.True(diff < 1e-5, $"empty share: 2 ranks vs 1 process: max |Δ| = {diff:E3}");
        foreach (var d in new[] { one, two0, two1 }) Assert.True(d["extra"].eq(1).all().item<bool>(), "a parameter without gradient was changed");
    }

    [SkippableFact]
    public void ParameterListChangingOnOneRank_StopsEveryRankWithAMismatch()
    {
        Skip.If(MpiUnavailable.Value is not null, MpiUnavailable.Value);
        var (code, output) = Run(2, Limit, "--drop-param-on", "1:2", "--timeout", "60");
        Assert.NotEqual(0, code);
        Assert.Contains("The ranks hold different trainable parameters", output, StringComparison.Ordinal);
        Assert.Contains("step 2", output, StringComparison.Ordinal);
        Assert.DoesNotContain("step 3", output, StringComparison.Ordinal);
        Assert.DoesNotContain("did not complete within", output, StringComparison.Ordinal);
    }

    [SkippableFact]
    public void FailedSaveOnRankZero_FailsEveryRank()
    {
        Skip.If(MpiUnavailable.Value is not null, MpiUnavailable.Value);
        var (code, output) = Run(2, Limit, "--out", Path.Combine(_dir, "never"), "--fail-save", "--timeout", "60");
        Assert.NotEqual(0, code);
        Assert.Contains("rank 0: error: disk full (simulated)", output, StringComparison.Ordinal);
        Assert.Contains("rank 1: error: Rank 0 failed at saving the adapter", output, StringComparison.Ordinal);
        Assert.False(Directory.Exists(Path.Combine(_dir, "never")));
    }

    [SkippableFact]
    public void DifferentAdapters_AreRefusedAtStartUp_NamingTheTensor()
    {
        Skip.If(MpiUnavailable.Value is not null, MpiUnavailable.Value);
        var (code, output) = Run(2, Limit, "--lora-rank-on", "1:8");
        Assert.NotEqual(0, code);
        Assert.Contains("The ranks hold different parameters: rank 1 has '", output, StringComparison.Ordinal);
        Assert.Contains("lora_A", output, StringComparison.Ordinal);
        Assert.Contains("[8, 64] where rank 0 has", output, StringComparison.Ordinal);
        Assert.DoesNotContain("step 1", output, StringComparison.Ordinal);
    }

    [SkippableFact]
    public void HangingRank_MakesTheOthersStopWithATimeout_AndKeepsThePreviousResult()
    {
        Skip.If(MpiUnavailable.Value is not null, MpiUnavailable.Value);
        var target = Path.Combine(_dir, "adapter");
        var (code0, out0) = Run(0, Limit, "--out", target, "--steps", "1");
        Assert.True(code0 == 0, out0);
        var previous = Load(Path.Combine(target, "adapter_model.safetensors"));
        // Rank 1 sleeps forever at step 2; rank 0 waits 5 s in the allreduce, then aborts the job.
        var (code, output) = Run(2, Limit, "--out", target, "--hang-on", "1:2", "--timeout", "5");
        Assert.NotEqual(0, code);
        Assert.Contains("did not complete within 5 s", output, StringComparison.Ordinal);
        Assert.Equal(0.0, MaxDifference(previous, Load(Path.Combine(target, "adapter_model.safetensors"))));
    }

    [SkippableFact]
    public void DyingRank_EndsTheJob_InsteadOfHanging()
    {
        Skip.If(MpiUnavailable.Value is not null, MpiUnavailable.Value);
        var (code, output) = Run(2, Limit, "--die-on", "1:2");
        Assert.NotEqual(0, code);
        Assert.DoesNotContain("done world", output, StringComparison.Ordinal);
    }

    [SkippableFact]
    public void SpoSample_UnderMpirun_TrainsTheAdapterOneProcessTrains()
    {
        Skip.If(MpiUnavailable.Value is not null, MpiUnavailable.Value);
        var sample = Path.Combine(AppContext.BaseDirectory, "MinLora.Samples.SpoExtraction.dll");
        // Dropout 0: with dropout each rank draws its own masks, a different (equally valid) trajectory. A float base:
        // with the INT8 base the product's rounding depends on the batch shape enough that ~1 % of lora_B values take
        // the other sign at AdamW's first (sign-like) step, where their gradient is ~0 (measured: 374 of 32,768 differ
        // by 2·lr); the float base shows what the data-parallel arithmetic itself costs.
        string[] Options(string dir) => ["--epochs", "1", "--max-train", "24", "--max-test", "6", "--dropout", "0", "--bits", "0", "--out", Path.Combine(_dir, dir)];
        var (code1, out1) = RunProgram(sample, 0, Limit, Options("one"));
        Assert.True(code1 == 0, out1);
        var (code2, out2) = RunProgram(sample, 2, Limit, Options("two"));
        Assert.True(code2 == 0, out2);
        Assert.Contains("| data-parallel ranks (rank 0's time in collectives) | 2 (", out2, StringComparison.Ordinal);
        Assert.Contains("| reloaded LoRA reproduces the trained model | yes |", out2, StringComparison.Ordinal);
        string LossLine(string output) => output.Split('\n').Single(l => l.StartsWith("| training loss", StringComparison.Ordinal));
        Assert.Equal(LossLine(out1), LossLine(out2));
        // 3 steps of 8 sequences (4 + 4 per rank); AdamW at lr 5e-3: as in the worker test, only reduction order differs.
        double diff = MaxDifference(Load(Path.Combine(_dir, "one", "lora", "adapter_model.safetensors")), Load(Path.Combine(_dir, "two", "lora", "adapter_model.safetensors")));
        Assert.True(diff < 1e-5, $"SPO sample, 2 ranks vs 1 process: max |Δ| = {diff:E3}");
    }
}
