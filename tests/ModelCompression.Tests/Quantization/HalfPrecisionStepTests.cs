using ModelCompression.Metrics;
using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Samples;
using ModelCompression.Serialization;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Quantization;

[TestFixture]
public sealed class HalfPrecisionStepTests
{
    private static CompressionContext Context(nn.Module<Tensor, Tensor> original, ModelCompression.Data.TensorDataset data) =>
        new(new CompressionData(null, data), original);

    [TestCase(HalfPrecisionFormat.BFloat16, ScalarType.BFloat16, 0.05)]
    [TestCase(HalfPrecisionFormat.Float16, ScalarType.Float16, 0.01)]
    public void Apply_HalvesTheSizeAndKeepsTheOutputsClose(HalfPrecisionFormat format, ScalarType dtype, double tolerance)
    {
        using var original = ModelZoo.Create(ZooModel.LeNet5, 1);
        original.eval();
        using var model = ModuleCloner.DeepClone(original);
        // A generator of its own, so the input does not depend on which tests ran before.
        using var generator = new Generator(7);
        using var data = new ModelCompression.Data.TensorDataset(randn([4, 1, 28, 28], generator: generator), zeros(4, dtype: int64));
        using var input = randn([3, 1, 28, 28], generator: generator);
        var expected = TestModels.Output(original, input);

        var step = new HalfPrecisionStep(new HalfPrecisionOptions { Format = format });
        var result = step.Apply(model, Context(original, data));

        Assert.That(ModelMetrics.TensorBytes(result) * 2, Is.EqualTo(ModelMetrics.TensorBytes(original)));
        // The file stores 2 bytes a weight, or fewer where a codebook of the (coarse) 16-bit values is smaller.
        Assert.That(ModelMetrics.SizeInBytes(result), Is.LessThanOrEqualTo((ModelMetrics.SizeInBytes(original) / 2) + 500));
        Assert.That(result.modules().OfType<HalfPrecisionLayer>().Count(), Is.EqualTo(5));
        Assert.That(result.parameters().All(p => p.dtype == dtype), Is.True);
        Assert.That(result.state_dict().Values.Select(t => t.dtype), Is.All.EqualTo(dtype));
        var actual = TestModels.Output(result, input);
        double scale = expected.Max(Math.Abs);
        Assert.That(actual.Zip(expected).Max(p => Math.Abs(p.First - p.Second)), Is.LessThan(tolerance * scale));
        Assert.That(ModelMetrics.CountMacs(result, input), Is.EqualTo(ModelMetrics.CountMacs(original, input)));
    }

    [Test]
    public void Apply_NotesExactlyTheLayersThatComputeInFloat32()
    {
        using var original = ModelZoo.Create(ZooModel.LeNet5, 1);
        using var model = ModuleCloner.DeepClone(original);
        using var data = new ModelCompression.Data.TensorDataset(randn(4, 1, 28, 28), zeros(4, dtype: int64));
        var context = Context(original, data);
        using var result = new HalfPrecisionStep(new HalfPrecisionOptions()).Apply(model, context);

        // Which layers fall back depends on the CPU; the note must name exactly those.
        var fallbacks = result.named_modules().Where(m => m.module is HalfPrecisionLayer { ComputeType: ScalarType.Float32 }).Select(m => m.name).ToList();
        var notes = context.Notes.Where(n => n.Contains("computing in float32")).ToList();
        if (fallbacks.Count == 0)
        {
            Assert.That(notes, Is.Empty);
        }
        else
        {
            Assert.That(notes, Has.Count.EqualTo(1));
            Assert.That(fallbacks, Has.All.Matches<string>(name => notes[0].Contains(name + " (")));
        }

        Assert.That(result.modules().OfType<HalfPrecisionLayer>().Select(l => l.ProbeError), Has.None.Null);
    }

    [Test]
    public void Apply_SelectedLayersOnly()
    {
        using var original = ModelZoo.LeNet300100();
        using var model = ModuleCloner.DeepClone(original);
        using var data = new ModelCompression.Data.TensorDataset(randn(4, 784), zeros(4, dtype: int64));
        var step = new HalfPrecisionStep(new HalfPrecisionOptions { Layers = LayerSelection.Named("fc2") });
        var result = step.Apply(model, Context(original, data));
        var converted = result.named_modules().Where(m => m.module is HalfPrecisionLayer).Select(m => m.name);
        Assert.That(converted, Is.EqualTo(new[] { "fc2" }));
        var layers = ModelMetrics.Measure(result, [784]).Layers;
        Assert.That(layers.Select(l => (l.Name, l.Bits)), Is.EqualTo(new[] { ("fc1", 32), ("fc2", 16), ("fc3", 32) }));
    }

    [Test]
    public void Apply_UnknownLayerName_ThrowsBeforeChangingAnything()
    {
        using var original = ModelZoo.LeNet300100();
        using var model = ModuleCloner.DeepClone(original);
        using var data = new ModelCompression.Data.TensorDataset(randn(4, 784), zeros(4, dtype: int64));
        string before = TestModels.StateHash(model);
        var step = new HalfPrecisionStep(new HalfPrecisionOptions { Layers = LayerSelection.Named("fc1", "fc7") });
        var ex = Assert.Throws<ArgumentException>(() => step.Apply(model, Context(original, data)));
        Assert.That(ex!.Message, Does.Contain("fc7"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
    }

    [Test]
    public void Apply_TypeSelectionMatchingNothing_IsANoOpWithANote()
    {
        using var original = ModelZoo.LeNet300100();
        using var model = ModuleCloner.DeepClone(original);
        using var data = new ModelCompression.Data.TensorDataset(randn(4, 784), zeros(4, dtype: int64));
        var step = new HalfPrecisionStep(new HalfPrecisionOptions { Layers = LayerSelection.OfType<TorchSharp.Modules.Conv2d>() });
        var context = Context(original, data);
        var result = step.Apply(model, context);
        Assert.That(result, Is.SameAs(model));
        Assert.That(TestModels.StateHash(result), Is.EqualTo(TestModels.StateHash(original)));
        Assert.That(context.Notes, Has.One.Contains("nothing converted"));
    }

    [Test]
    public void Apply_NamedSelectionMatchingNothing_Throws()
    {
        using var original = ModelZoo.LeNet300100();
        using var model = ModuleCloner.DeepClone(original);
        using var data = new ModelCompression.Data.TensorDataset(randn(4, 784), zeros(4, dtype: int64));
        // "relu1" exists but is not of a selected type.
        var step = new HalfPrecisionStep(new HalfPrecisionOptions { Layers = LayerSelection.Named("relu1") });
        Assert.Throws<ArgumentException>(() => step.Apply(model, Context(original, data)));
    }

    [Test]
    public void Constructor_InvalidOptions_Throws()
    {
        var ex = Assert.Throws<OptionsValidationException>(() => new HalfPrecisionStep(new HalfPrecisionOptions { Format = (HalfPrecisionFormat)5 }));
        Assert.That(ex!.OptionsType, Is.EqualTo(nameof(HalfPrecisionOptions)));
    }

    /// <summary>Relative L2 distance of a model's output from a reference output.</summary>
    private static double RelativeError(Tensor actual, Tensor expected)
    {
        using var scope = NewDisposeScope();
        return ((actual.to(float32) - expected).norm() / expected.norm()).item<float>();
    }

    // Conv2d(1, 6, 5) is LeNet-5's first layer; LibTorch 2.10's oneDNN bf16 kernel gave ~50% error for it on AVX-512 BF16
    // CPUs (output channels not a multiple of 16). Whatever kernel runs, the layer must stay within 16-bit rounding.
    [TestCase(ScalarType.BFloat16)]
    [TestCase(ScalarType.Float16)]
    public void Layer_Conv2dWithFewOutputChannels_StaysCloseToFloat32(ScalarType dtype)
    {
        using var generator = new Generator(11);
        using var conv = nn.Conv2d(1, 6, 5, padding: 2);
        using (no_grad())
        {
            conv.weight!.copy_(randn([6, 1, 5, 5], generator: generator) * 0.2);
            conv.bias!.copy_(randn([6], generator: generator) * 0.1);
        }

        using var input = randn([3, 1, 28, 28], generator: generator);
        using var expected = conv.call(input);
        using var layer = new HalfPrecisionLayer(conv, dtype);
        using var actual = layer.call(input);

        Assert.That(actual.dtype, Is.EqualTo(float32));
        Assert.That(RelativeError(actual, expected), Is.LessThan(0.01));
        Assert.That(layer.ProbeError, Is.Not.Null);
        Assert.That(layer.state_dict().Values.Select(t => t.dtype), Is.All.EqualTo(dtype));
    }

    [Test]
    public void Layer_ComputeType_IsChosenWithoutTouchingTheGlobalRandomStream()
    {
        torch.random.manual_seed(3);
        using var first = randn(4);

        // The Conv2d's own initialisation draws from the global stream, so it is built before the seed is set again.
        var conv = nn.Conv2d(1, 6, 5, padding: 2);
        torch.random.manual_seed(3);
        using var layer = new HalfPrecisionLayer(conv, ScalarType.BFloat16);
        using var second = randn(4);
        Assert.That(second.equal(first).all().item<bool>(), Is.True);
        Assert.That(layer.ComputeType, Is.AnyOf(ScalarType.BFloat16, ScalarType.Float32));
        Assert.That(layer.ProbeError, Is.Not.Null);
        Assert.That(layer.ComputeType == ScalarType.BFloat16, Is.EqualTo(layer.ProbeError <= layer.ProbeTolerance));
    }

    [Test]
    public void Layer_ComputeType_IsTheSameForTheSameShape()
    {
        using var a = new HalfPrecisionLayer(nn.Conv2d(3, 6, 3), ScalarType.BFloat16);
        using var b = new HalfPrecisionLayer(nn.Conv2d(3, 6, 3), ScalarType.BFloat16);
        Assert.That(b.ComputeType, Is.EqualTo(a.ComputeType));
    }

    [TestCase(ScalarType.BFloat16)]
    [TestCase(ScalarType.Float16)]
    public void Layer_Forward_LeaksNoTensors(ScalarType dtype)
    {
        using var layer = new HalfPrecisionLayer(nn.Conv2d(1, 6, 5, padding: 2), dtype);
        using var input = randn(2, 1, 12, 12);
        using (var warmUp = layer.call(input))
        {
        }

        GC.Collect();
        GC.WaitForPendingFinalizers();
        long before = TestModels.SettledTensorCount();
        using (no_grad())
        {
            for (int i = 0; i < 3; i++)
            {
                using var output = layer.call(input);
            }
        }

        GC.Collect();
        GC.WaitForPendingFinalizers();
        Assert.That(Tensor.TotalCount, Is.EqualTo(before));
    }

    [Test]
    public void Layer_KindWithoutAFloat32Path_RunsNativeUnchecked()
    {
        using var layer = new HalfPrecisionLayer(nn.Conv2d(2, 4, 3, padding: 1, padding_mode: PaddingModes.Reflect), ScalarType.BFloat16);
        Assert.That(layer.ProbeError, Is.Null);
        Assert.That(layer.ComputeType, Is.EqualTo(ScalarType.BFloat16));
    }

    [TestCase(ScalarType.Float16)]
    [TestCase(ScalarType.BFloat16)]
    public void Layer_ModelConvertedToFloat64_KeepsItsHalfWeightsAndAnswersInFloat64(ScalarType dtype)
    {
        // The 16-bit weights are the layer: .to(float64) must not widen them (nor leave the layer unable to run), and
        // the output follows the input's type, so a float64 copy of a compressed model serves as a reference.
        using var scope = NewDisposeScope();
        torch.random.manual_seed(5);
        using var model = nn.Sequential(("fc1", nn.Linear(6, 8)), ("relu", nn.ReLU()), ("fc2", new HalfPrecisionLayer(nn.Linear(8, 3), dtype)));
        var input = randn(4, 6);
        Tensor expected;
        using (no_grad())
        {
            expected = model.call(input);
        }

        model.to(ScalarType.Float64);
        Assert.That(model.state_dict()["fc2.inner.weight"].dtype, Is.EqualTo(dtype));
        Assert.That(model.state_dict()["fc1.weight"].dtype, Is.EqualTo(ScalarType.Float64));
        using (no_grad())
        {
            var output = model.call(input.to(ScalarType.Float64));
            Assert.That(output.dtype, Is.EqualTo(ScalarType.Float64));
            Assert.That(output.to(ScalarType.Float32).allclose(expected, rtol: 0, atol: 1e-2), Is.True);
        }
    }

    [Test]
    public void Layer_RejectsNonHalfTypes()
    {
        Assert.Throws<ArgumentException>(() => _ = new HalfPrecisionLayer(nn.Linear(2, 2), ScalarType.Float32));
    }

    private static (ModelCompression.Data.TensorDataset Data, CapturingLogger Logger, CompressionContext Context) FixedTypeContext(nn.Module<Tensor, Tensor> original)
    {
        var data = new ModelCompression.Data.TensorDataset(randn(4, 1, 12, 12), zeros(4, dtype: int64));
        var logger = new CapturingLogger();
        return (data, logger, new CompressionContext(new CompressionData(null, data), original, logger: logger));
    }

    private static float[] Values(nn.Module model, string name)
    {
        using var t = model.state_dict()[name].detach().to(float32).cpu().contiguous();
        return t.data<float>().ToArray();
    }

    // fp16 values are stored raw at 2 bytes each; bf16's coarser values take few enough distinct patterns that a
    // Huffman-coded codebook is smaller still (205,063 → 68,919 bytes for fc here).
    [TestCase(HalfPrecisionFormat.BFloat16, ScalarType.BFloat16, 0.02, 0.30)]
    [TestCase(HalfPrecisionFormat.Float16, ScalarType.Float16, 0.002, 0.49)]
    public void Apply_LayersInFieldsTypedLinearAndConv2d_KeepTheirTypeRoundedInPlaceAndHalveInTheFile(HalfPrecisionFormat format, ScalarType dtype, double tolerance, double smallestRatio)
    {
        using var original = new FixedTypeNet(1);
        original.eval();
        using var model = ModuleCloner.DeepClone(original);
        var (data, logger, context) = FixedTypeContext(original);
        using var _ = data;
        using var input = randn(5, 1, 12, 12);
        var expected = TestModels.Output(original, input);
        var before = ModelMetrics.Measure(original, FixedTypeNet.SampleShape);

        var result = new HalfPrecisionStep(new HalfPrecisionOptions { Format = format }).Apply(model, context);

        // fc and conv keep their types and float32 storage, holding exactly the 16-bit values; head is converted.
        Assert.That(ModuleTree.GetSubmodule(result, "fc"), Is.TypeOf<TorchSharp.Modules.Linear>());
        Assert.That(ModuleTree.GetSubmodule(result, "conv"), Is.TypeOf<TorchSharp.Modules.Conv2d>());
        Assert.That(ModuleTree.GetSubmodule(result, "head"), Is.TypeOf<HalfPrecisionLayer>());
        foreach (var name in new[] { "fc.weight", "fc.bias", "conv.weight", "conv.bias" })
        {
            Assert.That(result.state_dict()[name].dtype, Is.EqualTo(ScalarType.Float32), name);
            using var rounded = original.state_dict()[name].to(dtype).to(float32);
            Assert.That(Values(result, name), Is.EqualTo(rounded.data<float>().ToArray()), name);
            Assert.That(Values(result, name), Is.Not.EqualTo(Values(original, name)), $"{name} was rounded");
        }

        // The file stores the rounded layers in at most 2 bytes a value: fc's 51,264 values took 205,063 bytes.
        var after = ModelMetrics.Measure(result, FixedTypeNet.SampleShape);
        long fcBefore = before.Layers.Single(l => l.Name == "fc").SizeBytes!.Value;
        long fcAfter = after.Layers.Single(l => l.Name == "fc").SizeBytes!.Value;
        TestContext.Out.WriteLine($"{format}: fc {fcBefore} → {fcAfter} bytes, file {before.SizeBytes} → {after.SizeBytes}");
        Assert.That(fcBefore, Is.GreaterThan(51_264 * 4));
        Assert.That((double)fcAfter / fcBefore, Is.InRange(smallestRatio, 0.501));
        Assert.That((double)after.SizeBytes / before.SizeBytes, Is.InRange(smallestRatio, 0.505));
        Assert.That(CompressedModel.Measure(result).TotalBytes, Is.EqualTo(after.SizeBytes));

        var actual = TestModels.Output(result, input);
        Assert.That(actual.Zip(expected).Max(p => Math.Abs(p.First - p.Second)), Is.LessThan(tolerance * expected.Max(Math.Abs)));

        // Named in the notes and warned about, with the field that holds each.
        Assert.That(context.Notes, Has.One.Contains("'fc' (the field FixedTypeNet.fc").And.Contains("'conv' (the field FixedTypeNet.conv").And.Contains("rounded in place"));
        Assert.That(logger.Warnings, Has.One.Contains("'fc'").And.Contains("'conv'"));
    }

    [Test]
    public void Apply_FixedTypeLayersSkip_LeavesThoseLayersAndConvertsTheRest()
    {
        using var original = new FixedTypeNet(2);
        using var model = ModuleCloner.DeepClone(original);
        var (data, logger, context) = FixedTypeContext(original);
        using var _ = data;

        var result = new HalfPrecisionStep(new HalfPrecisionOptions { FixedTypeLayers = FixedTypeLayers.Skip }).Apply(model, context);

        Assert.That(Values(result, "fc.weight"), Is.EqualTo(Values(original, "fc.weight")));
        Assert.That(Values(result, "conv.weight"), Is.EqualTo(Values(original, "conv.weight")));
        Assert.That(ModuleTree.GetSubmodule(result, "head"), Is.TypeOf<HalfPrecisionLayer>());
        Assert.That(context.Notes, Has.One.Contains("left in float32").And.Contains("'fc'").And.Contains("'conv'"));
        Assert.That(logger.Warnings.Count(), Is.EqualTo(1));
    }

    [Test]
    public void Apply_FixedTypeLayersFail_ThrowsNamingTheLayersBeforeAnyChange()
    {
        using var original = new FixedTypeNet(3);
        using var model = ModuleCloner.DeepClone(original);
        var (data, _, context) = FixedTypeContext(original);
        using var _ = data;
        string before = TestModels.StateHash(model);

        var step = new HalfPrecisionStep(new HalfPrecisionOptions { FixedTypeLayers = FixedTypeLayers.Fail });
        var ex = Assert.Throws<UnsupportedModelException>(() => step.Apply(model, context));

        Assert.That(ex!.LayerName, Is.EqualTo("conv"));
        Assert.That(ex.LayerType, Is.EqualTo("Conv2d"));
        Assert.That(ex.Message, Does.Contain("'fc'").And.Contain("typed Linear").And.Contain("HalfPrecisionOptions.FixedTypeLayers"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
        Assert.That(ModuleTree.GetSubmodule(model, "head"), Is.TypeOf<TorchSharp.Modules.Linear>(), "head, which could be replaced, was not");
    }

    [Test]
    public void Constructor_UnknownFixedTypeLayers_Throws()
    {
        var ex = Assert.Throws<OptionsValidationException>(() => new HalfPrecisionStep(new HalfPrecisionOptions { FixedTypeLayers = (FixedTypeLayers)9 }));
        Assert.That(ex!.Errors, Has.One.Contains("HalfPrecisionOptions.FixedTypeLayers"));
    }

    [Test]
    public void Pipeline_Bf16OnFixedTypeNet_ChangesOnlyTheCopyAndReportsTheLayers()
    {
        using var model = new FixedTypeNet(4);
        string before = TestModels.StateHash(model);
        using var data = new ModelCompression.Data.TensorDataset(randn(16, 1, 12, 12), randint(0, 10, 16));
        using var result = CompressionPipeline.Create()
            .WithLatencyMeasurement(new LatencyOptions { Enabled = false })
            .AddHalfPrecision()
            .Build()
            .Run(model, new CompressionData(null, data));

        Assert.That(TestModels.StateHash(model), Is.EqualTo(before), "the caller's model");
        Assert.That(ModuleTree.GetSubmodule(result.Model, "fc"), Is.TypeOf<TorchSharp.Modules.Linear>());
        Assert.That(result.Report.Steps.Single().Message, Does.Contain("'fc'").And.Contain("'conv'"));
        Assert.That((double)result.Report.Final.SizeBytes / result.Report.Baseline.SizeBytes, Is.InRange(0.30, 0.505));
    }

    [Test]
    public void GoogLeNet_Bf16_KeepsItsLinearClassifierRoundedAndTheFileHalves()
    {
        // torchvision keeps GoogLeNet's classifier in a field typed Linear.
        random.manual_seed(5);
        using var original = torchvision.models.googlenet(num_classes: 10);
        original.eval();
        using var model = ModuleCloner.DeepClone(original);
        using var data = new ModelCompression.Data.TensorDataset(randn(2, 3, 64, 64), zeros(2, dtype: int64));
        var logger = new CapturingLogger();
        var context = new CompressionContext(new CompressionData(null, data), original, logger: logger);
        long sizeBefore = CompressedModel.Measure(original).TotalBytes;

        var result = new HalfPrecisionStep(new HalfPrecisionOptions()).Apply(model, context);

        long sizeAfter = CompressedModel.Measure(result).TotalBytes;
        TestContext.Out.WriteLine($"GoogLeNet bf16: {sizeBefore} → {sizeAfter} bytes ({(double)sizeAfter / sizeBefore:0.000}); {string.Join(" | ", context.Notes)}");
        // 22,391,183 → 7,682,335 bytes here (0.343): bf16 values, Huffman-coded codebooks where smaller than 2 bytes each.
        Assert.That((double)sizeAfter / sizeBefore, Is.InRange(0.30, 0.50));
        Assert.That(ModuleTree.GetSubmodule(result, "fc"), Is.TypeOf<TorchSharp.Modules.Linear>());
        using (var rounded = original.state_dict()["fc.weight"].to(ScalarType.BFloat16).to(float32))
        {
            Assert.That(Values(result, "fc.weight"), Is.EqualTo(rounded.data<float>().ToArray()));
        }

        Assert.That(context.Notes, Has.One.Contains("'fc' (the field"));
        Assert.That(logger.Warnings, Has.One.Contains("'fc'"));

        // The first forward of GoogLeNet can be non-finite on this machine: warm both models up once.
        using var input = randn(2, 3, 64, 64);
        TestModels.Output(original, input);
        TestModels.Output(result, input);
        var expected = TestModels.Output(original, input);
        var actual = TestModels.Output(result, input);
        Assert.That(expected.All(float.IsFinite) && actual.All(float.IsFinite), Is.True);
        Assert.That(actual.Zip(expected).Max(p => Math.Abs(p.First - p.Second)), Is.LessThan(0.1 * expected.Max(Math.Abs)));
    }
}
