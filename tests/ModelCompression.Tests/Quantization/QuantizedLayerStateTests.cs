using ModelCompression.Data;
using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Serialization;
using ModelCompression.Tests.Support;
using ModelCompression.Training;
using NUnit.Framework;
using TorchSharp;
using TorchSharp.Modules;
using TensorDataset = ModelCompression.Data.TensorDataset;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Quantization;

/// <summary>A quantized layer's stored tensors are the layer: what is loaded into them is what it computes.</summary>
[TestFixture]
public sealed class QuantizedLayerStateTests
{
    private static nn.Module<Tensor, Tensor> Mlp(int seed)
    {
        torch.manual_seed(seed);
        return nn.Sequential(("fc1", nn.Linear(24, 40)), ("relu", nn.ReLU()), ("fc2", nn.Linear(40, 5)));
    }

    private static nn.Module<Tensor, Tensor> Cnn(int seed)
    {
        torch.manual_seed(seed);
        return nn.Sequential(("conv", nn.Conv2d(3, 8, 3, padding: 1)), ("relu", nn.ReLU()), ("flat", nn.Flatten()), ("fc", nn.Linear(8 * 6 * 6, 4)));
    }

    private static nn.Module<Tensor, Tensor> Quantize(nn.Module<Tensor, Tensor> model, PostTrainingQuantizationOptions options, long[] inputShape)
    {
        model.eval();
        using var generator = new Generator(3);
        using var data = new TensorDataset(randn([32, .. inputShape], generator: generator), zeros(32, dtype: int64));
        var context = new CompressionContext(new CompressionData(data, data) { Evaluator = new AccuracyEvaluator() }, model);
        return new PostTrainingQuantizationStep(options).Apply(ModuleCloner.DeepClone(model), context);
    }

    private static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.equal(b).all().item<bool>();

    private static IEnumerable<TestCaseData> Schemes()
    {
        yield return new TestCaseData(new PostTrainingQuantizationOptions { Mode = QuantizationMode.DynamicInt8 }).SetName("dynamic int8");
        yield return new TestCaseData(new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, WeightGranularity = QuantizationGranularity.PerGroup(8) }).SetName("weight-only int4");
        yield return new TestCaseData(new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8 }).SetName("static int8");
    }

    [TestCaseSource(nameof(Schemes))]
    public void LoadStateDict_ChangesWhatTheKernelComputes(PostTrainingQuantizationOptions options)
    {
        using var first = Mlp(1);
        using var second = Mlp(2);
        using var a = Quantize(first, options, [24]);
        using var b = Quantize(second, options, [24]);
        using var input = randn(6, 24);
        using var before = a.call(input);
        using var expected = b.call(input);
        Assert.That(Same(before, expected), Is.False);

        a.load_state_dict(b.state_dict());

        using var after = a.call(input);
        Assert.That(Same(after, expected), Is.True, "after load_state_dict the layer computes exactly what the layer it was loaded from computes");
        Assert.That(a.modules().OfType<QuantizedLayer>().Select(l => l.SqnrDb), Is.All.Null, "the SQNR measured for the old weights no longer applies");
    }

    [Test]
    public void LoadStateDict_ConvolutionTakesTheNewWeights_AndTheFileStoresThem()
    {
        using var first = Cnn(1);
        using var second = Cnn(2);
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8 };
        using var a = Quantize(first, options, [3, 6, 6]);
        using var b = Quantize(second, options, [3, 6, 6]);
        using var input = randn(2, 3, 6, 6);
        using var expected = b.call(input);

        a.load_state_dict(b.state_dict());

        using var after = a.call(input);
        Assert.That(Same(after, expected), Is.True);
        using var stream = new MemoryStream();
        CompressedModel.Save(a, stream);
        stream.Position = 0;
        using var loaded = CompressedModel.Load(stream, Cnn(9));
        using var fromFile = loaded.call(input);
        Assert.That(Same(fromFile, expected), Is.True, "the file holds the loaded weights, not the ones the layer was made with");
    }

    [Test]
    public void InPlaceEditThroughStateDict_TakesEffect()
    {
        using var model = Mlp(1);
        using var quantized = Quantize(model, new PostTrainingQuantizationOptions { Mode = QuantizationMode.DynamicInt8 }, [24]);
        var layer = (QuantizedLinear)quantized.named_modules().Single(m => m.name == "fc2").module;
        using var input = randn(4, 24);
        using var before = quantized.call(input);

        var bias = quantized.state_dict()["fc2.bias"];
        using (no_grad())
        {
            bias.add_(1f);
        }

        using var after = quantized.call(input);
        using var shift = after - before;
        Assert.That(shift.sub(1f).abs().max().item<float>(), Is.LessThan(1e-5f), "every output moved by the bias change");
        Assert.That(layer.ToString(), Does.Contain("in=40, out=5"));
    }

    [Test]
    public void LevelsOutsideTheBitWidth_ThrowClearly()
    {
        using var model = Mlp(1);
        using var quantized = Quantize(model, new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, WeightGranularity = QuantizationGranularity.PerGroup(8) }, [24]);
        var weight = quantized.state_dict()["fc1.weight"];
        Assert.That(weight.dtype, Is.EqualTo(ScalarType.Byte), "int4 rows are packed two per byte");
        using (no_grad())
        {
            // 0x88: two nibbles of -8, outside int4's symmetric ±7.
            weight[0, 0] = tensor((byte)0x88);
        }

        using var input = randn(2, 24);
        var ex = Assert.Throws<InvalidOperationException>(() => quantized.call(input).Dispose());
        Assert.That(ex!.Message, Does.Contain("-8").And.Contain("weight").And.Contain("QuantizedLinear"));
    }

    [Test]
    public void ToFloat16_LeavesTheQuantizedLayersAsTheyAre()
    {
        using var model = Mlp(1);
        using var quantized = Quantize(model, new PostTrainingQuantizationOptions { Mode = QuantizationMode.DynamicInt8 }, [24]);
        using var input = randn(3, 24);
        using var expected = quantized.call(input);
        var types = quantized.state_dict().ToDictionary(p => p.Key, p => p.Value.dtype);

        quantized.to(ScalarType.Float16);

        Assert.That(quantized.state_dict().ToDictionary(p => p.Key, p => p.Value.dtype), Is.EqualTo(types));
        using var after = quantized.call(input);
        Assert.That(Same(after, expected), Is.True);
        using var half = quantized.call(input.to(ScalarType.Float16));
        Assert.That(half.dtype, Is.EqualTo(ScalarType.Float16), "the output follows the input's type");
    }

    [Test]
    public void ToAnotherDevice_ThrowsNotSupported()
    {
        using var model = Mlp(1);
        using var quantized = Quantize(model, new PostTrainingQuantizationOptions { Mode = QuantizationMode.DynamicInt8 }, [24]);
        var layer = quantized.modules().OfType<QuantizedLinear>().First();
        var ex = Assert.Throws<NotSupportedException>(() => layer.to(DeviceType.META));
        Assert.That(ex!.Message, Does.Contain("QuantizedLinear").And.Contain("CPU"));
        Assert.DoesNotThrow(() => layer.to(DeviceType.CPU));
    }

    [Test]
    public void ReadingTheTensorsBack_LeaksNoTensors()
    {
        using var first = Mlp(1);
        using var second = Mlp(2);
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.DynamicInt8 };
        using var a = Quantize(first, options, [24]);
        using var b = Quantize(second, options, [24]);
        using var input = randn(2, 24);
        var source = b.state_dict();
        a.load_state_dict(source);
        a.call(input).Dispose();

        // Other tests' garbage finalized during the loop would lower the count: collect it first.
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long before = TestModels.SettledTensorCount();
        for (int i = 0; i < 3; i++)
        {
            a.load_state_dict(source);
            a.call(input).Dispose();
        }

        Assert.That(Tensor.TotalCount - before, Is.Zero);
    }
}
