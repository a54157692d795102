using System.IO.Compression;
using ModelCompression.Interop.PyTorch;
using ModelCompression.Samples;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Interop.PyTorch;

[TestFixture]
public sealed class PyTorchImportTests
{
    private static readonly StateDictFormat[] Formats = [StateDictFormat.PyTorch, StateDictFormat.Safetensors];

    private string directory = string.Empty;

    [SetUp]
    public void SetUp()
    {
        directory = Path.Combine(Path.GetTempPath(), "mc-import-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(directory);
    }

    [TearDown]
    public void TearDown() => Directory.Delete(directory, recursive: true);

    [Test]
    public void LoadStateDict_PtFixtureWithRenames_GivesTheSeed1ModelsOutputs()
    {
        using var source = ModelZoo.Create(ZooModel.LeNet5, PyTorchFixtureWriter.Seed);
        using var model = ModelZoo.Create(ZooModel.LeNet5, 99);
        var options = new PyTorchImportOptions();
        foreach (var (from, to) in PyTorchFixtureWriter.LeNet5Renames)
        {
            options.Renames[from] = to;
        }

        var summary = PyTorchImport.LoadStateDict(model, PyTorchFixtureTests.FixturePath(PyTorchFixtureWriter.LeNet5File), options);

        Assert.That(summary.Format, Is.EqualTo(StateDictFormat.PyTorch));
        Assert.That(summary.MatchedByOrder, Is.False);
        Assert.That(summary.Loaded, Is.EqualTo(model.state_dict().Keys));
        Assert.That(summary.Bytes, Is.EqualTo(61_706L * 4));
        Assert.That(summary.Skipped.Concat(summary.Unexpected).Concat(summary.Missing).Concat(summary.Converted), Is.Empty);
        Assert.That(TestModels.StateHash(model), Is.EqualTo(TestModels.StateHash(source)));
        using var x = randn(3, 1, 28, 28);
        Assert.That(TestModels.Output(model, x), Is.EqualTo(TestModels.Output(source, x)));
    }

    [Test]
    public void LoadStateDict_PtFixtureMatchedByOrder_GivesTheSeed1ModelsOutputs()
    {
        using var source = ModelZoo.Create(ZooModel.LeNet5, PyTorchFixtureWriter.Seed);
        using var model = ModelZoo.Create(ZooModel.LeNet5, 99);

        var summary = PyTorchImport.LoadStateDict(model, PyTorchFixtureTests.FixturePath(PyTorchFixtureWriter.LeNet5File), new PyTorchImportOptions { MatchByOrder = true });

        Assert.That(summary.MatchedByOrder, Is.True);
        Assert.That(summary.Loaded, Has.Count.EqualTo(10));
        using var x = randn(3, 1, 28, 28);
        Assert.That(TestModels.Output(model, x), Is.EqualTo(TestModels.Output(source, x)));
    }

    [Test]
    public void LoadStateDict_SmallResNetPtFixture_LoadsBatchNormStatisticsAndInt64Counters()
    {
        using var source = PyTorchFixtureWriter.SmallResNetSource();
        using var model = ModelZoo.Create(ZooModel.SmallResNet, 99);
        var options = new PyTorchImportOptions();
        foreach (var (from, to) in PyTorchFixtureWriter.SmallResNetRenames)
        {
            options.Renames[from] = to;
        }

        var summary = PyTorchImport.LoadStateDict(model, PyTorchFixtureTests.FixturePath(PyTorchFixtureWriter.SmallResNetFile), options);

        Assert.That(summary.Loaded, Has.Count.EqualTo(model.state_dict().Count));
        Assert.That(summary.Loaded, Does.Contain("block.bn2.num_batches_tracked"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(TestModels.StateHash(source)));
        var counter = model.state_dict()["bn2.num_batches_tracked"];
        Assert.That(counter.dtype, Is.EqualTo(ScalarType.Int64));
        Assert.That(counter.item<long>(), Is.EqualTo(PyTorchFixtureWriter.BatchesTracked));
        using var x = randn(3, 1, 28, 28);
        Assert.That(TestModels.Output(model, x), Is.EqualTo(TestModels.Output(source, x)));
    }

    [Test]
    public void LoadStateDict_SmallResNetPtFixtureMatchedByOrder_PairsInPyTorchsModuleByModuleOrder()
    {
        // TorchSharp's state_dict() lists every parameter before every buffer; PyTorch's goes module by module.
        using var source = PyTorchFixtureWriter.SmallResNetSource();
        using var model = ModelZoo.Create(ZooModel.SmallResNet, 99);
        Assume.That(model.state_dict().Keys.Skip(14).First(), Is.EqualTo("bn1.running_mean"));

        var summary = PyTorchImport.LoadStateDict(model, PyTorchFixtureTests.FixturePath(PyTorchFixtureWriter.SmallResNetFile), new PyTorchImportOptions { MatchByOrder = true });

        Assert.That(summary.MatchedByOrder, Is.True);
        Assert.That(TestModels.StateHash(model), Is.EqualTo(TestModels.StateHash(source)));
    }

    [Test]
    public void LoadStateDict_PtFixtureWithoutMapping_ListsEveryKeyAndChangesNothing()
    {
        using var model = ModelZoo.Create(ZooModel.LeNet5, 99);
        string before = TestModels.StateHash(model);
        string path = PyTorchFixtureTests.FixturePath(PyTorchFixtureWriter.LeNet5File);

        var ex = Assert.Throws<StateDictMismatchException>(() => PyTorchImport.LoadStateDict(model, path));

        Assert.That(ex!.Missing, Is.EqualTo(model.state_dict().Keys));
        Assert.That(ex!.Unexpected, Is.EqualTo(new[] { "0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias", "9.weight", "9.bias", "11.weight", "11.bias" }), "in file order");
        Assert.That(ex.Problems, Has.Count.EqualTo(20));
        Assert.That(ex!.Message, Does.Contain(path).And.Contain("'conv1.weight'").And.Contain("'11.bias'"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
    }

    private static IEnumerable<ZooModel> ZooModels => Enum.GetValues<ZooModel>();

    [TestCaseSource(nameof(ZooModels))]
    public void LoadStateDict_SafetensorsOfAZooModel_GivesAnIdenticalStateAndOutputs(ZooModel kind)
    {
        using var source = kind == ZooModel.SmallResNet ? PyTorchFixtureWriter.SmallResNetSource() : ModelZoo.Create(kind, 1);
        string path = Path.Combine(directory, kind + ".safetensors");
        long written = SafetensorsWriter.Save(source, path);
        using var model = ModelZoo.Create(kind, 99);
        Assume.That(TestModels.StateHash(model), Is.Not.EqualTo(TestModels.StateHash(source)));

        var summary = PyTorchImport.LoadStateDict(model, path);

        Assert.That(new FileInfo(path).Length, Is.EqualTo(written));
        Assert.That(summary.Format, Is.EqualTo(StateDictFormat.Safetensors));
        Assert.That(summary.Loaded, Is.EqualTo(model.state_dict().Keys));
        Assert.That(summary.Bytes, Is.EqualTo(source.state_dict().Values.Sum(t => t.numel() * t.ElementSize)));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(TestModels.StateHash(source)));
        using var x = randn(3, 1, 28, 28);
        Assert.That(TestModels.Output(model, x), Is.EqualTo(TestModels.Output(source, x)));
    }

    [TestCaseSource(nameof(Formats))]
    public void LoadStateDict_WrongKeysShapesAndDtypes_OneExceptionListingEveryMismatchAndNothingChanges(StateDictFormat format)
    {
        using var model = ModelZoo.Create(ZooModel.LeNet300100, 2);
        string before = TestModels.StateHash(model);
        using var scope = NewDisposeScope();
        var file = new List<(string, Tensor)>
        {
            ("fc1.weight", zeros(300, 784)),       // fits: must still not be loaded
            ("fc2.weight", zeros(100, 300)),       // fits
            ("fc3.weight", zeros(10, 50)),         // shape mismatch
            ("fc3.bias", zeros(10, dtype: int32)), // dtype mismatch
            ("extra.weight", zeros(4)),            // unexpected
        };                                         // fc1.bias and fc2.bias missing
        string path = Write(format, file);

        var ex = Assert.Throws<StateDictMismatchException>(() => PyTorchImport.LoadStateDict(model, path));

        Assert.That(ex!.Missing, Is.EqualTo(new[] { "fc1.bias", "fc2.bias" }));
        Assert.That(ex!.Unexpected, Is.EqualTo(new[] { "extra.weight" }));
        Assert.That(ex.ShapeMismatches, Has.Count.EqualTo(1));
        Assert.That(ex.ShapeMismatches[0].Name, Is.EqualTo("fc3.weight"));
        Assert.That(ex.ShapeMismatches[0].FileShape, Is.EqualTo(new long[] { 10, 50 }));
        Assert.That(ex.ShapeMismatches[0].ModelShape, Is.EqualTo(new long[] { 10, 100 }));
        Assert.That(ex.DtypeMismatches, Has.Count.EqualTo(1));
        Assert.That(ex.DtypeMismatches[0], Is.EqualTo(new TensorDtypeMismatch("fc3.bias", "fc3.bias", ScalarType.Int32, ScalarType.Float32)));
        Assert.That(ex.NonFinite, Is.Empty);
        Assert.That(ex.Problems, Has.Count.EqualTo(5));
        Assert.That(ex!.Message, Does.Contain("5 problems")
            .And.Contain("missing key 'fc1.bias'")
            .And.Contain("missing key 'fc2.bias'")
            .And.Contain("unexpected key 'extra.weight'")
            .And.Contain("file [10, 50], model [10, 100]")
            .And.Contain("dtype of 'fc3.bias': file Int32, model Float32"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
    }

    [TestCaseSource(nameof(Formats))]
    public void LoadStateDict_NotStrict_LoadsWhatMatchesAndReportsTheRest(StateDictFormat format)
    {
        using var source = ModelZoo.Create(ZooModel.LeNet300100, 1);
        using var model = ModelZoo.Create(ZooModel.LeNet300100, 2);
        var state = source.state_dict();
        using var fc1BiasBefore = model.state_dict()["fc1.bias"].clone();
        using var scope = NewDisposeScope();
        var file = state.Where(p => p.Key != "fc1.bias").Select(p => (p.Key, p.Value)).Append(("extra.weight", ones(3))).ToList();
        string path = Write(format, file);

        var summary = PyTorchImport.LoadStateDict(model, path, new PyTorchImportOptions { Strict = false });

        Assert.That(summary.Missing, Is.EqualTo(new[] { "fc1.bias" }));
        Assert.That(summary.Unexpected, Is.EqualTo(new[] { "extra.weight" }));
        Assert.That(summary.Loaded, Is.EqualTo(new[] { "fc1.weight", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias" }));
        var loaded = model.state_dict();
        Assert.That(loaded["fc1.bias"].equal(fc1BiasBefore).all().item<bool>(), Is.True, "a missing tensor keeps its value");
        foreach (string name in summary.Loaded)
        {
            Assert.That(loaded[name].equal(state[name]).all().item<bool>(), Is.True, name);
        }
    }

    [TestCaseSource(nameof(Formats))]
    public void LoadStateDict_StripPrefix_LoadsDataParallelNames(StateDictFormat format)
    {
        using var source = ModelZoo.Create(ZooModel.LeNet300100, 1);
        using var model = ModelZoo.Create(ZooModel.LeNet300100, 2);
        string path = Write(format, source.state_dict().Select(p => ("module." + p.Key, p.Value)).ToList());

        var summary = PyTorchImport.LoadStateDict(model, path, new PyTorchImportOptions { StripPrefix = "module." });

        Assert.That(summary.Loaded, Has.Count.EqualTo(6));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(TestModels.StateHash(source)));
    }

    [Test]
    public void LoadStateDict_KeyMapReturningNull_SkipsTheKey()
    {
        using var source = ModelZoo.Create(ZooModel.LeNet300100, 1);
        using var model = ModelZoo.Create(ZooModel.LeNet300100, 2);
        using var scope = NewDisposeScope();
        var file = source.state_dict().Select(p => ("model." + p.Key, p.Value)).Append(("model.classifier_head.weight", ones(2))).ToList();
        string path = Write(StateDictFormat.Safetensors, file);
        var options = new PyTorchImportOptions
        {
            StripPrefix = "model.",
            KeyMap = key => key.StartsWith("classifier_head.", StringComparison.Ordinal) ? null : key,
        };

        var summary = PyTorchImport.LoadStateDict(model, path, options);

        Assert.That(summary.Skipped, Is.EqualTo(new[] { "model.classifier_head.weight" }));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(TestModels.StateHash(source)));
    }

    [Test]
    public void LoadStateDict_TwoKeysMappedToOneName_Throws()
    {
        using var source = ModelZoo.Create(ZooModel.LeNet300100, 1);
        using var model = ModelZoo.Create(ZooModel.LeNet300100, 2);
        var file = source.state_dict().Select(p => (p.Key, p.Value)).Append(("module.fc1.bias", source.state_dict()["fc1.bias"])).ToList();
        string path = Write(StateDictFormat.Safetensors, file);

        var ex = Assert.Throws<StateDictMismatchException>(() => PyTorchImport.LoadStateDict(model, path, new PyTorchImportOptions { StripPrefix = "module." }));

        Assert.That(ex!.Problems, Has.Count.EqualTo(1));
        Assert.That(ex!.Problems[0], Does.Contain("'fc1.bias'").And.Contain("'module.fc1.bias'"));
    }

    [Test]
    public void LoadStateDict_MatchByOrderWithAnotherCountOrShape_ListsTheDifferences()
    {
        using var model = ModelZoo.Create(ZooModel.LeNet5, 99);
        string before = TestModels.StateHash(model);
        using var source = ModelZoo.Create(ZooModel.LeNet5, 1);
        var state = PyTorchFixtureWriter.PyTorchStateDict(source, PyTorchFixtureWriter.LeNet5Renames);
        using var scope = NewDisposeScope();
        var fewer = state.Take(9).ToList();
        var reshaped = state.Select((p, i) => i == 4 ? (p.Key, zeros(120, 401)) : p).ToList();
        var options = new PyTorchImportOptions { MatchByOrder = true };

        var countError = Assert.Throws<StateDictMismatchException>(() => PyTorchImport.LoadStateDict(model, Write(StateDictFormat.PyTorch, fewer), options));
        var shapeError = Assert.Throws<StateDictMismatchException>(() => PyTorchImport.LoadStateDict(model, Write(StateDictFormat.PyTorch, reshaped), options));

        Assert.That(countError!.Problems, Has.Count.EqualTo(1));
        Assert.That(countError.Problems[0], Does.Contain("the file has 9").And.Contain("state_dict 10"));
        Assert.That(shapeError!.ShapeMismatches.Select(m => (m.Name, m.FileKey)), Is.EqualTo(new[] { ("fc1.weight", "7.weight") }));
        Assert.That(shapeError.Message, Does.Contain("file [120, 401], model [120, 400]"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
    }

    [TestCaseSource(nameof(Formats))]
    public void LoadStateDict_Float64File_ConvertsByDefaultAndRefusesWhenNotAllowed(StateDictFormat format)
    {
        using var source = ModelZoo.Create(ZooModel.LeNet300100, 1);
        using var model = ModelZoo.Create(ZooModel.LeNet300100, 2);
        string before = TestModels.StateHash(model);
        using var scope = NewDisposeScope();
        string path = Write(format, source.state_dict().Select(p => (p.Key, p.Value.to_type(float64))).ToList());

        var ex = Assert.Throws<StateDictMismatchException>(() => PyTorchImport.LoadStateDict(model, path, new PyTorchImportOptions { AllowDtypeConversion = false }));
        Assert.That(ex!.DtypeMismatches, Has.Count.EqualTo(6));
        Assert.That(ex!.Message, Does.Contain(nameof(PyTorchImportOptions.AllowDtypeConversion)));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));

        var summary = PyTorchImport.LoadStateDict(model, path);
        Assert.That(summary.Converted, Has.Count.EqualTo(6));
        Assert.That(summary.Bytes, Is.EqualTo(266_610L * 8));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(TestModels.StateHash(source)), "float32 to float64 and back is exact");
    }

    [TestCaseSource(nameof(Formats))]
    public void LoadStateDict_NonFiniteValue_ThrowsNamingTheKeyAndChangesNothing(StateDictFormat format)
    {
        using var source = ModelZoo.Create(ZooModel.LeNet300100, 1);
        using var model = ModelZoo.Create(ZooModel.LeNet300100, 2);
        string before = TestModels.StateHash(model);
        using var scope = NewDisposeScope();
        var poisoned = source.state_dict()["fc2.weight"].clone();
        poisoned[0, 0] = tensor(float.NaN);
        var file = source.state_dict().Select(p => (p.Key, p.Key == "fc2.weight" ? poisoned : p.Value)).ToList();
        string path = Write(format, file);

        var ex = Assert.Throws<StateDictMismatchException>(() => PyTorchImport.LoadStateDict(model, path));

        Assert.That(ex!.NonFinite, Is.EqualTo(new[] { "fc2.weight" }));
        Assert.That(ex!.Message, Does.Contain("'fc2.weight' holds NaN or infinite values"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
    }

    [TestCaseSource(nameof(Formats))]
    public void LoadStateDict_TruncatedFile_ThrowsInvalidDataNamingTheFile(StateDictFormat format)
    {
        using var source = ModelZoo.Create(ZooModel.LeNet300100, 1);
        using var model = ModelZoo.Create(ZooModel.LeNet300100, 2);
        string before = TestModels.StateHash(model);
        string path = Write(format, source.state_dict().Select(p => (p.Key, p.Value)).ToList());
        var bytes = File.ReadAllBytes(path);

        foreach (int length in new[] { bytes.Length - 1, bytes.Length / 2, 12, 3, 0 })
        {
            File.WriteAllBytes(path, bytes[..length]);
            var ex = CatchInvalidData(() => PyTorchImport.LoadStateDict(model, path), $"{length} bytes");
            Assert.That(ex.Message, Does.Contain(path), $"{length} bytes");
        }

        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
    }

    [Test]
    public void LoadStateDict_CorruptSafetensorsHeader_ThrowsInvalidData()
    {
        using var source = ModelZoo.Create(ZooModel.LeNet300100, 1);
        using var model = ModelZoo.Create(ZooModel.LeNet300100, 2);
        string path = Write(StateDictFormat.Safetensors, source.state_dict().Select(p => (p.Key, p.Value)).ToList());
        var bytes = File.ReadAllBytes(path);
        var cases = new Dictionary<string, Func<byte[], byte[]>>
        {
            ["broken JSON"] = b => Replace(b, "\"dtype\"", "\"dtype\"{"),
            ["unknown dtype"] = b => Replace(b, "\"F32\"", "\"F31\""),
            ["offsets past the data"] = b => Replace(b, "[0,", "[4,"),
            ["extra data"] = b => [.. b, 0, 0, 0, 0],
            ["header longer than the file"] = b => { var c = (byte[])b.Clone(); c[6] = 1; return c; },
        };

        foreach (var (name, corrupt) in cases)
        {
            File.WriteAllBytes(path, corrupt(bytes));
            var ex = CatchInvalidData(() => PyTorchImport.LoadStateDict(model, path), name);
            Assert.That(ex.Message, Does.Contain("not a valid safetensors file"), name);
        }
    }

    [Test]
    public void LoadStateDict_CorruptPtFile_ThrowsInvalidData()
    {
        using var model = ModelZoo.Create(ZooModel.LeNet5, 99);
        var bytes = File.ReadAllBytes(PyTorchFixtureTests.FixturePath(PyTorchFixtureWriter.LeNet5File));
        string path = Path.Combine(directory, "corrupt.pt");
        var cases = new Dictionary<string, Func<byte[], byte[]>>
        {
            // Same length, so only the pickle's content is wrong (and its entry's CRC no longer matches).
            ["an unknown pickle global"] = b => Replace(b, "torch._utils\n_rebuild_tensor_v2", "torch._utils\n_rebuild_tensor_v9"),
            ["an unknown storage type"] = b => Replace(b, "FloatStorage", "WeirdStorage"),
            ["a storage shorter than its tensor"] = b => TruncateEntry(b, "lenet5/data/2", 100),
            ["a damaged zip directory"] = b => Replace(b, "PK\x01\x02", "PK\x01\x09"),
            ["a bare pickle (PyTorch before 1.6)"] = _ => [0x80, 0x02, (byte)'}', (byte)'.'],
            ["neither format"] = _ => "hello, world"u8.ToArray(),
        };

        var messages = new Dictionary<string, string>();
        foreach (var (name, corrupt) in cases)
        {
            File.WriteAllBytes(path, corrupt(bytes));
            var ex = CatchInvalidData(() => PyTorchImport.LoadStateDict(model, path), name);
            Assert.That(ex.Message, Does.Contain(path), name);
            messages[name] = ex.Message;
        }

        Assert.That(messages["an unknown storage type"], Does.Contain("torch.WeirdStorage"));
        Assert.That(messages["a damaged zip directory"], Does.Contain("zip"));
        Assert.That(messages["a bare pickle (PyTorch before 1.6)"], Does.Contain("before PyTorch 1.6"));
    }

    [Test]
    public void LoadStateDict_InvalidOptions_ThrowsListingEveryError()
    {
        using var model = ModelZoo.Create(ZooModel.LeNet300100, 2);
        var options = new PyTorchImportOptions { StripPrefix = string.Empty };
        options.Renames[string.Empty] = "fc1.";
        options.Renames["0."] = null!;

        var ex = Assert.Throws<OptionsValidationException>(() => PyTorchImport.LoadStateDict(model, PyTorchFixtureTests.FixturePath(PyTorchFixtureWriter.LeNet5File), options));

        Assert.That(ex!.OptionsType, Is.EqualTo(nameof(PyTorchImportOptions)));
        Assert.That(ex!.Errors, Has.Count.EqualTo(3));
        Assert.That(options.Validate(), Has.Count.EqualTo(3));
        Assert.That(new PyTorchImportOptions().Validate(), Is.Empty);
    }

    [Test]
    public void LoadStateDict_Stream_DetectsTheFormatOrTakesItAndReadsFromTheCurrentPosition()
    {
        using var source = ModelZoo.Create(ZooModel.LeNet300100, 1);
        using var model = ModelZoo.Create(ZooModel.LeNet300100, 2);
        var bytes = File.ReadAllBytes(Write(StateDictFormat.Safetensors, source.state_dict().Select(p => (p.Key, p.Value)).ToList()));
        using var stream = new MemoryStream();
        stream.Write("junk"u8);
        stream.Write(bytes);
        stream.Position = 4;

        var summary = PyTorchImport.LoadStateDict(model, stream);

        Assert.That(summary.Format, Is.EqualTo(StateDictFormat.Safetensors));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(TestModels.StateHash(source)));
        using var wrongFormat = new MemoryStream(bytes);
        var ex = CatchInvalidData(() => PyTorchImport.LoadStateDict(model, wrongFormat, StateDictFormat.PyTorch), "safetensors read as PyTorch");
        Assert.That(ex.Message, Does.Contain("the stream"));
    }

    [TestCaseSource(nameof(Formats))]
    public void LoadStateDict_Repeated_LeavesNoLiveTensors(StateDictFormat format)
    {
        using var source = ModelZoo.Create(ZooModel.LeNet300100, 1);
        using var model = ModelZoo.Create(ZooModel.LeNet300100, 2);
        string path = Write(format, source.state_dict().Select(p => (p.Key, p.Value.to_type(float64))).ToList());
        string bad = Write(format, [("fc1.weight", source.state_dict()["fc1.weight"])]);
        PyTorchImport.LoadStateDict(model, path);
        Assert.Throws<StateDictMismatchException>(() => PyTorchImport.LoadStateDict(model, bad));
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long before = TestModels.SettledTensorCount();

        PyTorchImport.LoadStateDict(model, path);
        Assert.Throws<StateDictMismatchException>(() => PyTorchImport.LoadStateDict(model, bad));

        Assert.That(Tensor.TotalCount, Is.EqualTo(before), "every tensor read, converted or compared is disposed, on success and on failure");
    }

    /// <summary>Writes tensors to a new file in one of the formats: ours for safetensors, the hand-assembled torch.save layout for PyTorch.</summary>
    private string Write(StateDictFormat format, IReadOnlyList<(string Key, Tensor Tensor)> tensors)
    {
        string path = Path.Combine(directory, Guid.NewGuid().ToString("N") + (format == StateDictFormat.PyTorch ? ".pt" : ".safetensors"));
        if (format == StateDictFormat.PyTorch)
        {
            File.WriteAllBytes(path, PyTorchFixtureWriter.Write("archive", tensors));
        }
        else
        {
            SafetensorsWriter.Save(tensors.ToDictionary(t => t.Key, t => t.Tensor), path);
        }

        return path;
    }

    /// <summary>Runs <paramref name="action"/> and returns the <see cref="InvalidDataException"/> (or subclass) it throws; any other outcome fails the test, naming <paramref name="label"/>.</summary>
    private static InvalidDataException CatchInvalidData(Action action, string label)
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
            Assert.Fail($"{label}: expected an InvalidDataException, got {ex.GetType().Name}: {ex.Message}");
        }

        Assert.Fail($"{label}: expected an InvalidDataException, nothing was thrown");
        throw new InvalidOperationException("Unreachable.");
    }

    /// <summary>Rewrites a zip archive with one entry cut to <paramref name="length"/> bytes (a consistent archive, wrong content).</summary>
    private static byte[] TruncateEntry(byte[] archive, string name, int length)
    {
        using var source = new ZipArchive(new MemoryStream(archive), ZipArchiveMode.Read);
        using var result = new MemoryStream();
        using (var target = new ZipArchive(result, ZipArchiveMode.Create, leaveOpen: true))
        {
            foreach (var entry in source.Entries)
            {
                using var data = new MemoryStream();
                using (var read = entry.Open())
                {
                    read.CopyTo(data);
                }

                var bytes = data.ToArray();
                using var write = target.CreateEntry(entry.FullName, CompressionLevel.NoCompression).Open();
                write.Write(entry.FullName == name ? bytes[..length] : bytes);
            }
        }

        return result.ToArray();
    }

    private static byte[] Replace(byte[] bytes, string find, string replacement)
    {
        var from = System.Text.Encoding.Latin1.GetBytes(find);
        var to = System.Text.Encoding.Latin1.GetBytes(replacement);
        int at = bytes.AsSpan().IndexOf(from);
        Assert.That(at, Is.GreaterThanOrEqualTo(0), $"'{find}' is in the file");
        return [.. bytes[..at], .. to, .. bytes[(at + from.Length)..]];
    }
}
