using TorchSharp;

namespace ModelCompression.Modules;

/// <summary>
/// Saves and restores LibTorch's default random generator around work that draws from it (building modules, whose
/// constructors initialise weights), without racing TorchSharp's finalizers.
/// </summary>
/// <remarks>
/// <c>torch.random.get_rng_state()</c> in TorchSharp 0.107 wraps the default generator in a new <c>Generator</c> object
/// that nothing keeps alive during the native call: a collection on another thread can run its finalizer, which frees
/// the native wrapper while the call reads it (a SIGSEGV in <c>THSGenerator_get_rng_state</c>). Here the wrapper is held
/// until the call returns and then disposed deterministically.
/// </remarks>
internal static class RandomState
{
    /// <summary>
    /// Held by whatever seeds or draws from LibTorch's process-wide default generator and must get the same numbers
    /// whatever else runs: a pipeline step (seeded, then run), a training run, a copy or a load (state saved, modules
    /// built, state restored). TorchSharp gives layer initialisation and dropout no generator of their own, so two
    /// pipelines in one process take turns step by step, and each gets the numbers it would get alone. Re-entrant.
    /// </summary>
    public static readonly Lock Gate = new();

    /// <summary>Returns a copy of the default generator's state (owned by the caller).</summary>
    public static torch.Tensor Save()
    {
        var generator = torch.Generator.Default;
        try
        {
            return generator.get_state();
        }
        finally
        {
            GC.KeepAlive(generator);
            generator.Dispose();
        }
    }

    /// <summary>Sets the default generator's state.</summary>
    /// <param name="state">A state from <see cref="Save"/>.</param>
    public static void Restore(torch.Tensor state)
    {
        var generator = torch.Generator.Default;
        try
        {
            generator.set_state(state);
        }
        finally
        {
            GC.KeepAlive(state);
            GC.KeepAlive(generator);
            generator.Dispose();
        }
    }
}
