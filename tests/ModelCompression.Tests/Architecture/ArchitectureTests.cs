using ModelCompression.Architecture;
using ModelCompression.Metrics;
using ModelCompression.Modules;
using ModelCompression.Samples;
using ModelCompression.Tests.Support;
using ModelCompression.Training;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;
using Conv2d = TorchSharp.Modules.Conv2d;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace ModelCompression.Tests.Architecture;

[TestFixture]
public sealed class ArchitectureTests
{
    [Test]
    public void DepthwiseSeparable_ShapesParametersAndMacs()
    {
        // 8 → 16, 3×3, BatchNorm: depthwise 8·9 = 72, BN 2·8, pointwise 8·16 = 128, BN 2·16.
        using var block = new DepthwiseSeparableConv2d(8, 16, 3);
        using var x = randn(2, 8, 10, 10);
        using var y = block.call(x);
        Assert.That(y.shape, Is.EqualTo(new long[] { 2, 16, 10, 10 }));
        Assert.That(ModelMetrics.CountParameters(block), Is.EqualTo(72 + 16 + 128 + 32));
        using var one = randn(1, 8, 10, 10);
        Assert.That(ModelMetrics.CountMacs(block, one), Is.EqualTo((100 * 8 * 9) + (100 * 8 * 16)));
    }

    [Test]
    public void InvertedResidual_ShapesParametersAndResidual()
    {
        // 16 → 16, t = 4, stride 1: expand 16·64 + BN 128, depthwise 64·9 + BN 128, project 64·16 + BN 32.
        using var block = new InvertedResidual(16, 16, stride: 1, expansion: 4);
        Assert.That(block.UsesResidual, Is.True);
        Assert.That(ModelMetrics.CountParameters(block), Is.EqualTo((16 * 64) + 128 + (64 * 9) + 128 + (64 * 16) + 32));
        using var x = randn(2, 16, 7, 7);
        Assert.That(block.call(x).shape, Is.EqualTo(new long[] { 2, 16, 7, 7 }));

        using var strided = new InvertedResidual(16, 24, stride: 2, expansion: 4, squeezeExcitation: 0.25);
        Assert.That(strided.UsesResidual, Is.False);
        Assert.That(strided.call(x).shape, Is.EqualTo(new long[] { 2, 24, 4, 4 }));
    }

    [Test]
    public void MobileNet_RunsOnDigitsAndScalesWithItsMultipliers()
    {
        using var small = MobileNet.Create(widthMultiplier: 0.5, depthMultiplier: 0.5);
        using var large = MobileNet.Create(widthMultiplier: 1, depthMultiplier: 1);
        using var x = randn(2, 1, 28, 28);
        Assert.That(small.call(x).shape, Is.EqualTo(new long[] { 2, 10 }));
        Assert.That(large.call(x).shape, Is.EqualTo(new long[] { 2, 10 }));
        Assert.That(ModelMetrics.CountParameters(small), Is.LessThan(ModelMetrics.CountParameters(large) / 2));
    }

    [Test]
    public void Rewrite_RankOneInitialisation_IsExactForARankOneKernel()
    {
        // W[o, i, y, x] = a[o, i] · k[i, y, x]: every input channel's out × k² slice has rank 1.
        torch.random.manual_seed(1);
        using var conv = nn.Conv2d(3, 5, 3, padding: 1);
        using (no_grad())
        {
            using var a = randn(5, 3, 1, 1);
            using var k = randn(1, 3, 3, 3);
            conv.weight!.copy_(a * k);
        }

        var (block, error) = DepthwiseSeparableRewriteStep.Rewrite(conv);
        using (block)
        {
            Assert.That(error, Is.LessThan(1e-6));
            using var x = randn(2, 3, 8, 8);
            using var noGrad = no_grad();
            using var expected = conv.call(x);
            using var actual = block.call(x);
            Assert.That(actual.allclose(expected, rtol: 1e-4, atol: 1e-5), Is.True);
        }
    }

    [Test]
    public void Rewrite_LeavesUnselectedLayersBitIdenticalAndCutsMacs()
    {
        using var model = ModelZoo.Create(ZooModel.LeNet5, 2);
        using var data = new TensorDataset(randn(8, 1, 28, 28), randint(0, 10, [8], dtype: int64));
        var context = new CompressionContext(new CompressionData(data, data), model);
        var untouched = new[] { "conv1", "fc1", "fc2", "fc3" }.ToDictionary(n => n, n => TestModels.StateHash(ModuleTree.GetSubmodule(model, n)));
        var step = new DepthwiseSeparableRewriteStep(new DepthwiseSeparableRewriteOptions { Layers = LayerSelection.Named("conv2") });
        var result = step.Apply(ModuleCloner.DeepClone(model), context);

        Assert.That(ModuleTree.GetSubmodule(result, "conv2"), Is.InstanceOf<DepthwiseSeparableConv2d>());
        foreach (var (name, hash) in untouched)
        {
            Assert.That(TestModels.StateHash(ModuleTree.GetSubmodule(result, name)), Is.EqualTo(hash), name);
        }

        using var x = zeros(1, 1, 28, 28);
        var before = ModelMetrics.CountMacsPerLayer(model, x)["conv2"];
        var after = ModelMetrics.CountMacsPerLayer(result, x).Where(kv => kv.Key.StartsWith("conv2.", StringComparison.Ordinal)).Sum(kv => kv.Value);
        Assert.That((double)before / after, Is.GreaterThan(3));
        Assert.That(step.LastKernelErrors.Keys, Is.EqualTo(new[] { "conv2" }));
    }

    [Test]
    public void Rewrite_NothingToRewrite_Throws()
    {
        using var model = ModelZoo.LeNet300100();
        using var data = new TensorDataset(randn(4, 784), zeros(4, dtype: int64));
        var context = new CompressionContext(new CompressionData(data, data), model);
        Assert.Throws<ArgumentException>(() => new DepthwiseSeparableRewriteStep(new DepthwiseSeparableRewriteOptions()).Apply(model, context));
    }

    private static (nn.Module<Tensor, Tensor> Model, CompressionContext Context, TensorDataset Data) SearchSetup()
    {
        torch.random.manual_seed(3);
        var model = nn.Sequential(("fc1", nn.Linear(8, 32)), ("relu", nn.ReLU()), ("fc2", nn.Linear(32, 32)), ("relu2", nn.ReLU()), ("fc3", nn.Linear(32, 3)));
        using var scope = NewDisposeScope();
        var x = randn(120, 8);
        var data = new TensorDataset(x, x.narrow(1, 0, 3).argmax(1));
        return (model, new CompressionContext(new CompressionData(data, data), model), data);
    }

    [Test]
    public void Search_StopsAtTheBudget_WithAMonotoneTrace()
    {
        var (model, context, data) = SearchSetup();
        using (model)
        using (data)
        {
            var step = new BudgetedSearchStep(new BudgetedSearchOptions
            {
                Kind = SearchBudgetKind.Parameters,
                Fraction = 0.5,
                StepFraction = 0.2,
                ShortFineTuning = new TrainingOptions { Epochs = 1, BatchSize = 40 },
            });
            long before = ModelMetrics.CountParameters(model);
            using var result = step.Apply(ModuleCloner.DeepClone(model), context);
            Assert.That(step.LastMetBudget, Is.True);
            Assert.That(ModelMetrics.CountParameters(result), Is.LessThanOrEqualTo(before / 2));
            var chosen = step.LastTrace.Where(c => c.Chosen).Select(c => c.Cost).ToList();
            Assert.That(chosen, Is.Ordered.Descending);
            Assert.That(chosen.Count, Is.EqualTo(step.LastTrace.Max(c => c.Iteration)));
            Assert.That(step.LastTrace.All(c => c.CostFraction <= 1), Is.True);
        }
    }

    [Test]
    public void Search_StopsAtTheTimeLimit()
    {
        var (model, context, data) = SearchSetup();
        using (model)
        using (data)
        {
            var step = new BudgetedSearchStep(new BudgetedSearchOptions
            {
                Kind = SearchBudgetKind.Parameters,
                Fraction = 0.05,
                StepFraction = 0.01,
                TimeLimit = TimeSpan.FromMilliseconds(1),
                ShortFineTuning = new TrainingOptions { Epochs = 1, BatchSize = 40 },
            });
            using var result = step.Apply(ModuleCloner.DeepClone(model), context);
            Assert.That(step.LastMetBudget, Is.False);
            Assert.That(step.LastTrace.Select(c => c.Iteration).DefaultIfEmpty(0).Max(), Is.LessThanOrEqualTo(1));
            Assert.That(context.Notes, Has.Some.Contains("budget NOT met"));
        }
    }

    [Test]
    public void Search_InvalidBudgets_AreRejected()
    {
        var ex = Assert.Throws<OptionsValidationException>(() => new BudgetedSearchStep(new BudgetedSearchOptions { Fraction = 1.2, StepFraction = 0, TimeLimit = TimeSpan.Zero }));
        Assert.That(ex!.Errors, Has.Count.EqualTo(3));
        Assert.Throws<OptionsValidationException>(() => CompressionPipeline.Create().AddBudgetedSearch(macsFraction: 0));
    }

    [Test]
    public void Rewrite_LeavesNoLiveTensorsBesideItsNewLayers()
    {
        // The rank-1 fit and the dry runs free everything; only the new block's parameters remain (one TorchSharp
        // bookkeeping count per Parameter it constructs: 2 convolution weights and 1 bias).
        using var conv = nn.Conv2d(4, 6, 3, padding: 1);
        DepthwiseSeparableRewriteStep.Rewrite(conv).Block.Dispose();
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long before = TestModels.SettledTensorCount();
        var (block, _) = DepthwiseSeparableRewriteStep.Rewrite(conv);
        block.Dispose();
        long afterFirst = Tensor.TotalCount - before;
        before = Tensor.TotalCount;
        (block, _) = DepthwiseSeparableRewriteStep.Rewrite(conv);
        block.Dispose();
        Assert.That(Tensor.TotalCount - before, Is.EqualTo(afterFirst), "each rewrite adds the same fixed bookkeeping, nothing that grows");
    }
}
