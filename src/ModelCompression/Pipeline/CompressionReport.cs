using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace ModelCompression;

/// <summary>Median latencies in milliseconds at batch 1 and 64 (JSON <c>latencyMs</c>), or speedups (JSON <c>speedup</c>).</summary>
public sealed class LatencyFigures
{
    /// <summary>Gets or sets the figure at batch 1.</summary>
    public double Batch1 { get; set; }

    /// <summary>Gets or sets the figure at batch 64.</summary>
    public double Batch64 { get; set; }
}

/// <summary>The measured figures of one model (JSON <c>baseline</c> and <c>final</c>).</summary>
public class ModelFigures
{
    /// <summary>Gets or sets the evaluation metric (accuracy, or the evaluator's metric).</summary>
    [JsonPropertyOrder(10)]
    public double Accuracy { get; set; }

    /// <summary>Gets or sets the number of parameters.</summary>
    [JsonPropertyOrder(20)]
    public long Parameters { get; set; }

    /// <summary>Gets or sets the number of non-zero parameters.</summary>
    [JsonPropertyOrder(21)]
    public long NonzeroParameters { get; set; }

    /// <summary>Gets or sets the stored size in bytes.</summary>
    [JsonPropertyOrder(22)]
    public long SizeBytes { get; set; }

    /// <summary>Gets or sets the multiply-accumulates per sample.</summary>
    [JsonPropertyOrder(23)]
    public long Macs { get; set; }

    /// <summary>Gets or sets the median latency, or <see langword="null"/> when not measured.</summary>
    [JsonPropertyOrder(24)]
    public LatencyFigures? LatencyMs { get; set; }
}

/// <summary>What one step did (JSON <c>steps[]</c>).</summary>
public sealed class StepFigures : ModelFigures
{
    /// <summary>Gets or sets the step's name.</summary>
    [JsonPropertyOrder(0)]
    public string Name { get; set; } = string.Empty;

    /// <summary>Gets or sets whether the step passed the accuracy check and was kept.</summary>
    [JsonPropertyOrder(1)]
    public bool Accepted { get; set; }

    /// <summary>Gets or sets the seconds the step took (applying and fine-tuning, not measuring).</summary>
    [JsonPropertyOrder(2)]
    public double Seconds { get; set; }

    /// <summary>Gets or sets the drop of the metric from the baseline (positive = worse), in the check's unit.</summary>
    [JsonPropertyOrder(11)]
    public double AccuracyDrop { get; set; }

    /// <summary>Gets or sets McNemar's p-value of the paired difference from the baseline, when per-sample results exist.</summary>
    [JsonPropertyOrder(12)]
    public double? PValue { get; set; }

    /// <summary>Gets or sets the confidence interval of the absolute accuracy drop, [low, high], when per-sample results exist.</summary>
    [JsonPropertyOrder(13)]
    public double[]? AccuracyDropInterval { get; set; }

    /// <summary>Gets or sets why the step was rejected, or other notes.</summary>
    [JsonPropertyOrder(30)]
    public string? Message { get; set; }
}

/// <summary>One compressed layer (JSON <c>layers[]</c>).</summary>
public sealed class LayerFigures
{
    /// <summary>Gets or sets the dotted name, as <c>named_modules()</c> gives it.</summary>
    public string Name { get; set; } = string.Empty;

    /// <summary>Gets or sets the module type name.</summary>
    public string Type { get; set; } = string.Empty;

    /// <summary>Gets or sets the number of parameters.</summary>
    public long Parameters { get; set; }

    /// <summary>Gets or sets the number of non-zero parameters.</summary>
    public long NonzeroParameters { get; set; }

    /// <summary>Gets or sets the bits per stored weight.</summary>
    public int Bits { get; set; }

    /// <summary>Gets or sets the rank of a low-rank layer.</summary>
    public int? Rank { get; set; }

    /// <summary>Gets or sets the fraction of weights kept (non-zero / all).</summary>
    public double KeptFraction { get; set; }

    /// <summary>Gets or sets the multiply-accumulates per sample.</summary>
    public long Macs { get; set; }

    /// <summary>Gets or sets a quantized layer's signal-to-quantization-noise ratio in dB, measured on calibration data (JSON <c>sqnrDb</c>).</summary>
    public double? SqnrDb { get; set; }

    /// <summary>Gets or sets the bytes the layer's tensors take in the compressed file (JSON <c>sizeBytes</c>).</summary>
    public long? SizeBytes { get; set; }
}

/// <summary>
/// The report of a pipeline run: baseline, every step (accepted or not), final model, compression ratio and speedup.
/// <see cref="ToJson"/> writes the project's fixed JSON shape; <see cref="ToString"/> and <see cref="ToMarkdown"/> a table.
/// </summary>
public sealed class CompressionReport
{
    private static readonly JsonSerializerOptions JsonOptions = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.CamelCase,
        DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
        NumberHandling = JsonNumberHandling.AllowNamedFloatingPointLiterals,
        WriteIndented = true,
    };

    /// <summary>Gets or sets the model's name.</summary>
    public string Model { get; set; } = string.Empty;

    /// <summary>Gets or sets the name of the evaluation metric in <c>accuracy</c> fields (e.g. accuracy or loss).</summary>
    public string Metric { get; set; } = "accuracy";

    /// <summary>Gets or sets the figures of the model before any step.</summary>
    public ModelFigures Baseline { get; set; } = new();

    /// <summary>Gets the figures of every step, in order.</summary>
    public List<StepFigures> Steps { get; set; } = [];

    /// <summary>Gets or sets the figures of the returned model.</summary>
    public ModelFigures Final { get; set; } = new();

    /// <summary>Gets or sets the baseline size divided by the final size.</summary>
    public double CompressionRatio { get; set; }

    /// <summary>Gets or sets the baseline latency divided by the final latency, or <see langword="null"/> when not measured.</summary>
    public LatencyFigures? Speedup { get; set; }

    /// <summary>Gets or sets the per-layer figures of the final model, or <see langword="null"/>.</summary>
    public List<LayerFigures>? Layers { get; set; }

    /// <summary>Gets or sets named reference numbers measured in the same run (e.g. <c>teacherAccuracy</c>).</summary>
    public Dictionary<string, double>? Reference { get; set; }

    /// <summary>Gets or sets warnings, e.g. a compressed model slower than its baseline.</summary>
    public List<string>? Warnings { get; set; }

    /// <summary>Writes the report as JSON (camelCase, the fixed shape in DESIGN.md).</summary>
    /// <returns>The indented JSON text.</returns>
    public string ToJson() => JsonSerializer.Serialize(this, JsonOptions);

    /// <summary>Reads a report written by <see cref="ToJson"/>.</summary>
    /// <param name="json">The JSON text.</param>
    /// <returns>The report.</returns>
    /// <exception cref="JsonException">The text is not a report.</exception>
    public static CompressionReport FromJson(string json)
    {
        ArgumentNullException.ThrowIfNull(json);
        return JsonSerializer.Deserialize<CompressionReport>(json, JsonOptions) ?? throw new JsonException("The JSON holds no report.");
    }

    /// <summary>Writes the report as a Markdown table.</summary>
    /// <returns>The Markdown text.</returns>
    public string ToMarkdown() => Render(markdown: true);

    /// <summary>Writes the report as an aligned plain-text table.</summary>
    /// <returns>The table.</returns>
    public override string ToString() => Render(markdown: false);

    private string Render(bool markdown)
    {
        var header = new[] { "stage", "kept", Metric, "drop", "params", "nonzero", "size KB", "MACs", "b1 ms", "b64 ms", "seconds" };
        var rows = new List<string[]> { Row("baseline", string.Empty, Baseline, null, null) };
        for (int i = 0; i < Steps.Count; i++)
        {
            var s = Steps[i];
            rows.Add(Row($"{i + 1}. {s.Name}", s.Accepted ? "yes" : "no", s, s.AccuracyDrop, s.Seconds));
        }

        rows.Add(Row("final", string.Empty, Final, null, null));

        var sb = new StringBuilder();
        sb.AppendLine(CultureInfo.InvariantCulture, $"Model: {Model}");
        var widths = header.Select((h, c) => Math.Max(h.Length, rows.Max(r => r[c].Length))).ToArray();
        AppendRow(sb, header, widths, markdown);
        if (markdown)
        {
            sb.AppendLine("|" + string.Join("|", widths.Select((w, c) => c < 2 ? new string('-', w + 2) : new string('-', w + 1) + ":")) + "|");
        }
        else
        {
            sb.AppendLine(string.Join("  ", widths.Select(w => new string('-', w))));
        }

        foreach (var row in rows)
        {
            AppendRow(sb, row, widths, markdown);
        }

        sb.AppendLine();
        sb.Append(CultureInfo.InvariantCulture, $"Compression ratio: {CompressionRatio:0.00}x");
        if (Speedup is not null)
        {
            sb.Append(CultureInfo.InvariantCulture, $"; speedup: {Speedup.Batch1:0.00}x at batch 1, {Speedup.Batch64:0.00}x at batch 64");
        }

        sb.AppendLine();
        foreach (var step in Steps.Where(s => s.Message is not null))
        {
            sb.AppendLine(CultureInfo.InvariantCulture, $"{(markdown ? "- " : string.Empty)}{step.Name}: {step.Message}");
        }

        foreach (var warning in Warnings ?? [])
        {
            sb.AppendLine(CultureInfo.InvariantCulture, $"{(markdown ? "- " : string.Empty)}Warning: {warning}");
        }

        return sb.ToString();
    }

    private static string[] Row(string stage, string kept, ModelFigures f, double? drop, double? seconds) =>
    [
        stage,
        kept,
        F(f.Accuracy, "0.0000"),
        drop is { } d ? F(d, "+0.0000;-0.0000;0.0000") : string.Empty,
        f.Parameters.ToString("N0", CultureInfo.InvariantCulture),
        f.NonzeroParameters.ToString("N0", CultureInfo.InvariantCulture),
        F(f.SizeBytes / 1024.0, "0.0"),
        f.Macs.ToString("N0", CultureInfo.InvariantCulture),
        f.LatencyMs is null ? "-" : F(f.LatencyMs.Batch1, "0.000"),
        f.LatencyMs is null ? "-" : F(f.LatencyMs.Batch64, "0.000"),
        seconds is { } s ? F(s, "0.0") : string.Empty,
    ];

    private static string F(double value, string format) => value.ToString(format, CultureInfo.InvariantCulture);

    private static void AppendRow(StringBuilder sb, string[] cells, int[] widths, bool markdown)
    {
        var padded = cells.Select((c, i) => i < 2 ? c.PadRight(widths[i]) : c.PadLeft(widths[i]));
        sb.AppendLine(markdown ? "| " + string.Join(" | ", padded) + " |" : string.Join("  ", padded));
    }
}
