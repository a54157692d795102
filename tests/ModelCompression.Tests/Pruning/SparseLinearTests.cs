using ModelCompression.Metrics;
using ModelCompression.Pruning;
using ModelCompression.Pruning.Kernels;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Pruning;

[TestFixture]
public sealed class SparseLinearTests
{
    private static TorchSharp.Modules.Linear PrunedLinear(long inputs, long outputs, double sparsity, int seed, bool bias = true)
    {
        torch.random.manual_seed(seed);
        var linear = nn.Linear(inputs, outputs, hasBias: bias);
        using var noGrad = no_grad();
        using var mask = rand(outputs, inputs).ge(sparsity);
        linear.weight!.mul_(mask);
        return linear;
    }

    [TestCase(1, 1, 0.0, 1)]
    [TestCase(37, 53, 0.7, 1)]
    [TestCase(37, 53, 0.7, 3)]
    [TestCase(64, 100, 0.9, 5)]
    [TestCase(300, 784, 0.95, 17)]
    [TestCase(300, 784, 0.95, 64)]
    [TestCase(10, 33, 0.5, 70)]
    [TestCase(129, 257, 0.99, 65)]
    [TestCase(8, 8, 1.0, 9)]
    [TestCase(1024, 1024, 0.9, 1)]
    [TestCase(1024, 1024, 0.9, 2)]
    [TestCase(1023, 1025, 0.8, 4)]
    public void Forward_EqualsDense(long outputs, long inputs, double sparsity, int batch)
    {
        using var linear = PrunedLinear(inputs, outputs, sparsity, seed: (int)(outputs + inputs));
        using var sparse = SparseLinear.FromLinear(linear);
        using var x = randn(batch, inputs);
        using var noGrad = no_grad();
        using var expected = linear.call(x);
        using var actual = sparse.call(x);
        double scale = Math.Max(1e-6, expected.abs().max().item<float>());
        Assert.That((actual - expected).abs().max().item<float>() / scale, Is.LessThan(1e-5));
    }

    [Test]
    public void Forward_ManyInputs_UsesFourByteIndicesAndStillMatches()
    {
        using var linear = PrunedLinear(70_000, 3, 0.99, seed: 2);
        using var sparse = SparseLinear.FromLinear(linear);
        Assert.That(sparse.state_dict()["columns"].dtype, Is.EqualTo(ScalarType.Int32));
        using var noGrad = no_grad();
        foreach (int batch in new[] { 2, 64 })
        {
            using var x = randn(batch, 70_000);
            Assert.That(sparse.call(x).allclose(linear.call(x), rtol: 1e-5, atol: 1e-5), Is.True, $"batch {batch}");
        }
    }

    [Test]
    public void Forward_NonContiguousAndHigherRankInputs()
    {
        using var linear = PrunedLinear(12, 5, 0.6, seed: 3);
        using var sparse = SparseLinear.FromLinear(linear);
        using var wide = randn(4, 24);
        using var view = wide.narrow(1, 6, 12); // not contiguous
        using var cube = randn(2, 3, 12);
        using var noGrad = no_grad();
        Assert.That(sparse.call(view).allclose(linear.call(view), rtol: 1e-5, atol: 1e-6), Is.True);
        using var y = sparse.call(cube);
        Assert.That(y.shape, Is.EqualTo(new long[] { 2, 3, 5 }));
        Assert.That(y.allclose(linear.call(cube), rtol: 1e-5, atol: 1e-6), Is.True);
    }

    [Test]
    public void Forward_WithGradients_FallsBackToAnAutogradPath()
    {
        using var linear = PrunedLinear(6, 4, 0.5, seed: 4);
        using var sparse = SparseLinear.FromLinear(linear);
        using var x = randn(3, 6).requires_grad_();
        using var y = sparse.call(x);
        y.sum().backward();
        Assert.That(x.grad, Is.Not.Null);
        using var noGrad = no_grad();
        using var column = linear.weight!.detach().sum(0, keepdim: true);
        using var expected = column.repeat(3, 1);
        Assert.That(x.grad!.allclose(expected, rtol: 1e-5, atol: 1e-6), Is.True);
    }

    [Test]
    public void Storage_CountsAndDenseRoundTrip()
    {
        using var linear = PrunedLinear(100, 50, 0.9, seed: 5);
        using var sparse = SparseLinear.FromLinear(linear);
        using var nonzero = linear.weight!.count_nonzero();
        long nnz = nonzero.item<long>();
        Assert.That(sparse.StoredWeights, Is.EqualTo(nnz));
        Assert.That(ModelMetrics.CountParameters(sparse), Is.EqualTo((100 * 50) + 50));
        Assert.That(ModelMetrics.CountNonzeroParameters(sparse), Is.EqualTo(nnz + 50));
        // In memory: values (4 B) + 2-byte column indices + 51 row offsets (4 B) + bias (4 B).
        Assert.That(ModelMetrics.TensorBytes(sparse), Is.EqualTo((nnz * 6) + (51 * 4) + (50 * 4)));
        // In the file: the values and entropy-coded positions, well under the in-memory CSR.
        Assert.That(ModelMetrics.SizeInBytes(sparse), Is.LessThan((nnz * 5) + (50 * 4) + 100));
        using var dense = sparse.ToDenseWeight();
        Assert.That(dense.eq(linear.weight!).all().item<bool>(), Is.True);
        using var x = zeros(1, 100);
        Assert.That(ModelMetrics.CountMacs(sparse, x), Is.EqualTo(nnz));
    }

    [Test]
    public void FromLinear_NonFiniteWeight_Throws()
    {
        using var linear = nn.Linear(3, 3);
        using (no_grad())
        {
            linear.weight![0, 0] = float.NaN;
        }

        Assert.Throws<ArgumentException>(() => SparseLinear.FromLinear(linear));
    }

    [Test]
    public void Forward_WrongFeatureCount_Throws()
    {
        using var linear = PrunedLinear(6, 4, 0.5, seed: 6);
        using var sparse = SparseLinear.FromLinear(linear);
        using var x = randn(2, 7);
        Assert.Throws<ArgumentException>(() => sparse.call(x));
    }

    [Test]
    public void SplitByNonzeros_BalancesWork()
    {
        int[] offsets = [0, 10, 10, 20, 60, 61, 100];
        var bounds = CsrKernel.SplitByNonzeros(offsets, 2);
        Assert.That(bounds, Is.EqualTo(new[] { 0, 4, 6 }));
    }
}
