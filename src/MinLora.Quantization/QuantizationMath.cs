using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Quantization;

/// <summary>A quantized weight in one of the <see cref="QuantizationFormat"/> layouts.</summary>
/// <param name="Format">The layout.</param>
/// <param name="Weight">Packed integer weights.</param>
/// <param name="Scale">Scales: [N] for per-row formats, [N, K/group] for grouped.</param>
/// <param name="Zero">Zero points [N, K/group] for <see cref="QuantizationFormat.Int4Grouped"/>, else null.</param>
/// <param name="GroupSize">Group size along K for grouped formats; K for per-row formats.</param>
public sealed record QuantizedWeight(QuantizationFormat Format, Tensor Weight, Tensor Scale, Tensor? Zero, int GroupSize);

/// <summary>
/// Quantization and dequantization of weight matrices [N, K] (out × in) in the <see cref="QuantizationFormat"/>
/// layouts. Pure tensor code, device-agnostic; the reference for the fast kernels.
/// </summary>
public static class QuantizationMath
{
    /// <summary>The group sizes libtorch's int4 kernels accept.</summary>
    public static IReadOnlyList<int> SupportedGroupSizes { get; } = new[] { 32, 64, 128, 256 };

    /// <summary>Quantizes <paramref name="weight"/> [N, K] (any floating type) into <paramref name="format"/>.</summary>
    /// <param name="weight">The float weight, out × in.</param>
    /// <param name="format">The layout.</param>
    /// <param name="groupSize">Group size along K for <see cref="QuantizationFormat.Int4Grouped"/> (32, 64, 128, 256).</param>
    /// <returns>The quantized tensors (new tensors on the weight's device).</returns>
    /// <exception cref="ArgumentException">Not a floating 2-D tensor, K odd for int4, or K not divisible by the group size.</exception>
    public static QuantizedWeight Quantize(Tensor weight, QuantizationFormat format, int groupSize = 128)
    {
        ArgumentNullException.ThrowIfNull(weight);
        if (weight.dim() != 2) throw new ArgumentException($"Expected a 2-D weight [out, in], got rank {weight.dim()}.", nameof(weight));
        if (!weight.is_floating_point()) throw new ArgumentException($"Expected a floating weight, got {weight.dtype}.", nameof(weight));
        long k = weight.shape[1];
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var w = weight.detach().to(ScalarType.Float32);
        QuantizedWeight result;
        switch (format)
        {
            case QuantizationFormat.Int8PerRow:
                {
                    var scale = RowScale(w, 127);
                    var q = w.div(scale.to(ScalarType.Float32).unsqueeze(1)).round_().clamp_(-127, 127).to(ScalarType.Int8);
                    result = new QuantizedWeight(format, q, scale, null, (int)k);
                    break;
                }
            case QuantizationFormat.Int4PerRowChatGlm:
                {
                    RequireEven(k);
                    var scale = RowScale(w, 7);
                    var q = w.div(scale.to(ScalarType.Float32).unsqueeze(1)).round_().clamp_(-7, 7).to(ScalarType.Int16);
                    result = new QuantizedWeight(format, PackSignedNibbles(q), scale, null, (int)k);
                    break;
                }
            case QuantizationFormat.Int4Grouped:
                {
                    RequireEven(k);
                    if (!SupportedGroupSizes.Contains(groupSize))
                        throw new ArgumentException($"Group size {groupSize} is not one of {string.Join(", ", SupportedGroupSizes)}.", nameof(groupSize));
                    if (k % groupSize != 0)
                        throw new ArgumentException($"Group size {groupSize} does not divide in_features {k}.", nameof(groupSize));
                    long n = w.shape[0], groups = k / groupSize;
                    var g = w.reshape(n, groups, groupSize);
                    var min = g.amin(new long[] { 2 });
                    var max = g.amax(new long[] { 2 });
                    // zero first (rounded to bf16), then a scale rounded *up* so every value of the group lies in
                    // [zero − 8·scale, zero + 7·scale]: the error is then at most scale/2 per element.
                    var zero = min.add(max.sub(min).mul(8.0 / 15.0)).to(ScalarType.BFloat16);
                    var z = zero.to(ScalarType.Float32);
                    var need = maximum(max.sub(z).div(7.0), z.sub(min).div(8.0)).clamp_min(1e-12);
                    var scale = need.mul(1 + 1.0 / 128).to(ScalarType.BFloat16);
                    var s = scale.to(ScalarType.Float32);
                    var u = g.sub(z.unsqueeze(2)).div(s.unsqueeze(2)).round_().add_(8).clamp_(0, 15).reshape(n, k).to(ScalarType.Int16);
                    result = new QuantizedWeight(format, PackUnsignedNibbles(u), scale, zero, groupSize);
                    break;
                }
            default:
                throw new ArgumentOutOfRangeException(nameof(format), format, "Unknown quantization format.");
        }
        result.Weight.MoveToOuterDisposeScope();
        result.Scale.MoveToOuterDisposeScope();
        result.Zero?.MoveToOuterDisposeScope();
        return result;
    }

    /// <summary>Reconstructs the float weight [N, K] from its quantized form, computing in <paramref name="dtype"/>.</summary>
    /// <param name="q">The quantized weight.</param>
    /// <param name="dtype">The element type of the result (and of the arithmetic: float64 is exact, bfloat16 rounds once more).</param>
    /// <returns>A new tensor.</returns>
    public static Tensor Dequantize(QuantizedWeight q, ScalarType dtype = ScalarType.Float32)
    {
        ArgumentNullException.ThrowIfNull(q);
        if (dtype == ScalarType.BFloat16 && q.Weight.device_type == DeviceType.CPU)
            return FastDequantize.ToBFloat16(q);
        using var scope = NewDisposeScope();
        Tensor w;
        switch (q.Format)
        {
            case QuantizationFormat.Int8PerRow:
                w = q.Weight.to(dtype).mul_(q.Scale.to(dtype).unsqueeze(1));
                break;
            case QuantizationFormat.Int4PerRowChatGlm:
                w = UnpackSignedNibbles(q.Weight).to(dtype).mul_(q.Scale.to(dtype).unsqueeze(1));
                break;
            case QuantizationFormat.Int4Grouped:
                {
                    long n = q.Weight.shape[0], k = q.Weight.shape[1] * 2, groups = k / q.GroupSize;
                    // (u − 8)·s + z = u·s + (z − 8·s): two in-place passes over the unpacked weight.
                    var s = q.Scale.to(ScalarType.Float32);
                    using Scalar eight = 8.0; // held for the native call (TorchSharp does not keep Scalars alive)
                    var shift = q.Zero!.to(ScalarType.Float32).sub(s.mul(eight)).to(dtype).unsqueeze(2);
                    w = UnpackUnsignedNibbles(q.Weight).to(dtype).view(n, groups, q.GroupSize)
                        .mul_(s.to(dtype).unsqueeze(2)).add_(shift).view(n, k);
                    break;
                }
            default:
                throw new ArgumentOutOfRangeException(nameof(q), q.Format, "Unknown quantization format.");
        }
        return w.MoveToOuterDisposeScope();
    }

    /// <summary>Packs signed values q ∈ [−8, 7] (any integer type) [N, K] into int8 [N, K/2], even column in the high nibble (ChatGLM).</summary>
    /// <param name="q">The values.</param>
    /// <returns>The packed bytes.</returns>
    public static Tensor PackSignedNibbles(Tensor q)
    {
        ArgumentNullException.ThrowIfNull(q);
        using var scope = NewDisposeScope();
        var v = q.to(ScalarType.Int16);
        var hi = v.slice(1, 0, v.shape[1], 2);
        var lo = v.slice(1, 1, v.shape[1], 2);
        // (hi << 4) | (lo & 0xF), as a signed byte.
        var b = hi.bitwise_left_shift(4).bitwise_or(lo.bitwise_and(0xF));
        return b.bitwise_and(0xFF).sub(b.bitwise_and(0x80).mul(2)).to(ScalarType.Int8).MoveToOuterDisposeScope();
    }

    /// <summary>Unpacks int8 [N, K/2] (ChatGLM) into int8 [N, K] signed values: <c>hi = b &gt;&gt; 4</c>, <c>lo = ((b &lt;&lt; 4) as int8) &gt;&gt; 4</c>.</summary>
    /// <param name="packed">The packed bytes.</param>
    /// <returns>The values.</returns>
    public static Tensor UnpackSignedNibbles(Tensor packed)
    {
        ArgumentNullException.ThrowIfNull(packed);
        using var scope = NewDisposeScope();
        var b = packed.to(ScalarType.Int8);
        var hi = b.bitwise_right_shift(4);                        // arithmetic shift of the signed byte
        using Scalar eight = 8;
        var lo = b.bitwise_and(0xF).bitwise_xor_(8).sub_(eight);  // sign-extend the low nibble
        return stack(new[] { hi, lo }, 2).view(packed.shape[0], packed.shape[1] * 2).MoveToOuterDisposeScope();
    }

    /// <summary>Packs u ∈ [0, 15] [N, K] into uint8 [N, K/2], even column in the high nibble (torch ≥ 2.5 int4 layout).</summary>
    /// <param name="u">The values.</param>
    /// <returns>The packed bytes.</returns>
    public static Tensor PackUnsignedNibbles(Tensor u)
    {
        ArgumentNullException.ThrowIfNull(u);
        using var scope = NewDisposeScope();
        var v = u.to(ScalarType.Int16);
        var hi = v.slice(1, 0, v.shape[1], 2);
        var lo = v.slice(1, 1, v.shape[1], 2);
        return hi.bitwise_left_shift(4).bitwise_or(lo).to(ScalarType.Byte).MoveToOuterDisposeScope();
    }

    /// <summary>Unpacks uint8 [N, K/2] into uint8 [N, K] values u ∈ [0, 15].</summary>
    /// <param name="packed">The packed bytes.</param>
    /// <returns>The values.</returns>
    public static Tensor UnpackUnsignedNibbles(Tensor packed)
    {
        ArgumentNullException.ThrowIfNull(packed);
        using var scope = NewDisposeScope();
        var b = packed.to(ScalarType.Byte);
        return stack(new[] { b.bitwise_right_shift(4), b.bitwise_and(0xF) }, 2)
            .view(packed.shape[0], packed.shape[1] * 2).MoveToOuterDisposeScope();
    }

    private static Tensor RowScale(Tensor w, double levels) =>
        w.abs().amax(new long[] { 1 }).div(levels).clamp_min(1e-12).to(ScalarType.Float16).clamp_min(6e-8);

    private static void RequireEven(long k)
    {
        if (k % 2 != 0) throw new ArgumentException($"int4 packing needs an even in_features, got {k}.");
    }
}
