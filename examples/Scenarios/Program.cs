// Scenarios: named end-to-end cases on the bundled MNIST digits. Each trains (or reuses a cached) baseline,
// compresses it, prints the report table and writes the report JSON.
//
//   dotnet run -c Release --project examples/Scenarios -- <scenario> --report <path> [--seed N] [--no-cache]
using ModelCompression.Samples;
using Scenarios;

var scenarios = ScenarioCatalog.All.ToDictionary(s => s.Name, StringComparer.Ordinal);

if (args.Length == 0 || args[0] is "-h" or "--help" || !scenarios.TryGetValue(args[0], out var scenario))
{
    if (args.Length > 0 && args[0] is not ("-h" or "--help"))
    {
        Console.Error.WriteLine($"Unknown scenario '{args[0]}'.");
    }

    Console.Error.WriteLine("Usage: Scenarios <scenario> --report <path> [--seed N] [--no-cache]");
    Console.Error.WriteLine("Known scenarios:");
    foreach (var s in ScenarioCatalog.All)
    {
        Console.Error.WriteLine($"  {s.Name,-22} {s.Description}");
    }

    return 2;
}

string? reportPath = null;
int seed = 0;
bool useCache = true;
for (int i = 1; i < args.Length; i++)
{
    switch (args[i])
    {
        case "--report" when i + 1 < args.Length:
            reportPath = args[++i];
            break;
        case "--seed" when i + 1 < args.Length && int.TryParse(args[i + 1], out var s):
            seed = s;
            i++;
            break;
        case "--no-cache":
            useCache = false;
            break;
        default:
            Console.Error.WriteLine($"Unknown or incomplete argument '{args[i]}'.");
            return 2;
    }
}

if (reportPath is null)
{
    Console.Error.WriteLine("--report <path> is required.");
    return 2;
}

var context = new ScenarioContext(seed, useCache ? Path.Combine("artifacts", "cache") : null, Console.Out);
var report = scenario.Run(context);
Console.WriteLine();
Console.WriteLine(report);
Console.WriteLine($"Report JSON: {ReportFiles.Write(report, reportPath)}");
return 0;
