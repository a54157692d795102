using BenchmarkDotNet.Attributes;
using ModelCompression.Pruning;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Benchmarks;

/// <summary>
/// A 4096×4096 Linear layer pruned to 90% and 95% sparsity (random pattern): TorchSharp's dense fp32 multiply (baseline)
/// against this library's CSR kernel (<see cref="SparseLinear"/>), at batch 1 and 64.
/// </summary>
public class SparseLinearBenchmarks : PairedModelBenchmark
{
    [Params(0.90, 0.95)]
    public double Sparsity { get; set; }

    protected override (nn.Module<Tensor, Tensor>, nn.Module<Tensor, Tensor>, Tensor) Create(int batch)
    {
        torch.random.manual_seed(7);
        var dense = nn.Linear(4096, 4096);
        using (no_grad())
        using (var mask = rand(4096, 4096).ge(Sparsity))
        {
            dense.weight!.mul_(mask);
        }

        return (dense, SparseLinear.FromLinear(dense), randn(batch, 4096));
    }
}
