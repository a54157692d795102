using ModelCompression.Data;
using ModelCompression.Pruning;
using ModelCompression.Samples;
using static TorchSharp.torch;

namespace ModelCompression.Benchmarks;

/// <summary>The small residual CNN (baseline) against the same network with 50% of its channels removed by structured pruning.</summary>
public class StructuredPruningBenchmarks : PairedModelBenchmark
{
    protected override (nn.Module<Tensor, Tensor>, nn.Module<Tensor, Tensor>, Tensor) Create(int batch)
    {
        var baseline = ModelZoo.Create(ZooModel.SmallResNet, seed: 0);
        baseline.eval();
        var input = rand(batch, 1, 28, 28);
        using var data = new TensorDataset(input, zeros(batch, dtype: int64));
        var context = new CompressionContext(new CompressionData(null, data), baseline);
        var pruned = new StructuredPruningStep(new StructuredPruningOptions { Ratio = 0.5 }).Apply(Modules.ModuleCloner.DeepClone(baseline), context);
        return (baseline, pruned, input);
    }
}
