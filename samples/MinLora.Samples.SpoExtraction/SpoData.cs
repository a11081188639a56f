using System.Text;
using System.Text.Json;
using MinLora.Glm;
using MinLora.Glm.Data;
using MinLora.Glm.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Samples.SpoExtraction;

/// <summary>One extraction example: a text and its answer, one <c>subject_predicate_object</c> triple per line.</summary>
/// <param name="Text">The text.</param>
/// <param name="Answer">The triples, joined by <c>\n</c>.</param>
public sealed record SpoExample(string Text, string Answer);

/// <summary>A subject–predicate–object triple.</summary>
/// <param name="Subject">The subject.</param>
/// <param name="Predicate">The relation.</param>
/// <param name="Object">The object.</param>
public readonly record struct SpoTriple(string Subject, string Predicate, string Object)
{
    /// <summary>The book's line format, <c>subject_predicate_object</c>.</summary>
    /// <returns>The line.</returns>
    public override string ToString() => $"{Subject}_{Predicate}_{Object}";

    /// <summary>
    /// The triples of an answer: each line with exactly three <c>_</c>-separated fields (as the published evaluation
    /// counts them); other lines are ignored. Duplicates are kept once.
    /// </summary>
    /// <param name="answer">Answer text.</param>
    /// <returns>The distinct triples, in order.</returns>
    public static IReadOnlyList<SpoTriple> Parse(string answer)
    {
        ArgumentNullException.ThrowIfNull(answer);
        var result = new List<SpoTriple>();
        foreach (var raw in answer.Split('\n'))
        {
            var line = raw.Trim();
            var parts = line.Split('_');
            if (parts.Length != 3) continue;
            var t = new SpoTriple(parts[0], parts[1], parts[2]);
            if (!result.Contains(t)) result.Add(t);
        }
        return result;
    }
}

/// <summary>Reading SPO data files.</summary>
public static class SpoData
{
    /// <summary>The book's prompt.</summary>
    public const string DefaultPrompt = "按给定的格式抽取文本信息。\n文本：";

    /// <summary>
    /// Reads JSON lines in the book's format <c>{"text", "answer"}</c> or DuIE's <c>{"text", "spo_list": [{"subject",
    /// "predicate", "object"}]}</c> (DuIE 2.0's <c>{"object": {"@value": …}}</c> too). Blank lines are skipped.
    /// </summary>
    /// <param name="path">The file.</param>
    /// <returns>The examples.</returns>
    /// <exception cref="FileNotFoundException">No such file.</exception>
    /// <exception cref="InvalidDataException">A line that is not one of the formats (its number is given).</exception>
    public static IReadOnlyList<SpoExample> ReadJsonLines(string path)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(path);
        if (!File.Exists(path)) throw new FileNotFoundException($"No SPO data file '{path}'.", path);
        var examples = new List<SpoExample>();
        int number = 0;
        foreach (var line in File.ReadLines(path, Encoding.UTF8))
        {
            number++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            try
            {
                using var doc = JsonDocument.Parse(line);
                var root = doc.RootElement;
                var text = root.GetProperty("text").GetString() ?? throw new InvalidDataException("text is null");
                if (root.TryGetProperty("answer", out var answer))
                {
                    examples.Add(new SpoExample(text, answer.GetString() ?? ""));
                }
                else if (root.TryGetProperty("spo_list", out var list))
                {
                    var triples = list.EnumerateArray().Select(spo => new SpoTriple(
                        Value(spo.GetProperty("subject")), Value(spo.GetProperty("predicate")), Value(spo.GetProperty("object"))));
                    examples.Add(new SpoExample(text, string.Join("\n", triples.Select(t => t.ToString()))));
                }
                else
                {
                    throw new InvalidDataException("neither \"answer\" nor \"spo_list\"");
                }
            }
            catch (Exception ex) when (ex is JsonException or KeyNotFoundException or InvalidOperationException or InvalidDataException)
            {
                throw new InvalidDataException($"{path}, line {number}: not an SPO record ({ex.Message}).", ex);
            }
        }
        return examples;
    }

    /// <summary>Writes examples as JSON lines in the book's format, all-or-nothing (<see cref="AtomicDirectory.WriteFile"/>).</summary>
    /// <param name="path">The file.</param>
    /// <param name="examples">The examples.</param>
    public static void WriteJsonLines(string path, IEnumerable<SpoExample> examples)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(path);
        ArgumentNullException.ThrowIfNull(examples);
        var options = new JsonSerializerOptions { Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping };
        AtomicDirectory.WriteFile(path, tmp =>
        {
            using var w = new StreamWriter(tmp, false, new UTF8Encoding(false));
            foreach (var e in examples) w.WriteLine(JsonSerializer.Serialize(new { text = e.Text, answer = e.Answer }, options));
        });
    }

    private static string Value(JsonElement e) =>
        e.ValueKind == JsonValueKind.Object ? e.GetProperty("@value").GetString() ?? "" : e.GetString() ?? "";
}

/// <summary>How SPO examples become training sequences: the generic options with the book's prompt.</summary>
public sealed record SpoTrainingOptions
{
    /// <summary>The instruction put before each text.</summary>
    /// <value>The default value is the book's "按给定的格式抽取文本信息。\n文本：".</value>
    public string Prompt { get; init; } = SpoData.DefaultPrompt;

    /// <summary>Most tokens of prompt + text (the text is truncated).</summary>
    /// <value>The default value is 256 (the book's prediction setting).</value>
    public int MaxSourceLength { get; init; } = 256;

    /// <summary>Most tokens of the answer (truncated).</summary>
    /// <value>The default value is 128.</value>
    public int MaxTargetLength { get; init; } = 128;
}

/// <summary>Turns SPO examples into GLM training sequences and batches (the library's generic builder with the book's prompt).</summary>
/// <remarks>
/// Where this differs from the book's code: the loss uses the labels (the book's model computes it on the input ids),
/// the target budget is a positive length (the book's 32/48 call gives −19 and drops the answer's tail), there is no
/// "\n原因:" target prefix, and padding is on the left with −100 labels (the book pads labels with the pad id).
/// </remarks>
public sealed class SpoDatasetBuilder
{
    private readonly FineTuningDatasetBuilder _builder;

    /// <summary>Creates the builder.</summary>
    /// <param name="tokenizer">The tokenizer of the model's generation (ChatGLM-6B, ChatGLM2/3 or GLM-4).</param>
    /// <param name="options">Lengths and prompt.</param>
    /// <exception cref="ArgumentException">The prompt alone exceeds MaxSourceLength, or a length is not positive.</exception>
    public SpoDatasetBuilder(IGlmTextTokenizer tokenizer, SpoTrainingOptions? options = null)
    {
        var o = options ?? new SpoTrainingOptions();
        _builder = new FineTuningDatasetBuilder(tokenizer, new FineTuningOptions { Prompt = o.Prompt, MaxSourceLength = o.MaxSourceLength, MaxTargetLength = o.MaxTargetLength });
    }

    /// <summary>The prompt + text ids of an example (truncated), as used for generation.</summary>
    /// <param name="text">The text.</param>
    /// <returns>The source ids and whether the text was cut.</returns>
    public (IReadOnlyList<int> Ids, bool Truncated) Source(string text) => _builder.Source(text);

    /// <summary>Builds one training sequence.</summary>
    /// <param name="example">The example.</param>
    /// <returns>Ids and labels.</returns>
    public FineTuningExample Build(SpoExample example)
    {
        ArgumentNullException.ThrowIfNull(example);
        return _builder.Build(example.Text, example.Answer);
    }

    /// <summary>Builds every example and counts truncations.</summary>
    /// <param name="examples">The examples.</param>
    /// <returns>The sequences and how many texts and answers were cut.</returns>
    public (IReadOnlyList<FineTuningExample> Examples, int TruncatedSources, int TruncatedTargets) BuildAll(IEnumerable<SpoExample> examples)
    {
        ArgumentNullException.ThrowIfNull(examples);
        return _builder.BuildAll(examples.Select(e => (e.Text, e.Answer)));
    }

    /// <summary>Left-pads sequences into a batch (see <see cref="FineTuningDatasetBuilder.Collate"/>).</summary>
    /// <param name="batch">The sequences.</param>
    /// <param name="config">The model config.</param>
    /// <param name="device">Where to put the tensors.</param>
    /// <returns>The batch.</returns>
    public static GlmTrainingBatch Collate(IReadOnlyList<FineTuningExample> batch, GlmConfig config, Device? device = null) =>
        FineTuningDatasetBuilder.Collate(batch, config, device);
}

/// <summary>Precision, recall and F1 of triple extraction.</summary>
/// <param name="Precision">Correct predicted triples ÷ predicted triples, over the whole set.</param>
/// <param name="Recall">Correct predicted triples ÷ gold triples, over the whole set.</param>
/// <param name="F1">Harmonic mean of the two (triple level).</param>
/// <param name="SampleAveragedF1">The published evaluation's figure: F1 of each sample's triple sets, averaged.</param>
/// <param name="Samples">Number of samples.</param>
public sealed record SpoScores(double Precision, double Recall, double F1, double SampleAveragedF1, int Samples);

/// <summary>
/// The sums behind <see cref="SpoScores"/>: counts add over parts of a dataset (data-parallel evaluation on
/// several ranks), ratios do not.
/// </summary>
/// <param name="Correct">Predicted triples that are gold triples.</param>
/// <param name="Predicted">Predicted triples (distinct per sample).</param>
/// <param name="Gold">Gold triples (distinct per sample).</param>
/// <param name="SampleF1Sum">Sum of the per-sample F1.</param>
/// <param name="Samples">Number of samples.</param>
public sealed record SpoCounts(long Correct, long Predicted, long Gold, double SampleF1Sum, int Samples)
{
    /// <summary>Precision, recall and F1 from the counts.</summary>
    /// <returns>The scores.</returns>
    public SpoScores ToScores()
    {
        double precision = Predicted == 0 ? 0 : (double)Correct / Predicted;
        double recall = Gold == 0 ? 0 : (double)Correct / Gold;
        double f1 = precision + recall == 0 ? 0 : 2 * precision * recall / (precision + recall);
        return new SpoScores(precision, recall, f1, Samples == 0 ? 0 : SampleF1Sum / Samples, Samples);
    }

    /// <summary>The counts as five numbers (for a sum over ranks), in the order of the constructor.</summary>
    /// <returns>The numbers.</returns>
    public double[] ToArray() => [Correct, Predicted, Gold, SampleF1Sum, Samples];

    /// <summary>Counts from five numbers (see <see cref="ToArray"/>).</summary>
    /// <param name="values">Correct, predicted, gold, per-sample F1 sum, samples.</param>
    /// <returns>The counts.</returns>
    /// <exception cref="ArgumentException">Not five numbers.</exception>
    public static SpoCounts FromArray(ReadOnlySpan<double> values)
    {
        if (values.Length != 5) throw new ArgumentException($"Expected 5 numbers, got {values.Length}.", nameof(values));
        return new SpoCounts((long)values[0], (long)values[1], (long)values[2], values[3], (int)values[4]);
    }
}

/// <summary>Scoring extracted triples against gold answers.</summary>
public static class SpoEvaluation
{
    /// <summary>Scores predictions (answer-format text) against references.</summary>
    /// <param name="pairs">(predicted answer, gold answer) per sample.</param>
    /// <returns>The scores.</returns>
    public static SpoScores Score(IEnumerable<(string Prediction, string Reference)> pairs) => Count(pairs).ToScores();

    /// <summary>Counts correct, predicted and gold triples of predictions (answer-format text) against references.</summary>
    /// <param name="pairs">(predicted answer, gold answer) per sample.</param>
    /// <returns>The counts (add them over parts of a dataset, then <see cref="SpoCounts.ToScores"/>).</returns>
    public static SpoCounts Count(IEnumerable<(string Prediction, string Reference)> pairs)
    {
        ArgumentNullException.ThrowIfNull(pairs);
        long correct = 0, predicted = 0, gold = 0;
        double f1Sum = 0;
        int n = 0;
        foreach (var (prediction, reference) in pairs)
        {
            var p = SpoTriple.Parse(prediction ?? "").ToHashSet();
            var g = SpoTriple.Parse(reference ?? "").ToHashSet();
            int c = p.Count(g.Contains);
            correct += c;
            predicted += p.Count;
            gold += g.Count;
            double sp = p.Count == 0 ? 0 : (double)c / p.Count, sr = g.Count == 0 ? 0 : (double)c / g.Count;
            f1Sum += sp + sr == 0 ? 0 : 2 * sp * sr / (sp + sr);
            n++;
        }
        return new SpoCounts(correct, predicted, gold, f1Sum, n);
    }
}
