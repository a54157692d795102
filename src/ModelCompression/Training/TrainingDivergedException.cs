namespace ModelCompression.Training;

/// <summary>
/// Thrown by the <see cref="Trainer"/> when training diverges: the loss is NaN or infinite, or more steps than
/// <see cref="TrainingOptions.MaxSkippedStepFraction"/> allows had non-finite gradients. The model's weights are
/// those of the last finite step.
/// </summary>
public sealed class TrainingDivergedException : InvalidOperationException
{
    /// <summary>Initializes a new instance of the <see cref="TrainingDivergedException"/> class.</summary>
    /// <param name="message">What diverged, where, and what to do.</param>
    /// <param name="epoch">The zero-based epoch.</param>
    /// <param name="step">The zero-based step of the run.</param>
    public TrainingDivergedException(string message, int epoch, long step)
        : base(message)
    {
        Epoch = epoch;
        Step = step;
    }

    /// <summary>Gets the zero-based epoch in which training diverged.</summary>
    public int Epoch { get; }

    /// <summary>Gets the zero-based step of the run at which training diverged.</summary>
    public long Step { get; }
}
