using ModelCompression.Architecture;
using ModelCompression.Data;
using ModelCompression.Samples;
using static TorchSharp.torch;

namespace ModelCompression.Benchmarks;

/// <summary>LeNet-5 (baseline) against the same network with both convolutions rewritten as depthwise-separable ones (7× fewer convolution MACs).</summary>
public class DepthwiseSeparableBenchmarks : PairedModelBenchmark
{
    protected override (nn.Module<Tensor, Tensor>, nn.Module<Tensor, Tensor>, Tensor) Create(int batch)
    {
        var original = ModelZoo.Create(ZooModel.LeNet5, seed: 0);
        original.eval();
        var input = rand(batch, 1, 28, 28);
        using var data = new TensorDataset(input, zeros(batch, dtype: int64));
        var context = new CompressionContext(new CompressionData(null, data), original);
        var rewritten = new DepthwiseSeparableRewriteStep(new DepthwiseSeparableRewriteOptions()).Apply(Modules.ModuleCloner.DeepClone(original), context);
        return (original, rewritten, input);
    }
}
