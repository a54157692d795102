using ModelCompression.Data;
using ModelCompression.Quantization;
using ModelCompression.Tests.Support;
using ModelCompression.Training;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Pipeline;

[TestFixture]
public sealed class CompressionPipelineTests
{
    private nn.Module<Tensor, Tensor> _model = null!;
    private TensorDataset _train = null!;
    private TensorDataset _test = null!;

    [OneTimeSetUp]
    public void TrainTinyModel() => (_model, _train, _test) = TestModels.TrainedMlp();

    [OneTimeTearDown]
    public void Cleanup()
    {
        _model.Dispose();
        _train.Dispose();
        _test.Dispose();
    }

    private CompressionData Data => new(_train, _test);

    private static CompressionPipelineBuilder Quiet() =>
        CompressionPipeline.Create().WithLatencyMeasurement(new ModelCompression.Metrics.LatencyOptions { Enabled = false });

    [Test]
    public void TinyModel_IsAccurateEnoughForTheChecks()
    {
        var accuracy = new AccuracyEvaluator().Evaluate(_model, _test).Value;
        Assert.That(accuracy, Is.GreaterThan(0.85));
    }

    [Test]
    public void Run_StepsRunInTheOrderAdded()
    {
        var log = new List<string>();
        using var result = Quiet()
            .AddStep(new RecordingStep("a", log))
            .AddStep(new RecordingStep("b", log))
            .AddStep(new RecordingStep("c", log))
            .Build()
            .Run(_model, Data);

        Assert.That(log, Is.EqualTo(new[] { "a", "b", "c" }));
        Assert.That(result.Report.Steps.Select(s => s.Name), Is.EqualTo(new[] { "a", "b", "c" }));
        Assert.That(result.Report.Steps.All(s => s.Accepted), Is.True);
    }

    [Test]
    public void Build_SecondCall_Throws()
    {
        var builder = Quiet().AddStep(new RecordingStep("a", []));
        builder.Build();
        Assert.Throws<InvalidOperationException>(() => builder.Build());
        Assert.Throws<InvalidOperationException>(() => builder.AddStep(new RecordingStep("b", [])));
        Assert.Throws<InvalidOperationException>(() => builder.WithSeed(3));
    }

    [Test]
    public void WithAccuracyCheck_InvalidOptions_ListsEveryError()
    {
        var options = new AccuracyCheckOptions { MaxDrop = 1.5, SignificanceLevel = 0, Policy = (AccuracyCheckPolicy)42 };
        var ex = Assert.Throws<OptionsValidationException>(() => CompressionPipeline.Create().WithAccuracyCheck(options));
        Assert.That(ex!.OptionsType, Is.EqualTo(nameof(AccuracyCheckOptions)));
        Assert.That(ex.Errors, Has.Count.EqualTo(3));
        Assert.That(ex.Message, Does.Contain("MaxDrop").And.Contain("SignificanceLevel").And.Contain("Policy"));
    }

    [Test]
    public void Build_OptionsMadeInvalidAfterAdding_ListsEveryErrorOfEveryStep()
    {
        var half = new HalfPrecisionOptions();
        var check = new AccuracyCheckOptions { MaxDrop = 0.02 };
        var builder = Quiet().AddHalfPrecision(half).AddStep(new RecordingStep("x", [])).WithAccuracyCheck(check);
        half.Format = (HalfPrecisionFormat)7;
        half.Layers = null!;
        check.MaxDrop = -0.5;

        var ex = Assert.Throws<OptionsValidationException>(() => builder.Build());
        Assert.That(ex!.Errors, Has.Count.EqualTo(3));
        Assert.That(ex.Errors[0], Does.StartWith("step 1 (HalfPrecision)").And.Contain("Format"));
        Assert.That(ex.Errors[1], Does.Contain("Layers"));
        Assert.That(ex.Errors[2], Does.Contain("MaxDrop"));
    }

    [TestCase(-0.01)]
    [TestCase(1.01)]
    [TestCase(double.NaN)]
    [TestCase(double.PositiveInfinity)]
    public void WithAccuracyCheck_MaxDropOutsideItsRange_Throws(double maxDrop)
    {
        var ex = Assert.Throws<OptionsValidationException>(() => CompressionPipeline.Create().WithAccuracyCheck(maxDrop));
        Assert.That(ex!.Message, Does.Contain("MaxDrop"));
    }

    [Test]
    public void FailPolicy_DestructiveStep_ThrowsWithStepNameAndFigures()
    {
        string before = TestModels.StateHash(_model);
        var pipeline = Quiet().AddStep(new DestructiveStep("Wreck")).WithAccuracyCheck(0.01, AccuracyCheckPolicy.Fail).Build();

        var ex = Assert.Throws<AccuracyCheckFailedException>(() => pipeline.Run(_model, Data));

        Assert.That(ex!.StepName, Is.EqualTo("Wreck"));
        Assert.That(ex.Before, Is.GreaterThan(0.85));
        Assert.That(ex.After, Is.LessThan(0.6));
        Assert.That(ex.Drop, Is.EqualTo(ex.Before - ex.After).Within(1e-12));
        Assert.That(ex.MaxDrop, Is.EqualTo(0.01));
        Assert.That(ex.PValue, Is.LessThan(1e-6));
        Assert.That(TestModels.StateHash(_model), Is.EqualTo(before));
    }

    [Test]
    public void SkipStepPolicy_DestructiveStep_IsRolledBackAndLaterStepsRun()
    {
        var log = new List<string>();
        using var result = Quiet()
            .AddStep(new DestructiveStep())
            .AddStep(new RecordingStep("after", log))
            .WithAccuracyCheck(0.01, AccuracyCheckPolicy.SkipStep)
            .Build()
            .Run(_model, Data);

        var report = result.Report;
        Assert.That(report.Steps[0].Accepted, Is.False);
        Assert.That(report.Steps[0].Message, Does.Contain("rejected"));
        Assert.That(report.Steps[1].Accepted, Is.True);
        Assert.That(log, Is.EqualTo(new[] { "after" }));
        Assert.That(report.Final.Accuracy, Is.EqualTo(report.Baseline.Accuracy));
        Assert.That(TestModels.StateHash(result.Model), Is.EqualTo(TestModels.StateHash(_model)));
    }

    [Test]
    public void WithLogger_Run_LogsTheBaselineAndEveryStepsVerdictToTheCallersLogger()
    {
        var logger = new CapturingLogger();
        using var result = Quiet()
            .AddStep(new DestructiveStep())
            .AddHalfPrecision(HalfPrecisionFormat.Float16)
            .WithAccuracyCheck(0.01, AccuracyCheckPolicy.SkipStep)
            .WithLogger(logger)
            .Build()
            .Run(_model, Data);

        var information = logger.Entries.Where(e => e.Level == Microsoft.Extensions.Logging.LogLevel.Information).Select(e => e.Message).ToList();
        Assert.That(information[0], Does.StartWith("Baseline accuracy ").And.Contain($"{ModelCompression.Metrics.ModelMetrics.CountParameters(_model)} parameters"));
        Assert.That(information, Has.Some.Match("^Step Destroy: accuracy [0-9.]+ \\(drop [0-9.]+\\), rejected$"));
        Assert.That(information, Has.Some.Match("^Step HalfPrecision.*: accuracy [0-9.]+ \\(drop -?[0-9.]+\\), accepted$"));
        Assert.That(logger.Entries.Where(e => e.Level == Microsoft.Extensions.Logging.LogLevel.Debug).Select(e => e.Message), Has.Some.StartWith("Converted "), "steps log through the same logger");
        Assert.That(result.Report.Steps.Select(s => s.Accepted), Is.EqualTo(new[] { false, true }));
    }

    [Test]
    public void WithLogger_Null_IsRejected() =>
        Assert.Throws<ArgumentNullException>(() => CompressionPipeline.Create().WithLogger(null!));

    [Test]
    public void StopKeepBestPolicy_DestructiveStep_StopsAndReturnsTheLastAcceptedModel()
    {
        var log = new List<string>();
        using var result = Quiet()
            .AddHalfPrecision(HalfPrecisionFormat.Float16)
            .AddStep(new DestructiveStep())
            .AddStep(new RecordingStep("never", log))
            .WithAccuracyCheck(0.01, AccuracyCheckPolicy.StopKeepBest)
            .Build()
            .Run(_model, Data);

        var steps = result.Report.Steps;
        Assert.That(steps.Select(s => s.Accepted), Is.EqualTo(new[] { true, false }), "steps that never ran have no figures");
        Assert.That(result.Report.Warnings, Has.One.StartsWith("Not run: never"));
        Assert.That(log, Is.Empty);
        // The returned model is the half-precision one: the first step's size, smaller than the baseline's.
        Assert.That(result.Report.Final.SizeBytes, Is.EqualTo(steps[0].SizeBytes).And.LessThan(result.Report.Baseline.SizeBytes));
        Assert.That(result.Report.Final.Accuracy, Is.EqualTo(steps[0].Accuracy));
    }

    [Test]
    public void RejectOnlySignificantDrops_InsignificantDrop_IsAccepted()
    {
        // 1000 samples. Baseline wrong on 0..11; the step's model wrong on 12..31 instead:
        // b = 20 newly wrong, c = 12 newly right, drop (20 - 12) / 1000 = 0.008, McNemar χ² = 49 / 32, p = 0.216.
        var baseline = Enumerable.Range(0, 1000).Select(i => i >= 12).ToArray();
        var after = Enumerable.Range(0, 1000).Select(i => i < 12 || i >= 32).ToArray();
        var evaluator = new ScriptedEvaluator([baseline, after]);
        var check = new AccuracyCheckOptions { MaxDrop = 0.005, RejectOnlySignificantDrops = true };
        using var result = Quiet().AddStep(new RecordingStep("noise", [])).WithAccuracyCheck(check).Build()
            .Run(_model, new CompressionData(_train, _test) { Evaluator = evaluator });

        var step = result.Report.Steps[0];
        Assert.That(step.Accepted, Is.True);
        Assert.That(step.AccuracyDrop, Is.EqualTo(0.008).Within(1e-12));
        Assert.That(step.PValue, Is.EqualTo(0.21592493894014034).Within(1e-9));
        Assert.That(step.Message, Does.Contain("not significant"));
    }

    [Test]
    public void CallerModel_UnchangedAfterSuccess()
    {
        string before = TestModels.StateHash(_model);
        using (var result = Quiet().AddHalfPrecision().Build().Run(_model, Data))
        {
            using (no_grad())
            {
                foreach (var p in result.Model.parameters())
                {
                    p.add_(1);
                }
            }
        }

        Assert.That(TestModels.StateHash(_model), Is.EqualTo(before));
        Assert.That(_model.training, Is.False);
    }

    [Test]
    public void CallerModel_UnchangedAfterAStepThrows()
    {
        string before = TestModels.StateHash(_model);
        var pipeline = Quiet().AddHalfPrecision().AddStep(new ThrowingStep()).Build();
        var ex = Assert.Throws<InvalidOperationException>(() => pipeline.Run(_model, Data));
        Assert.That(ex!.Message, Is.EqualTo("step failed on purpose"));
        Assert.That(TestModels.StateHash(_model), Is.EqualTo(before));
        Assert.That(_model.modules().Any(m => m is HalfPrecisionLayer), Is.False);
    }

    [Test]
    public void CallerModel_UnchangedAfterCancellation()
    {
        string before = TestModels.StateHash(_model);
        using var source = new CancellationTokenSource();
        var pipeline = Quiet().AddStep(new CancellingStep(source)).AddHalfPrecision().Build();
        Assert.That(() => pipeline.Run(_model, Data, cancellationToken: source.Token), Throws.InstanceOf<OperationCanceledException>());
        Assert.That(TestModels.StateHash(_model), Is.EqualTo(before));
    }

    [Test]
    public void Run_AlreadyCancelled_ThrowsBeforeAnyStep()
    {
        var log = new List<string>();
        using var source = new CancellationTokenSource();
        source.Cancel();
        var pipeline = Quiet().AddStep(new RecordingStep("a", log)).Build();
        Assert.That(() => pipeline.Run(_model, Data, cancellationToken: source.Token), Throws.InstanceOf<OperationCanceledException>());
        Assert.That(log, Is.Empty);
    }

    [Test]
    public void Run_SameSeed_SameCompressedModel_OtherSeed_Differs()
    {
        string Hash(int seed)
        {
            using var result = Quiet().AddStep(new FineTuneStep()).WithSeed(seed).Build().Run(_model, Data);
            return TestModels.StateHash(result.Model);
        }

        string first = Hash(7);
        Assert.That(Hash(7), Is.EqualTo(first));
        Assert.That(Hash(8), Is.Not.EqualTo(first));
    }

    [Test]
    public void Run_LeavesNoLiveTensors()
    {
        // TorchSharp 0.107 counts one extra live tensor for every Parameter it constructs: the Parameter takes the
        // native handle of the tensor it wraps, and that emptied wrapper is never subtracted from Tensor.TotalCount
        // (it holds no native memory). Measure that per-copy artefact first, then require the pipeline run to add
        // nothing beyond it: any batch, activation, optimizer state or module it forgot to free would show.
        long parametersPerCopy = _model.parameters().Count();
        Assert.That(CountDelta(() => ModelCompression.Modules.ModuleCloner.DeepClone(_model).Dispose()), Is.EqualTo(parametersPerCopy));

        var pipeline = CompressionPipeline.Create()
            .AddStep(new FineTuneStep())
            .AddStep(new DestructiveStep())
            .AddStep(new RecordingStep("noop", []))
            .WithAccuracyCheck(0.05, AccuracyCheckPolicy.SkipStep)
            .WithLatencyMeasurement(new ModelCompression.Metrics.LatencyOptions { Warmup = 1, Repeats = 2 })
            .Build();
        pipeline.Run(_model, Data).Dispose(); // warm-up: lazily created globals are not counted

        // Copies: the working model, the teacher, and one candidate per step.
        long copies = 2 + 3;
        Assert.That(CountDelta(() => pipeline.Run(_model, Data).Dispose()), Is.EqualTo(copies * parametersPerCopy));
    }

    [Test]
    public void Run_HalfPrecision_LeavesNoLiveTensors()
    {
        long parametersPerCopy = _model.parameters().Count();
        var pipeline = Quiet().AddHalfPrecision().Build();
        pipeline.Run(_model, Data).Dispose();

        // Working model, teacher, one candidate, and one new Parameter per converted weight and bias.
        Assert.That(CountDelta(() => pipeline.Run(_model, Data).Dispose()), Is.EqualTo((3 * parametersPerCopy) + parametersPerCopy));
    }

    /// <summary>Live tensors added by <paramref name="action"/>. No collection afterwards: a tensor left to the finalizer counts as leaked.</summary>
    private static long CountDelta(Action action)
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long before = TestModels.SettledTensorCount();
        action();
        return Tensor.TotalCount - before;
    }

    [Test]
    public void Run_StepProducingNonFiniteWeights_ThrowsNamingTheStep()
    {
        var pipeline = Quiet().AddStep(new PoisonStep()).WithAccuracyCheck(0.5, AccuracyCheckPolicy.SkipStep).Build();
        var ex = Assert.Throws<InvalidOperationException>(() => pipeline.Run(_model, Data));
        Assert.That(ex!.Message, Does.Contain("Poison").And.Contain("fc1.bias"));
    }

    [Test]
    public void Run_RelativeDropFromAZeroBaseline_Throws()
    {
        var evaluator = new ScriptedEvaluator([[false, false, false]]);
        var pipeline = Quiet().AddStep(new RecordingStep("a", [])).WithAccuracyCheck(new AccuracyCheckOptions { DropKind = AccuracyDropKind.Relative }).Build();
        var ex = Assert.Throws<ArgumentException>(() => pipeline.Run(_model, new CompressionData(_train, _test) { Evaluator = evaluator }));
        Assert.That(ex!.Message, Does.Contain("relative drop"));
    }

    [Test]
    public void Run_RelativeDrop_IsAFractionOfTheBaseline()
    {
        // Baseline 0.8 (8 of 10), after the step 0.6: absolute drop 0.2, relative 0.25.
        var before = Enumerable.Range(0, 10).Select(i => i < 8).ToArray();
        var after = Enumerable.Range(0, 10).Select(i => i < 6).ToArray();
        var check = new AccuracyCheckOptions { DropKind = AccuracyDropKind.Relative, MaxDrop = 0.3 };
        using var result = Quiet().AddStep(new RecordingStep("a", [])).WithAccuracyCheck(check).Build()
            .Run(_model, new CompressionData(_train, _test) { Evaluator = new ScriptedEvaluator([before, after]) });
        Assert.That(result.Report.Steps[0].AccuracyDrop, Is.EqualTo(0.25).Within(1e-12));
        Assert.That(result.Report.Steps[0].Accepted, Is.True);
    }

    [Test]
    public void Run_ReportsProgressFromBaselineToCompleted()
    {
        var phases = new List<CompressionPhase>();
        using var result = Quiet().AddStep(new FineTuneStep()).Build()
            .Run(_model, Data, new InlineProgress(p => phases.Add(p.Phase)));
        Assert.That(phases.First(), Is.EqualTo(CompressionPhase.Baseline));
        Assert.That(phases.Last(), Is.EqualTo(CompressionPhase.Completed));
        Assert.That(phases, Does.Contain(CompressionPhase.Training).And.Contain(CompressionPhase.Evaluating));
    }

    [Test]
    public void Run_EmptyEvaluationData_Throws()
    {
        var pipeline = Quiet().AddStep(new RecordingStep("a", [])).Build();
        var ex = Assert.Throws<ArgumentException>(() => pipeline.Run(_model, new CompressionData(_train, new EmptySource())));
        Assert.That(ex!.Message, Does.Contain("evaluation data is empty"));
    }

    [Test]
    public void Run_StepNeedsTrainingDataButNoneGiven_ThrowsBeforeAnyStep()
    {
        var log = new List<string>();
        var pipeline = Quiet().AddStep(new RecordingStep("first", log)).AddStep(new FineTuneStep()).Build();
        var ex = Assert.Throws<ArgumentException>(() => pipeline.Run(_model, new CompressionData(null, _test)));
        Assert.That(ex!.Message, Does.Contain("FineTune"));
        Assert.That(log, Is.Empty);
    }

    [Test]
    public void Run_MismatchedInputShape_ThrowsNamingTheShape()
    {
        using var wrong = new TensorDataset(torch.zeros(10, 5), torch.zeros(10, dtype: int64));
        var log = new List<string>();
        var pipeline = Quiet().AddStep(new RecordingStep("a", log)).Build();
        var ex = Assert.Throws<ArgumentException>(() => pipeline.Run(_model, new CompressionData(null, wrong)));
        Assert.That(ex!.Message, Does.Contain("[5]"));
        Assert.That(log, Is.Empty);
    }

    [TestCase(float.NaN)]
    [TestCase(float.PositiveInfinity)]
    [TestCase(float.NegativeInfinity)]
    public void Run_ModelWithNonFiniteWeights_ThrowsNamingTheTensor(float bad)
    {
        using var broken = ModelCompression.Modules.ModuleCloner.DeepClone(_model);
        using (no_grad())
        {
            broken.named_parameters().Single(p => p.name == "fc2.weight").parameter[1, 2] = bad;
        }

        var log = new List<string>();
        var pipeline = Quiet().AddStep(new RecordingStep("a", log)).Build();
        var ex = Assert.Throws<ArgumentException>(() => pipeline.Run(broken, Data));
        Assert.That(ex!.Message, Does.Contain("fc2.weight"));
        Assert.That(log, Is.Empty);
    }

    [Test]
    public void Run_ReportHoldsEveryFieldWithRealNumbers()
    {
        using var result = CompressionPipeline.Create()
            .AddHalfPrecision()
            .WithLatencyMeasurement(new ModelCompression.Metrics.LatencyOptions { Warmup = 1, Repeats = 3 })
            .WithModelName("tiny")
            .Build()
            .Run(_model, Data);
        var r = result.Report;
        Assert.That(r.Model, Is.EqualTo("tiny"));
        Assert.That(r.Baseline.Parameters, Is.EqualTo((4 * 8) + 8 + (8 * 3) + 3));
        Assert.That(r.Baseline.Macs, Is.EqualTo((4 * 8) + (8 * 3)));
        // sizeBytes is the compressed file: the parameters' bytes plus the architecture and framing.
        Assert.That(r.Baseline.SizeBytes, Is.EqualTo(ModelCompression.Serialization.CompressedModel.Measure(_model).TotalBytes));
        Assert.That(r.Baseline.SizeBytes, Is.InRange(r.Baseline.Parameters * 4, (r.Baseline.Parameters * 4) + 150));
        Assert.That(r.Final.SizeBytes, Is.InRange(r.Baseline.Parameters * 2, (r.Baseline.Parameters * 2) + 150));
        Assert.That(r.CompressionRatio, Is.EqualTo((double)r.Baseline.SizeBytes / r.Final.SizeBytes));
        Assert.That(r.Baseline.LatencyMs!.Batch1, Is.GreaterThan(0));
        Assert.That(r.Speedup!.Batch64, Is.GreaterThan(0));
        Assert.That(r.Layers!.Select(l => (l.Name, l.Bits)), Is.EqualTo(new[] { ("fc1", 16), ("fc2", 16) }));
    }

    private sealed class PoisonStep : ICompressionStep
    {
        public string Name => "Poison";

        public nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context)
        {
            using var noGrad = no_grad();
            model.named_parameters().Single(p => p.name == "fc1.bias").parameter[0] = float.NaN;
            return model;
        }
    }

    private sealed class InlineProgress(Action<CompressionProgress> action) : IProgress<CompressionProgress>
    {
        public void Report(CompressionProgress value) => action(value);
    }

    private sealed class EmptySource : IBatchSource
    {
        public long Count => 0;

        public IReadOnlyList<long> SampleShape => [4];

        public IEnumerable<(Tensor Input, Tensor Target)> GetBatches(int batchSize, bool shuffle = false, int seed = 0) => [];
    }

    /// <summary>Returns scripted per-sample verdicts, one list per call (the last one repeats).</summary>
    private sealed class ScriptedEvaluator(bool[][] script) : IEvaluator
    {
        private int _calls;

        public string MetricName => "accuracy";

        public bool HigherIsBetter => true;

        public EvaluationResult Evaluate(nn.Module<Tensor, Tensor> model, IBatchSource data, CancellationToken cancellationToken = default)
        {
            var verdicts = script[Math.Min(_calls++, script.Length - 1)];
            return new EvaluationResult(verdicts.Count(v => v) / (double)verdicts.Length, verdicts.Length, verdicts);
        }
    }
}
