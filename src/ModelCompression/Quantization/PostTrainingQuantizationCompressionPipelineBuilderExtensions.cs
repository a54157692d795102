using ModelCompression.Quantization;

namespace ModelCompression;

/// <summary>Adds <see cref="PostTrainingQuantizationStep"/> to a pipeline.</summary>
public static class PostTrainingQuantizationCompressionPipelineBuilderExtensions
{
    /// <summary>Quantizes every Linear and Conv2d layer after training, in the given mode, with default settings.</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="mode">The mode. The default is <see cref="QuantizationMode.DynamicInt8"/>.</param>
    /// <returns>The builder.</returns>
    public static CompressionPipelineBuilder AddPostTrainingQuantization(this CompressionPipelineBuilder builder, QuantizationMode mode = QuantizationMode.DynamicInt8) =>
        builder.AddPostTrainingQuantization(new PostTrainingQuantizationOptions { Mode = mode });

    /// <summary>Quantizes the selected layers after training.</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="options">The options, validated now and at <c>Build()</c>.</param>
    /// <returns>The builder.</returns>
    /// <exception cref="OptionsValidationException">The options are invalid.</exception>
    public static CompressionPipelineBuilder AddPostTrainingQuantization(this CompressionPipelineBuilder builder, PostTrainingQuantizationOptions options)
    {
        ArgumentNullException.ThrowIfNull(builder);
        return builder.AddStep(PostTrainingQuantizationStep.StepName, options, o => new PostTrainingQuantizationStep(o));
    }
}
