namespace ModelCompression.Interactive;

/// <summary>
/// What a notebook needs before its first ModelCompression cell. The package's notebook extension calls
/// <see cref="Initialize"/> when a notebook references <c>ModelCompression.Interactive</c>; nothing else is needed.
/// </summary>
public static class ModelCompressionNotebook
{
    /// <summary>
    /// Registers the formatters (<see cref="ModelCompressionFormatters.Register"/>) and makes TorchSharp's native library
    /// loadable (<see cref="TorchSharpNative.EnsureLoaded()"/>). Writes one line saying what was done.
    /// If TorchSharp's native library cannot be prepared yet (TorchSharp-cpu not referenced), the line says so and
    /// <see cref="TorchSharpNative.EnsureLoaded()"/> can be called again later; nothing is thrown.
    /// </summary>
    /// <returns>What was done for TorchSharp's native library, or <see langword="null"/> when it could not be prepared yet.</returns>
    public static TorchSharpNativeOutcome? Initialize()
    {
        ModelCompressionFormatters.Register();
        try
        {
            var result = TorchSharpNative.EnsureLoaded();
            Console.WriteLine(result switch
            {
                TorchSharpNativeOutcome.LoadedPatchedCopy => $"ModelCompression: formatters registered; TorchSharp's native library loaded from a copy patched for this system's libstdc++ (it lacks {TorchSharpNative.GlibcxxVersion}).",
                _ => "ModelCompression: formatters registered; TorchSharp's native library needs no fix here.",
            });
            return result;
        }
        catch (InvalidOperationException ex)
        {
            Console.WriteLine($"ModelCompression: formatters registered; TorchSharp's native library is not prepared yet: {ex.Message} Then call ModelCompression.Interactive.TorchSharpNative.EnsureLoaded().");
            return null;
        }
    }
}
