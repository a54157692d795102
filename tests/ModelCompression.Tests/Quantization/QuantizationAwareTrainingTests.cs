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
using static TorchSharp.torch;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace ModelCompression.Tests.Quantization;

[TestFixture]
public sealed class QuantizationAwareTrainingTests
{
    private static CompressionContext Context(nn.Module<Tensor, Tensor> original, IBatchSource train, IBatchSource test) =>
        new(new CompressionData(train, test), original);

    private static float[] Values(Tensor t) => t.detach().cpu().data<float>().ToArray();

    [Test]
    public void FixedScale_StraightThroughGradientIsOneInsideTheRangeAndZeroOutside()
    {
        using var x = tensor(new float[] { -3f, -0.52f, 0f, 0.47f, 2f }).requires_grad_();
        using var scale = tensor(0.1f);
        using var y = FakeQuantization.WithFixedScale(x, scale, 0, -10, 10);
        Assert.That(Values(y), Is.EqualTo(new[] { -1f, -0.5f, 0f, 0.5f, 1f }).Within(1e-6));
        y.sum().backward();
        Assert.That(Values(x.grad!), Is.EqualTo(new[] { 0f, 1f, 1f, 1f, 0f }));
    }

    [Test]
    public void LearnedScale_ReceivesAGradientAndMoves()
    {
        using var generator = new Generator(3);
        using var x = randn([256], generator: generator);
        using var scale = new Parameter(tensor(new[] { 0.5f }));
        using var optimizer = optim.SGD([scale], 0.05);
        float before = scale.item<float>();
        for (int i = 0; i < 5; i++)
        {
            using var scope = NewDisposeScope();
            optimizer.zero_grad();
            var y = FakeQuantization.WithLearnedScale(x, scale, 0, -7, 7, 1 / Math.Sqrt(256 * 7.0));
            var loss = (y - x).square().mean();
            loss.backward();
            Assert.That(scale.grad!.abs().item<float>(), Is.GreaterThan(0f));
            optimizer.step();
        }

        Assert.That(scale.item<float>(), Is.Not.EqualTo(before));
    }

    [Test]
    public void Binary_IsSignTimesMeanMagnitudeWithClippedGradient()
    {
        using var w = tensor(new float[] { 0.5f, -2f, 0.25f, -0.25f }, [2, 2]).requires_grad_();
        using var b = FakeQuantization.Binary(w);
        Assert.That(Values(b), Is.EqualTo(new[] { 1.25f, -1.25f, 0.25f, -0.25f }));
        b.sum().backward();
        Assert.That(Values(w.grad!), Is.EqualTo(new[] { 1f, 0f, 1f, 1f }));
    }

    [Test]
    public void FoldedBatchNorm_EqualsTheUnfusedEvalOutputAtTheStart()
    {
        torch.random.manual_seed(4);
        using var conv = nn.Conv2d(3, 5, 3, padding: 1);
        using var bn = TestModels.RandomBatchNorm2d(5);
        using var x = randn(2, 3, 7, 7);
        var expected = TestModels.Output(nn.Sequential(conv, bn), x);
        using var layer = new FakeQuantLayer(conv, bn, 8, QuantizationGranularity.PerChannel, quantizeActivations: false, learnedStepSize: false);
        layer.eval();
        using var scope = NewDisposeScope();
        var (weight, bias) = layer.FoldedWeightAndBias(null);
        var folded = Values(nn.functional.conv2d(x, weight, bias, padding: [1, 1]));
        Assert.That(folded.Zip(expected).Max(p => Math.Abs(p.First - p.Second)), Is.LessThan(1e-5));
    }

    [Test]
    public void Observer_StopsMovingOnceDisabled()
    {
        torch.random.manual_seed(5);
        using var layer = new FakeQuantLayer(nn.Linear(6, 3), null, 8, QuantizationGranularity.PerChannel, quantizeActivations: true, learnedStepSize: false);
        layer.train();
        using (var scope = NewDisposeScope())
        {
            layer.call(randn(8, 6));
            var first = layer.ObservedRange;
            layer.call(randn(8, 6) * 5);
            Assert.That(layer.ObservedRange, Is.Not.EqualTo(first));
        }

        layer.ObserverEnabled = false;
        var frozen = layer.ObservedRange;
        using (var scope = NewDisposeScope())
        {
            layer.call(randn(8, 6) * 50);
        }

        Assert.That(layer.ObservedRange, Is.EqualTo(frozen));
    }

    [TestCase(8, false)]
    [TestCase(4, false)]
    [TestCase(8, true)]
    [TestCase(1, false)]
    public void Convert_GivesTheFakeQuantizedOutputs(int bits, bool learned)
    {
        torch.random.manual_seed(6);
        using var linear = nn.Linear(40, 12);
        var granularity = bits == 4 ? QuantizationGranularity.PerChannel : QuantizationGranularity.PerChannel;
        using var layer = new FakeQuantLayer(linear, null, bits, granularity, quantizeActivations: true, learnedStepSize: learned);
        layer.train();
        using (var scope = NewDisposeScope())
        {
            layer.call(randn(32, 40));
        }

        layer.eval();
        using var x = randn(16, 40);
        var fake = TestModels.Output(layer, x);
        using var converted = layer.Convert();
        var real = TestModels.Output(converted, x);
        Assert.That(((ICompressedLayer)converted).WeightBits, Is.EqualTo(bits));
        double scale = fake.Max(Math.Abs);
        Assert.That(real.Zip(fake).Max(p => Math.Abs(p.First - p.Second)), Is.LessThan(1e-4 * scale + 1e-6));
    }

    [Test]
    public void Step_TrainsAndConvertsToTheSameQuantizedLayersAsPostTraining()
    {
        var (model, train, test) = TestModels.TrainedMlp(7);
        using var _ = model;
        using var __ = train;
        using var ___ = test;
        using var copy = ModuleCloner.DeepClone(model);
        var step = new QuantizationAwareTrainingStep(new QuantizationAwareTrainingOptions
        {
            Training = new TrainingOptions { Epochs = 2, BatchSize = 32, LearningRate = 0.005 },
            FreezeBatchNormAfterEpoch = null,
        });
        var context = Context(model, train, test);

        var result = step.Apply(copy, context);

        Assert.That(result.modules().OfType<QuantizedLinear>().Select(l => l.Mode), Is.EqualTo(new[] { QuantizationMode.StaticInt8, QuantizationMode.StaticInt8 }));
        Assert.That(result.modules().OfType<FakeQuantLayer>(), Is.Empty);
        Assert.That(step.LastConversion!.Samples, Is.EqualTo(300));
        Assert.That(step.LastConversion.Agreement, Is.GreaterThanOrEqualTo(0.99));
        double before = new AccuracyEvaluator().Evaluate(model, test).Value;
        double after = new AccuracyEvaluator().Evaluate(result, test).Value;
        Assert.That(after, Is.GreaterThan(before - 0.05));
        Assert.That(context.Notes, Has.Some.Contains("same predictions"));
    }

    [Test]
    public void Step_WithLearnedStepSizeAndDistillation_TrainsTheScalesAndConverts()
    {
        var (model, train, test) = TestModels.TrainedMlp(13);
        using var _ = model;
        using var __ = train;
        using var ___ = test;
        using var copy = ModuleCloner.DeepClone(model);
        var step = new QuantizationAwareTrainingStep(new QuantizationAwareTrainingOptions
        {
            WeightBits = 4,
            LearnedStepSize = true,
            Distillation = new ModelCompression.Distillation.RecoveryDistillation { Alpha = 0.5, Temperature = 2 },
            Training = new TrainingOptions { Epochs = 2, BatchSize = 32, LearningRate = 0.01 },
        });

        var result = step.Apply(copy, Context(model, train, test));

        var layers = result.modules().OfType<QuantizedLinear>().ToList();
        Assert.That(layers.Select(l => l.WeightBits), Is.EqualTo(new[] { 4, 4 }));
        Assert.That(step.LastConversion!.Agreement, Is.GreaterThanOrEqualTo(0.99));
        Assert.That(new AccuracyEvaluator().Evaluate(result, test).Value, Is.GreaterThan(new AccuracyEvaluator().Evaluate(model, test).Value - 0.1));
    }

    [Test]
    public void Step_BinaryHiddenLayersAreStoredAsBits()
    {
        var (model, train, test) = TestModels.TrainedMlp(8);
        using var _ = model;
        using var __ = train;
        using var ___ = test;
        using var copy = ModuleCloner.DeepClone(model);
        var options = new QuantizationAwareTrainingOptions
        {
            WeightBits = 1,
            Training = new TrainingOptions { Epochs = 1, BatchSize = 32, LearningRate = 0.005 },
        };
        options.LayerWeightBits["fc2"] = 8;

        var result = new QuantizationAwareTrainingStep(options).Apply(copy, Context(model, train, test));

        var fc1 = (QuantizedLinear)ModuleTree.GetSubmodule(result, "fc1");
        Assert.That(fc1.WeightBits, Is.EqualTo(1));
        Assert.That(fc1.state_dict()["weight"].shape, Is.EqualTo(new long[] { 8, 1 }));
        Assert.That(((QuantizedLinear)ModuleTree.GetSubmodule(result, "fc2")).WeightBits, Is.EqualTo(8));
        using var w = fc1.DequantizedWeight();
        Assert.That(w.abs().unique().Item1.numel(), Is.LessThanOrEqualTo(8), "one magnitude per output channel");
    }

    [Test]
    public void ZeroEpochs_IsPostTrainingQuantizationFromTheCalibrationPass()
    {
        var (model, train, test) = TestModels.TrainedMlp(12);
        using var _ = model;
        using var __ = train;
        using var ___ = test;
        using var copy = ModuleCloner.DeepClone(model);
        var step = new QuantizationAwareTrainingStep(new QuantizationAwareTrainingOptions { Training = new TrainingOptions { Epochs = 0 }, ObserverEpochs = 0 });

        var result = step.Apply(copy, Context(model, train, test));

        // The weights are the trained ones, quantized: the dequantized weight is within half a step of the original.
        var fc1 = (QuantizedLinear)ModuleTree.GetSubmodule(result, "fc1");
        using var original = ((Linear)ModuleTree.GetSubmodule(model, "fc1")).weight!.detach().clone();
        using var restored = fc1.DequantizedWeight();
        using var step127 = original.abs().amax([1L], keepdim: true) / 127;
        Assert.That((restored - original).abs().le(step127 / 2 + 1e-7).all().item<bool>(), Is.True);
        Assert.That(step.LastConversion!.Agreement, Is.GreaterThanOrEqualTo(0.99));
    }

    [Test]
    public void InvalidOptions_AreAllListed()
    {
        var options = new QuantizationAwareTrainingOptions
        {
            WeightBits = 9,
            ObserverEpochs = -1,
            FreezeBatchNormAfterEpoch = -1,
            WeightGranularity = QuantizationGranularity.PerGroup(32),
        };
        options.LayerWeightBits["fc1"] = 0;
        var ex = Assert.Throws<OptionsValidationException>(() => new QuantizationAwareTrainingStep(options));
        Assert.That(ex!.Errors, Has.Count.EqualTo(5));
        Assert.Throws<OptionsValidationException>(() => CompressionPipeline.Create().AddQuantizationAwareTraining(weightBits: 0));
        Assert.That(new QuantizationAwareTrainingOptions { ObserverEpochs = 5 }.Validate(), Has.Count.EqualTo(1), "more observer epochs than training epochs");
    }

    [Test]
    public void LayerBitsForAnUnselectedLayer_ThrowBeforeAnyChange()
    {
        using var model = TestModels.Mlp(9);
        using var data = TestModels.Classification(32, 9);
        string before = TestModels.StateHash(model);
        var options = new QuantizationAwareTrainingOptions();
        options.LayerWeightBits["fc9"] = 4;
        var ex = Assert.Throws<ArgumentException>(() => new QuantizationAwareTrainingStep(options).Apply(model, Context(model, data, data)));
        Assert.That(ex!.Message, Does.Contain("fc9"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
    }

    [Test]
    public void Step_LeavesNoLiveTensorsBeyondTheNewLayers()
    {
        using var original = TestModels.Mlp(10);
        using var data = TestModels.Classification(64, 10);
        var step = new QuantizationAwareTrainingStep(new QuantizationAwareTrainingOptions { Training = new TrainingOptions { Epochs = 1, BatchSize = 32 } });
        using (var warm = ModuleCloner.DeepClone(original))
        {
            step.Apply(warm, Context(original, data, data)).Dispose();
        }

        using var model = ModuleCloner.DeepClone(original);
        int oldState = model.state_dict().Count;
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long before = TestModels.SettledTensorCount();
        using var result = step.Apply(model, Context(original, data, data));
        GC.Collect();
        GC.WaitForPendingFinalizers();
        Assert.That(Tensor.TotalCount - before, Is.EqualTo(result.state_dict().Count - oldState));
    }

    [Test]
    public void PrunedRowsThenQuantizationAwareTraining_TrainsAndZeroRowsQuantizeToZero(
        [Range(1, 8)] int bits, [Values(false, true)] bool learnedStepSize)
    {
        // A pruned model (whole rows of fc1 zero, as structured or heavy magnitude pruning leaves them): an all-zero
        // row's scale must fake-quantize and convert its zeros to zeros, not to 0 / 0 (NaN activations in training).
        var (model, train, test) = TestModels.TrainedMlp(14);
        using var _ = model;
        using var __ = train;
        using var ___ = test;
        using (no_grad())
        {
            var pruned = ((Linear)ModuleTree.GetSubmodule(model, "fc1")).weight!;
            pruned[2].zero_();
            pruned[5].zero_();
        }

        QuantizationAwareTrainingStep Step(int epochs) => new(new QuantizationAwareTrainingOptions
        {
            WeightBits = bits,
            LearnedStepSize = learnedStepSize,
            QuantizeActivations = bits == 8,
            ObserverEpochs = 0,
            Training = new TrainingOptions { Epochs = epochs, BatchSize = 32, LearningRate = 0.002 },
        });

        // Trained: the rows move away from zero, and every value stays finite.
        using (var copy = ModuleCloner.DeepClone(model))
        {
            var trainingStep = Step(1);
            using var trained = trainingStep.Apply(copy, Context(model, train, test));
            using var output = trained.call(test.Inputs);
            Assert.That(output.isfinite().all().item<bool>(), Is.True);
            Assert.That(trainingStep.LastConversion!.Agreement, Is.GreaterThanOrEqualTo(0.9));
        }

        // Not trained: the zero rows are stored as zeros.
        using var untouched = ModuleCloner.DeepClone(model);
        using var result = Step(0).Apply(untouched, Context(model, train, test));
        using var weight = ((QuantizedLinear)ModuleTree.GetSubmodule(result, "fc1")).DequantizedWeight();
        Assert.That(weight.isfinite().all().item<bool>(), Is.True);
        // Binary rows are ±α with α > 0: an all-zero row gets the smallest normal float.
        float zero = bits == 1 ? 1.2e-38f : 0f;
        Assert.That(weight[2].abs().max().item<float>(), Is.LessThanOrEqualTo(zero), "row 2");
        Assert.That(weight[5].abs().max().item<float>(), Is.LessThanOrEqualTo(zero), "row 5");
    }

    [Test]
    public void FixedScale_ZeroScaleQuantizesZerosToZero()
    {
        using var x = zeros(2, 3).requires_grad_();
        using var scale = zeros(2, 1);
        using var y = FakeQuantization.WithFixedScale(x, scale, 0, -7, 7);
        Assert.That(Values(y), Is.All.EqualTo(0f));
        y.sum().backward();
        Assert.That(x.grad!.isfinite().all().item<bool>(), Is.True);
    }

    [Test]
    public void Step_WithBatchNorm_FoldsItAndConverts()
    {
        using var original = ModelZoo.Create(ZooModel.SmallResNet, 11);
        using var generator = new Generator(11);
        using var data = new TensorDataset(randn([64, 1, 28, 28], generator: generator), randint(0, 10, [64], generator: generator));
        using var model = ModuleCloner.DeepClone(original);
        var options = new QuantizationAwareTrainingOptions { Training = new TrainingOptions { Epochs = 2, BatchSize = 32, LearningRate = 0.001 }, FreezeBatchNormAfterEpoch = 1 };
        var step = new QuantizationAwareTrainingStep(options);

        var result = step.Apply(model, Context(original, data, data));

        Assert.That(ModuleTree.GetSubmodule(result, "bn1"), Is.InstanceOf<Identity>());
        Assert.That(ModuleTree.GetSubmodule(result, "conv1"), Is.InstanceOf<QuantizedConv2d>());
        Assert.That(step.LastConversion!.Agreement, Is.GreaterThanOrEqualTo(0.95));
    }
}
