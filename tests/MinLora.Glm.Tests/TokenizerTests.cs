using System.Text.Json;
using MinLora.Glm.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Tests;

/// <summary>
/// The tokenizer against the reference tokenization_chatglm.py: on a small Unigram model made with Debian's spm_train
/// with ChatGLM's user-defined symbols (golden ids from the reference code), and on the real ice_text.model when it is
/// beside the repository (its licence forbids committing it).
/// </summary>
public class TokenizerTests
{
    private static readonly JsonElement Golden = JsonDocument.Parse(File.ReadAllText(Path.Combine(Fixtures.Dir("tokenizer"), "tok_golden.json"))).RootElement.GetProperty("v1").GetProperty("tiny_unigram");

    private static GlmTokenizer Tiny()
    {
        using var s = File.OpenRead(Path.Combine(Fixtures.Dir("tokenizer"), "tiny_unigram.model"));
        return GlmTokenizer.Create(s);
    }

    private static int[] Ints(JsonElement e) => e.EnumerateArray().Select(x => x.GetInt32()).ToArray();

    public static TheoryData<int> Cases => new(Enumerable.Range(0, Golden.GetProperty("cases").GetArrayLength()));

    [Theory]
    [MemberData(nameof(Cases))]
    public void TinyUnigram_MatchesTheReferenceTokenizer(int index)
    {
        var tok = Tiny();
        var c = Golden.GetProperty("cases")[index];
        var text = c.GetProperty("text").GetString()!;
        Assert.Equal(c.GetProperty("preprocessed").GetString(), GlmTokenizer.Preprocess(text));
        Assert.Equal(Ints(c.GetProperty("ids")), tok.EncodeToIds(text));
        Assert.Equal(Ints(c.GetProperty("ids_no_dummy_prefix")), tok.EncodeToIds(text, addDummyPrefix: false));
        Assert.Equal(Ints(c.GetProperty("model_input")), tok.EncodePrompt(text));
        Assert.Equal(c.GetProperty("decoded").GetString(), tok.Decode(Ints(c.GetProperty("ids"))));
        Assert.Equal(c.GetProperty("decoded").GetString(), tok.Decode(Ints(c.GetProperty("model_input"))));
        // Pieces (the reference's tokenize shows an unknown span's surface text, we show <unk> for its id).
        var ids = tok.EncodeToIds(text);
        var pieces = c.GetProperty("pieces").EnumerateArray().Select(p => p.GetString()).ToList();
        Assert.Equal(pieces.Count, ids.Count);
        for (int i = 0; i < ids.Count; i++)
        {
            if (ids[i] != tok.UnkId) Assert.Equal(pieces[i], tok.IdToPiece(ids[i]));
        }
    }

    [Fact]
    public void TinyUnigram_SpecialIds_TrainingPair_AndPaddedBatch()
    {
        var tok = Tiny();
        var special = Golden.GetProperty("special_ids");
        Assert.Equal(special.GetProperty("[MASK]").GetInt32(), tok.MaskId);
        Assert.Equal(special.GetProperty("[gMASK]").GetInt32(), tok.GmaskId);
        Assert.Equal(special.GetProperty("<sop>").GetInt32(), tok.BosId);
        Assert.Equal(special.GetProperty("<eop>").GetInt32(), tok.EosId);
        Assert.Equal(special.GetProperty("<pad>").GetInt32(), tok.PadId);
        Assert.Equal(special.GetProperty("<n>").GetInt32(), tok.NewlineId);

        var train = Golden.GetProperty("train_example");
        Assert.Equal(Ints(train.GetProperty("input_ids")), tok.BuildInputs(Ints(train.GetProperty("prompt_ids")), Ints(train.GetProperty("answer_ids"))));

        var config = GlmConfig.FromFile(Path.Combine(Fixtures.Dir("v1"), "config.json"));
        var padded = Golden.GetProperty("padded_batch");
        var sequences = padded.EnumerateArray().Select(p => (IReadOnlyList<int>)Ints(p.GetProperty("input_ids")).Where(i => i != tok.PadId).ToArray()).ToList();
        using var batch = tok.EncodeBatch(sequences, config);
        for (int r = 0; r < sequences.Count; r++)
        {
            var p = padded[r];
            Assert.Equal(Ints(p.GetProperty("input_ids")).Select(i => (long)i), batch.InputIds[r].data<long>().ToArray());
            var mask = p.GetProperty("attention_mask")[0].EnumerateArray().SelectMany(row => row.EnumerateArray().Select(x => x.GetBoolean())).ToArray();
            Assert.Equal(mask, batch.AttentionMask[r][0].data<bool>().ToArray());
            var pos = p.GetProperty("position_ids").EnumerateArray().SelectMany(row => row.EnumerateArray().Select(x => x.GetInt64())).ToArray();
            Assert.Equal(pos, batch.PositionIds[r].data<long>().ToArray());
        }
    }

    private static readonly JsonElement Ours = JsonDocument.Parse(File.ReadAllText(Path.Combine(Fixtures.Dir("tokenizer"), "minlora_ids.json"))).RootElement;

    public static TheoryData<int> OurCases => new(Enumerable.Range(0, Ours.GetProperty("cases").GetArrayLength()));

    /// <summary>
    /// The repo's own Unigram model (tools/tokenizer/make_fixture.py: Debian's spm_train with ChatGLM's trainer settings,
    /// byte fallback included) against Python sentencepiece's ids: Chinese, English, code, emoji (byte fallback),
    /// whitespace runs, unseen characters, empty strings.
    /// </summary>
    [Theory]
    [MemberData(nameof(OurCases))]
    public void RepoUnigramModel_MatchesPythonSentencePiece(int index)
    {
        using var s = File.OpenRead(Path.Combine(Fixtures.Dir("tokenizer"), "minlora_unigram.model"));
        var tok = GlmTokenizer.Create(s);
        var c = Ours.GetProperty("cases")[index];
        var text = c.GetProperty("text").GetString()!;
        Assert.Equal(c.GetProperty("preprocessed").GetString(), GlmTokenizer.Preprocess(text));
        Assert.Equal(Ints(c.GetProperty("ids")), tok.EncodeToIds(text));
        Assert.Equal(Ints(c.GetProperty("ids_no_dummy_prefix")), tok.EncodeToIds(text, addDummyPrefix: false));
        Assert.Equal(GlmTokenizer.Postprocess(c.GetProperty("decoded").GetString()!), tok.Decode(Ints(c.GetProperty("ids"))));
        var special = Ours.GetProperty("special_ids");
        Assert.Equal(special.GetProperty("[gMASK]").GetInt32(), tok.GmaskId);
        Assert.Equal(special.GetProperty("<sop>").GetInt32(), tok.BosId);
        Assert.Equal(special.GetProperty("<eop>").GetInt32(), tok.EosId);
    }

    [Fact]
    public void Preprocess_AndPostprocess_AreInverse_ForLongSpaceRuns()
    {
        var text = "a" + new string(' ', 83) + "b\t\nc  d";
        var pre = GlmTokenizer.Preprocess(text);
        Assert.Equal("a<|blank_80|><|blank_3|>b<|tab|><n>c<|blank_2|>d", pre);
        Assert.Equal(text, GlmTokenizer.Postprocess(pre));
    }

    [Fact]
    public void NotAChatGlmModel_IsRejectedClearly()
    {
        Assert.Throws<InvalidDataException>(() => GlmTokenizer.Create(new MemoryStream(new byte[] { 1, 2, 3 })));
        Assert.Throws<FileNotFoundException>(() => GlmTokenizer.FromPretrained(Path.GetTempPath()));
    }

    private static GlmTokenizer? Real()
    {
        var path = SharedData.Find(Path.Combine("data", "chatglm-6b", "ice_text.model"));
        return path is null ? null : GlmTokenizer.FromPretrained(Path.GetDirectoryName(path)!);
    }

    [SkippableFact]
    public void RealIceText_PublishedIds()
    {
        var tok = Real();
        Skip.If(tok is null, "the real ice_text.model is not beside the repo (../shared/data/chatglm-6b); its licence forbids committing it");
        Assert.Equal(130344, tok!.Model.Pieces.Count);
        Assert.Equal(new[] { 5, 74874, 130001, 130004 }, tok.EncodePrompt("你好"));
        Assert.Equal(new[] { 1616, 594, 125936, 4, 130011, 2274, 89, 7283, 398, 125686, 130008, 61, 25672, 130001, 130004 },
            tok.EncodePrompt("def main():\n    print('hello world')\t# greeting"));
        const string chat = "[Round 0]\n问：你好\n答：你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你，欢迎问我任何问题。\n[Round 1]\n问：晚上睡不着应该怎么办\n答：";
        var ids = tok.EncodePrompt(chat);
        Assert.Equal(54, ids.Count);
        Assert.Equal(new[] { 53, 6945, 5, 8, 42, 4, 64286, 12, 74874, 4 }, ids.Take(10));
        Assert.Equal(new[] { 67342, 12, 130001, 130004 }, ids.Skip(50));
        // 👋 = F0 9F 91 8B as byte-fallback pieces 130088 + byte (Microsoft.ML.Tokenizers numbers them from the last piece: corrected).
        var wave = new[] { 130328, 130247, 130233, 130227 };
        Assert.Contains(Enumerable.Range(0, ids.Count - 3), i => ids.Skip(i).Take(4).SequenceEqual(wave));
        // ice_text.model normalises with nmt_nfkc (full-width "：！，" become ASCII), so decoding gives the NFKC text.
        Assert.Equal(chat.Normalize(System.Text.NormalizationForm.FormKC), tok.Decode(ids));
        Assert.Equal("def main():\n    print('hello world')\t# greeting", tok.Decode(tok.EncodeToIds("def main():\n    print('hello world')\t# greeting")));
    }
}
