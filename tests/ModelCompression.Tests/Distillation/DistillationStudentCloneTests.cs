using ModelCompression.Distillation;
using ModelCompression.Metrics;
using ModelCompression.Modules;
using ModelCompression.Samples;
using ModelCompression.Training;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace ModelCompression.Tests.Distillation;

[TestFixture]
public sealed class DistillationStudentCloneTests
{
    [Test]
    public void StudentWithEmbeddings_KeepsThemThroughThePipeline()
    {
        // The step copies the student inside the pipeline's dispose scope; an Embedding rebuilt by its constructor used
        // to leave its weight in that scope, so the final model lost it.
        var config = new TextClassifierConfig(Vocabulary: 50, Length: 12, Width: 16, Heads: 2, Layers: 1, MlpRatio: 2);
        using var teacher = TextClassifier.Create(config, seed: 1);
        using var student = TextClassifier.Create(config with { Width = 8 }, seed: 2);
        long expected = ModelMetrics.CountParameters(student);
        using var generator = new Generator(3);
        using var data = new TensorDataset(randint(TextClassifier.FirstTokenId, 50, [16, 12], generator: generator, dtype: ScalarType.Int64), randint(0, 2, [16], generator: generator, dtype: ScalarType.Int64));
        var options = new DistillationOptions { Teacher = teacher, Student = student, Training = new TrainingOptions { Epochs = 1, BatchSize = 8 } };
        using var result = new CompressionPipelineBuilder().AddDistillation(options).Build().Run(teacher, new CompressionData(data, data));

        Assert.That(ModelMetrics.CountParameters(result.Model), Is.EqualTo(expected));
        Assert.That(result.Report.Final.Parameters, Is.EqualTo(expected));
        var tokens = (TorchSharp.Modules.Embedding)ModuleTree.GetSubmodule(result.Model, "tokens");
        Assert.That(tokens.weight!.IsInvalid, Is.False);
        using var noGrad = no_grad();
        Assert.That(result.Model.call(data.Inputs).shape, Is.EqualTo(new long[] { 16, 2 }));
    }
}
