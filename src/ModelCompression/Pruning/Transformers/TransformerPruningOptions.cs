using ModelCompression.Distillation;
using ModelCompression.Training;

namespace ModelCompression.Pruning;

/// <summary>How <see cref="TransformerPruningStep"/> ranks attention heads and blocks.</summary>
public enum TransformerImportance
{
    /// <summary>
    /// Activation-based, from one calibration pass (Minitron, Muralidharan et al. 2024): a head by the mean L2 norm of what
    /// it adds to the residual stream (its output through its slice of the output projection), a hidden unit by its mean
    /// absolute activation times the norm of its down-projection column, a block by 1 − the mean cosine similarity of its
    /// input and output (ShortGPT's block influence).
    /// </summary>
    Activation,

    /// <summary>
    /// Calibration loss: a head or a block by how far the model's outputs move (KL divergence from the original model's
    /// outputs on the calibration data) when it alone is removed. One calibration pass per head and per block; hidden
    /// units are still ranked by activation.
    /// </summary>
    CalibrationLoss,
}

/// <summary>
/// Options of <see cref="TransformerPruningStep"/>: either explicit cuts (<see cref="HeadFraction"/>,
/// <see cref="MlpFraction"/>, <see cref="BlocksRemoved"/>) or a parameter target (<see cref="ParameterFraction"/>) for
/// which the step chooses the cuts.
/// </summary>
public sealed class TransformerPruningOptions : IValidatableOptions
{
    /// <summary>Gets or sets the fraction of heads removed from every attention (rounded to whole heads; one head always stays).</summary>
    /// <value>The default is 0. Must be in [0, 1).</value>
    public double HeadFraction { get; set; }

    /// <summary>Gets or sets the fraction of hidden units removed from every MLP (the kept width is rounded to <see cref="RoundTo"/>).</summary>
    /// <value>The default is 0. Must be in [0, 1).</value>
    public double MlpFraction { get; set; }

    /// <summary>Gets or sets the number of whole blocks removed (depth), the least important first.</summary>
    /// <value>The default is 0. Must be at least 0 and leave one block.</value>
    public int BlocksRemoved { get; set; }

    /// <summary>
    /// Gets or sets the fraction of the transformer blocks' parameters to remove, the step choosing how: it tries every
    /// combination of blocks removed and heads removed per attention, fills the rest of the target with MLP width, and
    /// keeps the candidate whose outputs stay closest to the original model's on the calibration data (KL divergence).
    /// Embeddings and the output head are not counted and not pruned. <see langword="null"/> uses the explicit cuts.
    /// </summary>
    /// <value>The default is <see langword="null"/>. Must be in (0, 1) and excludes the explicit cuts.</value>
    public double? ParameterFraction { get; set; }

    /// <summary>Gets or sets how heads and blocks are ranked.</summary>
    /// <value>The default is <see cref="TransformerImportance.Activation"/>.</value>
    public TransformerImportance Importance { get; set; } = TransformerImportance.Activation;

    /// <summary>Gets or sets the multiple the kept MLP width is rounded to (8 suits vector kernels).</summary>
    /// <value>The default is 8. Must be between 1 and 1024.</value>
    public int RoundTo { get; set; } = 8;

    /// <summary>Gets or sets the calibration batches read to rank heads, hidden units and blocks.</summary>
    /// <value>The default is 8. Must be between 1 and 10,000.</value>
    public int CalibrationBatches { get; set; } = 8;

    /// <summary>Gets or sets the samples per calibration batch.</summary>
    /// <value>The default is 16. Must be between 1 and 100,000.</value>
    public int CalibrationBatchSize { get; set; } = 16;

    /// <summary>Gets or sets the fine-tuning after pruning, or <see langword="null"/> for none.</summary>
    /// <value>The default is <see langword="null"/>.</value>
    public TrainingOptions? FineTuning { get; set; }

    /// <summary>
    /// Gets or sets recovery by distillation from the original model (its soft targets; per token for a language
    /// model) during <see cref="FineTuning"/>. For hidden-state hints, follow this step with a
    /// <see cref="Distillation.DistillationStep"/> that names them.
    /// </summary>
    /// <value>The default is <see langword="null"/>.</value>
    public RecoveryDistillation? Distillation { get; set; }

    /// <inheritdoc/>
    public IReadOnlyList<string> Validate()
    {
        const string Name = nameof(TransformerPruningOptions);
        var errors = new List<string>();
        if (!(HeadFraction >= 0 && HeadFraction < 1))
        {
            errors.Add($"{Name}.{nameof(HeadFraction)} must be in [0, 1) (was {HeadFraction}).");
        }

        if (!(MlpFraction >= 0 && MlpFraction < 1))
        {
            errors.Add($"{Name}.{nameof(MlpFraction)} must be in [0, 1) (was {MlpFraction}).");
        }

        if (BlocksRemoved < 0)
        {
            errors.Add($"{Name}.{nameof(BlocksRemoved)} must not be negative (was {BlocksRemoved}).");
        }

        if (ParameterFraction is { } fraction)
        {
            if (!(fraction > 0 && fraction < 1))
            {
                errors.Add($"{Name}.{nameof(ParameterFraction)} must be in (0, 1) (was {fraction}).");
            }

            if (HeadFraction != 0 || MlpFraction != 0 || BlocksRemoved != 0)
            {
                errors.Add($"{Name}.{nameof(ParameterFraction)} lets the step choose the cuts: leave {nameof(HeadFraction)}, {nameof(MlpFraction)} and {nameof(BlocksRemoved)} at 0.");
            }
        }
        else if (HeadFraction == 0 && MlpFraction == 0 && BlocksRemoved == 0)
        {
            errors.Add($"{Name} removes nothing: set {nameof(HeadFraction)}, {nameof(MlpFraction)}, {nameof(BlocksRemoved)} or {nameof(ParameterFraction)}.");
        }

        if (!Enum.IsDefined(Importance))
        {
            errors.Add($"{Name}.{nameof(Importance)} is not a known importance (was {(int)Importance}).");
        }

        if (RoundTo is < 1 or > 1024)
        {
            errors.Add($"{Name}.{nameof(RoundTo)} must be between 1 and 1024 (was {RoundTo}).");
        }

        if (CalibrationBatches is < 1 or > 10_000)
        {
            errors.Add($"{Name}.{nameof(CalibrationBatches)} must be between 1 and 10000 (was {CalibrationBatches}).");
        }

        if (CalibrationBatchSize is < 1 or > 100_000)
        {
            errors.Add($"{Name}.{nameof(CalibrationBatchSize)} must be between 1 and 100000 (was {CalibrationBatchSize}).");
        }

        OptionsValidationException.AddNested(errors, Name, nameof(FineTuning), FineTuning?.Validate(), required: false);
        RecoveryDistillation.AddErrors(errors, Name, Distillation, FineTuning);
        return errors;
    }

    internal TransformerPruningOptions Clone() => new()
    {
        HeadFraction = HeadFraction,
        MlpFraction = MlpFraction,
        BlocksRemoved = BlocksRemoved,
        ParameterFraction = ParameterFraction,
        Importance = Importance,
        RoundTo = RoundTo,
        CalibrationBatches = CalibrationBatches,
        CalibrationBatchSize = CalibrationBatchSize,
        FineTuning = FineTuning?.Clone(),
        Distillation = RecoveryDistillation.Copy(Distillation),
    };
}
