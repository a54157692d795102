using ModelCompression.Pruning;
using ModelCompression.Training;

namespace ModelCompression;

/// <summary>Adds <see cref="StructuredPruningStep"/> to a pipeline.</summary>
public static class StructuredPruningCompressionPipelineBuilderExtensions
{
    /// <summary>Removes a fraction of the neurons and filters of every prunable layer group (L1 importance), optionally fine-tuning.</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="ratio">The fraction of channels removed from each group, in [0, 1).</param>
    /// <param name="fineTuning">Fine-tuning after pruning, or <see langword="null"/> for none.</param>
    /// <returns>The builder.</returns>
    /// <exception cref="OptionsValidationException">The ratio is outside [0, 1), or the fine-tuning options are invalid.</exception>
    public static CompressionPipelineBuilder AddStructuredPruning(this CompressionPipelineBuilder builder, double ratio, TrainingOptions? fineTuning = null) =>
        builder.AddStructuredPruning(new StructuredPruningOptions { Ratio = ratio, FineTuning = fineTuning });

    /// <summary>Adds structured pruning with full options (importance, selection, per-layer ratios, rounding, rounds, fine-tuning).</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="options">The options, validated now and at <c>Build()</c>.</param>
    /// <returns>The builder.</returns>
    /// <exception cref="OptionsValidationException">The options are invalid (every error listed).</exception>
    public static CompressionPipelineBuilder AddStructuredPruning(this CompressionPipelineBuilder builder, StructuredPruningOptions options)
    {
        ArgumentNullException.ThrowIfNull(builder);
        return builder.AddStep(StructuredPruningStep.StepName, options, o => new StructuredPruningStep(o));
    }
}
