namespace MinLora.Quantization;

/// <summary>The weight layouts <see cref="QuantizedLinear"/> holds (the persistent state-dict contract).</summary>
public enum QuantizationFormat
{
    /// <summary>
    /// Symmetric int8, one scale per output row: <c>weight</c> int8 [N, K], <c>weight_scale</c> float16 [N] with
    /// <c>scale = half(max|w| / 127)</c>, <c>q = round(w / scale)</c>. ChatGLM's int8 checkpoint layout, and exactly what
    /// libtorch's <c>_weight_int8pack_mm</c> consumes.
    /// </summary>
    Int8PerRow,

    /// <summary>
    /// Asymmetric group-wise int4 (torchao / tinygemm convention): <c>weight</c> uint8 [N, K/2] with two values
    /// u ∈ [0, 15] per byte (even column in the high nibble), <c>weight_scale</c> and <c>weight_zero</c> bfloat16
    /// [N, K/group]; <c>w = (u − 8)·scale + zero</c>.
    /// </summary>
    Int4Grouped,

    /// <summary>
    /// ChatGLM's symmetric per-row int4: <c>weight</c> int8 [N, K/2] holding two signed values q ∈ [−7, 7] per byte
    /// (even column in the high nibble), <c>weight_scale</c> float16 [N] with <c>scale = half(max|w| / 7)</c>;
    /// <c>w = q·scale</c>. Loads ChatGLM's <c>chatglm-6b-int4</c> checkpoints.
    /// </summary>
    Int4PerRowChatGlm,
}

/// <summary>The one rule from a bit width to a <see cref="QuantizationFormat"/>.</summary>
public static class QuantizationFormats
{
    /// <summary>
    /// 8 bits → <see cref="QuantizationFormat.Int8PerRow"/>; 4 bits → <paramref name="int4Format"/> (the caller's
    /// default: <see cref="QuantizationFormat.Int4Grouped"/> for <see cref="QuantizeExtensions.Quantize(TorchSharp.torch.nn.Module, int, QuantizeOptions?)"/>,
    /// ChatGLM's layout for ChatGLM checkpoints).
    /// </summary>
    /// <param name="bits">4 or 8.</param>
    /// <param name="int4Format">The 4-bit layout to use for 4 bits.</param>
    /// <returns>The format.</returns>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="bits"/> is not 4 or 8.</exception>
    /// <exception cref="ArgumentException"><paramref name="int4Format"/> is not a 4-bit format.</exception>
    public static QuantizationFormat FromBits(int bits, QuantizationFormat int4Format)
    {
        if (bits is not (4 or 8)) throw new ArgumentOutOfRangeException(nameof(bits), bits, "Only 8-bit and 4-bit quantization are supported.");
        if (bits == 8) return QuantizationFormat.Int8PerRow;
        if (int4Format == QuantizationFormat.Int8PerRow) throw new ArgumentException("The 4-bit format must be a 4-bit format (Int4Grouped or Int4PerRowChatGlm).", nameof(int4Format));
        return int4Format;
    }

    /// <summary>Bits per weight of a format (8 or 4).</summary>
    /// <param name="format">The format.</param>
    /// <returns>8 or 4.</returns>
    public static int Bits(this QuantizationFormat format) => format == QuantizationFormat.Int8PerRow ? 8 : 4;
}
