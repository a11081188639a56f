using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using MinLora.Quantization;
using TorchSharp;
using static MinLora.Quantization.TensorMemory;
using static TorchSharp.torch;

namespace MinLora.Glm.Modeling;

/// <summary>
/// The v2 RMSNorm (ChatGLM2/3, GLM-4), <c>weight·(x·rsqrt(mean(float(x)²) + ε))</c> rounded once to bf16, on a few
/// bf16 rows in one managed pass: a grad-free call of at most <see cref="CpuLinear.MaxRows"/> rows (a decoding step, a
/// short prompt).
/// </summary>
/// <remarks>
/// <para>
/// libtorch runs it as eight ops (a float32 copy, the square, the mean, ε, rsqrt, two products and the bf16 cast), each
/// a native call and a pass over the row. Here each row's squares are summed in float32 in the order of libtorch's
/// cascade sum for a contiguous inner reduction (four vector accumulators over a four-level cascade of chunks of 16
/// steps, or more past 2¹⁹ steps, then the tail in scalars, then the lanes in order), with the vector width of the
/// kernel this process's libtorch dispatches: libtorch registers no AVX-512 kernel for <c>sum</c>, so it runs its AVX2
/// one (8 floats) even on AVX-512 CPUs; a build that did would sum in 16 (probed once, see <see cref="LibtorchLanes"/>).
/// The sum is divided by the width as libtorch's <c>mean</c> does (<c>sum</c> then <c>div_</c>), and the rest is
/// libtorch's float32 arithmetic op by op: ε added as a float32, 1/√ (both correctly rounded), <c>float(x)·r</c>,
/// <c>float(w)·that</c>, one rounding to bf16. The squares of bf16 values are exact in float32, so the result equals
/// libtorch's ops bit for bit (the tests check it against libtorch on every run), a NaN being NaN, its sign and
/// payload aside.
/// </para>
/// </remarks>
internal static unsafe class DecodeRmsNorm
{
    /// <summary>Whether decoding uses this kernel (the default); a field so that tests and A/Bs can take the libtorch ops.</summary>
    internal static bool Enabled = true;

    /// <summary>The output pass's vector width (floats).</summary>
    private const int Lanes = 16;

    /// <summary>The narrowest row the kernel takes: libtorch's vectorised sum runs from one vector of 16 floats on.</summary>
    internal const int MinimumWidth = 16;

    /// <summary>The widest row the kernel takes: from 32,768 values (libtorch's grain size) on, libtorch splits a single
    /// row's sum over its threads (<c>two_pass_reduction</c>), in another order.</summary>
    internal const int MaximumWidth = 32767;

    /// <summary>
    /// Whether <see cref="Apply"/> applies: AVX-512, a contiguous bf16 CPU input of at most <paramref name="maxValues"/>
    /// values whose last dimension is <paramref name="width"/> (16 to 32,767), a contiguous 1-D bf16 weight of that many
    /// values, no gradient wanted, and a libtorch whose sum order is known (<see cref="LibtorchLanes"/>).
    /// </summary>
    internal static bool Applies(Tensor x, Tensor weight, long width, long maxValues) =>
        Enabled && Avx512F.IsSupported && width is >= MinimumWidth and <= MaximumWidth &&
        DecodeRows.Accept(x, width, maxValues, weight) && LibtorchLanes != 0;

    /// <summary>The RMSNorm of each row of <paramref name="x"/> (see <see cref="DecodeRmsNorm"/>), a new tensor of its shape.</summary>
    internal static Tensor Apply(Tensor x, Tensor weight, float epsilon)
    {
        var result = empty_like(x);
        long width = weight.numel(), rows = x.numel() / width;
        var source = (ushort*)TensorMemory.Pointer(x);
        var scale = (ushort*)TensorMemory.Pointer(weight);
        var target = (ushort*)TensorMemory.Pointer(result);
        int lanes = LibtorchLanes;
        for (long r = 0; r < rows; r++)
        {
            var row = source + r * width;
            float mean = SumOfSquares(row, width, lanes) / width;
            float inverse = 1f / MathF.Sqrt(mean + epsilon);
            var factor = Vector512.Create(inverse);
            var output = target + r * width;
            long i = 0;
            for (; i + Lanes <= width; i += Lanes)
                StoreBFloat16Values(output + i, RoundedToBFloat16(LoadBFloat16(scale + i) * (LoadBFloat16(row + i) * factor)));
            if (i < width)
            {
                // The tail through padded vectors, with the same arithmetic.
                int rest = (int)(width - i);
                StoreBFloat16Partial(output + i, RoundedToBFloat16(LoadBFloat16Partial(scale + i, rest) * (LoadBFloat16Partial(row + i, rest) * factor)), rest);
            }
        }
        GC.KeepAlive(x);
        GC.KeepAlive(weight);
        return result;
    }

    /// <summary>
    /// The vector width, in floats, of the float32 <c>sum</c> kernel of the libtorch in this process: 8 (its AVX2 and
    /// default kernels) or 16 (AVX-512), found once by summing 16 values whose float32 sum tells the two orders apart,
    /// then confirmed by summing the squares of a 4,120-value row (three cascade levels, leftover vectors and floats)
    /// both ways; 0 when libtorch's sum is neither order (then <see cref="Applies"/> refuses, and libtorch's ops run).
    /// </summary>
    internal static int LibtorchLanes => Lanes16Or8.Value;

    private static readonly Lazy<int> Lanes16Or8 = new(ProbeLanes);

    private static int ProbeLanes()
    {
        if (!Avx2.IsSupported) return 0;
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        // 2²⁵, seven 1s, −2²⁵, seven 0s: summed lane by lane in one 16-float vector the 1s vanish into 2²⁵ (its float32 ulp
        // is 4) and the sum is 0; in 8-float vectors 2²⁵ meets −2²⁵ first and the sum is 7.
        var values = new float[16];
        values[0] = 1 << 25;
        for (int i = 1; i < 8; i++) values[i] = 1;
        values[8] = -(1 << 25);
        float sum = tensor(values, device: CPU).view(1, 16).sum(new long[] { -1 }).item<float>();
        int lanes = sum == 0 ? 16 : sum == 7 ? 8 : 0;
        if (lanes == 0) return 0;
        // The whole order on a row of bfloat16 values of magnitudes spread over 2^±12 (a fixed pseudo-random sequence).
        const int width = 4120;
        var bits = new ushort[width];
        var row = new float[width];
        uint state = 2463534242;
        for (int i = 0; i < width; i++)
        {
            bits[i] = DecodeRows.PseudoBFloat16(ref state);
            row[i] = BitConverter.UInt32BitsToSingle((uint)bits[i] << 16);
        }
        float libtorch = tensor(row, device: CPU).square().sum().item<float>();
        fixed (ushort* p = bits) return SumOfSquares(p, width, lanes) == libtorch ? lanes : 0;
    }

    /// <summary>
    /// Σ float(x)² over <paramref name="width"/> ≥ 16 bf16 values in float32, summed in the order of libtorch's cascade
    /// sum over a contiguous row (<c>vectorized_inner_sum</c> → <c>row_sum</c> → <c>multi_row_sum</c>: vectors of
    /// <paramref name="lanes"/> floats, four partial sums over a four-level cascade of 16-step chunks, the leftover
    /// vectors into the first partial sum, the partial sums in order, then the leftover floats and the lanes in order).
    /// A vector of 16 lanes is held as two 8-lane halves: lanes are summed independently, so the order is the same.
    /// </summary>
    internal static float SumOfSquares(ushort* row, long width, int lanes)
    {
        int halves = lanes / 8;
        long vectors = width / lanes;
        long groups = vectors / 4;                       // the row as (groups, 4) vectors, four partial sums
        int levelPower = Math.Max(4, CeilLog2(groups) / 4);
        long levelStep = 1L << levelPower, levelMask = levelStep - 1;
        // acc[(level·4 + k)·halves + half]: k one of the four partial sums.
        var acc = stackalloc Vector256<float>[16 * 2];
        for (int j = 0; j < 16 * halves; j++) acc[j] = Vector256<float>.Zero;
        long g = 0;
        while (g + levelStep <= groups)
        {
            for (long j = 0; j < levelStep; j++, g++)
            {
                var block = row + g * 4 * lanes;
                for (int k = 0; k < 4 * halves; k++) acc[k] += Square(block + k * 8);
            }
            for (int level = 1; level < 4; level++)
            {
                for (int k = 0; k < 4 * halves; k++)
                {
                    acc[level * 4 * halves + k] += acc[(level - 1) * 4 * halves + k];
                    acc[(level - 1) * 4 * halves + k] = Vector256<float>.Zero;
                }
                if ((g & (levelMask << (level * levelPower))) != 0) break;
            }
        }
        for (; g < groups; g++)
        {
            var block = row + g * 4 * lanes;
            for (int k = 0; k < 4 * halves; k++) acc[k] += Square(block + k * 8);
        }
        for (int level = 1; level < 4; level++)
            for (int k = 0; k < 4 * halves; k++) acc[k] += acc[level * 4 * halves + k];
        // The first partial sum takes the leftover vectors, then the other three partial sums.
        for (long v = groups * 4; v < vectors; v++)
            for (int h = 0; h < halves; h++) acc[h] += Square(row + v * lanes + h * 8);
        for (int k = 1; k < 4; k++)
            for (int h = 0; h < halves; h++) acc[h] += acc[k * halves + h];
        float sum = 0f;
        for (long k = vectors * lanes; k < width; k++)
        {
            float value = BitConverter.UInt32BitsToSingle((uint)row[k] << 16);
            sum += value * value;
        }
        for (int h = 0; h < halves; h++)
            for (int lane = 0; lane < 8; lane++) sum += acc[h].GetElement(lane);
        return sum;
    }

    /// <summary><see cref="SumOfSquares(ushort*, long, int)"/> of a row of at least 16 bfloat16 bit patterns, in the
    /// order of this process's libtorch (<see cref="LibtorchLanes"/>).</summary>
    internal static float SumOfSquares(ReadOnlySpan<ushort> row)
    {
        if (row.Length < MinimumWidth) throw new ArgumentException($"The row holds {row.Length} values; the sum needs at least {MinimumWidth}.", nameof(row));
        if (!Avx2.IsSupported) throw new PlatformNotSupportedException("The sum of squares needs AVX2.");
        if (LibtorchLanes == 0) throw new NotSupportedException("libtorch's float32 sum order is neither its 8- nor its 16-float one.");
        fixed (ushort* p = row) return SumOfSquares(p, row.Length, LibtorchLanes);
    }

    /// <summary>8 bfloat16 values' squares in float32 (exact: a bfloat16's 8 significant bits square into 16).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> Square(ushort* p)
    {
        var v = Avx2.ShiftLeftLogical(Avx2.ConvertToVector256Int32(Vector128.Load(p)), 16).AsSingle();
        return v * v;
    }

    /// <summary>⌈log₂ x⌉, 1 for x ≤ 2 (ATen's <c>CeilLog2</c>).</summary>
    private static int CeilLog2(long x) => x <= 2 ? 1 : 64 - System.Numerics.BitOperations.LeadingZeroCount((ulong)(x - 1));
}
