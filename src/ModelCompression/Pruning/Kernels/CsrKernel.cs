using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace ModelCompression.Pruning.Kernels;

/// <summary>
/// y = x · Wᵀ + b for a weight W stored in compressed sparse rows (one row per output feature), in plain C# with
/// <see cref="Vector{T}"/> (AVX2/AVX-512 on x64, NEON on Arm64, scalar elsewhere), split across cores by non-zeros.
/// </summary>
/// <remarks>
/// Small batches take each row's dot product with gathered inputs. Larger batches first transpose x so that each
/// non-zero scales one contiguous run of the batch (an AXPY held in registers), which turns the gather into
/// streaming loads.
/// </remarks>
internal static unsafe class CsrKernel
{
    /// <summary>Batches up to this size use the gathered dot product.</summary>
    internal const int DotProductMaxBatch = 4;

    /// <summary>Work (non-zeros × batch) below which one thread is faster than several.</summary>
    private const long ParallelThreshold = 1 << 16;

    /// <summary>Computes y[b, o] = bias[o] + Σₖ values[k] · x[b, columns[k]] over row o's non-zeros.</summary>
    /// <typeparam name="TIndex">The column index type (<see cref="ushort"/> when the input has at most 65,536 features, else <see cref="int"/>).</typeparam>
    /// <param name="values">The non-zero values, row by row.</param>
    /// <param name="columns">The column (input feature) of each value.</param>
    /// <param name="rowOffsets">Row o's values are [rowOffsets[o], rowOffsets[o + 1]); length outFeatures + 1.</param>
    /// <param name="bias">The bias (length outFeatures), or empty.</param>
    /// <param name="x">The input, row-major [batch, inFeatures].</param>
    /// <param name="batch">The batch size.</param>
    /// <param name="inFeatures">The input features.</param>
    /// <param name="y">The output, row-major [batch, outFeatures].</param>
    public static void Multiply<TIndex>(
        ReadOnlySpan<float> values,
        ReadOnlySpan<TIndex> columns,
        ReadOnlySpan<int> rowOffsets,
        ReadOnlySpan<float> bias,
        ReadOnlySpan<float> x,
        int batch,
        int inFeatures,
        Span<float> y)
        where TIndex : unmanaged, IBinaryInteger<TIndex>
    {
        int outFeatures = rowOffsets.Length - 1;
        if (values.Length != columns.Length || rowOffsets[^1] != values.Length || x.Length != (long)batch * inFeatures
            || y.Length != (long)batch * outFeatures || (bias.Length != 0 && bias.Length != outFeatures))
        {
            throw new ArgumentException("The sparse matrix, input and output sizes do not agree.");
        }

        if (batch == 0 || outFeatures == 0)
        {
            return;
        }

        float[]? transposed = null;
        try
        {
            fixed (float* pv = values)
            fixed (TIndex* pc = columns)
            fixed (int* pr = rowOffsets)
            fixed (float* pb = bias)
            fixed (float* px = x)
            fixed (float* py = y)
            {
                var args = new Args<TIndex>(pv, pc, pr, bias.Length == 0 ? null : pb, px, py, batch, inFeatures, outFeatures);
                if (batch > DotProductMaxBatch)
                {
                    // Rows of the transposed input are padded with zeros to whole vectors, so no sample needs a scalar loop.
                    int stride = Vector.IsHardwareAccelerated ? (batch + Vector<float>.Count - 1) / Vector<float>.Count * Vector<float>.Count : batch;
                    long size = (long)stride * inFeatures;
                    if (size > Array.MaxLength)
                    {
                        throw new ArgumentException($"A batch of {batch} × {inFeatures} inputs is too large for one call; split the batch.");
                    }

                    transposed = System.Buffers.ArrayPool<float>.Shared.Rent((int)size);
                    Transpose(px, transposed, batch, inFeatures, stride);
                    args.Stride = stride;
                }

                fixed (float* pt = transposed)
                {
                    args.XT = pt;
                    long work = (long)values.Length * batch;
                    int parts = work < ParallelThreshold ? 1 : Math.Min(Environment.ProcessorCount, outFeatures);
                    if (parts == 1)
                    {
                        RunRows(args, 0, outFeatures);
                    }
                    else
                    {
                        var bounds = SplitByNonzeros(rowOffsets, parts);
                        Parallel.For(0, parts, part => RunRows(args, bounds[part], bounds[part + 1]));
                    }
                }
            }
        }
        finally
        {
            if (transposed is not null)
            {
                System.Buffers.ArrayPool<float>.Shared.Return(transposed);
            }
        }
    }

    /// <summary>Row boundaries that give each part about the same number of non-zeros.</summary>
    internal static int[] SplitByNonzeros(ReadOnlySpan<int> rowOffsets, int parts)
    {
        int rows = rowOffsets.Length - 1;
        long total = rowOffsets[^1];
        var bounds = new int[parts + 1];
        bounds[parts] = rows;
        int row = 0;
        for (int p = 1; p < parts; p++)
        {
            long target = total * p / parts;
            while (row < rows && rowOffsets[row] < target)
            {
                row++;
            }

            bounds[p] = Math.Max(row, bounds[p - 1]);
        }

        return bounds;
    }

    private static void RunRows<TIndex>(Args<TIndex> a, int rowStart, int rowEnd)
        where TIndex : unmanaged, IBinaryInteger<TIndex>
    {
        if (a.XT is null)
        {
            DotRows(a, rowStart, rowEnd);
        }
        else
        {
            AxpyRows(a, rowStart, rowEnd);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DotRows<TIndex>(Args<TIndex> a, int rowStart, int rowEnd)
        where TIndex : unmanaged, IBinaryInteger<TIndex>
    {
        for (int b = 0; b < a.Batch; b++)
        {
            float* xb = a.X + ((long)b * a.In);
            float* yb = a.Y + ((long)b * a.Out);
            for (int o = rowStart; o < rowEnd; o++)
            {
                int k = a.Rows[o];
                int end = a.Rows[o + 1];
                float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
                for (; k + 4 <= end; k += 4)
                {
                    s0 += a.Values[k] * xb[int.CreateTruncating(a.Columns[k])];
                    s1 += a.Values[k + 1] * xb[int.CreateTruncating(a.Columns[k + 1])];
                    s2 += a.Values[k + 2] * xb[int.CreateTruncating(a.Columns[k + 2])];
                    s3 += a.Values[k + 3] * xb[int.CreateTruncating(a.Columns[k + 3])];
                }

                for (; k < end; k++)
                {
                    s0 += a.Values[k] * xb[int.CreateTruncating(a.Columns[k])];
                }

                yb[o] = (s0 + s1) + (s2 + s3) + (a.Bias is null ? 0 : a.Bias[o]);
            }
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void AxpyRows<TIndex>(Args<TIndex> a, int rowStart, int rowEnd)
        where TIndex : unmanaged, IBinaryInteger<TIndex>
    {
        int w = Vector<float>.Count;
        int stride = a.Stride;
        int fullBlocks = Vector.IsHardwareAccelerated ? stride / (4 * w) * (4 * w) : 0;
        int vectors = Vector.IsHardwareAccelerated ? stride : 0;
        for (int o = rowStart; o < rowEnd; o++)
        {
            int start = a.Rows[o];
            int end = a.Rows[o + 1];
            float bias = a.Bias is null ? 0 : a.Bias[o];

            // Blocks of 4 vectors of the batch, accumulated in registers.
            int b0 = 0;
            for (; b0 < fullBlocks; b0 += 4 * w)
            {
                var acc0 = new Vector<float>(bias);
                var acc1 = acc0;
                var acc2 = acc0;
                var acc3 = acc0;
                for (int k = start; k < end; k++)
                {
                    var v = new Vector<float>(a.Values[k]);
                    float* xt = a.XT + ((long)int.CreateTruncating(a.Columns[k]) * stride) + b0;
                    acc0 += v * Unsafe.ReadUnaligned<Vector<float>>(xt);
                    acc1 += v * Unsafe.ReadUnaligned<Vector<float>>(xt + w);
                    acc2 += v * Unsafe.ReadUnaligned<Vector<float>>(xt + (2 * w));
                    acc3 += v * Unsafe.ReadUnaligned<Vector<float>>(xt + (3 * w));
                }

                StoreColumn(a, o, b0, acc0);
                StoreColumn(a, o, b0 + w, acc1);
                StoreColumn(a, o, b0 + (2 * w), acc2);
                StoreColumn(a, o, b0 + (3 * w), acc3);
            }

            // Then single vectors (the padded end of the batch included).
            for (; b0 < vectors; b0 += w)
            {
                var acc = new Vector<float>(bias);
                for (int k = start; k < end; k++)
                {
                    float* xt = a.XT + ((long)int.CreateTruncating(a.Columns[k]) * stride) + b0;
                    acc += new Vector<float>(a.Values[k]) * Unsafe.ReadUnaligned<Vector<float>>(xt);
                }

                StoreColumn(a, o, b0, acc);
            }

            // Without vector hardware: one sample at a time.
            for (; b0 < a.Batch; b0++)
            {
                float acc = bias;
                for (int k = start; k < end; k++)
                {
                    acc += a.Values[k] * a.XT[((long)int.CreateTruncating(a.Columns[k]) * stride) + b0];
                }

                a.Y[((long)b0 * a.Out) + o] = acc;
            }
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreColumn<TIndex>(Args<TIndex> a, int o, int b0, Vector<float> acc)
        where TIndex : unmanaged, IBinaryInteger<TIndex>
    {
        int count = Math.Min(Vector<float>.Count, a.Batch - b0);
        for (int j = 0; j < count; j++)
        {
            a.Y[((long)(b0 + j) * a.Out) + o] = acc[j];
        }
    }

    private static void Transpose(float* x, float[] xt, int batch, int inFeatures, int stride)
    {
        // Tiles keep both sides in cache.
        const int Tile = 32;
        fixed (float* t = xt)
        {
            for (int b0 = 0; b0 < batch; b0 += Tile)
            {
                int b1 = Math.Min(batch, b0 + Tile);
                for (int i0 = 0; i0 < inFeatures; i0 += Tile)
                {
                    int i1 = Math.Min(inFeatures, i0 + Tile);
                    for (int b = b0; b < b1; b++)
                    {
                        float* row = x + ((long)b * inFeatures);
                        for (int i = i0; i < i1; i++)
                        {
                            t[((long)i * stride) + b] = row[i];
                        }
                    }
                }
            }

            for (long i = 0; i < inFeatures; i++)
            {
                for (int b = batch; b < stride; b++)
                {
                    t[(i * stride) + b] = 0;
                }
            }
        }
    }

    private struct Args<TIndex>(float* values, TIndex* columns, int* rows, float* bias, float* x, float* y, int batch, int inFeatures, int outFeatures)
        where TIndex : unmanaged
    {
        public readonly float* Values = values;
        public readonly TIndex* Columns = columns;
        public readonly int* Rows = rows;
        public readonly float* Bias = bias;
        public readonly float* X = x;
        public readonly float* Y = y;
        public readonly int Batch = batch;
        public readonly int In = inFeatures;
        public readonly int Out = outFeatures;
        public float* XT;
        public int Stride;
    }
}
