using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using ModelCompression.Data;
using ModelCompression.Training;
using static TorchSharp.torch;

namespace ModelCompression;

/// <summary>
/// Everything a step may use while it runs: data, evaluator, device, seed, logger, progress, cancellation, and the
/// original (uncompressed) model as a teacher.
/// </summary>
public sealed class CompressionContext
{
    private readonly IProgress<CompressionProgress>? _progress;
    private readonly List<string> _notes = [];

    /// <summary>Initializes a new instance of the <see cref="CompressionContext"/> class, for running steps outside a pipeline.</summary>
    /// <param name="data">The data.</param>
    /// <param name="originalModel">The uncompressed model, used as a teacher; not changed by steps.</param>
    /// <param name="device">The device. The default is CPU.</param>
    /// <param name="seed">The seed. The default is 0.</param>
    /// <param name="logger">A logger, or <see langword="null"/>.</param>
    /// <param name="progress">Progress, or <see langword="null"/>.</param>
    /// <param name="cancellationToken">Cancellation.</param>
    public CompressionContext(
        CompressionData data,
        nn.Module<Tensor, Tensor> originalModel,
        Device? device = null,
        int seed = 0,
        ILogger? logger = null,
        IProgress<CompressionProgress>? progress = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(data);
        ArgumentNullException.ThrowIfNull(originalModel);
        Data = data;
        OriginalModel = originalModel;
        Device = device ?? CPU;
        Seed = seed;
        Logger = logger ?? NullLogger.Instance;
        _progress = progress;
        CancellationToken = cancellationToken;
        SampleShape = data.Evaluation.SampleShape;
        InputType = data.Evaluation.InputType;
    }

    /// <summary>Gets the data of the run.</summary>
    public CompressionData Data { get; }

    /// <summary>Gets the training data, or <see langword="null"/>.</summary>
    public IBatchSource? TrainingData => Data.Training;

    /// <summary>Gets the calibration data: the explicit one, else the training data, else the evaluation data.</summary>
    public IBatchSource CalibrationData => Data.Calibration ?? Data.Training ?? Data.Evaluation;

    /// <summary>Gets the evaluation data.</summary>
    public IBatchSource EvaluationData => Data.Evaluation;

    /// <summary>Gets the evaluator.</summary>
    public IEvaluator Evaluator => Data.Evaluator;

    /// <summary>Gets the shape of one input sample, without the batch dimension.</summary>
    public IReadOnlyList<long> SampleShape { get; }

    /// <summary>Gets the element type of the inputs (float32, or int64 for token ids), as the evaluation data gives it.</summary>
    public ScalarType InputType { get; }

    /// <summary>Gets the original, uncompressed model (a private copy; steps must not change it). Use it as a teacher.</summary>
    public nn.Module<Tensor, Tensor> OriginalModel { get; }

    /// <summary>Gets the device the model lives on.</summary>
    public Device Device { get; }

    /// <summary>Gets the seed of the run; each step gets a seed derived from it (see <see cref="StepSeed"/>).</summary>
    public int Seed { get; }

    /// <summary>Gets the seed for the current step: the run's seed combined with the step's index.</summary>
    public int StepSeed => unchecked((Seed * 1_000_003) + StepIndex + 1);

    /// <summary>Gets the logger (never <see langword="null"/>).</summary>
    public ILogger Logger { get; }

    /// <summary>Gets the cancellation token of the run.</summary>
    public CancellationToken CancellationToken { get; }

    /// <summary>Gets the name of the running step, or <see langword="null"/>.</summary>
    public string? StepName { get; internal set; }

    /// <summary>Gets the zero-based index of the running step (−1 before the first).</summary>
    public int StepIndex { get; internal set; } = -1;

    /// <summary>Gets the number of steps in the run.</summary>
    public int StepCount { get; internal set; }

    /// <summary>Gets the notes the running step added (shown in the step's report entry).</summary>
    public IReadOnlyList<string> Notes => _notes;

    /// <summary>Adds a note about the running step to the report (e.g. which layers became sparse and why).</summary>
    /// <param name="note">The note.</param>
    public void AddNote(string note)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(note);
        _notes.Add(note);
    }

    internal void ClearNotes() => _notes.Clear();

    /// <summary>The evaluator's metric on the calibration data, signed so that higher is always better (for steps comparing candidates).</summary>
    internal double CalibrationScore(nn.Module<Tensor, Tensor> model)
    {
        using var scope = NewDisposeScope();
        return Evaluator.Evaluate(model, CalibrationData, CancellationToken).Value * (Evaluator.HigherIsBetter ? 1 : -1);
    }

    /// <summary>Reports progress of the running step.</summary>
    /// <param name="phase">The phase.</param>
    /// <param name="fraction">The fraction done, 0 to 1.</param>
    /// <param name="epoch">The epoch, when training.</param>
    /// <param name="batch">The batch, when training.</param>
    public void ReportProgress(CompressionPhase phase, double fraction, int? epoch = null, long? batch = null) =>
        _progress?.Report(new CompressionProgress(StepName, StepIndex, StepCount, phase, epoch, batch, Math.Clamp(fraction, 0, 1)));

    /// <summary>
    /// Fine-tunes <paramref name="model"/> on the training data with the shared <see cref="Trainer"/>, reporting
    /// progress and honouring cancellation.
    /// </summary>
    /// <param name="model">The model to train in place.</param>
    /// <param name="options">The training options; their seed defaults to <see cref="StepSeed"/>.</param>
    /// <param name="callbacks">Extra loss and after-step hooks.</param>
    /// <returns>What the run did.</returns>
    /// <exception cref="InvalidOperationException">The run has no training data.</exception>
    public TrainingSummary Train(nn.Module<Tensor, Tensor> model, TrainingOptions options, TrainingCallbacks? callbacks = null) =>
        Train(model, options, callbacks, null);

    /// <summary>Fine-tunes <paramref name="model"/> on <paramref name="data"/> (or the training data) with the shared <see cref="Trainer"/>.</summary>
    /// <param name="model">The model to train in place.</param>
    /// <param name="options">The training options; their seed defaults to <see cref="StepSeed"/>.</param>
    /// <param name="callbacks">Extra loss and after-step hooks.</param>
    /// <param name="data">The data to train on, or <see langword="null"/> for the run's training data.</param>
    /// <returns>What the run did.</returns>
    /// <exception cref="InvalidOperationException">No data was given and the run has no training data.</exception>
    public TrainingSummary Train(nn.Module<Tensor, Tensor> model, TrainingOptions options, TrainingCallbacks? callbacks, IBatchSource? data)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(options);
        data ??= TrainingData ?? throw new InvalidOperationException($"Step '{StepName}' needs training data, but the pipeline was run without any.");
        if (options.Epochs > 0 && !model.parameters().Any(p => p.requires_grad))
        {
            Logger.LogWarning("Step '{Step}': the model has no trainable parameters (every requires_grad is false), so its training does nothing.", StepName);
            AddNote("nothing trained: the model has no parameter with requires_grad");
        }

        var trainer = new Trainer(options);
        var progress = _progress is null
            ? null
            : new SynchronousProgress<TrainingProgress>(p => ReportProgress(CompressionPhase.Training, p.Fraction, p.Epoch, p.Batch));
        var summary = trainer.Train(model, data, callbacks, StepSeed, progress, CancellationToken);
        if (summary.SkippedSteps > 0)
        {
            Logger.LogWarning("Step '{Step}': {Skipped} of {Steps} training steps had non-finite gradients and were skipped.", StepName, summary.SkippedSteps, summary.Steps);
        }

        return summary;
    }

    /// <summary>An <see cref="IProgress{T}"/> that calls back on the reporting thread (unlike <see cref="Progress{T}"/>).</summary>
    private sealed class SynchronousProgress<T>(Action<T> report) : IProgress<T>
    {
        public void Report(T value) => report(value);
    }
}
