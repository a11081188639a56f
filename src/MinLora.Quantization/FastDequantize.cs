using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Quantization;

/// <summary>
/// Dequantization of CPU weights straight into bfloat16 with SIMD, on all cores. libtorch's element-wise CPU ops
/// run at ~1.5 GB/s on this kind of machine (a 4096×4096 int8 weight took 12 ms), which made the dequantize path
/// useless; this runs near memory speed. Each element is computed in float32 and rounded once to bfloat16
/// (round to nearest even).
/// </summary>
internal static unsafe class FastDequantize
{
    /// <summary>Below this many elements per core a block is not worth a thread hand-off (~0.1 ms of work).</summary>
    internal const long MinimumParallelElements = 256L << 10;

    /// <summary>Dequantizes <paramref name="q"/> (CPU, contiguous) into a new bfloat16 tensor [N, K].</summary>
    internal static Tensor ToBFloat16(QuantizedWeight q)
    {
        using var source = new Source(q);
        var output = empty(new[] { source.Rows, source.Columns }, dtype: ScalarType.BFloat16);
        // Eight blocks per core: rows of a fresh tensor page-fault, and smaller blocks balance that better.
        source.DequantizeParallel(0, source.Rows, 0, source.Columns, (ushort*)Pointer(output), Environment.ProcessorCount * 8);
        return output;
    }

    /// <summary>
    /// A quantized weight ready for row-range dequantization: the codes pinned by a contiguous reference and the
    /// scales (and zero points) read once into managed arrays. Rows may be dequantized from several threads at once.
    /// </summary>
    internal sealed class Source : IDisposable
    {
        private readonly QuantizedWeight _q;
        private readonly Tensor _codes;
        private readonly nint _address;
        private readonly float[] _scales;
        private readonly float[]? _zeros;

        internal Source(QuantizedWeight q)
        {
            _q = q;
            _codes = q.Weight.contiguous();
            _address = Pointer(_codes);
            Rows = _codes.shape[0];
            Columns = q.Format == QuantizationFormat.Int8PerRow ? _codes.shape[1] : _codes.shape[1] * 2;
            _scales = ToFloatArray(q.Scale);
            _zeros = q.Zero is null ? null : ToFloatArray(q.Zero);
        }

        /// <summary>N, the output features.</summary>
        internal long Rows { get; }

        /// <summary>K, the input features.</summary>
        internal long Columns { get; }

        /// <summary>
        /// Writes the block rows [r0, r1) × columns [c0, c1) as bfloat16 to <paramref name="destination"/>, row-major
        /// with c1 − c0 elements per row. For int4, c0 and c1 are even; for grouped int4, multiples of the group size.
        /// </summary>
        internal void Dequantize(long r0, long r1, long c0, long c1, ushort* destination)
        {
            long k = Columns, width = c1 - c0;
            var s = (byte*)_address;
            for (long r = r0; r < r1; r++)
            {
                var d = destination + (r - r0) * width;
                switch (_q.Format)
                {
                    case QuantizationFormat.Int8PerRow:
                        Int8Row((sbyte*)s + r * k + c0, d, width, _scales[r]);
                        break;
                    case QuantizationFormat.Int4PerRowChatGlm:
                        Int4Row(s + (r * k + c0) / 2, d, width, width, _scales, null, r, signed: true);
                        break;
                    default:
                        Int4Row(s + (r * k + c0) / 2, d, width, _q.GroupSize, _scales, _zeros, (r * k + c0) / _q.GroupSize, signed: false);
                        break;
                }
            }
            GC.KeepAlive(this);
        }

        /// <summary>
        /// <see cref="Dequantize(long, long, long, long, ushort*)"/> split by rows over the cores (one block each); the
        /// calling thread takes a share.
        /// </summary>
        /// <param name="r0">First row.</param>
        /// <param name="r1">Row past the last.</param>
        /// <param name="c0">First column.</param>
        /// <param name="c1">Column past the last.</param>
        /// <param name="destination">(r1 − r0)·(c1 − c0) elements, row-major.</param>
        /// <param name="blocks">Number of row blocks; null: one per core, fewer for small blocks (tests force several).</param>
        internal void DequantizeParallel(long r0, long r1, long c0, long c1, ushort* destination, int? blocks = null)
        {
            long rows = r1 - r0, width = c1 - c0;
            int count = (int)Math.Min(blocks ?? Math.Min(Environment.ProcessorCount, Math.Max(1, rows * width / MinimumParallelElements)), Math.Max(1, rows));
            if (count <= 1)
            {
                Dequantize(r0, r1, c0, c1, destination);
                return;
            }
            long perBlock = (rows + count - 1) / count;
            nint address = (nint)destination;
            Parallel.For(0, count, b =>
            {
                long a = r0 + b * perBlock, e = Math.Min(r1, a + perBlock);
                if (a < e) Dequantize(a, e, c0, c1, (ushort*)address + (a - r0) * width);
            });
        }

        /// <inheritdoc />
        public void Dispose()
        {
            _codes.Dispose();   // contiguous() returns a new handle even for a contiguous weight
        }
    }

    private static readonly Vector256<float> CenteredLow = Vector256.Create(-8f, -7, -6, -5, -4, -3, -2, -1);
    private static readonly Vector256<float> CenteredHigh = Vector256.Create(0f, 1, 2, 3, 4, 5, 6, 7);
    private static readonly Vector256<float> SignedLow = Vector256.Create(0f, 1, 2, 3, 4, 5, 6, 7);
    private static readonly Vector256<float> SignedHigh = Vector256.Create(-8f, -7, -6, -5, -4, -3, -2, -1);

    private static float[] ToFloatArray(Tensor t)
    {
        using var f = TensorMemory.ContiguousFloat32(t);
        return MemoryMarshal.Cast<byte, float>(f.bytes).ToArray();
    }

    private static nint Pointer(Tensor t) => TensorMemory.Pointer(t);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static ushort RoundToBf16(float f)
    {
        uint bits = BitConverter.SingleToUInt32Bits(f);
        if ((bits & 0x7FFFFFFF) > 0x7F800000) return (ushort)((bits >> 16) | 0x40); // NaN stays NaN
        return (ushort)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<uint> RoundToBf16(Vector256<float> f)
    {
        var bits = f.AsUInt32();
        var lsb = Vector256.ShiftRightLogical(bits, 16) & Vector256.Create(1u);
        return Vector256.ShiftRightLogical(bits + Vector256.Create(0x7FFFu) + lsb, 16); // finite inputs only
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector512<uint> RoundToBf16(Vector512<float> f)
    {
        var bits = f.AsUInt32();
        var lsb = Vector512.ShiftRightLogical(bits, 16) & Vector512.Create(1u);
        return Vector512.ShiftRightLogical(bits + Vector512.Create(0x7FFFu) + lsb, 16); // finite inputs only
    }

    // AggressiveOptimization: SIMD kernels must not run as unoptimised tier-0 code (measured 6× slower).
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Int8Row(sbyte* q, ushort* o, long k, float scale)
    {
        long j = 0;
        if (Avx512BW.IsSupported)
        {
            // 16 weights per step: sign-extend, convert, scale, round to bf16 in the integer lanes, narrow with vpmovdw
            // (10 instructions; the 256-bit path below needs about twice that per 16). Same value, bit for bit.
            var s = Vector512.Create(scale);
            for (; j + 32 <= k; j += 32)
            {
                var b0 = Avx512F.ConvertToVector512Single(Avx512F.ConvertToVector512Int32(Vector128.Load(q + j))) * s;
                var b1 = Avx512F.ConvertToVector512Single(Avx512F.ConvertToVector512Int32(Vector128.Load(q + j + 16))) * s;
                Avx512F.ConvertToVector256UInt16(RoundToBf16(b0)).Store(o + j);
                Avx512F.ConvertToVector256UInt16(RoundToBf16(b1)).Store(o + j + 16);
            }
        }
        else if (Vector256.IsHardwareAccelerated)
        {
            var s = Vector256.Create(scale);
            for (; j + 32 <= k; j += 32)
            {
                var v = Vector256.Load(q + j);
                var (a, b) = Vector256.Widen(v);            // 2 × 16 shorts
                var (a0, a1) = Vector256.Widen(a);          // 4 × 8 ints
                var (b0, b1) = Vector256.Widen(b);
                var r0 = RoundToBf16(Vector256.ConvertToSingle(a0) * s);
                var r1 = RoundToBf16(Vector256.ConvertToSingle(a1) * s);
                var r2 = RoundToBf16(Vector256.ConvertToSingle(b0) * s);
                var r3 = RoundToBf16(Vector256.ConvertToSingle(b1) * s);
                Vector256.Narrow(r0, r1).Store(o + j);
                Vector256.Narrow(r2, r3).Store(o + j + 16);
            }
        }
        for (; j < k; j++) o[j] = RoundToBf16(q[j] * scale);
    }

    /// <summary>
    /// <paramref name="length"/> packed int4 values of one row (even column in the high nibble), in groups of
    /// <paramref name="group"/> whose scales (and zero points) are consecutive from <paramref name="firstGroup"/>: a
    /// 16-entry bfloat16 table per group (value of each nibble), then a table lookup per nibble.
    /// Grouped: value = (u − 8)·s + z; ChatGLM (one group per row): value = signed(u)·s.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Int4Row(byte* packed, ushort* o, long length, long group, float[] scales, float[]? zeros, long firstGroup, bool signed)
    {
        long groups = length / group;
        ushort* lut = stackalloc ushort[16];
        for (long g = 0; g < groups; g++)
        {
            float s = scales[firstGroup + g];
            float z = zeros is null ? 0 : zeros[firstGroup + g];
            if (Vector256.IsHardwareAccelerated)
            {
                // Nibble values: grouped u − 8 ∈ [−8, 7] for u = 0..15; ChatGLM signed(u) = 0..7, −8..−1.
                var lo = signed ? SignedLow : CenteredLow;
                var hi = signed ? SignedHigh : CenteredHigh;
                var vs = Vector256.Create(s);
                var vz = Vector256.Create(z);
                Vector256.Narrow(RoundToBf16(lo * vs + vz), RoundToBf16(hi * vs + vz)).Store(lut);
            }
            else
            {
                for (int u = 0; u < 16; u++)
                    lut[u] = RoundToBf16(signed ? (u >= 8 ? u - 16 : u) * s : (u - 8) * s + z);
            }
            byte* src = packed + g * (group / 2);
            ushort* dst = o + g * group;
            long bytes = group / 2, j = 0;
            if (Avx512F.IsSupported)
            {
                // 16 packed bytes → 16 uint32 lanes (vpmovzxbd); vpermd reads only an index's low 4 bits, so the high
                // nibble (b >> 4) picks column 2j's bf16 into the low half and the byte itself picks column 2j+1's
                // (pre-shifted table) into the high half: 5 instructions per 32 weights, output in column order.
                var high = Avx512F.ConvertToVector512UInt32(Vector256.Load(lut));
                var low = Avx512F.ShiftLeftLogical(high, 16);
                for (; j + 16 <= bytes; j += 16)
                {
                    var b = Avx512F.ConvertToVector512UInt32(Vector128.Load(src + j));
                    (Avx512F.PermuteVar16x32(high, Avx512F.ShiftRightLogical(b, 4)) | Avx512F.PermuteVar16x32(low, b)).AsUInt16().Store(dst + 2 * j);
                }
            }
            else if (Vector256.IsHardwareAccelerated)
            {
                var table = Vector256.Load(lut); // the 16 entries
                for (; j + 16 <= bytes; j += 16)
                {
                    var b = Vector256.WidenLower(Vector128.Load(src + j).ToVector256()); // 16 ushorts holding bytes
                    var hi = Vector256.Shuffle(table, Vector256.ShiftRightLogical(b, 4));
                    var lo = Vector256.Shuffle(table, b & Vector256.Create((ushort)0xF));
                    var (hi0, hi1) = Vector256.Widen(hi);
                    var (lo0, lo1) = Vector256.Widen(lo);
                    (hi0 | Vector256.ShiftLeft(lo0, 16)).AsUInt16().Store(dst + 2 * j);
                    (hi1 | Vector256.ShiftLeft(lo1, 16)).AsUInt16().Store(dst + 2 * j + 16);
                }
            }
            for (; j < bytes; j++)
            {
                byte v = src[j];
                dst[2 * j] = lut[v >> 4];
                dst[2 * j + 1] = lut[v & 0xF];
            }
        }
    }
}
