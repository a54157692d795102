using System.IO.Compression;
using System.Security.Cryptography;
using System.Text;

namespace ModelCompression.Samples;

/// <summary>
/// Reads the bundled text files written by <c>tools/text-converter</c>: a gzip-compressed payload that starts with an
/// eight-byte magic and ends with the SHA-256 of everything before it.
/// </summary>
internal static class BundledPayload
{
    internal const int MagicBytes = 8;
    internal const int DigestBytes = 32;

    /// <summary>Decompresses, checks the magic and the digest, and returns the payload without its digest.</summary>
    /// <exception cref="InvalidDataException">The data is not gzip, has another magic, or fails its checksum.</exception>
    internal static byte[] Read(Stream stream, string magic, string what)
    {
        ArgumentNullException.ThrowIfNull(stream);
        byte[] payload;
        try
        {
            using var gzip = new GZipStream(stream, CompressionMode.Decompress, leaveOpen: true);
            using var buffer = new MemoryStream();
            gzip.CopyTo(buffer);
            payload = buffer.ToArray();
        }
        catch (Exception ex) when (ex is InvalidDataException or EndOfStreamException or IOException)
        {
            throw new InvalidDataException($"The {what} file is not valid gzip data: {ex.Message}", ex);
        }

        if (payload.Length < MagicBytes + DigestBytes || Encoding.ASCII.GetString(payload, 0, MagicBytes) != magic)
        {
            throw new InvalidDataException($"The {what} file does not start with the {magic} header.");
        }

        int bodyLength = payload.Length - DigestBytes;
        var digest = SHA256.HashData(payload.AsSpan(0, bodyLength));
        if (!digest.AsSpan().SequenceEqual(payload.AsSpan(bodyLength)))
        {
            throw new InvalidDataException($"The {what} file's SHA-256 does not match its contents: the file is corrupt or truncated.");
        }

        return payload.AsSpan(0, bodyLength).ToArray();
    }

    /// <summary>Opens an embedded resource of this assembly.</summary>
    internal static Stream OpenResource(string name, string what) =>
        typeof(BundledPayload).Assembly.GetManifestResourceStream(name)
            ?? throw new InvalidOperationException($"The bundled {what} ({name}) is missing from the assembly.");
}

/// <summary>Reads little-endian numbers and length-prefixed UTF-8 strings; any overrun is an <see cref="InvalidDataException"/>.</summary>
internal sealed class PayloadReader
{
    private static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    private readonly byte[] _data;
    private readonly string _what;
    private int _position;

    internal PayloadReader(byte[] data, int start, string what)
    {
        _data = data;
        _position = start;
        _what = what;
    }

    internal bool AtEnd => _position == _data.Length;

    internal byte ReadByte() => Take(1)[0];

    internal ushort ReadUInt16() => BitConverter.ToUInt16(Take(2));

    internal int ReadInt32()
    {
        uint value = BitConverter.ToUInt32(Take(4));
        return value <= int.MaxValue ? (int)value : throw Invalid($"a count of {value} is out of range");
    }

    internal string ReadString()
    {
        int length = ReadInt32();
        var bytes = Take(length);
        try
        {
            return StrictUtf8.GetString(bytes);
        }
        catch (DecoderFallbackException ex)
        {
            throw new InvalidDataException($"The {_what} file holds a string that is not valid UTF-8.", ex);
        }
    }

    internal void ExpectEnd()
    {
        if (!AtEnd)
        {
            throw Invalid($"{_data.Length - _position} bytes follow the last record");
        }
    }

    internal InvalidDataException Invalid(string reason) => new($"The {_what} file is malformed: {reason}.");

    private ReadOnlySpan<byte> Take(int count)
    {
        if (count > _data.Length - _position)
        {
            throw Invalid("it ends in the middle of a record");
        }

        var span = _data.AsSpan(_position, count);
        _position += count;
        return span;
    }
}
