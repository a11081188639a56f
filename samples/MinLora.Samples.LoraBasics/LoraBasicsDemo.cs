
using MinLora;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

using MinLora.Samples;

namespace MinLora.Samples.LoraBasics;

/// <summary>Settings of the demo.</summary>
public sealed record DemoOptions
{
    /// <summary>Full-training steps of the base model on task A.</summary>
    public int PretrainSteps { get; init; } = 400;

    /// <summary>LoRA training steps on task B.</summary>
    public int LoraSteps { get; init; } = 300;

    /// <summary>LoRA rank.</summary>
    public int Rank { get; init; } = 4;

    /// <summary>LoRA alpha.</summary>
    public double Alpha { get; init; } = 8;

    /// <summary>Peak learning rate of the LoRA phase (cosine decay).</summary>
    public double LearningRate { get; init; } = 0.01;

    /// <summary>Random seed.</summary>
    public int Seed { get; init; } = 1234;

    /// <summary>Where the adapter is written.</summary>
    public string OutputDirectory { get; init; } = Path.Combine("out", "lora-basics");

    /// <summary>Where progress goes (null: silent).</summary>
    public TextWriter? Log { get; init; } = Console.Out;
}

/// <summary>What the demo measured.</summary>
/// <param name="BaseLossOnB">Task-B loss of the base model before LoRA.</param>
/// <param name="LoraLossOnB">Task-B loss after LoRA training.</param>
/// <param name="LossCurve">The training loss at every LoRA step.</param>
/// <param name="Count">Trainable / total parameters after AddLora.</param>
/// <param name="ReloadMaxDiff">Max |output difference| between the trained model and a fresh base + reloaded adapter.</param>
/// <param name="MergeMaxDiff">Max |output difference| between the adapted and the merged model.</param>
public sealed record DemoResult(double BaseLossOnB, double LoraLossOnB, IReadOnlyList<double> LossCurve, ParameterCount Count, double ReloadMaxDiff, double MergeMaxDiff);

/// <summary>
/// Pre-train a small network on task A, then adapt it to a related task B with LoRA only: the adapter learns the
/// low-rank difference between the tasks while the base stays frozen.
/// </summary>
public static class LoraBasicsDemo
{
    private const int InputSize = 16, Hidden = 64, OutputSize = 4;

    /// <summary>Runs the whole demo.</summary>
    /// <param name="options">Settings.</param>
    /// <returns>The measurements.</returns>
    public static DemoResult Run(DemoOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        var log = options.Log ?? TextWriter.Null;
        manual_seed(options.Seed);

        // Two teachers that differ by a rank-2 change of the first layer: task B = task A shifted.
        using var teacherA = new Mlp(InputSize, Hidden, OutputSize);
        using var teacherB = new Mlp(InputSize, Hidden, OutputSize);
        teacherB.load_state_dict(teacherA.state_dict());
        using (no_grad())
        {
            var w = teacherB.state_dict()["fc1.weight"];
            w.add_(randn(Hidden, 2).matmul(randn(2, InputSize)).mul_(0.3));
        }
        using var testX = randn(512, InputSize);

        log.WriteLine("1. Pre-training the base model on task A (all parameters)");
        using var model = new Mlp(InputSize, Hidden, OutputSize);
        Train(model, model.parameters(), teacherA, options.PretrainSteps, 0.01, log);
        double baseLossOnB = Evaluate(model, teacherB, testX);
        log.WriteLine($"   loss on task A: {Evaluate(model, teacherA, testX):F5}   loss on task B: {baseLossOnB:F5}");

        log.WriteLine("2. Adding LoRA to every Linear layer");
        var adapted = model.AddLora(new LoraConfig { Rank = options.Rank, Alpha = options.Alpha });
        var count = model.CountParameters();
        log.WriteLine($"   adapted: {string.Join(", ", adapted)}");
        log.WriteLine($"   {count}");

        log.WriteLine("3. Training the adapters on task B (base frozen)");
        var curve = Train(model, model.GetLoraParameters(), teacherB, options.LoraSteps, options.LearningRate, log);
        double loraLossOnB = Evaluate(model, teacherB, testX);
        log.WriteLine($"   loss on task B: {baseLossOnB:F5} -> {loraLossOnB:F5}");

        log.WriteLine($"4. Saving the adapter (PEFT layout) to {options.OutputDirectory} and reloading it into a fresh base");
        var baseWeights = model.state_dict().Where(kv => !kv.Key.Contains(".lora_", StringComparison.Ordinal)).ToDictionary(kv => kv.Key, kv => kv.Value);
        model.SaveLoraAdapter(options.OutputDirectory);
        using var reloaded = new Mlp(InputSize, Hidden, OutputSize);
        reloaded.load_state_dict(baseWeights);
        reloaded.LoadLoraAdapter(options.OutputDirectory);
        double reloadDiff = MaxDiff(model, reloaded, testX);
        log.WriteLine($"   max |trained - reloaded| = {reloadDiff:G3}");

        log.WriteLine("5. Merging the adapter into the base weights");
        using var before = Predict(model, testX);
        model.MergeLora();
        using var after = Predict(model, testX);
        double mergeDiff = (after - before).abs().max().item<float>();
        log.WriteLine($"   max |adapted - merged| = {mergeDiff:G3} (float32 rounding)");
        return new DemoResult(baseLossOnB, loraLossOnB, curve, count, reloadDiff, mergeDiff);
    }

    private static List<double> Train(Mlp model, IEnumerable<Parameter> parameters, Mlp teacher, int steps, double lr, TextWriter log)
    {
        model.train();
        using var optimizer = optim.AdamW(parameters, lr: lr, weight_decay: 0);
        var curve = new List<double>(steps);
        using var progress = new ProgressBar(log, steps);
        for (int step = 1; step <= steps; step++)
        {
            double currentLr = lr * 0.5 * (1 + Math.Cos(Math.PI * (step - 1) / steps)); // cosine schedule
            foreach (var g in optimizer.ParamGroups) g.LearningRate = currentLr;
            using var scope = NewDisposeScope();
            var x = randn(64, InputSize);
            Tensor target;
            using (no_grad()) target = teacher.call(x);
            optimizer.zero_grad();
            var loss = nn.functional.mse_loss(model.call(x), target);
            loss.backward();
            optimizer.step();
            double value = loss.item<float>();
            curve.Add(value);
            progress.Report(step, $"loss {value:F5} lr {currentLr:E2}");
        }
        model.eval();
        return curve;
    }

    private static Tensor Predict(Mlp model, Tensor x)
    {
        using var noGrad = no_grad();
        return model.call(x);
    }

    private static double Evaluate(Mlp model, Mlp teacher, Tensor x)
    {
        using var scope = NewDisposeScope();
        return nn.functional.mse_loss(Predict(model, x), Predict(teacher, x)).item<float>();
    }

    private static double MaxDiff(Mlp a, Mlp b, Tensor x)
    {
        using var scope = NewDisposeScope();
        return (Predict(a, x) - Predict(b, x)).abs().max().item<float>();
    }
}

/// <summary>A two-layer perceptron written as MinLora expects: swappable fields called through <c>call</c>.</summary>
internal sealed class Mlp : nn.Module<Tensor, Tensor>
{
    private readonly nn.Module<Tensor, Tensor> fc1;
    private readonly nn.Module<Tensor, Tensor> fc2;

    public Mlp(long input, long hidden, long output) : base(nameof(Mlp))
    {
        fc1 = nn.Linear(input, hidden);
        fc2 = nn.Linear(hidden, output);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        return fc2.call(nn.functional.tanh(fc1.call(x))).MoveToOuterDisposeScope();
    }
}
