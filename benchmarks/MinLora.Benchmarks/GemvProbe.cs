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
/// <remarks><c>gemv-probe [--rounds N] [--one-stream]</c>: the kernels' default form reads two weight rows at once
/// (<c>CpuGemv.TwoStreams</c>); <c>--one-stream</c> takes the one-row form. Weights are zeros (the kernels' time does not
/// depend on values), on huge pages as the model's and the plain read's are.</remarks>
internal static class GemvProbe
{
    private const long K = 4096;

    public static int Run(int rounds, bool oneStream)
    {
        using var noGrad = no_grad();
        CpuGemv.TwoStreams = !oneStream;
        var read = new ModelSuite.ReadBandwidth(hugePages: true);
        Console.WriteLine($"gemv-probe: {Environment.ProcessorCount} cores, {rounds} interleaved rounds, 1 row, K = {K}, {(oneStream ? "one row at a time" : "two rows at once where the kernel has that form")}");
        Console.WriteLine("| weights | streaming GB/s (median / best) | in cache GB/s (median / best) | streaming ÷ plain read (best ÷ best) | µs per call of a 64-row layer, weights in cache (median / best) |");
        Console.WriteLine("|---|---|---|---|---|");
        var modules = new List<IDisposable>();
        foreach (var format in new[] { "bf16", "int8", "int4 chatglm", "int4 g128" })
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
            for (int i = 0; i < 3; i++) cached(x).Dispose();
            var s = new List<double>();
            var c = new List<double>();
            var fixedCost = new List<double>();
            for (int round = 0; round < rounds; round++)
            {
                read.Pass();
                var sw = Stopwatch.StartNew();
                foreach (var layer in stream) layer(x).Dispose();
                s.Add(streamBytes / sw.Elapsed.TotalSeconds / 1e9);
                sw.Restart();
                for (int i = 0; i < repeats; i++) cached(x).Dispose();
                c.Add(cachedBytes * repeats / sw.Elapsed.TotalSeconds / 1e9);
                sw.Restart();
                for (int i = 0; i < 1000; i++) tiny(x).Dispose();
                fixedCost.Add(sw.Elapsed.TotalMilliseconds);   // µs per call
            }
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"| {format} | {ModelSuite.MedianOf(s):F1} / {s.Max():F1} | {ModelSuite.MedianOf(c):F1} / {c.Max():F1} | {s.Max() / read.BestGBs:P0} | {ModelSuite.MedianOf(fixedCost):F1} / {fixedCost.Min():F1} |"));
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
