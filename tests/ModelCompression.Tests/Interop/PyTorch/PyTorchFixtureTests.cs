using System.Collections;
using System.IO.Compression;
using System.Security.Cryptography;
using ModelCompression.Samples;
using NUnit.Framework;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Interop.PyTorch;

/// <summary>The committed PyTorch fixtures: reproducible from their description, in torch.save's layout, readable by PyBridge.</summary>
[TestFixture]
public sealed class PyTorchFixtureTests
{
    /// <summary>Set to the Fixtures folder to rewrite the committed files instead of comparing with them.</summary>
    private const string RegenerateVariable = "MC_REGENERATE_FIXTURES";

    private static readonly string[] Fixtures = [PyTorchFixtureWriter.LeNet5File, PyTorchFixtureWriter.SmallResNetFile];

    internal static string FixturePath(string file) => Path.Combine(TestContext.CurrentContext.TestDirectory, "Interop", "Fixtures", file);

    [TestCaseSource(nameof(Fixtures))]
    public void Fixture_RegeneratedByTheWriter_IsByteIdenticalToTheCommittedFile(string file)
    {
        var bytes = PyTorchFixtureWriter.Create(file);
        string? regenerateInto = Environment.GetEnvironmentVariable(RegenerateVariable);
        if (!string.IsNullOrEmpty(regenerateInto))
        {
            File.WriteAllBytes(Path.Combine(regenerateInto, file), bytes);
            // A regeneration run compares nothing, so it must not count as a pass.
            Assert.Ignore($"Regenerated: wrote {bytes.Length} bytes to {Path.Combine(regenerateInto, file)}; run again without {RegenerateVariable} to compare.");
        }

        var committed = File.ReadAllBytes(FixturePath(file));
        Assert.That(bytes.Length, Is.EqualTo(committed.Length), "length");
        Assert.That(Convert.ToHexString(SHA256.HashData(bytes)), Is.EqualTo(Convert.ToHexString(SHA256.HashData(committed))), "the committed fixture is what its README describes");
    }

    [TestCaseSource(nameof(Fixtures))]
    public void Fixture_Entries_FollowTorchSavesLayoutStoredUncompressed(string file)
    {
        string archive = Path.GetFileNameWithoutExtension(file);
        using var zip = ZipFile.OpenRead(FixturePath(file));
        var names = zip.Entries.Select(e => e.FullName).ToList();
        int tensors = names.Count - 3;
        Assert.That(names, Is.EqualTo(new[] { $"{archive}/data.pkl", $"{archive}/byteorder" }
            .Concat(Enumerable.Range(0, tensors).Select(i => $"{archive}/data/{i}"))
            .Append($"{archive}/version")));
        Assert.That(zip.Entries.Select(e => e.CompressedLength), Is.EqualTo(zip.Entries.Select(e => e.Length)), "every entry is stored, not deflated");
        Assert.That(zip.Entries.Select(e => e.LastWriteTime.DateTime).Distinct(), Is.EqualTo(new[] { new DateTime(1980, 1, 1) }));
        Assert.That(ReadText(zip, $"{archive}/version"), Is.EqualTo("3\n"));
        Assert.That(ReadText(zip, $"{archive}/byteorder"), Is.EqualTo("little"));
        var pickle = ReadBytes(zip, $"{archive}/data.pkl");
        Assert.That(pickle[..2], Is.EqualTo(new byte[] { 0x80, 0x02 }), "PROTO 2");
        Assert.That(pickle[^1], Is.EqualTo((byte)'.'), "STOP");
    }

    [Test]
    public void LeNet5Fixture_ReadByPyBridge_HoldsTheSeed1ModelUnderPyTorchNames()
    {
        using var source = ModelZoo.Create(ZooModel.LeNet5, PyTorchFixtureWriter.Seed);
        var expected = PyTorchFixtureWriter.PyTorchStateDict(source, PyTorchFixtureWriter.LeNet5Renames);
        Assert.That(expected.Select(e => e.Key), Is.EqualTo(new[]
        {
            "0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias", "9.weight", "9.bias", "11.weight", "11.bias",
        }));

        using var scope = NewDisposeScope();
        using var file = File.OpenRead(FixturePath(PyTorchFixtureWriter.LeNet5File));
        var table = TorchSharp.PyBridge.PyTorchUnpickler.UnpickleStateDict(file, leaveOpen: false, skipTensorRead: false);
        Assert.That(table.Keys.Cast<string>(), Is.EquivalentTo(expected.Select(e => e.Key)));
        foreach (var (key, tensor) in expected)
        {
            var read = (Tensor)table[key]!;
            Assert.That(read.dtype, Is.EqualTo(ScalarType.Float32), key);
            Assert.That(read.shape, Is.EqualTo(tensor.shape), key);
            Assert.That(read.equal(tensor).all().item<bool>(), Is.True, key);
        }
    }

    [Test]
    public void SmallResNetFixture_ReadByPyBridge_HoldsInt64BatchCountersAndStatistics()
    {
        using var source = PyTorchFixtureWriter.SmallResNetSource();
        var expected = PyTorchFixtureWriter.PyTorchStateDict(source, PyTorchFixtureWriter.SmallResNetRenames);
        Assert.That(expected.Select(e => e.Key).Take(7), Is.EqualTo(new[]
        {
            "0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked", "4.conv1.weight",
        }));
        Assert.That(expected.Select(e => e.Key), Does.Contain("4.bn2.num_batches_tracked").And.Contain("10.bias"));

        using var scope = NewDisposeScope();
        using var file = File.OpenRead(FixturePath(PyTorchFixtureWriter.SmallResNetFile));
        Hashtable table = TorchSharp.PyBridge.PyTorchUnpickler.UnpickleStateDict(file, leaveOpen: false, skipTensorRead: false);
        Assert.That(table.Keys.Cast<string>(), Is.EquivalentTo(expected.Select(e => e.Key)));
        foreach (var (key, tensor) in expected)
        {
            var read = (Tensor)table[key]!;
            Assert.That(read.dtype, Is.EqualTo(tensor.dtype), key);
            Assert.That(read.shape, Is.EqualTo(tensor.shape), key);
            Assert.That(read.equal(tensor).all().item<bool>(), Is.True, key);
        }

        var counter = (Tensor)table["6.num_batches_tracked"]!;
        Assert.That(counter.dtype, Is.EqualTo(ScalarType.Int64));
        Assert.That(counter.shape, Is.Empty, "a 0-dimensional tensor stays 0-dimensional");
        Assert.That(counter.item<long>(), Is.EqualTo(PyTorchFixtureWriter.BatchesTracked));
    }

    private static byte[] ReadBytes(ZipArchive zip, string name)
    {
        using var stream = zip.GetEntry(name)!.Open();
        using var copy = new MemoryStream();
        stream.CopyTo(copy);
        return copy.ToArray();
    }

    private static string ReadText(ZipArchive zip, string name) => System.Text.Encoding.ASCII.GetString(ReadBytes(zip, name));
}
