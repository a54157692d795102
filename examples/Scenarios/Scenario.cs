using ModelCompression;
using ModelCompression.Samples;
using static TorchSharp.torch;

namespace Scenarios;

/// <summary>What a scenario gets from the command line.</summary>
/// <param name="Seed">The seed of data split, training and compression.</param>
/// <param name="CacheDirectory">Where trained baselines are cached, or null to always train.</param>
/// <param name="Log">Where progress lines go.</param>
/// <param name="ReportPath">Where the report JSON goes (scenarios write companion files beside it).</param>
public sealed record ScenarioContext(int Seed, string? CacheDirectory, TextWriter Log, string ReportPath);

/// <summary>A figure a scenario promises, checked against its report.</summary>
/// <param name="Description">What is promised, e.g. "≥ 92% of weights removed".</param>
/// <param name="Met">Whether the report meets it.</param>
public sealed record ScenarioTarget(string Description, Func<CompressionReport, bool> Met);

/// <summary>One named end-to-end case.</summary>
public interface IScenario
{
    string Name { get; }

    string Description { get; }

    /// <summary>The figures the scenario promises (the "must show"), checked after the run.</summary>
    IReadOnlyList<ScenarioTarget> Targets => [];

    CompressionReport Run(ScenarioContext context);
}

/// <summary>Common targets.</summary>
public static class Targets
{
    /// <summary>The final accuracy is at most <paramref name="points"/> percentage points below the baseline.</summary>
    public static ScenarioTarget DropAtMost(double points) =>
        new($"accuracy drop ≤ {points} points", r => (r.Baseline.Accuracy - r.Final.Accuracy) * 100 <= points + 1e-9);

    /// <summary>A reference figure is at least <paramref name="value"/>.</summary>
    public static ScenarioTarget ReferenceAtLeast(string key, double value, string description) =>
        new(description, r => r.Reference is not null && r.Reference.TryGetValue(key, out var v) && v >= value - 1e-12);

    /// <summary>A reference figure is at most <paramref name="value"/>.</summary>
    public static ScenarioTarget ReferenceAtMost(string key, double value, string description) =>
        new(description, r => r.Reference is not null && r.Reference.TryGetValue(key, out var v) && v <= value + 1e-12);
}

/// <summary>The scenarios, by name. Technique issues add theirs here.</summary>
public static class ScenarioCatalog
{
    public static IReadOnlyList<IScenario> All { get; } =
    [
        new BaselineScenario("baseline-lenet300", ZooModel.LeNet300100),
        new BaselineScenario("baseline-lenet5", ZooModel.LeNet5),
        new BaselineScenario("baseline-smallresnet", ZooModel.SmallResNet),
        new PruneLeNet300Scenario(),
        new PruneLeNet5Scenario(),
        new PruneTwoOfFourScenario(),
        new PruneStructuredResCnnScenario(),
        new SvdLeNet300Scenario(),
        new DistillMlpScenario(),
        new DistillRecoveryScenario(),
        new DepthwiseSeparableLeNet5Scenario(),
        new SearchResCnnScenario(),
        new PtqDynamicLeNet300Scenario(),
        new PtqStaticLeNet5Scenario(),
        new PtqInt4LeNet300Scenario(),
        new QatInt8LeNet5Scenario(),
        new QatInt4LeNet300Scenario(),
        new QatBinaryLeNet300Scenario(),
        new DeepCompressionLeNet300Scenario(),
        new DeepCompressionLeNet5Scenario(),
        new OnnxExportScenario(),
        new TradeOffsScenario(),
        new ZooMatrixScenario(),
        new GptPtqScenario(),
        new GptDecodeScenario(),
        new TextClassifierSmoothQuantScenario(),
        new GptSparsityScenario(),
        new GptMinitronScenario(),
        new TextClassifierDistillScenario(),
    ];
}

/// <summary>The bundled digits and a trained zoo model, as every scenario starts.</summary>
public sealed class ScenarioBaseline : IDisposable
{
    private ScenarioBaseline(ZooModel kind, MnistSplit split, TrainedModel trained)
    {
        Kind = kind;
        Split = split;
        Trained = trained;
    }

    public ZooModel Kind { get; }

    public MnistSplit Split { get; }

    public TrainedModel Trained { get; }

    public nn.Module<Tensor, Tensor> Model => Trained.Model;

    public string Name => ModelZoo.DisplayName(Kind);

    public CompressionData Data => new(Split.Train, Split.Test);

    public static ScenarioBaseline Load(ZooModel kind, ScenarioContext context)
    {
        var split = MnistDigits.LoadBundled().Split(8000, context.Seed, ModelZoo.Layout(kind));
        var trained = ZooTraining.TrainOrLoad(kind, split, context.CacheDirectory, context.Seed);
        context.Log.WriteLine(trained.FromCache
            ? $"{ModelZoo.DisplayName(kind)}: reused cached weights."
            : $"{ModelZoo.DisplayName(kind)}: trained in {trained.Seconds:0.0} s.");
        return new ScenarioBaseline(kind, split, trained);
    }

    /// <summary>A pipeline builder for this baseline: named after the model, seeded from the context.</summary>
    public CompressionPipelineBuilder Pipeline(ScenarioContext context) => CompressionPipeline.Create().WithModelName(Name).WithSeed(context.Seed);

    /// <summary>Builds the pipeline and runs it on this model and its digits; the report carries <see cref="Reference"/>.</summary>
    public CompressionResult Run(CompressionPipelineBuilder pipeline)
    {
        var result = pipeline.Build().Run(Model, Data);
        result.Report.Reference = Reference();
        return result;
    }

    /// <summary>Reference figures every report carries.</summary>
    public Dictionary<string, double> Reference() => new()
    {
        ["trainingSeconds"] = Trained.Seconds,
        ["trainSamples"] = Split.Train.Count,
        ["testSamples"] = Split.Test.Count,
    };

    public void Dispose()
    {
        Trained.Model.Dispose();
        Split.Dispose();
    }
}

/// <summary>Trains a zoo model and reports it, with no compression step: the reference every other scenario compares to.</summary>
public sealed class BaselineScenario(string name, ZooModel model) : IScenario
{
    public string Name { get; } = name;

    public string Description => $"train {ModelZoo.DisplayName(model)} and report it (no compression)";

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = ScenarioBaseline.Load(model, context);
        using var result = baseline.Run(baseline.Pipeline(context));
        return result.Report;
    }
}
