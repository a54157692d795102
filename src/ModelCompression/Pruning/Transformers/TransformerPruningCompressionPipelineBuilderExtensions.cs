using ModelCompression.Pruning;

namespace ModelCompression;

/// <summary>Adds <see cref="TransformerPruningStep"/> to a pipeline.</summary>
public static class TransformerPruningCompressionPipelineBuilderExtensions
{
    /// <summary>
    /// Removes the given fraction of the transformer blocks' parameters by heads, MLP width and whole blocks — the step
    /// choosing the mix that keeps the outputs closest to the original's — then optionally fine-tunes with distillation.
    /// </summary>
    /// <param name="builder">The builder.</param>
    /// <param name="parameterFraction">The fraction of the blocks' parameters to remove, in (0, 1).</param>
    /// <param name="fineTuning">Fine-tuning after pruning, or <see langword="null"/> for none.</param>
    /// <param name="distillation">Distillation from the original model during the fine-tuning, or <see langword="null"/>.</param>
    /// <returns>The builder.</returns>
    /// <exception cref="OptionsValidationException">The options are invalid (every error listed).</exception>
    public static CompressionPipelineBuilder AddTransformerPruning(this CompressionPipelineBuilder builder, double parameterFraction, Training.TrainingOptions? fineTuning = null, Distillation.RecoveryDistillation? distillation = null) =>
        builder.AddTransformerPruning(new TransformerPruningOptions { ParameterFraction = parameterFraction, FineTuning = fineTuning, Distillation = distillation });

    /// <summary>Adds structured transformer pruning (heads, MLP width, depth) with full options.</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="options">The options, validated now and at <c>Build()</c>.</param>
    /// <returns>The builder.</returns>
    /// <exception cref="OptionsValidationException">The options are invalid (every error listed).</exception>
    public static CompressionPipelineBuilder AddTransformerPruning(this CompressionPipelineBuilder builder, TransformerPruningOptions options)
    {
        ArgumentNullException.ThrowIfNull(builder);
        return builder.AddStep(TransformerPruningStep.StepName, options, o => new TransformerPruningStep(o));
    }
}
