using ModelCompression;
using ModelCompression.Clustering;
using ModelCompression.Distillation;
using ModelCompression.Pruning;
using ModelCompression.Samples;
using ModelCompression.Serialization;
using ModelCompression.Training;
using static TorchSharp.torch;

namespace Scenarios;

/// <summary>
/// Deep Compression (Han, Mao and Dally 2016) end to end: magnitude pruning with fine-tuning, weight sharing with
/// fine-tuned centroids, then the compressed file's entropy coding. The report's <c>reference</c> holds the file size
/// ratio and, per layer as in the paper's Table 2, the weights kept, the index bits and the bytes after each stage.
/// </summary>
internal static class DeepCompression
{
    /// <summary>Fine-tuning of shared centroids: Adam with a small rate, since a centroid's gradient sums hundreds of weights'.</summary>
    public static TrainingOptions CentroidTuning(int epochs) => new()
    {
        Epochs = epochs,
        Optimizer = OptimizerKind.Adam,
        LearningRate = 1e-4,
        Schedule = new CosineLearningRate(),
    };

    /// <summary>Weight sharing with fine-tuned centroids (distilled from the original), values rounded to float16 for storage.</summary>
    public static WeightClusteringOptions Clustering(int bits) => new()
    {
        Bits = bits,
        FineTuning = CentroidTuning(5),
        Distillation = new RecoveryDistillation(),
        HalfPrecisionValues = true,
    };

    /// <summary>
    /// Prunes a zoo model to the given per-layer sparsities (30 epochs of fine-tuning, distilled from the original
    /// model, which recovers what pruning costs), shares its weights at 5 bits (4 for the layers named), and reports
    /// the compressed file.
    /// </summary>
    public static CompressionReport Run(ZooModel kind, ScenarioContext context, (string Layer, double Sparsity)[] layerSparsity, string[] fourBitLayers)
    {
        using var baseline = ScenarioBaseline.Load(kind, context);
        var pruning = new MagnitudePruningOptions { FineTuning = Pruning.FineTuning(30), Distillation = new RecoveryDistillation() };
        foreach (var (layer, sparsity) in layerSparsity)
        {
            pruning.LayerSparsity[layer] = sparsity;
        }

        var clustering = Clustering(bits: 5);
        foreach (string layer in fourBitLayers)
        {
            clustering.LayerBits[layer] = 4;
        }

        return Run(baseline, context, pruning, clustering);
    }

    private static CompressionReport Run(ScenarioBaseline baseline, ScenarioContext context, MagnitudePruningOptions pruning, WeightClusteringOptions clustering)
    {
        CompressedModelSize? afterPruning = null;
        using var result = baseline.Run(baseline.Pipeline(context)
            .AddStep(new MeasuredStep(new MagnitudePruningStep(pruning), size => afterPruning = size))
            .AddWeightClustering(clustering));
        var report = result.Report;
        var dense = CompressedModel.Measure(baseline.Model);
        var final = CompressedModel.Save(result.Model, Path.ChangeExtension(context.ReportPath, ".mcmf"));
        report.Reference!["fileCompressionRatio"] = (double)dense.TotalBytes / final.TotalBytes;
        report.Reference["denseFileBytes"] = dense.TotalBytes;
        report.Reference["compressedFileBytes"] = final.TotalBytes;

        // Table 2: per layer, weights kept, bits, and bytes dense → pruned → pruned + shared + entropy coded.
        context.Log.WriteLine($"{"layer",-8} {"weights",8} {"kept",7} {"bits",5} {"dense B",9} {"pruned B",9} {"final B",9} {"ratio",7}");
        foreach (var layer in report.Layers ?? [])
        {
            if (layer.Type != nameof(ClusteredLayer))
            {
                continue;
            }

            long denseBytes = Bytes(dense, layer.Name);
            long prunedBytes = afterPruning is null ? 0 : Bytes(afterPruning, layer.Name);
            long finalBytes = Bytes(final, layer.Name);
            report.Reference[$"{layer.Name}.keptFraction"] = layer.KeptFraction;
            report.Reference[$"{layer.Name}.bits"] = layer.Bits;
            report.Reference[$"{layer.Name}.denseBytes"] = denseBytes;
            report.Reference[$"{layer.Name}.prunedBytes"] = prunedBytes;
            report.Reference[$"{layer.Name}.finalBytes"] = finalBytes;
            context.Log.WriteLine($"{layer.Name,-8} {layer.Parameters,8} {layer.KeptFraction,7:P1} {layer.Bits,5} {denseBytes,9} {prunedBytes,9} {finalBytes,9} {(double)denseBytes / finalBytes,6:0.0}x");
            foreach (var encoding in final.Layers.Where(l => l.Name == layer.Name || l.Name.StartsWith(layer.Name + ".", StringComparison.Ordinal)).SelectMany(l => l.Encodings))
            {
                context.Log.WriteLine($"           {encoding}");
            }
        }

        context.Log.WriteLine($"file: dense {dense.TotalBytes} B → pruned {afterPruning?.TotalBytes} B → final {final.TotalBytes} B ({report.Reference["fileCompressionRatio"]:0.0}x); architecture and framing {final.ArchitectureBytes} B");
        return report;
    }

    /// <summary>The bytes a layer and everything inside it take in the file.</summary>
    private static long Bytes(CompressedModelSize size, string name) =>
        size.Layers.Where(l => l.Name == name || l.Name.StartsWith(name + ".", StringComparison.Ordinal)).Sum(l => l.Bytes);

    public static IReadOnlyList<ScenarioTarget> Targets(double minimumRatio) =>
    [
        global::Scenarios.Targets.DropAtMost(0.3),
        global::Scenarios.Targets.ReferenceAtLeast("fileCompressionRatio", minimumRatio, $"file ≥ {minimumRatio}× smaller than dense fp32"),
    ];

    /// <summary>Runs a step and records the compressed-file size of what it returns (the size after that stage).</summary>
    private sealed class MeasuredStep(ICompressionStep inner, Action<CompressedModelSize> record) : ICompressionStep, ICompressionStepRequirements
    {
        public string Name => inner.Name;

        public bool RequiresTrainingData => inner is ICompressionStepRequirements { RequiresTrainingData: true };

        public nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context)
        {
            var result = inner.Apply(model, context);
            record(CompressedModel.Measure(result));
            return result;
        }
    }
}

/// <summary>LeNet-300-100: prune (Han et al.'s per-layer proportions), share weights, entropy code. Deep Compression: 40×.</summary>
public sealed class DeepCompressionLeNet300Scenario : IScenario
{
    public string Name => "deep-compression-lenet300";

    public string Description => "LeNet-300-100: pruning → weight sharing → entropy-coded file (Deep Compression: 40×)";

    public IReadOnlyList<ScenarioTarget> Targets { get; } = DeepCompression.Targets(40);

    // Han et al.'s proportions (fc1 hardest, the classifier least), fc1 a little harder.
    public CompressionReport Run(ScenarioContext context) =>
        DeepCompression.Run(ZooModel.LeNet300100, context, [("fc1", 0.95), ("fc2", 0.91), ("fc3", 0.74)], fourBitLayers: ["fc1"]);
}

/// <summary>
/// LeNet-5: prune (Han et al.'s proportions, the large fc1 harder), share weights (4 bits for conv1 and fc1, 5 for the
/// rest), entropy code. Deep Compression: 39× on its larger Caffe LeNet-5.
/// </summary>
public sealed class DeepCompressionLeNet5Scenario : IScenario
{
    public string Name => "deep-compression-lenet5";

    public string Description => "LeNet-5: pruning → weight sharing → entropy-coded file (Deep Compression: 39×)";

    public IReadOnlyList<ScenarioTarget> Targets { get; } = DeepCompression.Targets(39);

    public CompressionReport Run(ScenarioContext context) =>
        DeepCompression.Run(ZooModel.LeNet5, context, [("conv1", 0.34), ("conv2", 0.88), ("fc1", 0.97), ("fc2", 0.92), ("fc3", 0.75)], fourBitLayers: ["conv1", "fc1"]);
}
