using ModelCompression.Quantization;
using ModelCompression.Training;

namespace ModelCompression;

/// <summary>Adds <see cref="QuantizationAwareTrainingStep"/> to a pipeline.</summary>
public static class QuantizationAwareTrainingCompressionPipelineBuilderExtensions
{
    /// <summary>Trains the model with fake-quantized weights and activations, then converts it to quantized layers.</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="weightBits">The weight bits, 1 (binary) to 8. The default is 8.</param>
    /// <param name="training">The training; <see langword="null"/> for the default (3 epochs of SGD with momentum).</param>
    /// <returns>The builder.</returns>
    public static CompressionPipelineBuilder AddQuantizationAwareTraining(this CompressionPipelineBuilder builder, int weightBits = 8, TrainingOptions? training = null)
    {
        var options = new QuantizationAwareTrainingOptions { WeightBits = weightBits };
        if (training is not null)
        {
            options.Training = training;
        }

        return builder.AddQuantizationAwareTraining(options);
    }

    /// <summary>Trains the model with fake quantization as the options say, then converts it to quantized layers.</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="options">The options, validated now and at <c>Build()</c>.</param>
    /// <returns>The builder.</returns>
    /// <exception cref="OptionsValidationException">The options are invalid.</exception>
    public static CompressionPipelineBuilder AddQuantizationAwareTraining(this CompressionPipelineBuilder builder, QuantizationAwareTrainingOptions options)
    {
        ArgumentNullException.ThrowIfNull(builder);
        return builder.AddStep(QuantizationAwareTrainingStep.StepName, options, o => new QuantizationAwareTrainingStep(o));
    }
}
