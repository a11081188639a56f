using System.Text.Json;
using System.Text.Json.Nodes;
using MinLora.Quantization;
using TorchSharp;
using TorchSharp.PyBridge;
using static TorchSharp.torch;

namespace MinLora.Glm;

/// <summary>How <see cref="GlmCheckpoint.SavePretrained"/> writes a checkpoint directory.</summary>
public sealed record GlmSaveOptions
{
    /// <summary>Largest shard in bytes; a bigger model is split into <c>model-0000i-of-0000n.safetensors</c> with <c>model.safetensors.index.json</c>.</summary>
    /// <value>The default value is 2 GB.</value>
    public long MaxShardBytes { get; init; } = 2_000_000_000;

    /// <summary>A directory whose tokenizer files (<c>ice_text.model</c> or <c>tokenizer.model</c>, <c>tokenizer_config.json</c>) are copied along, or null.</summary>
    public string? TokenizerDirectory { get; init; }
}

public static partial class GlmCheckpoint
{
    private static readonly string[] TokenizerFiles = { "ice_text.model", "tokenizer.model", "tokenizer_config.json" };

    /// <summary>Weights, indexes and configs of an earlier save are never carried beside a new one.</summary>
    private static bool IsCheckpointFile(string relative) =>
        relative == "config.json" || relative.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase) || relative.EndsWith(".bin", StringComparison.OrdinalIgnoreCase) ||
        relative.EndsWith(".pth", StringComparison.OrdinalIgnoreCase) || relative.EndsWith(".index.json", StringComparison.OrdinalIgnoreCase);

    /// <summary>
    /// Writes <paramref name="model"/> as a checkpoint directory that <see cref="FromPretrained"/>, Hugging Face and
    /// chatglm.cpp's converter read: <c>config.json</c> (with <c>quantization_bit</c> when the projections are
    /// quantized in ChatGLM's per-row formats, <c>quantization_embeddings</c> when the embedding is), safetensors in the
    /// checkpoint's own key names (sharded with an index above <see cref="GlmSaveOptions.MaxShardBytes"/>) and the
    /// tokenizer files. All-or-nothing (<see cref="AtomicDirectory"/>): a failed or interrupted save leaves a previous
    /// checkpoint there whole.
    /// </summary>
    /// <param name="model">The model (merge LoRA adapters first: a checkpoint holds the base weights only).</param>
    /// <param name="directory">The output directory.</param>
    /// <param name="options">Sharding and tokenizer files.</param>
    /// <returns>The files written (relative names).</returns>
    /// <exception cref="InvalidOperationException">The model has LoRA adapters (merge them, or save them with SaveLoraAdapter).</exception>
    /// <exception cref="NotSupportedException">Projections in a layout ChatGLM's checkpoints cannot describe (grouped int4, or mixed bit widths).</exception>
    public static IReadOnlyList<string> SavePretrained(this GlmForCausalLM model, string directory, GlmSaveOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentException.ThrowIfNullOrWhiteSpace(directory);
        options ??= new GlmSaveOptions();
        ArgumentOutOfRangeException.ThrowIfLessThan(options.MaxShardBytes, 1L);
        if (model.GetLoraLayers().Count > 0)
            throw new InvalidOperationException("The model has LoRA adapters: merge them (MergeLora) before SavePretrained, or save them with SaveLoraAdapter.");

        // What the config must say about quantization, checked before anything is written.
        var quantized = model.named_modules().Where(m => m.module is QuantizedLinear).Select(m => (m.name, Layer: (QuantizedLinear)m.module)).ToList();
        int bits = 0;
        bool head = false;
        foreach (var (name, layer) in quantized)
        {
            if (layer.Format == QuantizationFormat.Int4Grouped)
                throw new NotSupportedException($"'{name}' is grouped int4, which ChatGLM's checkpoints cannot describe; quantize with Int4PerRowChatGlm or save a float model.");
            if (bits != 0 && layer.Bits != bits) throw new NotSupportedException($"'{name}' is int{layer.Bits} while other layers are int{bits}: a checkpoint has one quantization_bit.");
            bits = layer.Bits;
            head |= name is "lm_head" or "transformer.output_layer";
        }
        var embedding = model.named_modules().FirstOrDefault(m => m.module is QuantizedEmbedding);
        var config = model.Config with { QuantizationBit = bits, QuantizationEmbeddings = embedding.module is not null, QuantizeLmHead = head ? true : null };
        var state = model.state_dict();
        var keys = state.Keys.ToList();
        var shards = new List<List<string>>();
        long current = 0;
        foreach (var key in keys)
        {
            long bytes = state[key].numel() * state[key].element_size();
            if (shards.Count == 0 || (current + bytes > options.MaxShardBytes && shards[^1].Count > 0))
            {
                shards.Add(new List<string>());
                current = 0;
            }
            shards[^1].Add(key);
            current += bytes;
        }
        var written = new List<string>();
        AtomicDirectory.Write(directory, staging =>
        {
            File.WriteAllText(Path.Combine(staging, "config.json"), config.ToJson());
            written.Add("config.json");
            var weightMap = new JsonObject();
            long total = 0;
            for (int i = 0; i < shards.Count; i++)
            {
                string name = shards.Count == 1 ? "model.safetensors" : $"model-{i + 1:D5}-of-{shards.Count:D5}.safetensors";
                using (var scope = NewDisposeScope())
                {
                    var part = shards[i].ToDictionary(k => k, k => state[k].detach().cpu().contiguous());
                    Safetensors.SaveStateDict(Path.Combine(staging, name), part);
                    total += part.Values.Sum(t => t.numel() * t.element_size());
                }
                foreach (var k in shards[i]) weightMap[k] = name;
                written.Add(name);
            }
            if (shards.Count > 1)
            {
                var index = new JsonObject { ["metadata"] = new JsonObject { ["total_size"] = total }, ["weight_map"] = weightMap };
                File.WriteAllText(Path.Combine(staging, "model.safetensors.index.json"), index.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
                written.Add("model.safetensors.index.json");
            }
            if (options.TokenizerDirectory is { } tokenizer)
            {
                foreach (var file in new[] { "ice_text.model", "tokenizer.model", "tokenizer_config.json" })
                {
                    var source = Path.Combine(tokenizer, file);
                    if (!File.Exists(source)) continue;
                    File.Copy(source, Path.Combine(staging, file));
                    written.Add(file);
                }
            }
        }, carryOver: rel => !IsCheckpointFile(rel) && (options.TokenizerDirectory is null || !TokenizerFiles.Contains(rel)));
        return written;
    }
}
