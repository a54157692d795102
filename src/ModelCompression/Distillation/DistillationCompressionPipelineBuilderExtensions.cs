using ModelCompression.Distillation;
using ModelCompression.Training;

namespace ModelCompression;

/// <summary>Adds <see cref="DistillationStep"/> to a pipeline.</summary>
public static class DistillationCompressionPipelineBuilderExtensions
{
    /// <summary>Trains the current model against the original one (soft targets at temperature T, weight α).</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="epochs">Training epochs.</param>
    /// <param name="alpha">The weight of the soft-target term, 0 to 1. The default is 0.9.</param>
    /// <param name="temperature">The temperature. The default is 4.</param>
    /// <returns>The builder.</returns>
    public static CompressionPipelineBuilder AddDistillation(this CompressionPipelineBuilder builder, int epochs, double alpha = 0.9, double temperature = 4) =>
        builder.AddDistillation(new DistillationOptions { Alpha = alpha, Temperature = temperature, Training = new TrainingOptions { Epochs = epochs } });

    /// <summary>Adds distillation with full options (teacher, student architecture, hints, task, training).</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="options">The options, validated now and at <c>Build()</c>.</param>
    /// <returns>The builder.</returns>
    public static CompressionPipelineBuilder AddDistillation(this CompressionPipelineBuilder builder, DistillationOptions options)
    {
        ArgumentNullException.ThrowIfNull(builder);
        return builder.AddStep(DistillationStep.StepName, options, o => new DistillationStep(o));
    }
}
