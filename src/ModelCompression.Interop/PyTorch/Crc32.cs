namespace ModelCompression.Interop.PyTorch;

/// <summary>The CRC-32 of zip archives (IEEE 802.3, reflected polynomial 0xEDB88320), to check the bytes an entry inflates to.</summary>
internal static class Crc32
{
    private static readonly uint[] Table = MakeTable();

    /// <summary>The CRC-32 of a whole buffer.</summary>
    public static uint Of(ReadOnlySpan<byte> bytes) => Append(0, bytes);

    /// <summary>Continues a CRC-32 over more bytes.</summary>
    /// <param name="crc">The CRC-32 of the bytes before (0 for none).</param>
    /// <param name="bytes">The next bytes.</param>
    /// <returns>The CRC-32 of all the bytes.</returns>
    public static uint Append(uint crc, ReadOnlySpan<byte> bytes)
    {
        crc = ~crc;
        foreach (byte b in bytes)
        {
            crc = Table[(crc ^ b) & 0xFF] ^ (crc >> 8);
        }

        return ~crc;
    }

    private static uint[] MakeTable()
    {
        var table = new uint[256];
        for (uint i = 0; i < table.Length; i++)
        {
            uint c = i;
            for (int bit = 0; bit < 8; bit++)
            {
                c = (c & 1) != 0 ? 0xEDB88320 ^ (c >> 1) : c >> 1;
            }

            table[i] = c;
        }

        return table;
    }
}
