using ModelCompression.Pruning;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Calibration;

/// <summary>
/// SparseGPT's column rule: at each block's start the block's share of the layer's sparsity goes to its weights of
/// smallest w² / d² (d the Cholesky factor's diagonal), or, under N:M, at each group's first column the M − N
/// smallest of each row's group; a pruned weight is fixed to zero and a kept one keeps its updated value.
/// </summary>
internal sealed class SparseGptRule(int n, int k, double sparsity, NMPattern? pattern) : IColumnRule
{
    private readonly bool[] _pruned = new bool[n * k];
    private double[] _diagonal = [];
    private int _start;

    public void BeginBlock(int start, int end, double[] block, ReadOnlySpan<double> inverseDiagonal)
    {
        _start = start;
        _diagonal = inverseDiagonal.ToArray();
        if (pattern is not null)
        {
            return;
        }

        int width = end - start;
        // The block's share, so the layer's total is exactly round(sparsity × N × K).
        long count = (long)Math.Round(sparsity * n * end) - (long)Math.Round(sparsity * n * start);
        if (count <= 0)
        {
            return;
        }

        var scores = new double[n * width];
        var index = new int[n * width];
        for (int i = 0; i < scores.Length; i++)
        {
            double d = _diagonal[i % width];
            scores[i] = block[i] * block[i] / (d * d);
            index[i] = i;
        }

        // Ascending by score, ties by position, so the choice is deterministic.
        Array.Sort(index, (a, b) => scores[a] != scores[b] ? scores[a].CompareTo(scores[b]) : a.CompareTo(b));
        for (long i = 0; i < count; i++)
        {
            int cell = index[i];
            _pruned[((cell / width) * k) + start + (cell % width)] = true;
        }
    }

    public void BeginColumn(int position, int local, double[] block, int width)
    {
        if (pattern is not { } p || position % p.M != 0)
        {
            return;
        }

        Span<int> group = stackalloc int[p.M];
        Span<double> scores = stackalloc double[p.M];
        for (int row = 0; row < n; row++)
        {
            for (int j = 0; j < p.M; j++)
            {
                double w = block[(row * width) + local + j];
                double d = _diagonal[local + j];
                scores[j] = w * w / (d * d);
                group[j] = j;
            }

            // The M − N smallest of the row's group, ties by position (insertion sort over M ≤ 64 entries).
            for (int a = 1; a < p.M; a++)
            {
                for (int b = a; b > 0 && scores[group[b]] < scores[group[b - 1]]; b--)
                {
                    (group[b], group[b - 1]) = (group[b - 1], group[b]);
                }
            }

            for (int j = 0; j < p.M - p.N; j++)
            {
                _pruned[(row * k) + position + group[j]] = true;
            }
        }
    }

    public double Fix(int row, int position, int local, double value) => IsPruned(row, position) ? 0 : value;

    /// <summary>Whether the weight of <paramref name="row"/> at sweep position <paramref name="position"/> is pruned (known once its block or N:M group has begun).</summary>
    public bool IsPruned(int row, int position) => _pruned[(row * k) + position];

    /// <summary>The mask, 1 kept and 0 pruned, [N, K].</summary>
    public Tensor Mask(ScalarType dtype)
    {
        var values = new float[_pruned.Length];
        for (int i = 0; i < values.Length; i++)
        {
            values[i] = _pruned[i] ? 0 : 1;
        }

        return tensor(values, [n, k], ScalarType.Float32).to(dtype);
    }
}
