using ModelCompression.Factorization;
using ModelCompression.Modules;
using ModelCompression.Samples;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;
using Conv2d = TorchSharp.Modules.Conv2d;
using Linear = TorchSharp.Modules.Linear;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace ModelCompression.Tests.Factorization;

[TestFixture]
public sealed class SvdFactorizationStepTests
{
    private static CompressionContext Context(nn.Module<Tensor, Tensor> model, params long[] sampleShape)
    {
        var data = new TensorDataset(randn([32, .. sampleShape]), randint(0, 3, [32], dtype: int64));
        return new CompressionContext(new CompressionData(data, data), model);
    }

    private static void AssertClose(Tensor actual, Tensor expected, double relative = 1e-5)
    {
        double scale = Math.Max(1e-6, expected.abs().max().item<float>());
        Assert.That((actual - expected).abs().max().item<float>() / scale, Is.LessThan(relative));
    }

    [Test]
    public void FullRankLinear_ReproducesTheLayer()
    {
        torch.random.manual_seed(1);
        using var linear = nn.Linear(20, 12);
        using var low = LowRankLinear.FromLinear(linear, 12);
        using var x = randn(5, 20);
        using var noGrad = no_grad();
        AssertClose(low.call(x), linear.call(x));
        Assert.That(low.Rank, Is.EqualTo(12));
    }

    [TestCase(ConvDecomposition.Channel, 1, 1)]
    [TestCase(ConvDecomposition.Channel, 2, 0)]
    [TestCase(ConvDecomposition.Spatial, 1, 1)]
    [TestCase(ConvDecomposition.Spatial, 2, 1)]
    public void FullRankConv_ReproducesTheLayer(ConvDecomposition decomposition, long stride, long padding)
    {
        torch.random.manual_seed(2);
        using var conv = nn.Conv2d(3, 5, 3, stride: stride, padding: padding);
        var w = conv.weight!;
        int full = decomposition == ConvDecomposition.Channel
            ? (int)Math.Min(w.shape[0], w.shape[1] * 9)
            : (int)Math.Min(w.shape[1] * 3, w.shape[0] * 3);
        using var low = LowRankConv2d.FromConv2d(conv, full, decomposition);
        using var x = randn(2, 3, 9, 9);
        using var noGrad = no_grad();
        using var expected = conv.call(x);
        using var actual = low.call(x);
        Assert.That(actual.shape, Is.EqualTo(expected.shape));
        AssertClose(actual, expected);
    }

    [Test]
    public void ReconstructionError_IsTheSquareRootOfTheDiscardedEnergy()
    {
        torch.random.manual_seed(3);
        using var linear = nn.Linear(30, 20);
        using var low = LowRankLinear.FromLinear(linear, 5);
        using var noGrad = no_grad();
        var factors = low.named_parameters().Where(p => p.name.EndsWith("weight", StringComparison.Ordinal)).Select(p => p.parameter.to(float64)).ToList();
        using var rebuilt = factors[1].matmul(factors[0]);
        using var weight = linear.weight!.to(float64);
        using var s = linalg.svdvals(weight);
        double discarded = Math.Sqrt(s.narrow(0, 5, 15).pow(2).sum().item<double>());
        double error = (weight - rebuilt).pow(2).sum().sqrt().item<double>();
        Assert.That(error, Is.EqualTo(discarded).Within(1e-4 * discarded));
    }

    [TestCase(0.80, 2)]
    [TestCase(0.84, 3)]
    [TestCase(1.00, 4)]
    [TestCase(0.50, 1)]
    public void EnergyRule_PicksTheSmallestRankKeepingTheFraction(double fraction, int expected)
    {
        // σ = 4, 3, 2, 1: energy 16, 9, 4, 1 of 30; 0.8 needs 24 → 16 + 9 = 25 (rank 2); 0.84 needs 25.2 → rank 3.
        var shape = new LowRankShape(4, 4, 8, 16, 1);
        Assert.That(RankRule.Energy(fraction).Choose([4, 3, 2, 1], shape), Is.EqualTo(expected));
    }

    [Test]
    public void EnergyRule_OnAMatrixWithKnownSingularValues()
    {
        // W = Q1 · diag(5, 4, 3, 0.1) · Q2ᵀ: keeping 99% of the energy needs the first three.
        torch.random.manual_seed(4);
        using var scope = NewDisposeScope();
        var (q1, _) = linalg.qr(randn(6, 4, dtype: float64));
        var (q2, _) = linalg.qr(randn(8, 4, dtype: float64));
        var w = q1.matmul(diag(tensor(new double[] { 5, 4, 3, 0.1 }))).matmul(q2.t()).to(float32);
        using var model = nn.Sequential(("fc", nn.Linear(8, 6)));
        using (no_grad())
        {
            ((Linear)ModuleTree.GetSubmodule(model, "fc")).weight!.copy_(w);
        }

        var context = Context(model, 8);
        var result = new SvdFactorizationStep(new SvdFactorizationOptions { Rank = RankRule.Energy(0.99) }).Apply(ModuleCloner.DeepClone(model), context);
        // Rank 3 stores 3 · 14 = 42 < 48: factorized.
        Assert.That(((LowRankLinear)ModuleTree.GetSubmodule(result, "fc")).Rank, Is.EqualTo(3));
    }

    [Test]
    public void Budget_IsMetAcrossLayers()
    {
        using var model = ModelZoo.Create(ZooModel.LeNet300100, 5);
        var options = new SvdFactorizationOptions { Budget = new RankBudget { Fraction = 0.25 } };
        var result = new SvdFactorizationStep(options).Apply(ModuleCloner.DeepClone(model), Context(model, 784));
        long weights = 0;
        foreach (var name in new[] { "fc1", "fc2", "fc3" })
        {
            weights += ModuleTree.GetSubmodule(result, name) switch
            {
                LowRankLinear low => (long)low.Rank!.Value * (low.InFeatures + low.OutFeatures),
                Linear dense => dense.weight!.numel(),
                _ => throw new AssertionException(name),
            };
        }

        Assert.That(weights, Is.LessThanOrEqualTo(266_200 / 4));
        Assert.That(weights, Is.GreaterThan(266_200 / 4 - 1100), "the allocator stops as soon as the budget is met");
    }

    [Test]
    public void Budget_BySensitivity_IsMet()
    {
        var (model, train, test) = TestModels.TrainedMlp(seed: 6);
        using (model)
        using (train)
        using (test)
        {
            // Layers of full rank 4 and 3: the default floor (rank 4) would keep both dense. This test is about the
            // allocation meeting the budget, so the floors are off.
            var options = new SvdFactorizationOptions { Budget = new RankBudget { Fraction = 0.7, Allocation = RankAllocation.Sensitivity, MinRank = 1, MinRankFraction = 0 } };
            var context = new CompressionContext(new CompressionData(train, test), model);
            var result = new SvdFactorizationStep(options).Apply(ModuleCloner.DeepClone(model), context);
            long weights = result.modules().Sum(m => m switch
            {
                LowRankLinear low => (long)low.Rank!.Value * (low.InFeatures + low.OutFeatures),
                Linear dense when !IsInsideLowRank(result, dense) => dense.weight!.numel(),
                _ => 0L,
            });
            Assert.That(weights, Is.LessThanOrEqualTo((long)(0.7 * ((4 * 8) + (8 * 3)))));
        }
    }

    private static bool IsInsideLowRank(nn.Module root, nn.Module module) =>
        root.modules().OfType<LowRankLinear>().Any(l => l.modules().Contains(module));

    [Test]
    public void UnreachableBudget_ThrowsBeforeAnyChange()
    {
        using var model = TestModels.Mlp(7);
        string before = TestModels.StateHash(model);
        var options = new SvdFactorizationOptions { Budget = new RankBudget { Fraction = 0.01 } };
        var ex = Assert.Throws<ArgumentException>(() => new SvdFactorizationStep(options).Apply(model, Context(model, 4)));
        Assert.That(ex!.Message, Does.Contain("cannot be met"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
    }

    [Test]
    public void NoGainRule_LeavesTheLayerAloneAndSaysSo()
    {
        // fc1 is 4 → 8: rank 3 would store 3 · 12 = 36 ≥ 32 parameters.
        using var model = TestModels.Mlp(8);
        var context = Context(model, 4);
        var result = new SvdFactorizationStep(new SvdFactorizationOptions { Rank = RankRule.Fixed(3), Layers = LayerSelection.Named("fc1") }).Apply(model, context);
        Assert.That(ModuleTree.GetSubmodule(result, "fc1"), Is.InstanceOf<Linear>());
        Assert.That(context.Notes, Has.Some.Contains("no gain").And.Some.Contains("fc1"));
    }

    [Test]
    public void Options_InvalidValues_AreAllListed()
    {
        Assert.That(new SvdFactorizationOptions().Validate(), Has.Some.Contains("exactly one"));
        Assert.That(new SvdFactorizationOptions { Rank = RankRule.Fixed(2), Budget = new RankBudget() }.Validate(), Has.Some.Contains("exactly one"));
        foreach (var bad in new[] { RankRule.Fixed(0), RankRule.Ratio(0), RankRule.Ratio(1.5), RankRule.Energy(0), RankRule.Energy(1.01), RankRule.Reduction(1) })
        {
            Assert.Throws<OptionsValidationException>(() => new SvdFactorizationStep(new SvdFactorizationOptions { Rank = bad }), bad.ToString() ?? string.Empty);
        }

        var ex = Assert.Throws<OptionsValidationException>(() => CompressionPipeline.Create().AddSvdFactorization(new SvdFactorizationOptions
        {
            Budget = new RankBudget { Fraction = 1.5, Kind = (BudgetKind)9 },
        }));
        Assert.That(ex!.Errors, Has.Count.EqualTo(2));
        Assert.Throws<OptionsValidationException>(() => CompressionPipeline.Create().AddSvdFactorization(energy: 0));
    }

    [Test]
    public void Apply_WhenNothingIsReplaced_LeavesNoLiveTensors()
    {
        using var model = TestModels.Mlp(9);
        var context = Context(model, 4);
        var step = new SvdFactorizationStep(new SvdFactorizationOptions { Rank = RankRule.Fixed(3) });
        step.Apply(model, context); // warm-up
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long before = TestModels.SettledTensorCount();
        step.Apply(model, context);
        Assert.Throws<ArgumentException>(() => new SvdFactorizationStep(new SvdFactorizationOptions { Budget = new RankBudget { Fraction = 0.01 } }).Apply(model, context));
        Assert.That(Tensor.TotalCount, Is.EqualTo(before));
    }

    [Test]
    public void Metrics_ReportRankParametersAndMacs()
    {
        torch.random.manual_seed(10);
        using var model = nn.Sequential(("fc", nn.Linear(50, 40)));
        var result = new SvdFactorizationStep(new SvdFactorizationOptions { Rank = RankRule.Fixed(5) }).Apply(model, Context(model, 50));
        var layers = ModelCompression.Metrics.ModelMetrics.Measure(result, [50]).Layers;
        var fc = layers.Single();
        Assert.That((fc.Name, fc.Rank, fc.Parameters, fc.Macs), Is.EqualTo(("fc", (int?)5, 5L * 90 + 40, 5L * 90)));
    }

    /// <summary>
    /// fc1: a random 64→64 layer; fc2: 64→48 of rank 1 plus noise 1e-4, so dropping all but one singular value costs
    /// it almost no energy and the energy-per-parameter allocation takes it to rank 1 first.
    /// </summary>
    private static nn.Module<Tensor, Tensor> ModelWithANearlyRankOneLayer()
    {
        manual_seed(31);
        var fc2 = nn.Linear(64, 48);
        using (no_grad())
        {
            fc2.weight!.copy_(outer(randn(48), randn(64)) + (1e-4 * randn(48, 64)));
        }

        return nn.Sequential(("fc1", nn.Linear(64, 64)), ("fc2", fc2));
    }

    private static long Rank(nn.Module<Tensor, Tensor> model, string name) => ((LowRankLinear)ModuleTree.GetSubmodule(model, name)).Rank!.Value;

    private static long Stored(nn.Module<Tensor, Tensor> model) =>
        new[] { "fc1", "fc2" }.Sum(n => ModuleTree.GetSubmodule(model, n) is LowRankLinear low ? (long)low.Rank!.Value * (low.InFeatures + low.OutFeatures) : 64L * (n == "fc1" ? 64 : 48));

    [Test]
    public void Budget_NeverGoesBelowTheMinimumRank_AndSaysWhichLayersItHeld()
    {
        using var model = ModelWithANearlyRankOneLayer();
        var logger = new CapturingLogger();
        var context = new CompressionContext(new CompressionData(null, new TensorDataset(randn(8, 64), zeros(8, dtype: int64))), model, logger: logger);
        var budget = new RankBudget { Fraction = 0.3 };
        Assert.That((budget.MinRank, budget.MinRankFraction), Is.EqualTo((4, 0.05)), "the defaults");

        var result = new SvdFactorizationStep(new SvdFactorizationOptions { Budget = budget }).Apply(ModuleCloner.DeepClone(model), context);

        // fc2's floor: max(4, ⌈0.05 · 48⌉ = 3) = 4; fc1's: max(4, ⌈0.05 · 64⌉ = 4) = 4. Dense: 4096 + 3072 = 7168.
        Assert.That(Rank(result, "fc2"), Is.EqualTo(4));
        Assert.That(Rank(result, "fc1"), Is.GreaterThanOrEqualTo(4));
        Assert.That(Stored(result), Is.LessThanOrEqualTo((long)(0.3 * 7168)).And.GreaterThan((long)(0.3 * 7168) - 128), "the budget is still met, one rank of fc1 at most below it");
        var warning = logger.Entries.Single(e => e.Level == Microsoft.Extensions.Logging.LogLevel.Warning);
        Assert.That(warning.Message, Does.Contain("fc2").And.Contain("minimum rank 4 of 48"));
        Assert.That(context.Notes, Has.Some.Contains("held at the minimum rank").And.Contains("fc2 rank 4 of 48"));
    }

    [Test]
    public void Budget_WithTheFloorsOff_TakesTheLayerToRankOne()
    {
        using var model = ModelWithANearlyRankOneLayer();
        var context = Context(model, 64);
        var options = new SvdFactorizationOptions { Budget = new RankBudget { Fraction = 0.3, MinRank = 1, MinRankFraction = 0 } };

        var result = new SvdFactorizationStep(options).Apply(ModuleCloner.DeepClone(model), context);

        Assert.That(Rank(result, "fc2"), Is.EqualTo(1));
        Assert.That(context.Notes, Has.None.Contains("held at the minimum rank"));
    }

    [TestCase(RankAllocation.EnergyPerCost)]
    [TestCase(RankAllocation.Sensitivity)]
    public void Budget_MinRankFraction_FloorsEachLayerAtItsShareOfTheFullRank(RankAllocation allocation)
    {
        using var model = ModelWithANearlyRankOneLayer();
        var context = Context(model, 64);
        // fc2: ⌈0.25 · 48⌉ = 12 (1,344 parameters); fc1: ⌈0.25 · 64⌉ = 16 (2,048). 0.55 of 7168 = 3,942 leaves fc1 room
        // above its floor.
        var options = new SvdFactorizationOptions { Budget = new RankBudget { Fraction = 0.55, MinRank = 1, MinRankFraction = 0.25, Allocation = allocation } };

        var result = new SvdFactorizationStep(options).Apply(ModuleCloner.DeepClone(model), context);

        Assert.That(Rank(result, "fc2"), Is.GreaterThanOrEqualTo(12));
        Assert.That(Rank(result, "fc1"), Is.GreaterThanOrEqualTo(16));
        Assert.That(Stored(result), Is.LessThanOrEqualTo((long)(0.55 * 7168)));
        if (allocation == RankAllocation.EnergyPerCost)
        {
            // Energy takes the nearly rank-1 fc2 to its floor, and fc1 to the largest rank that fits: 20 · 128 + 1,344 = 3,904.
            Assert.That((Rank(result, "fc2"), Rank(result, "fc1")), Is.EqualTo((12L, 20L)));
        }
    }

    [Test]
    public void Budget_TheFloorsCannotMeet_ThrowsNamingThemBeforeAnyChange()
    {
        using var model = ModelWithANearlyRankOneLayer();
        string before = TestModels.StateHash(model);
        // At rank 16 and 12 the layers keep 2048 + 1344 = 3392 > 0.3 · 7168.
        var options = new SvdFactorizationOptions { Budget = new RankBudget { Fraction = 0.3, MinRank = 1, MinRankFraction = 0.25 } };
        var ex = Assert.Throws<ArgumentException>(() => new SvdFactorizationStep(options).Apply(model, Context(model, 64)));
        Assert.That(ex!.Message, Does.Contain("cannot be met").And.Contain("MinRank").And.Contain("MinRankFraction"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
    }

    [Test]
    public void Options_MinimumRankOutOfRange_AreAllListed()
    {
        var ex = Assert.Throws<OptionsValidationException>(() => new SvdFactorizationStep(new SvdFactorizationOptions
        {
            Budget = new RankBudget { MinRank = 0, MinRankFraction = 1.5 },
        }));
        Assert.That(ex!.Errors, Has.Count.EqualTo(2));
        Assert.That(ex.Errors, Has.Some.Contains("MinRank must be at least 1 (was 0)"));
        Assert.That(ex.Errors, Has.Some.Contains("MinRankFraction must be in [0, 1] (was 1.5)"));
        Assert.Throws<OptionsValidationException>(() => new SvdFactorizationStep(new SvdFactorizationOptions { Budget = new RankBudget { MinRankFraction = double.NaN } }));
        Assert.That(new SvdFactorizationOptions { Budget = new RankBudget { MinRank = 1, MinRankFraction = 0 } }.Validate(), Is.Empty);
    }


    [Test]
    public void Apply_LayersInFieldsTypedLinearAndConv2d_AreLeftAndNoted()
    {
        using var original = new FixedTypeNet(8);
        using var model = ModuleCloner.DeepClone(original);
        using var data = new TensorDataset(randn(4, 1, 12, 12), zeros(4, dtype: int64));
        var logger = new CapturingLogger();
        var context = new CompressionContext(new CompressionData(data, data), original, logger: logger);

        var result = new SvdFactorizationStep(new SvdFactorizationOptions { Rank = RankRule.Fixed(4) }).Apply(model, context);

        Assert.That(ModuleTree.GetSubmodule(result, "head"), Is.TypeOf<LowRankLinear>());
        Assert.That(ModuleTree.GetSubmodule(result, "fc"), Is.TypeOf<Linear>());
        foreach (var name in new[] { "fc", "conv" })
        {
            Assert.That(TestModels.StateHash(ModuleTree.GetSubmodule(result, name)), Is.EqualTo(TestModels.StateHash(ModuleTree.GetSubmodule(original, name))), name);
        }

        Assert.That(context.Notes, Has.One.Contains("ranks: head rank 4 of 10"));
        Assert.That(context.Notes, Has.One.Contains("left as they are").And.Contains("'fc' (the field FixedTypeNet.fc").And.Contains("'conv'"));
        Assert.That(logger.Entries.Where(e => e.Level == Microsoft.Extensions.Logging.LogLevel.Warning).Select(e => e.Message), Has.One.Contains("'fc'"));
    }

    [Test]
    public void Apply_OnlyFixedTypeLayersSelected_ReturnsTheModelWithANote()
    {
        using var original = new FixedTypeNet(9);
        using var model = ModuleCloner.DeepClone(original);
        string before = TestModels.StateHash(model);
        using var data = new TensorDataset(randn(4, 1, 12, 12), zeros(4, dtype: int64));
        var context = new CompressionContext(new CompressionData(data, data), original);
        var options = new SvdFactorizationOptions { Budget = new RankBudget { Fraction = 0.5 }, Layers = LayerSelection.Named("fc") };

        var result = new SvdFactorizationStep(options).Apply(model, context);

        Assert.That(result, Is.SameAs(model));
        Assert.That(TestModels.StateHash(result), Is.EqualTo(before));
        Assert.That(context.Notes, Has.One.Contains("'fc'").And.Contains("the budget covers the other layers"));
    }

    [Test]
    public void Apply_FixedTypeLayersFail_ThrowsBeforeAnyChange()
    {
        using var original = new FixedTypeNet(10);
        using var model = ModuleCloner.DeepClone(original);
        string before = TestModels.StateHash(model);
        using var data = new TensorDataset(randn(4, 1, 12, 12), zeros(4, dtype: int64));
        var context = new CompressionContext(new CompressionData(data, data), original);
        var step = new SvdFactorizationStep(new SvdFactorizationOptions { Rank = RankRule.Fixed(4), FixedTypeLayers = FixedTypeLayers.Fail });

        var ex = Assert.Throws<UnsupportedModelException>(() => step.Apply(model, context));

        Assert.That(ex!.LayerName, Is.EqualTo("conv"));
        Assert.That(ex.Message, Does.Contain("LowRankConv2d").And.Contain("'fc'").And.Contain("LowRankLinear"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
        Assert.That(ModuleTree.GetSubmodule(model, "head"), Is.TypeOf<Linear>());
    }
}
