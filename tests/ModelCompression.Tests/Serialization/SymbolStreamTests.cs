using ModelCompression.Serialization;
using NUnit.Framework;

namespace ModelCompression.Tests.Serialization;

[TestFixture]
public sealed class SymbolStreamTests
{
    private static int[] Skewed(int count, int alphabet, int seed)
    {
        // Geometric-like: small symbols far more frequent, as index gaps and clustered weights are.
        var random = new Random(seed);
        return Enumerable.Range(0, count).Select(_ => Math.Min(alphabet - 1, (int)(-Math.Log(1 - random.NextDouble()) * 2))).ToArray();
    }

    [TestCase(0, 5)]
    [TestCase(1, 1)]
    [TestCase(100, 1)]
    [TestCase(1, 2)]
    [TestCase(1000, 3)]
    [TestCase(5000, 32)]
    [TestCase(20000, 256)]
    [TestCase(3000, 65536)]
    public void WriteRead_RoundTrips(int count, int alphabet)
    {
        var symbols = Skewed(count, alphabet, count + alphabet);
        var writer = new FormatWriter();
        SymbolStream.Write(writer, symbols, alphabet);
        var reader = new FormatReader(writer.Written, "test");
        Assert.That(SymbolStream.Read(ref reader, count, alphabet, "symbols"), Is.EqualTo(symbols));
        Assert.That(reader.Remaining, Is.Zero);
    }

    [Test]
    public void Write_SkewedSymbols_EntropyCodedBelowFixedWidth()
    {
        var symbols = Skewed(10000, 32, 1);
        var writer = new FormatWriter();
        var coding = SymbolStream.Write(writer, symbols, 32);
        Assert.That(coding, Is.Not.EqualTo(SymbolCoding.Packed));
        // Fixed width would take 5 bits a symbol; the distribution's entropy is about 2.4 bits.
        Assert.That(writer.Length * 8.0 / symbols.Length, Is.LessThan(3.0));
    }

    [Test]
    public void Write_UniformSymbols_PacksThem()
    {
        var random = new Random(2);
        var symbols = Enumerable.Range(0, 4096).Select(_ => random.Next(16)).ToArray();
        var writer = new FormatWriter();
        Assert.That(SymbolStream.Write(writer, symbols, 16), Is.EqualTo(SymbolCoding.Packed));
        Assert.That(writer.Length, Is.LessThan(4096 / 2 + 8));
    }

    [Test]
    public void Read_CountBeyondWhatTheBytesHold_Rejected()
    {
        var writer = new FormatWriter();
        SymbolStream.Write(writer, Skewed(100, 8, 3), 8);
        var ex = Assert.Throws<InvalidDataException>(() =>
        {
            var reader = new FormatReader(writer.Written, "test");
            SymbolStream.Read(ref reader, 1L << 40, 8, "symbols");
        });
        Assert.That(ex!.Message, Does.Contain("more than its"));
    }

    [Test]
    public void Read_OverSubscribedHuffmanTable_Rejected()
    {
        // Huffman coding (1), then a block: 17-bit count of 3 symbols, each given code length 1 (three 1-bit codes cannot exist).
        var bits = "00000000000000011" + "0001" + "0001" + "0001" + "0000000";
        var payload = Enumerable.Range(0, bits.Length / 8).Select(i => Convert.ToByte(bits.Substring(i * 8, 8), 2)).ToArray();
        var writer = new FormatWriter();
        writer.Byte(1);
        writer.Block(payload);
        var ex = Assert.Throws<InvalidDataException>(() =>
        {
            var reader = new FormatReader(writer.Written, "test");
            SymbolStream.Read(ref reader, 2, 3, "symbols");
        });
        Assert.That(ex!.Message, Does.Contain("over-subscribe"));
    }

    [Test]
    public void Read_DeflateBomb_StopsAtTheDeclaredCount()
    {
        var writer = new FormatWriter();
        SymbolStream.Write(writer, new int[200_000], 4);
        var ex = Assert.Throws<InvalidDataException>(() =>
        {
            var reader = new FormatReader(writer.Written, "test");
            SymbolStream.Read(ref reader, 1000, 4, "symbols");
        });
        Assert.That(ex!.Message, Does.Contain("more than 1000 symbols").Or.Contain("more than its"));
    }
}
