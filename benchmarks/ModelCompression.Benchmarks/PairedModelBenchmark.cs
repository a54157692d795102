using BenchmarkDotNet.Attributes;
using static TorchSharp.torch;

namespace ModelCompression.Benchmarks;

/// <summary>
/// A baseline model against its compressed form on the same input, at batch 1 and 64: the shape every compression
/// benchmark here shares. Subclasses build the two models; the ratio column is compressed / baseline time.
/// </summary>
[MemoryDiagnoser(displayGenColumns: false)]
public abstract class PairedModelBenchmark
{
    private nn.Module<Tensor, Tensor> _baseline = null!;
    private nn.Module<Tensor, Tensor> _compressed = null!;
    private Tensor _input = null!;
    private IDisposable _noGrad = null!;

    /// <summary>Gets or sets the batch size.</summary>
    [Params(1, 64)]
    public int Batch { get; set; }

    /// <summary>Builds the baseline, the compressed model and an input batch.</summary>
    protected abstract (nn.Module<Tensor, Tensor> Baseline, nn.Module<Tensor, Tensor> Compressed, Tensor Input) Create(int batch);

    [GlobalSetup]
    public void Setup()
    {
        TorchSharp.torch.set_num_threads(Environment.ProcessorCount);
        (_baseline, _compressed, _input) = Create(Batch);
        _baseline.eval();
        _compressed.eval();
        _input = _input.DetachFromDisposeScope();
        _noGrad = no_grad();
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _noGrad.Dispose();
        _baseline.Dispose();
        _compressed.Dispose();
        _input.Dispose();
    }

    [Benchmark(Baseline = true)]
    public float Baseline() => Run(_baseline);

    [Benchmark]
    public float Compressed() => Run(_compressed);

    private float Run(nn.Module<Tensor, Tensor> model)
    {
        using var scope = NewDisposeScope();
        return model.call(_input)[0, 0].item<float>();
    }
}
