namespace ModelCompression.Quantization;

/// <summary>
/// Float weights that lie on a grid of symmetric integer levels times one scale per row or per group of a row: how a
/// weight is rounded onto such a grid in place (for layers a quantized layer cannot replace), and how the file finds
/// the grid again to store levels and scales instead of floats. Both compute a value as <c>(float)level * scale</c>
/// in float32, so finding the grid is exact.
/// </summary>
internal static class WeightGrid
{
    // The scale the writer derives from a group's largest magnitude can differ from the one the weights were rounded
    // with by a rounding step or two; it tries this many neighbours on each side.
    private const int ScaleNeighbours = 3;

    private static readonly int[] MaxLevels = [7, 127];
    // 0 is the whole row; the rest are the group sizes the file looks for (see StorableGroup).
    private static readonly int[] GroupSizes = [0, 1024, 512, 256, 128, 64, 32, 16, 8];

    /// <summary>A grid found in an array: the group size (inputs per scale), the largest level, the scales and levels, row-major.</summary>
    public sealed record Grid(int GroupSize, int MaxLevel, float[] Scales, sbyte[] Levels);

    /// <summary>
    /// The group size to round with so that the file finds the grid again: <paramref name="requested"/> when it is a
    /// power of two from 8 to 1,024 (or 0, the whole row), else the largest such power below it (finer groups).
    /// </summary>
    public static int StorableGroup(int requested) =>
        requested <= 0 ? 0 : Array.Find(GroupSizes, g => g != 0 && g <= Math.Max(8, requested));

    /// <summary>
    /// Rounds <paramref name="values"/> (row-major, <paramref name="rows"/> rows) in place to the nearest of
    /// <paramref name="bits"/>-bit symmetric levels times a scale per group of <paramref name="groupSize"/> inputs
    /// (0: one scale per row), the scale being the group's largest magnitude over the largest level.
    /// </summary>
    /// <returns>The largest absolute change.</returns>
    public static float Round(Span<float> values, long rows, int bits, int groupSize)
    {
        int maxLevel = (1 << (bits - 1)) - 1;
        int columns = checked((int)(values.Length / rows));
        int group = groupSize <= 0 || groupSize > columns ? columns : groupSize;
        float largest = 0;
        for (long row = 0; row < rows; row++)
        {
            for (int start = 0; start < columns; start += group)
            {
                var slice = values.Slice(checked((int)((row * columns) + start)), Math.Min(group, columns - start));
                float max = 0;
                foreach (float v in slice)
                {
                    max = MathF.Max(max, MathF.Abs(v));
                }

                if (max == 0)
                {
                    continue;
                }

                float scale = max / maxLevel;
                for (int i = 0; i < slice.Length; i++)
                {
                    float level = Math.Clamp(MathF.Round(slice[i] / scale, MidpointRounding.ToEven), -maxLevel, maxLevel);
                    float rounded = level * scale;
                    largest = MathF.Max(largest, MathF.Abs(rounded - slice[i]));
                    slice[i] = rounded == 0 ? 0 : rounded;
                }
            }
        }

        return largest;
    }

    /// <summary>
    /// Finds the grid <paramref name="values"/> lie on exactly (int4 levels before int8, the largest groups first),
    /// or <see langword="null"/> when there is none.
    /// </summary>
    public static Grid? Find(ReadOnlySpan<float> values, long rows)
    {
        if (rows <= 0 || values.Length == 0 || values.Length % rows != 0)
        {
            return null;
        }

        int columns = checked((int)(values.Length / rows));
        foreach (int maxLevel in MaxLevels)
        {
            foreach (int candidate in GroupSizes)
            {
                int group = candidate == 0 ? columns : candidate;
                if (group > columns || (candidate != 0 && group == columns))
                {
                    continue;
                }

                if (TryGroups(values, rows, columns, group, maxLevel) is { } grid)
                {
                    return grid;
                }
            }
        }

        return null;
    }

    private static Grid? TryGroups(ReadOnlySpan<float> values, long rows, int columns, int group, int maxLevel)
    {
        int groupsPerRow = (columns + group - 1) / group;
        var scales = new float[rows * groupsPerRow];
        var levels = new sbyte[values.Length];
        for (long row = 0; row < rows; row++)
        {
            for (int g = 0; g < groupsPerRow; g++)
            {
                int start = checked((int)((row * columns) + (g * group)));
                int length = Math.Min(group, columns - (g * group));
                var slice = values.Slice(start, length);
                var sliceLevels = levels.AsSpan(start, length);
                float max = 0;
                foreach (float v in slice)
                {
                    max = MathF.Max(max, MathF.Abs(v));
                }

                if (max == 0)
                {
                    scales[(row * groupsPerRow) + g] = 1;
                    continue;
                }

                if (FindScale(slice, max / maxLevel, maxLevel, sliceLevels) is not { } scale)
                {
                    return null;
                }

                scales[(row * groupsPerRow) + g] = scale;
            }
        }

        return new Grid(group, maxLevel, scales, levels);
    }

    private static float? FindScale(ReadOnlySpan<float> slice, float estimate, int maxLevel, Span<sbyte> levels)
    {
        float below = estimate, above = estimate;
        for (int step = 0; step <= ScaleNeighbours; step++)
        {
            if (Fits(slice, above, maxLevel, levels))
            {
                return above;
            }

            if (step > 0 && Fits(slice, below, maxLevel, levels))
            {
                return below;
            }

            above = MathF.BitIncrement(above);
            below = MathF.BitDecrement(below);
        }

        return null;
    }

    private static bool Fits(ReadOnlySpan<float> slice, float scale, int maxLevel, Span<sbyte> levels)
    {
        if (!(scale > 0) || !float.IsFinite(scale))
        {
            return false;
        }

        for (int i = 0; i < slice.Length; i++)
        {
            float level = MathF.Round(slice[i] / scale, MidpointRounding.ToEven);
            if (level < -maxLevel || level > maxLevel || level * scale != slice[i])
            {
                return false;
            }

            levels[i] = (sbyte)level;
        }

        return true;
    }
}
