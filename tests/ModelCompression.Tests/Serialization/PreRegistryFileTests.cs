using ModelCompression.Quantization;
using ModelCompression.Samples;
using ModelCompression.Serialization;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Serialization;

/// <summary>
/// Files written before the layer registry (by commit b3e969e, with <see cref="WriteFixtures"/>) must still load and
/// give the outputs recorded then: the registry must not change how existing kinds are read.
/// </summary>
[TestFixture]
public sealed class PreRegistryFileTests
{
    private static readonly string[] Names = ["mlp-dynamic-int8", "mlp-pruned-clustered", "lenet5-static-int8", "lenet5-int8wo-fp16", "smallresnet-svd-fp16"];

    private static string Folder => Path.Combine(RepositoryFiles.Root, "tests", "ModelCompression.Tests", "Serialization", "Fixtures");

    [TestCaseSource(nameof(Names))]
    public void Load_FileWrittenBeforeTheRegistry_SameOutputsAsWhenWritten(string name)
    {
        using var model = Load(Path.Combine(Folder, name + ".mcm"), name);
        using var input = Input(name);
        var expected = File.ReadAllBytes(Path.Combine(Folder, name + ".out"));

        var actual = TestModels.Output(model, input);
        var recorded = Enumerable.Range(0, expected.Length / 4).Select(i => BitConverter.ToSingle(expected, i * 4)).ToArray();

        // Not bit for bit: LibTorch picks its float kernels by CPU (AMX and AVX512-FP16 where present), so sums run
        // in another order on another machine. Seen on such a CPU: 1.5e-8 for float32 layers and one float16 step
        // (6.1e-5) for half-precision ones, with outputs near 0.1–0.25; a misread weight moves outputs far more.
        double tolerance = name.EndsWith("fp16", StringComparison.Ordinal) ? 1e-3 : 1e-6;
        Assert.That(actual, Is.EqualTo(recorded).Within(tolerance));
    }

    [TestCaseSource(nameof(Names))]
    public void Save_LoadedPreRegistryFile_WritesTheSameBytes(string name)
    {
        // Kinds with an encoding of their own are written as before, so a file saved again is byte-identical.
        string path = Path.Combine(Folder, name + ".mcm");
        using var model = Load(path, name);
        using var stream = new MemoryStream();
        CompressedModel.Save(model, stream);

        Assert.That(stream.ToArray(), Is.EqualTo(File.ReadAllBytes(path)));
    }

    [Test]
    [Explicit("Writes the fixtures into the source tree; run once with the code that wrote files before the layer registry.")]
    public void WriteFixtures()
    {
        Directory.CreateDirectory(Folder);
        foreach (var name in Names)
        {
            using var model = Build(name);
            CompressedModel.Save(model, Path.Combine(Folder, name + ".mcm"));
            using var input = Input(name);
            File.WriteAllBytes(Path.Combine(Folder, name + ".out"), TestModels.Output(model, input).SelectMany(BitConverter.GetBytes).ToArray());
        }
    }

    /// <summary>SmallResNet's residual block is a custom module: its file names the type and the architecture supplies it.</summary>
    private static nn.Module<Tensor, Tensor> Load(string path, string name)
    {
        if (!name.StartsWith("smallresnet", StringComparison.Ordinal))
        {
            return CompressedModel.Load(path);
        }

        using var architecture = ModelZoo.Create(ZooModel.SmallResNet, 0);
        return CompressedModel.Load(path, architecture);
    }

    private static Tensor Input(string name)
    {
        using var generator = new Generator(17);
        return rand([4, 1, 28, 28], generator: generator);
    }

    private static nn.Module<Tensor, Tensor> Build(string name)
    {
        manual_seed(11);
        var kind = name.StartsWith("lenet5", StringComparison.Ordinal) ? ZooModel.LeNet5
            : name.StartsWith("mlp", StringComparison.Ordinal) ? ZooModel.LeNet300100 : ZooModel.SmallResNet;
        using var model = ModelZoo.Create(kind, 5);
        using var images = rand(128, 1, 28, 28);
        using var labels = model.call(images).argmax(1);
        var data = new ModelCompression.Data.TensorDataset(images, labels);
        var pipeline = CompressionPipeline.Create().WithAccuracyCheck(1.0, AccuracyCheckPolicy.SkipStep).WithLatencyMeasurement(new ModelCompression.Metrics.LatencyOptions { Enabled = false });
        pipeline = name switch
        {
            "mlp-dynamic-int8" => pipeline.AddPostTrainingQuantization(QuantizationMode.DynamicInt8),
            "mlp-pruned-clustered" => pipeline.AddMagnitudePruning(0.7).AddWeightClustering(3),
            "lenet5-static-int8" => pipeline.AddPostTrainingQuantization(QuantizationMode.StaticInt8),
            "lenet5-int8wo-fp16" => pipeline.AddPostTrainingQuantization(QuantizationMode.WeightOnlyInt8).AddHalfPrecision(HalfPrecisionFormat.Float16),
            _ => pipeline.AddSvdFactorization(0.9).AddHalfPrecision(HalfPrecisionFormat.Float16),
        };
        return pipeline.Build().Run(model, new CompressionData(data, data)).Model;
    }
}
