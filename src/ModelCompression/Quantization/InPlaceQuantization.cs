using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Quantization;

/// <summary>
/// Integer quantization of layers no quantized layer can replace: TorchSharp's natively implemented recurrent and
/// attention modules (sealed types with no integer kernel here), the other leaf kinds of the
/// <see cref="Modules.LayerRegistry"/> that hold a weight (Conv1d, Conv3d, the transposed convolutions, the RNN cells,
/// and kinds an application registers), and layers held in fields of a concrete type. Their
/// weights (every floating-point parameter of two or more dimensions) are rounded in place to int8 or int4 levels times
/// a scale per row or group; the layer keeps its type and computes in float, and the compressed file finds the grid and
/// stores the levels and scales (<see cref="WeightGrid"/>). Biases and norms stay as they are.
/// </summary>
internal static class InPlaceQuantization
{
    /// <summary>The native module kinds whose weights are rounded in place when selected.</summary>
    public static readonly Type[] NativeKinds =
    [
        typeof(LSTM), typeof(GRU), typeof(RNN), typeof(MultiheadAttention),
        typeof(TransformerEncoderLayer), typeof(TransformerEncoder), typeof(TransformerDecoderLayer), typeof(TransformerDecoder),
    ];

    /// <summary>The TorchSharp leaf kinds with a weight and no integer kernel here, rounded in place when selected (and selected by default).</summary>
    public static readonly Type[] LeafKinds =
    [
        typeof(Conv1d), typeof(Conv3d), typeof(ConvTranspose1d), typeof(ConvTranspose2d), typeof(ConvTranspose3d),
        typeof(GRUCell), typeof(LSTMCell), typeof(RNNCell),
    ];

    /// <summary>Returns whether <paramref name="module"/> is a native kind whose weights are rounded in place.</summary>
    public static bool IsNativeKind(nn.Module module) => Array.IndexOf(NativeKinds, module.GetType()) >= 0;

    /// <summary>
    /// Returns whether <paramref name="module"/>'s weights are rounded in place when it is selected: a native kind, or a
    /// leaf kind of the layer registry (no child modules) with a weight of two or more dimensions that has no
    /// quantized layer of its own (Linear, Conv2d and the lookups, Embedding and EmbeddingBag, are handled apart).
    /// </summary>
    public static bool IsInPlaceKind(nn.Module module) =>
        IsNativeKind(module)
        || (module is not (Linear or Conv2d or Embedding or EmbeddingBag)
            && !module.named_children().Any()
            && Modules.LayerRegistry.Find(module) is not null
            && Weights(module).Any());

    /// <summary>The weights rounded: floating-point parameters of two or more dimensions.</summary>
    public static IEnumerable<(string Name, Parameter Weight)> Weights(nn.Module layer) =>
        layer.named_parameters().Where(p => p.parameter.dim() >= 2 && is_floating_point(p.parameter.dtype));

    /// <summary>Throws, naming the layer and tensor, when a weight to be rounded holds NaN or infinity.</summary>
    public static void ThrowIfNotFinite(string layerName, nn.Module layer)
    {
        using var scope = NewDisposeScope();
        foreach (var (name, weight) in Weights(layer))
        {
            if (!isfinite(weight).all().item<bool>())
            {
                throw new ArgumentException($"Layer '{layerName}' has NaN or infinite values in its {name}; nothing was quantized.", "model");
            }
        }
    }

    /// <summary>
    /// Rounds the layer's weights in place to <paramref name="bits"/>-bit levels with a scale per row
    /// (<paramref name="groupSize"/> 0) or per group of inputs.
    /// </summary>
    /// <returns>The number of weights rounded.</returns>
    public static long Round(nn.Module layer, int bits, int groupSize)
    {
        long count = 0;
        using var noGrad = no_grad();
        foreach (var (_, weight) in Weights(layer).ToList())
        {
            using var scope = NewDisposeScope();
            var values = weight.detach().to(ScalarType.Float32).cpu().contiguous().data<float>().ToArray();
            WeightGrid.Round(values, weight.shape[0], bits, groupSize);
            weight.copy_(tensor(values, weight.shape).to(weight.dtype).to(weight.device));
            count += values.Length;
        }

        return count;
    }
}
