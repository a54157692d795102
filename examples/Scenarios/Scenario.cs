using ModelCompression;
using ModelCompression.Samples;

namespace Scenarios;

/// <summary>What a scenario gets from the command line.</summary>
/// <param name="Seed">The seed of data split, training and compression.</param>
/// <param name="CacheDirectory">Where trained baselines are cached, or null to always train.</param>
/// <param name="Log">Where progress lines go.</param>
public sealed record ScenarioContext(int Seed, string? CacheDirectory, TextWriter Log);

/// <summary>One named end-to-end case.</summary>
public interface IScenario
{
    string Name { get; }

    string Description { get; }

    CompressionReport Run(ScenarioContext context);
}

/// <summary>The scenarios, by name. Technique issues add theirs here.</summary>
public static class ScenarioCatalog
{
    public static IReadOnlyList<IScenario> All { get; } =
    [
        new BaselineScenario("baseline-lenet300", ZooModel.LeNet300100),
        new BaselineScenario("baseline-lenet5", ZooModel.LeNet5),
        new BaselineScenario("baseline-smallresnet", ZooModel.SmallResNet),
    ];
}

/// <summary>Trains a zoo model and reports it, with no compression step: the reference every other scenario compares to.</summary>
public sealed class BaselineScenario(string name, ZooModel model) : IScenario
{
    public string Name { get; } = name;

    public string Description => $"train {ModelZoo.DisplayName(model)} and report it (no compression)";

    public CompressionReport Run(ScenarioContext context)
    {
        using var split = MnistDigits.LoadBundled().Split(8000, context.Seed, ModelZoo.Layout(model));
        var trained = ZooTraining.TrainOrLoad(model, split, context.CacheDirectory, context.Seed);
        using var net = trained.Model;
        context.Log.WriteLine(trained.FromCache
            ? $"{ModelZoo.DisplayName(model)}: reused cached weights."
            : $"{ModelZoo.DisplayName(model)}: trained in {trained.Seconds:0.0} s.");

        using var result = CompressionPipeline.Create()
            .WithModelName(ModelZoo.DisplayName(model))
            .WithSeed(context.Seed)
            .Build()
            .Run(net, new CompressionData(split.Train, split.Test));
        var report = result.Report;
        report.Reference = new Dictionary<string, double>
        {
            ["trainingSeconds"] = trained.Seconds,
            ["trainSamples"] = split.Train.Count,
            ["testSamples"] = split.Test.Count,
        };
        return report;
    }
}
