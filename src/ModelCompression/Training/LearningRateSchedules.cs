namespace ModelCompression.Training;

/// <summary>
/// Gives the learning rate for each optimizer step. Implementations are pure functions of their arguments.
/// </summary>
public interface ILearningRateSchedule
{
    /// <summary>Returns the learning rate for an optimizer step.</summary>
    /// <param name="baseLearningRate">The learning rate set in <see cref="TrainingOptions.LearningRate"/>.</param>
    /// <param name="step">The zero-based index of the optimizer step.</param>
    /// <param name="totalSteps">The number of optimizer steps of the whole run.</param>
    /// <returns>The learning rate, non-negative.</returns>
    double GetLearningRate(double baseLearningRate, long step, long totalSteps);
}

/// <summary>A constant learning rate.</summary>
public sealed class ConstantLearningRate : ILearningRateSchedule
{
    /// <summary>The shared instance.</summary>
    public static ConstantLearningRate Instance { get; } = new();

    /// <inheritdoc/>
    public double GetLearningRate(double baseLearningRate, long step, long totalSteps) => baseLearningRate;

    /// <inheritdoc/>
    public override string ToString() => "constant";
}

/// <summary>Cosine annealing from the base rate down to <c>MinimumFactor</c> × base over the run (Loshchilov and Hutter 2017, without restarts).</summary>
/// <param name="minimumFactor">The final rate as a fraction of the base rate, 0 to 1. The default is 0.</param>
public sealed class CosineLearningRate(double minimumFactor = 0.0) : ILearningRateSchedule
{
    /// <summary>Gets the final rate as a fraction of the base rate.</summary>
    public double MinimumFactor { get; } = minimumFactor is >= 0 and <= 1
        ? minimumFactor
        : throw new ArgumentOutOfRangeException(nameof(minimumFactor), minimumFactor, "Must be between 0 and 1.");

    /// <inheritdoc/>
    public double GetLearningRate(double baseLearningRate, long step, long totalSteps)
    {
        if (totalSteps <= 1)
        {
            return baseLearningRate;
        }

        double progress = Math.Clamp((double)step / (totalSteps - 1), 0, 1);
        double factor = MinimumFactor + ((1 - MinimumFactor) * 0.5 * (1 + Math.Cos(Math.PI * progress)));
        return baseLearningRate * factor;
    }

    /// <inheritdoc/>
    public override string ToString() => $"cosine(min {MinimumFactor})";
}

/// <summary>Multiplies the rate by <c>Gamma</c> after every <c>StepFraction</c> of the run.</summary>
/// <param name="gamma">The factor applied at each decay, greater than 0 and at most 1. The default is 0.1.</param>
/// <param name="stepFraction">The fraction of the run between decays, greater than 0 and at most 1. The default is 1/3.</param>
public sealed class StepLearningRate(double gamma = 0.1, double stepFraction = 1.0 / 3) : ILearningRateSchedule
{
    /// <summary>Gets the factor applied at each decay.</summary>
    public double Gamma { get; } = gamma is > 0 and <= 1
        ? gamma
        : throw new ArgumentOutOfRangeException(nameof(gamma), gamma, "Must be greater than 0 and at most 1.");

    /// <summary>Gets the fraction of the run between decays.</summary>
    public double StepFraction { get; } = stepFraction is > 0 and <= 1
        ? stepFraction
        : throw new ArgumentOutOfRangeException(nameof(stepFraction), stepFraction, "Must be greater than 0 and at most 1.");

    /// <inheritdoc/>
    public double GetLearningRate(double baseLearningRate, long step, long totalSteps)
    {
        long period = Math.Max(1, (long)Math.Round(totalSteps * StepFraction));
        return baseLearningRate * Math.Pow(Gamma, step / period);
    }

    /// <inheritdoc/>
    public override string ToString() => $"step(gamma {Gamma}, every {StepFraction:P0})";
}
