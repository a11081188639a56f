using System.Text.Json;
using System.Text.Json.Nodes;
using TorchSharp;
using TorchSharp.PyBridge;
using static TorchSharp.torch;

namespace MinLora;

/// <summary>
/// Adapters on disk in Hugging Face PEFT's layout, so they move between Python PEFT and .NET:
/// <c>adapter_config.json</c> + <c>adapter_model.safetensors</c> with keys
/// <c>base_model.model.&lt;path&gt;.lora_A.weight</c> / <c>.lora_B.weight</c>.
/// </summary>
public static class LoraAdapterFiles
{
    /// <summary>PEFT's adapter config file name.</summary>
    public const string ConfigFileName = "adapter_config.json";

    /// <summary>PEFT's adapter weights file name (safetensors).</summary>
    public const string WeightsFileName = "adapter_model.safetensors";

    /// <summary>The largest LoRA rank an adapter config may declare.</summary>
    public const int MaxRank = 65_536;

    /// <summary>PEFT's legacy adapter weights file name (PyTorch pickle).</summary>
    public const string LegacyWeightsFileName = "adapter_model.bin";

    /// <summary>
    /// Writes one adapter in PEFT's layout into <paramref name="directory"/> (created if needed), all-or-nothing
    /// (<see cref="AtomicDirectory"/>): the previous adapter there stays whole until the new one replaces it in one
    /// step; other files in the directory are kept.
    /// </summary>
    /// <param name="model">The adapted model.</param>
    /// <param name="directory">The output directory.</param>
    /// <param name="adapterName">Which adapter; null means the single active adapter.</param>
    /// <param name="baseModelNameOrPath">Recorded as <c>base_model_name_or_path</c>.</param>
    /// <returns>The paths of the two files written.</returns>
    /// <exception cref="InvalidOperationException">The model has no LoRA layers, or the adapter is ambiguous.</exception>
    public static IReadOnlyList<string> SaveLoraAdapter(this nn.Module model, string directory, string? adapterName = null, string? baseModelNameOrPath = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentException.ThrowIfNullOrWhiteSpace(directory);
        var tensors = model.GetLoraStateDict(adapterName);
        var layers = model.GetLoraLayers().Where(l => tensors.Keys.Any(k => k.StartsWith(l.Path + ".", StringComparison.Ordinal))).ToList();
        var name = adapterName ?? layers.SelectMany(l => l.Layer.ActiveAdapters).First();
        var infos = layers.Select(l => (l.Path, Info: l.Layer.GetAdapterInfo(name))).ToList();

        int rank = infos.GroupBy(i => i.Info.Rank).OrderByDescending(g => g.Count()).First().Key;
        double alpha = infos.GroupBy(i => i.Info.Alpha).OrderByDescending(g => g.Count()).First().Key;
        var rankPattern = new JsonObject();
        var alphaPattern = new JsonObject();
        foreach (var (path, info) in infos)
        {
            if (info.Rank != rank) rankPattern[path] = info.Rank;
            if (info.Alpha != alpha) alphaPattern[path] = info.Alpha;
        }
        var first = infos[0].Info;
        var config = new JsonObject
        {
            ["peft_type"] = "LORA",
            ["task_type"] = null,
            ["base_model_name_or_path"] = baseModelNameOrPath,
            ["r"] = rank,
            ["lora_alpha"] = alpha,
            ["lora_dropout"] = first.Dropout,
            ["use_rslora"] = first.UseRsLora,
            ["target_modules"] = new JsonArray(infos.Select(i => (JsonNode?)JsonValue.Create(i.Path)).ToArray()),
            ["rank_pattern"] = rankPattern,
            ["alpha_pattern"] = alphaPattern,
            ["bias"] = "none",
            ["fan_in_fan_out"] = false,
            ["init_lora_weights"] = true,
            ["inference_mode"] = true,
            ["modules_to_save"] = null,
            ["use_dora"] = false,
            ["library"] = "MinLora",
        };

        var weightsPath = Path.Combine(directory, WeightsFileName);
        var configPath = Path.Combine(directory, ConfigFileName);
        using (var scope = NewDisposeScope())
        {
            var export = tensors.ToDictionary(kv => LoraExtensions.PeftKeyPrefix + kv.Key, kv => kv.Value.detach().cpu().contiguous());
            // Both files are written into a staging directory and swapped in together: a reader or a crash sees the
            // previous pair or the new pair, never a config beside weights of another rank.
            AtomicDirectory.Write(directory, staging =>
            {
                Safetensors.SaveStateDict(Path.Combine(staging, WeightsFileName), export);
                File.WriteAllText(Path.Combine(staging, ConfigFileName), config.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            });
        }
        return new[] { configPath, weightsPath };
    }

    /// <summary>
    /// Reads a PEFT LoRA adapter (ours or Python PEFT's) from <paramref name="directory"/>, adds it to
    /// <paramref name="model"/> under <paramref name="adapterName"/> and loads its tensors strictly. On any error the
    /// model is left as it was.
    /// </summary>
    /// <param name="model">The base model (the adapter must not exist on it yet).</param>
    /// <param name="directory">A directory with <c>adapter_config.json</c> and <c>adapter_model.safetensors</c> (or <c>.bin</c>).</param>
    /// <param name="adapterName">The name to give the adapter.</param>
    /// <param name="freezeBase">Freeze every non-LoRA parameter (for further training of the adapter only).</param>
    /// <param name="allowNonFinite">Accept NaN or infinite adapter values (refused by default: such an adapter only
    /// ever produces NaN outputs).</param>
    /// <returns>The paths of the adapted layers.</returns>
    /// <exception cref="FileNotFoundException">A file is missing.</exception>
    /// <exception cref="InvalidDataException">The config is malformed (the message names the file and key), describes
    /// something other than plain LoRA, a weight file is corrupt, or a tensor holds NaN/Inf.</exception>
    /// <exception cref="StateDictMismatchException">The tensors do not fit the adapted layers.</exception>
    /// <exception cref="InvalidOperationException">The model already has an adapter of that name.</exception>
    public static IReadOnlyList<string> LoadLoraAdapter(this nn.Module model, string directory, string adapterName = LoraConfig.DefaultAdapterName, bool freezeBase = true, bool allowNonFinite = false)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentException.ThrowIfNullOrWhiteSpace(directory);
        if (model.GetLoraAdapterNames().Contains(adapterName))
            throw new InvalidOperationException($"The model already has an adapter named '{adapterName}'; load under another name or delete it first.");
        var configPath = Path.Combine(directory, ConfigFileName);
        if (!File.Exists(configPath)) throw new FileNotFoundException($"No {ConfigFileName} in '{directory}'.", configPath);

        JsonObject json;
        try
        {
            json = JsonNode.Parse(File.ReadAllText(configPath)) as JsonObject ?? throw new InvalidDataException($"{configPath} is not a JSON object.");
        }
        catch (JsonException ex)
        {
            throw new InvalidDataException($"{configPath} is not valid JSON: {ex.Message}", ex);
        }
        var peftType = ReadString(json, "peft_type", configPath);
        if (peftType is not null && peftType != "LORA") throw new InvalidDataException($"{configPath}: peft_type is '{peftType}', not LORA.");
        if (Read<bool>(json, "use_dora", configPath) == true) throw new InvalidDataException($"{configPath}: DoRA adapters are not supported.");
        if (Read<bool>(json, "fan_in_fan_out", configPath) == true) throw new InvalidDataException($"{configPath}: fan_in_fan_out adapters (GPT-2 Conv1D layout) are not supported.");
        var bias = ReadString(json, "bias", configPath) ?? "none";
        if (bias != "none") throw new InvalidDataException($"{configPath}: bias '{bias}' is not supported (only 'none').");
        int rank = Read<int>(json, "r", configPath) ?? throw new InvalidDataException($"{configPath}: 'r' is missing.");
        // Bounded before anything is allocated (ranks in use are 4–256; the tensors must match anyway).
        if (rank < 1 || rank > MaxRank) throw new InvalidDataException($"{configPath}: 'r' must be in [1, {MaxRank}], got {rank}.");
        double alpha = Read<double>(json, "lora_alpha", configPath) ?? rank;
        if (!double.IsFinite(alpha)) throw new InvalidDataException($"{configPath}: 'lora_alpha' must be finite, got {alpha}.");
        double dropout = Read<double>(json, "lora_dropout", configPath) ?? 0;
        if (!(dropout >= 0 && dropout < 1)) throw new InvalidDataException($"{configPath}: 'lora_dropout' must be in [0, 1), got {dropout}.");
        bool rs = Read<bool>(json, "use_rslora", configPath) ?? false;
        var targets = json["target_modules"] switch
        {
            JsonArray arr => arr.Select((n, i) => n is JsonValue v && v.TryGetValue(out string? t) && !string.IsNullOrEmpty(t)
                ? t : throw new InvalidDataException($"{configPath}: target_modules[{i}] is not a module name ({n?.ToJsonString() ?? "null"}).")).ToList(),
            JsonValue v => throw new InvalidDataException($"{configPath}: target_modules '{v}' is a regular expression or preset; only a list of names is supported."),
            _ => throw new InvalidDataException($"{configPath}: target_modules is missing."),
        };
        var rankPattern = ReadPattern(json, "rank_pattern", configPath);
        foreach (var (k, r) in rankPattern)
        {
            if (r != Math.Floor(r) || r < 1 || r > MaxRank) throw new InvalidDataException($"{configPath}: rank_pattern['{k}'] must be an integer in [1, {MaxRank}], got {r}.");
        }
        var alphaPattern = ReadPattern(json, "alpha_pattern", configPath);

        var tensors = ReadWeights(directory);
        try
        {
            if (!allowNonFinite) RequireFinite(tensors, directory);
            var baseConfig = new LoraConfig { Rank = rank, Alpha = alpha, Dropout = dropout, UseRsLora = rs, AdapterName = adapterName, FreezeBase = freezeBase, TargetModules = targets };
            List<LoraConfig> configs;
            if (rankPattern.Count == 0 && alphaPattern.Count == 0)
            {
                configs = new List<LoraConfig> { baseConfig };
            }
            else
            {
                // Group the matched modules by their (rank, alpha) and add each group with its own settings.
                var matched = ModuleTree.Walk(model).Where(s => baseConfig.IsExplicitTarget(s.Path, s.Module)).Select(s => s.Path).ToList();
                configs = matched.GroupBy(p => (R: Lookup(rankPattern, p) ?? rank, A: Lookup(alphaPattern, p) ?? alpha)).Select(g =>
                {
                    var paths = g.ToHashSet(StringComparer.Ordinal);
                    return baseConfig with { Rank = (int)g.Key.R, Alpha = g.Key.A, TargetModules = null, TargetPredicate = (p, _) => paths.Contains(p) };
                }).ToList();
            }
            return AddAndLoad(model, configs, tensors, adapterName, directory);
        }
        finally
        {
            foreach (var t in tensors.Values) t.Dispose();
        }
    }

    /// <summary>
    /// Loads the LoRA file the book's Python code writes with minLoRA (<c>get_lora_state_dict</c> + <c>torch.save</c>,
    /// usually <c>lora.pth</c>; a safetensors file of the same keys also works): keys
    /// <c>&lt;path&gt;.parametrizations.weight.0.lora_A</c> [r, in] and <c>.lora_B</c> [out, r] on Linear layers. The
    /// adapted layers and each one's rank come from the file; minLoRA stores no alpha, so give the one used in training
    /// (minLoRA's default is 1; the update is scaled by alpha / r as there). On any error the model is left as it was.
    /// </summary>
    /// <param name="model">The base model.</param>
    /// <param name="path">The .pth (PyTorch pickle) or .safetensors file.</param>
    /// <param name="alpha">minLoRA's <c>lora_alpha</c> used in training.</param>
    /// <param name="adapterName">The name to give the adapter.</param>
    /// <param name="freezeBase">Freeze every non-LoRA parameter.</param>
    /// <param name="allowNonFinite">Accept NaN or infinite values.</param>
    /// <returns>The paths of the adapted layers.</returns>
    /// <exception cref="FileNotFoundException">No such file.</exception>
    /// <exception cref="InvalidDataException">A corrupt file, keys that are not minLoRA's, inconsistent ranks, NaN/Inf,
    /// or a path that is not a linear layer of the model (the message names the key).</exception>
    /// <exception cref="StateDictMismatchException">The shapes do not fit the model's layers.</exception>
    public static IReadOnlyList<string> LoadMinLoraFile(this nn.Module model, string path, double alpha = 1.0, string adapterName = LoraConfig.DefaultAdapterName, bool freezeBase = true, bool allowNonFinite = false)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentException.ThrowIfNullOrWhiteSpace(path);
        if (!double.IsFinite(alpha)) throw new ArgumentOutOfRangeException(nameof(alpha), alpha, "Must be finite.");
        if (!File.Exists(path)) throw new FileNotFoundException($"No LoRA file '{path}'.", path);
        if (model.GetLoraAdapterNames().Contains(adapterName))
            throw new InvalidOperationException($"The model already has an adapter named '{adapterName}'; load under another name or delete it first.");
        var tensors = StateDictFile.Read(path);
        try
        {
            if (!allowNonFinite) RequireFinite(tensors, path);
            const string A = ".parametrizations.weight.0.lora_A", B = ".parametrizations.weight.0.lora_B";
            var ranks = new Dictionary<string, int>(StringComparer.Ordinal);
            var mapped = new Dictionary<string, Tensor>(StringComparer.Ordinal);
            foreach (var (key, t) in tensors)
            {
                bool isA = key.EndsWith(A, StringComparison.Ordinal), isB = key.EndsWith(B, StringComparison.Ordinal);
                if (!isA && !isB) throw new InvalidDataException($"{path}: '{key}' is not a minLoRA key (<path>{A} / <path>{B}).");
                if (t.dim() != 2) throw new InvalidDataException($"{path}: '{key}' has rank {t.dim()}, expected a matrix.");
                var layer = key[..^A.Length];
                int r = (int)(isA ? t.shape[0] : t.shape[1]);
                if (ranks.TryGetValue(layer, out int other) && other != r)
                    throw new InvalidDataException($"{path}: lora_A and lora_B of '{layer}' disagree on the rank ({other} vs {r}).");
                ranks[layer] = r;
                mapped[layer + (isA ? ".lora_A.weight" : ".lora_B.weight")] = t;
            }
            if (ranks.Count == 0) throw new InvalidDataException($"{path} holds no LoRA tensors.");
            var modules = ModuleTree.Walk(model).ToDictionary(m => m.Path, m => m.Module, StringComparer.Ordinal);
            foreach (var layer in ranks.Keys)
            {
                if (!modules.TryGetValue(layer, out var m))
                    throw new InvalidDataException($"{path}: the model has no module '{layer}'.");
                if (m is not (TorchSharp.Modules.Linear or ILinearLayer))
                    throw new InvalidDataException($"{path}: '{layer}' is a {m.GetType().Name}; minLoRA files are read for linear layers only.");
            }
            var configs = ranks.GroupBy(kv => kv.Value).Select(g =>
            {
                var paths = g.Select(kv => kv.Key).ToHashSet(StringComparer.Ordinal);
                return new LoraConfig { Rank = g.Key, Alpha = alpha, AdapterName = adapterName, FreezeBase = freezeBase, TargetPredicate = (p, _) => paths.Contains(p) };
            }).ToList();
            return AddAndLoad(model, configs, mapped, adapterName, path);
        }
        finally
        {
            foreach (var t in tensors.Values) t.Dispose();
        }
    }

    /// <summary>Adds the adapter (one config per rank/alpha group) and loads its tensors strictly; on failure puts the model back.</summary>
    private static IReadOnlyList<string> AddAndLoad(nn.Module model, IReadOnlyList<LoraConfig> configs, IReadOnlyDictionary<string, Tensor> tensors, string adapterName, string source)
    {
        // What a failed load must put back: each layer's active adapters and every parameter's requires_grad.
        var activeBefore = model.GetLoraLayers().Select(l => (l.Layer, Active: l.Layer.ActiveAdapters.ToArray())).ToList();
        var gradBefore = model.named_parameters().Select(p => (p.parameter, p.parameter.requires_grad)).ToList();
        try
        {
            var adapted = new List<string>();
            foreach (var c in configs) adapted.AddRange(model.AddLora(c));
            try
            {
                model.LoadLoraStateDict(tensors, adapterName, strict: true);
            }
            catch (StateDictMismatchException ex)
            {
                throw new StateDictMismatchException(ex.Fit, source, "The LoRA weights do not match the model's layers (nothing was loaded)", inner: ex);
            }
            return adapted;
        }
        catch
        {
            if (model.GetLoraAdapterNames().Contains(adapterName)) model.DeleteLoraAdapter(adapterName);
            foreach (var (layer, active) in activeBefore) layer.SetActive(active);
            foreach (var (p, grad) in gradBefore) p.requires_grad = grad;
            throw;
        }
    }

    private static void RequireFinite(IReadOnlyDictionary<string, Tensor> tensors, string source)
    {
        foreach (var (key, t) in tensors)
        {
            if (Dtypes.IsFloating(t.dtype) && !isfinite(t).all().item<bool>())
                throw new InvalidDataException($"{source}: '{key}' holds NaN or infinite values (pass allowNonFinite: true to load it anyway).");
        }
    }

    private static T? Read<T>(JsonObject json, string key, string path) where T : struct => (T?)ReadNode<T>(json, key, path);

    private static string? ReadString(JsonObject json, string key, string path) => (string?)ReadNode<string>(json, key, path);

    private static object? ReadNode<T>(JsonObject json, string key, string path)
    {
        var node = json[key];
        if (node is null) return null;
        try
        {
            return node.GetValue<T>();
        }
        catch (Exception ex) when (ex is FormatException or InvalidOperationException)
        {
            throw new InvalidDataException($"{path}: '{key}' has the wrong type ({node.ToJsonString()}, expected {typeof(T).Name}).", ex);
        }
    }

    private static Dictionary<string, Tensor> ReadWeights(string directory)
    {
        var st = Path.Combine(directory, WeightsFileName);
        var bin = Path.Combine(directory, LegacyWeightsFileName);
        if (File.Exists(st)) return StateDictFile.Read(st);
        if (File.Exists(bin)) return StateDictFile.Read(bin);
        throw new FileNotFoundException($"No {WeightsFileName} or {LegacyWeightsFileName} in '{directory}'.", st);
    }

    private static Dictionary<string, double> ReadPattern(JsonObject json, string key, string path)
    {
        var result = new Dictionary<string, double>(StringComparer.Ordinal);
        switch (json[key])
        {
            case null:
                break;
            case JsonObject o:
                foreach (var (k, v) in o)
                {
                    if (v is not JsonValue value || !value.TryGetValue(out double d) || !double.IsFinite(d))
                        throw new InvalidDataException($"{path}: {key}['{k}'] is not a finite number ({v?.ToJsonString() ?? "null"}).");
                    result[k] = d;
                }
                break;
            default:
                throw new InvalidDataException($"{path}: '{key}' is not an object.");
        }
        return result;
    }

    private static double? Lookup(Dictionary<string, double> pattern, string path)
    {
        foreach (var (k, v) in pattern)
        {
            if (ModuleSelector.NameMatches(path, k)) return v;
        }
        return null;
    }
}
