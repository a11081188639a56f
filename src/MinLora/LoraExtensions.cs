using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MinLora;

/// <summary>
/// LoRA on any TorchSharp module tree: add, merge, unmerge, remove, select, disable, and read or write adapter
/// tensors.
/// </summary>
/// <remarks>
/// <para><b>What a model must do.</b> AddLora replaces each target layer by a <see cref="LoraLayer"/> wrapper, both
/// in the parent's registry and in the parent's field that holds it. So a model must (1) keep each submodule in a
/// private field named like its state-dict key (or marked <c>[ComponentName]</c>) and call
/// <c>RegisterComponents()</c>, (2) type fields that may be adapted as <c>Module&lt;Tensor, Tensor&gt;</c> (a field
/// typed <c>Linear</c> cannot hold the wrapper: AddLora then throws and changes nothing), and (3) call submodules
/// with <c>module.call(x)</c> (hooks only run through <c>call</c>). <c>Sequential</c>, <c>ModuleList</c> and
/// <c>ModuleDict</c> parents are handled.</para>
/// <para>State-dict keys of the base model are unchanged by AddLora; adapter tensors are added beside them.</para>
/// </remarks>
public static class LoraExtensions
{
    /// <summary>The prefix PEFT puts before module paths in saved adapters.</summary>
    public const string PeftKeyPrefix = "base_model.model.";

    /// <summary>
    /// Adds a LoRA adapter to every layer of <paramref name="model"/> that <paramref name="config"/> selects, and makes
    /// it the active adapter. Calling it again with another <see cref="LoraConfig.AdapterName"/> adds a second named
    /// adapter to the same (and possibly other) layers.
    /// </summary>
    /// <param name="model">The model to adapt (not itself a target).</param>
    /// <param name="config">The adapter settings; null means minLoRA's defaults (rank 4, alpha 1, every Linear).</param>
    /// <returns>The dotted paths of the adapted layers, in model order.</returns>
    /// <exception cref="ArgumentNullException"><paramref name="model"/> is null.</exception>
    /// <exception cref="ArgumentOutOfRangeException">Rank, alpha or dropout out of range.</exception>
    /// <exception cref="ArgumentException">No module matched, or a selected module is of an unsupported kind.</exception>
    /// <exception cref="InvalidOperationException">A layer already has an adapter of that name, or a parent's field
    /// cannot hold the wrapper (the model is left unchanged).</exception>
    public static IReadOnlyList<string> AddLora(this nn.Module model, LoraConfig? config = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        config ??= new LoraConfig();
        config.Validate();
        if (model is LoraLayer)
            throw new ArgumentException("The root module is itself a LoRA layer; call AddLora on its parent.", nameof(model));

        var targets = new List<ModuleSite>();
        foreach (var site in ModuleTree.Walk(model))
        {
            var kind = site.BaseLayer;
            bool isExplicit = config.HasExplicitTargets && config.IsExplicitTarget(site.Path, kind);
            bool supported = SupportedKind(kind) is not null;
            if (isExplicit && !supported)
            {
                throw new ArgumentException(
                    $"Module '{site.Path}' ({kind.GetType().Name}) matches the LoRA targets but is not a supported layer " +
                    "(Linear, Embedding, Conv2d or ILinearLayer).", nameof(config));
            }
            bool selected = config.HasExplicitTargets ? isExplicit : supported && (config.TargetTypes & SupportedKind(kind)!.Value) != 0;
            if (selected) targets.Add(site);
        }
        if (targets.Count == 0)
        {
            var candidates = ModuleTree.Walk(model).Where(s => SupportedKind(s.Module) is not null).Select(s => s.Path).Take(12).ToList();
            throw new ArgumentException(
                $"No module matched the LoRA targets ({DescribeTargets(config)}). Supported layers in this model: " +
                (candidates.Count == 0 ? "none" : string.Join(", ", candidates) + (candidates.Count == 12 ? ", …" : "")) + ".",
                nameof(config));
        }
        foreach (var site in targets)
        {
            if (site.Module is LoraLayer existing && existing.HasAdapter(config.AdapterName))
                throw new InvalidOperationException($"'{site.Path}' already has a LoRA adapter named '{config.AdapterName}'.");
        }

        // Swap in wrappers; on any failure put the original modules back so the model is unchanged.
        var swapped = new List<(ModuleSite Site, LoraLayer Wrapper)>();
        ModuleTree.SwapAll(targets.Where(site => site.Module is not LoraLayer).ToList(), site =>
        {
            var wrapper = Wrap((nn.Module<Tensor, Tensor>)site.Module);
            try
            {
                ModuleTree.ReplaceChild(site.Parent, site.Name, wrapper);
            }
            catch
            {
                wrapper.ReleaseBase();
                wrapper.Dispose();
                throw;
            }
            swapped.Add((site, wrapper));
            return () =>
            {
                ModuleTree.ReplaceChild(site.Parent, site.Name, wrapper.ReleaseBase());
                wrapper.Dispose();
            };
        });

        var wrappers = swapped.ToDictionary(s => s.Site.Path, s => s.Wrapper);
        foreach (var site in targets)
        {
            var layer = site.Module as LoraLayer ?? wrappers[site.Path];
            layer.AddAdapter(config);
        }
        // The new adapter becomes the only active one everywhere (minLoRA's select_lora semantics).
        SetActiveLoraAdapters(model, config.AdapterName);
        if (config.FreezeBase) FreezeNonLoraParameters(model);
        return targets.Select(t => t.Path).ToList();
    }

    /// <summary>Every LoRA wrapper in the model with its dotted path.</summary>
    /// <param name="model">The model.</param>
    /// <returns>The wrappers, in model order.</returns>
    public static IReadOnlyList<(string Path, LoraLayer Layer)> GetLoraLayers(this nn.Module model)
    {
        ArgumentNullException.ThrowIfNull(model);
        return ModuleTree.Walk(model).Where(s => s.Module is LoraLayer).Select(s => (s.Path, (LoraLayer)s.Module)).ToList();
    }

    /// <summary>
    /// Folds adapters into the base weights (<c>W += scale·B·A</c>, computed in float32 and refused when not finite).
    /// With <paramref name="unload"/> (the default) the LoRA wrappers are then removed, leaving a plain model
    /// (PEFT's <c>merge_and_unload</c>); without it the adapters stay, are skipped in forward, and
    /// <see cref="UnmergeLora"/> can take them out again.
    /// </summary>
    /// <param name="model">The adapted model.</param>
    /// <param name="unload">Remove the wrappers after merging.</param>
    /// <param name="adapterNames">Adapters to merge; null means the active ones.</param>
    /// <param name="safeMerge">Check that every layer's update is finite before changing any weight (the opt-out skips the check).</param>
    /// <returns>What was merged, and whether any base (e.g. quantized) rounded the result.</returns>
    /// <exception cref="InvalidOperationException">The model has no LoRA layers, or an update is not finite.</exception>
    public static LoraMergeResult MergeLora(this nn.Module model, bool unload = true, IReadOnlyList<string>? adapterNames = null, bool safeMerge = true)
    {
        var layers = RequireLayers(model);
        if (safeMerge)
        {
            // Every layer's update is checked before any weight changes: a bad adapter in a later layer must not leave
            // the earlier layers merged.
            foreach (var (path, layer) in layers)
            {
                if (layer.FirstNonFiniteUpdate((adapterNames ?? layer.ActiveAdapters).Where(layer.HasAdapter)) is { } bad)
                    throw new InvalidOperationException($"LoRA adapter '{bad}' has a non-finite weight update (NaN or Inf) in '{path}'; nothing was merged.");
            }
        }
        bool exact = true;
        var merged = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (_, layer) in layers)
        {
            var names = (adapterNames ?? layer.ActiveAdapters).Where(layer.HasAdapter).ToList();
            exact &= layer.Merge(names, safeMerge);
            merged.UnionWith(names);
        }
        if (unload) UnwrapAll(model, layers);
        return new LoraMergeResult(layers.Select(l => l.Path).ToList(), merged.ToList(), exact, unload);
    }

    /// <summary>Subtracts every merged adapter from the base weights again (up to float rounding).</summary>
    /// <param name="model">The model, merged with <c>MergeLora(unload: false)</c>.</param>
    /// <returns>The paths of the layers that had merged adapters.</returns>
    /// <exception cref="InvalidOperationException">The model has no LoRA layers.</exception>
    public static IReadOnlyList<string> UnmergeLora(this nn.Module model)
    {
        var done = new List<string>();
        foreach (var (path, layer) in RequireLayers(model))
        {
            if (layer.MergedAdapters.Count == 0) continue;
            layer.Unmerge();
            done.Add(path);
        }
        return done;
    }

    /// <summary>
    /// Removes every LoRA wrapper without merging, putting the original base layers (the very same modules and
    /// tensors) back. Merged adapters are unmerged first.
    /// </summary>
    /// <param name="model">The adapted model.</param>
    /// <returns>The paths of the layers restored.</returns>
    /// <exception cref="InvalidOperationException">The model has no LoRA layers.</exception>
    public static IReadOnlyList<string> RemoveLora(this nn.Module model)
    {
        var layers = RequireLayers(model);
        foreach (var (_, layer) in layers) layer.Unmerge();
        UnwrapAll(model, layers);
        return layers.Select(l => l.Path).ToList();
    }

    /// <summary>Deletes one named adapter from every layer that has it; layers left with no adapter are unwrapped.</summary>
    /// <param name="model">The adapted model.</param>
    /// <param name="adapterName">The adapter to delete.</param>
    /// <returns>The paths of the layers that had it.</returns>
    /// <exception cref="KeyNotFoundException">No layer has that adapter.</exception>
    /// <exception cref="InvalidOperationException">The adapter is merged (unmerge it first).</exception>
    public static IReadOnlyList<string> DeleteLoraAdapter(this nn.Module model, string adapterName)
    {
        ArgumentException.ThrowIfNullOrEmpty(adapterName);
        var layers = RequireLayers(model).Where(l => l.Layer.HasAdapter(adapterName)).ToList();
        if (layers.Count == 0) throw new KeyNotFoundException($"No LoRA layer has an adapter named '{adapterName}'.");
        foreach (var (_, layer) in layers) layer.DeleteAdapter(adapterName);
        UnwrapAll(model, layers.Where(l => l.Layer.Adapters.Count == 0).ToList());
        return layers.Select(l => l.Path).ToList();
    }

    /// <summary>Makes the named adapters the active ones on every LoRA layer (layers lacking one skip it).</summary>
    /// <param name="model">The adapted model.</param>
    /// <param name="adapterNames">One or more adapter names.</param>
    /// <exception cref="ArgumentException">No names given.</exception>
    /// <exception cref="KeyNotFoundException">A name exists on no layer.</exception>
    public static void SetActiveLoraAdapters(this nn.Module model, params string[] adapterNames)
    {
        ArgumentNullException.ThrowIfNull(adapterNames);
        if (adapterNames.Length == 0) throw new ArgumentException("Give at least one adapter name.", nameof(adapterNames));
        var layers = RequireLayers(model);
        foreach (var name in adapterNames)
        {
            if (!layers.Any(l => l.Layer.HasAdapter(name)))
                throw new KeyNotFoundException($"No LoRA layer has an adapter named '{name}'. Known: {string.Join(", ", AdapterNames(layers))}.");
        }
        foreach (var (_, layer) in layers) layer.SetActive(adapterNames);
    }

    /// <summary>All adapter names present in the model.</summary>
    /// <param name="model">The model.</param>
    /// <returns>The names, in order of first appearance.</returns>
    public static IReadOnlyList<string> GetLoraAdapterNames(this nn.Module model) => AdapterNames(GetLoraLayers(model));

    /// <summary>
    /// Runs the base model only until the returned scope is disposed (PEFT's <c>with model.disable_adapter():</c>):
    /// <c>using (model.DisableLora()) { … }</c>.
    /// </summary>
    /// <param name="model">The adapted model.</param>
    /// <returns>A scope that restores the previous state when disposed.</returns>
    /// <exception cref="InvalidOperationException">Adapters are merged (the base weights contain them), or no LoRA layers.</exception>
    public static IDisposable DisableLora(this nn.Module model)
    {
        var layers = RequireLayers(model);
        if (layers.Any(l => l.Layer.MergedAdapters.Count > 0))
            throw new InvalidOperationException("Cannot disable merged adapters: they are part of the base weights. Call UnmergeLora first.");
        var previous = layers.Select(l => (l.Layer, l.Layer.AdaptersDisabled)).ToList();
        foreach (var (_, layer) in layers) layer.AdaptersDisabled = true;
        return new RestoreScope(() =>
        {
            foreach (var (layer, was) in previous) layer.AdaptersDisabled = was;
        });
    }

    /// <summary>
    /// The adapter tensors only, keyed like PEFT's saved adapters without the <c>base_model.model.</c> prefix:
    /// <c>&lt;path&gt;.lora_A.weight</c>, <c>&lt;path&gt;.lora_B.weight</c> (embeddings: <c>&lt;path&gt;.lora_embedding_A</c>/<c>_B</c>).
    /// The values are the live parameters (clone them for a snapshot).
    /// </summary>
    /// <param name="model">The adapted model.</param>
    /// <param name="adapterName">Which adapter; null means the single active adapter.</param>
    /// <returns>The adapter's tensors by key.</returns>
    /// <exception cref="InvalidOperationException">No LoRA layers, or several adapters active and none named.</exception>
    public static Dictionary<string, Tensor> GetLoraStateDict(this nn.Module model, string? adapterName = null)
    {
        var layers = RequireLayers(model);
        var name = ResolveAdapter(layers, adapterName);
        var dict = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        foreach (var (path, layer) in layers)
        {
            if (!layer.HasAdapter(name)) continue;
            foreach (var (suffix, tensor) in layer.AdapterTensors(name)) dict[path + "." + suffix] = tensor;
        }
        return dict;
    }

    /// <summary>
    /// Copies adapter tensors from <paramref name="stateDict"/> (as <see cref="GetLoraStateDict"/> or PEFT writes
    /// them; a leading <c>base_model.model.</c> is accepted) into the model's adapter.
    /// </summary>
    /// <param name="model">A model with the adapter already added (same targets and ranks).</param>
    /// <param name="stateDict">The tensors by key.</param>
    /// <param name="adapterName">Which adapter to fill; null means the single active adapter.</param>
    /// <param name="strict">When true, any missing or unexpected key or shape mismatch throws and nothing is loaded.</param>
    /// <returns>Which keys were loaded, missing, unexpected or of the wrong shape.</returns>
    /// <exception cref="StateDictMismatchException">Strict mode and the dictionary does not fit.</exception>
    public static StateDictFit LoadLoraStateDict(this nn.Module model, IReadOnlyDictionary<string, Tensor> stateDict, string? adapterName = null, bool strict = true)
    {
        ArgumentNullException.ThrowIfNull(stateDict);
        var expected = GetLoraStateDict(model, adapterName);
        var source = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        foreach (var (k, v) in stateDict)
        {
            source[k.StartsWith(PeftKeyPrefix, StringComparison.Ordinal) ? k[PeftKeyPrefix.Length..] : k] = v;
        }
        foreach (var (k, t) in source)
        {
            if (expected.ContainsKey(k) && !Dtypes.IsFloating(t.dtype))
                throw new ArgumentException($"Tensor '{k}' has non-floating type {t.dtype}; nothing was loaded.", nameof(stateDict));
        }
        var result = StateDictFit.Compare(expected, source);
        if (strict && !result.IsComplete)
            throw new StateDictMismatchException(result, null, "The LoRA state dict does not match the model's adapters (nothing was loaded)");

        using var noGrad = no_grad();
        foreach (var k in result.MatchedKeys) expected[k].copy_(source[k]);
        return result;
    }

    /// <summary>The trainable tensors of the given (or the active) adapters, for an optimizer.</summary>
    /// <param name="model">The adapted model.</param>
    /// <param name="adapterName">One adapter; null means every active adapter.</param>
    /// <returns>The parameters, in model order.</returns>
    /// <exception cref="InvalidOperationException">The model has no LoRA layers.</exception>
    public static IReadOnlyList<Parameter> GetLoraParameters(this nn.Module model, string? adapterName = null)
    {
        var list = new List<Parameter>();
        foreach (var (_, layer) in RequireLayers(model))
        {
            var names = adapterName is null ? layer.ActiveAdapters : (layer.HasAdapter(adapterName) ? new[] { adapterName } : Array.Empty<string>());
            foreach (var n in names)
            {
                foreach (var (_, t) in layer.AdapterTensors(n)) list.Add(t);
            }
        }
        return list;
    }

    /// <summary>
    /// Sets <c>requires_grad = false</c> on every parameter that is not a LoRA adapter tensor, and true on adapter
    /// tensors (PEFT's <c>mark_only_lora_as_trainable</c>).
    /// </summary>
    /// <param name="model">The model.</param>
    /// <returns>The number of parameter tensors frozen.</returns>
    public static int FreezeNonLoraParameters(this nn.Module model)
    {
        ArgumentNullException.ThrowIfNull(model);
        var lora = new HashSet<IntPtr>();
        foreach (var (_, layer) in GetLoraLayers(model))
        {
            foreach (var n in layer.Adapters)
            {
                foreach (var (_, t) in layer.AdapterTensors(n)) lora.Add(t.Handle);
            }
        }
        int frozen = 0;
        foreach (var (_, p) in model.named_parameters())
        {
            bool isLora = lora.Contains(p.Handle);
            if (!isLora && p.requires_grad) frozen++;
            p.requires_grad = isLora;
        }
        return frozen;
    }

    /// <summary>
    /// Counts trainable and total parameter elements (the book's <c>print_trainable_parameters</c>). The weights of
    /// quantized layers (<see cref="ILinearLayer"/>, held as buffers) count as frozen parameters, one per weight.
    /// </summary>
    /// <param name="model">Any module; works on the <c>meta</c> device.</param>
    /// <returns>The counts; <c>ToString()</c> prints the book's line.</returns>
    public static ParameterCount CountParameters(this nn.Module model)
    {
        ArgumentNullException.ThrowIfNull(model);
        long total = 0, trainable = 0;
        foreach (var (_, p) in model.named_parameters())
        {
            total += p.numel();
            if (p.requires_grad) trainable += p.numel();
        }
        // Quantized layers hold their weights as buffers; they are still (frozen) weights of the model.
        foreach (var m in model.modules())
        {
            var linear = ModuleTree.BaseLayerOf(m) as ILinearLayer;
            if (linear is not null) total += linear.InFeatures * linear.OutFeatures;
        }
        return new ParameterCount(trainable, total);
    }

    internal static LoraTargetTypes? SupportedKind(nn.Module m) => m switch
    {
        Linear => LoraTargetTypes.Linear,
        ILinearLayer when m is nn.Module<Tensor, Tensor> => LoraTargetTypes.Linear,
        Embedding => LoraTargetTypes.Embedding,
        Conv2d => LoraTargetTypes.Conv2d,
        _ => null,
    };

    private static LoraLayer Wrap(nn.Module<Tensor, Tensor> module) => module switch
    {
        Embedding e => new LoraEmbedding(e),
        Conv2d c => new LoraConv2d(c),
        _ => new LoraLinear(module),
    };

    private static void UnwrapAll(nn.Module model, IReadOnlyList<(string Path, LoraLayer Layer)> layers)
    {
        var sites = ModuleTree.Walk(model).Where(s => s.Module is LoraLayer).ToDictionary(s => s.Path);
        foreach (var (path, layer) in layers)
        {
            var site = sites[path];
            var baseLayer = layer.ReleaseBase();
            ModuleTree.ReplaceChild(site.Parent, site.Name, baseLayer);
            layer.Dispose();
        }
    }

    private static IReadOnlyList<(string Path, LoraLayer Layer)> RequireLayers(nn.Module model)
    {
        ArgumentNullException.ThrowIfNull(model);
        var layers = GetLoraLayers(model);
        if (layers.Count == 0) throw new InvalidOperationException("The model has no LoRA layers; call AddLora first.");
        return layers;
    }

    private static string ResolveAdapter(IReadOnlyList<(string Path, LoraLayer Layer)> layers, string? adapterName)
    {
        if (adapterName is not null)
        {
            if (!layers.Any(l => l.Layer.HasAdapter(adapterName)))
                throw new KeyNotFoundException($"No LoRA layer has an adapter named '{adapterName}'. Known: {string.Join(", ", AdapterNames(layers))}.");
            return adapterName;
        }
        var active = layers.SelectMany(l => l.Layer.ActiveAdapters).Distinct().ToList();
        if (active.Count == 1) return active[0];
        throw new InvalidOperationException(active.Count == 0
            ? "No adapter is active; name the adapter explicitly."
            : $"Several adapters are active ({string.Join(", ", active)}); name the adapter explicitly.");
    }

    private static List<string> AdapterNames(IEnumerable<(string Path, LoraLayer Layer)> layers) =>
        layers.SelectMany(l => l.Layer.Adapters).Distinct().ToList();

    private static string DescribeTargets(LoraConfig c)
    {
        var parts = new List<string>();
        if (c.TargetModules is not null) parts.Add("names: " + string.Join(", ", c.TargetModules));
        if (c.TargetPredicate is not null) parts.Add("a predicate");
        if (parts.Count == 0) parts.Add("types: " + c.TargetTypes);
        return string.Join("; ", parts);
    }

    private sealed class RestoreScope(Action restore) : IDisposable
    {
        private Action? _restore = restore;

        public void Dispose()
        {
            _restore?.Invoke();
            _restore = null;
        }
    }
}
