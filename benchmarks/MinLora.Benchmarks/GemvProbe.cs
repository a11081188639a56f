using System.Diagnostics;
using System.Globalization;
using MinLora.Quantization;
using TorchSharp;
using static TorchSharp.torch;

/// <summary>
/// The decoding kernels' rate (one activation row), streaming against in cache: each format's 4096-column layers read once per pass from a
/// set far larger than the last-level cache, and the same kernel on a 4 MB layer that stays in cache, in interleaved
/// rounds beside a plain read of memory. Streaming close to the plain read means the kernel is bound by memory; an
/// in-cache rate not far above the streaming rate means it is bound by its own instructions. The last column is the
/// time of a call on a 64-row layer: the fixed cost (activations converted, output allocated, one fork/join) plus
/// reading its 128–512 KB of weights from cache (2–7 µs).
/// </summary>
/// <remarks><c>gemv-probe [--rounds N] [--one-stream] [--k K] [--formats bf16,int8,…]</c>: the kernels' default form reads two
/// weight rows at once (<c>CpuGemv.TwoStreams</c>); <c>--one-stream</c> takes the one-row form. <c>--k</c> sets the
/// columns (default 4096; ChatGLM's dense_4h_to_h has 16,384); <c>--formats</c> takes some of bf16, int8,
/// "int4 chatglm" (or int4), g128. bf16 is timed in two forms round by round: activations as bf16 pairs (the default,
/// <c>CpuGemv.Bf16Activations</c>) and as float32. Weights are zeros (the kernels' time does not
/// depend on values), on huge pages as the model's and the plain read's are.</remarks>
internal static class GemvProbe
{
    private static long K = 4096;

    public static int Run(int rounds, bool oneStream, int k, string? formats)
    {
        if (k > 0) K = k;
        using var noGrad = no_grad();
        CpuGemv.TwoStreams = !oneStream;
        var read = new ModelSuite.ReadBandwidth(hugePages: true);
        Console.WriteLine($"gemv-probe: {Environment.ProcessorCount} cores, {rounds} interleaved rounds, 1 row, K = {K}, {(oneStream ? "one row at a time" : "two rows at once where the kernel has that form")}");
        Console.WriteLine("| weights | streaming GB/s (median / best) | in cache GB/s (median / best) | streaming ÷ plain read (best ÷ best) | µs per call of a 64-row layer, weights in cache (median / best) |");
        Console.WriteLine("|---|---|---|---|---|");
        var modules = new List<IDisposable>();
        var chosen = formats?.Split(',').Select(f => f == "int4" ? "int4 chatglm" : f == "g128" ? "int4 g128" : f).ToHashSet();
        if (chosen?.Except(new[] { "bf16", "int8", "int4 chatglm", "int4 g128" }).FirstOrDefault() is { } unknown)
        {
            Console.Error.WriteLine($"unknown format '{unknown}' (bf16, int8, int4, g128)");
            return 2;
        }
        foreach (var format in new[] { "bf16", "int8", "int4 chatglm", "int4 g128" }.Where(f => chosen == null || chosen.Contains(f)))
        {
            double bytesPerWeight = format == "bf16" ? 2 : format == "int8" ? 1 : 0.5;
            // Streaming: 16,384-row layers (ChatGLM's dense_h_to_4h) adding to ~1.5 GB; in cache: one layer of 4 MB,
            // called again and again (in L3, partly in L2), large enough that the per-call work is a small share.
            long streamRows = 16384;
            int layers = (int)Math.Ceiling(1.5e9 / (streamRows * K * bytesPerWeight));
            long cachedRows = (long)((4L << 20) / (K * bytesPerWeight));
            var stream = Enumerable.Range(0, layers).Select(_ => Layer(format, streamRows, modules)).ToList();
            var cached = Layer(format, cachedRows, modules);
            var tiny = Layer(format, 64, modules);
            using var x = randn(1, K).to(ScalarType.BFloat16);
            double streamBytes = layers * streamRows * K * bytesPerWeight, cachedBytes = cachedRows * K * bytesPerWeight;
            int repeats = (int)Math.Max(1, streamBytes / cachedBytes);
            // bf16 alternates its two activation forms round by round (bf16 pairs, float32 de-interleaved).
            var variants = format == "bf16" ? new[] { (Name: "bf16", Bf16X: true), (Name: "bf16, float32 activations", Bf16X: false) } : new[] { (Name: format, Bf16X: true) };
            foreach (var variant in variants)
            {
                CpuGemv.Bf16Activations = variant.Bf16X;   // each form compiled and warm before the timed rounds
                for (int i = 0; i < 3; i++) cached(x).Dispose();
            }
            var s = variants.Select(_ => new List<double>()).ToArray();
            var c = variants.Select(_ => new List<double>()).ToArray();
            var fixedCost = variants.Select(_ => new List<double>()).ToArray();
            for (int round = 0; round < rounds; round++)
            {
                for (int v = 0; v < variants.Length; v++)
                {
                    CpuGemv.Bf16Activations = variants[v].Bf16X;
                    read.Pass();
                    var sw = Stopwatch.StartNew();
                    foreach (var layer in stream) layer(x).Dispose();
                    s[v].Add(streamBytes / sw.Elapsed.TotalSeconds / 1e9);
                    sw.Restart();
                    for (int i = 0; i < repeats; i++) cached(x).Dispose();
                    c[v].Add(cachedBytes * repeats / sw.Elapsed.TotalSeconds / 1e9);
                    sw.Restart();
                    for (int i = 0; i < 1000; i++) tiny(x).Dispose();
                    fixedCost[v].Add(sw.Elapsed.TotalMilliseconds);   // µs per call
                }
            }
            CpuGemv.Bf16Activations = true;
            for (int v = 0; v < variants.Length; v++)
                Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"| {variants[v].Name} | {ModelSuite.MedianOf(s[v]):F1} / {s[v].Max():F1} | {ModelSuite.MedianOf(c[v]):F1} / {c[v].Max():F1} | {s[v].Max() / read.BestGBs:P0} | {ModelSuite.MedianOf(fixedCost[v]):F1} / {fixedCost[v].Min():F1} |"));
            foreach (var m in modules) m.Dispose();
            modules.Clear();
        }
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"plain read: best {read.BestGBs:F1} GB/s, median {read.MedianGBs:F1} over {read.Count} passes"));
        return 0;
    }

    private static Func<Tensor, Tensor> Layer(string format, long rows, List<IDisposable> modules)
    {
        if (format == "bf16")
        {
            var linear = nn.Linear(K, rows, hasBias: false, dtype: ScalarType.BFloat16);
            modules.Add(linear);
            _ = linear.UseHugePages();
            return x => CpuLinear.Forward(linear, x);
        }
        var q = QuantizedLinear.Empty(K, rows, hasBias: false, format switch
        {
            "int8" => QuantizationFormat.Int8PerRow,
            "int4 chatglm" => QuantizationFormat.Int4PerRowChatGlm,
            _ => QuantizationFormat.Int4Grouped,
        }, 128, ScalarType.BFloat16);
        _ = q.UseHugePages();
        q.RefreshKernel();
        modules.Add(q);
        return x => q.call(x);
    }
}
