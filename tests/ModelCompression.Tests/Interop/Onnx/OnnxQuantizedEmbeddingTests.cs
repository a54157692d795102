using ModelCompression.Interop.Onnx;
using ModelCompression.Quantization;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Interop.Onnx;

/// <summary>
/// <see cref="QuantizedEmbedding"/> in ONNX: DequantizeLinear of its int8 or int4 table (per row, or in blocks along the
/// embedding dimension) and a Gather; ONNX Runtime's output must match the layer's.
/// </summary>
[TestFixture]
public sealed class OnnxQuantizedEmbeddingTests
{
    public static IEnumerable<TestCaseData> Layers()
    {
        yield return new TestCaseData(8, QuantizationGranularity.PerChannel, 16L).SetName("Export_QuantizedEmbeddingInt8PerRow_MatchesOnnxRuntime");
        yield return new TestCaseData(8, QuantizationGranularity.PerTensor, 16L).SetName("Export_QuantizedEmbeddingInt8PerTensor_MatchesOnnxRuntime");
        yield return new TestCaseData(8, QuantizationGranularity.PerGroup(8), 20L).SetName("Export_QuantizedEmbeddingInt8PerGroup_MatchesOnnxRuntime");
        yield return new TestCaseData(4, QuantizationGranularity.PerGroup(64), 12L).SetName("Export_QuantizedEmbeddingInt4DimBelowGroup_MatchesOnnxRuntime");
        yield return new TestCaseData(4, QuantizationGranularity.PerGroup(8), 21L).SetName("Export_QuantizedEmbeddingInt4ShortLastGroup_MatchesOnnxRuntime");
    }

    [TestCaseSource(nameof(Layers))]
    public void Export_QuantizedEmbedding_MatchesOnnxRuntime(int bits, QuantizationGranularity granularity, long dim)
    {
        using var scope = NewDisposeScope();
        random.manual_seed(23);
        using var embedding = nn.Embedding(50, dim);
        using var model = nn.Sequential(
            ("embedding", QuantizedEmbedding.FromEmbedding(embedding, bits, granularity)),
            ("norm", nn.LayerNorm(dim)),
            ("fc", nn.Linear(dim, 3)));
        OnnxLayerKindsTests.Randomize(model);
        var ids = randint(0, 50, new long[] { 4, 6 }, dtype: ScalarType.Int64);
        OnnxLayerKindsTests.AssertParity(model, ids, new OnnxExportOptions { InputType = ScalarType.Int64 });
    }

    [Test]
    public void Export_QuantizedEmbeddingAlone_IsExactAndKeepsTheTableSmall()
    {
        random.manual_seed(24);
        using var embedding = nn.Embedding(1000, 64);
        using var floatModel = nn.Sequential(("embedding", nn.Embedding(1000, 64)));
        using var int8 = nn.Sequential(("embedding", QuantizedEmbedding.FromEmbedding(embedding)));
        using var int4 = nn.Sequential(("embedding", QuantizedEmbedding.FromEmbedding(embedding, bits: 4)));
        var options = new OnnxExportOptions { InputType = ScalarType.Int64 };
        using var ids = randint(0, 1000, new long[] { 8, 5 }, dtype: ScalarType.Int64);
        foreach (var model in new[] { int8, int4 })
        {
            var bytes = OnnxExporter.ToBytes(model, [5], options);
            var actual = OnnxLayerKindsTests.RunOnnx(bytes, ids);
            using var expected = model.call(ids);
            Assert.That(actual, Is.EqualTo(expected.data<float>().ToArray()), "DequantizeLinear and Gather compute the layer's numbers exactly");
        }

        double floatBytes = OnnxExporter.ToBytes(floatModel, [5], options).Length;
        double int8Ratio = OnnxExporter.ToBytes(int8, [5], options).Length / floatBytes, int4Ratio = OnnxExporter.ToBytes(int4, [5], options).Length / floatBytes;
        TestContext.Out.WriteLine($"ONNX Embedding(1000, 64): float {floatBytes:N0} B; int8 {int8Ratio:0.000}, int4 {int4Ratio:0.000} of float");
        Assert.That(int8Ratio, Is.LessThan(0.27));
        Assert.That(int4Ratio, Is.LessThan(0.145));
    }
}
