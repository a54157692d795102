using ModelCompression.Training;

namespace ModelCompression;

/// <summary>Adds <see cref="FineTuningStep"/> to a pipeline.</summary>
public static class FineTuningCompressionPipelineBuilderExtensions
{
    /// <summary>Fine-tunes the current model for some epochs with the default trainer settings.</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="epochs">The epochs, 1 to 10,000.</param>
    /// <returns>The builder.</returns>
    public static CompressionPipelineBuilder AddFineTuning(this CompressionPipelineBuilder builder, int epochs) =>
        builder.AddFineTuning(new TrainingOptions { Epochs = epochs });

    /// <summary>Fine-tunes the current model with the given options.</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="options">The options, validated now and at <c>Build()</c>.</param>
    /// <returns>The builder.</returns>
    public static CompressionPipelineBuilder AddFineTuning(this CompressionPipelineBuilder builder, TrainingOptions options)
    {
        ArgumentNullException.ThrowIfNull(builder);
        return builder.AddStep(FineTuningStep.StepName, options, o => new FineTuningStep(o));
    }
}
