using static TorchSharp.torch;

namespace ModelCompression.Training;

/// <summary>What an extra-loss callback sees of one training batch.</summary>
public sealed class TrainingBatch
{
    internal TrainingBatch(nn.Module<Tensor, Tensor> model, Tensor input, Tensor target, Tensor output, int epoch, long step)
    {
        Model = model;
        Input = input;
        Target = target;
        Output = output;
        Epoch = epoch;
        Step = step;
    }

    /// <summary>Gets the model being trained.</summary>
    public nn.Module<Tensor, Tensor> Model { get; }

    /// <summary>Gets the input batch (owned by the trainer).</summary>
    public Tensor Input { get; }

    /// <summary>Gets the target batch (owned by the trainer).</summary>
    public Tensor Target { get; }

    /// <summary>Gets the model's output for <see cref="Input"/>, part of the autograd graph.</summary>
    public Tensor Output { get; }

    /// <summary>Gets the zero-based epoch.</summary>
    public int Epoch { get; }

    /// <summary>Gets the zero-based optimizer step.</summary>
    public long Step { get; }
}

/// <summary>What an after-step callback sees of one finished optimizer step.</summary>
/// <param name="Model">The model being trained.</param>
/// <param name="Epoch">The zero-based epoch.</param>
/// <param name="Step">The zero-based optimizer step just taken.</param>
/// <param name="TotalSteps">The number of optimizer steps of the whole run.</param>
/// <param name="Loss">The batch's total loss (task loss plus extra loss).</param>
public readonly record struct TrainingStepInfo(nn.Module<Tensor, Tensor> Model, int Epoch, long Step, long TotalSteps, double Loss);

/// <summary>Progress of a training run, reported after every batch.</summary>
/// <param name="Epoch">The zero-based epoch.</param>
/// <param name="Epochs">The number of epochs.</param>
/// <param name="Batch">The zero-based batch within the epoch.</param>
/// <param name="BatchesPerEpoch">The number of batches per epoch.</param>
/// <param name="Loss">The batch's total loss.</param>
public readonly record struct TrainingProgress(int Epoch, int Epochs, long Batch, long BatchesPerEpoch, double Loss)
{
    /// <summary>Gets the fraction of the run done, 0 to 1.</summary>
    public double Fraction => Epochs == 0 || BatchesPerEpoch == 0
        ? 1
        : ((Epoch * (double)BatchesPerEpoch) + Batch + 1) / (Epochs * (double)BatchesPerEpoch);
}

/// <summary>
/// Hooks into a training run: extra loss terms (distillation, regularisers) and work after each optimizer step
/// (re-applying pruning masks, updating schedules).
/// </summary>
public sealed class TrainingCallbacks
{
    /// <summary>
    /// Gets or sets a function that returns an extra loss term for a batch (added to the task loss), or
    /// <see langword="null"/> for none. The returned tensor may be created in the trainer's dispose scope.
    /// </summary>
    public Func<TrainingBatch, Tensor?>? ExtraLoss { get; set; }

    /// <summary>
    /// Gets or sets a weight for the task loss (the loss of <see cref="TrainingOptions.Loss"/>).
    /// </summary>
    /// <value>The default is 1. Distillation sets it below 1; 0 trains on the extra loss alone.</value>
    public double TaskLossWeight { get; set; } = 1.0;

    /// <summary>
    /// Gets or sets an action run after the backward pass and before every optimizer step, inside <c>no_grad</c>
    /// (gradients are in place: pruning masks them here so that pruned weights get no update).
    /// </summary>
    public Action<TrainingStepInfo>? BeforeOptimizerStep { get; set; }

    /// <summary>Gets or sets an action run after every optimizer step, inside <c>no_grad</c>.</summary>
    public Action<TrainingStepInfo>? AfterOptimizerStep { get; set; }

    /// <summary>Gets or sets an action run after every epoch with the zero-based epoch and its mean loss.</summary>
    public Action<int, double>? AfterEpoch { get; set; }
}

/// <summary>The outcome of a training run.</summary>
/// <param name="Epochs">The number of epochs run.</param>
/// <param name="Steps">The number of batches trained on (optimizer steps, skipped ones included).</param>
/// <param name="EpochLosses">The mean total loss of each epoch.</param>
/// <param name="Seconds">The wall-clock time of the run.</param>
public sealed record TrainingSummary(int Epochs, long Steps, IReadOnlyList<double> EpochLosses, double Seconds)
{
    /// <summary>Gets the number of steps skipped because their gradients were not finite (see <see cref="TrainingOptions.MaxSkippedStepFraction"/>).</summary>
    public long SkippedSteps { get; init; }

    /// <summary>Gets the mean loss of the last epoch, or NaN when nothing was trained.</summary>
    public double FinalLoss => EpochLosses.Count == 0 ? double.NaN : EpochLosses[^1];
}
