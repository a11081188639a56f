using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Quantization;

/// <summary>
/// Autograd for <see cref="QuantizedLinear"/>: the forward saves no tensor (only the layer and the input's type), and
/// the backward dequantizes the weight again to compute dL/dx = dL/dy·W. Without it, <c>linear(x, dequant(W))</c>
/// keeps every layer's dequantized weight alive until backward: an int8 ChatGLM-6B then trains in bf16 memory.
/// The weights are frozen, so no weight gradient is computed.
/// </summary>
internal sealed class QuantizedLinearFunction : autograd.SingleTensorFunction<QuantizedLinearFunction>
{
    private const string LayerKey = "layer";
    private const string DtypeKey = "dtype";

    /// <inheritdoc />
    public override string Name => "QuantizedLinearBackward";

    /// <inheritdoc />
    public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
    {
        var input = (Tensor)vars[0];
        var layer = (QuantizedLinear)vars[1];
        ctx.save_data(LayerKey, layer);
        ctx.save_data(DtypeKey, input.dtype);
        return layer.Product(input);
    }

    /// <inheritdoc />
    public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad_output)
    {
        var layer = (QuantizedLinear)ctx.get_data(LayerKey);
        var dtype = (ScalarType)ctx.get_data(DtypeKey);
        // One gradient per forward argument: the input's, and none for the layer (not a tensor).
        return new List<Tensor> { layer.InputGradient(grad_output, dtype), null! };
    }
}
