using ModelCompression;
using ModelCompression.Distillation;
using ModelCompression.Modules;
using ModelCompression.Pruning;
using ModelCompression.Samples;
using ModelCompression.Training;
using TorchSharp;
using static TorchSharp.torch;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace Scenarios;

/// <summary>
/// TinyGpt on the Brown corpus pruned to half its blocks' parameters by heads, MLP width and depth (the step choosing
/// the mix by calibration KL), then distilled from the original on a fixed training budget; against the same smaller
/// architecture trained from scratch on the same budget. The pipeline run is the pruned and distilled model, so the
/// report's final figures (size, latency at batch 1 and 64) are its.
/// </summary>
public sealed class GptMinitronScenario : IScenario
{
    /// <summary>The training budget: this many windows of 64 tokens, one pass, for both the distilled and the from-scratch model.</summary>
    private const int BudgetWindows = 3072;

    public string Name => "gpt-minitron";

    public string Description => $"TinyGpt (Brown corpus): half the blocks' parameters pruned (heads, MLP width, depth) and distilled on {BudgetWindows} windows, against the same architecture trained from scratch on the same budget";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        new("pruned + distilled has lower perplexity than the same architecture from scratch", r => Get(r, "perplexityPrunedDistilled") < Get(r, "perplexityScratch")),
        new("about half the blocks' parameters removed (45–55%)", r => Get(r, "blockParametersRemoved") is >= 0.45 and <= 0.55),
        global::Scenarios.Targets.ReferenceAtLeast("speedupBatch64", 1.0, "the pruned model is no slower at batch 64"),
    ];

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = GptBaseline.Load(context, budgetWindows: BudgetWindows);
        var budget = baseline.Budget!;
        double dense = baseline.Perplexity(baseline.Model);
        context.Log.WriteLine($"  {"dense",-28} perplexity {dense,8:0.00}");

        var recipe = TinyGptTraining.Recipe(epochs: 1);
        recipe.Seed = context.Seed;

        var options = new TransformerPruningOptions
        {
            ParameterFraction = 0.5,
            CalibrationBatches = 4,
            CalibrationBatchSize = 32,
            FineTuning = recipe,
            Distillation = new RecoveryDistillation { Alpha = 0.5, Temperature = 1 },
        };
        var data = new CompressionData(budget, baseline.Test) { Evaluator = new PerplexityEvaluator(batchSize: 64), Calibration = baseline.Calibration };
        var watch = System.Diagnostics.Stopwatch.StartNew();
        using var result = CompressionPipeline.Create()
            .WithModelName("TinyGpt")
            .WithSeed(context.Seed)
            .AddTransformerPruning(options)
            .Build()
            .Run(baseline.Model, data);
        double prunedSeconds = watch.Elapsed.TotalSeconds;
        var report = result.Report;
        double distilled = report.Final.Accuracy;
        context.Log.WriteLine($"  {report.Steps[0].Message}");

        context.Log.WriteLine($"  {"pruned + distilled",-28} perplexity {distilled,8:0.00}   ({prunedSeconds:0} s: ranking, choice, distillation)");

        // The same architecture from scratch: the pruned model with every weight drawn again as TinyGpt initialises.
        using var scratch = ModuleCloner.DeepClone(result.Model);
        Reinitialise(scratch, context.Seed);
        watch.Restart();
        var scratchRecipe = TinyGptTraining.Recipe(epochs: 1);
        scratchRecipe.Seed = context.Seed;
        new Trainer(scratchRecipe).Train(scratch, budget, seed: context.Seed);
        double scratchSeconds = watch.Elapsed.TotalSeconds;
        double fromScratch = baseline.Perplexity(scratch);
        context.Log.WriteLine($"  {"same architecture, scratch",-28} perplexity {fromScratch,8:0.00}   ({scratchSeconds:0} s of training)");

        static long BlockParameters(nn.Module model) => model.named_parameters().Where(p => p.name.StartsWith("blocks.", StringComparison.Ordinal)).Sum(p => p.parameter.numel());
        long before = BlockParameters(baseline.Model), after = BlockParameters(result.Model);
        report.Reference = new Dictionary<string, double>
        {
            ["parameters"] = baseline.Model.parameters().Sum(p => p.numel()),
            ["parametersPruned"] = result.Model.parameters().Sum(p => p.numel()),
            ["blockParameters"] = before,
            ["blockParametersPruned"] = after,
            ["blockParametersRemoved"] = 1 - ((double)after / before),
            ["budgetWindows"] = budget.Count,
            ["perplexityDense"] = dense,
            ["perplexityPrunedDistilled"] = distilled,
            ["perplexityScratch"] = fromScratch,
            ["secondsPruneAndDistil"] = prunedSeconds,
            ["secondsScratch"] = scratchSeconds,
            ["speedupBatch1"] = report.Speedup?.Batch1 ?? double.NaN,
            ["speedupBatch64"] = report.Speedup?.Batch64 ?? double.NaN,
        };
        context.Log.WriteLine($"  speed-up over the dense model: {report.Speedup?.Batch1:0.00}× at batch 1, {report.Speedup?.Batch64:0.00}× at batch 64");
        return report;
    }

    /// <summary>Draws every weight again as <see cref="TinyGpt"/> initialises: N(0, 0.02) matrices, unit LayerNorm scales, zero biases.</summary>
    private static void Reinitialise(nn.Module model, int seed)
    {
        torch.random.manual_seed(seed);
        using var noGrad = no_grad();
        foreach (var (name, module) in model.named_modules())
        {
            foreach (var (parameterName, parameter) in module.named_parameters(recurse: false))
            {
                if (parameter.dim() >= 2)
                {
                    nn.init.normal_(parameter, 0, 0.02);
                }
                else if (module is TorchSharp.Modules.LayerNorm && parameterName == "weight")
                {
                    parameter.fill_(1);
                }
                else
                {
                    parameter.zero_();
                }
            }
        }
    }

    private static double Get(CompressionReport report, string key) =>
        report.Reference is not null && report.Reference.TryGetValue(key, out var v) ? v : double.NaN;
}
