using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Modeling;

/// <summary>
/// Gradient checkpointing of one GLM block: the forward runs without recording a graph and keeps only the block's
/// input (and the rotary angles and mask it was called with); the backward runs the block again with gradients and
/// back-propagates through that recomputation. Activation memory per block drops from everything the block's ops
/// save (attention scores and probabilities in float32, the MLP's 4h-wide intermediates) to one [s, b, h] input, for
/// one extra forward per step. The CPU random state is saved and restored around the recomputation, so dropout draws
/// the same masks.
/// </summary>
internal sealed class BlockCheckpoint : autograd.SingleTensorFunction<BlockCheckpoint>
{
    private const string BlockKey = "block";

    /// <inheritdoc />
    public override string Name => "GlmBlockCheckpointBackward";

    /// <summary>vars: hidden, cos/sin at positions and block positions (4), mask or null, the block.</summary>
    public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
    {
        var h = (Tensor)vars[0];
        var angles = new RotaryAngles((Tensor)vars[1], (Tensor)vars[2], (Tensor)vars[3], (Tensor)vars[4]);
        var mask = vars[5] as Tensor;
        var block = (GlmBlock)vars[6];
        var rng = random.get_rng_state();
        ctx.save_for_backward(new List<Tensor> { h, angles.CosPosition, angles.SinPosition, angles.CosBlock, angles.SinBlock, mask!, rng });
        ctx.save_data(BlockKey, block);
        using var scope = NewDisposeScope();
        var (output, _) = block.Forward(h, angles, mask, null);
        return output.MoveToOuterDisposeScope();
    }

    /// <inheritdoc />
    public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad_output)
    {
        var saved = ctx.get_saved_variables();
        var block = (GlmBlock)ctx.get_data(BlockKey);
        Tensor? gradInput;
        using (var scope = NewDisposeScope())
        {
            var current = random.get_rng_state();
            random.set_rng_state(saved[6]);
            try
            {
                using var grad = enable_grad();
                var h = saved[0].detach().requires_grad_(true);
                var (output, _) = block.Forward(h, new RotaryAngles(saved[1], saved[2], saved[3], saved[4]), saved[5], null);
                output.backward(new[] { grad_output });
                gradInput = h.grad?.MoveToOuterDisposeScope();
            }
            finally
            {
                random.set_rng_state(current);
            }
        }
        return new List<Tensor> { gradInput!, null!, null!, null!, null!, null!, null! };
    }
}

/// <summary>Gradient checkpointing of one v2 block (as <see cref="BlockCheckpoint"/>: keep the input, run the block again in backward).</summary>
internal sealed class V2BlockCheckpoint : autograd.SingleTensorFunction<V2BlockCheckpoint>
{
    private const string BlockKey = "block";

    /// <inheritdoc />
    public override string Name => "GlmV2BlockCheckpointBackward";

    /// <summary>vars: hidden, rotary angles, mask or null, the block.</summary>
    public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
    {
        var h = (Tensor)vars[0];
        var angles = (Tensor)vars[1];
        var mask = vars[2] as Tensor;
        var block = (V2Block)vars[3];
        var rng = random.get_rng_state();
        // The mask is saved as a tensor (kept alive by autograd; the caller's scope may free its own handle); an empty
        // tensor stands for "no mask" (causal).
        ctx.save_for_backward(new List<Tensor> { h, angles, rng, mask ?? empty(0) });
        ctx.save_data(BlockKey, block);
        using var scope = NewDisposeScope();
        var (output, _) = block.Forward(h, angles, mask, null, null, needProbs: false);
        return output.MoveToOuterDisposeScope();
    }

    /// <inheritdoc />
    public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad_output)
    {
        var saved = ctx.get_saved_variables();
        var block = (V2Block)ctx.get_data(BlockKey);
        var mask = saved[3].numel() == 0 ? null : saved[3];
        Tensor? gradInput;
        using (var scope = NewDisposeScope())
        {
            var current = random.get_rng_state();
            random.set_rng_state(saved[2]);
            try
            {
                using var grad = enable_grad();
                var h = saved[0].detach().requires_grad_(true);
                var (output, _) = block.Forward(h, saved[1], mask, null, null, needProbs: false);
                output.backward(new[] { grad_output });
                gradInput = h.grad?.MoveToOuterDisposeScope();
            }
            finally
            {
                random.set_rng_state(current);
            }
        }
        return new List<Tensor> { gradInput!, null!, null!, null! };
    }
}
