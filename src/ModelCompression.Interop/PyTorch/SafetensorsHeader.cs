using System.Buffers;
using System.Buffers.Binary;
using System.Text;
using System.Text.Unicode;
using System.Text.Json;
using static TorchSharp.torch;

namespace ModelCompression.Interop.PyTorch;

/// <summary>
/// The safetensors format's header: an 8-byte little-endian length, then that many bytes of UTF-8 JSON mapping each
/// tensor's name to its dtype, shape and [begin, end) byte offsets in the data that follows (an optional
/// <c>__metadata__</c> entry maps strings to strings), then the data, little-endian and contiguous.
/// </summary>
internal static class SafetensorsHeader
{
    /// <summary>The name of the header's string-to-string metadata entry.</summary>
    public const string MetadataKey = "__metadata__";

    /// <summary>The largest header the reference implementation accepts (100 MB).</summary>
    public const long MaxHeaderBytes = 100_000_000;

    /// <summary>The dtypes this library writes and reads, with their safetensors names.</summary>
    private static readonly (string Name, ScalarType Dtype, int Bytes)[] Dtypes =
    [
        ("F64", ScalarType.Float64, 8),
        ("F32", ScalarType.Float32, 4),
        ("F16", ScalarType.Float16, 2),
        ("BF16", ScalarType.BFloat16, 2),
        ("I64", ScalarType.Int64, 8),
        ("I32", ScalarType.Int32, 4),
        ("I16", ScalarType.Int16, 2),
        ("I8", ScalarType.Int8, 1),
        ("U8", ScalarType.Byte, 1),
        ("BOOL", ScalarType.Bool, 1),
    ];

    /// <summary>Gets the safetensors names of the supported dtypes, for messages.</summary>
    public static string SupportedNames => string.Join(", ", Dtypes.Select(d => d.Name));

    /// <summary>Gets the safetensors name of a dtype, or <see langword="null"/> when the format (as read here) has none.</summary>
    public static string? NameOf(ScalarType dtype) => Array.Find(Dtypes, d => d.Dtype == dtype).Name;

    /// <summary>Gets the bytes of one element of a dtype named in a header, or 0 for names not supported.</summary>
    public static int ElementBytes(string name) => Array.Find(Dtypes, d => d.Name == name).Bytes;

    /// <summary>
    /// Reads and checks the header of a safetensors file: every entry well-formed, of a supported dtype, its byte range
    /// exactly its shape's size, the ranges tiling the data section without gaps or overlaps, and the data section exactly
    /// as long as the ranges need (so a truncated or padded file is caught here).
    /// </summary>
    /// <param name="stream">A seekable stream positioned at the file's start; it is left after the header.</param>
    /// <param name="source">The file, for messages.</param>
    /// <param name="limit">The most bytes of data the import may read.</param>
    /// <returns>The tensors' names in data order.</returns>
    public static List<string> Read(Stream stream, string source, DecodeLimit limit)
    {
        long length = stream.Length - stream.Position;
        Span<byte> prefix = stackalloc byte[8];
        if (length < 8)
        {
            throw Invalid(source, $"it is {length} bytes long, shorter than the 8-byte header length");
        }

        stream.ReadExactly(prefix);
        ulong headerBytes = BinaryPrimitives.ReadUInt64LittleEndian(prefix);
        if (headerBytes > (ulong)(length - 8))
        {
            throw Invalid(source, $"its header length is {headerBytes} bytes but only {length - 8} bytes follow (the file is truncated or not safetensors)");
        }

        if (headerBytes > MaxHeaderBytes)
        {
            throw Invalid(source, $"its header length is {headerBytes} bytes, more than the {MaxHeaderBytes} the format allows");
        }

        long dataBytes = length - 8 - (long)headerBytes;
        if (dataBytes > limit.Bytes)
        {
            throw Invalid(source, $"its data section is {dataBytes} bytes, more than {limit}");
        }

        var json = new byte[headerBytes];
        stream.ReadExactly(json);

        // System.Text.Json parses invalid UTF-8 inside strings and only fails when a name is read, with an
        // InvalidOperationException: check the whole header first.
        if (!Utf8.IsValid(json))
        {
            int valid = ValidPrefix(json);
            throw Invalid(source, $"its header is not valid UTF-8 (at header byte {valid}, after \"{Encoding.UTF8.GetString(json, Math.Max(0, valid - 40), Math.Min(valid, 40))}\")");
        }

        var entries = new List<(string Name, long Begin, long End)>();
        try
        {
            using var document = JsonDocument.Parse(json);
            if (document.RootElement.ValueKind != JsonValueKind.Object)
            {
                throw Invalid(source, "its header is not a JSON object");
            }

            var seen = new HashSet<string>(StringComparer.Ordinal);
            foreach (var property in document.RootElement.EnumerateObject())
            {
                if (!seen.Add(property.Name))
                {
                    throw Invalid(source, $"its header names '{property.Name}' twice");
                }

                if (property.Name == MetadataKey)
                {
                    CheckMetadata(property.Value, source);
                    continue;
                }

                entries.Add(ReadEntry(property.Name, property.Value, source));
            }
        }
        catch (Exception ex) when (ex is JsonException or InvalidOperationException or FormatException)
        {
            throw new InvalidDataException($"{source} is not a valid safetensors file: its header is not valid JSON ({ex.Message}).", ex);
        }

        entries.Sort((a, b) => a.Begin != b.Begin ? a.Begin.CompareTo(b.Begin) : a.End != b.End ? a.End.CompareTo(b.End) : string.CompareOrdinal(a.Name, b.Name));
        long expected = 0;
        foreach (var (name, begin, end) in entries)
        {
            if (begin != expected)
            {
                throw Invalid(source, begin > expected
                    ? $"bytes {expected} to {begin} of its data belong to no tensor (before '{name}')"
                    : $"the data of '{name}' (bytes {begin} to {end}) overlaps another tensor's");
            }

            expected = end;
        }

        if (expected != dataBytes)
        {
            throw Invalid(source, expected > dataBytes
                ? $"its tensors need {expected} bytes of data but the file holds {dataBytes} (it is truncated)"
                : $"{dataBytes - expected} bytes follow the last tensor's data");
        }

        return entries.Select(e => e.Name).ToList();
    }

    /// <summary>The length of the longest valid UTF-8 prefix of <paramref name="bytes"/>.</summary>
    private static int ValidPrefix(byte[] bytes)
    {
        var status = Utf8.ToUtf16(bytes, new char[bytes.Length], out int read, out _, replaceInvalidSequences: false);
        return status == OperationStatus.Done ? bytes.Length : read;
    }

    private static void CheckMetadata(JsonElement metadata, string source)
    {
        if (metadata.ValueKind != JsonValueKind.Object || metadata.EnumerateObject().Any(p => p.Value.ValueKind != JsonValueKind.String))
        {
            throw Invalid(source, $"its '{MetadataKey}' entry is not an object of strings");
        }
    }

    private static (string Name, long Begin, long End) ReadEntry(string name, JsonElement entry, string source)
    {
        if (entry.ValueKind != JsonValueKind.Object
            || !entry.TryGetProperty("dtype", out var dtype) || dtype.ValueKind != JsonValueKind.String
            || !entry.TryGetProperty("shape", out var shape) || shape.ValueKind != JsonValueKind.Array
            || !entry.TryGetProperty("data_offsets", out var offsets) || offsets.ValueKind != JsonValueKind.Array || offsets.GetArrayLength() != 2)
        {
            throw Invalid(source, $"its header entry '{name}' does not have a dtype string, a shape array and two data_offsets");
        }

        string dtypeName = dtype.GetString()!;
        int elementBytes = ElementBytes(dtypeName);
        if (elementBytes == 0)
        {
            throw Invalid(source, $"tensor '{name}' has dtype '{dtypeName}', which is not supported (supported: {SupportedNames})");
        }

        long bytes = elementBytes;
        foreach (var dimension in shape.EnumerateArray())
        {
            if (dimension.ValueKind != JsonValueKind.Number || !dimension.TryGetInt64(out long size) || size < 0)
            {
                throw Invalid(source, $"tensor '{name}' has a shape that is not a list of non-negative integers");
            }

            bytes = bytes == 0 || size == 0 ? 0 : bytes <= long.MaxValue / size ? bytes * size : throw Invalid(source, $"tensor '{name}' has a shape too large to hold");
        }

        if (offsets[0].ValueKind != JsonValueKind.Number || offsets[1].ValueKind != JsonValueKind.Number
            || !offsets[0].TryGetInt64(out long begin) || !offsets[1].TryGetInt64(out long end) || begin < 0 || end < begin)
        {
            throw Invalid(source, $"tensor '{name}' has data_offsets that are not an increasing pair of non-negative integers");
        }

        if (end - begin != bytes)
        {
            throw Invalid(source, $"tensor '{name}' ({dtypeName}, shape [{string.Join(", ", shape.EnumerateArray())}]) needs {bytes} bytes but its data_offsets span {end - begin}");
        }

        return (name, begin, end);
    }

    private static InvalidDataException Invalid(string source, string message) => new($"{source} is not a valid safetensors file: {message}.");
}
