using MinLora.Glm.Data;
using MinLora.Glm.Tokenization;

namespace MinLora.Glm.Tests;

/// <summary>The library's generic supervised fine-tuning builder (the SPO sample builds on it).</summary>
public sealed class FineTuningDataTests
{
    private static GlmTokenizer Tok()
    {
        using var s = File.OpenRead(Path.Combine(Fixtures.Dir("tokenizer"), "minlora_unigram.model"));
        return GlmTokenizer.Create(s);
    }

    [Fact]
    public void SourceTargetPair_IsSourceGmaskSopTargetEop_WithLabelsFromSop_NoPromptByDefault()
    {
        var tok = Tok();
        var builder = new FineTuningDatasetBuilder(tok, new FineTuningOptions { MaxSourceLength = 8, MaxTargetLength = 3 });
        const string source = "发动机异响，经检查发现正时皮带松动。", target = "检查正时皮带并调整张紧度";
        var built = builder.Build(source, target);
        var s = tok.EncodeToIds(source);
        var t = tok.EncodeToIds(target);
        Assert.True(s.Count > 8 && t.Count > 3, "the fixture texts must exceed the budgets");
        var expected = s.Take(8).Append(tok.GmaskId).Append(tok.BosId).Concat(t.Take(3)).Append(tok.EosId).ToArray();
        Assert.Equal(expected, built.InputIds);
        Assert.Equal(Enumerable.Repeat(-100, 9).Concat(expected.Skip(9)), built.Labels);
        Assert.True(built.SourceTruncated);
        Assert.True(built.TargetTruncated);
        Assert.Equal(s.Take(8), builder.Source(source).Ids);

        var (all, sourcesCut, targetsCut) = builder.BuildAll([(source, target), ("短", "好")]);
        Assert.Equal((2, 1, 1), (all.Count, sourcesCut, targetsCut));

        var prompted = new FineTuningDatasetBuilder(tok, new FineTuningOptions { Prompt = "问：", MaxSourceLength = 20 });
        Assert.Equal(tok.EncodeToIds("问：").Concat(tok.EncodeToIds("短")), prompted.Source("短").Ids);
        Assert.Throws<ArgumentException>(() => new FineTuningDatasetBuilder(tok, new FineTuningOptions { Prompt = "一个很长很长的提示，超过预算", MaxSourceLength = 2 }));
        Assert.Throws<ArgumentOutOfRangeException>(() => new FineTuningDatasetBuilder(tok, new FineTuningOptions { MaxTargetLength = 0 }));
        Assert.Throws<ArgumentException>(() => FineTuningDatasetBuilder.Collate([], new GlmConfig()));
    }
}
