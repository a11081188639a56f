using System.Buffers;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Quantization;

/// <summary>
/// Matrix-vector products for a few rows of float32 activations against the stored int8 / int4 weights, read in
/// place (no packed copy, no dequantized weight): y[r, n] = Σₖ x[r, k]·dequant(W)[n, k] (+ bias).
/// </summary>
/// <remarks>
/// <para>
/// Decoding one token reads every weight once, so it is bound by memory bandwidth as long as unpacking keeps up.
/// With float32 activations and AVX-512 one 16-byte load becomes 16 int32 lanes (<c>vpmovsxbd</c>/<c>vpmovzxbd</c>),
/// then float32 and one fused multiply-add: int8 costs 3 vector instructions per 16 weights, int4 7 per 32 weights
/// (both nibbles of a byte feed one lane each: the activations are de-interleaved once per call into even/odd halves
/// of each 32-column chunk so that a byte's high nibble meets column 2j and its low nibble 2j+1). With int8
/// activations <c>vpdpbusd</c> (AVX-VNNI) does the int8 products (4 instructions per 32 weights; 7 with
/// <c>vpabsb</c>/<c>vpsignb</c>/<c>vpmaddubsw</c>/<c>vpmaddwd</c> where the CPU lacks AVX-VNNI) and 512-bit
/// <c>vpmaddubsw</c>/<c>vpmaddwd</c> the int4 ones (9 per 128 weights).
/// </para>
/// <para>
/// bf16 weights, and int8/int4 weights with float32 activations: float32 arithmetic on the exact stored values, the
/// activations not rounded to bfloat16, so the result is closer to the float64 reference than libtorch's bf16 kernels.
/// int8 and int4 on AVX-512 CPUs: int8 activations by default (<see cref="Int8Dot{TDot}"/>, <see cref="Int4Dot{TDot}"/>). Per group the int4 sum is
/// Σ(u·x)·s + (z − 8·s)·Σx (u the unsigned nibble); ChatGLM's signed nibbles become u = q + 8 by flipping bit 3 of each
/// nibble (an XOR with 0x88, or in the VNNI loop one <c>vpternlogd</c> per nibble), one group per row and z = 0.
/// </para>
/// Work is split over output rows with <see cref="CpuParallel.For"/>; each block's weight rows are
/// contiguous, and the decoding kernels read its two halves at once (<see cref="TwoStreams"/>), so every core streams
/// two parts of the matrix.
/// </remarks>
internal static unsafe class CpuGemv
{
    private const int PrefetchBytes = 4096;

    /// <summary>
    /// The int4 VNNI loops and the bfloat16 loop prefetch into L2 (<c>prefetcht1</c>) two pages ahead: measured on the
    /// 2-core Xeon VM, 5–20 % faster than <c>prefetcht0</c> one page ahead over a 1.5 GB int4 matrix in five interleaved
    /// runs, and 1–14 % (median read rate, 8 of 8 interleaved pairs) over 3.2 GB of bfloat16 matrices (the L1 fill
    /// buffers are few; L2's queue holds more lines in flight).
    /// </summary>
    private const int L2PrefetchBytes = 8192;

    /// <summary>
    /// The bf16, int8 × int8 and ChatGLM int4 × int8 kernels take two weight rows half a block apart at once: two
    /// independent streams per core, and each activation load serves both rows. Measured on a 2-core Zen 5 VM with
    /// decode steps alternating between the two forms in one process (ChatGLM-6B, context 16 / 1,024): int4 0.82 /
    /// 0.79× the one-row time, bf16 0.85 / 0.89×, int8 0.95 / 1.03× (docs/measurements/cpu-model-6b.md); two rows side
    /// by side instead (one stream) were slower than one row. A field so that tests and the benchmark's A/B can take
    /// the one-row form; both forms give bit-identical outputs.
    /// </summary>
    internal static bool TwoStreams = true;

    /// <summary>True when this CPU runs the vectorised kernels (AVX-512 F/BW); elsewhere libtorch's kernels are used.</summary>
    internal static bool IsSupported => Avx512F.IsSupported && Avx512BW.IsSupported;

    /// <summary>
    /// An int8 per-row product. <paramref name="scales"/>: N float32; <paramref name="bias"/>: N float32 or null.
    /// With <paramref name="int8Activations"/> (and <see cref="Int8ActivationsSupported"/>) the activations are quantized
    /// per 32-column block and multiplied with integer dot products (<see cref="Int8Dot{TDot}"/>); otherwise float32
    /// on the exact stored values.
    /// </summary>
    internal static void Int8(float* x, int rows, int k, sbyte* w, float* scales, float* bias, float* y, int n, bool int8Activations = false)
    {
        if (int8Activations && Int8ActivationsSupported && k >= 32)
        {
            if (UseAvxVnni) Int8Dot<VnniDot>(x, rows, k, w, scales, bias, y, n);
            else Int8Dot<PairDot>(x, rows, k, w, scales, bias, y, n);
            return;
        }
        var job = new Job { X = x, Rows = rows, K = k, W = (byte*)w, Scales = scales, Bias = bias, Y = y, N = n };
        Run(ref job, &Int8Block);
    }

    /// <summary>
    /// An int4 product on packed nibbles [N, K/2] (even column in the high nibble). Grouped: scales and zeros are
    /// bfloat16 [N, K/group]; per row (ChatGLM, signed nibbles): <paramref name="rowScales"/> N float32 and group = K.
    /// </summary>
    internal static void Int4(float* x, int rows, int k, byte* w, int group, ushort* bf16Scales, ushort* bf16Zeros, float* rowScales, bool signedNibbles, float* bias, float* y, int n, bool int8Activations = false)
    {
        if (int8Activations && Int8ActivationsSupported && k >= 64 && (signedNibbles || group % 64 == 0))
        {
            if (UseAvxVnni) Int4Dot<VnniDot>(x, rows, k, w, group, bf16Scales, bf16Zeros, rowScales, signedNibbles, bias, y, n);
            else Int4Dot<PairDot>(x, rows, k, w, group, bf16Scales, bf16Zeros, rowScales, signedNibbles, bias, y, n);
            return;
        }
        // De-interleave each 32-column chunk of x into [16 even | 16 odd] and sum x over each group (the zero term).
        int chunks = k / 32, groups = k / group;
        var pool = ArrayPool<float>.Shared;
        float[] xd = pool.Rent(rows * chunks * 32 + 1);
        float[] sums = pool.Rent(rows * groups + 1);
        try
        {
            fixed (float* pd = xd, ps = sums)
            {
                Deinterleave(x, rows, k, pd);
                for (int r = 0; r < rows; r++)
                {
                    float* src = x + (long)r * k;
                    for (int g = 0; g < groups; g++)
                    {
                        double s = 0;
                        for (int j = g * group; j < (g + 1) * group; j++) s += src[j];
                        ps[r * groups + g] = (float)s;
                    }
                }
                var job = new Job
                {
                    X = x,
                    Xd = pd,
                    Sums = ps,
                    Rows = rows,
                    K = k,
                    W = w,
                    Group = group,
                    Bf16Scales = bf16Scales,
                    Bf16Zeros = bf16Zeros,
                    Scales = rowScales,
                    Signed = signedNibbles,
                    Bias = bias,
                    Y = y,
                    N = n,
                };
                Run(ref job, &Int4Block);
            }
        }
        finally
        {
            pool.Return(xd);
            pool.Return(sums);
        }
    }

    /// <summary>Each row's full 32-column chunks of x as [16 even | 16 odd] into <paramref name="dst"/> [rows, k/32·32].</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Deinterleave(float* x, int rows, int k, float* dst)
    {
        int chunks = k / 32;
        for (int r = 0; r < rows; r++)
        {
            float* src = x + (long)r * k;
            float* d = dst + (long)r * chunks * 32;
            for (int c = 0; c < chunks; c++)
            {
                var v0 = Vector512.Load(src + c * 32);
                var v1 = Vector512.Load(src + c * 32 + 16);
                Avx512F.PermuteVar16x32x2(v0, EvenLanes, v1).Store(d + c * 32);
                Avx512F.PermuteVar16x32x2(v0, OddLanes, v1).Store(d + c * 32 + 16);
            }
        }
    }

    /// <summary>
    /// True when the int8-activation kernels (int4 × int8 and int8 × int8) can run: AVX-512 F/BW, AVX2, and AVX-512VL for
    /// the int4 loop's <c>vpternlogd</c>. AVX-VNNI is used where present (<see cref="UseAvxVnni"/>), not required.
    /// </summary>
    internal static bool Int8ActivationsSupported => IsSupported && Avx2.IsSupported && Avx512F.VL.IsSupported;

    /// <summary>
    /// Whether the 256-bit byte products use AVX-VNNI's <c>vpdpbusd</c> (<see cref="VnniDot"/>) or
    /// <c>vpmaddubsw</c> + <c>vpmaddwd</c> (<see cref="PairDot"/>; CPUs with AVX-512 VNNI but not the VEX-encoded
    /// AVX-VNNI, such as AMD Zen 4, since .NET 10 reaches 512-bit <c>vpdpbusd</c> only through AVX10). Defaults to
    /// what the CPU has; tests turn it off to run the second form on CPUs that have both.
    /// </summary>
    /// <exception cref="PlatformNotSupportedException">Set to true on a CPU without AVX-VNNI.</exception>
    internal static bool UseAvxVnni
    {
        get => s_useAvxVnni;
        set => s_useAvxVnni = !value || AvxVnni.IsSupported ? value : throw new PlatformNotSupportedException("this CPU has no AVX-VNNI");
    }

    private static bool s_useAvxVnni = AvxVnni.IsSupported;

    /// <summary>The 256-bit byte products of the int8-activation kernels (see <see cref="UseAvxVnni"/>).</summary>
    private interface IByteDot
    {
        /// <summary>acc + Σ of each int32 lane's 4 adjacent products u·x; u ≤ 15 (a nibble).</summary>
        static abstract Vector256<int> Nibbles(Vector256<int> acc, Vector256<byte> u, Vector256<sbyte> x);

        /// <summary>Σ of each int32 lane's 4 adjacent products (w + <see cref="Int8Offset"/>)·x, for int8 weights w and
        /// activations |x| ≤ 127.</summary>
        static abstract Vector256<int> Int8(Vector256<sbyte> w, Vector256<sbyte> x);

        /// <summary>What <see cref="Int8"/> adds to each weight: 128 where the weights are flipped to unsigned.</summary>
        static abstract float Int8Offset { get; }
    }

    /// <summary>AVX-VNNI: one <c>vpdpbusd</c>, which takes one unsigned operand, so int8 weights are flipped to w + 128
    /// by an XOR with 0x80 (the kernel takes 128·Σx off again).</summary>
    private readonly struct VnniDot : IByteDot
    {
        public static Vector256<int> Nibbles(Vector256<int> acc, Vector256<byte> u, Vector256<sbyte> x) => AvxVnni.MultiplyWideningAndAdd(acc, u, x);

        public static Vector256<int> Int8(Vector256<sbyte> w, Vector256<sbyte> x) =>
            AvxVnni.MultiplyWideningAndAdd(Vector256<int>.Zero, w.AsByte() ^ Vector256.Create((byte)0x80), x);

        public static float Int8Offset => 128f;
    }

    /// <summary>
    /// AVX2: <c>vpmaddubsw</c> (unsigned × signed bytes, adjacent pairs added in int16, saturating) then <c>vpmaddwd</c>
    /// with ones (pairs of those added in int32): the same int32 lanes as <c>vpdpbusd</c> wherever no pair sum passes
    /// 32,767. Nibbles: at most 2·15·127. int8 weights: |w| as the unsigned operand and x with w's sign as the signed
    /// one (<c>vpabsb</c>, <c>vpsignb</c>): at most 2·128·127, and no offset.
    /// </summary>
    private readonly struct PairDot : IByteDot
    {
        public static Vector256<int> Nibbles(Vector256<int> acc, Vector256<byte> u, Vector256<sbyte> x) =>
            acc + Avx2.MultiplyAddAdjacent(Avx2.MultiplyAddAdjacent(u, x), Vector256.Create((short)1));

        public static Vector256<int> Int8(Vector256<sbyte> w, Vector256<sbyte> x) =>
            Avx2.MultiplyAddAdjacent(Avx2.MultiplyAddAdjacent(Avx2.Abs(w), Avx2.Sign(x, w)), Vector256.Create((short)1));

        public static float Int8Offset => 0f;
    }

    /// <summary>
    /// int4 × int8: the activations are quantized per 32-column block (symmetric, scale max|x|/127, round to nearest),
    /// then integer dot products multiply the unsigned nibbles by the signed activations into int32 lanes: per 128
    /// columns 512-bit <c>vpmaddubsw</c>/<c>vpmaddwd</c> (<see cref="QuadSum"/>, 9 instructions), per remaining 64
    /// 256-bit products through <typeparamref name="TDot"/> (<c>vpdpbusd</c>: 7 per 64; without AVX-VNNI
    /// <c>vpmaddubsw</c> + <c>vpmaddwd</c>: 9), against 14 per 64 with float32 conversion. The error this adds is at most
    /// max|x_block|/254 per activation (measured in the tests against that bound and in the model benchmark).
    /// Columns past the last full 64 (ChatGLM per-row layers only) are computed exactly in float32.
    /// </summary>
    private static void Int4Dot<TDot>(float* x, int rows, int k, byte* w, int group, ushort* bf16Scales, ushort* bf16Zeros, float* rowScales, bool signedNibbles, float* bias, float* y, int n)
        where TDot : struct, IByteDot
    {
        int pairs = k / 64;                         // 64-column pairs of 32-column blocks, 32 packed bytes each
        int groups = signedNibbles ? 1 : k / group;
        int pairsPerGroup = signedNibbles ? pairs : group / 64;
        // 128-column quads (the 512-bit loop) where no weight group splits one: ChatGLM rows, groups of 128·m columns.
        int quads = signedNibbles || pairsPerGroup % 2 == 0 ? pairs / 2 : 0;
        var bytePool = ArrayPool<sbyte>.Shared;
        var floatPool = ArrayPool<float>.Shared;
        sbyte[] xq = bytePool.Rent(rows * pairs * 64 + 64);
        float[] scales = floatPool.Rent(rows * pairs * 8 + 8);
        float[] qsums = floatPool.Rent(rows * groups + 1);
        float[] tails = floatPool.Rent(rows + 1);
        try
        {
            fixed (sbyte* pq = xq)
            fixed (float* ps = scales, pqs = qsums, pt = tails)
            {
                for (int r = 0; r < rows; r++)
                    QuantizeRow(x + (long)r * k, k, pairs, quads, pairsPerGroup, groups, pq + (long)r * pairs * 64, ps + (long)r * pairs * 8, pqs + (long)r * groups, pt + r);
                var job = new Job
                {
                    X = x,
                    Xq = pq,
                    XScales = ps,
                    Sums = pqs,
                    Tails = pt,
                    Quads = quads,
                    Rows = rows,
                    K = k,
                    W = w,
                    Group = group,
                    Bf16Scales = bf16Scales,
                    Bf16Zeros = bf16Zeros,
                    Scales = rowScales,
                    Signed = signedNibbles,
                    Bias = bias,
                    Y = y,
                    N = n,
                };
                if (signedNibbles) Run(ref job, &Int4DotBlock<TDot>);
                else Run(ref job, &Int4GroupedBlock<TDot>);
            }
        }
        finally
        {
            bytePool.Return(xq);
            floatPool.Return(scales);
            floatPool.Return(qsums);
            floatPool.Return(tails);
        }
    }

    /// <summary>
    /// One row of activations → per 64-column pair: 32 int8 of the even columns [block a | block b], 32 of the odd
    /// columns, the 8-lane scale vector [s_a ×4 | s_b ×4]; per weight group Σ s_block·Σ xq (the offset-8 correction,
    /// taken from the quantized values so that it cancels exactly); the exact float sum of the tail columns. The first
    /// <paramref name="quads"/> pairs of pairs are laid out for the 512-bit loop instead: per 128 columns 64 int8 of the
    /// even columns [a | b | c | d], then 64 of the odd columns (the scales are laid out alike either way).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void QuantizeRow(float* x, int k, int pairs, int quads, int pairsPerGroup, int groups, sbyte* q, float* scales, float* qsums, float* tail)
    {
        for (int g = 0; g < groups; g++) qsums[g] = 0;
        for (int p = 0; p < pairs; p++)
        {
            for (int half = 0; half < 2; half++)
            {
                // A pair inside a quad: its even bytes at 32·(p mod 2) of the quad's first 64, its odd bytes 64 further.
                sbyte* even = p < 2 * quads ? q + p / 2 * 128 + p % 2 * 32 + half * 16 : q + p * 64 + half * 16;
                var (scale, qsum) = QuantizeBlock(x + p * 64 + half * 32, even, even + (p < 2 * quads ? 64 : 32));
                Vector128.Create(scale).Store(scales + p * 8 + half * 4);
                qsums[p / pairsPerGroup] += scale * qsum;
            }
        }
        double t = 0;
        for (int j = pairs * 64; j < k; j++) t += x[j];
        tail[0] = (float)t;
    }

    private static readonly Vector512<int> EvenLanes = Vector512.Create(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    private static readonly Vector512<int> OddLanes = Vector512.Create(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);

    /// <summary>
    /// One 32-column block (see <see cref="Int8Scale"/>): q = round(x·Pre·Inverse), nearest even as
    /// <see cref="MathF.Round(float)"/> (<c>vcvtps2dq</c> under the default rounding mode), the even columns' 16 codes to
    /// <paramref name="even"/> and the odd ones' to <paramref name="odd"/>, or all 32 in column order to
    /// <paramref name="even"/> when <paramref name="odd"/> is null. Returns the scale and Σq. A block holding NaN or ±∞
    /// gets a NaN or infinite scale, which reaches every output it feeds.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static (float Scale, int Sum) QuantizeBlock(float* src, sbyte* even, sbyte* odd)
    {
        var v0 = Vector512.Load(src);
        var v1 = Vector512.Load(src + 16);
        float amax = HorizontalMax(Vector512.Max(Vector512.Abs(v0), Vector512.Abs(v1)));   // NaN-propagating maxima
        var (scale, pre, inv) = Int8Scale(amax);
        var vp = Vector512.Create(pre);
        var vi = Vector512.Create(inv);
        var i0 = Avx512F.ConvertToVector512Int32(v0 * vp * vi);
        var i1 = Avx512F.ConvertToVector512Int32(v1 * vp * vi);
        if (odd == null)
        {
            Avx512F.ConvertToVector128SByte(i0).Store(even);
            Avx512F.ConvertToVector128SByte(i1).Store(even + 16);
        }
        else
        {
            Avx512F.ConvertToVector128SByte(Avx512F.PermuteVar16x32x2(i0, EvenLanes, i1)).Store(even);
            Avx512F.ConvertToVector128SByte(Avx512F.PermuteVar16x32x2(i0, OddLanes, i1)).Store(odd);
        }
        // inv is 0 for a NaN or infinite block: its codes are then 0 and not summed (the scale carries the NaN or ∞).
        return (scale, inv > 0 ? Vector512.Sum(i0 + i1) : 0);
    }

    /// <summary>The largest lane; NaN when any lane is NaN.</summary>
    internal static float HorizontalMax(Vector512<float> v)
    {
        var m = Vector256.Max(v.GetLower(), v.GetUpper());
        var h = Vector128.Max(m.GetLower(), m.GetUpper());
        return MathF.Max(MathF.Max(h[0], h[1]), MathF.Max(h[2], h[3]));
    }

    /// <summary>The product body: float32 x [rows, K], bias N float32 or null, float32 y [rows, N].</summary>
    internal delegate void Body(float* x, int rows, float* bias, float* y);

    /// <summary>
    /// Runs <paramref name="body"/> on <paramref name="input"/> [..., K] as float32 and returns [..., <paramref name="n"/>]
    /// in the input's type (the one conversion path for every caller of these kernels). float32 and bfloat16 inputs,
    /// bias and result are converted by the vector loops of <see cref="TensorMemory"/> (a decoding step makes ~115
    /// of these calls; libtorch's conversions cost ~30 µs per call); other types go through libtorch.
    /// </summary>
    internal static Tensor Apply(Tensor input, long k, long n, Tensor? bias, Body body)
    {
        var type = input.dtype;
        if (type is not (ScalarType.Float32 or ScalarType.BFloat16) || input.device_type != DeviceType.CPU)
            return ApplyConverted(input, k, n, bias, body);
        long rows = input.numel() / k;
        var shape = input.shape;
        shape[^1] = n;
        var result = empty(shape, dtype: type);
        using var x = Float32Values.Of(input);
        using var b = bias is null ? default : Float32Values.Of(bias);
        float* y = type == ScalarType.Float32 ? (float*)TensorMemory.Pointer(result) : TensorMemory.Scratch(rows * n);
        try
        {
            body(x.Pointer, (int)rows, b.Pointer, y);
            if (type == ScalarType.BFloat16) TensorMemory.NarrowToBFloat16(y, (ushort*)TensorMemory.Pointer(result), rows * n);
        }
        finally
        {
            if (type == ScalarType.BFloat16) TensorMemory.Free(y);
        }
        GC.KeepAlive(input);
        GC.KeepAlive(bias);
        return result;
    }

    private static Tensor ApplyConverted(Tensor input, long k, long n, Tensor? bias, Body body)
    {
        using var scope = NewDisposeScope();
        long rows = input.numel() / k;
        var x = input.reshape(rows, k).to(ScalarType.Float32).contiguous();
        var y = empty(new long[] { rows, n }, dtype: ScalarType.Float32);
        var b = bias is null ? null : bias.detach().to(ScalarType.Float32).contiguous();
        body((float*)TensorMemory.Pointer(x), (int)rows, b is null ? null : (float*)TensorMemory.Pointer(b), (float*)TensorMemory.Pointer(y));
        GC.KeepAlive(x);
        GC.KeepAlive(b);
        var shape = input.shape.ToArray();
        shape[^1] = n;
        var result = y.reshape(shape);
        return (result.dtype == input.dtype ? result : result.to(input.dtype)).MoveToOuterDisposeScope();
    }

    private struct Job
    {
        public float* X, Xd, Sums, Scales, Bias, Y, XScales, Tails;
        public sbyte* Xq;
        public byte* W;
        public ushort* Xb;
        public ushort* Bf16Scales, Bf16Zeros;
        public int Rows, K, N, Group, Quads;
        public bool Signed;
    }

    /// <summary>
    /// Parallel blocks per core in a product (each at least 16 output rows): the cores claim them one at a time, so a
    /// core that falls behind (another process, a descheduled vCPU) holds the call up by at most one block. A field so
    /// that the benchmark's A/B can take another count (1 to 64); every count gives bit-identical outputs. Measured on
    /// the 2-core Zen 5 VM (ChatGLM-6B int4 decode, steps alternating): 1, 2 and 8 per core within the host's noise.
    /// </summary>
    internal static int BlocksPerCore = 2;

    private static void Run(ref Job job, delegate*<in Job, int, int, void> block)
    {
        // Blocks of ≥ 16 output rows, BlocksPerCore per core so a core taken by another process does not hold the call up.
        int n = job.N;
        int blocks = Math.Max(1, Math.Min(Environment.ProcessorCount * Math.Clamp(BlocksPerCore, 1, 64), n / 16));
        if (blocks == 1)
        {
            block(job, 0, n);
            return;
        }
        var copy = job;
        nint fn = (nint)block;
        int per = (n + blocks - 1) / blocks;
        CpuParallel.For(blocks, b =>
        {
            int n0 = b * per, n1 = Math.Min(n, n0 + per);
            if (n0 < n1) ((delegate*<in Job, int, int, void>)fn)(copy, n0, n1);
        });
    }

    /// <summary>
    /// int8 × int8: the activations are quantized per 32-column block (symmetric, max|x|/127, round to nearest even)
    /// and each 32 weights meet their block in one <c>vpdpbusd</c>, which wants one unsigned operand: the weights are
    /// flipped to w + 128 by an XOR with 0x80 and Σ_b 128·s_b·Σxq_b is taken off again at the end (from the quantized
    /// values, so only float32 rounding of that sum remains: far below the activations' own rounding). 4 instructions
    /// per 32 weights against 6 for float32 conversion; measured over a
    /// 1.5 GB int8 matrix set on the 2-core Xeon VM: 14.4 against 12.5 GB/s. Added error: at most max|x_block|/254 per
    /// activation. Columns past the last full block are computed exactly in float32. Without AVX-VNNI
    /// (<see cref="PairDot"/>) the same integer sums come from the signed weights with no offset.
    /// </summary>
    private static void Int8Dot<TDot>(float* x, int rows, int k, sbyte* w, float* scales, float* bias, float* y, int n)
        where TDot : struct, IByteDot
    {
        int blocks = k / 32;
        var bytePool = ArrayPool<sbyte>.Shared;
        var floatPool = ArrayPool<float>.Shared;
        sbyte[] xq = bytePool.Rent(rows * blocks * 32 + 32);
        float[] xs = floatPool.Rent(rows * blocks + 1);
        float[] offsets = floatPool.Rent(rows + 1);
        try
        {
            fixed (sbyte* pq = xq)
            fixed (float* ps = xs, po = offsets)
            {
                for (int r = 0; r < rows; r++)
                    po[r] = TDot.Int8Offset * QuantizeBlocks(x + (long)r * k, blocks, pq + (long)r * blocks * 32, ps + (long)r * blocks);
                var job = new Job { X = x, Xq = pq, XScales = ps, Sums = po, Rows = rows, K = k, W = (byte*)w, Scales = scales, Bias = bias, Y = y, N = n };
                Run(ref job, &Int8DotBlock<TDot>);
            }
        }
        finally
        {
            bytePool.Return(xq);
            floatPool.Return(xs);
            floatPool.Return(offsets);
        }
    }

    /// <summary>
    /// The symmetric int8 quantizer of values whose largest magnitude is <paramref name="amax"/>: scale max/127 and
    /// q = round(v·Pre·Inverse). Pre is 1, or 2⁶⁴ (exact) when 127/amax would overflow float32 (amax below ~3.7e-37);
    /// Inverse is 0 for an all-zero block.
    /// </summary>
    internal static (float Scale, float Pre, float Inverse) Int8Scale(float amax)
    {
        float pre = amax < 1e-30f ? 18446744073709551616f : 1f; // 2⁶⁴
        return (amax / 127f, pre, amax > 0 ? 127f / (amax * pre) : 0f);
    }

    /// <summary>One row of activations → int8 per 32-column block in column order and the block scales; returns Σ_b s_b·Σ xq_b.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static float QuantizeBlocks(float* x, int blocks, sbyte* q, float* scales)
    {
        float total = 0;
        for (int b = 0; b < blocks; b++)
        {
            var (scale, sum) = QuantizeBlock(x + b * 32, q + b * 32, null);
            scales[b] = scale;
            total += scale * sum;
        }
        return total;
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Int8DotBlock<TDot>(in Job j, int n0, int n1)
        where TDot : struct, IByteDot
    {
        int k = j.K, blocks = k / 32;
        int split = TwoStreams ? (n1 - n0) / 2 : 0;
        for (int i = 0; i < split; i++)
        {
            // Two rows half a block apart: two independent streams per core (see TwoStreams).
            int na = n0 + i, nb = n0 + split + i;
            sbyte* wa = (sbyte*)j.W + (long)na * k, wb = (sbyte*)j.W + (long)nb * k;
            for (int r = 0; r < j.Rows; r++)
            {
                float dotA = Int8RowDot2<TDot>(wa, wb, j.Xq + (long)r * blocks * 32, j.XScales + (long)r * blocks, blocks, out float dotB) - j.Sums[r];
                dotB -= j.Sums[r];
                float* x = j.X + (long)r * k;
                for (int c = blocks * 32; c < k; c++)
                {
                    dotA += x[c] * wa[c];
                    dotB += x[c] * wb[c];
                }
                j.Y[(long)r * j.N + na] = dotA * j.Scales[na] + (j.Bias == null ? 0f : j.Bias[na]);
                j.Y[(long)r * j.N + nb] = dotB * j.Scales[nb] + (j.Bias == null ? 0f : j.Bias[nb]);
            }
        }
        for (int n = n0 + 2 * split; n < n1; n++)
        {
            sbyte* w = (sbyte*)j.W + (long)n * k;
            float b = j.Bias == null ? 0f : j.Bias[n];
            for (int r = 0; r < j.Rows; r++)
            {
                float dot = Int8RowDot<TDot>(w, j.Xq + (long)r * blocks * 32, j.XScales + (long)r * blocks, blocks) - j.Sums[r];
                float* x = j.X + (long)r * k;
                for (int c = blocks * 32; c < k; c++) dot += x[c] * w[c];
                j.Y[(long)r * j.N + n] = dot * j.Scales[n] + b;
            }
        }
    }

    /// <summary>Σ_b s_b·Σ((w + offset)·xq) over the full 32-column blocks of one int8 row, two blocks per iteration
    /// (offset: <see cref="IByteDot.Int8Offset"/>).</summary>
    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    private static float Int8RowDot<TDot>(sbyte* w, sbyte* xq, float* xs, int blocks)
        where TDot : struct, IByteDot
    {
        Vector256<float> f0 = default, f1 = default;
        int b = 0;
        for (; b + 2 <= blocks; b += 2)
        {
            Sse.Prefetch1((byte*)w + b * 32 + L2PrefetchBytes);
            var a0 = TDot.Int8(Vector256.Load(w + b * 32), Vector256.Load(xq + b * 32));
            var a1 = TDot.Int8(Vector256.Load(w + b * 32 + 32), Vector256.Load(xq + b * 32 + 32));
            f0 = Fma.MultiplyAdd(Avx.ConvertToVector256Single(a0), Vector256.Create(xs[b]), f0);
            f1 = Fma.MultiplyAdd(Avx.ConvertToVector256Single(a1), Vector256.Create(xs[b + 1]), f1);
        }
        if (b < blocks)
        {
            var a0 = TDot.Int8(Vector256.Load(w + b * 32), Vector256.Load(xq + b * 32));
            f0 = Fma.MultiplyAdd(Avx.ConvertToVector256Single(a0), Vector256.Create(xs[b]), f0);
        }
        return Vector256.Sum(f0 + f1);
    }

    /// <summary><see cref="Int8RowDot{TDot}"/> for two rows at once against the same activations (loaded once for
    /// both); each row summed in the same order as the one-row form.</summary>
    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    private static float Int8RowDot2<TDot>(sbyte* w0, sbyte* w1, sbyte* xq, float* xs, int blocks, out float second)
        where TDot : struct, IByteDot
    {
        Vector256<float> f0 = default, f1 = default, g0 = default, g1 = default;
        int b = 0;
        for (; b + 2 <= blocks; b += 2)
        {
            Sse.Prefetch1((byte*)w0 + b * 32 + L2PrefetchBytes);
            Sse.Prefetch1((byte*)w1 + b * 32 + L2PrefetchBytes);
            var x0 = Vector256.Load(xq + b * 32);
            var x1 = Vector256.Load(xq + b * 32 + 32);
            var s0 = Vector256.Create(xs[b]);
            var s1 = Vector256.Create(xs[b + 1]);
            f0 = Fma.MultiplyAdd(Avx.ConvertToVector256Single(TDot.Int8(Vector256.Load(w0 + b * 32), x0)), s0, f0);
            f1 = Fma.MultiplyAdd(Avx.ConvertToVector256Single(TDot.Int8(Vector256.Load(w0 + b * 32 + 32), x1)), s1, f1);
            g0 = Fma.MultiplyAdd(Avx.ConvertToVector256Single(TDot.Int8(Vector256.Load(w1 + b * 32), x0)), s0, g0);
            g1 = Fma.MultiplyAdd(Avx.ConvertToVector256Single(TDot.Int8(Vector256.Load(w1 + b * 32 + 32), x1)), s1, g1);
        }
        if (b < blocks)
        {
            var x0 = Vector256.Load(xq + b * 32);
            var s0 = Vector256.Create(xs[b]);
            f0 = Fma.MultiplyAdd(Avx.ConvertToVector256Single(TDot.Int8(Vector256.Load(w0 + b * 32), x0)), s0, f0);
            g0 = Fma.MultiplyAdd(Avx.ConvertToVector256Single(TDot.Int8(Vector256.Load(w1 + b * 32), x0)), s0, g0);
        }
        second = Vector256.Sum(g0 + g1);
        return Vector256.Sum(f0 + f1);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Int8Block(in Job j, int n0, int n1)
    {
        int k = j.K;
        for (int n = n0; n < n1; n++)
        {
            sbyte* w = (sbyte*)j.W + (long)n * k;
            float scale = j.Scales[n], b = j.Bias == null ? 0f : j.Bias[n];
            for (int r = 0; r < j.Rows; r++)
                j.Y[(long)r * j.N + n] = Dot8(j.X + (long)r * k, w, k) * scale + b;
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization | MethodImplOptions.NoInlining)]
    private static float Dot8(float* x, sbyte* w, int k)
    {
        int i = 0;
        float sum = 0;
        if (IsSupported)
        {
            Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default;
            for (; i + 64 <= k; i += 64)
            {
                // Measured on a 2-core Xeon VM: the hardware prefetcher alone reaches ~60 % of a plain read here;
                // a software prefetch one page ahead lifts the stream to the plain-read rate.
                Sse.Prefetch0(w + i + PrefetchBytes);
                a0 = Avx512F.FusedMultiplyAdd(Widen8(w + i), Avx512F.LoadVector512(x + i), a0);
                a1 = Avx512F.FusedMultiplyAdd(Widen8(w + i + 16), Avx512F.LoadVector512(x + i + 16), a1);
                a2 = Avx512F.FusedMultiplyAdd(Widen8(w + i + 32), Avx512F.LoadVector512(x + i + 32), a2);
                a3 = Avx512F.FusedMultiplyAdd(Widen8(w + i + 48), Avx512F.LoadVector512(x + i + 48), a3);
            }
            for (; i + 16 <= k; i += 16)
                a0 = Avx512F.FusedMultiplyAdd(Widen8(w + i), Avx512F.LoadVector512(x + i), a0);
            sum = Vector512.Sum((a0 + a1) + (a2 + a3));
        }
        for (; i < k; i++) sum += x[i] * w[i];
        return sum;
    }

    /// <summary>A bfloat16 product [N, K] (float32 activations, bias N float32 or null).</summary>
    /// <remarks>
    /// 32 bf16 weights loaded as 16 uint32 lanes hold columns 2j (low half) and 2j+1 (high half): a shift left by 16
    /// and a mask of the low half give both as exact float32, one instruction per 16 weights, against activations
    /// de-interleaved once per call like the int4 kernel's. Measured on the 2-core Xeon VM over 1.5 GB (three runs):
    /// 20–22 GB/s against 18–18.6 for widening each 16 weights (<c>vpmovzxwd</c> + shift); a plain read 21–23.
    /// Activations that are all bfloat16 values take the same loop on bfloat16 pairs instead (<see cref="BFloat16Pairs"/>).
    /// </remarks>
    internal static void BFloat16(float* x, int rows, int k, ushort* w, float* bias, float* y, int n)
    {
        if (Bf16Activations && IsSupported && k >= 32 && BFloat16Pairs(x, rows, k, w, bias, y, n)) return;
        float[] xd = ArrayPool<float>.Shared.Rent(rows * (k / 32) * 32 + 1);
        try
        {
            fixed (float* pd = xd)
            {
                Deinterleave(x, rows, k, pd);
                var job = new Job { X = x, Xd = pd, Rows = rows, K = k, W = (byte*)w, Bias = bias, Y = y, N = n };
                Run(ref job, &BFloat16Block<DeinterleavedFloat32>);
            }
        }
        finally
        {
            ArrayPool<float>.Shared.Return(xd);
        }
    }

    /// <summary>
    /// Whether the bf16 kernel keeps activations that are all exact bfloat16 values (a bfloat16 input, as in a bf16
    /// model) as bfloat16 pairs like its weights (<see cref="BFloat16Pairs"/>), instead of de-interleaved float32. Both
    /// loops give bit-identical outputs. Measured on a 2-core Zen 5 VM: the pair loop streams at 84 % of the best plain
    /// read against 76 % (best of 9 interleaved rounds, K = 4,096 and 16,384), and bf16 ChatGLM-6B decodes in 0.91–0.99×
    /// the time with decode steps alternating between the two (docs/measurements/cpu-model-6b.md). A field so that
    /// tests and the benchmark's A/B can take the float32 loop.
    /// </summary>
    internal static bool Bf16Activations = true;

    /// <summary>
    /// The bf16 product with the activations as bfloat16 pairs, when every activation is exactly a bfloat16 (its low 16
    /// bits zero). Each 32-bit lane of a 64-byte load then holds columns 2j and 2j+1 of the activations as of the weights,
    /// so one shift and one mask give both as float32 for both operands: one activation load per weight load and half
    /// the activation bytes of the float32 loop (K = 16,384 fits the L1 cache as 32 KB, not as 64 KB), with the same
    /// products summed in the same order. Returns false, having done nothing, when an activation is not a bfloat16
    /// (it is not rounded).
    /// </summary>
    internal static bool BFloat16Pairs(float* x, int rows, int k, ushort* w, float* bias, float* y, int n)
    {
        long count = (long)rows * k;
        if (count > Array.MaxLength - 32) return false;
        ushort[] xb = ArrayPool<ushort>.Shared.Rent((int)count + 32);
        try
        {
            fixed (ushort* pb = xb)
            {
                var low = Vector512<uint>.Zero;
                long i = 0;
                for (; i + 16 <= count; i += 16)
                {
                    var v = Vector512.Load((uint*)(x + i));
                    low |= v & Vector512.Create(0xFFFFu);
                    TensorMemory.StoreBFloat16Values(pb + i, v.AsSingle());   // the high halves (exact when low is 0)
                }
                uint rest = 0;
                for (; i < count; i++)
                {
                    uint bits = BitConverter.SingleToUInt32Bits(x[i]);
                    rest |= bits & 0xFFFFu;
                    pb[i] = (ushort)(bits >> 16);
                }
                if (rest != 0 || low != Vector512<uint>.Zero) return false;
                var job = new Job { X = x, Xb = pb, Rows = rows, K = k, W = (byte*)w, Bias = bias, Y = y, N = n };
                Run(ref job, &BFloat16Block<BFloat16PairActivations>);
                return true;
            }
        }
        finally
        {
            ArrayPool<ushort>.Shared.Return(xb);
        }
    }

    /// <summary>How the bf16 loops read one row's activations: a 32-column chunk as its 16 even and 16 odd columns in float32.</summary>
    private interface IBf16Activations
    {
        /// <summary>The row's activations as <see cref="Chunk"/> reads them.</summary>
        static abstract byte* Row(in Job j, int r);

        /// <summary>Columns i, i + 2, … (Even) and i + 1, i + 3, … (Odd) of the 32 from column i.</summary>
        static abstract (Vector512<float> Even, Vector512<float> Odd) Chunk(byte* row, int i);
    }

    /// <summary>float32 activations de-interleaved per 32-column chunk into [16 even | 16 odd] (<see cref="Deinterleave"/>).</summary>
    private readonly struct DeinterleavedFloat32 : IBf16Activations
    {
        public static byte* Row(in Job j, int r) => (byte*)(j.Xd + (long)r * (j.K / 32 * 32));

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static (Vector512<float> Even, Vector512<float> Odd) Chunk(byte* row, int i) =>
            (Avx512F.LoadVector512((float*)row + i), Avx512F.LoadVector512((float*)row + i + 16));
    }

    /// <summary>bfloat16 activations in column order: each 32-bit lane holds columns 2j (low half) and 2j + 1 (high half).</summary>
    private readonly struct BFloat16PairActivations : IBf16Activations
    {
        public static byte* Row(in Job j, int r) => (byte*)(j.Xb + (long)r * j.K);

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static (Vector512<float> Even, Vector512<float> Odd) Chunk(byte* row, int i)
        {
            var v = Vector512.Load((uint*)((ushort*)row + i));
            return (Avx512F.ShiftLeftLogical(v, 16).AsSingle(), (v & Vector512.Create(0xFFFF0000u)).AsSingle());
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void BFloat16Block<TX>(in Job j, int n0, int n1)
        where TX : struct, IBf16Activations
    {
        int k = j.K;
        int half = TwoStreams ? (n1 - n0) / 2 : 0;
        for (int i = 0; i < half; i++)
        {
            // Two rows half a block apart: two independent streams per core (see TwoStreams).
            int na = n0 + i, nb = n0 + half + i;
            ushort* wa = (ushort*)j.W + (long)na * k, wb = (ushort*)j.W + (long)nb * k;
            float ba = j.Bias == null ? 0f : j.Bias[na], bb = j.Bias == null ? 0f : j.Bias[nb];
            for (int r = 0; r < j.Rows; r++)
            {
                float da = DotBf16x2<TX>(TX.Row(j, r), j.X + (long)r * k, wa, wb, k, out float db);
                j.Y[(long)r * j.N + na] = da + ba;
                j.Y[(long)r * j.N + nb] = db + bb;
            }
        }
        for (int n = n0 + 2 * half; n < n1; n++)
        {
            ushort* w = (ushort*)j.W + (long)n * k;
            float b = j.Bias == null ? 0f : j.Bias[n];
            for (int r = 0; r < j.Rows; r++)
                j.Y[(long)r * j.N + n] = DotBf16<TX>(TX.Row(j, r), j.X + (long)r * k, w, k) + b;
        }
    }

    /// <summary>
    /// Σ x·w with w bfloat16 (a bf16 is the top half of a float32, so the conversion is exact): full 32-column chunks
    /// against <paramref name="row"/> as <typeparamref name="TX"/> reads it, the columns past them against
    /// <paramref name="x"/>. Both activation forms give the same products summed in the same order.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization | MethodImplOptions.NoInlining)]
    private static float DotBf16<TX>(byte* row, float* x, ushort* w, int k)
        where TX : struct, IBf16Activations
    {
        int i = 0;
        float sum = 0;
        if (IsSupported)
        {
            var high = Vector512.Create(0xFFFF0000u);
            Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default;
            for (; i + 64 <= k; i += 64)
            {
                Sse.Prefetch1((byte*)(w + i) + L2PrefetchBytes);
                Sse.Prefetch1((byte*)(w + i) + L2PrefetchBytes + 64);
                var v0 = Vector512.Load((uint*)(w + i));
                var v1 = Vector512.Load((uint*)(w + i + 32));
                var (e0, o0) = TX.Chunk(row, i);
                var (e1, o1) = TX.Chunk(row, i + 32);
                a0 = Avx512F.FusedMultiplyAdd(Avx512F.ShiftLeftLogical(v0, 16).AsSingle(), e0, a0);
                a1 = Avx512F.FusedMultiplyAdd((v0 & high).AsSingle(), o0, a1);
                a2 = Avx512F.FusedMultiplyAdd(Avx512F.ShiftLeftLogical(v1, 16).AsSingle(), e1, a2);
                a3 = Avx512F.FusedMultiplyAdd((v1 & high).AsSingle(), o1, a3);
            }
            if (i + 32 <= k)
            {
                var v = Vector512.Load((uint*)(w + i));
                var (e, o) = TX.Chunk(row, i);
                a0 = Avx512F.FusedMultiplyAdd(Avx512F.ShiftLeftLogical(v, 16).AsSingle(), e, a0);
                a1 = Avx512F.FusedMultiplyAdd((v & high).AsSingle(), o, a1);
                i += 32;
            }
            sum = Vector512.Sum((a0 + a1) + (a2 + a3));
        }
        for (; i < k; i++) sum += x[i] * Bf16(w[i]); // the tail, or (without AVX-512) every column
        return sum;
    }

    /// <summary>
    /// <see cref="DotBf16{TX}"/> for two rows at once against the same activations (loaded once for both): returns the
    /// first row's sum, <paramref name="second"/> the second's, each summed in the same order as <see cref="DotBf16{TX}"/>.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization | MethodImplOptions.NoInlining)]
    private static float DotBf16x2<TX>(byte* row, float* x, ushort* w0, ushort* w1, int k, out float second)
        where TX : struct, IBf16Activations
    {
        int i = 0;
        float sum0 = 0, sum1 = 0;
        if (IsSupported)
        {
            var high = Vector512.Create(0xFFFF0000u);
            Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default;
            Vector512<float> b0 = default, b1 = default, b2 = default, b3 = default;
            for (; i + 64 <= k; i += 64)
            {
                Sse.Prefetch1((byte*)(w0 + i) + L2PrefetchBytes);
                Sse.Prefetch1((byte*)(w0 + i) + L2PrefetchBytes + 64);
                Sse.Prefetch1((byte*)(w1 + i) + L2PrefetchBytes);
                Sse.Prefetch1((byte*)(w1 + i) + L2PrefetchBytes + 64);
                var (x0, x1) = TX.Chunk(row, i);
                var (x2, x3) = TX.Chunk(row, i + 32);
                var v0 = Vector512.Load((uint*)(w0 + i));
                var v1 = Vector512.Load((uint*)(w0 + i + 32));
                var u0 = Vector512.Load((uint*)(w1 + i));
                var u1 = Vector512.Load((uint*)(w1 + i + 32));
                a0 = Avx512F.FusedMultiplyAdd(Avx512F.ShiftLeftLogical(v0, 16).AsSingle(), x0, a0);
                a1 = Avx512F.FusedMultiplyAdd((v0 & high).AsSingle(), x1, a1);
                a2 = Avx512F.FusedMultiplyAdd(Avx512F.ShiftLeftLogical(v1, 16).AsSingle(), x2, a2);
                a3 = Avx512F.FusedMultiplyAdd((v1 & high).AsSingle(), x3, a3);
                b0 = Avx512F.FusedMultiplyAdd(Avx512F.ShiftLeftLogical(u0, 16).AsSingle(), x0, b0);
                b1 = Avx512F.FusedMultiplyAdd((u0 & high).AsSingle(), x1, b1);
                b2 = Avx512F.FusedMultiplyAdd(Avx512F.ShiftLeftLogical(u1, 16).AsSingle(), x2, b2);
                b3 = Avx512F.FusedMultiplyAdd((u1 & high).AsSingle(), x3, b3);
            }
            if (i + 32 <= k)
            {
                var (x0, x1) = TX.Chunk(row, i);
                var v = Vector512.Load((uint*)(w0 + i));
                var u = Vector512.Load((uint*)(w1 + i));
                a0 = Avx512F.FusedMultiplyAdd(Avx512F.ShiftLeftLogical(v, 16).AsSingle(), x0, a0);
                a1 = Avx512F.FusedMultiplyAdd((v & high).AsSingle(), x1, a1);
                b0 = Avx512F.FusedMultiplyAdd(Avx512F.ShiftLeftLogical(u, 16).AsSingle(), x0, b0);
                b1 = Avx512F.FusedMultiplyAdd((u & high).AsSingle(), x1, b1);
                i += 32;
            }
            sum0 = Vector512.Sum((a0 + a1) + (a2 + a3));
            sum1 = Vector512.Sum((b0 + b1) + (b2 + b3));
        }
        for (; i < k; i++)
        {
            sum0 += x[i] * Bf16(w0[i]);
            sum1 += x[i] * Bf16(w1[i]);
        }
        second = sum1;
        return sum0;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Widen8(sbyte* p) =>
        Avx512F.ConvertToVector512Single(Avx512F.ConvertToVector512Int32(Vector128.Load(p)));

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Int4Block(in Job j, int n0, int n1)
    {
        int k = j.K, half = k / 2, chunks = k / 32, groups = k / j.Group;
        for (int n = n0; n < n1; n++)
        {
            byte* w = j.W + (long)n * half;
            float b = j.Bias == null ? 0f : j.Bias[n];
            for (int r = 0; r < j.Rows; r++)
            {
                float* xd = j.Xd + (long)r * chunks * 32;
                float* x = j.X + (long)r * k;
                float* sums = j.Sums + (long)r * groups;
                float acc;
                if (j.Signed)
                {
                    // One group: the row. q = u − 8 with u = nibble ^ 8.
                    float dot = Dot4(xd, w, 0, chunks, 0x88) + Tail4(x, w, chunks * 16, half, 0x88);
                    acc = (dot - 8f * sums[0]) * j.Scales[n];
                }
                else
                {
                    acc = 0;
                    int chunksPerGroup = j.Group / 32;
                    for (int g = 0; g < groups; g++)
                    {
                        float s = Bf16(j.Bf16Scales[(long)n * groups + g]);
                        float z = Bf16(j.Bf16Zeros[(long)n * groups + g]);
                        float dot = Dot4(xd, w, g * chunksPerGroup, (g + 1) * chunksPerGroup, 0);
                        acc += dot * s + (z - 8f * s) * sums[g];
                    }
                }
                j.Y[(long)r * j.N + n] = acc + b;
            }
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Int4DotBlock<TDot>(in Job j, int n0, int n1)
        where TDot : struct, IByteDot
    {
        // ChatGLM rows (signed nibbles, one scale per row); grouped rows: Int4GroupedBlock.
        int k = j.K, half = k / 2, pairs = k / 64;
        int split = TwoStreams ? (n1 - n0) / 2 : 0;
        for (int i = 0; i < split; i++)
        {
            // Two rows half a block apart: two independent streams per core (see TwoStreams).
            int na = n0 + i, nb = n0 + split + i;
            byte* wa = j.W + (long)na * half, wb = j.W + (long)nb * half;
            for (int r = 0; r < j.Rows; r++)
            {
                sbyte* xq = j.Xq + (long)r * pairs * 64;
                float* xs = j.XScales + (long)r * pairs * 8;
                float qsum = j.Sums[r], tails = j.Tails[r];
                float dotA = SignedRowDot2<TDot>(wa, wb, xq, xs, pairs, j.Quads, out float dotB);
                float tailA = Tail4(j.X + (long)r * k, wa, pairs * 32, half, 0x88);
                float tailB = Tail4(j.X + (long)r * k, wb, pairs * 32, half, 0x88);
                // Term for term as the one-row loop below.
                j.Y[(long)r * j.N + na] = (dotA - 8f * qsum + tailA - 8f * tails) * j.Scales[na] + (j.Bias == null ? 0f : j.Bias[na]);
                j.Y[(long)r * j.N + nb] = (dotB - 8f * qsum + tailB - 8f * tails) * j.Scales[nb] + (j.Bias == null ? 0f : j.Bias[nb]);
            }
        }
        for (int n = n0 + 2 * split; n < n1; n++)
        {
            byte* w = j.W + (long)n * half;
            float b = j.Bias == null ? 0f : j.Bias[n];
            for (int r = 0; r < j.Rows; r++)
            {
                // q = u − 8; the tail columns (past the last full 64) exactly in float32.
                float dot = SignedRowDot<TDot>(w, j.Xq + (long)r * pairs * 64, j.XScales + (long)r * pairs * 8, pairs, j.Quads);
                float tailDot = Tail4(j.X + (long)r * k, w, pairs * 32, half, 0x88);
                j.Y[(long)r * j.N + n] = (dot - 8f * j.Sums[r] + tailDot - 8f * j.Tails[r]) * j.Scales[n] + b;
            }
        }
    }

    // The inner loops live in small methods of their own: inlined into the block loop, the JIT spilled the
    // accumulator and reloaded the constants on every iteration (seen in its disassembly).

    /// <summary>
    /// Σ sx·Σ(u·xq) over a ChatGLM row (signed nibbles, flipped to u = q + 8): the first <paramref name="quads"/>
    /// 128-column quads in 512-bit registers (<see cref="QuadSum"/>), two per iteration; a last odd pair through
    /// <typeparamref name="TDot"/>.
    /// </summary>
    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    private static float SignedRowDot<TDot>(byte* w, sbyte* xq, float* xs, int pairs, int quads)
        where TDot : struct, IByteDot
    {
        var mask = Vector512.Create((byte)15);
        var eight = Vector512.Create((byte)8);
        var ones = Vector512.Create((short)1);
        Vector512<float> f0 = default, f1 = default;
        int q = 0;
        for (; q + 2 <= quads; q += 2)
        {
            Sse.Prefetch1(w + q * 64 + L2PrefetchBytes);
            Sse.Prefetch1(w + q * 64 + 64 + L2PrefetchBytes);
            f0 = Avx512F.FusedMultiplyAdd(QuadSum(Vector512.Load(w + q * 64), xq + q * 128, mask, eight, ones), Vector512.Load(xs + q * 16), f0);
            f1 = Avx512F.FusedMultiplyAdd(QuadSum(Vector512.Load(w + q * 64 + 64), xq + q * 128 + 128, mask, eight, ones), Vector512.Load(xs + q * 16 + 16), f1);
        }
        if (q < quads)
            f0 = Avx512F.FusedMultiplyAdd(QuadSum(Vector512.Load(w + q * 64), xq + q * 128, mask, eight, ones), Vector512.Load(xs + q * 16), f0);
        return SignedPairs<TDot>(w, xq, xs, 2 * quads, pairs, Vector512.Sum(f0 + f1));
    }

    /// <summary>
    /// <see cref="SignedRowDot{TDot}"/> for two rows at once, <paramref name="w0"/> and <paramref name="w1"/>, against
    /// the same activations (loaded once for both); each row summed in the same order as the one-row form.
    /// </summary>
    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    private static float SignedRowDot2<TDot>(byte* w0, byte* w1, sbyte* xq, float* xs, int pairs, int quads, out float second)
        where TDot : struct, IByteDot
    {
        var mask = Vector512.Create((byte)15);
        var eight = Vector512.Create((byte)8);
        var ones = Vector512.Create((short)1);
        Vector512<float> f0 = default, f1 = default, g0 = default, g1 = default;
        int q = 0;
        for (; q + 2 <= quads; q += 2)
        {
            Sse.Prefetch1(w0 + q * 64 + L2PrefetchBytes);
            Sse.Prefetch1(w0 + q * 64 + 64 + L2PrefetchBytes);
            Sse.Prefetch1(w1 + q * 64 + L2PrefetchBytes);
            Sse.Prefetch1(w1 + q * 64 + 64 + L2PrefetchBytes);
            var x0 = Vector512.Load(xq + q * 128);
            var x1 = Vector512.Load(xq + q * 128 + 64);
            var s0 = Vector512.Load(xs + q * 16);
            f0 = Avx512F.FusedMultiplyAdd(QuadSumOf(Vector512.Load(w0 + q * 64), x0, x1, mask, eight, ones), s0, f0);
            g0 = Avx512F.FusedMultiplyAdd(QuadSumOf(Vector512.Load(w1 + q * 64), x0, x1, mask, eight, ones), s0, g0);
            var x2 = Vector512.Load(xq + q * 128 + 128);
            var x3 = Vector512.Load(xq + q * 128 + 192);
            var s1 = Vector512.Load(xs + q * 16 + 16);
            f1 = Avx512F.FusedMultiplyAdd(QuadSumOf(Vector512.Load(w0 + q * 64 + 64), x2, x3, mask, eight, ones), s1, f1);
            g1 = Avx512F.FusedMultiplyAdd(QuadSumOf(Vector512.Load(w1 + q * 64 + 64), x2, x3, mask, eight, ones), s1, g1);
        }
        if (q < quads)
        {
            var x0 = Vector512.Load(xq + q * 128);
            var x1 = Vector512.Load(xq + q * 128 + 64);
            var s0 = Vector512.Load(xs + q * 16);
            f0 = Avx512F.FusedMultiplyAdd(QuadSumOf(Vector512.Load(w0 + q * 64), x0, x1, mask, eight, ones), s0, f0);
            g0 = Avx512F.FusedMultiplyAdd(QuadSumOf(Vector512.Load(w1 + q * 64), x0, x1, mask, eight, ones), s0, g0);
        }
        second = SignedPairs<TDot>(w1, xq, xs, 2 * quads, pairs, Vector512.Sum(g0 + g1));
        return SignedPairs<TDot>(w0, xq, xs, 2 * quads, pairs, Vector512.Sum(f0 + f1));
    }

    /// <summary><paramref name="sum"/> plus Σ sx·Σ(u·xq) over the 64-column pairs [<paramref name="first"/>,
    /// <paramref name="pairs"/>) of a ChatGLM row (those past its 128-column quads), in 256-bit registers.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float SignedPairs<TDot>(byte* w, sbyte* xq, float* xs, int first, int pairs, float sum)
        where TDot : struct, IByteDot
    {
        var m = Vector256.Create((byte)15);
        var e = Vector256.Create((byte)8);
        for (int p = first; p < pairs; p++)
        {
            var v0 = Vector256.Load(w + p * 32);
            var a0 = TDot.Nibbles(Vector256<int>.Zero, Nibble(Vector256.ShiftRightLogical(v0.AsUInt16(), 4).AsByte(), m, e), Vector256.Load(xq + p * 64));
            a0 = TDot.Nibbles(a0, Nibble(v0, m, e), Vector256.Load(xq + p * 64 + 32));
            sum += Vector256.Sum(Avx.ConvertToVector256Single(a0) * Vector256.Load(xs + p * 8));
        }
        return sum;
    }

    /// <summary>
    /// One 128-column quad (64 packed bytes) against its activations: per 32-column block 4 lanes of Σ u·xq as
    /// float32, u = the nibble flipped by <paramref name="flip"/> (8 for ChatGLM's signed nibbles, 0 for unsigned ones).
    /// <c>vpmaddubsw</c> multiplies the unsigned nibbles with the signed int8 activations and adds pairs (|sum| ≤
    /// 2·15·127, exact in int16); the even- and odd-column halves add in int16 (≤ 7,620) and <c>vpmaddwd</c> with ones
    /// widens pairs to int32: 9 vector instructions per 128 weights, against 14 for two 256-bit <c>vpdpbusd</c> pairs
    /// (the 512-bit <c>vpdpbusd</c> is not reachable from .NET 10 short of AVX10). Measured over a 1.5 GB int4 matrix
    /// set on the 2-core Xeon VM (25 interleaved rounds, huge pages, two runs): best 27.5 / 26.2 GB/s, against 25.1 /
    /// 24.8 for the 256-bit loop and 29.5 / 28.5 for a plain read (docs/measurements/cpu-model-6b.md).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> QuadSum(Vector512<byte> v, sbyte* xq, Vector512<byte> mask, Vector512<byte> flip, Vector512<short> ones) =>
        QuadSumOf(v, Vector512.Load(xq), Vector512.Load(xq + 64), mask, flip, ones);

    /// <summary><see cref="QuadSum"/> on activations already loaded: <paramref name="xHigh"/> meets the high nibbles (even columns), <paramref name="xLow"/>
    /// the low ones.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> QuadSumOf(Vector512<byte> v, Vector512<sbyte> xHigh, Vector512<sbyte> xLow, Vector512<byte> mask, Vector512<byte> flip, Vector512<short> ones)
    {
        // (v & 0x0F) ^ flip in one vpternlogd (see Nibble).
        var high = Avx512F.TernaryLogic(Avx512BW.ShiftRightLogical(v.AsUInt16(), 4).AsByte(), mask, flip, 0x6A);
        var low = Avx512F.TernaryLogic(v, mask, flip, 0x6A);
        var sums = Avx512BW.MultiplyAddAdjacent(high, xHigh) + Avx512BW.MultiplyAddAdjacent(low, xLow);
        return Avx512F.ConvertToVector512Single(Avx512BW.MultiplyAddAdjacent(sums, ones));
    }

    /// <summary>
    /// u = (v &amp; 0x0F) ^ 0x08 per byte in one <c>vpternlogd</c> (truth table 0x6A = (A &amp; B) ^ C with A = 0xF0, B = 0xCC, C = 0xAA): the low nibble
    /// of a signed ChatGLM code flipped to its offset-8 value, one instruction instead of an XOR and an AND.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<byte> Nibble(Vector256<byte> v, Vector256<byte> mask, Vector256<byte> eight) =>
        Avx512F.VL.TernaryLogic(v, mask, eight, 0x6A);

    /// <summary>Σ_g s_g·Σ sx·Σ(u·xq) over a grouped row (unsigned nibbles, float32 group scales; groups of 64·m
    /// columns), in 256-bit registers.</summary>
    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    private static float GroupedRowDot<TDot>(byte* w, sbyte* xq, float* xs, int groups, int pairsPerGroup, float* scales)
        where TDot : struct, IByteDot
    {
        var mask = Vector256.Create((byte)15);
        var total = Vector256<float>.Zero;
        int p = 0;
        for (int g = 0; g < groups; g++)
        {
            var f = Vector256<float>.Zero;
            for (int p1 = p + pairsPerGroup; p < p1; p++)
            {
                Sse.Prefetch1(w + p * 32 + L2PrefetchBytes);
                var v = Vector256.Load(w + p * 32);
                var a = TDot.Nibbles(Vector256<int>.Zero, Vector256.ShiftRightLogical(v.AsUInt16(), 4).AsByte() & mask, Vector256.Load(xq + p * 64));
                a = TDot.Nibbles(a, v & mask, Vector256.Load(xq + p * 64 + 32));
                f = Fma.MultiplyAdd(Avx.ConvertToVector256Single(a), Vector256.Load(xs + p * 8), f);
            }
            total = Fma.MultiplyAdd(f, Vector256.Create(scales[g]), total);
        }
        return Vector256.Sum(total);
    }

    /// <summary>
    /// Grouped int4 rows (the unsigned nibbles as stored) against int8 activations: each row's bf16 group scales and
    /// zeros widened to float32 once (vector loads), then <see cref="GroupedQuadDot"/> where the groups are whole
    /// 128-column quads (<see cref="Job.Quads"/> &gt; 0), else <see cref="GroupedRowDot{TDot}"/> (groups of 64 columns),
    /// and the zero term Σ_g (z_g − 8·s_g)·Σxq_g in 512-bit registers. Measured with <c>gemv-probe</c> on a 2-core Zen 5
    /// VM: the per-group scalar conversions this replaced had made the g128 loop bound by its instructions (in cache no
    /// faster than streaming).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Int4GroupedBlock<TDot>(in Job j, int n0, int n1)
        where TDot : struct, IByteDot
    {
        int k = j.K, half = k / 2, pairs = k / 64, groups = k / j.Group, quadsPerGroup = j.Group / 128, pairsPerGroup = j.Group / 64;
        float[] rented = ArrayPool<float>.Shared.Rent(2 * groups + 32);
        try
        {
            fixed (float* buffer = rented)
            {
                float* scales = buffer, zeros = buffer + groups;
                for (int n = n0; n < n1; n++)
                {
                    byte* w = j.W + (long)n * half;
                    TensorMemory.WidenBFloat16(j.Bf16Scales + (long)n * groups, scales, groups);
                    TensorMemory.WidenBFloat16(j.Bf16Zeros + (long)n * groups, zeros, groups);
                    float b = j.Bias == null ? 0f : j.Bias[n];
                    for (int r = 0; r < j.Rows; r++)
                    {
                        // Σ((u − 8)·s + z)·x = s·Σu·x + (z − 8s)·Σx, Σx from the quantized values to cancel the offset.
                        sbyte* xq = j.Xq + (long)r * pairs * 64;
                        float* xs = j.XScales + (long)r * pairs * 8;
                        float dot = j.Quads > 0 ? GroupedQuadDot(w, xq, xs, groups, quadsPerGroup, scales) : GroupedRowDot<TDot>(w, xq, xs, groups, pairsPerGroup, scales);
                        j.Y[(long)r * j.N + n] = dot + ZeroTerm(scales, zeros, j.Sums + (long)r * groups, groups) + b;
                    }
                }
            }
        }
        finally
        {
            ArrayPool<float>.Shared.Return(rented);
        }
    }

    /// <summary>Σ_g (z_g − 8·s_g)·sums_g.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float ZeroTerm(float* scales, float* zeros, float* sums, int groups)
    {
        var eight = Vector512.Create(8f);
        var acc = Vector512<float>.Zero;
        int g = 0;
        for (; g + 16 <= groups; g += 16)
            acc = Avx512F.FusedMultiplyAdd(Avx512F.FusedMultiplyAddNegated(eight, Vector512.Load(scales + g), Vector512.Load(zeros + g)), Vector512.Load(sums + g), acc);
        float total = Vector512.Sum(acc);
        for (; g < groups; g++) total += (zeros[g] - 8f * scales[g]) * sums[g];
        return total;
    }

    /// <summary>
    /// <see cref="GroupedRowDot"/> for groups of whole 128-column quads (<paramref name="quadsPerGroup"/> each), the
    /// unsigned nibbles as stored, in 512-bit registers (<see cref="QuadSum"/>); float32 group scales. Groups of one
    /// quad (g128) alternate between two accumulators.
    /// </summary>
    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    private static float GroupedQuadDot(byte* w, sbyte* xq, float* xs, int groups, int quadsPerGroup, float* scales)
    {
        var mask = Vector512.Create((byte)15);
        var ones = Vector512.Create((short)1);
        Vector512<float> t0 = default, t1 = default;
        if (quadsPerGroup == 1)
        {
            int g = 0;
            for (; g + 2 <= groups; g += 2)
            {
                Sse.Prefetch1(w + g * 64 + L2PrefetchBytes);
                Sse.Prefetch1(w + g * 64 + 64 + L2PrefetchBytes);
                var f0 = QuadSum(Vector512.Load(w + g * 64), xq + g * 128, mask, Vector512<byte>.Zero, ones) * Vector512.Load(xs + g * 16);
                var f1 = QuadSum(Vector512.Load(w + g * 64 + 64), xq + g * 128 + 128, mask, Vector512<byte>.Zero, ones) * Vector512.Load(xs + g * 16 + 16);
                t0 = Avx512F.FusedMultiplyAdd(f0, Vector512.Create(scales[g]), t0);
                t1 = Avx512F.FusedMultiplyAdd(f1, Vector512.Create(scales[g + 1]), t1);
            }
            if (g < groups)
                t0 = Avx512F.FusedMultiplyAdd(QuadSum(Vector512.Load(w + g * 64), xq + g * 128, mask, Vector512<byte>.Zero, ones) * Vector512.Load(xs + g * 16), Vector512.Create(scales[g]), t0);
            return Vector512.Sum(t0 + t1);
        }
        int q = 0;
        for (int g = 0; g < groups; g++)
        {
            var f = Vector512<float>.Zero;
            for (int q1 = q + quadsPerGroup; q < q1; q++)
            {
                Sse.Prefetch1(w + q * 64 + L2PrefetchBytes);
                f = Avx512F.FusedMultiplyAdd(QuadSum(Vector512.Load(w + q * 64), xq + q * 128, mask, Vector512<byte>.Zero, ones), Vector512.Load(xs + q * 16), f);
            }
            t0 = Avx512F.FusedMultiplyAdd(f, Vector512.Create(scales[g]), t0);
        }
        return Vector512.Sum(t0);
    }

    /// <summary>Σ u·x over 32-column chunks [c0, c1) of one packed row (u = nibble ^ flip bits).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization | MethodImplOptions.AggressiveInlining)]
    private static float Dot4(float* xd, byte* w, int c0, int c1, byte flip)
    {
        int c = c0;
        float sum = 0;
        if (IsSupported)
        {
            var mask = Vector512.Create(15);
            var xor = Vector128.Create(flip);
            Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default;
            for (; c + 4 <= c1; c += 4)
            {
                Sse.Prefetch0(w + c * 16 + PrefetchBytes);
                var i0 = Avx512F.ConvertToVector512Int32(Vector128.Load(w + c * 16) ^ xor);
                var i1 = Avx512F.ConvertToVector512Int32(Vector128.Load(w + c * 16 + 16) ^ xor);
                a0 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(Avx512F.ShiftRightLogical(i0, 4)), Avx512F.LoadVector512(xd + c * 32), a0);
                a1 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(i0 & mask), Avx512F.LoadVector512(xd + c * 32 + 16), a1);
                a2 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(Avx512F.ShiftRightLogical(i1, 4)), Avx512F.LoadVector512(xd + c * 32 + 32), a2);
                a3 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(i1 & mask), Avx512F.LoadVector512(xd + c * 32 + 48), a3);
                var i2 = Avx512F.ConvertToVector512Int32(Vector128.Load(w + c * 16 + 32) ^ xor);
                var i3 = Avx512F.ConvertToVector512Int32(Vector128.Load(w + c * 16 + 48) ^ xor);
                a0 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(Avx512F.ShiftRightLogical(i2, 4)), Avx512F.LoadVector512(xd + c * 32 + 64), a0);
                a1 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(i2 & mask), Avx512F.LoadVector512(xd + c * 32 + 80), a1);
                a2 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(Avx512F.ShiftRightLogical(i3, 4)), Avx512F.LoadVector512(xd + c * 32 + 96), a2);
                a3 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(i3 & mask), Avx512F.LoadVector512(xd + c * 32 + 112), a3);
            }
            for (; c < c1; c++)
            {
                var i0 = Avx512F.ConvertToVector512Int32(Vector128.Load(w + c * 16) ^ xor);
                a0 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(Avx512F.ShiftRightLogical(i0, 4)), Avx512F.LoadVector512(xd + c * 32), a0);
                a1 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(i0 & mask), Avx512F.LoadVector512(xd + c * 32 + 16), a1);
            }
            sum = Vector512.Sum((a0 + a1) + (a2 + a3));
        }
        for (; c < c1; c++)
        {
            for (int i = 0; i < 16; i++)
            {
                int v = w[c * 16 + i] ^ flip;
                sum += (v >> 4) * xd[c * 32 + i] + (v & 15) * xd[c * 32 + 16 + i];
            }
        }
        return sum;
    }

    /// <summary>Σ u·x for packed bytes [b0, b1) of a row whose columns did not fill a 32-column chunk.</summary>
    private static float Tail4(float* x, byte* w, int b0, int b1, byte flip)
    {
        float sum = 0;
        for (int i = b0; i < b1; i++)
        {
            int v = w[i] ^ flip;
            sum += (v >> 4) * x[2 * i] + (v & 15) * x[2 * i + 1];
        }
        return sum;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float Bf16(ushort bits) => BitConverter.UInt32BitsToSingle((uint)bits << 16);
}
