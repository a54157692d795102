using ModelCompression.Interop.Onnx;
using ModelCompression.Quantization;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Interop.Onnx;

/// <summary>
/// ONNX export of TorchVision 0.107.0's architectures (issue 17), which the exporter writes from their forwards: each model
/// gets random weights and random BatchNorm statistics from a fixed seed, and ONNX Runtime must agree with TorchSharp
/// within 1e-4 of the largest output.
/// </summary>
[TestFixture]
public sealed class OnnxTorchVisionTests
{
    public static IEnumerable<TestCaseData> Architectures()
    {
        TestCaseData Case(string name, Func<nn.Module<Tensor, Tensor>> build, long size, bool referenceInFloat64 = false) =>
            new TestCaseData(build, size, referenceInFloat64).SetName($"Export_{name}_MatchesOnnxRuntime");

        yield return Case("ResNet18", () => torchvision.models.resnet18(num_classes: 10), 32);
        // Bottleneck blocks with grouped convolutions.
        yield return Case("ResNeXt50", () => torchvision.models.resnext50_32x4d(num_classes: 10), 32);
        yield return Case("MobileNetV2", () => torchvision.models.mobilenet_v2(num_classes: 10), 32);
        // Squeeze-excitation, Hardswish, Hardsigmoid.
        yield return Case("MobileNetV3Small", () => torchvision.models.mobilenet_v3_small(), 32);
        // LibTorch's float32 convolution with 24 input channels is wrong on this machine (see the README's LibTorch
        // faults); float64 and ONNX Runtime agree, so GoogLeNet is compared with float64.
        yield return Case("GoogLeNet", () => torchvision.models.googlenet(num_classes: 10), 64, referenceInFloat64: true);
        yield return Case("InceptionV3", () => torchvision.models.inception_v3(num_classes: 10), 80);
        // At 64×64 the features are 1×1, which AdaptiveAvgPool2d((6, 6)) repeats: the averaging-matrix form.
        yield return Case("AlexNet", () => torchvision.models.alexnet(num_classes: 10), 64);
    }

    [TestCaseSource(nameof(Architectures))]
    public void Export_TorchVisionArchitecture_MatchesOnnxRuntime(Func<nn.Module<Tensor, Tensor>> build, long size, bool referenceInFloat64)
    {
        using var scope = NewDisposeScope();
        random.manual_seed(17);
        using var model = build();
        RandomizeStatistics(model);
        var input = randn(2, 3, size, size);
        OnnxLayerKindsTests.AssertParity(model, input, new OnnxExportOptions(), referenceInFloat64);
    }

    [Test]
    public void Export_QuantizedResNet18_MatchesTheQuantizedModelInOnnxRuntime()
    {
        // A compressed child is written as what it has become: the blocks' emitters call the exporter for each child.
        using var scope = NewDisposeScope();
        random.manual_seed(17);
        using var model = torchvision.models.resnet18(num_classes: 10);
        RandomizeStatistics(model);
        var data = new ModelCompression.Data.TensorDataset(randn(16, 3, 32, 32), randint(0, 10, [16], dtype: ScalarType.Int64));
        var result = ModelCompression.CompressionPipeline.Create()
            .AddPostTrainingQuantization(new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt8 })
            .Build()
            .Run(model, new ModelCompression.CompressionData(data, data));
        using var quantized = result.Model;
        Assert.That(quantized.modules().OfType<QuantizedConv2d>().Count(), Is.GreaterThan(10));
        // The library rounds each row of activations to 7 bits in its integer kernel, and the graph does the same in
        // float operations, so rounding ties can fall differently: within 5% after twenty quantized layers.
        var input = randn(2, 3, 32, 32);
        OnnxLayerKindsTests.AssertParity(quantized, input, new OnnxExportOptions(), tolerance: 0.05);
    }

    [TestCase(7, 7, 3, 3)]
    [TestCase(5, 6, 7, 4)]
    [TestCase(8, 8, 4, 2)]
    [TestCase(1, 1, 6, 6)]
    public void Export_AdaptiveAveragePoolToAnySize_MatchesOnnxRuntime(long height, long width, long outHeight, long outWidth)
    {
        using var scope = NewDisposeScope();
        random.manual_seed(17);
        using var model = nn.Sequential(("conv", nn.Conv2d(3, 4, 1)), ("pool", nn.AdaptiveAvgPool2d([outHeight, outWidth])), ("flatten", nn.Flatten()));
        OnnxLayerKindsTests.AssertParity(model, randn(2, 3, height, width), new OnnxExportOptions());
    }

    /// <summary>Replaces BatchNorm running statistics with random ones, so the normalisation is not the identity.</summary>
    private static void RandomizeStatistics(nn.Module model)
    {
        using var noGrad = no_grad();
        foreach (var (name, buffer) in model.named_buffers())
        {
            if (name.EndsWith("running_var", StringComparison.Ordinal))
            {
                buffer.uniform_(0.5, 2);
            }
            else if (name.EndsWith("running_mean", StringComparison.Ordinal))
            {
                buffer.normal_(0, 0.1);
            }
        }
    }
}
