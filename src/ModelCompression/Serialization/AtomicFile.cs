namespace ModelCompression.Serialization;

/// <summary>
/// Writes a file so that readers see the old file or the complete new one, never a part: the content goes to a
/// temporary file beside the target, is flushed to disk, then renamed over the target (an atomic replace on one
/// volume); on any failure the temporary file is deleted and the target is untouched.
/// </summary>
internal static class AtomicFile
{
    /// <summary>Writes <paramref name="path"/> through <paramref name="write"/>.</summary>
    /// <param name="path">The file to write or replace.</param>
    /// <param name="write">Writes the content to the stream it is given.</param>
    /// <param name="wrap">Wraps the temporary file's stream (tests use it to fail a write midway), or <see langword="null"/>.</param>
    public static void Write(string path, Action<Stream> write, Func<Stream, Stream>? wrap = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        ArgumentNullException.ThrowIfNull(write);
        string full = Path.GetFullPath(path);
        string directory = Path.GetDirectoryName(full) ?? throw new ArgumentException($"'{path}' has no directory.", nameof(path));
        string temporary = Path.Combine(directory, $".{Path.GetFileName(full)}.{Guid.NewGuid():N}.tmp");
        try
        {
            using (var file = new FileStream(temporary, FileMode.CreateNew, FileAccess.Write, FileShare.None))
            {
                var stream = wrap?.Invoke(file) ?? file;
                write(stream);
                stream.Flush();
                file.Flush(flushToDisk: true);
            }

            File.Move(temporary, full, overwrite: true);
        }
        catch
        {
            File.Delete(temporary);
            throw;
        }
    }
}
