using ModelCompression;
using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Samples;
using ModelCompression.Training;
using TorchSharp;
using static TorchSharp.torch;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace Scenarios;

/// <summary>TextClassifier trained on SpamAssassin, with the encoded splits the text classification scenarios share.</summary>
internal sealed class TextClassifierBaseline : IDisposable
{
    /// <summary>Token ids per mail, the start id included.</summary>
    public const int Length = 128;

    private TextClassifierBaseline(TextClassifier model, TensorDataset train, TensorDataset test, TrainedModel trained)
    {
        Model = model;
        Train = train;
        Test = test;
        Trained = trained;
    }

    public TextClassifier Model { get; }

    public TensorDataset Train { get; }

    public TensorDataset Test { get; }

    public TrainedModel Trained { get; }

    public CompressionData Data => new(Train, Test);

    /// <summary>The shape the scenarios train (about 1M parameters with the bundled 4,096-token BPE).</summary>
    public static TextClassifierConfig Config(int vocabulary) => new(Vocabulary: vocabulary + TextClassifier.FirstTokenId, Length: Length, Width: 128, Heads: 4, Layers: 2, MlpRatio: 4);

    public static TextClassifierBaseline Load(ScenarioContext context)
    {
        var tokenizer = BrownCorpus.LoadBundled().Tokenizer;
        var corpus = SpamAssassinCorpus.LoadBundled();
        var train = TextClassifierTraining.Encode(corpus, TextSplit.Train, tokenizer, Length);
        var test = TextClassifierTraining.Encode(corpus, TextSplit.Test, tokenizer, Length);
        var trained = TextClassifierTraining.TrainOrLoad(Config(tokenizer.VocabularySize), train, context.CacheDirectory, context.Seed, progress: new SyncProgress<TrainingProgress>(p =>
        {
            if (p.Batch % 50 == 0)
            {
                context.Log.WriteLine($"  epoch {p.Epoch + 1}/{p.Epochs}, batch {p.Batch}/{p.BatchesPerEpoch}: loss {p.Loss:0.000}");
            }
        }));
        context.Log.WriteLine(trained.FromCache ? "TextClassifier: trained weights from the cache" : $"TextClassifier: trained in {trained.Seconds:0} s");
        return new TextClassifierBaseline((TextClassifier)trained.Model, train, test, trained);
    }

    public double Accuracy(nn.Module<Tensor, Tensor> model) => new AccuracyEvaluator(batchSize: 128).Evaluate(model, Test).Value;

    public void Dispose()
    {
        Model.Dispose();
        Train.Dispose();
        Test.Dispose();
    }
}

/// <summary>
/// W8A8 (static int8 weights and activations) of TextClassifier on SpamAssassin, with and without SmoothQuant; the
/// pipeline run (and so <c>final</c>) is the SmoothQuant model.
/// </summary>
public sealed class TextClassifierSmoothQuantScenario : IScenario
{
    public string Name => "textcls-smoothquant";

    public string Description => "TextClassifier (SpamAssassin): static int8 weights and activations with and without SmoothQuant";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        global::Scenarios.Targets.DropAtMost(0.5),
    ];

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = TextClassifierBaseline.Load(context);
        double fp32 = baseline.Accuracy(baseline.Model);
        context.Log.WriteLine($"  {"fp32",-20} test accuracy {fp32:P2}");

        static PostTrainingQuantizationOptions Options(bool smooth) => new()
        {
            Mode = QuantizationMode.StaticInt8,
            SmoothQuant = smooth ? new SmoothQuantOptions() : null,
            CalibrationBatches = 8,
            CalibrationBatchSize = 32,
        };

        var stepContext = new CompressionContext(baseline.Data, baseline.Model, seed: context.Seed);
        double plain;
        using (var quantized = new PostTrainingQuantizationStep(Options(smooth: false)).Apply(ModuleCloner.DeepClone(baseline.Model), stepContext))
        {
            plain = baseline.Accuracy(quantized);
        }

        context.Log.WriteLine($"  {"W8A8",-20} test accuracy {plain:P2}");
        using var result = CompressionPipeline.Create()
            .WithModelName("TextClassifier")
            .WithSeed(context.Seed)
            .AddPostTrainingQuantization(Options(smooth: true))
            .Build()
            .Run(baseline.Model, baseline.Data);
        var report = result.Report;
        context.Log.WriteLine($"  {"W8A8 + SmoothQuant",-20} test accuracy {report.Final.Accuracy:P2}   (the pipeline's final model)");
        report.Reference = new Dictionary<string, double>
        {
            ["parameters"] = baseline.Model.parameters().Sum(p => p.numel()),
            ["trainingSeconds"] = baseline.Trained.Seconds,
            ["testMails"] = baseline.Test.Count,
            ["accuracyFp32"] = fp32,
            ["accuracyW8A8"] = plain,
            ["accuracyW8A8SmoothQuant"] = report.Final.Accuracy,
            ["dropW8A8Points"] = (fp32 - plain) * 100,
            ["dropW8A8SmoothQuantPoints"] = (fp32 - report.Final.Accuracy) * 100,
        };
        return report;
    }
}

/// <summary>
/// TextClassifier (the teacher) distilled into a student at least 4× smaller, against the same student trained from the
/// labels alone (same initialisation, epochs and seed). The pipeline run is the distillation.
/// </summary>
public sealed class TextClassifierDistillScenario : IScenario
{
    public string Name => "textcls-distill";

    public string Description => "TextClassifier (SpamAssassin) → a student ≥ 4× smaller: from scratch vs distilled (same epochs and seed)";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        new("the student is at least 4× smaller", r => Get(r, "sizeRatio") >= 4),
        new("the distilled student closes ≥ 50% of the gap to the teacher", r => Get(r, "gapClosed") >= 0.5),
        new("the gain is significant (McNemar p < 0.05)", r => Get(r, "pValue") < 0.05),
    ];

    /// <summary>The student: width 32, two heads, one block, MLP ratio 2.</summary>
    public static TextClassifierConfig StudentConfig(int vocabulary) =>
        TextClassifierBaseline.Config(vocabulary) with { Width = 32, Heads = 2, Layers = 1, MlpRatio = 2 };

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = TextClassifierBaseline.Load(context);
        var evaluator = new AccuracyEvaluator(batchSize: 128);
        var teacherResult = evaluator.Evaluate(baseline.Model, baseline.Test);
        var config = StudentConfig(baseline.Model.Config.Vocabulary - TextClassifier.FirstTokenId);

        torch.random.manual_seed(context.Seed + 1);
        using var scratch = new TextClassifier(config);
        using var student = ModuleCloner.DeepClone(scratch);
        var watch = System.Diagnostics.Stopwatch.StartNew();
        new Trainer(TextClassifierTraining.Recipe()).Train(scratch, baseline.Train, seed: context.Seed);
        var scratchResult = evaluator.Evaluate(scratch, baseline.Test);
        context.Log.WriteLine($"  student from the labels: {scratchResult.Value:P2} ({watch.Elapsed.TotalSeconds:0} s)");

        watch.Restart();
        using var result = CompressionPipeline.Create()
            .AddDistillation(new ModelCompression.Distillation.DistillationOptions { Teacher = baseline.Model, Student = student, Alpha = 0.9, Temperature = 4, Training = TextClassifierTraining.Recipe() })
            .WithModelName("TextClassifier → student")
            .WithSeed(context.Seed)
            .Build()
            .Run(baseline.Model, baseline.Data);
        var distilled = evaluator.Evaluate(result.Model, baseline.Test);
        context.Log.WriteLine($"  student distilled:       {distilled.Value:P2} ({watch.Elapsed.TotalSeconds:0} s); teacher {teacherResult.Value:P2}");
        var test = McNemarTest.Compute(scratchResult.PerSampleCorrect!, distilled.PerSampleCorrect!);

        var report = result.Report;
        long teacherParameters = ModelCompression.Metrics.ModelMetrics.CountParameters(baseline.Model);
        long studentParameters = ModelCompression.Metrics.ModelMetrics.CountParameters(result.Model);
        report.Reference = new Dictionary<string, double>
        {
            ["teacherAccuracy"] = teacherResult.Value,
            ["studentFromScratchAccuracy"] = scratchResult.Value,
            ["distilledAccuracy"] = distilled.Value,
            ["gapClosed"] = teacherResult.Value > scratchResult.Value ? (distilled.Value - scratchResult.Value) / (teacherResult.Value - scratchResult.Value) : double.NaN,
            ["pValue"] = test.PValue,
            ["onlyScratchCorrect"] = test.OnlyFirstCorrect,
            ["onlyDistilledCorrect"] = test.OnlySecondCorrect,
            ["teacherParameters"] = teacherParameters,
            ["studentParameters"] = studentParameters,
            ["sizeRatio"] = (double)teacherParameters / studentParameters,
        };
        return report;
    }

    private static double Get(CompressionReport report, string key) =>
        report.Reference is not null && report.Reference.TryGetValue(key, out var v) ? v : double.NaN;
}
