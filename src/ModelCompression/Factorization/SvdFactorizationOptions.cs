using ModelCompression.Modules;
using ModelCompression.Training;

namespace ModelCompression.Factorization;

/// <summary>How each layer's rank is chosen on its own (see <see cref="RankBudget"/> for a whole-model budget).</summary>
public abstract class RankRule
{
    private RankRule()
    {
    }

    /// <summary>The same rank for every layer (capped at the layer's full rank).</summary>
    /// <param name="rank">The rank, at least 1.</param>
    /// <returns>The rule.</returns>
    public static RankRule Fixed(int rank) => new FixedRank(rank);

    /// <summary>A fraction of each layer's full rank (min(rows, columns)), rounded, at least 1.</summary>
    /// <param name="fraction">The fraction, in (0, 1].</param>
    /// <returns>The rule.</returns>
    public static RankRule Ratio(double fraction) => new RatioRank(fraction);

    /// <summary>The smallest rank keeping at least this fraction of the energy Σσ² (Xue et al. 2013).</summary>
    /// <param name="fraction">The energy kept, in (0, 1].</param>
    /// <returns>The rule.</returns>
    public static RankRule Energy(double fraction) => new EnergyRank(fraction);

    /// <summary>The largest rank that makes the layer at least <paramref name="factor"/> times smaller (parameters; MACs scale alike).</summary>
    /// <param name="factor">The reduction, above 1.</param>
    /// <returns>The rule.</returns>
    public static RankRule Reduction(double factor) => new ReductionRank(factor);

    /// <summary>Chooses the rank of a layer.</summary>
    internal abstract int Choose(IReadOnlyList<double> singularValues, LowRankShape shape);

    /// <summary>Lists every invalid value.</summary>
    internal abstract IReadOnlyList<string> Validate();

    private sealed class FixedRank(int rank) : RankRule
    {
        internal override int Choose(IReadOnlyList<double> singularValues, LowRankShape shape) => (int)Math.Min(rank, shape.FullRank);

        internal override IReadOnlyList<string> Validate() => rank >= 1 ? [] : [$"{nameof(RankRule)}.{nameof(Fixed)} needs a rank of at least 1 (was {rank})."];

        public override string ToString() => $"rank {rank}";
    }

    private sealed class RatioRank(double fraction) : RankRule
    {
        internal override int Choose(IReadOnlyList<double> singularValues, LowRankShape shape) => (int)Math.Max(1, Math.Round(fraction * shape.FullRank));

        internal override IReadOnlyList<string> Validate() => fraction is > 0 and <= 1 ? [] : [$"{nameof(RankRule)}.{nameof(Ratio)} needs a fraction in (0, 1] (was {fraction})."];

        public override string ToString() => $"{fraction:0.###} of full rank";
    }

    private sealed class EnergyRank(double fraction) : RankRule
    {
        internal override int Choose(IReadOnlyList<double> singularValues, LowRankShape shape)
        {
            double total = singularValues.Sum(s => s * s);
            double kept = 0;
            for (int r = 0; r < singularValues.Count; r++)
            {
                kept += singularValues[r] * singularValues[r];
                if (total == 0 || kept >= (fraction * total) - (1e-12 * total))
                {
                    return r + 1;
                }
            }

            return singularValues.Count;
        }

        internal override IReadOnlyList<string> Validate() => fraction is > 0 and <= 1 ? [] : [$"{nameof(RankRule)}.{nameof(Energy)} needs a fraction in (0, 1] (was {fraction})."];

        public override string ToString() => $"{fraction:0.####} of the energy";
    }

    private sealed class ReductionRank(double factor) : RankRule
    {
        internal override int Choose(IReadOnlyList<double> singularValues, LowRankShape shape) =>
            (int)Math.Max(1, Math.Floor(shape.DenseCost / factor / shape.CostPerRank));

        internal override IReadOnlyList<string> Validate() => factor > 1 && double.IsFinite(factor) ? [] : [$"{nameof(RankRule)}.{nameof(Reduction)} needs a factor above 1 (was {factor})."];

        public override string ToString() => $"{factor:0.##}× fewer parameters";
    }
}

/// <summary>What a <see cref="RankBudget"/> counts.</summary>
public enum BudgetKind
{
    /// <summary>The parameters of the selected layers.</summary>
    Parameters,

    /// <summary>The multiply-accumulates of the selected layers, per sample.</summary>
    Macs,
}

/// <summary>How a <see cref="RankBudget"/> shares the budget out among layers.</summary>
public enum RankAllocation
{
    /// <summary>Greedy: repeatedly drop the singular value that loses the least relative energy per parameter (or MAC) saved.</summary>
    EnergyPerCost,

    /// <summary>Greedy on measured accuracy: each layer is factorized alone at a ladder of ranks and evaluated on calibration data.</summary>
    Sensitivity,
}

/// <summary>A budget for the whole model: the selected layers together keep at most a fraction of their parameters or MACs.</summary>
public sealed class RankBudget
{
    /// <summary>Gets or sets what the budget counts.</summary>
    /// <value>The default is <see cref="BudgetKind.Parameters"/>.</value>
    public BudgetKind Kind { get; set; } = BudgetKind.Parameters;

    /// <summary>Gets or sets the fraction kept (0.25 = 4× fewer).</summary>
    /// <value>The default is 0.25. Must be in (0, 1).</value>
    public double Fraction { get; set; } = 0.25;

    /// <summary>Gets or sets how ranks are allocated.</summary>
    /// <value>The default is <see cref="RankAllocation.EnergyPerCost"/>.</value>
    public RankAllocation Allocation { get; set; } = RankAllocation.EnergyPerCost;

    /// <summary>
    /// Gets or sets the lowest rank the budget may give a layer. A layer's floor is the larger of this and
    /// <see cref="MinRankFraction"/> of its full rank, at most its full rank; a layer whose floor would not store fewer
    /// parameters than its dense weight stays dense. Layers the allocation holds at their floor are named in a
    /// warning on the context's logger and in the step's report notes; a budget the floors cannot meet is an error.
    /// Only the budget is floored: a per-layer <see cref="SvdFactorizationOptions.Rank"/> rule gives the rank it is asked for.
    /// </summary>
    /// <value>
    /// The default is 4: the greedy allocation otherwise takes layers whose singular values look cheap down to rank 1
    /// (every output a multiple of one vector, a classifier's logits all in one direction), which fine-tuning rarely
    /// repairs. At least 1; 1 turns the absolute floor off.
    /// </value>
    public int MinRank { get; set; } = 4;

    /// <summary>Gets or sets the lowest rank the budget may give a layer, as a fraction of its full rank min(rows, columns), rounded up (see <see cref="MinRank"/>).</summary>
    /// <value>
    /// The default is 0.05: a 320-wide layer keeps at least rank 16, while the floors of all layers together cost at
    /// most about a tenth of their dense parameters (r·(m + n) ≤ 0.05·min(m, n)·(m + n) ≤ 0.1·m·n), so common budgets
    /// stay reachable. In [0, 1]; 0 turns the relative floor off.
    /// </value>
    public double MinRankFraction { get; set; } = 0.05;

    /// <summary>The rank below which the budget does not take a layer of <paramref name="fullRank"/>.</summary>
    internal long Floor(long fullRank) => Math.Min(fullRank, Math.Max(MinRank, (long)Math.Ceiling((MinRankFraction * fullRank) - 1e-9)));

    internal IReadOnlyList<string> Validate()
    {
        var errors = new List<string>();
        if (MinRank < 1)
        {
            errors.Add($"{nameof(RankBudget)}.{nameof(MinRank)} must be at least 1 (was {MinRank}).");
        }

        if (!(MinRankFraction is >= 0 and <= 1))
        {
            errors.Add($"{nameof(RankBudget)}.{nameof(MinRankFraction)} must be in [0, 1] (was {MinRankFraction}).");
        }

        if (!(Fraction > 0 && Fraction < 1))
        {
            errors.Add($"{nameof(RankBudget)}.{nameof(Fraction)} must be in (0, 1) (was {Fraction}).");
        }

        if (!Enum.IsDefined(Kind))
        {
            errors.Add($"{nameof(RankBudget)}.{nameof(Kind)} is not a known kind (was {(int)Kind}).");
        }

        if (!Enum.IsDefined(Allocation))
        {
            errors.Add($"{nameof(RankBudget)}.{nameof(Allocation)} is not a known allocation (was {(int)Allocation}).");
        }

        return errors;
    }

    /// <inheritdoc/>
    public override string ToString() => $"{1 / Fraction:0.##}× fewer {(Kind == BudgetKind.Parameters ? "parameters" : "MACs")}, {Allocation}";

    internal RankBudget Clone() => new()
    {
        Kind = Kind,
        Fraction = Fraction,
        Allocation = Allocation,
        MinRank = MinRank,
        MinRankFraction = MinRankFraction,
    };
}

/// <summary>Options of <see cref="SvdFactorizationStep"/>. Set exactly one of <see cref="Rank"/> and <see cref="Budget"/>.</summary>
public sealed class SvdFactorizationOptions : IValidatableOptions
{
    /// <summary>Gets or sets the per-layer rank rule, or <see langword="null"/> when a <see cref="Budget"/> is set.</summary>
    public RankRule? Rank { get; set; }

    /// <summary>Gets or sets the whole-model budget, or <see langword="null"/> when a <see cref="Rank"/> rule is set.</summary>
    public RankBudget? Budget { get; set; }

    /// <summary>Gets or sets how convolutions are split.</summary>
    /// <value>The default is <see cref="Factorization.ConvDecomposition.Channel"/>.</value>
    public ConvDecomposition ConvDecomposition { get; set; } = ConvDecomposition.Channel;

    /// <summary>Gets or sets the layers factorized.</summary>
    /// <value>The default is every Linear and Conv2d layer (grouped convolutions are left alone).</value>
    public LayerSelection Layers { get; set; } = LayerSelection.Default;

    /// <summary>
    /// Gets or sets what happens to a selected layer that a low-rank layer cannot replace (its parent holds it in a
    /// field typed <c>Linear</c> or <c>Conv2d</c>). Factorization has no in-place form — a layer of the same type
    /// holding the rank-r product would store as many values as before — so <see cref="FixedTypeLayers.CompressInPlace"/>
    /// and <see cref="FixedTypeLayers.Skip"/> both leave the layer as it is, outside any <see cref="Budget"/> (which is
    /// then spent on the other layers), and name it in the report; <see cref="FixedTypeLayers.Fail"/> throws.
    /// </summary>
    /// <value>The default is <see cref="FixedTypeLayers.CompressInPlace"/>.</value>
    public FixedTypeLayers FixedTypeLayers { get; set; } = FixedTypeLayers.CompressInPlace;

    /// <summary>Gets or sets fine-tuning after factorization, or <see langword="null"/> for none.</summary>
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
        const string Name = nameof(SvdFactorizationOptions);
        var errors = new List<string>();
        if ((Rank is null) == (Budget is null))
        {
            errors.Add($"{Name}: set exactly one of {nameof(Rank)} and {nameof(Budget)}.");
        }

        if (Rank is not null)
        {
            errors.AddRange(Rank.Validate().Select(e => $"{Name}.{nameof(Rank)}: {e}"));
        }

        if (Budget is not null)
        {
            errors.AddRange(Budget.Validate().Select(e => $"{Name}.{nameof(Budget)}: {e}"));
        }

        if (!Enum.IsDefined(ConvDecomposition))
        {
            errors.Add($"{Name}.{nameof(ConvDecomposition)} is not a known decomposition (was {(int)ConvDecomposition}).");
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

    internal SvdFactorizationOptions Clone() => new()
    {
        Rank = Rank,
        FixedTypeLayers = FixedTypeLayers,
        Budget = Budget?.Clone(),
        ConvDecomposition = ConvDecomposition,
        Layers = Layers.Copy(),
        FineTuning = FineTuning?.Clone(),
        Distillation = ModelCompression.Distillation.RecoveryDistillation.Copy(Distillation),
    };
}

/// <summary>The matrix a layer is factorized as, and what each rank costs.</summary>
/// <param name="Rows">The rows of the factorized matrix.</param>
/// <param name="Columns">The columns.</param>
/// <param name="CostPerRank">Parameters per unit of rank (rows + columns).</param>
/// <param name="DenseCost">Parameters of the dense weight (rows × columns).</param>
/// <param name="MacsPerParameter">MACs per sample per weight parameter (1 for Linear, the output positions for a convolution).</param>
internal sealed record LowRankShape(long Rows, long Columns, long CostPerRank, long DenseCost, long MacsPerParameter)
{
    public long FullRank => Math.Min(Rows, Columns);

    /// <summary>The largest rank that still stores fewer parameters than the dense weight.</summary>
    public long LargestUsefulRank => (DenseCost - 1) / CostPerRank;

    public long Cost(long rank) => rank <= 0 || rank > LargestUsefulRank ? DenseCost : rank * CostPerRank;
}
