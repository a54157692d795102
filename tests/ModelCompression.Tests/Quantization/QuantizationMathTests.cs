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

    [Test]
    public void Int4Packing_RoundTripsEveryValueIncludingOddWidths()
    {
        int n = 5, k = 15;
        var w = Weights(n, k, 3);
        var matrix = QuantizedMatrix.FromFloat(w, n, k, 4, QuantizationGranularity.PerGroup(8), [], false);
        var packed = matrix.PackNibbles();
        Assert.That(packed, Has.Length.EqualTo(n * 8));
        Assert.That(QuantizedMatrix.UnpackNibbles(packed, n, k), Is.EqualTo(matrix.Q));
        Assert.That(matrix.Q.Distinct().Count(), Is.GreaterThan(10));
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
