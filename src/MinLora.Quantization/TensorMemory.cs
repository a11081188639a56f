using System.Runtime.InteropServices;
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
}
