using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Quantization.Scaling;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace ModelCompression.Tests.Quantization;

[TestFixture]
public sealed class LayerNormScalingTests
{
    [Test]
    public void Scaling_FoldedIntoTheLayerNorm_LeavesTheFloatModelUnchanged()
    {
        using var original = Model(21);
        using var model = ModuleCloner.DeepClone(original);
        using var data = Data(22);
        // Without the clipping search, which changes the weights on purpose.
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, WeightBits = 3, Awq = new AwqOptions { ClipSearch = false }, CalibrationBatches = 2, CalibrationBatchSize = 64 };
        var context = new CompressionContext(new ModelCompression.CompressionData(data, data), original);
        var targets = QuantizationTargetsFor(model);

        var (notes, inputScales) = LayerNormScaling.Awq(model, targets, options, options.Awq!, context);

        Assert.That(notes, Has.Some.Contains("norm → fc1, gate"));
        Assert.That(notes, Has.Some.Contains("not folded").And.Contains("fc2"));
        Assert.That(inputScales.Keys, Is.SubsetOf(new[] { "fc2" }), "only the unfolded layer can get explicit scales");
        using var noGrad = no_grad();
        var x = data.Inputs[..32];
        var expected = original.call(x);
        var actual = model.call(x);
        Assert.That((actual - expected).abs().max().item<float>(), Is.LessThan(1e-5 * expected.abs().max().item<float>() + 1e-6));
        Assert.That(TestModels.StateHash(model), Is.Not.EqualTo(TestModels.StateHash(original)), "the weights did change");
    }

    [TestCase(3)]
    [TestCase(4)]
    public void Step_SalientChannels_AwqBelowRoundToNearest(int bits)
    {
        using var original = Model(23);
        using var data = Data(24);
        using var heldOut = Data(25);
        double Error(AwqOptions? awq)
        {
            var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, WeightBits = bits, WeightGranularity = QuantizationGranularity.PerGroup(16), Awq = awq, CalibrationBatches = 2, CalibrationBatchSize = 64 };
            var context = new CompressionContext(new ModelCompression.CompressionData(data, data), original);
            using var quantized = new PostTrainingQuantizationStep(options).Apply(ModuleCloner.DeepClone(original), context);
            using var noGrad = no_grad();
            return (quantized.call(heldOut.Inputs) - original.call(heldOut.Inputs)).square().mean().item<float>();
        }

        double rtn = Error(null), awq = Error(new AwqOptions());
        TestContext.Out.WriteLine($"{bits} bits: RTN {rtn:G4}, AWQ {awq:G4}");
        Assert.That(awq, Is.LessThan(rtn));
    }

    [Test]
    public void Awq_UnfoldableLayer_ExplicitScalesStoredAndOutputsAsIfFloat()
    {
        // fc2 reads fc1 · sigmoid(gate), no LayerNorm: its scales stay with the quantized layer, which divides its input.
        using var original = Model(41);
        using var data = SalientData(42, channelsOf: original);
        using var heldOut = SalientData(43, channelsOf: original);
        double Error(bool explicitScales, out nn.Module<Tensor, Tensor> quantized)
        {
            var options = new PostTrainingQuantizationOptions
            {
                Mode = QuantizationMode.WeightOnlyInt4, WeightBits = 3, WeightGranularity = QuantizationGranularity.PerGroup(8),
                Awq = new AwqOptions { ExplicitScales = explicitScales, ClipSearch = false }, CalibrationBatches = 2, CalibrationBatchSize = 64,
            };
            var context = new CompressionContext(new ModelCompression.CompressionData(data, data), original);
            quantized = new PostTrainingQuantizationStep(options).Apply(ModuleCloner.DeepClone(original), context);
            using var noGrad = no_grad();
            return (quantized.call(heldOut.Inputs) - original.call(heldOut.Inputs)).square().mean().item<float>();
        }

        double without = Error(false, out var plain), with = Error(true, out var scaled);
        using var _p = plain;
        using var _s = scaled;
        TestContext.Out.WriteLine($"3 bits, fc2's output error: folded only {without:G4}, with explicit scales {with:G4}");
        var fc2 = (QuantizedLinear)ModuleTree.GetSubmodule(scaled, "fc2");
        Assert.That(fc2.Matrix.InputScales, Is.Not.Null);
        Assert.That(((QuantizedLinear)ModuleTree.GetSubmodule(plain, "fc2")).Matrix.InputScales, Is.Null);
        Assert.That(fc2.state_dict().Keys, Does.Contain("input_channel_scale"));
        Assert.That(with, Is.LessThan(without));

        // The weight the layer computes with is the float one, within the rounding.
        using var effective = fc2.DequantizedWeight();
        var floatWeight = ((TorchSharp.Modules.Linear)ModuleTree.GetSubmodule(original, "fc2")).weight!;
        Assert.That((effective - floatWeight).abs().mean().item<float>(), Is.LessThan(0.25 * floatWeight.abs().mean().item<float>()));
    }

    [Test]
    public void ExplicitScales_LoadStateDict_ChangesTheOutputAndBadValuesAreRefused()
    {
        using var original = Model(44);
        using var data = SalientData(45, channelsOf: original);
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, Awq = new AwqOptions(), CalibrationBatches = 1, CalibrationBatchSize = 64 };
        var context = new CompressionContext(new ModelCompression.CompressionData(data, data), original);
        using var quantized = new PostTrainingQuantizationStep(options).Apply(ModuleCloner.DeepClone(original), context);
        var fc2 = (QuantizedLinear)ModuleTree.GetSubmodule(quantized, "fc2");
        Assume.That(fc2.Matrix.InputScales, Is.Not.Null);
        using var noGrad = no_grad();
        var x = data.Inputs[..8];
        using var before = quantized.call(x);

        var state = fc2.state_dict();
        state["input_channel_scale"].mul_(2);
        using var after = quantized.call(x);
        Assert.That((after - before).abs().max().item<float>(), Is.GreaterThan(1e-3));
        Assert.That(fc2.Matrix.InputScales![0], Is.EqualTo(state["input_channel_scale"][0].item<float>()));

        // Handed out again (as load_state_dict does): the next call reads the stored tensors back.
        fc2.state_dict()["input_channel_scale"][1] = -1;
        var error = Assert.Throws<InvalidOperationException>(() => quantized.call(x).Dispose());
        Assert.That(error!.Message, Does.Contain("input_channel_scale").And.Contain("positive"));
    }

    [Test]
    public void Awq_ClipSearch_LowersTheOutputErrorAtThreeBits()
    {
        using var original = Model(46);
        using var data = SalientData(47, channelsOf: original);
        using var heldOut = SalientData(48, channelsOf: original);
        double Error(bool clip, out List<string> notes)
        {
            var options = new PostTrainingQuantizationOptions
            {
                Mode = QuantizationMode.WeightOnlyInt4, WeightBits = 3, WeightGranularity = QuantizationGranularity.PerGroup(16),
                Awq = new AwqOptions { ClipSearch = clip }, CalibrationBatches = 2, CalibrationBatchSize = 64,
            };
            var context = new CompressionContext(new ModelCompression.CompressionData(data, data), original);
            using var quantized = new PostTrainingQuantizationStep(options).Apply(ModuleCloner.DeepClone(original), context);
            notes = [.. context.Notes];
            using var noGrad = no_grad();
            return (quantized.call(heldOut.Inputs) - original.call(heldOut.Inputs)).square().mean().item<float>();
        }

        double unclipped = Error(false, out _), clipped = Error(true, out var notes);
        TestContext.Out.WriteLine($"3 bits: without clipping {unclipped:G4}, with {clipped:G4}");
        Assert.That(notes, Has.Some.Contains("clipping search").And.Contains("fc1").And.Contains("fc2"));
        Assert.That(clipped, Is.LessThan(unclipped));
    }

    [Test]
    public void Options_AwqClipping_Validated()
    {
        var errors = new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, Awq = new AwqOptions { MaxShrink = 1, ClipGridPoints = 1, ClipRows = 0 } }.Validate();
        Assert.That(errors, Has.Some.Contains("MaxShrink"));
        Assert.That(errors, Has.Some.Contains("ClipGridPoints"));
        Assert.That(errors, Has.Some.Contains("ClipRows"));
        var copy = new PostTrainingQuantizationOptions { Awq = new AwqOptions { ClipRows = 7, ExplicitScales = false } }.Clone();
        Assert.That((copy.Awq!.ClipRows, copy.Awq.ExplicitScales), Is.EqualTo((7, false)));
    }

    [Test]
    public void Options_AwqOutsideTheWeightOnlyModes_Rejected()
    {
        var errors = new PostTrainingQuantizationOptions { Mode = QuantizationMode.DynamicInt8, Awq = new AwqOptions { GridPoints = 1 } }.Validate();
        Assert.That(errors, Has.Some.Contains("weight-only"));
        Assert.That(errors, Has.Some.Contains("GridPoints"));
    }

    [Test]
    public void SmoothQuant_FoldedIntoTheLayerNorm_LeavesTheFloatModelUnchanged()
    {
        using var original = Model(26);
        using var model = ModuleCloner.DeepClone(original);
        using var data = Data(27);
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8, SmoothQuant = new SmoothQuantOptions(), CalibrationBatches = 2, CalibrationBatchSize = 64 };
        var context = new CompressionContext(new ModelCompression.CompressionData(data, data), original);

        var notes = LayerNormScaling.SmoothQuant(model, QuantizationTargetsFor(model), options, options.SmoothQuant!, context);

        Assert.That(notes, Has.Some.Contains("norm → fc1, gate").And.Contains("largest/median"));
        using var noGrad = no_grad();
        var x = data.Inputs[..32];
        var expected = original.call(x);
        Assert.That((model.call(x) - expected).abs().max().item<float>(), Is.LessThan(1e-5 * expected.abs().max().item<float>() + 1e-6));
    }

    [Test]
    public void SmoothQuant_ActivationOutliers_StaticInt8ErrorBelowWithout()
    {
        using var original = Model(28);
        using var data = Data(29);
        using var heldOut = Data(30);
        double Error(SmoothQuantOptions? smooth)
        {
            var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8, SmoothQuant = smooth, CalibrationBatches = 2, CalibrationBatchSize = 64 };
            var context = new CompressionContext(new ModelCompression.CompressionData(data, data), original);
            using var quantized = new PostTrainingQuantizationStep(options).Apply(ModuleCloner.DeepClone(original), context);
            Assert.That(quantized.modules().OfType<QuantizedLinear>().Count(), Is.EqualTo(3));
            using var noGrad = no_grad();
            return (quantized.call(heldOut.Inputs) - original.call(heldOut.Inputs)).square().mean().item<float>();
        }

        double plain = Error(null), smoothed = Error(new SmoothQuantOptions());
        TestContext.Out.WriteLine($"static int8: without {plain:G4}, with SmoothQuant {smoothed:G4}");
        Assert.That(smoothed, Is.LessThan(plain));
    }

    [Test]
    public void PostNormResidual_ReadsTheLayerNormToo_FoldUndoneAndNoted()
    {
        // h = norm(x) feeds fc and the residual sum: a scale folded into the norm would change the sum, so it is undone.
        torch.random.manual_seed(31);
        using var original = new PostNorm();
        using var model = ModuleCloner.DeepClone(original);
        using var data = Data(32);
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8, SmoothQuant = new SmoothQuantOptions(), CalibrationBatches = 1, CalibrationBatchSize = 64 };
        var context = new CompressionContext(new ModelCompression.CompressionData(data, data), original);

        var notes = LayerNormScaling.SmoothQuant(model, QuantizationTargetsFor(model), options, options.SmoothQuant!, context);

        Assert.That(notes, Has.Some.Contains("norm: not scaled").And.Contains("reads its output"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(TestModels.StateHash(original)));
    }

    [Test]
    public void Options_SmoothQuantOutsideTheActivationModes_Rejected()
    {
        var errors = new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, SmoothQuant = new SmoothQuantOptions { MigrationStrength = 2 } }.Validate();
        Assert.That(errors, Has.Some.Contains("quantize activations"));
        Assert.That(errors, Has.Some.Contains("MigrationStrength"));
    }

    /// <summary>LayerNorm → two Linear layers reading it (a gated MLP) → Linear; a few channels of the norm are large.</summary>
    private static nn.Module<Tensor, Tensor> Model(int seed)
    {
        torch.random.manual_seed(seed);
        var model = new GatedMlp();
        using (no_grad())
        {
            var norm = (TorchSharp.Modules.LayerNorm)ModuleTree.GetSubmodule(model, "norm");
            norm.weight![3] = 25;
            norm.weight[9] = 15;
            norm.bias!.normal_(0, 0.1);
        }

        return model;
    }

    private static TensorDataset Data(int seed)
    {
        using var generator = new Generator((ulong)seed);
        return new TensorDataset(randn([128, 16], generator: generator), zeros(128, dtype: ScalarType.Int64));
    }

    /// <summary>Inputs whose fc2 input has a few large channels: fc1's rows 5 and 17 are scaled up.</summary>
    private static TensorDataset SalientData(int seed, nn.Module<Tensor, Tensor> channelsOf)
    {
        using (no_grad())
        {
            var fc1 = (TorchSharp.Modules.Linear)ModuleTree.GetSubmodule(channelsOf, "fc1");
            if (fc1.weight![5].abs().max().item<float>() < 1)
            {
                fc1.weight[5].mul_(12);
                fc1.weight[17].mul_(8);
            }
        }

        return Data(seed);
    }

    private static List<Target> QuantizationTargetsFor(nn.Module<Tensor, Tensor> model) =>
        [.. model.named_modules().Where(m => m.module is TorchSharp.Modules.Linear).Select(m => new Target(m.name, (nn.Module<Tensor, Tensor>)m.module))];

    private sealed class PostNorm : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module<Tensor, Tensor> norm = nn.LayerNorm(16);
        private readonly nn.Module<Tensor, Tensor> fc = nn.Linear(16, 16);
        private readonly nn.Module<Tensor, Tensor> head = nn.Linear(16, 4);

        public PostNorm() : base(nameof(PostNorm))
        {
            RegisterComponents();
            using (no_grad())
            {
                ((TorchSharp.Modules.LayerNorm)norm).weight![2] = 20;
            }
        }

        public override Tensor forward(Tensor input)
        {
            using var scope = NewDisposeScope();
            var h = norm.call(input);
            return head.call(fc.call(h) + h).MoveToOuterDisposeScope();
        }
    }

    private sealed class GatedMlp : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module<Tensor, Tensor> norm = nn.LayerNorm(16);
        private readonly nn.Module<Tensor, Tensor> fc1 = nn.Linear(16, 32);
        private readonly nn.Module<Tensor, Tensor> gate = nn.Linear(16, 32);
        private readonly nn.Module<Tensor, Tensor> fc2 = nn.Linear(32, 8);

        public GatedMlp() : base(nameof(GatedMlp)) => RegisterComponents();

        public override Tensor forward(Tensor input)
        {
            using var scope = NewDisposeScope();
            var h = norm.call(input);
            return fc2.call(fc1.call(h) * nn.functional.sigmoid(gate.call(h))).MoveToOuterDisposeScope();
        }
    }
}
