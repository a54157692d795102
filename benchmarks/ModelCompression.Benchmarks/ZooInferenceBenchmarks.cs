using BenchmarkDotNet.Attributes;
using ModelCompression.Data;
using ModelCompression.Quantization;
using ModelCompression.Samples;
using static TorchSharp.torch;

namespace ModelCompression.Benchmarks;

/// <summary>
/// The zoo models, dense fp32 (baseline) against the same model after the half-precision (bf16) step, at batch 1 and
/// 64. Weights are untrained (latency does not depend on their values).
/// </summary>
public class ZooInferenceBenchmarks : PairedModelBenchmark
{
    [Params(ZooModel.LeNet300100, ZooModel.LeNet5, ZooModel.SmallResNet)]
    public ZooModel Model { get; set; }

    protected override (nn.Module<Tensor, Tensor>, nn.Module<Tensor, Tensor>, Tensor) Create(int batch)
    {
        var fp32 = ModelZoo.Create(Model, seed: 0);
        fp32.eval();
        var sampleShape = ModelZoo.Layout(Model) == MnistLayout.Flat ? new long[] { 784 } : [1, 28, 28];
        var input = rand([batch, .. sampleShape]);
        using var calibration = new TensorDataset(input, zeros(batch, dtype: int64));
        var context = new CompressionContext(new CompressionData(null, calibration), fp32);
        var bf16 = new HalfPrecisionStep(new HalfPrecisionOptions { Format = HalfPrecisionFormat.BFloat16 }).Apply(Modules.ModuleCloner.DeepClone(fp32), context);
        return (fp32, bf16, input);
    }
}
