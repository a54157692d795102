using ModelCompression.Factorization;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Benchmarks;

/// <summary>
/// A 4096×4096 Linear layer (baseline) against a rank-512 factorization of the same shape (4096→512→4096, 4× fewer
/// MACs), both on TorchSharp's fp32 kernels. Factor weights are random: the SVD itself is not timed here.
/// </summary>
public class LowRankLinearBenchmarks : PairedModelBenchmark
{
    protected override (nn.Module<Tensor, Tensor>, nn.Module<Tensor, Tensor>, Tensor) Create(int batch)
    {
        torch.random.manual_seed(11);
        return (nn.Linear(4096, 4096), new LowRankLinear(nn.Linear(4096, 512, hasBias: false), nn.Linear(512, 4096)), randn(batch, 4096));
    }
}
