// Scenarios: named end-to-end cases on the bundled MNIST digits. Each trains (or reuses a cached) baseline,
// compresses it, prints the report table and writes the report JSON.
//
//   dotnet run -c Release --project examples/Scenarios -- <scenario> --report <path> [--seed N] [--no-cache] [--strict]
// --strict exits with code 3 when a figure the scenario promises is missed.
using ModelCompression.Examples;
using ModelCompression.Samples;
using Scenarios;

var scenarios = ScenarioCatalog.All.ToDictionary(s => s.Name, StringComparer.Ordinal);

if (args.Length == 0 || args[0] is "-h" or "--help" || !scenarios.TryGetValue(args[0], out var scenario))
{
    if (args.Length > 0 && args[0] is not ("-h" or "--help"))
    {
        Console.Error.WriteLine($"Unknown scenario '{args[0]}'.");
    }

    Console.Error.WriteLine("Usage: Scenarios <scenario> --report <path> [--seed N] [--no-cache] [--strict]");
    Console.Error.WriteLine("Known scenarios:");
    foreach (var s in ScenarioCatalog.All)
    {
        Console.Error.WriteLine($"  {s.Name,-22} {s.Description}");
    }

    return 2;
}

bool strict = args.Contains("--strict");
var options = ExampleArguments.Parse(args.Skip(1).Where(a => a != "--strict").ToList(), defaultReportPath: null);
if (options is null)
{
    Console.Error.WriteLine("Usage: Scenarios <scenario> --report <path> [--seed N] [--no-cache] [--strict]");
    return 2;
}

var context = new ScenarioContext(options.Seed, options.CacheDirectory, Console.Out, Path.GetFullPath(options.ReportPath!));
var report = scenario.Run(context);
Console.WriteLine();
Console.WriteLine(report);
Console.WriteLine($"Report JSON: {ReportFiles.Write(report, options.ReportPath!)}");

// The scenario's promised figures; with --strict a missed one fails the run (CI uses this).
bool allMet = true;
foreach (var target in scenario.Targets)
{
    bool met = target.Met(report);
    allMet &= met;
    Console.WriteLine($"target: {target.Description}: {(met ? "met" : "MISSED")}");
}

return strict && !allMet ? 3 : 0;
