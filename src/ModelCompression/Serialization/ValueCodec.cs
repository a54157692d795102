using System.Runtime.InteropServices;

namespace ModelCompression.Serialization;

/// <summary>
/// Encodes one weight array (float values, or signed integer levels of a quantized layer) in whichever layout and
/// value coding measures smallest: dense or sparse (positions as a bitmask or as gaps between non-zeros), values raw
/// at the narrowest float type that holds them exactly (float32, float16 or bfloat16) or as a codebook plus indices
/// (when the array takes few distinct values, as clustered weights do) or as integer levels times a scale per row or
/// group (when a float weight lies on such a grid, as weights rounded to int8 or int4 in place do), integer levels as symbols. Symbol streams are
/// entropy coded by <see cref="SymbolStream"/>. Decoding is exact: the array read back is bit-identical.
/// </summary>
internal static class ValueCodec
{
    private const byte Dense = 0;
    private const byte Sparse = 1;
    private const byte Bitmask = 0;
    private const byte Gaps = 1;
    private const byte RawFloats = 0;
    private const byte Codebook = 1;
    private const byte Levels = 2;
    private const byte GridLevels = 3;
    private const int MaxCodebook = 4096;
    private static readonly int[] GapAlphabets = [4, 8, 16, 32, 64, 128, 256];

    /// <summary>How a stored array was encoded (for reports).</summary>
    public readonly record struct Encoding(bool Sparse, string Positions, string Values, int Bytes);

    /// <summary>Writes float values exactly, in the smallest coding found.</summary>
    /// <param name="writer">The writer.</param>
    /// <param name="values">The values.</param>
    /// <param name="what">What the values are, for errors.</param>
    /// <param name="rows">
    /// The rows of the tensor the values come from (its first dimension) when it has at least two dimensions, else 0:
    /// a weight on a grid of integer levels times a scale per row or per group of a row is stored as levels and scales.
    /// </param>
    public static Encoding WriteFloats(FormatWriter writer, ReadOnlySpan<float> values, string what, long rows = 0)
    {
        var copy = values.ToArray();
        for (int i = 0; i < copy.Length; i++)
        {
            if (!float.IsFinite(copy[i]))
            {
                throw new ArgumentException($"{what} holds NaN or infinite values; a model with them cannot be saved.");
            }

            // -0 (what masking a negative weight gives) is stored as 0: a pruned weight is a zero, whatever its sign.
            if (copy[i] == 0)
            {
                copy[i] = 0;
            }
        }

        return WriteBest(writer, copy, null, 0, rows);
    }

    public static Encoding WriteLevels(FormatWriter writer, ReadOnlySpan<sbyte> levels, int maxLevel)
    {
        var ints = new int[levels.Length];
        for (int i = 0; i < levels.Length; i++)
        {
            ints[i] = levels[i];
        }

        return WriteBest(writer, null, ints, maxLevel);
    }

    public static float[] ReadFloats(ref FormatReader reader, long count, DecodeBudget budget, string what)
    {
        var (positions, layout) = ReadLayout(ref reader, count, budget, what);
        long stored = positions?.Length ?? count;
        byte kind = reader.Byte();
        float[] storedValues;
        if (kind == RawFloats)
        {
            storedValues = ReadRaw(ref reader, stored, what);
        }
        else if (kind == GridLevels && layout == Dense)
        {
            storedValues = ReadGrid(ref reader, stored, what);
        }
        else if (kind == Codebook)
        {
            int k = (int)reader.VarUInt($"the codebook size of {what}", 1, MaxCodebook);
            var book = ReadRaw(ref reader, k, what);
            var indices = SymbolStream.Read(ref reader, stored, k, $"the codebook indices of {what}");
            storedValues = new float[stored];
            for (int i = 0; i < storedValues.Length; i++)
            {
                storedValues[i] = book[indices[i]];
            }
        }
        else
        {
            throw reader.Fail($"{what} has value coding {kind}, which float weights cannot use");
        }

        return layout == Dense ? storedValues : Scatter(storedValues, positions!, count, 0f, ref reader, what);
    }

    /// <summary>Reads levels in −<paramref name="maxLevel"/>…<paramref name="maxLevel"/> (the alphabet), at most <paramref name="highest"/> when given.</summary>
    public static sbyte[] ReadLevels(ref FormatReader reader, long count, int maxLevel, DecodeBudget budget, string what, int? highest = null)
    {
        var (positions, layout) = ReadLayout(ref reader, count, budget, what);
        long stored = positions?.Length ?? count;
        byte kind = reader.Byte();
        if (kind != Levels)
        {
            throw reader.Fail($"{what} has value coding {kind}, not integer levels");
        }

        var symbols = SymbolStream.Read(ref reader, stored, (2 * maxLevel) + 1, $"the levels of {what}");
        var levels = new sbyte[stored];
        int top = highest ?? maxLevel;
        for (int i = 0; i < levels.Length; i++)
        {
            int level = symbols[i] - maxLevel;
            if (level > top)
            {
                throw reader.Fail($"{what} holds the level {level}, above its highest {top}");
            }

            levels[i] = (sbyte)level;
        }

        return layout == Dense ? levels : Scatter(levels, positions!, count, (sbyte)0, ref reader, what);
    }

    private static Encoding WriteBest(FormatWriter writer, float[]? floats, int[]? levels, int maxLevel, long rows = 0)
    {
        int count = floats?.Length ?? levels!.Length;
        var nonzero = new List<int>();
        for (int i = 0; i < count; i++)
        {
            if (floats is not null ? floats[i] != 0 : levels![i] != 0)
            {
                nonzero.Add(i);
            }
        }

        // Dense: every value. Sparse: the positions of the non-zeros, then their values.
        var dense = new FormatWriter();
        dense.Byte(Dense);
        string denseValues = WriteValues(dense, floats, levels, maxLevel, null, rows);
        var best = (Writer: dense, Encoding: new Encoding(false, "all", denseValues, 0));
        if (nonzero.Count < count)
        {
            var sparse = new FormatWriter();
            sparse.Byte(Sparse);
            sparse.VarUInt(nonzero.Count);
            string positions = WritePositions(sparse, nonzero, count);
            string sparseValues = WriteValues(sparse, floats, levels, maxLevel, nonzero);
            if (sparse.Length < dense.Length)
            {
                best = (sparse, new Encoding(true, positions, sparseValues, 0));
            }
        }

        writer.Bytes(best.Writer.Written);
        return best.Encoding with { Bytes = best.Writer.Length };
    }

    private static string WriteValues(FormatWriter writer, float[]? floats, int[]? levels, int maxLevel, List<int>? positions, long rows = 0)
    {
        int n = positions?.Count ?? (floats?.Length ?? levels!.Length);
        if (levels is not null)
        {
            var symbols = new int[n];
            for (int i = 0; i < n; i++)
            {
                symbols[i] = levels[positions is null ? i : positions[i]] + maxLevel;
            }

            writer.Byte(Levels);
            return "levels, " + SymbolStream.Write(writer, symbols, (2 * maxLevel) + 1);
        }

        var values = new float[n];
        for (int i = 0; i < n; i++)
        {
            values[i] = floats![positions is null ? i : positions[i]];
        }

        var raw = new FormatWriter();
        raw.Byte(RawFloats);
        string precision = WriteRaw(raw, values);
        var choice = (Writer: raw, Name: precision);

        // A codebook when the values take few distinct bit patterns (clustered weights take 2^bits).
        var distinct = new Dictionary<int, int>();
        foreach (float v in values)
        {
            int bits = BitConverter.SingleToInt32Bits(v);
            if (!distinct.ContainsKey(bits))
            {
                if (distinct.Count == MaxCodebook)
                {
                    distinct.Clear();
                    break;
                }

                distinct[bits] = distinct.Count;
            }
        }

        if (distinct.Count > 0 && distinct.Count < n)
        {
            var book = distinct.Keys.Order().Select(BitConverter.Int32BitsToSingle).ToArray();
            var index = new Dictionary<int, int>();
            for (int i = 0; i < book.Length; i++)
            {
                index[BitConverter.SingleToInt32Bits(book[i])] = i;
            }

            var symbols = values.Select(v => index[BitConverter.SingleToInt32Bits(v)]).ToArray();
            var coded = new FormatWriter();
            coded.Byte(Codebook);
            coded.VarUInt(book.Length);
            string bookPrecision = WriteRaw(coded, book);
            var coding = SymbolStream.Write(coded, symbols, book.Length);
            if (coded.Length < raw.Length)
            {
                choice = (coded, $"codebook of {book.Length} ({bookPrecision}), {coding}");
            }
        }

        // Integer levels times a scale per row or group, when every value lies on such a grid.
        if (positions is null && rows > 0 && Quantization.WeightGrid.Find(values, rows) is { } grid)
        {
            var gridded = new FormatWriter();
            gridded.Byte(GridLevels);
            gridded.VarUInt(rows);
            gridded.VarUInt(grid.GroupSize);
            gridded.VarUInt(grid.MaxLevel);
            string scalePrecision = WriteRaw(gridded, grid.Scales);
            var symbols = new int[grid.Levels.Length];
            for (int i = 0; i < symbols.Length; i++)
            {
                symbols[i] = grid.Levels[i] + grid.MaxLevel;
            }

            var coding = SymbolStream.Write(gridded, symbols, (2 * grid.MaxLevel) + 1);
            if (gridded.Length < choice.Writer.Length)
            {
                choice = (gridded, $"levels ±{grid.MaxLevel} × {grid.Scales.Length} scales ({scalePrecision}, groups of {grid.GroupSize}), {coding}");
            }
        }

        writer.Bytes(choice.Writer.Written);
        return choice.Name;
    }

    private static float[] ReadGrid(ref FormatReader reader, long count, string what)
    {
        long rows = reader.VarUInt($"the rows of {what}", 1, Math.Max(1, count));
        if (count % rows != 0)
        {
            throw reader.Fail($"{what} declares {rows} rows, which do not divide its {count} values");
        }

        long columns = count / rows;
        int group = (int)reader.VarUInt($"the group size of {what}", 1, Math.Max(1, Math.Min(columns, int.MaxValue)));
        int maxLevel = (int)reader.VarUInt($"the largest level of {what}", 1, 127);
        long groupsPerRow = (columns + group - 1) / group;
        var scales = ReadRaw(ref reader, rows * groupsPerRow, what);
        var symbols = SymbolStream.Read(ref reader, count, (2 * maxLevel) + 1, $"the levels of {what}");
        var values = new float[count];
        for (long i = 0; i < count; i++)
        {
            long row = i / columns;
            long column = i % columns;
            values[i] = (symbols[i] - maxLevel) * scales[(row * groupsPerRow) + (column / group)];
        }

        return values;
    }

    private static string WritePositions(FormatWriter writer, List<int> nonzero, int count)
    {
        // A bitmask of 8 positions per byte ...
        var mask = new int[(count + 7) / 8];
        foreach (int p in nonzero)
        {
            mask[p >> 3] |= 1 << (p & 7);
        }

        var bitmask = new FormatWriter();
        bitmask.Byte(Bitmask);
        var maskCoding = SymbolStream.Write(bitmask, mask, 256);
        var best = (Writer: bitmask, Name: $"bitmask, {maskCoding}");

        // ... or the gaps between non-zeros, symbol g < G−1 a gap of g, G−1 a run of G−1 zeros that continues. The
        // alphabet is chosen by the estimated size, then written with every coding.
        List<int>? bestGaps = null;
        int bestAlphabet = 0;
        long bestEstimate = long.MaxValue;
        foreach (int alphabet in GapAlphabets)
        {
            var symbols = GapSymbols(nonzero, alphabet);
            long estimate = SymbolStream.EstimateBytes(CollectionsMarshal.AsSpan(symbols), alphabet);
            if (estimate < bestEstimate)
            {
                (bestGaps, bestAlphabet, bestEstimate) = (symbols, alphabet, estimate);
            }
        }

        var gaps = new FormatWriter();
        gaps.Byte(Gaps);
        gaps.VarUInt(bestAlphabet);
        gaps.VarUInt(bestGaps!.Count);
        var coding = SymbolStream.Write(gaps, CollectionsMarshal.AsSpan(bestGaps), bestAlphabet);
        if (gaps.Length < best.Writer.Length)
        {
            best = (gaps, $"gaps < {bestAlphabet}, {coding}");
        }

        writer.Bytes(best.Writer.Written);
        return best.Name;
    }

    private static List<int> GapSymbols(List<int> nonzero, int alphabet)
    {
        var symbols = new List<int>(nonzero.Count);
        int previous = -1;
        foreach (int p in nonzero)
        {
            int gap = p - previous - 1;
            while (gap >= alphabet - 1)
            {
                symbols.Add(alphabet - 1);
                gap -= alphabet - 1;
            }

            symbols.Add(gap);
            previous = p;
        }

        return symbols;
    }

    private static (int[]? Positions, byte Layout) ReadLayout(ref FormatReader reader, long count, DecodeBudget budget, string what)
    {
        budget.Take(count, what, ref reader);
        byte layout = reader.Byte();
        if (layout == Dense)
        {
            return (null, Dense);
        }

        if (layout != Sparse)
        {
            throw reader.Fail($"{what} has layout {layout}, neither dense (0) nor sparse (1)");
        }

        int nonzero = (int)reader.VarUInt($"the non-zero count of {what}", 0, count);
        byte method = reader.Byte();
        int[] positions;
        if (method == Bitmask)
        {
            // The positions are allocated once the coded data has shown it holds them (here and for gaps below).
            var mask = SymbolStream.Read(ref reader, (count + 7) / 8, 256, $"the bitmask of {what}");
            positions = new int[nonzero];
            int found = 0;
            for (int p = 0; p < count; p++)
            {
                if (((mask[p >> 3] >> (p & 7)) & 1) == 0)
                {
                    continue;
                }

                if (found == nonzero)
                {
                    throw reader.Fail($"the bitmask of {what} marks more than the {nonzero} non-zeros declared");
                }

                positions[found++] = p;
            }

            if (found != nonzero || (count % 8 != 0 && mask.Length > 0 && (mask[^1] >> (int)(count % 8)) != 0))
            {
                throw reader.Fail($"the bitmask of {what} marks {found} positions, not the {nonzero} declared");
            }
        }
        else if (method == Gaps)
        {
            int alphabet = (int)reader.VarUInt($"the gap alphabet of {what}", 2, 256);
            long symbolCount = reader.VarUInt($"the gap count of {what}", nonzero, count);
            var symbols = SymbolStream.Read(ref reader, symbolCount, alphabet, $"the gaps of {what}");
            positions = new int[nonzero];
            long position = -1;
            int found = 0;
            long run = 0;
            foreach (int s in symbols)
            {
                if (s == alphabet - 1)
                {
                    run += s;
                    continue;
                }

                position += run + s + 1;
                run = 0;
                if (found == nonzero || position >= count)
                {
                    throw reader.Fail($"the gaps of {what} run past its {count} positions or {nonzero} non-zeros");
                }

                positions[found++] = (int)position;
            }

            if (found != nonzero || run != 0)
            {
                throw reader.Fail($"the gaps of {what} give {found} positions, not the {nonzero} declared");
            }
        }
        else
        {
            throw reader.Fail($"{what} has position coding {method}, neither bitmask (0) nor gaps (1)");
        }

        return (positions, Sparse);
    }

    private static T[] Scatter<T>(T[] values, int[] positions, long count, T zero, ref FormatReader reader, string what)
    {
        if (values.Length != positions.Length)
        {
            throw reader.Fail($"{what} holds {values.Length} values for {positions.Length} positions");
        }

        var result = new T[count];
        if (!EqualityComparer<T>.Default.Equals(zero, default))
        {
            Array.Fill(result, zero);
        }

        for (int i = 0; i < positions.Length; i++)
        {
            result[positions[i]] = values[i];
        }

        return result;
    }

    /// <summary>Writes floats at the narrowest of float32, float16 and bfloat16 that holds every one exactly.</summary>
    private static string WriteRaw(FormatWriter writer, float[] values)
    {
        bool half = values.All(v => (float)(Half)v == v && float.IsNegative((float)(Half)v) == float.IsNegative(v));
        bool brain = !half && values.All(v => (BitConverter.SingleToInt32Bits(v) & 0xFFFF) == 0);
        writer.Byte(half ? (byte)1 : brain ? (byte)2 : (byte)0);
        foreach (float v in values)
        {
            if (half)
            {
                writer.UInt16(BitConverter.HalfToUInt16Bits((Half)v));
            }
            else if (brain)
            {
                writer.UInt16((ushort)(BitConverter.SingleToUInt32Bits(v) >> 16));
            }
            else
            {
                writer.Float32(v);
            }
        }

        return half ? "float16" : brain ? "bfloat16" : "float32";
    }

    private static float[] ReadRaw(ref FormatReader reader, long count, string what)
    {
        byte precision = reader.Byte();
        int width = precision switch
        {
            0 => 4,
            1 or 2 => 2,
            _ => throw reader.Fail($"{what} has float type {precision}, not float32 (0), float16 (1) or bfloat16 (2)"),
        };
        if (count * width > reader.Remaining)
        {
            throw reader.Fail($"{what} declares {count} values but only {reader.Remaining} bytes are left");
        }

        var bytes = reader.Bytes((int)(count * width), what);
        var values = new float[count];
        for (int i = 0; i < values.Length; i++)
        {
            var slot = bytes.Slice(i * width, width);
            float v = precision switch
            {
                0 => System.Buffers.Binary.BinaryPrimitives.ReadSingleLittleEndian(slot),
                1 => (float)BitConverter.UInt16BitsToHalf(System.Buffers.Binary.BinaryPrimitives.ReadUInt16LittleEndian(slot)),
                _ => BitConverter.UInt32BitsToSingle((uint)System.Buffers.Binary.BinaryPrimitives.ReadUInt16LittleEndian(slot) << 16),
            };
            if (!float.IsFinite(v))
            {
                throw reader.Fail($"{what} holds a NaN or infinite value");
            }

            values[i] = v;
        }

        return values;
    }
}

/// <summary>
/// What a load may still decode, in bytes, from <see cref="CompressedModelLoadOptions.MaxDecodedBytes"/>: each tensor
/// is charged 4 bytes per element of its declared shape before any of it is decoded. Decoding then allocates in
/// proportion to that shape (the values, and at most the same again in symbols and positions), and only once the coded
/// data has shown it holds that many elements (see <see cref="SymbolStream"/>), so a small file claiming a large
/// shape fails at the ceiling or at its data, not after a large allocation.
/// </summary>
internal sealed class DecodeBudget(long bytes)
{
    public long Left { get; private set; } = bytes;

    public void Take(long elements, string what, ref FormatReader reader)
    {
        if (elements < 0 || elements > Array.MaxLength || elements * 4 > Left)
        {
            throw reader.Fail(
                $"{what} would decode to {elements} elements, more than this load may decode ({Left / 4} elements left of " +
                $"{nameof(CompressedModelLoadOptions)}.{nameof(CompressedModelLoadOptions.MaxDecodedBytes)}; raise it to load a model this large)");
        }

        Left -= elements * 4;
    }
}
