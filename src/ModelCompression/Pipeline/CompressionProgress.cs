namespace ModelCompression;

/// <summary>The phase a pipeline run is in.</summary>
public enum CompressionPhase
{
    /// <summary>Checking the model and data, and measuring the baseline.</summary>
    Baseline,

    /// <summary>A step is changing the model.</summary>
    Applying,

    /// <summary>A step is training or fine-tuning.</summary>
    Training,

    /// <summary>A step is calibrating (observers, importance scores).</summary>
    Calibrating,

    /// <summary>Evaluating a step's model for the accuracy check.</summary>
    Evaluating,

    /// <summary>Measuring size, MACs and latency.</summary>
    Measuring,

    /// <summary>The run has finished.</summary>
    Completed,
}

/// <summary>Progress of a pipeline run.</summary>
/// <param name="StepName">The current step's name, or <see langword="null"/> outside steps.</param>
/// <param name="StepIndex">The zero-based index of the current step (−1 for the baseline).</param>
/// <param name="StepCount">The number of steps.</param>
/// <param name="Phase">The phase.</param>
/// <param name="Epoch">The zero-based epoch when training, else <see langword="null"/>.</param>
/// <param name="Batch">The zero-based batch within the epoch when training, else <see langword="null"/>.</param>
/// <param name="Fraction">The fraction of the current phase done, 0 to 1.</param>
public sealed record CompressionProgress(string? StepName, int StepIndex, int StepCount, CompressionPhase Phase, int? Epoch, long? Batch, double Fraction);
