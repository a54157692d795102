using static TorchSharp.torch;
using ModelCompression;
using ModelCompression.Metrics;
using ModelCompression.Modules;
using ModelCompression.Pruning;
using ModelCompression.Samples;
using ModelCompression.Training;

namespace Scenarios;

/// <summary>Shared settings of the pruning scenarios.</summary>
internal static class Pruning
{
    /// <summary>Fine-tuning after pruning: SGD with momentum, cosine decay, the zoo's weight decay.</summary>
    public static TrainingOptions FineTuning(int epochs) => new()
    {
        Epochs = epochs,
        Optimizer = OptimizerKind.Sgd,
        LearningRate = 0.02,
        Momentum = 0.9,
        WeightDecay = 5e-4,
        Schedule = new CosineLearningRate(),
    };

    /// <summary>The fraction of weights (not biases) that are zero in the layers the report lists.</summary>
    public static double WeightsRemoved(CompressionReport report, nn.Module<Tensor, Tensor> model)
    {
        long weights = 0;
        long nonzero = 0;
        foreach (var (name, module) in model.named_modules())
        {
            if (module is SparseLinear sparse)
            {
                weights += sparse.InFeatures * sparse.OutFeatures;
                nonzero += sparse.StoredWeights;
            }
            else if (module.named_parameters(recurse: false).FirstOrDefault(p => p.name == "weight").parameter is { } w && module is not TorchSharp.Modules.BatchNorm2d)
            {
                using var nz = w.count_nonzero();
                weights += w.numel();
                nonzero += nz.item<long>();
            }
        }

        return 1 - ((double)nonzero / weights);
    }

    /// <summary>The targets of the magnitude-pruning scenarios: a share of weights removed, a bounded accuracy drop.</summary>
    public static IReadOnlyList<ScenarioTarget> WeightTargets(double removed, double dropPoints) =>
    [
        Targets.ReferenceAtLeast("weightsRemoved", removed, $"≥ {removed * 100:0.#}% of weights removed"),
        Targets.DropAtMost(dropPoints),
    ];

    /// <summary>The report of a <see cref="Run"/>, with the share of weights removed added to its reference figures.</summary>
    public static CompressionReport Report(CompressionResult result)
    {
        var report = result.Report;
        report.Reference!["weightsRemoved"] = WeightsRemoved(report, result.Model);
        return report;
    }

    /// <summary>Runs one pruning pipeline with the accuracy check off (the scenario reports, then judges).</summary>
    public static CompressionResult Run(ScenarioBaseline baseline, ScenarioContext context, MagnitudePruningOptions options, bool measureLatency = true) =>
        baseline.Run(baseline.Pipeline(context)
            .AddMagnitudePruning(options)
            .WithLatencyMeasurement(new LatencyOptions { Enabled = measureLatency }));
}

/// <summary>
/// LeNet-300-100, magnitude pruning with fine-tuning: per-layer sparsities in the proportions Han et al. (2015)
/// found (fc1 and fc2 pruned hardest, the classifier least), then a one-shot vs gradual (AGP) comparison at 95%.
/// </summary>
public sealed class PruneLeNet300Scenario : IScenario
{
    public string Name => "prune-lenet300";

    public string Description => "LeNet-300-100: ≥ 92% of weights removed with fine-tuning; one-shot vs AGP at 95%";

    public IReadOnlyList<ScenarioTarget> Targets { get; } = Pruning.WeightTargets(0.92, 0.3);

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = ScenarioBaseline.Load(ZooModel.LeNet300100, context);
        var options = new MagnitudePruningOptions { FineTuning = Pruning.FineTuning(30) };
        options.LayerSparsity["fc1"] = 0.93;
        options.LayerSparsity["fc2"] = 0.91;
        options.LayerSparsity["fc3"] = 0.74;

        using var result = Pruning.Run(baseline, context, options);
        var report = Pruning.Report(result);

        // The schedule comparison: the same 95% global sparsity and the same 20 fine-tuning epochs.
        foreach (var (key, schedule) in new (string, IPruningSchedule)[] { ("oneShotAccuracy", new OneShotPruning()), ("agpAccuracy", new GradualPruning()) })
        {
            context.Log.WriteLine($"{key}: 95% global, {schedule}, 20 epochs of fine-tuning");
            using var compared = Pruning.Run(baseline, context, new MagnitudePruningOptions
            {
                Sparsity = 0.95,
                Scope = PruningScope.Global,
                Schedule = schedule,
                FineTuning = Pruning.FineTuning(20),
                SparseExecution = SparseExecution.Never,
            }, measureLatency: false);
            report.Reference![key] = compared.Report.Final.Accuracy;
        }

        return report;
    }
}

/// <summary>LeNet-5, magnitude pruning with fine-tuning, per-layer sparsities after Han et al. (2015).</summary>
public sealed class PruneLeNet5Scenario : IScenario
{
    public string Name => "prune-lenet5";

    public string Description => "LeNet-5: ≥ 92% of weights removed with fine-tuning";

    public IReadOnlyList<ScenarioTarget> Targets { get; } = Pruning.WeightTargets(0.92, 0.3);

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = ScenarioBaseline.Load(ZooModel.LeNet5, context);
        var options = new MagnitudePruningOptions { FineTuning = Pruning.FineTuning(15) };
        options.LayerSparsity["conv1"] = 0.34;
        options.LayerSparsity["conv2"] = 0.88;
        options.LayerSparsity["fc1"] = 0.95;
        options.LayerSparsity["fc2"] = 0.90;
        options.LayerSparsity["fc3"] = 0.75;
        using var result = Pruning.Run(baseline, context, options);
        var report = Pruning.Report(result);
        return report;
    }
}

/// <summary>LeNet-300-100 with 2:4 semi-structured sparsity in every layer, fine-tuned.</summary>
public sealed class PruneTwoOfFourScenario : IScenario
{
    public string Name => "prune-2of4-lenet300";

    public string Description => "LeNet-300-100: exactly 2 non-zeros in every group of 4 inputs, fine-tuned";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        global::Scenarios.Targets.ReferenceAtLeast("groupsWithExactlyTwo", 1.0, "every group of 4 holds exactly 2 non-zeros"),
        global::Scenarios.Targets.DropAtMost(0.5),
    ];

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = ScenarioBaseline.Load(ZooModel.LeNet300100, context);
        var options = new MagnitudePruningOptions
        {
            Pattern = NMPattern.TwoOfFour,
            FineTuning = Pruning.FineTuning(10),
            Layers = LayerSelection.OfType<TorchSharp.Modules.Linear>(),
        };
        using var result = Pruning.Run(baseline, context, options);
        var report = Pruning.Report(result);
        report.Reference!["groupsWithExactlyTwo"] = GroupsWithExactlyTwo(result.Model);
        return report;
    }

    /// <summary>The fraction of groups of 4 consecutive inputs, over all Linear layers, holding exactly 2 non-zeros.</summary>
    private static double GroupsWithExactlyTwo(nn.Module<Tensor, Tensor> model)
    {
        long groups = 0;
        long exact = 0;
        foreach (var module in model.modules())
        {
            using var scope = NewDisposeScope();
            Tensor? weight = module switch
            {
                TorchSharp.Modules.Linear linear => linear.weight!.detach(),
                SparseLinear sparse => sparse.ToDenseWeight(),
                _ => null,
            };
            if (weight is null)
            {
                continue;
            }

            var counts = weight.ne(0).reshape(weight.shape[0], -1, 4).sum(-1);
            groups += counts.numel();
            exact += counts.eq(2).sum().item<long>();
        }

        return (double)exact / groups;
    }
}

/// <summary>
/// The small residual CNN with half of the channels of every prunable group removed (the residual stream pruned as one
/// group), fine-tuned: parameters and MACs fall to about a quarter (both sides of most convolutions shrink).
/// </summary>
public sealed class PruneStructuredResCnnScenario : IScenario
{
    public string Name => "prune-structured-rescnn";

    public string Description => "SmallResNet: 50% of channels removed by layer surgery, fine-tuned";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        global::Scenarios.Targets.ReferenceAtMost("parameterRatio", 0.5, "parameters ≤ half of the baseline"),
        global::Scenarios.Targets.ReferenceAtMost("macRatio", 0.5, "MACs ≤ half of the baseline"),
        global::Scenarios.Targets.DropAtMost(1.0),
        new("speedup reported at batch 1 and 64", r => r.Speedup is { Batch1: > 0, Batch64: > 0 }),
    ];

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = ScenarioBaseline.Load(ZooModel.SmallResNet, context);
        var fineTuning = Pruning.FineTuning(20);
        fineTuning.LearningRate = 0.05;
        using var result = baseline.Run(baseline.Pipeline(context)
            .AddStructuredPruning(new StructuredPruningOptions { Ratio = 0.5, Importance = new L1Importance(), FineTuning = fineTuning }));
        var report = result.Report;
        report.Reference!["parameterRatio"] = (double)report.Final.Parameters / report.Baseline.Parameters;
        report.Reference["macRatio"] = (double)report.Final.Macs / report.Baseline.Macs;
        return report;
    }
}
