using System.Buffers;
using System.Text;
using Microsoft.ML.Tokenizers;

namespace MinLora.Glm.Tokenization;

/// <summary>
/// ChatGLM2-6B's and ChatGLM3-6B's tokenizer (<c>tokenization_chatglm.py</c> of those models + <c>tokenizer.model</c>):
/// a SentencePiece model (BPE) encoded exactly as SentencePiece encodes it, with the special tokens appended after its
/// pieces — <c>[MASK]</c>, <c>[gMASK]</c>, <c>[sMASK]</c>, <c>sop</c>, <c>eop</c>, then ChatGLM3's role tokens
/// <c>&lt;|system|&gt;</c>, <c>&lt;|user|&gt;</c>, <c>&lt;|assistant|&gt;</c>, <c>&lt;|observation|&gt;</c> — and
/// model inputs that start with <c>[gMASK] sop</c>. No text preprocessing (unlike ChatGLM-6B's). A Microsoft.ML.Tokenizers
/// <see cref="Tokenizer"/>.
/// </summary>
public sealed class ChatGlm2Tokenizer : Tokenizer, IGlmTextTokenizer
{
    private static readonly string[] SpecialTokens = { "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>" };

    private readonly IPieceEncoder _encoder;
    private readonly SentencePieceModel _model;

    private ChatGlm2Tokenizer(SentencePieceModel model, GlmChatFormat format)
    {
        _model = model;
        ChatFormat = format;
        _encoder = model.ModelType == 2 ? new BpeEncoder(model) : new UnigramEncoder(model);
        int n = model.Pieces.Count;
        MaskId = n;
        GmaskId = n + 1;
        SmaskId = n + 2;
        SopId = n + 3;
        EopId = n + 4;
        SystemId = n + 5;
        UserId = n + 6;
        AssistantId = n + 7;
        ObservationId = n + 8;
        int Find(PieceType type, int fallback)
        {
            for (int i = 0; i < n; i++) if (model.Pieces[i].Type == type) return i;
            return fallback;
        }
        UnkId = Find(PieceType.Unknown, 0);
        BosId = model.IdOf("<s>");
        EosId = model.IdOf("</s>");
    }

    /// <summary><c>[MASK]</c>.</summary>
    public int MaskId { get; }

    /// <summary><c>[gMASK]</c> (the first id of every model input).</summary>
    public int GmaskId { get; }

    /// <summary><c>[sMASK]</c>.</summary>
    public int SmaskId { get; }

    /// <summary><c>sop</c> (the second id of every model input).</summary>
    public int SopId { get; }

    /// <summary><c>eop</c>.</summary>
    public int EopId { get; }

    /// <summary>ChatGLM3's <c>&lt;|system|&gt;</c>.</summary>
    public int SystemId { get; }

    /// <summary>ChatGLM3's <c>&lt;|user|&gt;</c> (generation stops on it).</summary>
    public int UserId { get; }

    /// <summary>ChatGLM3's <c>&lt;|assistant|&gt;</c>.</summary>
    public int AssistantId { get; }

    /// <summary>ChatGLM3's <c>&lt;|observation|&gt;</c> (generation stops on it).</summary>
    public int ObservationId { get; }

    /// <summary>The SentencePiece <c>&lt;unk&gt;</c>, also the padding id (as the reference).</summary>
    public int UnkId { get; }

    /// <summary>The padding id (the reference pads with <c>&lt;unk&gt;</c>'s id).</summary>
    public int PadId => UnkId;

    /// <summary>SentencePiece's <c>&lt;s&gt;</c> (−1 if none).</summary>
    public int BosId { get; }

    /// <summary>SentencePiece's <c>&lt;/s&gt;</c>: the model's eos (−1 if none).</summary>
    public int EosId { get; }

    /// <summary>Pieces plus the special tokens.</summary>
    public int VocabSize => _model.Pieces.Count + SpecialTokens.Length;

    /// <summary>The SentencePiece model's pieces.</summary>
    public SentencePieceModel Model => _model;

    /// <summary>Loads <c>tokenizer.model</c> from a checkpoint directory.</summary>
    /// <param name="directory">The directory.</param>
    /// <returns>The tokenizer.</returns>
    /// <exception cref="FileNotFoundException">No <c>tokenizer.model</c>.</exception>
    /// <exception cref="InvalidDataException">A malformed model.</exception>
    public static ChatGlm2Tokenizer FromPretrained(string directory)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(directory);
        var path = Path.Combine(directory, "tokenizer.model");
        if (!File.Exists(path)) throw new FileNotFoundException($"No tokenizer.model in '{directory}'.", path);
        // ChatGLM3's tokenizer_config.json names chatglm3 (its name_or_path / auto_map) or carries a chat template.
        var format = GlmChatFormat.ChatGlm2;
        var config = Path.Combine(directory, "tokenizer_config.json");
        if (File.Exists(config))
        {
            var text = File.ReadAllText(config);
            if (text.Contains("chatglm3", StringComparison.OrdinalIgnoreCase) || text.Contains("\"chat_template\"", StringComparison.Ordinal)) format = GlmChatFormat.ChatGlm3;
        }
        using var stream = File.OpenRead(path);
        return Create(stream, format);
    }

    /// <summary>Creates the tokenizer from a SentencePiece model stream.</summary>
    /// <param name="modelStream">The <c>.model</c> content (read to the end; not disposed).</param>
    /// <returns>The tokenizer.</returns>
    /// <exception cref="InvalidDataException">Not a SentencePiece Unigram or BPE model.</exception>
    /// <param name="chatFormat">ChatGLM2's or ChatGLM3's chat prompt format.</param>
    public static ChatGlm2Tokenizer Create(Stream modelStream, GlmChatFormat chatFormat = GlmChatFormat.ChatGlm2)
    {
        if (chatFormat == GlmChatFormat.ChatGlm) throw new ArgumentException("ChatGLM-6B's format belongs to GlmTokenizer.", nameof(chatFormat));
        ArgumentNullException.ThrowIfNull(modelStream);
        using var buffer = new MemoryStream();
        modelStream.CopyTo(buffer);
        var model = SentencePieceModel.Parse(buffer.ToArray());
        if (model.ModelType is not (1 or 2)) throw new InvalidDataException($"The SentencePiece model is of type {model.ModelType}, neither Unigram (1) nor BPE (2).");
        return new ChatGlm2Tokenizer(model, chatFormat);
    }

    /// <inheritdoc />
    public GlmChatFormat ChatFormat { get; }

    /// <inheritdoc />
    public IReadOnlyList<int> EncodeText(string text) => EncodeToIds(text);

    /// <inheritdoc />
    public int LabelStart(IReadOnlyList<int> inputs, int sourceLength) => Math.Min(inputs?.Count ?? 0, 2 + sourceLength);

    /// <inheritdoc />
    public IReadOnlyList<int> ChatStopIds => ChatFormat == GlmChatFormat.ChatGlm3 ? new[] { EosId, UserId, ObservationId } : new[] { EosId };

    /// <summary>
    /// ChatGLM2: <c>[gMASK] sop</c> + <c>"[Round i]\n\n问：{q}\n\n答：{r}\n\n"</c> per turn from i = 1, then the query's round
    /// ending in <c>答：</c>. ChatGLM3: <c>[gMASK] sop</c>, then per message its role token, the encoding of "\n" and the
    /// content, ending with <c>&lt;|assistant|&gt;</c> (the reference's <c>build_chat_input</c>).
    /// </summary>
    /// <param name="query">The user's message.</param>
    /// <param name="history">Earlier turns, or null.</param>
    /// <param name="system">ChatGLM3's system prompt, or null.</param>
    /// <returns>The ids.</returns>
    public IReadOnlyList<int> BuildChatInput(string query, IReadOnlyList<MinLora.Glm.Generation.ChatTurn>? history, string? system = null)
    {
        ArgumentNullException.ThrowIfNull(query);
        if (ChatFormat == GlmChatFormat.ChatGlm2)
        {
            var sb = new StringBuilder();
            int round = 1;
            foreach (var turn in history ?? Array.Empty<MinLora.Glm.Generation.ChatTurn>())
                sb.Append($"[Round {round++}]\n\n问：{turn.Query}\n\n答：{turn.Response}\n\n");
            sb.Append($"[Round {round}]\n\n问：{query}\n\n答：");
            return EncodePrompt(sb.ToString());
        }
        var ids = new List<int> { GmaskId, SopId };
        void Message(int role, string content)
        {
            ids.Add(role);
            ids.AddRange(EncodeToIds("\n"));
            ids.AddRange(EncodeToIds(content));
        }
        if (!string.IsNullOrEmpty(system)) Message(SystemId, system);
        foreach (var turn in history ?? Array.Empty<MinLora.Glm.Generation.ChatTurn>())
        {
            Message(UserId, turn.Query);
            Message(AssistantId, turn.Response);
        }
        Message(UserId, query);
        ids.Add(AssistantId);
        return ids;
    }

    /// <summary>The SentencePiece ids of <paramref name="text"/> (no special tokens); each invalid UTF-16 code unit becomes one U+FFFD.</summary>
    /// <param name="text">The text.</param>
    /// <returns>The ids.</returns>
    public IReadOnlyList<int> EncodeToIds(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var ids = new List<int>(text.Length);
        _encoder.Encode(Utf8.Encode(text), ids, null);
        return ids;
    }

    /// <summary>The model input: <c>[gMASK] sop prompt</c> (and, for training, <c>answer eos</c>).</summary>
    /// <param name="prompt">Prompt ids.</param>
    /// <param name="answer">Answer ids, or null.</param>
    /// <returns>The ids.</returns>
    public IReadOnlyList<int> BuildInputs(IReadOnlyList<int> prompt, IReadOnlyList<int>? answer = null)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        var ids = new List<int>(prompt.Count + 3 + (answer?.Count ?? 0)) { GmaskId, SopId };
        ids.AddRange(prompt);
        if (answer is not null)
        {
            ids.AddRange(answer);
            ids.Add(EosId);
        }
        return ids;
    }

    /// <summary><see cref="EncodeToIds(string)"/> then <see cref="BuildInputs"/>.</summary>
    /// <param name="prompt">The prompt text.</param>
    /// <returns>The ids.</returns>
    public IReadOnlyList<int> EncodePrompt(string prompt) => BuildInputs(EncodeToIds(prompt));

    /// <summary>
    /// Decodes ids as SentencePiece does (pieces joined, byte pieces as UTF-8, <c>▁</c> as space, the dummy-prefix space
    /// removed); special tokens are dropped, or written out when <paramref name="skipSpecialTokens"/> is false.
    /// </summary>
    /// <param name="ids">The ids.</param>
    /// <param name="skipSpecialTokens">Drop the special and control tokens.</param>
    /// <returns>The text.</returns>
    public string Decode(IEnumerable<int> ids, bool skipSpecialTokens)
    {
        ArgumentNullException.ThrowIfNull(ids);
        var text = new PieceText(_model, skipSpecialTokens);
        foreach (var id in ids)
        {
            if (id >= _model.Pieces.Count)
            {
                int special = id - _model.Pieces.Count;
                text.AppendSpecial(special < SpecialTokens.Length ? SpecialTokens[special] : "");
                continue;
            }
            if (id >= 0) text.AppendPiece(id);
        }
        return text.ToString();
    }

    /// <inheritdoc />
    public override string Decode(IEnumerable<int> ids) => Decode(ids, skipSpecialTokens: true);

    /// <inheritdoc />
    protected override EncodeResults<EncodedToken> EncodeToTokens(string? text, ReadOnlySpan<char> textSpan, EncodeSettings settings)
    {
        var source = text ?? textSpan.ToString();
        var charOfByte = new List<int>(source.Length * 2 + 1);
        var utf8 = Utf8.Encode(source, charOfByte);
        var ids = new List<int>();
        var spans = new List<(int Start, int End)>();
        _encoder.Encode(utf8, ids, spans);
        var tokens = new List<EncodedToken>(ids.Count);
        for (int i = 0; i < ids.Count; i++)
        {
            int start = charOfByte[spans[i].Start], end = charOfByte[spans[i].End];
            tokens.Add(new EncodedToken(ids[i], _model.Pieces[ids[i]].Piece, new Range(start, Math.Max(start, end))));
        }
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
}
