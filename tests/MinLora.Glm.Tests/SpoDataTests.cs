using MinLora.Samples.SpoExtraction;
using MinLora.Glm.Data;
using MinLora.Glm.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Tests;

public sealed class SpoDataTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "minlora-spo-" + Guid.NewGuid().ToString("N"));

    public SpoDataTests() => Directory.CreateDirectory(_dir);

    public void Dispose() => Directory.Delete(_dir, true);

    private static GlmTokenizer Tok()
    {
        using var s = File.OpenRead(Path.Combine(Fixtures.Dir("tokenizer"), "minlora_unigram.model"));
        return GlmTokenizer.Create(s);
    }

    [Fact]
    public void ReadsTheBooksFormat_AndDuIE_AndNamesBadLines()
    {
        var book = Path.Combine(_dir, "book.json");
        File.WriteAllText(book, "{\"text\": \"发动机水温高\", \"answer\": \"发动机_部件故障_水温高\\n风扇_部件故障_低速转动\"}\n\n{\"text\": \"t2\", \"answer\": \"\"}\n");
        var a = SpoData.ReadJsonLines(book);
        Assert.Equal(2, a.Count);
        Assert.Equal(new[] { new SpoTriple("发动机", "部件故障", "水温高"), new SpoTriple("风扇", "部件故障", "低速转动") }, SpoTriple.Parse(a[0].Answer));

        var duie = Path.Combine(_dir, "duie.json");
        File.WriteAllText(duie, "{\"text\": \"x\", \"spo_list\": [{\"predicate\": \"组成\", \"subject\": \"变速箱\", \"object\": {\"@value\": \"齿轮\"}}]}\n");
        Assert.Equal("变速箱_组成_齿轮", SpoData.ReadJsonLines(duie)[0].Answer);

        var bad = Path.Combine(_dir, "bad.json");
        File.WriteAllText(bad, "{\"text\": \"ok\", \"answer\": \"a_b_c\"}\n{\"nope\": 1}\n");
        Assert.Contains("line 2", Assert.Throws<InvalidDataException>(() => SpoData.ReadJsonLines(bad)).Message, StringComparison.Ordinal);
        Assert.Throws<FileNotFoundException>(() => SpoData.ReadJsonLines(Path.Combine(_dir, "none.json")));

        var roundTrip = Path.Combine(_dir, "rt.json");
        SpoData.WriteJsonLines(roundTrip, a);
        Assert.Equal(a, SpoData.ReadJsonLines(roundTrip));
    }

    [Fact]
    public void TrainingSequence_IsPromptTextGmaskSopAnswerEop_WithLabelsFromSop()
    {
        var tok = Tok();
        var builder = new SpoDatasetBuilder(tok, new SpoTrainingOptions { MaxSourceLength = 40, MaxTargetLength = 12 });
        var ex = new SpoExample("发动机异响，经检查发现正时皮带松动。", "发动机_部件故障_异响");
        var built = builder.Build(ex);
        var prompt = tok.EncodeToIds(SpoData.DefaultPrompt);
        var text = tok.EncodeToIds(ex.Text);
        var answer = tok.EncodeToIds(ex.Answer);
        var expected = prompt.Concat(text).Append(tok.GmaskId).Append(tok.BosId).Concat(answer.Take(12)).Append(tok.EosId).ToArray();
        Assert.Equal(expected, built.InputIds);
        int sop = Array.IndexOf(built.InputIds, tok.BosId);
        Assert.Equal(prompt.Count + text.Count + 1, sop);
        Assert.All(built.Labels.Take(sop), l => Assert.Equal(-100, l));
        Assert.Equal(built.InputIds.Skip(sop), built.Labels.Skip(sop));
        Assert.False(built.SourceTruncated);
        Assert.Equal(answer.Count > 12, built.TargetTruncated);

        var tight = new SpoDatasetBuilder(tok, new SpoTrainingOptions { MaxSourceLength = prompt.Count + 3, MaxTargetLength = 2 });
        var (all, srcCut, tgtCut) = tight.BuildAll(new[] { ex, ex });
        Assert.Equal(2, srcCut);
        Assert.Equal(2, tgtCut);
        Assert.Equal(prompt.Count + 3 + 2 + 2 + 1, all[0].InputIds.Length);
        Assert.Throws<ArgumentException>(() => new SpoDatasetBuilder(tok, new SpoTrainingOptions { MaxSourceLength = 2 }));
    }

    [Fact]
    public void Collate_LeftPadsIdsAndLabels_WithMasksAndPositions()
    {
        var tok = Tok();
        var config = GlmConfig.FromJson($$"""{"vocab_size":{{tok.VocabSize}},"hidden_size":32,"num_layers":1,"num_attention_heads":2,"bos_token_id":{{tok.BosId}},"eos_token_id":{{tok.EosId}},"mask_token_id":{{tok.MaskId}},"gmask_token_id":{{tok.GmaskId}},"pad_token_id":{{tok.PadId}}}""");
        var builder = new SpoDatasetBuilder(tok);
        var a = builder.Build(new SpoExample("短文本", "a_b_c"));
        var b = builder.Build(new SpoExample("一个长得多的文本，里面有更多的字。", "发动机_部件故障_异响\n风扇_部件故障_低速转动"));
        using var batch = SpoDatasetBuilder.Collate(new[] { a, b }, config);
        long len = Math.Max(a.InputIds.Length, b.InputIds.Length);
        Assert.Equal(new[] { 2L, len }, batch.InputIds.shape);
        int pad = (int)len - a.InputIds.Length;
        Assert.All(batch.InputIds[0].data<long>().ToArray().Take(pad), t => Assert.Equal(tok.PadId, t));
        Assert.All(batch.Labels[0].data<long>().ToArray().Take(pad), t => Assert.Equal(-100L, t));
        Assert.Equal(a.Labels.Select(x => (long)x), batch.Labels[0].data<long>().ToArray().Skip(pad));
        using var mask = GlmMasks.BuildAttentionMask(batch.InputIds, config);
        Assert.True(mask.eq(batch.AttentionMask).all().item<bool>());
    }

    [Fact]
    public void Evaluation_CountsOnlyThreeFieldLines()
    {
        var s = SpoEvaluation.Score(new[]
        {
            ("a_p_b\nc_p_d\nbroken line\nx_y", "a_p_b\ne_p_f"),      // 1 correct of 2 predicted, 2 gold
            ("", "g_p_h"),                                          // nothing predicted
        });
        Assert.Equal(0.5, s.Precision, 10);
        Assert.Equal(1.0 / 3, s.Recall, 10);
        Assert.Equal(2 * 0.5 * (1.0 / 3) / (0.5 + 1.0 / 3), s.F1, 10);
        Assert.Equal((0.5 + 0) / 2, s.SampleAveragedF1, 10);
        Assert.Equal(2, s.Samples);
    }

    [Fact]
    public void EvaluationCounts_OfParts_AddUpToTheWhole()
    {
        var pairs = new[]
        {
            ("a_p_b\nc_p_d\nbroken line", "a_p_b\ne_p_f"),
            ("", "g_p_h"),
            ("x_r_y\nx_r_y", "x_r_y"),
            ("u_v_w", "u_v_w\nq_q_q"),
        };
        var whole = SpoEvaluation.Count(pairs);
        // Per sample (correct/predicted/gold, F1): 1/2/2 0.5; 0/0/1 0; 1/1/1 (duplicates count once) 1; 1/1/2 2/3.
        Assert.Equal((3L, 4L, 6L, 4), (whole.Correct, whole.Predicted, whole.Gold, whole.Samples));
        Assert.Equal(0.5 + 0 + 1 + 2.0 / 3, whole.SampleF1Sum, 12);
        // Two "ranks" with strided halves: the summed counts give the same scores as the whole set.
        var parts = new[] { SpoEvaluation.Count(pairs.Where((_, i) => i % 2 == 0)), SpoEvaluation.Count(pairs.Where((_, i) => i % 2 == 1)) };
        var sum = new double[5];
        foreach (var part in parts) for (int k = 0; k < 5; k++) sum[k] += part.ToArray()[k];
        Assert.Equal(SpoEvaluation.Score(pairs), SpoCounts.FromArray(sum).ToScores());
        Assert.Throws<ArgumentException>(() => SpoCounts.FromArray(new double[4]));
    }
}
