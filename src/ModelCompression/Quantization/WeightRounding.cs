namespace ModelCompression.Quantization;

/// <summary>
/// How post-training quantization puts a layer's weights on its integer grid: <see cref="Nearest"/> rounds each weight
/// on its own; <see cref="Gptq"/> rounds column by column and compensates each column's error in the columns still to
/// come, from calibration inputs (<see cref="PostTrainingQuantizationOptions.Rounding"/>).
/// </summary>
public abstract class WeightRounding
{
    private protected WeightRounding()
    {
    }

    /// <summary>Gets round-to-nearest: each weight to its closest level, no calibration data needed for the weights.</summary>
    public static WeightRounding Nearest { get; } = new NearestRounding();

    /// <summary>Gets GPTQ's error-compensating rounding with the given settings (see <see cref="GptqRounding"/>).</summary>
    /// <param name="dampingFraction">The damping added to the Hessian's diagonal, as a fraction of its mean (GPTQ's default 0.01).</param>
    /// <param name="actOrder">Whether the inputs with the largest activations are rounded first.</param>
    /// <param name="blockSize">Columns per lazy-update block.</param>
    /// <returns>The rounding.</returns>
    public static GptqRounding Gptq(double dampingFraction = 0.01, bool actOrder = true, int blockSize = 128) =>
        new() { DampingFraction = dampingFraction, ActOrder = actOrder, BlockSize = blockSize };

    /// <summary>
    /// Gets SparseGPT's joint sparsification and quantization (Frantar and Alistarh 2023, §3.4): GPTQ's sweep in input
    /// order that also prunes — each block's mask chosen as SparseGPT chooses it, the kept weights rounded, and both
    /// errors carried into the columns still to come (see <see cref="GptqRounding.Sparsity"/>).
    /// </summary>
    /// <param name="sparsity">The fraction of each layer's weights set to zero, in [0, 1); ignored under a pattern.</param>
    /// <param name="pattern">An N:M pattern (2:4), or <see langword="null"/> for unstructured sparsity.</param>
    /// <param name="dampingFraction">The damping added to the Hessian's diagonal, as a fraction of its mean.</param>
    /// <param name="blockSize">Columns per block: the unit the mask is chosen in and the lazy-update block.</param>
    /// <returns>The rounding (GPTQ without act-order, which SparseGPT's block masks need).</returns>
    public static GptqRounding SparseGpt(double sparsity = 0.5, Pruning.NMPattern? pattern = null, double dampingFraction = 0.01, int blockSize = 128) =>
        new() { DampingFraction = dampingFraction, ActOrder = false, BlockSize = blockSize, Sparsity = pattern is null ? sparsity : 0, Pattern = pattern };

    /// <summary>Gets HQQ's calibration-free rounding with the given settings (see <see cref="HqqRounding"/>).</summary>
    /// <param name="lpNorm">The p of the Lp loss on the weight error, below 1 (HQQ's default 0.7).</param>
    /// <param name="iterations">The most optimisation steps per matrix.</param>
    /// <returns>The rounding.</returns>
    public static HqqRounding Hqq(double lpNorm = 0.7, int iterations = 20) => new() { LpNorm = lpNorm, Iterations = iterations };

    internal abstract IEnumerable<string> Errors(string owner);

    private sealed class NearestRounding : WeightRounding
    {
        internal override IEnumerable<string> Errors(string owner) => [];

        public override string ToString() => "round to nearest";
    }
}

/// <summary>
/// GPTQ (Frantar, Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
/// Pre-trained Transformers", ICLR 2023): each Linear layer in the order the model calls them, with the layers before
/// it already quantized, gets the Hessian H = 2·XᵀX/n of its calibration inputs; its weight columns are then rounded
/// one at a time and each column's rounding error is carried into the remaining columns through H⁻¹, which keeps the
/// layer's output close rather than its weights.
/// </summary>
/// <remarks>
/// <para>
/// The result is the same quantized layer and file as round-to-nearest, with the same scales' layout: one per row or
/// per group of consecutive inputs. Calibration uses <see cref="PostTrainingQuantizationOptions.CalibrationBatches"/>
/// batches of <see cref="PostTrainingQuantizationOptions.CalibrationBatchSize"/> samples, run once per Linear layer
/// (the layers before it already quantized). Memory is per layer, one layer at a time: at most four K×K float64
/// matrices (K the layer's inputs: the accumulated Hessian, its working copy and two factors while it is factorised;
/// 512 MB for K = 4,096) besides the layer's weights. Convolutions, embeddings and natively implemented layers are
/// rounded to nearest.
/// </para>
/// <para>
/// A Hessian that is not positive definite after damping gets ten times the damping and another try (four at most);
/// the step's notes name the layers that needed it.
/// </para>
/// </remarks>
public sealed class GptqRounding : WeightRounding
{
    internal GptqRounding()
    {
    }

    /// <summary>Gets the damping added to the Hessian's diagonal, as a fraction of its mean diagonal.</summary>
    /// <value>GPTQ's default is 0.01; greater than 0 and at most 1.</value>
    public double DampingFraction { get; init; } = 0.01;

    /// <summary>
    /// Gets a value indicating whether inputs are rounded in order of decreasing Hessian diagonal (GPTQ's act-order),
    /// which helps when a few input channels carry outliers. Group scales then come from the original weights
    /// ("static groups"), so groups remain runs of consecutive inputs.
    /// </summary>
    /// <value>The default is <see langword="true"/>.</value>
    public bool ActOrder { get; init; } = true;

    /// <summary>Gets the columns per lazy-update block (changes speed only, not the result beyond rounding of sums).</summary>
    /// <value>The default is 128; at least 1.</value>
    public int BlockSize { get; init; } = 128;

    /// <summary>
    /// Gets the fraction of each Linear layer's weights pruned in the same sweep (SparseGPT's joint mode): at each
    /// block's start its share of the zeros goes to the weights of smallest w² / [H⁻¹]²ᵢᵢ, the rest are rounded, and
    /// the errors of both are compensated in the columns still to come. The levels hold the zeros: the same quantized
    /// layer, whose file stores zeros cheaply.
    /// </summary>
    /// <value>The default is 0 (no pruning); in [0, 1). Needs <see cref="ActOrder"/> off.</value>
    public double Sparsity { get; init; }

    /// <summary>Gets an N:M pattern pruned in the same sweep instead of <see cref="Sparsity"/> (in every M consecutive inputs of a row, the N kept).</summary>
    /// <value>The default is <see langword="null"/>. Needs <see cref="ActOrder"/> off.</value>
    public Pruning.NMPattern? Pattern { get; init; }

    internal bool Prunes => Sparsity > 0 || Pattern is not null;

    /// <inheritdoc/>
    public override string ToString() =>
        $"GPTQ (damping {DampingFraction:G3}, act-order {(ActOrder ? "on" : "off")}, block {BlockSize}"
        + (Pattern is { } p ? $", SparseGPT {p} pruning" : Sparsity > 0 ? $", SparseGPT pruning to {Sparsity:P0} sparsity" : string.Empty) + ")";

    internal override IEnumerable<string> Errors(string owner)
    {
        if (!(DampingFraction > 0 && DampingFraction <= 1))
        {
            yield return $"{owner}: GPTQ's {nameof(DampingFraction)} must be in (0, 1] (was {DampingFraction}).";
        }

        if (BlockSize < 1)
        {
            yield return $"{owner}: GPTQ's {nameof(BlockSize)} must be at least 1 (was {BlockSize}).";
        }

        if (!(Sparsity >= 0 && Sparsity < 1))
        {
            yield return $"{owner}: GPTQ's {nameof(Sparsity)} must be in [0, 1) (was {Sparsity}).";
        }

        if (Pattern is { } p && !(p.N >= 1 && p.N < p.M && p.M <= 64))
        {
            yield return $"{owner}: GPTQ's {nameof(Pattern)} must keep 1 to M − 1 of M ≤ 64 weights (was {p}).";
        }

        if (Pattern is { M: > 0 } q && BlockSize >= 1 && BlockSize % q.M != 0)
        {
            yield return $"{owner}: GPTQ's {nameof(BlockSize)} ({BlockSize}) must be a multiple of the pattern's M ({q.M}), so no group of M inputs spans two blocks.";
        }

        if (Pattern is not null && Sparsity > 0)
        {
            yield return $"{owner}: GPTQ's {nameof(Sparsity)} and {nameof(Pattern)} exclude each other.";
        }

        if (Prunes && ActOrder)
        {
            yield return $"{owner}: GPTQ's pruning ({nameof(Sparsity)} or {nameof(Pattern)}) chooses its masks in input order: set {nameof(ActOrder)} = false (WeightRounding.SparseGpt does).";
        }
    }
}

/// <summary>
/// HQQ (Badri and Shaji, "Half-Quadratic Quantization of Large Machine Learning Models", 2023): each group of a
/// Linear layer's weights gets an asymmetric grid w ≈ s · (q − z), the scale from the group's range and the zero point
/// z found by half-quadratic optimisation of an Lp loss (p &lt; 1) on the weight error, which lets a few weights the
/// grid cannot fit go and fits the others better. It needs no calibration data and takes a fraction of GPTQ's time.
/// </summary>
/// <remarks>
/// <para>
/// The layers are the same quantized layers with one float16 zero point per scale: the kernel computes with the
/// levels as before and subtracts s · z times each group's input sum, about 1/group of the layer's work; the file
/// stores the zero points beside the scales, and the ONNX export passes them to <c>MatMulNBits</c>. With z, a b-bit
/// group uses all 2ᵇ levels (16 at 4 bits, against the symmetric grid's 15). Linear layers only: convolutions and
/// embeddings are rounded to nearest on the symmetric grid, and the step's notes name them.
/// </para>
/// <para>Memory: a few float32 copies of one layer's weight at a time.</para>
/// </remarks>
public sealed class HqqRounding : WeightRounding
{
    internal HqqRounding()
    {
    }

    /// <summary>Gets the p of the Lp loss on the weight error.</summary>
    /// <value>HQQ's default is 0.7; in (0, 1].</value>
    public double LpNorm { get; init; } = 0.7;

    /// <summary>Gets the most optimisation steps per matrix; it stops earlier when the error stops falling.</summary>
    /// <value>HQQ's default is 20; at least 1.</value>
    public int Iterations { get; init; } = 20;

    /// <summary>Gets the initial β of the half-quadratic splitting (the weight of the coupling term).</summary>
    /// <value>HQQ's default is 10; positive.</value>
    public double Beta { get; init; } = 10;

    /// <summary>Gets the factor β grows by each step.</summary>
    /// <value>HQQ's default is 1.01; at least 1.</value>
    public double Kappa { get; init; } = 1.01;

    /// <inheritdoc/>
    public override string ToString() => $"HQQ (p {LpNorm:G3}, {Iterations} iterations)";

    internal override IEnumerable<string> Errors(string owner)
    {
        if (!(LpNorm > 0 && LpNorm <= 1))
        {
            yield return $"{owner}: HQQ's {nameof(LpNorm)} must be in (0, 1] (was {LpNorm}).";
        }

        if (Iterations < 1)
        {
            yield return $"{owner}: HQQ's {nameof(Iterations)} must be at least 1 (was {Iterations}).";
        }

        if (!(Beta > 0 && double.IsFinite(Beta)))
        {
            yield return $"{owner}: HQQ's {nameof(Beta)} must be positive and finite (was {Beta}).";
        }

        if (!(Kappa >= 1 && double.IsFinite(Kappa)))
        {
            yield return $"{owner}: HQQ's {nameof(Kappa)} must be at least 1 and finite (was {Kappa}).";
        }
    }
}
