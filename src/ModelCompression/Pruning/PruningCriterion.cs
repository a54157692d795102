namespace ModelCompression.Pruning;

/// <summary>
/// Which weights unstructured and N:M pruning removes (<see cref="MagnitudePruningOptions.Criterion"/>):
/// <see cref="Magnitude"/> the smallest |w|; <see cref="Wanda"/> and <see cref="SparseGpt"/> the ones whose removal
/// changes the layer's output least on calibration data, in one shot, without retraining.
/// </summary>
public abstract class PruningCriterion
{
    private protected PruningCriterion()
    {
    }

    /// <summary>Gets magnitude pruning: the smallest |w|, no data needed.</summary>
    public static PruningCriterion Magnitude { get; } = new MagnitudeCriterion();

    /// <summary>Gets Wanda's criterion with the given calibration (see <see cref="WandaCriterion"/>).</summary>
    /// <param name="calibrationBatches">Calibration batches per layer.</param>
    /// <param name="calibrationBatchSize">Samples per calibration batch.</param>
    /// <returns>The criterion.</returns>
    public static WandaCriterion Wanda(int calibrationBatches = 4, int calibrationBatchSize = 32) =>
        new() { CalibrationBatches = calibrationBatches, CalibrationBatchSize = calibrationBatchSize };

    /// <summary>Gets SparseGPT's criterion and weight update with the given settings (see <see cref="SparseGptCriterion"/>).</summary>
    /// <param name="dampingFraction">The damping added to the Hessian's diagonal, as a fraction of its mean (SparseGPT's default 0.01).</param>
    /// <param name="blockSize">Columns per block: the unit the mask is chosen in and the lazy-update block.</param>
    /// <param name="calibrationBatches">Calibration batches per layer.</param>
    /// <param name="calibrationBatchSize">Samples per calibration batch.</param>
    /// <returns>The criterion.</returns>
    public static SparseGptCriterion SparseGpt(double dampingFraction = 0.01, int blockSize = 128, int calibrationBatches = 4, int calibrationBatchSize = 32) =>
        new() { DampingFraction = dampingFraction, BlockSize = blockSize, CalibrationBatches = calibrationBatches, CalibrationBatchSize = calibrationBatchSize };

    internal virtual IEnumerable<string> Errors(string owner, NMPattern? pattern) => [];

    private sealed class MagnitudeCriterion : PruningCriterion
    {
        public override string ToString() => "magnitude";
    }
}

/// <summary>
/// A criterion that learns from calibration data: the Linear layers are pruned one at a time in the order the model
/// calls them, each from the inputs it receives with the layers before it already pruned, so only one layer's
/// statistics are held at a time. It runs once (the one-shot schedule), per layer (a layer-wise scope), on Linear
/// layers; fine-tuning afterwards is optional, with the masks held as for magnitude pruning.
/// </summary>
public abstract class CalibratedPruningCriterion : PruningCriterion
{
    private protected CalibratedPruningCriterion()
    {
    }

    /// <summary>Gets the calibration batches run for each layer.</summary>
    /// <value>The default is 4; at least 1.</value>
    public int CalibrationBatches { get; init; } = 4;

    /// <summary>Gets the samples per calibration batch.</summary>
    /// <value>The default is 32; at least 1.</value>
    public int CalibrationBatchSize { get; init; } = 32;

    internal override IEnumerable<string> Errors(string owner, NMPattern? pattern)
    {
        if (CalibrationBatches < 1)
        {
            yield return $"{owner}: {this}'s {nameof(CalibrationBatches)} must be at least 1 (was {CalibrationBatches}).";
        }

        if (CalibrationBatchSize < 1)
        {
            yield return $"{owner}: {this}'s {nameof(CalibrationBatchSize)} must be at least 1 (was {CalibrationBatchSize}).";
        }
    }
}

/// <summary>
/// Wanda (Sun, Liu, Bair and Kolter, "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024):
/// each weight scores |w_ij| · ‖x_j‖₂, its magnitude times the L2 norm of its input over the calibration samples, and
/// each output row (each group of M inputs of a row under an N:M pattern) keeps its highest scores. The weights kept
/// are not changed.
/// </summary>
/// <remarks>Memory: one float64 vector per layer (its inputs' squared norms) besides the layer's weight and scores.</remarks>
public sealed class WandaCriterion : CalibratedPruningCriterion
{
    internal WandaCriterion()
    {
    }

    /// <inheritdoc/>
    public override string ToString() => "Wanda";
}

/// <summary>
/// SparseGPT (Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML
/// 2023): the columns of a layer's weight are visited in blocks; in each block the weights with the smallest
/// w² / [H⁻¹]²_jj (the Optimal Brain Surgeon saliency, from the damped Hessian H = 2·XᵀX/n of the layer's inputs) are
/// chosen for removal — the given share of the block, or M − N of every M inputs of a row — and, column by column,
/// each removal's error is carried into the weights not yet visited, as GPTQ does for rounding (the same code), so
/// the kept weights change to make up for the removed ones.
/// </summary>
/// <remarks>
/// Memory is per layer, one layer at a time: at most four K×K float64 matrices (K the layer's inputs) while the
/// Hessian is factorised, then one, besides the layer's weights. A Hessian that is not positive definite after damping
/// gets ten times the damping and another try (four at most); the step's notes name the layers that needed it.
/// </remarks>
public sealed class SparseGptCriterion : CalibratedPruningCriterion
{
    internal SparseGptCriterion()
    {
    }

    /// <summary>Gets the damping added to the Hessian's diagonal, as a fraction of its mean diagonal.</summary>
    /// <value>SparseGPT's default is 0.01; greater than 0 and at most 1.</value>
    public double DampingFraction { get; init; } = 0.01;

    /// <summary>Gets the columns per block: unstructured masks are chosen per block (adaptive mask selection), and later columns are updated once per block.</summary>
    /// <value>The default is 128; at least 1, and a multiple of M under an N:M pattern.</value>
    public int BlockSize { get; init; } = 128;

    /// <inheritdoc/>
    public override string ToString() => "SparseGPT";

    internal override IEnumerable<string> Errors(string owner, NMPattern? pattern)
    {
        foreach (var error in base.Errors(owner, pattern))
        {
            yield return error;
        }

        if (!(DampingFraction > 0 && DampingFraction <= 1))
        {
            yield return $"{owner}: SparseGPT's {nameof(DampingFraction)} must be in (0, 1] (was {DampingFraction}).";
        }

        if (BlockSize < 1)
        {
            yield return $"{owner}: SparseGPT's {nameof(BlockSize)} must be at least 1 (was {BlockSize}).";
        }
        else if (pattern is { M: > 0 } p && BlockSize % p.M != 0)
        {
            yield return $"{owner}: SparseGPT's {nameof(BlockSize)} ({BlockSize}) must be a multiple of the pattern's M ({p.M}), so no group of M inputs spans two blocks.";
        }
    }
}
