using System.Diagnostics;
using System.Globalization;
using MinLora;
using MinLora.Distributed;
using MinLora.Glm;
using MinLora.Glm.Modeling;
using MinLora.Quantization;
using TorchSharp;
using static TorchSharp.torch;

/// <summary>
/// Data-parallel LoRA at ChatGLM-6B's shape, run under <c>mpirun -np N</c>: per step, the forward + backward of each
/// rank's share, the wait for the slowest rank (a barrier: load imbalance, not communication), the gradient allreduce
/// itself (<see cref="DataParallel.AverageGradients"/>: copy into the fused buffer, allreduce, copy back) and the
/// optimizer step, all measured in the same run; then the allreduce alone for the 6B LoRA gradient sizes.
/// <code>
/// mpirun -np 2 dotnet benchmarks/MinLora.Benchmarks/bin/Release/net10.0/MinLora.Benchmarks.dll data-parallel [--bits 4|8|0] [--tokens 256] [--steps 3] [--layers N]
/// </code>
/// </summary>
internal static class DataParallelSuite
{
    public static int Run(List<string> args)
    {
        using var dp = DataParallel.Initialize();
        int threads = Math.Max(1, Environment.ProcessorCount / dp.LocalWorldSize);
        set_num_threads(threads);
        int bits = ModelSuite.Int(args, "--bits", 4), tokens = ModelSuite.Int(args, "--tokens", 256), steps = ModelSuite.Int(args, "--steps", 3);
        bool quick = args.Contains("--quick");
        if (bits is not (0 or 4 or 8)) { Console.Error.WriteLine("--bits must be 0, 4 or 8"); return 2; }
        var full = new GlmConfig();
        var config = quick ? new GlmConfig { HiddenSize = 512, NumLayers = 2, NumAttentionHeads = 8, VocabSize = 130528 } : full;
        if (args.Contains("--layers")) config = config with { NumLayers = ModelSuite.Int(args, "--layers", config.NumLayers) };
        void Say(string line)
        {
            if (dp.IsMainProcess) Console.WriteLine(line);
        }
        Say($"data-parallel LoRA step, ChatGLM-6B shape{(quick ? " (--quick: small)" : "")} ({config.NumLayers} layers), " +
            $"{(bits == 0 ? "bf16" : $"int{bits}")} base + head + embeddings, LoRA r=4 on query_key_value (float32); " +
            $"{dp.WorldSize} rank(s){(dp.UsesMpi ? "" : " — no MPI: run under mpirun -np 2 for the allreduce")}, {threads} thread(s) each, " +
            $"{tokens} tokens per rank and step, gradient checkpointing");

        var sw = Stopwatch.StartNew();
        using var model = new GlmForCausalLM(config, new GlmBuildOptions(ScalarType.BFloat16, CPU, GlmInit.Random)
        {
            QuantizationBit = bits,
            Int4Format = QuantizationFormat.Int4PerRowChatGlm,
            QuantizeLmHead = bits > 0,
            QuantizeEmbeddings = bits > 0,
        });
        model.AddLora(new LoraConfig { TargetModules = new[] { "query_key_value" }, Rank = 4, Alpha = 8, AdapterDtype = ScalarType.Float32 });
        dp.BroadcastParameters(model);
        model.train();
        model.GradientCheckpointing = true;
        var parameters = model.GetLoraParameters();
        long gradients = parameters.Sum(p => p.numel());
        double buildS = sw.Elapsed.TotalSeconds;
        dp.Barrier(TimeSpan.FromMinutes(30));

        using var opt = optim.AdamW(parameters, lr: 1e-4);
        using var ids = ModelSuite.Prompt(config, tokens);
        var compute = new List<double>();
        var wait = new List<double>();
        var reduce = new List<double>();
        var update = new List<double>();
        for (int step = 0; step <= steps; step++)
        {
            using var scope = NewDisposeScope();
            opt.zero_grad();
            double c = ModelSuite.Time(() =>
            {
                using var o = model.call(new GlmInput(ids) { Labels = ids });
                o.Loss!.backward();
            });
            double w = ModelSuite.Time(() => dp.Barrier(TimeSpan.FromMinutes(30)));
            double r = ModelSuite.Time(() => dp.AverageGradients(parameters, tokens));
            double u = ModelSuite.Time(() => opt.step());
            if (step == 0) continue; // warm-up
            compute.Add(c);
            wait.Add(w);
            reduce.Add(r);
            update.Add(u);
            Say(string.Create(CultureInfo.InvariantCulture, $"  step {step}: forward+backward {c:F2} s, wait {w * 1e3:F0} ms, allreduce {r * 1e3:F1} ms, AdamW {u * 1e3:F1} ms"));
        }
        // The slowest rank's compute sets the step; report the maximum over ranks of each median.
        Span<double> medians = [ModelSuite.MedianOf(compute), ModelSuite.MedianOf(wait), ModelSuite.MedianOf(reduce), ModelSuite.MedianOf(update)];
        dp.AllreduceMax(medians);

        // The allreduce alone, for ChatGLM-6B's real LoRA gradient sizes (whatever --layers was).
        var sizes = new (string Name, long Count)[]
        {
            ("r=4 on query_key_value", full.NumLayers * 4L * (full.HiddenSize + 3L * full.HiddenSize)),
            ("r=16 on all four projections", full.NumLayers * 16L * (full.HiddenSize + 3L * full.HiddenSize + 2L * full.HiddenSize + 2L * (full.HiddenSize + full.MlpHiddenSize))),
        };
        var micro = new List<(string, long, double)>();
        foreach (var (name, count) in sizes)
        {
            using var p = nn.Parameter(randn(count));
            p.grad = randn(count);
            var times = new List<double>();
            for (int i = 0; i < 12; i++)
            {
                dp.Barrier();
                double t = ModelSuite.Time(() => dp.AverageGradients([p], 1));
                if (i >= 2) times.Add(t);
            }
            Span<double> m = [ModelSuite.MedianOf(times)];
            dp.AllreduceMax(m);
            micro.Add((name, count, m[0]));
        }

        Say("");
        Say($"| {dp.WorldSize} rank(s) × {threads} thread(s), {(bits == 0 ? "bf16" : $"int{bits}")}, {tokens} tokens per rank | per step (median of {steps}, slowest rank) | share of the step |");
        Say("|---|---|---|");
        double stepS = medians[0] + medians[1] + medians[2] + medians[3];
        Say($"| build (random weights, this rank) | {buildS:F1} s | |");
        Say(string.Create(CultureInfo.InvariantCulture, $"| forward + backward (checkpointing) | {medians[0]:F2} s | {medians[0] / stepS:P1} |"));
        Say(string.Create(CultureInfo.InvariantCulture, $"| wait for the slowest rank (barrier) | {medians[1] * 1e3:F0} ms | {medians[1] / stepS:P1} |"));
        Say(string.Create(CultureInfo.InvariantCulture, $"| gradient allreduce, {gradients:N0} floats = {gradients * 4 / 1e6:F2} MB (fused) | {medians[2] * 1e3:F1} ms | {medians[2] / stepS:P2} |"));
        Say(string.Create(CultureInfo.InvariantCulture, $"| AdamW step | {medians[3] * 1e3:F1} ms | {medians[3] / stepS:P2} |"));
        Say(string.Create(CultureInfo.InvariantCulture, $"| peak RSS (this rank) | {Process.GetCurrentProcess().PeakWorkingSet64 / 1e9:F2} GB | |"));
        Say("");
        Say($"| allreduce alone ({dp.WorldSize} ranks, shared memory), ChatGLM-6B gradients | floats | time (median of 10, slowest rank) | algorithm bandwidth | bus bandwidth 2(N−1)/N·bytes/time |");
        Say("|---|---|---|---|---|");
        foreach (var (name, count, t) in micro)
        {
            double bytes = count * 4.0, bus = dp.WorldSize > 1 ? 2.0 * (dp.WorldSize - 1) / dp.WorldSize * bytes / t : 0;
            Say(string.Create(CultureInfo.InvariantCulture, $"| {name} | {count:N0} ({bytes / 1e6:F1} MB) | {t * 1e3:F2} ms | {bytes / t / 1e9:F2} GB/s | {bus / 1e9:F2} GB/s |"));
        }
        return 0;
    }
}
