namespace ModelCompression;

/// <summary>
/// Thrown when options are invalid. Lists every error at once, and names the options type.
/// </summary>
public sealed class OptionsValidationException : ArgumentException
{
    /// <summary>Initializes a new instance of the <see cref="OptionsValidationException"/> class.</summary>
    /// <param name="optionsType">The name of the options type (or "pipeline" for several).</param>
    /// <param name="errors">Every error found.</param>
    public OptionsValidationException(string optionsType, IReadOnlyList<string> errors)
        : base(BuildMessage(optionsType, errors))
    {
        OptionsType = optionsType;
        Errors = errors;
    }

    /// <summary>Gets the name of the options type that failed validation.</summary>
    public string OptionsType { get; }

    /// <summary>Gets every validation error.</summary>
    public IReadOnlyList<string> Errors { get; }

    /// <summary>Throws when <paramref name="errors"/> is not empty.</summary>
    /// <param name="optionsType">The options type.</param>
    /// <param name="errors">The errors.</param>
    /// <exception cref="OptionsValidationException">There is at least one error.</exception>
    public static void ThrowIfInvalid(Type optionsType, IReadOnlyList<string> errors)
    {
        ArgumentNullException.ThrowIfNull(optionsType);
        ArgumentNullException.ThrowIfNull(errors);
        if (errors.Count > 0)
        {
            throw new OptionsValidationException(optionsType.Name, errors);
        }
    }

    /// <summary>Adds the errors of options nested in other options (fine-tuning, layer selection), prefixed with where they sit.</summary>
    internal static void AddNested(List<string> errors, string owner, string property, IReadOnlyList<string>? nested, bool required = true)
    {
        if (nested is null)
        {
            if (required)
            {
                errors.Add($"{owner}.{property} must not be null.");
            }

            return;
        }

        errors.AddRange(nested.Select(e => $"{owner}.{property}: {e}"));
    }

    private static string BuildMessage(string optionsType, IReadOnlyList<string> errors) =>
        $"Invalid {optionsType} ({errors.Count} error{(errors.Count == 1 ? string.Empty : "s")}):" + Environment.NewLine +
        string.Join(Environment.NewLine, errors.Select(e => "  - " + e));
}

/// <summary>
/// Thrown by a pipeline whose accuracy check uses <see cref="AccuracyCheckPolicy.Fail"/> when a step loses more than allowed.
/// The caller's model is unchanged.
/// </summary>
public sealed class AccuracyCheckFailedException : InvalidOperationException
{
    /// <summary>Initializes a new instance of the <see cref="AccuracyCheckFailedException"/> class.</summary>
    /// <param name="stepName">The step that failed the check.</param>
    /// <param name="metricName">The name of the metric (e.g. accuracy).</param>
    /// <param name="before">The metric of the baseline model.</param>
    /// <param name="after">The metric after the step.</param>
    /// <param name="drop">The drop, in the unit of the check (absolute, or relative to the baseline).</param>
    /// <param name="maxDrop">The largest drop the check allows.</param>
    /// <param name="pValue">McNemar's p-value of the paired difference, when per-sample results were available.</param>
    public AccuracyCheckFailedException(string stepName, string metricName, double before, double after, double drop, double maxDrop, double? pValue)
        : base($"Step '{stepName}' failed the accuracy check: {metricName} went from {before:0.####} to {after:0.####} " +
               $"(drop {drop:0.####}, allowed {maxDrop:0.####}{(pValue is { } p ? $", McNemar p = {p:0.####}" : string.Empty)}).")
    {
        StepName = stepName;
        MetricName = metricName;
        Before = before;
        After = after;
        Drop = drop;
        MaxDrop = maxDrop;
        PValue = pValue;
    }

    /// <summary>Gets the name of the step that failed.</summary>
    public string StepName { get; }

    /// <summary>Gets the name of the metric.</summary>
    public string MetricName { get; }

    /// <summary>Gets the baseline value of the metric.</summary>
    public double Before { get; }

    /// <summary>Gets the value of the metric after the step.</summary>
    public double After { get; }

    /// <summary>Gets the drop, in the unit of the check.</summary>
    public double Drop { get; }

    /// <summary>Gets the largest drop allowed.</summary>
    public double MaxDrop { get; }

    /// <summary>Gets McNemar's p-value of the paired difference, when available.</summary>
    public double? PValue { get; }
}

/// <summary>
/// Thrown when a model's structure is one the library cannot handle: a layer kind no technique, copy or file encoding
/// knows, a connection the structured-pruning tracer cannot follow, or a module that cannot be copied safely. It is
/// raised before anything changes, and names the layer and what to do about it.
/// </summary>
public sealed class UnsupportedModelException : NotSupportedException
{
    /// <summary>Initializes a new instance of the <see cref="UnsupportedModelException"/> class.</summary>
    /// <param name="layerName">The dotted name of the layer (as <c>named_modules()</c> gives it; empty for the root), or <see langword="null"/> when no single layer is at fault.</param>
    /// <param name="layerType">The type name of the layer, or <see langword="null"/>.</param>
    /// <param name="message">What is not supported and what to do about it.</param>
    /// <param name="innerException">The error that revealed it, or <see langword="null"/>.</param>
    public UnsupportedModelException(string? layerName, string? layerType, string message, Exception? innerException = null)
        : base(message, innerException)
    {
        LayerName = layerName;
        LayerType = layerType;
    }

    /// <summary>Gets the dotted name of the layer at fault (empty for the root), or <see langword="null"/>.</summary>
    public string? LayerName { get; }

    /// <summary>Gets the type name of the layer at fault, or <see langword="null"/>.</summary>
    public string? LayerType { get; }
}
