using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace MinLora.Quantization;

/// <summary>Raw access to the storage of contiguous CPU tensors for the SIMD kernels.</summary>
internal static unsafe class TensorMemory
{
    /// <summary>The address of the first element. The storage is native memory and does not move while the tensor lives.</summary>
    internal static nint Pointer(Tensor t)
    {
        fixed (byte* p = &MemoryMarshal.GetReference(t.bytes)) return (nint)p;
    }
}
