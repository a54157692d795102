using System.Globalization;
using System.Net;
using System.Text;
using Microsoft.DotNet.Interactive.Formatting;

namespace ModelCompression.Interactive;

/// <summary>
/// Registers .NET Interactive formatters, so that a notebook cell ending in a <see cref="CompressionReport"/> shows an
/// HTML table, and one ending in a <see cref="TradeOffChart"/> shows a chart.
/// </summary>
public static class ModelCompressionFormatters
{
    private static int registered;

    /// <summary>Registers the formatters (once; later calls do nothing).</summary>
    public static void Register()
    {
        if (Interlocked.Exchange(ref registered, 1) == 1)
        {
            return;
        }

        Formatter.Register<CompressionReport>((report, writer) => writer.Write(ToHtml(report)), HtmlFormatter.MimeType);
        Formatter.Register<TradeOffChart>((chart, writer) => writer.Write(chart.ToSvg()), HtmlFormatter.MimeType);
    }

    /// <summary>Renders a report as an HTML table: the baseline, every step (accepted or rolled back, with its message), the final model, and the ratios.</summary>
    /// <param name="report">The report.</param>
    /// <returns>An HTML fragment.</returns>
    public static string ToHtml(CompressionReport report)
    {
        ArgumentNullException.ThrowIfNull(report);
        static string E(string? text) => WebUtility.HtmlEncode(text ?? string.Empty);
        static string N(double value, string format) => value.ToString(format, CultureInfo.InvariantCulture);
        static string Latency(LatencyFigures? l, Func<LatencyFigures, double> pick) => l is null ? "–" : N(pick(l), "0.000");
        var html = new StringBuilder();
        html.Append(CultureInfo.InvariantCulture, $"<div class=\"mc-report\"><h4>{E(report.Model)}</h4><table>");
        html.Append("<thead><tr><th>stage</th><th>kept</th><th>").Append(E(report.Metric))
            .Append("</th><th>drop</th><th>parameters</th><th>non-zero</th><th>size (bytes)</th><th>MACs</th><th>batch 1 ms</th><th>batch 64 ms</th><th>seconds</th></tr></thead><tbody>");
        void Row(string stage, string kept, ModelFigures f, double? drop, double? seconds) => html
            .Append("<tr><td>").Append(E(stage)).Append("</td><td>").Append(kept)
            .Append("</td><td>").Append(N(f.Accuracy, "0.0000"))
            .Append("</td><td>").Append(drop is { } d ? N(d, "+0.0000;-0.0000;0.0000") : string.Empty)
            .Append("</td><td>").Append(N(f.Parameters, "N0"))
            .Append("</td><td>").Append(N(f.NonzeroParameters, "N0"))
            .Append("</td><td>").Append(N(f.SizeBytes, "N0"))
            .Append("</td><td>").Append(N(f.Macs, "N0"))
            .Append("</td><td>").Append(Latency(f.LatencyMs, l => l.Batch1))
            .Append("</td><td>").Append(Latency(f.LatencyMs, l => l.Batch64))
            .Append("</td><td>").Append(seconds is { } s ? N(s, "0.0") : string.Empty)
            .Append("</td></tr>");
        Row("baseline", string.Empty, report.Baseline, null, null);
        for (int i = 0; i < report.Steps.Count; i++)
        {
            var step = report.Steps[i];
            Row($"{i + 1}. {step.Name}", step.Accepted ? "yes" : "rolled back", step, step.AccuracyDrop, step.Seconds);
            if (!string.IsNullOrEmpty(step.Message))
            {
                html.Append("<tr><td colspan=\"11\"><small>").Append(E(step.Message)).Append("</small></td></tr>");
            }
        }

        Row("final", string.Empty, report.Final, null, null);
        html.Append("</tbody></table><p>Compression ratio: <b>").Append(N(report.CompressionRatio, "0.00")).Append("×</b>");
        if (report.Speedup is { } speedup)
        {
            html.Append("; speedup: <b>").Append(N(speedup.Batch1, "0.00")).Append("×</b> at batch 1, <b>").Append(N(speedup.Batch64, "0.00")).Append("×</b> at batch 64");
        }

        html.Append("</p>");
        foreach (var warning in report.Warnings ?? [])
        {
            html.Append("<p><b>Warning:</b> ").Append(E(warning)).Append("</p>");
        }

        return html.Append("</div>").ToString();
    }
}
