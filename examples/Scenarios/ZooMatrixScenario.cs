using System.Diagnostics;
using System.Globalization;
using System.Reflection;
using System.Text;
using System.Text.Json;
using ModelCompression;

namespace Scenarios;

/// <summary>
/// Issue 17's zoo matrix: architectures the library did not write (torchvision's models, TorchSharp's native transformer
/// and recurrent layers, Conv1d, a GELU/LayerNorm MLP) × every technique, each cell a pipeline on random weights whose
/// labels are the model's own predictions, then save/load (bit-identical outputs) and ONNX Runtime parity, the caller's
/// model hashed after every cell. Each model runs in a child process, so a crash names its cell and stage and the
/// matrix goes on.
/// </summary>
public sealed class ZooMatrixScenario : IScenario
{
    // The child process learns its model, techniques and journal from the environment: the command-line parser is
    // shared by every scenario and knows no such options.
    private const string ChildVariable = "ZOO_MATRIX_CHILD";
    private const string TechniquesVariable = "ZOO_MATRIX_TECHNIQUES";
    private const string JournalVariable = "ZOO_MATRIX_JOURNAL";

    /// <summary>A child still running after this is taken as hung, killed, and its stage counted a crash.</summary>
    private static readonly TimeSpan ModelTimeout = TimeSpan.FromMinutes(6);

    public string Name => "zoo-matrix";

    public string Description => "issue 17: torchvision, transformer, RNN, Conv1d and MLP models × every technique; save/load and ONNX parity per cell";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        global::Scenarios.Targets.ReferenceAtMost("crashes", 0, "0 process crashes"),
        global::Scenarios.Targets.ReferenceAtMost("internalExceptions", 0, "0 cells with an internal exception type (any stage)"),
        global::Scenarios.Targets.ReferenceAtLeast("worksFraction", 0.95, "≥ 95% of applicable cells WORK (cells that compress nothing are not applicable)"),
        global::Scenarios.Targets.ReferenceAtLeast("saveLoadIdenticalFraction", 1.0, "100% of working cells load bit-identical"),
        global::Scenarios.Targets.ReferenceAtLeast("onnxParityFraction", 1.0, "100% of working cells have ONNX Runtime parity"),
        global::Scenarios.Targets.ReferenceAtMost("callerModelChanged", 0, "the caller's model unchanged after every cell"),
    ];

    public CompressionReport Run(ScenarioContext context)
    {
        if (Environment.GetEnvironmentVariable(ChildVariable) is { Length: > 0 } child)
        {
            RunChild(child, context);

            // The parent writes the report; a child that returned would overwrite it with an empty one.
            Environment.Exit(0);
        }

        var total = Stopwatch.StartNew();
        var cells = new List<ZooCell>();
        var timings = new List<ModelTiming>();
        var notRun = new HashSet<(string, string)>();
        // ZOO_MATRIX_MODELS=a,b runs those rows only (to reproduce one row quickly); the targets then judge those rows.
        var only = Environment.GetEnvironmentVariable("ZOO_MATRIX_MODELS")?.Split(',', StringSplitOptions.RemoveEmptyEntries);
        foreach (var spec in ZooMatrixModels.All.Where(s => only is null || only.Contains(s.Name)))
        {
            var planned = ZooTechnique.All.Where(t => t.AppliesTo(spec)).ToList();
            foreach (var t in planned.Where(t => spec.Techniques is not null && !spec.Techniques.Contains(t.Key)))
            {
                notRun.Add((spec.Name, t.Key));
            }

            var watch = Stopwatch.StartNew();
            var timing = RunModel(spec, [.. planned.Where(t => !notRun.Contains((spec.Name, t.Key))).Select(t => t.Key)], context, cells);
            timings.Add(timing with { Seconds = watch.Elapsed.TotalSeconds });
        }

        var counts = Count(cells, notRun.Count, total.Elapsed.TotalSeconds);
        string table = Matrix(cells, notRun, markdown: false);
        context.Log.WriteLine();
        context.Log.WriteLine(table);
        context.Log.WriteLine(Legend);
        context.Log.WriteLine(string.Join(", ", counts.Select(c => $"{c.Key} {c.Value.ToString("0.###", CultureInfo.InvariantCulture)}")));
        foreach (var cell in cells.Where(c => c.Internal))
        {
            context.Log.WriteLine($"FAILED {cell.Model} / {cell.Technique}: {string.Join(" | ", new[] { cell.Error, cell.SaveLoadError, cell.OnnxError }.Where(e => e is not null))}");
        }

        string markdownPath = Path.ChangeExtension(context.ReportPath, ".md");
        Directory.CreateDirectory(Path.GetDirectoryName(markdownPath)!);
        File.WriteAllText(markdownPath, Markdown(cells, notRun, counts, timings));
        context.Log.WriteLine($"Markdown table: {markdownPath}");
        return Report(cells, counts);
    }

    private const string Legend =
        "Legend: first character, the pipeline: W works (something compressed), N ran but compressed nothing, E a clear documented error " +
        "(public exception thrown by the library), F failed (internal exception type, LibTorch error, null reference…), X the process crashed or hung; " +
        "then save/load and ONNX: = identical / within tolerance, ≠ differs, e clear error, f internal failure. · does not apply, - not run (time).";

    /// <summary>Runs one model's cells in child processes, restarting after a crash with the cells left.</summary>
    private ModelTiming RunModel(ZooModelSpec spec, List<string> remaining, ScenarioContext context, List<ZooCell> cells)
    {
        var timing = new ModelTiming(spec.Name, 0, 0, 0, 0);
        while (remaining.Count > 0)
        {
            string journal = Path.Combine(Path.GetTempPath(), $"zoo-matrix-{Environment.ProcessId}-{spec.Name}.jsonl");
            File.Delete(journal);
            var (exitCode, hung) = StartChild(spec.Name, remaining, journal, context);
            (string Technique, string Stage)? last = null;
            foreach (var line in File.Exists(journal) ? File.ReadAllLines(journal) : [])
            {
                using var json = JsonDocument.Parse(line);
                var root = json.RootElement;
                switch (root.GetProperty("kind").GetString())
                {
                    case "stage":
                        last = (root.GetProperty("technique").GetString()!, root.GetProperty("stage").GetString()!);
                        break;
                    case "model":
                        timing = timing with
                        {
                            BuildSeconds = root.GetProperty("buildSeconds").GetDouble(),
                            ForwardSeconds = root.GetProperty("forwardSeconds").GetDouble(),
                            Parameters = root.GetProperty("parameters").GetInt64(),
                        };
                        break;
                    case "cell":
                        var cell = root.GetProperty("cell").Deserialize<ZooCell>(ZooCellRunner.Json)!;
                        cells.Add(cell);
                        remaining.Remove(cell.Technique);
                        last = null;
                        break;
                }
            }

            File.Delete(journal);
            if (remaining.Count == 0)
            {
                break;
            }

            string why = hung ? $"hung, killed after {ModelTimeout.TotalMinutes:0} min" : $"process died, exit code {exitCode}{SignalName(exitCode)}";
            context.Log.WriteLine($"[{spec.Name}] CRASH in {last?.Technique ?? "-"} / {last?.Stage ?? "start"}: {why}");
            if (last is not { Technique: not "-" } stage || !remaining.Contains(stage.Technique))
            {
                // The model itself could not be built or labelled: every cell left is lost with it.
                cells.AddRange(remaining.Select(t => new ZooCell { Model = spec.Name, Technique = t, Pipeline = ZooOutcome.Crash, Error = $"{last?.Stage ?? "start"}: {why}" }));
                break;
            }

            cells.Add(new ZooCell
            {
                Model = spec.Name,
                Technique = stage.Technique,
                Pipeline = stage.Stage == "pipeline" ? ZooOutcome.Crash : ZooOutcome.Works,
                SaveLoad = stage.Stage == "save/load" ? ZooOutcome.Crash : stage.Stage == "onnx" ? ZooOutcome.Works : null,
                Onnx = stage.Stage == "onnx" ? ZooOutcome.Crash : null,
                Error = $"{stage.Stage}: {why}",
            });
            remaining.Remove(stage.Technique);
        }

        return timing;
    }

    private (int ExitCode, bool Hung) StartChild(string model, List<string> techniques, string journal, ScenarioContext context)
    {
        var start = new ProcessStartInfo { FileName = Environment.ProcessPath!, UseShellExecute = false };
        if (Path.GetFileNameWithoutExtension(start.FileName) == "dotnet")
        {
            start.ArgumentList.Add(Assembly.GetEntryAssembly()!.Location);
        }

        foreach (var arg in new[] { Name, "--report", Path.Combine(Path.GetTempPath(), "zoo-matrix-child.json"), "--seed", context.Seed.ToString(CultureInfo.InvariantCulture) })
        {
            start.ArgumentList.Add(arg);
        }

        start.Environment[ChildVariable] = model;
        start.Environment[TechniquesVariable] = string.Join(',', techniques);
        start.Environment[JournalVariable] = journal;
        // LibTorch warns on stderr at every Conv1d call on this CPU ("Could not initialize NNPACK"): pass the rest on.
        start.RedirectStandardError = true;
        using var process = Process.Start(start)!;
        process.ErrorDataReceived += (_, e) =>
        {
            if (e.Data is not null && !e.Data.Contains("Could not initialize NNPACK", StringComparison.Ordinal))
            {
                Console.Error.WriteLine(e.Data);
            }
        };
        process.BeginErrorReadLine();
        if (!process.WaitForExit(ModelTimeout))
        {
            process.Kill(entireProcessTree: true);
            process.WaitForExit();
            return (process.ExitCode, true);
        }

        return (process.ExitCode, false);
    }

    private static void RunChild(string model, ScenarioContext context)
    {
        var spec = ZooMatrixModels.All.Single(s => s.Name == model);
        var keys = Environment.GetEnvironmentVariable(TechniquesVariable)!.Split(',');
        var techniques = keys.Select(k => ZooTechnique.All.Single(t => t.Key == k)).ToList();
        using var journal = new StreamWriter(Environment.GetEnvironmentVariable(JournalVariable)!, append: true);
        new ZooCellRunner(spec, context.Seed, journal, context.Log).Run(techniques);
    }

    private static string SignalName(int exitCode) => (exitCode - 128) switch
    {
        6 => " (SIGABRT)",
        9 => " (SIGKILL)",
        11 => " (SIGSEGV)",
        7 => " (SIGBUS)",
        4 => " (SIGILL)",
        8 => " (SIGFPE)",
        _ => string.Empty,
    };

    private static Dictionary<string, double> Count(List<ZooCell> cells, int notRun, double seconds)
    {
        int works = cells.Count(c => c.Pipeline == ZooOutcome.Works);
        int saveLoad = cells.Count(c => c.Pipeline == ZooOutcome.Works && c.SaveLoad == ZooOutcome.Works);
        int onnx = cells.Count(c => c.Pipeline == ZooOutcome.Works && c.Onnx == ZooOutcome.Works);
        int noOps = cells.Count(c => c.Pipeline == ZooOutcome.Mismatch);
        return new Dictionary<string, double>
        {
            ["cells"] = cells.Count,
            ["works"] = works,
            ["noOps"] = noOps,
            ["clearErrors"] = cells.Count(c => c.Pipeline == ZooOutcome.ClearError),
            ["failures"] = cells.Count(c => c.Pipeline == ZooOutcome.Failed),
            ["crashes"] = cells.Count(c => c.Pipeline == ZooOutcome.Crash || c.SaveLoad == ZooOutcome.Crash || c.Onnx == ZooOutcome.Crash),
            ["internalExceptions"] = cells.Count(c => c.Internal),
            ["saveLoadIdentical"] = saveLoad,
            ["onnxParity"] = onnx,
            ["onnxClearErrors"] = cells.Count(c => c.Pipeline == ZooOutcome.Works && c.Onnx == ZooOutcome.ClearError),
            ["callerModelChanged"] = cells.Count(c => !c.CallerUnchanged),
            ["notRun"] = notRun,
            // A cell where the technique ran and found nothing to act on (N: no prunable channel group outside native
            // layers, no factorization that saves parameters) is not applicable; a clear error is counted against.
            ["applicable"] = cells.Count - noOps,
            ["worksFraction"] = cells.Count - noOps == 0 ? 0 : (double)works / (cells.Count - noOps),
            ["saveLoadIdenticalFraction"] = works == 0 ? 0 : (double)saveLoad / works,
            ["onnxParityFraction"] = works == 0 ? 0 : (double)onnx / works,
            ["seconds"] = seconds,
        };
    }

    private static string Matrix(List<ZooCell> cells, HashSet<(string, string)> notRun, bool markdown)
    {
        var columns = ZooTechnique.All.Select(t => t.Key).ToList();
        var rows = ZooMatrixModels.All.Select(spec => (IReadOnlyList<string>)[spec.Name, .. ZooTechnique.All.Select(t =>
            !t.AppliesTo(spec) ? "·" : notRun.Contains((spec.Name, t.Key)) ? "-" : cells.FirstOrDefault(c => c.Model == spec.Name && c.Technique == t.Key)?.Code ?? "?")]).ToList();
        return Table(["model", .. columns], rows, markdown);
    }

    private static string Table(IReadOnlyList<string> header, List<IReadOnlyList<string>> rows, bool markdown)
    {
        var widths = header.Select((h, i) => Math.Max(h.Length, rows.Max(r => r[i].Length))).ToArray();
        var sb = new StringBuilder();
        void Line(IReadOnlyList<string> cells) => sb.AppendLine(markdown
            ? "| " + string.Join(" | ", cells.Select((c, i) => c.PadRight(widths[i]))) + " |"
            : string.Join("  ", cells.Select((c, i) => c.PadRight(widths[i]))).TrimEnd());
        Line(header);
        sb.AppendLine(markdown ? "|" + string.Join("|", widths.Select(w => new string('-', w + 2))) + "|" : string.Join("  ", widths.Select(w => new string('-', w))));
        rows.ForEach(Line);
        return sb.ToString();
    }

    private static string Markdown(List<ZooCell> cells, HashSet<(string, string)> notRun, Dictionary<string, double> counts, List<ModelTiming> timings)
    {
        var md = new StringBuilder();
        md.AppendLine(CultureInfo.InvariantCulture, $"# zoo-matrix ({DateTime.UtcNow:yyyy-MM-dd})");
        md.AppendLine();
        md.AppendLine(Matrix(cells, notRun, markdown: true));
        md.AppendLine(Legend);
        md.AppendLine();
        md.AppendLine(string.Join(", ", counts.Select(c => $"{c.Key} {c.Value.ToString("0.###", CultureInfo.InvariantCulture)}")));
        md.AppendLine();
        md.AppendLine("## Cells");
        md.AppendLine();
        var rows = cells.Select(c => (IReadOnlyList<string>)
        [
            c.Model, c.Technique, c.Code,
            c.Pipeline is ZooOutcome.Works or ZooOutcome.Mismatch ? c.Agreement.ToString("P1", CultureInfo.InvariantCulture) : string.Empty,
            c.Pipeline is ZooOutcome.Works ? c.SizeRatio.ToString("0.00", CultureInfo.InvariantCulture) + "×" : string.Empty,
            c.Pipeline is ZooOutcome.Works ? $"{c.Speedup1.ToString("0.00", CultureInfo.InvariantCulture)}× / {c.Speedup64.ToString("0.00", CultureInfo.InvariantCulture)}×" : string.Empty,
            c.OnnxMaxDifference is { } d ? $"{d.ToString("G2", CultureInfo.InvariantCulture)} (≤ {c.OnnxAllowedDifference!.Value.ToString("G2", CultureInfo.InvariantCulture)})" : string.Empty,
            c.Seconds.ToString("0.0", CultureInfo.InvariantCulture),
            string.Join(" \\| ", new[] { c.Error, c.SaveLoadError, c.OnnxError }.Where(e => e is not null)).Replace("|", "\\|", StringComparison.Ordinal),
        ]).ToList();
        md.AppendLine(Table(["model", "technique", "code", "agreement", "size ratio", "speedup b1 / b64", "ONNX max diff", "s", "errors"], rows, markdown: true));
        md.AppendLine("## Models");
        md.AppendLine();
        md.AppendLine(Table(["model", "parameters", "build s", "labelling forwards s", "all cells s"], timings.Select(t => (IReadOnlyList<string>)
        [
            t.Model, t.Parameters.ToString("N0", CultureInfo.InvariantCulture), t.BuildSeconds.ToString("0.00", CultureInfo.InvariantCulture),
            t.ForwardSeconds.ToString("0.00", CultureInfo.InvariantCulture), t.Seconds.ToString("0", CultureInfo.InvariantCulture),
        ]).ToList(), markdown: true));
        md.AppendLine("Left out of TorchVision 0.107.0's models:");
        md.AppendLine();
        foreach (var (name, reason) in ZooMatrixModels.Skipped)
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"- {name}: {reason}");
        }

        return md.ToString();
    }

    private static CompressionReport Report(List<ZooCell> cells, Dictionary<string, double> counts) => new()
    {
        Model = $"zoo-matrix: {ZooMatrixModels.All.Count} architectures × {ZooTechnique.All.Count} techniques",
        Metric = "agreement",
        Steps = [.. cells.Select(c => new StepFigures
        {
            Name = $"{c.Model} / {c.Technique}",
            Accepted = c.Pipeline == ZooOutcome.Works,
            Seconds = c.Seconds,
            Accuracy = c.Agreement,
            AccuracyDrop = c.Pipeline is ZooOutcome.Works or ZooOutcome.Mismatch ? 1 - c.Agreement : 0,
            SizeBytes = c.SizeBytes,
            Message = $"{c.Code}" + string.Concat(new[] { c.Error, c.SaveLoadError, c.OnnxError }.Where(e => e is not null).Select(e => "; " + e)),
        })],
        CompressionRatio = 1,
        Reference = counts,
    };

    private sealed record ModelTiming(string Model, double BuildSeconds, double ForwardSeconds, long Parameters, double Seconds);
}
