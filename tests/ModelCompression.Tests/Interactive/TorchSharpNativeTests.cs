using System.Reflection;
using System.Text;
using ModelCompression.Interactive;
using ModelCompression.NativeFix;
using NUnit.Framework;

namespace ModelCompression.Tests.Interactive;

[TestFixture]
public sealed class TorchSharpNativeTests
{
    private string root = null!;

    [SetUp]
    public void SetUp() => root = Directory.CreateTempSubdirectory("mc-native-").FullName;

    [TearDown]
    public void TearDown() => Directory.Delete(root, recursive: true);

    private static string PackageRoot() =>
        typeof(TorchSharpNativeTests).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>().Single(a => a.Key == "NuGetPackageRoot").Value!;

    private static string UnpatchedLibTorchSharp()
    {
        string path = Path.Combine(PackageRoot(), "torchsharp", "0.107.0", "runtimes", "linux-x64", "native", "libLibTorchSharp.so");
        if (!File.Exists(path))
        {
            Assert.Ignore($"TorchSharp's linux-x64 native library is not in the NuGet cache ({path}).");
        }

        return path;
    }

    private static int OnlyChangedByte(byte[] before, byte[] after)
    {
        var changed = Enumerable.Range(0, before.Length).Where(i => before[i] != after[i]).ToArray();
        Assert.That(changed, Has.Length.EqualTo(1), "exactly one byte changes");
        return changed[0];
    }

    // The System V ABI's ELF hash, which an Elf64_Vernaux entry stores (vna_hash) for its version name.
    private static uint ElfHash(string name)
    {
        uint h = 0;
        foreach (byte c in Encoding.ASCII.GetBytes(name))
        {
            h = (h << 4) + c;
            uint g = h & 0xF0000000;
            if (g != 0)
            {
                h ^= g >> 24;
            }

            h &= ~g;
        }

        return h;
    }

    [Test]
    public void MarkWeak_TorchSharpsLibrary_SetsTheWeakFlagOnThatOneNeedOnly()
    {
        byte[] original = File.ReadAllBytes(UnpatchedLibTorchSharp());
        byte[] patched = (byte[])original.Clone();

        Assert.That(GlibcxxNeed.MarkWeak(patched, "GLIBCXX_3.4.32"), Is.True);
        int at = OnlyChangedByte(original, patched);
        Assert.That(patched[at], Is.EqualTo(original[at] | 0x2), "VER_FLG_WEAK is bit 1 of vna_flags");
        // The changed byte is vna_flags of the entry whose vna_hash (the 4 bytes before it) is that version's hash.
        Assert.That(BitConverter.ToUInt32(patched, at - 4), Is.EqualTo(ElfHash("GLIBCXX_3.4.32")));

        byte[] again = (byte[])patched.Clone();
        Assert.That(GlibcxxNeed.MarkWeak(again, "GLIBCXX_3.4.32"), Is.False, "already weak");
        Assert.That(again, Is.EqualTo(patched));
        Assert.That(GlibcxxNeed.MarkWeak((byte[])original.Clone(), "GLIBCXX_9.9.99"), Is.False, "a version it does not need");
    }

    [Test]
    public void MarkWeak_TheBuildOutputsCopy_IsThePatchedPackageFile()
    {
        // The build targets (the same code, run by MSBuild) patched the copy next to this test assembly when the system needed it.
        string output = Path.Combine(AppContext.BaseDirectory, "runtimes", "linux-x64", "native", "libLibTorchSharp.so");
        byte[] expected = File.ReadAllBytes(UnpatchedLibTorchSharp());
        bool needed = !GlibcxxNeed.SystemLibStdCxxHas("GLIBCXX_3.4.32");
        if (needed)
        {
            GlibcxxNeed.MarkWeak(expected, "GLIBCXX_3.4.32");
        }

        Assert.That(File.ReadAllBytes(output), Is.EqualTo(expected));
    }

    [Test]
    public void MarkWeak_NotAnElfFile_Throws()
    {
        Assert.Throws<InvalidDataException>(() => GlibcxxNeed.MarkWeak(Encoding.ASCII.GetBytes("#!/bin/sh\necho not a library\n".PadRight(80)), "GLIBCXX_3.4.32"));
        byte[] truncated = File.ReadAllBytes(UnpatchedLibTorchSharp())[..4096];
        Assert.Throws<InvalidDataException>(() => GlibcxxNeed.MarkWeak(truncated, "GLIBCXX_3.4.32"));
    }

    [Test]
    public void EnsureLoaded_InTheTestHost_FindsTheBuildOutputsLibrary()
    {
        using var t = TorchSharp.torch.ones(2);
        var outcome = TorchSharpNative.EnsureLoaded();
        Assert.That(outcome, Is.EqualTo(GlibcxxNeed.SystemLibStdCxxHas(TorchSharpNative.GlibcxxVersion) ? TorchSharpNativeOutcome.NotNeeded : TorchSharpNativeOutcome.AlreadyLoaded));
    }

    [Test]
    public void WritePatchedCopy_WritesThePatchedLibraryOnceAndLeavesNoTemporaryFiles()
    {
        string original = UnpatchedLibTorchSharp();
        string folder = Path.Combine(root, "native");
        byte[] expected = File.ReadAllBytes(original);
        GlibcxxNeed.MarkWeak(expected, TorchSharpNative.GlibcxxVersion);

        string copy = TorchSharpNative.WritePatchedCopy(original, folder);
        Assert.That(File.ReadAllBytes(copy), Is.EqualTo(expected));
        var written = File.GetLastWriteTimeUtc(copy);
        File.SetLastWriteTimeUtc(copy, written.AddMinutes(-5));

        Assert.That(TorchSharpNative.WritePatchedCopy(original, folder), Is.EqualTo(copy));
        Assert.That(File.GetLastWriteTimeUtc(copy), Is.EqualTo(written.AddMinutes(-5)), "an identical copy is reused, not rewritten");

        File.WriteAllBytes(copy, [1, 2, 3]);
        TorchSharpNative.WritePatchedCopy(original, folder);
        Assert.That(File.ReadAllBytes(copy), Is.EqualTo(expected), "a damaged copy is replaced");
        Assert.That(Directory.GetFiles(folder).Select(Path.GetFileName), Is.EqualTo(new[] { "libLibTorchSharp.so" }));
        Assert.That(File.ReadAllBytes(original), Is.Not.EqualTo(expected), "the package's file is left as it was");
    }

    private string FakeTorchSharp(string version = "0.107.0")
    {
        string lib = Path.Combine(root, "torchsharp", version, "lib", "net8.0");
        Directory.CreateDirectory(lib);
        string native = Path.Combine(root, "torchsharp", version, "runtimes", "linux-x64", "native");
        Directory.CreateDirectory(native);
        File.WriteAllBytes(Path.Combine(native, "libLibTorchSharp.so"), [0x7F]);
        return Path.Combine(lib, "TorchSharp.dll");
    }

    private void FakeLibTorch(string version)
    {
        string native = Path.Combine(root, "libtorch-cpu-linux-x64", version, "runtimes", "linux-x64", "native");
        Directory.CreateDirectory(native);
        File.WriteAllBytes(Path.Combine(native, "libtorch.so"), [0x7F]);
    }

    [Test]
    public void Locate_PicksTheLibTorchVersionTorchSharpCpuNames()
    {
        string assembly = FakeTorchSharp();
        FakeLibTorch("2.9.0");
        FakeLibTorch("2.10.0");
        string spec = Path.Combine(root, "torchsharp-cpu", "0.107.0");
        Directory.CreateDirectory(spec);
        File.WriteAllText(Path.Combine(spec, "torchsharp-cpu.nuspec"), """
            <?xml version="1.0" encoding="utf-8"?>
            <package xmlns="http://schemas.microsoft.com/packaging/2013/05/nuspec.xsd"><metadata><id>TorchSharp-cpu</id><dependencies>
              <group targetFramework="net8.0"><dependency id="libtorch-cpu" version="[2.10.0]" /><dependency id="TorchSharp" version="0.107.0" /></group>
            </dependencies></metadata></package>
            """);

        var files = NativeFiles.Locate(assembly, "linux-x64");

        Assert.That(files.TorchSharpVersion, Is.EqualTo("0.107.0"));
        Assert.That(files.LibTorchSharp, Is.EqualTo(Path.Combine(root, "torchsharp", "0.107.0", "runtimes", "linux-x64", "native", "libLibTorchSharp.so")));
        Assert.That(files.LibTorchDirectory, Is.EqualTo(Path.Combine(root, "libtorch-cpu-linux-x64", "2.10.0", "runtimes", "linux-x64", "native")));
    }

    [Test]
    public void Locate_WithoutTorchSharpCpu_TakesTheOnlyLibTorchOrSaysWhichAreThere()
    {
        string assembly = FakeTorchSharp();
        var none = Assert.Throws<InvalidOperationException>(() => NativeFiles.Locate(assembly, "linux-x64"));
        Assert.That(none!.Message, Does.Contain("No libtorch-cpu-linux-x64 package").And.Contain("#r \"nuget: TorchSharp-cpu"));

        FakeLibTorch("2.10.0");
        Assert.That(NativeFiles.Locate(assembly, "linux-x64").LibTorchDirectory, Does.Contain(Path.Combine("2.10.0", "runtimes")));

        FakeLibTorch("2.9.0");
        var several = Assert.Throws<InvalidOperationException>(() => NativeFiles.Locate(assembly, "linux-x64"));
        Assert.That(several!.Message, Does.Contain("2.10.0, 2.9.0"));
    }

    [Test]
    public void Locate_OutsideAPackageFolder_SaysWhatToReference()
    {
        string app = Path.Combine(root, "app");
        Directory.CreateDirectory(app);
        var ex = Assert.Throws<InvalidOperationException>(() => NativeFiles.Locate(Path.Combine(app, "TorchSharp.dll"), "linux-x64"));
        Assert.That(ex!.Message, Does.Contain("not loaded from a NuGet package folder"));

        string assembly = FakeTorchSharp("0.106.0");
        File.Delete(Path.Combine(root, "torchsharp", "0.106.0", "runtimes", "linux-x64", "native", "libLibTorchSharp.so"));
        ex = Assert.Throws<InvalidOperationException>(() => NativeFiles.Locate(assembly, "linux-x64"));
        Assert.That(ex!.Message, Does.Contain("TorchSharp 0.106.0's native library is not at"));
    }
}
