using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm;

/// <summary>
/// ChatGLM-6B's attention masks and 2-D positions, built from token ids as the reference model
/// (<c>get_masks</c>, <c>get_position_ids</c>) and tokenizer (<c>_pad</c>, left padding) build them, and extended for
/// incremental decoding as its generation loop does.
/// </summary>
public static class GlmMasks
{
    /// <summary>
    /// The attention mask for <paramref name="inputIds"/> [batch, sequence]: within each row's tokens (after its left
    /// padding), everything before <c>&lt;sop&gt;</c> is visible to every position and the rest is causal; padding
    /// rows and columns are masked. True = masked.
    /// </summary>
    /// <param name="inputIds">Token ids [batch, sequence], left-padded with <see cref="GlmConfig.PadTokenId"/>.</param>
    /// <param name="config">Supplies the special ids.</param>
    /// <returns>bool [batch, 1, sequence, sequence] on the ids' device.</returns>
    /// <exception cref="ArgumentException">The ids are not a 2-D integer tensor.</exception>
    public static Tensor BuildAttentionMask(Tensor inputIds, GlmConfig config)
    {
        var (ids, b, s) = Rows(inputIds, config);
        long cells = (long)b * s * s;
        if (cells > Array.MaxLength)
            throw new ArgumentException($"A full mask of {b} × {s} × {s} positions does not fit one array ({cells} cells); use shorter sequences or fewer rows per call.", nameof(inputIds));
        var mask = new bool[cells];
        for (int r = 0; r < b; r++)
        {
            var (start, context, _) = Layout(ids[r], config);
            for (int i = 0; i < s; i++)
            {
                for (int j = 0; j < s; j++)
                {
                    bool visible = i >= start && j >= start && (j - start < context || j <= i);
                    mask[((long)r * s + i) * s + j] = !visible;
                }
            }
        }
        return tensor(mask, new long[] { b, 1, s, s }, device: inputIds.device);
    }

    /// <summary>
    /// The 2-D positions for <paramref name="inputIds"/>: position = token index (within the row's tokens) up to
    /// <c>&lt;sop&gt;</c>, then the index of <c>[gMASK]</c> (or <c>[MASK]</c>); block position = 0 before <c>&lt;sop&gt;</c>,
    /// then 1, 2, …; padding gets 0.
    /// </summary>
    /// <param name="inputIds">Token ids [batch, sequence], left-padded.</param>
    /// <param name="config">Supplies the special ids.</param>
    /// <returns>int64 [batch, 2, sequence] on the ids' device.</returns>
    public static Tensor BuildPositionIds(Tensor inputIds, GlmConfig config)
    {
        var (ids, b, s) = Rows(inputIds, config);
        var pos = new long[b * 2 * s];
        for (int r = 0; r < b; r++)
        {
            var (start, context, maskPosition) = Layout(ids[r], config);
            for (int i = start; i < s; i++)
            {
                int t = i - start;
                pos[(r * 2) * s + i] = t < context ? t : maskPosition;
                pos[(r * 2 + 1) * s + i] = t < context ? 0 : t - context + 1;
            }
        }
        return tensor(pos, new long[] { b, 2, s }, device: inputIds.device);
    }

    /// <summary>
    /// Extends a full mask [b, 1, n, n] by one generated token, as the reference's generation loop does: the new
    /// token sees what the last row saw plus itself; earlier rows do not see it.
    /// </summary>
    /// <param name="mask">The current full mask (True = masked).</param>
    /// <returns>The mask [b, 1, n+1, n+1].</returns>
    public static Tensor AppendTokenToMask(Tensor mask)
    {
        ArgumentNullException.ThrowIfNull(mask);
        using var scope = NewDisposeScope();
        long b = mask.shape[0], n = mask.shape[2];
        var widened = cat(new[] { mask, ones(new[] { b, 1, n, 1 }, dtype: ScalarType.Bool, device: mask.device) }, 3);
        var last = widened.narrow(2, n - 1, 1).clone();
        last.narrow(3, n, 1).fill_(false);
        return cat(new[] { widened, last }, 2).MoveToOuterDisposeScope();
    }

    /// <summary>Extends positions [b, 2, n] by one generated token: same position, block position + 1.</summary>
    /// <param name="positionIds">The current positions.</param>
    /// <returns>Positions [b, 2, n+1].</returns>
    public static Tensor AppendTokenToPositions(Tensor positionIds)
    {
        ArgumentNullException.ThrowIfNull(positionIds);
        using var scope = NewDisposeScope();
        var last = positionIds.narrow(2, positionIds.shape[2] - 1, 1).clone();
        using Scalar one = 1;
        last.narrow(1, 1, 1).add_(one);
        return cat(new[] { positionIds, last }, 2).MoveToOuterDisposeScope();
    }

    private static (long[][] Ids, int Batch, int Seq) Rows(Tensor inputIds, GlmConfig config)
    {
        ArgumentNullException.ThrowIfNull(inputIds);
        ArgumentNullException.ThrowIfNull(config);
        if (inputIds.dim() != 2 || inputIds.dtype is not (ScalarType.Int64 or ScalarType.Int32))
            throw new ArgumentException($"Expected int64 input ids [batch, sequence], got {inputIds.dtype} [{string.Join(", ", inputIds.shape)}].", nameof(inputIds));
        int b = (int)inputIds.shape[0], s = (int)inputIds.shape[1];
        using var scope = NewDisposeScope();
        var flat = inputIds.to(ScalarType.Int64).cpu().contiguous().data<long>().ToArray();
        var rows = new long[b][];
        for (int r = 0; r < b; r++) rows[r] = flat.AsSpan(r * s, s).ToArray();
        return (rows, b, s);
    }

    /// <summary>(first non-pad index, tokens before &lt;sop&gt;, position of the mask token) of one row.</summary>
    private static (int Start, int Context, int MaskPosition) Layout(long[] row, GlmConfig config)
    {
        int start = 0;
        while (start < row.Length - 1 && row[start] == config.PadTokenId) start++;
        int context = row.Length - start;
        for (int i = start; i < row.Length; i++)
        {
            if (row[i] == config.BosTokenId) { context = i - start; break; }
        }
        int maskPosition = -1;
        foreach (var token in new long[] { config.GmaskTokenId, config.MaskTokenId })
        {
            for (int i = start; i < row.Length && maskPosition < 0; i++)
            {
                if (row[i] == token) maskPosition = i - start;
            }
            if (maskPosition >= 0) break;
        }
        if (maskPosition < 0) maskPosition = Math.Max(0, context - 1);
        return (start, context, maskPosition);
    }
}
