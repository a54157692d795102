using ModelCompression.Samples;
using NUnit.Framework;

namespace ModelCompression.Tests.Samples;

[TestFixture]
public sealed class SpamAssassinCorpusTests
{
    private const string FileName = "spam-assassin.bin.gz";

    [Test]
    public void LoadBundled_HasEveryMailOfThePackage()
    {
        var corpus = SpamAssassinCorpus.LoadBundled();
        Assert.That(corpus.Mails, Has.Count.EqualTo(6046));
        var perFolder = corpus.Mails.GroupBy(m => m.Folder).OrderBy(g => g.Key).Select(g => g.Count());
        Assert.That(perFolder, Is.EqualTo(new[] { 2500, 1400, 250, 500, 1396 }));
        Assert.That(corpus.Mails.Count(m => m.IsSpam), Is.EqualTo(1896));
        Assert.That(corpus.Mails.Select(m => m.Id).Distinct().Count(), Is.EqualTo(6046));
        Assert.That(corpus.Mails[0].Id, Is.EqualTo("easy-ham-1/00001"));
        Assert.That(corpus.Mails[^1].Id, Is.EqualTo("spam-2/01400"));
    }

    [Test]
    public void Splits_AreStratifiedAndDisjoint()
    {
        var corpus = SpamAssassinCorpus.LoadBundled();
        var expected = new (TextSplit Split, int Ham, int Spam)[]
        {
            (TextSplit.Train, 3320, 1518),
            (TextSplit.Validation, 415, 189),
            (TextSplit.Test, 415, 189),
        };
        foreach (var (split, ham, spam) in expected)
        {
            var mails = corpus.GetMails(split);
            Assert.That(mails.Count(m => m.Label == SpamAssassinCorpus.HamLabel), Is.EqualTo(ham), split.ToString());
            Assert.That(mails.Count(m => m.Label == SpamAssassinCorpus.SpamLabel), Is.EqualTo(spam), split.ToString());
            Assert.That((double)spam / mails.Count, Is.EqualTo(1896.0 / 6046).Within(0.002), split.ToString());
            foreach (var folder in Enum.GetValues<SpamAssassinFolder>())
            {
                double share = (double)mails.Count(m => m.Folder == folder) / corpus.Mails.Count(m => m.Folder == folder);
                double target = split == TextSplit.Train ? 0.8 : 0.1;
                Assert.That(share, Is.EqualTo(target).Within(0.005), $"{split} {folder}");
            }
        }

        Assert.That(corpus.Train, Has.Count.EqualTo(4838));
        Assert.That(corpus.Validation, Has.Count.EqualTo(604));
        Assert.That(corpus.Test, Has.Count.EqualTo(604));
        var train = corpus.Train.Select(m => m.Id).ToHashSet();
        var validation = corpus.Validation.Select(m => m.Id).ToHashSet();
        Assert.That(train.Overlaps(validation) || train.Overlaps(corpus.Test.Select(m => m.Id)) || validation.Overlaps(corpus.Test.Select(m => m.Id)), Is.False);

        // The rule: per label, in folder and number order, the 9th of ten is validation and the 10th test.
        var spamOrder = corpus.Mails.Where(m => m.IsSpam).ToArray();
        Assert.That(spamOrder[8].Split, Is.EqualTo(TextSplit.Validation));
        Assert.That(spamOrder[9].Split, Is.EqualTo(TextSplit.Test));
        Assert.That(spamOrder[10].Split, Is.EqualTo(TextSplit.Train));
        Assert.Throws<ArgumentOutOfRangeException>(() => corpus.GetMails((TextSplit)(-1)));
    }

    [Test]
    public void Mails_KeepSubjectAndBodyTextOnly()
    {
        var corpus = SpamAssassinCorpus.LoadBundled();
        var first = corpus.Mails[0];
        Assert.That(first.Subject, Is.EqualTo("Re: New Sequences Window"));
        Assert.That(first.Body, Does.Contain("I can't reproduce this error."));
        Assert.That(first.Body, Does.Not.Contain("Received:").And.Not.Contain("Return-Path:"));
        Assert.That(first.Text, Does.StartWith("Re: New Sequences Window\n\n"));

        Assert.That(corpus.Mails.Count(m => m.IsTruncated), Is.EqualTo(491));
        Assert.That(corpus.Mails.Max(m => m.Body.EnumerateRunes().Count()), Is.EqualTo(SpamAssassinCorpus.BodyCap));
        Assert.That(corpus.Mails.Where(m => !m.IsTruncated).Max(m => m.Body.EnumerateRunes().Count()), Is.LessThanOrEqualTo(SpamAssassinCorpus.BodyCap));
        Assert.That(corpus.Mails.Count(m => m.Body.Length == 0), Is.EqualTo(17), "mails that are only images or scripts");
        Assert.That(corpus.Mails.Count(m => m.Body.Contains("Content-Transfer-Encoding:", StringComparison.OrdinalIgnoreCase)), Is.LessThan(30),
            "MIME headers are parsed, not kept (a few mails quote or forward them)");
        Assert.That(corpus.Mails.Count(m => m.Body.Contains("<td", StringComparison.OrdinalIgnoreCase)), Is.LessThan(30), "HTML is reduced to text");
    }

    [Test]
    public void Load_SameFileTwice_GivesTheSameMails()
    {
        var path = Path.Combine(TestContext.CurrentContext.TestDirectory, FileName);
        var a = SpamAssassinCorpus.Load(path);
        var b = SpamAssassinCorpus.Load(path);
        Assert.That(b.Mails, Is.EqualTo(a.Mails));
        Assert.That(b.Test, Is.EqualTo(SpamAssassinCorpus.LoadBundled().Test));
    }

    [Test]
    public void Load_CorruptOrTruncatedFile_ThrowsInvalidData()
    {
        var original = TextDataFiles.Payload(FileName);
        var corrupt = original.ToArray();
        corrupt[200_000] ^= 0x01;
        var ex = Assert.Throws<InvalidDataException>(() => SpamAssassinCorpus.Load(TextDataFiles.Gzip(corrupt)));
        Assert.That(ex!.Message, Does.Contain("SHA-256"));

        ex = Assert.Throws<InvalidDataException>(() => SpamAssassinCorpus.Load(TextDataFiles.Gzip(original.AsSpan(0, original.Length / 2).ToArray())));
        Assert.That(ex!.Message, Does.Contain("SHA-256"));

        // A folder outside the five, under a valid checksum: the first record's folder byte follows magic, count and split.
        var badFolder = original.ToArray();
        badFolder[8 + 4 + 1] = 9;
        ex = Assert.Throws<InvalidDataException>(() => SpamAssassinCorpus.Load(TextDataFiles.Gzip(TextDataFiles.Reseal(badFolder))));
        Assert.That(ex!.Message, Does.Contain("folder 9"));

        Assert.Throws<InvalidDataException>(() => SpamAssassinCorpus.Load(new MemoryStream([0x1f, 0x8b, 0, 0])));
        ex = Assert.Throws<InvalidDataException>(() => SpamAssassinCorpus.Load(TextDataFiles.Gzip(TextDataFiles.Payload("brown.bin.gz"))));
        Assert.That(ex!.Message, Does.Contain("MCSPAMA1"));
    }
}
