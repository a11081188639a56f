using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MinLora.Quantization;

/// <summary>Which Linear layers <see cref="QuantizeExtensions.Quantize(nn.Module, int, QuantizeOptions?)"/> swaps, and how.</summary>
public sealed record QuantizeOptions
{
    /// <summary>The four projections ChatGLM quantizes in every block.</summary>
    public static IReadOnlyList<string> ChatGlmTargets { get; } = new[] { "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h" };

    /// <summary>Module names whose Linear layers are never quantized unless named exactly in <see cref="TargetModules"/> or chosen by <see cref="TargetPredicate"/>.</summary>
    public static IReadOnlyList<string> OutputHeadNames { get; } = new[] { "lm_head", "output_layer" };

    /// <summary>
    /// Names to quantize: exact path or dotted suffix (as LoRA targets match). Null (with no predicate) means every
    /// Linear except the output head.
    /// </summary>
    /// <value>The default value is <see cref="ChatGlmTargets"/>, as ChatGLM's <c>quantize()</c> does.</value>
    public IReadOnlyList<string>? TargetModules { get; init; } = ChatGlmTargets;

    /// <summary>A predicate over (path, module) choosing Linear layers; OR-ed with <see cref="TargetModules"/>.</summary>
    public Func<string, nn.Module, bool>? TargetPredicate { get; init; }

    /// <summary>The 4-bit layout.</summary>
    /// <value>The default value is <see cref="QuantizationFormat.Int4Grouped"/> (more accurate); use
    /// <see cref="QuantizationFormat.Int4PerRowChatGlm"/> to load ChatGLM's int4 checkpoints.</value>
    public QuantizationFormat Int4Format { get; init; } = QuantizationFormat.Int4Grouped;

    /// <summary>Group size for <see cref="QuantizationFormat.Int4Grouped"/> (32, 64, 128 or 256).</summary>
    /// <value>The default value is 128.</value>
    public int GroupSize { get; init; } = 128;

    /// <summary>Compute settings of the created layers.</summary>
    public QuantizedLinearOptions Layer { get; init; } = new();

    /// <summary>Where the empty buffers of a model on the <c>meta</c> device are allocated.</summary>
    /// <value>The default value is the CPU.</value>
    public Device? SkeletonDevice { get; init; }

    /// <summary>Reports progress as (layers done, layers total).</summary>
    public IProgress<(int Done, int Total)>? Progress { get; init; }

    internal bool Selects(string path, nn.Module module)
    {
        var selector = new ModuleSelector(TargetModules, TargetPredicate);
        if (selector.Matches(path, module)) return true;
        if (selector.IsExplicit) return false;
        var last = path[(path.LastIndexOf('.') + 1)..];
        return !OutputHeadNames.Contains(last);
    }
}

/// <summary>Weight-only quantization of a model's Linear layers, quantized checkpoints and memory accounting.</summary>
public static class QuantizeExtensions
{
    /// <summary>
    /// Replaces every selected <c>Linear</c> of <paramref name="model"/> by a <see cref="QuantizedLinear"/>
    /// (8 bits: per-row int8; 4 bits: <see cref="QuantizeOptions.Int4Format"/>). Linear layers already wrapped by
    /// LoRA have their base quantized. On a model built on the <c>meta</c> device this creates the quantized skeleton
    /// (zeros) to load a quantized checkpoint into with <see cref="LoadQuantizedStateDict"/>.
    /// </summary>
    /// <param name="model">The model.</param>
    /// <param name="bits">4 or 8.</param>
    /// <param name="options">Targets and layout; null: ChatGLM's four projections, group-wise int4 with group 128.</param>
    /// <returns>The paths of the swapped layers.</returns>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="bits"/> is not 4 or 8.</exception>
    /// <exception cref="ArgumentException">No Linear matched, a matched module is not a Linear, has non-float weights,
    /// or its in_features does not fit the format (the model is left unchanged).</exception>
    /// <exception cref="InvalidOperationException">A parent's field cannot hold the quantized layer (declare it
    /// <c>Module&lt;Tensor, Tensor&gt;</c>); the model is left unchanged.</exception>
    public static IReadOnlyList<string> Quantize(this nn.Module model, int bits, QuantizeOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        if (bits is not (4 or 8)) throw new ArgumentOutOfRangeException(nameof(bits), bits, "Only 8-bit and 4-bit quantization are supported.");
        options ??= new QuantizeOptions();
        if (bits == 4 && options.Int4Format == QuantizationFormat.Int8PerRow)
            throw new ArgumentException("Int4Format must be a 4-bit format.", nameof(options));
        return model.Quantize(QuantizationFormats.FromBits(bits, options.Int4Format), options);
    }

    /// <summary>
    /// Replaces every selected <c>Linear</c> of <paramref name="model"/> by a <see cref="QuantizedLinear"/> in
    /// <paramref name="format"/> (<see cref="QuantizeOptions.Int4Format"/> is then not used).
    /// </summary>
    /// <param name="model">The model.</param>
    /// <param name="format">The layout of every swapped layer.</param>
    /// <param name="options">Targets and group size; null: ChatGLM's four projections, group 128.</param>
    /// <returns>The paths of the swapped layers.</returns>
    /// <exception cref="ArgumentException">No Linear matched, a matched module is not a Linear, has non-float weights,
    /// or its in_features does not fit the format (the model is left unchanged).</exception>
    /// <exception cref="InvalidOperationException">A parent's field cannot hold the quantized layer (declare it
    /// <c>Module&lt;Tensor, Tensor&gt;</c>); the model is left unchanged.</exception>
    public static IReadOnlyList<string> Quantize(this nn.Module model, QuantizationFormat format, QuantizeOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        if (!Enum.IsDefined(format)) throw new ArgumentOutOfRangeException(nameof(format), format, "Unknown quantization format.");
        options ??= new QuantizeOptions();

        // Select and validate everything first, so a bad layer leaves the model unchanged.
        var targets = SelectTargets(model, format, options);

        var done = new List<(ModuleSite Site, nn.Module Old, QuantizedLinear New)>();
        var linears = targets.ToDictionary(t => t.Site.Path, t => t.Linear);
        ModuleTree.SwapAll(targets.Select(t => t.Site).ToList(), site =>
        {
            var linear = linears[site.Path];
            var q = QuantizedLinear.FromLinear(linear, format, options.GroupSize, options.Layer, options.SkeletonDevice);
            try
            {
                site.ReplaceBaseLayer(q);
            }
            catch
            {
                q.Dispose();
                throw;
            }
            done.Add((site, linear, q));
            void Undo()
            {
                site.ReplaceBaseLayer(linear);
                q.Dispose();
            }
            try
            {
                options.Progress?.Report((done.Count, targets.Count));
            }
            catch
            {
                Undo(); // a progress callback that throws (to cancel) must not leave this site swapped
                throw;
            }
            return Undo;
        });
        foreach (var (_, old, _) in done) old.Dispose();
        return targets.Select(t => t.Site.Path).ToList();
    }

    /// <summary>
    /// Replaces every <see cref="QuantizedLinear"/> (also those under LoRA wrappers) by a float <c>Linear</c> holding
    /// the dequantized weight, e.g. to merge LoRA exactly into a float copy and re-quantize afterwards.
    /// </summary>
    /// <param name="model">The model.</param>
    /// <param name="dtype">The element type of the new weights; null means each layer's <see cref="QuantizedLinear.OutputDtype"/>.</param>
    /// <returns>The paths of the layers replaced.</returns>
    public static IReadOnlyList<string> Dequantize(this nn.Module model, ScalarType? dtype = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        var replaced = new List<string>();
        var sites = Sites(model).ToList();
        var merged = sites.Where(s => s.Module is LoraLayer { BaseLayer: QuantizedLinear } l && l.MergedAdapters.Count > 0).Select(s => s.Path).ToList();
        if (merged.Count > 0)
            throw new InvalidOperationException($"Unmerge the adapters of {string.Join(", ", merged)} first: they are merged into the quantized weights.");
        foreach (var site in sites)
        {
            var q = site.BaseLayer as QuantizedLinear;
            if (q is null) continue;
            var t = dtype ?? q.OutputDtype;
            var linear = nn.Linear(q.InFeatures, q.OutFeatures, hasBias: q.Bias is not null, device: q.WeightDevice, dtype: t);
            using (no_grad())
            {
                using var w = q.Dequantize(t);
                linear.weight.copy_(w);
                if (q.Bias is not null) linear.bias!.copy_(q.Bias);
            }
            linear.weight.requires_grad = false;
            if (linear.bias is not null) linear.bias.requires_grad = false;
            site.ReplaceBaseLayer(linear);
            q.Dispose();
            replaced.Add(site.Path);
        }
        return replaced;
    }

    /// <summary>
    /// Loads a (quantized) state dict into a model whose quantized skeleton was made with <see cref="Quantize(nn.Module, int, QuantizeOptions?)"/>
    /// (for example on the <c>meta</c> device), checking every key and shape, then rebuilds the fast-kernel forms.
    /// </summary>
    /// <param name="model">The quantized model.</param>
    /// <param name="stateDict">The tensors by key.</param>
    /// <param name="strict">Require exactly the model's keys.</param>
    /// <returns>How the dictionary fitted (missing and unexpected keys are allowed when not strict).</returns>
    /// <exception cref="StateDictMismatchException">A shape differs, or (strict) keys are missing or unexpected; nothing was loaded.</exception>
    /// <exception cref="ArgumentException">A target tensor is still on the meta device; nothing was loaded.</exception>
    public static StateDictFit LoadQuantizedStateDict(this nn.Module model, IReadOnlyDictionary<string, Tensor> stateDict, bool strict = true)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(stateDict);
        var target = model.state_dict();
        var fit = StateDictFit.Compare(target, stateDict);
        if (fit.ShapeMismatches.Count > 0 || (strict && !fit.IsComplete))
            throw new StateDictMismatchException(fit, null, "The state dict does not fit the model (nothing was loaded)", missingIsProblem: strict, unexpectedIsProblem: strict);
        var onMeta = target.Where(kv => kv.Value.device_type == DeviceType.META && stateDict.ContainsKey(kv.Key)).Select(kv => kv.Key).ToList();
        if (onMeta.Count > 0)
            throw new ArgumentException("These model tensors are on the meta device and cannot be copied into: " + string.Join(", ", onMeta.Take(20)) +
                ". Build the non-quantized parts on a real device (only layers replaced by Quantize get real buffers).", nameof(model));
        using (no_grad())
        {
            foreach (var (k, t) in target)
            {
                if (stateDict.TryGetValue(k, out var src)) t.copy_(src);
            }
        }
        model.RefreshQuantizedKernels();
        return fit;
    }

    /// <summary>Rebuilds the fast-kernel form of every <see cref="QuantizedLinear"/> (after writing into their buffers).</summary>
    /// <param name="model">The model.</param>
    /// <returns>The number of layers refreshed.</returns>
    public static int RefreshQuantizedKernels(this nn.Module model)
    {
        ArgumentNullException.ThrowIfNull(model);
        int n = 0;
        foreach (var m in model.modules())
        {
            if (ModuleTree.BaseLayerOf(m) is QuantizedLinear q) { q.RefreshKernel(); n++; }
        }
        return n;
    }

    /// <summary>
    /// Bytes held by the model's parameters and buffers (each tensor once), plus the kernel copies of quantized
    /// layers: what the model costs in memory.
    /// </summary>
    /// <param name="model">Any module.</param>
    /// <returns>The byte count.</returns>
    public static long GetSizeInBytes(this nn.Module model)
    {
        ArgumentNullException.ThrowIfNull(model);
        var seen = new HashSet<IntPtr>();
        long bytes = 0;
        foreach (var (_, p) in model.named_parameters()) if (seen.Add(p.Handle)) bytes += p.numel() * p.element_size();
        foreach (var (_, b) in model.named_buffers()) if (seen.Add(b.Handle)) bytes += b.numel() * b.element_size();
        foreach (var m in model.modules())
        {
            var q = ModuleTree.BaseLayerOf(m) as QuantizedLinear;
            if (q is not null) bytes += q.KernelBytes;
        }
        return bytes;
    }

    /// <summary>
    /// The float Linear layers <paramref name="options"/> selects in <paramref name="model"/> (already quantized ones
    /// and paths <paramref name="skip"/> names left out), each checked against <paramref name="format"/>.
    /// </summary>
    /// <exception cref="ArgumentException">No Linear matched, a matched leaf is not a Linear, has non-float weights, or
    /// its in_features does not fit the format.</exception>
    internal static List<(ModuleSite Site, Linear Linear)> SelectTargets(nn.Module model, QuantizationFormat format, QuantizeOptions options, Func<string, bool>? skip = null)
    {
        var targets = new List<(ModuleSite Site, Linear Linear)>();
        foreach (var site in Sites(model))
        {
            var inner = site.BaseLayer;
            if (skip?.Invoke(site.Path) == true || !options.Selects(site.Path, inner)) continue;
            if (inner is QuantizedLinear) continue; // already quantized
            if (inner is not Linear linear)
            {
                if (options.TargetModules is null && options.TargetPredicate is null) continue; // "every Linear": skip others
                if (site.Module is LoraLayer || IsLeaf(inner))
                    throw new ArgumentException($"Module '{site.Path}' ({inner.GetType().Name}) matches the quantization targets but is not a Linear layer.", nameof(options));
                continue; // a container whose name matches (e.g. a block called "dense"): its Linear children are visited too
            }
            if (!linear.weight.is_floating_point())
                throw new ArgumentException($"Linear '{site.Path}' has {linear.weight.dtype} weights; only floating weights can be quantized.", nameof(model));
            ValidateShape(site.Path, linear, format, options.GroupSize);
            targets.Add((site, linear));
        }
        if (targets.Count == 0)
            throw new ArgumentException("No Linear layer matched the quantization targets" +
                (options.TargetModules is null ? "." : $" ({string.Join(", ", options.TargetModules)})."), nameof(options));
        return targets;
    }

    private static void ValidateShape(string path, Linear linear, QuantizationFormat format, int groupSize)
    {
        long k = linear.in_features;
        if (format != QuantizationFormat.Int8PerRow && k % 2 != 0)
            throw new ArgumentException($"Linear '{path}': in_features {k} is odd; int4 packing needs it even.");
        if (format == QuantizationFormat.Int4Grouped)
        {
            if (!QuantizationMath.SupportedGroupSizes.Contains(groupSize))
                throw new ArgumentException($"Group size {groupSize} is not one of {string.Join(", ", QuantizationMath.SupportedGroupSizes)}.");
            if (k % groupSize != 0)
                throw new ArgumentException($"Linear '{path}': group size {groupSize} does not divide in_features {k}.");
        }
    }

    private static bool IsLeaf(nn.Module m) => !m.named_children().Any();

    private static IEnumerable<ModuleSite> Sites(nn.Module model) => ModuleTree.Walk(model);
}
