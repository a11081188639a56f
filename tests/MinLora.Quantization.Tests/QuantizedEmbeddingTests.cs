using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Quantization.Tests;

/// <summary>
/// The quantized embedding table: looked-up rows equal the rows of the whole table dequantized by the reference
/// (<see cref="QuantizationMath.Dequantize"/>), stay within the format's rounding of the float table, and bad ids are
/// refused by name.
/// </summary>
public class QuantizedEmbeddingTests
{
    [Theory]
    [InlineData(QuantizationFormat.Int8PerRow, ScalarType.Float32)]
    [InlineData(QuantizationFormat.Int4PerRowChatGlm, ScalarType.Float32)]
    [InlineData(QuantizationFormat.Int4Grouped, ScalarType.Float32)]
    [InlineData(QuantizationFormat.Int8PerRow, ScalarType.BFloat16)]
    [InlineData(QuantizationFormat.Int4PerRowChatGlm, ScalarType.BFloat16)]
    public void Lookup_EqualsDequantizedTableRows(QuantizationFormat format, ScalarType dtype)
    {
        manual_seed(5);
        using var table = randn(37, 256);
        using var embedding = QuantizedEmbedding.FromTable(table, format, 64, dtype);
        using var ids = tensor(new long[] { 3, 0, 36, 3, 17, 5 }, new long[] { 2, 3 });
        using var got = embedding.call(ids);
        Assert.Equal(new long[] { 2, 3, 256 }, got.shape);
        Assert.Equal(dtype, got.dtype);
        using var full = QuantizationMath.Dequantize(embedding.QuantizedWeight, dtype);
        using var expected = full.index_select(0, ids.reshape(-1)).reshape(2, 3, 256);
        Assert.Equal(0.0, (got.to(ScalarType.Float64) - expected.to(ScalarType.Float64)).abs().max().item<double>());

        // Against the float table: per-row int8 rounds to half a step of max|row|/127, int4 of max|row|/7 (fp16 scales: ×1.001; grouped
        // int4: of its group's range/15, at most the row's 2·max/15 · (1 + 1/128)); bf16 output adds 2⁻⁸ relative.
        var rows = table.index_select(0, ids.reshape(-1)).reshape(2, 3, 256).to(ScalarType.Float64);
        var rowMax = rows.abs().amax(new long[] { 2 }, keepdim: true);
        double step = format == QuantizationFormat.Int8PerRow ? 1.0 / 127 : format == QuantizationFormat.Int4PerRowChatGlm ? 1.0 / 7 : 2.0 / 15 * (1 + 1.0 / 128);
        var bound = rowMax * (step / 2) * 1.001 + (dtype == ScalarType.BFloat16 ? rows.abs() * Math.Pow(2, -8) + rowMax * Math.Pow(2, -8) : 0);
        var excess = ((got.to(ScalarType.Float64) - rows).abs() - bound).max().item<double>();
        Assert.True(excess <= 0, $"lookup exceeds the quantization bound by {excess}");
    }

    [Fact]
    public void StoredSize_IsTheFormatsAndEmptyHasTheStoredShapes()
    {
        using var int4 = QuantizedEmbedding.Empty(1000, 64, QuantizationFormat.Int4PerRowChatGlm, outputDtype: ScalarType.BFloat16);
        Assert.Equal(1000L * 32 + 1000 * 2, int4.GetSizeInBytes());   // packed nibbles + fp16 row scales
        Assert.Equal(new[] { "weight", "weight_scale" }, int4.state_dict().Keys.OrderBy(k => k, StringComparer.Ordinal));
        using var int8 = QuantizedEmbedding.Empty(10, 64, QuantizationFormat.Int8PerRow);
        Assert.Equal(new long[] { 10, 64 }, int8.QuantizedWeight.Weight.shape);
        Assert.Throws<ArgumentException>(() => QuantizedEmbedding.Empty(10, 63, QuantizationFormat.Int4PerRowChatGlm));
    }

    [Fact]
    public void BadIds_AreRefusedByName()
    {
        using var embedding = QuantizedEmbedding.FromTable(randn(8, 16), QuantizationFormat.Int8PerRow);
        Assert.Contains("[0, 8)", Assert.Throws<ArgumentException>(() => embedding.call(tensor(new long[] { 1, 8 }))).Message, StringComparison.Ordinal);
        Assert.Contains("[0, 8)", Assert.Throws<ArgumentException>(() => embedding.call(tensor(new long[] { -1 }))).Message, StringComparison.Ordinal);
        Assert.Contains("int64", Assert.Throws<ArgumentException>(() => embedding.call(tensor(new float[] { 1 }))).Message, StringComparison.Ordinal);
        using var empty = embedding.call(zeros(new long[] { 0 }, dtype: ScalarType.Int64));
        Assert.Equal(new long[] { 0, 16 }, empty.shape);
    }
}
