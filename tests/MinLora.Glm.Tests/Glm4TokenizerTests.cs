using System.Text;
using MinLora.Glm.Tokenization;

namespace MinLora.Glm.Tests;

/// <summary>
/// GLM-4's tokenizer on a tiny tiktoken ranks file made here (the 256 bytes, then "he", "ll", "llo", "hello"): byte-level
/// BPE merges by rank, GLM-4's pre-tokenizer, the specials after the ranks, the [gMASK] &lt;sop&gt; inputs, the
/// role-token chat template, lossless round trips, and the factory that picks each generation's tokenizer.
/// </summary>
public sealed class Glm4TokenizerTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "minlora-glm4-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, true);
    }

    private static byte[] Ranks()
    {
        var sb = new StringBuilder();
        for (int b = 0; b < 256; b++) sb.Append(Convert.ToBase64String(new[] { (byte)b })).Append(' ').Append(b).Append('\n');
        var merges = new[] { "he", "ll", "llo", "hello" };
        for (int i = 0; i < merges.Length; i++) sb.Append(Convert.ToBase64String(Encoding.UTF8.GetBytes(merges[i]))).Append(' ').Append(256 + i).Append('\n');
        return Encoding.ASCII.GetBytes(sb.ToString());
    }

    private static Glm4Tokenizer Tokenizer() => Glm4Tokenizer.Create(new MemoryStream(Ranks()));

    [Fact]
    public void MergesByRank_SpecialsAfterTheRanks_AndPromptInputs()
    {
        var tok = Tokenizer();
        Assert.Equal(260, tok.RankCount);
        Assert.Equal(274, tok.VocabSize);
        Assert.Equal(new[] { 259 }, tok.EncodeToIds("hello"));
        Assert.Equal(new[] { 259, 32, 259 }, tok.EncodeToIds("hello hello"));      // " hello" is one pre-token: ' ' + hello
        Assert.Equal(262, tok.SpecialId("[gMASK]"));
        Assert.Equal(264, tok.SpecialId("<sop>"));
        Assert.Equal(new[] { 262, 264, 259 }, tok.EncodePrompt("hello"));
        Assert.Equal("hello", tok.Decode(tok.EncodePrompt("hello"), skipSpecialTokens: true));
        Assert.Equal("[gMASK]<sop>hello", tok.Decode(tok.EncodePrompt("hello"), skipSpecialTokens: false));
    }

    [Theory]
    [InlineData("Hello, world!\n\n  indented\tline")]
    [InlineData("你好👋 汽车发动机 𠀀")]
    [InlineData("  leading and trailing  ")]
    [InlineData("")]
    public void RoundTrips_Losslessly(string text)
    {
        var tok = Tokenizer();
        Assert.Equal(text, tok.Decode(tok.EncodeToIds(text), skipSpecialTokens: true));
    }

    [Fact]
    public void ChatTemplate_RoleTokensAndStops()
    {
        var tok = Tokenizer();
        var expected = new List<int> { 262, 264, tok.SpecialId("<|user|>") };
        expected.AddRange(tok.EncodeToIds("\nhello"));
        expected.Add(tok.SpecialId("<|assistant|>"));
        Assert.Equal(expected, tok.BuildChatInput("hello", null));
        Assert.Equal(new[] { 10, 259 }, tok.EncodeToIds("\nhello"));
        Assert.Equal(new[] { 260, 267, 269 }, tok.ChatStopIds);
    }

    [Fact]
    public void Factory_PicksTheTokenizerOfEachGeneration()
    {
        Directory.CreateDirectory(_dir);
        File.WriteAllBytes(Path.Combine(_dir, "tokenizer.model"), Ranks());
        Assert.IsType<Glm4Tokenizer>(GlmTokenizers.FromPretrained(_dir));
        File.Copy(Path.Combine(Fixtures.Dir("tokenizer"), "tiny_v2_bpe.model"), Path.Combine(_dir, "tokenizer.model"), overwrite: true);
        Assert.IsType<ChatGlm2Tokenizer>(GlmTokenizers.FromPretrained(_dir));
        File.Copy(Path.Combine(Fixtures.Dir("tokenizer"), "tiny_unigram.model"), Path.Combine(_dir, "ice_text.model"));
        Assert.IsType<GlmTokenizer>(GlmTokenizers.FromPretrained(_dir));
        File.WriteAllText(Path.Combine(_dir, "tokenizer.model"), "not base64 at all 12\n");
        File.Delete(Path.Combine(_dir, "ice_text.model"));
        Assert.Throws<InvalidDataException>(() => GlmTokenizers.FromPretrained(_dir));
    }
}
