using System.Runtime.InteropServices;
using System.Xml.Linq;
using ModelCompression.NativeFix;

namespace ModelCompression.Interactive;

/// <summary>What <see cref="TorchSharpNative.EnsureLoaded()"/> found or did.</summary>
public enum TorchSharpNativeOutcome
{
    /// <summary>Nothing was needed: not Linux, or the system libstdc++ has the version TorchSharp's library needs.</summary>
    NotNeeded,

    /// <summary>TorchSharp's native library was already loadable the usual way (an application build, or an earlier call).</summary>
    AlreadyLoaded,

    /// <summary>A patched private copy of TorchSharp's native library was loaded, beside LibTorch from the NuGet cache.</summary>
    LoadedPatchedCopy,
}

/// <summary>
/// Makes TorchSharp usable in notebook hosts (.NET Interactive, Polyglot Notebooks, dotnet-repl) on Linux systems whose
/// libstdc++ is older than the one TorchSharp's native library was built against (Debian 12, Ubuntu 22.04).
/// </summary>
/// <remarks>
/// <para>
/// TorchSharp 0.107.0's <c>libLibTorchSharp.so</c> asks for the <c>GLIBCXX_3.4.32</c> symbol version through one symbol
/// it never uses, so such systems refuse to load it. Applications get a patched copy at build time from the
/// ModelCompression package's build targets; a notebook has no build step, and TorchSharp loads its native library from
/// the NuGet cache. This class does the same patch at run time instead: it writes a copy of TorchSharp's library with
/// that one version need marked weak into a private folder (never touching the NuGet cache), loads LibTorch from the
/// <c>libtorch-cpu-*</c> package, then loads the copy, before the first TorchSharp call. TorchSharp then finds the loaded
/// library by name.
/// </para>
/// <para>
/// Referencing <c>ModelCompression.Interactive</c> in a notebook calls <see cref="EnsureLoaded()"/> automatically (the
/// package's notebook extension); reference <c>TorchSharp-cpu</c> in the same cell. Call it yourself if TorchSharp-cpu
/// is referenced later, before the first TorchSharp call. Only the CPU build of LibTorch is looked for.
/// </para>
/// </remarks>
public static class TorchSharpNative
{
    /// <summary>The libstdc++ symbol version TorchSharp 0.107.0's native library needs.</summary>
    public const string GlibcxxVersion = "GLIBCXX_3.4.32";

    private const string LibraryFileName = "libLibTorchSharp.so";
    private static readonly Lock Gate = new();
    private static TorchSharpNativeOutcome? outcome;

    /// <summary>
    /// Makes TorchSharp's native library loadable in this process, finding TorchSharp and LibTorch in the NuGet cache
    /// and keeping the patched copy under the temporary folder. Calls after the first successful one return its result;
    /// after a failure (say, TorchSharp-cpu not referenced yet) the next call tries again.
    /// </summary>
    /// <returns>What was found or done.</returns>
    /// <exception cref="InvalidOperationException">TorchSharp's native library or LibTorch could not be found, copied or loaded; the message says why and what to reference.</exception>
    public static TorchSharpNativeOutcome EnsureLoaded() => EnsureLoaded(null);

    /// <summary>
    /// Makes TorchSharp's native library loadable in this process, keeping the patched copy in
    /// <paramref name="cacheDirectory"/>. Calls after the first successful one return its result.
    /// </summary>
    /// <param name="cacheDirectory">The folder for the patched copy, or <see langword="null"/> for
    /// <c>modelcompression/native/torchsharp-&lt;version&gt;-&lt;rid&gt;</c> under the temporary folder.</param>
    /// <returns>What was found or done.</returns>
    /// <exception cref="InvalidOperationException">TorchSharp's native library or LibTorch could not be found, copied or loaded; the message says why and what to reference.</exception>
    public static TorchSharpNativeOutcome EnsureLoaded(string? cacheDirectory)
    {
        lock (Gate)
        {
            outcome ??= Load(cacheDirectory);
            return outcome.Value;
        }
    }

    private static TorchSharpNativeOutcome Load(string? cacheDirectory)
    {
        if (!OperatingSystem.IsLinux() || GlibcxxNeed.SystemLibStdCxxHas(GlibcxxVersion))
        {
            return TorchSharpNativeOutcome.NotNeeded;
        }

        // typeof does not run TorchSharp's static constructor, which is what would fail.
        var torchSharp = typeof(TorchSharp.torch).Assembly;
        if (NativeLibrary.TryLoad("LibTorchSharp", torchSharp, null, out _))
        {
            return TorchSharpNativeOutcome.AlreadyLoaded;
        }

        var files = NativeFiles.Locate(torchSharp.Location, RuntimeIdentifier());
        string folder = cacheDirectory ?? Path.Combine(Path.GetTempPath(), "modelcompression", "native", $"torchsharp-{files.TorchSharpVersion}-{files.RuntimeIdentifier}");
        string copy;
        try
        {
            copy = WritePatchedCopy(files.LibTorchSharp, folder);
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException or InvalidDataException)
        {
            throw new InvalidOperationException($"Could not write a patched copy of '{files.LibTorchSharp}' to '{folder}': {ex.Message}", ex);
        }

        try
        {
            // LibTorch first, from its package folder (its own libraries find each other there); the copy's needs on
            // libtorch.so, libtorch_cpu.so and libc10.so are then met by the libraries already loaded.
            NativeLibrary.Load(Path.Combine(files.LibTorchDirectory, "libtorch.so"));
            NativeLibrary.Load(copy);
        }
        catch (DllNotFoundException ex)
        {
            throw new InvalidOperationException(
                $"Could not load TorchSharp's native library from the patched copy '{copy}' with LibTorch from '{files.LibTorchDirectory}': {ex.Message}", ex);
        }

        if (!NativeLibrary.TryLoad("LibTorchSharp", torchSharp, null, out _))
        {
            throw new InvalidOperationException($"Loaded '{copy}', but TorchSharp still cannot find its native library by name.");
        }

        return TorchSharpNativeOutcome.LoadedPatchedCopy;
    }

    private static string RuntimeIdentifier() => RuntimeInformation.ProcessArchitecture switch
    {
        System.Runtime.InteropServices.Architecture.X64 => "linux-x64",
        System.Runtime.InteropServices.Architecture.Arm64 => "linux-arm64",
        var other => throw new InvalidOperationException($"TorchSharp has no native build for Linux on {other}."),
    };

    // Writes the patched copy unless an identical one is already there; a new file is moved into place whole, so
    // processes starting together never load a half-written copy.
    internal static string WritePatchedCopy(string original, string folder)
    {
        byte[] bytes = File.ReadAllBytes(original);
        GlibcxxNeed.MarkWeak(bytes, GlibcxxVersion);
        Directory.CreateDirectory(folder);
        string copy = Path.Combine(folder, LibraryFileName);
        if (File.Exists(copy) && File.ReadAllBytes(copy).AsSpan().SequenceEqual(bytes))
        {
            return copy;
        }

        string temp = Path.Combine(folder, $"{LibraryFileName}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp");
        try
        {
            File.WriteAllBytes(temp, bytes);
            File.Move(temp, copy, overwrite: true);
        }
        finally
        {
            File.Delete(temp);
        }

        return copy;
    }
}

/// <summary>Where TorchSharp's native library and LibTorch lie in a NuGet package folder.</summary>
/// <param name="TorchSharpVersion">The TorchSharp package version.</param>
/// <param name="RuntimeIdentifier">The runtime identifier, e.g. <c>linux-x64</c>.</param>
/// <param name="LibTorchSharp">The path of TorchSharp's <c>libLibTorchSharp.so</c> in its package.</param>
/// <param name="LibTorchDirectory">The folder of <c>libtorch.so</c> in the <c>libtorch-cpu-&lt;rid&gt;</c> package.</param>
internal sealed record NativeFiles(string TorchSharpVersion, string RuntimeIdentifier, string LibTorchSharp, string LibTorchDirectory)
{
    private const string Advice = "Reference TorchSharp-cpu from NuGet in the notebook (#r \"nuget: TorchSharp-cpu, <version>\") before the first TorchSharp call.";

    /// <summary>
    /// Finds the files from the location of <c>TorchSharp.dll</c> in a NuGet package folder
    /// (<c>&lt;packages&gt;/torchsharp/&lt;version&gt;/lib/&lt;tfm&gt;/TorchSharp.dll</c>). LibTorch's version is the one
    /// TorchSharp-cpu of the same version depends on, or the only one installed.
    /// </summary>
    internal static NativeFiles Locate(string torchSharpAssembly, string rid)
    {
        var versionDir = Path.GetDirectoryName(Path.GetDirectoryName(Path.GetDirectoryName(torchSharpAssembly)));
        var packageDir = versionDir is null ? null : Path.GetDirectoryName(versionDir);
        var packagesRoot = packageDir is null ? null : Path.GetDirectoryName(packageDir);
        if (versionDir is null || packagesRoot is null || !string.Equals(Path.GetFileName(packageDir), "torchsharp", StringComparison.OrdinalIgnoreCase))
        {
            throw new InvalidOperationException($"TorchSharp was not loaded from a NuGet package folder ('{torchSharpAssembly}'). {Advice}");
        }

        string version = Path.GetFileName(versionDir);
        string library = Path.Combine(versionDir, "runtimes", rid, "native", "libLibTorchSharp.so");
        if (!File.Exists(library))
        {
            throw new InvalidOperationException($"TorchSharp {version}'s native library is not at '{library}'. {Advice}");
        }

        string libTorchPackage = Path.Combine(packagesRoot, $"libtorch-cpu-{rid}");
        string[] installed = Directory.Exists(libTorchPackage)
            ? Directory.GetDirectories(libTorchPackage).Where(d => File.Exists(NativeDirectory(d, rid, "libtorch.so"))).Select(Path.GetFileName).OfType<string>().Order(StringComparer.Ordinal).ToArray()
            : [];
        string? wanted = LibTorchVersionOf(packagesRoot, version);
        string libTorchVersion = wanted is not null
            ? installed.Contains(wanted) ? wanted : throw new InvalidOperationException($"TorchSharp-cpu {version} needs libtorch-cpu-{rid} {wanted}, which is not in '{libTorchPackage}'. {Advice}")
            : installed.Length == 1 ? installed[0]
            : throw new InvalidOperationException(installed.Length == 0
                ? $"No libtorch-cpu-{rid} package with libtorch.so is in '{packagesRoot}'. {Advice}"
                : $"Several libtorch-cpu-{rid} versions are installed ({string.Join(", ", installed)}) and TorchSharp-cpu {version}'s package does not say which one it needs. {Advice}");
        return new NativeFiles(version, rid, library, Path.GetDirectoryName(NativeDirectory(Path.Combine(libTorchPackage, libTorchVersion), rid, "libtorch.so"))!);
    }

    private static string NativeDirectory(string versionDir, string rid, string file) => Path.Combine(versionDir, "runtimes", rid, "native", file);

    // TorchSharp-cpu <v> depends on libtorch-cpu <w>, which pulls in libtorch-cpu-<rid> <w>.
    private static string? LibTorchVersionOf(string packagesRoot, string torchSharpVersion)
    {
        string nuspec = Path.Combine(packagesRoot, "torchsharp-cpu", torchSharpVersion, "torchsharp-cpu.nuspec");
        if (!File.Exists(nuspec))
        {
            return null;
        }

        var dependency = XDocument.Load(nuspec).Descendants()
            .FirstOrDefault(e => e.Name.LocalName == "dependency" && string.Equals((string?)e.Attribute("id"), "libtorch-cpu", StringComparison.OrdinalIgnoreCase));
        string? range = (string?)dependency?.Attribute("version");
        return range?.Trim('[', ']', '(', ')', ' ').Split(',')[0].Trim();
    }
}
