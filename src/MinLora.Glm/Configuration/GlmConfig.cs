using System.Text.Json;
using System.Text.Json.Serialization;

namespace MinLora.Glm;

/// <summary>The GLM architecture generations.</summary>
public enum GlmVersion
{
    /// <summary>ChatGLM-6B (v1): 2-D rotary positions, LayerNorm, GELU MLP, bidirectional prefix.</summary>
    ChatGlm1,
    /// <summary>ChatGLM2-6B / ChatGLM3-6B (v2 architecture: RMSNorm, multi-query attention, SwiGLU).</summary>
    ChatGlm2,
}

/// <summary>
/// A GLM checkpoint's <c>config.json</c> (snake_case keys as the checkpoint writes them; unknown keys ignored).
/// Defaults are ChatGLM-6B's <c>configuration_chatglm.py</c> with the checkpoint's token ids.
/// </summary>
public sealed record GlmConfig
{
    private static readonly JsonSerializerOptions JsonOptions = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        NumberHandling = JsonNumberHandling.AllowReadingFromString,
        ReadCommentHandling = JsonCommentHandling.Skip,
        AllowTrailingCommas = true,
        WriteIndented = true,
        DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
    };

    /// <summary><c>model_type</c>; "chatglm" for every ChatGLM generation.</summary>
    public string ModelType { get; init; } = "chatglm";

    /// <summary>Vocabulary size (rows of the embedding and of the output head).</summary>
    public int VocabSize { get; init; } = 130528;

    /// <summary>Hidden size.</summary>
    public int HiddenSize { get; init; } = 4096;

    /// <summary>Number of transformer blocks.</summary>
    public int NumLayers { get; init; } = 28;

    /// <summary>Number of attention heads.</summary>
    public int NumAttentionHeads { get; init; } = 32;

    /// <summary>MLP inner size (default 4·hidden).</summary>
    public int? InnerHiddenSize { get; init; }

    /// <summary>LayerNorm epsilon.</summary>
    public double LayernormEpsilon { get; init; } = 1e-5;

    /// <summary>Longest sequence the model was trained for.</summary>
    public int MaxSequenceLength { get; init; } = 2048;

    /// <summary>2-D rotary positions (position and block position), as ChatGLM-6B uses.</summary>
    public bool PositionEncoding2d { get; init; } = true;

    /// <summary><c>&lt;sop&gt;</c>: start of the generated part.</summary>
    public int BosTokenId { get; init; } = 130004;

    /// <summary><c>&lt;eop&gt;</c>: end of the generated part.</summary>
    public int EosTokenId { get; init; } = 130005;

    /// <summary><c>[MASK]</c>.</summary>
    public int MaskTokenId { get; init; } = 130000;

    /// <summary><c>[gMASK]</c>.</summary>
    public int GmaskTokenId { get; init; } = 130001;

    /// <summary>Padding id (left padding).</summary>
    public int PadTokenId { get; init; } = 3;

    /// <summary>Use the KV cache in generation.</summary>
    public bool UseCache { get; init; } = true;

    /// <summary>Length of the P-tuning v2 prefix (null: no prefix).</summary>
    public int? PreSeqLen { get; init; }

    /// <summary>P-tuning v2 prefix through a two-layer MLP instead of a plain embedding.</summary>
    public bool PrefixProjection { get; init; }

    /// <summary>Bits of a pre-quantized checkpoint (0: not quantized; 4 or 8).</summary>
    public int QuantizationBit { get; init; }

    /// <summary>
    /// Whether a pre-quantized checkpoint also stores <c>word_embeddings</c> quantized (ChatGLM's
    /// <c>quantization_embeddings</c>: <c>weight</c> and <c>weight_scale</c> in the projections' per-row format).
    /// </summary>
    public bool QuantizationEmbeddings { get; init; }

    /// <summary>
    /// MinLora's own flag (ignored by the reference code): the output head is stored quantized like the projections
    /// (<see cref="Modeling.GlmBuildOptions.QuantizeLmHead"/>), written by <c>SavePretrained</c>.
    /// </summary>
    public bool? QuantizeLmHead { get; init; }

    /// <summary>The checkpoint's element type name (e.g. "float16").</summary>
    public string? TorchDtype { get; init; }

    /// <summary>v2 architecture marker: multi-query attention.</summary>
    public bool? MultiQueryAttention { get; init; }

    /// <summary>v2 architecture marker: padded vocabulary size.</summary>
    public int? PaddedVocabSize { get; init; }

    /// <summary>v2 architecture marker: key/value channels.</summary>
    public int? KvChannels { get; init; }

    /// <summary>v2: number of key/value groups of multi-query attention (2 in ChatGLM2/3-6B and GLM-4-9B).</summary>
    public int? MultiQueryGroupNum { get; init; }

    /// <summary>v2: the SwiGLU MLP's inner size (13,696 in the 6B/9B models).</summary>
    public int? FfnHiddenSize { get; init; }

    /// <summary>v2: RMSNorm instead of LayerNorm.</summary>
    public bool? Rmsnorm { get; init; }

    /// <summary>v2: biases on the dense and MLP projections.</summary>
    public bool? AddBiasLinear { get; init; }

    /// <summary>v2: bias on query_key_value.</summary>
    public bool? AddQkvBias { get; init; }

    /// <summary>v2: scores scaled by 1/(√d·layer) and back by layer (the reference's layer scaling).</summary>
    public bool? ApplyQueryKeyLayerScaling { get; init; }

    /// <summary>v2: residual from the LayerNorm output instead of its input.</summary>
    public bool? ApplyResidualConnectionPostLayernorm { get; init; }

    /// <summary>v2: a final norm after the last block.</summary>
    public bool? PostLayerNorm { get; init; }

    /// <summary>v2: the longest sequence (rotary table length).</summary>
    public int? SeqLength { get; init; }

    /// <summary>v2: rotary base multiplier (base = 10,000·rope_ratio; ChatGLM3-6B-32k and GLM-4 use it).</summary>
    public double? RopeRatio { get; init; }

    /// <summary>Rows of the embedding and output head: <c>padded_vocab_size</c> for v2, else <see cref="VocabSize"/>.</summary>
    [JsonIgnore]
    public int ModelVocabSize => Version == GlmVersion.ChatGlm2 ? PaddedVocabSize ?? VocabSize : VocabSize;

    /// <summary>v2: size of one head (<c>kv_channels</c>, else hidden / heads).</summary>
    [JsonIgnore]
    public int KvChannelsOrHeadDim => KvChannels ?? HiddenSize / NumAttentionHeads;

    /// <summary>v2: key/value groups in effect (1 per head without multi-query attention).</summary>
    [JsonIgnore]
    public int KvGroups => MultiQueryAttention == true ? MultiQueryGroupNum ?? 1 : NumAttentionHeads;

    /// <summary>The MLP inner size in effect.</summary>
    [JsonIgnore]
    public int MlpHiddenSize => InnerHiddenSize ?? 4 * HiddenSize;

    /// <summary>Per-head size.</summary>
    [JsonIgnore]
    public int HeadDim => HiddenSize / NumAttentionHeads;

    /// <summary>The architecture generation this config describes.</summary>
    [JsonIgnore]
    public GlmVersion Version => MultiQueryAttention is not null || PaddedVocabSize is not null || KvChannels is not null || Rmsnorm is not null || FfnHiddenSize is not null
        ? GlmVersion.ChatGlm2 : GlmVersion.ChatGlm1;

    /// <summary>Reads a <c>config.json</c>.</summary>
    /// <param name="path">The file.</param>
    /// <returns>The validated config.</returns>
    /// <exception cref="FileNotFoundException">No such file.</exception>
    /// <exception cref="InvalidDataException">Not valid JSON, or invalid values (the message names them).</exception>
    /// <exception cref="NotSupportedException">Another model type or an architecture generation MinLora does not implement yet.</exception>
    public static GlmConfig FromFile(string path)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(path);
        if (!File.Exists(path)) throw new FileNotFoundException($"No GLM config at '{path}'.", path);
        return FromJson(File.ReadAllText(path), path);
    }

    /// <summary>Parses config JSON.</summary>
    /// <param name="json">The text.</param>
    /// <param name="source">Where it came from, for messages.</param>
    /// <returns>The validated config.</returns>
    /// <exception cref="InvalidDataException">Not valid JSON, or invalid values.</exception>
    /// <exception cref="NotSupportedException">Another model type or an unsupported generation.</exception>
    public static GlmConfig FromJson(string json, string source = "config.json")
    {
        ArgumentNullException.ThrowIfNull(json);
        GlmConfig? config;
        try
        {
            // A null value means "not set" (v2 configs write "bos_token_id": null); GLM-4 lists several eos ids: the
            // first is the model's eos.
            var node = System.Text.Json.Nodes.JsonNode.Parse(json, documentOptions: new JsonDocumentOptions { CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true });
            if (node is System.Text.Json.Nodes.JsonObject obj)
            {
                foreach (var key in obj.Where(kv => kv.Value is null).Select(kv => kv.Key).ToList()) obj.Remove(key);
                if (obj["eos_token_id"] is System.Text.Json.Nodes.JsonArray eos && eos.Count > 0) obj["eos_token_id"] = eos[0]?.DeepClone();
            }
            config = node.Deserialize<GlmConfig>(JsonOptions);
        }
        catch (Exception ex) when (ex is JsonException or InvalidOperationException or FormatException)
        {
            throw new InvalidDataException($"{source} is not a valid GLM config: {ex.Message}", ex);
        }
        if (config is null) throw new InvalidDataException($"{source} is empty.");
        config.Validate(source);
        return config;
    }

    /// <summary>The config as <c>config.json</c> text (snake_case).</summary>
    /// <returns>JSON.</returns>
    public string ToJson() => JsonSerializer.Serialize(this, JsonOptions);

    /// <summary>Checks the values; throws naming the first bad one.</summary>
    /// <param name="source">Where the config came from, for messages.</param>
    /// <exception cref="InvalidDataException">A size is not positive or above its bound, the hidden size does not split into heads, a non-finite epsilon, or a token id is out of the vocabulary.</exception>
    /// <exception cref="NotSupportedException">Another model type, or an unsupported generation or option.</exception>
    public void Validate(string source = "config")
    {
        if (!string.Equals(ModelType, "chatglm", StringComparison.OrdinalIgnoreCase))
            throw new NotSupportedException($"{source}: model_type '{ModelType}' is not a GLM (expected 'chatglm').");
        if (Version == GlmVersion.ChatGlm2)
        {
            ValidateV2(source);
            return;
        }
        // Upper bounds far above any GLM (ChatGLM-6B: 130,528 × 4,096, 28 layers; GLM-4: 151,552 vocab) keep a
        // corrupt or hostile config from allocating without end or overflowing sizes before a weight is read.
        void InRange(int v, int max, string name)
        {
            if (v <= 0) throw new InvalidDataException($"{source}: {name} must be positive, got {v}.");
            if (v > max) throw new InvalidDataException($"{source}: {name} {v} is above the supported maximum {max}.");
        }
        InRange(VocabSize, 4_000_000, "vocab_size");
        InRange(HiddenSize, 65_536, "hidden_size");
        InRange(NumLayers, 1_024, "num_layers");
        InRange(NumAttentionHeads, 4_096, "num_attention_heads");
        if (InnerHiddenSize is { } inner) InRange(inner, 1 << 20, "inner_hidden_size");
        InRange(MaxSequenceLength, 1 << 20, "max_sequence_length");
        if (!double.IsFinite(LayernormEpsilon) || LayernormEpsilon <= 0 || LayernormEpsilon >= 1)
            throw new InvalidDataException($"{source}: layernorm_epsilon must be in (0, 1), got {LayernormEpsilon}.");
        if (HiddenSize % NumAttentionHeads != 0)
            throw new InvalidDataException($"{source}: hidden_size {HiddenSize} is not divisible by num_attention_heads {NumAttentionHeads}.");
        if (PositionEncoding2d && HeadDim % 4 != 0)
            throw new InvalidDataException($"{source}: 2-D rotary positions need a head size divisible by 4, got {HeadDim}.");
        if (!PositionEncoding2d)
            throw new NotSupportedException($"{source}: position_encoding_2d = false is not supported (ChatGLM-6B uses 2-D positions).");
        foreach (var (id, name) in new[] { (BosTokenId, "bos_token_id"), (EosTokenId, "eos_token_id"), (MaskTokenId, "mask_token_id"), (GmaskTokenId, "gmask_token_id"), (PadTokenId, "pad_token_id") })
        {
            if (id < 0 || id >= VocabSize) throw new InvalidDataException($"{source}: {name} {id} is outside the vocabulary (0..{VocabSize - 1}).");
        }
        if (PreSeqLen is { } p && p <= 0) throw new InvalidDataException($"{source}: pre_seq_len must be positive when set, got {p}.");
        if (QuantizationBit is not (0 or 4 or 8)) throw new InvalidDataException($"{source}: quantization_bit must be 0, 4 or 8, got {QuantizationBit}.");
        if (QuantizationEmbeddings && QuantizationBit == 0) throw new InvalidDataException($"{source}: quantization_embeddings needs quantization_bit 4 or 8.");
    }

    /// <summary>The checks of a v2 (ChatGLM2/3, GLM-4) config.</summary>
    private void ValidateV2(string source)
    {
        void InRange(int v, int max, string name)
        {
            if (v <= 0) throw new InvalidDataException($"{source}: {name} must be positive, got {v}.");
            if (v > max) throw new InvalidDataException($"{source}: {name} {v} is above the supported maximum {max}.");
        }
        InRange(ModelVocabSize, 4_000_000, "padded_vocab_size");
        InRange(HiddenSize, 65_536, "hidden_size");
        InRange(NumLayers, 1_024, "num_layers");
        InRange(NumAttentionHeads, 4_096, "num_attention_heads");
        InRange(KvChannelsOrHeadDim, 4_096, "kv_channels");
        InRange(FfnHiddenSize ?? 4 * HiddenSize, 1 << 20, "ffn_hidden_size");
        InRange(SeqLength ?? 32_768, 1 << 20, "seq_length");
        if (MultiQueryAttention != true)
            throw new NotSupportedException($"{source}: v2 configs without multi_query_attention (per-head interleaved query_key_value) are not supported; ChatGLM2/3 and GLM-4 use multi-query attention.");
        {
            InRange(MultiQueryGroupNum ?? 0, NumAttentionHeads, "multi_query_group_num");
            if (NumAttentionHeads % MultiQueryGroupNum!.Value != 0)
                throw new InvalidDataException($"{source}: num_attention_heads {NumAttentionHeads} is not a multiple of multi_query_group_num {MultiQueryGroupNum}.");
        }
        if (KvChannelsOrHeadDim % 4 != 0) throw new InvalidDataException($"{source}: rotary embedding needs kv_channels divisible by 4, got {KvChannelsOrHeadDim}.");
        if (!double.IsFinite(LayernormEpsilon) || LayernormEpsilon <= 0 || LayernormEpsilon >= 1)
            throw new InvalidDataException($"{source}: layernorm_epsilon must be in (0, 1), got {LayernormEpsilon}.");
        if (RopeRatio is { } r && (!double.IsFinite(r) || r <= 0)) throw new InvalidDataException($"{source}: rope_ratio must be positive, got {r}.");
        if (Rmsnorm == false) throw new NotSupportedException($"{source}: v2 configs with rmsnorm = false are not supported.");
        if (ApplyResidualConnectionPostLayernorm == true) throw new NotSupportedException($"{source}: apply_residual_connection_post_layernorm = true is not supported.");
        foreach (var (id, name) in new[] { (EosTokenId, "eos_token_id"), (PadTokenId, "pad_token_id") })
        {
            if (id < 0 || id >= ModelVocabSize) throw new InvalidDataException($"{source}: {name} {id} is outside the vocabulary (0..{ModelVocabSize - 1}).");
        }
        if (PreSeqLen is { } pre && pre <= 0) throw new InvalidDataException($"{source}: pre_seq_len must be positive when set, got {pre}.");
        if (QuantizationBit is not (0 or 4 or 8)) throw new InvalidDataException($"{source}: quantization_bit must be 0, 4 or 8, got {QuantizationBit}.");
        if (QuantizationEmbeddings && QuantizationBit == 0) throw new InvalidDataException($"{source}: quantization_embeddings needs quantization_bit 4 or 8.");
    }
}
