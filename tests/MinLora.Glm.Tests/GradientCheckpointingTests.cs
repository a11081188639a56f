using MinLora.Quantization;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Tests;

/// <summary>
/// Gradient checkpointing recomputes each block in backward: the loss and every LoRA gradient equal those of the
/// plain backward (float32 tiny model; the recomputation runs the same ops on the same inputs, so differences are
/// float32 rounding at most), including LoRA dropout (the random state is restored for the recomputation) and a
/// quantized base (custom autograd functions nested in the recomputation).
/// </summary>
public class GradientCheckpointingTests
{
    [Theory]
    [InlineData(0, 0.0)]
    [InlineData(0, 0.3)]
    [InlineData(8, 0.1)]
    [InlineData(0, 0.1, true)]
    [InlineData(8, 0.0, true)]
    [InlineData(0, 0.1, true, true)]
    public void CheckpointedBackward_EqualsPlainBackward(int bits, double dropout, bool v2 = false, bool padded = false)
    {
        manual_seed(11);
        var config = v2 ? TinyGlm.V2(64, 4, kvChannels: 16, groups: 2, layers: 3) : TinyGlm.V1(64, 4, layers: 3, maxSequenceLength: 128);
        using var model = new GlmForCausalLM(config);
        if (bits > 0) model.Quantize(bits, new QuantizeOptions { GroupSize = 32 });
        model.AddLora(new LoraConfig { TargetModules = new[] { "query_key_value", "dense_h_to_4h" }, Rank = 4, Dropout = dropout, Init = LoraInit.Random });
        model.train();
        var ids = tensor(Enumerable.Range(0, 24).Select(i => (long)(5 + i * 7 % 250)).Append(config.GmaskTokenId).Append(config.BosTokenId).Append(17L).Append(19L).ToArray(), new long[] { 1, 28 });

        (float Loss, Dictionary<string, Tensor> Grads) Step(bool checkpoint)
        {
            model.GradientCheckpointing = checkpoint;
            foreach (var p in model.GetLoraParameters()) p.grad = null;
            manual_seed(99); // the same dropout masks for both runs
            // v2 with a padding mask: the mask the checkpoint keeps must outlive the forward's scope.
            var padding = padded ? cat(new[] { zeros(1, 3, dtype: ScalarType.Int64), ones(1, ids.shape[1] - 3, dtype: ScalarType.Int64) }, 1) : null;
            using var output = model.call(new GlmInput(ids) { Labels = ids, AttentionMask = padding });
            output.Loss!.backward();
            return (output.Loss.item<float>(), model.named_parameters().Where(p => p.parameter.requires_grad)
                .ToDictionary(p => p.name, p => p.parameter.grad!.clone()));
        }

        var plain = Step(false);
        var checkpointed = Step(true);
        Assert.Equal(plain.Loss, checkpointed.Loss, 5);
        Assert.NotEmpty(plain.Grads);
        foreach (var (name, g) in plain.Grads)
        {
            var diff = (checkpointed.Grads[name] - g).abs().max().item<float>();
            var mag = g.abs().max().item<float>();
            Assert.True(mag > 0, $"{name}: no gradient");
            Assert.True(diff <= 1e-5 * Math.Max(1, mag), $"{name}: checkpointed gradient differs by {diff} (magnitude {mag})");
        }
    }
}
