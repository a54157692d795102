using ModelCompression.Quantization.Kernels;

namespace ModelCompression.Quantization;

/// <summary>
/// Watches the activations a layer receives during calibration and chooses the range [min, max] its static
/// quantization maps onto the integer levels. One instance per layer; not thread-safe.
/// </summary>
public interface IRangeObserver
{
    /// <summary>Records one batch of activations.</summary>
    /// <param name="values">The batch's values, flattened.</param>
    void Observe(ReadOnlySpan<float> values);

    /// <summary>Chooses the range once every batch is recorded.</summary>
    /// <param name="symmetric">Whether the range will be used symmetrically around zero.</param>
    /// <returns>The range; it may clip outliers.</returns>
    /// <exception cref="InvalidOperationException">Nothing was observed.</exception>
    (float Min, float Max) ComputeRange(bool symmetric);
}

/// <summary>
/// How static quantization chooses activation ranges: <see cref="MinMax"/>, <see cref="MovingAverageMinMax"/>,
/// <see cref="Percentile"/>, <see cref="Mse"/> or <see cref="Entropy"/>. Subclass to plug in your own.
/// </summary>
public abstract class ActivationObserver
{
    /// <summary>Gets the observer that keeps the smallest and largest value seen (outliers widen the range).</summary>
    public static ActivationObserver MinMax { get; } = new MinMaxActivationObserver();

    /// <summary>Gets an observer that averages each batch's min and max with weight <paramref name="averagingConstant"/>.</summary>
    /// <param name="averagingConstant">The weight of each new batch, in (0, 1]. PyTorch's default is 0.01.</param>
    /// <returns>The observer.</returns>
    public static ActivationObserver MovingAverageMinMax(double averagingConstant = 0.01) => new MovingAverageActivationObserver(averagingConstant);

    /// <summary>Gets an observer that clips at the given percentiles of the values seen (both tails).</summary>
    /// <param name="percentile">The upper percentile, in (50, 100]; the lower is 100 − it. The default is 99.99.</param>
    /// <returns>The observer.</returns>
    public static ActivationObserver Percentile(double percentile = 99.99) => new PercentileActivationObserver(percentile);

    /// <summary>Gets the observer that picks the clipping range with the least mean squared quantization error.</summary>
    public static ActivationObserver Mse { get; } = new MseActivationObserver();

    /// <summary>
    /// Gets the observer that picks the clipping threshold whose quantized histogram is closest to the original in
    /// Kullback–Leibler divergence (the calibration TensorRT introduced).
    /// </summary>
    public static ActivationObserver Entropy { get; } = new EntropyActivationObserver();

    /// <summary>Creates the state for one layer.</summary>
    /// <returns>A new observer.</returns>
    public abstract IRangeObserver Create();

    /// <summary>Lists invalid settings.</summary>
    /// <returns>One message per invalid setting.</returns>
    public virtual IReadOnlyList<string> Validate() => [];
}

internal sealed class MinMaxActivationObserver : ActivationObserver
{
    public override IRangeObserver Create() => new MinMaxObserver();

    public override string ToString() => "MinMax";

    private sealed class MinMaxObserver : IRangeObserver
    {
        private float min = float.PositiveInfinity;
        private float max = float.NegativeInfinity;

        public void Observe(ReadOnlySpan<float> values)
        {
            foreach (float v in values)
            {
                min = MathF.Min(min, v);
                max = MathF.Max(max, v);
            }
        }

        public (float Min, float Max) ComputeRange(bool symmetric) =>
            min > max ? throw new InvalidOperationException("The observer saw no values.") : (min, max);
    }
}

internal sealed class MovingAverageActivationObserver(double averagingConstant) : ActivationObserver
{
    public double AveragingConstant { get; } = averagingConstant;

    public override IRangeObserver Create() => new Observer((float)AveragingConstant);

    public override IReadOnlyList<string> Validate() =>
        AveragingConstant is > 0 and <= 1 ? [] : [$"The moving-average observer's averaging constant must be in (0, 1] (was {AveragingConstant})."];

    public override string ToString() => $"MovingAverageMinMax({AveragingConstant})";

    private sealed class Observer(float c) : IRangeObserver
    {
        private float min = float.NaN;
        private float max = float.NaN;

        public void Observe(ReadOnlySpan<float> values)
        {
            if (values.IsEmpty)
            {
                return;
            }

            float bmin = float.PositiveInfinity, bmax = float.NegativeInfinity;
            foreach (float v in values)
            {
                bmin = MathF.Min(bmin, v);
                bmax = MathF.Max(bmax, v);
            }

            bool first = float.IsNaN(min);
            min = first ? bmin : min + (c * (bmin - min));
            max = first ? bmax : max + (c * (bmax - max));
        }

        public (float Min, float Max) ComputeRange(bool symmetric) =>
            float.IsNaN(min) ? throw new InvalidOperationException("The observer saw no values.") : (min, max);
    }
}

internal sealed class PercentileActivationObserver(double percentile) : ActivationObserver
{
    public double PercentileValue { get; } = percentile;

    public override IRangeObserver Create() => new Observer(PercentileValue);

    public override IReadOnlyList<string> Validate() =>
        PercentileValue is > 50 and <= 100 ? [] : [$"The percentile observer's percentile must be in (50, 100] (was {PercentileValue})."];

    public override string ToString() => $"Percentile({PercentileValue})";

    private sealed class Observer(double percentile) : IRangeObserver
    {
        private readonly ValueSample sample = new();

        public void Observe(ReadOnlySpan<float> values) => sample.Add(values);

        public (float Min, float Max) ComputeRange(bool symmetric)
        {
            var sorted = sample.Sorted();
            float hi = At(sorted, percentile / 100);
            float lo = sample.Min >= 0 ? sample.Min : At(sorted, 1 - (percentile / 100));
            return (lo, hi);
        }

        private static float At(float[] sorted, double q)
        {
            double pos = q * (sorted.Length - 1);
            int i = (int)Math.Floor(pos);
            int j = Math.Min(i + 1, sorted.Length - 1);
            return (float)(sorted[i] + ((sorted[j] - sorted[i]) * (pos - i)));
        }
    }
}

internal sealed class MseActivationObserver : ActivationObserver
{
    /// <summary>Values the error is measured on (a deterministic subsample of what was seen).</summary>
    private const int SampleSize = 1 << 16;

    /// <summary>Candidate ends: the observed end times 0.93^i, i = 0..99 (down to about 1/1,300 of it).</summary>
    private const int Candidates = 100;
    private const float Ratio = 0.93f;

    public override IRangeObserver Create() => new Observer();

    public override string ToString() => "MSE";

    private sealed class Observer : IRangeObserver
    {
        private readonly ValueSample sample = new();

        public void Observe(ReadOnlySpan<float> values) => sample.Add(values);

        public (float Min, float Max) ComputeRange(bool symmetric)
        {
            var values = sample.Subsample(SampleSize);
            float min = sample.Min, max = sample.Max;
            if (symmetric)
            {
                float reach = MathF.Max(MathF.Abs(min), MathF.Abs(max));
                float t = Best(reach, c => Error(values, -c, c, true));
                return (-t, t);
            }

            // Coordinate descent: the upper end with the lower fixed, then the lower with the upper fixed, twice.
            float lo = min, hi = max;
            for (int round = 0; round < 2; round++)
            {
                float fixedLo = lo;
                hi = max > 0 ? Best(max, c => Error(values, fixedLo, c, false)) : max;
                float fixedHi = hi;
                lo = min < 0 ? Best(min, c => Error(values, c, fixedHi, false)) : min;
            }

            return (lo, hi);
        }

        private static float Best(float end, Func<float, double> error)
        {
            float best = end;
            double bestError = double.PositiveInfinity;
            float c = end;
            for (int i = 0; i < Candidates; i++, c *= Ratio)
            {
                double e = error(c);
                if (e < bestError)
                {
                    bestError = e;
                    best = c;
                }
            }

            return best;
        }

        private static double Error(float[] values, float min, float max, bool symmetric)
        {
            var (scale, zero) = QuantizedActivations.Range(min, max, symmetric);
            float inverse = 1f / scale;
            double error = 0;
            foreach (float x in values)
            {
                float q = MathF.Round(Math.Clamp((x * inverse) + zero, 0, QuantizedActivations.MaxLevel));
                float d = x - ((q - zero) * scale);
                error += d * d;
            }

            return error;
        }
    }
}

internal sealed class EntropyActivationObserver : ActivationObserver
{
    private const int Bins = 2048;

    public override IRangeObserver Create() => new Observer();

    public override string ToString() => "Entropy";

    private sealed class Observer : IRangeObserver
    {
        private readonly ValueSample sample = new();

        public void Observe(ReadOnlySpan<float> values) => sample.Add(values);

        public (float Min, float Max) ComputeRange(bool symmetric)
        {
            float min = sample.Min, max = sample.Max;
            float reach = MathF.Max(MathF.Abs(min), MathF.Abs(max));
            if (reach == 0)
            {
                return (min, max);
            }

            // A one-sided input (e.g. after a ReLU) gets all 128 levels; a two-sided one splits them between its
            // sides in proportion to their reach, and each side's threshold is chosen on its own.
            var values = sample.Subsample(int.MaxValue);
            var positive = values.Where(v => v > 0).ToArray();
            var negative = values.Where(v => v < 0).Select(v => -v).ToArray();
            Array.Sort(positive);
            Array.Sort(negative);
            int levels = QuantizedActivations.MaxLevel + 1;
            float positiveReach = Robust(positive), negativeReach = Robust(negative);
            int positiveLevels = negativeReach == 0 ? levels : positiveReach == 0 ? 0
                : Math.Clamp((int)MathF.Round(levels * positiveReach / (positiveReach + negativeReach)), 2, levels - 2);
            float hi = positiveLevels == 0 ? max : Threshold(positive, positiveLevels);
            float lo = positiveLevels == levels ? min : -Threshold(negative, levels - positiveLevels);
            return (lo, hi);
        }

        /// <summary>The 99.99th percentile of sorted magnitudes (0 when empty): a reach that a few outliers do not set.</summary>
        private static float Robust(float[] sorted) =>
            sorted.Length == 0 ? 0 : sorted[(int)Math.Min(sorted.Length - 1, Math.Floor(0.9999 * sorted.Length))];

        /// <summary>The clipping threshold for sorted positive <paramref name="magnitudes"/> quantized to <paramref name="levels"/> levels.</summary>
        private static float Threshold(float[] magnitudes, int levels)
        {
            if (magnitudes.Length == 0)
            {
                return 0;
            }

            // A few extreme outliers would leave the bulk of the values in the first bins: the histogram stops at
            // 8 × the 99.99th percentile (values beyond it fold into the last bin like any clipped tail).
            float reach = MathF.Min(magnitudes[^1], MathF.Max(Robust(magnitudes) * 8, float.Epsilon));
            var histogram = new long[Bins];
            float width = reach / Bins;
            foreach (float v in magnitudes)
            {
                histogram[Math.Clamp((int)(v / width), 0, Bins - 1)]++;
            }

            int start = Math.Min(levels, Bins);
            int bestBins = Bins;
            double bestDivergence = double.PositiveInfinity;
            for (int i = start; i <= Bins; i++)
            {
                double divergence = Divergence(histogram, i, levels);
                if (divergence < bestDivergence)
                {
                    bestDivergence = divergence;
                    bestBins = i;
                }
            }

            return MathF.Min(magnitudes[^1], reach * bestBins / Bins);
        }

        /// <summary>KL(P ‖ Q) of the first <paramref name="bins"/> bins (tail folded into the last) against their <paramref name="levels"/>-level quantization.</summary>
        private static double Divergence(long[] hist, int bins, int levels)
        {
            var p = new double[bins];
            for (int i = 0; i < bins; i++)
            {
                p[i] = hist[i];
            }

            for (int i = bins; i < hist.Length; i++)
            {
                p[bins - 1] += hist[i];
            }

            // Q: merge the bins into `levels` runs, then spread each run's mass over its non-empty bins.
            var q = new double[bins];
            for (int level = 0; level < levels; level++)
            {
                int start = (int)((long)level * bins / levels);
                int end = (int)((long)(level + 1) * bins / levels);
                double mass = 0;
                int nonEmpty = 0;
                for (int i = start; i < end; i++)
                {
                    mass += hist[i];
                    nonEmpty += hist[i] > 0 ? 1 : 0;
                }

                for (int i = start; i < end; i++)
                {
                    q[i] = hist[i] > 0 ? mass / nonEmpty : 0;
                }
            }

            double pTotal = p.Sum(), qTotal = q.Sum();
            if (pTotal == 0 || qTotal == 0)
            {
                return double.PositiveInfinity;
            }

            double kl = 0;
            for (int i = 0; i < bins; i++)
            {
                if (p[i] == 0)
                {
                    continue;
                }

                double pi = p[i] / pTotal;
                // The folded tail can land in a bin Q leaves empty; a small floor keeps that finite but costly.
                double qi = Math.Max(q[i] / qTotal, 1e-12);
                kl += pi * Math.Log(pi / qi);
            }

            return kl;
        }
    }
}

/// <summary>
/// A deterministic sample of the values seen: every value until the capacity is reached, then every 2nd, 4th, ...
/// value (halving what it holds each time it fills), plus the exact min and max.
/// </summary>
internal sealed class ValueSample
{
    private const int Capacity = 1 << 20;
    private readonly List<float> values = [];
    private long seen;
    private int stride = 1;

    public float Min { get; private set; } = float.PositiveInfinity;

    public float Max { get; private set; } = float.NegativeInfinity;

    public void Add(ReadOnlySpan<float> batch)
    {
        foreach (float v in batch)
        {
            Min = MathF.Min(Min, v);
            Max = MathF.Max(Max, v);
            if (seen++ % stride == 0)
            {
                values.Add(v);
                if (values.Count >= Capacity)
                {
                    for (int i = 0; i < values.Count / 2; i++)
                    {
                        values[i] = values[2 * i];
                    }

                    values.RemoveRange(values.Count / 2, values.Count - (values.Count / 2));
                    stride *= 2;
                }
            }
        }
    }

    /// <summary>Every ⌈count / max⌉-th value held, so at most about <paramref name="max"/> values.</summary>
    public float[] Subsample(int max)
    {
        if (values.Count == 0)
        {
            throw new InvalidOperationException("The observer saw no values.");
        }

        int step = Math.Max(1, (values.Count + max - 1) / max);
        var result = new float[(values.Count + step - 1) / step];
        for (int i = 0; i < result.Length; i++)
        {
            result[i] = values[i * step];
        }

        return result;
    }

    public float[] Sorted()
    {
        if (values.Count == 0)
        {
            throw new InvalidOperationException("The observer saw no values.");
        }

        var sorted = values.ToArray();
        Array.Sort(sorted);
        return sorted;
    }

    public (long[] Counts, float Low, float Width) Histogram(int bins, float low, float high, bool absolute = false)
    {
        if (values.Count == 0)
        {
            throw new InvalidOperationException("The observer saw no values.");
        }

        var counts = new long[bins];
        float width = high > low ? (high - low) / bins : 1f;
        foreach (float raw in values)
        {
            float v = absolute ? MathF.Abs(raw) : raw;
            int i = (int)((v - low) / width);
            counts[Math.Clamp(i, 0, bins - 1)]++;
        }

        return (counts, low, width);
    }
}
