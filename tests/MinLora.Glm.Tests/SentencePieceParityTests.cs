using System.Diagnostics;
using Microsoft.ML.Tokenizers;
using System.Text;
using MinLora.Glm.Tokenization;

namespace MinLora.Glm.Tests;

/// <summary>
/// MinLora's Unigram encoder against SentencePiece itself (Debian's <c>spm_encode</c>, which <c>.ci/run</c> installs):
/// more than 20,000 generated strings — single characters of every script in the vocabulary repeated 1–64 times, such
/// runs spliced into real sentences, random mixes of scripts, emoji, astral CJK, whitespace and newline runs — after
/// ChatGLM's preprocessing, on the repo's own Unigram fixture and, when it is beside the repository, on the real
/// ice_text.model. Zero differences are allowed.
/// </summary>
public class SentencePieceParityTests
{
    private static string? SpmEncode()
    {
        foreach (var dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':').Append("/usr/bin"))
        {
            var p = Path.Combine(dir, "spm_encode");
            if (File.Exists(p)) return p;
        }
        return null;
    }

    /// <summary>The generated inputs (deterministic), preprocessed as ChatGLM does, one per line.</summary>
    internal static List<string> Inputs(SentencePieceModel model, int seed)
    {
        var rng = new Random(seed);
        // Characters the vocabulary knows as single-character pieces (every script in it), plus some it does not.
        var chars = model.Pieces.Where(p => p.Type == PieceType.Normal)
            .Select(p => p.Piece.TrimStart('\u2581'))
            .Where(p => p.Length > 0 && (p.Length == 1 || (p.Length == 2 && char.IsSurrogatePair(p, 0))))
            .Distinct(StringComparer.Ordinal).OrderBy(p => p, StringComparer.Ordinal).ToList();
        var pool = chars.OrderBy(_ => rng.Next()).Take(400).ToList();
        pool.AddRange(new[] { "啊", "好", "b", ".", "a", "哈", "😀", "𠀀", "𪚥", "ｱ", "Ａ", "①", "ﬁ", "é", "e\u0301", "한", "ß", "ℌ", "\u00a0", "\u3000", "-", "…", "ー" });
        var sentences = new[]
        {
            "汽车发动机故障检测需要专业的诊断工具。", "The quick brown fox jumps over the lazy dog.", "你好，世界！Hello, world!",
            "def f(x):\n    return x * 2", "价格是 3.5 元/公斤，约合 $0.48。", "東京タワーは高さ333メートルです。", "Ünïcödé tèxt with àccents",
        };
        var extras = new[] { " ", "  ", "   ", "\n", "\n\n", "\t", "😀", "👋🏽", "𠀀𠀁", "\u3000", "\u200b", "ＡＢＣ", "１２３", "…", "«»", "\u2581", "<n>", "[gMASK]" };
        var lines = new List<string>();
        foreach (var c in pool)
        {
            foreach (var n in new[] { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16, 17, 20, 24, 31, 32, 33, 48, 63, 64 })
                lines.Add(string.Concat(Enumerable.Repeat(c, n)));
        }
        while (lines.Count < 14_000)
        {
            var s = sentences[rng.Next(sentences.Length)];
            int at = rng.Next(s.Length + 1);
            if (at > 0 && at < s.Length && char.IsLowSurrogate(s[at])) at--;
            var run = string.Concat(Enumerable.Repeat(pool[rng.Next(pool.Count)], rng.Next(1, 40)));
            lines.Add(s[..at] + run + s[at..]);
        }
        while (lines.Count < 22_000)
        {
            var sb = new StringBuilder();
            int parts = rng.Next(1, 12);
            for (int i = 0; i < parts; i++)
            {
                switch (rng.Next(4))
                {
                    case 0: sb.Append(pool[rng.Next(pool.Count)]); break;
                    case 1: sb.Append(extras[rng.Next(extras.Length)]); break;
                    case 2: sb.Append(sentences[rng.Next(sentences.Length)], 0, rng.Next(1, 8)); break;
                    default: sb.Append(char.ConvertFromUtf32(rng.Next(4) == 0 ? rng.Next(0x20000, 0x2A6DF) : rng.Next(0x4E00, 0x9FFF))); break;
                }
            }
            var text = sb.ToString();
            if (char.IsHighSurrogate(text[^1])) text = text[..^1];
            lines.Add(text);
        }
        // ChatGLM's preprocessing turns newlines, tabs and space runs into its symbols; the result is one line each.
        return lines.Select(GlmTokenizer.Preprocess).Where(l => l.Length > 0 && !l.Contains('\r', StringComparison.Ordinal)).ToList();
    }

    private static void Compare(string modelPath, int seed)
    {
        var spm = SpmEncode();
        Skip.If(spm is null, "spm_encode is not installed (apt-get install sentencepiece; .ci/run does it)");
        var model = SentencePieceModel.Parse(File.ReadAllBytes(modelPath));
        IPieceEncoder encoder = model.ModelType == 2 ? new BpeEncoder(model) : new UnigramEncoder(model);
        var inputs = Inputs(model, seed);
        Assert.True(inputs.Count >= 20_000, $"only {inputs.Count} inputs");
        var file = Path.GetTempFileName();
        try
        {
            File.WriteAllLines(file, inputs, new UTF8Encoding(false));
            var psi = new ProcessStartInfo(spm!) { RedirectStandardOutput = true, RedirectStandardError = true };
            psi.ArgumentList.Add("--model=" + modelPath);
            psi.ArgumentList.Add("--output_format=id");
            psi.ArgumentList.Add(file);
            using var p = Process.Start(psi)!;
            var stderr = p.StandardError.ReadToEndAsync();
            var expected = new List<string>();
            string? line;
            while ((line = p.StandardOutput.ReadLine()) is not null) expected.Add(line);
            p.WaitForExit();
            Assert.True(p.ExitCode == 0, "spm_encode failed: " + stderr.Result);
            Assert.Equal(inputs.Count, expected.Count);
            var differences = new List<string>();
            var ids = new List<int>();
            for (int i = 0; i < inputs.Count; i++)
            {
                ids.Clear();
                encoder.Encode(Encoding.UTF8.GetBytes(inputs[i]), ids, null);
                var ours = string.Join(' ', ids);
                if (ours != expected[i]) differences.Add($"{inputs[i]}: ours {ours} vs spm {expected[i]}");
            }
            Assert.True(differences.Count == 0, $"{differences.Count} of {inputs.Count} differ, e.g.\n{string.Join('\n', differences.Take(5))}");
        }
        finally
        {
            File.Delete(file);
        }
    }

    [SkippableFact]
    public void RepoFixture_EqualsSpmEncode() => Compare(Path.Combine(Fixtures.Dir("tokenizer"), "minlora_unigram.model"), 1);

    /// <summary>SentencePiece BPE (ChatGLM2/3's tokenizer.model type, identity normalization) and a v1-style BPE model.</summary>
    [SkippableTheory]
    [InlineData("tiny_v2_bpe.model")]
    [InlineData("tiny_bpe.model")]
    public void BpeFixtures_EqualSpmEncode(string name) => Compare(Path.Combine(Fixtures.Dir("tokenizer"), name), 3);

    [SkippableFact]
    public void RealIceTextModel_EqualsSpmEncode()
    {
        var path = SharedData.Find(Path.Combine("data", "chatglm-6b", "ice_text.model"));
        Skip.If(path is null, "the real ice_text.model is not beside the repo (../shared/data/chatglm-6b); its licence forbids committing it");
        Compare(path!, 2);
    }
}

/// <summary>
/// Each invalid UTF-16 code unit becomes one U+FFFD that normalization does not touch (a literal U+FFFD becomes a space
/// under NFKC, in SentencePiece too), so bad text is never dropped: with byte fallback, the pieces of EF BF BD.
/// </summary>
public class InvalidUtf16Tests
{
    [Fact]
    public void LoneAndReversedSurrogates_EncodeAsReplacementCharacters()
    {
        using var s = File.OpenRead(Path.Combine(Fixtures.Dir("tokenizer"), "minlora_unigram.model"));
        var tok = GlmTokenizer.Create(s);
        var fffd = new[] { tok.Model.IdOf("<0xEF>"), tok.Model.IdOf("<0xBF>"), tok.Model.IdOf("<0xBD>") };
        Assert.All(fffd, id => Assert.True(id >= 0));
        var lone = tok.EncodeToIds("\uDE00\uD83D", addDummyPrefix: false);
        Assert.Equal(fffd.Concat(fffd), lone);
        var inside = tok.EncodeToIds("a\uD800b");
        Assert.Equal(fffd, inside.Skip(inside.Count - 4).Take(3));
        // A literal U+FFFD is a space after the model's NFKC rules, exactly as in spm_encode ("x\uFFFDy" → ▁x ▁y).
        Assert.Equal(tok.EncodeToIds("a b"), tok.EncodeToIds("a\uFFFDb"));
    }
}

/// <summary>GlmTokenizer as a Microsoft.ML.Tokenizers <c>Tokenizer</c>: same ids through the base API, token ranges in the original text, counting and trimming, span decoding.</summary>
public class TokenizerSubclassTests
{
    private static GlmTokenizer Fixture()
    {
        using var s = File.OpenRead(Path.Combine(Fixtures.Dir("tokenizer"), "minlora_unigram.model"));
        return GlmTokenizer.Create(s);
    }

    /// <summary>The reference's preprocessing, literally (replacements of 80…2 spaces, longest first).</summary>
    private static string ReferencePreprocess(string text)
    {
        var sb = new StringBuilder(text.Replace("\n", "<n>", StringComparison.Ordinal).Replace("\t", "<|tab|>", StringComparison.Ordinal));
        for (int n = 80; n >= 2; n--) sb.Replace(new string(' ', n), $"<|blank_{n}|>");
        return sb.ToString();
    }

    [Fact]
    public void OnePassPreprocessing_EqualsTheReferencesReplacements()
    {
        var rng = new Random(8);
        for (int i = 0; i < 2000; i++)
        {
            var sb = new StringBuilder();
            for (int p = rng.Next(1, 8); p > 0; p--)
            {
                switch (rng.Next(4))
                {
                    case 0: sb.Append(' ', rng.Next(1, 200)); break;
                    case 1: sb.Append(rng.Next(2) == 0 ? '\n' : '\t'); break;
                    default: sb.Append("ab你好"[rng.Next(4)]); break;
                }
            }
            var text = sb.ToString();
            Assert.Equal(ReferencePreprocess(text), GlmTokenizer.Preprocess(text));
        }
    }

    [Fact]
    public void AsTokenizer_SameIds_RangesInTheOriginalText_CountingAndDecoding()
    {
        var tok = Fixture();
        Tokenizer t = tok;
        var text = "Hello world,  你好\n世界 😀 abc";
        Assert.Equal(tok.EncodeToIds(text), t.EncodeToIds(text));
        Assert.Equal(tok.EncodeToIds(text).Count, t.CountTokens(text));
        var tokens = t.EncodeToTokens(text, out _);
        Assert.Equal(tok.EncodeToIds(text), tokens.Select(x => x.Id));
        int previousEnd = 0;
        foreach (var x in tokens)
        {
            var (start, length) = x.Offset.GetOffsetAndLength(text.Length);
            Assert.True(start >= previousEnd - 1 && start + length <= text.Length, $"{x.Value} at {x.Offset}");
            previousEnd = Math.Max(previousEnd, start + length);
        }
        Assert.Equal(text.Length, previousEnd);
        // "Hello" is covered by the tokens that start at 0..4 (the dummy prefix maps to the first character).
        Assert.Contains(tokens, x => x.Offset.Start.Value == 0);
        Assert.Contains(tokens, x => text[x.Offset.Start.Value..x.Offset.End.Value] == "😀" || x.Offset.Start.Value == text.IndexOf("😀", StringComparison.Ordinal));

        // Trimming by token count: the ids of a prefix, and how many characters they cover.
        var firstThree = t.EncodeToIds(text, 3, out _, out int consumed);
        Assert.Equal(tok.EncodeToIds(text).Take(3), firstThree);
        Assert.True(consumed > 0 && consumed < text.Length);

        var ids = tok.EncodeToIds(text);
        Assert.Equal(tok.Decode(ids), t.Decode(ids));
        var big = new char[256];
        Assert.Equal(System.Buffers.OperationStatus.Done, t.Decode(ids, big, out int used, out int written));
        Assert.Equal(ids.Count, used);
        Assert.Equal(tok.Decode(ids), new string(big, 0, written));
        var small = new char[5];
        Assert.Equal(System.Buffers.OperationStatus.DestinationTooSmall, t.Decode(ids, small, out used, out written));
        Assert.True(used < ids.Count && written <= 5);
    }
}
