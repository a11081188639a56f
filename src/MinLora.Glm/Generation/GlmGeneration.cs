using System.Runtime.CompilerServices;
using System.Text;
using System.Text.RegularExpressions;
using MinLora.Glm.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Generation;

/// <summary>
/// Text generation with ChatGLM-6B: batched left-padded prompts, the KV cache (each step costs one token's forward,
/// whatever the prompt length; every step's tensors are freed), greedy or top-k/top-p sampling, stop tokens and
/// strings, streaming and chat with history in ChatGLM's <c>[Round i]\n问：…\n答：</c> format.
/// </summary>
public static partial class GlmGeneration
{
    private static readonly Scalar One = 1; // a field, not a temporary (see GlmModules.SelfAttention)

    /// <summary>
    /// Generates continuations of model inputs (ids ending in <c>[gMASK] &lt;sop&gt;</c>, e.g. from
    /// <see cref="GlmTokenizer.EncodePrompt"/>), batched with left padding.
    /// </summary>
    /// <param name="model">The model (run in eval mode for the call).</param>
    /// <param name="inputs">One id list per sequence.</param>
    /// <param name="options">Generation settings; null: ChatGLM's chat defaults.</param>
    /// <param name="cancellationToken">Stops generation between steps.</param>
    /// <returns>The new tokens of each sequence and why it stopped.</returns>
    /// <exception cref="ArgumentException">No inputs, an empty input, an id outside the vocabulary, a prompt already at
    /// MaxLength, or <see cref="GenerationOptions.StopStrings"/> (text needs a tokenizer: use the text APIs).</exception>
    /// <exception cref="OperationCanceledException">Cancelled.</exception>
    public static IReadOnlyList<GeneratedSequence> Generate(this GlmForCausalLM model, IReadOnlyList<IReadOnlyList<int>> inputs, GenerationOptions? options = null, CancellationToken cancellationToken = default)
    {
        if (options?.StopStrings is { Count: > 0 })
            throw new ArgumentException("StopStrings are matched on decoded text, which the id API cannot produce: use GenerateText, GenerateStreamAsync or Chat (which take the tokenizer), or StopTokenIds here.", nameof(options));
        var rows = inputs?.Select(_ => new List<int>()).ToList() ?? throw new ArgumentNullException(nameof(inputs));
        var reasons = new FinishReason?[inputs.Count];
        foreach (var step in Steps(model, inputs, options ?? new GenerationOptions(), null, cancellationToken))
        {
            for (int r = 0; r < step.Tokens.Length; r++)
            {
                if (reasons[r] is not null) continue;
                if (step.Finished[r] is { } why) reasons[r] = why;
                else rows[r].Add(step.Tokens[r]);
            }
        }
        return rows.Select((t, r) => new GeneratedSequence(t, reasons[r] ?? FinishReason.Length)).ToList();
    }

    /// <summary>Generates text from a prompt (encoded with <see cref="GlmTokenizer.EncodePrompt"/>), cut before any stop string.</summary>
    /// <param name="model">The model.</param>
    /// <param name="tokenizer">The tokenizer.</param>
    /// <param name="prompt">The prompt text.</param>
    /// <param name="options">Generation settings.</param>
    /// <param name="cancellationToken">Stops generation between steps.</param>
    /// <returns>The generated text.</returns>
    public static string GenerateText(this GlmForCausalLM model, IGlmTextTokenizer tokenizer, string prompt, GenerationOptions? options = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        ArgumentNullException.ThrowIfNull(prompt);
        var sb = new StringBuilder();
        foreach (var piece in StreamText(model, tokenizer, tokenizer.EncodePrompt(prompt), options ?? new GenerationOptions(), cancellationToken)) sb.Append(piece);
        return sb.ToString();
    }

    /// <summary>
    /// Streams generated text: each item is the new text since the last one, yielded as soon as it decodes
    /// completely (a character split over several byte tokens is held back until it is whole).
    /// </summary>
    /// <param name="model">The model.</param>
    /// <param name="tokenizer">The tokenizer.</param>
    /// <param name="prompt">The prompt text.</param>
    /// <param name="options">Generation settings.</param>
    /// <param name="cancellationToken">Stops generation between steps.</param>
    /// <returns>Text pieces.</returns>
    public static IAsyncEnumerable<string> GenerateStreamAsync(this GlmForCausalLM model, IGlmTextTokenizer tokenizer, string prompt, GenerationOptions? options = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        ArgumentNullException.ThrowIfNull(prompt);
        return StreamAsync(StreamText(model, tokenizer, tokenizer.EncodePrompt(prompt), options ?? new GenerationOptions(), cancellationToken));
    }

    private static async IAsyncEnumerable<string> StreamAsync(IEnumerable<string> pieces)
    {
        foreach (var piece in pieces)
        {
            yield return piece;
            await Task.Yield();
        }
    }

    /// <summary>
    /// Answers <paramref name="query"/> in a conversation, as the model's own <c>chat()</c> does: the prompt in the
    /// tokenizer's <see cref="IGlmTextTokenizer.ChatFormat"/> (ChatGLM-6B's or ChatGLM2's rounds, ChatGLM3's role
    /// tokens), generation stopped by its <see cref="IGlmTextTokenizer.ChatStopIds"/> unless the options give stop ids,
    /// and ChatGLM's response post-processing.
    /// </summary>
    /// <param name="model">The model.</param>
    /// <param name="tokenizer">The tokenizer (<see cref="GlmTokenizer"/> or <see cref="ChatGlm2Tokenizer"/>).</param>
    /// <param name="query">The user's message.</param>
    /// <param name="history">Earlier turns (oldest first), or null.</param>
    /// <param name="options">Generation settings.</param>
    /// <param name="cancellationToken">Stops generation between steps.</param>
    /// <returns>The response and the history including this turn.</returns>
    public static (string Response, IReadOnlyList<ChatTurn> History) Chat(this GlmForCausalLM model, IGlmTextTokenizer tokenizer, string query, IReadOnlyList<ChatTurn>? history = null, GenerationOptions? options = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        ArgumentNullException.ThrowIfNull(query);
        var sb = new StringBuilder();
        foreach (var piece in StreamText(model, tokenizer, tokenizer.BuildChatInput(query, history), ChatOptions(tokenizer, options), cancellationToken)) sb.Append(piece);
        var response = ProcessResponse(sb.ToString());
        var turns = (history ?? Array.Empty<ChatTurn>()).Append(new ChatTurn(query, response)).ToList();
        return (response, turns);
    }

    /// <summary>Streams the answer to <paramref name="query"/> (raw text pieces; apply <see cref="ProcessResponse"/> to the whole).</summary>
    /// <param name="model">The model.</param>
    /// <param name="tokenizer">The tokenizer.</param>
    /// <param name="query">The user's message.</param>
    /// <param name="history">Earlier turns, or null.</param>
    /// <param name="options">Generation settings.</param>
    /// <param name="cancellationToken">Stops generation between steps.</param>
    /// <returns>Text pieces.</returns>
    public static IAsyncEnumerable<string> ChatStreamAsync(this GlmForCausalLM model, IGlmTextTokenizer tokenizer, string query, IReadOnlyList<ChatTurn>? history = null, GenerationOptions? options = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        ArgumentNullException.ThrowIfNull(query);
        return StreamAsync(StreamText(model, tokenizer, tokenizer.BuildChatInput(query, history), ChatOptions(tokenizer, options), cancellationToken));
    }

    private static GenerationOptions ChatOptions(IGlmTextTokenizer tokenizer, GenerationOptions? options)
    {
        options ??= new GenerationOptions();
        return options.StopTokenIds is null ? options with { StopTokenIds = tokenizer.ChatStopIds } : options;
    }

    /// <summary>ChatGLM-6B's chat prompt: the query alone without history, else <c>[Round i]\n问：{q}\n答：{r}\n</c> per turn (i from 0) and <c>[Round n]\n问：{query}\n答：</c>.</summary>
    /// <param name="query">The user's message.</param>
    /// <param name="history">Earlier turns.</param>
    /// <returns>The prompt text.</returns>
    public static string BuildChatPrompt(string query, IReadOnlyList<ChatTurn>? history)
    {
        ArgumentNullException.ThrowIfNull(query);
        if (history is null || history.Count == 0) return query;
        var sb = new StringBuilder();
        for (int i = 0; i < history.Count; i++) sb.Append($"[Round {i}]\n问：{history[i].Query}\n答：{history[i].Response}\n");
        sb.Append($"[Round {history.Count}]\n问：{query}\n答：");
        return sb.ToString();
    }

    /// <summary>ChatGLM-6B's <c>process_response</c>: trim, <c>[[训练时间]]</c> → 2023年, ASCII <c>, ! : ; ?</c> next to CJK characters → full-width.</summary>
    /// <param name="response">Raw generated text.</param>
    /// <returns>The response as ChatGLM shows it.</returns>
    public static string ProcessResponse(string response)
    {
        ArgumentNullException.ThrowIfNull(response);
        var r = response.Trim().Replace("[[训练时间]]", "2023年", StringComparison.Ordinal);
        foreach (var (ascii, full) in new[] { (",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？") })
        {
            var a = Regex.Escape(ascii);
            r = Regex.Replace(r, $"([\\u4e00-\\u9fff]){a}", $"$1{full}");
            r = Regex.Replace(r, $"{a}([\\u4e00-\\u9fff])", $"{full}$1");
        }
        return r;
    }

    private static IEnumerable<string> StreamText(GlmForCausalLM model, IGlmTextTokenizer tokenizer, IReadOnlyList<int> input, GenerationOptions options, CancellationToken ct)
    {
        var tokens = new List<int>();
        string emitted = "";
        string? stopCut = null;
        Func<int, IReadOnlyList<int>, bool>? stopString = options.StopStrings is { Count: > 0 } stops
            ? (_, newTokens) =>
            {
                var text = tokenizer.Decode(newTokens, true);
                foreach (var s in stops)
                {
                    int at = text.IndexOf(s, StringComparison.Ordinal);
                    if (at >= 0) { stopCut = text[..at]; return true; }
                }
                return false;
            }
        : null;
        foreach (var step in Steps(model, new[] { input }, options, stopString, ct))
        {
            if (step.Finished[0] is FinishReason.StopString)
            {
                if (stopCut!.Length > emitted.Length) yield return stopCut[emitted.Length..];
                yield break;
            }
            if (step.Finished[0] is not null) break;
            tokens.Add(step.Tokens[0]);
            var text = tokenizer.Decode(tokens, true);
            if (text.EndsWith('\uFFFD')) continue;               // an incomplete UTF-8 character: wait for its other bytes
            // Hold back a tail that could be the start of a stop string.
            var safe = text[..SafeLength(text, options.StopStrings)];
            if (safe.Length > emitted.Length && safe.StartsWith(emitted, StringComparison.Ordinal))
            {
                yield return safe[emitted.Length..];
                emitted = safe;
            }
        }
        var final = tokenizer.Decode(tokens, true);
        if (final.Length > emitted.Length && final.StartsWith(emitted, StringComparison.Ordinal)) yield return final[emitted.Length..];
    }

    /// <summary>The length of <paramref name="text"/> minus its longest suffix that begins a stop string.</summary>
    private static int SafeLength(string text, IReadOnlyList<string>? stops)
    {
        if (stops is null || stops.Count == 0) return text.Length;
        int hold = 0;
        foreach (var s in stops)
        {
            for (int n = Math.Min(s.Length - 1, text.Length); n > hold; n--)
            {
                if (text.AsSpan(text.Length - n).SequenceEqual(s.AsSpan(0, n))) { hold = n; break; }
            }
        }
        return text.Length - hold;
    }

    private sealed record Step(int[] Tokens, FinishReason?[] Finished);

    /// <summary>The decoding loop: yields each step's token per row and which rows finished at that step.</summary>
    private static IEnumerable<Step> Steps(GlmForCausalLM model, IReadOnlyList<IReadOnlyList<int>> inputs, GenerationOptions options, Func<int, IReadOnlyList<int>, bool>? stopString, CancellationToken ct)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(inputs);
        options.Validate();
        if (inputs.Count == 0) throw new ArgumentException("Give at least one input.", nameof(inputs));
        if (inputs.Any(i => i is null || i.Count == 0)) throw new ArgumentException("An input is empty.", nameof(inputs));
        var config = model.Config;
        bool v2 = config.Version == GlmVersion.ChatGlm2;
        for (int r = 0; r < inputs.Count; r++)
        {
            for (int i = 0; i < inputs[r].Count; i++)
            {
                if ((uint)inputs[r][i] >= (uint)config.ModelVocabSize)
                    throw new ArgumentException($"Input {r}, position {i}: token id {inputs[r][i]} is outside the vocabulary (0..{config.ModelVocabSize - 1}).", nameof(inputs));
            }
        }
        int batch = inputs.Count, length = inputs.Max(i => i.Count);
        if (length >= options.MaxLength) throw new ArgumentException($"The prompt ({length} tokens) already reaches MaxLength ({options.MaxLength}).", nameof(inputs));
        int budget = Math.Min(options.MaxNewTokens ?? int.MaxValue, options.MaxLength - length);
        var stopIds = new HashSet<int>(options.StopTokenIds ?? new[] { config.EosTokenId });
        var device = model.parameters().First().device;
        using var generator = new Generator((ulong)(options.Seed ?? Random.Shared.NextInt64(long.MaxValue)), CPU);

        bool wasTraining = model.training;
        model.eval();
        var sequences = inputs.Select(i => i.ToList()).ToList();
        var newTokens = inputs.Select(_ => new List<int>()).ToList();
        var done = new bool[batch];
        Tensor? mask = null, positions = null, stepMask = null, stepPositions = null, stepIds = null;
        GlmKvCache? cache = null;
        try
        {
            {
                var flat = new long[batch * length];
                for (int r = 0; r < batch; r++)
                {
                    int pad = length - inputs[r].Count;
                    for (int i = 0; i < length; i++) flat[r * length + i] = i < pad ? config.PadTokenId : inputs[r][i - pad];
                }
                stepIds = tensor(flat, new long[] { batch, length }, device: device);
                if (v2)
                {
                    // v2 (ChatGLM2/3, GLM-4): a padding mask [b, total] (1 = token) and positions 0… per row after its padding.
                    var padding = new long[batch * length];
                    var pos = new long[batch * length];
                    for (int r = 0; r < batch; r++)
                    {
                        int pad = length - inputs[r].Count;
                        for (int i = pad; i < length; i++)
                        {
                            padding[r * length + i] = 1;
                            pos[r * length + i] = i - pad;
                        }
                    }
                    mask = tensor(padding, new long[] { batch, length }, device: device);
                    positions = tensor(pos, new long[] { batch, length }, device: device);
                }
                else
                {
                    mask = GlmMasks.BuildAttentionMask(stepIds, config);
                    positions = GlmMasks.BuildPositionIds(stepIds, config);
                }
            }
            stepMask = mask;
            stepPositions = positions;
            for (int step = 0; step < budget; step++)
            {
                ct.ThrowIfCancellationRequested();
                int[] next;
                using (var scope = NewDisposeScope())
                using (no_grad())
                {
                    using var output = model.call(new GlmInput(stepIds) { AttentionMask = stepMask, PositionIds = stepPositions, PastKeyValues = cache, UseCache = true, LogitsToKeep = 1 });
                    cache?.Dispose();
                    cache = output.PresentKeyValues;
                    var last = output.Logits.select(1, -1);
                    next = LogitsProcessing.NextTokens(last, sequences, options, generator);
                }
                stepIds!.Dispose();
                stepIds = null;
                var finished = new FinishReason?[batch];
                for (int r = 0; r < batch; r++)
                {
                    if (done[r]) { finished[r] = null; continue; }
                    if (stopIds.Contains(next[r])) { finished[r] = FinishReason.StopToken; done[r] = true; continue; }
                    sequences[r].Add(next[r]);
                    newTokens[r].Add(next[r]);
                    if (stopString is not null && stopString(r, newTokens[r])) { finished[r] = FinishReason.StopString; done[r] = true; }
                }
                yield return new Step(next, finished);
                if (done.All(d => d)) yield break;

                // Feed the new tokens (finished rows feed pad; their outputs are ignored).
                var fed = next.Select((t, r) => done[r] ? (long)config.PadTokenId : t).ToArray();
                stepIds = tensor(fed, new long[] { batch, 1 }, device: device);
                var newMask = v2 ? cat(new[] { mask, ones(batch, 1, dtype: mask.dtype, device: device) }, 1) : GlmMasks.AppendTokenToMask(mask);
                var newPositions = v2 ? cat(new[] { positions, positions.narrow(1, positions.shape[1] - 1, 1).add(One) }, 1) : GlmMasks.AppendTokenToPositions(positions);
                if (!ReferenceEquals(stepMask, mask)) stepMask.Dispose();
                if (!ReferenceEquals(stepPositions, positions)) stepPositions.Dispose();
                mask.Dispose();
                positions.Dispose();
                mask = newMask;
                positions = newPositions;
                stepMask = v2 ? mask : mask.narrow(2, mask.shape[2] - 1, 1);
                stepPositions = v2 ? positions.narrow(1, positions.shape[1] - 1, 1) : positions.narrow(2, positions.shape[2] - 1, 1);
            }
        }
        finally
        {
            cache?.Dispose();
            stepIds?.Dispose();
            if (!ReferenceEquals(stepMask, mask)) stepMask?.Dispose();
            if (!ReferenceEquals(stepPositions, positions)) stepPositions?.Dispose();
            mask?.Dispose();
            positions?.Dispose();
            if (wasTraining) model.train();
        }
    }
}
