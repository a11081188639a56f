using System.Text;
using System.Text.RegularExpressions;
using Microsoft.ML.Tokenizers;
using MinLora.Glm.Generation;

namespace MinLora.Glm.Tokenization;

/// <summary>
/// GLM-4's tokenizer: byte-level BPE over <c>tokenizer.model</c> (one base64 token and its rank per line, tiktoken's
/// format) on Microsoft.ML.Tokenizers' <see cref="TiktokenTokenizer"/>, with GLM-4's pre-tokenizer pattern and its
/// special tokens numbered after the ranks (<c>&lt;|endoftext|&gt;</c>, <c>[MASK]</c>, <c>[gMASK]</c>, <c>[sMASK]</c>,
/// <c>&lt;sop&gt;</c>, <c>&lt;eop&gt;</c>, the role tokens, image and video markers). Model inputs start with
/// <c>[gMASK] &lt;sop&gt;</c>; chat uses the role-token template.
/// </summary>
public sealed class Glm4Tokenizer : IGlmTextTokenizer
{
    /// <summary>GLM-4's pre-tokenizer pattern (tokenization_chatglm.py).</summary>
    public const string Pattern = @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    private static readonly string[] Specials =
    {
        "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
        "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    };

    private readonly Dictionary<string, int> _special;

    private Glm4Tokenizer(TiktokenTokenizer inner, int ranks, Dictionary<string, int> special)
    {
        Inner = inner;
        RankCount = ranks;
        _special = special;
    }

    /// <summary>The underlying Microsoft.ML.Tokenizers tokenizer (for counting, trimming and other generic uses).</summary>
    public Tokenizer Inner { get; }

    /// <summary>Number of ordinary (ranked) tokens; the specials follow.</summary>
    public int RankCount { get; }

    /// <summary>Ordinary tokens plus specials.</summary>
    public int VocabSize => RankCount + Specials.Length;

    /// <summary>The id of a special token such as <c>[gMASK]</c> or <c>&lt;|user|&gt;</c>.</summary>
    /// <param name="token">The special token.</param>
    /// <returns>Its id.</returns>
    /// <exception cref="KeyNotFoundException">Not one of GLM-4's specials.</exception>
    public int SpecialId(string token) => _special.TryGetValue(token, out var id) ? id : throw new KeyNotFoundException($"'{token}' is not a GLM-4 special token.");

    /// <inheritdoc />
    public GlmChatFormat ChatFormat => GlmChatFormat.ChatGlm3;

    /// <summary>Loads <c>tokenizer.model</c> (tiktoken format) from a GLM-4 checkpoint directory.</summary>
    /// <param name="directory">The directory.</param>
    /// <returns>The tokenizer.</returns>
    /// <exception cref="FileNotFoundException">No <c>tokenizer.model</c>.</exception>
    /// <exception cref="InvalidDataException">Not a tiktoken ranks file.</exception>
    public static Glm4Tokenizer FromPretrained(string directory)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(directory);
        var path = Path.Combine(directory, "tokenizer.model");
        if (!File.Exists(path)) throw new FileNotFoundException($"No tokenizer.model in '{directory}'.", path);
        using var stream = File.OpenRead(path);
        return Create(stream);
    }

    /// <summary>Creates the tokenizer from a ranks stream (one <c>base64 rank</c> per line).</summary>
    /// <param name="ranks">The stream (read to the end; not disposed).</param>
    /// <returns>The tokenizer.</returns>
    /// <exception cref="InvalidDataException">Not a tiktoken ranks file.</exception>
    public static Glm4Tokenizer Create(Stream ranks)
    {
        ArgumentNullException.ThrowIfNull(ranks);
        using var buffer = new MemoryStream();
        ranks.CopyTo(buffer);
        int count = 0;
        using (var reader = new StreamReader(new MemoryStream(buffer.ToArray()), Encoding.UTF8))
        {
            string? line;
            int number = 0;
            while ((line = reader.ReadLine()) is not null)
            {
                number++;
                if (line.Length == 0) continue;
                int space = line.IndexOf(' ', StringComparison.Ordinal);
                if (space <= 0 || !int.TryParse(line.AsSpan(space + 1), System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int rank))
                    throw new InvalidDataException($"tokenizer.model line {number} is not 'base64 rank': not a GLM-4 (tiktoken) tokenizer.");
                count = Math.Max(count, rank + 1);
            }
        }
        if (count == 0) throw new InvalidDataException("tokenizer.model holds no tokens.");
        var special = new Dictionary<string, int>(StringComparer.Ordinal);
        for (int i = 0; i < Specials.Length; i++) special[Specials[i]] = count + i;
        TiktokenTokenizer inner;
        try
        {
            var pre = new RegexPreTokenizer(new Regex(Pattern, RegexOptions.Compiled), special);
            inner = TiktokenTokenizer.Create(new MemoryStream(buffer.ToArray()), pre, null, special);
        }
        catch (Exception ex) when (ex is FormatException or ArgumentException or InvalidOperationException)
        {
            throw new InvalidDataException($"tokenizer.model cannot be read as tiktoken ranks: {ex.Message}", ex);
        }
        return new Glm4Tokenizer(inner, count, special);
    }

    /// <summary>The ids of <paramref name="text"/> (text spelling a special token, e.g. <c>&lt;|user|&gt;</c>, becomes that token).</summary>
    /// <param name="text">The text.</param>
    /// <returns>The ids.</returns>
    public IReadOnlyList<int> EncodeToIds(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        return Inner.EncodeToIds(text);
    }

    /// <inheritdoc />
    public IReadOnlyList<int> EncodePrompt(string prompt) => BuildInputs(EncodeToIds(prompt));

    /// <inheritdoc />
    public IReadOnlyList<int> EncodeText(string text) => EncodeToIds(text);

    /// <summary>The model input: <c>[gMASK] &lt;sop&gt; source</c> (and, for training, <c>answer &lt;|endoftext|&gt;</c>).</summary>
    /// <param name="source">Source ids.</param>
    /// <param name="answer">Answer ids, or null.</param>
    /// <returns>The ids.</returns>
    public IReadOnlyList<int> BuildInputs(IReadOnlyList<int> source, IReadOnlyList<int>? answer = null)
    {
        ArgumentNullException.ThrowIfNull(source);
        var ids = new List<int> { SpecialId("[gMASK]"), SpecialId("<sop>") };
        ids.AddRange(source);
        if (answer is not null)
        {
            ids.AddRange(answer);
            ids.Add(SpecialId("<|endoftext|>"));
        }
        return ids;
    }

    /// <inheritdoc />
    public int LabelStart(IReadOnlyList<int> inputs, int sourceLength) => Math.Min(inputs?.Count ?? 0, 2 + sourceLength);

    /// <inheritdoc />
    public string Decode(IEnumerable<int> ids, bool skipSpecialTokens)
    {
        ArgumentNullException.ThrowIfNull(ids);
        var sb = new StringBuilder();
        var run = new List<int>();
        void Flush()
        {
            if (run.Count == 0) return;
            sb.Append(Inner.Decode(run));
            run.Clear();
        }
        foreach (var id in ids)
        {
            if (id >= RankCount)
            {
                Flush();
                int s = id - RankCount;
                if (!skipSpecialTokens && s < Specials.Length) sb.Append(Specials[s]);
                continue;
            }
            if (id >= 0) run.Add(id);
        }
        Flush();
        return sb.ToString();
    }

    /// <summary>
    /// GLM-4's chat template: <c>[gMASK] &lt;sop&gt;</c>, then per message its role token and the encoding of
    /// <c>"\n" + content</c>, ending with <c>&lt;|assistant|&gt;</c>.
    /// </summary>
    /// <param name="query">The user's message.</param>
    /// <param name="history">Earlier turns, or null.</param>
    /// <param name="system">A system prompt, or null.</param>
    /// <returns>The ids.</returns>
    public IReadOnlyList<int> BuildChatInput(string query, IReadOnlyList<ChatTurn>? history, string? system = null)
    {
        ArgumentNullException.ThrowIfNull(query);
        var ids = new List<int> { SpecialId("[gMASK]"), SpecialId("<sop>") };
        void Message(string role, string content)
        {
            ids.Add(SpecialId(role));
            ids.AddRange(EncodeToIds("\n" + content));
        }
        if (!string.IsNullOrEmpty(system)) Message("<|system|>", system);
        foreach (var turn in history ?? Array.Empty<ChatTurn>())
        {
            Message("<|user|>", turn.Query);
            Message("<|assistant|>", turn.Response);
        }
        Message("<|user|>", query);
        ids.Add(SpecialId("<|assistant|>"));
        return ids;
    }

    /// <inheritdoc />
    public IReadOnlyList<int> ChatStopIds => new[] { SpecialId("<|endoftext|>"), SpecialId("<|user|>"), SpecialId("<|observation|>") };
}

/// <summary>Picks the tokenizer a GLM checkpoint directory needs.</summary>
public static class GlmTokenizers
{
    /// <summary>
    /// <c>ice_text.model</c> → <see cref="GlmTokenizer"/> (ChatGLM-6B); <c>tokenizer.model</c> in SentencePiece's format →
    /// <see cref="ChatGlm2Tokenizer"/> (ChatGLM2/3); <c>tokenizer.model</c> of <c>base64 rank</c> lines →
    /// <see cref="Glm4Tokenizer"/> (GLM-4).
    /// </summary>
    /// <param name="directory">The checkpoint directory.</param>
    /// <returns>The tokenizer.</returns>
    /// <exception cref="FileNotFoundException">Neither file is there.</exception>
    /// <exception cref="InvalidDataException">A malformed tokenizer file.</exception>
    public static IGlmTextTokenizer FromPretrained(string directory)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(directory);
        if (File.Exists(Path.Combine(directory, "ice_text.model"))) return GlmTokenizer.FromPretrained(directory);
        var path = Path.Combine(directory, "tokenizer.model");
        if (!File.Exists(path)) throw new FileNotFoundException($"No ice_text.model or tokenizer.model in '{directory}'.", path);
        string? first;
        using (var reader = new StreamReader(path, Encoding.UTF8)) first = reader.ReadLine();
        bool tiktoken = first is not null && Regex.IsMatch(first, @"^[A-Za-z0-9+/]+=*\s+\d+$");
        return tiktoken ? Glm4Tokenizer.FromPretrained(directory) : ChatGlm2Tokenizer.FromPretrained(directory);
    }
}
