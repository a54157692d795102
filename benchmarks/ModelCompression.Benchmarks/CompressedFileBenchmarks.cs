using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Configs;
using ModelCompression.Clustering;
using ModelCompression.Data;
using ModelCompression.Modules;
using ModelCompression.Pruning;
using ModelCompression.Samples;
using ModelCompression.Serialization;
using static TorchSharp.torch;

namespace ModelCompression.Benchmarks;

/// <summary>
/// The compressed model file's cost: saving and loading LeNet-300-100 dense fp32 (baseline) against its Deep
/// Compression form (90% pruned, 4-bit shared weights; sparse positions and cluster indices entropy coded), in memory.
/// The ratio column compares the two within each of save and load.
/// </summary>
[MemoryDiagnoser(displayGenColumns: false)]
[GroupBenchmarksBy(BenchmarkLogicalGroupRule.ByCategory)]
[CategoriesColumn]
public class CompressedFileBenchmarks
{
    private nn.Module<Tensor, Tensor> _dense = null!;
    private nn.Module<Tensor, Tensor> _compressed = null!;
    private byte[] _denseFile = null!;
    private byte[] _compressedFile = null!;

    [GlobalSetup]
    public void Setup()
    {
        _dense = ModelZoo.Create(ZooModel.LeNet300100, seed: 0);
        _dense.eval();
        using var data = new TensorDataset(rand(64, 784), zeros(64, dtype: int64));
        var context = new CompressionContext(new CompressionData(data, data), _dense);
        var pruned = new MagnitudePruningStep(new MagnitudePruningOptions { Sparsity = 0.9, SparseExecution = SparseExecution.Never }).Apply(ModuleCloner.DeepClone(_dense), context);
        _compressed = new WeightClusteringStep(new WeightClusteringOptions { Bits = 4 }).Apply(pruned, context);
        _denseFile = Save(_dense);
        _compressedFile = Save(_compressed);
        Console.WriteLine($"// file sizes: dense {_denseFile.Length:N0} B, compressed {_compressedFile.Length:N0} B");
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _dense.Dispose();
        _compressed.Dispose();
    }

    [Benchmark(Baseline = true), BenchmarkCategory("Save")]
    public long SaveDense() => Save(_dense).LongLength;

    [Benchmark, BenchmarkCategory("Save")]
    public long SaveCompressed() => Save(_compressed).LongLength;

    [Benchmark(Baseline = true), BenchmarkCategory("Load")]
    public long LoadDense() => Load(_denseFile);

    [Benchmark, BenchmarkCategory("Load")]
    public long LoadCompressed() => Load(_compressedFile);

    private static byte[] Save(nn.Module<Tensor, Tensor> model)
    {
        using var stream = new MemoryStream();
        CompressedModel.Save(model, stream);
        return stream.ToArray();
    }

    private static long Load(byte[] file)
    {
        using var stream = new MemoryStream(file, writable: false);
        using var model = CompressedModel.Load(stream);
        return model.parameters().Count();
    }
}
