using ModelCompression.Data;
using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Samples;
using ModelCompression.Serialization;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Serialization;

/// <summary>
/// Every kind of file the library writes, from the layer kinds of <see cref="SerializationModels"/> and from each
/// quantization mode × granularity × bit width the post-training step produces, with random weights (no training).
/// </summary>
internal static class StepOutputs
{
    public static IEnumerable<string> Names =>
    [
        .. SerializationModels.Names,
        "ptq-dynamic-per-tensor", "ptq-dynamic-per-channel", "ptq-static-per-tensor", "ptq-static-per-channel",
        "ptq-int8-per-channel", "ptq-int8-per-group-16", "ptq-int6-per-channel",
        "ptq-int4-per-group-8", "ptq-int4-per-group-16", "ptq-int4-default", "ptq-int4-per-group-128",
        "ptq-int3-per-group-64", "ptq-int2-per-group-32", "ptq-int4-hqq", "ptq-int8-hqq-per-group-32", "ptq-int4-gptq",
        "ptq-int4-awq", "ptq-int4-awq-hqq", "ptq-int4-awq-gptq",
    ];

    /// <summary>The model (in evaluation mode), an input, and the architecture to load it into (null when the file needs none).</summary>
    public static (nn.Module<Tensor, Tensor> Model, Tensor Input, nn.Module<Tensor, Tensor>? Architecture) Create(string name)
    {
        if (!name.StartsWith("ptq-", StringComparison.Ordinal))
        {
            var (model, input) = SerializationModels.Create(name);
            return (model, input, name == "custom" ? ModelZoo.Create(ZooModel.SmallResNet) : null);
        }

        var options = name switch
        {
            "ptq-dynamic-per-tensor" => new PostTrainingQuantizationOptions { WeightGranularity = QuantizationGranularity.PerTensor },
            "ptq-dynamic-per-channel" => new PostTrainingQuantizationOptions(),
            "ptq-static-per-tensor" => new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8, WeightGranularity = QuantizationGranularity.PerTensor },
            "ptq-static-per-channel" => new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8 },
            "ptq-int8-per-channel" => new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt8 },
            "ptq-int8-per-group-16" => WeightOnly(8, 16),
            "ptq-int6-per-channel" => new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt8, WeightBits = 6 },
            "ptq-int4-per-group-8" => WeightOnly(4, 8),
            "ptq-int4-per-group-16" => WeightOnly(4, 16),
            "ptq-int4-default" => new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4 },
            "ptq-int4-per-group-128" => WeightOnly(4, 128),
            "ptq-int3-per-group-64" => WeightOnly(3, 64),
            "ptq-int2-per-group-32" => WeightOnly(2, 32),
            "ptq-int4-hqq" => new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, Rounding = WeightRounding.Hqq(iterations: 5) },
            "ptq-int8-hqq-per-group-32" => WeightOnly(8, 32, WeightRounding.Hqq(iterations: 5)),
            "ptq-int4-gptq" => new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, Rounding = WeightRounding.Gptq() },
            "ptq-int4-awq" => new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, Awq = new AwqOptions() },
            "ptq-int4-awq-hqq" => new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, Awq = new AwqOptions(), Rounding = WeightRounding.Hqq(iterations: 5) },
            "ptq-int4-awq-gptq" => new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, Awq = new AwqOptions(), Rounding = WeightRounding.Gptq() },
            _ => throw new ArgumentException(name, nameof(name)),
        };
        options.CalibrationBatches = 1;
        options.CalibrationBatchSize = 8;
        return (Quantized(ModelZoo.Create(ZooModel.LeNet5, 5), [8, 1, 28, 28], options), randn(3, 1, 28, 28), null);
    }

    /// <summary>Quantizes <paramref name="original"/> (which it disposes) with random calibration data of <paramref name="shape"/>.</summary>
    public static nn.Module<Tensor, Tensor> Quantized(nn.Module<Tensor, Tensor> original, long[] shape, PostTrainingQuantizationOptions options)
    {
        using var _ = original;
        original.eval();
        using var data = new TensorDataset(randn(shape), zeros(shape[0], dtype: int64));
        var context = new CompressionContext(new CompressionData(data, data), original);
        var quantized = new PostTrainingQuantizationStep(options).Apply(ModuleCloner.DeepClone(original), context);
        quantized.eval();
        return quantized;
    }

    private static PostTrainingQuantizationOptions WeightOnly(int bits, int group, WeightRounding? rounding = null) => new()
    {
        Mode = bits <= 4 ? QuantizationMode.WeightOnlyInt4 : QuantizationMode.WeightOnlyInt8,
        WeightBits = bits,
        WeightGranularity = QuantizationGranularity.PerGroup(group),
        Rounding = rounding ?? WeightRounding.Nearest,
    };
}

[TestFixture]
public sealed class StepOutputFileTests
{
    private string directory = string.Empty;

    [SetUp]
    public void SetUp()
    {
        directory = Path.Combine(Path.GetTempPath(), "mc-steps-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(directory);
    }

    [TearDown]
    public void TearDown() => Directory.Delete(directory, recursive: true);

    private static IEnumerable<string> Kinds => StepOutputs.Names;

    [TestCaseSource(nameof(Kinds))]
    public void Load_PathSeekableAndNonSeekableStream_SameModelBitForBit(string kind)
    {
        var (model, input, architecture) = StepOutputs.Create(kind);
        using var _m = model;
        using var _i = input;
        using var _a = architecture;
        AssertPathAndStreamLoadsAgree(model, input, architecture, Path.Combine(directory, kind + ".mcmf"));
    }

    [Test]
    public void SaveLoad_TorchVisionMobileNetV2Int4PerGroup_LoadsFromPathAndStreams()
    {
        // Issue 24: an int4 MobileNetV2 saved and Load refused its file (its first convolution has 27 inputs and its
        // depthwise ones 9, fewer than the group of 64: the writer stored group 64, which the reader refused).
        using var model = StepOutputs.Quantized(torchvision.models.mobilenet_v2(num_classes: 10), [4, 3, 32, 32], new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4 });
        using var architecture = torchvision.models.mobilenet_v2(num_classes: 10);
        using var input = randn(2, 3, 32, 32);
        Assert.That(model.modules().OfType<QuantizedConv2d>().Count(), Is.GreaterThan(30));
        AssertPathAndStreamLoadsAgree(model, input, architecture, Path.Combine(directory, "mobilenet_v2-int4.mcmf"));
    }

    private static void AssertPathAndStreamLoadsAgree(nn.Module<Tensor, Tensor> model, Tensor input, nn.Module<Tensor, Tensor>? architecture, string path)
    {
        var options = SerializationModels.LoadOptions();
        CompressedModel.Save(model, path);
        var bytes = File.ReadAllBytes(path);
        var expected = TestModels.Output(model, input);
        var byPath = Outputs(architecture is null ? CompressedModel.Load(path, options) : CompressedModel.Load(path, architecture, options), input);
        var bySeekable = Outputs(CompressedModel.Load(new MemoryStream(bytes), architecture, options), input);
        var byPipe = Outputs(CompressedModel.Load(new NonSeekableStream(new MemoryStream(bytes)), architecture, options), input);
        Assert.That(Bits(byPath.Output), Is.EqualTo(Bits(expected)), "path load == the saved model");
        Assert.That(Bits(bySeekable.Output), Is.EqualTo(Bits(byPath.Output)), "seekable stream == path");
        Assert.That(Bits(byPipe.Output), Is.EqualTo(Bits(byPath.Output)), "non-seekable stream == path");
        Assert.That(bySeekable.State, Is.EqualTo(byPath.State));
        Assert.That(byPipe.State, Is.EqualTo(byPath.State));
    }

    private static (float[] Output, string State) Outputs(nn.Module<Tensor, Tensor> loaded, Tensor input)
    {
        using var _ = loaded;
        return (TestModels.Output(loaded, input), TestModels.StateHash(loaded));
    }

    private static int[] Bits(float[] values) => values.Select(BitConverter.SingleToInt32Bits).ToArray();
}
