using System.IO.Compression;

namespace ModelCompression.Serialization;

/// <summary>How a stream of small integers (cluster indices, quantized levels, index gaps) is stored.</summary>
public enum SymbolCoding
{
    /// <summary>Fixed-width bit packing: ⌈log2(alphabet)⌉ bits per symbol.</summary>
    Packed = 0,

    /// <summary>Canonical Huffman coding, code lengths up to 15 bits (the table is stored as 4-bit lengths).</summary>
    Huffman = 1,

    /// <summary>DEFLATE (RFC 1951) over one byte per symbol (two when the alphabet exceeds 256).</summary>
    Deflate = 2,
}

/// <summary>
/// Stores streams of symbols 0..alphabet−1 with whichever of <see cref="SymbolCoding"/> gives the fewest bytes for
/// that stream (each is tried; the choice is a byte in the file). Reading checks every count against the bytes
/// that could hold it before allocating.
/// </summary>
internal static class SymbolStream
{
    public const int MaxAlphabet = 1 << 16;
    private const int MaxCodeLength = 15;

    /// <summary>Writes <paramref name="symbols"/>, each in 0..<paramref name="alphabet"/>−1, and returns the coding chosen.</summary>
    public static SymbolCoding Write(FormatWriter writer, ReadOnlySpan<int> symbols, int alphabet)
    {
        if (alphabet < 1 || alphabet > MaxAlphabet)
        {
            throw new ArgumentOutOfRangeException(nameof(alphabet), alphabet, $"The alphabet must have 1 to {MaxAlphabet} symbols.");
        }

        // Packing and Huffman sizes are known from the counts; DEFLATE is tried for real.
        var frequencies = Frequencies(symbols, alphabet);
        var lengths = CodeLengths(frequencies);
        long packed = PackedBytes(symbols.Length, alphabet);
        long huffman = HuffmanBytes(frequencies, lengths);
        var deflated = Deflate(symbols, alphabet);
        if (deflated.Length < Math.Min(packed, huffman))
        {
            writer.Byte((byte)SymbolCoding.Deflate);
            writer.Block(deflated);
            return SymbolCoding.Deflate;
        }

        var coding = huffman < packed ? SymbolCoding.Huffman : SymbolCoding.Packed;
        writer.Byte((byte)coding);
        writer.Block(coding == SymbolCoding.Huffman ? Huffman(symbols, lengths) : Pack(symbols, alphabet));
        return coding;
    }

    /// <summary>The bytes the smaller of packing and Huffman coding would take (a cheap estimate to compare streams).</summary>
    public static long EstimateBytes(ReadOnlySpan<int> symbols, int alphabet)
    {
        var frequencies = Frequencies(symbols, alphabet);
        return Math.Min(PackedBytes(symbols.Length, alphabet), HuffmanBytes(frequencies, CodeLengths(frequencies)));
    }

    private static long[] Frequencies(ReadOnlySpan<int> symbols, int alphabet)
    {
        var frequencies = new long[alphabet];
        foreach (int s in symbols)
        {
            frequencies[s]++;
        }

        return frequencies;
    }

    private static long PackedBytes(long count, int alphabet) => ((count * BitsFor(alphabet)) + 7) / 8;

    private static long HuffmanBytes(long[] frequencies, int[] lengths)
    {
        int used = Array.FindLastIndex(lengths, l => l > 0) + 1;
        long bits = 17 + (4L * used);
        for (int s = 0; s < frequencies.Length; s++)
        {
            bits += frequencies[s] * lengths[s];
        }

        return (bits + 7) / 8;
    }

    /// <summary>Reads <paramref name="count"/> symbols, each checked to lie in 0..<paramref name="alphabet"/>−1.</summary>
    public static int[] Read(ref FormatReader reader, long count, int alphabet, string what)
    {
        byte coding = reader.Byte();
        var bytes = reader.Block(what);
        if (coding > (byte)SymbolCoding.Deflate)
        {
            throw reader.Fail($"{what} uses unknown symbol coding {coding}");
        }

        int bits = BitsFor(alphabet);
        // Every coding spends at least one bit per symbol except packing with a one-symbol alphabet and DEFLATE, whose
        // output is bounded separately: a count beyond these limits cannot be in the bytes given.
        long limit = (SymbolCoding)coding switch
        {
            SymbolCoding.Packed => bits == 0 ? count : (bytes.Length * 8L) / bits,
            SymbolCoding.Huffman => bytes.Length * 8L,
            _ => (bytes.Length * 1032L) / (alphabet > 256 ? 2 : 1),
        };
        if (count < 0 || count > limit || count > Array.MaxLength)
        {
            throw reader.Fail($"{what} declares {count} symbols, more than its {bytes.Length} bytes can hold");
        }

        // DEFLATE's output is inflated before the symbols are allocated, into a buffer that grows only as data arrives:
        // a short or corrupt stream that claims many symbols fails having allocated what it held, not what it claimed.
        byte[]? inflated = null;
        if ((SymbolCoding)coding == SymbolCoding.Deflate && Inflate(bytes, count, alphabet > 256 ? 2 : 1, out inflated) is { } failure)
        {
            throw reader.Fail($"{what}: {failure}");
        }

        var symbols = new int[count];
        var result = (SymbolCoding)coding switch
        {
            SymbolCoding.Packed => Unpack(bytes, symbols, bits),
            SymbolCoding.Huffman => Unhuffman(bytes, symbols, alphabet),
            _ => Widen(inflated!, symbols, alphabet),
        };
        if (result is not null)
        {
            throw reader.Fail($"{what}: {result}");
        }

        foreach (int s in symbols)
        {
            if ((uint)s >= (uint)alphabet)
            {
                throw reader.Fail($"{what} holds symbol {s}, outside the alphabet of {alphabet}");
            }
        }

        return symbols;
    }

    public static int BitsFor(int alphabet) => alphabet <= 1 ? 0 : 32 - int.LeadingZeroCount(alphabet - 1);

    private static byte[] Pack(ReadOnlySpan<int> symbols, int alphabet)
    {
        int bits = BitsFor(alphabet);
        var bytes = new byte[((symbols.Length * (long)bits) + 7) / 8];
        long bit = 0;
        foreach (int s in symbols)
        {
            for (int b = 0; b < bits; b++, bit++)
            {
                if (((s >> b) & 1) != 0)
                {
                    bytes[bit >> 3] |= (byte)(1 << (int)(bit & 7));
                }
            }
        }

        return bytes;
    }

    private static string? Unpack(ReadOnlySpan<byte> bytes, int[] symbols, int bits)
    {
        long bit = 0;
        for (int i = 0; i < symbols.Length; i++)
        {
            int s = 0;
            for (int b = 0; b < bits; b++, bit++)
            {
                s |= ((bytes[(int)(bit >> 3)] >> (int)(bit & 7)) & 1) << b;
            }

            symbols[i] = s;
        }

        return null;
    }

    private static byte[] Huffman(ReadOnlySpan<int> symbols, int[] lengths)
    {
        int used = Array.FindLastIndex(lengths, l => l > 0) + 1;
        var writer = new BitWriter();
        writer.Write((uint)used, 17);
        for (int s = 0; s < used; s++)
        {
            writer.Write((uint)lengths[s], 4);
        }

        var codes = CanonicalCodes(lengths);
        foreach (int s in symbols)
        {
            writer.Write(codes[s], lengths[s]);
        }

        return writer.ToArray();
    }

    private static string? Unhuffman(ReadOnlySpan<byte> bytes, int[] symbols, int alphabet)
    {
        var reader = new BitReader(bytes);
        if (!reader.TryRead(17, out uint used) || used > alphabet)
        {
            return $"the Huffman table declares {used} symbols (alphabet {alphabet})";
        }

        var lengths = new int[used];
        for (int s = 0; s < used; s++)
        {
            if (!reader.TryRead(4, out uint length))
            {
                return "the Huffman table is truncated";
            }

            lengths[s] = (int)length;
        }

        // counts[len] codes of each length, and the symbols in canonical order.
        var counts = new int[MaxCodeLength + 1];
        foreach (int l in lengths)
        {
            counts[l]++;
        }

        counts[0] = 0;
        long kraft = 0;
        for (int l = 1; l <= MaxCodeLength; l++)
        {
            kraft += (long)counts[l] << (MaxCodeLength - l);
        }

        if (kraft > 1L << MaxCodeLength)
        {
            return "the Huffman code lengths over-subscribe the code space";
        }

        if (symbols.Length > 0 && kraft == 0)
        {
            return "the Huffman table has no codes";
        }

        var offsets = new int[MaxCodeLength + 2];
        for (int l = 1; l <= MaxCodeLength; l++)
        {
            offsets[l + 1] = offsets[l] + counts[l];
        }

        var ordered = new int[offsets[MaxCodeLength + 1]];
        for (int s = 0; s < used; s++)
        {
            if (lengths[s] != 0)
            {
                ordered[offsets[lengths[s]]++] = s;
            }
        }

        for (int i = 0; i < symbols.Length; i++)
        {
            int code = 0, first = 0, index = 0;
            int symbol = -1;
            for (int l = 1; l <= MaxCodeLength; l++)
            {
                if (!reader.TryRead(1, out uint bit))
                {
                    return $"the Huffman data ends after {i} of {symbols.Length} symbols";
                }

                code |= (int)bit;
                int count = counts[l];
                if (code - first < count)
                {
                    symbol = ordered[index + code - first];
                    break;
                }

                index += count;
                first = (first + count) << 1;
                code <<= 1;
            }

            if (symbol < 0)
            {
                return "the Huffman data holds a code no symbol has";
            }

            symbols[i] = symbol;
        }

        return null;
    }

    private static byte[] Deflate(ReadOnlySpan<int> symbols, int alphabet)
    {
        int width = alphabet > 256 ? 2 : 1;
        var raw = new byte[symbols.Length * width];
        for (int i = 0; i < symbols.Length; i++)
        {
            raw[i * width] = (byte)symbols[i];
            if (width == 2)
            {
                raw[(i * 2) + 1] = (byte)(symbols[i] >> 8);
            }
        }

        using var output = new MemoryStream();
        using (var deflate = new DeflateStream(output, CompressionLevel.Optimal, leaveOpen: true))
        {
            deflate.Write(raw);
        }

        return output.ToArray();
    }

    /// <summary>Inflates exactly <paramref name="count"/> symbols of <paramref name="width"/> bytes, growing the buffer as they arrive; the error, or null.</summary>
    private static unsafe string? Inflate(ReadOnlySpan<byte> bytes, long count, int width, out byte[] raw)
    {
        long length = count * width;
        const int FirstBuffer = 1 << 16;
        raw = new byte[Math.Min(length, FirstBuffer)];
        try
        {
            fixed (byte* p = bytes)
            {
                using var input = new UnmanagedMemoryStream(p, bytes.Length);
                using var inflate = new DeflateStream(input, CompressionMode.Decompress);
                long filled = 0;
                while (filled < length)
                {
                    if (filled == raw.Length)
                    {
                        Array.Resize(ref raw, (int)Math.Min(length, raw.Length * 2L));
                    }

                    int read = inflate.Read(raw, (int)filled, raw.Length - (int)filled);
                    if (read == 0)
                    {
                        return $"the DEFLATE data ends after {filled / width} of {count} symbols";
                    }

                    filled += read;
                }

                Span<byte> extra = stackalloc byte[1];
                if (inflate.Read(extra) != 0)
                {
                    return $"the DEFLATE data holds more than {count} symbols";
                }
            }
        }
        catch (InvalidDataException ex)
        {
            return $"the DEFLATE data is corrupt ({ex.Message})";
        }

        return null;
    }

    /// <summary>Turns inflated bytes (one per symbol, or two little-endian for alphabets over 256) into symbols.</summary>
    private static string? Widen(byte[] raw, int[] symbols, int alphabet)
    {
        int width = alphabet > 256 ? 2 : 1;
        for (int i = 0; i < symbols.Length; i++)
        {
            symbols[i] = width == 1 ? raw[i] : raw[i * 2] | (raw[(i * 2) + 1] << 8);
        }

        return null;
    }

    /// <summary>Huffman code lengths, at most <see cref="MaxCodeLength"/> bits: frequencies are halved until the tree fits.</summary>
    private static int[] CodeLengths(long[] frequencies)
    {
        var freq = (long[])frequencies.Clone();
        while (true)
        {
            var lengths = UnlimitedLengths(freq);
            if (lengths.Max() <= MaxCodeLength)
            {
                return lengths;
            }

            for (int i = 0; i < freq.Length; i++)
            {
                freq[i] = freq[i] == 0 ? 0 : (freq[i] + 1) / 2;
            }
        }
    }

    private static int[] UnlimitedLengths(long[] frequencies)
    {
        int n = frequencies.Length;
        var lengths = new int[n];
        var used = Enumerable.Range(0, n).Where(i => frequencies[i] > 0).ToList();
        if (used.Count == 0)
        {
            return lengths;
        }

        if (used.Count == 1)
        {
            lengths[used[0]] = 1;
            return lengths;
        }

        // Nodes 0..n-1 are leaves; internal nodes follow. Ties break on the node index, so the result is deterministic.
        var parent = new int[2 * n];
        var queue = new PriorityQueue<int, (long, int)>();
        foreach (int s in used)
        {
            queue.Enqueue(s, (frequencies[s], s));
        }

        int next = n;
        var weight = new long[2 * n];
        Array.Copy(frequencies, weight, n);
        while (queue.Count > 1)
        {
            queue.TryDequeue(out int a, out var pa);
            queue.TryDequeue(out int b, out var pb);
            weight[next] = pa.Item1 + pb.Item1;
            parent[a] = next;
            parent[b] = next;
            queue.Enqueue(next, (weight[next], next));
            next++;
        }

        int root = next - 1;
        foreach (int s in used)
        {
            int depth = 0;
            for (int node = s; node != root; node = parent[node])
            {
                depth++;
            }

            lengths[s] = depth;
        }

        return lengths;
    }

    /// <summary>Canonical codes: shorter codes first, and within one length in symbol order (as DEFLATE assigns them).</summary>
    private static uint[] CanonicalCodes(int[] lengths)
    {
        var counts = new int[MaxCodeLength + 1];
        foreach (int l in lengths)
        {
            counts[l]++;
        }

        counts[0] = 0;
        var nextCode = new uint[MaxCodeLength + 2];
        uint code = 0;
        for (int l = 1; l <= MaxCodeLength; l++)
        {
            code = (code + (uint)counts[l - 1]) << 1;
            nextCode[l] = code;
        }

        var codes = new uint[lengths.Length];
        for (int s = 0; s < lengths.Length; s++)
        {
            if (lengths[s] != 0)
            {
                codes[s] = nextCode[lengths[s]]++;
            }
        }

        return codes;
    }

    /// <summary>Writes bits most significant first.</summary>
    private sealed class BitWriter
    {
        private byte[] bytes = new byte[256];
        private long bitCount;

        public void Write(uint value, int count)
        {
            if (((bitCount + count) >> 3) + 1 >= bytes.Length)
            {
                Array.Resize(ref bytes, bytes.Length * 2);
            }

            for (int b = count - 1; b >= 0; b--, bitCount++)
            {
                if (((value >> b) & 1) != 0)
                {
                    bytes[bitCount >> 3] |= (byte)(0x80 >> (int)(bitCount & 7));
                }
            }
        }

        public byte[] ToArray() => bytes.AsSpan(0, (int)((bitCount + 7) >> 3)).ToArray();
    }

    private ref struct BitReader(ReadOnlySpan<byte> bytes)
    {
        private readonly ReadOnlySpan<byte> data = bytes;
        private long position;

        public bool TryRead(int count, out uint value)
        {
            value = 0;
            if (position + count > data.Length * 8L)
            {
                return false;
            }

            for (int b = 0; b < count; b++, position++)
            {
                value = (value << 1) | (uint)((data[(int)(position >> 3)] >> (7 - (int)(position & 7))) & 1);
            }

            return true;
        }
    }
}
