using System.Buffers.Binary;
using System.Text;

namespace ModelCompression.Serialization;

/// <summary>Writes the file's little-endian primitives: fixed-width integers, unsigned LEB128 varints, floats and short strings.</summary>
internal sealed class FormatWriter
{
    private byte[] buffer = new byte[256];

    public int Length { get; private set; }

    public ReadOnlySpan<byte> Written => buffer.AsSpan(0, Length);

    public void Byte(byte value) => Reserve(1)[0] = value;

    public void Bool(bool value) => Byte(value ? (byte)1 : (byte)0);

    public void UInt16(ushort value) => BinaryPrimitives.WriteUInt16LittleEndian(Reserve(2), value);

    public void UInt32(uint value) => BinaryPrimitives.WriteUInt32LittleEndian(Reserve(4), value);

    public void UInt64(ulong value) => BinaryPrimitives.WriteUInt64LittleEndian(Reserve(8), value);

    public void Float32(float value) => BinaryPrimitives.WriteSingleLittleEndian(Reserve(4), value);

    public void Float64(double value) => BinaryPrimitives.WriteDoubleLittleEndian(Reserve(8), value);

    /// <summary>Writes a non-negative integer as an unsigned LEB128 varint (1 byte below 128).</summary>
    public void VarUInt(long value)
    {
        if (value < 0)
        {
            throw new ArgumentOutOfRangeException(nameof(value), value, "A varint holds non-negative values.");
        }

        ulong v = (ulong)value;
        while (v >= 0x80)
        {
            Byte((byte)(v | 0x80));
            v >>= 7;
        }

        Byte((byte)v);
    }

    /// <summary>Writes a signed integer as a zig-zag varint.</summary>
    public void VarInt(long value)
    {
        if (value is < -(1L << 61) or > (1L << 61))
        {
            throw new ArgumentOutOfRangeException(nameof(value), value, "A signed varint holds values within ±2^61.");
        }

        VarUInt((value << 1) ^ (value >> 63));
    }

    public void String(string value)
    {
        var bytes = Encoding.UTF8.GetBytes(value);
        if (bytes.Length > FormatReader.MaxStringBytes)
        {
            throw new ArgumentException($"The name '{value[..Math.Min(value.Length, 40)]}…' is longer than {FormatReader.MaxStringBytes} bytes.", nameof(value));
        }

        VarUInt(bytes.Length);
        Bytes(bytes);
    }

    public void Bytes(ReadOnlySpan<byte> data) => data.CopyTo(Reserve(data.Length));

    /// <summary>Writes a length-prefixed block of bytes.</summary>
    public void Block(ReadOnlySpan<byte> data)
    {
        VarUInt(data.Length);
        Bytes(data);
    }

    public byte[] ToArray() => Written.ToArray();

    private Span<byte> Reserve(int count)
    {
        if (Length + count > buffer.Length)
        {
            Array.Resize(ref buffer, Math.Max(Length + count, checked(buffer.Length * 2)));
        }

        var span = buffer.AsSpan(Length, count);
        Length += count;
        return span;
    }
}

/// <summary>
/// Reads the primitives back from a bounded span. Every read checks the bytes left first, and every count is checked
/// against a limit before anything is allocated: a corrupt or hostile file gets an <see cref="InvalidDataException"/>
/// that says what and where, never an out-of-range read or a huge allocation.
/// </summary>
internal ref struct FormatReader
{
    public const int MaxStringBytes = 1024;

    private readonly ReadOnlySpan<byte> data;
    private readonly string where;

    public FormatReader(ReadOnlySpan<byte> data, string where)
    {
        this.data = data;
        this.where = where;
        Position = 0;
    }

    public int Position { get; private set; }

    public readonly int Remaining => data.Length - Position;

    public byte Byte() => Take(1, "a byte")[0];

    public bool Bool()
    {
        byte b = Byte();
        return b switch
        {
            0 => false,
            1 => true,
            _ => throw Fail($"a flag byte is {b}, not 0 or 1"),
        };
    }

    public ushort UInt16() => BinaryPrimitives.ReadUInt16LittleEndian(Take(2, "a 16-bit integer"));

    public uint UInt32() => BinaryPrimitives.ReadUInt32LittleEndian(Take(4, "a 32-bit integer"));

    public ulong UInt64() => BinaryPrimitives.ReadUInt64LittleEndian(Take(8, "a 64-bit integer"));

    public float Float32() => BinaryPrimitives.ReadSingleLittleEndian(Take(4, "a float"));

    public double Float64() => BinaryPrimitives.ReadDoubleLittleEndian(Take(8, "a double"));

    /// <summary>Reads an unsigned varint of at most 9 bytes (63 bits).</summary>
    public long VarUInt()
    {
        ulong result = 0;
        for (int shift = 0; shift < 63; shift += 7)
        {
            byte b = Byte();
            result |= (ulong)(b & 0x7F) << shift;
            if ((b & 0x80) == 0)
            {
                if (result > long.MaxValue)
                {
                    throw Fail("a varint is larger than 2^63 - 1");
                }

                return (long)result;
            }
        }

        throw Fail("a varint runs longer than 9 bytes");
    }

    public long VarInt()
    {
        ulong v = (ulong)VarUInt();
        return (long)(v >> 1) ^ -(long)(v & 1);
    }

    /// <summary>Reads a varint that must lie in [<paramref name="min"/>, <paramref name="max"/>].</summary>
    public long VarUInt(string what, long min, long max)
    {
        long value = VarUInt();
        if (value < min || value > max)
        {
            throw Fail($"{what} is {value}, outside {min}..{max}");
        }

        return value;
    }

    /// <summary>Reads a signed varint that must lie in [<paramref name="min"/>, <paramref name="max"/>].</summary>
    public long VarInt(string what, long min, long max)
    {
        long value = VarInt();
        if (value < min || value > max)
        {
            throw Fail($"{what} is {value}, outside {min}..{max}");
        }

        return value;
    }

    public string String()
    {
        int length = (int)VarUInt("a name's length", 0, MaxStringBytes);
        var bytes = Take(length, "a name");
        try
        {
            return new UTF8Encoding(false, true).GetString(bytes);
        }
        catch (DecoderFallbackException)
        {
            throw Fail("a name is not valid UTF-8");
        }
    }

    public ReadOnlySpan<byte> Bytes(int count, string what) => Take(count, what);

    /// <summary>Reads a length-prefixed block whose length must fit in what is left.</summary>
    public ReadOnlySpan<byte> Block(string what)
    {
        int length = (int)VarUInt($"the length of {what}", 0, Remaining);
        return Take(length, what);
    }

    public readonly void ExpectEnd()
    {
        if (Remaining != 0)
        {
            throw Fail($"{Remaining} bytes are left over after the last field");
        }
    }

    public readonly InvalidDataException Fail(string message) =>
        new($"The compressed model file is not valid: {where}: {message} (at byte {Position}).");

    private ReadOnlySpan<byte> Take(int count, string what)
    {
        if (count < 0 || count > Remaining)
        {
            throw Fail($"it ends inside {what} ({count} bytes needed, {Remaining} left)");
        }

        var span = data.Slice(Position, count);
        Position += count;
        return span;
    }
}
