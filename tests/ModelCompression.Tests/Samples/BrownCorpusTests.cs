using System.Security.Cryptography;
using ModelCompression.Samples;
using NUnit.Framework;

namespace ModelCompression.Tests.Samples;

[TestFixture]
public sealed class BrownCorpusTests
{
    private const string FileName = "brown.bin.gz";

    [Test]
    public void LoadBundled_HasTheFiveHundredDocumentsSplitByTheFixedRule()
    {
        var corpus = BrownCorpus.LoadBundled();
        Assert.That(corpus.Documents, Has.Count.EqualTo(500));
        Assert.That(corpus.Train, Has.Count.EqualTo(400));
        Assert.That(corpus.Validation, Has.Count.EqualTo(50));
        Assert.That(corpus.Test, Has.Count.EqualTo(50));

        var ids = corpus.Documents.Select(d => d.Id).ToArray();
        Assert.That(ids, Is.Ordered.Using<string>(StringComparer.Ordinal));
        Assert.That(ids.Distinct().Count(), Is.EqualTo(500));
        Assert.That(ids[0], Is.EqualTo("ca01"));
        Assert.That(ids[^1], Is.EqualTo("cr09"));
        for (int i = 0; i < ids.Length; i++)
        {
            var expected = (i % 10) switch { 8 => TextSplit.Validation, 9 => TextSplit.Test, _ => TextSplit.Train };
            Assert.That(corpus.Documents[i].Split, Is.EqualTo(expected), ids[i]);
        }

        Assert.That(corpus.Validation[0].Id, Is.EqualTo("ca09"));
        Assert.That(corpus.Test[0].Id, Is.EqualTo("ca10"));
        Assert.That(corpus.GetDocuments(TextSplit.Test), Is.SameAs(corpus.Test));
    }

    [Test]
    public void Splits_AreDisjointAndCoverEveryGenre()
    {
        var corpus = BrownCorpus.LoadBundled();
        var train = corpus.Train.Select(d => d.Id).ToHashSet();
        var validation = corpus.Validation.Select(d => d.Id).ToHashSet();
        var test = corpus.Test.Select(d => d.Id).ToHashSet();
        Assert.That(train.Overlaps(validation), Is.False);
        Assert.That(train.Overlaps(test), Is.False);
        Assert.That(validation.Overlaps(test), Is.False);
        Assert.That(train.Count + validation.Count + test.Count, Is.EqualTo(500));

        var genres = corpus.Documents.GroupBy(d => d.Genre).ToDictionary(g => g.Key, g => g.Count());
        Assert.That(genres, Has.Count.EqualTo(15));
        Assert.That(genres["news"], Is.EqualTo(44));
        Assert.That(genres["learned"], Is.EqualTo(80));
        Assert.That(genres["science_fiction"], Is.EqualTo(6));
        foreach (var split in Enum.GetValues<TextSplit>())
        {
            Assert.That(corpus.GetDocuments(split).Select(d => d.Genre).Distinct().Count(), Is.EqualTo(15), split.ToString());
        }
    }

    [Test]
    public void Documents_ArePlainTextWithoutTags()
    {
        var corpus = BrownCorpus.LoadBundled();
        Assert.That(corpus.Train.Sum(d => d.WordCount), Is.EqualTo(810_986));
        Assert.That(corpus.Validation.Sum(d => d.WordCount), Is.EqualTo(101_172));
        Assert.That(corpus.Test.Sum(d => d.WordCount), Is.EqualTo(101_161));

        var first = corpus.Documents[0].Text;
        Assert.That(first, Does.StartWith(
            "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election produced \"no evidence\" that any irregularities took place.\n"));
        Assert.That(first, Does.Contain("\nWards protected\n"), "a headline stands on its own line");
        foreach (var document in corpus.Documents)
        {
            Assert.That(document.Text, Does.Not.Match(@"\w/(at|nn|np|vbd|in|jj|nns)\b"), document.Id);
            Assert.That(document.Text, Does.Not.Contain("``").And.Not.Contain(" ,").And.Not.Contain(" ."), document.Id);
            Assert.That(document.Text.All(c => c == '\n' || (c >= ' ' && c <= '~')), Is.True, document.Id);
        }
    }

    [Test]
    public void TokenIds_MatchTheConvertersReferenceEncoderIdForId()
    {
        // Counts and SHA-256s (of the ids as little-endian uint16) printed by tools/text-converter/convert.js.
        var corpus = BrownCorpus.LoadBundled();
        var expected = new (TextSplit Split, int Count, string Sha256)[]
        {
            (TextSplit.Train, 1_326_760, "073611bd0d9242f8aa3d14aa525f5760ddebaabf1a5f3288724d02ea086014f3"),
            (TextSplit.Validation, 167_982, "5fb77317c974b677a951e1f8185b861696a69bfc81d4f6abd317217eccb78c83"),
            (TextSplit.Test, 169_291, "6e4158eed8a8a7fc13dfc45184aa708b240b20671c15a6db9c4a44d53cc00fcb"),
        };
        foreach (var (split, count, sha256) in expected)
        {
            var ids = corpus.TokenIds(split);
            Assert.That(ids, Has.Length.EqualTo(count), split.ToString());
            var bytes = new byte[ids.Length * 2];
            for (int i = 0; i < ids.Length; i++)
            {
                BitConverter.TryWriteBytes(bytes.AsSpan(i * 2), checked((ushort)ids[i]));
            }

            Assert.That(Convert.ToHexStringLower(SHA256.HashData(bytes)), Is.EqualTo(sha256), split.ToString());
            Assert.That(corpus.Tokenizer.CountTokens(corpus.JoinedText(split)), Is.EqualTo(count), split.ToString());
        }

        // About 1.67 tokens per word (punctuation and line breaks are tokens too) on the held-out test split.
        double perWord = (double)corpus.TokenIds(TextSplit.Test).Length / corpus.Test.Sum(d => d.WordCount);
        Assert.That(perWord, Is.EqualTo(1.673).Within(0.001));
    }

    [Test]
    public void TokenIds_DecodeToTheHeldOutText()
    {
        var corpus = BrownCorpus.LoadBundled();
        foreach (var split in new[] { TextSplit.Validation, TextSplit.Test })
        {
            Assert.That(corpus.Tokenizer.Decode(corpus.TokenIds(split)), Is.EqualTo(corpus.JoinedText(split)), split.ToString());
        }

        var copy = corpus.TokenIds(TextSplit.Test);
        copy[0] = -1;
        Assert.That(corpus.TokenIds(TextSplit.Test)[0], Is.Not.EqualTo(-1), "each call returns a fresh copy");
        Assert.Throws<ArgumentOutOfRangeException>(() => corpus.TokenIds((TextSplit)3));
    }

    [Test]
    public void Load_SameFileTwice_GivesTheSameDocumentsAndTokens()
    {
        var path = Path.Combine(TestContext.CurrentContext.TestDirectory, FileName);
        var a = BrownCorpus.Load(path);
        var b = BrownCorpus.Load(path);
        Assert.That(a, Is.Not.SameAs(b));
        Assert.That(b.Documents, Is.EqualTo(a.Documents));
        Assert.That(b.Documents, Is.EqualTo(BrownCorpus.LoadBundled().Documents));
        Assert.That(b.TokenIds(TextSplit.Validation), Is.EqualTo(a.TokenIds(TextSplit.Validation)));
    }

    [Test]
    public void Load_CorruptOrTruncatedFile_ThrowsInvalidData()
    {
        var original = TextDataFiles.Payload(FileName);
        var corrupt = original.ToArray();
        corrupt[100_000] ^= 0x20;
        var ex = Assert.Throws<InvalidDataException>(() => BrownCorpus.Load(TextDataFiles.Gzip(corrupt)));
        Assert.That(ex!.Message, Does.Contain("SHA-256"));

        ex = Assert.Throws<InvalidDataException>(() => BrownCorpus.Load(TextDataFiles.Gzip(original.AsSpan(0, original.Length - 1000).ToArray())));
        Assert.That(ex!.Message, Does.Contain("SHA-256"));

        // A record cut short under a valid checksum is still caught.
        var cut = TextDataFiles.Reseal([.. original.AsSpan(0, 5000), .. new byte[32]]);
        ex = Assert.Throws<InvalidDataException>(() => BrownCorpus.Load(TextDataFiles.Gzip(cut)));
        Assert.That(ex!.Message, Does.Contain("malformed"));

        // A merge that refers to a later token, under a valid checksum.
        var badMerge = original.ToArray();
        int lastMerge = badMerge.Length - 32 - 4;
        BitConverter.TryWriteBytes(badMerge.AsSpan(lastMerge), (ushort)4095);
        ex = Assert.Throws<InvalidDataException>(() => BrownCorpus.Load(TextDataFiles.Gzip(TextDataFiles.Reseal(badMerge))));
        Assert.That(ex!.Message, Does.Contain("tokenizer"));

        Assert.Throws<InvalidDataException>(() => BrownCorpus.Load(new MemoryStream([1, 2, 3, 4])));
        ex = Assert.Throws<InvalidDataException>(() => BrownCorpus.Load(TextDataFiles.Gzip(TextDataFiles.Payload("spam-assassin.bin.gz"))));
        Assert.That(ex!.Message, Does.Contain("MCBROWN1"));
    }
}
