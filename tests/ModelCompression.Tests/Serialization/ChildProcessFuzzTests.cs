using ModelCompression.Serialization;
using ModelCompression.Tests.Support;
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
    /// <summary>The command line argument that runs cases instead of tests (see <see cref="ChildProcess"/>).</summary>
    public const string Command = "--load-fuzz";

    /// <summary>The cases of the test run; <c>MC_CHILD_FUZZ_CASES</c> raises it for the longer run the README documents.</summary>
    private static int Cases => int.TryParse(Environment.GetEnvironmentVariable("MC_CHILD_FUZZ_CASES"), out int n) && n > 0 ? n : 3000;

    [Test]
    [CancelAfter(3_600_000)]
    public void Load_MutatedFilesInAChildProcess_ExitsNormally()
    {
        var limit = TimeSpan.FromSeconds(Math.Max(120, Cases / 10));
        var (exitCode, log) = ChildProcess.Run(Command, limit, "0", Cases.ToString(System.Globalization.CultureInfo.InvariantCulture));
        TestContext.Out.WriteLine(log);
        // A native crash ends the child with a signal (exit code 128 + the signal's number on Linux) before its summary;
        // a child that runs past the limit is killed (−1).
        Assert.That(exitCode, Is.Zero, $"the child's exit code; its output:\n{log}");
        Assert.That(log, Does.Contain($"{Cases} cases:"));
    }

    /// <summary>Loads cases <paramref name="first"/> … of the format fuzzer's mutations; 0 when each loads or throws <see cref="InvalidDataException"/>.</summary>
    public static int RunCases(int first, int count, TextWriter log)
    {
        var files = SerializationModels.SavedFiles();

        var collector = new BackgroundCollector(burst: 1, waitForFinalizers: true);
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
            collector.Dispose();
        }

        log.WriteLine($"{count} cases: {rejected} rejected with InvalidDataException, {loaded} loaded, none crashed");
        return 0;
    }
}
