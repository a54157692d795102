using TorchSharp;
using ModelCompression.Metrics;
using static TorchSharp.torch;

namespace ModelCompression.Quantization;

/// <summary>
/// A layer whose parameters are stored in a 16-bit float type. It casts its input to that type, runs the wrapped
/// layer, and casts the output back to the input's type.
/// </summary>
public sealed class HalfPrecisionLayer : nn.Module<Tensor, Tensor>, ICompressedLayer
{
    private readonly nn.Module<Tensor, Tensor> inner;

    /// <summary>Initializes a new instance of the <see cref="HalfPrecisionLayer"/> class, converting <paramref name="layer"/>'s parameters in place.</summary>
    /// <param name="layer">The layer to convert; becomes this layer's child.</param>
    /// <param name="dtype"><see cref="ScalarType.BFloat16"/> or <see cref="ScalarType.Float16"/>.</param>
    /// <exception cref="ArgumentException"><paramref name="dtype"/> is not a 16-bit float type.</exception>
    public HalfPrecisionLayer(nn.Module<Tensor, Tensor> layer, ScalarType dtype)
        : base(nameof(HalfPrecisionLayer))
    {
        ArgumentNullException.ThrowIfNull(layer);
        if (dtype is not (ScalarType.BFloat16 or ScalarType.Float16))
        {
            throw new ArgumentException($"A half-precision layer stores BFloat16 or Float16, not {dtype}.", nameof(dtype));
        }

        DType = dtype;
        inner = layer;
        inner.to(dtype);
        RegisterComponents();
    }

    /// <summary>Gets the storage type.</summary>
    public ScalarType DType { get; }

    /// <summary>Gets the wrapped layer.</summary>
    public nn.Module<Tensor, Tensor> Inner => inner;

    /// <inheritdoc/>
    public int WeightBits => 16;

    /// <inheritdoc/>
    public int? Rank => null;

    /// <inheritdoc/>
    public long ParameterCount => inner.parameters().Sum(p => p.numel());

    /// <inheritdoc/>
    public long NonzeroParameterCount
    {
        get
        {
            using var scope = NewDisposeScope();
            return inner.parameters().Sum(p => p.count_nonzero().item<long>());
        }
    }

    /// <inheritdoc/>
    public long CountMacs(Tensor input, Tensor output) => ModelMetrics.LayerMacs(inner, input, output);

    /// <inheritdoc/>
    public override Tensor forward(Tensor input)
    {
        ArgumentNullException.ThrowIfNull(input);
        using var scope = NewDisposeScope();
        var result = inner.call(input.to(DType)).to(input.dtype);
        return result.MoveToOuterDisposeScope();
    }

    /// <inheritdoc/>
    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            inner.Dispose();
        }

        base.Dispose(disposing);
    }
}
