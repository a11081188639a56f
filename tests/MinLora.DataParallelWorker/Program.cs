using System.Diagnostics;
using System.Globalization;
using MinLora;
using MinLora.Distributed;
using MinLora.Glm;
using MinLora.Glm.Data;
using TorchSharp;
using TorchSharp.PyBridge;
using static TorchSharp.torch;

namespace MinLora.DataParallelWorker;

/// <summary>
/// LoRA steps on a small ChatGLM-architecture model with a fixed seed, alone or as one rank under mpirun:
/// every rank takes its contiguous share of the same global batches, so the adapter after the run should equal the
/// single-process one. Options (all optional):
/// --out DIR (rank 0 saves the adapter there), --dump (every rank also writes DIR-rank{r}.safetensors),
/// --steps K, --global-batch B, --accumulate M (micro-batches per rank and step), --unweighted (plain mean over
/// ranks instead of the token-weighted one: wrong when shares differ), --timeout S,
/// --lora-rank-on R:N (rank R builds a rank-N adapter), --hang-on R:STEP, --die-on R:STEP, --drop-param-on R:STEP
/// (rank R passes one parameter fewer to AverageGradients from STEP on), --extra-param (an optimized parameter that never
/// gets a gradient: it must stay untouched), --fail-save (rank 0's save throws).
/// </summary>
internal static class Program
{
    private static int Main(string[] args)
    {
        string? outDir = null;
        bool dump = false, unweighted = false, extraParam = false, failSave = false;
        int steps = 4, globalBatch = 5, accumulate = 1;
        double timeout = 600;
        (int Rank, int Value)? loraRankOn = null, hangOn = null, dieOn = null, dropParamOn = null;
        for (int i = 0; i < args.Length; i++)
        {
            string Next() => args[++i];
            (int, int) Pair()
            {
                var p = Next().Split(':');
                return (int.Parse(p[0], CultureInfo.InvariantCulture), int.Parse(p[1], CultureInfo.InvariantCulture));
            }
            switch (args[i])
            {
                case "--out": outDir = Next(); break;
                case "--dump": dump = true; break;
                case "--unweighted": unweighted = true; break;
                case "--steps": steps = int.Parse(Next(), CultureInfo.InvariantCulture); break;
                case "--global-batch": globalBatch = int.Parse(Next(), CultureInfo.InvariantCulture); break;
                case "--accumulate": accumulate = int.Parse(Next(), CultureInfo.InvariantCulture); break;
                case "--timeout": timeout = double.Parse(Next(), CultureInfo.InvariantCulture); break;
                case "--lora-rank-on": loraRankOn = Pair(); break;
                case "--hang-on": hangOn = Pair(); break;
                case "--die-on": dieOn = Pair(); break;
                case "--drop-param-on": dropParamOn = Pair(); break;
                case "--extra-param": extraParam = true; break;
                case "--fail-save": failSave = true; break;
                default: Console.Error.WriteLine($"unknown option {args[i]}"); return 2;
            }
        }

        using var dp = DataParallel.Initialize(new DataParallelOptions { Timeout = TimeSpan.FromSeconds(timeout) });
        try
        {
            torch.set_num_threads(1);
            manual_seed(11);
            var config = GlmConfig.FromJson("""
                {"model_type":"chatglm","vocab_size":120,"hidden_size":64,"num_layers":2,"num_attention_heads":4,
                 "inner_hidden_size":128,"max_sequence_length":64,"bos_token_id":4,"eos_token_id":5,"mask_token_id":6,
                 "gmask_token_id":7,"pad_token_id":3,"torch_dtype":"float32"}
                """);
            using var model = new GlmForCausalLM(config);
            int loraRank = loraRankOn is { } l && l.Rank == dp.Rank ? l.Value : 4;
            model.AddLora(new LoraConfig { Rank = loraRank, Alpha = 8, Dropout = 0, TargetModules = new[] { "query_key_value", "dense" } });
            // A different seed per rank: only the broadcast makes the adapters equal (B starts at zero, so perturb it too).
            manual_seed(1000 + dp.Rank);
            using (no_grad())
                foreach (var (_, t) in model.GetLoraStateDict()) t.copy_(randn_like(t) * 0.05);
            dp.BroadcastParameters(model);

            var examples = Examples(config, 40);
            var parameters = model.GetLoraParameters().ToList();
            using var extra = nn.Parameter(ones(3));
            if (extraParam) parameters.Add(extra);
            using var optimizer = optim.AdamW(parameters, lr: 1e-2, weight_decay: 0.01);
            model.train();
            for (int step = 0; step < steps; step++)
            {
                if (hangOn is { } h && h.Rank == dp.Rank && h.Value == step) Thread.Sleep(Timeout.Infinite);
                if (dieOn is { } d && d.Rank == dp.Rank && d.Value == step) Process.GetCurrentProcess().Kill();
                var global = Enumerable.Range(step * globalBatch, globalBatch).Select(i => examples[i % examples.Count]).ToList();
                var mine = dp.ShardBatch(global);
                optimizer.zero_grad();
                int localTokens = mine.Sum(Tokens);
                double lossSum = 0;
                for (int m = 0; m < accumulate; m++)
                {
                    var (start, count) = DataParallel.ShardRange(mine.Count, m, accumulate);
                    if (count == 0) continue;
                    var micro = mine.Skip(start).Take(count).ToList();
                    int microTokens = micro.Sum(Tokens);
                    using var scope = NewDisposeScope();
                    using var batch = FineTuningDatasetBuilder.Collate(micro, config);
                    var output = model.call(new GlmInput(batch.InputIds) { AttentionMask = batch.AttentionMask, PositionIds = batch.PositionIds, Labels = batch.Labels });
                    // Scaled so the accumulated gradient is the mean over this rank's label tokens.
                    (output.Loss! * ((double)microTokens / localTokens)).backward();
                    lossSum += output.Loss!.item<float>() * microTokens;
                }
                bool drop = dropParamOn is { } dr && dr.Rank == dp.Rank && step >= dr.Value;
                dp.AverageGradients(drop ? parameters.Take(parameters.Count - 1) : parameters, unweighted ? 1 : localTokens);
                nn.utils.clip_grad_norm_(parameters, 1.0);
                optimizer.step();
                Span<double> metrics = [lossSum, localTokens];
                dp.AllreduceSum(metrics);
                if (dp.IsMainProcess) Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"step {step + 1} loss {metrics[0] / metrics[1]:F6} tokens {metrics[1]}"));
            }
            if (outDir is not null)
            {
                dp.RunOnMainProcess(() =>
                {
                    if (failSave) throw new IOException("disk full (simulated)");
                    model.SaveLoraAdapter(outDir);
                }, "saving the adapter");
                if (dump)
                {
                    var state = model.GetLoraStateDict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().contiguous());
                    if (extraParam) state["extra"] = extra.detach().clone();
                    Safetensors.SaveStateDict($"{Path.TrimEndingDirectorySeparator(outDir)}-rank{dp.Rank}.safetensors", state);
                }
            }
            if (dp.IsMainProcess) Console.WriteLine($"done world {dp.WorldSize} mpi {dp.UsesMpi}");
            return 0;
        }
        catch (Exception ex) when (ex is DistributedException or IOException or InvalidOperationException)
        {
            Console.Error.WriteLine($"rank {dp.Rank}: error: {ex.Message}");
            return 3;
        }
    }

    private static int Tokens(FineTuningExample e) => e.Labels.Skip(1).Count(l => l != -100);

    /// <summary>ChatGLM-6B layout: prompt, [gMASK], &lt;sop&gt;, answer, &lt;eop&gt;; labels from &lt;sop&gt; on. Lengths vary so shares hold different token counts.</summary>
    private static List<FineTuningExample> Examples(GlmConfig config, int count)
    {
        var rng = new Random(1);
        var list = new List<FineTuningExample>();
        for (int i = 0; i < count; i++)
        {
            var prompt = Enumerable.Range(0, rng.Next(3, 12)).Select(_ => rng.Next(10, config.VocabSize)).ToList();
            var answer = Enumerable.Range(0, rng.Next(1, 9)).Select(_ => rng.Next(10, config.VocabSize)).ToList();
            var ids = prompt.Concat(new[] { config.GmaskTokenId, config.BosTokenId }).Concat(answer).Append(config.EosTokenId).ToArray();
            int context = prompt.Count + 1;
            var labels = ids.Select((id, k) => k < context ? -100 : id).ToArray();
            list.Add(new FineTuningExample(ids, labels, false, false));
        }
        return list;
    }
}
