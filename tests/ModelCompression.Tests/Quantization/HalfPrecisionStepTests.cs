using ModelCompression.Metrics;
using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Samples;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Quantization;

[TestFixture]
public sealed class HalfPrecisionStepTests
{
    private static CompressionContext Context(nn.Module<Tensor, Tensor> original, ModelCompression.Data.TensorDataset data) =>
        new(new CompressionData(null, data), original);

    [TestCase(HalfPrecisionFormat.BFloat16, ScalarType.BFloat16, 0.05)]
    [TestCase(HalfPrecisionFormat.Float16, ScalarType.Float16, 0.01)]
    public void Apply_HalvesTheSizeAndKeepsTheOutputsClose(HalfPrecisionFormat format, ScalarType dtype, double tolerance)
    {
        using var original = ModelZoo.Create(ZooModel.LeNet5, 1);
        original.eval();
        using var model = ModuleCloner.DeepClone(original);
        using var data = new ModelCompression.Data.TensorDataset(randn(4, 1, 28, 28), zeros(4, dtype: int64));
        using var input = randn(3, 1, 28, 28);
        var expected = TestModels.Output(original, input);

        var step = new HalfPrecisionStep(new HalfPrecisionOptions { Format = format });
        var result = step.Apply(model, Context(original, data));

        Assert.That(ModelMetrics.TensorBytes(result) * 2, Is.EqualTo(ModelMetrics.TensorBytes(original)));
        // The file stores 2 bytes a weight, or fewer where a codebook of the (coarse) 16-bit values is smaller.
        Assert.That(ModelMetrics.SizeInBytes(result), Is.LessThanOrEqualTo((ModelMetrics.SizeInBytes(original) / 2) + 500));
        Assert.That(result.modules().OfType<HalfPrecisionLayer>().Count(), Is.EqualTo(5));
        Assert.That(result.parameters().All(p => p.dtype == dtype), Is.True);
        var actual = TestModels.Output(result, input);
        double scale = expected.Max(Math.Abs);
        Assert.That(actual.Zip(expected).Max(p => Math.Abs(p.First - p.Second)), Is.LessThan(tolerance * scale));
        Assert.That(ModelMetrics.CountMacs(result, input), Is.EqualTo(ModelMetrics.CountMacs(original, input)));
    }

    [Test]
    public void Apply_SelectedLayersOnly()
    {
        using var original = ModelZoo.LeNet300100();
        using var model = ModuleCloner.DeepClone(original);
        using var data = new ModelCompression.Data.TensorDataset(randn(4, 784), zeros(4, dtype: int64));
        var step = new HalfPrecisionStep(new HalfPrecisionOptions { Layers = LayerSelection.Named("fc2") });
        var result = step.Apply(model, Context(original, data));
        var converted = result.named_modules().Where(m => m.module is HalfPrecisionLayer).Select(m => m.name);
        Assert.That(converted, Is.EqualTo(new[] { "fc2" }));
        var layers = ModelMetrics.Measure(result, [784]).Layers;
        Assert.That(layers.Select(l => (l.Name, l.Bits)), Is.EqualTo(new[] { ("fc1", 32), ("fc2", 16), ("fc3", 32) }));
    }

    [Test]
    public void Apply_UnknownLayerName_ThrowsBeforeChangingAnything()
    {
        using var original = ModelZoo.LeNet300100();
        using var model = ModuleCloner.DeepClone(original);
        using var data = new ModelCompression.Data.TensorDataset(randn(4, 784), zeros(4, dtype: int64));
        string before = TestModels.StateHash(model);
        var step = new HalfPrecisionStep(new HalfPrecisionOptions { Layers = LayerSelection.Named("fc1", "fc7") });
        var ex = Assert.Throws<ArgumentException>(() => step.Apply(model, Context(original, data)));
        Assert.That(ex!.Message, Does.Contain("fc7"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
    }

    [Test]
    public void Apply_TypeSelectionMatchingNothing_IsANoOpWithANote()
    {
        using var original = ModelZoo.LeNet300100();
        using var model = ModuleCloner.DeepClone(original);
        using var data = new ModelCompression.Data.TensorDataset(randn(4, 784), zeros(4, dtype: int64));
        var step = new HalfPrecisionStep(new HalfPrecisionOptions { Layers = LayerSelection.OfType<TorchSharp.Modules.Conv2d>() });
        var context = Context(original, data);
        var result = step.Apply(model, context);
        Assert.That(result, Is.SameAs(model));
        Assert.That(TestModels.StateHash(result), Is.EqualTo(TestModels.StateHash(original)));
        Assert.That(context.Notes, Has.One.Contains("nothing converted"));
    }

    [Test]
    public void Apply_NamedSelectionMatchingNothing_Throws()
    {
        using var original = ModelZoo.LeNet300100();
        using var model = ModuleCloner.DeepClone(original);
        using var data = new ModelCompression.Data.TensorDataset(randn(4, 784), zeros(4, dtype: int64));
        // "relu1" exists but is not of a selected type.
        var step = new HalfPrecisionStep(new HalfPrecisionOptions { Layers = LayerSelection.Named("relu1") });
        Assert.Throws<ArgumentException>(() => step.Apply(model, Context(original, data)));
    }

    [Test]
    public void Constructor_InvalidOptions_Throws()
    {
        var ex = Assert.Throws<OptionsValidationException>(() => new HalfPrecisionStep(new HalfPrecisionOptions { Format = (HalfPrecisionFormat)5 }));
        Assert.That(ex!.OptionsType, Is.EqualTo(nameof(HalfPrecisionOptions)));
    }

    [Test]
    public void Layer_RejectsNonHalfTypes()
    {
        Assert.Throws<ArgumentException>(() => _ = new HalfPrecisionLayer(nn.Linear(2, 2), ScalarType.Float32));
    }
}
