using System.Text.Json;
using MinLora.Glm.Tokenization;

namespace MinLora.Glm.Tests;

/// <summary>
/// ChatGLM2/3's tokenizer against the reference tokenization_chatglm.py (v2) on the golden ChatGLM2-style BPE model
/// (identity normalization): ids, the <c>[gMASK] sop</c> model inputs, decoding, the specials after the pieces and the
/// chat prompts of the padded batch.
/// </summary>
public class ChatGlm2TokenizerTests
{
    private static readonly JsonElement Golden = JsonDocument.Parse(File.ReadAllText(Path.Combine(Fixtures.Dir("tokenizer"), "tok_golden.json"))).RootElement.GetProperty("v2").GetProperty("tiny_v2_bpe");

    private static ChatGlm2Tokenizer Tokenizer()
    {
        using var s = File.OpenRead(Path.Combine(Fixtures.Dir("tokenizer"), "tiny_v2_bpe.model"));
        return ChatGlm2Tokenizer.Create(s);
    }

    private static int[] Ints(JsonElement e) => e.EnumerateArray().Select(x => x.GetInt32()).ToArray();

    public static TheoryData<int> Cases => new(Enumerable.Range(0, Golden.GetProperty("cases").GetArrayLength()));

    [Theory]
    [MemberData(nameof(Cases))]
    public void MatchesTheReferenceTokenizer(int index)
    {
        var tok = Tokenizer();
        var c = Golden.GetProperty("cases")[index];
        var text = c.GetProperty("text").GetString()!;
        Assert.Equal(Ints(c.GetProperty("ids")), tok.EncodeToIds(text));
        Assert.Equal(Ints(c.GetProperty("model_input")), tok.EncodePrompt(text));
        Assert.Equal(c.GetProperty("decoded").GetString(), tok.Decode(Ints(c.GetProperty("ids"))));
        Assert.Equal(c.GetProperty("decoded").GetString(), tok.Decode(Ints(c.GetProperty("model_input"))));
        var pieces = c.GetProperty("pieces").EnumerateArray().Select(p => p.GetString()).ToList();
        Microsoft.ML.Tokenizers.Tokenizer t = tok;
        Assert.Equal(pieces, t.EncodeToTokens(text, out _).Select(x => x.Value));
    }

    [Fact]
    public void SpecialIds_VocabularyAndChatPrompts()
    {
        var tok = Tokenizer();
        var specials = Golden.GetProperty("special_ids");
        Assert.Equal(specials.GetProperty("[MASK]").GetInt32(), tok.MaskId);
        Assert.Equal(specials.GetProperty("[gMASK]").GetInt32(), tok.GmaskId);
        Assert.Equal(specials.GetProperty("[sMASK]").GetInt32(), tok.SmaskId);
        Assert.Equal(specials.GetProperty("sop").GetInt32(), tok.SopId);
        Assert.Equal(specials.GetProperty("eop").GetInt32(), tok.EopId);
        Assert.Equal(specials.GetProperty("<eos>").GetInt32(), tok.EosId);
        Assert.Equal(specials.GetProperty("<pad>").GetInt32(), tok.PadId);
        Assert.Equal(Golden.GetProperty("vocab_size").GetInt32(), tok.VocabSize - 4);   // ChatGLM2: 5 specials; ChatGLM3 adds 4 role tokens
        Assert.Equal("[gMASK]sop你好", tok.Decode(tok.EncodePrompt("你好"), skipSpecialTokens: false));
        var prompts = Golden.GetProperty("prompts").EnumerateArray().Select(p => p.GetString()!).ToList();
        var batch = Golden.GetProperty("padded_batch");
        for (int i = 0; i < prompts.Count; i++)
        {
            var expected = Ints(batch[i].GetProperty("input_ids")).SkipWhile(x => x == tok.PadId).ToArray();
            Assert.Equal(expected, tok.EncodePrompt(prompts[i]));
        }
    }
}

/// <summary>ChatGLM-6B's tokenizer on a BPE SentencePiece model (the golden tiny_bpe.model): the reference's ids, inputs and decoding.</summary>
public class GlmTokenizerBpeTests
{
    private static readonly JsonElement Golden = JsonDocument.Parse(File.ReadAllText(Path.Combine(Fixtures.Dir("tokenizer"), "tok_golden.json"))).RootElement.GetProperty("v1").GetProperty("tiny_bpe");

    public static TheoryData<int> Cases => new(Enumerable.Range(0, Golden.GetProperty("cases").GetArrayLength()));

    private static int[] Ints(JsonElement e) => e.EnumerateArray().Select(x => x.GetInt32()).ToArray();

    [Theory]
    [MemberData(nameof(Cases))]
    public void TinyBpe_MatchesTheReferenceTokenizer(int index)
    {
        using var s = File.OpenRead(Path.Combine(Fixtures.Dir("tokenizer"), "tiny_bpe.model"));
        var tok = GlmTokenizer.Create(s);
        var c = Golden.GetProperty("cases")[index];
        var text = c.GetProperty("text").GetString()!;
        Assert.Equal(Ints(c.GetProperty("ids")), tok.EncodeToIds(text));
        Assert.Equal(Ints(c.GetProperty("ids_no_dummy_prefix")), tok.EncodeToIds(text, addDummyPrefix: false));
        Assert.Equal(Ints(c.GetProperty("model_input")), tok.EncodePrompt(text));
        Assert.Equal(c.GetProperty("decoded").GetString(), tok.Decode(Ints(c.GetProperty("ids"))));
    }
}

/// <summary>Chat templates of ChatGLM2 (rounds from 1 with blank lines) and ChatGLM3 (role tokens), and chat on the golden v2 model.</summary>
public class ChatGlm2ChatTests
{
    private static ChatGlm2Tokenizer Tokenizer(GlmChatFormat format)
    {
        using var s = File.OpenRead(Path.Combine(Fixtures.Dir("tokenizer"), "tiny_v2_bpe.model"));
        return ChatGlm2Tokenizer.Create(s, format);
    }

    [Fact]
    public void ChatGlm2Rounds_AndChatGlm3RoleTokens()
    {
        var v2 = Tokenizer(GlmChatFormat.ChatGlm2);
        var golden = JsonDocument.Parse(File.ReadAllText(Path.Combine(Fixtures.Dir("tokenizer"), "tok_golden.json"))).RootElement.GetProperty("v2").GetProperty("tiny_v2_bpe");
        var first = golden.GetProperty("padded_batch")[0].GetProperty("input_ids").EnumerateArray().Select(x => x.GetInt32()).SkipWhile(x => x == v2.PadId).ToArray();
        Assert.Equal(first, v2.BuildChatInput("你好", null));
        var withHistory = v2.BuildChatInput("再见", new[] { new MinLora.Glm.Generation.ChatTurn("你好", "你好！") });
        Assert.Equal(v2.EncodePrompt("[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：再见\n\n答："), withHistory);
        Assert.Equal(new[] { v2.EosId }, v2.ChatStopIds);

        var v3 = Tokenizer(GlmChatFormat.ChatGlm3);
        var newline = v3.EncodeToIds("\n");
        var expected = new List<int> { v3.GmaskId, v3.SopId, v3.SystemId };
        expected.AddRange(newline);
        expected.AddRange(v3.EncodeToIds("Be brief."));
        expected.Add(v3.UserId);
        expected.AddRange(newline);
        expected.AddRange(v3.EncodeToIds("你好"));
        expected.Add(v3.AssistantId);
        Assert.Equal(expected, v3.BuildChatInput("你好", null, "Be brief."));
        Assert.Equal(new[] { v3.EosId, v3.UserId, v3.ObservationId }, v3.ChatStopIds);
        Assert.Equal(v3.MaskId + 6, v3.UserId);
    }

    [Fact]
    public void Chat_OnTheV2Model_GeneratesWhatGenerateDoes()
    {
        using var model = GlmCheckpoint.FromPretrained(Fixtures.Dir("v2")).Model;
        var tok = Tokenizer(GlmChatFormat.ChatGlm2);
        var options = new MinLora.Glm.Generation.GenerationOptions { DoSample = false, MaxNewTokens = 6 };
        var (response, history) = MinLora.Glm.Generation.GlmGeneration.Chat(model, tok, "你好", null, options);
        var ids = MinLora.Glm.Generation.GlmGeneration.Generate(model, new[] { tok.BuildChatInput("你好", null) }, options with { StopTokenIds = tok.ChatStopIds });
        Assert.Equal(MinLora.Glm.Generation.GlmGeneration.ProcessResponse(tok.Decode(ids[0].TokenIds)), response);
        Assert.Single(history);
    }
}
