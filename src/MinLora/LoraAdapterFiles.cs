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
    /// <returns>The paths of the adapted layers.</returns>
    /// <exception cref="FileNotFoundException">A file is missing.</exception>
    /// <exception cref="InvalidDataException">The config is malformed or describes something other than plain LoRA.</exception>
    /// <exception cref="LoraStateDictMismatchException">The tensors do not fit the adapted layers.</exception>
    /// <exception cref="InvalidOperationException">The model already has an adapter of that name.</exception>
    public static IReadOnlyList<string> LoadLoraAdapter(this nn.Module model, string directory, string adapterName = LoraConfig.DefaultAdapterName, bool freezeBase = true)
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
        var peftType = json["peft_type"]?.GetValue<string>();
        if (peftType is not null && peftType != "LORA") throw new InvalidDataException($"{configPath}: peft_type is '{peftType}', not LORA.");
        if (json["use_dora"]?.GetValue<bool>() == true) throw new InvalidDataException($"{configPath}: DoRA adapters are not supported.");
        if (json["fan_in_fan_out"]?.GetValue<bool>() == true) throw new InvalidDataException($"{configPath}: fan_in_fan_out adapters (GPT-2 Conv1D layout) are not supported.");
        var bias = json["bias"]?.GetValue<string>() ?? "none";
        if (bias != "none") throw new InvalidDataException($"{configPath}: bias '{bias}' is not supported (only 'none').");
        int rank = ReadInt(json, "r", configPath);
        double alpha = json["lora_alpha"] is { } a ? a.GetValue<double>() : rank;
        double dropout = json["lora_dropout"]?.GetValue<double>() ?? 0;
        bool rs = json["use_rslora"]?.GetValue<bool>() ?? false;
        var targets = json["target_modules"] switch
        {
            JsonArray arr => arr.Select(n => n!.GetValue<string>()).ToList(),
            JsonValue v => throw new InvalidDataException($"{configPath}: target_modules '{v}' is a regular expression or preset; only a list of names is supported."),
            _ => throw new InvalidDataException($"{configPath}: target_modules is missing."),
        };
        var rankPattern = ReadPattern(json, "rank_pattern");
        var alphaPattern = ReadPattern(json, "alpha_pattern");

        var tensors = ReadWeights(directory);
        // What a failed load must put back: each layer's active adapters and every parameter's requires_grad.
        var activeBefore = model.GetLoraLayers().Select(l => (l.Layer, Active: l.Layer.ActiveAdapters.ToArray())).ToList();
        var gradBefore = model.named_parameters().Select(p => (p.parameter, p.parameter.requires_grad)).ToList();
        var baseConfig = new LoraConfig { Rank = rank, Alpha = alpha, Dropout = dropout, UseRsLora = rs, AdapterName = adapterName, FreezeBase = freezeBase, TargetModules = targets };
        try
        {
            IReadOnlyList<string> adapted;
            if (rankPattern.Count == 0 && alphaPattern.Count == 0)
            {
                adapted = model.AddLora(baseConfig);
            }
            else
            {
                // Group the matched modules by their (rank, alpha) and add each group with its own settings.
                var matched = ModuleTree.Walk(model).Where(s => baseConfig.IsExplicitTarget(s.Path, s.Module)).Select(s => s.Path).ToList();
                var groups = matched.GroupBy(p => (R: Lookup(rankPattern, p) ?? rank, A: Lookup(alphaPattern, p) ?? alpha));
                var all = new List<string>();
                foreach (var g in groups)
                {
                    var paths = g.ToHashSet(StringComparer.Ordinal);
                    all.AddRange(model.AddLora(baseConfig with { Rank = (int)g.Key.R, Alpha = g.Key.A, TargetModules = null, TargetPredicate = (p, _) => paths.Contains(p) }));
                }
                adapted = all;
            }
            model.LoadLoraStateDict(tensors, adapterName, strict: true);
            return adapted;
        }
        catch
        {
            if (model.GetLoraAdapterNames().Contains(adapterName)) model.DeleteLoraAdapter(adapterName);
            foreach (var (layer, active) in activeBefore) layer.SetActive(active);
            foreach (var (p, grad) in gradBefore) p.requires_grad = grad;
            throw;
        }
        finally
        {
            foreach (var t in tensors.Values) t.Dispose();
        }
    }

    private static Dictionary<string, Tensor> ReadWeights(string directory)
    {
        var st = Path.Combine(directory, WeightsFileName);
        var bin = Path.Combine(directory, LegacyWeightsFileName);
        try
        {
            if (File.Exists(st))
            {
                SafetensorsHeader.Read(st);
                return Safetensors.LoadStateDict(st);
            }
            if (File.Exists(bin))
            {
                var table = PyTorchUnpickler.UnpickleStateDict(bin);
                var dict = new Dictionary<string, Tensor>(StringComparer.Ordinal);
                foreach (System.Collections.DictionaryEntry e in table) dict[(string)e.Key] = (Tensor)e.Value!;
                return dict;
            }
        }
        catch (Exception ex) when (ex is not FileNotFoundException)
        {
            throw new InvalidDataException($"Cannot read the adapter weights in '{directory}': {ex.Message}", ex);
        }
        throw new FileNotFoundException($"No {WeightsFileName} or {LegacyWeightsFileName} in '{directory}'.", st);
    }

    private static int ReadInt(JsonObject json, string key, string path)
    {
        try
        {
            return json[key]?.GetValue<int>() ?? throw new InvalidDataException($"{path}: '{key}' is missing.");
        }
        catch (Exception ex) when (ex is FormatException or InvalidOperationException)
        {
            throw new InvalidDataException($"{path}: '{key}' is not an integer.", ex);
        }
    }

    private static Dictionary<string, double> ReadPattern(JsonObject json, string key)
    {
        var result = new Dictionary<string, double>(StringComparer.Ordinal);
        if (json[key] is JsonObject o)
        {
            foreach (var (k, v) in o) result[k] = v!.GetValue<double>();
        }
        return result;
    }

    private static double? Lookup(Dictionary<string, double> pattern, string path)
    {
        foreach (var (k, v) in pattern)
        {
            if (path == k || path.EndsWith("." + k, StringComparison.Ordinal)) return v;
        }
        return null;
    }
}
