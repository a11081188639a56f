using static TorchSharp.torch;

namespace MinLora;

/// <summary>Element-type classes (one copy for the packages; MinLora.Quantization and MinLora.Glm see it as friends).</summary>
internal static class Dtypes
{
    internal static bool IsInteger(ScalarType t) => t is ScalarType.Int8 or ScalarType.Byte or ScalarType.Int16 or ScalarType.Int32 or ScalarType.Int64 or ScalarType.Bool;

    internal static bool IsFloating(ScalarType t) =>
        t is ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float32 or ScalarType.Float64;
}
