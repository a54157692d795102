using ModelCompression.Quantization;
using ModelCompression.Samples;
using NUnit.Framework;

namespace ModelCompression.Tests;

/// <summary>The README's code sample, compiled and run as a test so it cannot drift from the API.</summary>
[TestFixture]
public sealed class ReadmeSampleTests
{
    [Test]
    public void ReadmeSample_CompressesAndReports()
    {
        // --- README sample: begin ---
        using var split = MnistDigits.LoadBundled().Split(trainCount: 8000, seed: 0);
        var trained = ZooTraining.TrainOrLoad(ZooModel.LeNet300100, split, cacheDirectory: "artifacts/cache");
        using var model = trained.Model;

        var pipeline = CompressionPipeline.Create()
            .AddHalfPrecision(HalfPrecisionFormat.BFloat16)
            .WithAccuracyCheck(maxDrop: 0.01, AccuracyCheckPolicy.SkipStep)
            .WithModelName("LeNet-300-100")
            .Build();

        using var result = pipeline.Run(model, new CompressionData(split.Train, split.Test));
        Console.WriteLine(result.Report);               // the table
        File.WriteAllText("report.json", result.Report.ToJson());
        // --- README sample: end ---

        Assert.That(result.Report.Baseline.Accuracy, Is.GreaterThan(0.95));
        Assert.That(result.Report.Steps.Single().Accepted, Is.True);
        Assert.That(result.Report.CompressionRatio, Is.EqualTo(2.0));
        Assert.That(File.ReadAllText("report.json"), Does.Contain("\"compressionRatio\": 2"));
    }
}
