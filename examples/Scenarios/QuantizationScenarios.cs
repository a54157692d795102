using ModelCompression;
using ModelCompression.Quantization;
using ModelCompression.Quantization.Kernels;
using ModelCompression.Samples;

namespace Scenarios;

/// <summary>Shared parts of the post-training quantization scenarios.</summary>
internal static class Quantization
{
    /// <summary>Runs one quantization step on a zoo baseline and returns the report with the common reference figures.</summary>
    public static CompressionReport Run(ScenarioBaseline baseline, ScenarioContext context, PostTrainingQuantizationOptions options)
    {
        using var result = CompressionPipeline.Create()
            .AddPostTrainingQuantization(options)
            .WithModelName(baseline.Name)
            .WithSeed(context.Seed)
            .Build()
            .Run(baseline.Model, baseline.Data);
        var report = result.Report;
        report.Reference = baseline.Reference();
        report.Reference["sizeRatio"] = (double)report.Final.SizeBytes / report.Baseline.SizeBytes;
        context.Log.WriteLine($"Kernel path: {Int8Kernel.BestPath} (supported: {string.Join(", ", Int8Kernel.SupportedPaths)})");
        return report;
    }

    public static ScenarioTarget SizeRatioAtMost(double ratio, string description) =>
        global::Scenarios.Targets.ReferenceAtMost("sizeRatio", ratio, description);
}

/// <summary>LeNet-300-100 with dynamic int8: weights int8 per channel, activations ranged per row at run time.</summary>
public sealed class PtqDynamicLeNet300Scenario : IScenario
{
    public string Name => "ptq-dynamic-lenet300";

    public string Description => "LeNet-300-100: dynamic int8 post-training quantization";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        global::Scenarios.Targets.DropAtMost(0.3),
        Quantization.SizeRatioAtMost(0.26, "size ≈ 1/4 of fp32 (≤ 0.26 with scales and biases)"),
    ];

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = ScenarioBaseline.Load(ZooModel.LeNet300100, context);
        return Quantization.Run(baseline, context, new PostTrainingQuantizationOptions { Mode = QuantizationMode.DynamicInt8 });
    }
}

/// <summary>
/// LeNet-5 with static int8 (calibrated activation ranges, ReLU fused), with the MSE observer; the MinMax and
/// Entropy observers' accuracies go into <c>reference</c> for comparison.
/// </summary>
public sealed class PtqStaticLeNet5Scenario : IScenario
{
    public string Name => "ptq-static-lenet5";

    public string Description => "LeNet-5: static int8 with the MSE observer (MinMax and Entropy for reference)";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        global::Scenarios.Targets.DropAtMost(0.3),
        Quantization.SizeRatioAtMost(0.26, "size ≈ 1/4 of fp32"),
    ];

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = ScenarioBaseline.Load(ZooModel.LeNet5, context);
        var report = Quantization.Run(baseline, context, Options(ActivationObserver.Mse));
        foreach (var (key, observer) in new[] { ("minMaxObserverAccuracy", ActivationObserver.MinMax), ("entropyObserverAccuracy", ActivationObserver.Entropy) })
        {
            var other = Quantization.Run(baseline, context, Options(observer));
            report.Reference![key] = other.Final.Accuracy;
            context.Log.WriteLine($"{observer} observer: accuracy {other.Final.Accuracy:P2}");
        }

        return report;
    }

    private static PostTrainingQuantizationOptions Options(ActivationObserver observer) => new()
    {
        Mode = QuantizationMode.StaticInt8,
        Observer = observer,
        CalibrationBatches = 8,
        CalibrationBatchSize = 128,
    };
}

/// <summary>LeNet-300-100 with 4-bit weights in groups of 64 (float16 scales), two weights per byte.</summary>
public sealed class PtqInt4LeNet300Scenario : IScenario
{
    public string Name => "ptq-int4-lenet300";

    public string Description => "LeNet-300-100: int4 weight-only, group-wise (64), round-to-nearest";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        global::Scenarios.Targets.DropAtMost(1.0),
        Quantization.SizeRatioAtMost(1.0 / 7, "size ≤ 1/7 of fp32 including scales"),
    ];

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = ScenarioBaseline.Load(ZooModel.LeNet300100, context);
        return Quantization.Run(baseline, context, new PostTrainingQuantizationOptions
        {
            Mode = QuantizationMode.WeightOnlyInt4,
            WeightGranularity = QuantizationGranularity.PerGroup(64),
        });
    }
}
