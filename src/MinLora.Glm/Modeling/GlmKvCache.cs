using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm;

/// <summary>
/// Per-layer keys and values of the positions seen so far, each [sequence, batch, heads, head size] (the reference
/// layout). It owns its tensors: dispose it when decoding ends.
/// </summary>
/// <remarks>
/// The keys and values live in preallocated buffers with room for more positions: the next forward writes its new
/// positions in place (no copy of the whole cache per token, which is quadratic in the context). The cache returned
/// by that forward shares the buffers with this one; positions this cache covers are never overwritten, so it stays
/// valid. Only when a cache that is not the newest is continued a second time (a branch) are the buffers copied.
/// Disposing every cache that shares the buffers frees them.
/// </remarks>
public sealed class GlmKvCache : IDisposable
{
    private readonly KvStorage _storage;
    private readonly (Tensor Key, Tensor Value)?[] _views;
    private bool _disposed;

    internal GlmKvCache(KvStorage storage, long length)
    {
        _storage = storage;
        Length = length;
        _views = new (Tensor, Tensor)?[storage.Layers];
        storage.AddRef();
    }

    /// <summary>Number of layers.</summary>
    public int Count => _storage.Layers;

    /// <summary>Cached positions (including a P-tuning prefix).</summary>
    public long Length { get; }

    internal KvStorage Storage => _storage;

    /// <summary>The key and value of layer <paramref name="layer"/> (views of the first <see cref="Length"/> positions, owned by the cache).</summary>
    /// <param name="layer">The layer index.</param>
    public (Tensor Key, Tensor Value) this[int layer]
    {
        get
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            lock (_views)
            {
                if (_views[layer] is { } v) return v;
                // Stored [batch, heads, capacity, head size]; shown in the reference layout [sequence, batch, heads, head size].
                var view = (_storage.Keys[layer].narrow(2, 0, Length).permute(2, 0, 1, 3).DetachFromDisposeScope(),
                    _storage.Values[layer].narrow(2, 0, Length).permute(2, 0, 1, 3).DetachFromDisposeScope());
                _views[layer] = view;
                return view;
            }
        }
    }

    /// <inheritdoc />
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (var v in _views)
        {
            v?.Key.Dispose();
            v?.Value.Dispose();
        }
        _storage.Release();
    }
}

/// <summary>
/// Key/value buffers [batch, heads, capacity, head size] per layer, shared by the caches of one decoding run.
/// <see cref="Used"/> is the number of positions written; a cache of that length may append in place. Head-major, so
/// that each head's keys are one strided matrix that the score and context products read in place (a
/// sequence-major cache had to be transposed into a copy for every product: 16 MB per layer and token at 1,024
/// positions for ChatGLM-6B, more time than the weights).
/// </summary>
internal sealed class KvStorage
{
    private int _refs;

    private KvStorage(Tensor[] keys, Tensor[] values, long capacity)
    {
        Keys = keys;
        Values = values;
        Capacity = capacity;
    }

    internal Tensor[] Keys { get; }

    internal Tensor[] Values { get; }

    internal int Layers => Keys.Length;

    internal long Capacity { get; }

    internal long Used { get; private set; }

    /// <summary>Room for <paramref name="needed"/> positions and some more (growth in steps of 256 positions).</summary>
    internal static KvStorage Allocate(int layers, long needed, long batch, long heads, long headDim, ScalarType dtype, Device device, bool hugePages)
    {
        long capacity = (needed + 256) / 256 * 256;
        var keys = new Tensor[layers];
        var values = new Tensor[layers];
        for (int i = 0; i < layers; i++)
        {
            keys[i] = empty(new[] { batch, heads, capacity, headDim }, dtype: dtype, device: device).DetachFromDisposeScope();
            values[i] = empty(new[] { batch, heads, capacity, headDim }, dtype: dtype, device: device).DetachFromDisposeScope();
            // Every step reads the whole cache of every layer (0.46 GB at 1,024 positions for ChatGLM-6B).
            if (hugePages)
            {
                MinLora.Quantization.CpuMemory.UseHugePages(keys[i]);
                MinLora.Quantization.CpuMemory.UseHugePages(values[i]);
            }
        }
        return new KvStorage(keys, values, capacity);
    }

    /// <summary>
    /// The buffers a forward of <paramref name="s"/> new positions writes into: the past's own buffers when the call
    /// extends the newest cache of them (in place), else new buffers (<paramref name="fresh"/>: held by the caller
    /// until the returned cache holds them; each layer's past is copied in by <see cref="Slot"/>).
    /// </summary>
    internal static KvStorage Acquire(GlmKvCache? past, long pastLength, long s, long batch, int layers, long heads, long headDim, ScalarType dtype, Device device, bool hugePages, out bool fresh)
    {
        if (past is not null && past.Storage.TryClaim(pastLength, pastLength + s, batch, dtype, device))
        {
            fresh = false;
            return past.Storage;
        }
        var storage = Allocate(layers, pastLength + s, batch, heads, headDim, dtype, device, hugePages);
        storage.AddRef();
        fresh = true;
        return storage;
    }

    /// <summary>Layer <paramref name="layer"/>'s slot; in fresh buffers its past ([sp, b, heads, hd]) is copied in first.</summary>
    internal MinLora.Glm.Modeling.KvSlot Slot(int layer, long pastLength, bool fresh, (Tensor Key, Tensor Value)? past)
    {
        if (fresh && pastLength > 0 && past is { } p)
        {
            using var noGrad = no_grad();
            Keys[layer].narrow(2, 0, pastLength).copy_(p.Key.permute(1, 2, 0, 3));
            Values[layer].narrow(2, 0, pastLength).copy_(p.Value.permute(1, 2, 0, 3));
        }
        return new MinLora.Glm.Modeling.KvSlot(Keys[layer], Values[layer], pastLength);
    }

    /// <summary>Claims positions [<paramref name="from"/>, <paramref name="to"/>) for writing when nobody wrote past <paramref name="from"/>.</summary>
    internal bool TryClaim(long from, long to, long batch, ScalarType dtype, Device device)
    {
        lock (this)
        {
            if (_refs <= 0 || Used != from || to > Capacity) return false;
            var k = Keys[0];
            // (A CPU device's index is -1 in some handles and 0 in others: compare indices only on CUDA.)
            if (k.shape[0] != batch || k.dtype != dtype || k.device_type != device.type || (device.type == DeviceType.CUDA && k.device_index != device.index)) return false;
            Used = to;
            return true;
        }
    }

    internal void MarkUsed(long used)
    {
        lock (this) Used = used;
    }

    internal void AddRef()
    {
        lock (this) _refs++;
    }

    internal void Release()
    {
        lock (this)
        {
            if (--_refs > 0) return;
        }
        foreach (var t in Keys) t.Dispose();
        foreach (var t in Values) t.Dispose();
    }
}
