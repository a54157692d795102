using ModelCompression.Data;
using ModelCompression.Metrics;
using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Samples;
using ModelCompression.Tests.Support;
using ModelCompression.Training;
using NUnit.Framework;
using TorchSharp;
using TorchSharp.Modules;
using TensorDataset = ModelCompression.Data.TensorDataset;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Quantization;

[TestFixture]
public sealed class PostTrainingQuantizationStepTests
{
    private static CompressionContext Context(nn.Module<Tensor, Tensor> original, IBatchSource data, IEvaluator? evaluator = null) =>
        new(new CompressionData(data, data) { Evaluator = evaluator ?? new AccuracyEvaluator() }, original);

    private static TensorDataset Images(int count, int seed)
    {
        using var generator = new Generator((ulong)seed);
        return new TensorDataset(randn([count, 1, 28, 28], generator: generator), zeros(count, dtype: int64));
    }

    private static TensorDataset Flat(int count, int seed, int features = 784)
    {
        using var generator = new Generator((ulong)seed);
        return new TensorDataset(randn([count, features], generator: generator), zeros(count, dtype: int64));
    }

    private static double RelativeError(float[] actual, float[] expected) =>
        Math.Sqrt(actual.Zip(expected).Sum(p => (p.First - p.Second) * (p.First - p.Second)) / expected.Sum(v => v * v));

    [Test]
    public void DynamicInt8_QuartersTheSizeAndKeepsOutputsClose()
    {
        using var original = ModelZoo.LeNet300100();
        original.eval();
        using var model = ModuleCloner.DeepClone(original);
        using var data = Flat(64, 1);
        using var input = randn(16, 784);
        var expected = TestModels.Output(original, input);

        var result = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions()).Apply(model, Context(original, data));

        var quantized = result.named_modules().Where(m => m.module is QuantizedLinear).Select(m => m.name).ToList();
        Assert.That(quantized, Is.EqualTo(new[] { "fc1", "fc2", "fc3" }));
        double ratio = (double)ModelMetrics.SizeInBytes(result) / ModelMetrics.SizeInBytes(original);
        Assert.That(ratio, Is.InRange(0.25, 0.26));
        Assert.That(result.modules().OfType<ReLU>().Count(), Is.Zero, "both ReLUs are fused into the layers before them");
        Assert.That(RelativeError(TestModels.Output(result, input), expected), Is.LessThan(0.03));
        var layers = ModelMetrics.Measure(result, [784]).Layers;
        Assert.That(layers.Where(l => l.Type == nameof(QuantizedLinear)).Select(l => l.Bits), Is.All.EqualTo(8));
        Assert.That(layers.Where(l => l.Type == nameof(QuantizedLinear)).Select(l => l.SqnrDb), Is.All.GreaterThan(25.0));
        Assert.That(ModelMetrics.CountMacs(result, input), Is.EqualTo(ModelMetrics.CountMacs(original, input)));
    }

    [Test]
    public void WeightOnlyInt4_PacksTwoWeightsPerByteWithinASeventhOfTheSize()
    {
        using var original = ModelZoo.LeNet300100();
        original.eval();
        using var model = ModuleCloner.DeepClone(original);
        using var data = Flat(32, 2);
        using var input = randn(8, 784);
        var expected = TestModels.Output(original, input);
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4 };

        var result = new PostTrainingQuantizationStep(options).Apply(model, Context(original, data));

        var fc1 = (QuantizedLinear)ModuleTree.GetSubmodule(result, "fc1");
        Assert.That(fc1.WeightBits, Is.EqualTo(4));
        var state = fc1.state_dict();
        Assert.That(state["weight"].dtype, Is.EqualTo(ScalarType.Byte));
        Assert.That(state["weight"].shape, Is.EqualTo(new long[] { 300, 392 }));
        Assert.That(state["weight_scale"].dtype, Is.EqualTo(ScalarType.Float16));
        Assert.That(state["weight_scale"].shape, Is.EqualTo(new long[] { 300, 13 }));
        Assert.That(ModelMetrics.SizeInBytes(result) * 7, Is.LessThan(ModelMetrics.SizeInBytes(original)));
        Assert.That(RelativeError(TestModels.Output(result, input), expected), Is.LessThan(0.2));
    }

    [Test]
    public void StaticInt8_FoldsBatchNormFusesReluAndTracksTheFloatModel()
    {
        using var original = ModelZoo.Create(ZooModel.SmallResNet, 3);
        using (var train = Images(64, 3))
        {
            // A few steps so the BatchNorm statistics are not the identity.
            new Trainer(new TrainingOptions { Epochs = 1, BatchSize = 16, LearningRate = 0.01 }).Train(original, train, seed: 3);
        }

        original.eval();
        using var model = ModuleCloner.DeepClone(original);
        using var data = Images(64, 4);
        using var input = randn(8, 1, 28, 28);
        var expected = TestModels.Output(original, input);
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8, CalibrationBatches = 2, CalibrationBatchSize = 32 };

        var result = new PostTrainingQuantizationStep(options).Apply(model, Context(original, data));

        var conv1 = (QuantizedConv2d)ModuleTree.GetSubmodule(result, "conv1");
        Assert.That(conv1.FusedRelu, Is.True);
        Assert.That(conv1.Mode, Is.EqualTo(QuantizationMode.StaticInt8));
        Assert.That(ModuleTree.GetSubmodule(result, "bn1"), Is.InstanceOf<Identity>());
        Assert.That(ModuleTree.GetSubmodule(result, "relu1"), Is.InstanceOf<Identity>());
        Assert.That(conv1.state_dict().Keys, Is.SupersetOf(new[] { "weight", "weight_scale", "bias", "input_scale", "input_zero_point" }));

        // Inside the custom residual block the structure is unknown: its convs are quantized, its BatchNorms stay.
        Assert.That(result.named_modules().Where(m => m.module is BatchNorm2d).Select(m => m.name), Is.EquivalentTo(new[] { "block.bn1", "block.bn2" }));
        Assert.That(result.modules().OfType<Conv2d>(), Is.Empty);
        Assert.That(RelativeError(TestModels.Output(result, input), expected), Is.LessThan(0.1));
    }

    [Test]
    public void FoldBatchNorm_LeavesEvalOutputsUnchanged()
    {
        torch.random.manual_seed(5);
        using var conv = nn.Conv2d(3, 4, 3, padding: 1);
        using var bn = TestModels.RandomBatchNorm2d(4);
        using var x = randn(2, 3, 6, 6);
        var expected = TestModels.Output(nn.Sequential(conv, bn), x);
        using var copy = ModuleCloner.DeepClone(conv);
        BatchNormFolding.FoldInto(copy, bn);
        var actual = TestModels.Output(copy, x);
        Assert.That(actual.Zip(expected).Max(p => Math.Abs(p.First - p.Second)), Is.LessThan(1e-5));

        using var noBias = nn.Conv2d(3, 4, 3, bias: false);
        var expectedNoBias = TestModels.Output(nn.Sequential(noBias, bn), x);
        BatchNormFolding.FoldInto(noBias, bn);
        Assert.That(TestModels.Output(noBias, x).Zip(expectedNoBias).Max(p => Math.Abs(p.First - p.Second)), Is.LessThan(1e-5));
    }

    [Test]
    public void UnsupportedLayers_StayInFloatAndAreListed()
    {
        torch.random.manual_seed(6);
        using var original = nn.Sequential(
            ("conv", nn.Conv2d(1, 4, 3, padding: 1)),
            ("depthwise", nn.Conv2d(4, 4, 3, padding: 1, groups: 4)),
            ("pool", nn.AdaptiveAvgPool2d(1)),
            ("flat", nn.Flatten()),
            ("fc", nn.Linear(4, 3)));
        using var model = ModuleCloner.DeepClone(original);
        using var data = new TensorDataset(randn(8, 1, 5, 5), zeros(8, dtype: int64));
        var options = new PostTrainingQuantizationOptions { Layers = LayerSelection.Named("depthwise", "fc") };
        var context = Context(original, data);

        var result = new PostTrainingQuantizationStep(options).Apply(model, context);

        Assert.That(ModuleTree.GetSubmodule(result, "depthwise"), Is.InstanceOf<Conv2d>());
        Assert.That(ModuleTree.GetSubmodule(result, "fc"), Is.InstanceOf<QuantizedLinear>());
        Assert.That(context.Notes, Has.Some.Contains("left in float").And.Contains("depthwise").And.Contains("groups = 4"));
    }

    [Test]
    public void StaticInt8_LayerNeverCalledOnTheCalibrationData_StaysFloatWithANote()
    {
        // Inception v3's AuxLogits: a head its forward uses in training only, so calibration (in eval) never sees it.
        torch.random.manual_seed(41);
        using var original = new AuxiliaryHeadNet();
        using var model = new AuxiliaryHeadNet();
        model.load_state_dict(original.state_dict());
        using var data = new TensorDataset(randn(16, 6), zeros(16, dtype: int64));
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8, CalibrationBatches = 1, CalibrationBatchSize = 16, KeepFloatWhenSlower = false };
        var context = Context(original, data);

        var result = new PostTrainingQuantizationStep(options).Apply(model, context);

        Assert.That(ModuleTree.GetSubmodule(result, "fc1"), Is.InstanceOf<QuantizedLinear>());
        Assert.That(ModuleTree.GetSubmodule(result, "fc2"), Is.InstanceOf<QuantizedLinear>());
        Assert.That(ModuleTree.GetSubmodule(result, "aux"), Is.InstanceOf<Linear>());
        Assert.That(context.Notes, Has.One.Contains("never called on the calibration data").And.Contains("aux"));

        // When no selected layer is called at all, nothing is known to quantize with: a clear error, nothing changed.
        using var other = new AuxiliaryHeadNet();
        string before = TestModels.StateHash(other);
        var auxOnly = new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8, CalibrationBatches = 1, Layers = LayerSelection.Named("aux") };
        var ex = Assert.Throws<ArgumentException>(() => new PostTrainingQuantizationStep(auxOnly).Apply(other, Context(original, data)));
        Assert.That(ex!.Message, Does.Contain("aux").And.Contain("calibration data"));
        Assert.That(TestModels.StateHash(other), Is.EqualTo(before));
    }

    private sealed class AuxiliaryHeadNet : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module<Tensor, Tensor> fc1 = nn.Linear(6, 8);
        private readonly nn.Module<Tensor, Tensor> fc2 = nn.Linear(8, 3);
        private readonly nn.Module<Tensor, Tensor> aux = nn.Linear(8, 3);

        public AuxiliaryHeadNet() : base(nameof(AuxiliaryHeadNet)) => RegisterComponents();

        public override Tensor forward(Tensor input)
        {
            using var scope = NewDisposeScope();
            var hidden = nn.functional.relu(fc1.call(input));
            var output = fc2.call(hidden);
            return (training ? output + aux.call(hidden) : output).MoveToOuterDisposeScope();
        }
    }

    [Test]
    public void NonFiniteWeight_ThrowsNamingTheLayerBeforeAnyChange()
    {
        using var original = ModelZoo.LeNet300100();
        using var model = ModuleCloner.DeepClone(original);
        using (no_grad())
        {
            ((Linear)ModuleTree.GetSubmodule(model, "fc2")).weight![3, 4] = float.PositiveInfinity;
        }

        string before = TestModels.StateHash(model);
        using var data = Flat(8, 7);
        var ex = Assert.Throws<ArgumentException>(() => new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions()).Apply(model, Context(original, data)));
        Assert.That(ex!.Message, Does.Contain("fc2"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
        Assert.That(model.modules().OfType<QuantizedLinear>(), Is.Empty);
    }

    [Test]
    public void NonFiniteCalibrationActivations_ThrowNamingTheLayerBeforeAnyChange()
    {
        using var original = ModelZoo.LeNet300100();
        using var model = ModuleCloner.DeepClone(original);
        string before = TestModels.StateHash(model);
        var x = randn(16, 784);
        x[3, 10] = float.NaN;
        var data = new FixedBatches(x);
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8, CalibrationBatches = 1 };
        var ex = Assert.Throws<ArgumentException>(() => new PostTrainingQuantizationStep(options).Apply(model, Context(original, data)));
        Assert.That(ex!.Message, Does.Contain("'fc1'").And.Contain("calibration"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
    }

    [Test]
    public void StaticWithEmptyCalibrationData_ThrowsBeforeAnyChange()
    {
        using var original = ModelZoo.LeNet300100();
        using var model = ModuleCloner.DeepClone(original);
        string before = TestModels.StateHash(model);
        var empty = new FixedBatches();
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8 };
        Assert.Throws<InvalidOperationException>(() => new PostTrainingQuantizationStep(options).Apply(model, Context(original, empty)));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
    }

    [Test]
    public void InvalidOptions_AreAllListedBeforeAnything()
    {
        var ex = Assert.Throws<OptionsValidationException>(() => new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions
        {
            Mode = QuantizationMode.WeightOnlyInt4,
            WeightGranularity = QuantizationGranularity.PerChannel,
            Observer = ActivationObserver.Percentile(20),
            CalibrationBatches = 0,
            Fallback = new QuantizationFallback { MaxAccuracyDrop = -1 },
        }));
        Assert.That(ex!.Errors, Has.Count.EqualTo(4));
        Assert.That(new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt8, WeightGranularity = QuantizationGranularity.PerGroup(12) }.Validate(), Has.Count.EqualTo(1));
        Assert.Throws<OptionsValidationException>(() => CompressionPipeline.Create().AddPostTrainingQuantization((QuantizationMode)42));
        Assert.That(new PostTrainingQuantizationOptions { Mode = QuantizationMode.DynamicInt8, WeightGranularity = QuantizationGranularity.PerGroup(32) }.Validate(), Has.Count.EqualTo(1));
    }

    [Test]
    public void Fallback_ReturnsTheLowestSqnrLayersToFloatUntilTheMetricRecovers()
    {
        using var original = ModelZoo.LeNet300100();
        using var model = ModuleCloner.DeepClone(original);
        using var data = Flat(16, 8);
        var options = new PostTrainingQuantizationOptions { Fallback = new QuantizationFallback { MaxAccuracyDrop = 0.15 } };
        var context = Context(original, data, new QuantizedLayerCounter());

        var result = new PostTrainingQuantizationStep(options).Apply(model, context);

        // The metric loses 0.1 per quantized layer: two of the three must return to float, lowest SQNR first.
        var stillQuantized = result.named_modules().Where(m => m.module is QuantizedLinear).ToList();
        Assert.That(stillQuantized, Has.Count.EqualTo(1));
        Assert.That(result.modules().OfType<Linear>().Count(), Is.EqualTo(2));
        var kept = (QuantizedLinear)stillQuantized[0].module;
        Assert.That(context.Notes, Has.Some.Contains("kept in float by the fallback"));

        // The two restored layers had lower SQNR than the one kept: re-run without fallback to read every SQNR.
        using var again = ModuleCloner.DeepClone(original);
        var all = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions()).Apply(again, Context(original, data));
        var sqnr = all.named_modules().Where(m => m.module is QuantizedLinear).ToDictionary(m => m.name, m => ((QuantizedLinear)m.module).SqnrDb!.Value);
        Assert.That(sqnr[stillQuantized[0].name], Is.EqualTo(sqnr.Values.Max()));
        Assert.That(kept.FusedRelu, Is.EqualTo(stillQuantized[0].name != "fc3"));

        // A restored layer keeps its ReLU module (only a quantized layer fuses it).
        int relus = result.modules().OfType<ReLU>().Count();
        Assert.That(relus, Is.EqualTo(stillQuantized[0].name == "fc3" ? 2 : 1));
    }

    [Test]
    public void KeepFloatWhenSlower_EveryLayerEndsQuantizedAndNotedOrFloat()
    {
        using var original = ModelZoo.Create(ZooModel.LeNet5, 14);
        using var model = ModuleCloner.DeepClone(original);
        using var data = Images(32, 14);
        var options = new PostTrainingQuantizationOptions { KeepFloatWhenSlower = true };
        var context = Context(original, data);

        var result = new PostTrainingQuantizationStep(options).Apply(model, context);

        // Timing decides which way each layer goes; either way the model is whole and each float layer is explained.
        var names = new[] { "conv1", "conv2", "fc1", "fc2", "fc3" };
        var floatLayers = names.Where(n => ModuleTree.GetSubmodule(result, n) is Conv2d or Linear).ToList();
        Assert.That(names.All(n => ModuleTree.GetSubmodule(result, n) is Conv2d or Linear or IQuantizedLayer), Is.True);
        if (floatLayers.Count > 0)
        {
            Assert.That(context.Notes, Has.Some.Contains("not faster").And.Contains(floatLayers[0]));
        }

        using var input = randn(4, 1, 28, 28);
        var expected = TestModels.Output(original, input);
        Assert.That(RelativeError(TestModels.Output(result, input), expected), Is.LessThan(0.05));
        int relus = result.modules().OfType<ReLU>().Count();
        Assert.That(relus, Is.EqualTo(floatLayers.Count(n => n != "fc3")), "a layer kept in float keeps its ReLU");
    }

    [TestCase(true)]
    [TestCase(false)]
    public void CalibrationBatches_RunExactlyTheAskedNumberAndRestoreTheMode(bool withCallback)
    {
        using var model = TestModels.Mlp(15);
        model.train();
        using var data = TestModels.Classification(100, 15);
        int calls = 0;
        var hook = ((nn.Module<Tensor, Tensor>)ModuleTree.GetSubmodule(model, "fc1")).register_forward_hook((m, x, y) =>
        {
            calls++;
            Assert.That(m.training, Is.False);
            return y;
        });
        var seen = new List<int>();

        QuantizationTargets.RunCalibrationBatches(model, data, 3, 10, Context(model, data), withCallback ? seen.Add : null);
        hook.remove();

        Assert.That(calls, Is.EqualTo(3), "3 of the 10 batches");
        Assert.That(seen, Is.EqualTo(withCallback ? new[] { 1, 2, 3 } : Array.Empty<int>()));
        Assert.That(model.training, Is.True);
    }

    [TestCase(QuantizationMode.Float16, ScalarType.Float16)]
    [TestCase(QuantizationMode.BFloat16, ScalarType.BFloat16)]
    public void HalfPrecisionModes_UseTheHalfPrecisionLayer(QuantizationMode mode, ScalarType dtype)
    {
        using var original = ModelZoo.LeNet300100();
        using var model = ModuleCloner.DeepClone(original);
        using var data = Flat(4, 9);
        var result = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = mode }).Apply(model, Context(original, data));
        Assert.That(result.modules().OfType<HalfPrecisionLayer>().Select(l => l.DType), Is.EqualTo(new[] { dtype, dtype, dtype }));
    }

    [Test]
    public void QuantizedLayers_GiveIdenticalResultsFromEightThreads()
    {
        torch.random.manual_seed(10);
        using var linear = nn.Linear(200, 70);
        using var conv = nn.Conv2d(3, 20, 3, padding: 1);
        using var qLinear = QuantizedLinear.FromLinear(linear);
        var settings = new ModelCompression.Quantization.Kernels.ActivationSettings(ModelCompression.Quantization.Kernels.ActivationMode.PerTensor, 0, 0, false);
        using var qConv = QuantizedConv2d.Create(conv, 8, QuantizationGranularity.PerChannel, settings, true, QuantizationMode.DynamicInt8);
        var xs = Enumerable.Range(0, 8).Select(i => randn(5, 200)).ToArray();
        var images = Enumerable.Range(0, 8).Select(i => randn(2, 3, 9, 9)).ToArray();
        var expected = xs.Select(x => TestModels.Output(qLinear, x)).ToArray();
        var expectedConv = images.Select(x => TestModels.Output(qConv, x)).ToArray();
        var actual = new float[8][];
        var actualConv = new float[8][];
        Parallel.For(0, 8, new ParallelOptions { MaxDegreeOfParallelism = 8 }, i =>
        {
            for (int repeat = 0; repeat < 20; repeat++)
            {
                using var scope = NewDisposeScope();
                using var noGrad = no_grad();
                actual[i] = qLinear.forward(xs[i]).data<float>().ToArray();
                actualConv[i] = qConv.forward(images[i]).data<float>().ToArray();
            }
        });
        for (int i = 0; i < 8; i++)
        {
            Assert.That(actual[i], Is.EqualTo(expected[i]));
            Assert.That(actualConv[i], Is.EqualTo(expectedConv[i]));
        }

        Assert.That(actualConv.SelectMany(v => v).Min(), Is.GreaterThanOrEqualTo(0f), "fused ReLU");
    }

    [TestCase(true)]
    [TestCase(false)]
    public void QuantizedConv2d_MatchesTheFloatConvolutionWithStrideAndPadding(bool perRow)
    {
        var mode = perRow ? ModelCompression.Quantization.Kernels.ActivationMode.PerRow : ModelCompression.Quantization.Kernels.ActivationMode.PerTensor;
        torch.random.manual_seed(11);
        using var conv = nn.Conv2d(3, 8, (3, 5), stride: (2, 1), padding: (1, 2), dilation: (1, 2));
        using var x = randn(2, 3, 11, 13);
        var expected = TestModels.Output(conv, x);
        var settings = new ModelCompression.Quantization.Kernels.ActivationSettings(mode, 0, 0, false);
        using var q = QuantizedConv2d.Create(conv, 8, QuantizationGranularity.PerChannel, settings, false, QuantizationMode.DynamicInt8);
        var actual = TestModels.Output(q, x);
        Assert.That(actual, Has.Length.EqualTo(expected.Length));
        Assert.That(RelativeError(actual, expected), Is.LessThan(0.02));
    }

    [TestCase(3, 3, 1, 1, 1, 1, 1, 1)]
    [TestCase(3, 5, 2, 1, 1, 2, 1, 2)]
    [TestCase(5, 5, 1, 3, 0, 0, 1, 1)]
    [TestCase(2, 4, 3, 2, 2, 3, 2, 1)]
    public void QuantizedConv2d_ByteIm2col_EqualsTheFloatIm2colPathBitForBit(int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw)
    {
        torch.random.manual_seed(12);
        using var conv = nn.Conv2d(4, 20, (kh, kw), stride: (sh, sw), padding: (ph, pw), dilation: (dh, dw));
        using var x = randn(3, 4, 11, 9);
        var (scale, zero) = ModelCompression.Quantization.Kernels.QuantizedActivations.Range(-2.5f, 3f, false);
        var settings = new ModelCompression.Quantization.Kernels.ActivationSettings(ModelCompression.Quantization.Kernels.ActivationMode.Static, scale, zero, false);
        using var q = QuantizedConv2d.Create(conv, 8, QuantizationGranularity.PerChannel, settings, false, QuantizationMode.StaticInt8);
        var actual = TestModels.Output(q, x);

        // The same static quantization through float im2col rows.
        int floatOutputs = TestModels.Output(conv, x).Length;
        using var scope = NewDisposeScope();
        var columns = nn.functional.unfold(x, (kh, kw), (dh, dw), (ph, pw), (sh, sw));
        long pixels = columns.shape[2];
        var rows = columns.transpose(1, 2).reshape(-1, 4 * kh * kw);
        var viaRows = q.RunRowsForTest(rows).reshape(3, pixels, 20).transpose(1, 2).contiguous().data<float>().ToArray();
        Assert.That(actual, Has.Length.EqualTo(viaRows.Length));
        Assert.That(actual, Is.EqualTo(viaRows));
        Assert.That(actual, Has.Length.EqualTo(floatOutputs));
    }

    [Test]
    public void SameSeed_GivesTheSameQuantizedModel()
    {
        using var original = ModelZoo.Create(ZooModel.LeNet5, 2);
        using var data = Images(96, 12);
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8, Observer = ActivationObserver.Entropy, CalibrationBatches = 2, CalibrationBatchSize = 32 };
        string Hash()
        {
            using var model = ModuleCloner.DeepClone(original);
            var result = new PostTrainingQuantizationStep(options).Apply(model, Context(original, data));
            return TestModels.StateHash(result);
        }

        Assert.That(Hash(), Is.EqualTo(Hash()));
    }

    [TestCase(QuantizationMode.StaticInt8)]
    [TestCase(QuantizationMode.DynamicInt8)]
    public void Apply_LeavesNoLiveTensorsBeyondTheNewLayers(QuantizationMode mode)
    {
        using var original = ModelZoo.Create(ZooModel.LeNet5, 4);
        using var data = Images(32, 13);
        var options = new PostTrainingQuantizationOptions { Mode = mode, CalibrationBatches = 1, CalibrationBatchSize = 16 };
        var step = new PostTrainingQuantizationStep(options);
        using (var warm = ModuleCloner.DeepClone(original))
        {
            step.Apply(warm, Context(original, data)).Dispose();
        }

        using var model = ModuleCloner.DeepClone(original);
        int oldState = model.state_dict().Count;
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long before = TestModels.SettledTensorCount();
        using var result = step.Apply(model, Context(original, data));
        GC.Collect();
        GC.WaitForPendingFinalizers();

        // The replaced float layers were disposed and the quantized layers hold their own tensors; nothing else lives.
        Assert.That(Tensor.TotalCount - before, Is.EqualTo(result.state_dict().Count - oldState));
    }

    /// <summary>
    /// Layers whose K inputs (a convolution's channels × kernel) are fewer than the group, or not a multiple of it:
    /// the layer reports the groups it really uses, its weight is exactly the group rule applied to its rows (the last
    /// group shorter), and the file holds it exactly. Each case: layer, mode, group size (0 = the default 64), the
    /// group size the layer reports, the scales per row.
    /// </summary>
    private static IEnumerable<TestCaseData> GroupCases()
    {
        yield return new TestCaseData("linear16", QuantizationMode.WeightOnlyInt4, 0, 16, 1).SetName("int4 Linear(16, 32): one group of 16 per row");
        yield return new TestCaseData("conv3x3", QuantizationMode.WeightOnlyInt4, 0, 27, 1).SetName("int4 Conv2d(3, 8, 3): one group of 27 per row");
        yield return new TestCaseData("linear16", QuantizationMode.WeightOnlyInt8, 64, 16, 1).SetName("int8 per-group(64) Linear(16, 32): one group of 16 per row");
        yield return new TestCaseData("linear64", QuantizationMode.WeightOnlyInt4, 0, 64, 1).SetName("int4 Linear(64, 32): K equal to the group");
        yield return new TestCaseData("linear80", QuantizationMode.WeightOnlyInt4, 32, 32, 3).SetName("int4 per-group(32) Linear(80, 32): 32 + 32 + 16");
        yield return new TestCaseData("conv3x5", QuantizationMode.WeightOnlyInt4, 0, 64, 2).SetName("int4 Conv2d(3, 8, 5): 64 + 11");
    }

    [TestCaseSource(nameof(GroupCases))]
    public void WeightOnly_InputsNotWholeGroups_ReportsItsGroupsAndSavesAndLoadsExactly(string kind, QuantizationMode mode, int groupSize, int reportedGroup, int groupsPerRow)
    {
        manual_seed(11);
        bool conv = kind.StartsWith("conv", StringComparison.Ordinal);
        int k = kind switch { "linear16" => 16, "linear64" => 64, "linear80" => 80, "conv3x3" => 27, _ => 75 };
        nn.Module<Tensor, Tensor> layer = conv ? nn.Conv2d(3, 8, kind == "conv3x3" ? 3 : 5, padding: 1) : nn.Linear(k, 32);
        using var original = nn.Sequential(("layer", layer));
        original.eval();
        var floatWeight = ((Tensor)original.state_dict()["layer.weight"]).detach().reshape(conv ? 8 : 32, k).data<float>().ToArray();
        using var model = ModuleCloner.DeepClone(original);
        using var generator = new Generator(5);
        using var inputs = conv ? randn([8, 3, 9, 9], generator: generator) : randn([8, k], generator: generator);
        using var data = new TensorDataset(inputs, zeros(8, dtype: int64));
        var options = new PostTrainingQuantizationOptions { Mode = mode, WeightGranularity = groupSize == 0 ? null : QuantizationGranularity.PerGroup(groupSize) };
        var context = Context(original, data);

        using var result = new PostTrainingQuantizationStep(options).Apply(model, context);

        var quantized = (QuantizedLayer)ModuleTree.GetSubmodule(result, "layer");
        Assert.That(quantized.WeightGranularity, Is.TypeOf<PerGroupGranularity>());
        Assert.That(((PerGroupGranularity)quantized.WeightGranularity).Size, Is.EqualTo(reportedGroup));
        Assert.That(quantized.ToString(), Does.Contain($"per-group({reportedGroup})"));
        Assert.That(quantized.state_dict()["weight_scale"].shape, Is.EqualTo(new long[] { conv ? 8 : 32, groupsPerRow }));
        if (reportedGroup < (groupSize == 0 ? 64 : groupSize))
        {
            Assert.That(context.Notes, Has.Some.Contains("one group per row").And.Contains($"layer (per-group({reportedGroup}))"));
        }

        // The stored weight is the group rule applied row by row, the last group of a row shorter when K is not whole groups.
        int bits = mode == QuantizationMode.WeightOnlyInt4 ? 4 : 8;
        int size = groupSize == 0 ? 64 : groupSize;
        using var dequantized = quantized.DequantizedWeight();
        var actual = dequantized.reshape(-1).data<float>().ToArray();
        var expected = GroupRule(floatWeight, k, size, bits);
        Assert.That(actual.Zip(expected).Max(p => Math.Abs(p.First - p.Second)), Is.LessThanOrEqualTo(1e-6));

        using var stream = new MemoryStream();
        ModelCompression.Serialization.CompressedModel.Save(result, stream);
        stream.Position = 0;
        using var loaded = ModelCompression.Serialization.CompressedModel.Load(stream);
        var reloaded = (QuantizedLayer)ModuleTree.GetSubmodule(loaded, "layer");
        Assert.That(reloaded.WeightGranularity.ToString(), Is.EqualTo(quantized.WeightGranularity.ToString()));
        using (no_grad())
        {
            using var before = result.call(inputs);
            using var after = loaded.call(inputs);
            Assert.That(after.equal(before).all().item<bool>(), Is.True, "outputs are bit-identical after the round trip");
        }

        using var again = new MemoryStream();
        ModelCompression.Serialization.CompressedModel.Save(loaded, again);
        Assert.That(again.ToArray(), Is.EqualTo(stream.ToArray()), "the loaded model saves to the same bytes");
    }

    /// <summary>
    /// The symmetric group rule written out independently of the library: groups of <paramref name="size"/> along each
    /// row (the whole row when shorter, the last one shorter when K is not whole groups), scale max|w| / qmax (as
    /// float16 at 4 bits, as stored), levels rounded half to even.
    /// </summary>
    private static float[] GroupRule(float[] weight, int k, int size, int bits)
    {
        int qmax = (1 << (bits - 1)) - 1;
        var result = new float[weight.Length];
        for (int row = 0; row < weight.Length / k; row++)
        {
            for (int start = 0; start < k; start += size)
            {
                int end = Math.Min(k, start + size);
                float max = 0;
                for (int i = start; i < end; i++)
                {
                    max = MathF.Max(max, MathF.Abs(weight[(row * k) + i]));
                }

                float scale = max == 0 ? 1f : max / qmax;
                scale = bits == 4 ? (float)(Half)Math.Max(scale, 1e-4f) : scale;
                for (int i = start; i < end; i++)
                {
                    float level = Math.Clamp(MathF.Round(weight[(row * k) + i] / scale, MidpointRounding.ToEven), -qmax, qmax);
                    result[(row * k) + i] = level * scale;
                }
            }
        }

        return result;
    }

    /// <summary>Yields the given input batches as they are (a TensorDataset would refuse NaN or empty data).</summary>
    private sealed class FixedBatches(params Tensor[] inputs) : IBatchSource
    {
        public long Count => inputs.Sum(i => i.shape[0]);

        public IReadOnlyList<long> SampleShape => [784];

        public IEnumerable<(Tensor Input, Tensor Target)> GetBatches(int batchSize, bool shuffle = false, int seed = 0) =>
            inputs.Select(i => (i.alias(), zeros(i.shape[0], dtype: int64)));
    }

    /// <summary>A metric of 1 − 0.1 × (number of quantized layers): deterministic, so fallback decisions are exact.</summary>
    private sealed class QuantizedLayerCounter : IEvaluator
    {
        public string MetricName => "accuracy";

        public bool HigherIsBetter => true;

        public EvaluationResult Evaluate(nn.Module<Tensor, Tensor> model, IBatchSource data, CancellationToken cancellationToken = default) =>
            new(1 - (0.1 * model.modules().Count(m => m is QuantizedLinear)), data.Count);
    }

    [Test]
    public void Apply_DynamicInt8_LayersInFieldsTypedLinearAndConv2d_AreRoundedInPlaceAndNoted()
    {
        using var original = new FixedTypeNet(11);
        using var model = ModuleCloner.DeepClone(original);
        using var data = new TensorDataset(randn(8, 1, 12, 12), zeros(8, dtype: int64));
        var logger = new CapturingLogger();
        var context = new CompressionContext(new CompressionData(data, data), original, logger: logger);

        var result = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = QuantizationMode.DynamicInt8 }).Apply(model, context);

        Assert.That(ModuleTree.GetSubmodule(result, "head"), Is.TypeOf<QuantizedLinear>());
        Assert.That(ModuleTree.GetSubmodule(result, "fc"), Is.TypeOf<Linear>());
        Assert.That(TestModels.StateHash(ModuleTree.GetSubmodule(result, "fc")), Is.Not.EqualTo(TestModels.StateHash(ModuleTree.GetSubmodule(original, "fc"))));
        var fc = ((Linear)ModuleTree.GetSubmodule(result, "fc")).weight!.detach().data<float>().ToArray();
        Assert.That(WeightGrid.Find(fc, 64)?.MaxLevel, Is.EqualTo(127), "the weights lie on an int8 grid with a scale per row");
        Assert.That(((Linear)ModuleTree.GetSubmodule(result, "fc")).bias!.detach().data<float>().ToArray(),
            Is.EqualTo(((Linear)ModuleTree.GetSubmodule(original, "fc")).bias!.detach().data<float>().ToArray()), "biases stay as they are");
        Assert.That(context.Notes, Has.One.Contains("rounded in place to int8").And.Contains("'fc'").And.Contains("'conv'"));
        Assert.That(logger.Warnings, Has.One.Contains("'fc'"));

        var failing = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { FixedTypeLayers = FixedTypeLayers.Fail });
        using var other = ModuleCloner.DeepClone(original);
        var ex = Assert.Throws<UnsupportedModelException>(() => failing.Apply(other, new CompressionContext(new CompressionData(data, data), original)));
        Assert.That(ex!.Message, Does.Contain("'fc'").And.Contain("PostTrainingQuantizationOptions.FixedTypeLayers"));
        Assert.That(ModuleTree.GetSubmodule(other, "head"), Is.TypeOf<Linear>());
    }

    [Test]
    public void Apply_Float16_RoundsLayersInFieldsTypedLinearInPlace()
    {
        using var original = new FixedTypeNet(12);
        using var model = ModuleCloner.DeepClone(original);
        using var data = new TensorDataset(randn(8, 1, 12, 12), zeros(8, dtype: int64));
        var context = new CompressionContext(new CompressionData(data, data), original);

        var result = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = QuantizationMode.Float16 }).Apply(model, context);

        using var expected = original.state_dict()["fc.weight"].to(ScalarType.Float16).to(ScalarType.Float32);
        using var actual = result.state_dict()["fc.weight"].detach().clone();
        Assert.That(actual.dtype, Is.EqualTo(ScalarType.Float32));
        Assert.That(actual.data<float>().ToArray(), Is.EqualTo(expected.data<float>().ToArray()));
        Assert.That(context.Notes, Has.One.Contains("rounded in place to fp16").And.Contains("'fc'"));
    }
}
