using BenchmarkDotNet.Attributes;
using ModelCompression.Factorization;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Benchmarks;

/// <summary>
/// A 4096×4096 Linear layer against a rank-512 factorization of the same shape (two Linear layers 4096→512→4096,
/// 4× fewer MACs), both on TorchSharp's fp32 kernels, at batch 1 and 64. Factor weights are random: the SVD itself is
/// not timed here.
/// </summary>
[MemoryDiagnoser(displayGenColumns: false)]
public class LowRankLinearBenchmarks
{
    private TorchSharp.Modules.Linear _dense = null!;
    private LowRankLinear _lowRank = null!;
    private Tensor _input = null!;
    private IDisposable _noGrad = null!;

    [Params(1, 64)]
    public int Batch { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        torch.set_num_threads(Environment.ProcessorCount);
        torch.random.manual_seed(11);
        _dense = nn.Linear(4096, 4096);
        _lowRank = new LowRankLinear(nn.Linear(4096, 512, hasBias: false), nn.Linear(512, 4096));
        _input = randn(Batch, 4096).DetachFromDisposeScope();
        _noGrad = no_grad();
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _noGrad.Dispose();
        _dense.Dispose();
        _lowRank.Dispose();
        _input.Dispose();
    }

    [Benchmark(Baseline = true, Description = "dense 4096×4096")]
    public float Dense()
    {
        using var scope = NewDisposeScope();
        return _dense.call(_input)[0, 0].item<float>();
    }

    [Benchmark(Description = "rank 512 (4096→512→4096)")]
    public float LowRank()
    {
        using var scope = NewDisposeScope();
        return _lowRank.call(_input)[0, 0].item<float>();
    }
}
