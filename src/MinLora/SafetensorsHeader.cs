using System.Text.Json;

namespace MinLora;

/// <summary>One tensor entry of a safetensors header.</summary>
/// <param name="Name">The key.</param>
/// <param name="Dtype">The safetensors dtype name (e.g. <c>F32</c>, <c>BF16</c>, <c>I8</c>).</param>
/// <param name="Shape">The shape.</param>
/// <param name="Begin">Start of the data, relative to the data section.</param>
/// <param name="End">End of the data (exclusive), relative to the data section.</param>
public sealed record SafetensorsEntry(string Name, string Dtype, IReadOnlyList<long> Shape, long Begin, long End);

/// <summary>
/// Reads and checks the header of a safetensors file without reading its data: header length within the file,
/// valid JSON, known dtypes, non-negative shapes whose byte size matches each entry's range, every range inside the
/// file and no two ranges overlapping. Loaders run it before allocating anything, so a truncated, corrupt or
/// hostile file is refused with one exception type naming the file and the key.
/// </summary>
public static class SafetensorsHeader
{
    /// <summary>The largest header accepted (the format's own limit is 100 MB).</summary>
    public const long MaxHeaderBytes = 100_000_000;

    private static readonly System.Text.UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    private static readonly Dictionary<string, int> ElementBytes = new(StringComparer.Ordinal)
    {
        ["BOOL"] = 1,
        ["U8"] = 1,
        ["I8"] = 1,
        ["F8_E4M3"] = 1,
        ["F8_E5M2"] = 1,
        ["I16"] = 2,
        ["U16"] = 2,
        ["F16"] = 2,
        ["BF16"] = 2,
        ["I32"] = 4,
        ["U32"] = 4,
        ["F32"] = 4,
        ["I64"] = 8,
        ["U64"] = 8,
        ["F64"] = 8,
    };

    /// <summary>Reads and checks the header of <paramref name="path"/>.</summary>
    /// <param name="path">A .safetensors file.</param>
    /// <returns>The entries, in file order of their data.</returns>
    /// <exception cref="FileNotFoundException">No such file.</exception>
    /// <exception cref="InvalidDataException">The header is malformed or inconsistent with the file (message names the file and key).</exception>
    public static IReadOnlyList<SafetensorsEntry> Read(string path)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(path);
        if (!File.Exists(path)) throw new FileNotFoundException($"'{path}' does not exist.", path);
        using var stream = File.OpenRead(path);
        long fileLength = stream.Length;
        if (fileLength < 8) throw new InvalidDataException($"{path}: {fileLength} bytes, too short for a safetensors file (8-byte header length).");
        Span<byte> lengthBytes = stackalloc byte[8];
        stream.ReadExactly(lengthBytes);
        ulong headerLength = BitConverter.ToUInt64(lengthBytes);
        if (!BitConverter.IsLittleEndian) headerLength = System.Buffers.Binary.BinaryPrimitives.ReverseEndianness(headerLength);
        if (headerLength < 2 || headerLength > MaxHeaderBytes || (long)headerLength > fileLength - 8)
            throw new InvalidDataException($"{path}: header length {headerLength} does not fit the file ({fileLength} bytes): not a safetensors file, or truncated.");
        var header = new byte[headerLength];
        stream.ReadExactly(header);
        long dataLength = fileLength - 8 - (long)headerLength;

        JsonDocument doc;
        try
        {
            _ = StrictUtf8.GetCharCount(header); // names must be text: invalid UTF-8 would surface later as a raw error
            doc = JsonDocument.Parse(header);
        }
        catch (System.Text.DecoderFallbackException ex)
        {
            throw new InvalidDataException($"{path}: the header is not valid UTF-8 text ({ex.Message}).", ex);
        }
        catch (JsonException ex)
        {
            throw new InvalidDataException($"{path}: the header is not valid JSON ({ex.Message}).", ex);
        }
        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"{path}: the header is not a JSON object.");
            var entries = new List<SafetensorsEntry>();
            foreach (var property in doc.RootElement.EnumerateObject())
            {
                if (property.Name == "__metadata__") continue;
                entries.Add(ReadEntry(path, property, dataLength));
            }
            entries.Sort((a, b) => a.Begin != b.Begin ? a.Begin.CompareTo(b.Begin) : a.End.CompareTo(b.End));
            // Against the furthest end so far among non-empty entries (an empty entry in between must not hide an overlap).
            SafetensorsEntry? furthest = null;
            foreach (var current in entries)
            {
                if (current.End == current.Begin) continue;
                if (furthest is not null && current.Begin < furthest.End)
                    throw new InvalidDataException($"{path}: the data of '{current.Name}' [{current.Begin}, {current.End}) overlaps '{furthest.Name}' [{furthest.Begin}, {furthest.End}).");
                if (furthest is null || current.End > furthest.End) furthest = current;
            }
            return entries;
        }
    }

    private static SafetensorsEntry ReadEntry(string path, JsonProperty property, long dataLength)
    {
        var name = property.Name;
        var e = property.Value;
        if (e.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"{path}: entry '{name}' is not an object.");
        if (!e.TryGetProperty("dtype", out var dtypeElement) || dtypeElement.ValueKind != JsonValueKind.String)
            throw new InvalidDataException($"{path}: entry '{name}' has no dtype string.");
        var dtype = dtypeElement.GetString()!;
        if (!ElementBytes.TryGetValue(dtype, out int elementBytes)) throw new InvalidDataException($"{path}: entry '{name}' has an unknown dtype '{dtype}'.");
        if (!e.TryGetProperty("shape", out var shapeElement) || shapeElement.ValueKind != JsonValueKind.Array)
            throw new InvalidDataException($"{path}: entry '{name}' has no shape array.");
        var shape = new List<long>();
        long count = 1;
        foreach (var d in shapeElement.EnumerateArray())
        {
            if (d.ValueKind != JsonValueKind.Number || !d.TryGetInt64(out long size) || size < 0)
                throw new InvalidDataException($"{path}: entry '{name}' has a bad dimension {d.GetRawText()}.");
            shape.Add(size);
            try
            {
                count = checked(count * size);
            }
            catch (OverflowException)
            {
                throw new InvalidDataException($"{path}: entry '{name}' has a shape too large to address.");
            }
        }
        if (!e.TryGetProperty("data_offsets", out var offsets) || offsets.ValueKind != JsonValueKind.Array || offsets.GetArrayLength() != 2 ||
            offsets[0].ValueKind != JsonValueKind.Number || offsets[1].ValueKind != JsonValueKind.Number ||
            !offsets[0].TryGetInt64(out long begin) || !offsets[1].TryGetInt64(out long end))
            throw new InvalidDataException($"{path}: entry '{name}' has no [begin, end] data_offsets.");
        if (begin < 0 || end < begin || end > dataLength)
            throw new InvalidDataException($"{path}: entry '{name}' data [{begin}, {end}) lies outside the file's {dataLength} data bytes (truncated?).");
        long bytes;
        try
        {
            bytes = checked(count * elementBytes);
        }
        catch (OverflowException)
        {
            throw new InvalidDataException($"{path}: entry '{name}' has a shape too large to address.");
        }
        if (end - begin != bytes)
            throw new InvalidDataException($"{path}: entry '{name}' {dtype} [{string.Join(", ", shape)}] needs {bytes} bytes, its range holds {end - begin}.");
        return new SafetensorsEntry(name, dtype, shape, begin, end);
    }
}
