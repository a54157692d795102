using System.Text;
using ModelCompression.Quantization;
using ModelCompression.Serialization;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Serialization;

/// <summary><see cref="QuantizedEmbedding"/> in the compressed file: stored through the layer registry, exactly and at its integer size.</summary>
[TestFixture]
public sealed class QuantizedEmbeddingFileTests
{
    private static Embedding Table(long count, long dim, int seed)
    {
        random.manual_seed(seed);
        var embedding = nn.Embedding(count, dim);
        using var noGrad = no_grad();
        using var w = embedding.weight!;
        using var values = randn(count, dim);
        w.copy_(values);
        return embedding;
    }

    private static byte[] Save(nn.Module<Tensor, Tensor> model)
    {
        using var stream = new MemoryStream();
        CompressedModel.Save(model, stream);
        return stream.ToArray();
    }

    private static QuantizedEmbedding Layer(nn.Module model) => (QuantizedEmbedding)model.named_children().First().module;

    public static IEnumerable<TestCaseData> Settings()
    {
        yield return new TestCaseData(8, QuantizationGranularity.PerChannel, 16L).SetName("SaveLoad_Int8PerRow_BitIdentical");
        yield return new TestCaseData(8, QuantizationGranularity.PerTensor, 16L).SetName("SaveLoad_Int8PerTensor_BitIdentical");
        yield return new TestCaseData(8, QuantizationGranularity.PerGroup(8), 20L).SetName("SaveLoad_Int8PerGroup_BitIdentical");
        yield return new TestCaseData(4, QuantizationGranularity.PerGroup(64), 13L).SetName("SaveLoad_Int4DimBelowGroup_BitIdentical");
        yield return new TestCaseData(4, QuantizationGranularity.PerGroup(8), 21L).SetName("SaveLoad_Int4ShortLastGroup_BitIdentical");
    }

    [TestCaseSource(nameof(Settings))]
    public void SaveLoad_Settings_BitIdentical(int bits, QuantizationGranularity granularity, long dim)
    {
        using var embedding = Table(40, dim, 1);
        using var model = nn.Sequential(("embedding", QuantizedEmbedding.FromEmbedding(embedding, bits, granularity)));
        var bytes = Save(model);

        using var loaded = CompressedModel.Load(new MemoryStream(bytes));

        var original = Layer(model);
        var copy = Layer(loaded);
        Assert.That(copy.WeightBits, Is.EqualTo(bits));
        Assert.That(copy.WeightGranularity.ToString(), Is.EqualTo(original.WeightGranularity.ToString()));
        Assert.That(copy.SqnrDb, Is.EqualTo(original.SqnrDb));
        Assert.That(TestModels.StateHash(loaded), Is.EqualTo(TestModels.StateHash(model)));
        using var ids = randint(0, 40, [3, 5], dtype: ScalarType.Int64);
        using (no_grad())
        {
            using var expected = model.call(ids);
            using var actual = loaded.call(ids);
            Assert.That(actual.equal(expected).all().item<bool>(), Is.True);
        }

        Assert.That(Save(loaded), Is.EqualTo(bytes), "saving the loaded model gives the same bytes");
    }

    [Test]
    public void Save_FileSize_AQuarterAtInt8AndAnEighthAtInt4PlusScales()
    {
        using var embedding = Table(1000, 64, 2);
        using var floatModel = nn.Sequential(("embedding", Table(1000, 64, 2)));
        using var int8 = nn.Sequential(("embedding", QuantizedEmbedding.FromEmbedding(embedding)));
        using var int4 = nn.Sequential(("embedding", QuantizedEmbedding.FromEmbedding(embedding, bits: 4)));
        using var int4g32 = nn.Sequential(("embedding", QuantizedEmbedding.FromEmbedding(embedding, bits: 4, QuantizationGranularity.PerGroup(32))));

        double floatBytes = Save(floatModel).Length;
        double int8Ratio = Save(int8).Length / floatBytes, int4Ratio = Save(int4).Length / floatBytes, int4g32Ratio = Save(int4g32).Length / floatBytes;
        TestContext.Out.WriteLine(
            $"Embedding(1000, 64): float {floatBytes:N0} B; int8 per-row {int8Ratio:0.0000}; int4 per-group(64) {int4Ratio:0.0000}; int4 per-group(32) {int4g32Ratio:0.0000} of float");

        // The levels (1 or ½ byte per value) plus one 4-byte scale per row and group (float16 scales are stored as float32).
        Assert.That(int8Ratio, Is.InRange(0.25 + (4.0 / 256), 0.25 + (4.0 / 256) + 0.01));
        Assert.That(int4Ratio, Is.InRange(0.125, 0.125 + (4.0 / 256) + 0.01));
        Assert.That(int4g32Ratio, Is.InRange(0.125, 0.125 + (8.0 / 256) + 0.01));
    }

    [Test]
    public void Load_NegativeScale_ThrowsInvalidDataException()
    {
        using var embedding = Table(10, 8, 3);
        using var model = nn.Sequential(("embedding", QuantizedEmbedding.FromEmbedding(embedding)));
        using (no_grad())
        {
            Layer(model).state_dict()["weight_scale"].narrow(0, 4, 1).fill_(-0.5f);
        }

        var ex = Assert.Throws<InvalidDataException>(() => CompressedModel.Load(new MemoryStream(Save(model))).Dispose());
        Assert.That(ex!.Message, Does.Contain("'embedding'").And.Contain("scale"));
    }

    [TestCase(8, -128)]
    [TestCase(4, 0x88)]
    public void Load_LevelOutsideTheSymmetricRange_ThrowsInvalidDataException(int bits, int stored)
    {
        using var embedding = Table(10, 8, 4);
        using var model = nn.Sequential(("embedding", QuantizedEmbedding.FromEmbedding(embedding, bits, bits == 4 ? QuantizationGranularity.PerGroup(8) : null)));
        using (no_grad())
        {
            // −128 as int8; two −8 nibbles as a packed byte.
            Layer(model).state_dict()["weight"].narrow(0, 2, 1).narrow(1, 1, 1).fill_(stored);
        }

        var ex = Assert.Throws<InvalidDataException>(() => CompressedModel.Load(new MemoryStream(Save(model))).Dispose());
        Assert.That(ex!.Message, Does.Contain("'embedding'").And.Contain("level"));
    }

    [TestCase("channel", "chunnel", "granularity")]
    [TestCase("ModelCompression.QuantizedEmbedding", "ModelCompression.QuantizedEmbeddinh", "not registered")]
    public void Load_AlteredAttributes_ThrowsInvalidDataException(string text, string replacement, string expected)
    {
        using var embedding = Table(10, 8, 5);
        using var model = nn.Sequential(("embedding", QuantizedEmbedding.FromEmbedding(embedding)));
        var bytes = Save(model);
        var pattern = Encoding.UTF8.GetBytes(text);
        int at = bytes.AsSpan().IndexOf(pattern);
        Assert.That(at, Is.GreaterThan(0));
        Encoding.UTF8.GetBytes(replacement).CopyTo(bytes, at);
        FormatFuzzer.FixChecksums(bytes);

        var ex = Assert.Throws<InvalidDataException>(() => CompressedModel.Load(new MemoryStream(bytes)).Dispose());
        Assert.That(ex!.Message, Does.Contain(expected));
    }

    [Test]
    public void Load_CountDisagreeingWithTheStoredTable_ThrowsInvalidDataException()
    {
        using var embedding = Table(10, 8, 6);
        using var model = nn.Sequential(("embedding", QuantizedEmbedding.FromEmbedding(embedding)));
        var bytes = Save(model);
        // The "count" attribute claims 21 rows where the stored tensors hold 10.
        var name = Encoding.UTF8.GetBytes("count");
        int at = bytes.AsSpan().IndexOf(name) + name.Length;
        Assert.That(bytes[at], Is.EqualTo(1), "an integer attribute");
        Assert.That(bytes[at + 1], Is.EqualTo(20), "10 as a zig-zag varint");
        bytes[at + 1] = 42;
        FormatFuzzer.FixChecksums(bytes);

        var ex = Assert.Throws<InvalidDataException>(() => CompressedModel.Load(new MemoryStream(bytes)).Dispose());
        Assert.That(ex!.Message, Does.Contain("'embedding'"));
    }
}
