using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Modeling;

/// <summary>The shape and type checks the decoding norms (<see cref="DecodeRmsNorm"/>, <see cref="DecodeLayerNorm"/>) share.</summary>
internal static class DecodeRows
{
    /// <summary>
    /// Whether <paramref name="x"/> is a contiguous bf16 CPU tensor of at most <paramref name="maxValues"/> values
    /// whose last dimension is <paramref name="width"/>, each of <paramref name="parameters"/> a contiguous 1-D bf16 CPU
    /// tensor of <paramref name="width"/> values, and no gradient is wanted through any of them.
    /// </summary>
    internal static bool Accept(Tensor x, long width, long maxValues, params Tensor[] parameters)
    {
        if (x.device_type != DeviceType.CPU || x.dtype != ScalarType.BFloat16 || !x.is_contiguous() ||
            x.numel() is not (> 0 and var n) || n > maxValues || x.dim() == 0 || x.size(-1) != width)
            return false;
        bool grad = is_grad_enabled();
        if (grad && x.requires_grad) return false;
        foreach (var p in parameters)
        {
            if (p.device_type != DeviceType.CPU || p.dtype != ScalarType.BFloat16 || !p.is_contiguous() || p.dim() != 1 ||
                p.numel() != width || (grad && p.requires_grad))
                return false;
        }
        return true;
    }
}
