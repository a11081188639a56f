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

    /// <summary>The ids of plain text (no special tokens), as a fine-tuning source or answer is encoded.</summary>
    /// <param name="text">The text.</param>
    /// <returns>The ids.</returns>
    IReadOnlyList<int> EncodeText(string text);

    /// <summary>The model input for a source (and, for training, an answer) in this generation's layout.</summary>
    /// <param name="source">Source ids.</param>
    /// <param name="answer">Answer ids, or null.</param>
    /// <returns>The ids.</returns>
    IReadOnlyList<int> BuildInputs(IReadOnlyList<int> source, IReadOnlyList<int>? answer = null);

    /// <summary>
    /// The first position whose label counts in a training sequence built by <see cref="BuildInputs"/> (earlier
    /// labels are −100): ChatGLM-6B labels from its <c>&lt;sop&gt;</c> on (the book's and the reference's convention),
    /// ChatGLM2/3 and GLM-4 from the answer on (their fine-tuning scripts).
    /// </summary>
    /// <param name="inputs">The training sequence.</param>
    /// <param name="sourceLength">The number of source ids in it.</param>
    /// <returns>The index.</returns>
    int LabelStart(IReadOnlyList<int> inputs, int sourceLength);
}
