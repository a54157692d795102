using ModelCompression.Architecture;
using ModelCompression.Clustering;
using ModelCompression.Factorization;
using ModelCompression.Pruning;
using ModelCompression.Quantization;
using ModelCompression.Quantization.Kernels;
using ModelCompression.Samples;
using ModelCompression.Serialization;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Serialization;

/// <summary>Small models that together hold every module kind the file format stores, with an input for each.</summary>
internal static class SerializationModels
{
    public const string ResidualBlockType = "ModelCompression.Samples.ResidualBlock";

    public static IEnumerable<string> Names =>
        ["dense", "cnn", "norms", "sparse", "quantized", "quantized-conv", "quantized-embedding", "lowrank", "half", "clustered", "blocks", "custom"];

    public static (nn.Module<Tensor, Tensor> Model, Tensor Input) Create(string name)
    {
        torch.random.manual_seed(name.Length * 7919);
        nn.Module<Tensor, Tensor> model = name switch
        {
            "dense" => nn.Sequential(
                ("flatten", nn.Flatten()), ("fc1", nn.Linear(12, 16)), ("relu", nn.ReLU()), ("drop", nn.Dropout(0.1)),
                ("fc2", nn.Linear(16, 5, hasBias: false)), ("leaky", nn.LeakyReLU(0.2)), ("softmax", nn.Softmax(1))),
            "cnn" => nn.Sequential(
                ("conv1", nn.Conv2d(3, 8, (3, 3), (2, 2), (1, 1), (1, 1), PaddingModes.Zeros, 1, false)),
                ("bn", Trained(nn.BatchNorm2d(8), [4, 8, 8, 8])),
                ("relu6", nn.ReLU6()),
                ("pool", nn.MaxPool2d((3, 3), (2, 2), (1, 1), (1, 1), true)),
                ("conv2", nn.Conv2d(8, 8, (3, 3), (1, 1), (2, 2), (2, 2), PaddingModes.Zeros, 4, true)),
                ("silu", nn.SiLU()),
                ("avg", nn.AvgPool2d((2, 2), (1, 1), (0, 0), false, true, null)),
                ("gap", nn.AdaptiveAvgPool2d(1)),
                ("flatten", nn.Flatten()),
                ("fc", nn.Linear(8, 4)),
                ("hswish", nn.Hardswish()),
                ("tanh", nn.Tanh())),
            "norms" => nn.Sequential(
                ("fc1", nn.Linear(6, 6)), ("bn", Trained(nn.BatchNorm1d(6), [16, 6])), ("gelu", nn.GELU()),
                ("ln", RandomLayerNorm(6)), ("sigmoid", nn.Sigmoid()), ("id", nn.Identity()), ("fc2", nn.Linear(6, 3))),
            "sparse" => nn.Sequential(
                ("sparse", SparseLinear.FromLinear(Pruned(nn.Linear(40, 30), 0.8))), ("relu", nn.ReLU()),
                ("pruned", Pruned(nn.Linear(30, 10), 0.5))),
            "quantized" => nn.Sequential(
                ("int8", QuantizedLinear.FromLinear(nn.Linear(20, 16))),
                ("relu", nn.ReLU()),
                ("int4", QuantizedLinear.FromLinear(nn.Linear(16, 16), bits: 4, granularity: QuantizationGranularity.PerGroup(8), weightOnly: true)),
                ("binary", QuantizedLinear.Create(nn.Linear(16, 8), 1, QuantizationGranularity.PerChannel, new ActivationSettings(ActivationMode.PerRow, 0, 0, false), false, QuantizationMode.DynamicInt8)),
                ("static", QuantizedLinear.Create(nn.Linear(8, 4, hasBias: false), 8, QuantizationGranularity.PerTensor, new ActivationSettings(ActivationMode.Static, 0.05f, 64, false), true, QuantizationMode.StaticInt8))),
            "quantized-conv" => nn.Sequential(
                ("conv", QuantizedConv2d.Create(nn.Conv2d(3, 6, 3, padding: 1), 8, QuantizationGranularity.PerChannel, new ActivationSettings(ActivationMode.Static, 0.04f, 60, false), true, QuantizationMode.StaticInt8)),
                ("conv2", QuantizedConv2d.Create(nn.Conv2d(6, 4, 3, stride: 2), 8, QuantizationGranularity.PerChannel, new ActivationSettings(ActivationMode.PerRow, 0, 0, false), false, QuantizationMode.DynamicInt8)),
                ("flatten", nn.Flatten()),
                ("fc", nn.Linear(4 * 3 * 3, 5))),
            "quantized-embedding" => nn.Sequential(
                ("embedding", QuantizedEmbedding.FromEmbedding(nn.Embedding(30, 12), bits: 4, QuantizationGranularity.PerGroup(8))),
                ("flatten", nn.Flatten()),
                ("fc", QuantizedLinear.FromLinear(nn.Linear(36, 4)))),
            "lowrank" => nn.Sequential(
                ("conv", LowRankConv2d.FromConv2d(nn.Conv2d(3, 6, 3, padding: 1), 2, ConvDecomposition.Spatial)),
                ("conv1x1", LowRankConv2d.FromConv2d(nn.Conv2d(6, 6, 3, padding: 1), 3)),
                ("flatten", nn.Flatten()),
                ("fc", LowRankLinear.FromLinear(nn.Linear(6 * 8 * 8, 10), 3))),
            "half" => nn.Sequential(
                ("fp16", new HalfPrecisionLayer(nn.Linear(10, 8), ScalarType.Float16)),
                ("relu", nn.ReLU()),
                ("bf16", new HalfPrecisionLayer(nn.Linear(8, 4), ScalarType.BFloat16))),
            "clustered" => nn.Sequential(
                ("conv", new ClusteredLayer(Shared(nn.Conv2d(2, 4, 3), 6))),
                ("flatten", nn.Flatten()),
                ("fc", new ClusteredLayer(Shared(nn.Linear(4 * 6 * 6, 20), 16))),
                ("relu", nn.ReLU()),
                ("sparse", new ClusteredLayer(SparseLinear.FromLinear(Shared(nn.Linear(20, 7), 5))))),
            "blocks" => nn.Sequential(
                ("dw", new DepthwiseSeparableConv2d(3, 8, 3)),
                ("ir1", new InvertedResidual(8, 8, 1, 2, squeezeExcitation: 0.25)),
                ("ir2", new InvertedResidual(8, 12, 2, 3)),
                ("gap", nn.AdaptiveAvgPool2d(1)),
                ("flatten", nn.Flatten()),
                ("fc", nn.Linear(12, 3))),
            "custom" => ModelZoo.Create(ZooModel.SmallResNet, 3),
            _ => throw new ArgumentException(name, nameof(name)),
        };

        if (name == "blocks")
        {
            // Give every BatchNorm running statistics of its own, then evaluate.
            model.train();
            using var noGrad = no_grad();
            for (int i = 0; i < 3; i++)
            {
                model.call(randn(4, 3, 16, 16)).Dispose();
            }
        }

        model.eval();
        var input = name switch
        {
            "dense" => randn(3, 12),
            "cnn" or "blocks" => randn(2, 3, 16, 16),
            "norms" => randn(4, 6),
            "sparse" => randn(3, 40),
            "quantized" => randn(3, 20),
            "quantized-conv" or "lowrank" => randn(2, 3, 8, 8),
            "half" => randn(3, 10),
            "quantized-embedding" => randint(0, 30, [2, 3], dtype: ScalarType.Int64),
            "clustered" => randn(2, 2, 8, 8),
            _ => randn(2, 1, 28, 28),
        };
        return (model, input);
    }

    /// <summary>A valid file of every model in <see cref="Names"/>, as Save writes it (the fuzzers' starting points).</summary>
    public static List<(string Name, byte[] Bytes)> SavedFiles() => Names.Select(name =>
    {
        var (model, input) = Create(name);
        using var _ = model;
        input.Dispose();
        using var stream = new MemoryStream();
        CompressedModel.Save(model, stream);
        return (name, stream.ToArray());
    }).ToList();

    /// <summary>Load options that build the zoo's residual block, the one custom module among these models.</summary>
    public static CompressedModelLoadOptions LoadOptions()
    {
        var options = new CompressedModelLoadOptions();
        options.ModuleFactories[ResidualBlockType] = () => new ResidualBlock(1);
        return options;
    }

    private static T Trained<T>(T norm, long[] shape)
        where T : nn.Module<Tensor, Tensor>
    {
        norm.train();
        using var noGrad = no_grad();
        for (int i = 0; i < 3; i++)
        {
            norm.call(randn(shape) * 2 + 1).Dispose();
        }

        foreach (var p in norm.parameters())
        {
            p.uniform_(-1, 1);
        }

        return norm;
    }

    private static LayerNorm RandomLayerNorm(long features)
    {
        var ln = nn.LayerNorm([features]);
        using var noGrad = no_grad();
        ln.weight!.uniform_(0.5, 1.5);
        ln.bias!.uniform_(-0.5, 0.5);
        return ln;
    }

    private static T Pruned<T>(T layer, double sparsity)
        where T : nn.Module<Tensor, Tensor>
    {
        using var noGrad = no_grad();
        var weight = layer.named_parameters(recurse: false).First(p => p.name == "weight").parameter;
        using var mask = rand(weight.shape).ge(sparsity);
        weight.mul_(mask);
        return layer;
    }

    /// <summary>Makes a layer's weights take <paramref name="values"/> shared non-zero values, with about a third zero.</summary>
    private static T Shared<T>(T layer, int values)
        where T : nn.Module<Tensor, Tensor>
    {
        using var noGrad = no_grad();
        var weight = layer.named_parameters(recurse: false).First(p => p.name == "weight").parameter;
        using var book = randn(values);
        using var choice = randint(0, values, weight.shape);
        using var shared = book.index_select(0, choice.flatten()).reshape(weight.shape);
        using var keep = rand(weight.shape).ge(0.33);
        weight.copy_(shared * keep);
        return layer;
    }
}
