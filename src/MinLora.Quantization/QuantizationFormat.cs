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
