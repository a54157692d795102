using ModelCompression.Clustering;
using ModelCompression.Training;

namespace ModelCompression;

/// <summary>Adds <see cref="WeightClusteringStep"/> to a pipeline.</summary>
public static class WeightClusteringCompressionPipelineBuilderExtensions
{
    /// <summary>Makes the non-zero weights of every Linear, Conv2d and sparse layer share 2^<paramref name="bits"/> values (k-means), optionally fine-tuning the shared values.</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="bits">The bits of a cluster index, 1 to 16.</param>
    /// <param name="fineTuning">Fine-tuning of the shared values, or <see langword="null"/> for none.</param>
    /// <returns>The builder.</returns>
    /// <exception cref="OptionsValidationException">The bits are outside 1 to 16, or the fine-tuning options are invalid.</exception>
    public static CompressionPipelineBuilder AddWeightClustering(this CompressionPipelineBuilder builder, int bits, TrainingOptions? fineTuning = null) =>
        builder.AddWeightClustering(new WeightClusteringOptions { Bits = bits, FineTuning = fineTuning });

    /// <summary>Adds weight clustering with full options (per-layer bits, initialization, fine-tuning, distillation, layer selection).</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="options">The options, validated now and at <c>Build()</c>.</param>
    /// <returns>The builder.</returns>
    /// <exception cref="OptionsValidationException">The options are invalid (every error listed).</exception>
    public static CompressionPipelineBuilder AddWeightClustering(this CompressionPipelineBuilder builder, WeightClusteringOptions options)
    {
        ArgumentNullException.ThrowIfNull(builder);
        return builder.AddStep(WeightClusteringStep.StepName, options, o => new WeightClusteringStep(o));
    }
}
