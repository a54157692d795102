using ModelCompression.Data;
using ModelCompression.Metrics;
using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Serialization;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Modules;

/// <summary>
/// Layers the library did not write: TorchSharp's natively implemented modules copied through their descriptors, a
/// third-party kind registered from this assembly, and models fed token ids.
/// </summary>
[TestFixture]
public sealed class LayerRegistryTests
{
    private static readonly Dictionary<string, Func<nn.Module>> NativeLayers = new()
    {
        ["gru"] = () => nn.GRU(4, 6, numLayers: 2, batchFirst: true, bidirectional: true),
        ["lstm"] = () => nn.LSTM(4, 5, numLayers: 2, bias: false),
        ["rnn-relu"] = () => nn.RNN(4, 5, nonLinearity: nn.NonLinearities.ReLU, batchFirst: true),
        ["gru-cell"] = () => nn.GRUCell(4, 6),
        ["lstm-cell"] = () => nn.LSTMCell(4, 5, bias: false),
        ["rnn-cell-relu"] = () => nn.RNNCell(4, 5, nn.NonLinearities.ReLU),
        ["rnn-cell-tanh"] = () => nn.RNNCell(4, 3),
        ["attention"] = () => nn.MultiheadAttention(8, 4),
        ["attention-kv"] = () => nn.MultiheadAttention(8, 2, add_bias_kv: true, kdim: 6, vdim: 6),
        ["encoder-layer-gelu"] = () => nn.TransformerEncoderLayer(8, 2, 16, 0.0, nn.Activations.GELU),
        ["encoder"] = () => nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 4, 12, 0.0), 2),
        ["decoder-layer"] = () => nn.TransformerDecoderLayer(8, 2, 16, 0.0),
        ["decoder"] = () => nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 8, 12, 0.0, nn.Activations.GELU), 2),
        ["embedding"] = () => nn.Embedding(20, 6),
        ["embedding-bag-mean"] = () => nn.EmbeddingBag(20, 6),
        ["embedding-bag-sum-last-offset"] = () => nn.EmbeddingBag(20, 6, mode: EmbeddingBagMode.Sum, include_last_offset: true),
        ["embedding-bag-max-padding"] = () => nn.EmbeddingBag(20, 6, mode: EmbeddingBagMode.Max, padding_index: 3),
        ["embedding-bag-mean-padding"] = () => nn.EmbeddingBag(20, 6, padding_index: 0),
        ["conv1d"] = () => nn.Conv1d(4, 6, 3, stride: 2, padding: 1, groups: 2),
        ["conv3d"] = () => nn.Conv3d(2, 4, 3, padding: 1),
        ["groupnorm"] = () => nn.GroupNorm(2, 6, 1e-3),
    };

    private static IEnumerable<string> NativeLayerNames => NativeLayers.Keys;

    [TestCaseSource(nameof(NativeLayerNames))]
    public void DeepClone_TorchSharpLayer_EqualOutputsAndIndependentTensors(string name)
    {
        using var original = NativeLayers[name]();
        original.eval();
        using var copy = ModuleCloner.DeepClone(original);

        Assert.That(copy.GetType(), Is.EqualTo(original.GetType()));
        Assert.That(copy.training, Is.False);
        Assert.That(TestModels.StateHash(copy), Is.EqualTo(TestModels.StateHash(original)));
        Assert.That(Run(copy, name), Is.EqualTo(Run(original, name)));

        string before = TestModels.StateHash(original);
        using (no_grad())
        {
            foreach (var p in copy.parameters())
            {
                p.add_(1);
            }
        }

        Assert.That(TestModels.StateHash(original), Is.EqualTo(before));
        Assert.That(Run(copy, name), Is.Not.EqualTo(Run(original, name)));
    }

    [TestCaseSource(nameof(NativeLayerNames))]
    public void DeepClone_TorchSharpLayer_LeaksNoTensors(string name)
    {
        using var original = NativeLayers[name]();
        ModuleCloner.DeepClone(original).Dispose(); // settings probed once and cached per module
        long parameters = original.parameters().Count();
        GC.Collect();
        GC.WaitForPendingFinalizers();

        long before = TestModels.SettledTensorCount();
        NativeLayers[name]().Dispose();
        long construction = Tensor.TotalCount - before;
        before = Tensor.TotalCount;
        ModuleCloner.DeepClone(original).Dispose();
        long delta = Tensor.TotalCount - before;

        // A copy is a construction plus copies into its tensors: it may leave what TorchSharp's own constructor leaves
        // (0.107 never subtracts the empty tensor a Parameter leaves when it wraps one), nothing more. A wrapper leaked
        // per tensor and call would be several times the parameter count.
        TestContext.Out.WriteLine($"{name}: {delta} live tensors more after a copy, {construction} after a construction, {parameters} parameters");
        Assert.That(delta, Is.InRange(0, construction));
    }

    [TestCaseSource(nameof(NativeLayerNames))]
    public void Save_ModelHoldingTorchSharpLayer_LoadsWithoutArchitectureAndGivesSameOutputs(string name)
    {
        using var model = new Holder(NativeLayers[name](), name);
        model.eval();
        LayerRegistry.RegisterFactory(() => new Holder(NativeLayers[name](), name), $"tests.Holder.{name}");
        try
        {
            using var stream = new MemoryStream();
            CompressedModel.Save(model, stream);
            stream.Position = 0;
            using var loaded = CompressedModel.Load(stream);

            Assert.That(loaded, Is.TypeOf<Holder>());
            Assert.That(TestModels.StateHash(loaded), Is.EqualTo(TestModels.StateHash(model)));
            Assert.That(Run(((Holder)loaded).Layer, name), Is.EqualTo(Run(model.Layer, name)));
        }
        finally
        {
            LayerRegistry.Unregister(typeof(Holder));
        }
    }

    private static readonly Dictionary<string, (Func<nn.Module<Tensor, Tensor>> Build, long[] Input)> ManagedLayers = new()
    {
        ["linear"] = (() => nn.Linear(6, 4), [3, 6]),
        ["linear-without-bias"] = (() => nn.Linear(6, 4, hasBias: false), [3, 6]),
        ["conv2d"] = (() => nn.Conv2d(3, 4, 3, stride: 2, padding: 1), [2, 3, 8, 8]),
        ["conv2d-same"] = (() => nn.Conv2d(3, 4, 3, padding: Padding.Same), [2, 3, 8, 8]),
        ["conv-transpose2d"] = (() => nn.ConvTranspose2d(3, 4, 3, stride: 2), [2, 3, 5, 5]),
        ["conv-transpose2d-grouped"] = (() => nn.ConvTranspose2d(4, 6, (3, 2), (2, 3), (1, 0), (1, 2), (1, 1), groups: 2, bias: false), [2, 4, 5, 4]),
        ["conv-transpose1d"] = (() => nn.ConvTranspose1d(3, 2, 4, stride: 2, padding: 1, dilation: 2), [2, 3, 7]),
        ["conv-transpose3d"] = (() => nn.ConvTranspose3d(2, 3, 2, stride: 2), [1, 2, 3, 3, 3]),
        ["batchnorm1d"] = (() => nn.BatchNorm1d(6), [4, 6]),
        ["batchnorm2d"] = (() => nn.BatchNorm2d(3), [2, 3, 4, 4]),
        ["batchnorm3d"] = (() => nn.BatchNorm3d(2), [2, 2, 3, 3, 3]),
        ["instancenorm2d"] = (() => nn.InstanceNorm2d(3, affine: true), [2, 3, 4, 4]),
        ["layernorm"] = (() => nn.LayerNorm([4, 4]), [2, 3, 4, 4]),
        ["relu"] = (() => nn.ReLU(), [3, 5]),
        ["gelu"] = (() => nn.GELU(), [3, 5]),
        ["elu"] = (() => nn.ELU(0.5), [3, 5]),
        ["leaky-relu"] = (() => nn.LeakyReLU(0.2), [3, 5]),
        ["prelu"] = (() => nn.PReLU(5), [3, 5]),
        ["softmax"] = (() => nn.Softmax(1), [3, 5]),
        ["maxpool1d"] = (() => nn.MaxPool1d(2), [2, 3, 8]),
        ["avgpool2d"] = (() => nn.AvgPool2d(2), [2, 3, 8, 8]),
        ["adaptive-avgpool2d"] = (() => nn.AdaptiveAvgPool2d(1), [2, 3, 8, 8]),
        ["adaptive-maxpool1d"] = (() => nn.AdaptiveMaxPool1d(2), [2, 3, 8]),
        ["dropout"] = (() => nn.Dropout(0.3), [3, 5]),
        ["flatten"] = (() => nn.Flatten(), [2, 3, 4]),
        ["unflatten"] = (() => nn.Unflatten(1, [2, 3]), [2, 6]),
        ["upsample"] = (() => nn.Upsample(scale_factor: [2.0, 2.0]), [1, 2, 3, 3]),
        ["pixel-shuffle"] = (() => nn.PixelShuffle(2), [1, 8, 3, 3]),
        ["sequential"] = (() => nn.Sequential(("a", nn.Linear(5, 4)), ("b", nn.Tanh()), ("c", nn.Linear(4, 2))), [3, 5]),
    };

    private static IEnumerable<string> ManagedLayerNames => ManagedLayers.Keys;

    [TestCaseSource(nameof(ManagedLayerNames))]
    public void DeepClone_TorchSharpManagedLayer_EqualOutputsAndIndependentTensors(string name)
    {
        var (build, shape) = ManagedLayers[name];
        using var original = build();
        using var input = randn(shape);
        if (original.buffers().Any())
        {
            // Move running statistics away from their defaults, then compare in evaluation mode.
            using var noGrad = no_grad();
            original.train();
            original.call(input).Dispose();
        }

        original.eval();
        using var copy = ModuleCloner.DeepClone(original);

        Assert.That(copy.GetType(), Is.EqualTo(original.GetType()));
        Assert.That(TestModels.StateHash(copy), Is.EqualTo(TestModels.StateHash(original)));
        Assert.That(TestModels.Output(copy, input), Is.EqualTo(TestModels.Output(original, input)));
        Assert.That(copy.parameters().Select(p => p.Handle).Intersect(original.parameters().Select(p => p.Handle)), Is.Empty);
        Assert.That(copy.buffers().Select(b => b.Handle).Intersect(original.buffers().Select(b => b.Handle)), Is.Empty);
    }

    [Test]
    public void ConvTranspose_LoadsWithoutItsArchitecture_AndCountsItsMacs()
    {
        using var model = nn.Sequential(("up", nn.ConvTranspose2d(3, 4, (3, 3), (2, 2), (1, 1), (1, 1), (1, 1))), ("relu", nn.ReLU()));
        using var input = randn(2, 3, 5, 5);
        using var stream = new MemoryStream();
        CompressedModel.Save(model, stream);
        stream.Position = 0;
        using var loaded = CompressedModel.Load(stream);

        var up = (ConvTranspose2d)loaded.named_children().First().module;
        Assert.That(up.output_padding, Is.EqualTo(new long[] { 1, 1 }));
        Assert.That(TestModels.Output(loaded, input), Is.EqualTo(TestModels.Output(model, input)));
        // Per sample: 3·5·5 input elements, each times 4 output channels × 3·3 taps.
        Assert.That(ModelMetrics.CountMacsPerLayer(model, input)["up"], Is.EqualTo(75 * 4 * 9));
    }

    [Test]
    public void DeepClone_EmbeddingClassifier_RunsAndMatches()
    {
        // The smallest case that used to crash the process: a copy around the wrong native handle.
        using var model = nn.Sequential(("embed", nn.Embedding(100, 8)), ("flat", nn.Flatten()), ("head", nn.Linear(32, 3)));
        using var tokens = randint(0, 100, [5, 4], dtype: ScalarType.Int64);
        using var copy = ModuleCloner.DeepClone(model);

        Assert.That(TestModels.Output(copy, tokens), Is.EqualTo(TestModels.Output(model, tokens)));
    }

    [Test]
    public void DeepClone_UnregisteredNativeModule_ThrowsUnsupportedModelExceptionNamingTheLayer()
    {
        using var model = new BagModel();
        string before = TestModels.StateHash(model);

        var ex = Assert.Throws<UnsupportedModelException>(() => ModuleCloner.DeepClone(model));

        Assert.That(ex!.LayerName, Is.EqualTo("bag"));
        Assert.That(ex.LayerType, Is.EqualTo(nameof(Transformer)));
        Assert.That(ex.Message, Does.Contain("'bag'").And.Contain(nameof(LayerRegistry)));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
    }

    [Test]
    public void Pipeline_TokenIdsThroughEmbeddingAndGru_MeasuresAndQuantizes()
    {
        manual_seed(7);
        using var model = new GruClassifier();
        using var tokens = randint(0, 50, [64, 6], dtype: ScalarType.Int64);
        string before = TestModels.StateHash(model);

        var result = QuantizeOnItsOwnPredictions(model, tokens, new LatencyOptions { Warmup = 1, Repeats = 3 });
        using var compressed = result.Model;

        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
        Assert.That(result.Report.Baseline.Accuracy, Is.EqualTo(1.0));
        Assert.That(result.Report.Baseline.Macs, Is.GreaterThan(0));
        Assert.That(result.Report.Steps.Single().Accepted, Is.True);
        Assert.That(compressed.modules().OfType<QuantizedLinear>().Count(), Is.EqualTo(1));
        Assert.That(result.Report.Final.SizeBytes, Is.LessThan(result.Report.Baseline.SizeBytes));
    }

    [Test]
    public void CountMacsPerLayer_RecurrentAndTransformerLayers_CountedFromTheirShapes()
    {
        using var gru = new GruClassifier();
        using var tokens = zeros([1, 6], dtype: ScalarType.Int64);
        var macs = ModelMetrics.CountMacsPerLayer(gru, tokens);
        // GRU(8 → 12): 3 gates × 12 × (8 + 12) per token, 6 tokens; the head 12 × 3; an embedding multiplies nothing.
        Assert.That(macs["gru"], Is.EqualTo(6 * 3 * 12 * (8 + 12)));
        Assert.That(macs["head"], Is.EqualTo(36));
        Assert.That(macs.ContainsKey("embed"), Is.False);

        using var encoder = new EncoderClassifier();
        using var sequence = zeros([1, 5], dtype: ScalarType.Int64);
        // Per layer, 5 tokens of width 8: projections 5·4·8², scores and mix 2·5²·8, feed-forward 5·2·8·16.
        Assert.That(ModelMetrics.CountMacsPerLayer(encoder, sequence)["encoder"], Is.EqualTo(2 * ((5 * 4 * 64) + (2 * 25 * 8) + (5 * 2 * 8 * 16))));
    }

    [Test]
    public void Pipeline_TransformerEncoderClassifier_CopiesMeasuresAndSaves()
    {
        manual_seed(5);
        using var model = new EncoderClassifier();
        using var tokens = randint(0, 30, [48, 5], dtype: ScalarType.Int64);
        string before = TestModels.StateHash(model);

        var result = QuantizeOnItsOwnPredictions(model, tokens, new LatencyOptions { Enabled = false });
        using var compressed = result.Model;

        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
        Assert.That(result.Report.Baseline.Accuracy, Is.EqualTo(1.0));
        Assert.That(result.Report.Baseline.Macs, Is.EqualTo(2 * ((5 * 4 * 64) + (2 * 25 * 8) + (5 * 2 * 8 * 16)) + (8 * 4)));
        using var stream = new MemoryStream();
        CompressedModel.Save(compressed, stream);
        stream.Position = 0;
        using var architecture = new EncoderClassifier();
        using var loaded = CompressedModel.Load(stream, architecture);
        Assert.That(TestModels.Output(loaded, tokens), Is.EqualTo(TestModels.Output(compressed, tokens)));
    }

    [Test]
    public void ThirdPartyKind_RegisteredDescriptor_CopiesStoresAndCountsMacs()
    {
        LayerRegistry.Register(new ScaledLinearDescriptor());
        try
        {
            using var model = nn.Sequential(("scaled", new ScaledLinear(6, 4, 2.5)), ("relu", nn.ReLU()));
            using var input = randn(3, 6);
            using var copy = ModuleCloner.DeepClone(model);
            Assert.That(TestModels.Output(copy, input), Is.EqualTo(TestModels.Output(model, input)));
            Assert.That(((ScaledLinear)copy.named_children().First().module).Scale, Is.EqualTo(2.5));

            using var stream = new MemoryStream();
            CompressedModel.Save(model, stream);
            stream.Position = 0;
            using var loaded = CompressedModel.Load(stream);
            Assert.That(TestModels.Output(loaded, input), Is.EqualTo(TestModels.Output(model, input)));

            Assert.That(ModelMetrics.CountMacsPerLayer(model, input)["scaled"], Is.EqualTo(24 + 4));
        }
        finally
        {
            Assert.That(LayerRegistry.Unregister(typeof(ScaledLinear)), Is.True);
        }
    }

    [Test]
    public void Register_DuplicateTypeOrBuiltInRemoval_Refused()
    {
        Assert.Throws<InvalidOperationException>(() => LayerRegistry.RegisterFactory(() => nn.Linear(1, 1)));
        Assert.That(LayerRegistry.Unregister(typeof(GRU)), Is.False);
        Assert.That(LayerRegistry.Find(nn.Linear(1, 1))!.Id, Is.EqualTo("torch.nn.Linear"));
    }

    [Test]
    public void Load_UnregisteredKindInFile_InvalidDataExceptionNamingTheKind()
    {
        LayerRegistry.Register(new ScaledLinearDescriptor());
        using var stream = new MemoryStream();
        try
        {
            using var model = nn.Sequential(("scaled", new ScaledLinear(2, 2, 1.0)));
            CompressedModel.Save(model, stream);
        }
        finally
        {
            LayerRegistry.Unregister(typeof(ScaledLinear));
        }

        stream.Position = 0;
        var ex = Assert.Throws<InvalidDataException>(() => CompressedModel.Load(stream));
        Assert.That(ex!.Message, Does.Contain("tests.ScaledLinear"));
    }

    [Test]
    public void FallbackCloner_PinnedToTorchSharpVersion_NativeWrappersAllHaveDescriptorsOrAreKnown()
    {
        // The reflection fallback reads TorchSharp 0.107's private fields; a new version must be checked again.
        Assert.That(typeof(nn.Module).Assembly.GetName().Version!.ToString(3), Is.EqualTo("0.107.0"));
        var unregistered = typeof(nn.Module).Assembly.GetTypes()
            .Where(t => typeof(nn.Module).IsAssignableFrom(t) && !t.IsAbstract && ModuleCloner.IsNativeWrapper(t))
            .Where(t => LayerRegistry.Descriptors.All(d => d.ModuleType != t))
            .Select(t => t.Name)
            .Order()
            .ToList();
        Assert.That(unregistered, Is.EqualTo(new[] { "HookableModule`2", "Transformer" }));
    }

    /// <summary>Dynamic int8 through a pipeline, the labels being the model's own predictions (so accuracy is agreement).</summary>
    private static CompressionResult QuantizeOnItsOwnPredictions(nn.Module<Tensor, Tensor> model, Tensor tokens, LatencyOptions latency)
    {
        using var labels = model.call(tokens).argmax(1);
        var data = new ModelCompression.Data.TensorDataset(tokens, labels);
        return CompressionPipeline.Create()
            .AddPostTrainingQuantization(QuantizationMode.DynamicInt8)
            .WithAccuracyCheck(1.0, AccuracyCheckPolicy.SkipStep)
            .WithLatencyMeasurement(latency)
            .Build()
            .Run(model, new CompressionData(data, data));
    }

    private static float[] Run(nn.Module module, string name)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        manual_seed(3);
        var x = randn(3, 2, 8);
        Tensor y = module switch
        {
            GRU gru => gru.call(randn(3, 2, 4)).Item1,
            LSTM lstm => lstm.call(randn(3, 2, 4)).Item1,
            RNN rnn => rnn.call(randn(3, 2, 4)).Item1,
            GRUCell cell => cell.call(randn(3, 4), randn(3, 6)),
            LSTMCell cell => cell.call(randn(3, 4), (randn(3, 5), randn(3, 5))).Item2,
            RNNCell cell => cell.call(randn(3, 4), randn(3, cell.state_dict()["weight_hh"].shape[1])),
            MultiheadAttention mha when name == "attention-kv" => mha.call(x, randn(4, 2, 6), randn(4, 2, 6), need_weights: false).Item1,
            MultiheadAttention mha => mha.call(x, x, x, need_weights: false).Item1,
            TransformerEncoderLayer l => l.call(x),
            TransformerEncoder e => e.call(x),
            TransformerDecoderLayer d => d.call(x, randn(4, 2, 8)),
            TransformerDecoder d => d.call(x, randn(4, 2, 8)),
            Embedding e => e.call(randint(0, 20, [3, 5], dtype: ScalarType.Int64)),
            EmbeddingBag bag => bag.call(tensor(new long[] { 0, 3, 5, 3, 3, 7, 19, 0, 1 }), tensor(new long[] { 0, 2, 4, 6, 9 }), null),
            Conv1d c => c.call(randn(2, 4, 9)),
            Conv3d c => c.call(randn([1, 2, 4, 4, 4])),
            GroupNorm g => g.call(randn([2, 6, 3])),
            _ => throw new ArgumentException(name),
        };
        return y.contiguous().data<float>().ToArray();
    }

    /// <summary>A user module holding one layer of any kind in a field typed as the base module.</summary>
    private sealed class Holder : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module layer;

        public Holder(nn.Module layer, string name)
            : base("Holder_" + name)
        {
            this.layer = layer;
            RegisterComponents();
        }

        public nn.Module Layer => layer;

        public override Tensor forward(Tensor input) => input;
    }

    [Test]
    public void RecurrentCells_CountTheirMultiplyAddsPerStep()
    {
        // gates × hidden × (input + hidden) per sample and step (the counts are per sample of the batch of 3):
        // 3·6·(4+6), 4·5·(4+5), 1·5·(4+5).
        using var model = new CellSteps();
        using var input = randn(3, 4);
        var macs = ModelMetrics.CountMacsPerLayer(model, input);
        Assert.That(macs["gru"], Is.EqualTo(3 * 6 * (4 + 6)));
        Assert.That(macs["lstm"], Is.EqualTo(4 * 5 * (4 + 5)));
        Assert.That(macs["rnn"], Is.EqualTo(1 * 5 * (4 + 5)));
    }

    private sealed class CellSteps : nn.Module<Tensor, Tensor>
    {
        private readonly GRUCell gru = nn.GRUCell(4, 6);
        private readonly LSTMCell lstm = nn.LSTMCell(4, 5);
        private readonly RNNCell rnn = nn.RNNCell(4, 5, nn.NonLinearities.ReLU);

        public CellSteps()
            : base(nameof(CellSteps)) => RegisterComponents();

        public override Tensor forward(Tensor input) => cat([gru.call(input, null!), lstm.call(input, (zeros(input.shape[0], 5), zeros(input.shape[0], 5))).Item1, rnn.call(input, null!)], 1);
    }

    private sealed class BagModel : nn.Module<Tensor, Tensor>
    {
        // TorchSharp's whole Transformer: natively implemented, with no descriptor (the field keeps its old name).
        private readonly Transformer bag = nn.Transformer(8, 2, 1, 1, 16);

        public BagModel()
            : base(nameof(BagModel)) => RegisterComponents();

        public override Tensor forward(Tensor input) => input;
    }

    private sealed class GruClassifier : nn.Module<Tensor, Tensor>
    {
        private readonly Embedding embed = nn.Embedding(50, 8);
        private readonly GRU gru = nn.GRU(8, 12, batchFirst: true);
        private readonly nn.Module<Tensor, Tensor> head = nn.Linear(12, 3);

        public GruClassifier()
            : base(nameof(GruClassifier)) => RegisterComponents();

        public override Tensor forward(Tensor tokens)
        {
            using var scope = NewDisposeScope();
            var (output, _) = gru.call(embed.call(tokens));
            return head.call(output.select(1, -1)).MoveToOuterDisposeScope();
        }
    }

    /// <summary>Token ids [N, L] → embedding → TorchSharp's TransformerEncoder (time-major) → mean over time → Linear.</summary>
    private sealed class EncoderClassifier : nn.Module<Tensor, Tensor>
    {
        private readonly Embedding embed = nn.Embedding(30, 8);
        private readonly TransformerEncoder encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, 0.0), 2);
        private readonly nn.Module<Tensor, Tensor> head = nn.Linear(8, 4);

        public EncoderClassifier()
            : base(nameof(EncoderClassifier)) => RegisterComponents();

        public override Tensor forward(Tensor tokens)
        {
            using var scope = NewDisposeScope();
            var hidden = encoder.call(embed.call(tokens).transpose(0, 1));
            return head.call(hidden.mean([0])).MoveToOuterDisposeScope();
        }
    }

    /// <summary>A third-party layer kind whose constructor takes settings: y = scale · (W x + b).</summary>
    internal sealed class ScaledLinear : nn.Module<Tensor, Tensor>
    {
        private readonly Parameter weight;
        private readonly Parameter bias;

        public ScaledLinear(long inputs, long outputs, double scale)
            : base(nameof(ScaledLinear))
        {
            weight = new Parameter(randn(outputs, inputs));
            bias = new Parameter(zeros(outputs));
            Scale = scale;
            RegisterComponents();
        }

        public double Scale { get; }

        public long Inputs => weight.shape[1];

        public long Outputs => weight.shape[0];

        public override Tensor forward(Tensor input) => nn.functional.linear(input, weight, bias).mul(Scale);
    }

    internal sealed class ScaledLinearDescriptor() : LayerDescriptor("tests.ScaledLinear", typeof(ScaledLinear))
    {
        public override LayerAttributes GetAttributes(nn.Module module)
        {
            var s = (ScaledLinear)module;
            return new LayerAttributes().Set("in", s.Inputs).Set("out", s.Outputs).Set("scale", s.Scale);
        }

        public override nn.Module Create(LayerAttributes attributes, int version) =>
            new ScaledLinear(attributes.GetInt64("in", 1, 1 << 20), attributes.GetInt64("out", 1, 1 << 20), attributes.GetDouble("scale"));

        public override long? CountMacs(nn.Module module, Tensor input, Tensor output) => (output.numel() * ((ScaledLinear)module).Inputs) + output.numel();
    }
}
