using ModelCompression.Pruning;
using NUnit.Framework;

namespace ModelCompression.Tests.Pruning;

[TestFixture]
public sealed class PruningSchedulesTests
{
    [Test]
    public void Iterative_KeepsAGeometricallyShrinkingFraction()
    {
        var schedule = new IterativePruning(3);
        // Final 0.875 keeps 1/8: rounds keep 1/2, 1/4, 1/8.
        Assert.That(schedule.RoundSparsity(0, 0.875), Is.EqualTo(0.5).Within(1e-12));
        Assert.That(schedule.RoundSparsity(1, 0.875), Is.EqualTo(0.75).Within(1e-12));
        Assert.That(schedule.RoundSparsity(2, 0.875), Is.EqualTo(0.875));
        Assert.That(schedule.SparsityDuringTraining(5, 100, 0.875), Is.Null);
    }

    [Test]
    public void Gradual_FollowsZhuAndGuptasFormula()
    {
        // 101 steps, t0 = 0, end = floor(0.8 · 100) = 80, Δt = 10, s_i = 0.1, s_f = 0.9.
        var schedule = new GradualPruning { InitialSparsity = 0.1, StartFraction = 0, EndFraction = 0.8, Frequency = 10 };
        foreach (long t in new long[] { 0, 10, 40, 70, 80 })
        {
            double expected = 0.9 + ((0.1 - 0.9) * Math.Pow(1 - (t / 80.0), 3));
            Assert.That(schedule.SparsityDuringTraining(t, 101, 0.9), Is.EqualTo(expected).Within(1e-12), $"t = {t}");
        }

        Assert.That(schedule.SparsityDuringTraining(15, 101, 0.9), Is.Null, "between updates");
        Assert.That(schedule.SparsityDuringTraining(90, 101, 0.9), Is.Null, "after the end");
        Assert.That(schedule.SparsityAt(100, 101, 0.9), Is.EqualTo(0.9));
        Assert.That(schedule.RoundSparsity(0, 0.9), Is.EqualTo(0.1));
    }

    [Test]
    public void Gradual_DefaultIntervalGivesAboutTwentyUpdates()
    {
        var schedule = new GradualPruning();
        long updates = Enumerable.Range(0, 1000).Count(t => schedule.SparsityDuringTraining(t, 1000, 0.9) is not null);
        Assert.That(updates, Is.InRange(20, 22));
    }

    [Test]
    public void Validate_ListsBadValues()
    {
        Assert.That(new IterativePruning(0).Validate(), Has.Count.EqualTo(1));
        Assert.That(new GradualPruning { InitialSparsity = 1, StartFraction = 0.9, EndFraction = 0.5, Frequency = -1 }.Validate(), Has.Count.EqualTo(3));
    }
}
