namespace ModelCompression.Pruning;

/// <summary>
/// When and how far a pruning step prunes: in rounds (each prunes, then fine-tunes), and optionally during
/// fine-tuning. Implementations are pure functions of their arguments.
/// </summary>
public interface IPruningSchedule
{
    /// <summary>Gets the number of prune-then-fine-tune rounds.</summary>
    int Rounds { get; }

    /// <summary>Gets whether the schedule needs fine-tuning to make sense (iterative and gradual schedules do).</summary>
    bool RequiresFineTuning { get; }

    /// <summary>Returns the sparsity to prune to at the start of a round.</summary>
    /// <param name="round">The zero-based round.</param>
    /// <param name="finalSparsity">The target sparsity of the whole step.</param>
    /// <returns>The sparsity, 0 to <paramref name="finalSparsity"/>.</returns>
    double RoundSparsity(int round, double finalSparsity);

    /// <summary>Returns the sparsity to re-prune to after an optimizer step of a round's fine-tuning, or <see langword="null"/> to keep the masks.</summary>
    /// <param name="step">The zero-based optimizer step of the round's fine-tuning.</param>
    /// <param name="totalSteps">The optimizer steps of the round's fine-tuning.</param>
    /// <param name="finalSparsity">The target sparsity of the whole step.</param>
    /// <returns>The new sparsity, or <see langword="null"/>.</returns>
    double? SparsityDuringTraining(long step, long totalSteps, double finalSparsity);

    /// <summary>Lists every invalid value.</summary>
    /// <returns>One message per invalid value.</returns>
    IReadOnlyList<string> Validate();
}

/// <summary>Prune once to the target, then fine-tune (if fine-tuning is set).</summary>
public sealed class OneShotPruning : IPruningSchedule
{
    /// <inheritdoc/>
    public int Rounds => 1;

    /// <inheritdoc/>
    public bool RequiresFineTuning => false;

    /// <inheritdoc/>
    public double RoundSparsity(int round, double finalSparsity) => finalSparsity;

    /// <inheritdoc/>
    public double? SparsityDuringTraining(long step, long totalSteps, double finalSparsity) => null;

    /// <inheritdoc/>
    public IReadOnlyList<string> Validate() => [];

    /// <inheritdoc/>
    public override string ToString() => "one-shot";
}

/// <summary>
/// Iterative pruning (Han et al. 2015): <c>Rounds</c> rounds of prune → fine-tune. The kept fraction shrinks
/// geometrically, so round r (zero-based) keeps (1 − s)^((r + 1) / rounds) of the weights.
/// </summary>
/// <param name="rounds">The number of rounds, 1 to 100. The default is 3.</param>
public sealed class IterativePruning(int rounds = 3) : IPruningSchedule
{
    /// <inheritdoc/>
    public int Rounds { get; } = rounds;

    /// <inheritdoc/>
    public bool RequiresFineTuning => true;

    /// <inheritdoc/>
    public double RoundSparsity(int round, double finalSparsity) =>
        round >= Rounds - 1 ? finalSparsity : 1 - Math.Pow(1 - finalSparsity, (round + 1.0) / Rounds);

    /// <inheritdoc/>
    public double? SparsityDuringTraining(long step, long totalSteps, double finalSparsity) => null;

    /// <inheritdoc/>
    public IReadOnlyList<string> Validate() =>
        Rounds is < 1 or > 100 ? [$"{nameof(IterativePruning)}.{nameof(Rounds)} must be between 1 and 100 (was {Rounds})."] : [];

    /// <inheritdoc/>
    public override string ToString() => $"iterative({Rounds} rounds)";
}

/// <summary>
/// Gradual pruning (Zhu and Gupta 2017, "automated gradual pruning"): during fine-tuning the masks are updated every
/// Δt optimizer steps from t₀ to t₀ + nΔt with sᵢ + (s_f − sᵢ)(1 − (1 − (t − t₀)/(nΔt))³), that is
/// s_t = s_f + (sᵢ − s_f)(1 − (t − t₀)/(nΔt))³; the last part of the run fine-tunes at the final sparsity.
/// </summary>
public sealed class GradualPruning : IPruningSchedule
{
    /// <summary>Gets or sets the sparsity sᵢ at the start.</summary>
    /// <value>The default is 0. Must be at least 0 and below the final sparsity.</value>
    public double InitialSparsity { get; init; }

    /// <summary>Gets or sets t₀ as a fraction of the fine-tuning steps.</summary>
    /// <value>The default is 0. Must be at least 0 and below <see cref="EndFraction"/>.</value>
    public double StartFraction { get; init; }

    /// <summary>Gets or sets t₀ + nΔt as a fraction of the fine-tuning steps; after it the sparsity stays final.</summary>
    /// <value>The default is 0.75. Must be above <see cref="StartFraction"/> and at most 1.</value>
    public double EndFraction { get; init; } = 0.75;

    /// <summary>Gets or sets Δt, the optimizer steps between mask updates; 0 chooses about 20 updates.</summary>
    /// <value>The default is 0. Must be non-negative.</value>
    public int Frequency { get; init; }

    /// <inheritdoc/>
    public int Rounds => 1;

    /// <inheritdoc/>
    public bool RequiresFineTuning => true;

    /// <inheritdoc/>
    /// <remarks>A layer whose own final sparsity is below <see cref="InitialSparsity"/> (an override) starts at its final sparsity.</remarks>
    public double RoundSparsity(int round, double finalSparsity) => Math.Min(InitialSparsity, finalSparsity);

    /// <summary>Returns Δt for a run of <paramref name="totalSteps"/> steps.</summary>
    /// <param name="totalSteps">The optimizer steps of the fine-tuning.</param>
    /// <returns>The steps between mask updates, at least 1.</returns>
    public long UpdateInterval(long totalSteps)
    {
        long span = Math.Max(1, End(totalSteps) - Start(totalSteps));
        return Frequency > 0 ? Frequency : Math.Max(1, span / 20);
    }

    /// <inheritdoc/>
    public double? SparsityDuringTraining(long step, long totalSteps, double finalSparsity)
    {
        long t0 = Start(totalSteps);
        long end = End(totalSteps);
        long dt = UpdateInterval(totalSteps);
        if (step < t0 || step > end || ((step - t0) % dt != 0 && step != end))
        {
            return null;
        }

        return SparsityAt(step, totalSteps, finalSparsity);
    }

    /// <summary>The formula s_t = s_f + (sᵢ − s_f)(1 − (t − t₀)/(nΔt))³, clamped to [t₀, t₀ + nΔt].</summary>
    /// <param name="step">The optimizer step t.</param>
    /// <param name="totalSteps">The optimizer steps of the fine-tuning.</param>
    /// <param name="finalSparsity">s_f.</param>
    /// <returns>s_t.</returns>
    public double SparsityAt(long step, long totalSteps, double finalSparsity)
    {
        long t0 = Start(totalSteps);
        long end = End(totalSteps);
        double progress = end <= t0 ? 1 : Math.Clamp((double)(step - t0) / (end - t0), 0, 1);
        double initial = Math.Min(InitialSparsity, finalSparsity);
        return finalSparsity + ((initial - finalSparsity) * Math.Pow(1 - progress, 3));
    }

    /// <inheritdoc/>
    public IReadOnlyList<string> Validate()
    {
        var errors = new List<string>();
        if (!(InitialSparsity >= 0 && InitialSparsity < 1))
        {
            errors.Add($"{nameof(GradualPruning)}.{nameof(InitialSparsity)} must be in [0, 1) (was {InitialSparsity}).");
        }

        if (!(StartFraction >= 0 && StartFraction < EndFraction && EndFraction <= 1))
        {
            errors.Add($"{nameof(GradualPruning)} needs 0 ≤ {nameof(StartFraction)} < {nameof(EndFraction)} ≤ 1 (was {StartFraction} and {EndFraction}).");
        }

        if (Frequency < 0)
        {
            errors.Add($"{nameof(GradualPruning)}.{nameof(Frequency)} must be non-negative (was {Frequency}).");
        }

        return errors;
    }

    private long Start(long totalSteps) => (long)Math.Floor(StartFraction * totalSteps);

    private long End(long totalSteps) => Math.Max(Start(totalSteps), (long)Math.Floor(EndFraction * Math.Max(0, totalSteps - 1)));

    /// <inheritdoc/>
    public override string ToString() => $"gradual(AGP, {StartFraction:0.##}–{EndFraction:0.##} of fine-tuning)";
}
