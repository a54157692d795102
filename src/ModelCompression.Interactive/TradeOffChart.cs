using System.Globalization;
using System.Net;
using System.Text;

namespace ModelCompression.Interactive;

/// <summary>One measured compression setting of a trade-off sweep.</summary>
/// <param name="Technique">The technique (a series of the chart), e.g. <c>pruning</c>.</param>
/// <param name="Setting">The setting, e.g. <c>90% sparse</c>.</param>
/// <param name="Accuracy">The accuracy, 0 to 1.</param>
/// <param name="Cost">The cost on the horizontal axis (bytes, milliseconds, …); lower is better.</param>
public sealed record TradeOffPoint(string Technique, string Setting, double Accuracy, double Cost);

/// <summary>
/// A trade-off sweep, drawn in a notebook as an SVG scatter chart of accuracy against cost, one colour per technique,
/// with the Pareto front (the points no other point beats on both accuracy and cost) joined by a dashed line.
/// </summary>
/// <param name="Title">The chart's title.</param>
/// <param name="CostLabel">The horizontal axis' label, e.g. <c>size (bytes)</c>.</param>
/// <param name="Points">The points.</param>
public sealed record TradeOffChart(string Title, string CostLabel, IReadOnlyList<TradeOffPoint> Points)
{
    private static readonly string[] Colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

    /// <summary>Gets the Pareto front, by ascending cost.</summary>
    public IReadOnlyList<TradeOffPoint> ParetoFront => Metrics.ParetoFront.Of(Points, p => p.Accuracy, p => p.Cost);

    /// <summary>Renders the chart as an SVG element (640 × 400).</summary>
    /// <returns>The SVG markup.</returns>
    public string ToSvg()
    {
        const double Width = 640, Height = 400, Left = 60, Right = 150, Top = 30, Bottom = 50;
        static string N(double v) => v.ToString("0.##", CultureInfo.InvariantCulture);
        var svg = new StringBuilder();
        svg.Append(CultureInfo.InvariantCulture, $"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{Width}\" height=\"{Height}\" font-family=\"sans-serif\" font-size=\"11\">");
        svg.Append(CultureInfo.InvariantCulture, $"<text x=\"{N(Width / 2)}\" y=\"18\" text-anchor=\"middle\" font-size=\"13\">{WebUtility.HtmlEncode(Title)}</text>");
        if (Points.Count == 0)
        {
            return svg.Append("</svg>").ToString();
        }

        double minCost = Points.Min(p => p.Cost), maxCost = Points.Max(p => p.Cost);
        double minAccuracy = Points.Min(p => p.Accuracy), maxAccuracy = Points.Max(p => p.Accuracy);
        double costSpan = maxCost > minCost ? maxCost - minCost : 1, accuracySpan = maxAccuracy > minAccuracy ? maxAccuracy - minAccuracy : 0.01;
        double X(double cost) => Left + ((cost - minCost) / costSpan * (Width - Left - Right));
        double Y(double accuracy) => Height - Bottom - ((accuracy - minAccuracy) / accuracySpan * (Height - Top - Bottom));
        svg.Append(CultureInfo.InvariantCulture, $"<rect x=\"{N(Left)}\" y=\"{N(Top)}\" width=\"{N(Width - Left - Right)}\" height=\"{N(Height - Top - Bottom)}\" fill=\"none\" stroke=\"#888\"/>");
        svg.Append(CultureInfo.InvariantCulture, $"<text x=\"{N(Left)}\" y=\"{N(Height - 30)}\">{N(minCost)}</text><text x=\"{N(Width - Right)}\" y=\"{N(Height - 30)}\" text-anchor=\"end\">{N(maxCost)}</text>");
        svg.Append(CultureInfo.InvariantCulture, $"<text x=\"{N((Left + Width - Right) / 2)}\" y=\"{N(Height - 12)}\" text-anchor=\"middle\">{WebUtility.HtmlEncode(CostLabel)}</text>");
        svg.Append(CultureInfo.InvariantCulture, $"<text x=\"{N(Left - 5)}\" y=\"{N(Top + 10)}\" text-anchor=\"end\">{N(maxAccuracy * 100)}%</text><text x=\"{N(Left - 5)}\" y=\"{N(Height - Bottom)}\" text-anchor=\"end\">{N(minAccuracy * 100)}%</text>");
        var front = ParetoFront;
        svg.Append("<polyline class=\"pareto\" fill=\"none\" stroke=\"black\" stroke-dasharray=\"4 3\" points=\"")
            .Append(string.Join(' ', front.Select(p => $"{N(X(p.Cost))},{N(Y(p.Accuracy))}")))
            .Append("\"/>");
        int series = 0;
        foreach (var group in Points.GroupBy(p => p.Technique))
        {
            string color = Colors[series % Colors.Length];
            foreach (var p in group)
            {
                svg.Append(CultureInfo.InvariantCulture, $"<circle cx=\"{N(X(p.Cost))}\" cy=\"{N(Y(p.Accuracy))}\" r=\"4\" fill=\"{color}\"><title>{WebUtility.HtmlEncode($"{p.Technique} {p.Setting}: {(p.Accuracy * 100).ToString("0.00", CultureInfo.InvariantCulture)}%, {p.Cost.ToString("G4", CultureInfo.InvariantCulture)}")}</title></circle>");
            }

            svg.Append(CultureInfo.InvariantCulture, $"<circle cx=\"{N(Width - Right + 15)}\" cy=\"{N(Top + 10 + (series * 16))}\" r=\"4\" fill=\"{color}\"/><text x=\"{N(Width - Right + 24)}\" y=\"{N(Top + 14 + (series * 16))}\">{WebUtility.HtmlEncode(group.Key)}</text>");
            series++;
        }

        return svg.Append("</svg>").ToString();
    }
}
