using ModelCompression.Factorization;

namespace ModelCompression;

/// <summary>Adds <see cref="SvdFactorizationStep"/> to a pipeline.</summary>
public static class SvdFactorizationCompressionPipelineBuilderExtensions
{
    /// <summary>Factorizes every Linear and Conv2d layer keeping the given fraction of each weight's energy (Σσ²).</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="energy">The energy kept, in (0, 1].</param>
    /// <returns>The builder.</returns>
    /// <exception cref="OptionsValidationException">The energy is outside (0, 1].</exception>
    public static CompressionPipelineBuilder AddSvdFactorization(this CompressionPipelineBuilder builder, double energy) =>
        builder.AddSvdFactorization(new SvdFactorizationOptions { Rank = RankRule.Energy(energy) });

    /// <summary>Adds low-rank factorization with full options (rank rule or whole-model budget, convolution decomposition, selection, fine-tuning).</summary>
    /// <param name="builder">The builder.</param>
    /// <param name="options">The options, validated now and at <c>Build()</c>.</param>
    /// <returns>The builder.</returns>
    /// <exception cref="OptionsValidationException">The options are invalid (every error listed).</exception>
    public static CompressionPipelineBuilder AddSvdFactorization(this CompressionPipelineBuilder builder, SvdFactorizationOptions options)
    {
        ArgumentNullException.ThrowIfNull(builder);
        return builder.AddStep(SvdFactorizationStep.StepName, options, o => new SvdFactorizationStep(o));
    }
}
