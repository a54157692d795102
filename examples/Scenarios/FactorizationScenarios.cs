using ModelCompression;
using ModelCompression.Factorization;
using ModelCompression.Samples;

namespace Scenarios;

/// <summary>
/// LeNet-300-100 under a global budget of 4× fewer parameters in its Linear layers, ranks allocated by energy lost per
/// parameter saved, then fine-tuned: accuracy before and after fine-tuning, and each layer's rank.
/// </summary>
public sealed class SvdLeNet300Scenario : IScenario
{
    public string Name => "svd-lenet300";

    public string Description => "LeNet-300-100: SVD with a global budget of 4× fewer parameters, fine-tuned";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        global::Scenarios.Targets.ReferenceAtMost("factorizedParameterRatio", 0.25, "factorized layers keep ≤ 1/4 of their parameters"),
        global::Scenarios.Targets.DropAtMost(0.5),
    ];

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = ScenarioBaseline.Load(ZooModel.LeNet300100, context);
        using var result = baseline.Run(baseline.Pipeline(context)
            .AddSvdFactorization(new SvdFactorizationOptions { Budget = new RankBudget { Kind = BudgetKind.Parameters, Fraction = 0.25 } })
            .AddFineTuning(FineTuning()));
        var report = result.Report;
        report.Reference!["beforeFineTuneAccuracy"] = report.Steps[0].Accuracy;

        // Weights of the three Linear layers, as stored now, against their dense 266,200.
        long weights = report.Layers!.Where(l => l.Rank is not null || l.Type == "Linear").Sum(l => l.Parameters - Bias(l.Name));
        report.Reference["factorizedParameterRatio"] = weights / 266_200.0;
        return report;

        static long Bias(string layer) => layer switch { "fc1" => 300, "fc2" => 100, "fc3" => 10, _ => 0 };
    }

    /// <summary>A gentle fine-tuning: the factors start close to the trained weights.</summary>
    private static ModelCompression.Training.TrainingOptions FineTuning()
    {
        var options = Pruning.FineTuning(5);
        options.LearningRate = 0.005;
        return options;
    }
}
