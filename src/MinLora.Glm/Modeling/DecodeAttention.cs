using System.Buffers;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using MinLora.Quantization;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Modeling;

/// <summary>
/// One decoding step's attention (one query position per sequence) read straight from the KV cache buffers, on all
/// cores, with SIMD: scores, ChatGLM's masking and layer scaling, softmax and the weighted sum of values in one pass
/// over each head's keys and values.
/// </summary>
/// <remarks>
/// libtorch's batched products read the cache's strided per-head blocks at a fraction of the memory bandwidth (at
/// 1,025 positions the two products of 28 layers took 110–280 ms for 0.47 GB on a 2-core Xeon VM reading 24 GB/s);
/// the head-major cache keeps each head's keys and values contiguous, which this kernel streams, one contiguous range
/// of heads per core, with software prefetch (the hardware prefetcher alone reached about half the plain read rate).
/// 128-dimensional bf16 heads, every GLM's, run a kernel that keeps the query and the value sums in registers and reads
/// and writes bf16 directly (no conversions through libtorch: at short contexts those calls cost more than the
/// arithmetic). Everything is
/// computed in float32 and rounded once at the end, where the libtorch path rounds the scaled query, the scores and the
/// probabilities to the cache's type on the way: the result differs from it by at most a few units of the last place
/// of that type, and is usually closer to the exact value.
/// </remarks>
internal static unsafe class DecodeAttention
{
    /// <summary>Whether this CPU runs the kernel (AVX-512 F).</summary>
    internal static bool IsSupported => Avx512F.IsSupported;

    /// <summary>
    /// Attention of one query per sequence over the cache buffers [b, heads, capacity, hd] (bfloat16 or float32,
    /// contiguous), positions [0, length).
    /// </summary>
    /// <param name="query">[1, b, heads, hd], any floating type.</param>
    /// <param name="keys">The key buffer [b, groups, capacity, hd]: one key per group of heads/groups query heads (groups = heads without multi-query attention).</param>
    /// <param name="values">The value buffer, same shape and type.</param>
    /// <param name="length">The number of valid positions (the past plus this step).</param>
    /// <param name="mask">[b, 1, 1, length] bool (true = masked, score −10000 as in the reference) or null.</param>
    /// <param name="norm">The query is divided by this (√hd·(layer+1)).</param>
    /// <param name="coeff">The masked scores are multiplied by this ((layer+1)) before the softmax.</param>
    /// <param name="maskValue">The score of a masked position (ChatGLM-6B −10000, ChatGLM2 −∞).</param>
    /// <returns>The context [1, b, heads·hd] in the query's type.</returns>
    internal static Tensor Run(Tensor query, Tensor keys, Tensor values, long length, Tensor? mask, double norm, double coeff, float maskValue = -10000f)
    {
        long b = keys.shape[0], groups = keys.shape[1], capacity = keys.shape[2], hd = keys.shape[3];
        long heads = query.shape[2];
        using var m = mask?.reshape(b, length).to(ScalarType.Bool).contiguous();
        var job = new Job
        {
            Keys = TensorMemory.Pointer(keys),
            Values = TensorMemory.Pointer(values),
            Bf16 = keys.dtype == ScalarType.BFloat16,
            Capacity = capacity,
            Length = (int)length,
            Heads = (int)heads,
            Groups = (int)groups,
            HeadDim = (int)hd,
            MaskValue = maskValue,
            Mask = m is null ? null : (byte*)TensorMemory.Pointer(m),
            Scale = (float)(1.0 / norm),
            Coeff = (float)coeff,
        };
        int items = (int)(b * heads);
        if (job.Bf16 && hd == LineHeadDim && query.dtype == ScalarType.BFloat16 && query.is_contiguous())
        {
            // The common case (every GLM has 128-dim heads): bf16 in, bf16 out, no conversions.
            var result = empty(new[] { 1, b, heads * hd }, dtype: ScalarType.BFloat16);
            job.Query16 = (ushort*)TensorMemory.Pointer(query);
            job.Output16 = (ushort*)TensorMemory.Pointer(result);
            ForEachItem(items, i => Head128(job, i));
            GC.KeepAlive(query);
            GC.KeepAlive(keys);
            GC.KeepAlive(values);
            return result;
        }
        using var q = query.reshape(b * heads, hd).to(ScalarType.Float32).contiguous();
        using var output = empty(new[] { b * heads, hd }, dtype: ScalarType.Float32);
        job.Query = (float*)TensorMemory.Pointer(q);
        job.Output = (float*)TensorMemory.Pointer(output);
        ForEachItem(items, i => Head(job, i));
        GC.KeepAlive(keys);
        GC.KeepAlive(values);
        return output.view(1, b, heads * hd).to(query.dtype);
    }

    /// <summary>The head dimension of the register kernel: 4 cache lines of bf16 per position.</summary>
    private const int LineHeadDim = 128;

    /// <summary>Cache positions read ahead by software prefetch (6 KB at 128-dim bf16). Measured on the 2-core Xeon VM
    /// over 28 layers at 1,025 positions (best pass; the plain read 21–25 GB/s): 14–17 GB/s without, 18–21 GB/s at
    /// 16–32 positions ahead; 64 ahead as fast at best but slower at the median, 128 ahead slower.</summary>
    private const int PrefetchPositions = 24;

    /// <summary>Runs the items (sequence × head) as contiguous ranges, two per core as the GEMV kernels split their
    /// rows (a core taken by another process does not hold the step up): each range streams its heads' keys and values
    /// in order, and a step pays one fork/join instead of one per head.</summary>
    private static void ForEachItem(int items, Action<int> item)
    {
        int workers = Math.Min(Environment.ProcessorCount * 2, items);
        if (workers <= 1)
        {
            for (int i = 0; i < items; i++) item(i);
            return;
        }
        CpuParallel.For(workers, w =>
        {
            for (int i = (int)((long)w * items / workers), end = (int)((long)(w + 1) * items / workers); i < end; i++) item(i);
        });
    }

    /// <summary>Whether <see cref="Run"/> applies: CPU buffers of a supported type and layout.</summary>
    internal static bool Applies(Tensor query, Tensor keys, Tensor values, long length, Tensor? mask) =>
        IsSupported && keys.device_type == DeviceType.CPU && query.device_type == DeviceType.CPU &&
        keys.dtype is ScalarType.BFloat16 or ScalarType.Float32 && values.dtype == keys.dtype &&
        keys.dim() == 4 && keys.is_contiguous() && values.is_contiguous() && values.shape.SequenceEqual(keys.shape) &&
        query.dim() == 4 && query.shape[0] == 1 && query.shape[1] == keys.shape[0] && query.shape[3] == keys.shape[3] &&
        query.shape[2] % keys.shape[1] == 0 && length >= 1 && length <= keys.shape[2] && length <= int.MaxValue &&
        (mask is null || (mask.device_type == DeviceType.CPU && mask.numel() == keys.shape[0] * length));

    private struct Job
    {
        public float* Query;
        public ushort* Query16;
        public nint Keys, Values;
        public bool Bf16;
        public long Capacity;
        public int Length, Heads, Groups, HeadDim;
        public byte* Mask;
        public float Scale, Coeff, MaskValue;
        public float* Output;
        public ushort* Output16;

        /// <summary>The element offset of the keys and values serving <paramref name="item"/> (sequence × head): its
        /// sequence's block of the group of heads/groups query heads it belongs to.</summary>
        public readonly long CacheStart(int item)
        {
            int sequence = item / Heads, head = item % Heads;
            return ((long)sequence * Groups + head / (Heads / Groups)) * Capacity * HeadDim;
        }

        /// <summary>The mask row of <paramref name="item"/>'s sequence, or null.</summary>
        public readonly byte* MaskRow(int item) => Mask is null ? null : Mask + (long)(item / Heads) * Length;
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    private static void Head(in Job j, int item)
    {
        int hd = j.HeadDim, n = j.Length;
        long start = j.CacheStart(item);
        float* q = j.Query + (long)item * hd;
        float* output = j.Output + (long)item * hd;
        byte* mask = j.MaskRow(item);
        float[] rented = ArrayPool<float>.Shared.Rent(n + hd);
        try
        {
            fixed (float* buffer = rented)
            {
                float* scores = buffer;
                float* qs = buffer + n;
                for (int d = 0; d < hd; d++) qs[d] = q[d] * j.Scale;

                // Scores, masking and scaling as the reference: (q/norm·k, or −10000 where masked) × coeff.
                float max = float.NegativeInfinity;
                for (int t = 0; t < n; t++)
                {
                    Prefetch(j, j.Keys, start + (long)(t + PrefetchPositions) * hd);
                    float s = mask is not null && mask[t] != 0
                        ? j.MaskValue
                        : j.Bf16 ? DotBf16(qs, (ushort*)j.Keys + start + (long)t * hd, hd) : DotF32(qs, (float*)j.Keys + start + (long)t * hd, hd);
                    s *= j.Coeff;
                    scores[t] = s;
                    if (s > max) max = s;
                }
                float sum = Softmax(scores, n, max);
                float inv = 1f / sum;

                // context = Σ p_t · v_t
                for (int d = 0; d < hd; d++) output[d] = 0f;
                for (int t = 0; t < n; t++)
                {
                    Prefetch(j, j.Values, start + (long)(t + PrefetchPositions) * hd);
                    float p = scores[t] * inv;
                    if (j.Bf16) AxpyBf16(p, (ushort*)j.Values + start + (long)t * hd, output, hd);
                    else AxpyF32(p, (float*)j.Values + start + (long)t * hd, output, hd);
                }
            }
        }
        finally
        {
            ArrayPool<float>.Shared.Return(rented);
        }
    }

    /// <summary>Software prefetch of one position's row (its first and, for long rows, following cache lines).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Prefetch(in Job j, nint buffer, long element)
    {
        byte* p = (byte*)buffer + element * (j.Bf16 ? 2 : 4);
        int bytes = j.HeadDim * (j.Bf16 ? 2 : 4);
        for (int at = 0; at < bytes; at += 64) Sse.Prefetch0(p + at);
    }

    /// <summary>
    /// One head of 128 dimensions in bf16, with everything in registers: each 64-byte line of 32 bf16 values is
    /// widened as its 16 even elements (shifted into the high half of a float) and its 16 odd ones (masked), so a line
    /// costs two bit operations; the query is split the same way, the value sums are kept split and interleaved once
    /// at the end. Positions are read ahead by software prefetch.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Head128(in Job j, int item)
    {
        int n = j.Length;
        long start = j.CacheStart(item);
        uint* k = (uint*)((ushort*)j.Keys + start);
        uint* v = (uint*)((ushort*)j.Values + start);
        uint* q = (uint*)(j.Query16 + (long)item * LineHeadDim);
        byte* mask = j.MaskRow(item);
        var scale = Vector512.Create(j.Scale);
        var qe0 = Even(Vector512.Load(q)) * scale; var qo0 = Odd(Vector512.Load(q)) * scale;
        var qe1 = Even(Vector512.Load(q + 16)) * scale; var qo1 = Odd(Vector512.Load(q + 16)) * scale;
        var qe2 = Even(Vector512.Load(q + 32)) * scale; var qo2 = Odd(Vector512.Load(q + 32)) * scale;
        var qe3 = Even(Vector512.Load(q + 48)) * scale; var qo3 = Odd(Vector512.Load(q + 48)) * scale;
        const int Line = LineHeadDim / 2;                    // uints per position
        float[] rented = ArrayPool<float>.Shared.Rent(n);
        try
        {
            fixed (float* scores = rented)
            {
                // Scores, masking and scaling as the reference: (q/norm·k, or the mask value where masked) × coeff.
                float max = float.NegativeInfinity;
                for (int t = 0; t < n; t++)
                {
                    uint* row = k + (long)t * Line;
                    PrefetchPosition((byte*)(row + PrefetchPositions * Line));
                    float s;
                    if (mask is not null && mask[t] != 0) s = j.MaskValue;
                    else
                    {
                        var l0 = Vector512.Load(row);
                        var l1 = Vector512.Load(row + 16);
                        var l2 = Vector512.Load(row + 32);
                        var l3 = Vector512.Load(row + 48);
                        var a = Avx512F.FusedMultiplyAdd(Even(l0), qe0, Odd(l0) * qo0);
                        var c = Avx512F.FusedMultiplyAdd(Even(l1), qe1, Odd(l1) * qo1);
                        a = Avx512F.FusedMultiplyAdd(Even(l2), qe2, a);
                        c = Avx512F.FusedMultiplyAdd(Even(l3), qe3, c);
                        a = Avx512F.FusedMultiplyAdd(Odd(l2), qo2, a);
                        c = Avx512F.FusedMultiplyAdd(Odd(l3), qo3, c);
                        s = Vector512.Sum(a + c);
                    }
                    s *= j.Coeff;
                    scores[t] = s;
                    if (s > max) max = s;
                }
                var inv = Vector512.Create(1f / Softmax(scores, n, max));

                // context = Σ p_t · v_t, kept as even and odd elements of each line
                Vector512<float> e0 = default, o0 = default, e1 = default, o1 = default;
                Vector512<float> e2 = default, o2 = default, e3 = default, o3 = default;
                for (int t = 0; t < n; t++)
                {
                    uint* row = v + (long)t * Line;
                    PrefetchPosition((byte*)(row + PrefetchPositions * Line));
                    var p = Vector512.Create(scores[t]);
                    var l0 = Vector512.Load(row);
                    var l1 = Vector512.Load(row + 16);
                    var l2 = Vector512.Load(row + 32);
                    var l3 = Vector512.Load(row + 48);
                    e0 = Avx512F.FusedMultiplyAdd(Even(l0), p, e0);
                    o0 = Avx512F.FusedMultiplyAdd(Odd(l0), p, o0);
                    e1 = Avx512F.FusedMultiplyAdd(Even(l1), p, e1);
                    o1 = Avx512F.FusedMultiplyAdd(Odd(l1), p, o1);
                    e2 = Avx512F.FusedMultiplyAdd(Even(l2), p, e2);
                    o2 = Avx512F.FusedMultiplyAdd(Odd(l2), p, o2);
                    e3 = Avx512F.FusedMultiplyAdd(Even(l3), p, e3);
                    o3 = Avx512F.FusedMultiplyAdd(Odd(l3), p, o3);
                }
                uint* output = (uint*)(j.Output16 + (long)item * LineHeadDim);
                StoreLine(e0 * inv, o0 * inv, output);
                StoreLine(e1 * inv, o1 * inv, output + 16);
                StoreLine(e2 * inv, o2 * inv, output + 32);
                StoreLine(e3 * inv, o3 * inv, output + 48);
            }
        }
        finally
        {
            ArrayPool<float>.Shared.Return(rented);
        }
    }

    /// <summary>Prefetches one 128-dim bf16 position (four cache lines).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void PrefetchPosition(byte* position)
    {
        Sse.Prefetch0(position);
        Sse.Prefetch0(position + 64);
        Sse.Prefetch0(position + 128);
        Sse.Prefetch0(position + 192);
    }

    /// <summary>The even bf16 elements of a line (low halves of each 32-bit lane) as floats.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Even(Vector512<uint> line) => (line << 16).AsSingle();

    /// <summary>The odd bf16 elements of a line (high halves of each 32-bit lane) as floats.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Odd(Vector512<uint> line) => (line & Vector512.Create(0xFFFF0000u)).AsSingle();

    /// <summary>Rounds even and odd elements to bf16 (nearest, ties to even) and stores them interleaved as one line.</summary>
    /// <remarks>A NaN stays a NaN: every NaN in these sums was read from bf16 or is the processor's default NaN, so
    /// its lower 16 bits are zero and the rounding bias (at most 0x8000) cannot carry into the exponent.</remarks>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreLine(Vector512<float> even, Vector512<float> odd, uint* destination) =>
        (FastDequantize.RoundToBf16(even) | (FastDequantize.RoundToBf16(odd) << 16)).Store(destination);

    /// <summary>scores ← exp(scores − max); returns their sum.</summary>
    private static float Softmax(float* scores, int n, float max)
    {
        int t = 0;
        var vmax = Vector512.Create(max);
        var acc = Vector512<float>.Zero;
        for (; t + 16 <= n; t += 16)
        {
            var e = Vector512.Exp(Vector512.Load(scores + t) - vmax);
            e.Store(scores + t);
            acc += e;
        }
        float sum = Vector512.Sum(acc);
        for (; t < n; t++)
        {
            float e = MathF.Exp(scores[t] - max);
            scores[t] = e;
            sum += e;
        }
        return sum;
    }

    private static float DotBf16(float* x, ushort* w, int k)
    {
        int i = 0;
        var a = Vector512<float>.Zero;
        for (; i + 16 <= k; i += 16) a = Avx512F.FusedMultiplyAdd(TensorMemory.LoadBFloat16(w + i), Avx512F.LoadVector512(x + i), a);
        float sum = Vector512.Sum(a);
        for (; i < k; i++) sum += x[i] * BitConverter.UInt32BitsToSingle((uint)w[i] << 16);
        return sum;
    }

    private static float DotF32(float* x, float* w, int k)
    {
        int i = 0;
        var a = Vector512<float>.Zero;
        for (; i + 16 <= k; i += 16) a = Avx512F.FusedMultiplyAdd(Avx512F.LoadVector512(w + i), Avx512F.LoadVector512(x + i), a);
        float sum = Vector512.Sum(a);
        for (; i < k; i++) sum += x[i] * w[i];
        return sum;
    }

    private static void AxpyBf16(float p, ushort* v, float* y, int k)
    {
        int i = 0;
        var vp = Vector512.Create(p);
        for (; i + 16 <= k; i += 16) Avx512F.FusedMultiplyAdd(TensorMemory.LoadBFloat16(v + i), vp, Avx512F.LoadVector512(y + i)).Store(y + i);
        for (; i < k; i++) y[i] += p * BitConverter.UInt32BitsToSingle((uint)v[i] << 16);
    }

    private static void AxpyF32(float p, float* v, float* y, int k)
    {
        int i = 0;
        var vp = Vector512.Create(p);
        for (; i + 16 <= k; i += 16) Avx512F.FusedMultiplyAdd(Avx512F.LoadVector512(v + i), vp, Avx512F.LoadVector512(y + i)).Store(y + i);
        for (; i < k; i++) y[i] += p * v[i];
    }
}
