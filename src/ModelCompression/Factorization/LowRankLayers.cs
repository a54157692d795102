using ModelCompression.Metrics;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Factorization;

/// <summary>Two layers in sequence that stand for one factorized layer: the parts both low-rank layers share.</summary>
public abstract class LowRankLayer : nn.Module<Tensor, Tensor>, ICompressedLayer
{
    private readonly nn.Module<Tensor, Tensor> first;
    private readonly nn.Module<Tensor, Tensor> second;

    /// <summary>Initializes a new instance of the <see cref="LowRankLayer"/> class.</summary>
    /// <param name="name">The module name.</param>
    /// <param name="first">The first factor (to <paramref name="rank"/> features or channels).</param>
    /// <param name="second">The second factor.</param>
    /// <param name="rank">The rank.</param>
    private protected LowRankLayer(string name, nn.Module<Tensor, Tensor> first, nn.Module<Tensor, Tensor> second, int rank)
        : base(name)
    {
        this.first = first;
        this.second = second;
        RankValue = rank;
        RegisterComponents();
    }

    /// <inheritdoc/>
    public int WeightBits => 32;

    /// <inheritdoc/>
    public int? Rank => RankValue;

    /// <inheritdoc/>
    public long ParameterCount => parameters().Sum(p => p.numel());

    /// <inheritdoc/>
    public long NonzeroParameterCount
    {
        get
        {
            using var scope = NewDisposeScope();
            return parameters().Sum(p => p.count_nonzero().item<long>());
        }
    }

    /// <summary>Gets the first factor.</summary>
    protected internal nn.Module<Tensor, Tensor> First => first;

    /// <summary>Gets the second factor.</summary>
    protected internal nn.Module<Tensor, Tensor> Second => second;

    private int RankValue { get; }

    /// <inheritdoc/>
    public abstract long CountMacs(Tensor input, Tensor output);

    /// <inheritdoc/>
    public override Tensor forward(Tensor input) => second.call(first.call(input));

    /// <inheritdoc/>
    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            first.Dispose();
            second.Dispose();
        }

        base.Dispose(disposing);
    }
}

/// <summary>
/// A Linear layer factorized as two: <c>in → rank</c> (no bias) then <c>rank → out</c> (with the original bias), from
/// the truncated SVD of its weight with the singular values split evenly (√σ on each side).
/// </summary>
public sealed class LowRankLinear : LowRankLayer
{
    /// <summary>Initializes a new instance of the <see cref="LowRankLinear"/> class from its two factors.</summary>
    /// <param name="first">The <c>in → rank</c> layer.</param>
    /// <param name="second">The <c>rank → out</c> layer.</param>
    public LowRankLinear(Linear first, Linear second)
        : base(nameof(LowRankLinear), first ?? throw new ArgumentNullException(nameof(first)), second ?? throw new ArgumentNullException(nameof(second)), (int)first.out_features)
    {
        if (first.out_features != second.in_features)
        {
            throw new ArgumentException($"The factors do not chain: {first.out_features} outputs into {second.in_features} inputs.", nameof(second));
        }

        InFeatures = first.in_features;
        OutFeatures = second.out_features;
    }

    /// <summary>Builds the rank-<paramref name="rank"/> factorization of a Linear layer from its truncated SVD (the layer is not changed).</summary>
    /// <param name="linear">The layer.</param>
    /// <param name="rank">The rank, 1 to min(in, out); the full rank reproduces the layer.</param>
    /// <returns>The factorized layer.</returns>
    public static LowRankLinear FromLinear(Linear linear, int rank)
    {
        ArgumentNullException.ThrowIfNull(linear);
        return (LowRankLinear)SvdFactorizationStep.FactorizeLayer(linear, rank, ConvDecomposition.Channel);
    }

    /// <summary>Gets the number of input features.</summary>
    public long InFeatures { get; }

    /// <summary>Gets the number of output features.</summary>
    public long OutFeatures { get; }

    /// <inheritdoc/>
    public override long CountMacs(Tensor input, Tensor output) => output.numel() / OutFeatures * Rank!.Value * (InFeatures + OutFeatures);
}

/// <summary>How a Conv2d layer is split in two.</summary>
public enum ConvDecomposition
{
    /// <summary>A k×k convolution to <c>rank</c> channels, then a 1×1 convolution to the original outputs (SVD of the weight as [out, in·k·k]).</summary>
    Channel,

    /// <summary>A k×1 convolution to <c>rank</c> channels, then a 1×k convolution to the outputs (SVD of the weight as [in·kh, out·kw]; Jaderberg et al. 2014).</summary>
    Spatial,
}

/// <summary>A Conv2d layer factorized into two convolutions (see <see cref="ConvDecomposition"/>).</summary>
public sealed class LowRankConv2d : LowRankLayer
{
    /// <summary>Initializes a new instance of the <see cref="LowRankConv2d"/> class from its two factors.</summary>
    /// <param name="first">The first convolution (to <c>rank</c> channels).</param>
    /// <param name="second">The second convolution (to the original outputs).</param>
    /// <param name="decomposition">Which decomposition the factors come from.</param>
    public LowRankConv2d(Conv2d first, Conv2d second, ConvDecomposition decomposition)
        : base(nameof(LowRankConv2d), first ?? throw new ArgumentNullException(nameof(first)), second ?? throw new ArgumentNullException(nameof(second)), (int)first.out_channels)
    {
        if (first.out_channels != second.in_channels)
        {
            throw new ArgumentException($"The factors do not chain: {first.out_channels} channels into {second.in_channels}.", nameof(second));
        }

        Decomposition = decomposition;
    }

    /// <summary>Builds the rank-<paramref name="rank"/> factorization of a Conv2d layer from its truncated SVD (the layer is not changed).</summary>
    /// <param name="conv">The layer (groups = 1).</param>
    /// <param name="rank">The rank, 1 to the full rank of the reshaped weight; the full rank reproduces the layer.</param>
    /// <param name="decomposition">Channel (k×k then 1×1) or spatial (k×1 then 1×k).</param>
    /// <returns>The factorized layer.</returns>
    public static LowRankConv2d FromConv2d(Conv2d conv, int rank, ConvDecomposition decomposition = ConvDecomposition.Channel)
    {
        ArgumentNullException.ThrowIfNull(conv);
        return (LowRankConv2d)SvdFactorizationStep.FactorizeLayer(conv, rank, decomposition);
    }

    /// <summary>Gets the decomposition.</summary>
    public ConvDecomposition Decomposition { get; }

    /// <inheritdoc/>
    public override long CountMacs(Tensor input, Tensor output)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var middle = First.call(input);
        return ModelMetrics.LayerMacs((nn.Module)First, input, middle) + ModelMetrics.LayerMacs((nn.Module)Second, middle, output);
    }
}
