using ModelCompression.Modules;
using ModelCompression.Pruning;
using ModelCompression.Training;
using TorchSharp.Modules;

namespace ModelCompression.Clustering;

/// <summary>How the k-means centroids of a layer start.</summary>
public enum CentroidInitialization
{
    /// <summary>
    /// Evenly spaced between the smallest and largest weight. Han, Mao and Dally (2016, §3.1) found it best: it keeps
    /// centroids for the few large weights, which matter most.
    /// </summary>
    Linear,

    /// <summary>At evenly spaced quantiles of the weights: more centroids where weights are dense (near zero).</summary>
    Density,
}

/// <summary>Options of <see cref="WeightClusteringStep"/>.</summary>
public sealed class WeightClusteringOptions : IValidatableOptions
{
    /// <summary>Gets or sets the bits of a cluster index: each selected layer's non-zero weights share at most 2^bits values.</summary>
    /// <value>The default is 5 (32 shared values, Deep Compression's choice for fully connected layers). Must be 1 to 16.</value>
    public int Bits { get; set; } = 5;

    /// <summary>Gets per-layer bits (by dotted name) that replace <see cref="Bits"/> for those layers (Deep Compression used 8 for convolutions).</summary>
    public IDictionary<string, int> LayerBits { get; init; } = new Dictionary<string, int>(StringComparer.Ordinal);

    /// <summary>Gets or sets how centroids start.</summary>
    /// <value>The default is <see cref="CentroidInitialization.Linear"/>.</value>
    public CentroidInitialization Initialization { get; set; } = CentroidInitialization.Linear;

    /// <summary>
    /// Gets or sets whether the shared values and the biases of clustered layers are rounded to float16 values once
    /// fine-tuning ends (a relative change of at most 2^-11), so the file stores each in 2 bytes instead of 4.
    /// </summary>
    /// <value>The default is <see langword="false"/>.</value>
    public bool HalfPrecisionValues { get; set; }

    /// <summary>Gets or sets the most k-means iterations per layer (it stops earlier once no weight changes cluster).</summary>
    /// <value>The default is 100. Must be 1 to 10,000.</value>
    public int MaxIterations { get; set; } = 100;

    /// <summary>
    /// Gets or sets the fine-tuning of the shared values: each centroid moves by the sum of the gradients of the
    /// weights in its cluster (and biases train as usual); pruned weights stay zero. <see langword="null"/> for none.
    /// </summary>
    /// <value>The default is <see langword="null"/>.</value>
    public TrainingOptions? FineTuning { get; set; }

    /// <summary>Gets or sets recovery by distillation from the original model during the fine-tuning; <see langword="null"/> for labels alone.</summary>
    /// <value>The default is <see langword="null"/>.</value>
    public Distillation.RecoveryDistillation? Distillation { get; set; }

    /// <summary>Gets or sets the layers clustered.</summary>
    /// <value>The default is every Linear, Conv2d and <see cref="SparseLinear"/> layer.</value>
    public LayerSelection Layers { get; set; } = new() { Types = [typeof(Linear), typeof(Conv2d), typeof(SparseLinear)] };

    /// <summary>
    /// Gets or sets what happens to a selected layer that a <see cref="ClusteredLayer"/> cannot replace (its parent
    /// holds it in a field typed <c>Linear</c> or <c>Conv2d</c>). <see cref="FixedTypeLayers.CompressInPlace"/> keeps a
    /// Linear or Conv2d with every weight set to its shared value (fine-tuning moves each cluster's weights together,
    /// by the cluster's summed gradient, so they stay shared); the file stores such a layer as a codebook plus indices
    /// whenever that is smaller. A <see cref="SparseLinear"/> that cannot be replaced is left as it is.
    /// </summary>
    /// <value>The default is <see cref="FixedTypeLayers.CompressInPlace"/>.</value>
    public FixedTypeLayers FixedTypeLayers { get; set; } = FixedTypeLayers.CompressInPlace;

    /// <inheritdoc/>
    public IReadOnlyList<string> Validate()
    {
        const string Name = nameof(WeightClusteringOptions);
        var errors = new List<string>();
        if (Bits is < 1 or > 16)
        {
            errors.Add($"{Name}.{nameof(Bits)} must be 1 to 16 (was {Bits}).");
        }

        if (LayerBits is null)
        {
            errors.Add($"{Name}.{nameof(LayerBits)} must not be null.");
        }
        else
        {
            foreach (var (layer, bits) in LayerBits)
            {
                if (bits is < 1 or > 16)
                {
                    errors.Add($"{Name}.{nameof(LayerBits)}['{layer}'] must be 1 to 16 (was {bits}).");
                }
            }
        }

        if (!Enum.IsDefined(Initialization))
        {
            errors.Add($"{Name}.{nameof(Initialization)} is not a known initialization (was {(int)Initialization}).");
        }

        if (MaxIterations is < 1 or > 10_000)
        {
            errors.Add($"{Name}.{nameof(MaxIterations)} must be 1 to 10000 (was {MaxIterations}).");
        }

        if (!Enum.IsDefined(FixedTypeLayers))
        {
            errors.Add($"{Name}.{nameof(FixedTypeLayers)} is not a known choice (was {(int)FixedTypeLayers}).");
        }

        OptionsValidationException.AddNested(errors, Name, nameof(FineTuning), FineTuning?.Validate(), required: false);
        ModelCompression.Distillation.RecoveryDistillation.AddErrors(errors, Name, Distillation, FineTuning);
        OptionsValidationException.AddNested(errors, Name, nameof(Layers), Layers?.Validate());
        return errors;
    }

    internal WeightClusteringOptions Clone() => new()
    {
        Bits = Bits,
        LayerBits = new Dictionary<string, int>(LayerBits, StringComparer.Ordinal),
        Initialization = Initialization,
        MaxIterations = MaxIterations,
        HalfPrecisionValues = HalfPrecisionValues,
        FineTuning = FineTuning?.Clone(),
        Distillation = ModelCompression.Distillation.RecoveryDistillation.Copy(Distillation),
        Layers = Layers.Copy(),
        FixedTypeLayers = FixedTypeLayers,
    };
}
