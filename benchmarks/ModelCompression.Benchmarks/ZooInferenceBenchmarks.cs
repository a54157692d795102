using BenchmarkDotNet.Attributes;
using ModelCompression.Data;
using ModelCompression.Quantization;
using ModelCompression.Samples;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Benchmarks;

/// <summary>
/// Inference latency of the zoo models at batch 1 and 64, dense fp32 against the same model after the
/// half-precision (bf16) step. Weights are untrained (latency does not depend on their values).
/// </summary>
[MemoryDiagnoser(displayGenColumns: false)]
public class ZooInferenceBenchmarks
{
    private nn.Module<Tensor, Tensor> _fp32 = null!;
    private nn.Module<Tensor, Tensor> _bf16 = null!;
    private Tensor _input = null!;
    private IDisposable _noGrad = null!;

    [Params(ZooModel.LeNet300100, ZooModel.LeNet5, ZooModel.SmallResNet)]
    public ZooModel Model { get; set; }

    [Params(1, 64)]
    public int Batch { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        torch.set_num_threads(Environment.ProcessorCount);
        _fp32 = ModelZoo.Create(Model, seed: 0);
        _fp32.eval();
        var sampleShape = ModelZoo.Layout(Model) == MnistLayout.Flat ? new long[] { 784 } : [1, 28, 28];
        _input = rand([Batch, .. sampleShape]).DetachFromDisposeScope();

        using var calibration = new TensorDataset(_input, zeros(Batch, dtype: int64));
        var context = new CompressionContext(new CompressionData(null, calibration), _fp32);
        var copy = Modules.ModuleCloner.DeepClone(_fp32);
        _bf16 = new HalfPrecisionStep(new HalfPrecisionOptions { Format = HalfPrecisionFormat.BFloat16 }).Apply(copy, context);
        _bf16.eval();
        _noGrad = no_grad();
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _noGrad.Dispose();
        _fp32.Dispose();
        _bf16.Dispose();
        _input.Dispose();
    }

    [Benchmark(Baseline = true, Description = "fp32")]
    public float Fp32()
    {
        using var scope = NewDisposeScope();
        return _fp32.call(_input)[0, 0].item<float>();
    }

    [Benchmark(Description = "bf16 weights")]
    public float BFloat16()
    {
        using var scope = NewDisposeScope();
        return _bf16.call(_input)[0, 0].item<float>();
    }
}
