using System.Buffers;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
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
/// the head-major cache keeps each head's keys and values contiguous, which this kernel streams. Everything is
/// computed in float32 and rounded once at the end, where the libtorch path rounds the scaled query, the scores and the
/// probabilities to the cache's type on the way: the result differs from it by at most a few units of the last place
/// of that type, and is closer to the exact value.
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
        using var q = query.reshape(b * heads, hd).to(ScalarType.Float32).contiguous();
        using var m = mask?.reshape(b, length).to(ScalarType.Bool).contiguous();
        using var output = empty(new[] { b * heads, hd }, dtype: ScalarType.Float32);
        var job = new Job
        {
            Query = (float*)Pointer(q),
            Keys = Pointer(keys),
            Values = Pointer(values),
            Bf16 = keys.dtype == ScalarType.BFloat16,
            Capacity = capacity,
            Length = (int)length,
            Heads = (int)heads,
            Groups = (int)groups,
            HeadDim = (int)hd,
            MaskValue = maskValue,
            Mask = m is null ? null : (byte*)Pointer(m),
            Scale = (float)(1.0 / norm),
            Coeff = (float)coeff,
            Output = (float*)Pointer(output),
        };
        int items = (int)(b * heads);
        if (items == 1) Head(job, 0);
        else Parallel.For(0, items, i => Head(job, i));
        return output.view(1, b, heads * hd).to(query.dtype);
    }

    /// <summary>Whether <see cref="Run"/> applies: CPU buffers of a supported type and layout.</summary>
    internal static bool Applies(Tensor query, Tensor keys, Tensor values, long length, Tensor? mask) =>
        IsSupported && keys.device_type == DeviceType.CPU && query.device_type == DeviceType.CPU &&
        keys.dtype is ScalarType.BFloat16 or ScalarType.Float32 && values.dtype == keys.dtype &&
        keys.dim() == 4 && keys.is_contiguous() && values.is_contiguous() && values.shape.SequenceEqual(keys.shape) &&
        query.dim() == 4 && query.shape[0] == 1 && query.shape[1] == keys.shape[0] && query.shape[3] == keys.shape[3] &&
        query.shape[2] % keys.shape[1] == 0 && length <= int.MaxValue &&
        (mask is null || (mask.device_type == DeviceType.CPU && mask.numel() == keys.shape[0] * length));

    private struct Job
    {
        public float* Query;
        public nint Keys, Values;
        public bool Bf16;
        public long Capacity;
        public int Length, Heads, Groups, HeadDim;
        public byte* Mask;
        public float Scale, Coeff, MaskValue;
        public float* Output;
    }

    private static nint Pointer(Tensor t)
    {
        fixed (byte* p = &MemoryMarshal.GetReference(t.bytes)) return (nint)p;
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    private static void Head(in Job j, int item)
    {
        int hd = j.HeadDim, n = j.Length;
        int sequence = item / j.Heads, head = item % j.Heads;
        int group = head / (j.Heads / j.Groups);              // the key/value group serving this head
        long start = ((long)sequence * j.Groups + group) * j.Capacity * hd;
        float* q = j.Query + (long)item * hd;
        float* output = j.Output + (long)item * hd;
        byte* mask = j.Mask is null ? null : j.Mask + (long)sequence * n;
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
        for (; i + 16 <= k; i += 16) a = Avx512F.FusedMultiplyAdd(WidenBf16(w + i), Avx512F.LoadVector512(x + i), a);
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
        for (; i + 16 <= k; i += 16) Avx512F.FusedMultiplyAdd(WidenBf16(v + i), vp, Avx512F.LoadVector512(y + i)).Store(y + i);
        for (; i < k; i++) y[i] += p * BitConverter.UInt32BitsToSingle((uint)v[i] << 16);
    }

    private static void AxpyF32(float p, float* v, float* y, int k)
    {
        int i = 0;
        var vp = Vector512.Create(p);
        for (; i + 16 <= k; i += 16) Avx512F.FusedMultiplyAdd(Avx512F.LoadVector512(v + i), vp, Avx512F.LoadVector512(y + i)).Store(y + i);
        for (; i < k; i++) y[i] += p * v[i];
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> WidenBf16(ushort* p) =>
        Avx512F.ShiftLeftLogical(Avx512F.ConvertToVector512UInt32(Vector256.Load(p)), 16).AsSingle();
}
