using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Data;

/// <summary>
/// An in-memory data set of input and target tensors whose first dimension indexes the samples.
/// </summary>
/// <remarks>
/// The constructor copies the tensors it is given, so the caller keeps ownership of (and may dispose)
/// its own tensors. Dispose the data set to free its copies.
/// </remarks>
public sealed class TensorDataset : IBatchSource, IDisposable
{
    private readonly Tensor _inputs;
    private readonly Tensor _targets;
    private readonly long[] _sampleShape;
    private bool _disposed;

    /// <summary>Initializes a new instance of the <see cref="TensorDataset"/> class.</summary>
    /// <param name="inputs">The inputs, shape <c>[N, ...]</c>; floating point and finite.</param>
    /// <param name="targets">The targets, shape <c>[N]</c> (class indices) or <c>[N, ...]</c> (regression).</param>
    /// <exception cref="ArgumentNullException">A tensor is <see langword="null"/>.</exception>
    /// <exception cref="ArgumentException">The data set is empty, the sample counts differ, or the inputs hold NaN or infinite values.</exception>
    public TensorDataset(Tensor inputs, Tensor targets)
    {
        ArgumentNullException.ThrowIfNull(inputs);
        ArgumentNullException.ThrowIfNull(targets);
        if (inputs.dim() == 0 || inputs.shape[0] == 0)
        {
            throw new ArgumentException("The data set is empty: the inputs have no samples.", nameof(inputs));
        }

        if (targets.dim() == 0 || targets.shape[0] != inputs.shape[0])
        {
            throw new ArgumentException(
                $"The inputs hold {inputs.shape[0]} samples but the targets hold {(targets.dim() == 0 ? 0 : targets.shape[0])}.",
                nameof(targets));
        }

        using (NewDisposeScope())
        {
            if (inputs.is_floating_point() && !isfinite(inputs).all().item<bool>())
            {
                throw new ArgumentException("The inputs contain NaN or infinite values.", nameof(inputs));
            }
        }

        using (var inputAlias = inputs.detach())
        using (var targetAlias = targets.detach())
        {
            _inputs = inputAlias.clone().DetachFromDisposeScope();
            _targets = targetAlias.clone().DetachFromDisposeScope();
        }

        _sampleShape = inputs.shape.Skip(1).ToArray();
    }

    /// <inheritdoc/>
    public long Count => _inputs.shape[0];

    /// <inheritdoc/>
    public IReadOnlyList<long> SampleShape => _sampleShape;

    /// <inheritdoc/>
    public ScalarType InputType => _inputs.dtype;

    /// <summary>Gets the inputs (owned by the data set; do not dispose).</summary>
    public Tensor Inputs => _inputs;

    /// <summary>Gets the targets (owned by the data set; do not dispose).</summary>
    public Tensor Targets => _targets;

    /// <summary>Returns a new data set holding the first <paramref name="count"/> samples.</summary>
    /// <param name="count">The number of samples to keep; 1 to <see cref="Count"/>.</param>
    /// <returns>A new data set that the caller owns.</returns>
    public TensorDataset Take(long count)
    {
        if (count < 1 || count > Count)
        {
            throw new ArgumentOutOfRangeException(nameof(count), count, $"Must be between 1 and {Count}.");
        }

        using var scope = NewDisposeScope();
        return new TensorDataset(_inputs.narrow(0, 0, count), _targets.narrow(0, 0, count));
    }

    /// <inheritdoc/>
    public IEnumerable<(Tensor Input, Tensor Target)> GetBatches(int batchSize, bool shuffle = false, int seed = 0)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentOutOfRangeException.ThrowIfLessThan(batchSize, 1);
        return Enumerate(batchSize, shuffle, seed);
    }

    private IEnumerable<(Tensor Input, Tensor Target)> Enumerate(int batchSize, bool shuffle, int seed)
    {
        long n = Count;
        long[]? order = shuffle ? Permutation(n, seed) : null;
        for (long start = 0; start < n; start += batchSize)
        {
            long size = Math.Min(batchSize, n - start);
            if (order is null)
            {
                yield return (_inputs.narrow(0, start, size), _targets.narrow(0, start, size));
            }
            else
            {
                using var index = tensor(order.AsSpan((int)start, (int)size).ToArray(), device: _inputs.device);
                yield return (_inputs.index_select(0, index), _targets.index_select(0, index));
            }
        }
    }

    /// <summary>A Fisher–Yates permutation from <see cref="Random"/> so that the order does not depend on LibTorch's generator.</summary>
    internal static long[] Permutation(long n, int seed)
    {
        var order = new long[n];
        for (long i = 0; i < n; i++)
        {
            order[i] = i;
        }

        var random = new Random(seed);
        for (long i = n - 1; i > 0; i--)
        {
            long j = random.NextInt64(i + 1);
            (order[i], order[j]) = (order[j], order[i]);
        }

        return order;
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }

        _disposed = true;
        _inputs.Dispose();
        _targets.Dispose();
    }
}
