using System.Diagnostics;
using System.Globalization;
using System.Runtime.Intrinsics;
using MinLora;
using MinLora.Glm;
using MinLora.Glm.Modeling;
using MinLora.Quantization;
using TorchSharp;
using static TorchSharp.torch;

/// <summary>
/// ChatGLM-6B at its real shape (the config's built-in dimensions, random weights built directly in the chosen format:
/// no download, no float copy of a quantized model): build time, size, peak RSS, prefill, decode, LoRA training step,
/// each beside its roofline measured in the same process.
/// <list type="bullet">
/// <item>decode: bytes read per token (weights without the embedding table, plus the KV cache at that context) ÷ the
/// best plain-read bandwidth of a buffer several times the last-level cache, read passes interleaved with the steps;</item>
/// <item>prefill and training: the time of the same products as bf16 <c>linear</c> calls with that many rows (4
/// projections × layers + the head; training: forward + input-gradient products), measured on bf16 weights of
/// those shapes.</item>
/// </list>
/// </summary>
internal static class ModelSuite
{
    private sealed record Row(string Measure, string Value, string Roofline, string Fraction);

    /// <summary>Prints the table as rows arrive (a run that dies late still leaves its figures).</summary>
    private sealed class RowPrinter(string label)
    {
        private bool _header;

        public void Add(Row r)
        {
            if (!_header)
            {
                Console.WriteLine();
                Console.WriteLine($"| {label} | measured | roofline (same process) | fraction of roofline |");
                Console.WriteLine("|---|---|---|---|");
                _header = true;
            }
            Console.WriteLine($"| {r.Measure} | {r.Value} | {r.Roofline} | {r.Fraction} |");
        }
    }

    public static int Run(List<string> args)
    {
        int bits = Int(args, "--bits", 4);
        string int4 = Str(args, "--int4-format", "chatglm");
        bool train = args.Contains("--train");
        bool quick = args.Contains("--quick");
        int steps = Int(args, "--steps", quick ? 4 : 12);
        string only = Str(args, "--only", "all");
        if (only is not ("all" or "prefill" or "decode" or "train")) { Console.Error.WriteLine("--only must be all, prefill, decode or train"); return 2; }
        train |= only == "train";
        if (bits is not (0 or 4 or 8)) { Console.Error.WriteLine("--bits must be 0, 4 or 8"); return 2; }
        if (int4 is not ("chatglm" or "g128")) { Console.Error.WriteLine("--int4-format must be chatglm or g128"); return 2; }
        var format = bits == 8 ? QuantizationFormat.Int8PerRow : int4 == "g128" ? QuantizationFormat.Int4Grouped : QuantizationFormat.Int4PerRowChatGlm;
        string arch = Str(args, "--arch", "chatglm");
        if (arch is not ("chatglm" or "chatglm3" or "glm4")) { Console.Error.WriteLine("--arch must be chatglm (ChatGLM-6B), chatglm3 (ChatGLM2/3-6B) or glm4 (GLM-4-9B)"); return 2; }
        // --quick: the same code on a small GLM (for checking the suite itself, not for figures).
        // ChatGLM3-6B (= ChatGLM2-6B's architecture; 8k sequence).
        var chatGlm3 = new GlmConfig
        {
            VocabSize = 65024,
            PaddedVocabSize = 65024,
            MultiQueryAttention = true,
            MultiQueryGroupNum = 2,
            KvChannels = 128,
            FfnHiddenSize = 13696,
            Rmsnorm = true,
            AddQkvBias = true,
            AddBiasLinear = false,
            PostLayerNorm = true,
            SeqLength = 8192,
            EosTokenId = 2,
            PadTokenId = 0,
            HiddenSize = quick ? 512 : 4096,
            NumLayers = quick ? 2 : 28,
            NumAttentionHeads = quick ? 8 : 32,
        };
        var config = arch == "chatglm3" ? chatGlm3
            // GLM-4-9B (glm-4-9b-chat's config.json): the same architecture at 40 layers, a 151,552-id vocabulary.
            : arch == "glm4" ? chatGlm3 with
            {
                VocabSize = 151552,
                PaddedVocabSize = 151552,
                SeqLength = 131072,
                RopeRatio = 500,
                LayernormEpsilon = 1.5625e-07,
                EosTokenId = 151329,
                PadTokenId = 151329,
                NumLayers = quick ? 2 : 40,
            }
            : quick ? new GlmConfig { HiddenSize = 512, NumLayers = 2, NumAttentionHeads = 8, VocabSize = 130528 } : new GlmConfig();
        bool v2 = config.Version == GlmVersion.ChatGlm2;
        if (args.Contains("--layers")) config = config with { NumLayers = Int(args, "--layers", config.NumLayers) };   // for probes, not figures
        // --int8-gemm: int8 × int8 products for prompts and training (QuantizedLinearOptions.Int8Gemm; per-row formats).
        bool int8Gemm = args.Contains("--int8-gemm");
        // --outlier-threshold X|inf: QuantizedLinearOptions.Int8GemmOutlierThreshold (inf: no outlier split).
        float outlierThreshold = Str(args, "--outlier-threshold", "6") is var th && th == "inf" ? float.PositiveInfinity : float.Parse(th, CultureInfo.InvariantCulture);
        // --outlier-features N: make N hidden features outliers, as trained LLMs' are (LLM.int8(), Dettmers et al. 2022): their
        // weight in every block's two LayerNorms × 30, so the inputs of query_key_value and dense_h_to_4h carry N columns
        // of |x| ~ 30·|z| (random weights alone give none above the threshold).
        int outlierFeatures = Int(args, "--outlier-features", 0);
        if (int8Gemm && !(bits == 8 || (bits == 4 && int4 == "chatglm"))) { Console.Error.WriteLine("--int8-gemm needs --bits 8, or --bits 4 with the chatglm int4 format"); return 2; }
        string label = (bits == 0 ? "bf16" : bits == 8 ? "int8" : $"int4 {int4}") + (args.Contains("--quantize-head") && bits > 0 ? " + head" : "") +
            (args.Contains("--quantize-embeddings") && bits > 0 ? " + embeddings" : "") + (int8Gemm ? " + int8 GEMM" : "") +
            (int8Gemm && float.IsPositiveInfinity(outlierThreshold) ? " (no outlier split)" : int8Gemm && outlierThreshold != 6f ? $" (outlier threshold {outlierThreshold})" : "") +
            (outlierFeatures > 0 ? $", {outlierFeatures} outlier features" : "");
        Console.WriteLine($"{(arch == "glm4" ? "GLM-4-9B" : v2 ? "ChatGLM3-6B" : "ChatGLM-6B")} shape{(quick ? " (--quick: small)" : "")}: hidden {config.HiddenSize}, {config.NumLayers} layers, vocab {config.ModelVocabSize}{(v2 ? $", {config.KvGroups} KV groups" : "")}; weights {label}, activations bf16; {get_num_threads()} threads");
        var rows = new RowPrinter(label);
        bool doPrefill = only is "all" or "prefill", doDecode = only is "all" or "decode";

        Progress("building the model");
        long rssBefore = Rss.Current();
        var sw = Stopwatch.StartNew();
        bool quantizeHead = args.Contains("--quantize-head"), quantizeEmbeddings = args.Contains("--quantize-embeddings");
        // Huge pages for the weights (GlmBuildOptions.HugePages, the default); --no-huge-pages measures without.
        bool huge = !args.Contains("--no-huge-pages");
        // --ab-two-streams / --ab-bf16-activations / --ab-fused-ops / --ab-layer-norm: odd decode steps take the other
        // form, timed apart.
        // --ab-blocks-per-core N: odd steps split each product into N blocks per core instead of CpuGemv.BlocksPerCore.
        if (new[] { "--ab-two-streams", "--ab-bf16-activations", "--ab-fused-ops", "--ab-layer-norm", "--ab-blocks-per-core" }.Count(args.Contains) > 1) { Console.Error.WriteLine("give one --ab-… decode flag at a time"); return 2; }
        string? abForm = args.Contains("--ab-two-streams") ? "two-streams" : args.Contains("--ab-bf16-activations") ? "bf16-activations"
            : args.Contains("--ab-fused-ops") ? "fused-ops" : args.Contains("--ab-layer-norm") ? "layer-norm" : args.Contains("--ab-blocks-per-core") ? "blocks" : null;
        int abBlocks = Int(args, "--ab-blocks-per-core", 0);
        if (abForm == "blocks" && abBlocks < 1) { Console.Error.WriteLine("--ab-blocks-per-core needs a count ≥ 1"); return 2; }
        if (abForm == "layer-norm" && arch != "chatglm") { Console.Error.WriteLine("--ab-layer-norm needs --arch chatglm (v2 models have RMSNorm: --ab-fused-ops)"); return 2; }
        bool abOutlierSplit = args.Contains("--ab-outlier-split");
        if (abOutlierSplit && (!int8Gemm || args.Contains("--compare-bf16"))) { Console.Error.WriteLine("--ab-outlier-split needs --int8-gemm and no --compare-bf16"); return 2; }
        var model = new GlmForCausalLM(config, new GlmBuildOptions(ScalarType.BFloat16, CPU, GlmInit.Random)
        {
            HugePages = huge,
            QuantizationBit = bits,
            Int4Format = format,
            QuantizeLmHead = quantizeHead && bits > 0,
            QuantizeEmbeddings = quantizeEmbeddings && bits > 0,
            QuantizedLayer = int8Gemm ? new QuantizedLinearOptions { Int8Gemm = true, Int8GemmOutlierThreshold = outlierThreshold } : null,
        });
        model.eval();
        if (outlierFeatures > 0)
        {
            using var noGrad = no_grad();
            using var index = tensor(QuantSuite.OutlierFeatureColumns(config.HiddenSize, outlierFeatures));
            foreach (var (name, p) in model.named_parameters().Where(p => p.name.EndsWith("input_layernorm.weight", StringComparison.Ordinal) || p.name.EndsWith("post_attention_layernorm.weight", StringComparison.Ordinal)))
                p.index_copy_(0, index, p.index_select(0, index).mul(30));
        }
        double buildS = sw.Elapsed.TotalSeconds;
        long hugeBytes = Rss.AnonHugePages();
        long size = model.GetSizeInBytes();
        // A step reads one embedding row per token, not the table.
        var embeddingPrefix = v2 ? "transformer.embedding.word_embeddings." : "transformer.word_embeddings.";
        long embedding = model.state_dict().Where(kv => kv.Key.StartsWith(embeddingPrefix, StringComparison.Ordinal)).Sum(kv => kv.Value.numel() * kv.Value.element_size());
        long weightRead = size - embedding;
        var kernels = model.modules().OfType<QuantizedLinear>().Select(q => q.Kernel.ToString()).Distinct().ToList();
        rows.Add(new("build (random weights)", $"{buildS:F1} s", "", ""));
        rows.Add(new("model size (resident tensors)", Gb(size), "", kernels.Count > 0 ? "kernel " + string.Join("/", kernels) : ""));
        // A figure labelled --int8-gemm must come from that path: say so when a layer ignores the option.
        foreach (var reason in model.modules().OfType<QuantizedLinear>().Select(q => q.Int8GemmFallbackReason).OfType<string>().Distinct())
            rows.Add(new("int8 GEMM ignored (--int8-gemm)", reason, "", ""));
        rows.Add(new("huge pages (GlmBuildOptions.HugePages)", (huge ? "on" : "off (--no-huge-pages)") + $": {Gb(hugeBytes)} of the process on 2 MiB pages", "", huge ? "read roofline on huge pages too" : "read roofline on 4 KiB pages"));
        rows.Add(new("RSS after build (peak)", $"{Gb(Rss.Current() - rssBefore)} ({Gb(Rss.Peak() - rssBefore)}) over the empty process", "", ""));

        // Training first, on the freshly built model, so its peak RSS is the model's plus training's (the roofline's
        // buffers and the allocator's leftovers from inference are not in it).
        var trainRows = new List<(int Tokens, bool Checkpointing, double Seconds)>();
        // --compare-bf16 (quantized models): a bf16 twin holding the same weights dequantized (see DequantizedTwin)
        // runs the same training steps and prompts in interleaved rounds, so ratios to bf16 come from one process.
        bool compare = bits > 0 && args.Contains("--compare-bf16") && (train || doPrefill);
        GlmForCausalLM? twin = null;
        var lora = new LoraConfig { TargetModules = new[] { "query_key_value" }, Rank = 4, Alpha = 8, AdapterDtype = ScalarType.Float32 };
        if (train)
        {
            model.AddLora(lora);
            model.train();
            var cases = TrainCases(Str(args, "--train-cases", quick ? "64:off,64:on" : "256:off,256:on,1024:on"));
            using (var opt = optim.AdamW(model.GetLoraParameters(), lr: 1e-4))
            {
                foreach (var (s, checkpointing) in cases)
                {
                    Progress($"training step, {s} tokens, checkpointing {checkpointing}");
                    model.GradientCheckpointing = checkpointing;
                    using var ids = Prompt(config, s);
                    Rss.ResetPeak();
                    double t = Median(s > 256 ? 1 : 2, () => TrainStep(model, opt, ids));
                    long peak = Rss.Peak();
                    trainRows.Add((s, checkpointing, t));
                    rows.Add(new($"LoRA step r=4 qkv, {s} tokens{(checkpointing ? ", gradient checkpointing" : "")}",
                        $"{t:F2} s; peak RSS {Gb(peak - rssBefore)} over the empty process (model {Gb(size)})", "(below)", ""));
                }
            }
            model.RemoveLora();
            if (compare)
            {
                // After the peaks above (the twin would count in them): the same steps on both models, interleaved.
                twin = DequantizedTwin(model, config, huge);
                model.AddLora(lora);
                twin.AddLora(lora);
                model.train();
                twin.train();
                using var optQ = optim.AdamW(model.GetLoraParameters(), lr: 1e-4);
                using var optB = optim.AdamW(twin.GetLoraParameters(), lr: 1e-4);
                foreach (var (s, checkpointing) in cases)
                {
                    Progress($"training step against the bf16 twin, {s} tokens, checkpointing {checkpointing}");
                    model.GradientCheckpointing = twin.GradientCheckpointing = checkpointing;
                    using var ids = Prompt(config, s);
                    TrainStep(model, optQ, ids);   // first steps: allocator and primitive warm-up
                    TrainStep(twin, optB, ids);
                    int rounds = s > 256 ? 1 : 3;
                    var (tq, tb) = Alternate(rounds, () => TrainStep(model, optQ, ids), () => TrainStep(twin, optB, ids));
                    rows.Add(new($"  bf16 twin, same weights: LoRA step, {s} tokens{(checkpointing ? ", checkpointing" : "")}",
                        $"quantized {tq:F2} s, bf16 {tb:F2} s: **{tq / tb:F2}×** the bf16 step (medians of {rounds} interleaved rounds)", "", ""));
                }
                twin.RemoveLora();
                twin.GradientCheckpointing = false;
                twin.eval();
                model.RemoveLora();
            }
            model.GradientCheckpointing = false;
            model.eval();
        }

        Progress("measuring the bf16 GEMM roofline");
        using var gemm = new GemmRoofline(config);
        foreach (var (s, checkpointing, t) in trainRows)
        {
            // Checkpointing runs the forward products twice.
            double bound = gemm.ForwardSeconds(s, 2) + (checkpointing ? gemm.ForwardSeconds(s, 1) : 0);
            rows.Add(new($"  roofline of that step ({s} tokens{(checkpointing ? ", checkpointing" : "")})", $"{t:F2} s",
                $"{bound:F2} s bf16 GEMM (fwd{(checkpointing ? " ×2" : "")} + dX)", Pct(bound / t)));
        }

        // Prefill: one forward over s tokens, no cache, logits for every position (as a scoring pass does).
        // --compare-bf16 (quantized models): a bf16 twin holding the same weights dequantized runs the same prompts in
        // interleaved rounds, so the ratio to the bf16 model comes from one process, and the logits' difference is the
        // error of the quantized path's arithmetic alone (the weights are equal).
        var prefillSizes = !doPrefill ? Array.Empty<int>() : quick ? new[] { 16, 128 } : new[] { 16, 128, 512 };
        if (compare && doPrefill)
        {
            // The twin needs the memory: measure the GEMM roofline first and free its weights.
            foreach (int s in prefillSizes) gemm.ForwardSeconds(s, 1);
            gemm.ReleaseWeights();
        }
        if (compare && doPrefill) twin ??= DequantizedTwin(model, config, huge);
        foreach (int s in prefillSizes)
        {
            Progress($"prefill {s}");
            using var ids = Prompt(config, s);
            double Prefill(GlmForCausalLM m) => Time(() =>
            {
                using var noGrad = no_grad();
                using var o = m.call(new GlmInput(ids));
            });
            double bound = gemm.ForwardSeconds(s, 1);
            if (abOutlierSplit)
            {
                // --ab-outlier-split: the same model with Int8Gemm's outlier split on and off (Int8Gemm.SplitOutliers), in
                // interleaved rounds.
                double Whole() { Int8Gemm.SplitOutliers = false; try { return Prefill(model); } finally { Int8Gemm.SplitOutliers = true; } }
                int abRounds = quick ? 2 : 5;
                var (ts, tw) = Alternate(abRounds, () => Prefill(model), Whole);
                rows.Add(new($"prefill {s} tokens", $"{s / ts:F1} tok/s ({ts * 1e3:F0} ms)", $"{s / bound:F1} tok/s bf16 GEMM", Pct(bound / ts)));
                rows.Add(new($"  A/B: outlier split off, {s} tokens", $"{s / tw:F1} tok/s ({tw * 1e3:F0} ms): split ÷ whole rows **{ts / tw:F2}** (medians of {abRounds} interleaved rounds)", "", ""));
                continue;
            }
            if (twin is null)
            {
                double t = Median(quick ? 2 : 3, () => Prefill(model));
                rows.Add(new($"prefill {s} tokens", $"{s / t:F1} tok/s ({t * 1e3:F0} ms)", $"{s / bound:F1} tok/s bf16 GEMM", Pct(bound / t)));
                continue;
            }
            int rounds = quick ? 2 : 5;
            var (tq, tb) = Alternate(rounds, () => Prefill(model), () => Prefill(twin));
            rows.Add(new($"prefill {s} tokens", $"{s / tq:F1} tok/s ({tq * 1e3:F0} ms)", $"{s / bound:F1} tok/s bf16 GEMM", Pct(bound / tq)));
            rows.Add(new($"  bf16 twin, same weights, {s} tokens", $"{s / tb:F1} tok/s ({tb * 1e3:F0} ms): quantized **{tb / tq:F2}×** bf16 (medians of {rounds} interleaved rounds)",
                "", $"logits: {LogitsDifference(model, twin, ids)}"));
        }
        twin?.Dispose();   // before decoding: the read buffer needs the memory
        if (int8Gemm && doPrefill)
        {
            // Int8Gemm's outlier split (QuantizedLinearOptions.Int8GemmOutlierThreshold): the layers where some prompt
            // call had outlier feature columns, and how many (random weights alone: none; see --outlier-features).
            var split = model.modules().OfType<QuantizedLinear>().Select(q => q.OutlierWeights?.Columns.Length ?? 0).ToList();
            rows.Add(new("  Int8Gemm outlier split", $"{split.Count(c => c > 0)} of {split.Count} layers split outlier columns off (the last such call: at most {split.DefaultIfEmpty().Max()} columns)", "", ""));
        }

        // The read roofline: a buffer of 4 × the last-level cache, read between decode steps.
        var readBest = doDecode ? new ReadBandwidth(huge) : null;
        readBest?.Pass();

        // Decode: one token per step with the KV cache, greedy; median step time; read passes interleaved. The fraction
        // compares the median step with the best read pass; the best step against the same pass is shown beside it
        // (on a shared host both swing, and best against best is the like-for-like pair).
        foreach (int context in !doDecode ? Array.Empty<int>() : quick ? new[] { 16, 256 } : new[] { 16, 1024 })
        {
            Progress($"decode at context {context}");
            ArgumentNullException.ThrowIfNull(readBest);
            var (stepMs, bestMs, cacheBytes, oneStream) = Decode(model, config, context, steps, readBest, abForm, abBlocks);
            double bytes = weightRead + cacheBytes;
            double boundMs = bytes / (readBest.BestGBs * 1e9) * 1e3;
            if (oneStream is var (oneMs, oneBest, paired))
                rows.Add(abForm == "two-streams"
                    ? new($"  A/B: one stream per core (alternate steps; the row below: two)", $"{oneMs:F1} ms/token (best step {oneBest:F1})", "", $"two ÷ one: {stepMs / oneMs:F2} (median of step pairs {paired:F2})")
                    : abForm == "bf16-activations"
                    ? new($"  A/B: bf16 kernel on float32 activations (alternate steps; the row below: bf16 pairs)", $"{oneMs:F1} ms/token (best step {oneBest:F1})", "", $"pairs ÷ float32: {stepMs / oneMs:F2} (median of step pairs {paired:F2})")
                    : abForm == "blocks"
                    ? new($"  A/B: {abBlocks} blocks per core in each product (alternate steps; the row below: {DefaultBlocksPerCore})", $"{oneMs:F1} ms/token (best step {oneBest:F1})", "", $"{DefaultBlocksPerCore} ÷ {abBlocks}: {stepMs / oneMs:F2} (median of step pairs {paired:F2})")
                    : abForm == "layer-norm"
                    ? new($"  A/B: LayerNorms as libtorch's layer_norm (alternate steps; the row below: DecodeLayerNorm)", $"{oneMs:F1} ms/token (best step {oneBest:F1})", "", $"fused ÷ op: {stepMs / oneMs:F2} (median of step pairs {paired:F2})")
                    : new(v2
                        ? $"  A/B: RMSNorm, SwiGLU and residuals as libtorch's ops (alternate steps; the row below: DecodeRmsNorm, DecodeSwiGlu, DecodeResidual)"
                        : $"  A/B: GELU and residuals as libtorch's ops (alternate steps; the row below: DecodeGelu, DecodeResidual)", $"{oneMs:F1} ms/token (best step {oneBest:F1})", "", $"fused ÷ ops: {stepMs / oneMs:F2} (median of step pairs {paired:F2})"));
            rows.Add(new($"decode, context {context}", $"{stepMs:F1} ms/token (best step {bestMs:F1})", $"{boundMs:F1} ms ({bytes / 1e9:F2} GB ÷ {readBest.BestGBs:F1} GB/s)", $"{Pct(boundMs / stepMs)} (best step {Pct(boundMs / bestMs)})"));
        }
        if (readBest is not null)
            rows.Add(new("plain read bandwidth (best pass)", $"{readBest.BestGBs:F1} GB/s", $"median {readBest.MedianGBs:F1} GB/s over {readBest.Count} passes", ""));

        model.Dispose();
        return 0;
    }

    /// <summary>Medians of <paramref name="a"/> and <paramref name="b"/> over interleaved rounds, the first to run
    /// alternating, so neither always runs on the other's leftovers.</summary>
    private static (double A, double B) Alternate(int rounds, Func<double> a, Func<double> b)
    {
        var ta = new List<double>();
        var tb = new List<double>();
        for (int round = 0; round < rounds; round++)
        {
            if (round % 2 == 0) ta.Add(a());
            tb.Add(b());
            if (round % 2 == 1) ta.Add(a());
        }
        return (MedianOf(ta), MedianOf(tb));
    }

    /// <summary>One LoRA training step (forward with labels, backward, AdamW); returns its seconds.</summary>
    private static double TrainStep(GlmForCausalLM model, optim.Optimizer opt, Tensor ids) => Time(() =>
    {
        using var scope = NewDisposeScope();
        opt.zero_grad();
        using var o = model.call(new GlmInput(ids) { Labels = ids });
        o.Loss!.backward();
        opt.step();
    });

    /// <summary>
    /// A bf16 model of the same shape holding <paramref name="model"/>'s weights, its quantized projections dequantized
    /// (built empty, so nothing random is drawn, then filled from the quantized model).
    /// </summary>
    private static GlmForCausalLM DequantizedTwin(GlmForCausalLM model, GlmConfig config, bool huge)
    {
        Progress("building the dequantized bf16 twin");
        var twin = new GlmForCausalLM(config, new GlmBuildOptions(ScalarType.BFloat16, CPU, GlmInit.Empty) { HugePages = huge });
        twin.eval();
        var quantized = model.named_modules().Where(m => m.module is QuantizedLinear).ToDictionary(m => m.name, m => (QuantizedLinear)m.module);
        var embeddings = model.named_modules().Where(m => m.module is QuantizedEmbedding).ToDictionary(m => m.name, m => (QuantizedEmbedding)m.module);
        var source = model.state_dict();
        using var noGrad = no_grad();
        foreach (var (key, target) in twin.state_dict())
        {
            int dot = key.LastIndexOf('.');
            string owner = dot > 0 ? key[..dot] : "";
            if (dot > 0 && key[(dot + 1)..] == "weight" && quantized.TryGetValue(owner, out var layer))
            {
                using var w = layer.Dequantize(ScalarType.BFloat16);
                target.copy_(w);
            }
            else if (dot > 0 && key[(dot + 1)..] == "weight" && embeddings.TryGetValue(owner, out var table))
            {
                using var w = QuantizationMath.Dequantize(table.QuantizedWeight, ScalarType.BFloat16);
                target.copy_(w);
            }
            else if (source.TryGetValue(key, out var value) && value.dtype == target.dtype && value.shape.SequenceEqual(target.shape))
            {
                // The bf16 embedding table and head (1.07 GB each at 6B) are shared, not copied: the twin must fit
                // beside the model. The twin's own, never written, are freed untouched.
                if (value.numel() >= 1L << 26) target.set_(value);
                else target.copy_(value);
            }
            else
                throw new InvalidOperationException($"the twin's '{key}' has no counterpart of its type and shape in the quantized model");
        }
        return twin;
    }

    /// <summary>Relative RMS and largest difference of the two models' logits on <paramref name="ids"/>.</summary>
    private static string LogitsDifference(GlmForCausalLM a, GlmForCausalLM b, Tensor ids)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var la = a.call(new GlmInput(ids)).Logits;
        var lb = b.call(new GlmInput(ids)).Logits;
        // In float64 sums over chunks of 64 positions (both models' logits of 512 positions in float32 would take 0.53 GB).
        double diff2 = 0, ref2 = 0, maxDiff = 0, maxRef = 0, same = 0;
        long positions = la.shape[1];
        for (long p0 = 0; p0 < positions; p0 += 64)
        {
            using var inner = NewDisposeScope();
            long n = Math.Min(64, positions - p0);
            var ca = la.narrow(1, p0, n).to(ScalarType.Float32);
            var cb = lb.narrow(1, p0, n).to(ScalarType.Float32);
            var d = ca - cb;
            diff2 += d.square().sum().to(ScalarType.Float64).item<double>();
            ref2 += cb.square().sum().to(ScalarType.Float64).item<double>();
            maxDiff = Math.Max(maxDiff, d.abs().max().item<float>());
            maxRef = Math.Max(maxRef, cb.abs().max().item<float>());
            same += ca.argmax(-1).eq(cb.argmax(-1)).sum().item<long>();
        }
        return $"relative RMS {Math.Sqrt(diff2 / ref2):E1}, max {maxDiff / maxRef:E1}, same argmax at {same / positions:P0} of positions";
    }

    /// <summary>"256:off,1024:on" → (tokens, gradient checkpointing) pairs, in order. RSS only grows within a process
    /// (the allocator keeps freed memory), so a peak is the largest of the cases so far: give one case per process
    /// for separate peaks.</summary>
    private static (int Tokens, bool Checkpointing)[] TrainCases(string text) =>
        text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(c =>
        {
            var parts = c.Split(':');
            if (parts.Length != 2 || !int.TryParse(parts[0], NumberStyles.None, CultureInfo.InvariantCulture, out var tokens) || tokens < 4 || parts[1] is not ("on" or "off"))
                throw new ArgumentException($"--train-cases: '{c}' is not TOKENS:on|off");
            return (tokens, parts[1] == "on");
        }).ToArray();

    private static void Progress(string what) =>
        Console.Error.WriteLine($"  … {what} (RSS {Rss.Current() / 1e9:F2} GB, peak {Rss.Peak() / 1e9:F2} GB)");

    private static (double MsPerToken, double BestMs, long CacheBytes, (double Ms, double Best, double Paired)? OneStream) Decode(GlmForCausalLM model, GlmConfig config, int context, int steps, ReadBandwidth read, string? abForm, int abBlocks)
    {
        using var noGrad = no_grad();
        bool v2 = config.Version == GlmVersion.ChatGlm2;
        var ids = Prompt(config, context);
        // v1: its bidirectional-prefix mask and 2-D positions; v2: causal (no mask) and positions 0….
        var mask = v2 ? null : GlmMasks.BuildAttentionMask(ids, config);
        var positions = v2 ? arange(context, dtype: ScalarType.Int64).unsqueeze(0) : GlmMasks.BuildPositionIds(ids, config);
        GlmKvCache? cache;
        Tensor stepIds;
        using (var o = model.call(new GlmInput(ids) { AttentionMask = mask, PositionIds = positions, UseCache = true, LogitsToKeep = 1 }))
        {
            cache = o.PresentKeyValues;
            stepIds = o.Logits.select(1, -1).argmax(-1).unsqueeze(1);
        }
        ids.Dispose();
        var times = new List<double>();
        var oneStream = new List<double>();
        long cacheBytes = 0;
        for (int step = 0; step < steps; step++)
        {
            // --ab-…: odd steps take the kernels' other form (one row at a time, or float32 activations), timed apart.
            bool one = abForm != null && step % 2 == 1;
            CpuGemv.TwoStreams = !(one && abForm == "two-streams");
            CpuGemv.Bf16Activations = !(one && abForm == "bf16-activations");
            DecodeGelu.Enabled = DecodeResidual.Enabled = DecodeRmsNorm.Enabled = DecodeSwiGlu.Enabled = !(one && abForm == "fused-ops");
            DecodeLayerNorm.Enabled = !(one && abForm == "layer-norm");
            CpuGemv.BlocksPerCore = one && abForm == "blocks" ? abBlocks : DefaultBlocksPerCore;
            var newMask = v2 ? null : GlmMasks.AppendTokenToMask(mask!);
            var newPositions = v2 ? positions.narrow(1, positions.shape[1] - 1, 1).add(1) : GlmMasks.AppendTokenToPositions(positions);
            mask?.Dispose();
            positions.Dispose();
            mask = newMask;
            positions = newPositions;
            var sw = Stopwatch.StartNew();
            using (var scope = NewDisposeScope())
            {
                var stepMask = v2 ? null : mask!.narrow(2, mask.shape[2] - 1, 1);
                var stepPositions = v2 ? positions : positions.narrow(2, positions.shape[2] - 1, 1);
                using var o = model.call(new GlmInput(stepIds) { AttentionMask = stepMask, PositionIds = stepPositions, PastKeyValues = cache, UseCache = true, LogitsToKeep = 1 });
                cache?.Dispose();
                cache = o.PresentKeyValues;
                var next = o.Logits.select(1, -1).argmax(-1).unsqueeze(1).MoveToOuterDisposeScope();
                stepIds.Dispose();
                stepIds = next;
            }
            (one ? oneStream : times).Add(sw.Elapsed.TotalMilliseconds);
            if (step % 3 == 2) read.Pass();
        }
        if (cache is not null)
        {
            // Keys and values read by the attention of one step (the cache as it stands), bf16.
            for (int i = 0; i < cache.Count; i++) cacheBytes += (cache[i].Key.numel() + cache[i].Value.numel()) * cache[i].Key.element_size();
        }
        cache?.Dispose();
        stepIds.Dispose();
        mask?.Dispose();
        positions.Dispose();
        CpuGemv.TwoStreams = true;
        CpuGemv.Bf16Activations = true;
        DecodeGelu.Enabled = DecodeResidual.Enabled = DecodeRmsNorm.Enabled = DecodeSwiGlu.Enabled = DecodeLayerNorm.Enabled = true;
        CpuGemv.BlocksPerCore = DefaultBlocksPerCore;
        var measured = times.Skip(1).ToList();
        var oneMeasured = oneStream.Skip(1).ToList();   // its first step may carry the one-row methods' compilation
        // Each other-form step against the step just before it: the median of these ratios cancels the host's slow drifts.
        var pairs = Enumerable.Range(1, Math.Max(0, Math.Min(times.Count, oneStream.Count) - 1)).Select(i => times[i] / oneStream[i]).ToList();
        (double, double, double)? oneForm = oneMeasured.Count == 0 ? null : (MedianOf(oneMeasured), oneMeasured.Min(), pairs.Count == 0 ? double.NaN : MedianOf(pairs));
        return (MedianOf(measured), measured.Count == 0 ? double.NaN : measured.Min(), cacheBytes, oneForm);
    }

    /// <summary>Random ids ending in ChatGLM's <c>[gMASK] &lt;sop&gt;</c> (the layout generation starts from).</summary>
    internal static Tensor Prompt(GlmConfig config, int length)
    {
        var gen = new System.Random(length);
        var ids = new long[length];
        for (int i = 0; i < length - 2; i++) ids[i] = gen.Next(20, Math.Min(130000, config.ModelVocabSize - 10));
        bool v1 = config.Version == GlmVersion.ChatGlm1;
        ids[length - 2] = v1 ? config.GmaskTokenId : gen.Next(20, config.ModelVocabSize - 10);
        ids[length - 1] = v1 ? config.BosTokenId : gen.Next(20, config.ModelVocabSize - 10);
        return tensor(ids, new long[] { 1, length });
    }

    /// <summary>bf16 <c>linear</c> times of the model's products at a given row count (weights of the right shapes, random).</summary>
    private sealed class GemmRoofline : IDisposable
    {
        private readonly GlmConfig _c;
        private readonly Tensor[] _weights;
        private readonly Dictionary<(int, int), double> _cache = new();

        public GemmRoofline(GlmConfig c)
        {
            _c = c;
            long h = c.HiddenSize;
            // The products of one block and the head: v1 qkv 3h, MLP h→4h→h; v2 qkv h + 2·groups·kv, SwiGLU h→2f, f→h.
            var shapes = c.Version == GlmVersion.ChatGlm2
                ? new[] { (h + 2L * c.KvGroups * c.KvChannelsOrHeadDim, h), (h, h), (2L * (c.FfnHiddenSize ?? 4 * c.HiddenSize), h), (h, c.FfnHiddenSize ?? 4L * c.HiddenSize), ((long)c.ModelVocabSize, h) }
                : new[] { (3 * h, h), (h, h), ((long)c.MlpHiddenSize, h), (h, (long)c.MlpHiddenSize), ((long)c.VocabSize, h) };
            _weights = shapes
                .Select(s => randn(new[] { s.Item1, s.Item2 }, dtype: ScalarType.BFloat16).DetachFromDisposeScope()).ToArray();
        }

        /// <summary>Seconds for the products of one forward (passes = 1) or forward + input gradient (passes = 2).</summary>
        public double ForwardSeconds(int rows, int passes)
        {
            if (!_cache.TryGetValue((rows, passes), out var ms))
            {
                if (_released) throw new InvalidOperationException($"the GEMM roofline at {rows} rows was not measured before its weights were released");
                using var noGrad = no_grad();
                double layer = 0;
                for (int i = 0; i < 4; i++)
                {
                    var w = _weights[i];
                    using var x = randn(new long[] { rows, w.shape[1] }, dtype: ScalarType.BFloat16);
                    using var g = randn(new long[] { rows, w.shape[0] }, dtype: ScalarType.BFloat16);
                    layer += Median(3, () => Time(() => { using var y = nn.functional.linear(x, w); }));
                    if (passes == 2) layer += Median(3, () => Time(() => { using var dx = g.matmul(w); }));
                }
                using var hx = randn(new long[] { rows, _c.HiddenSize }, dtype: ScalarType.BFloat16);
                using var hg = randn(new long[] { rows, _c.ModelVocabSize }, dtype: ScalarType.BFloat16);
                double head = Median(3, () => Time(() => { using var y = nn.functional.linear(hx, _weights[4]); }));
                if (passes == 2) head += Median(3, () => Time(() => { using var dx = hg.matmul(_weights[4]); }));
                ms = layer * _c.NumLayers + head;
                _cache[(rows, passes)] = ms;
            }
            return ms;
        }

        private bool _released;

        /// <summary>Frees the weights; figures already measured stay available, new ones cannot be measured.</summary>
        public void ReleaseWeights()
        {
            foreach (var w in _weights) w.Dispose();
            _released = true;
        }

        public void Dispose() => ReleaseWeights();
    }

    /// <summary>Plain read of a buffer several times the last-level cache, all cores, 64-byte vectors.</summary>
    internal sealed unsafe class ReadBandwidth
    {
        private readonly long _bytes;
        private readonly nint _buffer;
        private readonly List<double> _passes = new();

        public ReadBandwidth(bool hugePages)
        {
            // The roofline reads memory placed as the model's is: on huge pages when the model is (both faster).
            const long hugePage = 2L << 20;
            _bytes = Math.Max(1L << 30, 4 * LastLevelCacheBytes()) & ~(hugePage - 1);
            _buffer = (nint)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)_bytes, (nuint)hugePage);
            if (hugePages && CpuMemory.IsSupported) madvise(_buffer, (nuint)_bytes, 14); // MADV_HUGEPAGE, before the first touch
            for (long at = 0; at < _bytes; at += 1 << 30) new Span<byte>((byte*)_buffer + at, (int)Math.Min(1L << 30, _bytes - at)).Fill(1);
        }

        public double BestGBs => _passes.Max();

        public double MedianGBs => MedianOf(_passes);

        public int Count => _passes.Count;

        public void Pass()
        {
            int parts = Environment.ProcessorCount;
            long per = _bytes / parts & ~255L;
            var sums = new ulong[parts];
            var sw = Stopwatch.StartNew();
            Parallel.For(0, parts, p =>
            {
                var s = (byte*)_buffer + p * per;
                Vector512<ulong> a0 = default, a1 = default, a2 = default, a3 = default;
                for (long i = 0; i < per; i += 256)
                {
                    a0 += Vector512.Load((ulong*)(s + i));
                    a1 += Vector512.Load((ulong*)(s + i + 64));
                    a2 += Vector512.Load((ulong*)(s + i + 128));
                    a3 += Vector512.Load((ulong*)(s + i + 192));
                }
                sums[p] = Vector512.Sum(a0 + a1 + a2 + a3);
            });
            _passes.Add(per * parts / sw.Elapsed.TotalSeconds / 1e9);
            GC.KeepAlive(sums);
        }

        [System.Runtime.InteropServices.DllImport("libc")]
        private static extern int madvise(nint address, nuint length, int advice);

        private static long LastLevelCacheBytes()
        {
            long best = 32L << 20;
            foreach (var index in new[] { 3, 2 })
            {
                var path = $"/sys/devices/system/cpu/cpu0/cache/index{index}/size";
                if (!File.Exists(path)) continue;
                var text = File.ReadAllText(path).Trim();
                long mult = text.EndsWith('K') ? 1024 : text.EndsWith('M') ? 1024 * 1024 : 1;
                if (long.TryParse(text.TrimEnd('K', 'M'), NumberStyles.None, CultureInfo.InvariantCulture, out var v)) return Math.Max(best, v * mult);
            }
            return best;
        }
    }

    /// <summary>Resident-set figures of this process from /proc (peak reset via clear_refs).</summary>
    internal static class Rss
    {
        public static long Peak() => Read("VmHWM:");

        /// <summary>Anonymous memory on transparent huge pages.</summary>
        public static long AnonHugePages() => Read("AnonHugePages:", "/proc/self/smaps_rollup");

        public static long Current() => Read("VmRSS:");

        public static void ResetPeak()
        {
            try { File.WriteAllText("/proc/self/clear_refs", "5"); }
            catch (IOException) { }
            catch (UnauthorizedAccessException) { }
        }

        private static long Read(string key, string path = "/proc/self/status")
        {
            if (!File.Exists(path)) return 0;
            foreach (var line in File.ReadLines(path))
            {
                if (line.StartsWith(key, StringComparison.Ordinal))
                    return long.Parse(line[key.Length..].Trim().Split(' ')[0], CultureInfo.InvariantCulture) * 1024;
            }
            return 0;
        }
    }

    /// <summary>Seconds.</summary>
    internal static double Time(Action a)
    {
        var sw = Stopwatch.StartNew();
        a();
        return sw.Elapsed.TotalSeconds;
    }

    private static double Median(int runs, Func<double> f)
    {
        f(); // warm-up
        return MedianOf(Enumerable.Range(0, runs).Select(_ => f()).ToList());
    }

    internal static double MedianOf(List<double> xs) => xs.Count == 0 ? double.NaN : xs.OrderBy(x => x).ElementAt(xs.Count / 2);

    private static string Gb(long bytes) => (bytes / 1e9).ToString("F2", CultureInfo.InvariantCulture) + " GB";

    private static string Pct(double f) => (100 * f).ToString("F0", CultureInfo.InvariantCulture) + " %";

    /// <summary>CpuGemv's own count of blocks per core, restored after an A/B.</summary>
    private static readonly int DefaultBlocksPerCore = CpuGemv.BlocksPerCore;

    internal static int Int(List<string> args, string name, int fallback)
    {
        int i = args.IndexOf(name);
        return i >= 0 && i + 1 < args.Count ? int.Parse(args[i + 1], NumberStyles.Integer, CultureInfo.InvariantCulture) : fallback;
    }

    private static string Str(List<string> args, string name, string fallback)
    {
        int i = args.IndexOf(name);
        return i >= 0 && i + 1 < args.Count ? args[i + 1] : fallback;
    }
}
