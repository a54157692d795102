using static TorchSharp.torch;

namespace ModelCompression.Training;

/// <summary>The optimizers the <see cref="Trainer"/> can use.</summary>
public enum OptimizerKind
{
    /// <summary>Stochastic gradient descent with momentum (<see cref="TrainingOptions.Momentum"/>).</summary>
    Sgd,

    /// <summary>Adam (Kingma and Ba 2015), with L2 weight decay.</summary>
    Adam,

    /// <summary>AdamW (Loshchilov and Hutter 2019), with decoupled weight decay.</summary>
    AdamW,
}

/// <summary>Options of the <see cref="Trainer"/> shared by every step that trains or fine-tunes.</summary>
public sealed class TrainingOptions : IValidatableOptions
{
    /// <summary>Gets or sets the number of passes over the training data.</summary>
    /// <value>The default is 1. Must be between 0 and 10,000 (0 trains nothing).</value>
    public int Epochs { get; set; } = 1;

    /// <summary>Gets or sets the number of samples per optimizer step.</summary>
    /// <value>The default is 64. Must be positive.</value>
    public int BatchSize { get; set; } = 64;

    /// <summary>Gets or sets the optimizer.</summary>
    /// <value>The default is <see cref="OptimizerKind.Adam"/>.</value>
    public OptimizerKind Optimizer { get; set; } = OptimizerKind.Adam;

    /// <summary>Gets or sets the base learning rate.</summary>
    /// <value>The default is 0.001. Must be positive and finite.</value>
    public double LearningRate { get; set; } = 1e-3;

    /// <summary>Gets or sets the momentum of <see cref="OptimizerKind.Sgd"/>.</summary>
    /// <value>The default is 0.9. Must be between 0 (inclusive) and 1 (exclusive).</value>
    public double Momentum { get; set; } = 0.9;

    /// <summary>Gets or sets the weight decay.</summary>
    /// <value>The default is 0. Must be non-negative and finite.</value>
    public double WeightDecay { get; set; }

    /// <summary>Gets or sets the learning-rate schedule.</summary>
    /// <value>The default is <see cref="ConstantLearningRate"/>.</value>
    public ILearningRateSchedule Schedule { get; set; } = ConstantLearningRate.Instance;

    /// <summary>Gets or sets the seed of the weight initialisation randomness, dropout and shuffling.</summary>
    /// <value>The default is <see langword="null"/>: the pipeline's seed (or 0 outside a pipeline).</value>
    public int? Seed { get; set; }

    /// <summary>Gets or sets whether the training data is shuffled every epoch.</summary>
    /// <value>The default is <see langword="true"/>.</value>
    public bool Shuffle { get; set; } = true;

    /// <summary>
    /// Gets or sets the loss of a batch, from the model output and the target.
    /// </summary>
    /// <value>The default is <see langword="null"/>: cross-entropy for class-index targets.</value>
    public Func<Tensor, Tensor, Tensor>? Loss { get; set; }

    /// <summary>
    /// Gets or sets the fraction of all the run's steps whose gradients may come out NaN or infinite: such a step is
    /// computed again (twice at most), then skipped (its gradients dropped, the weights left as they were), as
    /// mixed-precision loss scalers do, and the run goes on; one more than the fraction allows ends it with "Training
    /// diverged". Rare non-finite gradients
    /// come from kernels, not from the model: LibTorch 2.10's convolution gradients turn NaN now and then on some
    /// AVX-512 CPUs (README, "Known problems of LibTorch on this machine").
    /// </summary>
    /// <value>The default is 0.05. Must be between 0 (the first such step ends the run) and 1.</value>
    public double MaxSkippedStepFraction { get; set; } = 0.05;

    /// <summary>Returns a copy of these options.</summary>
    /// <returns>A new options object with the same values.</returns>
    public TrainingOptions Clone() => (TrainingOptions)MemberwiseClone();

    /// <inheritdoc/>
    public IReadOnlyList<string> Validate()
    {
        var errors = new List<string>();
        if (Epochs is < 0 or > 10_000)
        {
            errors.Add($"{nameof(TrainingOptions)}.{nameof(Epochs)} must be between 0 and 10000 (was {Epochs}).");
        }

        if (!(MaxSkippedStepFraction is >= 0 and <= 1))
        {
            errors.Add($"{nameof(TrainingOptions)}.{nameof(MaxSkippedStepFraction)} must be between 0 and 1 (was {MaxSkippedStepFraction}).");
        }

        if (BatchSize < 1)
        {
            errors.Add($"{nameof(TrainingOptions)}.{nameof(BatchSize)} must be positive (was {BatchSize}).");
        }

        if (!Enum.IsDefined(Optimizer))
        {
            errors.Add($"{nameof(TrainingOptions)}.{nameof(Optimizer)} is not a known optimizer (was {(int)Optimizer}).");
        }

        if (!(LearningRate > 0) || double.IsInfinity(LearningRate))
        {
            errors.Add($"{nameof(TrainingOptions)}.{nameof(LearningRate)} must be positive and finite (was {LearningRate}).");
        }

        if (!(Momentum >= 0 && Momentum < 1))
        {
            errors.Add($"{nameof(TrainingOptions)}.{nameof(Momentum)} must be in [0, 1) (was {Momentum}).");
        }

        if (!(WeightDecay >= 0) || double.IsInfinity(WeightDecay))
        {
            errors.Add($"{nameof(TrainingOptions)}.{nameof(WeightDecay)} must be non-negative and finite (was {WeightDecay}).");
        }

        if (Schedule is null)
        {
            errors.Add($"{nameof(TrainingOptions)}.{nameof(Schedule)} must not be null.");
        }

        return errors;
    }
}
