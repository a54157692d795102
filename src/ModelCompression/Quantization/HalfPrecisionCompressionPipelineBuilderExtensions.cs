using ModelCompression.Quantization;

namespace ModelCompression;

/// <summary>Adds <see cref="HalfPrecisionStep"/> to a pipeline.</summary>
public static class HalfPrecisionCompressionPipelineBuilderExtensions
{
    /// <summary>Stores the weights of every Linear and Conv2d layer in a 16-bit float format (halving their size).</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="format">The format. The default is <see cref="HalfPrecisionFormat.BFloat16"/>.</param>
    /// <returns>The builder.</returns>
    public static CompressionPipelineBuilder AddHalfPrecision(this CompressionPipelineBuilder builder, HalfPrecisionFormat format = HalfPrecisionFormat.BFloat16) =>
        builder.AddHalfPrecision(new HalfPrecisionOptions { Format = format });

    /// <summary>Stores the weights of the selected layers in a 16-bit float format.</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="options">The options, validated now and at <c>Build()</c>.</param>
    /// <returns>The builder.</returns>
    /// <exception cref="OptionsValidationException">The options are invalid.</exception>
    public static CompressionPipelineBuilder AddHalfPrecision(this CompressionPipelineBuilder builder, HalfPrecisionOptions options)
    {
        ArgumentNullException.ThrowIfNull(builder);
        return builder.AddStep(HalfPrecisionStep.StepName, options, o => new HalfPrecisionStep(o));
    }
}
