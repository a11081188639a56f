using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Quantization;

/// <summary>
/// Many-row products of a per-row quantized CPU layer (<see cref="QuantizationFormat.Int8PerRow"/>,
/// <see cref="QuantizationFormat.Int4PerRowChatGlm"/>) through an integer GEMM (<see cref="QuantizedLinearOptions.Int8Gemm"/>):
/// the left operand is quantized per row to symmetric int8 (scale max|row|/127, round to nearest even), multiplied with
/// the stored codes by libtorch's <c>_int_mm</c> (oneDNN's s8 × s8 → s32 GEMM, AMX or VNNI where the CPU has them), and
/// the exact int32 sums are scaled back in float32 and rounded once to bfloat16. int8 codes go in as stored; int4 codes
/// are widened to int8 a tile at a time (about 8 MB) into one reused buffer, as <see cref="TiledProduct"/> does with
/// bfloat16.
/// </summary>
/// <remarks>
/// Forward: y[m, n] = s_x[m]·s_w[n]·Σ_k q_x[m, k]·q_w[n, k] + b[n]. Input gradient: the weight's row scales lie along
/// the summed dimension, so they are folded into the gradient before it is quantized:
/// dx[m, k] = s_g[m]·Σ_n q_g[m, n]·q_w[n, k] with q_g = round(g[m, n]·s_w[n] / s_g[m]). The only error beyond the
/// stored weights' own is the rounding of the quantized operand: at most s/2 = max|row|/254 per element. In the forward,
/// outlier feature columns (<see cref="QuantizedLinearOptions.Int8GemmOutlierThreshold"/>: a column maximum over that many
/// times the median column maximum) are left out of the rows
/// (so the max is over the other columns) and added exactly: Σ_{k∈O} x[m, k]·dequant(W)[n, k] in float32, fused into the
/// rescale pass, with the weight's columns there kept on the layer for the next call with the same columns.
/// </remarks>
internal static unsafe class Int8Gemm
{
    /// <summary>Rows per parallel block of the quantize and scale passes.</summary>
    private const int RowsPerBlock = 16;

    /// <summary>
    /// The longest sum the int32 accumulator holds exactly: |q_x·q_w| ≤ 127·128 per term for int8 codes (132,104 terms),
    /// ≤ 127·8 for ChatGLM's int4 codes (2.1 M terms). Longer ones (an int8 GLM-4 head's input gradient: 151,552 terms)
    /// take the bfloat16 path.
    /// </summary>
    internal static long MaxDepth(QuantizationFormat format) => int.MaxValue / (127 * (format == QuantizationFormat.Int8PerRow ? 128 : 8));

    /// <summary>True when <paramref name="layer"/>'s many-row products take this path.</summary>
    internal static bool Applies(QuantizedLinear layer) => layer.Options.Int8Gemm && Unavailable(layer) is null;

    /// <summary>
    /// Why this path cannot run for <paramref name="layer"/> (whatever its options say), or null when it can. Constant
    /// strings: <see cref="Applies"/> asks on every call.
    /// </summary>
    /// <remarks>
    /// Needs integer dot products that cannot saturate: oneDNN's s8 × s8 GEMM on AVX-512 without VNNI goes through
    /// <c>vpmaddubsw</c>, whose 16-bit pair sums saturate, so the option is ignored on such CPUs.
    /// </remarks>
    internal static string? Unavailable(QuantizedLinear layer)
    {
        if (layer.Format is not (QuantizationFormat.Int8PerRow or QuantizationFormat.Int4PerRowChatGlm))
            return "group-wise int4 scales vary along the input dimension; only per-row formats (int8, ChatGLM int4) take the int8 GEMM";
        if (layer.Options.ComputeDtype != ScalarType.BFloat16) return "the int8 GEMM needs a bfloat16 ComputeDtype";
        if (layer.WeightBuffer.device_type != DeviceType.CPU) return "the int8 GEMM runs on the CPU only";
        if (!layer.WeightBuffer.is_contiguous()) return "the int8 GEMM needs a contiguous weight";
        if (!CpuGemv.IsSupported || !Vnni) return "this CPU lacks AVX-512 with VNNI integer dot products";
        if (!QuantizationKernels.Available) return "libtorch's TorchScript kernels (torch._int_mm) did not load";
        return null;
    }

    /// <summary>AVX512-VNNI (CPUID.7.0:ECX bit 11) or AVX-VNNI: integer dot products without 16-bit saturation.</summary>
    /// <remarks>Read once: CPUID traps to the hypervisor in a VM.</remarks>
    private static readonly bool Vnni = AvxVnni.IsSupported || (X86Base.IsSupported && (X86Base.CpuId(7, 0).Ecx & (1 << 11)) != 0);

    /// <summary>
    /// False: every call quantizes whole rows, whatever <see cref="QuantizedLinearOptions.Int8GemmOutlierThreshold"/> says.
    /// Only for A/B timing in one process (the benchmark's <c>--ab-outlier-split</c>); not thread-safe to change.
    /// </summary>
    internal static bool SplitOutliers = true;

    /// <summary>
    /// At most K / this many outlier columns (<see cref="QuantizedLinearOptions.Int8GemmOutlierThreshold"/>) per call: with
    /// more, the call takes the bfloat16 path. The float32 side product then costs at most 1/64 of the GEMM's
    /// multiply-adds, a quarter of its time or less at int8 rates (VNNI: 4× float32's multiply-adds per instruction).
    /// </summary>
    internal const int MaxOutlierShare = 64;

    /// <summary>
    /// y = x·dequant(W)ᵀ + b for <paramref name="x"/> [M, K] (float32 or bfloat16, contiguous); returns [M, N] bfloat16,
    /// or null when a row is not finite, K is beyond <see cref="MaxDepth"/> for the format or more than K/<see cref="MaxOutlierShare"/>
    /// columns are outliers (the caller then takes the bfloat16 path, which propagates NaN and ∞ as IEEE does). The GEMM
    /// runs in row tiles of W of about <paramref name="tileElements"/> codes (int4 codes widened to int8 into one reused
    /// tile), so the int32 result is one tile wide, not N. Outlier columns (a column maximum above the layer's threshold times the median one) are zero
    /// in the quantized rows and multiplied in float32 with the dequantized weight columns instead; that product is added
    /// to the rescaled integer sums before the one rounding to bfloat16.
    /// </summary>
    internal static Tensor? Forward(QuantizedLinear layer, Tensor x, Tensor? bias, long tileElements = TiledProduct.TileElements)
    {
        long m = x.shape[0], k = layer.InFeatures, n = layer.OutFeatures;
        if (m == 0) return empty(new[] { 0L, n }, dtype: ScalarType.BFloat16);
        if (k > MaxDepth(layer.Format)) return null;
        int generation = Volatile.Read(ref layer.WeightGeneration);
        int[] outliers = OutlierColumns(x, SplitOutliers ? layer.Options.Int8GemmOutlierThreshold : float.PositiveInfinity);
        if (outliers.Length > k / MaxOutlierShare) return null;
        using var keep = outliers.Length == 0 ? null : KeepMask(k, outliers);
        using var q = Quantize(x, keep, out var rowScales);
        if (q is null) return null;
        using var scales = TensorMemory.ContiguousFloat32(layer.ScaleBuffer);
        using var detached = bias?.detach();
        using var b = detached is null ? null : TensorMemory.ContiguousFloat32(detached);
        var y = empty(new[] { m, n }, dtype: ScalarType.BFloat16);
        float* sw = (float*)TensorMemory.Pointer(scales);
        float* pb = b is null ? null : (float*)TensorMemory.Pointer(b);
        ushort* py = (ushort*)TensorMemory.Pointer(y);
        bool int4 = layer.Format == QuantizationFormat.Int4PerRowChatGlm;
        var weight = layer.WeightBuffer;
        // The outlier columns: x's in float32 [M, C] and the weight's, dequantized and transposed, [C, N] (the same
        // columns as the last call's: reused).
        using var xOutliers = outliers.Length == 0 ? null : GatherColumns(x, outliers);
        OutlierCache? wOutliers = null;
        if (outliers.Length > 0)
        {
            wOutliers = Volatile.Read(ref layer.OutlierWeights);
            if (wOutliers is null || wOutliers.Generation != generation || !wOutliers.Columns.AsSpan().SequenceEqual(outliers))
            {
                wOutliers = new OutlierCache(outliers, OutlierWeights(layer, outliers, sw), generation);
                // Kept unless the weights changed meanwhile; one kept in a race with DropPlan carries the old generation,
                // which the check above never uses.
                if (Volatile.Read(ref layer.WeightGeneration) == generation) Volatile.Write(ref layer.OutlierWeights, wOutliers);
            }
        }
        var side = wOutliers is null ? default
            : new SideProduct((float*)TensorMemory.Pointer(xOutliers!), outliers.Length, wOutliers.Pointer, n);
        long tileRows = TiledProduct.TileRows(n, k, tileElements);
        using var tile = int4 ? empty(new[] { tileRows, k }, dtype: ScalarType.Int8) : null;
        var packed = int4 ? (byte*)TensorMemory.Pointer(weight) : null;
        var tileAddress = int4 ? (sbyte*)TensorMemory.Pointer(tile!) : null;
        for (long r0 = 0; r0 < n; r0 += tileRows)
        {
            long rows = Math.Min(tileRows, n - r0);
            if (int4) WidenInt4(packed, k, r0, r0 + rows, 0, k, tileAddress);
            using var w = int4 ? tile!.narrow(0, 0, rows) : weight.narrow(0, r0, rows);
            using var wt = w.t();
            using var acc = QuantizationKernels.IntMm(q, wt);
            RescaleInto(acc, rowScales, sw + r0, pb is null ? null : pb + r0, py + r0, n, side.From(r0));
        }
        GC.KeepAlive(wOutliers);
        return y;
    }

    /// <summary>Outlier feature columns and the layer's dequantized weight columns there, float32 [C, N] in a pinned array.</summary>
    internal sealed class OutlierCache(int[] columns, float[] weights, int generation)
    {
        /// <summary>The input columns, ascending.</summary>
        public int[] Columns { get; } = columns;

        /// <summary>The layer's <see cref="QuantizedLinear.WeightGeneration"/> the columns were read at.</summary>
        public int Generation { get; } = generation;

        /// <summary>Bytes held.</summary>
        public long Bytes => (long)weights.Length * sizeof(float);

        /// <summary>The weights (pinned: the address stays valid while this object lives).</summary>
        public float* Pointer => (float*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(weights));
    }

    /// <summary>
    /// The columns of <paramref name="x"/> [M, K] (float32 or bfloat16, contiguous) whose largest |x| exceeds
    /// <paramref name="threshold"/> times the median over columns of that largest |x| (the call's typical column),
    /// ascending; none when the threshold is +∞ or that median is 0 or not finite. A NaN is no outlier (the quantize pass
    /// rejects its row); an ∞ is.
    /// </summary>
    internal static int[] OutlierColumns(Tensor x, float threshold)
    {
        if (float.IsPositiveInfinity(threshold)) return [];
        RequireRows(x, nameof(x));
        int m = checked((int)x.shape[0]), k = checked((int)x.shape[1]);
        if (m == 0 || k == 0) return [];
        bool bf16 = x.dtype == ScalarType.BFloat16;
        nint src = TensorMemory.Pointer(x);
        var max = new float[k];
        int chunks = (k + ColumnChunk - 1) / ColumnChunk;
        void Chunk(int c)
        {
            fixed (float* pm = max)
                ColumnAbsMax((void*)src, bf16, m, k, c * ColumnChunk, Math.Min(k, (c + 1) * ColumnChunk), pm);
        }
        if (chunks > 1 && (long)m * k >= FastDequantize.MinimumParallelElements) Parallel.For(0, chunks, Chunk);
        else for (int c = 0; c < chunks; c++) Chunk(c);
        GC.KeepAlive(x);
        float limit = threshold * Median(max);
        if (!(limit > 0) || !float.IsFinite(limit)) return [];
        var outliers = new List<int>();
        for (int j = 0; j < k; j++)
        {
            if (max[j] > limit) outliers.Add(j);
        }
        return outliers.ToArray();
    }

    /// <summary>The lower median of <paramref name="values"/> (NaN counted as 0), by selection on a copy: O(n).</summary>
    internal static float Median(float[] values)
    {
        var a = new float[values.Length];
        for (int i = 0; i < a.Length; i++) a[i] = float.IsNaN(values[i]) ? 0f : values[i];
        int target = (a.Length - 1) / 2, lo = 0, hi = a.Length - 1;
        while (lo < hi)
        {
            // Hoare partition around the middle element's value.
            float pivot = a[lo + (hi - lo) / 2];
            int i = lo, j = hi;
            while (i <= j)
            {
                while (a[i] < pivot) i++;
                while (a[j] > pivot) j--;
                if (i <= j)
                {
                    (a[i], a[j]) = (a[j], a[i]);
                    i++;
                    j--;
                }
            }
            if (target <= j) hi = j;
            else if (target >= i) lo = i;
            else break;
        }
        return a[target];
    }

    /// <summary>Columns per block of <see cref="ColumnAbsMax"/> (16 vectors of maxima, resident in L1).</summary>
    private const int ColumnChunk = 256;

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void ColumnAbsMax(void* x, bool bf16, int m, int k, int c0, int c1, float* max)
    {
        var acc = stackalloc float[ColumnChunk];
        new Span<float>(acc, ColumnChunk).Clear();
        int width = c1 - c0, vectorWidth = width / 16 * 16;
        for (int r = 0; r < m; r++)
        {
            void* row = bf16 ? (ushort*)x + (long)r * k : (float*)x + (long)r * k;
            int j = 0;
            for (; j < vectorWidth; j += 16)
                Avx512F.Max(Vector512.Load(acc + j), Vector512.Abs(Load(row, bf16, c0 + j))).Store(acc + j);
            for (; j < width; j++)
                acc[j] = MathF.Max(acc[j], MathF.Abs(Element(row, bf16, c0 + j)));
        }
        for (int j = 0; j < width; j++) max[c0 + j] = acc[j];
    }

    /// <summary>x[:, columns] as float32 [M, C] (x [M, K] float32 or bfloat16, contiguous).</summary>
    private static Tensor GatherColumns(Tensor x, int[] columns)
    {
        long m = x.shape[0], k = x.shape[1];
        int c = columns.Length;
        bool bf16 = x.dtype == ScalarType.BFloat16;
        var result = empty(new[] { m, c }, dtype: ScalarType.Float32);
        void* src = (void*)TensorMemory.Pointer(x);
        float* dst = (float*)TensorMemory.Pointer(result);
        for (long r = 0; r < m; r++)
        {
            void* row = bf16 ? (ushort*)src + r * k : (float*)src + r * k;
            for (int j = 0; j < c; j++) dst[r * c + j] = Element(row, bf16, columns[j]);
        }
        GC.KeepAlive(x);
        return result;
    }

    /// <summary>
    /// The outlier columns' float32 product Σ_o x_O[m, o]·W_O[o, j], added in the rescale pass: <see cref="X"/> [M, C],
    /// <see cref="W"/> [C, <see cref="Stride"/>] from column <see cref="Column"/> on. Default: none.
    /// </summary>
    internal readonly struct SideProduct(float* x, int count, float* w, long stride, long column = 0)
    {
        public float* X { get; } = x;

        public int Count { get; } = count;

        public float* W { get; } = w;

        public long Stride { get; } = stride;

        public long Column { get; } = column;

        /// <summary>The same product for output columns from <paramref name="from"/> on.</summary>
        public SideProduct From(long from) => new(X, Count, W, Stride, from);
    }

    /// <summary>float32 [K]: 1, and 0 at <paramref name="columns"/> (the quantize pass's column scales).</summary>
    private static Tensor KeepMask(long k, int[] columns)
    {
        var mask = Enumerable.Repeat(1f, checked((int)k)).ToArray();
        foreach (int c in columns) mask[c] = 0f;
        return tensor(mask);
    }

    /// <summary>
    /// The dequantized weight columns <paramref name="columns"/>, transposed: float32 [C, N], code × row scale, as
    /// <see cref="QuantizedLinear.Dequantize"/> gives them in float32. Each row of W contributes C scattered bytes (one
    /// cache line each): all cores, whatever the size.
    /// </summary>
    internal static float[] OutlierWeights(QuantizedLinear layer, int[] columns, float* rowScales)
    {
        long n = layer.OutFeatures, k = layer.InFeatures;
        int c = columns.Length;
        var result = GC.AllocateUninitializedArray<float>(checked((int)(c * n)), pinned: true);
        bool int4 = layer.Format == QuantizationFormat.Int4PerRowChatGlm;
        nint src = TensorMemory.Pointer(layer.WeightBuffer), scales = (nint)rowScales;
        nint dst = (nint)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(result));
        int blocks = checked((int)((n + 255) / 256));
        Parallel.For(0, blocks, block =>
        {
            for (long r = block * 256L; r < Math.Min(n, (block + 1) * 256L); r++)
            {
                float s = ((float*)scales)[r];
                float* o = (float*)dst + r;
                for (int j = 0; j < c; j++)
                {
                    int code = int4 ? SignedNibble((byte*)src + r * (k / 2), columns[j]) : ((sbyte*)src)[r * k + columns[j]];
                    o[j * n] = code * s;
                }
            }
        });
        GC.KeepAlive(layer);
        return result;
    }

    /// <summary>
    /// dL/dx = g·dequant(W) for <paramref name="g"/> [M, N] (float32 or bfloat16, contiguous); returns [M, K] bfloat16, or
    /// null when a row is not finite or N is beyond <see cref="MaxDepth"/>. int4 codes are widened in column windows
    /// over all N rows, so each element of dL/dx is still one integer sum over the whole N.
    /// </summary>
    internal static Tensor? InputGradient(QuantizedLinear layer, Tensor g, long tileElements = TiledProduct.TileElements)
    {
        long m = g.shape[0], k = layer.InFeatures, n = layer.OutFeatures;
        if (m == 0) return empty(new[] { 0L, k }, dtype: ScalarType.BFloat16);
        if (n > MaxDepth(layer.Format)) return null;
        using var scales = TensorMemory.ContiguousFloat32(layer.ScaleBuffer);
        using var q = Quantize(g, scales, out var rowScales);
        if (q is null) return null;
        var dx = empty(new[] { m, k }, dtype: ScalarType.BFloat16);
        ushort* pdx = (ushort*)TensorMemory.Pointer(dx);
        var weight = layer.WeightBuffer;
        if (layer.Format == QuantizationFormat.Int8PerRow)
        {
            using var acc = QuantizationKernels.IntMm(q, weight);
            RescaleInto(acc, rowScales, null, null, pdx, k);
        }
        else
        {
            long tileColumns = TiledProduct.TileRows(k, n, tileElements);
            using var tile = empty(new[] { n * tileColumns }, dtype: ScalarType.Int8);
            var packed = (byte*)TensorMemory.Pointer(weight);
            var tileAddress = (sbyte*)TensorMemory.Pointer(tile);
            for (long c0 = 0; c0 < k; c0 += tileColumns)
            {
                long columns = Math.Min(tileColumns, k - c0);
                WidenInt4(packed, k, 0, n, c0, c0 + columns, tileAddress);
                using var used = tile.narrow(0, 0, n * columns);
                using var w = used.view(n, columns);
                using var acc = QuantizationKernels.IntMm(q, w);
                RescaleInto(acc, rowScales, null, null, pdx + c0, k);
            }
        }
        return dx;
    }

    /// <summary>Throws unless <paramref name="a"/> is a contiguous 2-D float32 or bfloat16 CPU tensor (the raw loops read it).</summary>
    private static void RequireRows(Tensor a, string name)
    {
        if (a.dtype is not (ScalarType.Float32 or ScalarType.BFloat16) || a.dim() != 2 || !a.is_contiguous() || a.device_type != DeviceType.CPU)
            throw new ArgumentException($"Int8Gemm reads contiguous 2-D float32 or bfloat16 CPU tensors, got {a.dtype} [{string.Join(", ", a.shape)}] on {a.device_type}.", name);
    }

    /// <summary>
    /// Widens ChatGLM int4 codes (two signed values per byte, even column in the high nibble; rows of k/2 bytes) of rows
    /// [r0, r1) and columns [c0, c1) (c0 even) to int8, row after row of c1 − c0 values, on all cores.
    /// </summary>
    internal static void WidenInt4(byte* packed, long k, long r0, long r1, long c0, long c1, sbyte* destination)
    {
        long width = c1 - c0, bytesPerRow = k / 2;   // int4 K is even
        nint src = (nint)packed, dst = (nint)destination;
        ForRowBlocks(checked((int)(r1 - r0)), (r1 - r0) * width, (a, b) =>
        {
            for (long r = r0 + a; r < r0 + b; r++)
                WidenRow((byte*)src + r * bytesPerRow + c0 / 2, width, (sbyte*)dst + (r - r0) * width);
        });
    }

    /// <summary>ChatGLM's signed nibble values: u for u ≤ 7, u − 16 above.</summary>
    private static readonly Vector512<sbyte> SignedNibbles =
        Vector512.Create(Enumerable.Range(0, 64).Select(i => (sbyte)(i % 16 < 8 ? i % 16 : i % 16 - 16)).ToArray());

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void WidenRow(byte* src, long width, sbyte* dst)
    {
        long j = 0;
        if (Avx512BW.IsSupported)
        {
            // 32 packed bytes → 32 words b; index word (b >> 4) | (b & 15) << 8 puts column 2i's nibble in the low byte and
            // column 2i+1's in the high one; vpshufb maps each nibble to its signed value: 64 columns in order.
            var lut = SignedNibbles;
            var mask = Vector512.Create((ushort)0x0F);
            for (; j + 64 <= width; j += 64)
            {
                var w = Avx512BW.ConvertToVector512UInt16(Vector256.Load(src + j / 2));
                var index = Avx512BW.ShiftRightLogical(w, 4) | Avx512BW.ShiftLeftLogical(w & mask, 8);
                Avx512BW.Shuffle(lut, index.AsSByte()).Store(dst + j);
            }
        }
        for (; j < width; j++) dst[j] = (sbyte)SignedNibble(src, j);
    }

    /// <summary>Column <paramref name="column"/> of a ChatGLM int4 row (even column in the high nibble): u for u ≤ 7, u − 16 above.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int SignedNibble(byte* row, long column)
    {
        byte b = row[column / 2];
        int u = (column & 1) == 0 ? b >> 4 : b & 15;
        return u >= 8 ? u - 16 : u;
    }

    /// <summary>
    /// Quantizes each row of <paramref name="a"/> [M, C] (times <paramref name="columnScales"/> [C] when given) to int8
    /// with its own scale max|row|/127 (0 for an all-zero row). Returns the codes [M, C], or null when a row is not finite.
    /// </summary>
    internal static Tensor? Quantize(Tensor a, Tensor? columnScales, out float[] rowScales)
    {
        RequireRows(a, nameof(a));
        int m = checked((int)a.shape[0]), c = checked((int)a.shape[1]);
        var codes = empty(new long[] { m, c }, dtype: ScalarType.Int8);
        var scales = new float[m];
        bool bf16 = a.dtype == ScalarType.BFloat16;
        nint src = TensorMemory.Pointer(a), dst = TensorMemory.Pointer(codes);
        nint column = columnScales is null ? 0 : TensorMemory.Pointer(columnScales);
        int finite = 1;
        ForRowBlocks(m, (long)m * c, (r0, r1) =>
        {
            fixed (float* s = scales)
            {
                for (int r = r0; r < r1; r++)
                {
                    if (!QuantizeRow((void*)(src + (long)r * c * (bf16 ? 2 : 4)), bf16, c, (float*)column, (sbyte*)(dst + (long)r * c), out s[r]))
                        Volatile.Write(ref finite, 0);
                }
            }
        });
        GC.KeepAlive(a);
        GC.KeepAlive(columnScales);
        rowScales = scales;
        if (finite == 0)
        {
            codes.Dispose();
            return null;
        }
        return codes;
    }

    /// <summary>
    /// destination[m·stride + j] = bf16(acc[m, j]·rowScales[m]·columnScales[j] + side[m, j] + bias[j]) for int32
    /// <paramref name="acc"/> [M, J] (column scales, side product and bias optional).
    /// </summary>
    internal static void RescaleInto(Tensor acc, float[] rowScales, float* columnScales, float* bias, ushort* destination, long stride, SideProduct side = default)
    {
        int m = checked((int)acc.shape[0]), width = checked((int)acc.shape[1]);
        using var contiguous = acc.contiguous();
        nint src = TensorMemory.Pointer(contiguous), dst = (nint)destination;
        nint column = (nint)columnScales, add = (nint)bias;
        ForRowBlocks(m, (long)m * width * (1 + side.Count), (r0, r1) =>
        {
            for (int r = r0; r < r1; r++)
                RescaleRow((int*)(src + (long)r * width * 4), width, rowScales[r], (float*)column, (float*)add, side, r, (ushort*)dst + r * stride);
        });
    }

    /// <summary>Runs <paramref name="body"/>(first, end) over blocks of at least <see cref="RowsPerBlock"/> rows on all cores.</summary>
    private static void ForRowBlocks(int rows, long elements, Action<int, int> body)
    {
        int blocks = (rows + RowsPerBlock - 1) / RowsPerBlock;
        if (blocks <= 1 || elements < FastDequantize.MinimumParallelElements)
        {
            body(0, rows);
            return;
        }
        Parallel.For(0, blocks, b => body(b * RowsPerBlock, Math.Min(rows, (b + 1) * RowsPerBlock)));
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Load(void* row, bool bf16, int j) => bf16
        ? TensorMemory.LoadBFloat16((ushort*)row + j)
        : Vector512.Load((float*)row + j);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float Element(void* row, bool bf16, int j) =>
        bf16 ? BitConverter.UInt32BitsToSingle((uint)((ushort*)row)[j] << 16) : ((float*)row)[j];

    // AggressiveOptimization: SIMD kernels must not run as unoptimised tier-0 code.
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static bool QuantizeRow(void* row, bool bf16, int c, float* columnScales, sbyte* q, out float scale)
    {
        // vmaxps returns its second operand when either is NaN, so a NaN element can hide from the maximum: the same pass
        // sums v·0, which is 0 for finite v and NaN for NaN or ±∞.
        var vmax = Vector512<float>.Zero;
        var vnan = Vector512<float>.Zero;
        int j = 0;
        for (; j + 16 <= c; j += 16)
        {
            var v = Load(row, bf16, j);
            if (columnScales != null) v *= Vector512.Load(columnScales + j);
            vmax = Avx512F.Max(vmax, Vector512.Abs(v));
            vnan += v * Vector512<float>.Zero;
        }
        float amax = CpuGemv.HorizontalMax(vmax), nan = Vector512.Sum(vnan);
        for (int t = j; t < c; t++)
        {
            float v = Element(row, bf16, t) * (columnScales != null ? columnScales[t] : 1f);
            amax = MathF.Max(amax, MathF.Abs(v));
            nan += v * 0f;
        }
        if (!float.IsFinite(amax) || nan != 0f)
        {
            scale = float.NaN;
            return false;
        }
        (scale, float pre, float inverse) = CpuGemv.Int8Scale(amax);
        var vpre = Vector512.Create(pre);
        var vinv = Vector512.Create(inverse);
        for (j = 0; j + 16 <= c; j += 16)
        {
            var v = Load(row, bf16, j);
            if (columnScales != null) v *= Vector512.Load(columnScales + j);
            // vcvtps2dq rounds to nearest even (the default MXCSR mode); vpmovsdb saturates (|v·inverse| ≤ 127 up to rounding).
            Avx512F.ConvertToVector128SByteWithSaturation(Avx512F.ConvertToVector512Int32(v * vpre * vinv)).Store(q + j);
        }
        for (; j < c; j++)
        {
            float v = Element(row, bf16, j) * (columnScales != null ? columnScales[j] : 1f);
            q[j] = (sbyte)Math.Clamp((int)MathF.Round(v * pre * inverse), -127, 127);
        }
        return true;
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void RescaleRow(int* acc, int width, float rowScale, float* columnScales, float* bias, SideProduct side, int row, ushort* y)
    {
        var vs = Vector512.Create(rowScale);
        float* sx = side.X + (long)row * side.Count, sw = side.W + side.Column;
        int j = 0;
        for (; j + 16 <= width; j += 16)
        {
            var v = Avx512F.ConvertToVector512Single(Vector512.Load(acc + j)) * (columnScales != null ? Vector512.Load(columnScales + j) * vs : vs);
            if (side.Count > 0)
            {
                // Four independent sums: one chain of C dependent multiply-adds would wait on each one's latency.
                Vector512<float> s0 = default, s1 = default, s2 = default, s3 = default;
                int o = 0;
                for (; o + 4 <= side.Count; o += 4)
                {
                    float* w0 = sw + o * side.Stride + j;
                    s0 = Avx512F.FusedMultiplyAdd(Vector512.Create(sx[o]), Vector512.Load(w0), s0);
                    s1 = Avx512F.FusedMultiplyAdd(Vector512.Create(sx[o + 1]), Vector512.Load(w0 + side.Stride), s1);
                    s2 = Avx512F.FusedMultiplyAdd(Vector512.Create(sx[o + 2]), Vector512.Load(w0 + 2 * side.Stride), s2);
                    s3 = Avx512F.FusedMultiplyAdd(Vector512.Create(sx[o + 3]), Vector512.Load(w0 + 3 * side.Stride), s3);
                }
                for (; o < side.Count; o++)
                    s0 = Avx512F.FusedMultiplyAdd(Vector512.Create(sx[o]), Vector512.Load(sw + o * side.Stride + j), s0);
                v += (s0 + s1) + (s2 + s3);
            }
            if (bias != null) v += Vector512.Load(bias + j);
            Avx512F.ConvertToVector256UInt16(FastDequantize.RoundToBf16(v)).Store(y + j);
        }
        for (; j < width; j++)
        {
            float v = acc[j] * (columnScales != null ? columnScales[j] * rowScale : rowScale);
            for (int o = 0; o < side.Count; o++)
                v = MathF.FusedMultiplyAdd(sx[o], sw[o * side.Stride + j], v);
            if (bias != null) v += bias[j];
            y[j] = FastDequantize.RoundToBf16(v);
        }
    }
}
