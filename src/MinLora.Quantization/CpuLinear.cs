using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MinLora.Quantization;

/// <summary>
/// Few-row products of plain bfloat16 <c>Linear</c> layers on MinLora's CPU kernel (decoding: one row per sequence).
/// </summary>
/// <remarks>
/// libtorch's bfloat16 matrix-vector product reads the weight at about 60 % of this kind of machine's read bandwidth
/// (4096×4096, 1 row: 2.4 ms for 33.5 MB on a 2-core Xeon VM that reads 24 GB/s); the kernel behind
/// <see cref="QuantizedKernel.CpuGemv"/> converts bf16 to float32 with a widening shift and streams the weight at the
/// read rate. The call goes around the module's <c>call</c>, so forward hooks registered on that <c>Linear</c> do
/// not run for these rows.
/// </remarks>
public static class CpuLinear
{
    /// <summary>The row count up to which <see cref="Forward"/> uses the kernel.</summary>
    public const int MaxRows = 8;

    /// <summary>
    /// <paramref name="module"/>(<paramref name="input"/>): through the kernel when the module is a bfloat16
    /// <c>Linear</c> on the CPU, the input has at most <see cref="MaxRows"/> rows and no gradient is wanted; otherwise
    /// through <c>module.call</c>.
    /// </summary>
    /// <param name="module">Any linear-like module.</param>
    /// <param name="input">[..., in_features].</param>
    /// <returns>[..., out_features] in the input's type.</returns>
    public static Tensor Forward(nn.Module<Tensor, Tensor> module, Tensor input)
    {
        ArgumentNullException.ThrowIfNull(module);
        ArgumentNullException.ThrowIfNull(input);
        if (module is not Linear linear || !CpuGemv.IsSupported) return module.call(input);
        var w = linear.weight;
        // Each shape is read once: a read is a native call that allocates (a decoding step makes ~115 of these calls).
        if (w is null || w.dtype != ScalarType.BFloat16 || w.device_type != DeviceType.CPU || input.device_type != DeviceType.CPU || !w.is_contiguous())
            return module.call(input);
        var ws = w.shape;
        var xs = input.shape;
        if (ws.Length != 2 || xs.Length == 0 || xs[^1] != ws[1] || ws[1] > int.MaxValue / 2 || ws[0] > int.MaxValue)
            return module.call(input);
        long rows = input.numel() / ws[1];
        if (rows > MaxRows || rows == 0 || (is_grad_enabled() && (input.requires_grad || w.requires_grad || (linear.bias?.requires_grad ?? false))))
            return module.call(input);
        return Product(w, (int)ws[1], (int)ws[0], linear.bias, input);
    }

    private static unsafe Tensor Product(Tensor w, int k, int n, Tensor? bias, Tensor input)
    {
        var pw = TensorMemory.Pointer(w);
        return CpuGemv.Apply(input, k, n, bias, (x, rows, b, y) => CpuGemv.BFloat16(x, rows, k, (ushort*)pw, b, y, n));
    }
}
