// Marks one GLIBCXX version need weak (VER_FLG_WEAK) in an ELF shared library, so the loader accepts the library
// on a system whose libstdc++ lacks that version (see ModelCompression.targets for why that is safe for TorchSharp).
// This one file is compiled twice: by MSBuild's RoslynCodeTaskFactory for the build and publish task declared in
// ModelCompression.targets, and into ModelCompression.Interactive (with MODELCOMPRESSION_NO_MSBUILD_TASK defined),
// which patches a private copy at run time for notebook hosts, where no build step runs.
using System;
using System.IO;
using System.Text;
#if !MODELCOMPRESSION_NO_MSBUILD_TASK
using Microsoft.Build.Framework;
using Microsoft.Build.Utilities;
#endif

namespace ModelCompression.NativeFix
{
    internal static class GlibcxxNeed
    {
        private static readonly string[] LibStdCxxCandidates =
        {
            "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
            "/usr/lib/aarch64-linux-gnu/libstdc++.so.6",
            "/lib/x86_64-linux-gnu/libstdc++.so.6",
            "/lib/aarch64-linux-gnu/libstdc++.so.6",
            "/usr/lib64/libstdc++.so.6",
            "/lib64/libstdc++.so.6",
            "/usr/lib/libstdc++.so.6",
        };

        /// <summary>Whether the system libstdc++ at one of the usual places defines the version.</summary>
        internal static bool SystemLibStdCxxHas(string version)
        {
            var needle = Encoding.ASCII.GetBytes(version + "\0");
            foreach (var path in LibStdCxxCandidates)
            {
                if (File.Exists(path) && IndexOf(File.ReadAllBytes(path), needle) >= 0) return true;
            }
            // Not found at the usual places: callers patch, since a weak need is harmless where the version exists.
            return false;
        }

        /// <summary>
        /// Sets the weak flag on the version need named <paramref name="versionName"/> in <paramref name="elf"/>, in
        /// place. Returns true when it changed the bytes; false when the need was already weak or is absent.
        /// </summary>
        internal static bool MarkWeak(byte[] elf, string versionName)
        {
            if (elf.Length < 64 || elf[0] != 0x7F || elf[1] != (byte)'E' || elf[2] != (byte)'L' || elf[3] != (byte)'F')
                throw new InvalidDataException("not an ELF file");
            if (elf[4] != 2 || elf[5] != 1)
                throw new InvalidDataException("not a little-endian 64-bit ELF file");

            ulong shoff = BitConverter.ToUInt64(elf, 0x28);
            int shentsize = BitConverter.ToUInt16(elf, 0x3A);
            int shnum = BitConverter.ToUInt16(elf, 0x3C);
            const uint SHT_GNU_verneed = 0x6ffffffe;

            for (int i = 0; i < shnum; i++)
            {
                long sh = checked((long)shoff + (long)i * shentsize);
                if (sh + 64 > elf.Length) throw new InvalidDataException("truncated section header table");
                uint type = BitConverter.ToUInt32(elf, (int)sh + 4);
                if (type != SHT_GNU_verneed) continue;

                long offset = (long)BitConverter.ToUInt64(elf, (int)sh + 0x18);
                uint link = BitConverter.ToUInt32(elf, (int)sh + 0x28);
                uint count = BitConverter.ToUInt32(elf, (int)sh + 0x2C); // sh_info: number of Verneed entries
                long strSh = checked((long)shoff + (long)link * shentsize);
                if (strSh + 64 > elf.Length) throw new InvalidDataException("truncated section header table");
                long strOff = (long)BitConverter.ToUInt64(elf, (int)strSh + 0x18);

                long vn = offset;
                for (uint n = 0; n < count; n++)
                {
                    if (vn < 0 || vn + 16 > elf.Length) throw new InvalidDataException("truncated version needs");
                    int cnt = BitConverter.ToUInt16(elf, (int)vn + 2);
                    uint aux = BitConverter.ToUInt32(elf, (int)vn + 8);
                    uint next = BitConverter.ToUInt32(elf, (int)vn + 12);
                    long va = vn + aux;
                    for (int k = 0; k < cnt; k++)
                    {
                        if (va < 0 || va + 16 > elf.Length) throw new InvalidDataException("truncated version needs");
                        ushort flags = BitConverter.ToUInt16(elf, (int)va + 4);
                        uint name = BitConverter.ToUInt32(elf, (int)va + 8);
                        uint vnext = BitConverter.ToUInt32(elf, (int)va + 12);
                        if (ReadString(elf, strOff + name) == versionName)
                        {
                            if ((flags & 0x2) != 0) return false;
                            flags |= 0x2;
                            elf[(int)va + 4] = (byte)(flags & 0xFF);
                            elf[(int)va + 5] = (byte)(flags >> 8);
                            return true;
                        }
                        va += vnext;
                    }
                    if (next == 0) break;
                    vn += next;
                }
            }
            return false;
        }

        private static int IndexOf(byte[] haystack, byte[] needle)
        {
            for (int i = 0; i <= haystack.Length - needle.Length; i++)
            {
                int j = 0;
                while (j < needle.Length && haystack[i + j] == needle[j]) j++;
                if (j == needle.Length) return i;
            }
            return -1;
        }

        private static string ReadString(byte[] data, long offset)
        {
            if (offset < 0 || offset >= data.Length) throw new InvalidDataException("string table offset out of range");
            int end = (int)offset;
            while (end < data.Length && data[end] != 0) end++;
            return Encoding.ASCII.GetString(data, (int)offset, end - (int)offset);
        }
    }
}

#if !MODELCOMPRESSION_NO_MSBUILD_TASK
public class ModelCompressionWeakenGlibcxxNeed : Task
{
    [Required] public string[] Directories { get; set; }
    [Required] public string VersionName { get; set; }
    public bool Force { get; set; }

    public override bool Execute()
    {
        if (!Force && ModelCompression.NativeFix.GlibcxxNeed.SystemLibStdCxxHas(VersionName))
        {
            return true;
        }

        foreach (var dir in Directories)
        {
            if (string.IsNullOrEmpty(dir) || !Directory.Exists(dir)) continue;
            foreach (var file in Directory.EnumerateFiles(dir, "libLibTorchSharp.so", SearchOption.AllDirectories))
            {
                try
                {
                    byte[] elf = File.ReadAllBytes(file);
                    if (ModelCompression.NativeFix.GlibcxxNeed.MarkWeak(elf, VersionName))
                    {
                        WriteReplacing(file, elf);
                        Log.LogMessage(MessageImportance.High,
                            "ModelCompression: marked the " + VersionName + " version need weak in " + file +
                            (Force ? " (patching was forced)." : " (the system libstdc++ lacks it)."));
                    }
                }
                catch (Exception ex)
                {
                    // A file this task cannot read as expected is left alone: a warning, never a failed build.
                    Log.LogWarning("ModelCompression: could not patch " + file + ": " + ex.Message);
                }
            }
        }
        return !Log.HasLoggedErrors;
    }

    // Writes a new file and moves it over the old one, so a hard link to a package cache is never written through.
    private static void WriteReplacing(string path, byte[] content)
    {
        var stamp = File.GetLastWriteTimeUtc(path);
        string temp = path + ".mcpatch";
        File.WriteAllBytes(temp, content);
        File.SetLastWriteTimeUtc(temp, stamp);
        File.Delete(path);
        File.Move(temp, path);
    }
}
#endif
