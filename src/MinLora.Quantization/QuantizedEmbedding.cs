using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Quantization;

/// <summary>
/// A weight-only quantized embedding table (as ChatGLM's <c>quantization_embeddings</c> and chatglm.cpp store it):
/// the table [rows, dim] in a <see cref="QuantizationFormat"/>, each looked-up row dequantized on the fly. State dict
/// entries: <c>weight</c>, <c>weight_scale</c> (and <c>weight_zero</c> for <see cref="QuantizationFormat.Int4Grouped"/>).
/// The table is frozen (no gradient).
/// </summary>
public sealed class QuantizedEmbedding : nn.Module<Tensor, Tensor>
{
    private readonly Tensor weight;
    private readonly Tensor weight_scale;
    private readonly Tensor? weight_zero;

    private QuantizedEmbedding(QuantizedWeight q, long rows, long dim, ScalarType outputDtype) : base(nameof(QuantizedEmbedding))
    {
        Format = q.Format;
        GroupSize = q.GroupSize;
        Rows = rows;
        Dim = dim;
        OutputDtype = outputDtype;
        weight = q.Weight.DetachFromDisposeScope();
        weight_scale = q.Scale.DetachFromDisposeScope();
        weight_zero = q.Zero?.DetachFromDisposeScope();
        RegisterComponents();
    }

    /// <summary>The storage layout.</summary>
    public QuantizationFormat Format { get; }

    /// <summary>The group size along the embedding dimension (the dimension itself for per-row formats).</summary>
    public int GroupSize { get; }

    /// <summary>Number of rows (vocabulary size).</summary>
    public long Rows { get; }

    /// <summary>Embedding dimension.</summary>
    public long Dim { get; }

    /// <summary>Element type of the looked-up rows.</summary>
    public ScalarType OutputDtype { get; }

    /// <summary>The stored quantized table (the live buffers).</summary>
    public QuantizedWeight QuantizedWeight => new(Format, weight, weight_scale, weight_zero, GroupSize);

    /// <summary>Quantizes a float table [rows, dim].</summary>
    /// <param name="table">The float table.</param>
    /// <param name="format">The layout.</param>
    /// <param name="groupSize">Group size for <see cref="QuantizationFormat.Int4Grouped"/>.</param>
    /// <param name="outputDtype">Element type of looked-up rows (null: the table's).</param>
    /// <returns>The quantized embedding, on the table's device.</returns>
    /// <exception cref="ArgumentException">Not a floating 2-D table, or a dimension the format cannot pack.</exception>
    public static QuantizedEmbedding FromTable(Tensor table, QuantizationFormat format, int groupSize = 128, ScalarType? outputDtype = null)
    {
        ArgumentNullException.ThrowIfNull(table);
        var q = QuantizationMath.Quantize(table, format, groupSize);
        return new QuantizedEmbedding(q, table.shape[0], table.shape[1], outputDtype ?? table.dtype);
    }

    /// <summary>An uninitialised table of the stored shapes, to be filled from a checkpoint (no float table is allocated).</summary>
    /// <param name="rows">Number of rows.</param>
    /// <param name="dim">Embedding dimension (even for int4; a multiple of the group size for grouped int4).</param>
    /// <param name="format">The layout.</param>
    /// <param name="groupSize">Group size for <see cref="QuantizationFormat.Int4Grouped"/>.</param>
    /// <param name="outputDtype">Element type of looked-up rows.</param>
    /// <param name="device">Where to allocate (default CPU).</param>
    /// <returns>The skeleton.</returns>
    /// <exception cref="ArgumentException">Sizes the format cannot pack.</exception>
    public static QuantizedEmbedding Empty(long rows, long dim, QuantizationFormat format, int groupSize = 128, ScalarType outputDtype = ScalarType.Float32, Device? device = null)
    {
        // The stored shapes of a [dim → rows] quantized linear layer are exactly those of a [rows, dim] table.
        using var skeleton = QuantizedLinear.Empty(dim, rows, false, format, groupSize, outputDtype, device, new QuantizedLinearOptions { UseKernels = false });
        var s = skeleton.QuantizedWeight;
        var q = new QuantizedWeight(format, s.Weight.alias(), s.Scale.alias(), s.Zero?.alias(), s.GroupSize);
        return new QuantizedEmbedding(q, rows, dim, outputDtype);
    }

    /// <summary>Bytes of the stored state.</summary>
    /// <returns>The byte count.</returns>
    public long GetSizeInBytes() =>
        weight.numel() * weight.element_size() + weight_scale.numel() * weight_scale.element_size() +
        (weight_zero is null ? 0 : weight_zero.numel() * weight_zero.element_size());

    /// <summary>ids [...] (int64 or int32, each in [0, <see cref="Rows"/>)) → [..., dim] in <see cref="OutputDtype"/>.</summary>
    /// <param name="ids">Row indices.</param>
    /// <returns>The dequantized rows.</returns>
    /// <exception cref="ArgumentException">Non-integer ids, or ids out of range.</exception>
    public override Tensor forward(Tensor ids)
    {
        ArgumentNullException.ThrowIfNull(ids);
        if (ids.dtype is not (ScalarType.Int64 or ScalarType.Int32))
            throw new ArgumentException($"Embedding ids must be int64 or int32, got {ids.dtype}.", nameof(ids));
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var flat = ids.reshape(-1).to(ScalarType.Int64).to(weight.device);
        if (flat.numel() > 0)
        {
            long min = flat.min().item<long>(), max = flat.max().item<long>();
            if (min < 0 || max >= Rows)
                throw new ArgumentException($"Embedding ids must lie in [0, {Rows}), got [{min}, {max}].", nameof(ids));
        }
        var rows = new QuantizedWeight(Format, weight.index_select(0, flat), weight_scale.index_select(0, flat), weight_zero?.index_select(0, flat), GroupSize);
        var shape = ids.shape.Append(Dim).ToArray();
        return QuantizationMath.Dequantize(rows, OutputDtype).reshape(shape).MoveToOuterDisposeScope();
    }
}
