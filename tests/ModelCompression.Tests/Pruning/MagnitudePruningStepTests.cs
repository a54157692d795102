using ModelCompression.Data;
using ModelCompression.Modules;
using ModelCompression.Pruning;
using ModelCompression.Tests.Support;
using ModelCompression.Training;
using NUnit.Framework;
using TorchSharp;
using Linear = TorchSharp.Modules.Linear;
using TensorDataset = ModelCompression.Data.TensorDataset;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Pruning;

[TestFixture]
public sealed class MagnitudePruningStepTests
{
    private nn.Module<Tensor, Tensor> _model = null!;
    private TensorDataset _train = null!;
    private TensorDataset _test = null!;

    [OneTimeSetUp]
    public void TrainTinyModel() => (_model, _train, _test) = TestModels.TrainedMlp(seed: 3);

    [OneTimeTearDown]
    public void Cleanup()
    {
        _model.Dispose();
        _train.Dispose();
        _test.Dispose();
    }

    private CompressionContext Context() => new(new CompressionData(_train, _test), _model, seed: 1);

    private static long Zeros(nn.Module model, string name)
    {
        var w = model.named_parameters().Single(p => p.name == name).parameter;
        using var nz = w.count_nonzero();
        return w.numel() - nz.item<long>();
    }

    [Test]
    public void Apply_LayerWise_PrunesEachLayerToTheTarget()
    {
        using var model = ModuleCloner.DeepClone(_model);
        var step = new MagnitudePruningStep(new MagnitudePruningOptions { Sparsity = 0.75, SparseExecution = SparseExecution.Never });
        var result = step.Apply(model, Context());
        Assert.That(Zeros(result, "fc1.weight"), Is.EqualTo(24)); // round(0.75 · 32)
        Assert.That(Zeros(result, "fc2.weight"), Is.EqualTo(18)); // round(0.75 · 24)
        Assert.That(Zeros(result, "fc1.bias"), Is.EqualTo(0), "biases are not pruned");
    }

    [Test]
    public void Apply_Global_ReachesTheTargetAcrossLayers()
    {
        using var model = ModuleCloner.DeepClone(_model);
        var options = new MagnitudePruningOptions { Sparsity = 0.5, Scope = PruningScope.Global, SparseExecution = SparseExecution.Never };
        var result = new MagnitudePruningStep(options).Apply(model, Context());
        Assert.That(Zeros(result, "fc1.weight") + Zeros(result, "fc2.weight"), Is.EqualTo(28)); // round(0.5 · 56)
    }

    [Test]
    public void Apply_LayerOverride_Wins()
    {
        using var model = ModuleCloner.DeepClone(_model);
        var options = new MagnitudePruningOptions { Sparsity = 0.5, SparseExecution = SparseExecution.Never };
        options.LayerSparsity["fc2"] = 0.25;
        var result = new MagnitudePruningStep(options).Apply(model, Context());
        Assert.That(Zeros(result, "fc1.weight"), Is.EqualTo(16));
        Assert.That(Zeros(result, "fc2.weight"), Is.EqualTo(6));
    }

    [TestCase("one-shot")]
    [TestCase("iterative")]
    [TestCase("gradual")]
    public void Apply_WithFineTuning_PrunedWeightsStayExactlyZero(string kind)
    {
        using var model = ModuleCloner.DeepClone(_model);
        IPruningSchedule schedule = kind switch
        {
            "one-shot" => new OneShotPruning(),
            "iterative" => new IterativePruning(3),
            _ => new GradualPruning(),
        };
        var options = new MagnitudePruningOptions
        {
            Sparsity = 0.6,
            Schedule = schedule,
            // Adam with weight decay would move every weight if the masks were not held.
            FineTuning = new TrainingOptions { Epochs = 3, BatchSize = 20, LearningRate = 0.01, Optimizer = OptimizerKind.AdamW, WeightDecay = 0.1 },
            SparseExecution = SparseExecution.Never,
        };
        var result = new MagnitudePruningStep(options).Apply(model, Context());
        Assert.That(Zeros(result, "fc1.weight"), Is.EqualTo(19)); // round(0.6 · 32)
        Assert.That(Zeros(result, "fc2.weight"), Is.EqualTo(14)); // round(0.6 · 24)
        var accuracy = new AccuracyEvaluator().Evaluate(result, _test).Value;
        Assert.That(accuracy, Is.GreaterThan(0.6));
    }

    [Test]
    public void FineTuning_AfterEveryOptimizerStep_PrunedWeightsAreZeroAndGotNoGradient()
    {
        // A schedule that is consulted after every optimizer step inspects the model at that moment.
        using var model = ModuleCloner.DeepClone(_model);
        var weight = model.named_parameters().Single(p => p.name == "fc1.weight").parameter;
        using var pruned = MagnitudeMasks.TopMagnitude(weight, 0.5).eq(0);
        var probe = new InspectingSchedule(() =>
        {
            using var scope = NewDisposeScope();
            return (weight.masked_select(pruned).abs().sum().item<float>(), weight.grad!.masked_select(pruned).abs().sum().item<float>());
        });
        var options = new MagnitudePruningOptions
        {
            Sparsity = 0.5,
            Schedule = probe,
            FineTuning = new TrainingOptions { Epochs = 2, BatchSize = 30, Optimizer = OptimizerKind.Sgd, LearningRate = 0.1, Momentum = 0.9 },
            SparseExecution = SparseExecution.Never,
        };
        new MagnitudePruningStep(options).Apply(model, Context());
        Assert.That(probe.Observations, Has.Count.EqualTo(2 * 20));
        Assert.That(probe.Observations.Select(o => o.Weights), Has.All.EqualTo(0f));
        Assert.That(probe.Observations.Select(o => o.Gradients), Has.All.EqualTo(0f));
    }

    [Test]
    public void Options_QualityWithGlobalScope_IsRejected()
    {
        var ex = Assert.Throws<OptionsValidationException>(() => new MagnitudePruningStep(new MagnitudePruningOptions { Quality = 1, Scope = PruningScope.Global }));
        Assert.That(ex!.Message, Does.Contain("Quality decides"));
    }

    /// <summary>A one-shot schedule that records, after every optimizer step, what <paramref name="inspect"/> sees.</summary>
    private sealed class InspectingSchedule(Func<(float Weights, float Gradients)> inspect) : IPruningSchedule
    {
        public List<(float Weights, float Gradients)> Observations { get; } = [];

        public int Rounds => 1;

        public bool RequiresFineTuning => false;

        public double RoundSparsity(int round, double finalSparsity) => finalSparsity;

        public double? SparsityDuringTraining(long step, long totalSteps, double finalSparsity)
        {
            Observations.Add(inspect());
            return null;
        }

        public IReadOnlyList<string> Validate() => [];
    }

    [Test]
    public void Masks_ZeroTheGradientsOfPrunedWeights()
    {
        using var layer = nn.Linear(4, 3);
        using var x = randn(5, 4);
        layer.call(x).sum().backward();
        using var masks = new MaskSet();
        masks.Add("w", layer.weight!, MagnitudeMasks.TopMagnitude(layer.weight!, 0.5));
        masks.ApplyToGradients();
        using var pruned = MagnitudeMasks.TopMagnitude(layer.weight!, 0.5).eq(0);
        Assert.That(layer.weight!.grad!.masked_select(pruned).abs().sum().item<float>(), Is.EqualTo(0f));
        Assert.That(layer.weight!.grad!.masked_select(pruned.logical_not()).abs().sum().item<float>(), Is.GreaterThan(0f));
    }

    [Test]
    public void Apply_TwoOfFour_EveryGroupHasTwoNonzeros()
    {
        using var model = ModuleCloner.DeepClone(_model);
        var options = new MagnitudePruningOptions { Pattern = NMPattern.TwoOfFour, SparseExecution = SparseExecution.Never, Layers = LayerSelection.Named("fc1") };
        var result = new MagnitudePruningStep(options).Apply(model, Context());
        var w = result.named_parameters().Single(p => p.name == "fc1.weight").parameter;
        using var counts = w.ne(0).reshape(8, 1, 4).sum(-1);
        Assert.That(counts.eq(2).all().item<bool>(), Is.True);
    }

    [Test]
    public void Apply_NOfMNotDividingALayer_ThrowsNamingItAndChangesNothing()
    {
        using var model = ModuleCloner.DeepClone(_model);
        string before = TestModels.StateHash(model);
        // fc2 has 8 inputs: 3 does not divide them.
        var options = new MagnitudePruningOptions { Pattern = new NMPattern(1, 3) };
        var ex = Assert.Throws<ArgumentException>(() => new MagnitudePruningStep(options).Apply(model, Context()));
        Assert.That(ex!.Message, Does.Contain("fc1").Or.Contain("fc2"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
    }

    [Test]
    public void Apply_UnknownLayerOrStrayOverride_ThrowsBeforeChanges()
    {
        using var model = ModuleCloner.DeepClone(_model);
        string before = TestModels.StateHash(model);
        Assert.Throws<ArgumentException>(() => new MagnitudePruningStep(new MagnitudePruningOptions { Layers = LayerSelection.Named("fc9") }).Apply(model, Context()));
        var stray = new MagnitudePruningOptions();
        stray.LayerSparsity["relu"] = 0.5;
        var ex = Assert.Throws<ArgumentException>(() => new MagnitudePruningStep(stray).Apply(model, Context()));
        Assert.That(ex!.Message, Does.Contain("relu"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
    }

    [Test]
    public void Options_InvalidValues_AreAllListed()
    {
        var options = new MagnitudePruningOptions
        {
            Sparsity = 1.0,
            Pattern = new NMPattern(5, 4),
            Schedule = new GradualPruning(),
            Quality = -1,
        };
        options.LayerSparsity["fc1"] = -0.2;
        var ex = Assert.Throws<OptionsValidationException>(() => new MagnitudePruningStep(options));
        Assert.That(ex!.OptionsType, Is.EqualTo(nameof(MagnitudePruningOptions)));
        Assert.That(ex.Message, Does.Contain("Sparsity must be in [0, 1)").And.Contain("N < M").And.Contain("one-shot")
            .And.Contain("Quality must be positive").And.Contain("LayerSparsity['fc1']").And.Contain("needs FineTuning"));
    }

    [TestCase(-0.1)]
    [TestCase(1.0)]
    [TestCase(double.NaN)]
    public void AddMagnitudePruning_SparsityOutsideRange_Throws(double sparsity)
    {
        Assert.Throws<OptionsValidationException>(() => CompressionPipeline.Create().AddMagnitudePruning(sparsity));
    }

    [Test]
    public void Apply_SparseExecutionAlways_GivesSparseLayersWithTheSameOutputs()
    {
        using var model = ModuleCloner.DeepClone(_model);
        using var x = randn(7, 4);
        var options = new MagnitudePruningOptions { Sparsity = 0.5, SparseExecution = SparseExecution.Always };
        var context = Context();
        var result = new MagnitudePruningStep(options).Apply(model, context);
        var dense = ModuleCloner.DeepClone(_model);
        new MagnitudePruningStep(new MagnitudePruningOptions { Sparsity = 0.5, SparseExecution = SparseExecution.Never }).Apply(dense, Context());
        Assert.That(result.modules().OfType<SparseLinear>().Count(), Is.EqualTo(2));
        Assert.That(result.modules().OfType<Linear>(), Is.Empty);
        Assert.That(TestModels.Output(result, x), Is.EqualTo(TestModels.Output(dense, x)).Within(1e-5));
        Assert.That(context.Notes, Has.Some.Contains("sparse kernel for fc1, fc2"));
        dense.Dispose();
        result.Dispose();
    }

    [Test]
    public void Apply_WithoutFineTuning_LeavesNoLiveTensors()
    {
        using var model = ModuleCloner.DeepClone(_model);
        var step = new MagnitudePruningStep(new MagnitudePruningOptions
        {
            Sparsity = 0.5,
            Schedule = new IterativePruning(2),
            FineTuning = new TrainingOptions { Epochs = 1, BatchSize = 50 },
            SparseExecution = SparseExecution.Never,
        });
        var context = Context();
        step.Apply(model, context); // warm-up
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long before = TestModels.SettledTensorCount();
        step.Apply(model, context);
        Assert.That(Tensor.TotalCount, Is.EqualTo(before));
    }

    /// <summary>
    /// fc1 32→64 and fc2 64→32 with ordinary weights, and "tiny" 50→10 whose 500 weights are all a thousand times
    /// smaller: one global threshold at 50% takes every one of them.
    /// </summary>
    private static nn.Module<Tensor, Tensor> ModelWithATinyLayer()
    {
        manual_seed(21);
        var tiny = nn.Linear(50, 10);
        using (no_grad())
        {
            tiny.weight!.mul_(1e-3);
        }

        return nn.Sequential(("fc1", nn.Linear(32, 64)), ("fc2", nn.Linear(64, 32)), ("tiny", tiny));
    }

    private static long NonZero(nn.Module model, string name)
    {
        using var nz = model.named_parameters().Single(p => p.name == name).parameter.count_nonzero();
        return nz.item<long>();
    }

    [Test]
    public void Apply_GlobalWithALayerOfTinyWeights_TheFloorKeepsItsLargestWeightsAndTheSparsityHolds()
    {
        using var model = ModelWithATinyLayer();
        var tinyBefore = ((Tensor)model.state_dict()["tiny.weight"]).detach().abs().flatten().clone();
        var logger = new CapturingLogger();
        var context = new CompressionContext(new CompressionData(_train, _test), model, logger: logger);
        var options = new MagnitudePruningOptions { Sparsity = 0.5, Scope = PruningScope.Global, SparseExecution = SparseExecution.Never };
        Assert.That(options.MinLayerKeptFraction, Is.EqualTo(0.02), "the default floor");

        var result = new MagnitudePruningStep(options).Apply(model, context);

        // 4,596 weights, 2,298 pruned; tiny keeps ⌈0.02 · 500⌉ = 10, and the others give up those 10 instead.
        Assert.That(NonZero(result, "tiny.weight"), Is.EqualTo(10));
        Assert.That(NonZero(result, "fc1.weight") + NonZero(result, "fc2.weight") + NonZero(result, "tiny.weight"), Is.EqualTo(2298));
        using var kept = ((Tensor)result.state_dict()["tiny.weight"]).flatten().nonzero().flatten();
        using var largest = tinyBefore.topk(10).indexes.sort().Values;
        Assert.That(kept.data<long>().ToArray(), Is.EqualTo(largest.data<long>().ToArray()), "the floor keeps the layer's largest-magnitude weights");
        var warning = logger.Entries.Single(e => e.Level == Microsoft.Extensions.Logging.LogLevel.Warning);
        Assert.That(warning.Message, Does.Contain("tiny").And.Contain("0.0%").And.Contain("2.0%"));
        Assert.That(context.Notes, Has.Some.Contains("per-layer floor").And.Contains("tiny 0.0%"));
        tinyBefore.Dispose();
    }

    [Test]
    public void Apply_GlobalWithTheFloorOff_RemovesTheTinyLayerAsBefore()
    {
        using var model = ModelWithATinyLayer();
        var logger = new CapturingLogger();
        var context = new CompressionContext(new CompressionData(_train, _test), model, logger: logger);
        var options = new MagnitudePruningOptions { Sparsity = 0.5, Scope = PruningScope.Global, MinLayerKeptFraction = 0, SparseExecution = SparseExecution.Never };

        var result = new MagnitudePruningStep(options).Apply(model, context);

        Assert.That(NonZero(result, "tiny.weight"), Is.Zero);
        Assert.That(NonZero(result, "fc1.weight") + NonZero(result, "fc2.weight"), Is.EqualTo(2298));
        Assert.That(logger.Entries.Where(e => e.Level == Microsoft.Extensions.Logging.LogLevel.Warning), Is.Empty);
        Assert.That(context.Notes, Has.None.Contains("per-layer floor"));
    }

    [Test]
    public void GlobalMasks_ALayerPushedUnderItsFloorByAnotherLayersFloor_IsHeldToo()
    {
        // c: 1000 weights 1 + j/999; b: six at 1.885 (just above the 50% threshold) and 94 at 1e-3; a: 100 at 1e-4.
        // Keep 120 of 1200: the threshold alone keeps 115 of c, 5 of b (its floor, 5%) and none of a. Holding a at 5
        // leaves 115 for b and c, which c's 115 weights above 1.885 take: b falls to 0 and is held at 5 as well.
        using var c = linspace(1, 2, 1000).reshape(10, 100);
        var bValues = Enumerable.Repeat(1e-3f, 100).ToArray();
        Array.Fill(bValues, 1.885f, 0, 6);
        using var b = tensor(bValues).reshape(10, 10);
        using var a = full(10, 10, 1e-4f);

        var (masks, floored) = ModelCompression.Pruning.MagnitudeMasks.GlobalWithFloor([a, b, c], 0.9, 0.05);

        Assert.That(masks.Select(m => m.count_nonzero().item<long>()), Is.EqualTo(new long[] { 5, 5, 110 }));
        Assert.That(floored, Is.EqualTo(new double?[] { 0.0, 0.0, null }));
        Assert.That(masks[1].flatten().narrow(0, 0, 6).sum().item<float>(), Is.EqualTo(5f), "b keeps five of its six large weights");
        var (plain, none) = ModelCompression.Pruning.MagnitudeMasks.GlobalWithFloor([a, b, c], 0.9, 0.0);
        Assert.That(plain.Select(m => m.count_nonzero().item<long>()), Is.EqualTo(new long[] { 0, 5, 115 }));
        Assert.That(none, Is.All.Null);
        masks.Concat(plain).ToList().ForEach(m => m.Dispose());
    }

    [TestCase(-0.01)]
    [TestCase(1.0)]
    [TestCase(double.NaN)]
    public void Options_FloorOutOfRange_IsRejected(double floor)
    {
        var ex = Assert.Throws<OptionsValidationException>(() => new MagnitudePruningStep(new MagnitudePruningOptions { MinLayerKeptFraction = floor }));
        Assert.That(ex!.Errors, Has.Count.EqualTo(1).And.Some.Contains("MinLayerKeptFraction").And.Some.Contains("[0, 1)"));
    }

    [Test]
    public void Options_GlobalFloorAboveTheKeptFraction_IsRejectedAndLayerWiseIgnoresIt()
    {
        // 99% global keeps 1% overall: a 2% floor on every layer could not meet it.
        var ex = Assert.Throws<OptionsValidationException>(() => new MagnitudePruningStep(new MagnitudePruningOptions { Sparsity = 0.99, Scope = PruningScope.Global }));
        Assert.That(ex!.Errors, Has.Count.EqualTo(1).And.Some.Contains("MinLayerKeptFraction (0.02)").And.Some.Contains("0.01"));
        Assert.That(new MagnitudePruningOptions { Sparsity = 0.99, Scope = PruningScope.Global, MinLayerKeptFraction = 0.01 }.Validate(), Is.Empty);
        Assert.That(new MagnitudePruningOptions { Sparsity = 0.99 }.Validate(), Is.Empty);
    }


    [Test]
    public void Apply_SparseChosenForALayerInAFieldTypedLinear_KeepsItDenseWithZerosAndWarns()
    {
        using var original = new FixedTypeNet(13);
        using var model = ModuleCloner.DeepClone(original);
        using var data = new TensorDataset(randn(4, 1, 12, 12), zeros(4, dtype: int64));
        var logger = new CapturingLogger();
        var context = new CompressionContext(new CompressionData(data, data), original, logger: logger);
        long fcBefore = ModelCompression.Metrics.ModelMetrics.Measure(original, FixedTypeNet.SampleShape).Layers.Single(l => l.Name == "fc").SizeBytes!.Value;

        var options = new MagnitudePruningOptions { Sparsity = 0.9, Scope = PruningScope.LayerWise, SparseExecution = SparseExecution.Always };
        var result = new MagnitudePruningStep(options).Apply(model, context);

        Assert.That(ModuleTree.GetSubmodule(result, "fc"), Is.TypeOf<Linear>());
        Assert.That(ModuleTree.GetSubmodule(result, "head"), Is.TypeOf<SparseLinear>());
        using var fcWeight = result.state_dict()["fc.weight"];
        Assert.That(fcWeight.count_nonzero().item<long>(), Is.EqualTo(5_120));
        // 10% of the weights kept: positions and float32 values, about a fifth of the dense bytes.
        long fcAfter = ModelCompression.Metrics.ModelMetrics.Measure(result, FixedTypeNet.SampleShape).Layers.Single(l => l.Name == "fc").SizeBytes!.Value;
        TestContext.Out.WriteLine($"fc {fcBefore} → {fcAfter} bytes");
        Assert.That(fcAfter, Is.LessThan(fcBefore / 4));
        Assert.That(context.Notes, Has.One.Contains("kept dense").And.Contains("fc (the field FixedTypeNet.fc"));
        Assert.That(logger.Warnings, Has.One.Contains("kept dense"));
    }
}
