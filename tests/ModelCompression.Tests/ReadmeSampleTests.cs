using ModelCompression.Quantization;
using ModelCompression.Samples;
using ModelCompression.Tests.Support;
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
            .AddPostTrainingQuantization(QuantizationMode.DynamicInt8)   // int8 weights, own kernel
            .WithAccuracyCheck(maxDrop: 0.01, AccuracyCheckPolicy.SkipStep)
            .WithModelName("LeNet-300-100")
            .Build();

        using var result = pipeline.Run(model, new CompressionData(split.Train, split.Test));
        Console.WriteLine(result.Report);               // the table
        File.WriteAllText("report.json", result.Report.ToJson());
        // --- README sample: end ---

        Assert.That(result.Report.Baseline.Accuracy, Is.GreaterThan(0.95));
        Assert.That(result.Report.Steps.Single().Accepted, Is.True);
        Assert.That(result.Report.CompressionRatio, Is.InRange(4.0, 5.0), "int8 weights, entropy coded in the file, plus float32 scales and biases");
        Assert.That(File.ReadAllText("report.json"), Does.Contain("\"compressionRatio\": 4."));
    }

    [Test]
    public void ReadmeSample_IsTheCodeOfThisTest()
    {
        var root = RepositoryFiles.Root;
        var readme = File.ReadAllLines(Path.Combine(root, "README.md"));
        int usingIt = Array.IndexOf(readme, "## Using it");
        int start = Array.IndexOf(readme, "```csharp", usingIt) + 1;
        int end = Array.IndexOf(readme, "```", start);
        // The README shows the namespace imports the test file has at its top.
        var block = Normalize(readme[start..end]).Where(l => !(l.StartsWith("using ", StringComparison.Ordinal) && !l.Contains('='))).ToList();

        var source = File.ReadAllLines(Path.Combine(root, "tests", "ModelCompression.Tests", "ReadmeSampleTests.cs"));
        int from = Array.FindIndex(source, l => l.Contains("--- README sample: begin ---", StringComparison.Ordinal)) + 1;
        int to = Array.FindIndex(source, l => l.Contains("--- README sample: end ---", StringComparison.Ordinal));
        Assert.That(block, Is.EqualTo(Normalize(source[from..to]).ToList()));
    }

    private static IEnumerable<string> Normalize(IEnumerable<string> lines) =>
        lines.Select(l => l.Trim()).Where(l => l.Length > 0);
}
