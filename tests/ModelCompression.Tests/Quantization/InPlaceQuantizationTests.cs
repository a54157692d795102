using ModelCompression.Data;
using ModelCompression.Metrics;
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

/// <summary>
/// Integer quantization of layers no quantized layer can replace (TorchSharp's native recurrent and attention modules,
/// layers in fields of a concrete type): weights rounded in place, stored by the file as levels and scales.
/// </summary>
[TestFixture]
public sealed class InPlaceQuantizationTests
{
    private const int Vocabulary = 50;

    /// <summary>Token ids [batch, 6] → embedding → a native recurrent or attention module in a typed field → linear head.</summary>
    private sealed class NativeNet : nn.Module<Tensor, Tensor>
    {
        private readonly Embedding embed;
        private readonly LSTM? lstm;
        private readonly GRU? gru;
        private readonly TransformerEncoder? encoder;
        private readonly nn.Module<Tensor, Tensor> head;

        public NativeNet(string kind, int seed)
            : base("NativeNet")
        {
            torch.manual_seed(seed);
            embed = nn.Embedding(Vocabulary, 16);
            switch (kind)
            {
                case "LSTM":
                    lstm = nn.LSTM(16, 24, batchFirst: true);
                    break;
                case "GRU":
                    gru = nn.GRU(16, 24, numLayers: 2, batchFirst: true);
                    break;
                default:
                    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, 0.0), 2);
                    break;
            }

            head = nn.Linear(encoder is null ? 24 : 16, 3);
            RegisterComponents();
        }

        public override Tensor forward(Tensor tokens)
        {
            using var scope = NewDisposeScope();
            var x = embed.call(tokens);
            var features = lstm is not null ? lstm.call(x).Item1.select(1, -1)
                : gru is not null ? gru.call(x).Item1.select(1, -1)
                : encoder!.call(x.transpose(0, 1)).mean([0]);
            return head.call(features).MoveToOuterDisposeScope();
        }
    }

    private static TensorDataset Tokens(int count, int seed)
    {
        using var generator = new Generator((ulong)seed);
        return new TensorDataset(randint(Vocabulary, [count, 6], generator: generator), zeros(count, dtype: int64));
    }

    private static CompressionContext Context(nn.Module<Tensor, Tensor> original, IBatchSource data) =>
        new(new CompressionData(data, data) { Evaluator = new AccuracyEvaluator() }, original);

    private static Dictionary<string, float[]> Weights(nn.Module module) =>
        module.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().cpu().contiguous().data<float>().ToArray());

    [Test]
    public void WeightGrid_FindsEveryGridItRounds([Values(8, 4)] int bits, [Values(0, 32, 64)] int group)
    {
        var random = new Random(bits * 100 + group);
        foreach (var (rows, columns) in new[] { (7, 45), (16, 64), (3, 200), (1, 1), (5, 31) })
        {
            var values = new float[rows * columns];
            for (int i = 0; i < values.Length; i++)
            {
                values[i] = (float)((random.NextDouble() * 2 - 1) * Math.Pow(10, random.Next(-4, 3)));
            }

            var rounded = (float[])values.Clone();
            float change = WeightGrid.Round(rounded, rows, bits, group);
            var grid = WeightGrid.Find(rounded, rows);

            Assert.That(grid, Is.Not.Null, $"{rows}×{columns}");
            Assert.That(grid!.MaxLevel, Is.LessThanOrEqualTo(bits == 4 ? 7 : 127));
            int groupsPerRow = (columns + grid.GroupSize - 1) / grid.GroupSize;
            for (int i = 0; i < rounded.Length; i++)
            {
                float scale = grid.Scales[((i / columns) * groupsPerRow) + ((i % columns) / grid.GroupSize)];
                Assert.That(grid.Levels[i] * scale, Is.EqualTo(rounded[i]), "the grid reproduces every value exactly");
            }

            Assert.That(change, Is.LessThanOrEqualTo(values.Max(MathF.Abs) / ((1 << (bits - 1)) - 1) / 2 * 1.0001f), "at most half a step moved");
        }
    }

    [Test]
    public void WeightGrid_FindsNoGridInFloatWeights()
    {
        using var generator = new Generator(5);
        var values = randn([32, 64], generator: generator).data<float>().ToArray();
        Assert.That(WeightGrid.Find(values, 32), Is.Null);
    }

    [TestCase("LSTM")]
    [TestCase("GRU")]
    [TestCase("TransformerEncoder")]
    public void DynamicInt8_RoundsNativeModulesInPlace_AndTheFileStoresInt8(string kind)
    {
        using var original = new NativeNet(kind, 1);
        original.eval();
        using var model = ModuleCloner.DeepClone(original);
        using var data = Tokens(32, 2);
        var context = Context(original, data);
        var before = Weights(model);

        var result = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = QuantizationMode.DynamicInt8 }).Apply(model, context);

        var nativeName = result.named_children().Single(c => c.name is "lstm" or "gru" or "encoder").name;
        var after = Weights(result);
        var changed = after.Where(p => p.Key.StartsWith(nativeName + ".", StringComparison.Ordinal) && !before[p.Key].SequenceEqual(p.Value)).Select(p => p.Key).ToList();
        Assert.That(changed, Is.Not.Empty);
        Assert.That(changed.All(name => result.named_parameters().Single(p => p.name == name).parameter.dim() >= 2), Is.True, "biases and norms stay as they are");
        Assert.That(context.Notes, Has.Some.Contains("rounded in place to int8").And.Contains($"'{nativeName}'"));
        Assert.That(result.named_modules().Single(m => m.name == "head").module, Is.InstanceOf<QuantizedLinear>());
        Assert.That(result.named_modules().Single(m => m.name == "embed").module, Is.InstanceOf<Embedding>(), "dynamic quantization leaves lookups in float");

        using var input = randint(Vocabulary, [8, 6]);
        using var expected = original.call(input);
        using var actual = result.call(input);
        double relative = (actual - expected).norm().item<float>() / expected.norm().item<float>();
        Assert.That(relative, Is.LessThan(0.05), "int8 weights keep the outputs close");

        long floatBytes = ModelMetrics.SizeInBytes(original);
        long int8Bytes = ModelMetrics.SizeInBytes(result);
        long nativeFloats = original.named_parameters().Where(p => p.name.StartsWith(nativeName + ".", StringComparison.Ordinal) && p.parameter.dim() >= 2).Sum(p => p.parameter.numel());
        TestContext.Out.WriteLine($"{kind}: {floatBytes:N0} → {int8Bytes:N0} bytes; {nativeFloats:N0} native weights");
        Assert.That(floatBytes - int8Bytes, Is.GreaterThan(nativeFloats * 2), "the native module's weights are stored in about a byte each, not four");

        using var stream = new MemoryStream();
        CompressedModel.Save(result, stream);
        stream.Position = 0;
        using var loaded = CompressedModel.Load(stream, new NativeNet(kind, 7));
        Assert.That(Weights(loaded), Is.EqualTo(after).Using<float[]>((a, b) => a.SequenceEqual(b)), "the levels and scales give back the rounded weights exactly");
    }

    [Test]
    public void Conv1dAndConvTranspose_RoundedInPlaceByDefault_TheFileShrinksAndLoadsBack()
    {
        // Issue 17: a Conv1d model compressed 1.03× (its convolutions skipped). Conv1d, Conv3d, the transposed
        // convolutions and the RNN cells have no integer kernel here: by default their weights are rounded in place.
        torch.manual_seed(11);
        using var original = nn.Sequential(
            ("conv", nn.Conv1d(4, 32, 5, padding: 2)),
            ("relu", nn.ReLU()),
            ("up", nn.ConvTranspose1d(32, 16, 4, stride: 2, padding: 1)),
            ("pool", nn.AdaptiveAvgPool1d(1)),
            ("flatten", nn.Flatten()),
            ("head", nn.Linear(16, 3)));
        original.eval();
        using var model = ModuleCloner.DeepClone(original);
        using var generator = new Generator(12);
        using var data = new TensorDataset(randn([16, 4, 20], generator: generator), zeros(16, dtype: int64));
        var context = Context(original, data);

        var result = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions()).Apply(model, context);

        Assert.That(ModuleTree.GetSubmodule(result, "conv"), Is.InstanceOf<Conv1d>());
        var conv = ((Conv1d)ModuleTree.GetSubmodule(result, "conv")).weight!.detach().data<float>().ToArray();
        Assert.That(WeightGrid.Find(conv, 32)?.MaxLevel, Is.EqualTo(127));
        Assert.That(context.Notes, Has.Some.Contains("'conv'").And.Contains("'up'").And.Contains("no integer kernel for its kind"));
        double ratio = (double)ModelMetrics.SizeInBytes(result) / ModelMetrics.SizeInBytes(original);
        TestContext.Out.WriteLine($"Conv1d model: file ratio {ratio:0.000}");
        Assert.That(ratio, Is.LessThan(0.45), "the convolutions are stored in about a byte per weight");

        using var input = randn(3, 4, 20);
        using var expected = original.call(input);
        using var actual = result.call(input);
        Assert.That((actual - expected).norm().item<float>() / expected.norm().item<float>(), Is.LessThan(0.05));
        using var stream = new MemoryStream();
        CompressedModel.Save(result, stream);
        stream.Position = 0;
        using var loaded = CompressedModel.Load(stream);
        Assert.That(TestModels.Output(loaded, input), Is.EqualTo(TestModels.Output(result, input)));
    }

    [Test]
    public void RegisteredLeafKind_SelectedByType_RoundedInPlace_NotWhenSkipped()
    {
        // A layer kind of the application's own, with a weight of its own and no child: the selection names its type.
        LayerRegistry.Register(new ScaledProjectionDescriptor());
        try
        {
            torch.manual_seed(13);
            using var original = nn.Sequential(("proj", new ScaledProjection(12, 24)), ("relu", nn.ReLU()), ("head", nn.Linear(24, 3)));
            using var generator = new Generator(14);
            using var data = new TensorDataset(randn([16, 12], generator: generator), zeros(16, dtype: int64));
            var selection = new LayerSelection { Types = [typeof(Linear), typeof(ScaledProjection)] };

            using var model = ModuleCloner.DeepClone(original);
            var context = Context(original, data);
            var result = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Layers = selection }).Apply(model, context);
            var proj = (ScaledProjection)ModuleTree.GetSubmodule(result, "proj");
            Assert.That(WeightGrid.Find(proj.Weight.detach().data<float>().ToArray(), 24)?.MaxLevel, Is.EqualTo(127));
            Assert.That(proj.Gain.detach().data<float>().ToArray(), Is.EqualTo(((ScaledProjection)ModuleTree.GetSubmodule(original, "proj")).Gain.detach().data<float>().ToArray()), "one-dimensional parameters stay");
            Assert.That(context.Notes, Has.Some.Contains("'proj'").And.Contains("ScaledProjection"));

            using var skipped = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Layers = selection, FixedTypeLayers = FixedTypeLayers.Skip })
                .Apply(ModuleCloner.DeepClone(original), Context(original, data));
            var untouched = ((ScaledProjection)ModuleTree.GetSubmodule(skipped, "proj")).Weight.detach().data<float>().ToArray();
            Assert.That(untouched, Is.EqualTo(((ScaledProjection)ModuleTree.GetSubmodule(original, "proj")).Weight.detach().data<float>().ToArray()));
        }
        finally
        {
            LayerRegistry.Unregister(typeof(ScaledProjection));
        }
    }

    /// <summary>y = (x · Wᵀ) · g: a leaf with a weight matrix and a gain vector of its own.</summary>
    private sealed class ScaledProjection : nn.Module<Tensor, Tensor>
    {
        private readonly Parameter weight;
        private readonly Parameter gain;

        public ScaledProjection(long inputs, long outputs)
            : base(nameof(ScaledProjection))
        {
            weight = new Parameter(randn(outputs, inputs) / Math.Sqrt(inputs));
            gain = new Parameter(rand(outputs) + 0.5);
            RegisterComponents();
        }

        public Parameter Weight => weight;

        public Parameter Gain => gain;

        public override Tensor forward(Tensor input) => input.matmul(weight.t()) * gain;
    }

    private sealed class ScaledProjectionDescriptor() : LayerDescriptor("tests.ScaledProjection", typeof(ScaledProjection))
    {
        public override LayerAttributes GetAttributes(nn.Module module)
        {
            var p = (ScaledProjection)module;
            return new LayerAttributes().Set("inputs", p.Weight.shape[1]).Set("outputs", p.Weight.shape[0]);
        }

        public override nn.Module Create(LayerAttributes attributes, int version) =>
            new ScaledProjection(attributes.GetInt64("inputs", 1, 1 << 20), attributes.GetInt64("outputs", 1, 1 << 20));
    }

    [Test]
    public void WeightOnlyInt4_RoundsInGroups()
    {
        using var original = new NativeNet("GRU", 1);
        using var model = ModuleCloner.DeepClone(original);
        using var data = Tokens(16, 2);
        var context = Context(original, data);
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, WeightGranularity = QuantizationGranularity.PerGroup(8) };

        var result = new PostTrainingQuantizationStep(options).Apply(model, context);

        var weight = result.named_parameters().Single(p => p.name == "gru.weight_hh_l0").parameter.detach().data<float>().ToArray();
        var grid = WeightGrid.Find(weight, 72);
        Assert.That(grid, Is.Not.Null);
        Assert.That(grid!.MaxLevel, Is.EqualTo(7));
        Assert.That(grid.GroupSize, Is.EqualTo(8));
        Assert.That(context.Notes, Has.Some.Contains("int4 levels with a scale per group of 8"));
    }

    [Test]
    public void FixedTypeFields_AreRoundedInPlace_AndStoredAsInt8()
    {
        using var original = new FixedTypeNet(3);
        using var model = ModuleCloner.DeepClone(original);
        using var generator = new Generator(4);
        using var data = new TensorDataset(randn([16, .. FixedTypeNet.SampleShape], generator: generator), zeros(16, dtype: int64));
        var context = Context(original, data);

        var result = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions()).Apply(model, context);

        Assert.That(result.named_modules().Single(m => m.name == "fc").module, Is.InstanceOf<Linear>());
        Assert.That(result.named_modules().Single(m => m.name == "head").module, Is.InstanceOf<QuantizedLinear>());
        var fc = result.named_parameters().Single(p => p.name == "fc.weight").parameter.detach().data<float>().ToArray();
        Assert.That(WeightGrid.Find(fc, 64)?.MaxLevel, Is.EqualTo(127));
        Assert.That(context.Notes, Has.Some.Contains("'fc'").And.Contains("'conv'").And.Contains("rounded in place"));
        double ratio = (double)ModelMetrics.SizeInBytes(result) / ModelMetrics.SizeInBytes(original);
        Assert.That(ratio, Is.LessThan(0.3), "every weight is stored in about a byte");
    }

    [Test]
    public void Skip_LeavesNativeModulesInFloat_AndFail_RefusesBeforeAnyChange()
    {
        using var original = new NativeNet("LSTM", 1);
        using var data = Tokens(16, 2);
        using var skipped = ModuleCloner.DeepClone(original);
        var before = Weights(skipped);
        var context = Context(original, data);
        var result = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { FixedTypeLayers = FixedTypeLayers.Skip }).Apply(skipped, context);
        var after = Weights(result);
        Assert.That(after.Where(p => p.Key.StartsWith("lstm.", StringComparison.Ordinal)).All(p => before[p.Key].SequenceEqual(p.Value)), Is.True);
        Assert.That(context.Notes, Has.Some.Contains("left in float").And.Contains("'lstm'"));

        using var refused = ModuleCloner.DeepClone(original);
        string hash = TestModels.StateHash(refused);
        var ex = Assert.Throws<UnsupportedModelException>(() =>
            new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { FixedTypeLayers = FixedTypeLayers.Fail }).Apply(refused, Context(original, data)));
        Assert.That(ex!.LayerName, Is.EqualTo("lstm"));
        Assert.That(TestModels.StateHash(refused), Is.EqualTo(hash), "nothing changed");
    }

    [Test]
    public void NaNInANativeWeight_IsRefusedBeforeAnyChange()
    {
        using var original = new NativeNet("GRU", 1);
        using var model = ModuleCloner.DeepClone(original);
        using (no_grad())
        {
            model.named_parameters().Single(p => p.name == "gru.weight_ih_l1").parameter[0, 0] = float.NaN;
        }

        string hash = TestModels.StateHash(model);
        using var data = Tokens(16, 2);
        var ex = Assert.Throws<ArgumentException>(() => new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions()).Apply(model, Context(original, data)));
        Assert.That(ex!.Message, Does.Contain("'gru'").And.Contain("weight_ih_l1"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(hash));
    }

    [Test]
    public void Float16_WithANativeModuleSelected_RoundsItInPlace()
    {
        using var original = new NativeNet("LSTM", 1);
        using var model = ModuleCloner.DeepClone(original);
        using var data = Tokens(16, 2);
        var context = Context(original, data);

        var result = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = QuantizationMode.Float16 }).Apply(model, context);

        var weight = result.named_parameters().Single(p => p.name == "lstm.weight_ih_l0").parameter.detach().data<float>().ToArray();
        Assert.That(weight.All(v => (float)(Half)v == v), Is.True);
        Assert.That(result.named_modules().Single(m => m.name == "head").module, Is.InstanceOf<HalfPrecisionLayer>());
    }
}
