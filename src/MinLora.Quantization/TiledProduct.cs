using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Quantization;

/// <summary>
/// Products with a quantized CPU weight for many rows (prompts, training) that never hold the weight in bfloat16
/// as a whole: the weight is dequantized a tile at a time into one buffer of about 16 MB (at least 64 rows or 256
/// columns: 67 MB for the input gradient of ChatGLM's 130,528-row head), reused for every tile, and each tile goes
/// through libtorch's bfloat16 GEMM (oneDNN where the CPU has AVX-512; float32 accumulation either way).
/// </summary>
/// <remarks>
/// Dequantizing the whole weight per call (ChatGLM-6B's <c>dense_h_to_4h</c>: 128 MB of bfloat16; a quantized ChatGLM
/// head: 1.07 GB) writes it to fresh memory and reads it back. Where that memory page-faults (it did in a small probe
/// process on the 2-core dev VM: 35–68 ms for a 4096 × 16384 int8 weight against 14 ms for the bfloat16 GEMM itself),
/// the tiles make the product about twice as fast (four ChatGLM projections, 128 rows: 0.74× bf16 against 0.39×;
/// 512 rows: 0.85× against 0.70×); where the allocator hands back memory already mapped (the benchmark's model
/// process: 8–10 ms for that weight) the two agree within the host's noise. Either way the transient memory is one
/// tile instead of a whole bfloat16 copy. Each output element still comes from one GEMM over the whole K (forward) or
/// N (input gradient), accumulated in float32 and rounded once, so the values are those of
/// <c>linear(x, dequant(W))</c> up to the GEMM's blocking.
/// </remarks>
internal static unsafe class TiledProduct
{
    /// <summary>Elements per tile: 16 MB of bfloat16.</summary>
    internal const long TileElements = 8L << 20;

    /// <summary>True when <paramref name="layer"/>'s product can take this path: CPU weights, bfloat16 compute.</summary>
    internal static bool Applies(QuantizedLinear layer) =>
        layer.Options.ComputeDtype == ScalarType.BFloat16 && layer.WeightBuffer.device_type == DeviceType.CPU;

    /// <summary>Rows of an [<paramref name="n"/>, <paramref name="k"/>] weight per tile of about <paramref name="tileElements"/> elements: a multiple of 64, at least 64.</summary>
    internal static long TileRows(long n, long k, long tileElements) => Math.Min(n, Math.Max(64, tileElements / k / 64 * 64));

    /// <summary>
    /// y = x·dequant(W)ᵀ + b for <paramref name="x"/> [M, K] (bfloat16); returns [M, N] bfloat16, contiguous. The bias
    /// enters the GEMM's float32 accumulator, as in <c>linear</c>, so each output is rounded once.
    /// </summary>
    internal static Tensor Forward(QuantizedLinear layer, Tensor x, Tensor? bias, long tileElements = TileElements)
    {
        using var source = new FastDequantize.Source(layer.QuantizedWeight);
        long n = source.Rows, k = source.Columns, m = x.shape[0];
        if (m == 0) return empty(new[] { 0L, n }, dtype: ScalarType.BFloat16);
        long tileRows = TileRows(n, k, tileElements);
        using var tile = empty(new[] { tileRows, k }, dtype: ScalarType.BFloat16);
        var tileAddress = (ushort*)TensorMemory.Pointer(tile);
        // Rows of yᵀ are contiguous, so each tile's GEMM writes its [rows, M] block in place.
        using var yt = empty(new[] { n, m }, dtype: ScalarType.BFloat16);
        using var xt = x.t();
        if (bias is not null)
        {
            using var b = bias.to(ScalarType.BFloat16);
            using var column = b.unsqueeze(1);
            using var expanded = column.expand(n, m);
            yt.copy_(expanded);
        }
        for (long r0 = 0; r0 < n; r0 += tileRows)
        {
            long rows = Math.Min(tileRows, n - r0);
            source.DequantizeParallel(r0, r0 + rows, 0, k, tileAddress);
            using var w = tile.narrow(0, 0, rows);
            using var block = yt.narrow(0, r0, rows);
            block.addmm_(w, xt, beta: bias is null ? 0 : 1, alpha: 1);
        }
        using var y = yt.t();
        return y.contiguous();
    }

    /// <summary>dL/dx = g·dequant(W) for <paramref name="g"/> [M, N] (bfloat16); returns [M, K] bfloat16, contiguous.</summary>
    internal static Tensor InputGradient(QuantizedLinear layer, Tensor g, long tileElements = TileElements)
    {
        using var source = new FastDequantize.Source(layer.QuantizedWeight);
        long n = source.Rows, k = source.Columns, m = g.shape[0];
        if (m == 0) return empty(new[] { 0L, k }, dtype: ScalarType.BFloat16);
        // Column tiles of W (all N rows, a window of K): each element of dL/dx is one GEMM over the whole N. Windows are
        // even (packed int4) and whole groups: multiples of 256 columns, or of the group size where that does not divide 256.
        long group = layer.Format == QuantizationFormat.Int4Grouped ? layer.GroupSize : 1;
        long align = 256 / Gcd(256, group) * group; // lcm(256, group)
        long tileColumns = Math.Min(k, Math.Max(align, tileElements / n / align * align));
        using var tile = empty(new[] { n, tileColumns }, dtype: ScalarType.BFloat16);
        var tileAddress = (ushort*)TensorMemory.Pointer(tile);
        using var gxt = empty(new[] { k, m }, dtype: ScalarType.BFloat16);
        using var gt = g.t();
        for (long c0 = 0; c0 < k; c0 += tileColumns)
        {
            long columns = Math.Min(tileColumns, k - c0);
            source.DequantizeParallel(0, n, c0, c0 + columns, tileAddress);
            using var flat = tile.view(-1);
            using var used = flat.narrow(0, 0, n * columns);
            using var w = used.view(n, columns);
            using var wt = w.t();
            using var block = gxt.narrow(0, c0, columns);
            block.addmm_(wt, gt, beta: 0, alpha: 1);
        }
        using var gx = gxt.t();
        return gx.contiguous();
    }

    private static long Gcd(long a, long b) => b == 0 ? a : Gcd(b, a % b);
}
