namespace ModelCompression.Samples;

/// <summary>The part of a bundled text set an item belongs to. The split is fixed in the data file.</summary>
public enum TextSplit
{
    /// <summary>The training part (80 %).</summary>
    Train,

    /// <summary>The validation part (10 %), for choosing settings and stopping.</summary>
    Validation,

    /// <summary>The held-out test part (10 %).</summary>
    Test,
}
