using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using MinLora.Quantization;
using TorchSharp;
using static MinLora.Quantization.TensorMemory;
using static TorchSharp.torch;

namespace MinLora.Glm.Modeling;

/// <summary>
/// ChatGLM-6B's LayerNorm over the last dimension, <c>bf16((x − μ)/√(σ² + ε)·w + b)</c>, on a few bf16 rows in one
/// managed pass: a grad-free call of at most <see cref="CpuLinear.MaxRows"/> rows (a decoding step, a short prompt).
/// </summary>
/// <remarks>
/// <para>
/// libtorch's <c>layer_norm</c> is one op, but inside a decoding step, where weights stream through the caches between
/// two calls, it costs ~30 µs on 4,096 values on a 2-core VM (57 per ChatGLM-6B token), where the arithmetic takes
/// ~1 µs; this pass ~22 µs, most of it its output tensor (the benchmarks' <c>norm-probe</c>).
/// </para>
/// <para>
/// The result equals libtorch's bit for bit, a NaN being NaN (its sign and payload aside: libtorch writes 0xFFFF or
/// 0x7FC0, the pass a quiet NaN of the input's sign); the tests check it against libtorch on every run. libtorch registers no
/// AVX-512 LayerNorm kernel, so it runs its AVX2 one on AVX2 and AVX-512 CPUs alike, and that kernel's float32
/// arithmetic is followed op by op here (read from libtorch 2.10's <c>moments_utils.h</c> and
/// <c>layer_norm_kernel.cpp</c>, and from the compiled kernel, whose compiler fused some products and sums into
/// <c>fma</c>s the source does not spell):
/// </para>
/// <list type="bullet">
/// <item>Mean and variance by Welford's updates in 8-float vectors: each chunk of up to 16 steps of 16 values (one
/// 16-value bf16 vector as two float vectors) updates two vector accumulators, <c>m₁ += δ·(1/(j+1))</c> and
/// <c>m₂ += δ·(x − m₁)</c> as <c>fma</c>s; the chunks merge into a cascade of <c>⌈log₂ chunks⌉</c> levels (Chan's
/// merge: <c>m₂ = fma(δ·m₀, c·δ, m₂ + m₂′)</c>, <c>m₁ += c·δ</c>); the leftover values (fewer than 16) by scalar
/// Welford updates; then the 8 lanes merged in order in scalars (<c>m₁ = fma(c, δ, m₁)</c>,
/// <c>m₂ += fma(δ·δ·c, m₀, m₂′)</c>); σ² = m₂/N.</item>
/// <item><c>r = 1/√(σ² + ε)</c> (ε a float32), <c>β = −r·μ</c>, then <c>y = fma(fma(x, r, β), w, b)</c> rounded once
/// to bf16.</item>
/// </list>
/// <para>
/// A libtorch whose kernel differs (another version, a build without FMA) is found once by <see cref="MatchesLibtorch"/>,
/// which normalises a few fixed rows both ways; any difference turns the pass off and libtorch's op runs.
/// </para>
/// </remarks>
internal static unsafe class DecodeLayerNorm
{
    /// <summary>Whether decoding uses this kernel (the default); a field so that tests and A/Bs can take libtorch's op.</summary>
    internal static bool Enabled = true;

    /// <summary>bf16 values per step of libtorch's AVX2 moments (one 256-bit bf16 vector: two 8-float vectors).</summary>
    private const int Step = 16;

    /// <summary>Steps per Welford chunk (ATen's <c>kChunkSize</c>).</summary>
    private const int ChunkSteps = 16;

    /// <summary>The widest row the kernel takes (2²⁴ values: a cascade of at most 16 levels on the stack).</summary>
    internal const long MaximumWidth = 1L << 24;

    /// <summary>
    /// Whether <see cref="Apply"/> applies: AVX-512 and FMA, a contiguous bf16 CPU input of at most
    /// <paramref name="maxValues"/> values whose last dimension is <paramref name="width"/> (1 to 2²⁴), contiguous bf16
    /// weight and bias of that many values, no gradient wanted, and a libtorch whose arithmetic is the one above
    /// (<see cref="MatchesLibtorch"/>).
    /// </summary>
    internal static bool Applies(Tensor x, Tensor weight, Tensor bias, long width, long maxValues) =>
        Enabled && Avx512F.IsSupported && Fma.IsSupported && width is >= 1 and <= MaximumWidth &&
        DecodeRows.Accept(x, width, maxValues, weight, bias) && MatchesLibtorch;

    /// <summary>How many times <see cref="Apply"/> ran in this process (tests check that a model's forward takes it).</summary>
    internal static long Applied => Interlocked.Read(ref s_applied);

    private static long s_applied;

    /// <summary>The LayerNorm of each row of <paramref name="x"/> (see <see cref="DecodeLayerNorm"/>), a new tensor of its shape.</summary>
    internal static Tensor Apply(Tensor x, Tensor weight, Tensor bias, float epsilon)
    {
        Interlocked.Increment(ref s_applied);
        var result = empty_like(x);
        long width = weight.numel(), rows = x.numel() / width;
        var source = (ushort*)TensorMemory.Pointer(x);
        var target = (ushort*)TensorMemory.Pointer(result);
        Normalize(source, (ushort*)TensorMemory.Pointer(weight), (ushort*)TensorMemory.Pointer(bias), target, rows, width, epsilon);
        GC.KeepAlive(x);
        GC.KeepAlive(weight);
        GC.KeepAlive(bias);
        return result;
    }

    private static void Normalize(ushort* source, ushort* weight, ushort* bias, ushort* target, long rows, long width, float epsilon)
    {
        for (long r = 0; r < rows; r++)
        {
            var row = source + r * width;
            var (mean, variance) = Moments(row, width);
            float inverse = 1f / MathF.Sqrt(variance + epsilon);
            var scale = Vector512.Create(inverse);
            var shift = Vector512.Create(-inverse * mean);
            var output = target + r * width;
            long i = 0;
            for (; i + 16 <= width; i += 16)
                StoreBFloat16Values(output + i, RoundedToBFloat16(Output(LoadBFloat16(row + i), scale, shift, LoadBFloat16(weight + i), LoadBFloat16(bias + i))));
            if (i < width)
            {
                // The tail through padded vectors, with the same arithmetic (libtorch's scalar tail contracts alike).
                int rest = (int)(width - i);
                var y = Output(LoadBFloat16Partial(row + i, rest), scale, shift, LoadBFloat16Partial(weight + i, rest), LoadBFloat16Partial(bias + i, rest));
                StoreBFloat16Partial(output + i, RoundedToBFloat16(y), rest);
            }
        }
    }

    /// <summary>fma(fma(x, r, β), w, b) on 16 values.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Output(Vector512<float> x, Vector512<float> scale, Vector512<float> shift, Vector512<float> weight, Vector512<float> bias) =>
        Avx512F.FusedMultiplyAdd(Avx512F.FusedMultiplyAdd(x, scale, shift), weight, bias);

    /// <summary>
    /// The mean and the (biased) variance of <paramref name="width"/> bf16 values in float32, in the order and the
    /// roundings of libtorch's AVX2 <c>RowwiseMoments</c> (see <see cref="DecodeLayerNorm"/>).
    /// </summary>
    internal static (float Mean, float Variance) Moments(ushort* row, long width)
    {
        long steps = width / Step;
        long chunks = (steps + ChunkSteps - 1) / ChunkSteps;
        int depth = CeilLog2(chunks);
        var counts = stackalloc long[depth];
        var means = stackalloc Vector256<float>[depth];
        var squares = stackalloc Vector256<float>[depth];
        for (int k = 0; k < depth; k++)
        {
            counts[k] = 0;
            means[k] = squares[k] = Vector256<float>.Zero;
        }
        for (long i = 0; i < chunks; i++)
        {
            var chunk = row + i * ChunkSteps * Step;
            long count = Math.Min(ChunkSteps, steps - i * ChunkSteps);
            Vector256<float> mean0 = default, mean1 = default, square0 = default, square1 = default;
            for (int j = 0; j < count; j++)
            {
                var x0 = Widen(chunk + j * Step);
                var x1 = Widen(chunk + j * Step + 8);
                var c = Vector256.Create(1f / (j + 1));
                var delta0 = x0 - mean0;
                var delta1 = x1 - mean1;
                mean0 = Fma.MultiplyAdd(delta0, c, mean0);
                mean1 = Fma.MultiplyAdd(delta1, c, mean1);
                square0 = Fma.MultiplyAdd(delta0, x0 - mean0, square0);
                square1 = Fma.MultiplyAdd(delta1, x1 - mean1, square1);
            }
            Merge(count, mean0, square0, ref counts[0], ref means[0], ref squares[0]);
            Merge(count, mean1, square1, ref counts[0], ref means[0], ref squares[0]);
            long mask = i + 1;
            for (int level = 1; level < depth && (mask & 1) == 0; level++)
            {
                Merge(counts[level - 1], means[level - 1], squares[level - 1], ref counts[level], ref means[level], ref squares[level]);
                counts[level - 1] = 0;
                means[level - 1] = squares[level - 1] = Vector256<float>.Zero;
                mask >>= 1;
            }
        }
        for (int level = 1; level < depth; level++)
            Merge(counts[level], means[level], squares[level], ref counts[0], ref means[0], ref squares[0]);

        long n = 0;
        float m1 = 0f, m2 = 0f;
        for (long k = steps * Step; k < width; k++)
        {
            float x = BitConverter.UInt32BitsToSingle((uint)row[k] << 16);
            float delta = x - m1;
            n++;
            m1 += delta / n;
            m2 = MathF.FusedMultiplyAdd(delta, x - m1, m2);
        }
        // Each lane holds 2·steps values (a bf16 vector is two float vectors).
        long perLane = steps * Step / 8;
        for (int lane = 0; lane < 8; lane++)
        {
            long total = n + perLane;
            float c = total == 0 ? 0f : (float)perLane / total;
            float delta = means[0].GetElement(lane) - m1;
            m1 = MathF.FusedMultiplyAdd(c, delta, m1);
            m2 += MathF.FusedMultiplyAdd(delta * delta * c, n, squares[0].GetElement(lane));
            n = total;
        }
        return (m1, m2 / width);
    }

    /// <summary><see cref="Moments(ushort*, long)"/> of a row of bfloat16 bit patterns.</summary>
    internal static (float Mean, float Variance) Moments(ReadOnlySpan<ushort> row)
    {
        if (row.IsEmpty) throw new ArgumentException("The row is empty.", nameof(row));
        if (!Avx2.IsSupported || !Fma.IsSupported) throw new PlatformNotSupportedException("The moments need AVX2 and FMA.");
        fixed (ushort* p = row) return Moments(p, row.Length);
    }

    /// <summary>Chan's merge of (count, mean, m₂) <paramref name="addedCount"/> … into the accumulator, as ATen's
    /// <c>AddMomentsVec</c> (its <c>fmadd</c> spelled out).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Merge(long addedCount, Vector256<float> addedMean, Vector256<float> addedSquares, ref long count, ref Vector256<float> mean, ref Vector256<float> squares)
    {
        long total = count + addedCount;
        float c = total == 0 ? 0f : (float)addedCount / total;
        var delta = addedMean - mean;
        var sum = squares + addedSquares;
        var weighted = Vector256.Create(c) * delta;
        var scaled = delta * Vector256.Create((float)count);
        mean += weighted;
        squares = Fma.MultiplyAdd(scaled, weighted, sum);
        count = total;
    }

    /// <summary>8 bfloat16 values as float32.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> Widen(ushort* p) => Avx2.ShiftLeftLogical(Avx2.ConvertToVector256Int32(Vector128.Load(p)), 16).AsSingle();

    /// <summary>⌈log₂ x⌉, 1 for x ≤ 2 (ATen's <c>CeilLog2</c>).</summary>
    private static int CeilLog2(long x) => x <= 2 ? 1 : 64 - System.Numerics.BitOperations.LeadingZeroCount((ulong)(x - 1));

    /// <summary>
    /// Whether this kernel equals the <c>layer_norm</c> of the libtorch in this process: a few fixed rows (widths 7 to
    /// 12,293: no vector step, one chunk, cascades of four and six levels with leftover chunks, leftover values;
    /// magnitudes over 2^±12 around offsets, ε 1e-5) normalised both ways must agree bit for bit. Found once. The
    /// output's bf16 rounding hides most one-ulp differences in the float32 moments, so this catches a different
    /// kernel (another version, one built without FMA), not every change of order: the tests pin the moments.
    /// </summary>
    internal static bool MatchesLibtorch => Probe.Value;

    private static readonly Lazy<bool> Probe = new(ProbeLibtorch);

    private static bool ProbeLibtorch()
    {
        if (!Avx512F.IsSupported || !Fma.IsSupported) return false;
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        uint state = 2463534242;
        foreach (int width in new[] { 7, 50, 4096, 4099, 12293 })
        {
            var x = new ushort[2 * width];
            var w = new ushort[width];
            var b = new ushort[width];
            for (int i = 0; i < x.Length; i++) x[i] = DecodeRows.PseudoBFloat16(ref state, i < width ? 0f : 3f);
            for (int i = 0; i < width; i++)
            {
                w[i] = DecodeRows.PseudoBFloat16(ref state, 1f);
                b[i] = DecodeRows.PseudoBFloat16(ref state, 0f);
            }
            var input = BFloat16(x, 2, width);
            var weight = BFloat16(w, width);
            var bias = BFloat16(b, width);
            var libtorch = nn.functional.layer_norm(input, new long[] { width }, weight, bias, 1e-5);
            var ours = new ushort[2 * width];
            fixed (ushort* px = x, pw = w, pb = b, po = ours) Normalize(px, pw, pb, po, 2, width, 1e-5f);
            var theirs = libtorch.to(ScalarType.Float32).data<float>().ToArray();
            for (int i = 0; i < ours.Length; i++)
                if (ours[i] != BitConverter.SingleToUInt32Bits(theirs[i]) >> 16) return false;
        }
        return true;
    }

    /// <summary>bf16 bit patterns as a bf16 tensor (through float32: exact).</summary>
    private static Tensor BFloat16(ushort[] bits, params long[] shape) =>
        tensor(Array.ConvertAll(bits, v => BitConverter.UInt32BitsToSingle((uint)v << 16)), device: CPU).view(shape).to(ScalarType.BFloat16);
}
