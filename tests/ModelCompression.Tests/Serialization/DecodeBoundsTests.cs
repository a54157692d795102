using System.Buffers.Binary;
using System.IO.Compression;
using ModelCompression.Serialization;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Serialization;

/// <summary>Memory per file byte: what a small hostile file or an endless stream can make a load allocate.</summary>
[TestFixture]
public sealed class DecodeBoundsTests
{
    [Test]
    public void Load_HugeDeclaredLayerWithShortDeflateData_FailsHavingAllocatedInProportionToTheData()
    {
        // A 64 KB file declares Linear(8192, 8192) (256 MB of float32) as a two-value codebook whose DEFLATE'd indices
        // stop after 100,000 symbols. The DEFLATE limit (1,032 symbols a byte) let it through, and the loader allocated
        // the 67M-symbol buffers before inflating: 335 MB for a 64 KB file (issue 24). Now the buffer grows with the data.
        var file = HugeLinearWithDeflatedIndices(8192, 8192, inflated: 100_000, blockBytes: 66_000);
        long before = GC.GetAllocatedBytesForCurrentThread();
        var ex = Assert.Throws<InvalidDataException>(() => CompressedModel.Load(new MemoryStream(file)));
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        TestContext.Out.WriteLine($"{file.Length} B file declaring 256 MB: allocated {allocated:N0} B ({(double)allocated / file.Length:0.0} per file byte)");
        Assert.That(ex!.Message, Does.Contain("'fc'").And.Contain("DEFLATE data ends"));
        Assert.That(allocated, Is.LessThan(16L * file.Length + (1 << 20)), "managed bytes allocated");
    }

    [Test]
    public void Load_DeclaredShapesAboveMaxDecodedBytes_FailBeforeDecoding()
    {
        var file = HugeLinearWithDeflatedIndices(8192, 8192, inflated: 100_000, blockBytes: 66_000);
        var options = new CompressedModelLoadOptions { MaxDecodedBytes = 64L << 20 };
        long before = GC.GetAllocatedBytesForCurrentThread();
        var ex = Assert.Throws<InvalidDataException>(() => CompressedModel.Load(new MemoryStream(file), null, options));
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.That(ex!.Message, Does.Contain("'fc'").And.Contain("MaxDecodedBytes"));
        Assert.That(allocated, Is.LessThan(2L * file.Length + (1 << 20)), "managed bytes allocated");
    }

    [Test]
    public void Load_ConstantWeightInATinyFile_AllocatesInProportionToItsDeclaredShape()
    {
        // A legitimate file can be far smaller than its tensors (one codebook value, zero bits per index): its decode
        // is bounded by the declared shape, not by the file's length.
        using var model = nn.Sequential(("fc", nn.Linear(1024, 1024, hasBias: false)));
        using (no_grad())
        {
            ((TorchSharp.Modules.Linear)model[0]).weight!.fill_(0.5f);
        }

        using var stream = new MemoryStream();
        CompressedModel.Save(model, stream);
        var file = stream.ToArray();
        long declaredBytes = 1024L * 1024 * 4;
        long before = GC.GetAllocatedBytesForCurrentThread();
        using var loaded = CompressedModel.Load(new MemoryStream(file));
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        TestContext.Out.WriteLine($"{file.Length} B file declaring {declaredBytes:N0} B: allocated {allocated:N0} B ({(double)allocated / declaredBytes:0.00} × declared)");
        Assert.That(file.Length, Is.LessThan(200));
        Assert.That(allocated, Is.LessThan((4 * declaredBytes) + (1 << 20)), "managed bytes allocated");
        Assert.That(((TorchSharp.Modules.Linear)loaded.named_modules().Single(m => m.name == "fc").module).weight!.eq(0.5f).all().item<bool>(), Is.True);
    }

    [Test]
    public void Load_EndlessGarbageStream_FailsAtTheHeader()
    {
        using var stream = new EndlessStream([], 0xAB);
        long before = GC.GetAllocatedBytesForCurrentThread();
        var ex = Assert.Throws<InvalidDataException>(() => CompressedModel.Load(stream));
        Assert.That(ex!.Message, Does.Contain("signature"));
        Assert.That(stream.Served, Is.LessThanOrEqualTo(FormatFuzzer.HeaderBytes));
        Assert.That(GC.GetAllocatedBytesForCurrentThread() - before, Is.LessThan(64 << 10));
    }

    [Test]
    public void Load_EndlessStreamDeclaringMoreThanMaxFileBytes_FailsAfterTheHeader()
    {
        using var stream = new EndlessStream(Header(1L << 40), 0);
        var ex = Assert.Throws<InvalidDataException>(() => CompressedModel.Load(stream));
        Assert.That(ex!.Message, Does.Contain("more than the").And.Contain("MaxFileBytes"));
        Assert.That(stream.Served, Is.EqualTo(FormatFuzzer.HeaderBytes));
    }

    [Test]
    public void Load_EndlessStreamBehindAValidHeader_StopsAtTheDeclaredLength()
    {
        // Before, Load(stream) copied until the stream ended or 2 GB had been read, into a MemoryStream that doubled
        // (4.6 GB for an endless stream). Now it reads what the header declares, one byte more, and stops.
        const long Declared = 32L << 20;
        using var stream = new EndlessStream(Header(Declared), 0);
        long before = GC.GetAllocatedBytesForCurrentThread();
        var ex = Assert.Throws<InvalidDataException>(() => CompressedModel.Load(stream));
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        TestContext.Out.WriteLine($"endless stream declaring {Declared:N0} B: read {stream.Served:N0} B, allocated {allocated:N0} B");
        Assert.That(ex!.Message, Does.Contain("extra bytes"));
        Assert.That(stream.Served, Is.LessThanOrEqualTo(Declared + 1));
        Assert.That(allocated, Is.LessThan((2 * Declared) + (1 << 20)), "managed bytes allocated");
    }

    [Test]
    public void Load_StreamEndingEarly_SaysTruncatedAsAPathLoadDoes()
    {
        using var stream = new EndlessStream(Header(32L << 20), 0, end: 5 << 20);
        var ex = Assert.Throws<InvalidDataException>(() => CompressedModel.Load(stream));
        Assert.That(ex!.Message, Does.Contain("truncated"));
    }

    /// <summary>A valid header (signature, version, checksum) declaring <paramref name="length"/> bytes and one section.</summary>
    private static byte[] Header(long length)
    {
        var header = new byte[FormatFuzzer.HeaderBytes];
        BinaryPrimitives.WriteUInt32LittleEndian(header, 0x464D434D);
        BinaryPrimitives.WriteUInt16LittleEndian(header.AsSpan(4), 1);
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(8), 1);
        BinaryPrimitives.WriteUInt64LittleEndian(header.AsSpan(12), (ulong)length);
        FormatFuzzer.FixChecksums(header);
        return header;
    }

    /// <summary>A Sequential holding Linear 'fc' whose weight is a 2-value codebook with DEFLATE'd indices that hold only <paramref name="inflated"/> symbols.</summary>
    private static byte[] HugeLinearWithDeflatedIndices(long inputs, long outputs, int inflated, int blockBytes)
    {
        var architecture = new FormatWriter();
        architecture.String(string.Empty);
        architecture.Byte(1); // Sequential
        architecture.Bool(false);
        architecture.VarUInt(1);
        architecture.String("fc");
        architecture.Byte(3); // Linear: in, out, bias
        architecture.VarInt(inputs);
        architecture.VarInt(outputs);
        architecture.VarInt(0);
        architecture.Bool(true);
        architecture.VarUInt(0);

        using var deflated = new MemoryStream();
        using (var deflate = new DeflateStream(deflated, CompressionLevel.Optimal, leaveOpen: true))
        {
            deflate.Write(new byte[inflated]);
        }

        var block = new byte[blockBytes];
        deflated.ToArray().CopyTo(block, 0);
        var data = new FormatWriter();
        data.VarUInt(1); // the module's index
        data.Byte(0); // dense
        data.Byte(1); // codebook
        data.VarUInt(2);
        data.Byte(0); // float32
        data.Float32(-1);
        data.Float32(1);
        data.Byte(2); // DEFLATE
        data.Block(block);
        return ModelFile.Write(architecture.ToArray(), [data.ToArray()]);
    }
}
