using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MinLora.Tests;

/// <summary>
/// The book's printed count on the real ChatGLM-6B shapes, with a stand-in made of plain modules on the meta device
/// (no memory is allocated): 28 layers, hidden 4096, vocab 130528, inner 16384, separate lm_head.
/// </summary>
public class BookCountTests
{
    private sealed class GlmLayerStandIn : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module<Tensor, Tensor> input_layernorm;
        private readonly Attention attention;
        private readonly nn.Module<Tensor, Tensor> post_attention_layernorm;
        private readonly Mlp mlp;

        public GlmLayerStandIn(Device device) : base("GLMBlock")
        {
            input_layernorm = nn.LayerNorm(4096, device: device);
            attention = new Attention(device);
            post_attention_layernorm = nn.LayerNorm(4096, device: device);
            mlp = new Mlp(device);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x) => throw new NotSupportedException("shape-only stand-in");
    }

    private sealed class Attention : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module<Tensor, Tensor> query_key_value;
        private readonly nn.Module<Tensor, Tensor> dense;

        public Attention(Device device) : base("SelfAttention")
        {
            query_key_value = nn.Linear(4096, 12288, device: device);
            dense = nn.Linear(4096, 4096, device: device);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x) => throw new NotSupportedException("shape-only stand-in");
    }

    private sealed class Mlp : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module<Tensor, Tensor> dense_h_to_4h;
        private readonly nn.Module<Tensor, Tensor> dense_4h_to_h;

        public Mlp(Device device) : base("GLU")
        {
            dense_h_to_4h = nn.Linear(4096, 16384, device: device);
            dense_4h_to_h = nn.Linear(16384, 4096, device: device);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x) => throw new NotSupportedException("shape-only stand-in");
    }

    private sealed class Table : nn.Module<Tensor, Tensor>
    {
        private readonly Parameter weight;

        public Table(long rows, long dim, Device device) : base("Embedding")
        {
            weight = new Parameter(empty(rows, dim, device: device));
            RegisterComponents();
        }

        public override Tensor forward(Tensor x) => throw new NotSupportedException("shape-only stand-in");
    }

    private sealed class Transformer : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module<Tensor, Tensor> word_embeddings;
        private readonly ModuleList<GlmLayerStandIn> layers = new();
        private readonly nn.Module<Tensor, Tensor> final_layernorm;

        public Transformer(Device device) : base("ChatGLMModel")
        {
            // TorchSharp's Embedding is created natively on the CPU and then moved (6 s and 2 GiB here), so the
            // stand-in holds a meta-device table of the same shape instead.
            word_embeddings = new Table(130528, 4096, device);
            for (int i = 0; i < 28; i++) layers.Add(new GlmLayerStandIn(device));
            final_layernorm = nn.LayerNorm(4096, device: device);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x) => throw new NotSupportedException("shape-only stand-in");
    }

    private sealed class ChatGlmStandIn : nn.Module<Tensor, Tensor>
    {
        private readonly Transformer transformer;
        private readonly nn.Module<Tensor, Tensor> lm_head;

        public ChatGlmStandIn(Device device) : base("ChatGLMForConditionalGeneration")
        {
            transformer = new Transformer(device);
            lm_head = nn.Linear(4096, 130528, hasBias: false, device: device);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x) => throw new NotSupportedException("shape-only stand-in");
    }

    [Fact]
    public void ChatGlm6B_WithRank4OnQueryKeyValue_PrintsTheBooksCount()
    {
        using var model = new ChatGlmStandIn(new Device(DeviceType.META));
        Assert.Equal(6_707_929_088L, model.CountParameters().Total);

        var adapted = model.AddLora(new LoraConfig { TargetModules = new[] { "query_key_value" } }); // minLoRA default: rank 4
        Assert.Equal(28, adapted.Count);
        Assert.Equal("transformer.layers.0.attention.query_key_value", adapted[0]);

        var count = model.CountParameters();
        Assert.Equal(1_835_008L, count.Trainable);
        Assert.Equal(6_709_764_096L, count.Total);
        Assert.StartsWith("trainable params: 1835008 || all params: 6709764096 || trainable%: 0.027348", count.ToString(), StringComparison.Ordinal);
        // Python prints 100 * 1835008 / 6709764096 in shortest round-trip form; .NET's "R" gives the same digits.
        Assert.Equal((100.0 * 1835008 / 6709764096).ToString("R", System.Globalization.CultureInfo.InvariantCulture), count.ToString().Split("trainable%: ")[1]);

        var sd = model.GetLoraStateDict();
        Assert.Equal(56, sd.Count);
        Assert.Equal(new long[] { 4, 4096 }, sd["transformer.layers.27.attention.query_key_value.lora_A.weight"].shape);
        Assert.Equal(new long[] { 12288, 4 }, sd["transformer.layers.27.attention.query_key_value.lora_B.weight"].shape);
        Assert.All(sd.Values, t => Assert.Equal(DeviceType.META, t.device_type));
    }
}
