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
