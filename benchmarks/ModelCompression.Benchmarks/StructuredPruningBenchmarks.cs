using BenchmarkDotNet.Attributes;
using ModelCompression.Data;
using ModelCompression.Pruning;
using ModelCompression.Samples;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Benchmarks;

/// <summary>The small residual CNN against the same network with 50% of its channels removed by structured pruning.</summary>
[MemoryDiagnoser(displayGenColumns: false)]
public class StructuredPruningBenchmarks
{
    private nn.Module<Tensor, Tensor> _baseline = null!;
    private nn.Module<Tensor, Tensor> _pruned = null!;
    private Tensor _input = null!;
    private IDisposable _noGrad = null!;

    [Params(1, 64)]
    public int Batch { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        torch.set_num_threads(Environment.ProcessorCount);
        _baseline = ModelZoo.Create(ZooModel.SmallResNet, seed: 0);
        _baseline.eval();
        _input = rand(Batch, 1, 28, 28).DetachFromDisposeScope();
        using var data = new TensorDataset(_input, zeros(Batch, dtype: int64));
        var context = new CompressionContext(new CompressionData(null, data), _baseline);
        _pruned = new StructuredPruningStep(new StructuredPruningOptions { Ratio = 0.5 }).Apply(Modules.ModuleCloner.DeepClone(_baseline), context);
        _pruned.eval();
        _noGrad = no_grad();
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _noGrad.Dispose();
        _baseline.Dispose();
        _pruned.Dispose();
        _input.Dispose();
    }

    [Benchmark(Baseline = true, Description = "SmallResNet")]
    public float Baseline()
    {
        using var scope = NewDisposeScope();
        return _baseline.call(_input)[0, 0].item<float>();
    }

    [Benchmark(Description = "SmallResNet, 50% channels pruned")]
    public float Pruned()
    {
        using var scope = NewDisposeScope();
        return _pruned.call(_input)[0, 0].item<float>();
    }
}
