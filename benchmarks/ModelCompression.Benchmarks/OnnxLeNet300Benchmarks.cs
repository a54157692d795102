using BenchmarkDotNet.Attributes;
using Microsoft.ML.OnnxRuntime;
using ModelCompression.Interop.Onnx;
using ModelCompression.Quantization;
using ModelCompression.Samples;
using static TorchSharp.torch;

namespace ModelCompression.Benchmarks;

/// <summary>
/// The trained LeNet-300-100 with int8 weights (dynamic post-training quantization) and with int4 weights
/// (weight-only, groups of 64) three ways: TorchSharp fp32 (the baseline), this library's kernels, and the same models
/// exported to ONNX and run by ONNX Runtime 1.31 (CPU, 2 threads) — int8 in both forms the exporter writes, int4 as
/// MatMulNBits; plus the fp32 model in ONNX Runtime for reference.
/// </summary>
[MemoryDiagnoser(displayGenColumns: false)]
public class OnnxLeNet300Benchmarks
{
    private nn.Module<Tensor, Tensor> _fp32 = null!;
    private nn.Module<Tensor, Tensor> _int8 = null!;
    private nn.Module<Tensor, Tensor> _int4 = null!;
    private OrtSession _ortInt4 = null!;
    private Tensor _input = null!;
    private float[] _data = null!;
    private OrtSession _ortInteger = null!;
    private OrtSession _ortQdq = null!;
    private OrtSession _ortFp32 = null!;
    private IDisposable _noGrad = null!;

    /// <summary>Gets or sets the batch size.</summary>
    [Params(1, 64)]
    public int Batch { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        set_num_threads(Environment.ProcessorCount);
        using var split = MnistDigits.LoadBundled().Split(trainCount: 8000, seed: 0);
        _fp32 = ZooTraining.TrainOrLoad(ZooModel.LeNet300100, split, cacheDirectory: Path.Combine("artifacts", "cache")).Model;
        _fp32.eval();
        var context = new CompressionContext(new CompressionData(split.Train, split.Test), _fp32);
        _int8 = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = QuantizationMode.DynamicInt8 })
            .Apply(Modules.ModuleCloner.DeepClone(_fp32), context);
        _int8.eval();
        _int4 = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4 })
            .Apply(Modules.ModuleCloner.DeepClone(_fp32), context);
        _int4.eval();
        _input = rand(Batch, 784).DetachFromDisposeScope();
        _data = _input.data<float>().ToArray();
        _ortInteger = new OrtSession(OnnxExporter.ToBytes(_int8, [784], new OnnxExportOptions { Int8Form = OnnxInt8Form.Integer }), Batch);
        _ortQdq = new OrtSession(OnnxExporter.ToBytes(_int8, [784], new OnnxExportOptions { Int8Form = OnnxInt8Form.Qdq }), Batch);
        _ortFp32 = new OrtSession(OnnxExporter.ToBytes(_fp32, [784]), Batch);
        _ortInt4 = new OrtSession(OnnxExporter.ToBytes(_int4, [784]), Batch);
        _noGrad = no_grad();
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _noGrad.Dispose();
        _ortInteger.Dispose();
        _ortQdq.Dispose();
        _ortFp32.Dispose();
        _ortInt4.Dispose();
        _int4.Dispose();
        _fp32.Dispose();
        _int8.Dispose();
        _input.Dispose();
    }

    [Benchmark(Baseline = true)]
    public float TorchSharpFp32() => Run(_fp32);

    [Benchmark]
    public float OursInt8() => Run(_int8);

    [Benchmark]
    public float OnnxRuntimeInt8MatMulInteger() => _ortInteger.Run(_data);

    [Benchmark]
    public float OnnxRuntimeInt8Qdq() => _ortQdq.Run(_data);

    [Benchmark]
    public float OnnxRuntimeFp32() => _ortFp32.Run(_data);

    [Benchmark]
    public float OursInt4WeightOnly() => Run(_int4);

    [Benchmark]
    public float OnnxRuntimeInt4MatMulNBits() => _ortInt4.Run(_data);

    private float Run(nn.Module<Tensor, Tensor> model)
    {
        using var scope = NewDisposeScope();
        return model.call(_input)[0, 0].item<float>();
    }

    /// <summary>An ONNX Runtime session with its input and output bound once, so a call is one native run.</summary>
    private sealed class OrtSession : IDisposable
    {
        private readonly SessionOptions _options = new() { IntraOpNumThreads = 2 };
        private readonly InferenceSession _session;
        private readonly RunOptions _runOptions = new();
        private readonly int _batch;

        public OrtSession(byte[] model, int batch)
        {
            _session = new InferenceSession(model, _options);
            _batch = batch;
        }

        public float Run(float[] data)
        {
            using var input = OrtValue.CreateTensorValueFromMemory(data, [_batch, 784]);
            using var results = _session.Run(_runOptions, ["input"], [input], ["output"]);
            return results[0].GetTensorDataAsSpan<float>()[0];
        }

        public void Dispose()
        {
            _session.Dispose();
            _runOptions.Dispose();
            _options.Dispose();
        }
    }
}
