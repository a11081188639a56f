using TorchSharp;
using static TorchSharp.torch;

namespace MinLora;

/// <summary>How the two LoRA factors are initialised.</summary>
public enum LoraInit
{
    /// <summary>
    /// A ~ Kaiming-uniform with a = √5 (that is U(−1/√fan_in, +1/√fan_in)), B = 0: minLoRA's and PEFT's default.
    /// A fresh adapter changes no output. For embeddings PEFT's convention is used: A = 0, B ~ N(0, 1).
    /// </summary>
    KaimingUniform,

    /// <summary>A ~ N(0, 1/rank), B = 0 (PEFT's <c>"gaussian"</c>). A fresh adapter changes no output.</summary>
    Gaussian,

    /// <summary>
    /// Both factors random (A Kaiming-uniform, B ~ N(0, 1/rank)), so the adapter changes outputs from the start.
    /// Meant for tests and experiments (PEFT's <c>init_lora_weights=False</c> has the same purpose).
    /// </summary>
    Random,
}

/// <summary>
/// What <see cref="LoraExtensions.AddLora"/> adds and where: rank, scaling, dropout, target selection, adapter name
/// and initialisation. Validate with <see cref="Validate"/> (AddLora does it for you).
/// </summary>
/// <remarks>
/// Scaling is <c>Alpha / Rank</c>, or <c>Alpha / √Rank</c> with <see cref="UseRsLora"/>. The defaults (rank 4,
/// alpha 1, no dropout, every Linear) are minLoRA's, which the book uses.
/// </remarks>
public sealed record LoraConfig
{
    /// <summary>The default adapter name, as in PEFT.</summary>
    public const string DefaultAdapterName = "default";

    /// <summary>The LoRA rank r (inner dimension of the two factors).</summary>
    /// <value>The default value is 4 (minLoRA's default).</value>
    public int Rank { get; init; } = 4;

    /// <summary>The LoRA alpha; the update is scaled by <c>Alpha / Rank</c> (or <c>Alpha / √Rank</c>).</summary>
    /// <value>The default value is 1 (minLoRA's default).</value>
    public double Alpha { get; init; } = 1.0;

    /// <summary>Dropout probability applied to the adapter's input (not to the base path) while training.</summary>
    /// <value>The default value is 0.</value>
    public double Dropout { get; init; }

    /// <summary>
    /// Module names to adapt. A name matches a module whose full dotted path equals it or ends with <c>"." + name</c>
    /// (PEFT's rule: <c>"query_key_value"</c> matches <c>transformer.layers.0.attention.query_key_value</c> but
    /// <c>"value"</c> does not). When both this and <see cref="TargetPredicate"/> are null every supported layer
    /// of the types in <see cref="TargetTypes"/> is adapted.
    /// </summary>
    public IReadOnlyList<string>? TargetModules { get; init; }

    /// <summary>
    /// A predicate over (full dotted name, module) choosing the modules to adapt; combined with
    /// <see cref="TargetModules"/> by OR when both are given.
    /// </summary>
    public Func<string, nn.Module, bool>? TargetPredicate { get; init; }

    /// <summary>
    /// Which layer kinds are adapted when neither <see cref="TargetModules"/> nor <see cref="TargetPredicate"/> is
    /// set. Modules chosen explicitly must be of a supported kind whatever this says.
    /// </summary>
    /// <value>The default value is <see cref="LoraTargetTypes.Linear"/> (minLoRA's default config).</value>
    public LoraTargetTypes TargetTypes { get; init; } = LoraTargetTypes.Linear;

    /// <summary>The adapter's name; several named adapters can live on one model.</summary>
    /// <value>The default value is <c>"default"</c>.</value>
    public string AdapterName { get; init; } = DefaultAdapterName;

    /// <summary>Use rank-stabilised scaling <c>Alpha / √Rank</c> (rsLoRA) instead of <c>Alpha / Rank</c>.</summary>
    public bool UseRsLora { get; init; }

    /// <summary>How the factors are initialised.</summary>
    /// <value>The default value is <see cref="LoraInit.KaimingUniform"/>.</value>
    public LoraInit Init { get; init; } = LoraInit.KaimingUniform;

    /// <summary>
    /// When true, AddLora sets <c>requires_grad = false</c> on every parameter of the model that is not a LoRA
    /// parameter (PEFT's behaviour), so only adapters train.
    /// </summary>
    /// <value>The default value is true.</value>
    public bool FreezeBase { get; init; } = true;

    /// <summary>
    /// Element type of the adapter factors. Null means the base weight's floating type. Use float32 adapters on a
    /// float16/bfloat16 base for stable training: inputs are cast to this type on the adapter path and the
    /// adapter's output is cast back to the base output's type.
    /// </summary>
    public ScalarType? AdapterDtype { get; init; }

    /// <summary>The scaling factor applied to <c>B·A</c>.</summary>
    public double Scaling => UseRsLora ? Alpha / Math.Sqrt(Rank) : Alpha / Rank;

    /// <summary>Checks every setting and throws a clear exception for the first bad one.</summary>
    /// <exception cref="ArgumentOutOfRangeException">Rank ≤ 0, Alpha ≤ 0 or not finite, Dropout outside [0, 1).</exception>
    /// <exception cref="ArgumentException">An empty adapter name or target name, or a non-floating adapter dtype.</exception>
    public void Validate()
    {
        if (Rank <= 0)
            throw new ArgumentOutOfRangeException(nameof(Rank), Rank, "LoRA rank must be positive.");
        if (!(Alpha > 0) || double.IsInfinity(Alpha))
            throw new ArgumentOutOfRangeException(nameof(Alpha), Alpha, "LoRA alpha must be a positive finite number.");
        if (!(Dropout >= 0 && Dropout < 1))
            throw new ArgumentOutOfRangeException(nameof(Dropout), Dropout, "LoRA dropout must be in [0, 1).");
        if (string.IsNullOrWhiteSpace(AdapterName) || AdapterName.Contains('.', StringComparison.Ordinal))
            throw new ArgumentException($"Adapter name '{AdapterName}' must be non-empty and contain no '.'.", nameof(AdapterName));
        if (TargetModules is not null)
        {
            if (TargetModules.Count == 0)
                throw new ArgumentException("TargetModules is empty: give at least one name, or leave it null.", nameof(TargetModules));
            foreach (var t in TargetModules)
            {
                if (string.IsNullOrWhiteSpace(t))
                    throw new ArgumentException("TargetModules contains an empty name.", nameof(TargetModules));
            }
        }
        if (AdapterDtype is { } dt && !Dtypes.IsFloating(dt))
            throw new ArgumentException($"Adapter dtype must be a floating type, got {dt}.", nameof(AdapterDtype));
        if (TargetTypes == LoraTargetTypes.None && TargetModules is null && TargetPredicate is null)
            throw new ArgumentException("No target: TargetTypes is None and no names or predicate are given.", nameof(TargetTypes));
    }

    /// <summary>True when the module at <paramref name="name"/> is selected by the name list or predicate.</summary>
    internal bool IsExplicitTarget(string name, nn.Module module) => Selector.Matches(name, module);

    private ModuleSelector Selector => new(TargetModules, TargetPredicate);

    internal bool HasExplicitTargets => Selector.IsExplicit;
}

/// <summary>Layer kinds that <see cref="LoraConfig"/> adapts by default.</summary>
[Flags]
public enum LoraTargetTypes
{
    /// <summary>None: only explicit targets.</summary>
    None = 0,
    /// <summary>torch.nn.Linear and linear-like layers implementing <see cref="ILinearLayer"/>.</summary>
    Linear = 1,
    /// <summary>torch.nn.Embedding.</summary>
    Embedding = 2,
    /// <summary>torch.nn.Conv2d.</summary>
    Conv2d = 4,
    /// <summary>Every supported kind.</summary>
    All = Linear | Embedding | Conv2d,
}
