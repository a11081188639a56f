using MinLora.Glm.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Glm.Tests;

/// <summary>
/// ChatGLM-6B's one-position rotary and cache write in one managed pass, against the libtorch ops it replaces
/// (<c>x.mul(cos).add(rotate_half(x).mul(sin))</c> on each 64-dim half, two concatenations, two cache copies): the
/// same bf16 roundings in the same order, so bit for bit.
/// </summary>
public class DecodeRotaryTests
{
    [SkippableTheory]
    [InlineData(1, 32, 5, 0)]
    [InlineData(2, 3, 9, 7)]    // two sequences, the last cache position
    public void Rotate_EqualsTheLibtorchOps(int batch, int heads, int capacity, int offset)
    {
        Skip.IfNot(System.Runtime.Intrinsics.X86.Avx512F.IsSupported, "needs AVX-512 F (elsewhere the libtorch path runs)");
        manual_seed(401 + batch);
        // Magnitudes spread over many binades, so that products round in every way; NaN in one head.
        using var mixed = randn(1, batch, heads, 384).mul(exp(randn(1, batch, heads, 384).mul(3))).to(ScalarType.BFloat16);
        mixed[0, batch - 1, heads - 1, 5] = tensor(float.NaN).to(ScalarType.BFloat16);
        mixed[0, batch - 1, heads - 1, 128 + 40] = tensor(float.NaN).to(ScalarType.BFloat16);
        Tensor Table() => randn(1, batch, 1, 64).to(ScalarType.BFloat16);
        var angles = new RotaryAngles(Table(), Table(), Table(), Table());
        using var keys = full(new long[] { batch, heads, capacity, 128 }, 7f, dtype: ScalarType.BFloat16);
        using var values = full(new long[] { batch, heads, capacity, 128 }, 7f, dtype: ScalarType.BFloat16);
        using var projection = mixed.view(1, batch, heads * 384);   // the fused projection the model hands over
        Assert.True(DecodeRotary.Applies(projection, heads, angles, keys, values, offset));

        using var query = DecodeRotary.Rotate(projection, heads, angles, keys, values, offset);

        var q = mixed.narrow(3, 0, 128);
        var k = mixed.narrow(3, 128, 128);
        var (q1, k1) = GlmSelfAttention.Rotate(q.narrow(3, 0, 64), k.narrow(3, 0, 64), angles.CosPosition, angles.SinPosition);
        var (q2, k2) = GlmSelfAttention.Rotate(q.narrow(3, 64, 64), k.narrow(3, 64, 64), angles.CosBlock, angles.SinBlock);
        using var expectedQuery = cat(new[] { q1, q2 }, 3);
        using var expectedKey = cat(new[] { k1, k2 }, 3).permute(1, 2, 0, 3);   // [b, heads, 1, 128]
        using var expectedValue = mixed.narrow(3, 256, 128).permute(1, 2, 0, 3);
        AssertWritten(query, expectedQuery, expectedKey, expectedValue, keys, values, offset);
    }

    /// <summary>ChatGLM2/3 and GLM-4: grouped keys, interleaved pairs over the first r dimensions, the rest passed on.</summary>
    [SkippableTheory]
    [InlineData(1, 32, 2, 32, 6, 0)]    // ChatGLM2/3-6B: 32 heads, 2 groups, 64 rotated dimensions
    [InlineData(2, 4, 4, 64, 3, 2)]     // no grouping, every dimension rotated, two sequences, the last position
    [InlineData(1, 6, 3, 8, 4, 1)]      // 16 rotated dimensions
    public void RotateV2_EqualsTheLibtorchOps(int batch, int heads, int groups, int pairs, int capacity, int offset)
    {
        Skip.IfNot(System.Runtime.Intrinsics.X86.Avx512F.IsSupported, "needs AVX-512 F (elsewhere the libtorch path runs)");
        manual_seed(402 + pairs);
        long width = (heads + 2L * groups) * 128;
        using var mixed = randn(1, batch, width).mul(exp(randn(1, batch, width).mul(3))).to(ScalarType.BFloat16);
        mixed[0, batch - 1, 3] = tensor(float.NaN).to(ScalarType.BFloat16);
        using var angles = randn(1, batch, pairs, 2).to(ScalarType.BFloat16);
        using var keys = full(new long[] { batch, groups, capacity, 128 }, 7f, dtype: ScalarType.BFloat16);
        using var values = full(new long[] { batch, groups, capacity, 128 }, 7f, dtype: ScalarType.BFloat16);
        Assert.True(DecodeRotary.AppliesV2(mixed, angles, keys, values, offset, heads, groups));

        using var query = DecodeRotary.RotateV2(mixed, angles, keys, values, offset, heads, groups);

        long qSize = heads * 128L, kvSize = groups * 128L;
        using var expectedQuery = V2Rotary.Apply(mixed.narrow(-1, 0, qSize).view(1, batch, heads, 128), angles);
        using var expectedKey = V2Rotary.Apply(mixed.narrow(-1, qSize, kvSize).view(1, batch, groups, 128), angles).permute(1, 2, 0, 3);
        using var expectedValue = mixed.narrow(-1, qSize + kvSize, kvSize).view(1, batch, groups, 128).permute(1, 2, 0, 3);
        AssertWritten(query, expectedQuery, expectedKey, expectedValue, keys, values, offset);
        using var odd = randn(1, batch, 4, 2).to(ScalarType.BFloat16);   // 8 rotated dimensions: not a whole vector
        Assert.False(DecodeRotary.AppliesV2(mixed, odd, keys, values, offset, heads, groups));
    }

    [Fact]
    public void Applies_RefusesWhatItCannotRead()
    {
        using var projection = zeros(new long[] { 1, 1, 2 * 384 }, dtype: ScalarType.BFloat16);
        Tensor Table() => zeros(new long[] { 1, 1, 1, 64 }, dtype: ScalarType.BFloat16);
        var angles = new RotaryAngles(Table(), Table(), Table(), Table());
        using var keys = zeros(new long[] { 1, 2, 4, 128 }, dtype: ScalarType.BFloat16);
        using var values = zeros(new long[] { 1, 2, 4, 128 }, dtype: ScalarType.BFloat16);
        Assert.True(DecodeRotary.Applies(projection, 2, angles, keys, values, 0));                           // the control
        Assert.False(DecodeRotary.Applies(projection, 2, angles, keys, values, 4));                          // no room
        Assert.False(DecodeRotary.Applies(projection.to(ScalarType.Float32), 2, angles, keys, values, 0));   // type
        using var two = zeros(new long[] { 2, 1, 2 * 384 }, dtype: ScalarType.BFloat16);
        Assert.False(DecodeRotary.Applies(two, 2, angles, keys, values, 0));                                 // two positions
        using var wide = zeros(new long[] { 1, 1, 2 * 3 * 64 }, dtype: ScalarType.BFloat16);
        Assert.False(DecodeRotary.Applies(wide, 2, angles, keys, values, 0));                                // 64-dim heads
        Assert.False(DecodeRotary.Applies(projection, 1, angles, keys, values, 0));                          // heads ≠ the cache's
        using var fourD = zeros(new long[] { 1, 1, 2, 384 }, dtype: ScalarType.BFloat16);
        Assert.False(DecodeRotary.Applies(fourD, 2, angles, keys, values, 0));                               // not the projection
        using var twice = zeros(new long[] { 1, 1, 2 * 384, 2 }, dtype: ScalarType.BFloat16);
        using var strided = twice.select(3, 0);                                                              // [1, 1, 768], stride 2
        Assert.False(strided.is_contiguous());
        Assert.False(DecodeRotary.Applies(strided, 2, angles, keys, values, 0));                             // strided
        using var keys2 = zeros(new long[] { 2, 2, 4, 128 }, dtype: ScalarType.BFloat16);
        using var values2 = zeros(new long[] { 2, 2, 4, 128 }, dtype: ScalarType.BFloat16);
        Assert.False(DecodeRotary.Applies(projection, 2, angles, keys2, values2, 0));                        // batch ≠ the cache's
    }

    /// <summary>
    /// The query as expected, the key and value at <paramref name="offset"/> of the cache buffers (filled with 7
    /// before the call) as expected, every other position untouched, and the NaN planted in the query propagated.
    /// </summary>
    private static void AssertWritten(Tensor query, Tensor expectedQuery, Tensor expectedKey, Tensor expectedValue, Tensor keys, Tensor values, long offset)
    {
        Assert.Equal(expectedQuery.shape, query.shape);
        SameBits(expectedQuery, query, "query");
        SameBits(expectedKey, keys.narrow(2, offset, 1), "key");
        SameBits(expectedValue, values.narrow(2, offset, 1), "value");
        Assert.True(query.isnan().any().item<bool>(), "the NaN in the query reaches its output");
        using var untouched = ones(keys.shape[2], dtype: ScalarType.Bool);
        untouched[offset] = tensor(false);
        using var others = nonzero(untouched).flatten();
        Assert.True(keys.index_select(2, others).eq(7).all().item<bool>(), "a key was written outside its position");
        Assert.True(values.index_select(2, others).eq(7).all().item<bool>(), "a value was written outside its position");
    }

    /// <summary>Equal bf16 bit patterns, except that a NaN need only be a NaN.</summary>
    private static void SameBits(Tensor expected, Tensor actual, string what)
    {
        Assert.Equal(expected.shape, actual.shape);
        var e = expected.contiguous().data<BFloat16>().ToArray();
        var a = actual.contiguous().data<BFloat16>().ToArray();
        for (int i = 0; i < e.Length; i++)
        {
            if (float.IsNaN((float)e[i])) Assert.True(float.IsNaN((float)a[i]), $"{what}[{i}]: NaN expected, got {(float)a[i]}");
            else Assert.True(BitConverter.SingleToUInt32Bits((float)e[i]) == BitConverter.SingleToUInt32Bits((float)a[i]), $"{what}[{i}]: {(float)e[i]} expected, got {(float)a[i]}");
        }
    }
}
