using ModelCompression.Modules;
using ModelCompression.Training;
using TorchSharp.Modules;

namespace ModelCompression.Pruning;

/// <summary>Options of <see cref="StructuredPruningStep"/>.</summary>
public sealed class StructuredPruningOptions : IValidatableOptions
{
    /// <summary>Gets or sets the fraction of channels removed from each prunable group.</summary>
    /// <value>The default is 0.5. Must be in [0, 1).</value>
    public double Ratio { get; set; } = 0.5;

    /// <summary>Gets per-layer ratios (by the dotted name of a producing layer) that replace <see cref="Ratio"/> for its group.</summary>
    public IDictionary<string, double> LayerRatio { get; init; } = new Dictionary<string, double>(StringComparer.Ordinal);

    /// <summary>Gets or sets the importance criterion.</summary>
    /// <value>The default is <see cref="L1Importance"/>.</value>
    public IChannelImportance Importance { get; set; } = new L1Importance();

    /// <summary>Gets or sets the producing layers that may lose channels; a group is pruned only when all its producers are selected.</summary>
    /// <value>
    /// The default is every Linear, Conv1d and Conv2d layer (wider than <see cref="LayerSelection.Default"/>, which names
    /// Linear and Conv2d only: a selection without Conv1d leaves a Conv1d model unpruned, and the step says so in its
    /// notes). The layer that produces the model's output is never pruned.
    /// </value>
    public LayerSelection Layers { get; set; } = new() { Types = [typeof(Linear), typeof(Conv1d), typeof(Conv2d)] };

    /// <summary>Gets or sets the multiple the kept channel count is rounded to (e.g. 8 for vector-friendly widths).</summary>
    /// <value>The default is 1. Must be between 1 and 1024.</value>
    public int RoundTo { get; set; } = 1;

    /// <summary>Gets or sets the number of prune-then-fine-tune rounds; each removes an equal share of the channels.</summary>
    /// <value>The default is 1. Must be between 1 and 100.</value>
    public int Rounds { get; set; } = 1;

    /// <summary>Gets or sets the fine-tuning after each round, or <see langword="null"/> for none.</summary>
    /// <value>The default is <see langword="null"/>.</value>
    public TrainingOptions? FineTuning { get; set; }

    /// <summary>
    /// Gets or sets recovery by distillation: the fine-tuning learns from the original (uncompressed) model's soft
    /// targets as well as the labels. <see langword="null"/> fine-tunes on the labels alone.
    /// </summary>
    /// <value>The default is <see langword="null"/>.</value>
    public Distillation.RecoveryDistillation? Distillation { get; set; }

    /// <inheritdoc/>
    public IReadOnlyList<string> Validate()
    {
        const string Name = nameof(StructuredPruningOptions);
        var errors = new List<string>();
        if (!(Ratio >= 0 && Ratio < 1))
        {
            errors.Add($"{Name}.{nameof(Ratio)} must be in [0, 1): a ratio of 1 would remove whole layers (was {Ratio}).");
        }

        if (LayerRatio is null)
        {
            errors.Add($"{Name}.{nameof(LayerRatio)} must not be null.");
        }
        else
        {
            foreach (var (layer, ratio) in LayerRatio)
            {
                if (!(ratio >= 0 && ratio < 1))
                {
                    errors.Add($"{Name}.{nameof(LayerRatio)}['{layer}'] must be in [0, 1) (was {ratio}).");
                }
            }
        }

        if (Importance is null)
        {
            errors.Add($"{Name}.{nameof(Importance)} must not be null.");
        }

        if (RoundTo is < 1 or > 1024)
        {
            errors.Add($"{Name}.{nameof(RoundTo)} must be between 1 and 1024 (was {RoundTo}).");
        }

        if (Rounds is < 1 or > 100)
        {
            errors.Add($"{Name}.{nameof(Rounds)} must be between 1 and 100 (was {Rounds}).");
        }

        OptionsValidationException.AddNested(errors, Name, nameof(FineTuning), FineTuning?.Validate(), required: false);
        ModelCompression.Distillation.RecoveryDistillation.AddErrors(errors, Name, Distillation, FineTuning);
        OptionsValidationException.AddNested(errors, Name, nameof(Layers), Layers?.Validate());

        return errors;
    }

    internal StructuredPruningOptions Clone() => new()
    {
        Ratio = Ratio,
        LayerRatio = new Dictionary<string, double>(LayerRatio, StringComparer.Ordinal),
        Importance = Importance,
        Layers = Layers.Copy(),
        RoundTo = RoundTo,
        Rounds = Rounds,
        FineTuning = FineTuning?.Clone(),
        Distillation = ModelCompression.Distillation.RecoveryDistillation.Copy(Distillation),
    };
}
