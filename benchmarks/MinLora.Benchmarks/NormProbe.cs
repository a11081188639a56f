using System.Diagnostics;
using MinLora.Glm;
using MinLora.Glm.Modeling;
using TorchSharp;
using static TorchSharp.torch;

/// <summary>
/// ChatGLM-6B's LayerNorm on one decoding row (hidden 4,096, bf16), three ways, alternating round by round: TorchSharp's
/// <c>nn.LayerNorm</c> module (what the model held before), the model's own module on libtorch's <c>layer_norm</c>,
/// and the same module on <see cref="DecodeLayerNorm"/>. Each round times the 57 LayerNorms of one token (28 layers × 2
/// + the final one). Every form runs a few thousand times first, with pauses, so that .NET's tiered JIT has
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

    public static int Run(int rounds)
    {
        using var noGrad = no_grad();
        var norm = GlmLayers.LayerNorm(4096, 1e-5, new GlmBuildOptions(ScalarType.BFloat16, CPU, GlmInit.Random));
        var module = nn.LayerNorm(new long[] { 4096 }, 1e-5, dtype: ScalarType.BFloat16);
        foreach (var (name, p) in norm.named_parameters()) p.copy_(randn(p.shape).mul(0.1).add(name == "weight" ? 1 : 0));
        module.load_state_dict(norm.state_dict());
        using var x = randn(1, 1, 4096).mul(3).to(ScalarType.BFloat16);
        var forms = new (string Name, Func<Tensor> Call)[]
        {
            ("TorchSharp nn.LayerNorm", () => module.call(x)),
            ("libtorch layer_norm", () => { DecodeLayerNorm.Enabled = false; return norm.call(x); }),
            ("DecodeLayerNorm", () => { DecodeLayerNorm.Enabled = true; return norm.call(x); }),
        };
        var outputs = forms.Select(f => f.Call()).ToList();
        if (!DecodeLayerNorm.MatchesLibtorch) { Console.Error.WriteLine("DecodeLayerNorm is off here (AVX-512/FMA or libtorch's arithmetic differ)"); return 1; }
        if (outputs.Any(o => !o.bytes.SequenceEqual(outputs[0].bytes))) { Console.Error.WriteLine("the forms differ"); return 1; }
        for (int warm = 0; warm < 5; warm++)
        {
            foreach (var f in forms)
                for (int i = 0; i < 500; i++) f.Call().Dispose();
            Thread.Sleep(200);
        }
        var times = forms.Select(_ => new List<double>()).ToArray();
        for (int round = 0; round < rounds; round++)
        {
            for (int k = 0; k < forms.Length; k++)
            {
                int f = (k + round) % forms.Length;
                var sw = Stopwatch.StartNew();
                for (int i = 0; i < PerToken; i++) forms[f].Call().Dispose();
                times[f].Add(sw.Elapsed.TotalMilliseconds * 1e3 / PerToken);
            }
        }
        // Cold: as in a decoding step, where ~100 MB of weights stream through the caches between two LayerNorms, each
        // call after a read of a buffer several times the last-level cache.
        var evict = new long[64L << 20 >> 3];
        new Random(5).NextBytes(System.Runtime.InteropServices.MemoryMarshal.AsBytes(evict.AsSpan()));
        long sink = 0;
        var cold = forms.Select(_ => new List<double>()).ToArray();
        for (int round = 0; round < rounds * 4; round++)
        {
            for (int k = 0; k < forms.Length; k++)
            {
                int f = (k + round) % forms.Length;
                sink += Evict(evict);
                var sw = Stopwatch.StartNew();
                forms[f].Call().Dispose();
                cold[f].Add(sw.Elapsed.TotalMilliseconds * 1e3);
            }
        }
        DecodeLayerNorm.Enabled = true;
        static double Median(List<double> v) { var s = v.OrderBy(t => t).ToList(); return s[s.Count / 2]; }
        Console.WriteLine($"LayerNorm, 1 × 4,096 bf16, {rounds} rounds of {PerToken} calls per form (the forms in rotating order):");
        Console.WriteLine($"| form | µs per call: median (best) | ms per token (×{PerToken}) | ÷ TorchSharp module |");
        Console.WriteLine("|---|---|---|---|");
        double baseline = Median(times[0]);
        for (int f = 0; f < forms.Length; f++)
        {
            double m = Median(times[f]);
            Console.WriteLine($"| {forms[f].Name} | {m:F1} ({times[f].Min():F1}) | {m * PerToken / 1e3:F2} | {m / baseline:F2} |");
        }
        Console.WriteLine($"The same, each call alone after reading 64 MB (caches cold, as between two LayerNorms of a decoding step), {rounds * 4} calls per form:");
        Console.WriteLine($"| form | µs per call: median (best) | ms per token (×{PerToken}) | ÷ TorchSharp module |");
        Console.WriteLine("|---|---|---|---|");
        double coldBaseline = Median(cold[0]);
        for (int f = 0; f < forms.Length; f++)
        {
            double m = Median(cold[f]);
            Console.WriteLine($"| {forms[f].Name} | {m:F1} ({cold[f].Min():F1}) | {m * PerToken / 1e3:F2} | {m / coldBaseline:F2} |");
        }
        // What single libtorch calls cost there: a decoding step makes ~13 tensors per layer (outputs and views).
        var calls = new (string Name, Action Call)[]
        {
            ("nothing (the timer alone)", () => { }),
            ("x.view(1, 4096), disposed", () => x.view(1, 4096).Dispose()),
            ("x.narrow(2, 0, 128), disposed", () => x.narrow(2, 0, 128).Dispose()),
            ("empty_like(x), disposed", () => empty_like(x).Dispose()),
            ("x.dtype (a property read)", () => _ = x.dtype),
        };
        foreach (var (_, call) in calls)
            for (int i = 0; i < 2000; i++) call();
        Thread.Sleep(200);
        var callTimes = calls.Select(_ => new List<double>()).ToArray();
        for (int round = 0; round < rounds * 2; round++)
        {
            for (int c = 0; c < calls.Length; c++)
            {
                sink += Evict(evict);
                var sw = Stopwatch.StartNew();
                calls[c].Call();
                callTimes[c].Add(sw.Elapsed.TotalMilliseconds * 1e3);
            }
        }
        Console.WriteLine($"Single calls, each alone after reading 64 MB, {rounds * 2} calls each:");
        Console.WriteLine("| call | µs: median (best) |");
        Console.WriteLine("|---|---|");
        for (int c = 0; c < calls.Length; c++) Console.WriteLine($"| {calls[c].Name} | {Median(callTimes[c]):F1} ({callTimes[c].Min():F1}) |");
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
            foreach (var (_, call) in inferenceCalls)
                for (int i = 0; i < 2000; i++) call();
            Thread.Sleep(200);
            var inferenceTimes = inferenceCalls.Select(_ => new List<double>()).ToArray();
            for (int round = 0; round < rounds * 2; round++)
            {
                for (int c = 0; c < inferenceCalls.Length; c++)
                {
                    sink += Evict(evict);
                    var sw = Stopwatch.StartNew();
                    inferenceCalls[c].Call();
                    inferenceTimes[c].Add(sw.Elapsed.TotalMilliseconds * 1e3);
                }
            }
            Console.WriteLine($"The same under inference mode (torch.inference_mode()), {rounds * 2} calls each:");
            Console.WriteLine("| call | µs: median (best) |");
            Console.WriteLine("|---|---|");
            for (int c = 0; c < inferenceCalls.Length; c++) Console.WriteLine($"| {inferenceCalls[c].Name} | {Median(inferenceTimes[c]):F1} ({inferenceTimes[c].Min():F1}) |");
        }
        GC.KeepAlive(sink);
        foreach (var o in outputs) o.Dispose();
        return 0;
    }
}
