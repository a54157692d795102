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
            mask.index_fill_(0, order.narrow(0, 0, k), 0);
        }

        return mask.view_as(weight).to(weight.dtype).MoveToOuterDisposeScope();
    }

    /// <summary>One threshold across all the weights: prunes round(sparsity × Σn) of the smallest |w| of them together.</summary>
    public static List<Tensor> Global(IReadOnlyList<Tensor> weights, double sparsity)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var flat = cat(weights.Select(w => w.detach().abs().flatten().to(float32)).ToList(), 0);
        long k = (long)Math.Round(sparsity * flat.numel());
        var mask = ones_like(flat);
        if (k > 0)
        {
            var (_, order) = flat.sort(stable: true);
            mask.index_fill_(0, order.narrow(0, 0, k), 0);
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

    /// <summary>Han et al.'s rule: keep |w| ≥ quality × std(W).</summary>
    public static Tensor Threshold(Tensor weight, double quality)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var w = weight.detach().to(float32);
        double threshold = quality * w.std().item<float>();
        return w.abs().ge(threshold).to(weight.dtype).MoveToOuterDisposeScope();
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
