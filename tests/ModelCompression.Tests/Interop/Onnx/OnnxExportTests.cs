using Microsoft.ML.OnnxRuntime;
using ModelCompression.Factorization;
using ModelCompression.Interop.Onnx;
using ModelCompression.Pruning;
using ModelCompression.Quantization;
using ModelCompression.Samples;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Interop.Onnx;

[TestFixture]
public sealed class OnnxExportTests
{
    private static readonly Dictionary<ZooModel, (nn.Module<Tensor, Tensor> Model, MnistSplit Split)> Trained = [];

    public static IEnumerable<TestCaseData> Cases() =>
        from model in new[] { ZooModel.LeNet300100, ZooModel.LeNet5, ZooModel.SmallResNet }
        from variant in new[] { "fp32", "pruned", "low-rank", "fp16", "int8-dynamic", "int8-static", "int4-weight-only", "int4-hqq", "int4-awq", "int4-awq-hqq" }
        select new TestCaseData(model, variant).SetName($"Export_{model}_{variant}_MatchesOnnxRuntime");

    [OneTimeTearDown]
    public void TearDown()
    {
        foreach (var (model, split) in Trained.Values)
        {
            model.Dispose();
            split.Dispose();
        }

        Trained.Clear();
    }

    /// <summary>The options every export of the zoo needs: the residual block of SmallResNet (a Samples type) as conv-BN-ReLU-conv-BN, + input, ReLU.</summary>
    public static OnnxExportOptions ZooOptions(OnnxInt8Form form = OnnxInt8Form.Integer)
    {
        var options = new OnnxExportOptions { Int8Form = form };
        options.CustomModules[typeof(ResidualBlock)] = OnnxEmitters.Residual(["conv1", "bn1", "relu1", "conv2", "bn2"], "relu2");
        return options;
    }

    [TestCaseSource(nameof(Cases))]
    public void Export_ZooModelVariant_MatchesOnnxRuntime(ZooModel kind, string variant)
    {
        var (baseline, split) = Load(kind);
        using var compressed = Compress(baseline, split, variant);
        long[] sampleShape = kind == ZooModel.LeNet300100 ? [784] : [1, 28, 28];
        var bytes = OnnxExporter.ToBytes(compressed, sampleShape, ZooOptions());

        var (inputs, _) = split.Test.GetBatches((int)split.Test.Count).First();
        float[] expected;
        using (no_grad())
        {
            compressed.eval();
            using var output = compressed.call(inputs);
            expected = output.data<float>().ToArray();
        }

        var actual = RunOnnxPerSample(bytes, inputs);
        Assert.That(actual, Has.Length.EqualTo(expected.Length));
        double scale = expected.Max(v => Math.Abs(v));
        double maxDifference = actual.Zip(expected).Max(p => Math.Abs(p.First - p.Second));
        double agreement = Agreement(actual, expected, 10);
        TestContext.Out.WriteLine($"{kind} {variant}: {bytes.Length:N0} bytes of ONNX, agreement {agreement:P2}, max logit difference {maxDifference:G3} (largest logit {scale:G3})");
        // ONNX Runtime runs each digit alone (batch 1): its DynamicQuantizeLinear ranges a whole call, the library each row.
        if (variant is "fp32" or "pruned" or "low-rank")
        {
            Assert.That(maxDifference / scale, Is.LessThanOrEqualTo(1e-5), "float32 layers: ONNX Runtime equals TorchSharp within 1e-5 relative");
        }
        else if (variant is "int4-weight-only" or "int4-hqq" or "int4-awq" or "int4-awq-hqq")
        {
            // The library's int4 kernel rounds activations to 7 bits per weight group; ONNX Runtime multiplies them in float.
            Assert.That(agreement, Is.GreaterThanOrEqualTo(0.995), "the same predictions on ≥ 99.5% of the 2,000 test digits");
        }
        else
        {
            Assert.That(agreement, Is.GreaterThanOrEqualTo(0.999), "the same predictions on ≥ 99.9% of the 2,000 test digits");
        }
    }

    [Test]
    public void Export_Int8QdqForm_RunsAndAgreesOnWholeBatches()
    {
        // The QDQ form rounds each row as the library does, so it agrees even when ONNX Runtime runs 2,000 digits at once.
        var (baseline, split) = Load(ZooModel.LeNet5);
        using var compressed = Compress(baseline, split, "int8-dynamic");
        var bytes = OnnxExporter.ToBytes(compressed, [1, 28, 28], ZooOptions(OnnxInt8Form.Qdq));
        var (inputs, _) = split.Test.GetBatches((int)split.Test.Count).First();
        using var expected = compressed.call(inputs);
        Assert.That(Agreement(RunOnnx(bytes, inputs), expected.data<float>().ToArray(), 10), Is.GreaterThanOrEqualTo(0.999));
    }

    [TestCase(new long[] { 5 })]
    [TestCase(new long[] { 2, 2 })]
    [TestCase(new long[] { 0 })]
    public void Export_SampleShapeTheModelRejects_IsAnArgumentExceptionAndWritesNothing(long[] sampleShape)
    {
        using var model = nn.Sequential(("fc", nn.Linear(4, 4)), ("relu", nn.ReLU()));
        string path = Path.Combine(Path.GetTempPath(), $"mc-onnx-{Guid.NewGuid():N}.onnx");
        var ex = Assert.Throws<ArgumentException>(() => OnnxExporter.Export(model, path, sampleShape));
        Assert.That(ex!.ParamName, Is.EqualTo("sampleShape"));
        Assert.That(ex.Message, Does.Contain($"[{string.Join(", ", sampleShape)}]"));
        Assert.That(File.Exists(path), Is.False);
    }

    [Test]
    public void Export_UnsupportedModule_NamesItAndWritesNothing()
    {
        using var model = nn.Sequential(("fc", nn.Linear(4, 4)), ("odd", new Doubler()));
        string path = Path.Combine(Path.GetTempPath(), $"mc-onnx-{Guid.NewGuid():N}.onnx");
        var ex = Assert.Throws<UnsupportedModelException>(() => OnnxExporter.Export(model, path, [4]));
        Assert.That(ex!.Message, Does.Contain("'odd'").And.Contain("CustomModules"));
        Assert.That(ex.LayerName, Is.EqualTo("odd"));
        Assert.That(ex.LayerType, Is.EqualTo(nameof(Doubler)));
        Assert.That(File.Exists(path), Is.False);
    }

    [Test]
    public void Export_WritesAFileOnnxRuntimeLoads()
    {
        var (baseline, _) = Load(ZooModel.LeNet5);
        string path = Path.Combine(Path.GetTempPath(), $"mc-onnx-{Guid.NewGuid():N}.onnx");
        try
        {
            OnnxExporter.Export(baseline, path, [1, 28, 28]);
            using var session = new InferenceSession(path);
            Assert.That(session.InputMetadata.Keys, Is.EqualTo(new[] { "input" }));
            Assert.That(session.OutputMetadata["output"].Dimensions, Is.EqualTo(new[] { -1, 10 }));
        }
        finally
        {
            File.Delete(path);
        }
    }

    /// <summary>Runs an exported model on every sample alone (batch 1, as an application serving requests does).</summary>
    public static float[] RunOnnxPerSample(byte[] model, Tensor inputs)
    {
        using var options = new SessionOptions { IntraOpNumThreads = 2 };
        using var session = new InferenceSession(model, options);
        using var runOptions = new RunOptions();
        var data = inputs.contiguous().data<float>().ToArray();
        long rows = inputs.shape[0];
        long[] shape = [1, .. inputs.shape[1..]];
        int width = (int)(data.Length / rows);
        var outputs = new List<float>();
        for (int r = 0; r < rows; r++)
        {
            using var input = OrtValue.CreateTensorValueFromMemory(data.AsSpan(r * width, width).ToArray(), shape);
            using var results = session.Run(runOptions, ["input"], [input], ["output"]);
            outputs.AddRange(results[0].GetTensorDataAsSpan<float>().ToArray());
        }

        return [.. outputs];
    }

    /// <summary>Runs an exported model on ONNX Runtime's CPU provider.</summary>
    public static float[] RunOnnx(byte[] model, Tensor inputs)
    {
        using var options = new SessionOptions { IntraOpNumThreads = 2 };
        using var session = new InferenceSession(model, options);
        var data = inputs.contiguous().data<float>().ToArray();
        using var input = OrtValue.CreateTensorValueFromMemory(data, inputs.shape);
        using var runOptions = new RunOptions();
        using var results = session.Run(runOptions, ["input"], [input], ["output"]);
        return results[0].GetTensorDataAsSpan<float>().ToArray();
    }

    private static double Agreement(float[] a, float[] b, int classes)
    {
        int rows = a.Length / classes, same = 0;
        for (int r = 0; r < rows; r++)
        {
            same += ArgMax(a.AsSpan(r * classes, classes)) == ArgMax(b.AsSpan(r * classes, classes)) ? 1 : 0;
        }

        return (double)same / rows;
    }

    private static int ArgMax(ReadOnlySpan<float> values)
    {
        int best = 0;
        for (int i = 1; i < values.Length; i++)
        {
            best = values[i] > values[best] ? i : best;
        }

        return best;
    }

    private static (nn.Module<Tensor, Tensor> Model, MnistSplit Split) Load(ZooModel kind)
    {
        if (!Trained.TryGetValue(kind, out var entry))
        {
            var split = MnistDigits.LoadBundled().Split(trainCount: 8000, seed: 0, layout: ModelZoo.Layout(kind));
            var trained = ZooTraining.TrainOrLoad(kind, split, cacheDirectory: Path.Combine(TestContext.CurrentContext.WorkDirectory, "artifacts", "cache"));
            trained.Model.eval();
            entry = (trained.Model, split);
            Trained[kind] = entry;
        }

        return entry;
    }

    private static nn.Module<Tensor, Tensor> Compress(nn.Module<Tensor, Tensor> baseline, MnistSplit split, string variant)
    {
        var context = new CompressionContext(new CompressionData(split.Train, split.Test), baseline);
        var copy = ModelCompression.Modules.ModuleCloner.DeepClone(baseline);
        nn.Module<Tensor, Tensor> result = variant switch
        {
            "fp32" => copy,
            "pruned" => new MagnitudePruningStep(new MagnitudePruningOptions { Sparsity = 0.8, SparseExecution = SparseExecution.Always }).Apply(copy, context),
            "low-rank" => new SvdFactorizationStep(new SvdFactorizationOptions { Rank = RankRule.Ratio(0.5) }).Apply(copy, context),
            "fp16" => new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = QuantizationMode.Float16 }).Apply(copy, context),
            "int8-dynamic" => new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = QuantizationMode.DynamicInt8 }).Apply(copy, context),
            "int8-static" => new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8 }).Apply(copy, context),
            "int4-weight-only" => new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4 }).Apply(copy, context),
            "int4-hqq" => new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, Rounding = WeightRounding.Hqq() }).Apply(copy, context),
            "int4-awq" => new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, Awq = new AwqOptions() }).Apply(copy, context),
            "int4-awq-hqq" => new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, Awq = new AwqOptions(), Rounding = WeightRounding.Hqq() }).Apply(copy, context),
            _ => throw new ArgumentException(variant, nameof(variant)),
        };
        result.eval();
        return result;
    }
}

/// <summary>A module the exporter does not know.</summary>
internal sealed class Doubler : nn.Module<Tensor, Tensor>
{
    public Doubler()
        : base(nameof(Doubler))
    {
    }

    public override Tensor forward(Tensor input) => input * 2;
}
