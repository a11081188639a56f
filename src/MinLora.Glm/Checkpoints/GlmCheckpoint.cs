using System.Collections;
using System.Diagnostics;
using System.Text.Json;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using MinLora.Glm.Modeling;
using MinLora.Quantization;
using TorchSharp;
using TorchSharp.PyBridge;
using static TorchSharp.torch;

namespace MinLora.Glm;

/// <summary>How <see cref="GlmCheckpoint.FromPretrained"/> loads a checkpoint directory.</summary>
public sealed record GlmLoadOptions
{
    /// <summary>Element type of the float parameters (the checkpoint's are converted while loading).</summary>
    /// <value>The default value is float32 (CPU inference and training; use bfloat16 to halve memory).</value>
    public ScalarType Dtype { get; init; } = ScalarType.Float32;

    /// <summary>Device to load onto.</summary>
    /// <value>The default value is the CPU.</value>
    public Device? Device { get; init; }

    /// <summary>
    /// Quantize the block projections while loading a float checkpoint (4 or 8; null or 0: as the config says).
    /// A pre-quantized checkpoint (its config's <c>quantization_bit</c>) is always loaded as such. The layers
    /// <see cref="Quantization"/> selects are quantized file by file, right after the file that completes them, and
    /// hold no float memory before: on the CPU the float model is never in memory whole (the peak is the quantized
    /// model, the float embedding, head and norms, and about one file; ChatGLM-6B int4 from float16 shards: 9.0 GB
    /// over the process against 18–23 GB loading the float model first). Bits, format, group size and targets are
    /// checked before any file is read. While loading, a process that keeps every freed native block
    /// (<see cref="NativeAllocator.RetainFreedMemory()"/>) hands blocks of 32 MiB and more back to the system instead
    /// (a process-wide glibc setting, restored afterwards). A P-tuning prefix encoder is never quantized on load.
    /// </summary>
    public int? QuantizationBit { get; init; }

    /// <summary>Layout and compute settings when quantizing a float checkpoint on load.</summary>
    public QuantizeOptions? Quantization { get; init; }

    /// <summary>Override the P-tuning prefix length of the config (the book's P-tuning sets it).</summary>
    public int? PreSeqLen { get; init; }

    /// <summary>Fail on keys the model does not have (true) or log and ignore them (false).</summary>
    /// <value>The default value is true.</value>
    public bool Strict { get; init; } = true;

    /// <summary>Where loading is logged.</summary>
    public ILoggerFactory? LoggerFactory { get; init; }

    /// <summary>Reports progress as (files done, files total).</summary>
    public IProgress<(int Done, int Total)>? Progress { get; init; }

    /// <summary>Place the large CPU weights on transparent huge pages (see <see cref="GlmBuildOptions.HugePages"/>).</summary>
    /// <value>The default value is true.</value>
    public bool HugePages { get; init; } = true;
}

/// <summary>What was loaded, for logs and checks.</summary>
/// <param name="Files">The weight files read, in order.</param>
/// <param name="LoadedKeys">Number of tensors copied into the model.</param>
/// <param name="IgnoredKeys">Keys read but deliberately ignored (the rotary <c>inv_freq</c> buffers), or unexpected in non-strict mode.</param>
/// <param name="TiedLmHead">True when the checkpoint had no <c>lm_head.weight</c> and the embedding was used.</param>
/// <param name="Elapsed">Wall time.</param>
/// <param name="PeakWorkingSetBytes">The process's peak working set after loading.</param>
public sealed record GlmLoadReport(IReadOnlyList<string> Files, int LoadedKeys, IReadOnlyList<string> IgnoredKeys, bool TiedLmHead, TimeSpan Elapsed, long PeakWorkingSetBytes);

/// <summary>
/// Loads GLM checkpoints in the layouts Hugging Face uses: sharded <c>pytorch_model-*.bin</c> with
/// <c>pytorch_model.bin.index.json</c>, a single <c>.bin</c>/<c>.pth</c> state dict (the book's <c>chatglm6b.pth</c>),
/// or <c>*.safetensors</c> (with or without <c>model.safetensors.index.json</c>). Files are read one at a time and
/// copied into a model whose parameters were allocated once, uninitialised, so peak memory stays near the model's
/// own size plus one file.
/// </summary>
public static partial class GlmCheckpoint
{
    internal const string PrefixKeys = "transformer.prefix_encoder.";

    /// <summary>Loads a model from a checkpoint directory (<c>config.json</c> + weights).</summary>
    /// <param name="directory">The checkpoint directory.</param>
    /// <param name="options">Element type, device, quantization, logging.</param>
    /// <returns>The model (in eval mode) and a report of what was loaded.</returns>
    /// <exception cref="DirectoryNotFoundException">No such directory.</exception>
    /// <exception cref="FileNotFoundException">No config, no weights, or a shard named by the index is missing.</exception>
    /// <exception cref="InvalidDataException">A corrupt file, or a config that disagrees with the weight files.</exception>
    /// <exception cref="StateDictMismatchException">Missing or (strict) unexpected keys, or wrong shapes or types (each named in the message).</exception>
    /// <exception cref="ArgumentOutOfRangeException"><see cref="GlmLoadOptions.QuantizationBit"/> is not 4 or 8 (checked before any file is read).</exception>
    /// <exception cref="ArgumentException">The quantization options do not fit: a 4-bit format that is not one, a group
    /// size or layer shape the format cannot take, targets that match no Linear or match another kind of layer
    /// (checked before any file is read).</exception>
    public static (GlmForCausalLM Model, GlmLoadReport Report) FromPretrained(string directory, GlmLoadOptions? options = null)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(directory);
        if (!Directory.Exists(directory)) throw new DirectoryNotFoundException($"No checkpoint directory '{directory}'.");
        options ??= new GlmLoadOptions();
        var logger = (options.LoggerFactory ?? NullLoggerFactory.Instance).CreateLogger(typeof(GlmCheckpoint).FullName!);
        var clock = Stopwatch.StartNew();
        var config = GlmConfig.FromFile(Path.Combine(directory, "config.json"));
        if (options.PreSeqLen is { } pre) config = config with { PreSeqLen = pre };
        var files = FindWeightFiles(directory);
        LogConfig(logger, directory, config.NumLayers, config.HiddenSize, config.VocabSize, config.QuantizationBit, files.Count);
        CheckConfigAgainstWeights(config, directory, files);

        // Quantizing on load: the float projections must stay unbacked until their file arrives (asking for huge pages
        // at build would fault the whole float model in): the weights ask for them once those are placeholders, the
        // quantized buffers after the load, and the KV caches as always.
        int bits = config.QuantizationBit == 0 ? options.QuantizationBit ?? 0 : 0;
        var quantizeOptions = options.Quantization ?? new QuantizeOptions { Int4Format = QuantizationFormat.Int4Grouped };
        if (bits != 0) QuantizationFormats.FromBits(bits, quantizeOptions.Int4Format);   // bad bits or format fail before any file is read
        var build = new GlmBuildOptions(options.Dtype, options.Device ?? CPU, GlmInit.Empty)
        {
            QuantizationBit = config.QuantizationBit,
            QuantizeEmbeddings = config.QuantizationEmbeddings,
            QuantizeLmHead = config.QuantizeLmHead == true && config.QuantizationBit > 0,
            QuantizedLayer = options.Quantization?.Layer,
            HugePages = options.HugePages,
            DeferHugePages = bits != 0,
        };
        // Quantizing on load frees the float projections built here and each file's float copies between long-lived
        // quantized buffers: a heap that keeps every block would serve later files from those freed blocks and keep
        // every hole (ChatGLM-6B int4 on load: 16.7 GB over the process instead of 9.0 GB), so from the build until
        // the model is returned large blocks go back to the system (NativeAllocator).
        var largeBlocks = bits != 0 ? NativeAllocator.ReturnLargeBlocksWhile() : null;
        GlmForCausalLM? model = null;
        try
        {
            model = new GlmForCausalLM(config, build);
            // A float checkpoint quantized on load: each file's complete projections are quantized right after it.
            var quantizer = bits != 0 ? new QuantizeWhileLoading(model, bits, quantizeOptions, options.Device ?? CPU) : null;
            if (quantizer is not null && options.HugePages) model.UseHugePages(); // the float weights kept, before they are written
            var report = LoadInto(model, files, options, logger, quantizer);
            if (quantizer is not null)
            {
                quantizer.Finish();
                LogQuantized(logger, quantizer.Quantized, bits);
                if (options.HugePages) model.UseHugePages(); // the new int8/int4 buffers (CPU tensors only)
            }
            model.eval();
            report = report with { Elapsed = clock.Elapsed, PeakWorkingSetBytes = Process.GetCurrentProcess().PeakWorkingSet64 };
            model.LoadReport = report;
            LogLoaded(logger, report.LoadedKeys, report.Files.Count, report.Elapsed.TotalSeconds, report.PeakWorkingSetBytes / 1e6);
            return (model, report);
        }
        catch
        {
            model?.Dispose();
            throw;
        }
        finally
        {
            largeBlocks?.Dispose();
        }
    }

    /// <summary>
    /// Before the model is allocated: the layer count and embedding size the config promises must be those of the
    /// weight files (keys from the index or the safetensors headers, shapes from the headers), so a wrong or hostile
    /// config.json fails at once instead of allocating a model the files cannot fill.
    /// </summary>
    private static void CheckConfigAgainstWeights(GlmConfig config, string directory, IReadOnlyList<string> files)
    {
        var keys = new HashSet<string>(StringComparer.Ordinal);
        var shapes = new Dictionary<string, (string File, IReadOnlyList<long> Shape)>(StringComparer.Ordinal);
        foreach (var file in files)
        {
            if (!file.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase)) continue;
            foreach (var e in SafetensorsHeader.Read(file))
            {
                keys.Add(e.Name);
                shapes[e.Name] = (file, e.Shape);
            }
        }
        var index = Path.Combine(directory, "pytorch_model.bin.index.json");
        if (keys.Count == 0 && File.Exists(index))
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(index));
            foreach (var p in doc.RootElement.GetProperty("weight_map").EnumerateObject()) keys.Add(p.Name);
        }
        if (keys.Count == 0) return; // a single pickle: checked key by key while loading
        bool v2 = config.Version == GlmVersion.ChatGlm2;
        string LayerPrefix = v2 ? "transformer.encoder.layers." : "transformer.layers.";
        int layers = 0;
        foreach (var k in keys)
        {
            if (!k.StartsWith(LayerPrefix, StringComparison.Ordinal)) continue;
            int dot = k.IndexOf('.', LayerPrefix.Length);
            if (dot > LayerPrefix.Length && int.TryParse(k.AsSpan(LayerPrefix.Length, dot - LayerPrefix.Length), out int i) && i >= 0)
                layers = Math.Max(layers, i + 1);
        }
        if (layers > 0 && layers != config.NumLayers)
            throw new InvalidDataException($"{directory}: config.json says num_layers {config.NumLayers}, the weight files hold {layers} layers.");
        var embeddingKey = v2 ? "transformer.embedding.word_embeddings.weight" : "transformer.word_embeddings.weight";
        if (shapes.TryGetValue(embeddingKey, out var emb) && emb.Shape.Count == 2)
        {
            long hidden = config.QuantizationEmbeddings && config.QuantizationBit == 4 ? config.HiddenSize / 2 : config.HiddenSize;
            if (emb.Shape[0] != config.ModelVocabSize || emb.Shape[1] != hidden)
                throw new InvalidDataException($"{emb.File}: {embeddingKey} is [{string.Join(", ", emb.Shape)}], config.json says {(v2 ? "padded_vocab_size" : "vocab_size")} {config.ModelVocabSize} × hidden_size {config.HiddenSize}.");
        }
    }

    /// <summary>The weight files of a checkpoint directory, in load order.</summary>
    /// <param name="directory">The directory.</param>
    /// <returns>Full paths.</returns>
    /// <exception cref="FileNotFoundException">No weights, or an index names a missing shard.</exception>
    /// <exception cref="InvalidDataException">A malformed index.</exception>
    public static IReadOnlyList<string> FindWeightFiles(string directory)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(directory);
        foreach (var index in new[] { "model.safetensors.index.json", "pytorch_model.bin.index.json" })
        {
            var path = Path.Combine(directory, index);
            if (File.Exists(path)) return ShardsFromIndex(directory, path);
        }
        foreach (var single in new[] { "model.safetensors", "pytorch_model.bin" })
        {
            var path = Path.Combine(directory, single);
            if (File.Exists(path)) return new[] { path };
        }
        var others = Directory.GetFiles(directory, "*.safetensors").Concat(Directory.GetFiles(directory, "*.pth"))
            .Concat(Directory.GetFiles(directory, "*.bin")).OrderBy(f => f, StringComparer.Ordinal).ToList();
        if (others.Count == 1) return others;
        if (others.Count > 1)
            throw new FileNotFoundException($"'{directory}' holds several weight files ({string.Join(", ", others.Select(Path.GetFileName))}) but no index json saying which belong together.");
        throw new FileNotFoundException($"No weights in '{directory}': looked for model.safetensors(.index.json), pytorch_model.bin(.index.json), *.safetensors, *.pth, *.bin.");
    }

    /// <summary>
    /// Copies the tensors of <paramref name="files"/> into <paramref name="model"/>, one file at a time; the parameters
    /// of layers <paramref name="quantizer"/> quantizes go to it instead, and it quantizes after each file.
    /// </summary>
    internal static GlmLoadReport LoadInto(GlmForCausalLM model, IReadOnlyList<string> files, GlmLoadOptions options, ILogger logger, QuantizeWhileLoading? quantizer = null)
    {
        var clock = Stopwatch.StartNew();
        var target = model.state_dict();
        var loaded = new HashSet<string>(StringComparer.Ordinal);
        var ignored = new List<string>();
        var unexpected = new List<string>();
        var mismatched = new List<ShapeMismatch>();
        int done = 0;
        foreach (var file in files)
        {
            using var scope = NewDisposeScope();
            var tensors = ReadFile(file);
            using (no_grad())
            {
                foreach (var (key, src) in tensors)
                {
                    if (key.EndsWith(".rotary_emb.inv_freq", StringComparison.Ordinal) || key == "transformer.rotary_pos_emb.inv_freq") { ignored.Add(key); continue; }
                    if (!target.TryGetValue(key, out var dst)) { unexpected.Add(key); continue; }
                    if (loaded.Contains(key))
                        throw new InvalidDataException($"'{key}' is stored twice in the checkpoint (again in {Path.GetFileName(file)}): the shards or their index are inconsistent.");
                    if (!dst.shape.SequenceEqual(src.shape))
                    {
                        mismatched.Add(new ShapeMismatch(key, dst.shape, src.shape));
                        continue;
                    }
                    if (Dtypes.IsInteger(dst.dtype) != Dtypes.IsInteger(src.dtype))
                    {
                        mismatched.Add(new ShapeMismatch(key, dst.shape, src.shape, $"model {dst.dtype} vs file {src.dtype}: a quantized checkpoint needs quantization_bit in config.json"));
                        continue;
                    }
                    if (quantizer?.Claim(key, src) != true) dst.copy_(src);
                    loaded.Add(key);
                }
            }
            foreach (var t in tensors.Values) t.Dispose();
            quantizer?.AfterFile();
            options.Progress?.Report((++done, files.Count));
            LogFile(logger, Path.GetFileName(file), tensors.Count);
        }

        bool tied = false;
        if (!loaded.Contains("lm_head.weight") && loaded.Contains("transformer.word_embeddings.weight") && target.ContainsKey("lm_head.weight"))
        {
            if (target["transformer.word_embeddings.weight"].dtype != target["lm_head.weight"].dtype || target.ContainsKey("lm_head.weight_scale") != target.ContainsKey("transformer.word_embeddings.weight_scale"))
                throw new InvalidDataException("The checkpoint ties lm_head to word_embeddings, but the model stores them in different formats (QuantizeEmbeddings / QuantizeLmHead): build both alike or neither.");
            using (no_grad())
            {
                if (quantizer?.Claim("lm_head.weight", target["transformer.word_embeddings.weight"]) != true)
                    target["lm_head.weight"].copy_(target["transformer.word_embeddings.weight"]);
                foreach (var suffix in new[] { ".weight_scale", ".weight_zero" })
                {
                    if (target.ContainsKey("lm_head" + suffix) && loaded.Contains("transformer.word_embeddings" + suffix))
                    {
                        target["lm_head" + suffix].copy_(target["transformer.word_embeddings" + suffix]);
                        loaded.Add("lm_head" + suffix);
                    }
                }
            }
            loaded.Add("lm_head.weight");
            tied = true;
        }
        // Rotary frequencies are recomputed from the config (the reference ignores the saved buffer too).
        var missing = target.Keys.Where(k => !loaded.Contains(k) && !k.EndsWith(".rotary_emb.inv_freq", StringComparison.Ordinal) && k != "transformer.rotary_pos_emb.inv_freq").ToList();
        bool freshPrefix = false;
        if (options.PreSeqLen is not null && missing.Count > 0 && missing.All(k => k.StartsWith(PrefixKeys, StringComparison.Ordinal)))
        {
            // A base checkpoint for P-tuning: the prefix encoder starts from a random initialisation.
            model.InitializePrefixEncoder();
            missing.Clear();
            freshPrefix = true;
        }
        var fit = new StateDictFit(loaded.ToList(), missing, unexpected, mismatched);
        if (mismatched.Count > 0 || missing.Count > 0 || (unexpected.Count > 0 && options.Strict))
            throw new StateDictMismatchException(fit, Path.GetDirectoryName(files[0]), "The checkpoint does not fit the model built from its config", unexpectedIsProblem: options.Strict);
        if (unexpected.Count > 0) LogUnexpected(logger, unexpected.Count, string.Join(", ", unexpected.Take(10)));
        if (freshPrefix) LogFreshPrefix(logger, options.PreSeqLen!.Value);
        ignored.AddRange(unexpected);
        model.AfterLoad();
        if (quantizer is null) model.RefreshQuantizedKernels(); // layers quantized on load built their kernels already
        return new GlmLoadReport(files, loaded.Count, ignored, tied, clock.Elapsed, 0);
    }

    /// <summary>Reads one weight file (safetensors or PyTorch pickle) into tensors.</summary>
    /// <param name="path">The file.</param>
    /// <returns>The tensors by key.</returns>
    /// <exception cref="FileNotFoundException">No such file.</exception>
    /// <exception cref="InvalidDataException">The file is not a readable state dict.</exception>
    public static Dictionary<string, Tensor> ReadFile(string path) => StateDictFile.Read(path);

    private static List<string> ShardsFromIndex(string directory, string indexPath)
    {
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(indexPath));
            if (!doc.RootElement.TryGetProperty("weight_map", out var map) || map.ValueKind != JsonValueKind.Object)
                throw new InvalidDataException($"{indexPath} has no weight_map object.");
            var shards = map.EnumerateObject().Select(p => p.Value.ValueKind == JsonValueKind.String && p.Value.GetString() is { Length: > 0 } f
                    ? f : throw new InvalidDataException($"{indexPath}: weight_map entry '{p.Name}' is not a file name ({p.Value.ValueKind})."))
                .Distinct(StringComparer.Ordinal).OrderBy(f => f, StringComparer.Ordinal).ToList();
            if (shards.Count == 0) throw new InvalidDataException($"{indexPath} lists no shards.");
            // Shards live in the checkpoint directory itself: no absolute paths, no way out of it.
            var root = Path.TrimEndingDirectorySeparator(Path.GetFullPath(directory)) + Path.DirectorySeparatorChar;
            foreach (var f in shards)
            {
                var full = Path.GetFullPath(Path.Combine(directory, f));
                if (Path.IsPathRooted(f) || !full.StartsWith(root, StringComparison.Ordinal) || full.Length == root.Length)
                    throw new InvalidDataException($"{indexPath}: shard '{f}' is outside the checkpoint directory.");
            }
            var paths = shards.Select(f => Path.Combine(directory, f)).ToList();
            foreach (var p in paths)
            {
                if (!File.Exists(p)) throw new FileNotFoundException($"Shard '{Path.GetFileName(p)}' named by {Path.GetFileName(indexPath)} is missing.", p);
            }
            return paths;
        }
        catch (JsonException ex)
        {
            throw new InvalidDataException($"{indexPath} is not valid JSON: {ex.Message}", ex);
        }
    }

    [LoggerMessage(EventId = 1, Level = LogLevel.Information, Message = "Loading GLM checkpoint {Directory}: {Layers} layers, hidden {Hidden}, vocab {Vocab}, quantization_bit {Bits}, {Files} weight file(s)")]
    private static partial void LogConfig(ILogger logger, string directory, int layers, int hidden, int vocab, int bits, int files);

    [LoggerMessage(EventId = 2, Level = LogLevel.Debug, Message = "Read {File}: {Count} tensors")]
    private static partial void LogFile(ILogger logger, string file, int count);

    [LoggerMessage(EventId = 3, Level = LogLevel.Information, Message = "Loaded {Keys} tensors from {Files} file(s) in {Seconds:F1} s; peak working set {PeakMb:F0} MB")]
    private static partial void LogLoaded(ILogger logger, int keys, int files, double seconds, double peakMb);

    [LoggerMessage(EventId = 4, Level = LogLevel.Warning, Message = "Ignored {Count} unexpected keys: {Keys}")]
    private static partial void LogUnexpected(ILogger logger, int count, string keys);

    [LoggerMessage(EventId = 6, Level = LogLevel.Information, Message = "The checkpoint has no P-tuning prefix: a new {Length}-token prefix encoder was initialised randomly")]
    private static partial void LogFreshPrefix(ILogger logger, int length);

    [LoggerMessage(EventId = 5, Level = LogLevel.Information, Message = "Quantized {Count} projections to {Bits} bits while loading")]
    private static partial void LogQuantized(ILogger logger, int count, int bits);
}
