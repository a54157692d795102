using ModelCompression.Serialization;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Serialization;

[TestFixture]
public sealed class AtomicFileTests
{
    private string directory = string.Empty;

    [SetUp]
    public void SetUp()
    {
        directory = Path.Combine(Path.GetTempPath(), "mc-atomic-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(directory);
    }

    [TearDown]
    public void TearDown() => Directory.Delete(directory, recursive: true);

    [Test]
    public void Save_StaleTemporaryFilesOfTheSameTarget_AreDeletedAndNothingElse()
    {
        // A save killed with kill -9 leaves its temporary file beside the target (issue 24: they accumulated).
        string path = Path.Combine(directory, "model.mcmf");
        string stale = Temporary("model.mcmf", age: TimeSpan.FromMinutes(5));
        string recent = Temporary("model.mcmf", age: TimeSpan.FromSeconds(5));
        string held = Temporary("model.mcmf", age: TimeSpan.FromMinutes(5));
        string otherTarget = Temporary("other.mcmf", age: TimeSpan.FromMinutes(5));
        string notOurs = Path.Combine(directory, ".model.mcmf.not-a-guid.tmp");
        string upperCase = Path.Combine(directory, $".model.mcmf.{Guid.NewGuid():N}.tmp".ToUpperInvariant());
        File.WriteAllText(notOurs, "x");
        File.WriteAllText(upperCase, "x");
        File.SetLastWriteTimeUtc(notOurs, DateTime.UtcNow.AddHours(-1));

        // A save still writing holds its temporary file exclusively.
        using (new FileStream(held, FileMode.Open, FileAccess.Write, FileShare.None))
        {
            using var model = nn.Sequential(("fc", nn.Linear(2, 2)));
            CompressedModel.Save(model, path);
        }

        Assert.That(File.Exists(stale), Is.False, "the stale temporary file of this target is deleted");
        Assert.That(File.Exists(recent), Is.True, "a recent one may be a live save's");
        Assert.That(File.Exists(held), Is.True, "one held open is a live save's");
        Assert.That(File.Exists(otherTarget), Is.True, "another target's is left");
        Assert.That(File.Exists(notOurs) && File.Exists(upperCase), Is.True, "names not of the exact pattern are left");
        using var loaded = CompressedModel.Load(path);
    }

    [Test]
    public void Save_ThroughSymbolicLink_ReplacesTheTargetAndKeepsTheLink()
    {
        string real = Directory.CreateDirectory(Path.Combine(directory, "real")).FullName;
        string links = Directory.CreateDirectory(Path.Combine(directory, "links")).FullName;
        string target = Path.Combine(real, "model.mcmf");
        string link = Path.Combine(links, "model.mcmf");
        using var first = nn.Sequential(("fc", nn.Linear(2, 2)));
        CompressedModel.Save(first, target);
        File.CreateSymbolicLink(link, Path.Combine("..", "real", "model.mcmf"));
        string stale = Path.Combine(real, $".model.mcmf.{Guid.NewGuid():N}.tmp");
        File.WriteAllText(stale, "x");
        File.SetLastWriteTimeUtc(stale, DateTime.UtcNow.AddHours(-1));

        using var second = nn.Sequential(("fc", nn.Linear(2, 3)));
        CompressedModel.Save(second, link);

        Assert.That(new FileInfo(link).LinkTarget, Is.EqualTo(Path.Combine("..", "real", "model.mcmf")), "the link is kept");
        Assert.That(new FileInfo(target).LinkTarget, Is.Null);
        using var loaded = CompressedModel.Load(target);
        Assert.That(loaded.named_modules().Single(m => m.name == "fc").module, Is.TypeOf<TorchSharp.Modules.Linear>().With.Property("out_features").EqualTo(3), "the target holds the new model");
        Assert.That(Directory.GetFiles(links), Is.EqualTo(new[] { link }), "nothing is written beside the link");
        Assert.That(Directory.GetFiles(real), Is.EqualTo(new[] { target }), "no temporary file is left beside the target, the stale one included");
    }

    [Test]
    public void Save_ThroughDanglingSymbolicLink_CreatesItsTarget()
    {
        string target = Path.Combine(directory, "target.mcmf");
        string link = Path.Combine(directory, "link.mcmf");
        File.CreateSymbolicLink(link, target);
        using var model = nn.Sequential(("fc", nn.Linear(2, 2)));
        CompressedModel.Save(model, link);
        Assert.That(new FileInfo(link).LinkTarget, Is.EqualTo(target));
        Assert.That(File.Exists(target), Is.True);
        using var loaded = CompressedModel.Load(link);
    }

    [TestCase(".model.mcmf.0123456789abcdef0123456789abcdef.tmp", "model.mcmf", true)]
    [TestCase(".model.mcmf.0123456789abcdef0123456789abcdef.tmp", "other.mcmf", false)]
    [TestCase(".model.mcmf.0123456789abcdef0123456789abcde.tmp", "model.mcmf", false)]
    [TestCase(".model.mcmf.0123456789abcdef0123456789abcdeg.tmp", "model.mcmf", false)]
    [TestCase(".a.mcmf.0123456789abcdef0123456789abcdef.tmp", "mcmf", false)]
    [TestCase("model.mcmf.0123456789abcdef0123456789abcdef.tmp.", "model.mcmf", false)]
    public void IsTemporaryOf_OnlyTheExactPattern(string fileName, string target, bool expected) =>
        Assert.That(AtomicFile.IsTemporaryOf(fileName, target), Is.EqualTo(expected));

    private string Temporary(string target, TimeSpan age)
    {
        string path = Path.Combine(directory, $".{target}.{Guid.NewGuid():N}.tmp");
        File.WriteAllText(path, "partial");
        File.SetLastWriteTimeUtc(path, DateTime.UtcNow - age);
        return path;
    }
}
