using System.Diagnostics;
using System.Text;

namespace ModelCompression.Tests.Support;

/// <summary>
/// Runs a job of the test assembly in a child process (<c>dotnet exec ModelCompression.Tests.dll job args</c>), so that a
/// native crash — which would kill the test host and hide every result — is a failed test with the child's output.
/// </summary>
internal static class ChildProcess
{
    /// <summary>The jobs a child process can run, by name; each returns its exit code.</summary>
    private static readonly Dictionary<string, Func<string[], int>> Jobs = new(StringComparer.Ordinal)
    {
        [ChildJobs.LoadUnderCollections] = ChildJobs.RunLoadUnderCollections,
        [ChildJobs.OptimizerUnderCollections] = ChildJobs.RunOptimizerUnderCollections,
        [ChildJobs.TrainUnderCollections] = ChildJobs.RunTrainUnderCollections,
        [Serialization.ChildProcessFuzzTests.Command] = args =>
            Serialization.ChildProcessFuzzTests.RunCases(int.Parse(args[0], System.Globalization.CultureInfo.InvariantCulture), int.Parse(args[1], System.Globalization.CultureInfo.InvariantCulture), Console.Out),
    };

    /// <summary>Runs <paramref name="job"/> in a child process.</summary>
    /// <param name="job">The job's name.</param>
    /// <param name="timeout">How long the child may run before it is killed (a hang is a failure too).</param>
    /// <param name="args">The job's arguments.</param>
    /// <returns>The child's exit code (−1 when it timed out) and its standard output and error.</returns>
    public static (int ExitCode, string Output) Run(string job, TimeSpan timeout, params string[] args)
    {
        // The muxer that runs the test host (else the SDK's, else the one on the PATH).
        string host = Path.GetFileNameWithoutExtension(Environment.ProcessPath) == "dotnet" ? Environment.ProcessPath!
            : Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } path && File.Exists(path) ? path : "dotnet";
        string assembly = typeof(ChildProcess).Assembly.Location;
        var start = new ProcessStartInfo(host)
        {
            WorkingDirectory = Path.GetDirectoryName(assembly)!,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        start.ArgumentList.Add("exec");
        start.ArgumentList.Add(assembly);
        start.ArgumentList.Add(job);
        foreach (string arg in args)
        {
            start.ArgumentList.Add(arg);
        }

        using var process = Process.Start(start) ?? throw new InvalidOperationException($"Could not start {host}.");
        var output = new StringBuilder();
        process.OutputDataReceived += (_, e) => { lock (output) { output.AppendLine(e.Data); } };
        process.ErrorDataReceived += (_, e) => { lock (output) { output.AppendLine(e.Data); } };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        if (!process.WaitForExit(timeout))
        {
            process.Kill(entireProcessTree: true);
            process.WaitForExit();
            lock (output)
            {
                return (-1, output.ToString());
            }
        }

        process.WaitForExit();
        lock (output)
        {
            return (process.ExitCode, output.ToString());
        }
    }

    /// <summary>The test assembly's entry point: runs the job named by the first argument.</summary>
    /// <param name="args">The job's name, then its arguments.</param>
    /// <returns>The job's exit code; 2 for an unknown job.</returns>
    public static int Main(string[] args)
    {
        if (args.Length == 0 || !Jobs.TryGetValue(args[0], out var job))
        {
            Console.Error.WriteLine($"Jobs: {string.Join(", ", Jobs.Keys)}");
            return 2;
        }

        return job(args[1..]);
    }
}
