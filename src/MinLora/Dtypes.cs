using static TorchSharp.torch;

namespace MinLora;

internal static class Dtypes
{
    internal static bool IsFloating(ScalarType t) =>
        t is ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float32 or ScalarType.Float64;
}
