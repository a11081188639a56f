using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Quantization;

/// <summary>
/// libtorch's weight-only quantized matmul kernels, which TorchSharp does not bind, reached through a TorchScript
/// compilation unit compiled once: <c>_weight_int8pack_mm</c> (CPU, CUDA),
/// <c>_convert_weight_to_int4pack_for_cpu</c> + <c>_weight_int4pack_mm_for_cpu</c> (CPU) and
/// <c>_convert_weight_to_int4pack</c> + <c>_weight_int4pack_mm</c> (CUDA, sm80+), and <c>_int_mm</c> (int8 × int8 → int32;
/// oneDNN's integer GEMM on the CPU).
/// </summary>
internal static class QuantizationKernels
{
    private const string Source = @"
def int8_mm(x: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    return torch._weight_int8pack_mm(x, w, scales)

def int_mm(a: Tensor, b: Tensor) -> Tensor:
    return torch._int_mm(a, b)

def int4_pack_cpu(u: Tensor) -> Tensor:
    return torch._convert_weight_to_int4pack_for_cpu(u, 1)

def int4_mm_cpu(x: Tensor, w: Tensor, group: int, scales_and_zeros: Tensor) -> Tensor:
    return torch._weight_int4pack_mm_for_cpu(x, w, group, scales_and_zeros)

def int4_pack_cuda(packed: Tensor, inner_k_tiles: int) -> Tensor:
    return torch._convert_weight_to_int4pack(packed, inner_k_tiles)

def int4_mm_cuda(x: Tensor, w: Tensor, group: int, scales_and_zeros: Tensor) -> Tensor:
    return torch._weight_int4pack_mm(x, w, group, scales_and_zeros)
";

    private static readonly Lazy<jit.CompilationUnit?> Unit = new(() =>
    {
        try
        {
            return jit.compile(Source);
        }
        catch (Exception ex) when (ex is ExternalException or InvalidOperationException or ArgumentException)
        {
            CompileError = ex.Message;
            return null;
        }
    }, LazyThreadSafetyMode.ExecutionAndPublication);

    /// <summary>Why the kernels are unavailable, when they are.</summary>
    internal static string? CompileError { get; private set; }

    internal static bool Available => Unit.Value is not null;

    private static Tensor Invoke(string name, params object[] args) => (Tensor)Unit.Value!.invoke(name, args);

    internal static Tensor Int8Mm(Tensor x, Tensor w, Tensor scales) => Invoke("int8_mm", x, w, scales);

    internal static Tensor IntMm(Tensor a, Tensor b) => Invoke("int_mm", a, b);

    internal static Tensor Int4PackCpu(Tensor u) => Invoke("int4_pack_cpu", u);

    internal static Tensor Int4MmCpu(Tensor x, Tensor w, int group, Tensor scalesAndZeros) => Invoke("int4_mm_cpu", x, w, (long)group, scalesAndZeros);

    internal static Tensor Int4PackCuda(Tensor packed, int innerKTiles) => Invoke("int4_pack_cuda", packed, (long)innerKTiles);

    internal static Tensor Int4MmCuda(Tensor x, Tensor w, int group, Tensor scalesAndZeros) => Invoke("int4_mm_cuda", x, w, (long)group, scalesAndZeros);
}
