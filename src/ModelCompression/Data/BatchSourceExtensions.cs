using static TorchSharp.torch;

namespace ModelCompression.Data;

/// <summary>Helpers for reading an <see cref="IBatchSource"/> without leaking native memory.</summary>
public static class BatchSourceExtensions
{
    /// <summary>
    /// Enumerates batches, each created inside its own <c>torch.NewDisposeScope()</c> that stays open while the
    /// loop body runs and is disposed when the loop moves on (or stops), freeing the batch and every tensor the
    /// body created.
    /// </summary>
    /// <param name="source">The data.</param>
    /// <param name="batchSize">The number of samples per batch.</param>
    /// <param name="shuffle">Whether to shuffle.</param>
    /// <param name="seed">The seed of the shuffle.</param>
    /// <returns>The batches. Tensors that must outlive an iteration need <c>MoveToOuterDisposeScope()</c> or <c>DetachFromDisposeScope()</c>.</returns>
    public static IEnumerable<(Tensor Input, Tensor Target)> ScopedBatches(this IBatchSource source, int batchSize, bool shuffle = false, int seed = 0)
    {
        ArgumentNullException.ThrowIfNull(source);
        var batches = source.GetBatches(batchSize, shuffle, seed);
        return Iterate(batches);
    }

    private static IEnumerable<(Tensor Input, Tensor Target)> Iterate(IEnumerable<(Tensor Input, Tensor Target)> batches)
    {
        using var enumerator = batches.GetEnumerator();
        while (true)
        {
            using var scope = NewDisposeScope();
            if (!enumerator.MoveNext())
            {
                yield break;
            }

            yield return enumerator.Current;
        }
    }

    /// <summary>Returns one batch of up to <paramref name="count"/> samples from the start of the data, in a new tensor pair.</summary>
    /// <param name="source">The data.</param>
    /// <param name="count">The number of samples.</param>
    /// <returns>The batch; the caller disposes it (or creates it in a dispose scope).</returns>
    /// <exception cref="ArgumentException">The data is empty.</exception>
    public static (Tensor Input, Tensor Target) FirstBatch(this IBatchSource source, int count)
    {
        ArgumentNullException.ThrowIfNull(source);
        foreach (var batch in source.GetBatches(count))
        {
            return batch;
        }

        throw new ArgumentException("The data set is empty.", nameof(source));
    }
}
