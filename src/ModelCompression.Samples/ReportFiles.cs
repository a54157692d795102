namespace ModelCompression.Samples;

/// <summary>Writes reports for the examples and scenarios.</summary>
public static class ReportFiles
{
    /// <summary>Writes the report's JSON to <paramref name="path"/>, creating its folder, through a temporary file so a failed write leaves no half file.</summary>
    /// <param name="report">The report.</param>
    /// <param name="path">The file path.</param>
    /// <returns>The full path written.</returns>
    public static string Write(CompressionReport report, string path)
    {
        ArgumentNullException.ThrowIfNull(report);
        ArgumentException.ThrowIfNullOrEmpty(path);
        var full = Path.GetFullPath(path);
        Directory.CreateDirectory(Path.GetDirectoryName(full)!);
        var temp = full + ".tmp";
        File.WriteAllText(temp, report.ToJson());
        File.Move(temp, full, overwrite: true);
        return full;
    }
}
