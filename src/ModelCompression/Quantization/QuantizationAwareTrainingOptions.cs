using ModelCompression.Distillation;
using ModelCompression.Modules;
using ModelCompression.Training;

namespace ModelCompression.Quantization;

/// <summary>Options of <see cref="QuantizationAwareTrainingStep"/>.</summary>
public sealed class QuantizationAwareTrainingOptions : IValidatableOptions
{
    /// <summary>Gets or sets the weight bits of every selected layer: 1 (binary: sign × per-channel scale) to 8.</summary>
    /// <value>The default is 8.</value>
    public int WeightBits { get; set; } = 8;

    /// <summary>Gets per-layer weight bits that override <see cref="WeightBits"/> (e.g. the first and last layers at 8).</summary>
    public IDictionary<string, int> LayerWeightBits { get; init; } = new Dictionary<string, int>(StringComparer.Ordinal);

    /// <summary>Gets or sets how many weights share a scale.</summary>
    /// <value>The default (<see langword="null"/>) is per channel; 4-bit layers use <see cref="QuantizationGranularity.PerGroup"/>(64) unless this is set.</value>
    public QuantizationGranularity? WeightGranularity { get; set; }

    /// <summary>
    /// Gets or sets whether activations are fake-quantized too (the kernel's 7-bit levels, one range per layer input;
    /// converted to static int8 layers). Without, only weights are (converted to weight-only layers).
    /// </summary>
    /// <value>The default is <see langword="true"/>.</value>
    public bool QuantizeActivations { get; set; } = true;

    /// <summary>Gets or sets whether scales are trained with learned step size quantization (LSQ) instead of set from observed ranges.</summary>
    /// <value>The default is <see langword="false"/>. Binary weights keep their mean-magnitude scale either way.</value>
    public bool LearnedStepSize { get; set; }

    /// <summary>
    /// Gets or sets the training epochs during which activation observers go on updating (a moving average) after
    /// the calibration pass that sets them before training; they are frozen after.
    /// </summary>
    /// <value>The default is 1; 0 keeps the calibrated ranges.</value>
    public int ObserverEpochs { get; set; } = 1;

    /// <summary>Gets or sets the epoch after which folded BatchNorms stop updating their running statistics, or <see langword="null"/> for never.</summary>
    /// <value>The default is 2.</value>
    public int? FreezeBatchNormAfterEpoch { get; set; } = 2;

    /// <summary>Gets or sets whether a BatchNorm that directly follows a selected Conv2d or Linear in a Sequential is folded in during training.</summary>
    /// <value>The default is <see langword="true"/>.</value>
    public bool FoldBatchNorm { get; set; } = true;

    /// <summary>Gets or sets the training (required). Zero epochs gives post-training quantization at the same bit widths (ranges from the calibration pass).</summary>
    /// <value>The default is 3 epochs of SGD with momentum at a learning rate of 0.01.</value>
    public TrainingOptions Training { get; set; } = new() { Epochs = 3, Optimizer = OptimizerKind.Sgd, LearningRate = 0.01, Momentum = 0.9 };

    /// <summary>Gets or sets distillation from the pipeline's original model during training, or <see langword="null"/>.</summary>
    public RecoveryDistillation? Distillation { get; set; }

    /// <summary>Gets or sets the layers to quantize.</summary>
    /// <value>The default is every Linear and Conv2d layer.</value>
    public LayerSelection Layers { get; set; } = LayerSelection.Default;

    internal int BitsFor(string layer) => LayerWeightBits.TryGetValue(layer, out int bits) ? bits : WeightBits;

    internal QuantizationGranularity GranularityFor(int bits) =>
        WeightGranularity ?? (bits == 4 ? QuantizationGranularity.PerGroup(64) : QuantizationGranularity.PerChannel);

    /// <inheritdoc/>
    public IReadOnlyList<string> Validate()
    {
        const string Owner = nameof(QuantizationAwareTrainingOptions);
        var errors = new List<string>();
        if (WeightBits is < 1 or > 8)
        {
            errors.Add($"{Owner}.{nameof(WeightBits)} must be 1 to 8 (was {WeightBits}).");
        }

        foreach (var (layer, bits) in LayerWeightBits)
        {
            if (bits is < 1 or > 8)
            {
                errors.Add($"{Owner}.{nameof(LayerWeightBits)}['{layer}'] must be 1 to 8 (was {bits}).");
            }
        }

        errors.AddRange(WeightGranularity?.Errors(Owner, nameof(WeightGranularity)) ?? []);

        if (QuantizeActivations && WeightGranularity is PerGroupGranularity)
        {
            errors.Add($"{Owner}.{nameof(WeightGranularity)}: per-group scales need {nameof(QuantizeActivations)} = false (static int8 layers use per-tensor or per-channel weights).");
        }

        if (ObserverEpochs < 0)
        {
            errors.Add($"{Owner}.{nameof(ObserverEpochs)} must be 0 or more (was {ObserverEpochs}).");
        }

        if (FreezeBatchNormAfterEpoch is < 0)
        {
            errors.Add($"{Owner}.{nameof(FreezeBatchNormAfterEpoch)} must be 0 or more (was {FreezeBatchNormAfterEpoch}).");
        }

        if (Training is null)
        {
            errors.Add($"{Owner}.{nameof(Training)} is required.");
        }
        else
        {
            OptionsValidationException.AddNested(errors, Owner, nameof(Training), Training.Validate());
            if (QuantizeActivations && ObserverEpochs > Math.Max(1, Training.Epochs))
            {
                errors.Add($"{Owner}.{nameof(ObserverEpochs)} ({ObserverEpochs}) exceeds the training epochs ({Training.Epochs}).");
            }
        }

        RecoveryDistillation.AddErrors(errors, Owner, Distillation, Training);
        OptionsValidationException.AddNested(errors, Owner, nameof(Layers), Layers?.Validate());
        return errors;
    }

    internal QuantizationAwareTrainingOptions Clone()
    {
        var copy = new QuantizationAwareTrainingOptions
        {
            WeightBits = WeightBits,
            WeightGranularity = WeightGranularity,
            QuantizeActivations = QuantizeActivations,
            LearnedStepSize = LearnedStepSize,
            ObserverEpochs = ObserverEpochs,
            FreezeBatchNormAfterEpoch = FreezeBatchNormAfterEpoch,
            FoldBatchNorm = FoldBatchNorm,
            Training = Training.Clone(),
            Distillation = RecoveryDistillation.Copy(Distillation),
            Layers = Layers.Copy(),
        };
        foreach (var (layer, bits) in LayerWeightBits)
        {
            copy.LayerWeightBits[layer] = bits;
        }

        return copy;
    }
}
