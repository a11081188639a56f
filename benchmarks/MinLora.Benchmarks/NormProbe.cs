using System.Diagnostics;
using MinLora.Glm;
using MinLora.Glm.Modeling;
using TorchSharp;
using static TorchSharp.torch;

/// <summary>
/// ChatGLM-6B's LayerNorm on one decoding row (hidden 4,096, bf16), three ways: TorchSharp's <c>nn.LayerNorm</c>
/// module (what the model held before), the model's own module on libtorch's <c>layer_norm</c>, and the same module
/// on <see cref="DecodeLayerNorm"/>. Hot: the 57 LayerNorms of one token (28 layers × 2 + the final one) in a row, the
/// forms rotating round by round; cold: each call alone after reading 64 MB, as in a decoding step, where tens of
/// megabytes of weights stream through the caches between two LayerNorms. Then single libtorch calls cold, also under
/// inference mode. Every timed action runs a few thousand times first, with pauses, so that .NET's tiered JIT has
/// optimised the managed code (a decode runs it far more often).
/// </summary>
internal static class NormProbe
{
    private const int PerToken = 57;

    /// <summary>Reads one long of every cache line of <paramref name="buffer"/> (optimised at once: no tier-0 loop).</summary>
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)]
    private static long Evict(long[] buffer)
    {
        long sum = 0;
        for (int i = 0; i < buffer.Length; i += 8) sum += buffer[i];
        return sum;
    }

    private static double Median(List<double> v)
    {
        var s = v.OrderBy(t => t).ToList();
        return s[s.Count / 2];
    }

    private static void WarmUp(IEnumerable<Action> actions)
    {
        for (int pass = 0; pass < 5; pass++)
        {
            foreach (var a in actions)
                for (int i = 0; i < 500; i++) a();
            Thread.Sleep(200);
        }
    }

    /// <summary>µs per call of each action, <paramref name="calls"/> calls in a row per sample, the actions in rotating
    /// order; with <paramref name="evict"/>, one call per sample after reading the buffer.</summary>
    private static List<double>[] Time((string Name, Action Call)[] actions, int samples, int calls, long[]? evict, ref long sink)
    {
        var times = actions.Select(_ => new List<double>()).ToArray();
        for (int round = 0; round < samples; round++)
        {
            for (int k = 0; k < actions.Length; k++)
            {
                int a = (k + round) % actions.Length;
                if (evict is not null) sink += Evict(evict);
                var sw = Stopwatch.StartNew();
                for (int i = 0; i < calls; i++) actions[a].Call();
                times[a].Add(sw.Elapsed.TotalMilliseconds * 1e3 / calls);
            }
        }
        return times;
    }

    private static void PrintForms((string Name, Action Call)[] forms, List<double>[] times)
    {
        Console.WriteLine($"| form | µs per call: median (best) | ms per token (×{PerToken}) | ÷ TorchSharp module |");
        Console.WriteLine("|---|---|---|---|");
        double baseline = Median(times[0]);
        for (int f = 0; f < forms.Length; f++)
        {
            double m = Median(times[f]);
            Console.WriteLine($"| {forms[f].Name} | {m:F1} ({times[f].Min():F1}) | {m * PerToken / 1e3:F2} | {m / baseline:F2} |");
        }
    }

    private static void PrintCalls((string Name, Action Call)[] calls, List<double>[] times)
    {
        Console.WriteLine("| call | µs: median (best) |");
        Console.WriteLine("|---|---|");
        for (int c = 0; c < calls.Length; c++) Console.WriteLine($"| {calls[c].Name} | {Median(times[c]):F1} ({times[c].Min():F1}) |");
    }

    public static int Run(int rounds)
    {
        using var noGrad = no_grad();
        var norm = GlmLayers.LayerNorm(4096, 1e-5, new GlmBuildOptions(ScalarType.BFloat16, CPU, GlmInit.Random));
        var module = nn.LayerNorm(new long[] { 4096 }, 1e-5, dtype: ScalarType.BFloat16);
        using (NewDisposeScope())
        {
            foreach (var (name, p) in norm.named_parameters()) p.copy_(randn(p.shape).mul(0.1).add(name == "weight" ? 1 : 0));
        }
        module.load_state_dict(norm.state_dict());
        using var x = randn(1, 1, 4096).mul(3).to(ScalarType.BFloat16);
        var forms = new (string Name, Action Call)[]
        {
            ("TorchSharp nn.LayerNorm", () => module.call(x).Dispose()),
            ("libtorch layer_norm", () => { DecodeLayerNorm.Enabled = false; norm.call(x).Dispose(); }),
            ("DecodeLayerNorm", () => { DecodeLayerNorm.Enabled = true; norm.call(x).Dispose(); }),
        };
        // The forms agree bit for bit, and the pass runs here.
        using (var a = module.call(x))
        {
            DecodeLayerNorm.Enabled = false;
            using var b = norm.call(x);
            DecodeLayerNorm.Enabled = true;
            using var c = norm.call(x);
            if (!DecodeLayerNorm.MatchesLibtorch) { Console.Error.WriteLine("DecodeLayerNorm is off here (AVX-512/FMA or libtorch's arithmetic differ)"); return 1; }
            if (!a.bytes.SequenceEqual(b.bytes) || !a.bytes.SequenceEqual(c.bytes)) { Console.Error.WriteLine("the forms differ"); return 1; }
        }
        var evict = new long[64L << 20 >> 3];
        new Random(5).NextBytes(System.Runtime.InteropServices.MemoryMarshal.AsBytes(evict.AsSpan()));
        long sink = 0;

        WarmUp(forms.Select(f => f.Call));
        var hot = Time(forms, rounds, PerToken, null, ref sink);
        var cold = Time(forms, rounds * 4, 1, evict, ref sink);
        Console.WriteLine($"LayerNorm, 1 × 4,096 bf16, {rounds} rounds of {PerToken} calls per form (the forms in rotating order):");
        PrintForms(forms, hot);
        Console.WriteLine($"The same, each call alone after reading 64 MB (caches cold, as between two LayerNorms of a decoding step), {rounds * 4} calls per form:");
        PrintForms(forms, cold);

        using var mask = zeros(new long[] { 1, 1, 1, 1024 }, dtype: ScalarType.Bool);
        // What single libtorch calls cost there: a decoding step makes ~13 tensors per layer (outputs and views).
        var calls = new (string Name, Action Call)[]
        {
            ("nothing (the timer alone)", () => { }),
            ("x.view(1, 4096), disposed", () => x.view(1, 4096).Dispose()),
            ("x.narrow(2, 0, 128), disposed", () => x.narrow(2, 0, 128).Dispose()),
            ("x.view(1, 1, 32, 128).narrow(3, 0, 64), both disposed (a decoding layer's old shape check)", () =>
            {
                using var v = x.view(1, 1, 32, 128);
                v.narrow(3, 0, 64).Dispose();
            }),
            ("mask.reshape(1, 1024).to(Bool).contiguous(), disposed (the attention's old mask preparation)", () => mask.reshape(1, 1024).to(ScalarType.Bool).contiguous().Dispose()),
            ("empty_like(x), disposed", () => empty_like(x).Dispose()),
            ("x.dtype (a property read)", () => _ = x.dtype),
        };
        WarmUp(calls.Select(c => c.Call));
        Console.WriteLine($"Single calls, each alone after reading 64 MB, {rounds * 2} calls each:");
        PrintCalls(calls, Time(calls, rounds * 2, 1, evict, ref sink));

        // The same under inference mode (no autograd and no view tracking in the dispatch), on a tensor made there.
        using (var inference = inference_mode())
        {
            using var xi = x.clone();
            var inferenceCalls = new (string Name, Action Call)[]
            {
                ("nothing (the timer alone)", () => { }),
                ("x.view(1, 4096), disposed", () => xi.view(1, 4096).Dispose()),
                ("x.narrow(2, 0, 128), disposed", () => xi.narrow(2, 0, 128).Dispose()),
                ("empty_like(x), disposed", () => empty_like(xi).Dispose()),
                ("libtorch layer_norm", () => { DecodeLayerNorm.Enabled = false; norm.call(xi).Dispose(); }),
                ("DecodeLayerNorm", () => { DecodeLayerNorm.Enabled = true; norm.call(xi).Dispose(); }),
            };
            WarmUp(inferenceCalls.Select(c => c.Call));
            Console.WriteLine($"The same under inference mode (torch.inference_mode()), {rounds * 2} calls each:");
            PrintCalls(inferenceCalls, Time(inferenceCalls, rounds * 2, 1, evict, ref sink));
        }
        DecodeLayerNorm.Enabled = true;
        GC.KeepAlive(sink);
        return 0;
    }
}
