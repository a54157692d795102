using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Samples;

/// <summary>The models of the zoo.</summary>
public enum ZooModel
{
    /// <summary>LeNet-300-100 (LeCun et al. 1998): 784-300-100-10 fully connected, 266,610 parameters. Flat or image input.</summary>
    LeNet300100,

    /// <summary>LeNet-5: two 5×5 convolutions (6 and 16 filters) and 120-84-10 fully connected, 61,706 parameters. Image input.</summary>
    LeNet5,

    /// <summary>A small CNN with BatchNorm and one residual block (16 and 32 channels). Image input.</summary>
    SmallResNet,
}

/// <summary>Creates the zoo's models, initialised from a seed.</summary>
public static class ModelZoo
{
    /// <summary>Gets the report name of a zoo model (e.g. <c>LeNet-300-100</c>).</summary>
    /// <param name="model">The model.</param>
    /// <returns>The display name.</returns>
    public static string DisplayName(ZooModel model) => model switch
    {
        ZooModel.LeNet300100 => "LeNet-300-100",
        ZooModel.LeNet5 => "LeNet-5",
        ZooModel.SmallResNet => "SmallResNet",
        _ => throw new ArgumentOutOfRangeException(nameof(model), model, "Unknown zoo model."),
    };

    /// <summary>Gets the input layout a zoo model expects.</summary>
    /// <param name="model">The model.</param>
    /// <returns>The layout.</returns>
    public static MnistLayout Layout(ZooModel model) => model == ZooModel.LeNet300100 ? MnistLayout.Flat : MnistLayout.Image;

    /// <summary>Creates a zoo model with weights initialised from <paramref name="seed"/>.</summary>
    /// <param name="model">The model.</param>
    /// <param name="seed">The seed of the initialisation.</param>
    /// <returns>A new model in training mode.</returns>
    public static nn.Module<Tensor, Tensor> Create(ZooModel model, int seed = 0)
    {
        torch.random.manual_seed(seed);
        return model switch
        {
            ZooModel.LeNet300100 => LeNet300100(),
            ZooModel.LeNet5 => LeNet5(),
            ZooModel.SmallResNet => SmallResNet(),
            _ => throw new ArgumentOutOfRangeException(nameof(model), model, "Unknown zoo model."),
        };
    }

    /// <summary>Creates a fully connected network 784 → hidden… → 10 with ReLU, and dropout after each hidden layer when <paramref name="dropout"/> &gt; 0.</summary>
    /// <param name="hidden">The hidden layer widths, e.g. [1200, 1200].</param>
    /// <param name="dropout">The dropout probability, 0 to below 1. The default is 0.</param>
    /// <param name="seed">The seed of the initialisation.</param>
    /// <returns>A new model whose layers are named fc1, fc2, … and relu1, drop1, ….</returns>
    public static Sequential Mlp(IReadOnlyList<int> hidden, double dropout = 0, int seed = 0)
    {
        ArgumentNullException.ThrowIfNull(hidden);
        ArgumentOutOfRangeException.ThrowIfNegative(dropout);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(dropout, 1);
        torch.random.manual_seed(seed);
        var layers = new List<(string, nn.Module<Tensor, Tensor>)> { ("flatten", nn.Flatten()) };
        long width = 784;
        for (int i = 0; i < hidden.Count; i++)
        {
            layers.Add(($"fc{i + 1}", nn.Linear(width, hidden[i])));
            layers.Add(($"relu{i + 1}", nn.ReLU()));
            if (dropout > 0)
            {
                layers.Add(($"drop{i + 1}", nn.Dropout(dropout)));
            }

            width = hidden[i];
        }

        layers.Add(($"fc{hidden.Count + 1}", nn.Linear(width, 10)));
        return nn.Sequential(layers.ToArray());
    }

    /// <summary>Creates LeNet-300-100: flatten, 784→300, ReLU, 300→100, ReLU, 100→10.</summary>
    /// <returns>A new model.</returns>
    public static Sequential LeNet300100() => nn.Sequential(
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(784, 300)),
        ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(300, 100)),
        ("relu2", nn.ReLU()),
        ("fc3", nn.Linear(100, 10)));

    /// <summary>Creates LeNet-5 for 1×28×28 inputs (the first convolution pads by 2, as for the original 32×32 inputs).</summary>
    /// <returns>A new model.</returns>
    public static Sequential LeNet5() => nn.Sequential(
        ("conv1", nn.Conv2d(1, 6, 5, padding: 2)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(6, 16, 5)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(400, 120)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(120, 84)),
        ("relu4", nn.ReLU()),
        ("fc3", nn.Linear(84, 10)));

    /// <summary>
    /// Creates a small CNN with BatchNorm and one residual block: conv 3×3 (16) + BN + ReLU, max-pool, a residual block
    /// of two 3×3 convs (16) with BN, conv 3×3 stride 2 (32) + BN + ReLU, global average pool, 32→10.
    /// </summary>
    /// <returns>A new model.</returns>
    public static Sequential SmallResNet() => nn.Sequential(
        ("conv1", nn.Conv2d(1, 16, 3, padding: 1, bias: false)),
        ("bn1", nn.BatchNorm2d(16)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("block", new ResidualBlock(16)),
        ("conv2", nn.Conv2d(16, 32, 3, stride: 2, padding: 1, bias: false)),
        ("bn2", nn.BatchNorm2d(32)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(32, 10)));
}

/// <summary>
/// A residual block: conv 3×3 + BN + ReLU + conv 3×3 + BN, added to its input, then ReLU (He et al. 2016).
/// Its children are typed <c>Module&lt;Tensor, Tensor&gt;</c> so compression steps can replace them.
/// </summary>
public sealed class ResidualBlock : nn.Module<Tensor, Tensor>
{
    private nn.Module<Tensor, Tensor> conv1;
    private nn.Module<Tensor, Tensor> bn1;
    private nn.Module<Tensor, Tensor> relu1;
    private nn.Module<Tensor, Tensor> conv2;
    private nn.Module<Tensor, Tensor> bn2;
    private nn.Module<Tensor, Tensor> relu2;

    /// <summary>Initializes a new instance of the <see cref="ResidualBlock"/> class.</summary>
    /// <param name="channels">The input and output channels.</param>
    public ResidualBlock(long channels)
        : base(nameof(ResidualBlock))
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(channels, 1);
        conv1 = nn.Conv2d(channels, channels, 3, padding: 1, bias: false);
        bn1 = nn.BatchNorm2d(channels);
        relu1 = nn.ReLU();
        conv2 = nn.Conv2d(channels, channels, 3, padding: 1, bias: false);
        bn2 = nn.BatchNorm2d(channels);
        relu2 = nn.ReLU();
        RegisterComponents();
    }

    /// <inheritdoc/>
    public override Tensor forward(Tensor input)
    {
        using var scope = NewDisposeScope();
        var x = relu1.call(bn1.call(conv1.call(input)));
        x = bn2.call(conv2.call(x));
        return relu2.call(x.Plus(input)).MoveToOuterDisposeScope();
    }

    /// <inheritdoc/>
    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            conv1.Dispose();
            bn1.Dispose();
            relu1.Dispose();
            conv2.Dispose();
            bn2.Dispose();
            relu2.Dispose();
        }

        base.Dispose(disposing);
    }
}
