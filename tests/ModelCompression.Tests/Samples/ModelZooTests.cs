using ModelCompression.Metrics;
using ModelCompression.Samples;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Samples;

[TestFixture]
public sealed class ModelZooTests
{
    [TestCase(ZooModel.LeNet300100, 266_610L, 266_200L)]
    [TestCase(ZooModel.LeNet5, 61_706L, 416_520L)]
    public void Create_KnownParameterAndMacCounts(ZooModel kind, long parameters, long macs)
    {
        using var model = ModelZoo.Create(kind);
        using var x = zeros(1, 1, 28, 28);
        Assert.That(ModelMetrics.CountParameters(model), Is.EqualTo(parameters));
        Assert.That(ModelMetrics.CountMacs(model, x), Is.EqualTo(macs));
        Assert.That(model.call(x).shape, Is.EqualTo(new long[] { 1, 10 }));
    }

    [Test]
    public void SmallResNet_HasBatchNormAndAResidualBlock()
    {
        using var model = ModelZoo.Create(ZooModel.SmallResNet);
        Assert.That(model.modules().OfType<TorchSharp.Modules.BatchNorm2d>().Count(), Is.EqualTo(4));
        Assert.That(model.modules().OfType<ResidualBlock>().Count(), Is.EqualTo(1));
        using var x = zeros(2, 1, 28, 28);
        Assert.That(model.call(x).shape, Is.EqualTo(new long[] { 2, 10 }));
    }

    [Test]
    public void Create_SameSeed_SameWeights()
    {
        using var a = ModelZoo.Create(ZooModel.LeNet5, 4);
        using var b = ModelZoo.Create(ZooModel.LeNet5, 4);
        using var c = ModelZoo.Create(ZooModel.LeNet5, 5);
        Assert.That(TestModels.StateHash(a), Is.EqualTo(TestModels.StateHash(b)));
        Assert.That(TestModels.StateHash(a), Is.Not.EqualTo(TestModels.StateHash(c)));
    }

    [Test]
    public void TrainOrLoad_SecondCallReadsTheCache()
    {
        var cache = Path.Combine(Path.GetTempPath(), $"zoo-{Guid.NewGuid():N}");
        try
        {
            using var split = MnistDigits.LoadBundled().Split(trainCount: 1000, seed: 0);
            var recipe = ZooTraining.Recipe(ZooModel.LeNet300100);
            var first = ZooTraining.TrainOrLoad(ZooModel.LeNet300100, split, cache, seed: 0);
            var second = ZooTraining.TrainOrLoad(ZooModel.LeNet300100, split, cache, seed: 0);
            using (first.Model)
            using (second.Model)
            {
                Assert.That(first.FromCache, Is.False);
                Assert.That(second.FromCache, Is.True);
                Assert.That(TestModels.StateHash(second.Model), Is.EqualTo(TestModels.StateHash(first.Model)));
                Assert.That(recipe.Epochs, Is.GreaterThan(0));
            }

            // Other training data (another split seed) never reuses those weights.
            using var other = MnistDigits.LoadBundled().Split(trainCount: 1000, seed: 1);
            var third = ZooTraining.TrainOrLoad(ZooModel.LeNet300100, other, cache, seed: 0);
            using (third.Model)
            {
                Assert.That(third.FromCache, Is.False);
            }
        }
        finally
        {
            Directory.Delete(cache, recursive: true);
        }
    }
}
