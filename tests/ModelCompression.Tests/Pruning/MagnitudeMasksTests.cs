using ModelCompression.Pruning;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Pruning;

[TestFixture]
public sealed class MagnitudeMasksTests
{
    private static float[] Values(Tensor t) => t.to(float32).data<float>().ToArray();

    [Test]
    public void TopMagnitude_PrunesExactlyTheSmallest()
    {
        using var w = tensor(new float[] { 0.5f, -0.1f, 3, -2, 0.05f, 1 });
        using var mask = MagnitudeMasks.TopMagnitude(w, 0.5);
        Assert.That(Values(mask), Is.EqualTo(new float[] { 0, 0, 1, 1, 0, 1 }));
    }

    [Test]
    public void LayerWiseAndGlobal_DifferOnAHandBuiltPair()
    {
        using var small = tensor(new float[] { 0.1f, 0.2f, 0.3f, 0.4f });
        using var large = tensor(new float[] { 1, -2, 3, -4 });

        // Layer-wise 50%: each layer loses its own two smallest.
        using var a = MagnitudeMasks.TopMagnitude(small, 0.5);
        using var b = MagnitudeMasks.TopMagnitude(large, 0.5);
        Assert.That(Values(a), Is.EqualTo(new float[] { 0, 0, 1, 1 }));
        Assert.That(Values(b), Is.EqualTo(new float[] { 0, 0, 1, 1 }));

        // Global 50%: the four smallest of all eight are all in the first layer.
        var global = MagnitudeMasks.Global([small, large], 0.5);
        Assert.That(Values(global[0]), Is.EqualTo(new float[] { 0, 0, 0, 0 }));
        Assert.That(Values(global[1]), Is.EqualTo(new float[] { 1, 1, 1, 1 }));
        global.ForEach(m => m.Dispose());
    }

    [Test]
    public void Threshold_IsQualityTimesStandardDeviation()
    {
        // std (unbiased) of [-3, -1, 0, 1, 3] = sqrt(20 / 4) = 2.236; quality 0.5 → threshold 1.118.
        using var w = tensor(new float[] { -3, -1, 0, 1, 3 });
        using var mask = MagnitudeMasks.Threshold(w, 0.5);
        Assert.That(Values(mask), Is.EqualTo(new float[] { 1, 0, 0, 0, 1 }));
    }

    [TestCase(2, 4)]
    [TestCase(1, 4)]
    [TestCase(3, 8)]
    public void NOfM_LinearWeight_KeepsExactlyNInEveryGroup(int n, int m)
    {
        using var w = randn(6, 16);
        using var mask = MagnitudeMasks.NOfM(w, n, m);
        using var groups = mask.reshape(6, 16 / m, m).sum(2);
        Assert.That(groups.eq(n).all().item<bool>(), Is.True);
        // The kept ones are the largest of their group.
        using var magnitude = w.abs().reshape(-1, m);
        using var keep = mask.reshape(-1, m).gt(0);
        using var keptMin = magnitude.where(keep, float.PositiveInfinity).min(1).values;
        using var prunedMax = magnitude.where(keep.logical_not(), float.NegativeInfinity).max(1).values;
        Assert.That(keptMin.ge(prunedMax).all().item<bool>(), Is.True);
    }

    [Test]
    public void NOfM_ConvWeight_GroupsAlongInputChannels()
    {
        using var w = randn(3, 8, 3, 3);
        using var mask = MagnitudeMasks.NOfM(w, 2, 4);
        // For every output channel and kernel position, each run of 4 input channels keeps 2.
        using var groups = mask.permute(0, 2, 3, 1).reshape(3, 3, 3, 2, 4).sum(-1);
        Assert.That(groups.eq(2).all().item<bool>(), Is.True);
    }

    [Test]
    public void NOfM_InputsNotAMultipleOfM_Throws()
    {
        using var w = randn(4, 10);
        Assert.Throws<ArgumentException>(() => MagnitudeMasks.NOfM(w, 2, 4).Dispose());
    }
}
