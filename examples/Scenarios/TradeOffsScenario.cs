using System.Globalization;
using System.Text;
using ModelCompression;
using ModelCompression.Clustering;
using ModelCompression.Factorization;
using ModelCompression.Metrics;
using ModelCompression.Pruning;
using ModelCompression.Quantization;
using ModelCompression.Samples;
using ModelCompression.Training;
using static TorchSharp.torch;

namespace Scenarios;

/// <summary>
/// Trade-offs on LeNet-5: sweeps of pruning sparsity, weight bits (quantization and weight sharing) and SVD rank, each
/// point measured for accuracy, compressed-file size and latency; writes a CSV and two PNG plots (accuracy against
/// size, and against batch-64 latency) with the Pareto front of all points.
/// </summary>
public sealed class TradeOffsScenario : IScenario
{
    public string Name => "tradeoffs";

    public string Description => "LeNet-5: sweep sparsity, bits and rank; CSV + PNG of accuracy against size and latency (Pareto fronts)";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        global::Scenarios.Targets.ReferenceAtLeast("points", 12, "≥ 12 measured points"),
        global::Scenarios.Targets.ReferenceAtLeast("paretoPoints", 2, "a Pareto front of ≥ 2 points"),
    ];

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = ScenarioBaseline.Load(ZooModel.LeNet5, context);
        var sweep = new List<(string Technique, string Setting, Func<ICompressionStep> Step)>();
        foreach (double sparsity in new[] { 0.5, 0.7, 0.8, 0.9, 0.95 })
        {
            sweep.Add(("pruning", $"{sparsity:0.##} sparse", () => new MagnitudePruningStep(new MagnitudePruningOptions
            {
                Sparsity = sparsity,
                FineTuning = new TrainingOptions { Epochs = 2, Optimizer = OptimizerKind.Sgd, LearningRate = 0.01, Momentum = 0.9, Schedule = new CosineLearningRate() },
                SparseExecution = SparseExecution.Never,
            })));
        }

        foreach (var (mode, label) in new[] { (QuantizationMode.Float16, "fp16"), (QuantizationMode.StaticInt8, "int8 static"), (QuantizationMode.WeightOnlyInt4, "int4 weight-only") })
        {
            sweep.Add(("quantization", label, () => new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = mode })));
        }

        foreach (int bits in new[] { 2, 3, 4, 5 })
        {
            sweep.Add(("weight sharing", $"{bits} bits", () => new WeightClusteringStep(new WeightClusteringOptions { Bits = bits })));
        }

        foreach (double ratio in new[] { 0.25, 0.5, 0.75 })
        {
            sweep.Add(("low rank", $"rank {ratio:0.##}", () => new SvdFactorizationStep(new SvdFactorizationOptions { Rank = RankRule.Ratio(ratio) })));
        }

        var latencyOptions = new LatencyOptions { Warmup = 5, Repeats = 31 };
        var baselineLatency = ModelMetrics.MeasureLatency(baseline.Model, [1, 28, 28], latencyOptions);
        var points = new List<Point>
        {
            new("baseline", "fp32", new AccuracyEvaluator().Evaluate(baseline.Model, baseline.Split.Test).Value, ModelMetrics.SizeInBytes(baseline.Model), baselineLatency.Batch1, baselineLatency.Batch64),
        };
        CompressionReport? report = null;
        foreach (var (technique, setting, step) in sweep)
        {
            using var result = baseline.Run(baseline.Pipeline(context)
                .AddStep(step())
                .WithLatencyMeasurement(new LatencyOptions { Enabled = false }));
            var latency = ModelMetrics.MeasureLatency(result.Model, [1, 28, 28], latencyOptions);
            var point = new Point(technique, setting, result.Report.Final.Accuracy, result.Report.Final.SizeBytes, latency.Batch1, latency.Batch64);
            points.Add(point);
            context.Log.WriteLine($"{technique,-15} {setting,-18} accuracy {point.Accuracy:P2}  {point.SizeBytes,9:N0} B  b1 {point.Batch1Ms:0.000} ms  b64 {point.Batch64Ms:0.000} ms");
            report ??= result.Report;
        }

        var bySize = Pareto(points, p => p.SizeBytes);
        var byLatency = Pareto(points, p => p.Batch64Ms);
        string basePath = Path.Combine(Path.GetDirectoryName(context.ReportPath)!, Path.GetFileNameWithoutExtension(context.ReportPath));
        WriteCsv(basePath + ".csv", points, bySize, byLatency);
        Plot(basePath + "-size.png", points, bySize, p => p.SizeBytes / 1024.0, "compressed file (KB, log scale)", logX: true);
        Plot(basePath + "-latency.png", points, byLatency, p => p.Batch64Ms, "latency at batch 64 (ms)", logX: false);
        context.Log.WriteLine($"Pareto front, accuracy against size: {string.Join("; ", bySize.Select(p => $"{p.Technique} {p.Setting}"))}");
        context.Log.WriteLine($"Pareto front, accuracy against batch-64 latency: {string.Join("; ", byLatency.Select(p => $"{p.Technique} {p.Setting}"))}");
        context.Log.WriteLine($"Wrote {basePath}.csv, {basePath}-size.png and {basePath}-latency.png");

        report!.Reference!["points"] = points.Count;
        report.Reference["paretoPoints"] = bySize.Count;
        foreach (var p in points.Skip(1))
        {
            report.Reference[$"{p.Technique} {p.Setting} accuracy"] = p.Accuracy;
            report.Reference[$"{p.Technique} {p.Setting} sizeBytes"] = p.SizeBytes;
        }

        return report;
    }

    private static List<Point> Pareto(List<Point> points, Func<Point, double> cost) => [.. ParetoFront.Of(points, p => p.Accuracy, cost)];

    private static void WriteCsv(string path, List<Point> points, List<Point> bySize, List<Point> byLatency)
    {
        var csv = new StringBuilder("technique,setting,accuracy,sizeBytes,latencyBatch1Ms,latencyBatch64Ms,paretoSize,paretoLatency\n");
        foreach (var p in points)
        {
            csv.AppendLine(string.Join(',', p.Technique, p.Setting, p.Accuracy.ToString("0.0000", CultureInfo.InvariantCulture), p.SizeBytes.ToString(CultureInfo.InvariantCulture),
                p.Batch1Ms.ToString("0.0000", CultureInfo.InvariantCulture), p.Batch64Ms.ToString("0.0000", CultureInfo.InvariantCulture), bySize.Contains(p), byLatency.Contains(p)));
        }

        File.WriteAllText(path, csv.ToString());
    }

    private static void Plot(string path, List<Point> points, List<Point> front, Func<Point, double> x, string xLabel, bool logX)
    {
        double X(Point p) => logX ? Math.Log10(x(p)) : x(p);
        var plot = new ScottPlot.Plot();
        var palette = new ScottPlot.Palettes.Category10();
        int color = 0;
        foreach (var group in points.GroupBy(p => p.Technique))
        {
            var series = plot.Add.ScatterPoints(group.Select(X).ToArray(), group.Select(p => p.Accuracy * 100).ToArray(), palette.GetColor(color++));
            series.LegendText = group.Key;
            series.MarkerSize = 9;
        }

        var line = plot.Add.ScatterLine(front.Select(X).ToArray(), front.Select(p => p.Accuracy * 100).ToArray(), ScottPlot.Colors.Black);
        line.LegendText = "Pareto front";
        line.LinePattern = ScottPlot.LinePattern.Dashed;
        for (int i = 0; i < front.Count; i++)
        {
            // Labels alternate above and below the front so neighbours do not overlap.
            var label = plot.Add.Text(front[i].Setting, X(front[i]), (front[i].Accuracy * 100) + (i % 2 == 0 ? 0.55 : -0.35));
            label.LabelFontSize = 11;
            label.LabelAlignment = ScottPlot.Alignment.MiddleCenter;
        }

        // Accuracy from 6 points below the best point up: a collapsed point (SVD at a quarter rank without fine-tuning)
        // would otherwise flatten every other one; the CSV holds them all.
        double best = points.Max(p => p.Accuracy) * 100;
        plot.Axes.SetLimitsY(best - 6, best + 1);

        if (logX)
        {
            plot.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericAutomatic { MinorTickGenerator = new ScottPlot.TickGenerators.LogMinorTickGenerator(), LabelFormatter = v => Math.Pow(10, v).ToString("0.#", CultureInfo.InvariantCulture) };
        }

        var hidden = points.Where(p => p.Accuracy * 100 < best - 6).Select(p => $"{p.Technique} {p.Setting} {p.Accuracy:P1}").ToList();
        plot.Title("LeNet-5 on the bundled digits: accuracy against " + (logX ? "size" : "latency") + (hidden.Count == 0 ? string.Empty : $" (below the axis: {string.Join(", ", hidden)})"), size: 14);
        plot.XLabel(xLabel);
        plot.YLabel("test accuracy (%)");
        plot.ShowLegend(ScottPlot.Alignment.LowerRight);
        plot.SavePng(path, 900, 560);
    }

    private sealed record Point(string Technique, string Setting, double Accuracy, long SizeBytes, double Batch1Ms, double Batch64Ms);
}
