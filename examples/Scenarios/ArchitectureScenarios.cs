using System.Text.Json;
using ModelCompression;
using ModelCompression.Architecture;
using ModelCompression.Distillation;
using ModelCompression.Samples;
using ModelCompression.Training;

namespace Scenarios;

/// <summary>LeNet-5 with both convolutions rewritten as depthwise-separable ones, then recovered by distillation from the original.</summary>
public sealed class DepthwiseSeparableLeNet5Scenario : IScenario
{
    public string Name => "dwsep-lenet5";

    public string Description => "LeNet-5: convolutions → depthwise-separable (rank-1 init), distillation recovery";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        global::Scenarios.Targets.ReferenceAtLeast("rewrittenMacReduction", 3, "rewritten layers use ≥ 3× fewer MACs"),
        global::Scenarios.Targets.DropAtMost(1.0),
    ];

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = ScenarioBaseline.Load(ZooModel.LeNet5, context);
        var recovery = Pruning.FineTuning(10);
        recovery.LearningRate = 0.01;
        using var result = baseline.Run(baseline.Pipeline(context)
            .AddDepthwiseSeparableRewrite(new DepthwiseSeparableRewriteOptions())
            .AddDistillation(new DistillationOptions { Alpha = 0.7, Temperature = 4, Training = recovery }));
        var report = result.Report;
        report.Reference!["beforeRecoveryAccuracy"] = report.Steps[0].Accuracy;

        // The convolutions' MACs before (117,600 + 240,000) against their depthwise + pointwise replacements.
        long rewritten = report.Layers!.Where(l => l.Name.StartsWith("conv", StringComparison.Ordinal)).Sum(l => l.Macs);
        report.Reference["rewrittenMacReduction"] = (117_600.0 + 240_000.0) / rewritten;
        return report;
    }
}

/// <summary>The residual CNN searched down to half its MACs (NetAdapt-style), with the search trace written beside the report.</summary>
public sealed class SearchResCnnScenario : IScenario
{
    public string Name => "search-rescnn";

    public string Description => "SmallResNet: budgeted search to 50% of the MACs; trace in <report>.trace.json";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        new("MACs ≤ 50% of the baseline", r => r.Final.Macs <= r.Baseline.Macs * 0.5),
        global::Scenarios.Targets.DropAtMost(1.0),
    ];

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = ScenarioBaseline.Load(ZooModel.SmallResNet, context);
        var shortTuning = Pruning.FineTuning(1);
        var step = new BudgetedSearchStep(new BudgetedSearchOptions
        {
            Kind = SearchBudgetKind.Macs,
            Fraction = 0.5,
            StepFraction = 0.15,
            ShortFineTuning = shortTuning,
            FinalFineTuning = Pruning.FineTuning(5),
        });
        using var result = baseline.Run(baseline.Pipeline(context).AddStep(step));
        var report = result.Report;
        report.Reference!["candidatesTried"] = step.LastTrace.Count;
        report.Reference["iterations"] = step.LastTrace.Select(c => c.Iteration).DefaultIfEmpty(0).Max();

        string tracePath = Path.ChangeExtension(context.ReportPath, ".trace.json");
        File.WriteAllText(tracePath, JsonSerializer.Serialize(step.LastTrace, new JsonSerializerOptions { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.CamelCase }));
        context.Log.WriteLine($"search trace: {tracePath}");
        return report;
    }
}
