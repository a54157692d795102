using ModelCompression.Quantization;
using ModelCompression.Quantization.Kernels;
using NUnit.Framework;

namespace ModelCompression.Tests.Quantization;

[TestFixture]
public sealed class QuantizationMathTests
{
    private static float[] Weights(int n, int k, int seed)
    {
        var random = new Random(seed);
        var w = new float[n * k];
        for (int i = 0; i < w.Length; i++)
        {
            // Rows with very different ranges, so per-channel and per-group scales matter.
            w[i] = (float)((random.NextDouble() * 2 - 1) * (1 + (i / k)));
        }

        return w;
    }

    private static IEnumerable<TestCaseData> Schemes()
    {
        yield return new TestCaseData(8, QuantizationGranularity.PerTensor).SetName("int8 per tensor");
        yield return new TestCaseData(8, QuantizationGranularity.PerChannel).SetName("int8 per channel");
        yield return new TestCaseData(8, QuantizationGranularity.PerGroup(16)).SetName("int8 per group 16");
        yield return new TestCaseData(4, QuantizationGranularity.PerGroup(8)).SetName("int4 per group 8");
        yield return new TestCaseData(4, QuantizationGranularity.PerGroup(32)).SetName("int4 per group 32");
    }

    [TestCaseSource(nameof(Schemes))]
    public void RoundTrip_ErrorIsAtMostHalfAStep(int bits, QuantizationGranularity granularity)
    {
        int n = 7, k = 45;
        var w = Weights(n, k, 1);
        var matrix = QuantizedMatrix.FromFloat(w, n, k, bits, granularity, [], false);
        var restored = matrix.Dequantize();
        int qmax = bits == 8 ? 127 : 7;
        for (int row = 0; row < n; row++)
        {
            for (int i = 0; i < k; i++)
            {
                float scale = matrix.ScaleAt(row, i);
                Assert.That(Math.Abs(matrix.Q[(row * k) + i]), Is.LessThanOrEqualTo(qmax));
                Assert.That(restored[(row * k) + i], Is.EqualTo(w[(row * k) + i]).Within((scale / 2) * 1.0001));
            }
        }
    }

    [Test]
    public void FinerGranularity_HasSmallerError()
    {
        int n = 16, k = 64;
        var w = Weights(n, k, 2);
        double Error(QuantizationGranularity g, int bits)
        {
            var restored = QuantizedMatrix.FromFloat(w, n, k, bits, g, [], false).Dequantize();
            return restored.Zip(w).Sum(p => (p.First - p.Second) * (p.First - p.Second));
        }

        Assert.That(Error(QuantizationGranularity.PerChannel, 8), Is.LessThan(Error(QuantizationGranularity.PerTensor, 8)));
        Assert.That(Error(QuantizationGranularity.PerGroup(16), 4), Is.LessThan(Error(QuantizationGranularity.PerGroup(64), 4)));
        Assert.That(Error(QuantizationGranularity.PerGroup(16), 8), Is.LessThan(Error(QuantizationGranularity.PerGroup(16), 4)));
    }

    [TestCase(1)]
    [TestCase(2)]
    [TestCase(3)]
    [TestCase(4)]
    [TestCase(5)]
    [TestCase(7)]
    public void BitPacking_RoundTripsEveryValueIncludingOddWidths(int bits)
    {
        int n = 5, k = 15;
        var w = Weights(n, k, 3);
        var granularity = bits == 4 ? QuantizationGranularity.PerGroup(8) : QuantizationGranularity.PerChannel;
        var matrix = QuantizedMatrix.FromFloat(w, n, k, bits, granularity, [], false);
        var packed = matrix.PackBits();
        Assert.That(packed, Has.Length.EqualTo(n * (((k * bits) + 7) / 8)));
        Assert.That(QuantizedMatrix.UnpackBits(packed, n, k, bits), Is.EqualTo(matrix.Q));
        int levels = bits == 1 ? 2 : (2 * QuantizedMatrix.MaxLevel(bits)) + 1;
        Assert.That(matrix.Q.Distinct().Count(), Is.EqualTo(levels).Or.GreaterThan(Math.Min(levels, 12)));
        Assert.That(matrix.Q.All(q => Math.Abs((int)q) <= QuantizedMatrix.MaxLevel(bits) && (bits > 1 || q != 0)), Is.True);
    }

    [Test]
    public void BinaryWeights_AreSignTimesTheMeanMagnitude()
    {
        float[] w = [0.5f, -1.5f, 2f, -0f, 3f, -1f, 1f, 1f];
        var matrix = QuantizedMatrix.FromFloat(w, 2, 4, 1, QuantizationGranularity.PerChannel, [], false);
        Assert.That(matrix.Q, Is.EqualTo(new sbyte[] { 1, -1, 1, 1, 1, -1, 1, 1 }));
        Assert.That(matrix.Scales, Is.EqualTo(new[] { 1f, 1.5f }));
        Assert.That(matrix.Dequantize(), Is.EqualTo(new[] { 1f, -1f, 1f, 1f, 1.5f, -1.5f, 1.5f, 1.5f }));
    }

    [Test]
    public void Int4Scales_AreExactlyRepresentableInFloat16()
    {
        var w = Weights(4, 32, 4);
        var matrix = QuantizedMatrix.FromFloat(w, 4, 32, 4, QuantizationGranularity.PerGroup(16), [], false);
        Assert.That(matrix.Scales.All(s => (float)(Half)s == s), Is.True);
    }

    [Test]
    public void ActivationRange_AsymmetricCoversZeroAndSymmetricCentres()
    {
        var (scale, zero) = QuantizedActivations.Range(-1, 3, symmetric: false);
        Assert.That(scale, Is.EqualTo(4f / 127).Within(1e-7));
        Assert.That(zero, Is.EqualTo(32f));
        (scale, zero) = QuantizedActivations.Range(2, 3, symmetric: false);
        Assert.That(zero, Is.EqualTo(0f), "the range is widened to include 0, so zero stays exact");
        Assert.That(scale, Is.EqualTo(3f / 127).Within(1e-7));
        (scale, zero) = QuantizedActivations.Range(-2, 1, symmetric: true);
        Assert.That(zero, Is.EqualTo(64f));
        Assert.That(scale, Is.EqualTo(2f / 63).Within(1e-7));
        Assert.Throws<ArgumentException>(() => QuantizedActivations.Range(float.NaN, 1, false));
    }
}
