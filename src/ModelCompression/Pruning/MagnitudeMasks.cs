using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Pruning;

/// <summary>The 0/1 masks of the layers one pruning step prunes, held while the model fine-tunes.</summary>
internal sealed class MaskSet : IDisposable
{
    private readonly List<(string Name, Parameter Weight, Tensor Mask)> _entries = [];

    public IReadOnlyList<(string Name, Parameter Weight, Tensor Mask)> Entries => _entries;

    /// <summary>Adds a mask (taking ownership of it, detached from any dispose scope).</summary>
    public void Add(string name, Parameter weight, Tensor mask) => _entries.Add((name, weight, mask.DetachFromDisposeScope()));

    /// <summary>Replaces these masks by <paramref name="other"/>'s, which is left empty.</summary>
    public void TakeFrom(MaskSet other)
    {
        Dispose();
        _entries.AddRange(other._entries);
        other._entries.Clear();
    }

    /// <summary>Zeroes the pruned weights.</summary>
    public void ApplyToWeights()
    {
        using var noGrad = no_grad();
        foreach (var (_, weight, mask) in _entries)
        {
            weight.mul_(mask);
        }
    }

    /// <summary>Zeroes the gradients of the pruned weights, so the optimizer does not move them (nor build momentum).</summary>
    public void ApplyToGradients()
    {
        using var noGrad = no_grad();
        foreach (var (_, weight, mask) in _entries)
        {
            weight.grad?.mul_(mask);
        }
    }

    public void Dispose()
    {
        foreach (var (_, _, mask) in _entries)
        {
            mask.Dispose();
        }

        _entries.Clear();
    }
}

/// <summary>Magnitude masks: which weights to keep (1) and which to prune (0).</summary>
internal static class MagnitudeMasks
{
    /// <summary>The value a pruned position of a mask gets; held for the process (see <see cref="KeptScalars"/>).</summary>
    private static readonly Scalar Zero = 0.ToScalar();

    /// <summary>Prunes exactly round(sparsity × n) of the smallest |w| (ties broken by position, so the result is deterministic).</summary>
    public static Tensor TopMagnitude(Tensor weight, double sparsity)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var flat = weight.detach().abs().flatten().to(float32);
        long k = (long)Math.Round(sparsity * flat.numel());
        var mask = ones_like(flat);
        if (k > 0)
        {
            var (_, order) = flat.sort(stable: true);
            mask.index_fill_(0, order.narrow(0, 0, k), Zero);
        }

        return mask.view_as(weight).to(weight.dtype).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// One threshold across all the weights: prunes round(sparsity × Σn) of the smallest |w| of them together
    /// (exactly <paramref name="exact"/> of them when given).
    /// </summary>
    public static List<Tensor> Global(IReadOnlyList<Tensor> weights, double sparsity, long? exact = null)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        if (weights.Count == 0)
        {
            return [];
        }

        var flat = cat(weights.Select(w => w.detach().abs().flatten().to(float32)).ToList(), 0);
        long k = exact ?? (long)Math.Round(sparsity * flat.numel());
        var mask = ones_like(flat);
        if (k > 0)
        {
            var (_, order) = flat.sort(stable: true);
            mask.index_fill_(0, order.narrow(0, 0, k), Zero);
        }

        var result = new List<Tensor>(weights.Count);
        long offset = 0;
        foreach (var w in weights)
        {
            result.Add(mask.narrow(0, offset, w.numel()).view_as(w).to(w.dtype).MoveToOuterDisposeScope());
            offset += w.numel();
        }

        return result;
    }

    /// <summary>
    /// One threshold across all the weights, with a floor: prunes round(sparsity × Σn) of the smallest |w| of them
    /// together, except that no layer keeps fewer than ⌈<paramref name="minKeptFraction"/> × n⌉ of its own weights.
    /// A layer the threshold leaves under its floor keeps exactly its floor (its largest |w|), and the threshold is
    /// recomputed over the other layers for the weights that remain, repeating while that leaves another layer under
    /// its floor: the total kept stays round((1 − sparsity) × Σn) whenever the floors fit in it.
    /// </summary>
    /// <param name="weights">The layers' weights.</param>
    /// <param name="sparsity">The fraction of all the weights pruned.</param>
    /// <param name="minKeptFraction">The fraction of each layer kept at least; 0 for the plain global threshold.</param>
    /// <returns>The masks, and for each layer the floor held: the fraction the threshold alone would have kept, or <see langword="null"/>.</returns>
    public static (List<Tensor> Masks, double?[] Floored) GlobalWithFloor(IReadOnlyList<Tensor> weights, double sparsity, double minKeptFraction)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        long total = weights.Sum(w => w.numel());
        long keep = total - (long)Math.Round(sparsity * total);
        var floors = weights.Select(w => Math.Min(w.numel(), (long)Math.Ceiling((minKeptFraction * w.numel()) - 1e-9))).ToArray();
        var floored = new double?[weights.Count];
        var masks = new Tensor?[weights.Count];
        while (true)
        {
            // The threshold over the layers not (yet) held at their floor, for what the floors leave of the budget.
            var free = Enumerable.Range(0, weights.Count).Where(i => floored[i] is null).ToList();
            long budget = Math.Max(0, keep - Enumerable.Range(0, weights.Count).Where(i => floored[i] is not null).Sum(i => floors[i]));
            long freeTotal = free.Sum(i => weights[i].numel());
            var pooled = Global(free.Select(i => weights[i]).ToList(), freeTotal == 0 ? 0 : 1 - ((double)budget / freeTotal), exact: freeTotal - budget);
            var under = new List<int>();
            for (int j = 0; j < free.Count; j++)
            {
                int i = free[j];
                masks[i]?.Dispose();
                masks[i] = pooled[j];
                long kept = pooled[j].count_nonzero().item<long>();
                if (kept < floors[i])
                {
                    under.Add(i);
                    // Reported as what the plain threshold gave the layer, the first time it fell under its floor.
                    floored[i] = (double)kept / weights[i].numel();
                }
            }

            if (under.Count == 0)
            {
                break;
            }

            foreach (int i in under)
            {
                masks[i]!.Dispose();
                masks[i] = KeepLargest(weights[i], floors[i]);
            }
        }

        return (masks.Select(m => m!.MoveToOuterDisposeScope()).ToList(), floored);
    }

    /// <summary>Keeps exactly the <paramref name="count"/> largest |w| of a layer (ties broken by position).</summary>
    public static Tensor KeepLargest(Tensor weight, long count)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var flat = weight.detach().abs().flatten().to(float32);
        long prune = flat.numel() - count;
        var mask = ones_like(flat);
        if (prune > 0)
        {
            var (_, order) = flat.sort(stable: true);
            mask.index_fill_(0, order.narrow(0, 0, prune), Zero);
        }

        return mask.view_as(weight).to(weight.dtype).MoveToOuterDisposeScope();
    }

    /// <summary>Han et al.'s rule: keep |w| ≥ quality × std(W).</summary>
    public static Tensor Threshold(Tensor weight, double quality)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var w = weight.detach().to(float32);
        double threshold = quality * w.std().item<float>();
        using var bound = threshold.ToScalar();
        return w.abs().ge(bound).to(weight.dtype).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// N:M: in every group of M consecutive weights along the input dimension (dimension 1; for convolutions the
    /// input channels at each kernel position), keep the N largest |w|.
    /// </summary>
    public static Tensor NOfM(Tensor weight, int n, int m)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        long inputs = weight.shape[1];
        if (inputs % m != 0)
        {
            throw new ArgumentException($"N:M needs the input dimension ({inputs}) to be a multiple of M ({m}).", nameof(weight));
        }

        // Move the input dimension last: [out, ..., in] → groups of M along it.
        var w = weight.detach().to(float32);
        var permuted = weight.dim() == 2 ? w : w.movedim([1], [-1]);
        var shape = permuted.shape;
        var groups = permuted.abs().reshape(-1, m);
        var (_, keep) = groups.topk(n, dim: 1, largest: true, sorted: false);
        var mask = zeros_like(groups).scatter_(1, keep, ones_like(keep, dtype: groups.dtype)).reshape(shape);
        var restored = weight.dim() == 2 ? mask : mask.movedim([-1], [1]);
        return restored.contiguous().to(weight.dtype).MoveToOuterDisposeScope();
    }
}
