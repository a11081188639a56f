using System.Diagnostics;
using System.Globalization;
using System.Text;
using MinLora.Glm.Tokenization;

/// <summary>
/// Tokenizer throughput: GlmTokenizer.EncodeToIds against SentencePiece's own C++ encoder (Debian's spm_encode over
/// the text repeated to ~2 M characters, the time of a one-word input — process start and model load — subtracted)
/// on 1 k to 1 M characters of mixed text, in the same run. Shows whether the encoder is linear (time per character flat as the text grows).
/// </summary>
internal static class TokenizerSuite
{
    public static int Run(List<string> args)
    {
        int i = args.IndexOf("--model");
        string model = i >= 0 && i + 1 < args.Count ? args[i + 1]
            : Path.Combine(AppContext.BaseDirectory, "..", "..", "..", "..", "..", "samples", "MinLora.Samples.SpoExtraction", "assets", "base", "ice_text.model");
        if (!File.Exists(model)) { Console.Error.WriteLine($"no tokenizer model at {model} (give --model PATH/ice_text.model)"); return 2; }
        GlmTokenizer tokenizer;
        using (var s = File.OpenRead(model)) tokenizer = GlmTokenizer.Create(s);
        string? spm = File.Exists("/usr/bin/spm_encode") ? "/usr/bin/spm_encode" : null;
        Console.WriteLine($"tokenizer: {model}; spm_encode: {spm ?? "not installed (apt-get install sentencepiece)"}");
        Console.WriteLine();
        Console.WriteLine("| characters | ids | MinLora EncodeToIds | chars/µs | spm_encode (without load) | MinLora ÷ spm time |");
        Console.WriteLine("|---|---|---|---|---|---|");
        var rng = new Random(3);
        var parts = new[] { "汽车发动机故障检测需要专业的诊断工具。", "The quick brown fox jumps over the lazy dog. ", "啊啊啊啊啊", "价格是 3.5 元/公斤，", "😀👋", "東京タワーは高さ333メートルです。", "bbbbbbbb", "𠀀𠀁𪚥" };
        double baseline = spm is null ? 0 : SpmSeconds(spm, model, "x", 1);
        foreach (int n in new[] { 1_000, 10_000, 100_000, 1_000_000 })
        {
            var sb = new StringBuilder(n + 64);
            while (sb.Length < n) sb.Append(parts[rng.Next(parts.Length)]);
            var text = sb.ToString(0, n);
            if (char.IsHighSurrogate(text[^1])) text = text[..^1];
            tokenizer.EncodeToIds(text);                                  // warm-up (JIT)
            int reps = n <= 10_000 ? 20 : n <= 100_000 ? 3 : 1;
            var sw = Stopwatch.StartNew();
            int count = 0;
            for (int r = 0; r < reps; r++) count = tokenizer.EncodeToIds(text).Count;
            double ours = sw.Elapsed.TotalSeconds / reps;
            string spmCell = "", ratio = "";
            if (spm is not null)
            {
                // The text repeated to about 2 M characters, so the model load (subtracted) does not swamp the time.
                int copies = Math.Max(1, 2_000_000 / n);
                double t = Math.Max(1e-6, SpmSeconds(spm, model, GlmTokenizer.Preprocess(text), copies) - baseline) / copies;
                spmCell = $"{t * 1e3:F1} ms";
                ratio = $"{ours / t:F2}";
            }
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"| {n:N0} | {count:N0} | {ours * 1e3:F1} ms | {n / (ours * 1e6):F1} | {spmCell} | {ratio} |"));
        }
        return 0;
    }

    /// <summary>Best of three runs of spm_encode over <paramref name="copies"/> lines of text.</summary>
    private static double SpmSeconds(string spm, string model, string line, int copies)
    {
        var file = Path.GetTempFileName();
        try
        {
            var one = line.Replace("\n", " ", StringComparison.Ordinal) + "\n";
            File.WriteAllText(file, string.Concat(Enumerable.Repeat(one, copies)), new UTF8Encoding(false));
            double best = double.MaxValue;
            for (int r = 0; r < 3; r++)
            {
                var psi = new ProcessStartInfo(spm) { RedirectStandardOutput = true };
                psi.ArgumentList.Add("--model=" + model);
                psi.ArgumentList.Add("--output_format=id");
                psi.ArgumentList.Add(file);
                var sw = Stopwatch.StartNew();
                using var p = Process.Start(psi)!;
                p.StandardOutput.ReadToEnd();
                p.WaitForExit();
                best = Math.Min(best, sw.Elapsed.TotalSeconds);
            }
            return best;
        }
        finally
        {
            File.Delete(file);
        }
    }
}
