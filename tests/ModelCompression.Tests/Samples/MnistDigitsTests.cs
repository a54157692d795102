using System.IO.Compression;
using ModelCompression.Samples;
using NUnit.Framework;

namespace ModelCompression.Tests.Samples;

[TestFixture]
public sealed class MnistDigitsTests
{
    [Test]
    public void LoadBundled_HasTheTenThousandDigitsOfThePackage()
    {
        var digits = MnistDigits.LoadBundled();
        Assert.That(digits.Count, Is.EqualTo(10_000));
        var perClass = digits.Labels.ToArray().GroupBy(l => l).OrderBy(g => g.Key).Select(g => g.Count());
        Assert.That(perClass, Is.EqualTo(new[] { 1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978 }));
        Assert.That(digits.Pixels.Length, Is.EqualTo(10_000 * 784));
    }

    [Test]
    public void Split_IsStratifiedDisjointAndDeterministic()
    {
        var digits = MnistDigits.LoadBundled();
        var (train, test) = digits.StratifiedIndices(8000, seed: 0);
        Assert.That(train, Has.Length.EqualTo(8000));
        Assert.That(test, Has.Length.EqualTo(2000));
        Assert.That(train.Intersect(test), Is.Empty);
        Assert.That(train.Concat(test).Distinct().Count(), Is.EqualTo(10_000));

        var labels = digits.Labels.ToArray();
        for (int c = 0; c < 10; c++)
        {
            int all = labels.Count(l => l == c);
            int inTrain = train.Count(i => labels[i] == c);
            Assert.That(inTrain, Is.EqualTo(all * 0.8).Within(1.0), $"class {c}");
        }

        var again = digits.StratifiedIndices(8000, seed: 0);
        Assert.That(again.Train, Is.EqualTo(train));
        Assert.That(digits.StratifiedIndices(8000, seed: 1).Train, Is.Not.EqualTo(train));
    }

    [Test]
    public void Split_ShapesAndScaling()
    {
        var digits = MnistDigits.LoadBundled();
        using var flat = digits.Split(layout: MnistLayout.Flat, normalize: false);
        using var image = digits.Split(layout: MnistLayout.Image);
        Assert.That(flat.Train.Inputs.shape, Is.EqualTo(new long[] { 8000, 784 }));
        Assert.That(image.Test.Inputs.shape, Is.EqualTo(new long[] { 2000, 1, 28, 28 }));
        Assert.That(flat.Train.Inputs.min().item<float>(), Is.EqualTo(0f));
        Assert.That(flat.Train.Inputs.max().item<float>(), Is.EqualTo(1f));
        Assert.That(image.Train.Inputs.mean().item<float>(), Is.EqualTo(0f).Within(0.05f));
        Assert.That(image.Train.Targets.dtype, Is.EqualTo(TorchSharp.torch.ScalarType.Int64));
        Assert.Throws<ArgumentOutOfRangeException>(() => digits.Split(trainCount: 9995));
    }

    [Test]
    public void Load_CorruptOrTruncatedFile_ThrowsInvalidData()
    {
        var original = Payload();
        var corrupt = original.ToArray();
        corrupt[5000] ^= 0x40;
        var ex = Assert.Throws<InvalidDataException>(() => MnistDigits.Load(Gzip(corrupt)));
        Assert.That(ex!.Message, Does.Contain("SHA-256"));

        var truncated = original.AsSpan(0, original.Length - 100).ToArray();
        ex = Assert.Throws<InvalidDataException>(() => MnistDigits.Load(Gzip(truncated)));
        Assert.That(ex!.Message, Does.Contain("truncated"));

        Assert.Throws<InvalidDataException>(() => MnistDigits.Load(new MemoryStream([1, 2, 3, 4])));
        Assert.Throws<InvalidDataException>(() => MnistDigits.Load(Gzip("NOTMNIST and more bytes than a header needs to hold"u8.ToArray())));
    }

    [Test]
    public void Load_ValidFile_ReadsTheSameDigits()
    {
        var path = Path.Combine(Path.GetTempPath(), $"mnist-{Guid.NewGuid():N}.bin.gz");
        try
        {
            File.WriteAllBytes(path, Gzip(Payload()).ToArray());
            var digits = MnistDigits.Load(path);
            Assert.That(digits.Labels.ToArray(), Is.EqualTo(MnistDigits.LoadBundled().Labels.ToArray()));
        }
        finally
        {
            File.Delete(path);
        }
    }

    private static byte[] Payload()
    {
        var path = Path.Combine(TestContext.CurrentContext.TestDirectory, "mnist-digits.bin.gz");
        using var gzip = new GZipStream(File.OpenRead(path), CompressionMode.Decompress);
        using var buffer = new MemoryStream();
        gzip.CopyTo(buffer);
        return buffer.ToArray();
    }

    private static MemoryStream Gzip(byte[] payload)
    {
        var output = new MemoryStream();
        using (var gzip = new GZipStream(output, CompressionLevel.Fastest, leaveOpen: true))
        {
            gzip.Write(payload);
        }

        output.Position = 0;
        return output;
    }
}
