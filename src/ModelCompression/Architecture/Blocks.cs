using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Architecture;

/// <summary>The activations the efficient blocks can use.</summary>
public enum BlockActivation
{
    /// <summary>No activation (a linear block).</summary>
    None,

    /// <summary>ReLU.</summary>
    ReLU,

    /// <summary>ReLU6, as in MobileNet v1/v2.</summary>
    ReLU6,

    /// <summary>SiLU (swish), as in EfficientNet.</summary>
    SiLU,
}

/// <summary>Shared pieces of the blocks.</summary>
internal static class BlockParts
{
    public static nn.Module<Tensor, Tensor> Activation(BlockActivation activation) => activation switch
    {
        BlockActivation.None => nn.Identity(),
        BlockActivation.ReLU => nn.ReLU(),
        BlockActivation.ReLU6 => nn.ReLU6(),
        BlockActivation.SiLU => nn.SiLU(),
        _ => throw new ArgumentOutOfRangeException(nameof(activation), activation, "Unknown activation."),
    };

    public static nn.Module<Tensor, Tensor> Norm(long channels, bool batchNorm) => batchNorm ? nn.BatchNorm2d(channels) : nn.Identity();
}

/// <summary>
/// A depthwise-separable convolution (Howard et al. 2017, MobileNet): a k×k depthwise convolution (one filter per input
/// channel) followed by a 1×1 pointwise convolution, each optionally with BatchNorm and an activation. It costs
/// in·k² + in·out multiply-accumulates per output position against in·out·k² for a standard convolution.
/// </summary>
public sealed class DepthwiseSeparableConv2d : nn.Module<Tensor, Tensor>
{
    private readonly Conv2d depthwise;
    private readonly nn.Module<Tensor, Tensor> depthwiseNorm;
    private readonly nn.Module<Tensor, Tensor> depthwiseActivation;
    private readonly Conv2d pointwise;
    private readonly nn.Module<Tensor, Tensor> pointwiseNorm;
    private readonly nn.Module<Tensor, Tensor> pointwiseActivation;

    /// <summary>Initializes a new instance of the <see cref="DepthwiseSeparableConv2d"/> class.</summary>
    /// <param name="inChannels">The input channels.</param>
    /// <param name="outChannels">The output channels.</param>
    /// <param name="kernelSize">The depthwise kernel size k.</param>
    /// <param name="stride">The depthwise stride. The default is 1.</param>
    /// <param name="padding">The depthwise padding. The default is k / 2 ("same" for odd k at stride 1).</param>
    /// <param name="dilation">The depthwise dilation. The default is 1.</param>
    /// <param name="batchNorm">Whether each stage has BatchNorm (then its convolution has no bias). The default is <see langword="true"/>.</param>
    /// <param name="activation">The activation after each stage. The default is ReLU.</param>
    /// <param name="pointwiseBias">Whether the pointwise convolution has a bias when there is no BatchNorm. The default is <see langword="true"/>.</param>
    public DepthwiseSeparableConv2d(
        long inChannels, long outChannels, long kernelSize, long stride = 1, long? padding = null, long dilation = 1,
        bool batchNorm = true, BlockActivation activation = BlockActivation.ReLU, bool pointwiseBias = true)
        : this(inChannels, outChannels, (kernelSize, kernelSize), (stride, stride), (padding ?? (kernelSize / 2), padding ?? (kernelSize / 2)), (dilation, dilation), batchNorm, activation, pointwiseBias)
    {
    }

    /// <summary>Initializes a new instance of the <see cref="DepthwiseSeparableConv2d"/> class with per-dimension sizes.</summary>
    /// <param name="inChannels">The input channels.</param>
    /// <param name="outChannels">The output channels.</param>
    /// <param name="kernelSize">The depthwise kernel size (height, width).</param>
    /// <param name="stride">The depthwise stride.</param>
    /// <param name="padding">The depthwise padding.</param>
    /// <param name="dilation">The depthwise dilation.</param>
    /// <param name="batchNorm">Whether each stage has BatchNorm.</param>
    /// <param name="activation">The activation after each stage.</param>
    /// <param name="pointwiseBias">Whether the pointwise convolution has a bias when there is no BatchNorm.</param>
    public DepthwiseSeparableConv2d(
        long inChannels, long outChannels, (long, long) kernelSize, (long, long) stride, (long, long) padding, (long, long) dilation,
        bool batchNorm, BlockActivation activation, bool pointwiseBias)
        : base(nameof(DepthwiseSeparableConv2d))
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(inChannels, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(outChannels, 1);
        // Without BatchNorm or an activation between the two convolutions, a depthwise bias would fold into the
        // pointwise one: it is left out.
        depthwise = nn.Conv2d(inChannels, inChannels, kernelSize, stride, padding, dilation, PaddingModes.Zeros, inChannels, bias: !batchNorm && activation != BlockActivation.None);
        depthwiseNorm = BlockParts.Norm(inChannels, batchNorm);
        depthwiseActivation = BlockParts.Activation(activation);
        pointwise = nn.Conv2d(inChannels, outChannels, 1, bias: !batchNorm && pointwiseBias);
        pointwiseNorm = BlockParts.Norm(outChannels, batchNorm);
        pointwiseActivation = BlockParts.Activation(activation);
        RegisterComponents();
    }

    /// <summary>Gets the depthwise convolution.</summary>
    public Conv2d Depthwise => depthwise;

    /// <summary>Gets the pointwise convolution.</summary>
    public Conv2d Pointwise => pointwise;

    /// <inheritdoc/>
    public override Tensor forward(Tensor input)
    {
        using var scope = NewDisposeScope();
        var x = depthwiseActivation.call(depthwiseNorm.call(depthwise.call(input)));
        return pointwiseActivation.call(pointwiseNorm.call(pointwise.call(x))).MoveToOuterDisposeScope();
    }
}

/// <summary>Squeeze-and-excitation (Hu et al. 2018): channel weights from global pooling through a bottleneck.</summary>
public sealed class SqueezeExcitation : nn.Module<Tensor, Tensor>
{
    private readonly nn.Module<Tensor, Tensor> pool;
    private readonly Conv2d reduce;
    private readonly nn.Module<Tensor, Tensor> activation;
    private readonly Conv2d expand;
    private readonly nn.Module<Tensor, Tensor> gate;

    /// <summary>Initializes a new instance of the <see cref="SqueezeExcitation"/> class.</summary>
    /// <param name="channels">The channels.</param>
    /// <param name="squeezeChannels">The bottleneck width.</param>
    public SqueezeExcitation(long channels, long squeezeChannels)
        : base(nameof(SqueezeExcitation))
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(squeezeChannels, 1);
        pool = nn.AdaptiveAvgPool2d(1);
        reduce = nn.Conv2d(channels, squeezeChannels, 1);
        activation = nn.SiLU();
        expand = nn.Conv2d(squeezeChannels, channels, 1);
        gate = nn.Sigmoid();
        RegisterComponents();
    }

    /// <inheritdoc/>
    public override Tensor forward(Tensor input)
    {
        using var scope = NewDisposeScope();
        var weights = gate.call(expand.call(activation.call(reduce.call(pool.call(input)))));
        return (input * weights).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// An inverted residual block (Sandler et al. 2018, MobileNetV2): 1×1 expansion by a factor t, a k×k depthwise
/// convolution, optional squeeze-and-excitation (as in EfficientNet's MBConv), and a linear 1×1 projection, with a
/// residual connection when the stride is 1 and the channel counts match.
/// </summary>
public sealed class InvertedResidual : nn.Module<Tensor, Tensor>
{
    private readonly nn.Module<Tensor, Tensor> expand;
    private readonly nn.Module<Tensor, Tensor> expandNorm;
    private readonly nn.Module<Tensor, Tensor> expandActivation;
    private readonly Conv2d depthwise;
    private readonly nn.Module<Tensor, Tensor> depthwiseNorm;
    private readonly nn.Module<Tensor, Tensor> depthwiseActivation;
    private readonly nn.Module<Tensor, Tensor> squeeze;
    private readonly Conv2d project;
    private readonly nn.Module<Tensor, Tensor> projectNorm;

    /// <summary>Initializes a new instance of the <see cref="InvertedResidual"/> class.</summary>
    /// <param name="inChannels">The input channels.</param>
    /// <param name="outChannels">The output channels.</param>
    /// <param name="stride">The depthwise stride, 1 or 2.</param>
    /// <param name="expansion">The expansion factor t (1 skips the expansion convolution).</param>
    /// <param name="kernelSize">The depthwise kernel size. The default is 3.</param>
    /// <param name="squeezeExcitation">The squeeze ratio of an SE module (e.g. 0.25), or 0 for none. The default is 0.</param>
    /// <param name="activation">The activation. The default is ReLU6.</param>
    public InvertedResidual(long inChannels, long outChannels, long stride, long expansion, long kernelSize = 3, double squeezeExcitation = 0, BlockActivation activation = BlockActivation.ReLU6)
        : base(nameof(InvertedResidual))
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(inChannels, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(outChannels, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(expansion, 1);
        if (stride is not (1 or 2))
        {
            throw new ArgumentOutOfRangeException(nameof(stride), stride, "Must be 1 or 2.");
        }

        if (!(squeezeExcitation >= 0 && squeezeExcitation <= 1))
        {
            throw new ArgumentOutOfRangeException(nameof(squeezeExcitation), squeezeExcitation, "Must be between 0 and 1.");
        }

        long hidden = inChannels * expansion;
        bool expands = expansion != 1;
        expand = expands ? nn.Conv2d(inChannels, hidden, 1, bias: false) : nn.Identity();
        expandNorm = expands ? nn.BatchNorm2d(hidden) : nn.Identity();
        expandActivation = expands ? BlockParts.Activation(activation) : nn.Identity();
        depthwise = nn.Conv2d(hidden, hidden, kernelSize, stride: stride, padding: kernelSize / 2, groups: hidden, bias: false);
        depthwiseNorm = nn.BatchNorm2d(hidden);
        depthwiseActivation = BlockParts.Activation(activation);
        squeeze = squeezeExcitation > 0 ? new SqueezeExcitation(hidden, Math.Max(1, (long)Math.Round(inChannels * squeezeExcitation))) : nn.Identity();
        project = nn.Conv2d(hidden, outChannels, 1, bias: false);
        projectNorm = nn.BatchNorm2d(outChannels);
        UsesResidual = stride == 1 && inChannels == outChannels;
        RegisterComponents();
    }

    /// <summary>Gets whether the block adds its input to its output.</summary>
    public bool UsesResidual { get; }

    /// <inheritdoc/>
    public override Tensor forward(Tensor input)
    {
        using var scope = NewDisposeScope();
        var x = expandActivation.call(expandNorm.call(expand.call(input)));
        x = depthwiseActivation.call(depthwiseNorm.call(depthwise.call(x)));
        x = projectNorm.call(project.call(squeeze.call(x)));
        return (UsesResidual ? x.Plus(input) : x).MoveToOuterDisposeScope();
    }
}

/// <summary>A small MobileNetV2-style network for 28×28 inputs, with width and depth multipliers.</summary>
public static class MobileNet
{
    /// <summary>Creates the network: a 3×3 stem, stages of inverted residual blocks, a 1×1 head, pooling and a classifier.</summary>
    /// <param name="widthMultiplier">Scales every layer's channels (rounded to a multiple of 4). The default is 1.</param>
    /// <param name="depthMultiplier">Scales every stage's block count (rounded up). The default is 1.</param>
    /// <param name="classes">The classes. The default is 10.</param>
    /// <param name="inChannels">The input channels. The default is 1.</param>
    /// <param name="squeezeExcitation">SE ratio in every block (0 for none). The default is 0.</param>
    /// <returns>A new model.</returns>
    public static Sequential Create(double widthMultiplier = 1, double depthMultiplier = 1, long classes = 10, long inChannels = 1, double squeezeExcitation = 0)
    {
        if (!(widthMultiplier > 0) || !(depthMultiplier > 0))
        {
            throw new ArgumentOutOfRangeException(nameof(widthMultiplier), "Width and depth multipliers must be positive.");
        }

        long Width(long channels) => Math.Max(4, (long)Math.Round(channels * widthMultiplier / 4) * 4);
        // (expansion t, channels c, blocks n, stride s) per stage, sized for 28×28 digits.
        (long T, long C, long N, long S)[] stages = [(1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 1, 1)];
        var layers = new List<(string, nn.Module<Tensor, Tensor>)>
        {
            ("stem", nn.Conv2d(inChannels, Width(16), 3, padding: 1, bias: false)),
            ("stem_bn", nn.BatchNorm2d(Width(16))),
            ("stem_act", nn.ReLU6()),
        };
        long channels = Width(16);
        int index = 0;
        foreach (var (t, c, n, s) in stages)
        {
            long blocks = (long)Math.Ceiling(n * depthMultiplier);
            for (long b = 0; b < blocks; b++)
            {
                long outChannels = Width(c);
                layers.Add(($"block{index++}", new InvertedResidual(channels, outChannels, b == 0 ? s : 1, t, squeezeExcitation: squeezeExcitation)));
                channels = outChannels;
            }
        }

        layers.Add(("head", nn.Conv2d(channels, Width(128), 1, bias: false)));
        layers.Add(("head_bn", nn.BatchNorm2d(Width(128))));
        layers.Add(("head_act", nn.ReLU6()));
        layers.Add(("pool", nn.AdaptiveAvgPool2d(1)));
        layers.Add(("flatten", nn.Flatten()));
        layers.Add(("classifier", nn.Linear(Width(128), classes)));
        return nn.Sequential(layers.ToArray());
    }
}
