namespace ModelCompression.Tests.Support;

/// <summary>
/// A thread that forces garbage collections until disposed, as a host's other threads would: it exposes races with
/// TorchSharp's finalizers (a native wrapper freed during the call that uses it) in the child-process jobs.
/// </summary>
internal sealed class BackgroundCollector : IDisposable
{
    private readonly Thread _thread;
    private volatile bool _stop;

    /// <summary>Starts collecting: <paramref name="burst"/> collections, then a 1 ms pause, over and over.</summary>
    /// <param name="burst">Collections per burst. Back to back without pauses they starve the other work on two cores (every one suspends it).</param>
    /// <param name="waitForFinalizers">Whether each burst also waits for the finalizers it queued.</param>
    public BackgroundCollector(int burst, bool waitForFinalizers)
    {
        _thread = new Thread(() =>
        {
            while (!_stop)
            {
                for (int i = 0; i < burst; i++)
                {
                    GC.Collect();
                }

                if (waitForFinalizers)
                {
                    GC.WaitForPendingFinalizers();
                }

                Thread.Sleep(1);
            }
        }) { IsBackground = true };
        _thread.Start();
    }

    /// <summary>Stops collecting and waits for the thread to end.</summary>
    public void Dispose()
    {
        _stop = true;
        _thread.Join();
    }
}
