using System.Runtime.InteropServices;
using ModelCompression.Metrics;
using ModelCompression.Pruning.Kernels;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Pruning;

/// <summary>
/// A Linear layer whose weight is stored in compressed sparse rows (CSR: the non-zero values, their input-feature
/// indices, and where each output row starts) and multiplied by this library's own C# kernel. Built from a pruned
/// <see cref="Linear"/> with <see cref="FromLinear"/>; an inference layer (its weights are not trained).
/// </summary>
/// <remarks>
/// Column indices take 2 bytes when the layer has at most 65,536 inputs, else 4. On a device other than the CPU,
/// or for inputs that are not float32, the layer falls back to a dense multiply.
/// </remarks>
public sealed class SparseLinear : nn.Module<Tensor, Tensor>, ICompressedLayer
{
    private readonly Tensor values;
    private readonly Tensor columns;
    private readonly Tensor rowOffsets;
    private readonly Tensor? bias;

    private SparseLinear(Tensor values, Tensor columns, Tensor rowOffsets, Tensor? bias, long inFeatures, long outFeatures)
        : base(nameof(SparseLinear))
    {
        this.values = values;
        this.columns = columns;
        this.rowOffsets = rowOffsets;
        this.bias = bias;
        InFeatures = inFeatures;
        OutFeatures = outFeatures;
        RegisterComponents();
    }

    /// <summary>Gets the number of input features.</summary>
    public long InFeatures { get; }

    /// <summary>Gets the number of output features.</summary>
    public long OutFeatures { get; }

    /// <summary>Gets the bias, or <see langword="null"/> (for the file format).</summary>
    internal Tensor? Bias => bias;

    /// <summary>Gets the number of stored (non-zero) weights.</summary>
    public long StoredWeights => values.numel();

    /// <summary>Gets the fraction of the weight matrix stored, 0 to 1.</summary>
    public double Density => (double)StoredWeights / (InFeatures * OutFeatures);

    /// <inheritdoc/>
    public int WeightBits => 32;

    /// <inheritdoc/>
    public int? Rank => null;

    /// <inheritdoc/>
    public long ParameterCount => (InFeatures * OutFeatures) + (bias?.numel() ?? 0);

    /// <inheritdoc/>
    public long NonzeroParameterCount
    {
        get
        {
            using var scope = NewDisposeScope();
            return values.count_nonzero().item<long>() + (bias is null ? 0 : bias.count_nonzero().item<long>());
        }
    }

    /// <inheritdoc/>
    public long CountMacs(Tensor input, Tensor output) => output.numel() / OutFeatures * StoredWeights;

    /// <summary>Builds a sparse layer holding the non-zero weights of <paramref name="linear"/> (which is not changed).</summary>
    /// <param name="linear">A Linear layer, usually pruned.</param>
    /// <returns>The sparse layer, on the CPU.</returns>
    /// <exception cref="ArgumentException">The weight is not finite.</exception>
    public static SparseLinear FromLinear(Linear linear)
    {
        ArgumentNullException.ThrowIfNull(linear);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var weight = linear.weight!.detach().to(float32).cpu().contiguous();
        if (!isfinite(weight).all().item<bool>())
        {
            throw new ArgumentException("The layer's weight holds NaN or infinite values.", nameof(linear));
        }

        long outFeatures = weight.shape[0];
        long inFeatures = weight.shape[1];
        var dense = MemoryMarshal.Cast<byte, float>(weight.bytes);
        var offsets = new int[outFeatures + 1];
        int nnz = 0;
        for (long o = 0; o < outFeatures; o++)
        {
            var row = dense.Slice((int)(o * inFeatures), (int)inFeatures);
            foreach (float v in row)
            {
                nnz += v != 0 ? 1 : 0;
            }

            offsets[o + 1] = nnz;
        }

        var vals = new float[nnz];
        bool narrow = inFeatures <= 65536;
        var cols16 = narrow ? new short[nnz] : [];
        var cols32 = narrow ? [] : new int[nnz];
        int k = 0;
        for (long o = 0; o < outFeatures; o++)
        {
            var row = dense.Slice((int)(o * inFeatures), (int)inFeatures);
            for (int i = 0; i < row.Length; i++)
            {
                if (row[i] != 0)
                {
                    vals[k] = row[i];
                    if (narrow)
                    {
                        cols16[k] = unchecked((short)(ushort)i);
                    }
                    else
                    {
                        cols32[k] = i;
                    }

                    k++;
                }
            }
        }

        var valuesTensor = tensor(vals).DetachFromDisposeScope();
        var columnsTensor = (narrow ? tensor(cols16) : tensor(cols32)).DetachFromDisposeScope();
        var offsetsTensor = tensor(offsets).DetachFromDisposeScope();
        var biasTensor = linear.bias is null ? null : linear.bias.detach().to(float32).cpu().clone().DetachFromDisposeScope();
        return new SparseLinear(valuesTensor, columnsTensor, offsetsTensor, biasTensor, inFeatures, outFeatures);
    }

    /// <summary>Returns the dense weight [out, in] this layer represents (for checks and fallbacks).</summary>
    /// <returns>A new tensor the caller owns.</returns>
    public Tensor ToDenseWeight()
    {
        using var scope = NewDisposeScope();
        var counts = rowOffsets.narrow(0, 1, OutFeatures) - rowOffsets.narrow(0, 0, OutFeatures);
        var rows = KeptScalars.Range(OutFeatures, dtype: int64, device: values.device).repeat_interleave(counts.to(int64));
        var cols = columns.dtype == int16 ? columns.to(int32).bitwise_and(0xFFFF).to(int64) : columns.to(int64);
        var dense = zeros([OutFeatures, InFeatures], dtype: float32, device: values.device);
        dense.index_put_(values, rows, cols);
        return dense.MoveToOuterDisposeScope();
    }

    /// <inheritdoc/>
    public override Tensor forward(Tensor input)
    {
        ArgumentNullException.ThrowIfNull(input);
        if (input.dim() == 0 || input.shape[^1] != InFeatures)
        {
            throw new ArgumentException($"SparseLinear expects inputs with {InFeatures} features in the last dimension; got [{string.Join(", ", input.shape)}].", nameof(input));
        }

        using var scope = NewDisposeScope();
        if (input.device_type != DeviceType.CPU || input.dtype != float32 || values.device_type != DeviceType.CPU || (input.requires_grad && is_grad_enabled()))
        {
            using var weight = ToDenseWeight();
            return nn.functional.linear(input, weight.to(input.dtype).to(input.device), bias?.to(input.dtype).to(input.device)).MoveToOuterDisposeScope();
        }

        var leading = input.shape[..^1];
        long batch = leading.Aggregate(1L, (a, b) => a * b);
        var x = input.reshape(batch, InFeatures).contiguous();
        var y = empty([batch, OutFeatures], dtype: float32);
        var v = MemoryMarshal.Cast<byte, float>(values.bytes);
        var r = MemoryMarshal.Cast<byte, int>(rowOffsets.bytes);
        var b = bias is null ? ReadOnlySpan<float>.Empty : MemoryMarshal.Cast<byte, float>(bias.bytes);
        var xs = MemoryMarshal.Cast<byte, float>(x.bytes);
        var ys = MemoryMarshal.Cast<byte, float>(y.bytes);
        if (columns.dtype == int16)
        {
            CsrKernel.Multiply(v, MemoryMarshal.Cast<byte, ushort>(columns.bytes), r, b, xs, (int)batch, (int)InFeatures, ys);
        }
        else
        {
            CsrKernel.Multiply(v, MemoryMarshal.Cast<byte, int>(columns.bytes), r, b, xs, (int)batch, (int)InFeatures, ys);
        }

        return y.reshape([.. leading, OutFeatures]).MoveToOuterDisposeScope();
    }
}
