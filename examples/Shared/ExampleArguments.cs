namespace ModelCompression.Examples;

/// <summary>The options every example takes: --report PATH, --seed N, --no-cache.</summary>
internal sealed class ExampleArguments
{
    public string? ReportPath { get; private set; }

    public int Seed { get; private set; }

    public bool UseCache { get; private set; } = true;

    /// <summary>Where trained baselines are cached, or null with --no-cache.</summary>
    public string? CacheDirectory => UseCache ? Path.Combine("artifacts", "cache") : null;

    /// <summary>Parses the arguments; on an unknown or incomplete one writes why to stderr and returns null.</summary>
    public static ExampleArguments? Parse(IReadOnlyList<string> args, string? defaultReportPath)
    {
        var result = new ExampleArguments { ReportPath = defaultReportPath };
        for (int i = 0; i < args.Count; i++)
        {
            switch (args[i])
            {
                case "--report" when i + 1 < args.Count:
                    result.ReportPath = args[++i];
                    break;
                case "--seed" when i + 1 < args.Count && int.TryParse(args[i + 1], out var seed):
                    result.Seed = seed;
                    i++;
                    break;
                case "--no-cache":
                    result.UseCache = false;
                    break;
                default:
                    Console.Error.WriteLine($"Unknown or incomplete argument '{args[i]}'.");
                    return null;
            }
        }

        if (result.ReportPath is null)
        {
            Console.Error.WriteLine("--report <path> is required.");
            return null;
        }

        return result;
    }
}
