using BenchmarkDotNet.Attributes;
using ModelCompression.Pruning;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Benchmarks;

/// <summary>
/// A 4096×4096 Linear layer pruned to 90% and 95% sparsity (random pattern): TorchSharp's dense fp32 multiply against
/// this library's CSR kernel (<see cref="SparseLinear"/>), at batch 1 and 64.
/// </summary>
[MemoryDiagnoser(displayGenColumns: false)]
public class SparseLinearBenchmarks
{
    private TorchSharp.Modules.Linear _dense = null!;
    private SparseLinear _sparse = null!;
    private Tensor _input = null!;
    private IDisposable _noGrad = null!;

    [Params(0.90, 0.95)]
    public double Sparsity { get; set; }

    [Params(1, 64)]
    public int Batch { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        torch.set_num_threads(Environment.ProcessorCount);
        torch.random.manual_seed(7);
        _dense = nn.Linear(4096, 4096);
        using (no_grad())
        using (var mask = rand(4096, 4096).ge(Sparsity))
        {
            _dense.weight!.mul_(mask);
        }

        _sparse = SparseLinear.FromLinear(_dense);
        _input = randn(Batch, 4096).DetachFromDisposeScope();
        _noGrad = no_grad();
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _noGrad.Dispose();
        _dense.Dispose();
        _sparse.Dispose();
        _input.Dispose();
    }

    [Benchmark(Baseline = true, Description = "dense fp32 (TorchSharp)")]
    public float Dense()
    {
        using var scope = NewDisposeScope();
        return _dense.call(_input)[0, 0].item<float>();
    }

    [Benchmark(Description = "sparse CSR (ours)")]
    public float Sparse()
    {
        using var scope = NewDisposeScope();
        return _sparse.call(_input)[0, 0].item<float>();
    }
}
