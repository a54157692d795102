using ModelCompression.Clustering;
using ModelCompression.Data;
using ModelCompression.Metrics;
using ModelCompression.Modules;
using ModelCompression.Pruning;
using ModelCompression.Serialization;
using ModelCompression.Training;
using NUnit.Framework;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

using ModelCompression.Tests.Support;

namespace ModelCompression.Tests.Clustering;

[TestFixture]
public sealed class WeightClusteringStepTests
{
    private static CompressionContext Context(nn.Module<Tensor, Tensor> original, ModelCompression.Data.TensorDataset train) =>
        new(new CompressionData(train, train), original);

    private static float[] Weights(nn.Module layer)
    {
        using var w = ClusteredLayer.DenseWeight(layer);
        return w.flatten().data<float>().ToArray();
    }

    [Test]
    public void KMeans_LinearInitialization_FindsSeparatedGroups()
    {
        var values = new[] { -1.0f, -1.1f, -0.9f, 0.5f, 0.6f, 0.4f, 2f, 2.2f };
        var (centroids, assignment) = KMeans1D.Cluster(values, 3, CentroidInitialization.Linear, 100);
        Assert.That(centroids, Is.EqualTo(new[] { -1.0f, 0.5f, 2.1f }).Within(1e-5));
        Assert.That(assignment, Is.EqualTo(new[] { 0, 0, 0, 1, 1, 1, 2, 2 }));
    }

    [Test]
    public void KMeans_EveryValueGoesToItsNearestCentroid()
    {
        var random = new Random(4);
        var values = Enumerable.Range(0, 5000).Select(_ => (float)(random.NextDouble() * random.NextDouble() * (random.Next(2) * 2 - 1))).ToArray();
        foreach (var init in new[] { CentroidInitialization.Linear, CentroidInitialization.Density })
        {
            var (centroids, assignment) = KMeans1D.Cluster(values, 16, init, 200);
            Assert.That(centroids, Has.Length.LessThanOrEqualTo(16));
            Assert.That(centroids, Is.Ordered.Ascending);
            for (int i = 0; i < values.Length; i++)
            {
                float best = centroids.MinBy(c => Math.Abs(c - values[i]));
                Assert.That(Math.Abs(centroids[assignment[i]] - values[i]), Is.LessThanOrEqualTo(Math.Abs(best - values[i]) + 1e-6f));
            }
        }
    }

    [Test]
    public void Apply_SharesValuesPerLayer_KeepsZeros_AndShrinksTheFile()
    {
        using var model = ModelCompression.Samples.ModelZoo.Create(ModelCompression.Samples.ZooModel.LeNet300100, 3);
        using var train = TestModels.Classification(8, 1);
        using var pruned = new MagnitudePruningStep(new MagnitudePruningOptions { Sparsity = 0.6, SparseExecution = SparseExecution.Never }).Apply(ModuleCloner.DeepClone(model), Context(model, train));
        var zerosBefore = pruned.named_modules().Where(m => m.module is Linear).Select(m => Weights(m.module).Select(v => v == 0).ToArray()).ToList();
        long prunedBytes = CompressedModel.Measure(pruned).TotalBytes;

        var options = new WeightClusteringOptions { Bits = 3 };
        using var result = new WeightClusteringStep(options).Apply(ModuleCloner.DeepClone(pruned), Context(model, train));
        var layers = result.named_modules().Where(m => m.module is ClusteredLayer).Select(m => (ClusteredLayer)m.module).ToList();
        Assert.That(layers, Has.Count.EqualTo(zerosBefore.Count));
        for (int i = 0; i < layers.Count; i++)
        {
            var w = Weights(layers[i].Inner);
            Assert.That(w.Where(v => v != 0).Distinct().Count(), Is.LessThanOrEqualTo(8));
            Assert.That(layers[i].Codebook, Is.EquivalentTo(w.Where(v => v != 0).Distinct()));
            Assert.That(w.Select(v => v == 0), Is.EqualTo(zerosBefore[i]), "pruned weights stay zero, others stay non-zero");
            Assert.That(layers[i].WeightBits, Is.LessThanOrEqualTo(3));
        }

        Assert.That(CompressedModel.Measure(result).TotalBytes, Is.LessThan(prunedBytes * 0.5));
    }

    [Test]
    public void TrainingLayer_CentroidGradient_IsTheSumOfItsWeightsGradients()
    {
        torch.random.manual_seed(5);
        using var linear = nn.Linear(6, 4);
        using var layer = ClusterTrainingLayer.Create(linear, 3, CentroidInitialization.Linear, 50, "fc");
        using var dense = layer.ToClusteredLayer(false);
        var inner = (Linear)dense.Inner;
        inner.weight!.requires_grad = true;
        using var x = randn(5, 6);
        layer.call(x).sum().backward();
        inner.call(x).sum().backward();

        var values = inner.weight!.detach().flatten().data<float>().ToArray();
        var grads = inner.weight!.grad!.flatten().data<float>().ToArray();
        var centroids = layer.parameters().First().detach().data<float>().ToArray();
        var centroidGrads = layer.parameters().First().grad!.data<float>().ToArray();
        for (int c = 0; c < centroids.Length; c++)
        {
            double sum = Enumerable.Range(0, values.Length).Where(i => values[i] == centroids[c]).Sum(i => (double)grads[i]);
            Assert.That(centroidGrads[c], Is.EqualTo(sum).Within(1e-4));
        }
    }

    [Test]
    public void Apply_FineTuning_MovesSharedValuesAndKeepsThemShared()
    {
        var (model, train, _) = TestModels.TrainedMlp(6);
        using var _m = model;
        var before = new WeightClusteringStep(new WeightClusteringOptions { Bits = 2 }).Apply(ModuleCloner.DeepClone(model), Context(model, train));
        var options = new WeightClusteringOptions { Bits = 2, FineTuning = new TrainingOptions { Epochs = 2, Optimizer = OptimizerKind.Adam, LearningRate = 0.01, BatchSize = 32 } };
        using var after = new WeightClusteringStep(options).Apply(ModuleCloner.DeepClone(model), Context(model, train));
        var first = before.named_modules().Select(m => m.module).OfType<ClusteredLayer>().First();
        var tuned = after.named_modules().Select(m => m.module).OfType<ClusteredLayer>().First();
        Assert.That(tuned.Codebook.Count, Is.LessThanOrEqualTo(4));
        Assert.That(tuned.Codebook, Is.Not.EqualTo(first.Codebook), "fine-tuning moved the centroids");
        before.Dispose();
    }

    [Test]
    public void Options_Invalid_AllListed()
    {
        var options = new WeightClusteringOptions { Bits = 0, MaxIterations = 0, Initialization = (CentroidInitialization)9 };
        options.LayerBits["fc1"] = 17;
        var ex = Assert.Throws<OptionsValidationException>(() => new WeightClusteringStep(options));
        Assert.That(ex!.Errors, Has.Count.EqualTo(4));
    }

    [Test]
    public void Apply_OverrideForUnselectedLayer_ThrowsBeforeAnyChange()
    {
        var (model, train, _) = TestModels.TrainedMlp(7);
        using var _m = model;
        using var copy = ModuleCloner.DeepClone(model);
        string before = TestModels.StateHash(copy);
        var options = new WeightClusteringOptions();
        options.LayerBits["nope"] = 4;
        Assert.Throws<ArgumentException>(() => new WeightClusteringStep(options).Apply(copy, Context(model, train)));
        Assert.That(TestModels.StateHash(copy), Is.EqualTo(before));
    }

    [Test]
    public void Apply_LeavesNoLiveTensorsBesideTheNewLayers()
    {
        var (model, train, _) = TestModels.TrainedMlp(8);
        using var _m = model;
        var step = new WeightClusteringStep(new WeightClusteringOptions { Bits = 3, FineTuning = new TrainingOptions { Epochs = 1, BatchSize = 32 } });
        long Run()
        {
            GC.Collect();
            GC.WaitForPendingFinalizers();
            long before = TestModels.SettledTensorCount();
            step.Apply(ModuleCloner.DeepClone(model), Context(model, train)).Dispose();
            GC.Collect();
            GC.WaitForPendingFinalizers();
            return Tensor.TotalCount - before;
        }

        Run();
        long first = Run();
        Assert.That(Run(), Is.EqualTo(first), "each run adds the same fixed bookkeeping (one count per Parameter constructed), nothing that grows");
        Assert.That(first, Is.LessThanOrEqualTo(12), "at most TorchSharp's one count per Parameter the step constructs");
    }

    [Test]
    public void Pipeline_SameSeed_SameCompressedFile()
    {
        var (model, train, test) = TestModels.TrainedMlp(9);
        using var _m = model;
        byte[] Run()
        {
            using var result = CompressionPipeline.Create()
                .AddWeightClustering(4, new TrainingOptions { Epochs = 1, BatchSize = 32, Optimizer = OptimizerKind.Adam, LearningRate = 1e-3 })
                .WithSeed(3)
                .WithLatencyMeasurement(new LatencyOptions { Enabled = false })
                .Build()
                .Run(model, new CompressionData(train, test));
            using var stream = new MemoryStream();
            CompressedModel.Save(result.Model, stream);
            Assert.That(result.Report.Final.SizeBytes, Is.EqualTo(stream.Length));
            return stream.ToArray();
        }

        Assert.That(Run(), Is.EqualTo(Run()));
    }

    private static int DistinctNonzero(nn.Module model, string name)
    {
        using var t = model.state_dict()[name].detach().cpu().contiguous();
        return t.data<float>().ToArray().Where(v => v != 0).Distinct().Count();
    }

    [Test]
    public void Apply_LayersInFieldsTypedLinearAndConv2d_ShareValuesInPlaceThroughFineTuning()
    {
        using var original = new FixedTypeNet(6);
        using var train = new ModelCompression.Data.TensorDataset(randn(64, 1, 12, 12), randint(0, 10, 64));
        long fcBefore = ModelMetrics.Measure(original, FixedTypeNet.SampleShape).Layers.Single(l => l.Name == "fc").SizeBytes!.Value;
        nn.Module<Tensor, Tensor> Cluster(TrainingOptions? fineTuning, out CompressionContext context, out CapturingLogger logger)
        {
            logger = new CapturingLogger();
            context = new CompressionContext(new CompressionData(train, train), original, logger: logger);
            var options = new WeightClusteringOptions { Bits = 3, FineTuning = fineTuning };
            return new WeightClusteringStep(options).Apply(ModuleCloner.DeepClone(original), context);
        }

        using var plain = Cluster(null, out _, out _);
        using var tuned = Cluster(new TrainingOptions { Epochs = 2, BatchSize = 16, LearningRate = 0.01 }, out var context, out var logger);

        foreach (var result in new[] { plain, tuned })
        {
            Assert.That(ModuleTree.GetSubmodule(result, "fc"), Is.TypeOf<Linear>());
            Assert.That(ModuleTree.GetSubmodule(result, "conv"), Is.TypeOf<Conv2d>());
            Assert.That(ModuleTree.GetSubmodule(result, "head"), Is.TypeOf<ClusteredLayer>());
            Assert.That(DistinctNonzero(result, "fc.weight"), Is.InRange(2, 8));
            Assert.That(DistinctNonzero(result, "conv.weight"), Is.InRange(2, 8));
        }

        // Fine-tuning moved the shared values, and every weight of a cluster moved with them.
        Assert.That(TestModels.StateHash(tuned), Is.Not.EqualTo(TestModels.StateHash(plain)));
        // 3-bit indices, Huffman-coded, and a codebook of 8: 205,063 bytes → under a tenth.
        long fcAfter = ModelMetrics.Measure(tuned, FixedTypeNet.SampleShape).Layers.Single(l => l.Name == "fc").SizeBytes!.Value;
        TestContext.Out.WriteLine($"fc {fcBefore} → {fcAfter} bytes");
        Assert.That(fcAfter, Is.LessThan(fcBefore * 3 / 32 + 600));
        Assert.That(context.Notes, Has.Some.Contains("fc: 8 shared values over 51200 weights, in place"));
        Assert.That(context.Notes, Has.One.Contains("'fc' (the field FixedTypeNet.fc").And.Contains("'conv'").And.Contains("shared value in place"));
        Assert.That(logger.Warnings, Has.One.Contains("'fc'"));
    }

    [Test]
    public void Apply_FixedTypeLayersSkipOrFail_LeavesOrRefusesThoseLayers()
    {
        using var original = new FixedTypeNet(7);
        using var train = new ModelCompression.Data.TensorDataset(randn(8, 1, 12, 12), randint(0, 10, 8));
        var context = Context(original, train);
        using var skipped = new WeightClusteringStep(new WeightClusteringOptions { Bits = 2, FixedTypeLayers = FixedTypeLayers.Skip })
            .Apply(ModuleCloner.DeepClone(original), context);
        Assert.That(TestModels.StateHash(ModuleTree.GetSubmodule(skipped, "fc")), Is.EqualTo(TestModels.StateHash(ModuleTree.GetSubmodule(original, "fc"))));
        Assert.That(ModuleTree.GetSubmodule(skipped, "head"), Is.TypeOf<ClusteredLayer>());
        Assert.That(context.Notes, Has.One.Contains("left as they are").And.Contains("'fc'").And.Contains("'conv'"));

        using var model = ModuleCloner.DeepClone(original);
        string before = TestModels.StateHash(model);
        var ex = Assert.Throws<UnsupportedModelException>(() => new WeightClusteringStep(new WeightClusteringOptions { FixedTypeLayers = FixedTypeLayers.Fail }).Apply(model, Context(original, train)));
        Assert.That(ex!.Message, Does.Contain("'fc'").And.Contain("WeightClusteringOptions.FixedTypeLayers"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
        Assert.Throws<OptionsValidationException>(() => _ = new WeightClusteringStep(new WeightClusteringOptions { FixedTypeLayers = (FixedTypeLayers)(-1) }));
    }
}
