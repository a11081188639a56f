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
/// its quantized copy at once. The copies are freed between long-lived quantized buffers, so a heap that keeps every
/// block would keep every hole: the loader bounds it meanwhile (<see cref="NativeAllocator.ReturnLargeBlocksWhile"/>).
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
    /// <exception cref="ArgumentException">The 4-bit format is not a 4-bit one, or the targets do not fit the model (as
    /// <see cref="QuantizeExtensions.Quantize(nn.Module, QuantizationFormat, QuantizeOptions?)"/> checks them).</exception>
    public QuantizeWhileLoading(nn.Module model, int bits, QuantizeOptions options, Device device)
    {
        ArgumentNullException.ThrowIfNull(options);
        _model = model;
        _format = QuantizationFormats.FromBits(bits, options.Int4Format);
        _options = options;
        _device = device;
        // As Quantize selects, but never the P-tuning prefix encoder, which trains and is initialised afresh when the
        // checkpoint has none.
        var targets = QuantizeExtensions.SelectTargets(model, _format, options, path => path.StartsWith(GlmCheckpoint.PrefixKeys, StringComparison.Ordinal))
            .Select(t => (t.Site.Path, t.Linear)).ToList();
        var meta = new Device(DeviceType.META);
        foreach (var (path, linear) in targets)
        {
            // The setters dispose the parameters they replace (never written, so never resident on the CPU).
            _keys[path + ".weight"] = (path, linear, false);
            var weight = linear.weight!;
            linear.weight = new Parameter(empty(weight.shape, dtype: weight.dtype, device: meta), weight.requires_grad);
            if (linear.bias is { } bias)
            {
                _keys[path + ".bias"] = (path, linear, true);
                linear.bias = new Parameter(empty(bias.shape, dtype: bias.dtype, device: meta), bias.requires_grad);
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
        // The setter disposes the placeholder.
        if (target.Bias) target.Linear.bias = new Parameter(copy, placeholder.requires_grad);
        else target.Linear.weight = new Parameter(copy, placeholder.requires_grad);
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
