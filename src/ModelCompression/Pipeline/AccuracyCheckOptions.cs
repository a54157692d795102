namespace ModelCompression;

/// <summary>What the pipeline does when a step loses more than the accuracy check allows.</summary>
public enum AccuracyCheckPolicy
{
    /// <summary>Stop and throw an <see cref="AccuracyCheckFailedException"/>; the caller's model is unchanged.</summary>
    Fail,

    /// <summary>Roll the step back (keep the model from before it) and go on with the next step.</summary>
    SkipStep,

    /// <summary>Roll the step back, run no further steps, and return the last model that passed the check.</summary>
    StopKeepBest,
}

/// <summary>How the drop of the metric is measured.</summary>
public enum AccuracyDropKind
{
    /// <summary>The drop in the metric's own units (0.01 = one percentage point of accuracy).</summary>
    Absolute,

    /// <summary>The drop as a fraction of the baseline (0.01 = one percent of the baseline's value).</summary>
    Relative,
}

/// <summary>
/// The check the pipeline runs after every step: how far the evaluation metric may fall below the baseline
/// (the caller's model before any step), and what happens when it falls further.
/// </summary>
public sealed class AccuracyCheckOptions
{
    /// <summary>Gets or sets the largest drop allowed, measured from the baseline.</summary>
    /// <value>The default is 0.01. Must be between 0 and 1 (for a loss metric, use a <see cref="AccuracyDropKind.Relative"/> drop).</value>
    public double MaxDrop { get; set; } = 0.01;

    /// <summary>Gets or sets how the drop is measured.</summary>
    /// <value>The default is <see cref="AccuracyDropKind.Absolute"/>.</value>
    public AccuracyDropKind DropKind { get; set; } = AccuracyDropKind.Absolute;

    /// <summary>Gets or sets what happens when a step fails the check.</summary>
    /// <value>The default is <see cref="AccuracyCheckPolicy.Fail"/>.</value>
    public AccuracyCheckPolicy Policy { get; set; } = AccuracyCheckPolicy.Fail;

    /// <summary>
    /// Gets or sets whether a drop larger than <see cref="MaxDrop"/> fails the check only when it is significant: more
    /// samples went from right to wrong than from wrong to right, and McNemar's two-sided p-value is below
    /// <see cref="SignificanceLevel"/> (needs an evaluator with per-sample results; without them every drop counts).
    /// </summary>
    /// <value>The default is <see langword="false"/>.</value>
    public bool RejectOnlySignificantDrops { get; set; }

    /// <summary>Gets or sets the significance level of McNemar's test and the confidence level (1 − level) of the interval.</summary>
    /// <value>The default is 0.05. Must be greater than 0 and less than 1.</value>
    public double SignificanceLevel { get; set; } = 0.05;

    /// <summary>Lists every invalid value; empty when the options are valid.</summary>
    /// <returns>One message per invalid value, naming the property.</returns>
    public IReadOnlyList<string> Validate()
    {
        var errors = new List<string>();
        if (!double.IsFinite(MaxDrop) || MaxDrop < 0 || MaxDrop > 1)
        {
            errors.Add($"{nameof(AccuracyCheckOptions)}.{nameof(MaxDrop)} must be between 0 and 1 (was {MaxDrop}).");
        }

        if (!Enum.IsDefined(DropKind))
        {
            errors.Add($"{nameof(AccuracyCheckOptions)}.{nameof(DropKind)} is not a known kind (was {(int)DropKind}).");
        }

        if (!Enum.IsDefined(Policy))
        {
            errors.Add($"{nameof(AccuracyCheckOptions)}.{nameof(Policy)} is not a known policy (was {(int)Policy}).");
        }

        if (!(SignificanceLevel > 0 && SignificanceLevel < 1))
        {
            errors.Add($"{nameof(AccuracyCheckOptions)}.{nameof(SignificanceLevel)} must be greater than 0 and less than 1 (was {SignificanceLevel}).");
        }

        return errors;
    }

    internal AccuracyCheckOptions Clone() => (AccuracyCheckOptions)MemberwiseClone();
}
