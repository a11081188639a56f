using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MinLora;

/// <summary>Settings of one named adapter on one layer.</summary>
/// <param name="Name">The adapter's name.</param>
/// <param name="Rank">The rank r.</param>
/// <param name="Alpha">The LoRA alpha.</param>
/// <param name="Scaling">The factor applied to B·A (alpha/r, or alpha/√r for rsLoRA).</param>
/// <param name="Dropout">Dropout probability on the adapter input while training.</param>
/// <param name="UseRsLora">Whether rank-stabilised scaling is used.</param>
public sealed record LoraAdapterInfo(string Name, int Rank, double Alpha, double Scaling, double Dropout, bool UseRsLora);

/// <summary>
/// A module that wraps a base layer and adds LoRA adapters beside it:
/// <c>y = base(x) + Σ_active scale·B(A(dropout(x)))</c>.
/// </summary>
/// <remarks>
/// <para>The base layer's parameters and buffers are exposed under their original names, so the state-dict keys of
/// the base model do not change: <c>fc.weight</c> stays <c>fc.weight</c>, and adapter tensors appear beside it as
/// <c>fc.lora_A.&lt;adapter&gt;.weight</c> / <c>fc.lora_B.&lt;adapter&gt;.weight</c> (PEFT's in-memory layout; embeddings use
/// <c>lora_embedding_A.&lt;adapter&gt;</c> / <c>lora_embedding_B.&lt;adapter&gt;</c>). A base checkpoint therefore loads
/// before and after <see cref="LoraExtensions.AddLora"/>.</para>
/// <para>Instances are created by <see cref="LoraExtensions.AddLora"/>; users normally only inspect them.</para>
/// </remarks>
public abstract class LoraLayer : nn.Module<Tensor, Tensor>
{
    private nn.Module<Tensor, Tensor>? _base;
    private readonly Dictionary<string, LoraAdapterInfo> _adapters = new(StringComparer.Ordinal);
    private readonly List<string> _order = new();
    private readonly List<string> _merged = new();
    private readonly List<string> _active = new();
    private readonly List<string> _proxiedParameters = new();
    private readonly List<string> _proxiedBuffers = new();

    /// <summary>Creates the wrapper around <paramref name="baseLayer"/>.</summary>
    /// <param name="name">The module's type name.</param>
    /// <param name="baseLayer">The layer to wrap.</param>
    private protected LoraLayer(string name, nn.Module<Tensor, Tensor> baseLayer) : base(name)
    {
        ArgumentNullException.ThrowIfNull(baseLayer);
        _base = baseLayer;
        ProxyBase();
    }

    /// <summary>The wrapped base layer.</summary>
    /// <exception cref="ObjectDisposedException">The wrapper has released or disposed its base.</exception>
    public nn.Module<Tensor, Tensor> BaseLayer => _base ?? throw new ObjectDisposedException(GetType().Name, "The LoRA layer no longer holds its base layer.");

    /// <summary>The names of the adapters on this layer, in the order they were added.</summary>
    public IReadOnlyList<string> Adapters => _order.AsReadOnly();

    /// <summary>The adapters that take part in <see cref="forward"/>.</summary>
    public IReadOnlyList<string> ActiveAdapters => _active.AsReadOnly();

    /// <summary>The adapters currently folded into the base weight (they are skipped in <see cref="forward"/>).</summary>
    public IReadOnlyList<string> MergedAdapters => _merged.AsReadOnly();

    /// <summary>When true, <see cref="forward"/> runs the base layer only.</summary>
    public bool AdaptersDisabled { get; internal set; }

    /// <summary>The settings of adapter <paramref name="adapterName"/>.</summary>
    /// <param name="adapterName">The adapter's name.</param>
    /// <returns>Its settings.</returns>
    /// <exception cref="KeyNotFoundException">No adapter of that name on this layer.</exception>
    public LoraAdapterInfo GetAdapterInfo(string adapterName) =>
        _adapters.TryGetValue(adapterName, out var info) ? info : throw new KeyNotFoundException($"No LoRA adapter named '{adapterName}' on this layer (has: {string.Join(", ", _adapters.Keys)}).");

    /// <summary>True when the layer has an adapter named <paramref name="adapterName"/>.</summary>
    /// <param name="adapterName">The adapter's name.</param>
    /// <returns>Whether it exists.</returns>
    public bool HasAdapter(string adapterName) => _adapters.ContainsKey(adapterName);

    /// <inheritdoc />
    public override Tensor forward(Tensor input)
    {
        var baseLayer = BaseLayer;
        if (AdaptersDisabled || _active.Count == _merged.Count && _active.TrueForAll(_merged.Contains))
            return baseLayer.call(input);

        using var scope = NewDisposeScope();
        var result = baseLayer.call(input);
        bool training = this.training;
        foreach (var name in _active)
        {
            if (_merged.Contains(name)) continue;
            var info = _adapters[name];
            var update = AdapterForward(name, input, info, training);
            result = result.add(update.dtype == result.dtype ? update : update.to(result.dtype));
        }
        return result.MoveToOuterDisposeScope();
    }

    /// <summary>Computes <c>scale·B(A(dropout(x)))</c> for one adapter, in the adapter's element type.</summary>
    private protected abstract Tensor AdapterForward(string adapterName, Tensor input, LoraAdapterInfo info, bool training);

    /// <summary>The adapter's weight update <c>scale·ΔW</c> in float32 (float64 for float64 adapters), shaped like the base weight.</summary>
    /// <param name="adapterName">The adapter's name.</param>
    /// <returns>A new float32 tensor.</returns>
    public Tensor GetDeltaWeight(string adapterName)
    {
        var info = GetAdapterInfo(adapterName);
        using var noGrad = no_grad();
        return DeltaWeight(adapterName, info);
    }

    private protected abstract Tensor DeltaWeight(string adapterName, LoraAdapterInfo info);

    /// <summary>Creates and registers the adapter's factors.</summary>
    private protected abstract void CreateFactors(string adapterName, int rank, ScalarType dtype, LoraInit init);

    /// <summary>Disposes and unregisters the adapter's factors.</summary>
    private protected abstract void DeleteFactors(string adapterName);

    /// <summary>The adapter's trainable tensors with their exported (PEFT, adapter-name-free) key suffixes.</summary>
    internal abstract IEnumerable<(string Suffix, Parameter Tensor)> AdapterTensors(string adapterName);

    /// <summary>Adds <paramref name="delta"/> (float32) to the base weight; returns false when the base rounds it.</summary>
    private protected abstract bool AddToBaseWeight(Tensor delta);

    /// <summary>The base weight's floating type (default adapter type).</summary>
    internal abstract ScalarType BaseDtype { get; }

    internal void AddAdapter(LoraConfig config)
    {
        if (_adapters.ContainsKey(config.AdapterName))
            throw new InvalidOperationException($"This layer already has a LoRA adapter named '{config.AdapterName}'. Use another AdapterName, or DeleteLoraAdapter first.");
        var dtype = config.AdapterDtype ?? BaseDtype;
        using (no_grad())
        {
            CreateFactors(config.AdapterName, config.Rank, dtype, config.Init);
        }
        _adapters[config.AdapterName] = new LoraAdapterInfo(config.AdapterName, config.Rank, config.Alpha, config.Scaling, config.Dropout, config.UseRsLora);
        _order.Add(config.AdapterName);
        SetActive(new[] { config.AdapterName });
    }

    internal void SetActive(IReadOnlyCollection<string> names)
    {
        var mine = names.Where(_adapters.ContainsKey).ToList();
        _active.Clear();
        _active.AddRange(mine);
    }

    internal void DeleteAdapter(string adapterName)
    {
        GetAdapterInfo(adapterName);
        if (_merged.Contains(adapterName))
            throw new InvalidOperationException($"Adapter '{adapterName}' is merged into the base weight; unmerge it before deleting it.");
        DeleteFactors(adapterName);
        _adapters.Remove(adapterName);
        _order.Remove(adapterName);
        _active.Remove(adapterName);
    }

    /// <summary>Folds the given adapters into the base weight. Returns false if any merge was rounded by the base.</summary>
    /// <summary>The first of <paramref name="adapterNames"/> (not merged yet) whose weight update is not finite, or null.</summary>
    internal string? FirstNonFiniteUpdate(IEnumerable<string> adapterNames)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        foreach (var n in adapterNames.Where(n => !_merged.Contains(n)).Distinct())
        {
            if (!isfinite(DeltaWeight(n, GetAdapterInfo(n))).all().item<bool>()) return n;
        }
        return null;
    }

    internal bool Merge(IEnumerable<string> adapterNames, bool safeMerge)
    {
        // Check every update first, so a bad adapter leaves the layer's weight untouched.
        var names = adapterNames.Where(n => !_merged.Contains(n)).Distinct().ToList();
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var deltas = names.Select(n => DeltaWeight(n, GetAdapterInfo(n))).ToList();
        if (safeMerge)
        {
            for (int i = 0; i < names.Count; i++)
            {
                if (!isfinite(deltas[i]).all().item<bool>())
                    throw new InvalidOperationException($"LoRA adapter '{names[i]}' has a non-finite weight update (NaN or Inf); refusing to merge it.");
            }
        }
        bool exact = true;
        for (int i = 0; i < names.Count; i++)
        {
            exact &= AddToBaseWeight(deltas[i]);
            _merged.Add(names[i]);
        }
        return exact;
    }

    /// <summary>Subtracts merged adapters from the base weight, newest first.</summary>
    internal void Unmerge()
    {
        for (int i = _merged.Count - 1; i >= 0; i--)
        {
            var name = _merged[i];
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var delta = DeltaWeight(name, _adapters[name]);
            AddToBaseWeight(delta.neg_());
            _merged.RemoveAt(i);
        }
    }

    /// <summary>
    /// Replaces the wrapped base layer (for example by its quantized or dequantized version) keeping the adapters.
    /// The old base is returned, not disposed.
    /// </summary>
    /// <param name="newBase">A layer of the same kind and shape that this wrapper supports.</param>
    /// <returns>The previous base layer.</returns>
    /// <exception cref="ArgumentException">The new base is of an unsupported kind or another shape.</exception>
    /// <exception cref="InvalidOperationException">Adapters are merged into the current base.</exception>
    public nn.Module<Tensor, Tensor> ReplaceBaseLayer(nn.Module<Tensor, Tensor> newBase)
    {
        ArgumentNullException.ThrowIfNull(newBase);
        if (_merged.Count > 0)
            throw new InvalidOperationException("Adapters are merged into the current base layer; unmerge them before replacing it.");
        CheckCompatibleBase(newBase);
        var old = BaseLayer;
        Unproxy();
        _base = newBase;
        ProxyBase();
        return old;
    }

    /// <summary>Throws when <paramref name="newBase"/> cannot replace the current base.</summary>
    private protected abstract void CheckCompatibleBase(nn.Module<Tensor, Tensor> newBase);

    /// <summary>Detaches and returns the base layer; the wrapper no longer exposes its tensors.</summary>
    internal nn.Module<Tensor, Tensor> ReleaseBase()
    {
        var b = BaseLayer;
        Unproxy();
        _base = null;
        return b;
    }

    /// <summary>The base layer's parameter named <paramref name="name"/> (e.g. "weight").</summary>
    private protected Parameter BaseParameter(string name)
    {
        foreach (var (n, p) in BaseLayer.named_parameters(false))
        {
            if (n == name) return p;
        }
        throw new InvalidOperationException($"The base layer {BaseLayer.GetName()} has no parameter '{name}'.");
    }

    private void ProxyBase()
    {
        var b = _base!;
        foreach (var (n, p) in b.named_parameters(true))
        {
            _internal_params.Add(n, p);
            _proxiedParameters.Add(n);
        }
        var persistent = new HashSet<string>(b.named_buffers(true, include_nonpersistent: false).Select(x => x.name));
        foreach (var (n, t) in b.named_buffers(true, include_nonpersistent: true))
        {
            _internal_buffers.Add(n, (t, persistent.Contains(n)));
            _proxiedBuffers.Add(n);
        }
    }

    private void Unproxy()
    {
        foreach (var n in _proxiedParameters) _internal_params.Remove(n);
        foreach (var n in _proxiedBuffers) _internal_buffers.Remove(n);
        _proxiedParameters.Clear();
        _proxiedBuffers.Clear();
    }

    /// <inheritdoc />
    protected override void _toEpilog(ScalarType? dtype, Device? device, bool non_blocking)
    {
        // Move adapters (children) with the default logic, then move the base layer itself (it is not a child:
        // its tensors are only exposed under our names) and expose its possibly new tensors again.
        Unproxy();
        base._toEpilog(dtype, device, non_blocking);
        if (_base is null) return;
        if (device is null) _base.to(dtype!.Value, non_blocking);
        else if (dtype is null) _base.to(device.type, device.index, non_blocking);
        else _base.to(device, dtype.Value, non_blocking);
        ProxyBase();
    }

    /// <inheritdoc />
    public override void train(bool train = true)
    {
        base.train(train);
        _base?.train(train);
    }

    /// <summary>Adapters are registered explicitly; the base layer must never be registered as a child.</summary>
    protected override void RegisterComponents()
    {
    }

    /// <inheritdoc />
    protected override void Dispose(bool disposing)
    {
        if (disposing && _base is not null)
        {
            Unproxy();
            _base.Dispose();
            _base = null;
        }
        base.Dispose(disposing);
    }

    internal static void InitFactorA(Tensor a, LoraInit init, int rank)
    {
        switch (init)
        {
            case LoraInit.Gaussian:
                nn.init.normal_(a, 0, 1.0 / rank);
                break;
            default:
                nn.init.kaiming_uniform_(a, a: Math.Sqrt(5));
                break;
        }
    }

    internal static void InitFactorB(Tensor b, LoraInit init, int rank)
    {
        if (init == LoraInit.Random) nn.init.normal_(b, 0, 1.0 / rank);
        else nn.init.zeros_(b);
    }

    /// <summary>The type merge arithmetic runs in: float32, or float64 when a float64 tensor takes part.</summary>
    internal static ScalarType MergeDtype(params ScalarType[] types) =>
        types.Contains(ScalarType.Float64) ? ScalarType.Float64 : ScalarType.Float32;

    /// <summary>w ← round(w + delta), the sum taken in float32 (float64 for float64 weights); refuses a non-finite result.</summary>
    private protected static bool AddInFloat32(Parameter w, Tensor delta)
    {
        using var scope = NewDisposeScope();
        var sum = w.to(MergeDtype(w.dtype, delta.dtype), copy: true).add_(delta.to(w.device));
        var rounded = sum.to(w.dtype);
        if (!isfinite(rounded).all().item<bool>())
            throw new InvalidOperationException($"Merging would make the {w.dtype} base weight non-finite (overflow); refusing to change it.");
        w.copy_(rounded);
        return true;
    }

    internal static Tensor Dropout(Tensor x, LoraAdapterInfo info, bool training) =>
        info.Dropout > 0 && training ? nn.functional.dropout(x, info.Dropout, true) : x;
}

/// <summary>A container module whose children are one module per adapter (registered as <c>&lt;adapter&gt;</c>).</summary>
internal sealed class AdapterModules : nn.Module
{
    public AdapterModules() : base(nameof(AdapterModules)) { }

    public void Add(string adapter, nn.Module<Tensor, Tensor> module) => register_module(adapter, module);

    public nn.Module<Tensor, Tensor> this[string adapter] => (nn.Module<Tensor, Tensor>)_internal_submodules[adapter];

    public void Remove(string adapter)
    {
        var m = _internal_submodules[adapter];
        _internal_submodules.Remove(adapter);
        m.Dispose();
    }

    protected override void RegisterComponents() { }
}

/// <summary>A container module whose parameters are one tensor per adapter (registered as <c>&lt;adapter&gt;</c>).</summary>
internal sealed class AdapterParameters : nn.Module
{
    public AdapterParameters() : base(nameof(AdapterParameters)) { }

    public void Add(string adapter, Parameter p) => register_parameter(adapter, p);

    public Parameter this[string adapter] => _internal_params[adapter];

    public void Remove(string adapter)
    {
        var p = _internal_params[adapter];
        _internal_params.Remove(adapter);
        p.Dispose();
    }

    protected override void RegisterComponents() { }
}

/// <summary>
/// A LoRA layer whose factors are child modules: A maps the input to r channels, B maps r channels to the output
/// (<c>lora_A.&lt;adapter&gt;.weight</c>, <c>lora_B.&lt;adapter&gt;.weight</c>).
/// </summary>
public abstract class FactorModuleLoraLayer : LoraLayer
{
    private readonly AdapterModules lora_A = new();
    private readonly AdapterModules lora_B = new();

    private protected FactorModuleLoraLayer(string name, nn.Module<Tensor, Tensor> baseLayer) : base(name, baseLayer)
    {
        register_module(nameof(lora_A), lora_A);
        register_module(nameof(lora_B), lora_B);
    }

    /// <summary>The shape of the base weight that <c>B·A</c> is reshaped to.</summary>
    private protected abstract long[] BaseWeightShape { get; }

    /// <summary>Creates the two factor modules (uninitialised values are fine: they are initialised here).</summary>
    private protected abstract (nn.Module<Tensor, Tensor> A, nn.Module<Tensor, Tensor> B) NewFactors(int rank, ScalarType dtype);

    private protected override void CreateFactors(string adapterName, int rank, ScalarType dtype, LoraInit init)
    {
        var (a, b) = NewFactors(rank, dtype);
        InitFactorA(Weight(a), init, rank);
        InitFactorB(Weight(b), init, rank);
        lora_A.Add(adapterName, a);
        lora_B.Add(adapterName, b);
    }

    private protected override void DeleteFactors(string adapterName)
    {
        lora_A.Remove(adapterName);
        lora_B.Remove(adapterName);
    }

    internal override IEnumerable<(string Suffix, Parameter Tensor)> AdapterTensors(string adapterName)
    {
        yield return ("lora_A.weight", Weight(lora_A[adapterName]));
        yield return ("lora_B.weight", Weight(lora_B[adapterName]));
    }

    private protected override Tensor AdapterForward(string adapterName, Tensor input, LoraAdapterInfo info, bool training)
    {
        var a = lora_A[adapterName];
        var dtype = Weight(a).dtype;
        var x = input.dtype == dtype ? input : input.to(dtype);
        var h = lora_B[adapterName].call(a.call(Dropout(x, info, training)));
        if (info.Scaling == 1.0) return h;
        using Scalar scale = info.Scaling; // held until the native call returns (TorchSharp does not keep Scalars alive)
        return h.mul(scale);
    }

    private protected override Tensor DeltaWeight(string adapterName, LoraAdapterInfo info)
    {
        var wa = Weight(lora_A[adapterName]); // [r, in(, kh, kw)]
        var wb = Weight(lora_B[adapterName]); // [out, r(, 1, 1)]
        var dt = MergeDtype(wa.dtype);
        return wb.to(dt).flatten(1).matmul(wa.to(dt).flatten(1)).reshape(BaseWeightShape).mul_(info.Scaling);
    }

    private protected override bool AddToBaseWeight(Tensor delta) => AddInFloat32(BaseParameter("weight"), delta);

    private static Parameter Weight(nn.Module m)
    {
        foreach (var (n, p) in m.named_parameters(false))
        {
            if (n == "weight") return p;
        }
        throw new InvalidOperationException($"LoRA factor {m.GetName()} has no weight.");
    }
}

/// <summary>LoRA on a <c>torch.nn.Linear</c> or an <see cref="ILinearLayer"/> (e.g. a quantized linear layer).</summary>
public sealed class LoraLinear : FactorModuleLoraLayer
{
    private readonly long _in;
    private readonly long _out;

    internal LoraLinear(nn.Module<Tensor, Tensor> baseLayer) : base(nameof(LoraLinear), baseLayer)
    {
        (_in, _out) = baseLayer switch
        {
            Linear l => (l.in_features, l.out_features),
            ILinearLayer q => (q.InFeatures, q.OutFeatures),
            _ => throw new ArgumentException($"LoraLinear wraps Linear or ILinearLayer modules, not {baseLayer.GetType().Name}.", nameof(baseLayer)),
        };
    }

    /// <summary>Input features of the wrapped layer.</summary>
    public long InFeatures => _in;

    /// <summary>Output features of the wrapped layer.</summary>
    public long OutFeatures => _out;

    internal override ScalarType BaseDtype => BaseLayer is ILinearLayer q ? q.OutputDtype : BaseParameter("weight").dtype;

    private protected override long[] BaseWeightShape => new[] { _out, _in };

    private protected override (nn.Module<Tensor, Tensor> A, nn.Module<Tensor, Tensor> B) NewFactors(int rank, ScalarType dtype)
    {
        var device = BaseLayer is ILinearLayer q ? q.WeightDevice : BaseParameter("weight").device;
        return (nn.Linear(_in, rank, hasBias: false, device: device, dtype: dtype),
                nn.Linear(rank, _out, hasBias: false, device: device, dtype: dtype));
    }

    private protected override bool AddToBaseWeight(Tensor delta) =>
        BaseLayer is ILinearLayer q ? q.AddToWeight(delta) : base.AddToBaseWeight(delta);

    private protected override void CheckCompatibleBase(nn.Module<Tensor, Tensor> newBase)
    {
        var (i, o) = newBase switch
        {
            Linear l => (l.in_features, l.out_features),
            ILinearLayer q => (q.InFeatures, q.OutFeatures),
            _ => throw new ArgumentException($"A LoraLinear base must be a Linear or an ILinearLayer, not {newBase.GetType().Name}.", nameof(newBase)),
        };
        if (i != _in || o != _out)
            throw new ArgumentException($"The new base maps {i} → {o} features; this layer maps {_in} → {_out}.", nameof(newBase));
    }
}

/// <summary>LoRA on a <c>torch.nn.Embedding</c>: <c>y = E[ids] + scale·(Aᵀ[ids])·Bᵀ</c>.</summary>
public sealed class LoraEmbedding : LoraLayer
{
    private readonly AdapterParameters lora_embedding_A = new();
    private readonly AdapterParameters lora_embedding_B = new();
    private readonly long _num;
    private readonly long _dim;

    internal LoraEmbedding(Embedding baseLayer) : base(nameof(LoraEmbedding), baseLayer)
    {
        var w = BaseParameter("weight");
        _num = w.shape[0];
        _dim = w.shape[1];
        register_module(nameof(lora_embedding_A), lora_embedding_A);
        register_module(nameof(lora_embedding_B), lora_embedding_B);
    }

    internal override ScalarType BaseDtype => BaseParameter("weight").dtype;

    private protected override void CreateFactors(string adapterName, int rank, ScalarType dtype, LoraInit init)
    {
        var device = BaseParameter("weight").device;
        // PEFT's convention for embeddings: A [r, num_embeddings] = 0, B [dim, r] ~ N(0, 1).
        var a = new Parameter(zeros(rank, _num, dtype: dtype, device: device));
        var b = new Parameter(empty(_dim, rank, dtype: dtype, device: device));
        nn.init.normal_(b, 0, 1);
        if (init == LoraInit.Random) nn.init.normal_(a, 0, 1);
        lora_embedding_A.Add(adapterName, (Parameter)a.DetachFromDisposeScope());
        lora_embedding_B.Add(adapterName, (Parameter)b.DetachFromDisposeScope());
    }

    private protected override void DeleteFactors(string adapterName)
    {
        lora_embedding_A.Remove(adapterName);
        lora_embedding_B.Remove(adapterName);
    }

    internal override IEnumerable<(string Suffix, Parameter Tensor)> AdapterTensors(string adapterName)
    {
        yield return ("lora_embedding_A", lora_embedding_A[adapterName]);
        yield return ("lora_embedding_B", lora_embedding_B[adapterName]);
    }

    private protected override Tensor AdapterForward(string adapterName, Tensor input, LoraAdapterInfo info, bool training)
    {
        var a = lora_embedding_A[adapterName];   // [r, num]
        var b = lora_embedding_B[adapterName];   // [dim, r]
        var rows = a.t().index_select(0, input.reshape(-1)); // [n, r]
        var h = rows.matmul(b.t());                           // [n, dim]
        var shape = input.shape.Append(_dim).ToArray();
        h = h.reshape(shape);
        if (info.Scaling == 1.0) return h;
        using Scalar scale = info.Scaling; // held until the native call returns (TorchSharp does not keep Scalars alive)
        return h.mul(scale);
    }

    private protected override Tensor DeltaWeight(string adapterName, LoraAdapterInfo info)
    {
        var dt = MergeDtype(lora_embedding_A[adapterName].dtype);
        var a = lora_embedding_A[adapterName].to(dt);
        var b = lora_embedding_B[adapterName].to(dt);
        return b.matmul(a).t().mul(info.Scaling); // ([dim, r] x [r, num])ᵀ = [num, dim]
    }

    private protected override bool AddToBaseWeight(Tensor delta)
    {
        return AddInFloat32(BaseParameter("weight"), delta);
    }

    private protected override void CheckCompatibleBase(nn.Module<Tensor, Tensor> newBase)
    {
        if (newBase is not Embedding e || e.weight is not { } w || w.shape[0] != _num || w.shape[1] != _dim)
            throw new ArgumentException($"The new base must be an Embedding of shape [{_num}, {_dim}].", nameof(newBase));
    }
}

/// <summary>
/// LoRA on a <c>torch.nn.Conv2d</c> (groups = 1): A is a convolution with the base kernel, stride, padding and
/// dilation from in_channels to r channels, B a 1×1 convolution from r to out_channels (PEFT's layout).
/// </summary>
public sealed class LoraConv2d : FactorModuleLoraLayer
{
    private Conv2d _conv;

    internal LoraConv2d(Conv2d baseLayer) : base(nameof(LoraConv2d), baseLayer)
    {
        if (baseLayer.groups != 1)
            throw new NotSupportedException($"LoRA on grouped convolutions (groups = {baseLayer.groups}) is not supported.");
        _conv = baseLayer;
    }

    internal override ScalarType BaseDtype => BaseParameter("weight").dtype;

    private protected override long[] BaseWeightShape => BaseParameter("weight").shape;

    private protected override (nn.Module<Tensor, Tensor> A, nn.Module<Tensor, Tensor> B) NewFactors(int rank, ScalarType dtype)
    {
        var device = BaseParameter("weight").device;
        var k = (_conv.kernel_size[0], _conv.kernel_size[1]);
        var stride = (_conv.stride[0], _conv.stride[1]);
        var dilation = (_conv.dilation[0], _conv.dilation[1]);
        Conv2d a = _conv.padding_type is { } pt
            ? nn.Conv2d(_conv.in_channels, rank, k, pt, stride, dilation, _conv.padding_mode, 1, bias: false, device: device, dtype: dtype)
            : nn.Conv2d(_conv.in_channels, rank, k, stride, (_conv.padding![0], _conv.padding[1]), dilation, _conv.padding_mode, 1, bias: false, device: device, dtype: dtype);
        var b = nn.Conv2d(rank, _conv.out_channels, (1L, 1L), bias: false, device: device, dtype: dtype);
        return (a, b);
    }

    private protected override void CheckCompatibleBase(nn.Module<Tensor, Tensor> newBase)
    {
        if (newBase is not Conv2d c || !c.weight.shape.SequenceEqual(BaseParameter("weight").shape) || c.groups != 1 ||
            !c.stride.SequenceEqual(_conv.stride) || !c.dilation.SequenceEqual(_conv.dilation) || c.padding_mode != _conv.padding_mode ||
            c.padding_type != _conv.padding_type || !(c.padding ?? Array.Empty<long>()).SequenceEqual(_conv.padding ?? Array.Empty<long>()))
            throw new ArgumentException("The new base must be a Conv2d of the same shape, stride, padding, dilation and padding mode, with groups = 1.", nameof(newBase));
        _conv = c;
    }
}
