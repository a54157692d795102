using ModelCompression.Metrics;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Factorization;

/// <summary>
/// A Linear layer factorized as two: <c>in → rank</c> (no bias) then <c>rank → out</c> (with the original bias), from
/// the truncated SVD of its weight with the singular values split evenly (√σ on each side).
/// </summary>
public sealed class LowRankLinear : nn.Module<Tensor, Tensor>, ICompressedLayer
{
    private readonly nn.Module<Tensor, Tensor> first;
    private readonly nn.Module<Tensor, Tensor> second;

    /// <summary>Initializes a new instance of the <see cref="LowRankLinear"/> class from its two factors.</summary>
    /// <param name="first">The <c>in → rank</c> layer.</param>
    /// <param name="second">The <c>rank → out</c> layer.</param>
    public LowRankLinear(Linear first, Linear second)
        : base(nameof(LowRankLinear))
    {
        ArgumentNullException.ThrowIfNull(first);
        ArgumentNullException.ThrowIfNull(second);
        if (first.out_features != second.in_features)
        {
            throw new ArgumentException($"The factors do not chain: {first.out_features} outputs into {second.in_features} inputs.", nameof(second));
        }

        InFeatures = first.in_features;
        OutFeatures = second.out_features;
        RankValue = (int)first.out_features;
        this.first = first;
        this.second = second;
        RegisterComponents();
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

    private int RankValue { get; }

    /// <inheritdoc/>
    public long CountMacs(Tensor input, Tensor output) => output.numel() / OutFeatures * RankValue * (InFeatures + OutFeatures);

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

/// <summary>How a Conv2d layer is split in two.</summary>
public enum ConvDecomposition
{
    /// <summary>A k×k convolution to <c>rank</c> channels, then a 1×1 convolution to the original outputs (SVD of the weight as [out, in·k·k]).</summary>
    Channel,

    /// <summary>A k×1 convolution to <c>rank</c> channels, then a 1×k convolution to the outputs (SVD of the weight as [in·kh, out·kw]; Jaderberg et al. 2014).</summary>
    Spatial,
}

/// <summary>A Conv2d layer factorized into two convolutions (see <see cref="ConvDecomposition"/>).</summary>
public sealed class LowRankConv2d : nn.Module<Tensor, Tensor>, ICompressedLayer
{
    private readonly nn.Module<Tensor, Tensor> first;
    private readonly nn.Module<Tensor, Tensor> second;

    /// <summary>Initializes a new instance of the <see cref="LowRankConv2d"/> class from its two factors.</summary>
    /// <param name="first">The first convolution (to <c>rank</c> channels).</param>
    /// <param name="second">The second convolution (to the original outputs).</param>
    /// <param name="decomposition">Which decomposition the factors come from.</param>
    public LowRankConv2d(Conv2d first, Conv2d second, ConvDecomposition decomposition)
        : base(nameof(LowRankConv2d))
    {
        ArgumentNullException.ThrowIfNull(first);
        ArgumentNullException.ThrowIfNull(second);
        if (first.out_channels != second.in_channels)
        {
            throw new ArgumentException($"The factors do not chain: {first.out_channels} channels into {second.in_channels}.", nameof(second));
        }

        Decomposition = decomposition;
        RankValue = (int)first.out_channels;
        this.first = first;
        this.second = second;
        RegisterComponents();
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

    private int RankValue { get; }

    /// <inheritdoc/>
    public long CountMacs(Tensor input, Tensor output)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var middle = first.call(input);
        return ModelMetrics.LayerMacs((nn.Module)first, input, middle) + ModelMetrics.LayerMacs((nn.Module)second, middle, output);
    }

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
