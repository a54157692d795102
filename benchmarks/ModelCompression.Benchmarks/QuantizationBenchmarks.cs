using BenchmarkDotNet.Attributes;
using ModelCompression.Benchmarks.Peers;
using ModelCompression.Quantization;
using ModelCompression.Quantization.Kernels;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Benchmarks;

/// <summary>
/// One 4096×4096 Linear layer, batch 1 and 64: TorchSharp fp32 (baseline) and bf16, this library's dynamic int8 and
/// int4 weight-only layers, and the two int8 peers in the same run — ONNX Runtime's <c>DynamicQuantizeMatMul</c> and
/// libtorch's fbgemm int8-weight linear. All use the machine's cores (2 here).
/// </summary>
[MemoryDiagnoser(displayGenColumns: false)]
public class QuantizedLinearBenchmarks
{
    private const int Features = 4096;
    private nn.Module<Tensor, Tensor> _fp32 = null!;
    private nn.Module<Tensor, Tensor> _bf16 = null!;
    private QuantizedLinear _int8 = null!;
    private QuantizedLinear _int4 = null!;
    private OnnxRuntimeDynamicInt8Linear _onnx = null!;
    private FbgemmInt8Linear _fbgemm = null!;
    private Tensor _input = null!;
    private float[] _x = null!;
    private float[] _y = null!;
    private IDisposable _noGrad = null!;

    /// <summary>Gets or sets the batch size.</summary>
    [Params(1, 64)]
    public int Batch { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        torch.set_num_threads(Environment.ProcessorCount);
        torch.random.manual_seed(21);
        var linear = nn.Linear(Features, Features);
        linear.eval();
        _fp32 = linear;
        var copy = nn.Linear(Features, Features);
        copy.load_state_dict(linear.state_dict());
        _bf16 = new HalfPrecisionLayer(copy, ScalarType.BFloat16);
        _int8 = QuantizedLinear.FromLinear(linear);
        _int4 = QuantizedLinear.FromLinear(linear, bits: 4, QuantizationGranularity.PerGroup(64), weightOnly: true);
        using (no_grad())
        {
            _onnx = new OnnxRuntimeDynamicInt8Linear(linear.weight!.data<float>().ToArray(), linear.bias!.data<float>().ToArray(), Features, Features, Environment.ProcessorCount);
            _fbgemm = new FbgemmInt8Linear(linear.weight!.detach(), linear.bias!.detach());
        }

        _input = randn(Batch, Features).DetachFromDisposeScope();
        _x = _input.data<float>().ToArray();
        _y = new float[Batch * Features];
        _noGrad = no_grad();
        Console.WriteLine($"// Int8 kernel path: {Int8Kernel.BestPath} (supported: {string.Join(", ", Int8Kernel.SupportedPaths)})");
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _noGrad.Dispose();
        _fp32.Dispose();
        _bf16.Dispose();
        _int8.Dispose();
        _int4.Dispose();
        _onnx.Dispose();
        _fbgemm.Dispose();
        _input.Dispose();
    }

    [Benchmark(Baseline = true, Description = "TorchSharp fp32")]
    public float Fp32() => Run(_fp32);

    [Benchmark(Description = "TorchSharp bf16")]
    public float BFloat16() => Run(_bf16);

    [Benchmark(Description = "ours int8 dynamic")]
    public float OursInt8() => Run(_int8);

    [Benchmark(Description = "ours int4 weight-only")]
    public float OursInt4() => Run(_int4);

    [Benchmark(Description = "ONNX Runtime int8")]
    public float OnnxRuntimeInt8()
    {
        _onnx.Run(_x, Batch, _y);
        return _y[0];
    }

    [Benchmark(Description = "fbgemm int8 (libtorch)")]
    public float FbgemmInt8()
    {
        using var scope = NewDisposeScope();
        return _fbgemm.Forward(_input)[0, 0].item<float>();
    }

    private float Run(nn.Module<Tensor, Tensor> model)
    {
        using var scope = NewDisposeScope();
        return model.call(_input)[0, 0].item<float>();
    }
}

/// <summary>LeNet-5 end to end: fp32 against static int8 (calibrated, ReLU fused), at batch 1 and 64.</summary>
public class StaticInt8LeNet5Benchmarks : PairedModelBenchmark
{
    protected override (nn.Module<Tensor, Tensor>, nn.Module<Tensor, Tensor>, Tensor) Create(int batch)
    {
        var baseline = ModelCompression.Samples.ModelZoo.Create(ModelCompression.Samples.ZooModel.LeNet5, 7);
        baseline.eval();
        var copy = Modules.ModuleCloner.DeepClone(baseline);
        using var calibration = new Data.TensorDataset(randn(256, 1, 28, 28), zeros(256, dtype: int64));
        var context = new CompressionContext(new CompressionData(calibration, calibration), baseline);
        var step = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8, CalibrationBatches = 2 });
        var quantized = step.Apply(copy, context);
        return (baseline, quantized, randn(batch, 1, 28, 28));
    }
}
