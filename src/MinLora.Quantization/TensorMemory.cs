using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Quantization;

/// <summary>Raw access to the storage of contiguous CPU tensors for the SIMD kernels.</summary>
internal static unsafe class TensorMemory
{
    /// <summary>The address of the first element. The storage is native memory and does not move while the tensor lives.</summary>
    internal static nint Pointer(Tensor t)
    {
        // TorchSharp's byte span refuses tensors over int.MaxValue bytes (a GLM-4 embedding in float32 is 2.5 GB):
        // the first element's one-element view starts at the same address.
        if (t.numel() * t.element_size() > int.MaxValue)
        {
            using var flat = t.view(-1);
            using var first = flat.narrow(0, 0, 1);
            return Pointer(first);
        }
        fixed (byte* p = &MemoryMarshal.GetReference(t.bytes)) return (nint)p;
    }

    /// <summary>
    /// <paramref name="t"/> as a contiguous float32 tensor (a new handle, possibly sharing storage), with the
    /// intermediate handle disposed here: a chained <c>t.to(…).contiguous()</c> outside a dispose scope leaves the
    /// first result to the finalizer.
    /// </summary>
    internal static Tensor ContiguousFloat32(Tensor t)
    {
        using var f = t.to(ScalarType.Float32);
        return f.contiguous();
    }

    /// <summary>Native scratch memory for the kernels: 64-byte aligned, not zeroed, freed with <see cref="Free"/>.</summary>
    internal static float* Scratch(long count) => (float*)NativeMemory.AlignedAlloc((nuint)(Math.Max(1, count) * sizeof(float)), 64);

    /// <summary>Frees <see cref="Scratch"/> memory (null is ignored).</summary>
    internal static void Free(void* p)
    {
        if (p != null) NativeMemory.AlignedFree(p);
    }

    /// <summary>16 bfloat16 values as float32 (exact: the 16 bits become the high half of each float).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector512<float> LoadBFloat16(ushort* p) =>
        Avx512F.ShiftLeftLogical(Avx512F.ConvertToVector512UInt32(Vector256.Load(p)), 16).AsSingle();

    /// <summary>
    /// The bfloat16 bit patterns (in the low 16 bits of each lane) nearest to <paramref name="v"/>, ties to even, as
    /// libtorch rounds; NaN stays NaN.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector512<uint> RoundToBFloat16(Vector512<float> v)
    {
        var nan = Vector512.ShiftRightLogical(v.AsUInt32(), 16) | Vector512.Create(0x40u);
        return Vector512.ConditionalSelect(Vector512.Equals(v, v).AsUInt32(), FastDequantize.RoundToBf16(v), nan);
    }

    /// <summary><paramref name="v"/> rounded to bfloat16 as libtorch rounds (<see cref="RoundToBFloat16"/>), as float32.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector512<float> RoundedToBFloat16(Vector512<float> v) => Vector512.ShiftLeft(RoundToBFloat16(v), 16).AsSingle();

    /// <summary>Stores 16 float32 values that are bfloat16 values (low halves zero) as bfloat16: their high halves.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static void StoreBFloat16Values(ushort* p, Vector512<float> v) =>
        Avx512F.ConvertToVector256UInt16(Vector512.ShiftRightLogical(v.AsUInt32(), 16)).Store(p);

    /// <summary>The first <paramref name="count"/> (0 to 16) bfloat16 values at <paramref name="p"/> as float32, the
    /// other lanes +0: the tail of a row through the same vector arithmetic as its full blocks.</summary>
    internal static Vector512<float> LoadBFloat16Partial(ushort* p, int count)
    {
        ushort* padded = stackalloc ushort[16];
        new Span<ushort>(padded, 16).Clear();
        new Span<ushort>(p, count).CopyTo(new Span<ushort>(padded, 16));
        return LoadBFloat16(padded);
    }

    /// <summary>Stores the first <paramref name="count"/> (0 to 16) lanes of <paramref name="v"/>, bfloat16 values, as
    /// bfloat16 (<see cref="StoreBFloat16Values"/> for a row's tail).</summary>
    internal static void StoreBFloat16Partial(ushort* p, Vector512<float> v, int count)
    {
        ushort* padded = stackalloc ushort[16];
        StoreBFloat16Values(padded, v);
        new Span<ushort>(padded, count).CopyTo(new Span<ushort>(p, count));
    }

    /// <summary>bfloat16 → float32: the 16 bits become the high half of the float (exact).</summary>
    internal static void WidenBFloat16(ushort* source, float* destination, long count)
    {
        long i = 0;
        if (Avx512F.IsSupported)
        {
            for (; i + 16 <= count; i += 16) LoadBFloat16(source + i).Store(destination + i);
        }
        for (; i < count; i++) destination[i] = BitConverter.UInt32BitsToSingle((uint)source[i] << 16);
    }

    /// <summary>
    /// float16 → float32 (exact, subnormals, ±∞ and NaN included): the 15 magnitude bits shifted into a float's
    /// exponent and mantissa read as a float 2¹¹² too small (a subnormal half lands on a float32 subnormal, scaled
    /// exactly), so one multiply by 2¹¹² fixes every finite value; an all-ones exponent stays all ones.
    /// </summary>
    internal static void WidenFloat16(ushort* source, float* destination, long count)
    {
        long i = 0;
        if (Avx512F.IsSupported)
        {
            var scale = Vector512.Create(BitConverter.UInt32BitsToSingle(0x77800000u));   // 2¹¹²
            var magnitudeMask = Vector512.Create(0x7FFFu);
            var infinity = Vector512.Create(0x7C00u << 13);
            for (; i + 16 <= count; i += 16)
            {
                var h = Avx512F.ConvertToVector512UInt32(Vector256.Load(source + i));
                var magnitude = Avx512F.ShiftLeftLogical(h & magnitudeMask, 13);
                var finite = (magnitude.AsSingle() * scale).AsUInt32();
                var special = magnitude | Vector512.Create(0x7F800000u);
                var bits = Vector512.ConditionalSelect(Vector512.GreaterThanOrEqual(magnitude, infinity), special, finite);
                (bits | Avx512F.ShiftLeftLogical(h & Vector512.Create(0x8000u), 16)).AsSingle().Store(destination + i);
            }
        }
        for (; i < count; i++) destination[i] = (float)BitConverter.UInt16BitsToHalf(source[i]);
    }

    /// <summary>float32 → bfloat16, round to nearest even as libtorch converts; NaN stays NaN.</summary>
    internal static void NarrowToBFloat16(float* source, ushort* destination, long count)
    {
        long i = 0;
        if (Avx512F.IsSupported)
        {
            for (; i + 16 <= count; i += 16) Avx512F.ConvertToVector256UInt16(RoundToBFloat16(Vector512.Load(source + i))).Store(destination + i);
        }
        for (; i < count; i++) destination[i] = FastDequantize.RoundToBf16(source[i]);
    }
}

/// <summary>
/// The values of a tensor as contiguous float32 for the kernels: a contiguous float32 CPU tensor's own storage; a
/// contiguous bfloat16 or float16 one widened into native scratch memory; anything else through libtorch's conversion.
/// The source tensor must stay alive while <see cref="Pointer"/> is used.
/// </summary>
internal readonly unsafe struct Float32Values : IDisposable
{
    private readonly float* _scratch;
    private readonly Tensor? _converted;

    private Float32Values(float* pointer, float* scratch, Tensor? converted)
    {
        Pointer = pointer;
        _scratch = scratch;
        _converted = converted;
    }

    /// <summary>The first value (null for <c>default</c>).</summary>
    public float* Pointer { get; }

    public static Float32Values Of(Tensor t)
    {
        if (t.device_type == DeviceType.CPU && t.is_contiguous())
        {
            var type = t.dtype;
            if (type == ScalarType.Float32) return new((float*)TensorMemory.Pointer(t), null, null);
            if (type is ScalarType.BFloat16 or ScalarType.Float16)
            {
                long count = t.numel();
                float* scratch = TensorMemory.Scratch(count);
                var source = (ushort*)TensorMemory.Pointer(t);
                if (type == ScalarType.BFloat16) TensorMemory.WidenBFloat16(source, scratch, count);
                else TensorMemory.WidenFloat16(source, scratch, count);
                GC.KeepAlive(t);
                return new(scratch, scratch, null);
            }
        }
        var converted = TensorMemory.ContiguousFloat32(t);
        return new((float*)TensorMemory.Pointer(converted), null, converted);
    }

    public void Dispose()
    {
        TensorMemory.Free(_scratch);
        _converted?.Dispose();
    }
}
