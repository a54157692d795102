using ModelCompression.Data;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Data;

[TestFixture]
public sealed class TensorDatasetTests
{
    private static TensorDataset Numbered(int n) =>
        new(arange(n, dtype: float32).reshape(n, 1), arange(n, dtype: int64));

    [Test]
    public void GetBatches_InOrder_CoversEverySampleOnce()
    {
        using var data = Numbered(10);
        var sizes = new List<long>();
        var seen = new List<long>();
        foreach (var (x, y) in data.ScopedBatches(4))
        {
            sizes.Add(x.shape[0]);
            seen.AddRange(y.data<long>());
        }

        Assert.That(sizes, Is.EqualTo(new long[] { 4, 4, 2 }));
        Assert.That(seen, Is.EqualTo(Enumerable.Range(0, 10).Select(i => (long)i)));
    }

    [Test]
    public void GetBatches_Shuffled_IsAPermutationThatDependsOnlyOnTheSeed()
    {
        using var data = Numbered(50);
        long[] Order(int seed) => data.ScopedBatches(7, shuffle: true, seed: seed).SelectMany(b => b.Target.data<long>().ToArray()).ToArray();
        var a = Order(3);
        Assert.That(a.OrderBy(v => v), Is.EqualTo(Enumerable.Range(0, 50).Select(i => (long)i)));
        Assert.That(Order(3), Is.EqualTo(a));
        Assert.That(Order(4), Is.Not.EqualTo(a));
    }

    [Test]
    public void Constructor_CopiesTheCallersTensors()
    {
        using var x = ones(3, 2);
        using var y = zeros(3, dtype: int64);
        using var data = new TensorDataset(x, y);
        x.fill_(5);
        Assert.That(data.Inputs.sum().item<float>(), Is.EqualTo(6f));
        Assert.That(data.SampleShape, Is.EqualTo(new long[] { 2 }));
    }

    [Test]
    public void Constructor_BadInput_Throws()
    {
        Assert.Throws<ArgumentException>(() => new TensorDataset(zeros(0, 3), zeros(0, dtype: int64)));
        Assert.Throws<ArgumentException>(() => new TensorDataset(zeros(3, 3), zeros(2, dtype: int64)));
        using var nan = zeros(2, 2);
        nan[1, 1] = float.NaN;
        var ex = Assert.Throws<ArgumentException>(() => new TensorDataset(nan, zeros(2, dtype: int64)));
        Assert.That(ex!.Message, Does.Contain("NaN"));
    }

    [Test]
    public void ScopedBatches_LeaveNoLiveTensors()
    {
        using var data = Numbered(20);
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long before = TestModels.SettledTensorCount();
        foreach (var (x, _) in data.ScopedBatches(3, shuffle: true))
        {
            _ = (x * 2).sum();
        }

        Assert.That(Tensor.TotalCount, Is.EqualTo(before));
    }
}
