using TorchSharp;

namespace ModelCompression.Modules;

/// <summary>
/// Puts a module tree in training or evaluation mode for a while, then gives every module back its own flag.
/// TorchSharp's <c>train(bool)</c> sets a whole subtree, so restoring only the root's flag would, for example, put a
/// BatchNorm that the user froze with <c>eval()</c> inside a model in training mode back into training mode.
/// </summary>
internal readonly struct ModuleModes : IDisposable
{
    private readonly (torch.nn.Module Module, bool Training)[] _modes;

    private ModuleModes(torch.nn.Module root)
    {
        // Parents before their descendants (by depth of the dotted name), so each train() call, which recurses,
        // is corrected by the calls for the modules below it.
        _modes = [(root, root.training), .. root.named_modules()
            .Select(m => (Depth: m.name.Count(c => c == '.'), m.module))
            .OrderBy(m => m.Depth)
            .Select(m => (m.module, m.module.training))];
    }

    /// <summary>Records every module's flag and puts the tree in evaluation mode.</summary>
    /// <param name="root">The module tree.</param>
    /// <returns>The record; disposing it restores the flags.</returns>
    public static ModuleModes Evaluating(torch.nn.Module root)
    {
        var modes = new ModuleModes(root);
        root.eval();
        return modes;
    }

    /// <summary>Records every module's flag and puts the tree in training mode.</summary>
    /// <param name="root">The module tree.</param>
    /// <returns>The record; disposing it restores the flags.</returns>
    public static ModuleModes Training(torch.nn.Module root)
    {
        var modes = new ModuleModes(root);
        root.train();
        return modes;
    }

    /// <summary>Records every module's flag, changing nothing (for code that sets modes itself).</summary>
    /// <param name="root">The module tree.</param>
    /// <returns>The record; disposing it restores the flags.</returns>
    public static ModuleModes Record(torch.nn.Module root) => new(root);

    /// <summary>Gives every recorded module back its flag.</summary>
    public void Dispose()
    {
        if (_modes is null || _modes.All(m => m.Module.training == m.Training))
        {
            return;
        }

        foreach (var (module, training) in _modes)
        {
            if (module.training != training)
            {
                module.train(training);
            }
        }
    }
}
