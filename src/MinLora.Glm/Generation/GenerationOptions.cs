namespace MinLora.Glm.Generation;

/// <summary>How text is generated. The defaults are ChatGLM-6B's <c>chat()</c> defaults (sampling, top-p 0.7, temperature 0.95).</summary>
public sealed record GenerationOptions
{
    /// <summary>Most new tokens to generate (null: limited by <see cref="MaxLength"/> only).</summary>
    /// <value>The default value is 256.</value>
    public int? MaxNewTokens { get; init; } = 256;

    /// <summary>Longest total sequence, prompt included (ChatGLM's <c>max_length</c>).</summary>
    /// <value>The default value is 2048.</value>
    public int MaxLength { get; init; } = 2048;

    /// <summary>Sample (true) or take the most likely token (false: greedy).</summary>
    /// <value>The default value is true.</value>
    public bool DoSample { get; init; } = true;

    /// <summary>Softmax temperature (sampling only: positive when sampling; ignored, and 0 allowed, for greedy decoding, as Hugging Face does).</summary>
    /// <value>The default value is 0.95.</value>
    public double Temperature { get; init; } = 0.95;

    /// <summary>Keep only the k most likely tokens before sampling (0: off).</summary>
    public int TopK { get; init; }

    /// <summary>Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches p (1: off).</summary>
    /// <value>The default value is 0.7.</value>
    public double TopP { get; init; } = 0.7;

    /// <summary>Hugging Face's repetition penalty: logits of tokens already in the sequence are divided (if positive) or multiplied (if negative) by it (1: off).</summary>
    /// <value>The default value is 1.</value>
    public double RepetitionPenalty { get; init; } = 1.0;

    /// <summary>Token ids that end a sequence (null: the model's <c>&lt;eop&gt;</c>).</summary>
    public IReadOnlyList<int>? StopTokenIds { get; init; }

    /// <summary>Strings that end a sequence when they appear in the generated text (the text is cut before them).</summary>
    public IReadOnlyList<string>? StopStrings { get; init; }

    /// <summary>Seed of the sampler, for reproducible sampling (null: a random seed).</summary>
    public long? Seed { get; init; }

    /// <summary>
    /// ChatGLM's invalid-score guard: when logits contain NaN or ±Inf they are replaced by zeros with 5·10⁴ on this id
    /// (ChatGLM-6B's <c>InvalidScoreLogitsProcessor</c> uses 5). Null disables the guard.
    /// </summary>
    /// <value>The default value is 5.</value>
    public int? InvalidScoreTokenId { get; init; } = 5;

    /// <summary>Checks the values.</summary>
    /// <exception cref="ArgumentOutOfRangeException">A value out of range, named.</exception>
    public void Validate()
    {
        if (MaxNewTokens is { } n && n <= 0) throw new ArgumentOutOfRangeException(nameof(MaxNewTokens), n, "Must be positive.");
        if (MaxLength <= 0) throw new ArgumentOutOfRangeException(nameof(MaxLength), MaxLength, "Must be positive.");
        if (DoSample ? !(Temperature > 0) || double.IsInfinity(Temperature) : !(Temperature >= 0) || double.IsInfinity(Temperature))
            throw new ArgumentOutOfRangeException(nameof(Temperature), Temperature, DoSample ? "Must be positive and finite when sampling." : "Must be finite and not negative.");
        if (TopK < 0) throw new ArgumentOutOfRangeException(nameof(TopK), TopK, "Must be 0 (off) or positive.");
        if (!(TopP > 0 && TopP <= 1)) throw new ArgumentOutOfRangeException(nameof(TopP), TopP, "Must be in (0, 1].");
        if (!(RepetitionPenalty > 0) || double.IsInfinity(RepetitionPenalty)) throw new ArgumentOutOfRangeException(nameof(RepetitionPenalty), RepetitionPenalty, "Must be positive and finite.");
    }
}

/// <summary>Why a sequence stopped.</summary>
public enum FinishReason
{
    /// <summary>A stop token was generated.</summary>
    StopToken,
    /// <summary>A stop string appeared.</summary>
    StopString,
    /// <summary>The token limit was reached.</summary>
    Length,
    /// <summary>Generation was cancelled.</summary>
    Cancelled,
}

/// <summary>One generated sequence.</summary>
/// <param name="TokenIds">The new tokens (without the stop token).</param>
/// <param name="Reason">Why it stopped.</param>
public sealed record GeneratedSequence(IReadOnlyList<int> TokenIds, FinishReason Reason);

/// <summary>A chat turn.</summary>
/// <param name="Query">The user's message.</param>
/// <param name="Response">The model's answer.</param>
public sealed record ChatTurn(string Query, string Response);
