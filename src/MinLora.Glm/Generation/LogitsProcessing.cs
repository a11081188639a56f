using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Generation;

/// <summary>The logits transformations and samplers of generation, each on [batch, vocab] float tensors.</summary>
public static class LogitsProcessing
{
    /// <summary>ChatGLM's invalid-score guard: rows with NaN or ±Inf become zeros with 5·10⁴ at <paramref name="tokenId"/>.</summary>
    /// <param name="logits">[batch, vocab].</param>
    /// <param name="tokenId">The id that gets the large score.</param>
    /// <returns>New logits.</returns>
    public static Tensor ReplaceInvalid(Tensor logits, int tokenId)
    {
        ArgumentNullException.ThrowIfNull(logits);
        using var scope = NewDisposeScope();
        var bad = isfinite(logits).logical_not().any(1, keepdim: true);          // [b, 1]
        if (!bad.any().item<bool>()) return logits.clone().MoveToOuterDisposeScope();
        var replacement = zeros_like(logits);
        replacement[TensorIndex.Colon, tokenId] = 5e4f;
        return where(bad, replacement, logits).MoveToOuterDisposeScope();
    }

    /// <summary>Hugging Face's repetition penalty: for tokens already in each row's sequence, positive logits are divided and negative ones multiplied by <paramref name="penalty"/>.</summary>
    /// <param name="logits">[batch, vocab].</param>
    /// <param name="sequences">Each row's tokens so far.</param>
    /// <param name="penalty">The penalty (1: no change).</param>
    /// <returns>New logits.</returns>
    public static Tensor ApplyRepetitionPenalty(Tensor logits, IReadOnlyList<IReadOnlyList<int>> sequences, double penalty)
    {
        ArgumentNullException.ThrowIfNull(logits);
        ArgumentNullException.ThrowIfNull(sequences);
        var result = logits.clone();
        if (penalty == 1.0) return result;
        using var scope = NewDisposeScope();
        for (int r = 0; r < sequences.Count; r++)
        {
            var seen = sequences[r].Where(t => t >= 0 && t < logits.shape[1]).Distinct().Select(t => (long)t).ToArray();
            if (seen.Length == 0) continue;
            var index = tensor(seen, device: logits.device);
            var row = result[r];
            var score = row.index_select(0, index);
            using Scalar p = penalty;
            using Scalar zero = 0.0;
            var penalised = where(score.lt(zero), score.mul(p), score.div(p));
            row.index_copy_(0, index, penalised);
        }
        return result;
    }

    /// <summary>Keeps the <paramref name="k"/> largest logits of each row (the rest become −∞).</summary>
    /// <param name="logits">[batch, vocab].</param>
    /// <param name="k">How many to keep (0 or ≥ vocab: all).</param>
    /// <returns>New logits.</returns>
    public static Tensor ApplyTopK(Tensor logits, int k)
    {
        ArgumentNullException.ThrowIfNull(logits);
        if (k <= 0 || k >= logits.shape[1]) return logits.clone();
        using var scope = NewDisposeScope();
        var kth = logits.topk(k, 1).values.narrow(1, k - 1, 1);                   // [b, 1]
        using Scalar minusInfinity = double.NegativeInfinity;
        return logits.masked_fill(logits.lt(kth), minusInfinity).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Nucleus filtering as the book's <c>sample_top_p</c> does it: sort probabilities in descending order, and drop
    /// each token whose preceding cumulative probability already exceeds <paramref name="p"/> (so the most likely
    /// token always stays). Dropped logits become −∞.
    /// </summary>
    /// <param name="logits">[batch, vocab].</param>
    /// <param name="p">The nucleus mass in (0, 1].</param>
    /// <returns>New logits.</returns>
    public static Tensor ApplyTopP(Tensor logits, double p)
    {
        ArgumentNullException.ThrowIfNull(logits);
        if (p >= 1) return logits.clone();
        using var scope = NewDisposeScope();
        var probs = logits.to(ScalarType.Float32).softmax(-1);
        var (sorted, order) = probs.sort(-1, descending: true);
        var cumulative = sorted.cumsum(-1);
        using Scalar mass = p;
        var removeSorted = cumulative.sub(sorted).gt(mass);                          // mass before the token > p
        var remove = zeros_like(sorted).scatter(1, order, removeSorted.to(ScalarType.Float32)).to(ScalarType.Bool);
        using Scalar minusInfinity = double.NegativeInfinity;
        return logits.masked_fill(remove, minusInfinity).MoveToOuterDisposeScope();
    }

    /// <summary>Samples one token per row from softmax(<paramref name="logits"/>).</summary>
    /// <param name="logits">[batch, vocab] (−∞ entries are never drawn).</param>
    /// <param name="generator">The random source.</param>
    /// <returns>int64 [batch].</returns>
    public static Tensor Sample(Tensor logits, Generator generator)
    {
        ArgumentNullException.ThrowIfNull(logits);
        ArgumentNullException.ThrowIfNull(generator);
        using var scope = NewDisposeScope();
        // Sampled on the CPU: the generator is a CPU generator, and seeds then reproduce across devices.
        var probs = logits.to(ScalarType.Float32).softmax(-1).cpu();
        return probs.multinomial(1, generator: generator).squeeze(1).to(logits.device).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The whole next-token choice: invalid-score guard, repetition penalty, then greedy argmax, or temperature,
    /// top-k, top-p and sampling.
    /// </summary>
    /// <param name="logits">[batch, vocab] last-position logits.</param>
    /// <param name="sequences">Each row's tokens so far (for the repetition penalty).</param>
    /// <param name="options">The settings.</param>
    /// <param name="generator">The random source (sampling only).</param>
    /// <returns>The chosen ids.</returns>
    public static int[] NextTokens(Tensor logits, IReadOnlyList<IReadOnlyList<int>> sequences, GenerationOptions options, Generator generator)
    {
        ArgumentNullException.ThrowIfNull(options);
        using var scope = NewDisposeScope();
        var l = logits.to(ScalarType.Float32);
        if (options.InvalidScoreTokenId is { } guard) l = ReplaceInvalid(l, guard);
        l = ApplyRepetitionPenalty(l, sequences, options.RepetitionPenalty);
        Tensor chosen;
        if (!options.DoSample)
        {
            chosen = l.argmax(-1);
        }
        else
        {
            using Scalar temperature = options.Temperature;
            l = l.div(temperature);
            l = ApplyTopK(l, options.TopK);
            l = ApplyTopP(l, options.TopP);
            chosen = Sample(l, generator);
        }
        return chosen.cpu().to(ScalarType.Int64).data<long>().ToArray().Select(x => (int)x).ToArray();
    }
}
