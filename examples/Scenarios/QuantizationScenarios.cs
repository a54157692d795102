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
        using var result = baseline.Run(baseline.Pipeline(context).AddPostTrainingQuantization(options));
        var report = result.Report;
        report.Reference!["sizeRatio"] = (double)report.Final.SizeBytes / report.Baseline.SizeBytes;
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

/// <summary>Shared parts of the quantization-aware training scenarios.</summary>
internal static class QuantizationAware
{
    /// <summary>
    /// Runs quantization-aware training on a zoo baseline, and the same bit widths with zero epochs (post-training,
    /// ranges from the calibration pass) for <c>reference.ptqAccuracy</c>; adds the conversion check.
    /// </summary>
    public static CompressionReport Run(ScenarioBaseline baseline, ScenarioContext context, Func<QuantizationAwareTrainingOptions> options)
    {
        var step = new QuantizationAwareTrainingStep(options());
        using var result = baseline.Run(baseline.Pipeline(context).AddStep(step));
        var report = result.Report;
        report.Reference!["sizeRatio"] = (double)report.Final.SizeBytes / report.Baseline.SizeBytes;
        report.Reference["agreement"] = step.LastConversion!.Agreement;
        report.Reference["maxLogitDifference"] = step.LastConversion.MaxLogitDifference;

        var postTraining = options();
        postTraining.Training.Epochs = 0;
        postTraining.ObserverEpochs = 0;
        using var ptq = baseline.Run(baseline.Pipeline(context)
            .AddQuantizationAwareTraining(postTraining)
            .WithLatencyMeasurement(new ModelCompression.Metrics.LatencyOptions { Enabled = false }));
        report.Reference["ptqAccuracy"] = ptq.Report.Final.Accuracy;
        context.Log.WriteLine($"Same bits after training only (post-training): accuracy {ptq.Report.Final.Accuracy:P2}; after QAT: {report.Final.Accuracy:P2}");
        context.Log.WriteLine($"Converted vs fake-quantized: {step.LastConversion.Agreement:P2} same predictions, max output difference {step.LastConversion.MaxLogitDifference:0.#####}");
        return report;
    }

    public static ScenarioTarget Agreement() =>
        global::Scenarios.Targets.ReferenceAtLeast("agreement", 0.999, "converted model agrees with the fake-quantized one on ≥ 99.9% of test digits");

    /// <summary>Fine-tuning at a small learning rate: the weights start trained.</summary>
    public static ModelCompression.Training.TrainingOptions Training(int epochs, double learningRate)
    {
        var training = Pruning.FineTuning(epochs);
        training.LearningRate = learningRate;
        return training;
    }
}

/// <summary>LeNet-5 trained with int8 weights and 7-bit activations in the loop, converted to static int8 layers.</summary>
public sealed class QatInt8LeNet5Scenario : IScenario
{
    public string Name => "qat-int8-lenet5";

    public string Description => "LeNet-5: quantization-aware training, int8 weights, 7-bit activations";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        global::Scenarios.Targets.DropAtMost(0.1),
        QuantizationAware.Agreement(),
    ];

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = ScenarioBaseline.Load(ZooModel.LeNet5, context);
        return QuantizationAware.Run(baseline, context, () => new QuantizationAwareTrainingOptions
        {
            WeightBits = 8,
            Training = QuantizationAware.Training(3, 0.002),
        });
    }
}

/// <summary>LeNet-300-100 with 4-bit weights per channel and 7-bit activations: post-training against QAT.</summary>
public sealed class QatInt4LeNet300Scenario : IScenario
{
    public string Name => "qat-int4-lenet300";

    public string Description => "LeNet-300-100: 4-bit weights (per channel), 7-bit activations; post-training vs QAT";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        global::Scenarios.Targets.DropAtMost(0.5),
        QuantizationAware.Agreement(),
    ];

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = ScenarioBaseline.Load(ZooModel.LeNet300100, context);
        return QuantizationAware.Run(baseline, context, () => new QuantizationAwareTrainingOptions
        {
            WeightBits = 4,
            WeightGranularity = QuantizationGranularity.PerChannel,
            Training = QuantizationAware.Training(5, 0.005),
        });
    }
}

/// <summary>
/// LeNet-300-100 with binary (1-bit) weights in both hidden layers (fc1, fc2) and 8-bit weights in the output layer
/// (fc3), 7-bit activations; weights stored as bits.
/// </summary>
public sealed class QatBinaryLeNet300Scenario : IScenario
{
    public string Name => "qat-binary-lenet300";

    public string Description => "LeNet-300-100: 1-bit weights in fc1 and fc2 (fc3 8-bit), quantization-aware training";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        global::Scenarios.Targets.DropAtMost(3.0),
        Quantization.SizeRatioAtMost(1.0 / 20, "size ≤ 1/20 of fp32"),
        QuantizationAware.Agreement(),
    ];

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = ScenarioBaseline.Load(ZooModel.LeNet300100, context);
        return QuantizationAware.Run(baseline, context, () =>
        {
            var options = new QuantizationAwareTrainingOptions
            {
                WeightBits = 1,
                Training = QuantizationAware.Training(15, 0.01),
            };
            options.LayerWeightBits["fc3"] = 8;
            return options;
        });
    }
}
