using System.Diagnostics;
using ModelCompression.Serialization;
using NUnit.Framework;

namespace ModelCompression.Tests.Serialization;

/// <summary>
/// The format fuzz run in a child process: a native crash (a segmentation fault in LibTorch, say) kills the test host
/// of an in-process run unseen; here it is a failed test that names the cases. The child also collects garbage on a
/// second thread throughout, as a host's other threads would, to expose races with TorchSharp's finalizers.
/// </summary>
[TestFixture]
public sealed class ChildProcessFuzzTests
{
    /// <summary>The command line argument that runs cases instead of tests (see <see cref="Program"/>).</summary>
    public const string Command = "--load-fuzz";

    /// <summary>The cases of the test run; <c>MC_CHILD_FUZZ_CASES</c> raises it for the longer run the README documents.</summary>
    private static int Cases => int.TryParse(Environment.GetEnvironmentVariable("MC_CHILD_FUZZ_CASES"), out int n) && n > 0 ? n : 3000;

    [Test]
    [CancelAfter(3_600_000)]
    public void Load_MutatedFilesInAChildProcess_ExitsNormally()
    {
        string assembly = typeof(ChildProcessFuzzTests).Assembly.Location;
        // The test host runs under the dotnet muxer; use the same one (else the one on the PATH).
        string host = Path.GetFileNameWithoutExtension(Environment.ProcessPath) == "dotnet" ? Environment.ProcessPath! : "dotnet";
        var start = new ProcessStartInfo(host)
        {
            WorkingDirectory = Path.GetDirectoryName(assembly)!,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (string argument in (string[])["exec", assembly, Command, "0", Cases.ToString(System.Globalization.CultureInfo.InvariantCulture)])
        {
            start.ArgumentList.Add(argument);
        }

        using var child = Process.Start(start)!;
        var output = child.StandardOutput.ReadToEndAsync();
        var errors = child.StandardError.ReadToEndAsync();
        var limit = TimeSpan.FromSeconds(Math.Max(120, Cases / 10));
        if (!child.WaitForExit(limit))
        {
            child.Kill(entireProcessTree: true);
            child.WaitForExit();
            Assert.Fail($"The child did not finish {Cases} cases in {limit}. Its output so far:\n{output.Result}\n{errors.Result}");
        }

        child.WaitForExit();
        string log = output.Result + errors.Result;
        TestContext.Out.WriteLine(log);
        // A native crash ends the child with a signal (exit code 128 + the signal's number on Linux) before its summary.
        Assert.That(child.ExitCode, Is.Zero, $"the child's exit code; its output:\n{log}");
        Assert.That(output.Result, Does.Contain($"{Cases} cases:"));
    }

    /// <summary>Loads cases <paramref name="first"/> … of the format fuzzer's mutations; 0 when each loads or throws <see cref="InvalidDataException"/>.</summary>
    public static int RunCases(int first, int count, TextWriter log)
    {
        var files = SerializationModels.Names.Select(name =>
        {
            var (model, input) = SerializationModels.Create(name);
            using var _ = model;
            input.Dispose();
            using var stream = new MemoryStream();
            CompressedModel.Save(model, stream);
            return (Name: name, Bytes: stream.ToArray());
        }).ToList();

        bool stop = false;
        var collector = new Thread(() =>
        {
            while (!Volatile.Read(ref stop))
            {
                GC.Collect();
                GC.WaitForPendingFinalizers();
                Thread.Sleep(1);
            }
        }) { IsBackground = true };
        collector.Start();
        int rejected = 0, loaded = 0;
        try
        {
            for (int i = first; i < first + count; i++)
            {
                var (name, valid) = files[i % files.Count];
                var (bytes, what) = FormatFuzzer.Mutate(valid, new Random(i));
                try
                {
                    // Every other case through a stream that cannot seek, the way a pipe or a socket delivers it.
                    Stream stream = i % 2 == 0 ? new MemoryStream(bytes) : new NonSeekableStream(new MemoryStream(bytes));
                    using var model = CompressedModel.Load(stream, null, SerializationModels.LoadOptions());
                    loaded++;
                }
                catch (InvalidDataException)
                {
                    rejected++;
                }
                catch (Exception ex)
                {
                    log.WriteLine($"case {i} ({name}, {what}): {ex.GetType().Name}: {ex.Message}");
                    return 1;
                }
            }
        }
        finally
        {
            Volatile.Write(ref stop, true);
            collector.Join();
        }

        log.WriteLine($"{count} cases: {rejected} rejected with InvalidDataException, {loaded} loaded, none crashed");
        return 0;
    }
}
