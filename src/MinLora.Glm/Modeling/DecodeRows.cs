using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Modeling;

/// <summary>What the decoding passes over a step's rows share: their input checks and their probes' test rows.</summary>
internal static class DecodeRows
{
    /// <summary>
    /// Whether <paramref name="x"/> is a contiguous bf16 CPU tensor of at most <paramref name="maxValues"/> values
    /// whose last dimension is <paramref name="width"/>, <paramref name="first"/> and <paramref name="second"/> (when
    /// given) contiguous 1-D bf16 CPU tensors of <paramref name="width"/> values, and no gradient is wanted through any
    /// of them. (Two optional parameters rather than a params array: this runs several times per layer and step.)
    /// </summary>
    internal static bool Accept(Tensor x, long width, long maxValues, Tensor? first = null, Tensor? second = null)
    {
        if (x.device_type != DeviceType.CPU || x.dtype != ScalarType.BFloat16 || !x.is_contiguous() ||
            x.numel() is not (> 0 and var n) || n > maxValues || x.dim() == 0 || x.size(-1) != width)
            return false;
        bool grad = is_grad_enabled();
        return !(grad && x.requires_grad) && Parameter(first, width, grad) && Parameter(second, width, grad);
    }

    private static bool Parameter(Tensor? p, long width, bool grad) =>
        p is null || (p.device_type == DeviceType.CPU && p.dtype == ScalarType.BFloat16 && p.is_contiguous() && p.dim() == 1 &&
            p.numel() == width && !(grad && p.requires_grad));

    /// <summary>
    /// The next bf16 bit pattern of a fixed pseudo-random sequence (xorshift32 from <paramref name="state"/>): a random
    /// sign, exponent 115…139 (magnitudes 2⁻¹²…2¹²) and 7 mantissa bits, plus <paramref name="offset"/> (rounded down
    /// to bf16). The probes that compare a pass with libtorch once per process draw their rows from it.
    /// </summary>
    internal static ushort PseudoBFloat16(ref uint state, float offset = 0f)
    {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        var bits = (ushort)(((state & 1) << 15) | ((115 + (state >> 1) % 25) << 7) | ((state >> 8) & 0x7F));
        if (offset == 0f) return bits;
        float value = BitConverter.UInt32BitsToSingle((uint)bits << 16) + offset;
        return (ushort)(BitConverter.SingleToUInt32Bits(value) >> 16);
    }
}
