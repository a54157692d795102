using ModelCompression.Pruning;
using ModelCompression.Training;

namespace ModelCompression;

/// <summary>Adds <see cref="MagnitudePruningStep"/> to a pipeline.</summary>
public static class MagnitudePruningCompressionPipelineBuilderExtensions
{
    /// <summary>Removes the smallest weights of every Linear and Conv2d layer, one-shot, optionally fine-tuning with the masks held.</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="sparsity">The fraction of weights removed from each layer, in [0, 1).</param>
    /// <param name="fineTuning">Fine-tuning after pruning, or <see langword="null"/> for none.</param>
    /// <returns>The builder.</returns>
    /// <exception cref="OptionsValidationException">The sparsity is outside [0, 1), or the fine-tuning options are invalid.</exception>
    public static CompressionPipelineBuilder AddMagnitudePruning(this CompressionPipelineBuilder builder, double sparsity, TrainingOptions? fineTuning = null) =>
        builder.AddMagnitudePruning(new MagnitudePruningOptions { Sparsity = sparsity, FineTuning = fineTuning });

    /// <summary>Adds magnitude pruning with full options (scope, overrides, Han's rule, N:M, schedule, fine-tuning, sparse execution).</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="options">The options, validated now and at <c>Build()</c>.</param>
    /// <returns>The builder.</returns>
    /// <exception cref="OptionsValidationException">The options are invalid (every error listed).</exception>
    public static CompressionPipelineBuilder AddMagnitudePruning(this CompressionPipelineBuilder builder, MagnitudePruningOptions options)
    {
        ArgumentNullException.ThrowIfNull(builder);
        return builder.AddStep(MagnitudePruningStep.StepName, options, o => new MagnitudePruningStep(o));
    }
}
