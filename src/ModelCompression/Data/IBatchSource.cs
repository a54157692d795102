using static TorchSharp.torch;

namespace ModelCompression.Data;

/// <summary>
/// A labelled data set that can be read in batches of <c>(input, target)</c> tensors.
/// </summary>
/// <remarks>
/// Every batch is a new tensor pair owned by the caller, who creates it inside a
/// <c>torch.NewDisposeScope()</c> so that it is freed at the end of the iteration.
/// Implementations must be deterministic: the same <c>seed</c> gives the same order.
/// </remarks>
public interface IBatchSource
{
    /// <summary>Gets the number of samples.</summary>
    long Count { get; }

    /// <summary>Gets the shape of one input sample, without the batch dimension (e.g. <c>[784]</c> or <c>[1, 28, 28]</c>).</summary>
    IReadOnlyList<long> SampleShape { get; }

    /// <summary>
    /// Gets the element type of the inputs (float32 for images and features, int64 for token ids): the type of the
    /// inputs the library makes up when it measures a model (MACs, latency, export).
    /// </summary>
    /// <value>The default implementation says float32; a source of other inputs must say so (the pipeline checks it against the first batch).</value>
    ScalarType InputType => ScalarType.Float32;

    /// <summary>Enumerates the samples in batches.</summary>
    /// <param name="batchSize">The number of samples per batch (the last batch may be smaller). Must be positive.</param>
    /// <param name="shuffle">Whether to visit the samples in a random order given by <paramref name="seed"/>.</param>
    /// <param name="seed">The seed of the shuffle; ignored when <paramref name="shuffle"/> is <see langword="false"/>.</param>
    /// <returns>The batches, each a new <c>(input, target)</c> pair.</returns>
    IEnumerable<(Tensor Input, Tensor Target)> GetBatches(int batchSize, bool shuffle = false, int seed = 0);
}
