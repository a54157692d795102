using MathNet.Numerics.Distributions;

namespace ModelCompression;

/// <summary>The result of McNemar's test on paired per-sample results of two models.</summary>
/// <param name="OnlyFirstCorrect">Samples the first (baseline) model got right and the second got wrong (b).</param>
/// <param name="OnlySecondCorrect">Samples the second model got right and the first got wrong (c).</param>
/// <param name="SampleCount">The number of paired samples (n).</param>
/// <param name="PValue">The two-sided p-value of "both models are equally accurate".</param>
/// <param name="Exact">Whether the p-value is the exact binomial one (b + c &lt; 25) rather than the continuity-corrected χ² one.</param>
/// <param name="Difference">The accuracy of the second model minus that of the first, (c − b) / n.</param>
/// <param name="Lower">The lower end of the confidence interval of <paramref name="Difference"/>.</param>
/// <param name="Upper">The upper end of the confidence interval of <paramref name="Difference"/>.</param>
public sealed record McNemarResult(long OnlyFirstCorrect, long OnlySecondCorrect, long SampleCount, double PValue, bool Exact, double Difference, double Lower, double Upper);

/// <summary>
/// McNemar's test for two classifiers scored on the same samples (McNemar 1947), with a Wald confidence interval
/// of the paired accuracy difference.
/// </summary>
/// <remarks>
/// With b + c &lt; 25 discordant pairs the p-value is the exact two-sided binomial one, 2·P(X ≤ min(b, c)) for
/// X ~ Binomial(b + c, ½), capped at 1; otherwise it is the χ² (1 degree of freedom) p-value of
/// max(0, |b − c| − 1)² / (b + c). The p-value is two-sided. The interval is (c − b)/n ± z·√((b + c) − (c − b)²/n)/n.
/// </remarks>
public static class McNemarTest
{
    /// <summary>Discordant pairs below which the exact binomial test is used.</summary>
    public const int ExactBelow = 25;

    /// <summary>Runs the test on per-sample verdicts.</summary>
    /// <param name="first">Whether the first (baseline) model got each sample right.</param>
    /// <param name="second">Whether the second model got each sample right, in the same order.</param>
    /// <param name="significanceLevel">The confidence interval is at level 1 − this. The default is 0.05.</param>
    /// <returns>The counts, p-value and interval.</returns>
    /// <exception cref="ArgumentException">The lists differ in length or are empty.</exception>
    public static McNemarResult Compute(IReadOnlyList<bool> first, IReadOnlyList<bool> second, double significanceLevel = 0.05)
    {
        ArgumentNullException.ThrowIfNull(first);
        ArgumentNullException.ThrowIfNull(second);
        if (first.Count != second.Count)
        {
            throw new ArgumentException($"The verdict lists differ in length ({first.Count} and {second.Count}).", nameof(second));
        }

        if (first.Count == 0)
        {
            throw new ArgumentException("No samples.", nameof(first));
        }

        long b = 0, c = 0;
        for (int i = 0; i < first.Count; i++)
        {
            if (first[i] && !second[i])
            {
                b++;
            }
            else if (!first[i] && second[i])
            {
                c++;
            }
        }

        return Compute(b, c, first.Count, significanceLevel);
    }

    /// <summary>Runs the test on the discordant counts.</summary>
    /// <param name="b">Samples only the first model got right.</param>
    /// <param name="c">Samples only the second model got right.</param>
    /// <param name="n">All paired samples.</param>
    /// <param name="significanceLevel">The confidence interval is at level 1 − this. The default is 0.05.</param>
    /// <returns>The counts, p-value and interval.</returns>
    public static McNemarResult Compute(long b, long c, long n, double significanceLevel = 0.05)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(b);
        ArgumentOutOfRangeException.ThrowIfNegative(c);
        if (n < b + c || n <= 0)
        {
            throw new ArgumentOutOfRangeException(nameof(n), n, "Must be positive and at least b + c.");
        }

        if (!(significanceLevel > 0 && significanceLevel < 1))
        {
            throw new ArgumentOutOfRangeException(nameof(significanceLevel), significanceLevel, "Must be between 0 and 1.");
        }

        long discordant = b + c;
        double p;
        bool exact = discordant < ExactBelow;
        if (discordant == 0)
        {
            p = 1.0;
        }
        else if (exact)
        {
            p = Math.Min(1.0, 2 * Binomial.CDF(0.5, (int)discordant, Math.Min(b, c)));
        }
        else
        {
            double chi = Math.Pow(Math.Max(0, Math.Abs(b - c) - 1), 2) / discordant;
            p = 1 - ChiSquared.CDF(1, chi);
        }

        double diff = (double)(c - b) / n;
        double z = Normal.InvCDF(0, 1, 1 - (significanceLevel / 2));
        double se = Math.Sqrt(Math.Max(0, discordant - ((double)(c - b) * (c - b) / n))) / n;
        return new McNemarResult(b, c, n, p, exact, diff, diff - (z * se), diff + (z * se));
    }
}
