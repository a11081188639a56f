using MinLora.Glm.Generation;

namespace MinLora.Glm.Tokenization;

/// <summary>The chat prompt format of a GLM generation.</summary>
public enum GlmChatFormat
{
    /// <summary>ChatGLM-6B: <c>[Round i]\n问：{q}\n答：{r}\n</c> from round 0 (the query alone without history).</summary>
    ChatGlm,
    /// <summary>ChatGLM2-6B: <c>[Round i]\n\n问：{q}\n\n答：{r}\n\n</c> from round 1.</summary>
    ChatGlm2,
    /// <summary>ChatGLM3-6B: role tokens, <c>&lt;|system|&gt;\n…&lt;|user|&gt;\n{q}&lt;|assistant|&gt;</c>.</summary>
    ChatGlm3,
}

/// <summary>What the text generation and chat APIs need from a GLM tokenizer (ChatGLM-6B's or ChatGLM2/3's).</summary>
public interface IGlmTextTokenizer
{
    /// <summary>The model input that continues <paramref name="prompt"/> (special prefix/suffix tokens included).</summary>
    /// <param name="prompt">The prompt text.</param>
    /// <returns>The ids.</returns>
    IReadOnlyList<int> EncodePrompt(string prompt);

    /// <summary>Text of <paramref name="ids"/>.</summary>
    /// <param name="ids">The ids.</param>
    /// <param name="skipSpecialTokens">Drop special tokens.</param>
    /// <returns>The text.</returns>
    string Decode(IEnumerable<int> ids, bool skipSpecialTokens);

    /// <summary>The chat format the tokenizer's model was trained with.</summary>
    GlmChatFormat ChatFormat { get; }

    /// <summary>The model input of a chat turn in <see cref="ChatFormat"/>.</summary>
    /// <param name="query">The user's message.</param>
    /// <param name="history">Earlier turns (oldest first), or null.</param>
    /// <param name="system">A system prompt (ChatGLM3 only; ignored otherwise), or null.</param>
    /// <returns>The ids.</returns>
    IReadOnlyList<int> BuildChatInput(string query, IReadOnlyList<ChatTurn>? history, string? system = null);

    /// <summary>Ids that end a chat answer (the eos, and ChatGLM3's <c>&lt;|user|&gt;</c> and <c>&lt;|observation|&gt;</c>).</summary>
    IReadOnlyList<int> ChatStopIds { get; }
}
