using NUnit.Framework;

namespace ModelCompression.Tests.Pipeline;

[TestFixture]
public sealed class McNemarTestTests
{
    [Test]
    public void Compute_FewDiscordantPairs_UsesTheExactBinomialTest()
    {
        // b = 10, c = 2: 2 · P(X ≤ 2), X ~ Bin(12, ½) = 2 · (1 + 12 + 66) / 4096 = 158 / 4096.
        var result = McNemarTest.Compute(10, 2, 100);
        Assert.That(result.Exact, Is.True);
        Assert.That(result.PValue, Is.EqualTo(158.0 / 4096).Within(1e-12));
        Assert.That(result.Difference, Is.EqualTo(-0.08).Within(1e-12));
    }

    [Test]
    public void Compute_ManyDiscordantPairs_UsesContinuityCorrectedChiSquare()
    {
        // b = 30, c = 10: χ² = (|30 − 10| − 1)² / 40 = 9.025, p = erfc(√(9.025 / 2)) = 0.0026631192591.
        var result = McNemarTest.Compute(30, 10, 200);
        Assert.That(result.Exact, Is.False);
        Assert.That(result.PValue, Is.EqualTo(0.002663119259138554).Within(1e-10));
        // Difference −0.1, SE = √(40 − 400/200) / 200, 95% interval −0.1 ± 1.95996 · SE.
        Assert.That(result.Difference, Is.EqualTo(-0.1).Within(1e-12));
        Assert.That(result.Lower, Is.EqualTo(-0.1604101471580679).Within(1e-9));
        Assert.That(result.Upper, Is.EqualTo(-0.039589852841932116).Within(1e-9));
    }

    [Test]
    public void Compute_FromVerdicts_CountsDiscordantPairs()
    {
        bool[] first = [true, true, true, false, false, true];
        bool[] second = [true, false, false, true, false, true];
        var result = McNemarTest.Compute(first, second);
        Assert.That(result.OnlyFirstCorrect, Is.EqualTo(2));
        Assert.That(result.OnlySecondCorrect, Is.EqualTo(1));
        Assert.That(result.SampleCount, Is.EqualTo(6));
        // 2 · P(X ≤ 1), X ~ Bin(3, ½) = 2 · 4 / 8 = 1.
        Assert.That(result.PValue, Is.EqualTo(1.0));
    }

    [Test]
    public void Compute_EqualDiscordantCounts_GivesPValueOne()
    {
        // b = c: no evidence of a difference; the continuity correction must not push χ² below zero's p = 1.
        Assert.That(McNemarTest.Compute(13, 13, 100).PValue, Is.EqualTo(1.0).Within(1e-12));
        Assert.That(McNemarTest.Compute(40, 40, 100).PValue, Is.EqualTo(1.0).Within(1e-12));
    }

    [Test]
    public void Compute_NoDiscordantPairs_GivesPValueOne()
    {
        Assert.That(McNemarTest.Compute(0, 0, 50).PValue, Is.EqualTo(1.0));
    }

    [Test]
    public void Compute_InvalidInput_Throws()
    {
        Assert.Throws<ArgumentException>(() => McNemarTest.Compute([true], [true, false]));
        Assert.Throws<ArgumentException>(() => McNemarTest.Compute([], []));
        Assert.Throws<ArgumentOutOfRangeException>(() => McNemarTest.Compute(5, 6, 10));
        Assert.Throws<ArgumentOutOfRangeException>(() => McNemarTest.Compute(1, 1, 10, significanceLevel: 1.5));
    }
}
