using ModelCompression.Quantization;
using NUnit.Framework;

namespace ModelCompression.Tests.Quantization;

[TestFixture]
public sealed class ObserverTests
{
    /// <summary>100,000 values from N(0, 1) (Box–Muller, seeded) with one planted outlier at 1,000.</summary>
    private static float[] GaussianWithOutlier(bool relu = false)
    {
        var random = new Random(5);
        var values = new float[100_001];
        for (int i = 0; i < 100_000; i++)
        {
            double g = Math.Sqrt(-2 * Math.Log(1 - random.NextDouble())) * Math.Cos(2 * Math.PI * random.NextDouble());
            values[i] = (float)(relu ? Math.Max(0, g) : g);
        }

        values[^1] = 1000;
        return values;
    }

    private static (float Min, float Max) Range(ActivationObserver observer, float[] values, bool symmetric = false, int batches = 4)
    {
        var state = observer.Create();
        int size = values.Length / batches;
        for (int b = 0; b < batches; b++)
        {
            state.Observe(values.AsSpan(b * size, b == batches - 1 ? values.Length - (b * size) : size));
        }

        return state.ComputeRange(symmetric);
    }

    [Test]
    public void MinMax_KeepsThePlantedOutlier()
    {
        var (min, max) = Range(ActivationObserver.MinMax, GaussianWithOutlier());
        Assert.That(max, Is.EqualTo(1000f));
        Assert.That(min, Is.LessThan(-3.5f));
    }

    [Test]
    public void Percentile_IgnoresThePlantedOutlier()
    {
        var (min, max) = Range(ActivationObserver.Percentile(99.99), GaussianWithOutlier());
        Assert.That(max, Is.InRange(3.0f, 5f));
        Assert.That(min, Is.InRange(-5f, -3.0f));
    }

    [TestCase(false)]
    [TestCase(true)]
    public void Entropy_IgnoresThePlantedOutlier(bool relu)
    {
        var (min, max) = Range(ActivationObserver.Entropy, GaussianWithOutlier(relu));
        Assert.That(max, Is.InRange(1.5f, 20f));
        Assert.That(min, relu ? Is.EqualTo(0f) : Is.InRange(-20f, -1.5f));
    }

    [Test]
    public void Mse_ClipsHeavyTailsAndBeatsMinMaxError()
    {
        // Laplace-distributed values: a long tail that costs resolution if kept.
        var random = new Random(7);
        var values = Enumerable.Range(0, 100_000).Select(_ => (float)(-Math.Log(1 - random.NextDouble()) * (random.Next(2) == 0 ? -1 : 1))).ToArray();
        var (min, max) = Range(ActivationObserver.Mse, values);
        var minMax = Range(ActivationObserver.MinMax, values);
        Assert.That(max, Is.LessThan(minMax.Max * 0.9));
        Assert.That(min, Is.GreaterThan(minMax.Min * 0.9));

        // Mean squared error of quantizing the values with a range, the kernel's way.
        double Error((float Min, float Max) range)
        {
            var (scale, zero) = ModelCompression.Quantization.Kernels.QuantizedActivations.Range(range.Min, range.Max, false);
            return values.Average(x =>
            {
                float q = MathF.Round(Math.Clamp((x / scale) + zero, 0, 127));
                double d = x - ((q - zero) * scale);
                return d * d;
            });
        }

        Assert.That(Error((min, max)), Is.LessThan(Error(minMax) * 0.8));
    }

    [Test]
    public void MovingAverage_MovesTowardsNewBatchesByTheAveragingConstant()
    {
        var state = ActivationObserver.MovingAverageMinMax(0.5).Create();
        state.Observe([0f, 10f]);
        state.Observe([-2f, 2f]);
        Assert.That(state.ComputeRange(false), Is.EqualTo((-1f, 6f)));
    }

    [Test]
    public void NoObservations_Throw()
    {
        foreach (var observer in new[] { ActivationObserver.MinMax, ActivationObserver.MovingAverageMinMax(), ActivationObserver.Percentile(), ActivationObserver.Mse, ActivationObserver.Entropy })
        {
            Assert.Throws<InvalidOperationException>(() => observer.Create().ComputeRange(false), observer.ToString() ?? string.Empty);
        }
    }

    [Test]
    public void InvalidSettings_AreListed()
    {
        Assert.That(ActivationObserver.Percentile(40).Validate(), Has.Count.EqualTo(1));
        Assert.That(ActivationObserver.MovingAverageMinMax(0).Validate(), Has.Count.EqualTo(1));
        Assert.That(ActivationObserver.Entropy.Validate(), Is.Empty);
    }
}
