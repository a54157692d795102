namespace ModelCompression.Metrics;

/// <summary>
/// Implemented by the layers this library produces (reduced-precision, quantized, low-rank, sparse), so that
/// metrics and reports can describe them. A custom layer may implement it too.
/// </summary>
public interface ICompressedLayer
{
    /// <summary>Gets the number of bits each stored weight takes (32 for fp32, 16 for fp16/bf16, 8 for int8, ...).</summary>
    int WeightBits { get; }

    /// <summary>Gets the rank of a low-rank layer, or <see langword="null"/>.</summary>
    int? Rank { get; }

    /// <summary>
    /// Gets the number of parameters the layer stands for, counted as the dense layer it replaces (so a sparse layer
    /// reports its full in × out, and <see cref="NonzeroParameterCount"/> the weights it stores).
    /// </summary>
    long ParameterCount { get; }

    /// <summary>Gets the number of those parameters that are not zero.</summary>
    long NonzeroParameterCount { get; }

    /// <summary>Gets the multiply-accumulates of one call, given the input and output of that call.</summary>
    /// <param name="input">The input of the call.</param>
    /// <param name="output">The output of the call.</param>
    /// <returns>The multiply-accumulates of the call, over the whole batch.</returns>
    long CountMacs(TorchSharp.torch.Tensor input, TorchSharp.torch.Tensor output);
}
