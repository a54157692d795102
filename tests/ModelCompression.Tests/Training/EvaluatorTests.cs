using ModelCompression.Data;
using ModelCompression.Training;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Training;

[TestFixture]
public sealed class EvaluatorTests
{
    [Test]
    public void Accuracy_CountsTopOneAndKeepsPerSampleVerdicts()
    {
        // The identity model returns the inputs as logits.
        using var data = new TensorDataset(
            tensor(new float[] { 2, 1, 0, 0, 3, 1, 0, 1, 5, 1, 0, 0 }, [4, 3]),
            tensor(new long[] { 0, 0, 2, 1 }));
        using var model = nn.Identity();
        var result = new AccuracyEvaluator(batchSize: 3).Evaluate(model, data);
        Assert.That(result.Value, Is.EqualTo(0.5));
        Assert.That(result.SampleCount, Is.EqualTo(4));
        Assert.That(result.PerSampleCorrect, Is.EqualTo(new[] { true, false, true, false }));
    }

    [Test]
    public void Accuracy_AcceptsAnyIntegerTargetType()
    {
        using var data = new TensorDataset(tensor(new float[] { 2, 1, 0, 3 }, [2, 2]), tensor(new int[] { 0, 0 }));
        using var model = nn.Identity();
        Assert.That(new AccuracyEvaluator().Evaluate(model, data).Value, Is.EqualTo(0.5));
    }

    [Test]
    public void Accuracy_FloatTargets_ThrowNamingTheType()
    {
        using var data = new TensorDataset(ones(2, 2), zeros(2));
        using var model = nn.Identity();
        var ex = Assert.Throws<ArgumentException>(() => new AccuracyEvaluator().Evaluate(model, data));
        Assert.That(ex!.Message, Does.Contain("Float32"));
    }

    [Test]
    public void Accuracy_RestoresTrainingMode()
    {
        using var data = new TensorDataset(ones(2, 3), zeros(2, dtype: int64));
        using var model = nn.Sequential(nn.Linear(3, 3));
        model.train();
        new AccuracyEvaluator().Evaluate(model, data);
        Assert.That(model.training, Is.True);
    }

    [Test]
    public void Accuracy_TargetOutsideTheClasses_Throws()
    {
        using var data = new TensorDataset(ones(2, 3), tensor(new long[] { 0, 3 }));
        using var model = nn.Identity();
        var ex = Assert.Throws<ArgumentException>(() => new AccuracyEvaluator().Evaluate(model, data));
        Assert.That(ex!.Message, Does.Contain("outside"));
    }

    [Test]
    public void Accuracy_OutputNotBatchByClasses_Throws()
    {
        using var data = new TensorDataset(ones(2, 3, 2), zeros(2, dtype: int64));
        using var model = nn.Identity();
        Assert.Throws<ArgumentException>(() => new AccuracyEvaluator().Evaluate(model, data));
    }

    [Test]
    public void Loss_IsTheSampleWeightedMeanAndLowerIsBetter()
    {
        // Identity model; MSE per batch: [1,1] vs [0,0] → 1; [3,3] vs [0,0] → 9 (one sample). Mean over samples (2·1 + 9) / 3.
        using var data = new TensorDataset(tensor(new float[] { 1, 1, 1, 1, 3, 3 }, [3, 2]), zeros(3, 2));
        using var model = nn.Identity();
        var evaluator = new LossEvaluator(batchSize: 2);
        var result = evaluator.Evaluate(model, data);
        Assert.That(evaluator.HigherIsBetter, Is.False);
        Assert.That(result.Value, Is.EqualTo(11.0 / 3).Within(1e-6));
        Assert.That(result.PerSampleCorrect, Is.Null);
    }
}
