using System.Diagnostics;
using MinLora.Distributed;
using MinLora.Glm;
using MinLora.Glm.Data;
using MinLora.Glm.Generation;
using MinLora.Glm.Modeling;
using MinLora.Glm.Tokenization;
using MinLora.Quantization;
using TorchSharp;
using TorchSharp.PyBridge;
using static TorchSharp.torch;

namespace MinLora.Samples.SpoExtraction;

/// <summary>Settings of the fine-tuning job (the command line maps onto it).</summary>
public sealed record SpoOptions
{
    /// <summary>A GLM checkpoint directory (config.json, weights, ice_text.model).</summary>
    public string ModelDirectory { get; init; } = Path.Combine(AppContext.BaseDirectory, "assets", "base");

    /// <summary>Training data (JSON lines).</summary>
    public string TrainFile { get; init; } = Path.Combine(AppContext.BaseDirectory, "data", "train.jsonl");

    /// <summary>Held-out data (JSON lines).</summary>
    public string TestFile { get; init; } = Path.Combine(AppContext.BaseDirectory, "data", "test.jsonl");

    /// <summary>Where checkpoints go.</summary>
    public string OutputDirectory { get; init; } = Path.Combine("out", "spo");

    /// <summary>LoRA rank.</summary>
    public int Rank { get; init; } = 16;

    /// <summary>LoRA alpha.</summary>
    public double Alpha { get; init; } = 32;

    /// <summary>LoRA dropout.</summary>
    public double Dropout { get; init; } = 0.05;

    /// <summary>Peak learning rate (cosine decay to 10 %).</summary>
    public double LearningRate { get; init; } = 5e-3;

    /// <summary>Passes over the training data.</summary>
    public int Epochs { get; init; } = 15;

    /// <summary>Sequences per step.</summary>
    public int BatchSize { get; init; } = 8;

    /// <summary>Prompt + text token budget.</summary>
    public int MaxSourceLength { get; init; } = 96;

    /// <summary>Answer token budget (also the generation limit).</summary>
    public int MaxTargetLength { get; init; } = 48;

    /// <summary>Weight bits of the base (8, 4, or 0 for float).</summary>
    public int Bits { get; init; } = 8;

    /// <summary>
    /// With 8 bits: many-row products (training batches, prompts) multiply int8 × int8, the activations quantized per
    /// token (<see cref="QuantizedLinearOptions.Int8Gemm"/>).
    /// </summary>
    public bool Int8Gemm { get; init; }

    /// <summary>Random seed.</summary>
    public int Seed { get; init; } = 42;

    /// <summary>Use at most this many training examples (null: all).</summary>
    public int? MaxTrainExamples { get; init; }

    /// <summary>Evaluate on at most this many held-out examples (null: all).</summary>
    public int? MaxTestExamples { get; init; }

    /// <summary>Where progress goes.</summary>
    public TextWriter Log { get; init; } = Console.Out;

    /// <summary>
    /// Checks every setting and the output location before any work: ranges, files that must exist, and that
    /// <see cref="OutputDirectory"/> can be created and written (so a finished training is never thrown away).
    /// </summary>
    /// <exception cref="ArgumentException">The first bad setting, by its option name.</exception>
    public void Validate()
    {
        if (Rank < 1) throw new ArgumentException($"--rank must be at least 1, got {Rank}");
        if (!(Alpha > 0) || !double.IsFinite(Alpha)) throw new ArgumentException($"--alpha must be a positive number, got {Alpha}");
        if (!(Dropout >= 0 && Dropout < 1)) throw new ArgumentException($"--dropout must be in [0, 1), got {Dropout}");
        if (!(LearningRate > 0) || !double.IsFinite(LearningRate)) throw new ArgumentException($"--lr must be a positive number, got {LearningRate}");
        if (Epochs < 1) throw new ArgumentException($"--epochs must be at least 1, got {Epochs}");
        if (BatchSize < 1) throw new ArgumentException($"--batch must be at least 1, got {BatchSize}");
        if (MaxSourceLength < 8) throw new ArgumentException($"--max-source must be at least 8, got {MaxSourceLength}");
        if (MaxTargetLength < 1) throw new ArgumentException($"--max-target must be at least 1, got {MaxTargetLength}");
        if (Bits is not (0 or 4 or 8)) throw new ArgumentException($"--bits must be 0, 4 or 8, got {Bits}");
        if (Int8Gemm && Bits != 8) throw new ArgumentException($"--int8-gemm needs --bits 8, got --bits {Bits}");
        if (MaxTrainExamples is < 1) throw new ArgumentException($"--max-train must be at least 1, got {MaxTrainExamples}");
        if (MaxTestExamples is < 1) throw new ArgumentException($"--max-test must be at least 1, got {MaxTestExamples}");
        if (!Directory.Exists(ModelDirectory)) throw new ArgumentException($"--model: no directory '{ModelDirectory}'");
        if (!File.Exists(TrainFile)) throw new ArgumentException($"--data: no file '{TrainFile}'");
        if (!File.Exists(TestFile)) throw new ArgumentException($"--test: no file '{TestFile}'");
        CheckWritable(OutputDirectory);
    }

    /// <summary>The output directory, or its nearest existing ancestor, must be a directory this process can write into.</summary>
    private static void CheckWritable(string directory)
    {
        if (string.IsNullOrWhiteSpace(directory)) throw new ArgumentException("--out must not be empty");
        var full = Path.GetFullPath(directory);
        if (File.Exists(full)) throw new ArgumentException($"--out: '{full}' is a file");
        // Atomic saves create a sibling of the output directory: its parent must be writable.
        var probe = Path.GetDirectoryName(Path.TrimEndingDirectorySeparator(full)) ?? full;
        while (!Directory.Exists(probe))
        {
            if (File.Exists(probe)) throw new ArgumentException($"--out: '{probe}' is a file, so '{full}' cannot be created");
            probe = Path.GetDirectoryName(probe) ?? throw new ArgumentException($"--out: no existing ancestor of '{full}'");
        }
        var test = Path.Combine(probe, $".minlora-write-test-{Environment.ProcessId}");
        try
        {
            File.WriteAllText(test, "");
            File.Delete(test);
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            throw new ArgumentException($"--out: cannot write in '{probe}' ({ex.Message})", ex);
        }
    }
}

/// <summary>What the job measured.</summary>
/// <param name="F1Before">Triple F1 of the base model on the held-out set.</param>
/// <param name="F1After">Triple F1 after fine-tuning (from the reloaded LoRA-only file).</param>
/// <param name="ScoresAfter">Precision, recall, F1 after.</param>
/// <param name="Count">Trainable / total parameters.</param>
/// <param name="TrainSeconds">Training time.</param>
/// <param name="TotalSeconds">Whole job time.</param>
/// <param name="PeakWorkingSetBytes">Peak process memory.</param>
/// <param name="ReloadMatches">Whether the reloaded LoRA-only model produced the same predictions as the trained one.</param>
/// <param name="FinalLoss">Mean loss of the last 10 % of steps.</param>
/// <param name="FirstLoss">Mean loss of the first 10 % of steps.</param>
/// <param name="Ranks">Processes that trained (1 without MPI).</param>
/// <param name="CommunicationSeconds">Time this rank spent in collective operations (0 without MPI).</param>
public sealed record SpoResult(double F1Before, double F1After, SpoScores ScoresAfter, ParameterCount Count, double TrainSeconds, double TotalSeconds, long PeakWorkingSetBytes, bool ReloadMatches, double FirstLoss, double FinalLoss, int Ranks = 1, double CommunicationSeconds = 0);

/// <summary>The book's job: quantize a GLM, add LoRA to query_key_value, fine-tune on SPO extraction, save, reload, evaluate.</summary>
public static class SpoPipeline
{
    /// <summary>Runs the job, alone or as one rank of a data-parallel job (<c>mpirun -np N</c>).</summary>
    /// <param name="o">Settings.</param>
    /// <param name="dp">
    /// The data-parallel job (null: one process). Every global batch of <see cref="SpoOptions.BatchSize"/> sequences is
    /// split across the ranks and their gradients averaged weighted by label tokens, so N ranks train the adapter one
    /// process would; evaluation is split too. Rank 0 alone logs and writes; <see cref="SpoOptions.OutputDirectory"/>
    /// must be visible to every rank (all reload the saved adapter).
    /// </param>
    /// <returns>The measurements (the same on every rank, except times and memory).</returns>
    public static SpoResult Run(SpoOptions o, DataParallel? dp = null)
    {
        ArgumentNullException.ThrowIfNull(o);
        using var single = dp is null ? DataParallel.Initialize(new DataParallelOptions { Mode = DataParallelMode.SingleProcess }) : null;
        dp ??= single!;
        var log = dp.IsMainProcess ? o.Log : TextWriter.Null;
        var clock = Stopwatch.StartNew();
        manual_seed(o.Seed);
        // ChatGLM-6B (ice_text.model), ChatGLM2/3 or GLM-4 (tokenizer.model): the directory decides.
        var tokenizer = GlmTokenizers.FromPretrained(o.ModelDirectory);
        var train = SpoData.ReadJsonLines(o.TrainFile).Take(o.MaxTrainExamples ?? int.MaxValue).ToList();
        var test = SpoData.ReadJsonLines(o.TestFile).Take(o.MaxTestExamples ?? int.MaxValue).ToList();
        // Nothing to train on or to score is an error found before the model loads, and nothing is written.
        if (train.Count == 0) throw new InvalidDataException($"{o.TrainFile}: no training examples.");
        if (test.Count == 0) throw new InvalidDataException($"{o.TestFile}: no held-out examples.");
        var builder = new SpoDatasetBuilder(tokenizer, new SpoTrainingOptions { MaxSourceLength = o.MaxSourceLength, MaxTargetLength = o.MaxTargetLength });
        var (examples, cutSources, cutTargets) = builder.BuildAll(train);
        log.WriteLine($"data: {train.Count} training examples ({cutSources} texts and {cutTargets} answers truncated), {test.Count} held out");

        if (dp.WorldSize > 1) log.WriteLine($"data parallel: {dp.WorldSize} ranks, each global batch of {o.BatchSize} split across them");
        var model = LoadBase(o, log);
        log.WriteLine("evaluating the base model (before fine-tuning) …");
        var before = Evaluate(model, tokenizer, builder, test, o, dp);
        log.WriteLine($"   F1 before: {before.Scores.F1:F4}");

        var adapted = model.AddLora(new LoraConfig { Rank = o.Rank, Alpha = o.Alpha, Dropout = o.Dropout, TargetModules = new[] { "query_key_value" } });
        // Every rank starts from rank 0's adapter (and this checks they all built the same one); dropout then draws
        // different masks on each rank, as it would for different sequences of one process.
        dp.BroadcastParameters(model);
        if (dp.WorldSize > 1) manual_seed(o.Seed + 1000 * dp.Rank);
        var count = model.CountParameters();
        log.WriteLine($"LoRA r={o.Rank} alpha={o.Alpha} on {adapted.Count} query_key_value layers: {count}");

        var trainClock = Stopwatch.StartNew();
        var losses = Train(model, examples, o, log, dp);
        double trainSeconds = trainClock.Elapsed.TotalSeconds;

        // The adapter and the full state dict replace a previous run's output together, only now that there is a result.
        var loraDir = Path.Combine(o.OutputDirectory, "lora");
        var fullPath = Path.Combine(o.OutputDirectory, "model_with_lora.safetensors");
        dp.RunOnMainProcess(() =>
        {
            var state = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().cpu().contiguous());
            AtomicDirectory.Write(o.OutputDirectory, staging =>
            {
                model.SaveLoraAdapter(Path.Combine(staging, "lora"), baseModelNameOrPath: o.ModelDirectory);
                Safetensors.SaveStateDict(Path.Combine(staging, "model_with_lora.safetensors"), state);
            });
        }, "saving the adapter", timeout: TimeSpan.FromHours(2)); // a 6B full state dict on a slow disk takes a while
        log.WriteLine($"saved: {loraDir} (LoRA only, PEFT layout) and {fullPath} (full state dict)");

        var trained = Evaluate(model, tokenizer, builder, test, o, dp);
        model.Dispose();

        log.WriteLine("reloading the LoRA-only file into a fresh base …");
        using var fresh = LoadBase(o, log);
        fresh.LoadLoraAdapter(loraDir);
        var after = Evaluate(fresh, tokenizer, builder, test, o, dp);
        Span<double> differing = [trained.Predictions.SequenceEqual(after.Predictions) ? 0 : 1];
        dp.AllreduceSum(differing);
        bool same = differing[0] == 0;
        log.WriteLine($"   F1 after: {after.Scores.F1:F4} (reloaded predictions {(same ? "identical" : "DIFFERENT")})");
        if (after.Predictions.Count > 0) log.WriteLine($"   e.g. \"{test[0].Text}\" → {after.Predictions[0].Replace("\n", " | ", StringComparison.Ordinal)}");

        int n = losses.Count, k = Math.Max(1, n / 10);
        return new SpoResult(before.Scores.F1, after.Scores.F1, after.Scores, count, trainSeconds, clock.Elapsed.TotalSeconds,
            Process.GetCurrentProcess().PeakWorkingSet64, same, losses.Take(k).Average(), losses.Skip(n - k).Average(),
            dp.WorldSize, dp.CommunicationTime.TotalSeconds);
    }

    private static GlmForCausalLM LoadBase(SpoOptions o, TextWriter log)
    {
        var (model, report) = GlmCheckpoint.FromPretrained(o.ModelDirectory, new GlmLoadOptions
        {
            QuantizationBit = o.Bits == 0 ? null : o.Bits,
            Quantization = new QuantizeOptions { GroupSize = 32, Int4Format = QuantizationFormat.Int4Grouped, Layer = new QuantizedLinearOptions { Int8Gemm = o.Int8Gemm } },
        });
        log.WriteLine($"base: {o.ModelDirectory} ({report.LoadedKeys} tensors, {(o.Bits == 0 ? "float32" : $"INT{o.Bits}")}{(o.Int8Gemm ? ", int8 GEMM" : "")}, {model.GetSizeInBytes() / 1e6:F1} MB)");
        foreach (var reason in model.modules().OfType<QuantizedLinear>().Select(q => q.Int8GemmFallbackReason).OfType<string>().Distinct())
            log.WriteLine($"note: --int8-gemm is ignored here: {reason}");
        return model;
    }

    private static List<double> Train(GlmForCausalLM model, IReadOnlyList<FineTuningExample> examples, SpoOptions o, TextWriter log, DataParallel dp)
    {
        var parameters = model.GetLoraParameters();
        using var optimizer = optim.AdamW(parameters, lr: o.LearningRate, weight_decay: 0.01);
        int stepsPerEpoch = (examples.Count + o.BatchSize - 1) / o.BatchSize;
        int total = stepsPerEpoch * o.Epochs, step = 0;
        var losses = new List<double>(total);
        // The same seed on every rank: every rank sees the same global batches and takes its share of each.
        var rng = new Random(o.Seed);
        model.train();
        using var progress = new ProgressBar(log, total);
        for (int epoch = 0; epoch < o.Epochs; epoch++)
        {
            var order = Enumerable.Range(0, examples.Count).OrderBy(_ => rng.Next()).ToList();
            for (int b = 0; b < stepsPerEpoch; b++)
            {
                // Cosine schedule from the peak to 10 % of it.
                double lr = o.LearningRate * (0.1 + 0.9 * 0.5 * (1 + Math.Cos(Math.PI * step / Math.Max(1, total - 1))));
                foreach (var g in optimizer.ParamGroups) g.LearningRate = lr;
                using var scope = NewDisposeScope();
                var global = order.Skip(b * o.BatchSize).Take(o.BatchSize).Select(i => examples[i]).ToList();
                var batch = dp.ShardBatch(global);
                optimizer.zero_grad();
                // The loss is the mean over the label tokens of the collated (shifted) batch: weighting each rank's
                // mean by its count makes the averaged gradient the one of the whole global batch (one process: no
                // change at all). A share without label tokens contributes nothing (its loss would be NaN).
                int tokens = 0;
                double lossSum = 0;
                if (batch.Count > 0)
                {
                    using var t = SpoDatasetBuilder.Collate(batch, model.Config);
                    tokens = (int)t.Labels.narrow(1, 1, t.Labels.shape[1] - 1).ne(-100).sum().item<long>();
                    if (tokens > 0)
                    {
                        using var output = model.call(new GlmInput(t.InputIds) { AttentionMask = t.AttentionMask, PositionIds = t.PositionIds, Labels = t.Labels });
                        output.Loss!.backward();
                        lossSum = output.Loss.item<float>() * (double)tokens;
                    }
                }
                dp.AverageGradients(parameters, tokens);
                nn.utils.clip_grad_norm_(parameters, 1.0);
                optimizer.step();
                Span<double> sums = [lossSum, tokens];
                dp.AllreduceSum(sums);
                double loss = sums[1] > 0 ? sums[0] / sums[1] : 0;
                losses.Add(loss);
                progress.Report(++step, $"epoch {epoch + 1}/{o.Epochs} loss {loss:F4} lr {lr:E2}");
            }
        }
        model.eval();
        return losses;
    }

    private sealed record Evaluation(SpoScores Scores, IReadOnlyList<string> Predictions);

    /// <summary>Greedy answers for this rank's share of the held-out set, scored over all ranks' counts.</summary>
    private static Evaluation Evaluate(GlmForCausalLM model, IGlmTextTokenizer tokenizer, SpoDatasetBuilder builder, IReadOnlyList<SpoExample> test, SpoOptions o, DataParallel dp)
    {
        var mine = dp.ShardDataset(test);
        var predictions = new List<string>();
        var options = new GenerationOptions { DoSample = false, MaxNewTokens = o.MaxTargetLength, MaxLength = o.MaxSourceLength + o.MaxTargetLength + 3 };
        foreach (var chunk in mine.Chunk(16))
        {
            var inputs = chunk.Select(e => tokenizer.BuildInputs(builder.Source(e.Text).Ids)).ToList();
            foreach (var generated in model.Generate(inputs, options)) predictions.Add(tokenizer.Decode(generated.TokenIds, true).Trim());
        }
        var counts = SpoEvaluation.Count(predictions.Zip(mine, (p, e) => (p, e.Answer))).ToArray();
        dp.AllreduceSum(counts);
        return new Evaluation(SpoCounts.FromArray(counts).ToScores(), predictions);
    }

    /// <summary>
    /// Builds the built-in base model: a small ChatGLM-architecture model (random init) pre-trained with full
    /// fine-tuning on two warm-up tasks over the synthetic texts — copying the text and listing the parts it
    /// mentions — but never on triple extraction, so the extraction format is what LoRA has to teach it.
    /// </summary>
    /// <param name="directory">Output checkpoint directory (gets config.json, model.safetensors and the tokenizer files).</param>
    /// <param name="tokenizerDirectory">Where ice_text.model (made by tools/spo/make_tokenizer.py) is.</param>
    /// <param name="texts">The pre-training texts.</param>
    /// <param name="steps">Optimizer steps.</param>
    /// <param name="log">Progress.</param>
    public static void BuildBase(string directory, string tokenizerDirectory, IReadOnlyList<SpoExample> texts, int steps, TextWriter log)
    {
        ArgumentNullException.ThrowIfNull(texts);
        manual_seed(7);
        var tokenizer = GlmTokenizer.FromPretrained(tokenizerDirectory);
        var config = GlmConfig.FromJson($$"""
            {"model_type":"chatglm","vocab_size":{{tokenizer.VocabSize}},"hidden_size":128,"num_layers":4,"num_attention_heads":4,
             "inner_hidden_size":512,"max_sequence_length":256,"bos_token_id":{{tokenizer.BosId}},"eos_token_id":{{tokenizer.EosId}},
             "mask_token_id":{{tokenizer.MaskId}},"gmask_token_id":{{tokenizer.GmaskId}},"pad_token_id":{{tokenizer.PadId}},"torch_dtype":"float32"}
            """);
        using var model = new GlmForCausalLM(config);
        var copy = new SpoDatasetBuilder(tokenizer, new SpoTrainingOptions { Prompt = "复述文本：", MaxSourceLength = 96, MaxTargetLength = 80 });
        var parts = new SpoDatasetBuilder(tokenizer, new SpoTrainingOptions { Prompt = "列出部件：", MaxSourceLength = 96, MaxTargetLength = 40 });
        var tasks = texts.Select(e => copy.Build(e with { Answer = e.Text }))
            .Concat(texts.Select(e => parts.Build(e with { Answer = string.Join("\n", SpoTriple.Parse(e.Answer).Select(t => t.Subject).Distinct()) })))
            .ToList();
        using var optimizer = optim.AdamW(model.parameters(), lr: 2e-3, weight_decay: 0.01);
        var rng = new Random(7);
        model.train();
        using var progress = new ProgressBar(log, steps);
        for (int step = 0; step < steps; step++)
        {
            double lr = 2e-3 * 0.5 * (1 + Math.Cos(Math.PI * step / steps));
            foreach (var g in optimizer.ParamGroups) g.LearningRate = lr;
            using var scope = NewDisposeScope();
            var batch = Enumerable.Range(0, 16).Select(_ => tasks[rng.Next(tasks.Count)]).ToList();
            using var t = SpoDatasetBuilder.Collate(batch, config);
            optimizer.zero_grad();
            using var output = model.call(new GlmInput(t.InputIds) { AttentionMask = t.AttentionMask, PositionIds = t.PositionIds, Labels = t.Labels });
            output.Loss!.backward();
            nn.utils.clip_grad_norm_(model.parameters(), 1.0);
            optimizer.step();
            progress.Report(step + 1, $"loss {output.Loss.item<float>():F4}");
        }
        var state = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().contiguous());
        AtomicDirectory.Write(directory, staging =>
        {
            File.WriteAllText(Path.Combine(staging, "config.json"), config.ToJson());
            Safetensors.SaveStateDict(Path.Combine(staging, "model.safetensors"), state);
            foreach (var f in new[] { "ice_text.model", "tokenizer_config.json" })
                File.Copy(Path.Combine(tokenizerDirectory, f), Path.Combine(staging, f));
        });
    }
}
