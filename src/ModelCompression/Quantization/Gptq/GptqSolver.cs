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
/// The inverse Hessian is used through the upper Cholesky factor of H⁻¹, whose row i (from column i on) holds what
/// the exact sequential update needs once columns 0…i−1 are fixed; updates to columns beyond the current block are
/// applied once per block (lazy batching), so the work is one K×K Cholesky, one inversion and N·K² multiply-adds. All
/// arithmetic is float64. Scales are fixed before rounding, one per row or per group of consecutive inputs, from the
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
    public static Result Quantize(Tensor weight, Tensor hessian, int bits, int groupSize, bool actOrder, double dampingFraction, int blockSize, int maxRetries = 4)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        int n = checked((int)weight.shape[0]);
        int k = checked((int)weight.shape[1]);
        int qmax = QuantizedMatrix.MaxLevel(bits);
        int group = groupSize <= 0 || groupSize >= k ? 0 : groupSize;
        int groups = group == 0 ? 1 : (k + group - 1) / group;

        var w = weight.detach().to(ScalarType.Float64).cpu().clone();
        var h = hessian.detach().to(ScalarType.Float64).cpu().clone();

        // An input that is always zero carries no information: its weights cannot matter, so they become zero.
        var dead = h.diagonal().eq(0);
        int deadInputs = (int)dead.sum().item<long>();
        if (deadInputs > 0)
        {
            h.diagonal().masked_fill_(dead, 1);
            w.masked_fill_(dead.unsqueeze(0), 0);
        }

        // Scales fixed before any column moves (per row; per group with act-order) come from the original weights.
        var scales = new float[n * groups];
        var original = w.to(ScalarType.Float32).contiguous().data<float>().ToArray();
        if (group == 0 || actOrder)
        {
            FillScales(original, n, k, group, qmax, bits, scales, 0, groups);
        }

        var permutation = actOrder ? h.diagonal().sort(descending: true, stable: true).Indices : arange(k, dtype: ScalarType.Int64);
        long[] order = permutation.data<long>().ToArray();
        var permuted = w.index_select(1, permutation).contiguous();
        w.Dispose();
        w = permuted;
        var rows = h.index_select(0, permutation);
        h.Dispose();
        h = rows.index_select(1, permutation);
        rows.Dispose();

        // Damping: a fraction of the mean diagonal, raised tenfold until the Cholesky factorisation succeeds. Each try's
        // K×K intermediates are freed before the next, and only the factor the updates need is kept.
        double mean = h.diagonal().mean().item<double>();
        double damping = dampingFraction;
        int retries = 0;
        Tensor? hinv = null;
        while (hinv is null)
        {
            using (var attempt = NewDisposeScope())
            {
                var damped = h + (eye(k, dtype: ScalarType.Float64) * (damping * mean));
                var (factor, info) = linalg.cholesky_ex(damped);
                damped.Dispose();
                if (info.item<int>() == 0)
                {
                    var inverseHessian = cholesky_inverse(factor);
                    factor.Dispose();
                    // The upper factor U of H⁻¹ = UᵀU is the transpose of its lower factor.
                    var (lower, info2) = linalg.cholesky_ex(inverseHessian);
                    inverseHessian.Dispose();
                    if (info2.item<int>() == 0 && isfinite(lower).all().item<bool>())
                    {
                        hinv = lower.mT.contiguous().MoveToOuterDisposeScope();
                        break;
                    }
                }
            }

            if (retries == maxRetries)
            {
                throw new ArgumentException(
                    $"GPTQ: the layer's input Hessian is not positive definite even with damping {damping:G3} of its mean diagonal ({retries} retries). " +
                    "Give more calibration samples or a larger damping.");
            }

            damping *= 10;
            retries++;
        }

        h.Dispose();
        var levels = new sbyte[n * k];
        var hinvRows = hinv.data<double>().ToArray(); // row-major [K, K], upper triangular
        for (int start = 0; start < k; start += blockSize)
        {
            int end = Math.Min(k, start + blockSize);
            int width = end - start;
            // The block's columns as the earlier blocks' updates left them; this block's own updates happen here.
            var block = w[.., start..end].contiguous().data<double>().ToArray(); // [N, width]
            var errors = new double[n * width];
            for (int c = start; c < end; c++)
            {
                int column = (int)order[c];
                if (group != 0 && !actOrder && column % group == 0)
                {
                    // The group's scales from its weights as of this block's start (GPTQ's choice), in original order
                    // since without act-order columns are not permuted.
                    using var groupScope = NewDisposeScope();
                    var current = w[.., column..Math.Min(k, column + group)].to(ScalarType.Float32).contiguous().data<float>().ToArray();
                    FillScales(current, n, current.Length / n, 0, qmax, bits, scales, column / group, groups, firstGroupOnly: true);
                }

                int local = c - start;
                double d = hinvRows[((long)c * k) + c];
                int scaleGroup = group == 0 ? 0 : column / group;
                for (int row = 0; row < n; row++)
                {
                    int rowBase = row * width;
                    double value = block[rowBase + local];
                    float s = scales[(row * groups) + scaleGroup];
                    float level = Math.Clamp(MathF.Round((float)value / s, MidpointRounding.ToEven), -qmax, qmax);
                    levels[((long)row * k) + column] = (sbyte)level;
                    double error = (value - ((double)level * s)) / d;
                    errors[rowBase + local] = error;
                    // The exact sequential update of the rest of this block: W[:, j] -= error · Hinv[c, j].
                    long hBase = (long)c * k;
                    for (int j = local + 1; j < width; j++)
                    {
                        block[rowBase + j] -= error * hinvRows[hBase + start + j];
                    }
                }
            }

            if (end < k)
            {
                // The lazy update of every later column by the whole block's errors: W[:, end:] -= E · Hinv[start:end, end:].
                using var blockScope = NewDisposeScope();
                var e = tensor(errors, [n, width], ScalarType.Float64);
                w[.., end..].sub_(e.matmul(hinv[start..end, end..]));
            }
        }

        return new Result(levels, scales, damping, retries, deadInputs);
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
}
