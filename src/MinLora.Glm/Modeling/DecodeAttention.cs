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
    /// <param name="cores">The cores to plan the multi-query kernel's items for (default: this machine's).</param>
    /// <returns>The context [1, b, heads·hd] in the query's type.</returns>
    internal static Tensor Run(Tensor query, Tensor keys, Tensor values, long length, Tensor? mask, double norm, double coeff, float maskValue = -10000f, int? cores = null)
    {
        var shape = keys.shape;
        long b = shape[0], groups = shape[1], capacity = shape[2], hd = shape[3];
        long heads = query.shape[2];
        // The mask as [b, length] bool bytes: read in place when it is contiguous bool already (a decoding step's mask),
        // else converted (a reshape and a conversion are native tensors, ~15–25 µs each inside a decoding step).
        using var converted = mask is null || (mask.dtype == ScalarType.Bool && mask.is_contiguous()) ? null : mask.reshape(b, length).to(ScalarType.Bool).contiguous();
        var m = converted ?? mask;
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
            long perGroup = heads / groups;
            if (UsesGroupKernel(heads, groups))
            {
                job.GroupLanes = GroupLanes(b * groups, perGroup, cores ?? Environment.ProcessorCount);
                ForEachItem((int)(b * groups * ((perGroup + job.GroupLanes - 1) / job.GroupLanes)), i => Group128(job, i));
            }
            else
                ForEachItem(items, i => Head128(job, i));
            GC.KeepAlive(query);
            GC.KeepAlive(keys);
            GC.KeepAlive(values);
            GC.KeepAlive(mask);
            return result;
        }
        using var q = query.reshape(b * heads, hd).to(ScalarType.Float32).contiguous();
        using var output = empty(new[] { b * heads, hd }, dtype: ScalarType.Float32);
        job.Query = (float*)TensorMemory.Pointer(q);
        job.Output = (float*)TensorMemory.Pointer(output);
        ForEachItem(items, i => Head(job, i));
        GC.KeepAlive(keys);
        GC.KeepAlive(values);
        GC.KeepAlive(mask);
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
        query.device_type == DeviceType.CPU && Applies(query.shape, keys, values, length, mask);

    /// <summary>
    /// <see cref="Applies(Tensor, Tensor, Tensor, long, Tensor?)"/> for a CPU query of shape
    /// <paramref name="queryShape"/> that is yet to be made (a decoding step checks before it rotates the query, without
    /// making a view of the projection to check).
    /// </summary>
    internal static bool Applies(ReadOnlySpan<long> queryShape, Tensor keys, Tensor values, long length, Tensor? mask)
    {
        // Each shape is read once (a native call that allocates; this check runs per layer and step).
        if (!IsSupported || keys.device_type != DeviceType.CPU ||
            keys.dtype is not (ScalarType.BFloat16 or ScalarType.Float32) || values.dtype != keys.dtype ||
            !keys.is_contiguous() || !values.is_contiguous())
            return false;
        var k = keys.shape;
        var q = queryShape;
        return k.Length == 4 && values.shape.SequenceEqual(k) && q.Length == 4 && q[0] == 1 && q[1] == k[0] && q[3] == k[3] &&
            k[1] > 0 && q[2] % k[1] == 0 && length >= 1 && length <= k[2] && length <= int.MaxValue &&
            (mask is null || (mask.device_type == DeviceType.CPU && mask.numel() == k[0] * length));
    }

    private struct Job
    {
        public float* Query;
        public ushort* Query16;
        public nint Keys, Values;
        public bool Bf16;
        public long Capacity;
        public int Length, Heads, Groups, HeadDim, GroupLanes;
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

    /// <summary>Query heads per key/value head from which <see cref="Group128"/> serves them all in one pass (ChatGLM2/3
    /// and GLM-4 have 16). Below, each head streams the cache itself (<see cref="Head128"/>).</summary>
    private const int MinGroupHeads = 4;

    /// <summary>Query heads per pass of <see cref="Group128"/> at most: one float32 lane each.</summary>
    private const int Lanes = 16;

    /// <summary>Whether a 128-dim bf16 cache with <paramref name="heads"/> query heads over <paramref name="groups"/>
    /// key/value heads runs <see cref="Group128"/> (at least <see cref="MinGroupHeads"/> query heads per group).</summary>
    internal static bool UsesGroupKernel(long heads, long groups) => heads / groups >= MinGroupHeads;

    /// <summary>
    /// Query heads per <see cref="Group128"/> item: all of a group's (up to 16) in one pass when that gives every core
    /// an item; otherwise blocks of fewer, down to <see cref="MinGroupHeads"/> (a group's last block may hold fewer
    /// still), so that more cores share the step: at batch 1 ChatGLM2/3 and GLM-4 have only 2 groups. Each item then
    /// reads the group's cache again and does the full 16-lane arithmetic however few lanes it uses (at 4 lanes, four
    /// times the arithmetic of one 16-lane pass): a trade for many-core hosts, not measured on one.
    /// </summary>
    /// <param name="cacheItems">Sequences × key/value heads.</param>
    /// <param name="perGroup">Query heads per key/value head.</param>
    /// <param name="cores">The cores to keep busy.</param>
    internal static int GroupLanes(long cacheItems, long perGroup, int cores)
    {
        long blocks = (perGroup + Lanes - 1) / Lanes;
        if (cacheItems * blocks >= cores) return Lanes;
        long wanted = Math.Min((cores + cacheItems - 1) / cacheItems, Math.Max(blocks, perGroup / MinGroupHeads));
        return (int)Math.Min(Lanes, (perGroup + wanted - 1) / wanted);
    }

    /// <summary>Positions whose scores <see cref="Group128"/> computes together (independent accumulators).</summary>
    private const int ScoreBlock = 8;

    /// <summary>Positions per chunk of <see cref="Group128"/>'s value pass: 64 KB of bf16 values, which the pass reads
    /// once per 16 dimensions and so must stay in the core's cache.</summary>
    private const int ValueChunk = 256;

    /// <summary>
    /// Up to 16 query heads that share one 128-dim bf16 key/value head (multi-query attention), in one pass over it,
    /// with one float32 lane per query head: each key and value is read and widened once for all of them (where
    /// <see cref="Head128"/> would read the group's cache once per head), scores need no horizontal sums, and the
    /// softmax runs across heads. Item = (sequence, group, block of up to 16 heads: <see cref="GroupLanes"/>).
    /// </summary>
    /// <remarks>
    /// Dimensions are taken in the order the widening produces (each 32-element line's even elements, then its odd
    /// ones): the query is transposed into that order, and the value sums come out in it, which
    /// <see cref="StoreLine"/> interleaves back. The arithmetic is <see cref="Head128"/>'s (float32 from the bf16
    /// inputs, one rounding at the end) with the terms of each sum in another order.
    /// </remarks>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Group128(in Job j, int item)
    {
        int perGroup = j.Heads / j.Groups, lanes = j.GroupLanes, blocks = (perGroup + lanes - 1) / lanes;
        int block = item % blocks, cacheItem = item / blocks, sequence = cacheItem / j.Groups;
        int first = sequence * j.Heads + cacheItem % j.Groups * perGroup + block * lanes;   // query row of lane 0
        int count = Math.Min(lanes, perGroup - block * lanes);
        long start = (long)cacheItem * j.Capacity * LineHeadDim;
        uint* k = (uint*)((ushort*)j.Keys + start);
        uint* v = (uint*)((ushort*)j.Values + start);
        byte* mask = j.Mask is null ? null : j.Mask + (long)sequence * j.Length;
        int n = j.Length;
        const int Line = LineHeadDim / 2;                    // uints per position
        float[] rented = ArrayPool<float>.Shared.Rent((2 * Lanes + ScoreBlock) * LineHeadDim + n * Lanes);
        try
        {
            fixed (float* buffer = rented)
            {
                float* qt = buffer;                                  // [dimension][lane]: the scaled queries
                float* sums = qt + LineHeadDim * Lanes;              // [lane][dimension]: the value sums
                float* widened = sums + LineHeadDim * Lanes;         // [position][dimension]: a block of keys
                float* scores = widened + ScoreBlock * LineHeadDim;  // [position][lane]

                new Span<float>(qt, LineHeadDim * Lanes).Clear();
                for (int i = 0; i < count; i++)
                {
                    ushort* q = j.Query16 + (long)(first + i) * LineHeadDim;
                    for (int d = 0; d < LineHeadDim; d++)
                        qt[WidenedOrder(d) * Lanes + i] = BitConverter.UInt32BitsToSingle((uint)q[d] << 16) * j.Scale;
                }

                // Scores, masking and scaling as the reference: (q/norm·k, or the mask value where masked) × coeff.
                var coeff = Vector512.Create(j.Coeff);
                var maskedScore = Vector512.Create(j.MaskValue) * coeff;
                var max = Vector512.Create(float.NegativeInfinity);
                for (int t = 0; t < n; t += ScoreBlock)
                {
                    int m = Math.Min(ScoreBlock, n - t);
                    for (int p = 0; p < ScoreBlock; p++)
                    {
                        float* w = widened + p * LineHeadDim;
                        if (p >= m)
                        {
                            new Span<float>(w, LineHeadDim).Clear();
                            continue;
                        }
                        uint* row = k + (long)(t + p) * Line;
                        PrefetchPosition((byte*)(row + PrefetchPositions * Line));
                        for (int l = 0; l < LineHeadDim / 32; l++)
                        {
                            var x = Vector512.Load(row + l * 16);
                            Even(x).Store(w + l * 32);
                            Odd(x).Store(w + l * 32 + 16);
                        }
                    }
                    Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default;
                    Vector512<float> a4 = default, a5 = default, a6 = default, a7 = default;
                    for (int d = 0; d < LineHeadDim; d++)
                    {
                        var qd = Vector512.Load(qt + d * Lanes);
                        a0 = Avx512F.FusedMultiplyAdd(qd, Vector512.Create(widened[d]), a0);
                        a1 = Avx512F.FusedMultiplyAdd(qd, Vector512.Create(widened[LineHeadDim + d]), a1);
                        a2 = Avx512F.FusedMultiplyAdd(qd, Vector512.Create(widened[2 * LineHeadDim + d]), a2);
                        a3 = Avx512F.FusedMultiplyAdd(qd, Vector512.Create(widened[3 * LineHeadDim + d]), a3);
                        a4 = Avx512F.FusedMultiplyAdd(qd, Vector512.Create(widened[4 * LineHeadDim + d]), a4);
                        a5 = Avx512F.FusedMultiplyAdd(qd, Vector512.Create(widened[5 * LineHeadDim + d]), a5);
                        a6 = Avx512F.FusedMultiplyAdd(qd, Vector512.Create(widened[6 * LineHeadDim + d]), a6);
                        a7 = Avx512F.FusedMultiplyAdd(qd, Vector512.Create(widened[7 * LineHeadDim + d]), a7);
                    }
                    float* at = scores + t * Lanes;
                    byte* maskAt = mask is null ? null : mask + t;
                    max = Score(a0, 0, m, maskAt, at, coeff, maskedScore, max);
                    max = Score(a1, 1, m, maskAt, at, coeff, maskedScore, max);
                    max = Score(a2, 2, m, maskAt, at, coeff, maskedScore, max);
                    max = Score(a3, 3, m, maskAt, at, coeff, maskedScore, max);
                    max = Score(a4, 4, m, maskAt, at, coeff, maskedScore, max);
                    max = Score(a5, 5, m, maskAt, at, coeff, maskedScore, max);
                    max = Score(a6, 6, m, maskAt, at, coeff, maskedScore, max);
                    max = Score(a7, 7, m, maskAt, at, coeff, maskedScore, max);
                }

                // Softmax across positions, every lane (head) at once.
                var total = Vector512<float>.Zero;
                for (int t = 0; t < n; t++)
                {
                    var e = Vector512.Exp(Vector512.Load(scores + t * Lanes) - max);
                    e.Store(scores + t * Lanes);
                    total += e;
                }

                // context = Σ p_t · v_t, 16 dimensions (half a line) of all heads at a time, chunk by chunk.
                for (int t0 = 0; t0 < n; t0 += ValueChunk)
                {
                    int t1 = Math.Min(n, t0 + ValueChunk);
                    for (int half = 0; half < LineHeadDim / 16; half++)
                        SumValues(v + half / 2 * 16, (half & 1) != 0, half == 0, scores, t0, t1, sums + half * 16, t0 == 0);
                }

                float* totals = stackalloc float[Lanes];
                total.Store(totals);
                for (int i = 0; i < count; i++)
                {
                    var inv = Vector512.Create(1f / totals[i]);
                    float* sum = sums + i * LineHeadDim;
                    uint* output = (uint*)(j.Output16 + (long)(first + i) * LineHeadDim);
                    for (int l = 0; l < LineHeadDim / 32; l++)
                        StoreLine(Vector512.Load(sum + l * 32) * inv, Vector512.Load(sum + l * 32 + 16) * inv, output + l * 16);
                }
            }
        }
        finally
        {
            ArrayPool<float>.Shared.Return(rented);
        }
    }

    /// <summary>Stores position <paramref name="p"/> of a score block (if the block has it: <paramref name="m"/>
    /// positions) as the reference computes it, and returns the running maximum.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Score(Vector512<float> dot, int p, int m, byte* mask, float* scores, Vector512<float> coeff, Vector512<float> maskedScore, Vector512<float> max)
    {
        if (p >= m) return max;
        var s = mask is not null && mask[p] != 0 ? maskedScore : dot * coeff;
        s.Store(scores + p * Lanes);
        return Vector512.Max(max, s);
    }

    /// <summary>
    /// Adds Σ_t p[t, lane] · v_t over positions [t0, t1) to 16 dimensions of every lane's sum: the even (or odd)
    /// elements of one 32-element line of each value.
    /// </summary>
    /// <param name="line">Position t's line starts at <paramref name="line"/> + t·64 uints.</param>
    /// <param name="odd">Whether to take the line's odd elements rather than its even ones.</param>
    /// <param name="prefetch">Whether to prefetch whole positions ahead (the first of a chunk's passes; the others find
    /// the chunk in cache).</param>
    /// <param name="probabilities">[position][lane].</param>
    /// <param name="t0">The first position.</param>
    /// <param name="t1">One past the last position.</param>
    /// <param name="sums">Lane i's 16 sums at <paramref name="sums"/> + i·128.</param>
    /// <param name="fresh">Whether the sums start at zero rather than at what <paramref name="sums"/> holds.</param>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void SumValues(uint* line, bool odd, bool prefetch, float* probabilities, int t0, int t1, float* sums, bool fresh)
    {
        const int Line = LineHeadDim / 2, Stride = LineHeadDim;
        Vector512<float> r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11, r12, r13, r14, r15;
        if (fresh)
        {
            r0 = r1 = r2 = r3 = r4 = r5 = r6 = r7 = r8 = r9 = r10 = r11 = r12 = r13 = r14 = r15 = Vector512<float>.Zero;
        }
        else
        {
            r0 = Vector512.Load(sums); r1 = Vector512.Load(sums + Stride); r2 = Vector512.Load(sums + 2 * Stride);
            r3 = Vector512.Load(sums + 3 * Stride); r4 = Vector512.Load(sums + 4 * Stride);
            r5 = Vector512.Load(sums + 5 * Stride); r6 = Vector512.Load(sums + 6 * Stride);
            r7 = Vector512.Load(sums + 7 * Stride); r8 = Vector512.Load(sums + 8 * Stride);
            r9 = Vector512.Load(sums + 9 * Stride); r10 = Vector512.Load(sums + 10 * Stride);
            r11 = Vector512.Load(sums + 11 * Stride); r12 = Vector512.Load(sums + 12 * Stride);
            r13 = Vector512.Load(sums + 13 * Stride); r14 = Vector512.Load(sums + 14 * Stride);
            r15 = Vector512.Load(sums + 15 * Stride);
        }
        for (int t = t0; t < t1; t++)
        {
            uint* row = line + (long)t * Line;
            if (prefetch) PrefetchPosition((byte*)(row + PrefetchPositions * Line));
            var raw = Vector512.Load(row);
            var x = odd ? Odd(raw) : Even(raw);
            float* p = probabilities + t * Lanes;
            r0 = Avx512F.FusedMultiplyAdd(x, Vector512.Create(p[0]), r0);
            r1 = Avx512F.FusedMultiplyAdd(x, Vector512.Create(p[1]), r1);
            r2 = Avx512F.FusedMultiplyAdd(x, Vector512.Create(p[2]), r2);
            r3 = Avx512F.FusedMultiplyAdd(x, Vector512.Create(p[3]), r3);
            r4 = Avx512F.FusedMultiplyAdd(x, Vector512.Create(p[4]), r4);
            r5 = Avx512F.FusedMultiplyAdd(x, Vector512.Create(p[5]), r5);
            r6 = Avx512F.FusedMultiplyAdd(x, Vector512.Create(p[6]), r6);
            r7 = Avx512F.FusedMultiplyAdd(x, Vector512.Create(p[7]), r7);
            r8 = Avx512F.FusedMultiplyAdd(x, Vector512.Create(p[8]), r8);
            r9 = Avx512F.FusedMultiplyAdd(x, Vector512.Create(p[9]), r9);
            r10 = Avx512F.FusedMultiplyAdd(x, Vector512.Create(p[10]), r10);
            r11 = Avx512F.FusedMultiplyAdd(x, Vector512.Create(p[11]), r11);
            r12 = Avx512F.FusedMultiplyAdd(x, Vector512.Create(p[12]), r12);
            r13 = Avx512F.FusedMultiplyAdd(x, Vector512.Create(p[13]), r13);
            r14 = Avx512F.FusedMultiplyAdd(x, Vector512.Create(p[14]), r14);
            r15 = Avx512F.FusedMultiplyAdd(x, Vector512.Create(p[15]), r15);
        }
        r0.Store(sums); r1.Store(sums + Stride); r2.Store(sums + 2 * Stride); r3.Store(sums + 3 * Stride);
        r4.Store(sums + 4 * Stride); r5.Store(sums + 5 * Stride); r6.Store(sums + 6 * Stride);
        r7.Store(sums + 7 * Stride); r8.Store(sums + 8 * Stride); r9.Store(sums + 9 * Stride);
        r10.Store(sums + 10 * Stride); r11.Store(sums + 11 * Stride); r12.Store(sums + 12 * Stride);
        r13.Store(sums + 13 * Stride); r14.Store(sums + 14 * Stride); r15.Store(sums + 15 * Stride);
    }

    /// <summary>Where dimension <paramref name="d"/> of a 128-dim head lands when each 32-element line is widened as
    /// its 16 even elements then its 16 odd ones (<see cref="Even"/>, <see cref="Odd"/>).</summary>
    private static int WidenedOrder(int d) => (d & ~31) | ((d & 1) << 4) | ((d & 31) >> 1);

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
