using ModelCompression.Data;
using ModelCompression.Interop.Onnx;
using ModelCompression.Metrics;
using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Samples;
using ModelCompression.Training;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace ModelCompression.Tests.Modules;

/// <summary>
/// Export, measurement, evaluation and every step leave the caller's module flags as they were: train/eval per
/// submodule (a BatchNorm the user froze inside a training model stays frozen) and requires_grad per parameter.
/// </summary>
[TestFixture]
public sealed class ModuleFlagsTests
{
    private static nn.Module<Tensor, Tensor> MixedFlagsResNet()
    {
        var model = ModelZoo.Create(ZooModel.SmallResNet, 31);
        model.train();
        ModuleTree.GetSubmodule(model, "bn1").eval();
        foreach (var p in ModuleTree.GetSubmodule(model, "conv1").parameters())
        {
            p.requires_grad = false;
        }

        return model;
    }

    private static string Flags(nn.Module model) =>
        string.Join(";", new[] { $"root={model.training}" }
            .Concat(model.named_modules().Select(m => $"{m.name}={m.module.training}"))
            .Concat(model.named_parameters().Select(p => $"{p.name}.grad={p.parameter.requires_grad}")));

    private static TensorDataset Images(int count, int seed)
    {
        using var generator = new Generator((ulong)seed);
        return new TensorDataset(randn([count, 1, 28, 28], generator: generator), randint(0, 10, [count], generator: generator));
    }

    [Test]
    public void Modes_RestoreEveryModulesOwnFlag()
    {
        using var model = MixedFlagsResNet();
        string before = Flags(model);
        Assert.That(before, Does.Contain("bn1=False").And.Contain("bn2=True"), "the fixture mixes flags");

        using (ModuleModes.Evaluating(model))
        {
            Assert.That(model.modules().All(m => !m.training), Is.True);
        }

        Assert.That(Flags(model), Is.EqualTo(before));
        using (ModuleModes.Training(model))
        {
            Assert.That(model.modules().All(m => m.training), Is.True);
        }

        Assert.That(Flags(model), Is.EqualTo(before));
    }

    [Test]
    public void OnnxExport_LeavesTheFlagsAsTheyWere()
    {
        // The case: a model in training mode whose BatchNorm the user froze with eval().
        torch.random.manual_seed(35);
        using var model = nn.Sequential(
            ("conv", nn.Conv2d(1, 4, 3)), ("bn", nn.BatchNorm2d(4)), ("relu", nn.ReLU()), ("flat", nn.Flatten()), ("fc", nn.Linear(4 * 26 * 26, 10)));
        model.train();
        ModuleTree.GetSubmodule(model, "bn").eval();
        string before = Flags(model);

        var bytes = OnnxExporter.ToBytes(model, [1, 28, 28]);

        Assert.That(bytes, Is.Not.Empty);
        Assert.That(Flags(model), Is.EqualTo(before));
    }

    [Test]
    public void MeasurementAndEvaluation_LeaveTheFlagsAsTheyWere()
    {
        using var model = MixedFlagsResNet();
        using var data = Images(16, 32);
        string before = Flags(model);

        using (var sample = zeros(2, 1, 28, 28))
        {
            Assert.That(ModelMetrics.CountMacs(model, sample), Is.GreaterThan(0));
        }

        Assert.That(Flags(model), Is.EqualTo(before), "MACs");
        ModelMetrics.MeasureLatency(model, [1, 28, 28], new LatencyOptions { Warmup = 1, Repeats = 2 });
        Assert.That(Flags(model), Is.EqualTo(before), "latency");
        ModelMetrics.MeasureLatencyPaired(model, model, [1, 28, 28], new LatencyOptions { Warmup = 1, Repeats = 2 });
        Assert.That(Flags(model), Is.EqualTo(before), "latency of the model against itself");
        new AccuracyEvaluator().Evaluate(model, data);
        Assert.That(Flags(model), Is.EqualTo(before), "accuracy");
    }

    private static readonly (string Name, Func<CompressionPipelineBuilder, CompressionPipelineBuilder> Add)[] Steps =
    [
        ("magnitude pruning", b => b.AddMagnitudePruning(0.5)),
        ("structured pruning", b => b.AddStructuredPruning(0.25)),
        ("dynamic int8", b => b.AddPostTrainingQuantization(QuantizationMode.DynamicInt8)),
        ("static int8", b => b.AddPostTrainingQuantization(QuantizationMode.StaticInt8)),
        ("QAT", b => b.AddQuantizationAwareTraining(8, new TrainingOptions { Epochs = 1, BatchSize = 16 })),
        ("SVD", b => b.AddSvdFactorization(0.9)),
        ("clustering", b => b.AddWeightClustering(4)),
        ("distillation", b => b.AddDistillation(1)),
        ("fine-tuning", b => b.AddFineTuning(new TrainingOptions { Epochs = 1, BatchSize = 16 })),
        ("bf16", b => b.AddHalfPrecision()),
        ("depthwise rewrite", b => b.AddDepthwiseSeparableRewrite(0)),
    ];

    private static IEnumerable<TestCaseData> StepCases() => Steps.Select(s => new TestCaseData(s.Name).SetName($"EveryStep_LeavesTheCallersFlags({s.Name})"));

    [TestCaseSource(nameof(StepCases))]
    public void EveryStep_LeavesTheCallersFlags(string step)
    {
        using var model = MixedFlagsResNet();
        using var train = Images(32, 33);
        using var test = Images(16, 34);
        string before = Flags(model);
        var builder = CompressionPipeline.Create()
            .WithLatencyMeasurement(new LatencyOptions { Enabled = false })
            .WithAccuracyCheck(1.0);

        using var result = Steps.Single(s => s.Name == step).Add(builder).Build().Run(model, new CompressionData(train, test));

        Assert.That(Flags(model), Is.EqualTo(before));
    }
}
