using ModelCompression.Architecture;
using ModelCompression.Training;

namespace ModelCompression;

/// <summary>Adds the architecture steps (<see cref="DepthwiseSeparableRewriteStep"/>) to a pipeline.</summary>
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
}
