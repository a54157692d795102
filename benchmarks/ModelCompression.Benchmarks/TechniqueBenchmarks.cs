using ModelCompression.Clustering;
using ModelCompression.Data;
using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Samples;
using ModelCompression.Training;
using static TorchSharp.torch;

namespace ModelCompression.Benchmarks;

/// <summary>
/// LeNet-300-100, fp32 (baseline) against the same network after weight sharing: every layer's weights replaced by
/// 4-bit cluster indices into 16 shared values (k-means, no fine-tuning). Weight sharing shrinks the file, not the
/// arithmetic: the shared layer still runs a dense float layer, so the ratio should sit at 1.
/// </summary>
public class WeightSharingBenchmarks : PairedModelBenchmark
{
    protected override (nn.Module<Tensor, Tensor>, nn.Module<Tensor, Tensor>, Tensor) Create(int batch)
    {
        var baseline = ModelZoo.Create(ZooModel.LeNet300100, seed: 0);
        baseline.eval();
        var input = rand(batch, 784);
        using var data = new TensorDataset(input, zeros(batch, dtype: int64));
        var context = new CompressionContext(new CompressionData(data, data), baseline);
        var shared = new WeightClusteringStep(new WeightClusteringOptions { Bits = 4 }).Apply(ModuleCloner.DeepClone(baseline), context);
        return (baseline, shared, input);
    }
}

/// <summary>
/// LeNet-300-100, fp32 (baseline) against the same network after quantization-aware training to binary weights (fc3
/// at 8 bits, as in the <c>qat-binary-lenet300</c> scenario), converted to the post-training int8-kernel layers. One
/// epoch on random data stands in for training: latency does not depend on the weights' values.
/// </summary>
public class QuantizationAwareTrainingBenchmarks : PairedModelBenchmark
{
    protected override (nn.Module<Tensor, Tensor>, nn.Module<Tensor, Tensor>, Tensor) Create(int batch)
    {
        var baseline = ModelZoo.Create(ZooModel.LeNet300100, seed: 0);
        baseline.eval();
        using var train = new TensorDataset(rand(256, 784), randint(0, 10, [256], dtype: int64));
        var options = new QuantizationAwareTrainingOptions { WeightBits = 1, Training = new TrainingOptions { Epochs = 1 } };
        options.LayerWeightBits["fc3"] = 8;
        var context = new CompressionContext(new CompressionData(train, train), baseline);
        var binary = new QuantizationAwareTrainingStep(options).Apply(ModuleCloner.DeepClone(baseline), context);
        return (baseline, binary, rand(batch, 784));
    }
}

/// <summary>
/// Distillation's trade: the <c>distill-mlp</c> scenario's teacher (MLP 784-1200-1200-10, 2.4M parameters, baseline)
/// against its student (784-30-30-10, 25k parameters), the architecture <c>AddDistillation</c> returns trained.
/// Untrained weights: latency does not depend on their values.
/// </summary>
public class DistillationBenchmarks : PairedModelBenchmark
{
    protected override (nn.Module<Tensor, Tensor>, nn.Module<Tensor, Tensor>, Tensor) Create(int batch) =>
        (ModelZoo.Mlp([1200, 1200], seed: 0), ModelZoo.Mlp([30, 30], seed: 1), rand(batch, 784));
}
