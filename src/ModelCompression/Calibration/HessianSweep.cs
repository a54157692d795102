using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Calibration;

/// <summary>
/// What one column of a <see cref="HessianSweep"/> is fixed to, decided by the method that runs the sweep: GPTQ rounds
/// it onto the integer grid, SparseGPT sets the pruned weights to zero.
/// </summary>
internal interface IColumnRule
{
    /// <summary>Called before a block's first column with the block's weights as the earlier blocks left them.</summary>
    /// <param name="start">The block's first sweep position.</param>
    /// <param name="end">One past its last.</param>
    /// <param name="block">The block's weights, row-major [N, end − start]; this block's own updates are not in it yet.</param>
    /// <param name="inverseDiagonal">The diagonal of the Cholesky factor of H⁻¹ at the block's positions.</param>
    void BeginBlock(int start, int end, double[] block, ReadOnlySpan<double> inverseDiagonal);

    /// <summary>Called before a column is fixed, with the block as every earlier column's update left it.</summary>
    /// <param name="position">The sweep position (the input column is <see cref="HessianSweep.Order"/>[position]).</param>
    /// <param name="local">The position within the block.</param>
    /// <param name="block">The block's current weights, row-major [N, width].</param>
    /// <param name="width">The block's columns.</param>
    void BeginColumn(int position, int local, double[] block, int width);

    /// <summary>Returns the value a weight is fixed to.</summary>
    /// <param name="row">The output row.</param>
    /// <param name="position">The sweep position.</param>
    /// <param name="local">The position within the block.</param>
    /// <param name="value">The weight as the earlier columns' updates left it.</param>
    /// <returns>The fixed value; the difference is carried into the columns still to come.</returns>
    double Fix(int row, int position, int local, double value);
}

/// <summary>
/// The column-by-column sweep of Optimal Brain Surgeon updates that GPTQ (Frantar et al. 2023) and SparseGPT (Frantar
/// and Alistarh 2023) share: each weight column is fixed (rounded, or pruned) in turn, and its error is spread over
/// the columns not yet fixed through the inverse of the damped Hessian H = 2·XᵀX/n of the layer's inputs, so the
/// layer's output error ‖WX − ŴX‖ stays small rather than the weight error.
/// </summary>
/// <remarks>
/// The inverse Hessian is used through the upper Cholesky factor of H⁻¹, whose row i (from column i on) holds what
/// the exact sequential update needs once columns 0…i−1 are fixed; updates to columns beyond the current block are
/// applied once per block (lazy batching), so the work is one K×K Cholesky, one inversion and N·K² multiply-adds. All
/// arithmetic is float64. Memory: at most four K×K float64 matrices at a time (the Hessian, its damped copy and two
/// factors while factorising), then one factor and the N×K working weights.
/// </remarks>
internal sealed class HessianSweep : IDisposable
{
    private readonly Tensor _weights;
    private readonly Tensor _factor;

    private HessianSweep(Tensor weights, Tensor factor, long[] order, double damping, int retries, int deadInputs)
    {
        _weights = weights;
        _factor = factor;
        Order = order;
        Damping = damping;
        Retries = retries;
        DeadInputs = deadInputs;
        Rows = checked((int)weights.shape[0]);
        Columns = checked((int)weights.shape[1]);
    }

    /// <summary>Gets the input column at each sweep position.</summary>
    public long[] Order { get; }

    /// <summary>Gets the damping added to the Hessian's diagonal, as a fraction of its mean.</summary>
    public double Damping { get; }

    /// <summary>Gets how many times the damping was raised because the damped Hessian was not positive definite.</summary>
    public int Retries { get; }

    /// <summary>Gets the inputs that were zero in every calibration sample (their weights are set to zero).</summary>
    public int DeadInputs { get; }

    /// <summary>Gets the output rows N.</summary>
    public int Rows { get; }

    /// <summary>Gets the input columns K.</summary>
    public int Columns { get; }

    /// <summary>Gets the working weights in sweep order, float64 [N, K]: as the sweep has left them.</summary>
    public Tensor Weights => _weights;

    /// <summary>
    /// Prepares a sweep: inputs that never fired are zeroed, columns are permuted (act-order: by decreasing Hessian
    /// diagonal), and the damped Hessian is factorised, its damping raised tenfold until that succeeds.
    /// </summary>
    /// <param name="weight">The layer's weight [N, K].</param>
    /// <param name="hessian">2·XᵀX/n of its inputs [K, K].</param>
    /// <param name="actOrder">Whether the inputs with the largest Hessian diagonal go first.</param>
    /// <param name="dampingFraction">The damping, as a fraction of the mean diagonal.</param>
    /// <param name="maxRetries">How many times the damping may be multiplied by 10.</param>
    /// <param name="method">The method's name, for the error.</param>
    /// <returns>The prepared sweep; dispose it.</returns>
    /// <exception cref="ArgumentException">The Hessian stays not positive definite after every retry.</exception>
    public static HessianSweep Prepare(Tensor weight, Tensor hessian, bool actOrder, double dampingFraction, int maxRetries, string method)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        int k = checked((int)weight.shape[1]);
        var w = weight.detach().to(ScalarType.Float64).cpu().clone();
        var h = hessian.detach().to(ScalarType.Float64).cpu().clone();

        // An input that is always zero carries no information: its weights cannot matter, so they become zero.
        using var zero = 0.ToScalar();
        var dead = h.diagonal().eq(zero);
        int deadInputs = (int)dead.sum().item<long>();
        if (deadInputs > 0)
        {
            h.diagonal().masked_fill_(dead, KeptScalars.One);
            w.masked_fill_(dead.unsqueeze(0), zero);
        }

        var permutation = actOrder ? h.diagonal().sort(descending: true, stable: true).Indices : KeptScalars.Range(k, dtype: ScalarType.Int64);
        long[] order = permutation.data<long>().ToArray();
        var permuted = w;
        if (actOrder)
        {
            permuted = w.index_select(1, permutation).contiguous();
            w.Dispose();
            var rows = h.index_select(0, permutation);
            h.Dispose();
            h = rows.index_select(1, permutation);
            rows.Dispose();
        }

        // Damping: a fraction of the mean diagonal, raised tenfold until the Cholesky factorisation succeeds. Each try's
        // K×K intermediates are freed before the next, and only the factor the updates need is kept.
        double mean = h.diagonal().mean().item<double>();
        double damping = dampingFraction;
        int retries = 0;
        Tensor? factor = null;
        while (factor is null)
        {
            using (var attempt = NewDisposeScope())
            {
                // At most two K×K matrices besides the Hessian live at once: the damped copy and its factor, the factor
                // and the inverse, the inverse and its factor, that factor and its transpose.
                using var dampingScalar = (damping * mean).ToScalar();
                var damped = h.clone();
                damped.diagonal().add_(dampingScalar, KeptScalars.One);
                var (lowerH, info) = linalg.cholesky_ex(damped);
                damped.Dispose();
                if (info.item<int>() == 0)
                {
                    var inverseHessian = cholesky_inverse(lowerH);
                    lowerH.Dispose();
                    // The upper factor U of H⁻¹ = UᵀU is the transpose of its lower factor.
                    var (lower, info2) = linalg.cholesky_ex(inverseHessian);
                    inverseHessian.Dispose();
                    if (info2.item<int>() == 0 && isfinite(lower).all().item<bool>())
                    {
                        factor = lower.mT.contiguous().MoveToOuterDisposeScope();
                        lower.Dispose();
                        break;
                    }

                    lower.Dispose();
                }
                else
                {
                    lowerH.Dispose();
                }
            }

            if (retries == maxRetries)
            {
                throw new ArgumentException(
                    $"{method}: the layer's input Hessian is not positive definite even with damping {damping:G3} of its mean diagonal ({retries} retries). " +
                    "Give more calibration samples or a larger damping.");
            }

            damping *= 10;
            retries++;
        }

        h.Dispose();
        return new HessianSweep(permuted.MoveToOuterDisposeScope(), factor.MoveToOuterDisposeScope(), order, damping, retries, deadInputs);
    }

    /// <summary>Fixes every column in sweep order with <paramref name="rule"/>, carrying each error into the columns still to come.</summary>
    /// <param name="blockSize">Columns per lazy-update block.</param>
    /// <param name="rule">What each column is fixed to.</param>
    public void Run(int blockSize, IColumnRule rule)
    {
        using var noGrad = no_grad();
        int n = Rows, k = Columns;
        double[] diagonal;
        using (var diagonalScope = NewDisposeScope())
        {
            diagonal = _factor.diagonal().contiguous().data<double>().ToArray();
        }

        for (int start = 0; start < k; start += blockSize)
        {
            int end = Math.Min(k, start + blockSize);
            int width = end - start;
            // The block's columns as the earlier blocks' updates left them; this block's own updates happen here.
            double[] block, factorBlock;
            using (var blockScope = NewDisposeScope())
            {
                block = _weights[.., start..end].contiguous().data<double>().ToArray(); // [N, width]
                // Only the factor's diagonal block is read column by column (width², not K²: no managed copy of the factor).
                factorBlock = _factor[start..end, start..end].contiguous().data<double>().ToArray();
            }

            rule.BeginBlock(start, end, block, diagonal.AsSpan(start, width));
            var errors = new double[n * width];
            for (int c = start; c < end; c++)
            {
                int local = c - start;
                rule.BeginColumn(c, local, block, width);
                double d = diagonal[c];
                int hBase = local * width;
                for (int row = 0; row < n; row++)
                {
                    int rowBase = row * width;
                    double value = block[rowBase + local];
                    double fixedValue = rule.Fix(row, c, local, value);
                    block[rowBase + local] = fixedValue;
                    double error = (value - fixedValue) / d;
                    errors[rowBase + local] = error;
                    // The exact sequential update of the rest of this block: W[:, j] -= error · Hinv[c, j].
                    for (int j = local + 1; j < width; j++)
                    {
                        block[rowBase + j] -= error * factorBlock[hBase + j];
                    }
                }
            }

            using var scope = NewDisposeScope();
            _weights[.., start..end].copy_(tensor(block, [n, width], ScalarType.Float64));
            if (end < k)
            {
                // The lazy update of every later column by the whole block's errors: W[:, end:] -= E · Hinv[start:end, end:].
                var e = tensor(errors, [n, width], ScalarType.Float64);
                _weights[.., end..].sub_(e.matmul(_factor[start..end, end..]));
            }
        }
    }

    /// <summary>Returns the swept weights in the layer's own column order, float32 [N, K].</summary>
    /// <returns>The weights (in the caller's dispose scope).</returns>
    public Tensor WeightsInInputOrder()
    {
        using var scope = NewDisposeScope();
        var inverse = argsort(tensor(Order, ScalarType.Int64));
        return _weights.index_select(1, inverse).to(ScalarType.Float32).MoveToOuterDisposeScope();
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        _weights.Dispose();
        _factor.Dispose();
    }
}
