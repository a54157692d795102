using ModelCompression.Data;
using ModelCompression.Metrics;
using ModelCompression.Tests.Support;
using ModelCompression.Training;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace ModelCompression.Tests.Pipeline;

/// <summary>Bad data is a clear <see cref="ArgumentException"/> before the first step, never LibTorch's error inside one.</summary>
[TestFixture]
public sealed class DataChecksTests
{
    private nn.Module<Tensor, Tensor> _model = null!;
    private TensorDataset _train = null!;
    private TensorDataset _test = null!;

    [OneTimeSetUp]
    public void TrainTinyModel() => (_model, _train, _test) = TestModels.TrainedMlp(40);

    [OneTimeTearDown]
    public void Cleanup()
    {
        _model.Dispose();
        _train.Dispose();
        _test.Dispose();
    }

    /// <summary>A source that serves the batches it holds, as they are (a user's implementation may be inconsistent).</summary>
    private sealed class FixedBatches(IReadOnlyList<(Tensor Input, Tensor Target)> batches, long count, long[] sampleShape) : IBatchSource, IDisposable
    {
        public long Count => count;

        public IReadOnlyList<long> SampleShape => sampleShape;

        public IEnumerable<(Tensor Input, Tensor Target)> GetBatches(int batchSize, bool shuffle = false, int seed = 0) =>
            batches.Select(b => (b.Input.clone(), b.Target.clone()));

        public void Dispose()
        {
            foreach (var (input, target) in batches)
            {
                input.Dispose();
                target.Dispose();
            }
        }
    }

    private static FixedBatches Batches(params (Tensor Input, Tensor Target)[] batches) =>
        new(batches.Select(b => (b.Input.DetachFromDisposeScope(), b.Target.DetachFromDisposeScope())).ToList(), batches.Sum(b => b.Input.shape[0]), [4]);

    private (ArgumentException Error, List<string> Log) RunRejected(CompressionData data, nn.Module<Tensor, Tensor>? model = null)
    {
        model ??= _model;
        var log = new List<string>();
        string before = TestModels.StateHash(model);
        var pipeline = CompressionPipeline.Create()
            .WithLatencyMeasurement(new LatencyOptions { Enabled = false })
            .AddStep(new RecordingStep("step", log))
            .Build();
        var error = Assert.Throws<ArgumentException>(() => pipeline.Run(model, data))!;
        Assert.That(log, Is.Empty, "no step ran");
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
        return (error, log);
    }

    [Test]
    public void NaNInTheTrainingInputs_IsNamedBeforeAnyStep()
    {
        // TensorDataset refuses NaN itself; a user's own source need not.
        var inputs = randn(8, 4);
        inputs[5, 2] = tensor(float.NaN);
        using var bad = Batches((inputs, randint(0, 3, [8])));

        var (error, _) = RunRejected(new CompressionData(bad, _test));

        Assert.That(error.Message, Does.Contain("training data").And.Contain("NaN").And.Contain("batch 0"));
    }

    [Test]
    public void InfiniteFloatTarget_IsNamed()
    {
        using var bad = Batches((randn(8, 4), tensor(new[] { 0f, 1, 2, float.PositiveInfinity, 0, 1, 2, 0 })));

        var (error, _) = RunRejected(new CompressionData(_train, _test) { Calibration = bad });

        Assert.That(error.Message, Does.Contain("calibration data").And.Contain("target").And.Contain("Infinity"));
    }

    [Test]
    public void LabelOutsideTheModelsOutputs_IsNamed()
    {
        using var targets = _test.Targets.clone();
        targets[299] = tensor(3L);
        using var bad = new TensorDataset(_test.Inputs.clone(), targets);

        var (error, _) = RunRejected(new CompressionData(_train, bad));

        Assert.That(error.Message, Does.Contain("evaluation data").And.Contain("label 3").And.Contain("3 outputs").And.Contain("batch 1"));
    }

    [Test]
    public void NegativeLabel_IsRejectedButTheIgnoredIndexIsNot()
    {
        using var ignored = Batches((randn(4, 4), tensor(new long[] { 0, -100, 2, 1 })));
        using var negative = Batches((randn(4, 4), tensor(new long[] { 0, -1, 2, 1 })));
        var pipeline = CompressionPipeline.Create().WithLatencyMeasurement(new LatencyOptions { Enabled = false }).AddStep(new RecordingStep("step", [])).Build();

        using (pipeline.Run(_model, new CompressionData(_train, _test) { Calibration = ignored }))
        {
        }

        var (error, _) = RunRejected(new CompressionData(_train, _test) { Calibration = negative });
        Assert.That(error.Message, Does.Contain("label -1"));
    }

    [Test]
    public void InputAndTargetCountsThatDisagree_AreNamed()
    {
        using var bad = Batches((randn(8, 4), randint(0, 3, [8])), (randn(8, 4), randint(0, 3, [7])));

        var (error, _) = RunRejected(new CompressionData(bad, _test));

        Assert.That(error.Message, Does.Contain("training data's batch 1").And.Contain("8 inputs but 7 targets"));
    }

    [Test]
    public void ACountThatIsNotWhatTheBatchesHold_IsNamed()
    {
        using var batches = Batches((randn(8, 4), randint(0, 3, [8])));
        using var bad = new FixedBatches([(batches.GetBatches(8).First().Input.DetachFromDisposeScope(), randint(0, 3, [8]).DetachFromDisposeScope())], 10, [4]);

        var (error, _) = RunRejected(new CompressionData(bad, _test));

        Assert.That(error.Message, Does.Contain("10 samples").And.Contain("hold 8"));
    }

    [Test]
    public void InputsOfAnotherShapeInALaterBatch_AreNamed()
    {
        using var bad = Batches((randn(8, 4), randint(0, 3, [8])), (randn(8, 5), randint(0, 3, [8])));

        var (error, _) = RunRejected(new CompressionData(bad, _test));

        Assert.That(error.Message, Does.Contain("batch 1").And.Contain("[5]").And.Contain("[4]"));
    }

    [Test]
    public void Float64Model_IsRefusedUpFront()
    {
        using var model = TestModels.Mlp(41);
        model.to(ScalarType.Float64);

        var (error, _) = RunRejected(new CompressionData(_train, _test), model);

        Assert.That(error.Message, Does.Contain("Float64").And.Contain("fc1.weight"));
    }

    [Test]
    public void Rejection_LeavesNoTensorsBehind()
    {
        var inputs = randn(300, 4);
        inputs[290, 0] = tensor(float.PositiveInfinity);
        using var bad = Batches((inputs, randint(0, 3, [300])));
        var pipeline = CompressionPipeline.Create().WithLatencyMeasurement(new LatencyOptions { Enabled = false }).AddFineTuning(1).Build();
        Assert.Throws<ArgumentException>(() => pipeline.Run(_model, new CompressionData(bad, _test)));

        long before = TestModels.SettledTensorCount();
        Assert.Throws<ArgumentException>(() => pipeline.Run(_model, new CompressionData(bad, _test)));
        GC.Collect();
        GC.WaitForPendingFinalizers();

        // The two copies the run made are disposed; TorchSharp keeps a disposed module's parameter wrappers counted.
        Assert.That(Tensor.TotalCount - before, Is.LessThanOrEqualTo(2 * _model.parameters().Count()));
    }

    [Test]
    public void FineTuningAModelWithNothingToTrain_SaysSo()
    {
        using var model = TestModels.Mlp(42);
        foreach (var p in model.parameters())
        {
            p.requires_grad = false;
        }

        var logger = new CapturingLogger();
        using var result = CompressionPipeline.Create()
            .WithLatencyMeasurement(new LatencyOptions { Enabled = false })
            .WithLogger(logger)
            .AddFineTuning(1)
            .Build()
            .Run(model, new CompressionData(_train, _test));

        Assert.That(logger.Warnings, Has.Some.Contains("no trainable parameters"));
        Assert.That(result.Report.Steps[0].Message, Does.Contain("nothing trained"));
    }
}
