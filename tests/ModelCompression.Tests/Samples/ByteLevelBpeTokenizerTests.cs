using System.Text;
using ModelCompression.Samples;
using NUnit.Framework;

namespace ModelCompression.Tests.Samples;

[TestFixture]
public sealed class ByteLevelBpeTokenizerTests
{
    private static ByteLevelBpeTokenizer Bundled => BrownCorpus.LoadBundled().Tokenizer;

    [Test]
    public void VocabularySize_IsTheBytesAndTheMerges()
    {
        Assert.That(Bundled.VocabularySize, Is.EqualTo(4096));
        Assert.That(Bundled.TokenBytes(65).ToArray(), Is.EqualTo(new byte[] { 65 }));
        Assert.That(Encoding.UTF8.GetString(Bundled.TokenBytes(Bundled.Encode(" the").Single())), Is.EqualTo(" the"));
        Assert.Throws<ArgumentOutOfRangeException>(() => Bundled.TokenBytes(4096));
        Assert.Throws<ArgumentOutOfRangeException>(() => Bundled.TokenBytes(-1));
    }

    [TestCase("The jury said it did find that many of Georgia's registration and election laws \"are outmoded\".")]
    [TestCase("")]
    [TestCase("  leading and trailing spaces, tabs\tand\r\nline breaks \n\n")]
    [TestCase("Umlaute: Größe, naïve café — “quotes”, 日本語, emoji 🙂, and a 4-byte 𝄞 clef.")]
    [TestCase("0123456789 3.14159 $1,000,000.00 ~!@#%^&*()_+{}|:<>?")]
    public void Decode_OfEncode_IsTheText(string text)
    {
        var ids = Bundled.Encode(text);
        Assert.That(ids, Has.All.InRange(0, 4095));
        Assert.That(Bundled.Decode(ids), Is.EqualTo(text));
        Assert.That(Bundled.CountTokens(text), Is.EqualTo(ids.Length));
    }

    [Test]
    public void Encode_HeldOutMails_RoundTripAndIsDeterministic()
    {
        // Text the tokenizer never saw, with every script and symbol the mails hold.
        foreach (var mail in SpamAssassinCorpus.LoadBundled().Test)
        {
            var ids = Bundled.Encode(mail.Text);
            Assert.That(Bundled.Decode(ids), Is.EqualTo(mail.Text), mail.Id);
            Assert.That(Bundled.Encode(mail.Text), Is.EqualTo(ids), mail.Id);
        }
    }

    [Test]
    public void Encode_MergesCommonWordsAndKeepsPiecesApart()
    {
        Assert.That(Bundled.Encode(" the"), Has.Length.EqualTo(1));
        Assert.That(Bundled.Encode(" and"), Has.Length.EqualTo(1));
        // Pieces never merge across a word boundary: "the the" is two " the"-like pieces.
        var ids = Bundled.Encode("the the");
        Assert.That(ids, Has.Length.EqualTo(2));
        Assert.That(Bundled.Decode([ids[1]]), Is.EqualTo(" the"));
        // Unseen byte sequences fall back to single bytes.
        Assert.That(Bundled.Encode("\u0001\u0002"), Is.EqualTo(new[] { 1, 2 }));
    }

    [Test]
    public void Create_FollowsTheMergeOrder()
    {
        // 256: "a"+"b", 257: "ab"+"c", 258: "b"+"c". "abc" joins "ab" first (lower id), then "abc".
        var tokenizer = ByteLevelBpeTokenizer.Create(@"\S+|\s+", [('a', 'b'), (256, 'c'), ('b', 'c')]);
        Assert.That(tokenizer.VocabularySize, Is.EqualTo(259));
        Assert.That(tokenizer.Encode("abc"), Is.EqualTo(new[] { 257 }));
        Assert.That(tokenizer.Encode("bcab"), Is.EqualTo(new[] { 258, 256 }));
        Assert.That(tokenizer.Encode("abd"), Is.EqualTo(new[] { 256, 'd' }));
        Assert.That(tokenizer.Decode([258, 256, ' ']), Is.EqualTo("bcab "));
    }

    [Test]
    public void Create_InvalidMerges_Throw()
    {
        Assert.Throws<ArgumentException>(() => ByteLevelBpeTokenizer.Create(@"\S+", [('a', 256)]));
        Assert.Throws<ArgumentException>(() => ByteLevelBpeTokenizer.Create(@"\S+", [('a', 'b'), ('a', 'b')]));
        Assert.Throws<ArgumentOutOfRangeException>(() => Bundled.Decode([0, 5000]));
        Assert.Throws<ArgumentNullException>(() => Bundled.Encode(null!));
    }
}
