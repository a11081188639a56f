using System.Collections;
using System.Reflection;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MinLora;

/// <summary>One module found in a tree walk, with the parent that holds it.</summary>
/// <param name="Path">The module's dotted path from the root (its state-dict prefix).</param>
/// <param name="Parent">The module that holds it.</param>
/// <param name="Name">Its registered name in the parent.</param>
/// <param name="Module">The module (possibly a LoRA wrapper).</param>
internal readonly record struct ModuleSite(string Path, nn.Module Parent, string Name, nn.Module Module)
{
    /// <summary>The layer itself, or the base layer under a LoRA wrapper: what quantization and loading act on.</summary>
    public nn.Module BaseLayer => ModuleTree.BaseLayerOf(Module);

    /// <summary>
    /// Puts <paramref name="replacement"/> where <see cref="BaseLayer"/> is: under the LoRA wrapper when there is one
    /// (the adapters stay), else in the parent (field and registry).
    /// </summary>
    /// <param name="replacement">The new base layer.</param>
    public void ReplaceBaseLayer(nn.Module replacement)
    {
        if (Module is LoraLayer wrapper) wrapper.ReplaceBaseLayer((nn.Module<Tensor, Tensor>)replacement);
        else ModuleTree.ReplaceChild(Parent, Name, replacement);
    }
}

/// <summary>
/// Which modules an operation targets: exact dotted paths or dotted suffixes of them (<c>"query_key_value"</c>
/// selects <c>transformer.layers.0.attention.query_key_value</c>, as PEFT matches <c>target_modules</c>), and/or a
/// predicate over (path, module).
/// </summary>
/// <param name="Names">Names or dotted suffixes (null: none).</param>
/// <param name="Predicate">A predicate OR-ed with the names (null: none).</param>
internal sealed record ModuleSelector(IReadOnlyList<string>? Names, Func<string, nn.Module, bool>? Predicate)
{
    /// <summary>Whether names or a predicate were given at all.</summary>
    public bool IsExplicit => Names is not null || Predicate is not null;

    /// <summary>Whether <paramref name="path"/> (with <paramref name="module"/> there) is selected by a name or the predicate.</summary>
    public bool Matches(string path, nn.Module module) =>
        (Names is not null && Names.Any(n => NameMatches(path, n))) || (Predicate?.Invoke(path, module) ?? false);

    /// <summary>Exact path or dotted suffix.</summary>
    public static bool NameMatches(string path, string name) =>
        path == name || (path.Length > name.Length && path.EndsWith(name, StringComparison.Ordinal) && path[path.Length - name.Length - 1] == '.');
}

/// <summary>
/// Walking a TorchSharp module tree and swapping one module for another in its parent. TorchSharp has no
/// <c>setattr</c>: a parent's <c>forward</c> calls its fields, while state_dict walks its registry, so a swap must
/// change both (see docs/architecture.md, "Seams").
/// </summary>
internal static class ModuleTree
{
    /// <summary>The layer itself, or the base layer under a LoRA wrapper.</summary>
    public static nn.Module BaseLayerOf(nn.Module module) => module is LoraLayer wrapper ? wrapper.BaseLayer : module;

    /// <summary>
    /// Changes the model at every site, all or nothing: <paramref name="swap"/> performs one site's change and returns
    /// how to undo it; when a swap throws, the changes already made are undone in reverse order and the exception
    /// propagates, so the model is as it was.
    /// </summary>
    /// <param name="sites">The sites, in order.</param>
    /// <param name="swap">One site's change (it must leave that site unchanged when it throws) and its undo.</param>
    public static void SwapAll(IReadOnlyList<ModuleSite> sites, Func<ModuleSite, Action> swap)
    {
        var undo = new List<Action>(sites.Count);
        try
        {
            foreach (var site in sites) undo.Add(swap(site));
        }
        catch
        {
            for (int i = undo.Count - 1; i >= 0; i--) undo[i]();
            throw;
        }
    }

    private static readonly FieldInfo? SubmodulesField =
        typeof(nn.Module).GetField("_internal_submodules", BindingFlags.Instance | BindingFlags.NonPublic);

    /// <summary>Every descendant of <paramref name="root"/> with its parent, depth first; does not look inside LoRA wrappers.</summary>
    /// <param name="root">The root module (not itself yielded).</param>
    /// <param name="prefix">A path prefix for the yielded paths.</param>
    /// <returns>The sites, parents before children.</returns>
    public static IEnumerable<ModuleSite> Walk(nn.Module root, string prefix = "")
    {
        foreach (var (name, child) in root.named_children().ToList())
        {
            var path = prefix.Length == 0 ? name : prefix + "." + name;
            yield return new ModuleSite(path, root, name, child);
            if (child is LoraLayer) continue;
            foreach (var site in Walk(child, path)) yield return site;
        }
    }

    /// <summary>
    /// Replaces the child module <paramref name="childName"/> of <paramref name="parent"/> by
    /// <paramref name="replacement"/>: the field that holds it (found by TorchSharp component name) and the registry
    /// entry (in place, so state-dict key order is kept). Handles <c>Sequential</c>, <c>ModuleList</c> and
    /// <c>ModuleDict</c> parents.
    /// </summary>
    /// <param name="parent">The parent module.</param>
    /// <param name="childName">The registered name of the child.</param>
    /// <param name="replacement">The new module.</param>
    /// <exception cref="InvalidOperationException">The parent's field cannot hold the replacement's type (declare it
    /// <c>Module&lt;Tensor, Tensor&gt;</c>), or the parent holds the child in no field that can be set.</exception>
    /// <exception cref="KeyNotFoundException">The parent has no child of that name.</exception>
    public static void ReplaceChild(nn.Module parent, string childName, nn.Module replacement)
    {
        ArgumentNullException.ThrowIfNull(parent);
        ArgumentException.ThrowIfNullOrEmpty(childName);
        ArgumentNullException.ThrowIfNull(replacement);

        var old = parent.named_children().FirstOrDefault(c => c.name == childName).module
            ?? throw new KeyNotFoundException($"{Describe(parent)} has no child module named '{childName}'.");

        if (parent is Sequential)
        {
            ReplaceInSequential(parent, childName, replacement);
            return;
        }

        var parentType = parent.GetType();
        if (IsGeneric(parentType, typeof(ModuleList<>)))
        {
            var itemType = GenericArgument(parentType, typeof(ModuleList<>));
            CheckAssignable(itemType, replacement, parent, childName, "its item type");
            int index = int.Parse(childName, System.Globalization.CultureInfo.InvariantCulture);
            parentType.GetProperty("Item", new[] { typeof(int) })!.SetValue(parent, replacement, new object[] { index });
        }
        else if (IsGeneric(parentType, typeof(ModuleDict<>)))
        {
            var itemType = GenericArgument(parentType, typeof(ModuleDict<>));
            CheckAssignable(itemType, replacement, parent, childName, "its item type");
            parentType.GetProperty("Item", new[] { typeof(string) })!.SetValue(parent, replacement, new object[] { childName });
        }
        else
        {
            var field = FindField(parent, childName, old)
                ?? throw new InvalidOperationException(
                    $"Cannot swap '{childName}' in {Describe(parent)}: no field holds it. Keep every submodule in a private field " +
                    "named like its state-dict key (or marked [ComponentName]) and call RegisterComponents().");
            CheckAssignable(field.FieldType, replacement, parent, childName, $"field '{field.Name}' is typed {field.FieldType.Name}");
            field.SetValue(parent, replacement);
        }

        ReplaceRegistration(parent, childName, replacement);
    }

    private static void ReplaceRegistration(nn.Module parent, string childName, nn.Module replacement)
    {
        if (SubmodulesField?.GetValue(parent) is IDictionary<string, nn.Module> registry && registry.ContainsKey(childName))
        {
            registry[childName] = replacement; // OrderedDict's indexer keeps the position
            return;
        }
        // Fallback through the public API (moves the entry to the end; keys are unchanged).
        parent.register_module(childName, null!);
        parent.register_module(childName, replacement);
    }

    private static void ReplaceInSequential(nn.Module parent, string childName, nn.Module replacement)
    {
        var t = typeof(Sequential);
        var modules = t.GetField("_modules", BindingFlags.Instance | BindingFlags.NonPublic)?.GetValue(parent) as IList;
        var names = t.GetField("_names", BindingFlags.Instance | BindingFlags.NonPublic)?.GetValue(parent) as IList<string>;
        if (modules is null || names is null)
            throw new InvalidOperationException("This TorchSharp version's Sequential layout is unknown; cannot swap a module inside it.");
        int index = names.IndexOf(childName);
        if (replacement is not nn.IModule<Tensor, Tensor>)
            throw new InvalidOperationException($"Sequential '{childName}' can only be replaced by a Module<Tensor, Tensor>.");
        modules[index] = replacement;
    }

    private static FieldInfo? FindField(nn.Module parent, string componentName, nn.Module current)
    {
        FieldInfo? byValue = null;
        for (var t = parent.GetType(); t is not null && t != typeof(nn.Module); t = t.BaseType)
        {
            foreach (var f in t.GetFields(BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.DeclaredOnly))
            {
                if (!ReferenceEquals(f.GetValue(parent), current)) continue;
                if (f.ComponentName() == componentName) return f;
                byValue ??= f;
            }
        }
        return byValue;
    }

    private static bool IsGeneric(Type t, Type generic)
    {
        for (var x = t; x is not null; x = x.BaseType)
        {
            if (x.IsGenericType && x.GetGenericTypeDefinition() == generic) return true;
        }
        return false;
    }

    private static Type GenericArgument(Type t, Type generic)
    {
        for (var x = t; x is not null; x = x.BaseType)
        {
            if (x.IsGenericType && x.GetGenericTypeDefinition() == generic) return x.GetGenericArguments()[0];
        }
        throw new InvalidOperationException("unreachable");
    }

    private static void CheckAssignable(Type target, nn.Module replacement, nn.Module parent, string childName, string what)
    {
        if (!target.IsInstanceOfType(replacement))
        {
            throw new InvalidOperationException(
                $"Cannot replace '{childName}' in {Describe(parent)} by a {replacement.GetType().Name}: {what}. " +
                "Declare swappable submodules as Module<Tensor, Tensor> so LoRA and quantization can replace them.");
        }
    }

    private static string Describe(nn.Module m) => m.GetType().Name;
}
