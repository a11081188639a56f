using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MinLora.Tests;

/// <summary>A small model with every supported layer kind, written as docs/architecture.md asks (swappable fields, call()).</summary>
internal sealed class ToyNet : nn.Module<Tensor, Tensor>
{
    private readonly nn.Module<Tensor, Tensor> emb;
    private readonly nn.Module<Tensor, Tensor> fc1;
    private readonly nn.Module<Tensor, Tensor> act;
    private readonly nn.Module<Tensor, Tensor> fc2;

    public ToyNet(long vocab = 50, long dim = 16, long hidden = 24, long outputs = 8, ScalarType dtype = ScalarType.Float32, Device? device = null)
        : base(nameof(ToyNet))
    {
        emb = nn.Embedding(vocab, dim, dtype: dtype, device: device);
        fc1 = nn.Linear(dim, hidden, dtype: dtype, device: device);
        act = nn.Tanh();
        fc2 = nn.Linear(hidden, outputs, dtype: dtype, device: device);
        RegisterComponents();
    }

    /// <summary>ids [batch, seq] → [batch, seq, outputs].</summary>
    public override Tensor forward(Tensor ids)
    {
        using var scope = NewDisposeScope();
        var h = fc2.call(act.call(fc1.call(emb.call(ids))));
        return h.MoveToOuterDisposeScope();
    }

    public nn.Module<Tensor, Tensor> Fc1 => fc1;
}

/// <summary>A convolutional model.</summary>
internal sealed class ConvNet : nn.Module<Tensor, Tensor>
{
    private readonly nn.Module<Tensor, Tensor> conv1;
    private readonly nn.Module<Tensor, Tensor> conv2;

    public ConvNet(ScalarType dtype = ScalarType.Float32) : base(nameof(ConvNet))
    {
        conv1 = nn.Conv2d(3, 6, 3, stride: 1, padding: 1, dtype: dtype);
        conv2 = nn.Conv2d(6, 4, (3, 2), stride: (2, 1), padding: (0, 1), dtype: dtype);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        return conv2.call(nn.functional.relu(conv1.call(x))).MoveToOuterDisposeScope();
    }
}

/// <summary>A model whose field is typed Linear: LoRA cannot swap it and must say so.</summary>
internal sealed class RigidNet : nn.Module<Tensor, Tensor>
{
    private readonly Linear fc;
    private readonly nn.Module<Tensor, Tensor> other;

    public RigidNet() : base(nameof(RigidNet))
    {
        other = nn.Linear(4, 4);
        fc = nn.Linear(4, 4);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => fc.call(other.call(x));
}

/// <summary>Attention-like blocks in a ModuleList, named as in ChatGLM, for suffix matching.</summary>
internal sealed class Block : nn.Module<Tensor, Tensor>
{
    private readonly nn.Module<Tensor, Tensor> query_key_value;
    private readonly nn.Module<Tensor, Tensor> dense;

    public Block(long dim) : base(nameof(Block))
    {
        query_key_value = nn.Linear(dim, 3 * dim);
        dense = nn.Linear(3 * dim, dim);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        return x.add(dense.call(query_key_value.call(x))).MoveToOuterDisposeScope();
    }
}

internal sealed class Stack : nn.Module<Tensor, Tensor>
{
    private readonly ModuleList<nn.Module<Tensor, Tensor>> layers = new();
    private readonly nn.Module<Tensor, Tensor> head;

    public Stack(int count, long dim) : base(nameof(Stack))
    {
        for (int i = 0; i < count; i++) layers.Add(new Block(dim));
        head = nn.Sequential(("proj", nn.Linear(dim, dim)), ("act", nn.ReLU()), ("value", nn.Linear(dim, 2)));
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        foreach (var l in layers) x = l.call(x);
        return head.call(x).MoveToOuterDisposeScope();
    }
}

internal static class Snapshot
{
    public static Dictionary<string, Tensor> Clone(nn.Module m) =>
        m.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());

    public static bool Identical(Tensor a, Tensor b) =>
        a.dtype == b.dtype && a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>();

    public static void AssertEqual(Dictionary<string, Tensor> expected, Dictionary<string, Tensor> actual, IEnumerable<string>? only = null)
    {
        foreach (var key in only ?? expected.Keys)
        {
            Assert.True(actual.ContainsKey(key), $"missing {key}");
            Assert.True(Snapshot.Identical(expected[key], actual[key]), $"tensor {key} changed");
        }
    }
}
