using System.Buffers.Binary;
using System.IO.Compression;
using System.Text;
using ModelCompression.Interop.PyTorch;
using ModelCompression.Samples;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Interop.PyTorch;

/// <summary>
/// Hostile PyTorch and safetensors files, made by hand: zip bombs, storages and views that disagree with the bytes
/// present, headers that break the safetensors rules. Each must be an <see cref="InvalidDataException"/> naming the file
/// and the entry, allocate managed memory in proportion to the file, leave no tensor alive and the model unchanged.
/// </summary>
[TestFixture]
public sealed class PyTorchImportHardeningTests
{
    /// <summary>One gigabyte of zeros: deflated, about a megabyte.</summary>
    private const int BombBytes = 1 << 30;

    private string directory = string.Empty;

    [SetUp]
    public void SetUp()
    {
        directory = Path.Combine(Path.GetTempPath(), "mc-import-hostile-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(directory);
    }

    [TearDown]
    public void TearDown() => Directory.Delete(directory, recursive: true);

    [Test]
    public void LoadStateDict_ZipEntryDeclaringAGigabyte_ThrowsBeforeInflatingItWithBoundedMemory()
    {
        // An honest bomb: the pickle, the zip directory and the deflated data all agree on 2^28 floats.
        long elements = BombBytes / sizeof(float);
        var pickle = PyTorchFixtureWriter.Pickle([new PickledView("fc1.weight", "FloatStorage", "0", elements, 0, [elements], [1])]);
        string path = WriteFile("bomb.pt", Archive(pickle, ("0", Zeros(BombBytes), CompressionLevel.SmallestSize)));
        Assert.That(new FileInfo(path).Length, Is.LessThan(2 << 20), "the bomb is small");

        var ex = AssertRejected(path, "storage '0' of tensor 'fc1.weight'", nameof(PyTorchImportOptions.MaxDecodedBytesPerFileByte));

        Assert.That(ex.Message, Does.Contain("limit"));
    }

    [Test]
    public void LoadStateDict_ZipEntryLyingAboutItsLength_ThrowsAfterCountingWithBoundedMemory()
    {
        // The pickle and the zip directory say 1,024 floats; the entry's compressed data holds a gigabyte.
        var pickle = PyTorchFixtureWriter.Pickle([new PickledView("fc1.weight", "FloatStorage", "0", 1024, 0, [1024], [1])]);
        var archive = Archive(pickle, ("0", Zeros(BombBytes), CompressionLevel.SmallestSize));
        string path = WriteFile("liar.pt", DeclareLength(archive, "archive/data/0", 4096));

        // The zip reader stops at the declared length, so only 4,096 bytes are ever inflated; their CRC-32 is not the entry's.
        var ex = AssertRejected(path, "storage '0' (tensor 'fc1.weight')", "archive/data/0");

        Assert.That(ex.Message, Does.Contain("CRC-32"));
    }

    [Test]
    public void LoadStateDict_PickleEntryLyingAboutItsLength_Throws()
    {
        var pickle = PyTorchFixtureWriter.Pickle([new PickledView("fc1.weight", "FloatStorage", "0", 4, 0, [4], [1])]);
        var archive = Archive(pickle, ("0", Bytes(new byte[16]), CompressionLevel.NoCompression), pickleLevel: CompressionLevel.SmallestSize);
        string path = WriteFile("pickle-liar.pt", DeclareLength(archive, "archive/data.pkl", (uint)pickle.Length - 10));

        var ex = AssertRejected(path, "archive/data.pkl");

        Assert.That(ex.Message, Does.Contain("truncated"));
    }

    [Test]
    public void LoadStateDict_ManyTensorsSharingOneStorage_ThrowsWithTheLimit()
    {
        // 4,096 tensors that each copy one 64 KB storage would need 256 MB from a file of a few hundred KB.
        var views = Enumerable.Range(0, 4096).Select(i => new PickledView($"t{i}", "FloatStorage", "0", 16384, 0, [16384], [1])).ToList();
        string path = WriteFile("shared.pt", Archive(PyTorchFixtureWriter.Pickle(views), ("0", new byte[16384 * 4], CompressionLevel.NoCompression)));

        var ex = AssertRejected(path, "tensor 't", "storage '0'");

        Assert.That(ex.Message, Does.Contain("need").And.Contain("limit"));
    }

    private static IEnumerable<TestCaseData> BadStorages()
    {
        TestCaseData Case(string name, PickledView view, int entryBytes, params string[] parts) =>
            new TestCaseData(view, entryBytes, parts).SetArgDisplayNames(name);

        yield return Case("more elements declared than bytes present", new("fc1.weight", "FloatStorage", "0", 1_000_000, 0, [100], [1]), 400, "storage '0' of tensor 'fc1.weight'", "1000000", "holds 400 bytes");
        yield return Case("fewer elements declared than bytes present", new("fc1.weight", "FloatStorage", "0", 50, 0, [50], [1]), 400, "storage '0' of tensor 'fc1.weight'", "holds 400 bytes");
        yield return Case("element count beyond any size", new("fc1.weight", "DoubleStorage", "0", long.MaxValue / 4, 0, [100], [1]), 800, "storage '0' of tensor 'fc1.weight'");
        yield return Case("shape larger than its storage", new("fc1.weight", "FloatStorage", "0", 100, 0, [200], [1]), 400, "tensor 'fc1.weight' (storage '0')", "reaches element 199");
        yield return Case("strides past its storage", new("fc1.weight", "FloatStorage", "0", 100, 0, [10, 10], [20, 1]), 400, "tensor 'fc1.weight' (storage '0')", "reaches element 189");
        yield return Case("offset past its storage", new("fc1.weight", "FloatStorage", "0", 100, 95, [10], [1]), 400, "tensor 'fc1.weight' (storage '0')", "reaches element 104");
        yield return Case("a transposed view", new("fc1.weight", "FloatStorage", "0", 100, 0, [10, 10], [1, 10]), 400, "tensor 'fc1.weight' (storage '0')", "non-contiguous");
        yield return Case("a view at an offset", new("fc1.weight", "FloatStorage", "0", 100, 50, [50], [1]), 400, "tensor 'fc1.weight' (storage '0')", "non-contiguous");
        yield return Case("a negative size", new("fc1.weight", "FloatStorage", "0", 100, 0, [-1, 100], [100, 1]), 400, "tensor 'fc1.weight' (storage '0')", "negative");
        yield return Case("a size beyond 2^31", new("fc1.weight", "FloatStorage", "0", 100, 0, [1L << 40, 0], [1, 1]), 400, "tensor 'fc1.weight' (storage '0')", "2^31");
        yield return Case("more strides than sizes", new("fc1.weight", "FloatStorage", "0", 100, 0, [100], [1, 1]), 400, "tensor 'fc1.weight' (storage '0')", "strides");
        yield return Case("a storage with no entry", new("fc1.weight", "FloatStorage", "7", 100, 0, [100], [1]), 400, "storage '7' of tensor 'fc1.weight'", "no entry");
        yield return Case("a storage name outside data/", new("fc1.weight", "FloatStorage", "../0", 100, 0, [100], [1]), 400, "storage '../0' of tensor 'fc1.weight'");
    }

    [TestCaseSource(nameof(BadStorages))]
    public void LoadStateDict_StorageOrViewDisagreeingWithTheBytes_ThrowsNamingTheEntry(PickledView view, int entryBytes, string[] parts)
    {
        string path = WriteFile("bad.pt", Archive(PyTorchFixtureWriter.Pickle([view]), ("0", new byte[entryBytes], CompressionLevel.NoCompression)));

        AssertRejected(path, parts);
    }

    [Test]
    public void LoadStateDict_HostilePickles_ThrowNamingTheFile()
    {
        var valid = PyTorchFixtureWriter.Pickle([new PickledView("fc1.weight", "FloatStorage", "0", 4, 0, [4], [1])]);
        var cases = new Dictionary<string, (byte[] Pickle, string Part)>
        {
            ["a string longer than the pickle"] = ([0x80, 2, (byte)'X', 0xFF, 0xFF, 0xFF, 0x7F, (byte)'a', (byte)'.'], "truncated"),
            ["a string of invalid UTF-8"] = ([0x80, 2, 0x8C, 2, 0xC3, 0x28, (byte)'.'], "UTF-8"),
            ["a call of os.system"] = ([0x80, 2, .. "cposix\nsystem\nX"u8, 2, 0, 0, 0, .. "ls"u8, 0x85, (byte)'R', (byte)'.'], "posix.system"),
            ["no STOP"] = (valid[..^1], "STOP"),
            ["a list, not a dict"] = ([0x80, 2, (byte)']', (byte)'.'], "list"),
            ["an unknown opcode"] = ([0x80, 2, (byte)'i', (byte)'.'], "opcode 0x69"),
            ["a memo never stored"] = ([0x80, 2, (byte)'h', 7, (byte)'.'], "memo 7"),
            ["a pop of an empty stack"] = ([0x80, 2, (byte)'0', (byte)'.'], "empty stack"),
        };

        foreach (var (name, (pickle, part)) in cases)
        {
            string path = WriteFile("pickle.pt", Archive(pickle, ("0", new byte[16], CompressionLevel.NoCompression)));
            var ex = AssertRejected(path);
            Assert.That(ex.Message, Does.Contain(part), name);
        }
    }

    [Test]
    public void LoadStateDict_SecondEntryNamedLikeThePickle_Throws()
    {
        // TorchSharp.PyBridge reads the first entry whose name ends with data.pkl: a decoy must not be read instead.
        var pickle = PyTorchFixtureWriter.Pickle([new PickledView("fc1.weight", "FloatStorage", "0", 4, 0, [4], [1])]);
        using var buffer = new MemoryStream();
        using (var zip = new ZipArchive(buffer, ZipArchiveMode.Create, leaveOpen: true))
        {
            foreach (var (name, data) in new[] { ("archive/olddata.pkl", pickle), ("archive/data.pkl", pickle), ("archive/data/0", new byte[16]) })
            {
                using var stream = zip.CreateEntry(name, CompressionLevel.NoCompression).Open();
                stream.Write(data);
            }
        }

        string path = WriteFile("decoy.pt", buffer.ToArray());

        AssertRejected(path, "2 entries named like data.pkl", "archive/olddata.pkl");
    }

    [Test]
    public void LoadStateDict_PickleOfManyEmptyContainers_AllocatesInProportionToTheFile()
    {
        // Every opcode makes a small object: one megabyte of EMPTY_DICT, EMPTY_LIST and MARK must not balloon.
        var pickle = new byte[1 << 20];
        for (int i = 2; i < pickle.Length; i++)
        {
            pickle[i] = (byte)"}]("[i % 3];
        }

        pickle[0] = 0x80;
        pickle[1] = 2;
        string path = WriteFile("containers.pt", Archive(pickle, ("0", new byte[16], CompressionLevel.NoCompression)));

        AssertRejected(path, "STOP");
    }

    [Test]
    public void LoadStateDict_PickleFromCPythonsPickler_LoadsWithItsMemoizedNames()
    {
        // CPython 3's pickle.Pickler at protocol 2 with a persistent_id as torch.save defines it, dumping an OrderedDict
        // {'weight': 2x3 view of storage '0', 'bias': storage '1'} with _metadata, as torch.save would write nn.Linear(3, 2)'s
        // state_dict (stand-in classes named torch.FloatStorage and torch._utils._rebuild_tensor_v2). Unlike the fixture
        // writer's pickles it memoizes (BINPUT) and refers back (BINGET) to the storage tag, type and location.
        var pickle = Convert.FromBase64String(
            "gAJjY29sbGVjdGlvbnMKT3JkZXJlZERpY3QKcQApUnEBKFgGAAAAd2VpZ2h0cQJjdG9yY2guX3V0aWxzCl9yZWJ1aWxkX3RlbnNvcl92MgpxAygoWAcAAABzdG9yYWdlcQRjdG9yY2gKRmxvYXRTdG9yYWdlCnEFWAEAAAAwcQZYAwAAAGNwdXEHSwZ0cQhRSwBLAksDhnEJSwNLAYZxColoAClScQt0cQxScQ1YBAAAAGJpYXNxDmgDKChoBGgFWAEAAAAxcQ9oB0sCdHEQUUsASwKFcRFLAYVxEoloAClScRN0cRRScRV1fXEWWAkAAABfbWV0YWRhdGFxF2gAKVJxGFgAAAAAcRl9cRpYBwAAAHZlcnNpb25xG0sBc3NzYi4=");
        float[] weight = [1, 2, 3, 4, 5, 6];
        float[] bias = [-1, 0.5f];
        string path = WriteFile("linear.pt", Archive(
            pickle,
            ("0", weight.SelectMany(BitConverter.GetBytes).ToArray(), CompressionLevel.NoCompression),
            ("1", bias.SelectMany(BitConverter.GetBytes).ToArray(), CompressionLevel.NoCompression)));
        using var model = nn.Linear(3, 2);

        var summary = PyTorchImport.LoadStateDict(model, path);

        Assert.That(summary.Loaded, Is.EqualTo(new[] { "weight", "bias" }));
        Assert.That(model.weight!.data<float>().ToArray(), Is.EqualTo(weight));
        Assert.That(model.bias!.data<float>().ToArray(), Is.EqualTo(bias));
    }

    [Test]
    public void LoadStateDict_GenuineFileThatCompressesBeyondTheLimit_LoadsOnceTheOptionIsRaised()
    {
        // A model of zeros deflates about a thousandfold: past the default bound, within a raised one.
        using var source = ModelZoo.Create(ZooModel.LeNet300100, 1);
        using (no_grad())
        {
            foreach (var p in source.parameters())
            {
                p.zero_();
            }
        }

        using var model = ModelZoo.Create(ZooModel.LeNet300100, 2);
        var tensors = source.state_dict().Select(p => (p.Key, p.Value)).ToList();
        var storages = tensors.Select((t, i) => (i.ToString(System.Globalization.CultureInfo.InvariantCulture), t.Value.detach().contiguous().bytes.ToArray(), CompressionLevel.SmallestSize)).ToArray();
        string path = WriteFile("zeros.pt", Archive(PyTorchFixtureWriter.Pickle(tensors), storages));

        var ex = AssertRejected(path, "storage '0' of tensor 'fc1.weight'", nameof(PyTorchImportOptions.MaxDecodedBytesPerFileByte));
        var summary = PyTorchImport.LoadStateDict(model, path, new PyTorchImportOptions { MaxDecodedBytesPerFileByte = 4096 });

        Assert.That(ex.Message, Does.Contain("64 x the file's"));
        Assert.That(summary.Loaded, Has.Count.EqualTo(tensors.Count));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(TestModels.StateHash(source)));
        var capped = Assert.Throws<InvalidDataException>(() => PyTorchImport.LoadStateDict(model, path, new PyTorchImportOptions { MaxDecodedBytesPerFileByte = 4096, MaxDecodedBytes = 1000 }));
        Assert.That(capped!.Message, Does.Contain(nameof(PyTorchImportOptions.MaxDecodedBytes)));
    }

    [Test]
    public void LoadStateDict_SafetensorsDataBeyondMaxDecodedBytes_Throws()
    {
        using var source = ModelZoo.Create(ZooModel.LeNet300100, 1);
        string path = Path.Combine(directory, "model.safetensors");
        SafetensorsWriter.Save(source.state_dict().ToDictionary(p => p.Key, p => p.Value), path);
        using var model = ModelZoo.Create(ZooModel.LeNet300100, 2);

        var ex = Assert.Throws<InvalidDataException>(() => PyTorchImport.LoadStateDict(model, path, new PyTorchImportOptions { MaxDecodedBytes = 1000 }));

        Assert.That(ex!.Message, Does.Contain(path).And.Contain(nameof(PyTorchImportOptions.MaxDecodedBytes)));
    }

    [Test]
    public void LoadStateDict_NonSeekableStreamLongerThanMaxDecodedBytes_StopsCopying()
    {
        using var model = ModelZoo.Create(ZooModel.LeNet300100, 2);
        using var endless = new EndlessStream([], (byte)'P');

        var ex = Assert.Throws<InvalidDataException>(() => PyTorchImport.LoadStateDict(model, endless, options: new PyTorchImportOptions { MaxDecodedBytes = 1 << 20 }));

        Assert.That(ex!.Message, Does.Contain("the stream").And.Contain(nameof(PyTorchImportOptions.MaxDecodedBytes)));
        Assert.That(endless.Served, Is.LessThan(2 << 20));
    }

    private static IEnumerable<TestCaseData> BadSafetensorsHeaders()
    {
        TestCaseData Case(string name, byte[] header, int dataBytes, params string[] parts) =>
            new TestCaseData(header, dataBytes, parts).SetArgDisplayNames(name);

        byte[] Json(string json) => Encoding.UTF8.GetBytes(json);

        // "w\xC3(": a lead byte followed by a byte that cannot continue it.
        yield return Case("a tensor name that is not UTF-8", [.. "{\"w"u8, 0xC3, 0x28, .. "\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}"u8], 4, "not valid UTF-8", "{\"w");
        yield return Case("a name twice", Json("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}"), 8, "'a' twice");
        yield return Case("overlapping ranges", Json("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}"), 12, "'b'", "overlaps");
        yield return Case("a gap between ranges", Json("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}"), 12, "'b'", "belong to no tensor");
        yield return Case("offsets that disagree with dtype and shape", Json("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}"), 8, "'a'", "needs 12 bytes");
        yield return Case("offsets past the data", Json("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}"), 8, "16 bytes of data", "truncated");
        yield return Case("decreasing offsets", Json("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}"), 8, "'a'", "data_offsets");
        yield return Case("a shape too large to hold", Json("{\"a\":{\"dtype\":\"F64\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}}"), 8, "'a'", "too large");
    }

    [TestCaseSource(nameof(BadSafetensorsHeaders))]
    public void LoadStateDict_SafetensorsHeaderBreakingTheFormat_ThrowsInvalidDataNamingTheEntry(byte[] header, int dataBytes, string[] parts)
    {
        var bytes = new byte[8 + header.Length + dataBytes];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, (ulong)header.Length);
        header.CopyTo(bytes, 8);
        string path = WriteFile("bad.safetensors", bytes);

        AssertRejected(path, ["not a valid safetensors file", .. parts]);
    }

    [Test]
    public void LoadStateDict_SafetensorsHeaderLengthOutOfBounds_Throws()
    {
        foreach (ulong length in new[] { ulong.MaxValue, 1UL << 40, 200_000_000UL, 0UL })
        {
            var bytes = new byte[16];
            BinaryPrimitives.WriteUInt64LittleEndian(bytes, length);
            bytes[8] = (byte)'{';
            using var stream = new MemoryStream(bytes);
            using var model = ModelZoo.Create(ZooModel.LeNet300100, 2);
            var ex = Assert.Throws<InvalidDataException>(() => PyTorchImport.LoadStateDict(model, stream, StateDictFormat.Safetensors), $"header length {length}");
            Assert.That(ex!.Message, Does.Contain("the stream"), $"header length {length}");
        }
    }

    [Test]
    public void Validate_NonPositiveDecodeBounds_ListsBoth()
    {
        var options = new PyTorchImportOptions { MaxDecodedBytes = 0, MaxDecodedBytesPerFileByte = 0 };
        using var model = ModelZoo.Create(ZooModel.LeNet300100, 2);

        var ex = Assert.Throws<OptionsValidationException>(() => PyTorchImport.LoadStateDict(model, PyTorchFixtureTests.FixturePath(PyTorchFixtureWriter.LeNet5File), options));

        Assert.That(ex!.Errors, Has.Count.EqualTo(2));
        Assert.That(ex.Errors, Has.Some.Contain(nameof(PyTorchImportOptions.MaxDecodedBytes)));
        Assert.That(ex.Errors, Has.Some.Contain(nameof(PyTorchImportOptions.MaxDecodedBytesPerFileByte)));
        Assert.That(new PyTorchImportOptions().MaxDecodedBytes, Is.EqualTo(16L << 30));
        Assert.That(new PyTorchImportOptions().MaxDecodedBytesPerFileByte, Is.EqualTo(64));
    }

    /// <summary>
    /// Loads <paramref name="path"/> into a fresh model twice (the first warms up code paths), and checks the second:
    /// an <see cref="InvalidDataException"/> naming the file and each of <paramref name="parts"/>, managed allocations of
    /// at most 64 bytes per file byte plus 1 MB, no tensor left alive, the model unchanged.
    /// </summary>
    private static InvalidDataException AssertRejected(string path, params string[] parts)
    {
        using var model = ModelZoo.Create(ZooModel.LeNet300100, 2);
        string before = TestModels.StateHash(model);
        Catch(() => PyTorchImport.LoadStateDict(model, path));
        long tensors = TestModels.SettledTensorCount();
        long allocatedBefore = GC.GetAllocatedBytesForCurrentThread();

        var ex = Catch(() => PyTorchImport.LoadStateDict(model, path));

        long allocated = GC.GetAllocatedBytesForCurrentThread() - allocatedBefore;
        long fileBytes = new FileInfo(path).Length;
        TestContext.Out.WriteLine($"{Path.GetFileName(path)}: {fileBytes} bytes, {allocated} bytes allocated while rejecting it: {ex.Message}");
        Assert.That(Tensor.TotalCount, Is.EqualTo(tensors), "no tensor is left alive");
        Assert.That(allocated, Is.LessThanOrEqualTo((64 * fileBytes) + (1 << 20)), "managed allocations in proportion to the file");
        Assert.That(ex.Message, Does.Contain(path));
        foreach (string part in parts)
        {
            Assert.That(ex.Message, Does.Contain(part));
        }

        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
        return ex;
    }

    private static InvalidDataException Catch(Action action)
    {
        try
        {
            action();
        }
        catch (InvalidDataException ex)
        {
            return ex;
        }
        catch (Exception ex)
        {
            Assert.Fail($"expected an InvalidDataException, got {ex.GetType().Name}: {ex.Message}");
        }

        Assert.Fail("expected an InvalidDataException, nothing was thrown");
        throw new InvalidOperationException("Unreachable.");
    }

    private string WriteFile(string name, byte[] bytes)
    {
        string path = Path.Combine(directory, name);
        File.WriteAllBytes(path, bytes);
        return path;
    }

    /// <summary>A torch.save zip: archive/data.pkl, archive/byteorder, archive/data/{key} for each storage, archive/version.</summary>
    private static byte[] Archive(byte[] pickle, params (string Key, byte[] Data, CompressionLevel Level)[] storages) =>
        Archive(pickle, storages.Select(s => (s.Key, Bytes(s.Data), s.Level)).ToArray());

    private static byte[] Archive(byte[] pickle, (string Key, Action<Stream> Write, CompressionLevel Level) storage, CompressionLevel pickleLevel = CompressionLevel.NoCompression) =>
        Archive(pickle, [storage], pickleLevel);

    private static byte[] Archive(byte[] pickle, (string Key, Action<Stream> Write, CompressionLevel Level)[] storages, CompressionLevel pickleLevel = CompressionLevel.NoCompression)
    {
        using var buffer = new MemoryStream();
        using (var zip = new ZipArchive(buffer, ZipArchiveMode.Create, leaveOpen: true))
        {
            Add("archive/data.pkl", s => s.Write(pickle), pickleLevel);
            Add("archive/byteorder", s => s.Write("little"u8), CompressionLevel.NoCompression);
            foreach (var (key, write, level) in storages)
            {
                Add($"archive/data/{key}", write, level);
            }

            Add("archive/version", s => s.Write("3\n"u8), CompressionLevel.NoCompression);

            void Add(string name, Action<Stream> write, CompressionLevel level)
            {
                using var stream = zip.CreateEntry(name, level).Open();
                write(stream);
            }
        }

        return buffer.ToArray();
    }

    private static Action<Stream> Bytes(byte[] data) => stream => stream.Write(data);

    private static Action<Stream> Zeros(int bytes) => stream =>
    {
        var chunk = new byte[1 << 20];
        for (int written = 0; written < bytes; written += chunk.Length)
        {
            stream.Write(chunk, 0, Math.Min(chunk.Length, bytes - written));
        }
    };

    /// <summary>Rewrites an entry's uncompressed length in its local header and in the central directory.</summary>
    private static byte[] DeclareLength(byte[] zip, string name, uint length)
    {
        var result = (byte[])zip.Clone();
        var nameBytes = Encoding.ASCII.GetBytes(name);
        int patched = 0;
        for (int at = 0; at + 46 <= result.Length; at++)
        {
            uint signature = BinaryPrimitives.ReadUInt32LittleEndian(result.AsSpan(at));
            int nameAt = signature == 0x04034b50 ? at + 30 : signature == 0x02014b50 ? at + 46 : -1;
            int sizeAt = signature == 0x04034b50 ? at + 22 : at + 24;
            if (nameAt >= 0 && nameAt + nameBytes.Length <= result.Length && result.AsSpan(nameAt, nameBytes.Length).SequenceEqual(nameBytes)
                && BinaryPrimitives.ReadUInt16LittleEndian(result.AsSpan(nameAt - (signature == 0x04034b50 ? 4 : 18))) == nameBytes.Length)
            {
                BinaryPrimitives.WriteUInt32LittleEndian(result.AsSpan(sizeAt), length);
                patched++;
            }
        }

        Assert.That(patched, Is.EqualTo(2), $"'{name}' has a local header and a central directory record");
        return result;
    }
}
