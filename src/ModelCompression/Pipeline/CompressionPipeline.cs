using TorchSharp;
using System.Diagnostics;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using ModelCompression.Data;
using ModelCompression.Metrics;
using ModelCompression.Modules;
using ModelCompression.Training;
using static TorchSharp.torch;

namespace ModelCompression;

/// <summary>
/// A sequence of compression steps with an accuracy check after each. It works on a deep copy: the caller's
/// model is never changed, whatever happens (success, a failed check, a step that throws, cancellation).
/// </summary>
/// <example>
/// <code>
/// using var result = CompressionPipeline.Create()
///     .AddHalfPrecision(HalfPrecisionFormat.BFloat16)
///     .WithAccuracyCheck(0.01, AccuracyCheckPolicy.SkipStep)
///     .Build()
///     .Run(model, new CompressionData(train, test));
/// Console.WriteLine(result.Report);
/// </code>
/// </example>
public sealed class CompressionPipeline
{
    private const double SlowerThanBaselineRatio = 0.9;

    private readonly IReadOnlyList<ICompressionStep> _steps;
    private readonly AccuracyCheckOptions? _check;
    private readonly LatencyOptions _latency;
    private readonly int _seed;
    private readonly Device _device;
    private readonly ILogger _logger;
    private readonly string? _modelName;
    private readonly Func<nn.Module<Tensor, Tensor>, nn.Module<Tensor, Tensor>> _cloner;

    internal CompressionPipeline(
        IReadOnlyList<ICompressionStep> steps,
        AccuracyCheckOptions? check,
        LatencyOptions latency,
        int seed,
        Device device,
        ILogger? logger,
        string? modelName,
        Func<nn.Module<Tensor, Tensor>, nn.Module<Tensor, Tensor>>? cloner)
    {
        _steps = steps;
        _check = check;
        _latency = latency;
        _seed = seed;
        _device = device;
        _logger = logger ?? NullLogger.Instance;
        _modelName = modelName;
        _cloner = cloner ?? ModuleCloner.DeepClone;
    }

    /// <summary>Starts building a pipeline.</summary>
    /// <returns>A new builder.</returns>
    public static CompressionPipelineBuilder Create() => new();

    /// <summary>Gets the steps, in the order they run.</summary>
    public IReadOnlyList<ICompressionStep> Steps => _steps;

    /// <summary>Runs the pipeline on a copy of <paramref name="model"/>.</summary>
    /// <param name="model">The model to compress; never changed.</param>
    /// <param name="data">Training, calibration and evaluation data, and the evaluator.</param>
    /// <param name="progress">Optional progress.</param>
    /// <param name="cancellationToken">Cancels the run between batches and steps.</param>
    /// <returns>The compressed model (owned by the caller) and the report.</returns>
    /// <exception cref="ArgumentException">
    /// The data is empty, the model rejects the data's input shape, the model holds NaN or infinite weights, or a step
    /// needs training data that was not given. Nothing has run.
    /// </exception>
    /// <exception cref="AccuracyCheckFailedException">A step failed the accuracy check under <see cref="AccuracyCheckPolicy.Fail"/>.</exception>
    /// <exception cref="OperationCanceledException">The run was cancelled.</exception>
    public CompressionResult Run(
        nn.Module<Tensor, Tensor> model,
        CompressionData data,
        IProgress<CompressionProgress>? progress = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(data);
        ValidateData(data);
        ValidateWeights(model);
        ValidateFloatType(model);

        nn.Module<Tensor, Tensor>? current = null;
        nn.Module<Tensor, Tensor>? teacher = null;
        try
        {
            current = CopyToDevice(model);
            teacher = CopyToDevice(model);
            teacher.eval();
            foreach (var p in teacher.parameters())
            {
                p.requires_grad = false;
            }

            var context = new CompressionContext(data, teacher, _device, _seed, _logger, progress, cancellationToken)
            {
                StepCount = _steps.Count,
            };
            var outputShape = ValidateInputShape(current, data.Evaluation);
            CheckData(data, outputShape, cancellationToken);

            context.ReportProgress(CompressionPhase.Baseline, 0);
            var baselineEval = Evaluate(current, context);
            if (!double.IsFinite(baselineEval.Value))
            {
                throw new ArgumentException($"The baseline model's {data.Evaluator.MetricName} is {baselineEval.Value}; nothing can be compared with it.", nameof(model));
            }

            if (_check is { DropKind: AccuracyDropKind.Relative } && baselineEval.Value == 0)
            {
                throw new ArgumentException($"A relative drop is undefined: the baseline's {data.Evaluator.MetricName} is 0. Use an absolute drop.", nameof(model));
            }

            var baselineMeasure = Measure(current, context);
            var report = new CompressionReport
            {
                Model = _modelName ?? model.GetType().Name,
                Metric = data.Evaluator.MetricName,
                Baseline = Figures(baselineEval, baselineMeasure),
            };
            _logger.LogInformation("Baseline {Metric} {Value:0.####}, {Parameters} parameters", data.Evaluator.MetricName, baselineEval.Value, baselineMeasure.Parameters);

            var currentMeasure = baselineMeasure;
            var currentEval = baselineEval;
            for (int i = 0; i < _steps.Count; i++)
            {
                cancellationToken.ThrowIfCancellationRequested();
                var step = _steps[i];
                context.StepIndex = i;
                context.StepName = step.Name;
                context.ClearNotes();
                context.ReportProgress(CompressionPhase.Applying, 0);

                var (candidate, seconds) = ApplyStep(step, current, context);
                bool keep = false;
                try
                {
                    EnsureFinite(candidate, step.Name);
                    context.ReportProgress(CompressionPhase.Evaluating, 0);
                    var eval = Evaluate(candidate, context);
                    context.ReportProgress(CompressionPhase.Measuring, 0);
                    var measure = Measure(candidate, context);
                    var figures = StepFigures(step.Name, seconds, eval, measure, baselineEval, data.Evaluator, out var failure);
                    if (context.Notes.Count > 0)
                    {
                        figures.Message = string.Join("; ", figures.Message is null ? context.Notes : context.Notes.Prepend(figures.Message));
                    }

                    report.Steps.Add(figures);
                    _logger.LogInformation(
                        "Step {Step}: {Metric} {Value:0.####} (drop {Drop:0.####}), {Accepted}",
                        step.Name, data.Evaluator.MetricName, eval.Value, figures.AccuracyDrop, figures.Accepted ? "accepted" : "rejected");

                    if (figures.Accepted)
                    {
                        keep = true;
                        current.Dispose();
                        current = candidate;
                        currentMeasure = measure;
                        currentEval = eval;
                        continue;
                    }

                    if (_check!.Policy == AccuracyCheckPolicy.Fail)
                    {
                        throw failure!;
                    }

                    if (_check.Policy == AccuracyCheckPolicy.StopKeepBest)
                    {
                        var notRun = _steps.Skip(i + 1).Select(s => s.Name).ToList();
                        if (notRun.Count > 0)
                        {
                            report.Warnings ??= [];
                            report.Warnings.Add($"Not run: {string.Join(", ", notRun)} (the pipeline stopped after '{step.Name}' failed the accuracy check).");
                        }

                        break;
                    }
                }
                finally
                {
                    if (!keep)
                    {
                        candidate.Dispose();
                    }
                }
            }

            context.StepName = null;
            if (_latency.Enabled && report.Steps.Any(s => s.Accepted))
            {
                // The speedup compares the baseline (the teacher copy) and the final model measured together, their
                // calls alternating, so that the machine's drift over a long run does not pass for a speedup.
                context.ReportProgress(CompressionPhase.Measuring, 0);
                var (before, after) = ModelMetrics.MeasureLatencyPaired(teacher, current, context.SampleShape, _latency, _device, context.InputType);
                baselineMeasure = baselineMeasure with { Latency = before };
                currentMeasure = currentMeasure with { Latency = after };
                report.Baseline.LatencyMs = new LatencyFigures { Batch1 = before.Batch1, Batch64 = before.Batch64 };
            }

            report.Final = Figures(currentEval, currentMeasure);
            FinishReport(report, baselineMeasure, currentMeasure);
            context.ReportProgress(CompressionPhase.Completed, 1);
            var result = new CompressionResult(current, report);
            current = null;
            return result;
        }
        finally
        {
            current?.Dispose();
            teacher?.Dispose();
        }
    }

    private nn.Module<Tensor, Tensor> CopyToDevice(nn.Module<Tensor, Tensor> model)
    {
        var copy = _cloner(model);
        if (ReferenceEquals(copy, model))
        {
            throw new InvalidOperationException("The model cloner returned the caller's model itself; it must return a copy.");
        }

        try
        {
            copy.to(_device);
            return copy;
        }
        catch
        {
            copy.Dispose();
            throw;
        }
    }

    private (nn.Module<Tensor, Tensor> Model, double Seconds) ApplyStep(ICompressionStep step, nn.Module<Tensor, Tensor> current, CompressionContext context)
    {
        // The step seeds LibTorch's process-wide generator and draws from it (initialisation, dropout, sampling):
        // concurrent pipelines take turns, step by step, so each gets the model it would get alone.
        using var exclusive = RandomState.Gate.EnterScope();
        var candidate = _cloner(current);
        var stopwatch = Stopwatch.StartNew();
        try
        {
            nn.Module<Tensor, Tensor> result;
            using (NewDisposeScope())
            {
                TorchSharp.torch.random.manual_seed(context.StepSeed);
                result = step.Apply(candidate, context)
                    ?? throw new InvalidOperationException($"Step '{step.Name}' returned no model.");
            }

            // When the step returned a new root, the old root's children may live on inside it: the old container
            // is left to the garbage collector (its finalizer frees only its own native handle), never disposed.
            return (result, stopwatch.Elapsed.TotalSeconds);
        }
        catch
        {
            candidate.Dispose();
            throw;
        }
    }

    private StepFigures StepFigures(string name, double seconds, EvaluationResult eval, ModelMeasurement measure, EvaluationResult baseline, IEvaluator evaluator, out AccuracyCheckFailedException? failure)
    {
        failure = null;
        var figures = new StepFigures { Name = name, Seconds = seconds };
        Fill(figures, eval, measure);

        double absoluteDrop = evaluator.HigherIsBetter ? baseline.Value - eval.Value : eval.Value - baseline.Value;
        var kind = _check?.DropKind ?? AccuracyDropKind.Absolute;
        double drop = kind == AccuracyDropKind.Relative ? absoluteDrop / Math.Abs(baseline.Value) : absoluteDrop;
        figures.AccuracyDrop = drop;

        McNemarResult? test = null;
        if (baseline.PerSampleCorrect is { } before && eval.PerSampleCorrect is { } after && before.Count == after.Count && before.Count > 0)
        {
            test = McNemarTest.Compute(before, after, _check?.SignificanceLevel ?? 0.05);
            figures.PValue = test.PValue;
            // The interval of the drop is the negated interval of the difference (second − first).
            figures.AccuracyDropInterval = [-test.Upper, -test.Lower];
        }

        if (_check is null)
        {
            if (!double.IsFinite(eval.Value))
            {
                throw new InvalidOperationException($"Step '{name}' gave a {evaluator.MetricName} of {eval.Value}.");
            }

            figures.Accepted = true;
            return figures;
        }

        // A NaN or infinite metric fails the check (NaN compares false with everything).
        bool tooLarge = !(drop <= _check.MaxDrop + 1e-12);
        bool significant = !_check.RejectOnlySignificantDrops || test is null || !double.IsFinite(drop)
            || (test.OnlyFirstCorrect > test.OnlySecondCorrect && test.PValue < _check.SignificanceLevel);
        figures.Accepted = !(tooLarge && significant);
        if (tooLarge && !significant)
        {
            figures.Message = $"drop {drop:0.####} exceeds {_check.MaxDrop:0.####} but is not significant (McNemar p = {test!.PValue:0.####})";
        }
        else if (!figures.Accepted)
        {
            figures.Message = $"rejected: drop {drop:0.####} exceeds the allowed {_check.MaxDrop:0.####}";
            failure = new AccuracyCheckFailedException(name, evaluator.MetricName, baseline.Value, eval.Value, drop, _check.MaxDrop, test?.PValue);
        }

        return figures;
    }

    private static void FinishReport(CompressionReport report, ModelMeasurement baseline, ModelMeasurement final)
    {
        report.CompressionRatio = final.SizeBytes == 0 ? 0 : (double)baseline.SizeBytes / final.SizeBytes;
        if (baseline.Latency is { } b && final.Latency is { } f && f.Batch1 > 0 && f.Batch64 > 0)
        {
            report.Speedup = new LatencyFigures { Batch1 = b.Batch1 / f.Batch1, Batch64 = b.Batch64 / f.Batch64 };
            if (report.Steps.Any(s => s.Accepted) && (report.Speedup.Batch1 < SlowerThanBaselineRatio || report.Speedup.Batch64 < SlowerThanBaselineRatio))
            {
                report.Warnings ??= [];
                report.Warnings.Add(
                    $"The compressed model is slower than its baseline ({report.Speedup.Batch1:0.00}x at batch 1, {report.Speedup.Batch64:0.00}x at batch 64); " +
                    "its layers may lack fast kernels on this machine.");
            }
        }

        report.Layers = final.Layers
            .Select(l => new LayerFigures
            {
                Name = l.Name,
                Type = l.Type,
                Parameters = l.Parameters,
                NonzeroParameters = l.NonzeroParameters,
                Bits = l.Bits,
                Rank = l.Rank,
                KeptFraction = l.Parameters == 0 ? 1 : (double)l.NonzeroParameters / l.Parameters,
                Macs = l.Macs,
                SqnrDb = l.SqnrDb is { } db && double.IsFinite(db) ? Math.Round(db, 2) : null,
                SizeBytes = l.SizeBytes,
            })
            .ToList();
    }

    private static ModelFigures Figures(EvaluationResult eval, ModelMeasurement measure)
    {
        var figures = new ModelFigures();
        Fill(figures, eval, measure);
        return figures;
    }

    private static void Fill(ModelFigures figures, EvaluationResult eval, ModelMeasurement measure)
    {
        figures.Accuracy = eval.Value;
        figures.Parameters = measure.Parameters;
        figures.NonzeroParameters = measure.NonzeroParameters;
        figures.SizeBytes = measure.SizeBytes;
        figures.Macs = measure.Macs;
        figures.LatencyMs = measure.Latency is { } l ? new LatencyFigures { Batch1 = l.Batch1, Batch64 = l.Batch64 } : null;
    }

    private static EvaluationResult Evaluate(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        using var scope = NewDisposeScope();
        return context.Evaluator.Evaluate(model, context.EvaluationData, context.CancellationToken);
    }

    private ModelMeasurement Measure(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        using var scope = NewDisposeScope();
        return ModelMetrics.Measure(model, context.SampleShape, _latency.Enabled ? _latency : null, _device, context.InputType);
    }

    private void ValidateData(CompressionData data)
    {
        if (data.Evaluation.Count == 0)
        {
            throw new ArgumentException("The evaluation data is empty.", nameof(data));
        }

        if (data.Training is { Count: 0 })
        {
            throw new ArgumentException("The training data is empty.", nameof(data));
        }

        if (data.Calibration is { Count: 0 })
        {
            throw new ArgumentException("The calibration data is empty.", nameof(data));
        }

        if (data.Training is { } training && !training.SampleShape.SequenceEqual(data.Evaluation.SampleShape))
        {
            throw new ArgumentException(
                $"Training samples have shape [{string.Join(", ", training.SampleShape)}] but evaluation samples [{string.Join(", ", data.Evaluation.SampleShape)}].",
                nameof(data));
        }

        var needsTraining = _steps.OfType<ICompressionStepRequirements>().Where(s => s.RequiresTrainingData).Select(s => ((ICompressionStep)s).Name).ToList();
        if (needsTraining.Count > 0 && data.Training is null)
        {
            throw new ArgumentException($"Steps {string.Join(", ", needsTraining)} fine-tune the model and need training data; none was given.", nameof(data));
        }
    }

    private static void EnsureFinite(nn.Module<Tensor, Tensor> model, string stepName)
    {
        try
        {
            ValidateWeights(model);
        }
        catch (ArgumentException ex)
        {
            throw new InvalidOperationException($"Step '{stepName}' produced a model with non-finite weights: {ex.Message}", ex);
        }
    }

    private static void ValidateWeights(nn.Module<Tensor, Tensor> model)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        foreach (var (name, tensor) in model.named_parameters().Select(p => (p.name, (Tensor)p.parameter)).Concat(model.named_buffers().Select(b => (b.name, b.buffer))))
        {
            if (tensor.is_floating_point() && !isfinite(tensor).all().item<bool>())
            {
                throw new ArgumentException($"The model's tensor '{name}' holds NaN or infinite values.", nameof(model));
            }
        }
    }

    /// <summary>
    /// Reads every distinct data set once (see <see cref="DataChecks"/>), so that bad data is a clear
    /// <see cref="ArgumentException"/> before the first step instead of LibTorch's error inside one.
    /// </summary>
    private static void CheckData(CompressionData data, long[] outputShape, CancellationToken cancellationToken)
    {
        var checkedSources = new HashSet<IBatchSource>(ReferenceEqualityComparer.Instance);
        foreach (var (source, role) in new[] { (data.Evaluation, "evaluation data"), (data.Training, "training data"), (data.Calibration, "calibration data") })
        {
            if (source is not null && checkedSources.Add(source))
            {
                DataChecks.Check(source, role, outputShape, cancellationToken);
            }
        }
    }

    /// <summary>Refuses float64 models up front: the kernels, file encodings and measurements are float32.</summary>
    private static void ValidateFloatType(nn.Module<Tensor, Tensor> model)
    {
        foreach (var (name, parameter) in model.named_parameters())
        {
            if (parameter.dtype == ScalarType.Float64)
            {
                throw new ArgumentException(
                    $"The model's parameter '{name}' is Float64; the pipeline compresses float32 models (its kernels, file encodings and measurements are float32). Compress a float32 copy: model.to(ScalarType.Float32).",
                    nameof(model));
            }
        }
    }

    /// <returns>The model's output shape on a batch of two samples.</returns>
    private static long[] ValidateInputShape(nn.Module<Tensor, Tensor> model, IBatchSource evaluation)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var (input, _) = evaluation.FirstBatch(2);
        if (input.dtype != evaluation.InputType)
        {
            throw new ArgumentException(
                $"The evaluation data's batches hold {input.dtype} inputs but its {nameof(IBatchSource.InputType)} says {evaluation.InputType}; the library makes up inputs of that type to measure the model.",
                nameof(model));
        }

        using var modes = ModuleModes.Evaluating(model);
        try
        {
            var device = EvaluationLoop.ModelDevice(model);
            var output = model.call(input.to(device));
            if (output.dim() == 0 || output.shape[0] != input.shape[0])
            {
                throw new ArgumentException(
                    $"The model's output [{string.Join(", ", output.shape)}] has no batch dimension matching the input batch of {input.shape[0]}.",
                    nameof(model));
            }

            return output.shape;
        }
        catch (Exception ex) when (ex is not ArgumentException and not OperationCanceledException and not OutOfMemoryException)
        {
            throw new ArgumentException(
                $"The model rejects the data's input shape [{string.Join(", ", evaluation.SampleShape)}] (per sample): {ex.Message}",
                nameof(model),
                ex);
        }
    }
}
