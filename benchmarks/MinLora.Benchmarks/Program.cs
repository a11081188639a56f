using System.Diagnostics;
using System.Globalization;
using MinLora;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

// MinLora benchmarks: each figure is a ratio to a baseline measured in the same run, in interleaved rounds
// (medians), cycling over enough weight copies to exceed the last-level cache.
//   dotnet run -c Release --project benchmarks/MinLora.Benchmarks -- lora|quant|load|crossover|prompt-products [--shape KxN] [--rounds N] [--quick] [--default-malloc]
//   dotnet run -c Release --project benchmarks/MinLora.Benchmarks -- load [--chatglm6b-layers N]
//   dotnet run -c Release --project benchmarks/MinLora.Benchmarks -- norm-probe [--rounds N]   (ChatGLM-6B LayerNorm: libtorch vs DecodeLayerNorm)
//   dotnet run -c Release --project benchmarks/MinLora.Benchmarks -- model [--bits 0|4|8] [--int4-format chatglm|g128] [--int8-gemm [--outlier-threshold X|inf]] [--outlier-features N] [--ab-outlier-split] [--train] [--steps N] [--compare-bf16] [--ab-two-streams|--ab-bf16-activations|--ab-fused-ops|--ab-layer-norm|--ab-blocks-per-core N]
//   any suite: [--default-malloc | --retain-below BYTES] (glibc policy: keep every freed block by default)
//   mpirun -np 2 dotnet benchmarks/MinLora.Benchmarks/bin/Release/net10.0/MinLora.Benchmarks.dll data-parallel [--bits 4] [--tokens 256]
var argsList = args.ToList();
int rounds = ReadInt("--rounds", 7);
bool quick = argsList.Contains("--quick");
// Keep freed native memory for reuse (see NativeAllocator): otherwise every large temporary pays page faults.
// --retain-below BYTES: keep only freed blocks below that size (NativeAllocator.RetainFreedMemory(long)), e.g. for
// training, whose peak the retained heap's holes inflate.
long retainBelow = 0;
if (argsList.IndexOf("--retain-below") is int rb and >= 0)
{
    if (rb + 1 >= argsList.Count || !long.TryParse(argsList[rb + 1], NumberStyles.None, CultureInfo.InvariantCulture, out retainBelow)
        || retainBelow < 1 || retainBelow > NativeAllocator.MaxRetainedBlockBytes)
    {
        Console.Error.WriteLine($"--retain-below needs a size in bytes, 1 to {NativeAllocator.MaxRetainedBlockBytes}");
        return 2;
    }
    argsList.RemoveRange(rb, 2);
}
string suite = argsList.FirstOrDefault(a => !a.StartsWith("--", StringComparison.Ordinal)) ?? "lora";
// The model suite mostly decodes: before any TorchSharp call, libtorch's OpenMP threads must stop spinning on the
// cores MinLora's kernels use (see CpuThreads). The other suites keep libgomp's default.
if (suite == "model") MinLora.Quantization.CpuThreads.LimitOpenMpSpinning();
bool retained = !argsList.Contains("--default-malloc") && (retainBelow > 0 ? NativeAllocator.RetainFreedMemory(retainBelow) : NativeAllocator.RetainFreedMemory());
string allocator = !retained ? "default glibc allocator" : retainBelow > 0 ? $"glibc retaining freed blocks below {retainBelow} bytes" : "glibc retaining freed memory";
if (suite == "load-write") { int l = ReadInt("--chatglm6b-layers", 0); return LoadSuite.Write(argsList[1], quick, l > 0 ? l : null); }
if (suite == "load-child") return LoadSuite.Child(argsList[1], argsList.Contains("--fp16-model"), argsList.Contains("--int4-after") ? "after" : argsList.Contains("--int4-streamed") ? "streamed" : "");
if (suite == "model")
{
    Console.WriteLine($"allocator: {allocator}");
    return ModelSuite.Run(argsList);
}
if (suite == "data-parallel") return DataParallelSuite.Run(argsList);
if (suite == "attention-probe") { AttentionProbe.Run(); return 0; }
if (suite == "norm-probe") return NormProbe.Run(rounds);
if (suite == "gemv-probe")
{
    int f = argsList.IndexOf("--formats");
    return GemvProbe.Run(rounds, argsList.Contains("--one-stream"), ReadInt("--k", 0), f >= 0 && f + 1 < argsList.Count ? argsList[f + 1] : null);
}
if (suite == "crossover") { QuantSuite.RunCrossover(rounds); return 0; }
if (suite == "prompt-products")
{
    // --shape KxN: one of the four projection shapes only.
    int at = argsList.IndexOf("--shape");
    QuantSuite.RunPrompt(rounds, at >= 0 && at + 1 < argsList.Count ? argsList[at + 1] : null);
    return 0;
}
if (suite == "tokenizer") return TokenizerSuite.Run(argsList);
if (suite is not ("lora" or "quant" or "load"))
{
    Console.Error.WriteLine($"unknown suite '{suite}' (available: lora, quant, load, model, data-parallel, tokenizer, crossover, prompt-products, attention-probe, norm-probe, gemv-probe)");
    return 2;
}
Console.WriteLine($"MinLora benchmarks — suite '{suite}', {get_num_threads()} threads, {rounds} interleaved rounds, medians, " +
    allocator);
if (suite == "lora") LoraSuite.Run(rounds, quick);
else if (suite == "quant") QuantSuite.Run(rounds, quick);
else
{
    // --chatglm6b-layers N: ChatGLM-6B's real shape with N blocks (28: the whole model) instead of the small model.
    int layers = ReadInt("--chatglm6b-layers", 0);
    // The loading processes run under this one's allocator policy.
    var childArguments = argsList.Contains("--default-malloc") ? new[] { "--default-malloc" }
        : retainBelow > 0 ? new[] { "--retain-below", retainBelow.ToString(CultureInfo.InvariantCulture) } : Array.Empty<string>();
    LoadSuite.Run(quick, layers > 0 ? layers : null, childArguments);
}
return 0;

int ReadInt(string name, int fallback)
{
    int i = argsList.IndexOf(name);
    return i >= 0 && i + 1 < argsList.Count ? int.Parse(argsList[i + 1], CultureInfo.InvariantCulture) : fallback;
}

/// <summary>LoRA overhead: forward of an adapted layer vs the plain layer, and a LoRA training step vs a full one.</summary>
internal static class LoraSuite
{
    private sealed class Holder : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module<Tensor, Tensor> proj;

        public Holder(long i, long o, ScalarType dtype) : base(nameof(Holder))
        {
            proj = nn.Linear(i, o, hasBias: false, dtype: dtype);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x) => proj.call(x);
    }

    public static void Run(int rounds, bool quick)
    {
        const long cacheBytes = 96L << 20; // 3× a 32 MiB L3
        var shapes = quick ? new[] { (In: 1024L, Out: 1024L) } : new[] { (In: 4096L, Out: 4096L), (In: 4096L, Out: 12288L) };
        var dtypes = new[] { ScalarType.Float32, ScalarType.BFloat16 };
        Console.WriteLine();
        Console.WriteLine("| weight | dtype | rows | plain linear | LoRA r=8 unmerged | ratio | merged (wrapper kept) | ratio |");
        Console.WriteLine("|---|---|---|---|---|---|---|---|");
        foreach (var (i, o) in shapes)
        {
            foreach (var dtype in dtypes)
            {
                long bytes = i * o * (dtype == ScalarType.Float32 ? 4 : 2);
                int copies = (int)Math.Max(1, (cacheBytes + bytes - 1) / bytes);
                var plain = Enumerable.Range(0, copies).Select(_ => new Holder(i, o, dtype)).ToList();
                var lora = Enumerable.Range(0, copies).Select(_ => new Holder(i, o, dtype)).ToList();
                var merged = Enumerable.Range(0, copies).Select(_ => new Holder(i, o, dtype)).ToList();
                foreach (var m in lora) m.AddLora(new LoraConfig { Rank = 8, Init = LoraInit.Random });
                foreach (var m in merged)
                {
                    m.AddLora(new LoraConfig { Rank = 8, Init = LoraInit.Random });
                    m.MergeLora(unload: false);
                }
                foreach (var rows in new[] { 1L, 16L, 128L })
                {
                    using var x = randn(rows, i).to(dtype);
                    var times = Measure(rounds, new Func<int, double>[]
                    {
                        k => Time(() => Forward(plain[k % copies], x)),
                        k => Time(() => Forward(lora[k % copies], x)),
                        k => Time(() => Forward(merged[k % copies], x)),
                    }, copies);
                    Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                        $"| {i}×{o} | {dtype} | {rows} | {Ms(times[0])} | {Ms(times[1])} | {times[0] / times[1]:F2} | {Ms(times[2])} | {times[0] / times[2]:F2} |"));
                }
                foreach (var m in plain.Concat(lora).Concat(merged)) m.Dispose();
            }
        }

        Console.WriteLine();
        Console.WriteLine("Training step (forward + backward + AdamW), 128 rows, float32: full fine-tuning vs LoRA r=8 (base frozen)");
        Console.WriteLine("| weight | full step | LoRA step | ratio (full ÷ LoRA) |");
        Console.WriteLine("|---|---|---|---|");
        foreach (var (i, o) in shapes)
        {
            using var full = new Holder(i, o, ScalarType.Float32);
            using var adapted = new Holder(i, o, ScalarType.Float32);
            adapted.AddLora(new LoraConfig { Rank = 8, Init = LoraInit.Random });
            using var optFull = optim.AdamW(full.parameters(), lr: 1e-4);
            using var optLora = optim.AdamW(adapted.GetLoraParameters(), lr: 1e-4);
            using var x = randn(128, i);
            var times = Measure(rounds, new Func<int, double>[]
            {
                _ => Time(() => Step(full, optFull, x)),
                _ => Time(() => Step(adapted, optLora, x)),
            }, 1);
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"| {i}×{o} | {Ms(times[0])} | {Ms(times[1])} | {times[0] / times[1]:F2} |"));
        }
        Console.WriteLine();
        Console.WriteLine("ratio > 1: the variant is faster than the baseline; < 1: slower (LoRA's extra work).");
    }

    private static void Forward(Holder m, Tensor x)
    {
        using var noGrad = no_grad();
        using var y = m.call(x);
    }

    private static void Step(Holder m, optim.Optimizer opt, Tensor x)
    {
        using var scope = NewDisposeScope();
        opt.zero_grad();
        m.call(x).square().mean().backward();
        opt.step();
    }

    internal static double Time(Action a)
    {
        var sw = Stopwatch.StartNew();
        a();
        return sw.Elapsed.TotalMilliseconds;
    }

    /// <summary>Per round, each variant runs <c>calls</c> times in turn; returns each variant's median per-call time.</summary>
    internal static double[] Measure(int rounds, Func<int, double>[] variants, int copies)
    {
        int calls = Math.Max(8, copies * 2);
        foreach (var v in variants) for (int k = 0; k < copies; k++) v(k); // warm-up
        var samples = variants.Select(_ => new List<double>()).ToArray();
        for (int r = 0; r < rounds; r++)
        {
            for (int v = 0; v < variants.Length; v++)
            {
                double total = 0;
                for (int k = 0; k < calls; k++) total += variants[v](k);
                samples[v].Add(total / calls);
            }
        }
        return samples.Select(s => s.OrderBy(t => t).ElementAt(s.Count / 2)).ToArray();
    }

    private static string Ms(double ms) => ms.ToString(ms < 1 ? "F3" : "F2", CultureInfo.InvariantCulture) + " ms";
}
