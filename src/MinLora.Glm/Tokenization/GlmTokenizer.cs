using System.Buffers;
using System.Text;
using System.Text.Json;
using Microsoft.ML.Tokenizers;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Tokenization;

/// <summary>A left-padded batch of token ids with ChatGLM's attention mask and 2-D positions.</summary>
/// <param name="InputIds">int64 [batch, sequence].</param>
/// <param name="AttentionMask">bool [batch, 1, sequence, sequence], True = masked.</param>
/// <param name="PositionIds">int64 [batch, 2, sequence].</param>
public sealed record GlmBatch(Tensor InputIds, Tensor AttentionMask, Tensor PositionIds) : IDisposable
{
    /// <inheritdoc />
    public void Dispose()
    {
        InputIds.Dispose();
        AttentionMask.Dispose();
        PositionIds.Dispose();
    }
}

/// <summary>
/// ChatGLM-6B's tokenizer (<c>tokenization_chatglm.py</c> + <c>ice_text.model</c>): SentencePiece Unigram computed
/// as SentencePiece computes it (normalizer, Viterbi, byte fallback; linear in the text length), with ChatGLM's preprocessing (<c>\n</c> → <c>&lt;n&gt;</c>,
/// <c>\t</c> → <c>&lt;|tab|&gt;</c>, runs of 2–80 spaces → <c>&lt;|blank_N|&gt;</c>), its special tokens, the image-token
/// offset of old vocabularies, and decoding that reverses all of it.
/// </summary>
/// <remarks>
/// The encoder is MinLora's own (Microsoft.ML.Tokenizers 2.0.1's Unigram breaks ties differently from SentencePiece,
/// numbers byte-fallback pieces wrongly, decodes ice_text.model to empty text and is quadratic in the text length:
/// docs/tokenizers-upstream.md). Each invalid UTF-16 code unit (a lone or reversed surrogate) is encoded as one
/// U+FFFD (its byte-fallback pieces with ice_text.model), never dropped.
/// </remarks>
public sealed class GlmTokenizer : Tokenizer, IGlmTextTokenizer
{
    /// <summary>The longest run of spaces with its own token.</summary>
    public const int MaxBlankLength = 80;

    private readonly IPieceEncoder _encoder;
    private readonly SentencePieceModel _model;
    private readonly int _imageTokens;

    private GlmTokenizer(SentencePieceModel model, int imageTokens)
    {
        _encoder = model.ModelType == 2 ? new BpeEncoder(model) : new UnigramEncoder(model);
        _model = model;
        _imageTokens = imageTokens;
        int Id(string piece)
        {
            int id = model.IdOf(piece);
            if (id < 0) throw new InvalidDataException($"The SentencePiece model has no '{piece}' piece; it is not a ChatGLM tokenizer model.");
            return id + imageTokens;
        }
        MaskId = Id("[MASK]");
        GmaskId = Id("[gMASK]");
        SmaskId = model.IdOf("[sMASK]") is var s and >= 0 ? s + imageTokens : -1;
        BosId = Id("<sop>");
        EosId = Id("<eop>");
        PadId = Id("<pad>");
        UnkId = Id("<unk>");
        NewlineId = Id("<n>");
    }

    /// <summary><c>[MASK]</c>.</summary>
    public int MaskId { get; }

    /// <summary><c>[gMASK]</c>.</summary>
    public int GmaskId { get; }

    /// <summary><c>[sMASK]</c> (−1 when the model has none).</summary>
    public int SmaskId { get; }

    /// <summary><c>&lt;sop&gt;</c>, the model's bos.</summary>
    public int BosId { get; }

    /// <summary><c>&lt;eop&gt;</c>, the model's eos.</summary>
    public int EosId { get; }

    /// <summary><c>&lt;pad&gt;</c>.</summary>
    public int PadId { get; }

    /// <summary><c>&lt;unk&gt;</c>.</summary>
    public int UnkId { get; }

    /// <summary><c>&lt;n&gt;</c>.</summary>
    public int NewlineId { get; }

    /// <summary>Number of ids (SentencePiece pieces plus the image-token offset).</summary>
    public int VocabSize => _model.Pieces.Count + _imageTokens;

    /// <summary>The SentencePiece model's pieces.</summary>
    public SentencePieceModel Model => _model;

    /// <summary>Loads <c>ice_text.model</c> and <c>tokenizer_config.json</c> (for <c>num_image_tokens</c>) from a checkpoint directory.</summary>
    /// <param name="directory">The directory.</param>
    /// <returns>The tokenizer.</returns>
    /// <exception cref="FileNotFoundException">No <c>ice_text.model</c>.</exception>
    /// <exception cref="InvalidDataException">A malformed model or config.</exception>
    public static GlmTokenizer FromPretrained(string directory)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(directory);
        var modelPath = Path.Combine(directory, "ice_text.model");
        if (!File.Exists(modelPath)) throw new FileNotFoundException($"No ice_text.model in '{directory}'.", modelPath);
        int imageTokens = 0;
        var configPath = Path.Combine(directory, "tokenizer_config.json");
        if (File.Exists(configPath))
        {
            try
            {
                using var doc = JsonDocument.Parse(File.ReadAllText(configPath));
                if (doc.RootElement.TryGetProperty("num_image_tokens", out var n) && n.ValueKind == JsonValueKind.Number) imageTokens = n.GetInt32();
            }
            catch (JsonException ex)
            {
                throw new InvalidDataException($"{configPath} is not valid JSON: {ex.Message}", ex);
            }
        }
        using var stream = File.OpenRead(modelPath);
        return Create(stream, imageTokens);
    }

    /// <summary>Creates the tokenizer from a SentencePiece model stream.</summary>
    /// <param name="modelStream">The <c>.model</c> content (read to the end; not disposed).</param>
    /// <param name="numImageTokens">Ids reserved before the text vocabulary (20000 in ChatGLM-6B's first release, 0 since).</param>
    /// <returns>The tokenizer.</returns>
    /// <exception cref="InvalidDataException">Not a ChatGLM SentencePiece model.</exception>
    public static GlmTokenizer Create(Stream modelStream, int numImageTokens = 0)
    {
        ArgumentNullException.ThrowIfNull(modelStream);
        ArgumentOutOfRangeException.ThrowIfNegative(numImageTokens);
        using var buffer = new MemoryStream();
        modelStream.CopyTo(buffer);
        var bytes = buffer.ToArray();
        var model = SentencePieceModel.Parse(bytes);
        if (model.ModelType is not (1 or 2)) throw new InvalidDataException($"The SentencePiece model is of type {model.ModelType}, neither Unigram (1) nor BPE (2): not a ChatGLM tokenizer model.");
        return new GlmTokenizer(model, numImageTokens);
    }

    /// <summary>ChatGLM's preprocessing: <c>\n</c> → <c>&lt;n&gt;</c>, <c>\t</c> → <c>&lt;|tab|&gt;</c>, runs of 80…2 spaces → <c>&lt;|blank_N|&gt;</c>.</summary>
    /// <param name="text">Raw text.</param>
    /// <returns>The text SentencePiece sees.</returns>
    public static string Preprocess(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        return Preprocess(text, null);
    }

    /// <summary>
    /// The preprocessing in one pass (the reference's replacements of 80…2 spaces, longest first and left to right,
    /// amount to: a run of L spaces → ⌊L/80⌋ × <c>&lt;|blank_80|&gt;</c>, then the rest as one blank token or, for a
    /// single space, itself); with <paramref name="map"/>, the original index of every output character plus a final entry.
    /// </summary>
    private static string Preprocess(string text, List<int>? map)
    {
        var sb = new StringBuilder(text.Length + 16);
        void Emit(string s, int from)
        {
            sb.Append(s);
            if (map is not null) for (int k = 0; k < s.Length; k++) map.Add(from);
        }
        for (int i = 0; i < text.Length;)
        {
            char c = text[i];
            if (c == '\n') { Emit("<n>", i); i++; continue; }
            if (c == '\t') { Emit("<|tab|>", i); i++; continue; }
            if (c != ' ') { sb.Append(c); map?.Add(i); i++; continue; }
            int run = 1;
            while (i + run < text.Length && text[i + run] == ' ') run++;
            int at = i;
            for (int full = run / MaxBlankLength; full > 0; full--, at += MaxBlankLength) Emit($"<|blank_{MaxBlankLength}|>", at);
            int rest = run % MaxBlankLength;
            if (rest == 1) Emit(" ", at);
            else if (rest > 1) Emit($"<|blank_{rest}|>", at);
            i += run;
        }
        map?.Add(text.Length);
        return sb.ToString();
    }

    /// <summary>
    /// Encodes text to ids without special tokens. With <paramref name="addDummyPrefix"/> (the reference's default,
    /// used by <c>tokenizer.tokenize</c>) the first piece carries SentencePiece's <c>▁</c>: "你好" → <c>[5, 74874]</c>.
    /// </summary>
    /// <param name="text">The text.</param>
    /// <param name="addDummyPrefix">Keep SentencePiece's leading <c>▁</c>.</param>
    /// <returns>The ids.</returns>
    public IReadOnlyList<int> EncodeToIds(string text, bool addDummyPrefix = true)
    {
        ArgumentNullException.ThrowIfNull(text);
        var pre = Preprocess(text);
        if (!addDummyPrefix) pre = "<n>" + pre;          // as the reference: encode "<n>" + text, drop the first 2 ids
        var raw = pre.Length == 0 ? new List<int>() : SentencePieceIds(pre);
        var ids = new List<int>(raw.Count);
        int skip = addDummyPrefix ? 0 : 2;
        for (int i = skip; i < raw.Count; i++) ids.Add(raw[i] + _imageTokens);
        return ids;
    }

    /// <summary>
    /// SentencePiece ids of preprocessed text, computed as SentencePiece computes them (<see cref="UnigramEncoder"/>:
    /// the model's normalizer, the optimized Viterbi with its score arithmetic and tie-breaking, byte fallback).
    /// </summary>
    private List<int> SentencePieceIds(string preprocessed)
    {
        var ids = new List<int>(preprocessed.Length);
        _encoder.Encode(Utf8.Encode(preprocessed), ids, null);
        return ids;
    }

    /// <summary>
    /// Tokens of <paramref name="text"/> (ids as <see cref="EncodeToIds(string, bool)"/> with the dummy prefix), each
    /// with its piece and its character range in <paramref name="text"/>.
    /// </summary>
    /// <param name="text">The text.</param>
    /// <returns>The tokens.</returns>
    public IReadOnlyList<EncodedToken> EncodeWithOffsets(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var charMap = new List<int>(text.Length + 1);
        var pre = Preprocess(text, charMap);
        var byteMap = new List<int>(pre.Length * 2);
        var utf8 = Utf8.Encode(pre, byteMap);
        var ids = new List<int>(pre.Length);
        var spans = new List<(int Start, int End)>(pre.Length);
        _encoder.Encode(utf8, ids, spans);
        var tokens = new List<EncodedToken>(ids.Count);
        for (int i = 0; i < ids.Count; i++)
        {
            int start = charMap[byteMap[spans[i].Start]], end = charMap[byteMap[spans[i].End]];
            tokens.Add(new EncodedToken(ids[i] + _imageTokens, _model.Pieces[ids[i]].Piece, new Range(start, Math.Max(start, end))));
        }
        return tokens;
    }

    /// <inheritdoc />
    protected override EncodeResults<EncodedToken> EncodeToTokens(string? text, ReadOnlySpan<char> textSpan, EncodeSettings settings)
    {
        var source = text ?? textSpan.ToString();
        var tokens = EncodeWithOffsets(source);
        int consumed = source.Length;
        if (settings.MaxTokenCount > 0 && tokens.Count > settings.MaxTokenCount)
        {
            tokens = tokens.Take(settings.MaxTokenCount).ToList();
            consumed = tokens.Count == 0 ? 0 : tokens[^1].Offset.End.Value;
        }
        return new EncodeResults<EncodedToken> { Tokens = tokens, NormalizedText = null, CharsConsumed = consumed };
    }

    /// <inheritdoc />
    public override OperationStatus Decode(IEnumerable<int> ids, Span<char> destination, out int idsConsumed, out int charsWritten) =>
        Utf8.DecodeInto(Decode, ids, destination, out idsConsumed, out charsWritten);

    /// <inheritdoc />
    public override string Decode(IEnumerable<int> ids) => Decode(ids, skipSpecialTokens: true);

    /// <summary>The model input for a prompt (and, for training, an answer): <c>prompt [gMASK] &lt;sop&gt; (answer &lt;eop&gt;)</c>.</summary>
    /// <param name="prompt">Prompt ids.</param>
    /// <param name="answer">Answer ids, or null.</param>
    /// <returns>The ids.</returns>
    public IReadOnlyList<int> BuildInputs(IReadOnlyList<int> prompt, IReadOnlyList<int>? answer = null)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        var ids = new List<int>(prompt.Count + 3 + (answer?.Count ?? 0));
        ids.AddRange(prompt);
        ids.Add(GmaskId);
        ids.Add(BosId);
        if (answer is not null)
        {
            ids.AddRange(answer);
            ids.Add(EosId);
        }
        return ids;
    }

    /// <summary><see cref="EncodeToIds"/> then <see cref="BuildInputs"/>: "你好" → <c>[5, 74874, 130001, 130004]</c>.</summary>
    /// <param name="prompt">The prompt text.</param>
    /// <returns>The ids.</returns>
    public IReadOnlyList<int> EncodePrompt(string prompt) => BuildInputs(EncodeToIds(prompt));

    /// <summary>Left-pads sequences to one length and builds their masks and 2-D positions.</summary>
    /// <param name="sequences">Model inputs (e.g. from <see cref="EncodePrompt"/>).</param>
    /// <param name="config">The model config (special ids for masks and positions).</param>
    /// <param name="device">Where to put the tensors.</param>
    /// <returns>The batch.</returns>
    /// <exception cref="ArgumentException">No sequences, or an empty one.</exception>
    public GlmBatch EncodeBatch(IReadOnlyList<IReadOnlyList<int>> sequences, GlmConfig config, Device? device = null)
    {
        ArgumentNullException.ThrowIfNull(sequences);
        ArgumentNullException.ThrowIfNull(config);
        if (sequences.Count == 0) throw new ArgumentException("Give at least one sequence.", nameof(sequences));
        if (sequences.Any(s => s.Count == 0)) throw new ArgumentException("A sequence is empty.", nameof(sequences));
        int length = sequences.Max(s => s.Count);
        var flat = new long[sequences.Count * length];
        for (int r = 0; r < sequences.Count; r++)
        {
            int pad = length - sequences[r].Count;
            for (int i = 0; i < length; i++) flat[r * length + i] = i < pad ? PadId : sequences[r][i - pad];
        }
        var ids = tensor(flat, new long[] { sequences.Count, length }, device: device);
        return new GlmBatch(ids, GlmMasks.BuildAttentionMask(ids, config), GlmMasks.BuildPositionIds(ids, config));
    }

    /// <summary>
    /// Decodes ids to text: pads dropped, special (control) tokens dropped unless asked, byte pieces joined as UTF-8,
    /// <c>▁</c> → space (the dummy-prefix space removed), and the preprocessing reversed.
    /// </summary>
    /// <param name="ids">The ids.</param>
    /// <param name="skipSpecialTokens">Drop control tokens such as <c>[gMASK]</c> and <c>&lt;eop&gt;</c> (otherwise they are written out).</param>
    /// <returns>The text.</returns>
    public string Decode(IEnumerable<int> ids, bool skipSpecialTokens = true)
    {
        ArgumentNullException.ThrowIfNull(ids);
        var text = new PieceText(_model, skipSpecialTokens);
        var specials = new HashSet<int> { MaskId, GmaskId, SmaskId, BosId, EosId };
        foreach (var id in ids)
        {
            if (id == PadId) continue;
            int sid = id - _imageTokens;
            if (sid < 0 || sid >= _model.Pieces.Count) continue;   // image tokens or ids beyond the text vocabulary
            if (specials.Contains(id)) text.AppendSpecial(_model.Pieces[sid].Piece);
            else text.AppendPiece(sid);
        }
        return Postprocess(text.ToString());
    }

    /// <inheritdoc />
    public GlmChatFormat ChatFormat => GlmChatFormat.ChatGlm;

    /// <inheritdoc />
    public IReadOnlyList<int> BuildChatInput(string query, IReadOnlyList<MinLora.Glm.Generation.ChatTurn>? history, string? system = null) =>
        EncodePrompt(MinLora.Glm.Generation.GlmGeneration.BuildChatPrompt(query, history));

    /// <inheritdoc />
    public IReadOnlyList<int> ChatStopIds => new[] { EosId };

    /// <inheritdoc />
    public IReadOnlyList<int> EncodeText(string text) => EncodeToIds(text);

    /// <inheritdoc />
    public int LabelStart(IReadOnlyList<int> inputs, int sourceLength)
    {
        ArgumentNullException.ThrowIfNull(inputs);
        for (int i = 0; i < inputs.Count; i++) if (inputs[i] == BosId) return i;
        return inputs.Count;
    }

    /// <summary>Reverses <see cref="Preprocess(string)"/>.</summary>
    /// <param name="text">Decoded SentencePiece text.</param>
    /// <returns>The original text.</returns>
    public static string Postprocess(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var sb = new StringBuilder(text.Replace("<n>", "\n", StringComparison.Ordinal).Replace("<|tab|>", "\t", StringComparison.Ordinal));
        for (int n = 2; n <= MaxBlankLength; n++) sb.Replace($"<|blank_{n}|>", new string(' ', n));
        return sb.ToString();
    }

    /// <summary>The piece of an id (for inspection), or null.</summary>
    /// <param name="id">The id.</param>
    /// <returns>The piece.</returns>
    public string? IdToPiece(int id)
    {
        int sid = id - _imageTokens;
        return sid >= 0 && sid < _model.Pieces.Count ? _model.Pieces[sid].Piece : null;
    }
}
