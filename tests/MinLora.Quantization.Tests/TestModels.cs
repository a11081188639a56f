using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MinLora.Quantization.Tests;

/// <summary>A tiny stand-in with ChatGLM's module names (attention.query_key_value, attention.dense, mlp.*, lm_head).</summary>
internal sealed class GlmLike : nn.Module<Tensor, Tensor>
{
    private readonly nn.Module<Tensor, Tensor> word_embeddings;
    private readonly ModuleList<Block> layers = new();
    private readonly nn.Module<Tensor, Tensor> lm_head;

    public GlmLike(long vocab = 40, long hidden = 64, int count = 2, Device? device = null, Device? blockDevice = null) : base(nameof(GlmLike))
    {
        word_embeddings = nn.Embedding(vocab, hidden, device: device);
        for (int i = 0; i < count; i++) layers.Add(new Block(hidden, blockDevice ?? device));
        lm_head = nn.Linear(hidden, vocab, hasBias: false, device: device);
        RegisterComponents();
    }

    public override Tensor forward(Tensor ids)
    {
        using var scope = NewDisposeScope();
        var x = word_embeddings.call(ids);
        foreach (var l in layers) x = l.call(x);
        return lm_head.call(x).MoveToOuterDisposeScope();
    }

    internal sealed class Block : nn.Module<Tensor, Tensor>
    {
        private readonly Attention attention;
        private readonly Mlp mlp;

        public Block(long hidden, Device? device) : base("GLMBlock")
        {
            attention = new Attention(hidden, device);
            mlp = new Mlp(hidden, device);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            var h = x.add(attention.call(x));
            return h.add(mlp.call(h)).MoveToOuterDisposeScope();
        }
    }

    internal sealed class Attention : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module<Tensor, Tensor> query_key_value;
        private readonly nn.Module<Tensor, Tensor> dense;
        private readonly long _hidden;

        public Attention(long hidden, Device? device) : base("SelfAttention")
        {
            _hidden = hidden;
            query_key_value = nn.Linear(hidden, 3 * hidden, device: device);
            dense = nn.Linear(hidden, hidden, device: device);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            var qkv = query_key_value.call(x);
            var mixed = qkv.narrow(-1, 0, _hidden).mul(qkv.narrow(-1, _hidden, _hidden).sigmoid()).add(qkv.narrow(-1, 2 * _hidden, _hidden));
            return dense.call(mixed).MoveToOuterDisposeScope();
        }
    }

    internal sealed class Mlp : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module<Tensor, Tensor> dense_h_to_4h;
        private readonly nn.Module<Tensor, Tensor> dense_4h_to_h;

        public Mlp(long hidden, Device? device) : base("GLU")
        {
            dense_h_to_4h = nn.Linear(hidden, 4 * hidden, device: device);
            dense_4h_to_h = nn.Linear(4 * hidden, hidden, device: device);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            return dense_4h_to_h.call(nn.functional.gelu(dense_h_to_4h.call(x))).MoveToOuterDisposeScope();
        }
    }
}

internal static class T
{
    public static bool Identical(Tensor a, Tensor b) =>
        a.dtype == b.dtype && a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>();

    public static double RelErr(Tensor approx, Tensor exact)
    {
        using var scope = NewDisposeScope();
        var a = approx.to(ScalarType.Float64);
        var e = exact.to(ScalarType.Float64);
        return (a - e).norm().item<double>() / e.norm().item<double>();
    }
}
