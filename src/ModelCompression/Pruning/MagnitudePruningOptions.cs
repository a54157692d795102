using ModelCompression.Modules;
using ModelCompression.Training;

namespace ModelCompression.Pruning;

/// <summary>Whether one sparsity is reached in each layer or across all selected layers together.</summary>
public enum PruningScope
{
    /// <summary>Each selected layer is pruned to the target (or its override).</summary>
    LayerWise,

    /// <summary>One magnitude threshold across all selected layers (those without an override): layers with many small weights lose more.</summary>
    Global,
}

/// <summary>Whether pruned Linear layers are turned into <see cref="SparseLinear"/> layers.</summary>
public enum SparseExecution
{
    /// <summary>Time dense and sparse on the layer (batch 1 and 64) and keep the sparse layer only when it is faster at batch 1 and not slower at batch 64.</summary>
    Auto,

    /// <summary>Keep plain dense layers with zeros.</summary>
    Never,

    /// <summary>Always use <see cref="SparseLinear"/> for pruned Linear layers.</summary>
    Always,
}

/// <summary>N:M semi-structured sparsity: in every group of <c>M</c> consecutive weights along the input dimension, keep the <c>N</c> largest.</summary>
/// <param name="N">The weights kept per group (2 in 2:4).</param>
/// <param name="M">The group size (4 in 2:4).</param>
public sealed record NMPattern(int N, int M)
{
    /// <summary>Gets the 2:4 pattern (NVIDIA Ampere's sparse tensor cores).</summary>
    public static NMPattern TwoOfFour { get; } = new(2, 4);

    /// <summary>Gets the sparsity the pattern gives, 1 − N/M.</summary>
    public double Sparsity => 1 - ((double)N / M);

    /// <inheritdoc/>
    public override string ToString() => $"{N}:{M}";
}

/// <summary>Options of <see cref="MagnitudePruningStep"/>.</summary>
public sealed class MagnitudePruningOptions : IValidatableOptions
{
    /// <summary>Gets or sets the fraction of weights removed.</summary>
    /// <value>The default is 0.5. Must be in [0, 1).</value>
    public double Sparsity { get; set; } = 0.5;

    /// <summary>Gets or sets whether the sparsity holds per layer or across layers.</summary>
    /// <value>The default is <see cref="PruningScope.LayerWise"/>.</value>
    public PruningScope Scope { get; set; } = PruningScope.LayerWise;

    /// <summary>
    /// Gets or sets the smallest fraction of its weights each layer keeps under a <see cref="PruningScope.Global"/>
    /// threshold, so that no layer is silently cut away (one global threshold can empty a layer whose weights are all
    /// small, such as a classifier). The threshold is applied first; a layer it leaves under the floor keeps its
    /// ⌈floor × n⌉ largest-magnitude weights, and the threshold is recomputed over the other layers for the weights
    /// that remain, so the overall <see cref="Sparsity"/> is still met exactly (the same round(Sparsity × n) weights
    /// pruned; only when the floors, rounded up per layer, add up to more than that does the model keep those few
    /// more). Each protected layer
    /// is named in a warning on the context's logger and in the step's report notes. Ignored by layer-wise pruning,
    /// by layers with a <see cref="LayerSparsity"/> override, and by <see cref="Quality"/> and <see cref="Pattern"/>.
    /// </summary>
    /// <value>
    /// The default is 0.02: 2% of a layer keeps a path through it (256 of a 1280 × 10 classifier's weights) while
    /// costing the other layers at most 2% of the floored layers' size, and it leaves every global sparsity up to 98%
    /// valid. Must be in [0, 1), and under a global scope at most the kept fraction 1 − <see cref="Sparsity"/>
    /// (a larger floor could not meet the target). 0 restores the plain global threshold.
    /// </value>
    public double MinLayerKeptFraction { get; set; } = 0.02;

    /// <summary>Gets per-layer sparsities (by dotted name) that replace <see cref="Sparsity"/> for those layers.</summary>
    public IDictionary<string, double> LayerSparsity { get; init; } = new Dictionary<string, double>(StringComparer.Ordinal);

    /// <summary>
    /// Gets or sets Han et al.'s rule instead of a target: prune |w| &lt; quality × std(W) in each layer (Han, Pool, Tran
    /// and Dally 2015). <see langword="null"/> uses <see cref="Sparsity"/>.
    /// </summary>
    /// <value>The default is <see langword="null"/>. Must be positive and finite when set.</value>
    public double? Quality { get; set; }

    /// <summary>Gets or sets an N:M pattern instead of a target; <see langword="null"/> for unstructured pruning.</summary>
    /// <value>The default is <see langword="null"/>. Needs 1 ≤ N &lt; M ≤ 64 and a one-shot schedule.</value>
    public NMPattern? Pattern { get; set; }

    /// <summary>
    /// Gets or sets which weights are removed: the smallest magnitudes, or the ones whose removal changes each layer's
    /// output least on calibration data (<see cref="PruningCriterion.Wanda"/>, <see cref="PruningCriterion.SparseGpt"/>).
    /// </summary>
    /// <value>
    /// The default is <see cref="PruningCriterion.Magnitude"/>. A <see cref="CalibratedPruningCriterion"/> needs the
    /// one-shot schedule, a layer-wise scope, no <see cref="Quality"/>, and Linear layers only; it reads
    /// <see cref="CompressionData.Calibration"/> (or the training data when none is given).
    /// </value>
    public PruningCriterion Criterion { get; set; } = PruningCriterion.Magnitude;

    /// <summary>Gets or sets the schedule.</summary>
    /// <value>The default is <see cref="OneShotPruning"/>.</value>
    public IPruningSchedule Schedule { get; set; } = new OneShotPruning();

    /// <summary>Gets or sets the fine-tuning after each pruning round (masks held: pruned weights stay exactly zero); <see langword="null"/> for none.</summary>
    /// <value>The default is <see langword="null"/>.</value>
    public TrainingOptions? FineTuning { get; set; }

    /// <summary>
    /// Gets or sets recovery by distillation: the fine-tuning learns from the original (uncompressed) model's soft
    /// targets as well as the labels. <see langword="null"/> fine-tunes on the labels alone.
    /// </summary>
    /// <value>The default is <see langword="null"/>.</value>
    public Distillation.RecoveryDistillation? Distillation { get; set; }

    /// <summary>Gets or sets the layers pruned.</summary>
    /// <value>The default is every Linear and Conv2d layer.</value>
    public LayerSelection Layers { get; set; } = LayerSelection.Default;

    /// <summary>Gets or sets whether pruned Linear layers become <see cref="SparseLinear"/> layers.</summary>
    /// <value>The default is <see cref="SparseExecution.Auto"/>.</value>
    public SparseExecution SparseExecution { get; set; } = SparseExecution.Auto;

    /// <inheritdoc/>
    public IReadOnlyList<string> Validate()
    {
        const string Name = nameof(MagnitudePruningOptions);
        var errors = new List<string>();
        if (!(Sparsity >= 0 && Sparsity < 1))
        {
            errors.Add($"{Name}.{nameof(Sparsity)} must be in [0, 1) (was {Sparsity}).");
        }

        if (!Enum.IsDefined(Scope))
        {
            errors.Add($"{Name}.{nameof(Scope)} is not a known scope (was {(int)Scope}).");
        }

        if (!(MinLayerKeptFraction >= 0 && MinLayerKeptFraction < 1))
        {
            errors.Add($"{Name}.{nameof(MinLayerKeptFraction)} must be in [0, 1) (was {MinLayerKeptFraction}).");
        }
        else if (Scope == PruningScope.Global && Sparsity is >= 0 and < 1 && Quality is null && Pattern is null && MinLayerKeptFraction > 1 - Sparsity + 1e-12)
        {
            errors.Add(
                $"{Name}.{nameof(MinLayerKeptFraction)} ({MinLayerKeptFraction}) is above the fraction global pruning keeps, 1 − {nameof(Sparsity)} = {1 - Sparsity:0.####}: " +
                $"every layer at the floor would still miss the target. Lower it (0 turns the floor off).");
        }

        if (!Enum.IsDefined(SparseExecution))
        {
            errors.Add($"{Name}.{nameof(SparseExecution)} is not a known choice (was {(int)SparseExecution}).");
        }

        if (LayerSparsity is null)
        {
            errors.Add($"{Name}.{nameof(LayerSparsity)} must not be null.");
        }
        else
        {
            foreach (var (layer, sparsity) in LayerSparsity)
            {
                if (!(sparsity >= 0 && sparsity < 1))
                {
                    errors.Add($"{Name}.{nameof(LayerSparsity)}['{layer}'] must be in [0, 1) (was {sparsity}).");
                }
            }
        }

        if (Quality is { } q && !(q > 0 && double.IsFinite(q)))
        {
            errors.Add($"{Name}.{nameof(Quality)} must be positive and finite (was {q}).");
        }

        if (Pattern is { } p)
        {
            if (!(p.N >= 1 && p.N < p.M && p.M <= 64))
            {
                errors.Add($"{Name}.{nameof(Pattern)} needs 1 ≤ N < M ≤ 64 (was {p}).");
            }

            if (Schedule is not OneShotPruning)
            {
                errors.Add($"{Name}.{nameof(Pattern)} works with the one-shot schedule only (was {Schedule}).");
            }

            if (Quality is not null)
            {
                errors.Add($"{Name}: set either {nameof(Pattern)} or {nameof(Quality)}, not both.");
            }
        }

        if ((Quality is not null || Pattern is not null) && (Scope == PruningScope.Global || LayerSparsity is { Count: > 0 }))
        {
            errors.Add($"{Name}: {(Quality is not null ? nameof(Quality) : nameof(Pattern))} decides each layer's pruning itself; it cannot be combined with a global {nameof(Scope)} or {nameof(LayerSparsity)} overrides.");
        }

        if (Schedule is GradualPruning gradual && gradual.InitialSparsity >= Sparsity && Quality is null && Pattern is null)
        {
            errors.Add($"{Name}: the gradual schedule's {nameof(GradualPruning.InitialSparsity)} ({gradual.InitialSparsity}) must be below {nameof(Sparsity)} ({Sparsity}).");
        }

        if (Quality is not null && Schedule is GradualPruning)
        {
            errors.Add($"{Name}.{nameof(Quality)} (Han's rule) cannot be combined with the gradual schedule, which needs a target sparsity.");
        }

        if (Schedule is null)
        {
            errors.Add($"{Name}.{nameof(Schedule)} must not be null.");
        }
        else
        {
            errors.AddRange(Schedule.Validate().Select(e => $"{Name}.{nameof(Schedule)}: {e}"));
            if (Schedule.RequiresFineTuning && FineTuning is null)
            {
                errors.Add($"{Name}: the {Schedule} schedule needs {nameof(FineTuning)}.");
            }
        }

        if (Criterion is null)
        {
            errors.Add($"{Name}.{nameof(Criterion)} must not be null.");
        }
        else
        {
            errors.AddRange(Criterion.Errors($"{Name}.{nameof(Criterion)}", Pattern));
            if (Criterion is CalibratedPruningCriterion)
            {
                if (Schedule is not null and not OneShotPruning)
                {
                    errors.Add($"{Name}: {Criterion} prunes in one shot; it needs the one-shot schedule (was {Schedule}). Add fine-tuning after it instead.");
                }

                if (Scope == PruningScope.Global)
                {
                    errors.Add($"{Name}: {Criterion} compares weights within each layer; it needs a layer-wise {nameof(Scope)} (use {nameof(LayerSparsity)} for per-layer targets).");
                }

                if (Quality is not null)
                {
                    errors.Add($"{Name}: {Criterion} needs a sparsity or an N:M {nameof(Pattern)}, not Han's {nameof(Quality)} rule.");
                }
            }
        }

        OptionsValidationException.AddNested(errors, Name, nameof(FineTuning), FineTuning?.Validate(), required: false);
        ModelCompression.Distillation.RecoveryDistillation.AddErrors(errors, Name, Distillation, FineTuning);
        OptionsValidationException.AddNested(errors, Name, nameof(Layers), Layers?.Validate());

        return errors;
    }

    internal MagnitudePruningOptions Clone() => new()
    {
        Sparsity = Sparsity,
        Scope = Scope,
        MinLayerKeptFraction = MinLayerKeptFraction,
        LayerSparsity = new Dictionary<string, double>(LayerSparsity, StringComparer.Ordinal),
        Quality = Quality,
        Pattern = Pattern,
        Criterion = Criterion,
        Schedule = Schedule,
        FineTuning = FineTuning?.Clone(),
        Distillation = ModelCompression.Distillation.RecoveryDistillation.Copy(Distillation),
        Layers = Layers.Copy(),
        SparseExecution = SparseExecution,
    };
}
