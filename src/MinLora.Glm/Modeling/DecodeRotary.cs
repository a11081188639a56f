using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using MinLora.Quantization;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Modeling;

/// <summary>
/// The decoding step between the fused projection and the attention kernel, in one pass: the rotary embedding of the
/// query and key (ChatGLM-6B's 2-D form, <see cref="Rotate"/>; ChatGLM2/3's and GLM-4's interleaved pairs,
/// <see cref="RotateV2"/>), the key and value written into the KV cache buffers, the rotated query returned.
/// </summary>
/// <remarks>
/// The libtorch path spends ~40 small ops per layer and step on this (the rotations, two concatenations and the cache
/// copies: about 5 ms per token at 28 layers on a 2-core Xeon VM). The arithmetic is libtorch's, op by op: each
/// product and the sum are rounded to bfloat16 as libtorch's bf16 kernels round them (in float32, then to nearest
/// even), so the results are identical to that path bit for bit.
/// </remarks>
internal static unsafe class DecodeRotary
{
    /// <summary>The head dimension this kernel handles (every ChatGLM-6B-architecture model's): two rotary halves of 64.</summary>
    private const int HeadDim = 128;

    private const int Half = 64;

    /// <summary>
    /// Whether <see cref="Rotate"/> applies: AVX-512, bf16 throughout, contiguous, one position, the fused projection
    /// [1, b, heads·3·128] (128-dim heads), tables [1, b, 1, 64] and cache buffers [b, heads, capacity, 128] with room
    /// at <paramref name="offset"/>.
    /// </summary>
    internal static bool Applies(Tensor projection, long heads, RotaryAngles angles, Tensor keys, Tensor values, long offset)
    {
        // Each shape is read once (a native call that allocates; this check runs per layer and step).
        if (!Avx512F.IsSupported || projection.device_type != DeviceType.CPU || projection.dtype != ScalarType.BFloat16 || !projection.is_contiguous() ||
            keys.dtype != ScalarType.BFloat16 || values.dtype != ScalarType.BFloat16 || keys.device_type != DeviceType.CPU ||
            !keys.is_contiguous() || !values.is_contiguous())
            return false;
        var m = projection.shape;
        var k = keys.shape;
        return heads > 0 && m.Length == 3 && m[0] == 1 && m[2] == heads * 3 * HeadDim && k.Length == 4 && values.shape.SequenceEqual(k) &&
            k[0] == m[1] && k[1] == heads && k[3] == HeadDim && offset >= 0 && offset < k[2] &&
            Table(angles.CosPosition, m[1]) && Table(angles.SinPosition, m[1]) && Table(angles.CosBlock, m[1]) && Table(angles.SinBlock, m[1]);
    }

    private static bool Table(Tensor t, long batch) =>
        t.dtype == ScalarType.BFloat16 && t.device_type == DeviceType.CPU && t.is_contiguous() && t.numel() == batch * Half;

    /// <summary>
    /// From the fused projection [1, b, heads·3·128] (per head: query, key, value; the model's
    /// <c>view(1, b, heads, 3·128)</c> without making it): rotates the query and key (first 64 dimensions by position,
    /// last 64 by block position, each as x·cos + rotate_half(x)·sin), writes the key and the value at
    /// <paramref name="offset"/> of the cache buffers and returns the rotated query [1, b, heads, 128].
    /// </summary>
    internal static Tensor Rotate(Tensor projection, long heads, RotaryAngles angles, Tensor keys, Tensor values, long offset)
    {
        long batch = projection.shape[1], capacity = keys.shape[2];
        var query = empty(new[] { 1, batch, heads, HeadDim }, dtype: ScalarType.BFloat16);
        var m = (ushort*)TensorMemory.Pointer(projection);
        var q = (ushort*)TensorMemory.Pointer(query);
        var k = (ushort*)TensorMemory.Pointer(keys);
        var v = (ushort*)TensorMemory.Pointer(values);
        var cp = (ushort*)TensorMemory.Pointer(angles.CosPosition);
        var sp = (ushort*)TensorMemory.Pointer(angles.SinPosition);
        var cb = (ushort*)TensorMemory.Pointer(angles.CosBlock);
        var sb = (ushort*)TensorMemory.Pointer(angles.SinBlock);
        for (long b = 0; b < batch; b++)
        {
            for (long h = 0; h < heads; h++)
            {
                ushort* source = m + (b * heads + h) * 3 * HeadDim;
                long cache = ((b * heads + h) * capacity + offset) * HeadDim;
                ushort* qOut = q + (b * heads + h) * HeadDim;
                RotateHalf(source, cp + b * Half, sp + b * Half, qOut);
                RotateHalf(source + Half, cb + b * Half, sb + b * Half, qOut + Half);
                RotateHalf(source + HeadDim, cp + b * Half, sp + b * Half, k + cache);
                RotateHalf(source + HeadDim + Half, cb + b * Half, sb + b * Half, k + cache + Half);
                Unsafe.CopyBlockUnaligned(v + cache, source + 2 * HeadDim, HeadDim * sizeof(ushort));
            }
        }
        GC.KeepAlive(projection);
        GC.KeepAlive(keys);
        GC.KeepAlive(values);
        GC.KeepAlive(angles);
        return query;
    }

    /// <summary>
    /// 64 values: out[i] = bf16(bf16(x[i]·cos[i]) + bf16(r[i]·sin[i])) with r = [−x[32..64), x[0..32)], as
    /// <c>x.mul(cos).add(rotate_half(x).mul(sin))</c> rounds in bf16 (negation is exact, and rounding to nearest even is
    /// symmetric, so −bf16(a·b) = bf16(−a·b)).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void RotateHalf(ushort* x, ushort* cos, ushort* sin, ushort* output)
    {
        var x0 = Load(x);
        var x1 = Load(x + 16);
        var x2 = Load(x + 32);
        var x3 = Load(x + 48);
        Store(output, Round(Round(x0 * Load(cos)) - Round(x2 * Load(sin))));
        Store(output + 16, Round(Round(x1 * Load(cos + 16)) - Round(x3 * Load(sin + 16))));
        Store(output + 32, Round(Round(x2 * Load(cos + 32)) + Round(x0 * Load(sin + 32))));
        Store(output + 48, Round(Round(x3 * Load(cos + 48)) + Round(x1 * Load(sin + 48))));
    }

    /// <summary>
    /// Whether <see cref="RotateV2"/> applies: AVX-512, bf16 throughout, contiguous, one position, 128-dim heads, the
    /// projection [1, b, (heads + 2·groups)·128], tables [1, b, r/2, 2] rotating the first r dimensions (r a multiple of
    /// 16, at most 128) and cache buffers [b, groups, capacity, 128] with room at <paramref name="offset"/>.
    /// </summary>
    internal static bool AppliesV2(Tensor mixed, Tensor angles, Tensor keys, Tensor values, long offset, int heads, int groups) =>
        Avx512F.IsSupported && mixed.device_type == DeviceType.CPU && mixed.dtype == ScalarType.BFloat16 && mixed.is_contiguous() &&
        mixed.dim() == 3 && mixed.shape[0] == 1 && mixed.shape[2] == (heads + 2L * groups) * HeadDim &&
        keys.dtype == ScalarType.BFloat16 && values.dtype == ScalarType.BFloat16 && keys.device_type == DeviceType.CPU &&
        keys.is_contiguous() && values.is_contiguous() && keys.dim() == 4 && values.shape.SequenceEqual(keys.shape) &&
        keys.shape[0] == mixed.shape[1] && keys.shape[1] == groups && keys.shape[3] == HeadDim && offset >= 0 && offset < keys.shape[2] &&
        angles.dtype == ScalarType.BFloat16 && angles.device_type == DeviceType.CPU && angles.is_contiguous() && angles.dim() == 4 &&
        angles.shape[0] == 1 && angles.shape[1] == mixed.shape[1] && angles.shape[3] == 2 && angles.shape[2] % 8 == 0 && angles.shape[2] > 0 && angles.shape[2] <= HeadDim / 2;

    /// <summary>
    /// From the projection [1, b, heads·128 | groups·128 | groups·128]: rotates the first r dimensions of each query
    /// head and key group in interleaved pairs (x₀·cos − x₁·sin, x₁·cos + x₀·sin, as <see cref="V2Rotary.Apply"/>
    /// rounds them in bf16), writes each key group and value group at <paramref name="offset"/> of the cache buffers
    /// and returns the query [1, b, heads, 128].
    /// </summary>
    internal static Tensor RotateV2(Tensor mixed, Tensor angles, Tensor keys, Tensor values, long offset, int heads, int groups)
    {
        long batch = mixed.shape[1], capacity = keys.shape[2], width = mixed.shape[2];
        int vectors = (int)angles.shape[2] / 8;                  // 8 pairs (16 values) per vector
        var query = empty(new[] { 1, batch, heads, (long)HeadDim }, dtype: ScalarType.BFloat16);
        var m = (ushort*)TensorMemory.Pointer(mixed);
        var q = (ushort*)TensorMemory.Pointer(query);
        var k = (ushort*)TensorMemory.Pointer(keys);
        var v = (ushort*)TensorMemory.Pointer(values);
        var a = (ushort*)TensorMemory.Pointer(angles);
        for (long b = 0; b < batch; b++)
        {
            ushort* row = m + b * width, table = a + b * angles.shape[2] * 2;
            for (int h = 0; h < heads; h++) RotatePairs(row + h * HeadDim, table, vectors, q + (b * heads + h) * HeadDim);
            for (int g = 0; g < groups; g++)
            {
                long cache = ((b * groups + g) * capacity + offset) * HeadDim;
                RotatePairs(row + (heads + g) * HeadDim, table, vectors, k + cache);
                Unsafe.CopyBlockUnaligned(v + cache, row + (heads + groups + g) * HeadDim, HeadDim * sizeof(ushort));
            }
        }
        GC.KeepAlive(mixed);
        GC.KeepAlive(angles);
        GC.KeepAlive(keys);
        GC.KeepAlive(values);
        return query;
    }

    private static readonly Vector512<int> EvenTwice = Vector512.Create(0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14);
    private static readonly Vector512<int> OddTwice = Vector512.Create(1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15);
    private static readonly Vector512<int> SwapPairs = Vector512.Create(1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    private static readonly Vector512<float> PairSigns = Vector512.Create(-1f, 1f, -1f, 1f, -1f, 1f, -1f, 1f, -1f, 1f, -1f, 1f, -1f, 1f, -1f, 1f);

    /// <summary>
    /// One 128-dim head: each pair (x₀, x₁) of the first 16·<paramref name="vectors"/> values becomes
    /// (bf16(bf16(x₀·c) − bf16(x₁·s)), bf16(bf16(x₁·c) + bf16(x₀·s))) with (c, s) from <paramref name="table"/>; the
    /// rest is copied.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void RotatePairs(ushort* x, ushort* table, int vectors, ushort* output)
    {
        for (int i = 0; i < vectors; i++)
        {
            var value = Load(x + 16 * i);
            var angle = Load(table + 16 * i);
            var product = Round(value * Avx512F.PermuteVar16x32(angle, EvenTwice));
            var cross = Round(Avx512F.PermuteVar16x32(value, SwapPairs) * Avx512F.PermuteVar16x32(angle, OddTwice));
            Store(output + 16 * i, Round(product + cross * PairSigns));
        }
        Unsafe.CopyBlockUnaligned(output + 16 * vectors, x + 16 * vectors, (uint)(HeadDim - 16 * vectors) * sizeof(ushort));
    }

    // Short names for TensorMemory's bf16 helpers in the arithmetic above.
    private static Vector512<float> Load(ushort* p) => TensorMemory.LoadBFloat16(p);

    private static Vector512<float> Round(Vector512<float> v) => TensorMemory.RoundedToBFloat16(v);

    private static void Store(ushort* p, Vector512<float> v) => TensorMemory.StoreBFloat16Values(p, v);
}
