using ModelCompression.Metrics;
using ModelCompression.Pruning;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Clustering;

/// <summary>
/// A layer whose non-zero weights share a small codebook (weight sharing, Han et al. 2016): every non-zero weight of
/// the wrapped <see cref="Linear"/>, <see cref="Conv2d"/> or <see cref="SparseLinear"/> equals one of
/// <see cref="Codebook"/>'s values, so the compressed file stores the codebook and one ⌈log2 k⌉-bit index per weight
/// (entropy coded). It runs the wrapped layer unchanged: the saving is in storage, and the speed is the inner layer's.
/// </summary>
public sealed class ClusteredLayer : nn.Module<Tensor, Tensor>, ICompressedLayer
{
    private readonly nn.Module<Tensor, Tensor> inner;

    /// <summary>Initializes a new instance of the <see cref="ClusteredLayer"/> class around a layer whose weights already take few values.</summary>
    /// <param name="layer">A <see cref="Linear"/>, <see cref="Conv2d"/> or <see cref="SparseLinear"/>; becomes this layer's child.</param>
    /// <exception cref="ArgumentException">The layer is of another type, or its non-zero weights take more than 65,536 distinct values.</exception>
    public ClusteredLayer(nn.Module<Tensor, Tensor> layer)
        : base(nameof(ClusteredLayer))
    {
        ArgumentNullException.ThrowIfNull(layer);
        using (var weight = DenseWeight(layer))
        using (NewDisposeScope())
        {
            var values = weight.detach().to(ScalarType.Float32).cpu().flatten().data<float>().ToArray();
            var distinct = new SortedSet<float>(values.Where(v => v != 0));
            if (distinct.Count > 65536)
            {
                throw new ArgumentException($"The layer's non-zero weights take {distinct.Count} distinct values; a clustered layer holds at most 65,536.", nameof(layer));
            }

            Codebook = [.. distinct];
        }

        inner = layer;
        RegisterComponents();
    }

    /// <summary>Gets the shared values of the non-zero weights, ascending.</summary>
    public IReadOnlyList<float> Codebook { get; }

    /// <summary>Gets the wrapped layer.</summary>
    public nn.Module<Tensor, Tensor> Inner => inner;

    /// <inheritdoc/>
    /// <remarks>The bits of one codebook index, ⌈log2 k⌉ (at least 1), before entropy coding.</remarks>
    public int WeightBits => Math.Max(1, Serialization.SymbolStream.BitsFor(Codebook.Count));

    /// <inheritdoc/>
    public int? Rank => null;

    /// <inheritdoc/>
    public long ParameterCount => inner is ICompressedLayer c ? c.ParameterCount : inner.parameters().Sum(p => p.numel());

    /// <inheritdoc/>
    public long NonzeroParameterCount
    {
        get
        {
            if (inner is ICompressedLayer c)
            {
                return c.NonzeroParameterCount;
            }

            using var scope = NewDisposeScope();
            return inner.parameters().Sum(p => p.count_nonzero().item<long>());
        }
    }

    /// <inheritdoc/>
    public long CountMacs(Tensor input, Tensor output) => ModelMetrics.LayerMacs(inner, input, output);

    /// <inheritdoc/>
    public override Tensor forward(Tensor input) => inner.call(input);

    /// <summary>Returns the dense weight of a layer this class can wrap.</summary>
    internal static Tensor DenseWeight(nn.Module layer) => layer switch
    {
        Linear linear => DetachedCopy(linear.weight!),
        Conv2d conv => DetachedCopy(conv.weight!),
        SparseLinear sparse => sparse.ToDenseWeight(),
        _ => throw new ArgumentException($"A clustered layer wraps a Linear, Conv2d or SparseLinear, not a {layer.GetType().Name}.", nameof(layer)),
    };

    /// <summary>A copy of a weight outside autograd; the detached alias is disposed here, not left to the finalizer.</summary>
    private static Tensor DetachedCopy(Tensor weight)
    {
        using var alias = weight.detach();
        return alias.clone();
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
