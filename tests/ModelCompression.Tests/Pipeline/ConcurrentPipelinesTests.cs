using ModelCompression.Data;
using ModelCompression.Metrics;
using ModelCompression.Tests.Support;
using ModelCompression.Training;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace ModelCompression.Tests.Pipeline;

/// <summary>The same seed gives the same model whatever else runs in the process.</summary>
[TestFixture]
public sealed class ConcurrentPipelinesTests
{
    private static nn.Module<Tensor, Tensor> DropoutMlp(int seed)
    {
        torch.random.manual_seed(seed);
        return nn.Sequential(("fc1", nn.Linear(4, 32)), ("relu", nn.ReLU()), ("drop", nn.Dropout(0.3)), ("fc2", nn.Linear(32, 3)));
    }

    // Two recipes that draw from LibTorch's generator: dropout while training, layers built by the steps.
    private static CompressionPipeline Recipe(string name, int seed)
    {
        var builder = CompressionPipeline.Create()
            .WithLatencyMeasurement(new LatencyOptions { Enabled = false })
            .WithAccuracyCheck(1.0)
            .WithSeed(seed);
        var training = new TrainingOptions { Epochs = 3, BatchSize = 16, LearningRate = 0.01 };
        return (name switch
        {
            "fine-tune" => builder.AddFineTuning(training),
            _ => builder.AddMagnitudePruning(0.5, training).AddQuantizationAwareTraining(4, training),
        }).Build();
    }

    private static string RunOnce(string recipe, int seed, nn.Module<Tensor, Tensor> model, CompressionData data)
    {
        using var result = Recipe(recipe, seed).Run(model, data);
        return TestModels.StateHash(result.Model);
    }

    [Test]
    public void TwoPipelinesAtOnce_GiveTheModelsTheyGiveAlone()
    {
        using var model = DropoutMlp(50);
        using var train = TestModels.Classification(400, 51);
        using var test = TestModels.Classification(100, 52);
        var data = new CompressionData(train, test);
        var runs = new[] { ("fine-tune", 1), ("fine-tune", 2), ("prune-qat", 1) };
        var alone = runs.Select(r => RunOnce(r.Item1, r.Item2, model, data)).ToArray();
        Assert.That(alone[0], Is.Not.EqualTo(alone[1]), "the seed matters: dropout draws from the generator");

        // Each pair of recipes (the same recipe with another seed, different recipes) run together.
        foreach (var (a, b) in new[] { (0, 1), (0, 2), (1, 2) })
        {
            var first = Task.Run(() => RunOnce(runs[a].Item1, runs[a].Item2, model, data));
            var second = Task.Run(() => RunOnce(runs[b].Item1, runs[b].Item2, model, data));
            Task.WaitAll(first, second);
            Assert.That(first.Result, Is.EqualTo(alone[a]), $"run {a} beside run {b}");
            Assert.That(second.Result, Is.EqualTo(alone[b]), $"run {b} beside run {a}");
        }
    }
}
