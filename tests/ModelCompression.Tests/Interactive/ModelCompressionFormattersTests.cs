using Microsoft.DotNet.Interactive.Formatting;
using ModelCompression.Interactive;
using ModelCompression.Tests.Support;
using NUnit.Framework;

namespace ModelCompression.Tests.Interactive;

[TestFixture]
public sealed class ModelCompressionFormattersTests
{
    private static CompressionReport Report() => new()
    {
        Model = "LeNet<300>",
        Baseline = new ModelFigures { Accuracy = 0.964, Parameters = 266610, NonzeroParameters = 266610, SizeBytes = 1066619, Macs = 266200, LatencyMs = new LatencyFigures { Batch1 = 0.031, Batch64 = 0.275 } },
        Steps =
        [
            new StepFigures { Name = "MagnitudePruning(90% global, one-shot)", Accepted = true, Seconds = 0.8, Accuracy = 0.9605, AccuracyDrop = 0.0035, Parameters = 266610, NonzeroParameters = 27030, SizeBytes = 120525, Macs = 48542, LatencyMs = new LatencyFigures { Batch1 = 0.022, Batch64 = 0.177 } },
            new StepFigures { Name = "PostTrainingQuantization(dynamic int8)", Accepted = false, Seconds = 0.1, Accuracy = 0.91, AccuracyDrop = 0.054, Parameters = 266610, NonzeroParameters = 27030, SizeBytes = 93198, Macs = 48542, Message = "rolled back: drop 0.054 > 0.01" },
        ],
        Final = new ModelFigures { Accuracy = 0.9605, Parameters = 266610, NonzeroParameters = 27030, SizeBytes = 120525, Macs = 48542, LatencyMs = new LatencyFigures { Batch1 = 0.023, Batch64 = 0.187 } },
        CompressionRatio = 8.85,
        Speedup = new LatencyFigures { Batch1 = 1.39, Batch64 = 1.47 },
        Warnings = ["a <warning>"],
    };

    [Test]
    public void ToHtml_HoldsEveryStepsNameAndFigures()
    {
        string html = ModelCompressionFormatters.ToHtml(Report());
        Assert.That(html, Does.Contain("LeNet&lt;300&gt;"), "names are HTML-encoded");
        foreach (var expected in new[]
        {
            "1. MagnitudePruning(90% global, one-shot)", "0.9605", "+0.0035", "27,030", "120,525", "48,542", "0.022", "0.177", "0.8",
            "2. PostTrainingQuantization(dynamic int8)", "rolled back", "0.9100", "+0.0540", "93,198", "rolled back: drop 0.054 &gt; 0.01",
            "baseline", "0.9640", "266,610", "1,066,619", "266,200", "final", "8.85×", "1.39×", "1.47×", "a &lt;warning&gt;",
        })
        {
            Assert.That(html, Does.Contain(expected));
        }

        Assert.That(html.Split("<tr>").Length - 1, Is.EqualTo(1 + 4 + 1), "header, baseline, two steps, one message, final");
    }

    [Test]
    public void Register_NotebookDisplaysReportsAndChartsAsHtml()
    {
        ModelCompressionFormatters.Register();
        ModelCompressionFormatters.Register();
        var report = Report();
        Assert.That(report.ToDisplayString(HtmlFormatter.MimeType), Is.EqualTo(ModelCompressionFormatters.ToHtml(report)));
        var chart = new TradeOffChart("t", "bytes", [new("pruning", "90%", 0.96, 1000)]);
        Assert.That(chart.ToDisplayString(HtmlFormatter.MimeType), Is.EqualTo(chart.ToSvg()));
    }

    [Test]
    public void TradeOffChart_DrawsEveryPointAndJoinsTheParetoFront()
    {
        var chart = new TradeOffChart("LeNet-5", "size (bytes)",
        [
            new("baseline", "fp32", 0.9825, 247147),
            new("pruning", "50%", 0.9835, 131919),
            new("pruning", "90%", 0.9610, 29161),
            new("sharing", "3 bits", 0.9820, 21329),
            new("sharing", "2 bits", 0.9605, 14711),
        ]);
        Assert.That(chart.ParetoFront.Select(p => p.Setting), Is.EqualTo(new[] { "2 bits", "3 bits", "50%" }));
        string svg = chart.ToSvg();
        Assert.That(svg.Split("<circle").Length - 1, Is.EqualTo(5 + 3), "five points and three legend marks");
        Assert.That(svg, Does.Contain("class=\"pareto\"").And.Contain("pruning 90%: 96.10%"));
        var polyline = svg[svg.IndexOf("points=\"", StringComparison.Ordinal)..];
        Assert.That(polyline[..polyline.IndexOf("\"/>", StringComparison.Ordinal)].Split(' '), Has.Length.EqualTo(3));
    }
}
