using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Quantization.Kernels;
using ModelCompression.Serialization;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace ModelCompression.Tests.Quantization;

[TestFixture]
public sealed class HqqTests
{
    [TestCase(4, 64)]
    [TestCase(3, 64)]
    [TestCase(4, 0)]
    public void WeightError_BelowRoundToNearest_AndBelowTheMinMaxAsymmetricGrid(int bits, int group)
    {
        // Heavy-tailed weights (Student-t-like), as trained layers have: a few large weights stretch each group's range.
        using var generator = new Generator(11);
        var w = randn([48, 192], generator: generator) / (rand([48, 192], generator: generator) + 0.3).sqrt();
        var result = Hqq.Quantize(w, bits, group, WeightRounding.Hqq());
        Assert.That(result.WeightErrorAfter, Is.LessThan(result.WeightErrorBefore), "the optimised zero points beat the min–max grid");

        var granularity = group == 0 ? QuantizationGranularity.PerChannel : QuantizationGranularity.PerGroup(group);
        var hqq = QuantizedMatrix.FromLevels(48, 192, bits, granularity, result.Levels, result.Scales, null, result.ZeroPoints);
        var rtn = QuantizedMatrix.FromFloat(w.contiguous().data<float>().ToArray(), 48, 192, bits, granularity, [], false);
        double Error(QuantizedMatrix m) => (tensor(m.Dequantize(), [48, 192]) - w).abs().mean().item<float>();
        TestContext.Out.WriteLine($"{bits} bits, group {group}: HQQ {Error(hqq):G4}, RTN {Error(rtn):G4}, min–max {result.WeightErrorBefore:G4} → {result.WeightErrorAfter:G4}");
        Assert.That(Error(hqq), Is.LessThan(Error(rtn)));
        Assert.That(Error(hqq), Is.EqualTo(result.WeightErrorAfter).Within(1e-5), "the reported error is the stored grid's");
        Assert.That(result.Levels.Min(), Is.GreaterThanOrEqualTo(-(1 << (bits - 1))));
        Assert.That(result.Levels.Max(), Is.LessThanOrEqualTo((1 << (bits - 1)) - 1));
        Assert.That(result.Levels.Contains((sbyte)-(1 << (bits - 1))), Is.True, "the asymmetric grid uses its lowest level");
    }

    [Test]
    public void Layer_ComputesWithItsZeroPoints_AndSavesLoadsAndExposesThem()
    {
        torch.random.manual_seed(3);
        using var original = nn.Sequential(("fc1", nn.Linear(100, 48)), ("relu", nn.ReLU()), ("fc2", nn.Linear(48, 5)));
        var x = randn(16, 100);
        using var data = new TensorDataset(x, zeros(16, dtype: ScalarType.Int64));
        var context = new CompressionContext(new ModelCompression.CompressionData(data, data), original);
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, WeightGranularity = QuantizationGranularity.PerGroup(32), Rounding = WeightRounding.Hqq(), FuseRelu = true };
        using var quantized = new PostTrainingQuantizationStep(options).Apply(ModuleCloner.DeepClone(original), context);
        Assert.That(context.Notes, Has.Some.Contains("HQQ").And.Contains("2 Linear layer(s)"));
        var layers = quantized.modules().OfType<QuantizedLinear>().ToList();
        Assert.That(layers, Has.Count.EqualTo(2));

        // Each layer computes with (level − zero point) × scale: compare with a float Linear on its dequantized weight
        // (100 inputs: a last group of 4 tests the shorter group's sum).
        using var noGrad = no_grad();
        var first = layers[0];
        var expected = nn.functional.linear(x, first.DequantizedWeight(), tensor(first.Matrix.Bias!));
        expected = first.FusedRelu ? expected.relu() : expected;
        var actual = first.call(x);
        double relative = ((actual - expected).abs().max() / expected.abs().max()).item<float>();
        Assert.That(relative, Is.LessThan(0.02), "only the 7-bit activation rounding separates them");
        Assert.That(first.state_dict().Keys, Does.Contain("weight_zero_point"));

        using var stream = new MemoryStream();
        CompressedModel.Save(quantized, stream);
        stream.Position = 0;
        using var loaded = CompressedModel.Load(stream, nn.Sequential(("fc1", nn.Linear(100, 48)), ("relu", nn.ReLU()), ("fc2", nn.Linear(48, 5))));
        Assert.That(loaded.call(x).eq(quantized.call(x)).all().item<bool>(), Is.True);

        // The stored zero points are the layer: changing them through the state dict changes what it computes.
        var before = quantized.call(x);
        first.state_dict()["weight_zero_point"].add_(1);
        Assert.That(quantized.call(x).eq(before).all().item<bool>(), Is.False);
    }

    [Test]
    public void Options_HqqOutsideTheWeightOnlyModes_OrBadSettings_ClearErrors()
    {
        Assert.That(new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8, Rounding = WeightRounding.Hqq() }.Validate(), Has.Some.Contains("weight-only"));
        Assert.That(new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt8, WeightGranularity = QuantizationGranularity.PerTensor, Rounding = WeightRounding.Hqq() }.Validate(), Has.Some.Contains("per tensor"));
        var errors = new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, Rounding = new HqqRounding { LpNorm = 0, Iterations = 0, Beta = -1, Kappa = 0.5 } }.Validate();
        Assert.That(errors, Has.Some.Contains("LpNorm").And.Some.Contains("Iterations").And.Some.Contains("Beta").And.Some.Contains("Kappa"));
        Assert.That(new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, WeightBits = 3, Rounding = WeightRounding.Hqq() }.Validate(), Is.Empty);
    }

    [Test]
    public void Convolutions_RoundToNearest_WithANote()
    {
        torch.random.manual_seed(8);
        using var original = nn.Sequential(("conv", nn.Conv2d(1, 8, 3)), ("flatten", nn.Flatten()), ("fc", nn.Linear(8 * 36, 4)));
        using var data = new TensorDataset(randn(8, 1, 8, 8), zeros(8, dtype: ScalarType.Int64));
        var context = new CompressionContext(new ModelCompression.CompressionData(data, data), original);
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt8, Rounding = WeightRounding.Hqq() };
        using var quantized = new PostTrainingQuantizationStep(options).Apply(ModuleCloner.DeepClone(original), context);
        Assert.That(context.Notes, Has.Some.Contains("rounded to nearest on the symmetric grid").And.Some.Contains("conv"));
        Assert.That(quantized.modules().OfType<QuantizedLinear>().Single().Matrix.ZeroPoints, Is.Not.Null);
        Assert.That(quantized.modules().OfType<QuantizedConv2d>().Single().Matrix.ZeroPoints, Is.Null);

        // 8 bits: the asymmetric grid's lowest level, −128, is stored and read back (the file's level alphabet is ±128).
        Assert.That(quantized.modules().OfType<QuantizedLinear>().Single().Matrix.Q, Does.Contain((sbyte)-128));
        using var stream = new MemoryStream();
        CompressedModel.Save(quantized, stream);
        stream.Position = 0;
        using var loaded = CompressedModel.Load(stream, nn.Sequential(("conv", nn.Conv2d(1, 8, 3)), ("flatten", nn.Flatten()), ("fc", nn.Linear(8 * 36, 4))));
        using var noGrad = no_grad();
        var x = randn(3, 1, 8, 8);
        Assert.That(loaded.call(x).eq(quantized.call(x)).all().item<bool>(), Is.True);
    }
}
