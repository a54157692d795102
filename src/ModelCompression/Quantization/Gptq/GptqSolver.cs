using ModelCompression.Calibration;
using ModelCompression.Pruning;
using ModelCompression.Quantization.Kernels;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Quantization.Gptq;

/// <summary>
/// GPTQ's weight rounding for one layer (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
/// Pre-trained Transformers", ICLR 2023): columns are rounded one at a time onto the layer's symmetric integer grid, and
/// each column's rounding error is spread over the columns not yet rounded through the inverse of the damped Hessian
/// H = 2·XᵀX/n of the layer's inputs, so the layer's output error ‖WX − ŴX‖ rather than the weight error is kept small.
/// </summary>
/// <remarks>
/// The sweep itself (damping, Cholesky factor of H⁻¹, lazy block updates, float64) is <see cref="HessianSweep"/>, which
/// SparseGPT shares. Scales are fixed before rounding, one per row or per group of consecutive inputs, from the
/// weights as they stand when the group is reached (as GPTQ does) or, with act-order, from the original weights
/// ("static groups"), so that the groups stay runs of consecutive inputs that the quantized layers and the file store.
/// </remarks>
internal static class GptqSolver
{
    /// <summary>The outcome for one layer.</summary>
    /// <param name="Levels">The integer weights, row-major [N, K].</param>
    /// <param name="Scales">The scales: N (one per row) or N × groups.</param>
    /// <param name="Damping">The damping added to the Hessian's diagonal, as a fraction of its mean.</param>
    /// <param name="Retries">How many times the damping was raised because the damped Hessian was not positive definite.</param>
    /// <param name="DeadInputs">Inputs that were zero in every calibration sample (their weights are set to zero).</param>
    public sealed record Result(sbyte[] Levels, float[] Scales, double Damping, int Retries, int DeadInputs);

    /// <summary>Quantizes <paramref name="weight"/> [N, K] given the Hessian of its inputs.</summary>
    /// <param name="weight">The float weight, [N, K].</param>
    /// <param name="hessian">2·XᵀX/n of the layer's inputs, [K, K] (float64).</param>
    /// <param name="bits">Bits per weight, 2 to 8.</param>
    /// <param name="groupSize">Inputs per scale; 0 for one scale per row.</param>
    /// <param name="actOrder">Whether columns are rounded in order of decreasing Hessian diagonal (the largest inputs first).</param>
    /// <param name="dampingFraction">The damping, as a fraction of the mean diagonal.</param>
    /// <param name="blockSize">Columns per lazy-update block.</param>
    /// <param name="maxRetries">How many times the damping may be multiplied by 10 when the Cholesky factorisation fails.</param>
    /// <exception cref="ArgumentException">The Hessian stays not positive definite after every retry.</exception>
    /// <param name="sparsity">The fraction of weights pruned in the same sweep (SparseGPT's joint mode), 0 for none; needs <paramref name="actOrder"/> off.</param>
    /// <param name="pattern">An N:M pattern pruned in the same sweep instead, or <see langword="null"/>.</param>
    public static Result Quantize(Tensor weight, Tensor hessian, int bits, int groupSize, bool actOrder, double dampingFraction, int blockSize, int maxRetries = 4, double sparsity = 0, NMPattern? pattern = null)
    {
        bool prunes = sparsity > 0 || pattern is not null;
        if (prunes && actOrder)
        {
            throw new ArgumentException("SparseGPT's masks are chosen in input order: act-order must be off.", nameof(actOrder));
        }

        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        int n = checked((int)weight.shape[0]);
        int k = checked((int)weight.shape[1]);
        int qmax = QuantizedMatrix.MaxLevel(bits);
        int group = groupSize <= 0 || groupSize >= k ? 0 : groupSize;
        int groups = group == 0 ? 1 : (k + group - 1) / group;

        using var sweep = HessianSweep.Prepare(weight, hessian, actOrder, dampingFraction, maxRetries, "GPTQ");
        var rule = new RoundingRule(sweep, n, k, group, groups, qmax, bits, actOrder);
        if (group == 0 || actOrder)
        {
            // Scales fixed before any column moves (per row; per group with act-order) come from the original weights,
            // as the sweep holds them before it starts (dead inputs zeroed), in input order.
            var original = sweep.WeightsInInputOrder().contiguous().data<float>().ToArray();
            FillScales(original, n, k, group, qmax, bits, rule.Scales, 0, groups);
        }

        if (prunes)
        {
            var pruning = new SparseGptRule(n, k, sparsity, pattern);
            // Without act-order sweep positions are input columns: a group's scale leaves out the weights already
            // chosen for pruning, so the kept ones get the finer grid they need.
            rule.IsPruned = pruning.IsPruned;
            sweep.Run(blockSize, new PruningRoundingRule(pruning, rule));
        }
        else
        {
            sweep.Run(blockSize, rule);
        }

        return new Result(rule.Levels, rule.Scales, sweep.Damping, sweep.Retries, sweep.DeadInputs);
    }

    /// <summary>
    /// Scales from row-major weights in original input order: every group of every row, or (with
    /// <paramref name="firstGroupOnly"/>) only group <paramref name="target"/>, whose weights <paramref name="values"/> holds alone.
    /// </summary>
    private static void FillScales(float[] values, int n, int k, int group, int qmax, int bits, float[] scales, int target, int groups, bool firstGroupOnly = false)
    {
        int size = group == 0 ? k : group;
        int count = firstGroupOnly ? 1 : (k + size - 1) / size;
        for (int row = 0; row < n; row++)
        {
            for (int g = 0; g < count; g++)
            {
                int start = g * size;
                int length = Math.Min(size, k - start);
                scales[(row * groups) + (firstGroupOnly ? target : g)] = QuantizedMatrix.ScaleFor(values.AsSpan((row * k) + start, length), qmax, bits);
            }
        }
    }

    /// <summary>
    /// SparseGPT's joint mode: the pruning rule chooses the mask (per block, or per N:M group), pruned weights become
    /// level 0 and kept ones are rounded by GPTQ's rule; the sweep carries both errors forward.
    /// </summary>
    private sealed class PruningRoundingRule(SparseGptRule pruning, RoundingRule rounding) : IColumnRule
    {
        public void BeginBlock(int start, int end, double[] block, ReadOnlySpan<double> inverseDiagonal)
        {
            pruning.BeginBlock(start, end, block, inverseDiagonal);
            rounding.BeginBlock(start, end, block, inverseDiagonal);
        }

        public void BeginColumn(int position, int local, double[] block, int width)
        {
            pruning.BeginColumn(position, local, block, width);
            rounding.BeginColumn(position, local, block, width);
        }

        public double Fix(int row, int position, int local, double value) =>
            pruning.IsPruned(row, position) ? rounding.Fix(row, position, local, 0) : rounding.Fix(row, position, local, value);
    }

    /// <summary>GPTQ's column rule: each weight to its nearest level on the row's (or group's) symmetric grid.</summary>
    private sealed class RoundingRule(HessianSweep sweep, int n, int k, int group, int groups, int qmax, int bits, bool actOrder) : IColumnRule
    {
        private int _column;
        private int _scaleGroup;

        public sbyte[] Levels { get; } = new sbyte[n * k];

        /// <summary>Gets or sets which weights (row, input column) are pruned as far as known, left out of group scales; <see langword="null"/> when nothing is pruned.</summary>
        public Func<int, int, bool>? IsPruned { get; set; }

        public float[] Scales { get; } = new float[n * groups];

        public void BeginBlock(int start, int end, double[] block, ReadOnlySpan<double> inverseDiagonal)
        {
        }

        public void BeginColumn(int position, int local, double[] block, int width)
        {
            _column = (int)sweep.Order[position];
            _scaleGroup = group == 0 ? 0 : _column / group;
            if (group != 0 && !actOrder && _column % group == 0)
            {
                // The group's scales from its weights as of this block's start (GPTQ's choice), in input order since
                // without act-order columns are not permuted.
                using var groupScope = NewDisposeScope();
                var current = sweep.Weights[.., _column..Math.Min(k, _column + group)].to(ScalarType.Float32).contiguous().data<float>().ToArray();
                if (IsPruned is { } isPruned)
                {
                    int columns = current.Length / n;
                    for (int i = 0; i < current.Length; i++)
                    {
                        if (isPruned(i / columns, _column + (i % columns)))
                        {
                            current[i] = 0;
                        }
                    }
                }
                FillScales(current, n, current.Length / n, 0, qmax, bits, Scales, _scaleGroup, groups, firstGroupOnly: true);
            }
        }

        public double Fix(int row, int position, int local, double value)
        {
            float s = Scales[(row * groups) + _scaleGroup];
            float level = Math.Clamp(MathF.Round((float)value / s, MidpointRounding.ToEven), -qmax, qmax);
            Levels[((long)row * k) + _column] = (sbyte)level;
            return (double)level * s;
        }
    }
}
