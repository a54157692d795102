using BenchmarkDotNet.Attributes;
using ModelCompression.Architecture;
using ModelCompression.Data;
using ModelCompression.Samples;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Benchmarks;

/// <summary>LeNet-5 against the same network with both convolutions rewritten as depthwise-separable ones (7× fewer convolution MACs).</summary>
[MemoryDiagnoser(displayGenColumns: false)]
public class DepthwiseSeparableBenchmarks
{
    private nn.Module<Tensor, Tensor> _original = null!;
    private nn.Module<Tensor, Tensor> _rewritten = null!;
    private Tensor _input = null!;
    private IDisposable _noGrad = null!;

    [Params(1, 64)]
    public int Batch { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        torch.set_num_threads(Environment.ProcessorCount);
        _original = ModelZoo.Create(ZooModel.LeNet5, seed: 0);
        _original.eval();
        _input = rand(Batch, 1, 28, 28).DetachFromDisposeScope();
        using var data = new TensorDataset(_input, zeros(Batch, dtype: int64));
        var context = new CompressionContext(new CompressionData(null, data), _original);
        _rewritten = new DepthwiseSeparableRewriteStep(new DepthwiseSeparableRewriteOptions()).Apply(Modules.ModuleCloner.DeepClone(_original), context);
        _rewritten.eval();
        _noGrad = no_grad();
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _noGrad.Dispose();
        _original.Dispose();
        _rewritten.Dispose();
        _input.Dispose();
    }

    [Benchmark(Baseline = true, Description = "LeNet-5")]
    public float Original()
    {
        using var scope = NewDisposeScope();
        return _original.call(_input)[0, 0].item<float>();
    }

    [Benchmark(Description = "LeNet-5, depthwise-separable")]
    public float Rewritten()
    {
        using var scope = NewDisposeScope();
        return _rewritten.call(_input)[0, 0].item<float>();
    }
}
