namespace MinLora.Glm.Tests;

/// <summary>Tiny model configurations for tests that build random models (special ids 290–293 in a 300-id vocabulary).</summary>
internal static class TinyGlm
{
    /// <summary>ChatGLM-6B's architecture (v1): head dimension hidden / heads.</summary>
    internal static GlmConfig V1(int hidden, int heads, int layers = 2, int maxSequenceLength = 1024) => new()
    {
        VocabSize = 300,
        HiddenSize = hidden,
        NumLayers = layers,
        NumAttentionHeads = heads,
        MaxSequenceLength = maxSequenceLength,
        BosTokenId = 290,
        EosTokenId = 291,
        MaskTokenId = 292,
        GmaskTokenId = 293,
        PadTokenId = 0,
    };

    /// <summary>ChatGLM2/3's architecture (v2): grouped keys and values, RMSNorm, SwiGLU, biased query/key/value.</summary>
    internal static GlmConfig V2(int hidden, int heads, int kvChannels, int groups, int layers = 2, int ffn = 96) => new()
    {
        VocabSize = 300,
        PaddedVocabSize = 300,
        HiddenSize = hidden,
        NumLayers = layers,
        NumAttentionHeads = heads,
        KvChannels = kvChannels,
        MultiQueryAttention = true,
        MultiQueryGroupNum = groups,
        FfnHiddenSize = ffn,
        Rmsnorm = true,
        AddQkvBias = true,
        EosTokenId = 2,
        PadTokenId = 0,
        BosTokenId = 290,
        GmaskTokenId = 293,
    };
}
