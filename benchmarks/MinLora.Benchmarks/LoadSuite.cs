using System.Diagnostics;
using System.Globalization;
using MinLora;
using MinLora.Glm;
using MinLora.Glm.Modeling;
using MinLora.Quantization;
using TorchSharp;
using TorchSharp.PyBridge;
using static TorchSharp.torch;

/// <summary>
/// Peak memory while loading a sharded GLM checkpoint: a synthetic ChatGLM-architecture model (float16 shards, as
/// Hugging Face ships them) is written once, then loaded in a fresh process each time (so its peak is the load's
/// alone): as float32 and float16, and quantized to int4 on load (<see cref="GlmLoadOptions.QuantizationBit"/>, each
/// file's projections right after it) against loading the float model whole and quantizing it after. Reported: the
/// process's peak working set minus its working set just before loading, divided by the loaded model's bytes (1.0
/// would mean no memory beyond the model itself). The loads run under this process's allocator flags.
/// </summary>
internal static class LoadSuite
{
    /// <param name="quick">A smaller synthetic model.</param>
    /// <param name="chatGlm6bLayers">When set: ChatGLM-6B's real shape (hidden 4096, vocabulary 130,528) with this many
    /// blocks instead of the small model (28 is the whole model; the float checkpoint takes 0.4 GB per block plus 1.1 GB
    /// per embedding table in float16).</param>
    /// <param name="childArguments">Allocator flags for the loading processes (as given to this one).</param>
    public static void Run(bool quick, int? chatGlm6bLayers = null, IReadOnlyList<string>? childArguments = null)
    {
        var dir = Path.Combine(Path.GetTempPath(), "minlora-load-bench");
        if (Directory.Exists(dir)) Directory.Delete(dir, true);
        Directory.CreateDirectory(dir);
        Console.WriteLine($"writing a synthetic checkpoint to {dir} …");
        try
        {
            Measure(dir, quick, chatGlm6bLayers, childArguments);
        }
        finally
        {
            Directory.Delete(dir, true);   // up to 11 GB at ChatGLM-6B's shape
        }
    }

    private static void Measure(string dir, bool quick, int? chatGlm6bLayers, IReadOnlyList<string>? childArguments)
    {
        // Written by a process of its own, so that this one holds no model while the loads run.
        var writeArguments = new List<string> { "load-write", dir };
        if (quick) writeArguments.Add("--quick");
        if (chatGlm6bLayers is { } l) writeArguments.AddRange(new[] { "--chatglm6b-layers", l.ToString(CultureInfo.InvariantCulture) });
        Spawn(writeArguments.Concat(childArguments ?? Array.Empty<string>()));
        var shardFiles = Directory.GetFiles(dir, "*.bin");
        long fileBytes = shardFiles.Sum(f => new FileInfo(f).Length);
        int shards = shardFiles.Length;
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"checkpoint: {fileBytes / 1e6:F0} MB in {shards} float16 shards"));
        Console.WriteLine();
        Console.WriteLine("| load as | model MB | peak extra MB | peak ÷ model | largest shard MB |");
        Console.WriteLine("|---|---|---|---|---|");
        long largest = shardFiles.Max(f => new FileInfo(f).Length);
        // (float16 model, int4): the float model as it is; then int4 quantized while loading (streamed: each file's
        // projections right after it) against the whole float model loaded first and quantized after. At
        // ChatGLM-6B's shape the float32 model (24.7 GB at 28 blocks) is left out, but not the int4 load into float32.
        var cases = chatGlm6bLayers is null
            ? new[] { (false, ""), (true, ""), (false, "after"), (false, "streamed") }
            : new[] { (true, ""), (true, "after"), (true, "streamed"), (false, "streamed") };
        foreach (var (fp16, int4) in cases)
        {
            var arguments = new List<string> { "load-child", dir };
            if (fp16) arguments.Add("--fp16-model");
            if (int4.Length > 0) arguments.Add("--int4-" + int4);
            var line = Spawn(arguments.Concat(childArguments ?? Array.Empty<string>())).Trim().Split('\n').Last();
            var parts = line.Split(' ').Select(x => double.Parse(x, CultureInfo.InvariantCulture)).ToArray(); // modelBytes extraBytes
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"| {(fp16 ? "float16" : "float32")}{(int4 == "after" ? ", then Quantize(4)" : int4 == "streamed" ? ", int4 on load (QuantizationBit = 4)" : "")} | {parts[0] / 1e6:F0} | {parts[1] / 1e6:F0} | {parts[1] / parts[0]:F2} | {largest / 1e6:F0} |"));
        }
    }

    /// <summary>Runs this benchmark program with <paramref name="arguments"/> and returns what it printed.</summary>
    private static string Spawn(IEnumerable<string> arguments)
    {
        var self = Environment.ProcessPath!;
        var psi = new ProcessStartInfo(self) { RedirectStandardOutput = true, UseShellExecute = false };
        if (!self.EndsWith("MinLora.Benchmarks", StringComparison.Ordinal)) psi.ArgumentList.Add(typeof(LoadSuite).Assembly.Location);
        foreach (var a in arguments) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var output = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        if (p.ExitCode != 0) throw new InvalidOperationException($"'{string.Join(' ', psi.ArgumentList)}' exited with {p.ExitCode}");
        return output;
    }

    private static GlmConfig Config(bool quick, int? chatGlm6bLayers) => chatGlm6bLayers is { } layers
        ? GlmConfig.FromJson($$"""
            {"model_type":"chatglm","vocab_size":130528,"hidden_size":4096,"inner_hidden_size":16384,"num_layers":{{layers}},"num_attention_heads":32,
             "bos_token_id":130004,"eos_token_id":130005,"mask_token_id":130000,"gmask_token_id":130001,"pad_token_id":3}
            """)
        : GlmConfig.FromJson($$"""
            {"model_type":"chatglm","vocab_size":{{(quick ? 8000 : 32000)}},"hidden_size":{{(quick ? 512 : 1024)}},"num_layers":{{(quick ? 4 : 12)}},
             "num_attention_heads":8,"bos_token_id":9,"eos_token_id":8,"mask_token_id":5,"gmask_token_id":6,"pad_token_id":3}
            """);

    /// <summary>
    /// Writes the synthetic checkpoint (float16 pickle shards and an index, as Hugging Face ships ChatGLM-6B). At
    /// ChatGLM-6B's shape the model is built in float16 (a float32 copy of 28 blocks would not fit in 24 GB) and
    /// written in 8 shards, as the released checkpoint is; the small model in 4.
    /// </summary>
    public static int Write(string dir, bool quick, int? chatGlm6bLayers)
    {
        var config = Config(quick, chatGlm6bLayers);
        int shards = chatGlm6bLayers is null ? 4 : 8;
        using var model = new GlmForCausalLM(config, new GlmBuildOptions(chatGlm6bLayers is null ? ScalarType.Float32 : ScalarType.Float16));
        var sd = model.state_dict();
        var keys = sd.Keys.ToList();
        var map = new Dictionary<string, string>();
        for (int s = 0; s < shards; s++)
        {
            var name = $"pytorch_model-{s + 1:00000}-of-{shards:00000}.bin";
            var part = keys.Where((_, i) => i * shards / keys.Count == s).ToDictionary(k => k, k => sd[k].detach().to(ScalarType.Float16).contiguous());
            foreach (var k in part.Keys) map[k] = name;
            PyTorchPickler.PickleStateDict(Path.Combine(dir, name), new System.Collections.Hashtable(part));
            foreach (var t in part.Values) t.Dispose();
        }
        File.WriteAllText(Path.Combine(dir, "pytorch_model.bin.index.json"), System.Text.Json.JsonSerializer.Serialize(new { weight_map = map }));
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJson());
        return 0;
    }

    /// <summary>One load in this process, under the allocator policy the command line chose (Program.cs).</summary>
    public static int Child(string dir, bool fp16, string int4 = "")
    {
        using (var warm = ones(4)) { _ = warm.sum().item<float>(); }
        var self = Process.GetCurrentProcess();
        self.Refresh();
        long before = self.WorkingSet64;
        var (model, _) = GlmCheckpoint.FromPretrained(dir, new GlmLoadOptions { Dtype = fp16 ? ScalarType.Float16 : ScalarType.Float32, QuantizationBit = int4 == "streamed" ? 4 : null });
        if (int4 == "after") model.Quantize(4, new QuantizeOptions());
        self.Refresh();
        long peak = self.PeakWorkingSet64;
        long modelBytes = model.parameters().Sum(p => p.numel() * p.element_size()) + model.buffers().Sum(b => b.numel() * b.element_size());
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"{modelBytes} {peak - before}"));
        model.Dispose();
        return 0;
    }
}
