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

/// <summary>Post-training quantization of models with Embedding layers (the step's embedding handling; the layer has its own fixture).</summary>
[TestFixture]
public sealed class PostTrainingQuantizationEmbeddingTests
{
    private const int Vocabulary = 100;
    private const int Tokens = 4;

    private static LayerSelection WithEmbeddings => new() { Types = [typeof(Linear), typeof(Conv2d), typeof(Embedding)] };

    private static CompressionContext Context(nn.Module<Tensor, Tensor> original, IBatchSource data, CapturingLogger? logger = null) =>
        new(new CompressionData(data, data) { Evaluator = new AccuracyEvaluator() }, original, logger: logger);

    /// <summary>Token ids [count, <see cref="Tokens"/>] labelled with the float model's own predictions.</summary>
    private static TensorDataset OwnPredictions(nn.Module<Tensor, Tensor> model, int count, int seed)
    {
        using var generator = new Generator((ulong)seed);
        var ids = randint(0, Vocabulary, [count, Tokens], generator: generator, dtype: ScalarType.Int64);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        model.eval();
        var labels = model.call(ids).argmax(1).DetachFromDisposeScope();
        return new TensorDataset(ids, labels);
    }

    /// <summary>Embedding(100, 16) → Flatten → Linear(64, 5), random weights from a seed.</summary>
    private static nn.Module<Tensor, Tensor> Bag(int seed)
    {
        random.manual_seed(seed);
        var model = nn.Sequential(("embedding", nn.Embedding(Vocabulary, 16)), ("flatten", nn.Flatten()), ("fc", nn.Linear(16 * Tokens, 5)));
        model.eval();
        return model;
    }

    private static double Agreement(nn.Module<Tensor, Tensor> a, nn.Module<Tensor, Tensor> b, Tensor ids)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        // Evaluation mode: a copy of a transformer layer gets TorchSharp's default dropout, which it cannot read.
        a.eval();
        b.eval();
        var same = a.call(ids).argmax(1).eq(b.call(ids).argmax(1));
        return same.to(ScalarType.Float64).mean().item<double>();
    }

    [TestCase(QuantizationMode.WeightOnlyInt8, 8, 0.35)]
    [TestCase(QuantizationMode.WeightOnlyInt4, 4, 0.2)]
    public void Apply_WeightOnly_QuantizesTheEmbeddingAndTheLinear(QuantizationMode mode, int bits, double maxSizeRatio)
    {
        using var original = Bag(1);
        using var model = ModuleCloner.DeepClone(original);
        using var data = OwnPredictions(original, 64, 2);
        using var test = OwnPredictions(original, 2000, 3);
        var context = Context(original, data);

        using var result = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = mode, Layers = WithEmbeddings }).Apply(model, context);

        var embedding = (QuantizedEmbedding)ModuleTree.GetSubmodule(result, "embedding");
        var fc = (QuantizedLinear)ModuleTree.GetSubmodule(result, "fc");
        Assert.That(embedding.WeightBits, Is.EqualTo(bits));
        Assert.That(fc.WeightBits, Is.EqualTo(bits));
        Assert.That(embedding.Mode, Is.EqualTo(mode));
        Assert.That(embedding.SqnrDb, Is.GreaterThan(bits == 8 ? 38 : 14));
        if (bits == 4)
        {
            Assert.That(embedding.WeightGranularity.ToString(), Is.EqualTo("per-group(16)"), "16 columns, fewer than the default group of 64");
            Assert.That(context.Notes, Has.Some.Contains("one group per row").And.Contains("embedding (per-group(16))"));
        }

        Assert.That(context.Notes, Has.Some.Contains("2 layer(s) quantized").And.Contains("embedding"));
        double agreement = Agreement(original, result, test.Inputs);
        double ratio = (double)ModelMetrics.SizeInBytes(result) / ModelMetrics.SizeInBytes(original);
        TestContext.Out.WriteLine($"{mode}: agreement {agreement:P2}, file {ModelMetrics.SizeInBytes(result):N0} / {ModelMetrics.SizeInBytes(original):N0} B = {ratio:0.000}, table SQNR {embedding.SqnrDb:0.0} dB");
        Assert.That(agreement, Is.GreaterThanOrEqualTo(bits == 8 ? 0.98 : 0.9));
        Assert.That(ratio, Is.LessThan(maxSizeRatio));
    }

    [TestCase(QuantizationMode.DynamicInt8, "dynamic")]
    [TestCase(QuantizationMode.StaticInt8, "static")]
    public void Apply_DynamicOrStatic_LeavesTheEmbeddingInFloatWithTheReason(QuantizationMode mode, string word)
    {
        using var original = Bag(4);
        using var model = ModuleCloner.DeepClone(original);
        using var data = OwnPredictions(original, 64, 5);
        string before = TestModels.StateHash(ModuleTree.GetSubmodule(original, "embedding"));
        var context = Context(original, data);

        using var result = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = mode, Layers = WithEmbeddings, CalibrationBatches = 1 }).Apply(model, context);

        Assert.That(ModuleTree.GetSubmodule(result, "embedding"), Is.TypeOf<Embedding>());
        Assert.That(TestModels.StateHash(ModuleTree.GetSubmodule(result, "embedding")), Is.EqualTo(before));
        Assert.That(ModuleTree.GetSubmodule(result, "fc"), Is.TypeOf<QuantizedLinear>());
        Assert.That(context.Notes, Has.One.Contains("left in float (unsupported): embedding (Embedding: use weight-only int8/int4; " + word + " quantization leaves lookups in float, as PyTorch does)"));
    }

    [Test]
    public void Apply_DefaultSelection_LeavesEmbeddingsAlone()
    {
        using var original = Bag(6);
        using var model = ModuleCloner.DeepClone(original);
        using var data = OwnPredictions(original, 32, 7);
        var context = Context(original, data);

        using var result = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt8 }).Apply(model, context);

        Assert.That(ModuleTree.GetSubmodule(result, "embedding"), Is.TypeOf<Embedding>());
        Assert.That(ModuleTree.GetSubmodule(result, "fc"), Is.TypeOf<QuantizedLinear>());
    }

    [TestCase(QuantizationMode.WeightOnlyInt8, 0.97)]
    [TestCase(QuantizationMode.WeightOnlyInt4, 0.9)]
    public void Apply_WeightOnly_EmbeddingTransformerClassifier_AgreesWithFloat(QuantizationMode mode, double minAgreement)
    {
        using var original = new TokenClassifier(8);
        using var model = ModuleCloner.DeepClone(original);
        using var data = OwnPredictions(original, 64, 9);
        using var test = OwnPredictions(original, 1000, 10);
        var context = Context(original, data);

        using var result = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = mode, Layers = WithEmbeddings }).Apply(model, context);

        Assert.That(ModuleTree.GetSubmodule(result, "embed"), Is.TypeOf<QuantizedEmbedding>());
        Assert.That(ModuleTree.GetSubmodule(result, "head"), Is.TypeOf<QuantizedLinear>());
        Assert.That(ModuleTree.GetSubmodule(result, "encoder"), Is.TypeOf<TransformerEncoderLayer>());
        double agreement = Agreement(original, result, test.Inputs);
        TestContext.Out.WriteLine($"{mode}: agreement with float {agreement:P2}; file {ModelMetrics.SizeInBytes(result):N0} / {ModelMetrics.SizeInBytes(original):N0} B");
        Assert.That(agreement, Is.GreaterThanOrEqualTo(minAgreement));

        // The whole quantized model saves and loads to identical outputs.
        using var stream = new MemoryStream();
        CompressedModel.Save(result, stream);
        stream.Position = 0;
        using var architecture = new TokenClassifier(99);
        using var loaded = CompressedModel.Load(stream, architecture);
        using var ids = test.Inputs.narrow(0, 0, 50);
        Assert.That(TestModels.Output(loaded, ids), Is.EqualTo(TestModels.Output(result, ids)));
    }

    [Test]
    public void Apply_EmbeddingInFieldTypedEmbedding_RoundedInPlaceOrRefusedLikeFixedTypeLinears()
    {
        using var original = new FixedEmbeddingClassifier(11);
        using var model = ModuleCloner.DeepClone(original);
        using var data = OwnPredictions(original, 32, 12);
        var logger = new CapturingLogger();
        var context = Context(original, data, logger);

        var result = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt8, Layers = WithEmbeddings }).Apply(model, context);

        Assert.That(ModuleTree.GetSubmodule(result, "embed"), Is.TypeOf<Embedding>());
        Assert.That(ModuleTree.GetSubmodule(result, "head"), Is.TypeOf<QuantizedLinear>());
        Assert.That(context.Notes, Has.One.Contains("rounded in place to int8").And.Contains("'embed'").And.Contains("typed Embedding").And.Contains("QuantizedEmbedding"));
        Assert.That(logger.Warnings, Has.One.Contains("'embed'"));
        var table = ((Embedding)ModuleTree.GetSubmodule(result, "embed")).weight!.detach().data<float>().ToArray();
        Assert.That(WeightGrid.Find(table, table.Length / 8)?.MaxLevel, Is.EqualTo(127), "the table lies on an int8 grid, one scale per row, which the file stores");

        var failing = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, Layers = WithEmbeddings, FixedTypeLayers = FixedTypeLayers.Fail });
        using var other = ModuleCloner.DeepClone(original);
        var ex = Assert.Throws<UnsupportedModelException>(() => failing.Apply(other, Context(original, data)));
        Assert.That(ex!.LayerName, Is.EqualTo("embed"));
        Assert.That(ex.Message, Does.Contain("QuantizedEmbedding").And.Contain("PostTrainingQuantizationOptions.FixedTypeLayers"));
        Assert.That(ModuleTree.GetSubmodule(other, "head"), Is.TypeOf<Linear>(), "nothing changed");
    }

    [Test]
    public void Apply_NaNInTheTable_ThrowsNamingTheLayerBeforeAnythingChanges()
    {
        using var original = Bag(13);
        using var model = ModuleCloner.DeepClone(original);
        using (no_grad())
        {
            using var w = ((Embedding)ModuleTree.GetSubmodule(model, "embedding")).weight!;
            w.narrow(0, 7, 1).narrow(1, 3, 1).fill_(float.NaN);
        }

        using var data = OwnPredictions(original, 16, 14);
        string before = TestModels.StateHash(model);
        var step = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, Layers = WithEmbeddings });

        var ex = Assert.Throws<ArgumentException>(() => step.Apply(model, Context(original, data)));

        Assert.That(ex!.Message, Does.Contain("'embedding'").And.Contain("NaN"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
        Assert.That(ModuleTree.GetSubmodule(model, "fc"), Is.TypeOf<Linear>());
    }

    [TestCase(QuantizationMode.WeightOnlyInt8)]
    [TestCase(QuantizationMode.WeightOnlyInt4)]
    public void Apply_LeavesNoLiveTensorsBeyondTheNewLayers(QuantizationMode mode)
    {
        using var original = Bag(15);
        using var data = OwnPredictions(original, 32, 16);
        var step = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = mode, Layers = WithEmbeddings });
        using (var warm = ModuleCloner.DeepClone(original))
        {
            step.Apply(warm, Context(original, data)).Dispose();
        }

        using var model = ModuleCloner.DeepClone(original);
        int oldState = model.state_dict().Count;
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long before = TestModels.SettledTensorCount();
        using var result = step.Apply(model, Context(original, data));
        GC.Collect();
        GC.WaitForPendingFinalizers();

        Assert.That(Tensor.TotalCount - before, Is.EqualTo(result.state_dict().Count - oldState));
    }

    [Test]
    public void QuantizationAwareTraining_SelectedEmbedding_StaysInFloatAndIsNoted()
    {
        using var original = Bag(17);
        using var model = ModuleCloner.DeepClone(original);
        using var data = OwnPredictions(original, 64, 18);
        string before = TestModels.StateHash(ModuleTree.GetSubmodule(original, "embedding"));
        var context = Context(original, data);
        var step = new QuantizationAwareTrainingStep(new QuantizationAwareTrainingOptions
        {
            Layers = WithEmbeddings,
            Training = new TrainingOptions { Epochs = 1, BatchSize = 16, LearningRate = 0.001 },
        });

        using var result = step.Apply(model, context);

        Assert.That(ModuleTree.GetSubmodule(result, "embedding"), Is.TypeOf<Embedding>());
        Assert.That(ModuleTree.GetSubmodule(result, "fc"), Is.TypeOf<QuantizedLinear>());
        Assert.That(context.Notes, Has.Some.Contains("embedding (Embedding: use post-training weight-only int8/int4"));
        TestContext.Out.WriteLine(string.Join(Environment.NewLine, context.Notes));
        Assert.That(TestModels.StateHash(ModuleTree.GetSubmodule(original, "embedding")), Is.EqualTo(before));
    }

    /// <summary>Token ids [N, 4] → embedding (a replaceable field) → TorchSharp's TransformerEncoderLayer (time-major) → mean over time → Linear.</summary>
    private sealed class TokenClassifier : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module<Tensor, Tensor> embed;
        private readonly TransformerEncoderLayer encoder;
        private readonly nn.Module<Tensor, Tensor> head;

        public TokenClassifier(int seed)
            : base(nameof(TokenClassifier))
        {
            random.manual_seed(seed);
            embed = nn.Embedding(Vocabulary, 32);
            encoder = nn.TransformerEncoderLayer(32, 4, 64, 0.0);
            head = nn.Linear(32, 6);
            RegisterComponents();
        }

        public override Tensor forward(Tensor tokens)
        {
            using var scope = NewDisposeScope();
            var hidden = encoder.call(embed.call(tokens).transpose(0, 1));
            return head.call(hidden.mean([0])).MoveToOuterDisposeScope();
        }
    }

    /// <summary>As users often write it: the embedding in a field typed <see cref="Embedding"/>, which a QuantizedEmbedding cannot fill.</summary>
    private sealed class FixedEmbeddingClassifier : nn.Module<Tensor, Tensor>
    {
        private readonly Embedding embed;
        private readonly nn.Module<Tensor, Tensor> head;

        public FixedEmbeddingClassifier(int seed)
            : base(nameof(FixedEmbeddingClassifier))
        {
            random.manual_seed(seed);
            embed = nn.Embedding(Vocabulary, 8);
            head = nn.Linear(8 * Tokens, 5);
            RegisterComponents();
        }

        public override Tensor forward(Tensor tokens)
        {
            using var scope = NewDisposeScope();
            return head.call(embed.call(tokens).flatten(1)).MoveToOuterDisposeScope();
        }
    }
}
