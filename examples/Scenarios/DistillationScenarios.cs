using ModelCompression;
using ModelCompression.Distillation;
using ModelCompression.Metrics;
using ModelCompression.Pruning;
using ModelCompression.Samples;
using ModelCompression.Training;
using static TorchSharp.torch;

namespace Scenarios;

/// <summary>
/// Hinton et al.'s MNIST experiment at this project's scale: a 1200-1200 teacher with dropout, a narrow 30-30 student
/// trained from the labels and, with the same epochs and seed, distilled from the teacher.
/// </summary>
public sealed class DistillMlpScenario : IScenario
{
    public string Name => "distill-mlp";

    public string Description => "1200-1200 teacher, 30-30 student: from scratch vs distilled (same epochs and seed)";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        new("distilled student closes ≥ 50% of the gap to the teacher", r => r.Reference is { } x && x["gapClosed"] >= 0.5),
        new("the gain is significant (McNemar p < 0.05)", r => r.Reference is { } x && x["pValue"] < 0.05),
    ];

    private static TrainingOptions Training(double learningRate) => new()
    {
        Epochs = 15,
        Optimizer = OptimizerKind.Sgd,
        LearningRate = learningRate,
        Momentum = 0.9,
        WeightDecay = 5e-4,
        Schedule = new CosineLearningRate(),
    };

    public CompressionReport Run(ScenarioContext context)
    {
        using var split = MnistDigits.LoadBundled().Split(8000, context.Seed, MnistLayout.Flat);
        var evaluator = new AccuracyEvaluator();
        int[] studentShape = [30, 30];

        using var teacher = ModelZoo.Mlp([1200, 1200], dropout: 0.3, seed: context.Seed);
        context.Log.WriteLine("teacher 1200-1200 (dropout 0.3): training 15 epochs");
        new Trainer(Training(0.05)).Train(teacher, split.Train, seed: context.Seed);
        teacher.eval();
        var teacherResult = evaluator.Evaluate(teacher, split.Test);

        context.Log.WriteLine("student 30-30 from the labels: 15 epochs");
        using var scratch = ModelZoo.Mlp(studentShape, seed: context.Seed + 1);
        new Trainer(Training(0.05)).Train(scratch, split.Train, seed: context.Seed);
        var scratchResult = evaluator.Evaluate(scratch, split.Test);

        // The pipeline's model is the teacher; the step trains a copy of the untrained student from it. A lower rate
        // than from scratch: the soft-target gradients are about T times larger than the hard-label ones.
        context.Log.WriteLine("student 30-30 distilled from the teacher: 15 epochs, α 0.9, T 4");
        using var student = ModelZoo.Mlp(studentShape, seed: context.Seed + 1);
        using var result = CompressionPipeline.Create()
            .AddDistillation(new DistillationOptions { Teacher = teacher, Student = student, Alpha = 0.9, Temperature = 4, Training = Training(0.01) })
            .WithModelName("MLP 1200-1200 → 30-30")
            .WithSeed(context.Seed)
            .Build()
            .Run(teacher, new CompressionData(split.Train, split.Test));
        var distilled = evaluator.Evaluate(result.Model, split.Test);
        var test = McNemarTest.Compute(scratchResult.PerSampleCorrect!, distilled.PerSampleCorrect!);

        var report = result.Report;
        report.Reference = new Dictionary<string, double>
        {
            ["teacherAccuracy"] = teacherResult.Value,
            ["studentFromScratchAccuracy"] = scratchResult.Value,
            ["distilledAccuracy"] = distilled.Value,
            ["gapClosed"] = (distilled.Value - scratchResult.Value) / (teacherResult.Value - scratchResult.Value),
            ["pValue"] = test.PValue,
            ["teacherParameters"] = ModelMetrics.CountParameters(teacher),
            ["studentParameters"] = ModelMetrics.CountParameters(result.Model),
        };
        return report;
    }
}

/// <summary>
/// The residual CNN structurally pruned by half (no fine-tuning in the pruning step), then fine-tuned for the same
/// epochs twice: on the labels alone, and distilling from the unpruned model.
/// </summary>
public sealed class DistillRecoveryScenario : IScenario
{
    public string Name => "distill-recovery-rescnn";

    public string Description => "SmallResNet pruned 50%: fine-tuning with vs without distillation from the original";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        new("distillation recovers more than plain fine-tuning", r => r.Reference is { } x && r.Final.Accuracy > x["withoutDistillationAccuracy"]),
    ];

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = ScenarioBaseline.Load(ZooModel.SmallResNet, context);
        CompressionResult Prune(RecoveryDistillation? distillation) => baseline.Run(baseline.Pipeline(context)
            .AddStructuredPruning(new StructuredPruningOptions { Ratio = 0.5, FineTuning = Pruning.FineTuning(5), Distillation = distillation }));

        context.Log.WriteLine("fine-tuning on the labels alone: 5 epochs");
        double without;
        using (var plain = Prune(null))
        {
            without = plain.Report.Final.Accuracy;
        }

        context.Log.WriteLine("fine-tuning distilled from the original: 5 epochs, α 0.7, T 4");
        using var result = Prune(new RecoveryDistillation { Alpha = 0.7, Temperature = 4 });
        var report = result.Report;
        report.Reference!["withoutDistillationAccuracy"] = without;
        return report;
    }
}
