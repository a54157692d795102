using Microsoft.Extensions.Logging;
using static TorchSharp.torch;

namespace ModelCompression.Modules;

/// <summary>
/// What a step does with a selected layer that its compressed layer cannot replace: one its parent holds in a field of
/// a concrete type (torchvision's GoogLeNet keeps its classifier in a field typed <c>Linear</c>), or in no field the
/// library can update. .NET cannot store another type in such a field, and the library never forces it.
/// </summary>
public enum FixedTypeLayers
{
    /// <summary>
    /// Compress the layer in place, keeping its type, where the technique allows it and the compressed file still
    /// captures the saving (half precision rounds the weights to 16-bit values, weight clustering sets them to shared
    /// values); leave it as it is where the technique has no in-place form (factorization, integer quantization).
    /// Either way the step names the layer in its report notes and logs a warning.
    /// </summary>
    CompressInPlace,

    /// <summary>Leave such layers as they are; the step names them in its report notes and logs a warning.</summary>
    Skip,

    /// <summary>Throw an <see cref="UnsupportedModelException"/> naming every such layer before anything changes.</summary>
    Fail,
}

/// <summary>Finds the selected layers a step cannot replace and applies the step's <see cref="FixedTypeLayers"/> choice, the same way in every step.</summary>
internal static class FixedTypeLayerPolicy
{
    /// <summary>
    /// Returns the layers among <paramref name="names"/> that a <paramref name="replacementType"/> cannot replace in
    /// <paramref name="root"/>, with why (the field and its type), in the order given.
    /// </summary>
    /// <exception cref="UnsupportedModelException"><paramref name="mode"/> is <see cref="FixedTypeLayers.Fail"/> and there is at least one; nothing has changed.</exception>
    public static Dictionary<string, string> Find(
        nn.Module root, IEnumerable<string> names, Type replacementType, FixedTypeLayers mode, string stepName, string optionsName) =>
        Find(root, names.Select(n => (n, replacementType)), mode, stepName, optionsName);

    /// <summary>As <see cref="Find(nn.Module, IEnumerable{string}, Type, FixedTypeLayers, string, string)"/>, with a replacement type per layer.</summary>
    public static Dictionary<string, string> Find(
        nn.Module root, IEnumerable<(string Name, Type ReplacementType)> layers, FixedTypeLayers mode, string stepName, string optionsName)
    {
        var found = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var (name, replacementType) in layers)
        {
            if (ModuleTree.WhyCannotReplace(root, name, replacementType) is { } why)
            {
                found[name] = why;
            }
        }

        if (mode == FixedTypeLayers.Fail && found.Count > 0)
        {
            var (first, _) = found.First();
            throw new UnsupportedModelException(
                first,
                ModuleTree.GetSubmodule(root, first).GetType().Name,
                $"Step '{stepName}' cannot replace {Describe(found)}. Nothing was changed. Type such fields " +
                $"nn.Module<Tensor, Tensor>, or set {optionsName}.{nameof(FixedTypeLayers)} to " +
                $"{nameof(FixedTypeLayers.CompressInPlace)} or {nameof(FixedTypeLayers.Skip)}.");
        }

        return found;
    }

    /// <summary>Adds a note naming the layers and what was done with them, and logs it as a warning.</summary>
    public static void Report(CompressionContext context, string stepName, string what, IReadOnlyDictionary<string, string> layers)
    {
        if (layers.Count == 0)
        {
            return;
        }

        string note = $"{what}: {Describe(layers)}";
        context.AddNote(note);
        context.Logger.LogWarning("{Step}: {Note}", stepName, note);
    }

    private static string Describe(IReadOnlyDictionary<string, string> layers) =>
        string.Join("; ", layers.Select(l => $"'{l.Key}' ({l.Value})"));
}
