using ModelCompression.Data;
using ModelCompression.Tests.Support;
using ModelCompression.Training;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Training;

[TestFixture]
public sealed class TrainerTests
{
    [Test]
    public void Train_ReducesTheLossAndLearnsTheTask()
    {
        using var train = TestModels.Classification(400, 1);
        using var test = TestModels.Classification(200, 2);
        using var model = TestModels.Mlp();
        double before = new AccuracyEvaluator().Evaluate(model, test).Value;
        var summary = new Trainer(new TrainingOptions { Epochs = 20, LearningRate = 0.01, BatchSize = 32 }).Train(model, train);
        double after = new AccuracyEvaluator().Evaluate(model, test).Value;

        Assert.That(summary.Epochs, Is.EqualTo(20));
        Assert.That(summary.Steps, Is.EqualTo(20 * 13));
        Assert.That(summary.EpochLosses[^1], Is.LessThan(summary.EpochLosses[0] / 2));
        Assert.That(after, Is.GreaterThan(0.85).And.GreaterThan(before));
    }

    [TestCase(0.05, 1L)]
    [TestCase(0.0, -1L)]
    public void Train_NonFiniteGradientsInSomeSteps_RetriedThenSkippedWithinTheAllowedFraction(double allowed, long expectedSkipped)
    {
        using var data = TestModels.Classification(320, 1);
        using var model = TestModels.Mlp();
        int calls = 0;
        // Some loss evaluations add 0 · sqrt(w − w): the loss is unchanged and finite, the gradient 0 · ∞ = NaN.
        // Call 10 is step 9, whose first retry (call 11) is clean; calls 20–22 are step 18 and both its retries.
        var bad = new HashSet<int> { 10, 20, 21, 22 };
        Tensor Loss(Tensor output, Tensor target)
        {
            var loss = nn.functional.cross_entropy(output, target);
            if (bad.Contains(++calls))
            {
                var w = model.parameters().First();
                loss = loss + (0 * (w - w.detach()).sqrt().sum());
            }

            return loss;
        }

        var options = new TrainingOptions { Epochs = 8, BatchSize = 64, LearningRate = 0.01, Loss = Loss, MaxSkippedStepFraction = allowed };
        var trainer = new Trainer(options);
        if (expectedSkipped < 0)
        {
            var ex = Assert.Throws<TrainingDivergedException>(() => trainer.Train(model, data, seed: 1));
            Assert.That(ex!.Message, Does.Contain("gradients were not finite in 1 of 19 steps"));
            return;
        }

        var summary = trainer.Train(model, data, seed: 1);

        Assert.That(summary.Steps, Is.EqualTo(40));
        Assert.That(summary.SkippedSteps, Is.EqualTo(expectedSkipped));
        Assert.That(calls, Is.EqualTo(40 + 1 + 2), "one retry for step 9, two for step 18");
        using (no_grad())
        {
            Assert.That(model.parameters().All(p => isfinite(p).all().item<bool>()), Is.True);
        }

        Assert.That(summary.FinalLoss, Is.LessThan(summary.EpochLosses[0]));
    }

    [Test]
    public void Validate_SkippedStepFractionOutOfRange_Rejected()
    {
        Assert.That(new TrainingOptions { MaxSkippedStepFraction = 1.5 }.Validate(), Has.One.Contains(nameof(TrainingOptions.MaxSkippedStepFraction)));
        Assert.That(new TrainingOptions { MaxSkippedStepFraction = double.NaN }.Validate(), Has.One.Contains(nameof(TrainingOptions.MaxSkippedStepFraction)));
    }

    [Test]
    public void Train_SameSeed_SameWeights()
    {
        using var data = TestModels.Classification(200, 3);
        var options = new TrainingOptions { Epochs = 2, BatchSize = 16, Optimizer = OptimizerKind.Sgd, LearningRate = 0.05, Schedule = new CosineLearningRate() };
        using var a = TestModels.Mlp(1);
        using var b = TestModels.Mlp(1);
        using var c = TestModels.Mlp(1);
        new Trainer(options).Train(a, data, seed: 5);
        new Trainer(options).Train(b, data, seed: 5);
        new Trainer(options).Train(c, data, seed: 6);
        Assert.That(TestModels.StateHash(a), Is.EqualTo(TestModels.StateHash(b)));
        Assert.That(TestModels.StateHash(a), Is.Not.EqualTo(TestModels.StateHash(c)));
    }

    [Test]
    public void Train_CallsTheCallbacks()
    {
        using var data = TestModels.Classification(100, 4);
        using var model = TestModels.Mlp();
        var steps = new List<long>();
        var epochs = new List<int>();
        int extraCalls = 0;
        var callbacks = new TrainingCallbacks
        {
            ExtraLoss = batch =>
            {
                extraCalls++;
                Assert.That(batch.Output.shape, Is.EqualTo(new long[] { batch.Input.shape[0], 3 }));
                return batch.Output.pow(2).mean() * 0.01;
            },
            AfterOptimizerStep = info => steps.Add(info.Step),
            AfterEpoch = (epoch, _) => epochs.Add(epoch),
        };
        new Trainer(new TrainingOptions { Epochs = 3, BatchSize = 25 }).Train(model, data, callbacks);
        Assert.That(steps, Is.EqualTo(Enumerable.Range(0, 12).Select(i => (long)i)));
        Assert.That(epochs, Is.EqualTo(new[] { 0, 1, 2 }));
        Assert.That(extraCalls, Is.EqualTo(12));
    }

    [Test]
    public void Train_AfterStepCallback_CanKeepWeightsMasked()
    {
        // The pattern pruning uses: zero some weights after every optimizer step.
        using var data = TestModels.Classification(100, 4);
        using var model = TestModels.Mlp();
        var weight = model.named_parameters().Single(p => p.name == "fc1.weight").parameter;
        using var mask = ones_like(weight);
        mask[.., 0] = 0;
        var callbacks = new TrainingCallbacks { AfterOptimizerStep = _ => weight.mul_(mask) };
        new Trainer(new TrainingOptions { Epochs = 2, BatchSize = 10 }).Train(model, data, callbacks);
        Assert.That(weight[.., 0].abs().sum().item<float>(), Is.EqualTo(0f));
        Assert.That(weight[.., 1].abs().sum().item<float>(), Is.GreaterThan(0f));
    }

    [Test]
    public void Train_Cancelled_Throws()
    {
        using var data = TestModels.Classification(100, 4);
        using var model = TestModels.Mlp();
        using var source = new CancellationTokenSource();
        var progress = new InlineProgress(p =>
        {
            if (p.Batch == 2)
            {
                source.Cancel();
            }
        });
        Assert.That(
            () => new Trainer(new TrainingOptions { Epochs = 5, BatchSize = 10 }).Train(model, data, progress: progress, cancellationToken: source.Token),
            Throws.InstanceOf<OperationCanceledException>());
    }

    [Test]
    public void Train_NonFiniteLoss_Throws()
    {
        using var data = TestModels.Classification(50, 4);
        using var model = TestModels.Mlp();
        var options = new TrainingOptions { Loss = (output, _) => output.sum() * double.NaN };
        var ex = Assert.Throws<TrainingDivergedException>(() => new Trainer(options).Train(model, data));
        Assert.That(ex!.Message, Does.Contain("diverged"));
        Assert.That((ex.Epoch, ex.Step), Is.EqualTo((0, 0L)));
    }

    [Test]
    public void Constructor_InvalidOptions_ListsEveryError()
    {
        var options = new TrainingOptions { Epochs = -1, BatchSize = 0, LearningRate = double.NaN, Momentum = 1, WeightDecay = -1, Schedule = null! };
        var ex = Assert.Throws<OptionsValidationException>(() => new Trainer(options));
        Assert.That(ex!.OptionsType, Is.EqualTo(nameof(TrainingOptions)));
        Assert.That(ex.Errors, Has.Count.EqualTo(6));
    }

    [Test]
    public void Train_BatchNormCountsItsBatches_RunningStatisticsAsTorchSharpKeepsThem()
    {
        // The trainer counts batch normalizations' batches itself (TorchSharp's own increment races the finalizer):
        // the counter, the running statistics and the state dictionary must come out as a plain TorchSharp loop leaves them.
        using var data = TestModels.Classification(100, 4);
        using var ours = BatchNormMlp();
        using var reference = BatchNormMlp();
        foreach (var (name, parameter) in ours.named_parameters())
        {
            // Only the layers after the statistics learn, so both models' normalizations see the same inputs.
            parameter.requires_grad = name.StartsWith("fc2", StringComparison.Ordinal) || name.StartsWith("cumulative", StringComparison.Ordinal);
        }

        new Trainer(new TrainingOptions { Epochs = 2, BatchSize = 10, LearningRate = 0.01, Shuffle = false }).Train(ours, data, callbacks: new TrainingCallbacks
        {
            AfterOptimizerStep = info => Assert.That(info.Model.state_dict().Keys, Does.Contain("norm.num_batches_tracked").And.Contain("cumulative.num_batches_tracked")),
        });
        reference.train();
        for (int epoch = 0; epoch < 2; epoch++)
        {
            foreach (var (x, _) in data.ScopedBatches(10, false, 0))
            {
                reference.call(x).Dispose();
            }
        }

        var ourState = ours.state_dict();
        var referenceState = reference.state_dict();
        Assert.That(ourState.Keys, Is.EquivalentTo(referenceState.Keys));
        Assert.That(ourState["norm.num_batches_tracked"].item<long>(), Is.EqualTo(20L));
        Assert.That(ourState["cumulative.num_batches_tracked"].item<long>(), Is.EqualTo(20L));
        foreach (var name in new[] { "norm.running_mean", "norm.running_var", "cumulative.running_mean", "cumulative.running_var" })
        {
            Assert.That(ourState[name].allclose(referenceState[name], rtol: 1e-5, atol: 1e-6), Is.True, name);
        }

        // The counter is back in the layer: the next training forward advances it as TorchSharp does.
        ours.train();
        using (var x = randn(8, 4))
        {
            ours.call(x).Dispose();
        }

        Assert.That(ours.state_dict()["norm.num_batches_tracked"].item<long>(), Is.EqualTo(21L));

        static nn.Module<Tensor, Tensor> BatchNormMlp()
        {
            torch.random.manual_seed(3);
            var cumulative = nn.BatchNorm1d(8);
            cumulative.momentum = null; // a cumulative average, which reads the counter: TorchSharp keeps counting it
            return nn.Sequential(
                ("fc1", nn.Linear(4, 8)),
                ("norm", nn.BatchNorm1d(8)),
                ("relu", nn.ReLU()),
                ("cumulative", cumulative),
                ("fc2", nn.Linear(8, 3)));
        }
    }

    [Test]
    public void Train_LeavesNoLiveTensors()
    {
        using var data = TestModels.Classification(100, 4);
        using var model = TestModels.Mlp();
        new Trainer(new TrainingOptions { Epochs = 1 }).Train(model, data);
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long before = TestModels.SettledTensorCount();
        new Trainer(new TrainingOptions { Epochs = 2, BatchSize = 10 }).Train(model, data);
        // No collection here: a tensor left to the finalizer counts as leaked.
        Assert.That(Tensor.TotalCount, Is.EqualTo(before));
    }

    [TestCase(0, 1.0)]
    [TestCase(50, 0.5)]
    [TestCase(100, 0.0)]
    public void CosineLearningRate_FollowsTheCosine(long step, double factor)
    {
        Assert.That(new CosineLearningRate().GetLearningRate(0.1, step, 101), Is.EqualTo(0.1 * factor).Within(1e-12));
    }

    [Test]
    public void StepLearningRate_DecaysEveryPeriod()
    {
        var schedule = new StepLearningRate(gamma: 0.5, stepFraction: 0.25);
        Assert.That(schedule.GetLearningRate(1, 0, 100), Is.EqualTo(1));
        Assert.That(schedule.GetLearningRate(1, 25, 100), Is.EqualTo(0.5));
        Assert.That(schedule.GetLearningRate(1, 99, 100), Is.EqualTo(0.125));
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new StepLearningRate(gamma: 0));
    }

    private sealed class InlineProgress(Action<TrainingProgress> action) : IProgress<TrainingProgress>
    {
        public void Report(TrainingProgress value) => action(value);
    }
}
