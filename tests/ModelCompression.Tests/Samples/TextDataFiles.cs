using System.IO.Compression;
using NUnit.Framework;

namespace ModelCompression.Tests.Samples;

/// <summary>The raw bundled text files (copied beside the tests) and gzip helpers for the loaders' corruption tests.</summary>
internal static class TextDataFiles
{
    internal static byte[] Payload(string fileName)
    {
        var path = Path.Combine(TestContext.CurrentContext.TestDirectory, fileName);
        using var gzip = new GZipStream(File.OpenRead(path), CompressionMode.Decompress);
        using var buffer = new MemoryStream();
        gzip.CopyTo(buffer);
        return buffer.ToArray();
    }

    internal static MemoryStream Gzip(byte[] payload)
    {
        var output = new MemoryStream();
        using (var gzip = new GZipStream(output, CompressionLevel.Fastest, leaveOpen: true))
        {
            gzip.Write(payload);
        }

        output.Position = 0;
        return output;
    }

    /// <summary>Re-seals a payload whose body was edited: replaces its trailing SHA-256 with the body's.</summary>
    internal static byte[] Reseal(byte[] payload)
    {
        var body = payload.AsSpan(0, payload.Length - 32);
        return [.. body, .. System.Security.Cryptography.SHA256.HashData(body)];
    }
}
