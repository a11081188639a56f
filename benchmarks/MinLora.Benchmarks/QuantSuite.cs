using System.Globalization;
using MinLora.Quantization;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

/// <summary>
/// Weight-only quantized products at ChatGLM-6B shapes: fp32 / bf16 linear vs int8 and int4 (group 128), each through
/// <see cref="QuantizedLinear"/> with the fused kernel forced and with the dequantize path forced. Ratios are bf16-linear
/// time ÷ path time (higher is faster); GB/s counts the weight bytes the path reads; "% read bw" compares that with
/// a plain read of the same buffers (a max-reduction over them) measured in the same run.
/// </summary>
internal static class QuantSuite
{
    private const long CacheBytes = 1L << 30; // several times the L3 (32 MiB on the Zen 5 dev VMs, 300 MiB on the Xeon ones)

    public static void Run(int rounds, bool quick)
    {
        var shapes = quick
            ? new[] { (K: 4096L, N: 4096L) }
            : new[] { (K: 4096L, N: 4096L), (K: 4096L, N: 12288L), (K: 4096L, N: 16384L), (K: 16384L, N: 4096L) };
        var rowsList = new[] { 1L, 16L, 32L, 64L, 128L };
        Console.WriteLine();
        Console.WriteLine("| K→N | rows | path | time | ratio to bf16 linear | weight GB/s | % read bw |");
        Console.WriteLine("|---|---|---|---|---|---|---|");
        foreach (var (k, n) in shapes)
        {
            using var scope = NewDisposeScope();
            var variants = new List<(string Name, Func<Tensor, Tensor> Call, long Bytes, Func<double> ReadBw)>();
            AddFloat(variants, "fp32 linear", k, n, ScalarType.Float32);
            AddFloat(variants, "bf16 linear", k, n, ScalarType.BFloat16);
            AddQuant(variants, "int8 kernel", k, n, QuantizationFormat.Int8PerRow, kernel: true);
            AddQuant(variants, "int8 dequant+linear", k, n, QuantizationFormat.Int8PerRow, kernel: false);
            AddQuant(variants, "int4 g128 kernel", k, n, QuantizationFormat.Int4Grouped, kernel: true);
            AddQuant(variants, "int4 g128 dequant+linear", k, n, QuantizationFormat.Int4Grouped, kernel: false);
            var readBw = variants.Select(v => v.ReadBw()).ToArray();
            foreach (var rows in rowsList)
            {
                using var x = randn(rows, k);
                var calls = variants.Select(v => (Func<int, double>)(_ => LoraSuite.Time(() => { using var y = v.Call(x); }))).ToArray();
                var times = LoraSuite.Measure(rounds, calls, 2);
                double bf16 = times[1];
                for (int i = 0; i < variants.Count; i++)
                {
                    double gbs = variants[i].Bytes / (times[i] / 1e3) / 1e9;
                    Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                        $"| {k}→{n} | {rows} | {variants[i].Name} | {times[i]:F3} ms | {bf16 / times[i]:F2} | {gbs:F1} | {100 * gbs / readBw[i]:F0} % |"));
                }
            }
            foreach (var v in variants) (v.Call.Target as IDisposable)?.Dispose();
        }
    }

    /// <summary>
    /// Where the managed kernel (which converts every weight once per row) stops beating dequantize + bf16 linear:
    /// both paths on the same layers at 4–64 rows, against bf16 linear.
    /// </summary>
    public static void RunCrossover(int rounds)
    {
        var shapes = new[] { (K: 4096L, N: 16384L), (K: 16384L, N: 4096L) };
        var rowsList = new[] { 4L, 8L, 16L, 32L, 64L };
        Console.WriteLine();
        Console.WriteLine("| K→N | rows | path | time | ratio to bf16 linear |");
        Console.WriteLine("|---|---|---|---|---|");
        foreach (var (k, n) in shapes)
        {
            using var scope = NewDisposeScope();
            var variants = new List<(string Name, Func<Tensor, Tensor> Call, long Bytes, Func<double> ReadBw)>();
            // Three copies of each weight (the suites' usual 1 GiB of copies per variant does not fit 24 GiB here).
            AddFloat(variants, "bf16 linear", k, n, ScalarType.BFloat16, copies: 3);
            foreach (var format in new[] { QuantizationFormat.Int8PerRow, QuantizationFormat.Int4PerRowChatGlm })
            {
                var name = format == QuantizationFormat.Int8PerRow ? "int8" : "int4";
                AddQuant(variants, $"{name} dequantize + linear", k, n, format, kernel: true, new QuantizedLinearOptions { CpuGemvMaxRows = 0 }, copies: 3);
                AddQuant(variants, $"{name} CpuGemv", k, n, format, kernel: true, new QuantizedLinearOptions { CpuGemvMaxRows = 64 }, copies: 3);
            }
            foreach (var rows in rowsList)
            {
                using var x = randn(rows, k).to(ScalarType.BFloat16);
                var calls = variants.Select(v => (Func<int, double>)(_ => LoraSuite.Time(() => { using var y = v.Call(x); }))).ToArray();
                var times = LoraSuite.Measure(rounds, calls, 2);
                for (int i = 0; i < variants.Count; i++)
                    Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                        $"| {k}→{n} | {rows} | {variants[i].Name} | {times[i]:F2} ms | {times[0] / times[i]:F2} |"));
            }
        }
    }

    /// <summary>
    /// Many-row products (prompts, training) at ChatGLM-6B's four projection shapes: bf16 <c>linear</c> against the
    /// quantized layer's default path (bf16 tiles) and <see cref="QuantizedLinearOptions.Int8Gemm"/> (with its outlier
    /// split, and without: threshold +∞), int8 and ChatGLM int4, forward alone and forward + input gradient through
    /// autograd (a training step's use of a frozen layer), interleaved rounds; and each path's relative error
    /// (mean |y − ref| ÷ mean |ref|) against the float64 product of its own stored weights. Two kinds of activations:
    /// Gaussian, and Gaussian with K/512 outlier features (every row ±(20 + 10·|z|) there, as the hidden states of
    /// 6B-and-larger models carry: LLM.int8(), Dettmers et al. 2022, reports up to 6–7 such dimensions at 6.7B with
    /// magnitudes up to ~60). The input-gradient step does not depend on the activations and is timed once.
    /// </summary>
    public static void RunPrompt(int rounds, string? onlyShape = null)
    {
        var shapes = new[] { (K: 4096L, N: 12288L), (K: 4096L, N: 4096L), (K: 4096L, N: 16384L), (K: 16384L, N: 4096L) }
            .Where(s => onlyShape is null || onlyShape == $"{s.K}x{s.N}").ToArray();
        if (shapes.Length == 0) throw new ArgumentException($"--shape {onlyShape}: expected one of 4096x12288, 4096x4096, 4096x16384, 16384x4096");
        Console.WriteLine();
        Console.WriteLine("| K→N | rows | activations | path | forward | ratio to bf16 | forward + input gradient (autograd) | ratio to bf16 | forward error |");
        Console.WriteLine("|---|---|---|---|---|---|---|---|---|");
        foreach (var (k, n) in shapes)
        {
            using var scope = NewDisposeScope();
            manual_seed(5);
            using var w = randn(n, k).mul(0.02);
            var wbf = w.to(ScalarType.BFloat16);
            // A training step's use of a frozen layer: forward, then the input gradient through autograd.
            Func<Tensor, Tensor> Step(Func<Tensor, Tensor> forward) => g =>
            {
                using var stepScope = NewDisposeScope();
                using var x = zeros(g.shape[0], k, dtype: ScalarType.BFloat16).requires_grad_(true);
                using var y = forward(x);
                y.backward(new[] { g });
                return x.grad!.detach().clone().MoveToOuterDisposeScope();
            };
            Tensor Bf16(Tensor x) => nn.functional.linear(x, wbf);
            // Each path's float64 reference weight, made once per shape.
            var paths = new List<(string Name, Func<Tensor, Tensor> Forward, Func<Tensor, Tensor> Step, Tensor Reference)>
            {
                ("bf16 linear", Bf16, Step(Bf16), wbf.to(ScalarType.Float64)),
            };
            var layers = new List<QuantizedLinear>();
            foreach (var format in new[] { QuantizationFormat.Int8PerRow, QuantizationFormat.Int4PerRowChatGlm })
            {
                foreach (var (int8Gemm, threshold, label) in new[] { (false, 6f, " default (bf16 tiles)"), (true, 6f, " Int8Gemm"), (true, float.PositiveInfinity, " Int8Gemm, no outlier split") })
                {
                    using var linear = nn.Linear(k, n, hasBias: false);
                    using (no_grad()) linear.weight!.copy_(w);
                    var layer = QuantizedLinear.FromLinear(linear, format, options: new QuantizedLinearOptions { Int8Gemm = int8Gemm, Int8GemmOutlierThreshold = threshold });
                    layers.Add(layer);
                    string name = (format == QuantizationFormat.Int8PerRow ? "int8" : "int4 ChatGLM") + label;
                    paths.Add((name, layer.call, Step(layer.call), layer.Dequantize(ScalarType.Float64)));
                }
            }
            foreach (long rows in new[] { 16L, 128L, 512L })
            {
                using var g = randn(rows, n).to(ScalarType.BFloat16);
                var backward = paths.Select(p => (Func<int, double>)(_ => LoraSuite.Time(() => { using var gx = p.Step(g); }))).ToArray();
                var tb = LoraSuite.Measure(rounds, backward, 1);
                foreach (bool outliers in new[] { false, true })
                {
                    using var x32 = randn(rows, k);
                    if (outliers)
                    {
                        // K/512 feature columns spread over K, alternating in sign.
                        var columns = OutlierFeatureColumns(k, (int)(k / 512));
                        for (int c = 0; c < columns.Length; c++)
                            x32[TensorIndex.Colon, columns[c]] = x32[TensorIndex.Colon, columns[c]].abs().mul(10).add(20).mul(c % 2 == 0 ? 1 : -1);
                    }
                    using var x = x32.to(ScalarType.BFloat16);
                    var forward = paths.Select(p => (Func<int, double>)(_ => LoraSuite.Time(() => { using var noGrad = no_grad(); using var y = p.Forward(x); }))).ToArray();
                    var tf = LoraSuite.Measure(rounds, forward, 1);
                    using var x64 = x.to(ScalarType.Float64);
                    for (int i = 0; i < paths.Count; i++)
                    {
                        // Its own scope: the float64 temporaries of 7 paths × 2 kinds of activations exhaust 24 GB otherwise.
                        using var errorScope = NewDisposeScope();
                        using var noGrad = no_grad();
                        using var y = paths[i].Forward(x);
                        using var reference = x64.matmul(paths[i].Reference.t());
                        double error = (y.to(ScalarType.Float64) - reference).abs().mean().item<double>() / reference.abs().mean().item<double>();
                        string step = outliers ? "| — | — " : string.Create(CultureInfo.InvariantCulture, $"| {tb[i]:F1} ms | {tb[0] / tb[i]:F2} ");
                        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                            $"| {k}→{n} | {rows} | {(outliers ? "K/512 outlier features" : "Gaussian")} | {paths[i].Name} | {tf[i]:F1} ms | {tf[0] / tf[i]:F2} {step}| {error:E1} |"));
                    }
                }
            }
            foreach (var layer in layers) layer.Dispose();
        }
    }

    /// <summary>
    /// <paramref name="count"/> distinct feature columns spread over <paramref name="width"/> (97 + 509·c mod (width − 97)),
    /// where the prompt-products and model suites put their outlier features.
    /// </summary>
    internal static long[] OutlierFeatureColumns(long width, int count) =>
        Enumerable.Range(0, count).Select(c => 97 + c * 509L % (width - 97)).Distinct().ToArray();

    private static int Copies(long bytes) => (int)Math.Max(2, (CacheBytes + bytes - 1) / bytes);

    private static void AddFloat(List<(string, Func<Tensor, Tensor>, long, Func<double>)> list, string name, long k, long n, ScalarType dtype, int? copies = null)
    {
        long bytes = k * n * (dtype == ScalarType.Float32 ? 4 : 2);
        int count = copies ?? Copies(bytes);
        var ws = Enumerable.Range(0, count).Select(_ => randn(n, k).to(dtype).DetachFromDisposeScope()).ToArray();
        int i = 0;
        list.Add((name, x =>
        {
            using var noGrad = no_grad();
            using var xd = x.to(dtype);
            return nn.functional.linear(xd, ws[i++ % count]);
        }, bytes, () => ReadBandwidth(ws)));
    }

    private static void AddQuant(List<(string, Func<Tensor, Tensor>, long, Func<double>)> list, string name, long k, long n, QuantizationFormat format, bool kernel, QuantizedLinearOptions? baseOptions = null, int? copies = null)
    {
        var options = (baseOptions ?? new QuantizedLinearOptions()) with { KernelMaxRows = kernel ? int.MaxValue : 0, UseKernels = kernel };
        var probe = QuantizedLinear.Empty(k, n, false, format, 128, ScalarType.Float32, CPU, options);
        long bytes = probe.GetSizeInBytes();
        long stored = probe.QuantizedWeight.Weight.numel() * probe.QuantizedWeight.Weight.element_size();
        probe.Dispose();
        int count = copies ?? Copies(bytes);
        var layers = Enumerable.Range(0, count).Select(_ =>
        {
            // Random codes drawn in the stored layout (quantizing float copies took minutes per shape).
            var layer = QuantizedLinear.Empty(k, n, false, format, 128, ScalarType.Float32, CPU, options);
            using (no_grad())
            {
                var q = layer.QuantizedWeight;
                q.Weight.copy_(randint(format == QuantizationFormat.Int4Grouped ? 0 : -128, format == QuantizationFormat.Int4Grouped ? 256 : 128, q.Weight.shape, dtype: q.Weight.dtype));
                q.Scale.fill_(0.01 / Math.Sqrt(k));
                q.Zero?.fill_(0.001);
            }
            layer.RefreshKernel();
            return layer;
        }).ToArray();
        if (kernel && layers[0].Kernel == QuantizedKernel.Dequantize)
            Console.WriteLine($"  note: {name} {k}→{n}: kernel unavailable ({layers[0].KernelFallbackReason})");
        int i = 0;
        // Bytes the path must read: the int8 or packed-int4 weight (scales are < 1 % of it).
        long readBytes = stored;
        list.Add((name, x =>
        {
            using var noGrad = no_grad();
            return layers[i++ % count].call(x);
        }, readBytes, () => ReadBandwidth(layers.Select(l => l.QuantizedWeight.Weight).ToArray())));
    }

    /// <summary>Bytes per second of a max-reduction over each buffer (a read-only sweep of those very buffers), cycling over them.</summary>
    private static double ReadBandwidth(Tensor[] buffers)
    {
        long bytes = buffers[0].numel() * buffers[0].element_size();
        int i = 0;
        var t = LoraSuite.Measure(5, new Func<int, double>[] { _ => LoraSuite.Time(() => { using var s = buffers[i++ % buffers.Length].max(); }) }, buffers.Length);
        return bytes / (t[0] / 1e3) / 1e9;
    }
}
