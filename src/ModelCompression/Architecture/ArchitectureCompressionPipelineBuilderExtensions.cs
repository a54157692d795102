using ModelCompression.Architecture;
using ModelCompression.Training;

namespace ModelCompression;

/// <summary>Adds the architecture steps (<see cref="DepthwiseSeparableRewriteStep"/>, <see cref="BudgetedSearchStep"/>) to a pipeline.</summary>
public static class ArchitectureCompressionPipelineBuilderExtensions
{
    /// <summary>Rewrites every standard convolution as a depthwise-separable one, then recovers for some epochs distilling from the original.</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="recoveryEpochs">Epochs of recovery training (0 for none).</param>
    /// <returns>The builder.</returns>
    public static CompressionPipelineBuilder AddDepthwiseSeparableRewrite(this CompressionPipelineBuilder builder, int recoveryEpochs) =>
        builder.AddDepthwiseSeparableRewrite(new DepthwiseSeparableRewriteOptions { Recovery = recoveryEpochs > 0 ? new TrainingOptions { Epochs = recoveryEpochs } : null });

    /// <summary>Adds the depthwise-separable rewrite with full options.</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="options">The options, validated now and at <c>Build()</c>.</param>
    /// <returns>The builder.</returns>
    public static CompressionPipelineBuilder AddDepthwiseSeparableRewrite(this CompressionPipelineBuilder builder, DepthwiseSeparableRewriteOptions options)
    {
        ArgumentNullException.ThrowIfNull(builder);
        return builder.AddStep(DepthwiseSeparableRewriteStep.StepName, options, o => new DepthwiseSeparableRewriteStep(o));
    }

    /// <summary>Searches, NetAdapt-style, for per-layer widths and ranks that bring the model to a fraction of its MACs.</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="macsFraction">The MACs budget as a fraction of the current model's, in (0, 1).</param>
    /// <returns>The builder.</returns>
    public static CompressionPipelineBuilder AddBudgetedSearch(this CompressionPipelineBuilder builder, double macsFraction) =>
        builder.AddBudgetedSearch(new BudgetedSearchOptions { Kind = SearchBudgetKind.Macs, Fraction = macsFraction });

    /// <summary>Adds a budgeted search with full options.</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="options">The options, validated now and at <c>Build()</c>.</param>
    /// <returns>The builder.</returns>
    public static CompressionPipelineBuilder AddBudgetedSearch(this CompressionPipelineBuilder builder, BudgetedSearchOptions options)
    {
        ArgumentNullException.ThrowIfNull(builder);
        return builder.AddStep(BudgetedSearchStep.StepName, options, o => new BudgetedSearchStep(o));
    }
}
