using ModelCompression.Quantization;
using ModelCompression.Quantization.Kernels;
using NUnit.Framework;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Quantization;

[TestFixture]
public sealed unsafe class Int8KernelTests
{
    private static IEnumerable<Int8KernelPath> Paths => Int8Kernel.SupportedPaths;

    /// <summary>Random integer weights in the kernel's range and matching scales.</summary>
    private static (sbyte[] Q, float[] Scales, float[] Bias) RandomWeights(Random random, int n, int k, int bits, int groupSize)
    {
        int qmax = bits == 8 ? 127 : 7;
        int groups = groupSize == 0 ? 1 : (k + groupSize - 1) / groupSize;
        var q = new sbyte[n * k];
        for (int i = 0; i < q.Length; i++)
        {
            q[i] = (sbyte)random.Next(-qmax, qmax + 1);
        }

        var scales = Enumerable.Range(0, n * groups).Select(_ => (float)(0.001 + random.NextDouble() * 0.01)).ToArray();
        var bias = Enumerable.Range(0, n).Select(_ => (float)random.NextDouble() - 0.5f).ToArray();
        return (q, scales, bias);
    }

    private static float[] RandomInput(Random random, int rows, int k) =>
        Enumerable.Range(0, rows * k).Select(_ => (float)(random.NextDouble() * 4 - 1)).ToArray();

    private static int[] Raw(PackedWeights packed, QuantizedActivations acts, int rows, Int8KernelPath path)
    {
        var raw = new int[rows * packed.N];
        var y = new float[rows * packed.N];
        fixed (int* pr = raw)
        fixed (float* py = y)
        {
            Int8Kernel.Multiply(packed, acts, rows, py, packed.N, false, path, pr);
        }

        return raw;
    }

    private static float[] Float(PackedWeights packed, QuantizedActivations acts, int rows, Int8KernelPath path, bool relu = false)
    {
        var y = new float[rows * packed.N];
        fixed (float* py = y)
        {
            Int8Kernel.Multiply(packed, acts, rows, py, packed.N, relu, path);
        }

        return y;
    }

    [Test]
    public void SupportedPaths_IncludeScalarAndEndWithTheBestPath()
    {
        Assert.That(Int8Kernel.SupportedPaths, Does.Contain(Int8KernelPath.Scalar));
        Assert.That(Int8Kernel.SupportedPaths[^1], Is.EqualTo(Int8Kernel.BestPath));
        Assert.That(Int8Kernel.IsSupported(Int8Kernel.BestPath), Is.True);
    }

    [TestCase(1, 1, 1, 8)]
    [TestCase(3, 17, 33, 8)]
    [TestCase(5, 31, 100, 8)]
    [TestCase(9, 48, 257, 8)]
    [TestCase(1, 300, 784, 8)]
    [TestCase(3, 17, 33, 4)]
    [TestCase(6, 40, 130, 4)]
    public void EveryPath_GivesTheScalarInt32SumsBitForBit(int rows, int n, int k, int bits)
    {
        var random = new Random(n * 1000 + k + bits);
        var (q, scales, bias) = RandomWeights(random, n, k, bits, 0);
        var packed = PackedWeights.Create(q, n, k, bits, 0, scales, bias);
        var x = RandomInput(random, rows, k);
        using var acts = QuantizedActivations.Quantize(x, rows, packed, ActivationMode.PerRow, 0, 0, false);

        var expected = new int[rows * n];
        for (int r = 0; r < rows; r++)
        {
            for (int o = 0; o < n; o++)
            {
                int sum = 0;
                for (int i = 0; i < k; i++)
                {
                    sum += acts.Data[(r * acts.Stride) + i] * q[(o * k) + i];
                }

                expected[(r * n) + o] = sum;
            }
        }

        foreach (var path in Paths)
        {
            Assert.That(Raw(packed, acts, rows, path), Is.EqualTo(expected), $"path {path}");
        }
    }

    [TestCase(7, 33, 100, 8, 32)]
    [TestCase(4, 16, 64, 4, 16)]
    [TestCase(5, 19, 203, 4, 64)]
    public void EveryPath_GivesTheScalarFloatOutputBitForBit_WithGroups(int rows, int n, int k, int bits, int group)
    {
        var random = new Random(rows + n + k);
        var (q, scales, bias) = RandomWeights(random, n, k, bits, group);
        var packed = PackedWeights.Create(q, n, k, bits, group, scales, bias);
        var x = RandomInput(random, rows, k);
        using var acts = QuantizedActivations.Quantize(x, rows, packed, ActivationMode.PerBlock, 0, 0, false);
        var expected = Float(packed, acts, rows, Int8KernelPath.Scalar, relu: true);
        Assert.That(expected.Min(), Is.GreaterThanOrEqualTo(0f));
        foreach (var path in Paths)
        {
            Assert.That(Float(packed, acts, rows, path, relu: true), Is.EqualTo(expected), $"path {path}");
        }
    }

    [TestCase(8, 0)]
    [TestCase(4, 32)]
    public void FloatOutput_MatchesTheDequantizedProduct(int bits, int group)
    {
        var random = new Random(11);
        int rows = 6, n = 21, k = 96;
        var (q, scales, bias) = RandomWeights(random, n, k, bits, group);
        var packed = PackedWeights.Create(q, n, k, bits, group, scales, bias);
        var x = RandomInput(random, rows, k);
        using var acts = QuantizedActivations.Quantize(x, rows, packed, group == 0 ? ActivationMode.PerRow : ActivationMode.PerBlock, 0, 0, false);
        var y = Float(packed, acts, rows, Int8Kernel.BestPath);
        int groups = group == 0 ? 1 : k / group;
        for (int r = 0; r < rows; r++)
        {
            for (int o = 0; o < n; o++)
            {
                double expected = bias[o];
                for (int i = 0; i < k; i++)
                {
                    int b = group == 0 ? 0 : i / group;
                    double a = (acts.Data[(r * acts.Stride) + i] - acts.ZeroPoints[(r * groups) + b]) * acts.Scales[(r * groups) + b];
                    expected += a * q[(o * k) + i] * scales[(o * groups) + b];
                }

                Assert.That(y[(r * n) + o], Is.EqualTo(expected).Within(1e-4 * (1 + Math.Abs(expected))));
            }
        }
    }

    [Test]
    public void ActivationQuantization_ErrorIsAtMostHalfAStepInsideTheRange()
    {
        var random = new Random(3);
        var x = RandomInput(random, 4, 37);
        var packed = PackedWeights.Create(new sbyte[37], 1, 37, 8, 0, [1f], []);
        foreach (bool symmetric in new[] { false, true })
        {
            using var acts = QuantizedActivations.Quantize(x, 4, packed, ActivationMode.PerRow, 0, 0, symmetric);
            for (int r = 0; r < 4; r++)
            {
                float s = acts.Scales[r], z = acts.ZeroPoints[r];
                for (int i = 0; i < 37; i++)
                {
                    int level = acts.Data[(r * acts.Stride) + i];
                    Assert.That(level, Is.InRange(0, 127));
                    Assert.That((level - z) * s, Is.EqualTo(x[(r * 37) + i]).Within((s / 2) + 1e-6), $"symmetric={symmetric}");
                }
            }
        }
    }

    [Test]
    public void StaticActivations_ClampOutsideTheCalibratedRange()
    {
        var packed = PackedWeights.Create(new sbyte[8], 1, 8, 8, 0, [1f], []);
        var (scale, zero) = QuantizedActivations.Range(0, 1, symmetric: false);
        float[] x = [-5, 0, 0.5f, 1, 7, 0.25f, 0.75f, 1e9f];
        using var acts = QuantizedActivations.Quantize(x, 1, packed, ActivationMode.Static, scale, zero, false);
        var levels = Enumerable.Range(0, 8).Select(i => (int)acts.Data[i]).ToArray();
        Assert.That(levels, Is.EqualTo(new[] { 0, 0, 64, 127, 127, 32, 95, 127 }));
    }

    [Test]
    public void DynamicActivations_RejectNaN()
    {
        var packed = PackedWeights.Create(new sbyte[8], 1, 8, 8, 0, [1f], []);
        float[] x = [1, 2, float.NaN, 4, 5, 6, 7, 8];
        Assert.Throws<ArgumentException>(() => QuantizedActivations.Quantize(x, 1, packed, ActivationMode.PerRow, 0, 0, false).Dispose());
    }

    [Test]
    public void UnsupportedPath_Throws()
    {
        var missing = Enum.GetValues<Int8KernelPath>().Where(p => !Int8Kernel.IsSupported(p)).ToList();
        Assume.That(missing, Is.Not.Empty);
        var packed = PackedWeights.Create(new sbyte[8], 1, 8, 8, 0, [1f], []);
        using var acts = QuantizedActivations.Quantize(new float[8], 1, packed, ActivationMode.PerRow, 0, 0, false);
        Assert.Throws<PlatformNotSupportedException>(() => Float(packed, acts, 1, missing[0]));
    }
}
