using MinLora.Quantization;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MinLora.Glm;

/// <summary>
/// Quantizes a float checkpoint's projections as the files arrive (<see cref="GlmLoadOptions.QuantizationBit"/>). The
/// selected <c>Linear</c> layers get no float memory of their own: their parameters are placeholders on the <c>meta</c>
/// device until the file holding them is read, then a copy of the file's tensor in the model's type; after each file,
/// every layer whose parameters have all arrived is swapped for its quantized form and that copy freed. The peak is
/// the quantized model, the float parameters left unquantized (embedding, head, norms), one file and the copies of the
/// layers it completes, where loading the whole float model first and quantizing it after held the float model and
/// its quantized copy at once (ChatGLM-6B as float32: 24.7 GB of float weights for 2.8 GB of int4 projections). Freed
/// copies are reused by the next file's, so this holds under <see cref="NativeAllocator.RetainFreedMemory()"/> too.
/// </summary>
internal sealed class QuantizeWhileLoading
{
    private readonly nn.Module _model;
    private readonly QuantizationFormat _format;
    private readonly QuantizeOptions _options;
    private readonly Device _device;
    private readonly Dictionary<string, (string Path, Linear Linear, bool Bias)> _keys = new(StringComparer.Ordinal);
    private readonly Dictionary<string, int> _missing = new(StringComparer.Ordinal);   // path → parameters not yet read
    private readonly int _total;

    /// <summary>
    /// Selects the targets and releases their float parameters, before any file is read (bad bits or options fail
    /// before the expensive work).
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="bits"/> is not 4 or 8.</exception>
    /// <exception cref="ArgumentException">The 4-bit format is not a 4-bit one, or no Linear matches the targets.</exception>
    public QuantizeWhileLoading(nn.Module model, int bits, QuantizeOptions options, Device device)
    {
        if (bits is not (4 or 8)) throw new ArgumentOutOfRangeException(nameof(bits), bits, "Only 8-bit and 4-bit quantization are supported.");
        if (bits == 4 && options.Int4Format == QuantizationFormat.Int8PerRow)
            throw new ArgumentException("Int4Format must be a 4-bit format.", nameof(options));
        _model = model;
        _format = QuantizationFormats.FromBits(bits, options.Int4Format);
        _options = options;
        _device = device;
        var targets = model.named_modules().Where(m => m.name.Length > 0 && m.module is Linear && options.Selects(m.name, m.module))
            .Select(m => (Path: m.name, Linear: (Linear)m.module)).ToList();
        if (targets.Count == 0)
            throw new ArgumentException("No Linear layer matched the quantization targets" +
                (options.TargetModules is null ? "." : $" ({string.Join(", ", options.TargetModules)})."), nameof(options));
        var meta = new Device(DeviceType.META);
        foreach (var (path, linear) in targets)
        {
            _keys[path + ".weight"] = (path, linear, false);
            var weight = linear.weight!;
            linear.weight = new Parameter(empty(weight.shape, dtype: weight.dtype, device: meta));
            weight.Dispose();
            if (linear.bias is { } bias)
            {
                _keys[path + ".bias"] = (path, linear, true);
                linear.bias = new Parameter(empty(bias.shape, dtype: bias.dtype, device: meta));
                bias.Dispose();
            }
            _missing[path] = linear.bias is null ? 1 : 2;
        }
        _total = targets.Count;
    }

    /// <summary>The number of layers quantized so far.</summary>
    public int Quantized => _total - _missing.Count;

    /// <summary>
    /// Takes <paramref name="source"/> as the parameter <paramref name="key"/> when it belongs to a target layer (a copy
    /// in the placeholder's type on the model's device, as <c>copy_</c> into a float model makes); false for other keys.
    /// </summary>
    public bool Claim(string key, Tensor source)
    {
        if (!_keys.TryGetValue(key, out var target) || !_missing.ContainsKey(target.Path)) return false;
        var placeholder = target.Bias ? target.Linear.bias! : target.Linear.weight!;
        var copy = empty(placeholder.shape, dtype: placeholder.dtype, device: _device).DetachFromDisposeScope();
        copy.copy_(source);
        if (target.Bias) target.Linear.bias = new Parameter(copy);
        else target.Linear.weight = new Parameter(copy);
        placeholder.Dispose();
        _missing[target.Path]--;
        return true;
    }

    /// <summary>Quantizes every target whose parameters have all been claimed.</summary>
    public void AfterFile() => Swap(_missing.Where(p => p.Value == 0).Select(p => p.Key).ToList());

    /// <summary>Quantizes what is left; every target's parameters must have arrived by now.</summary>
    /// <exception cref="InvalidOperationException">A target still waits for a parameter (the loader reports missing keys first).</exception>
    public void Finish()
    {
        if (_missing.FirstOrDefault(p => p.Value > 0) is { Key: { } path })
            throw new InvalidOperationException($"'{path}' was never loaded, so it cannot be quantized.");
        AfterFile();
    }

    private void Swap(List<string> ready)
    {
        if (ready.Count == 0) return;
        var paths = ready.ToHashSet(StringComparer.Ordinal);
        var progress = _options.Progress is { } outer ? new CumulativeProgress(outer, Quantized, _total) : null;
        using (no_grad())
        {
            _model.Quantize(_format, _options with { TargetModules = null, TargetPredicate = (p, _) => paths.Contains(p), Progress = progress });
        }
        foreach (var p in ready) _missing.Remove(p);
    }

    /// <summary>Reports (layers done over all files, layers total) for one file's swap.</summary>
    private sealed class CumulativeProgress(IProgress<(int Done, int Total)> outer, int offset, int total) : IProgress<(int Done, int Total)>
    {
        public void Report((int Done, int Total) value) => outer.Report((offset + value.Done, total));
    }
}
