namespace ModelCompression.Serialization;

/// <summary>
/// Writes a file so that readers see the old file or the complete new one, never a part: the content goes to a
/// temporary file beside the target, is flushed to disk, then renamed over the target (an atomic replace on one
/// volume); on any failure the temporary file is deleted and the target is untouched.
/// </summary>
/// <remarks>
/// <para>A target that is a symbolic link is followed to the file it finally names: that file is replaced (the
/// temporary file is written in its directory, so the rename stays on its volume) and the link is kept.</para>
/// <para>A save killed midway leaves its temporary file, <c>.{name}.{32 hex digits}.tmp</c>. The next save of the same
/// target deletes such files once they are <see cref="StaleAfter"/> old and no one holds them open (a live save holds
/// its own exclusively), and no other file.</para>
/// </remarks>
internal static class AtomicFile
{
    /// <summary>How long a temporary file must have gone unwritten before a later save of its target deletes it.</summary>
    public static readonly TimeSpan StaleAfter = TimeSpan.FromMinutes(1);

    private const string Suffix = ".tmp";
    private const int GuidDigits = 32;

    /// <summary>Writes <paramref name="path"/> through <paramref name="write"/>.</summary>
    /// <param name="path">The file to write or replace; a symbolic link is followed to its final target.</param>
    /// <param name="write">Writes the content to the stream it is given.</param>
    /// <param name="wrap">Wraps the temporary file's stream (tests use it to fail a write midway), or <see langword="null"/>.</param>
    public static void Write(string path, Action<Stream> write, Func<Stream, Stream>? wrap = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        ArgumentNullException.ThrowIfNull(write);
        string full = FinalTarget(Path.GetFullPath(path));
        string directory = Path.GetDirectoryName(full) ?? throw new ArgumentException($"'{path}' has no directory.", nameof(path));
        string name = Path.GetFileName(full);
        DeleteStaleTemporaries(directory, name);
        string temporary = Path.Combine(directory, $".{name}.{Guid.NewGuid():N}{Suffix}");
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

    /// <summary>The file a path names once every symbolic link is followed (the path itself when it is no link).</summary>
    private static string FinalTarget(string full)
    {
        var info = new FileInfo(full);
        if (info.LinkTarget is null)
        {
            return full;
        }

        // A link whose target does not exist yet still names it; a loop of links is the caller's error (IOException).
        var target = info.ResolveLinkTarget(returnFinalTarget: true);
        return target is null ? full : Path.GetFullPath(target.FullName);
    }

    /// <summary>Deletes the temporary files of earlier, interrupted saves of <paramref name="name"/> that no live save holds.</summary>
    private static void DeleteStaleTemporaries(string directory, string name)
    {
        IEnumerable<string> candidates;
        try
        {
            candidates = Directory.EnumerateFiles(directory, "*" + Suffix).Where(f => IsTemporaryOf(Path.GetFileName(f), name)).ToList();
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            return;
        }

        var cutoff = DateTime.UtcNow - StaleAfter;
        foreach (string candidate in candidates)
        {
            try
            {
                if (File.GetLastWriteTimeUtc(candidate) > cutoff)
                {
                    continue;
                }

                // Opening it exclusively fails while a save still holds it; deleting on close removes it under that lock.
                using var _ = new FileStream(candidate, FileMode.Open, FileAccess.ReadWrite, FileShare.None, 1, FileOptions.DeleteOnClose);
            }
            catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
            {
                // In use, already gone, or not ours to delete: leave it.
            }
        }
    }

    /// <summary>Whether <paramref name="fileName"/> is <c>.{name}.{32 lower-case hex digits}.tmp</c>, the temporary name <see cref="Write"/> gives.</summary>
    internal static bool IsTemporaryOf(string fileName, string name)
    {
        if (fileName.Length != 1 + name.Length + 1 + GuidDigits + Suffix.Length
            || fileName[0] != '.'
            || !fileName.AsSpan(1).StartsWith(name, StringComparison.Ordinal)
            || fileName[1 + name.Length] != '.'
            || !fileName.EndsWith(Suffix, StringComparison.Ordinal))
        {
            return false;
        }

        foreach (char c in fileName.AsSpan(2 + name.Length, GuidDigits))
        {
            if (!char.IsAsciiHexDigitLower(c))
            {
                return false;
            }
        }

        return true;
    }
}
