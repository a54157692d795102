using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Interop.Onnx;

/// <summary>
/// Exports a layer kind to ONNX wherever it appears in a model: implemented by the kind's
/// <see cref="ModelCompression.Modules.LayerDescriptor"/> (registered in <see cref="ModelCompression.Modules.LayerRegistry"/>),
/// so that one registration covers copying, the file, structured pruning and export, and no export needs an entry
/// in <see cref="OnnxExportOptions.CustomModules"/> (which, when it has one for the type, still wins).
/// </summary>
public interface IOnnxLayerEmitter
{
    /// <summary>Writes the layer's forward into the graph.</summary>
    /// <param name="graph">The graph being built; <see cref="OnnxGraph.Emit"/> writes a child layer.</param>
    /// <param name="module">The layer, of the descriptor's module type.</param>
    /// <param name="name">Its dotted name (for node names and error messages).</param>
    /// <param name="input">The name of its input value.</param>
    /// <returns>The name of its output value.</returns>
    string EmitOnnx(OnnxGraph graph, nn.Module module, string name, string input);
}
