using static TorchSharp.torch;

namespace MinLora;

/// <summary>
/// A linear-like layer that is not <c>torch.nn.Linear</c> (for example a quantized linear layer) and that LoRA can
/// wrap: <c>y = layer(x) + scale·B(A(dropout(x)))</c>. Implement it on a <c>nn.Module&lt;Tensor, Tensor&gt;</c>.
/// </summary>
public interface ILinearLayer
{
    /// <summary>Size of the last dimension of the input.</summary>
    long InFeatures { get; }

    /// <summary>Size of the last dimension of the output.</summary>
    long OutFeatures { get; }

    /// <summary>The floating element type of the layer's output (the default type of adapters on it).</summary>
    ScalarType OutputDtype { get; }

    /// <summary>The device that holds the layer's weights.</summary>
    Device WeightDevice { get; }

    /// <summary>Adds <paramref name="delta"/> (float32, shape [OutFeatures, InFeatures]) to the effective weight.</summary>
    /// <param name="delta">The update, float32.</param>
    /// <returns>
    /// True when the result equals the float sum up to the rounding of a float weight; false when the layer had to
    /// round it further (re-quantization), so outputs differ from the unmerged model by more than float rounding.
    /// </returns>
    bool AddToWeight(Tensor delta);
}
