using System.Text.Json;
using NUnit.Framework;

namespace ModelCompression.Tests.Pipeline;

[TestFixture]
public sealed class CompressionReportTests
{
    private static CompressionReport Sample() => new()
    {
        Model = "LeNet-300-100",
        Baseline = new ModelFigures { Accuracy = 0.975, Parameters = 266610, NonzeroParameters = 266610, SizeBytes = 1066440, Macs = 266200, LatencyMs = new LatencyFigures { Batch1 = 0.05, Batch64 = 0.9 } },
        Steps =
        [
            new StepFigures { Name = "MagnitudePruning", Accepted = true, Seconds = 12.3, Accuracy = 0.974, AccuracyDrop = 0.001, Parameters = 266610, NonzeroParameters = 21300, SizeBytes = 120000, Macs = 266200, LatencyMs = new LatencyFigures { Batch1 = 0.05, Batch64 = 0.9 } },
        ],
        Final = new ModelFigures { Accuracy = 0.974, Parameters = 266610, NonzeroParameters = 21300, SizeBytes = 120000, Macs = 266200, LatencyMs = new LatencyFigures { Batch1 = 0.05, Batch64 = 0.9 } },
        CompressionRatio = 8.9,
        Speedup = new LatencyFigures { Batch1 = 1, Batch64 = 1 },
        Reference = new Dictionary<string, double> { ["teacherAccuracy"] = 0.98 },
    };

    [Test]
    public void ToJson_WritesTheFixedFieldNames()
    {
        using var doc = JsonDocument.Parse(Sample().ToJson());
        var root = doc.RootElement;
        Assert.That(root.GetProperty("model").GetString(), Is.EqualTo("LeNet-300-100"));
        foreach (var section in new[] { "baseline", "final" })
        {
            var s = root.GetProperty(section);
            foreach (var field in new[] { "accuracy", "parameters", "nonzeroParameters", "sizeBytes", "macs" })
            {
                Assert.That(s.TryGetProperty(field, out _), Is.True, $"{section}.{field}");
            }

            Assert.That(s.GetProperty("latencyMs").GetProperty("batch1").GetDouble(), Is.EqualTo(0.05));
            Assert.That(s.GetProperty("latencyMs").GetProperty("batch64").GetDouble(), Is.EqualTo(0.9));
        }

        var step = root.GetProperty("steps")[0];
        foreach (var field in new[] { "name", "accepted", "seconds", "accuracy", "accuracyDrop", "parameters", "nonzeroParameters", "sizeBytes", "macs", "latencyMs" })
        {
            Assert.That(step.TryGetProperty(field, out _), Is.True, $"steps[0].{field}");
        }

        Assert.That(root.GetProperty("compressionRatio").GetDouble(), Is.EqualTo(8.9));
        Assert.That(root.GetProperty("speedup").GetProperty("batch64").GetDouble(), Is.EqualTo(1.0));
        Assert.That(root.GetProperty("reference").GetProperty("teacherAccuracy").GetDouble(), Is.EqualTo(0.98));
        Assert.That(root.TryGetProperty("warnings", out _), Is.False, "null members are omitted");
    }

    [Test]
    public void FromJson_RoundTrips()
    {
        var json = Sample().ToJson();
        Assert.That(CompressionReport.FromJson(json).ToJson(), Is.EqualTo(json));
    }

    [Test]
    public void ToString_And_ToMarkdown_ShowEveryStage()
    {
        var report = Sample();
        Assert.That(report.ToString(), Does.Contain("baseline").And.Contain("1. MagnitudePruning").And.Contain("final").And.Contain("8.90x"));
        var lines = report.ToMarkdown().Split('\n');
        Assert.That(lines.Count(l => l.StartsWith('|')), Is.EqualTo(5), "header, rule, baseline, one step, final");
    }
}
