using ModelCompression.Metrics;
using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Quantization;

[TestFixture]
public sealed class QuantizedEmbeddingTests
{
    private static Embedding Table(long count, long dim, int seed)
    {
        random.manual_seed(seed);
        var embedding = nn.Embedding(count, dim);
        using var noGrad = no_grad();
        using var w = embedding.weight!;
        using var values = randn(count, dim) * 0.7;
        w.copy_(values);
        return embedding;
    }

    private static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.equal(b).all().item<bool>();

    private static float[] Values(Tensor t)
    {
        using var f = t.to(ScalarType.Float32).cpu().contiguous();
        return f.data<float>().ToArray();
    }

    [Test]
    public void FromEmbedding_Int8_ErrorWithinHalfAStepPerRow()
    {
        using var embedding = Table(100, 16, 1);
        using var layer = QuantizedEmbedding.FromEmbedding(embedding);
        using var w = embedding.weight!;
        var original = Values(w);
        using var dequantized = layer.DequantizedWeight();
        var restored = Values(dequantized);

        Assert.That(layer.WeightBits, Is.EqualTo(8));
        Assert.That(layer.Mode, Is.EqualTo(QuantizationMode.WeightOnlyInt8));
        Assert.That(layer.WeightGranularity, Is.SameAs(QuantizationGranularity.PerChannel));
        var state = layer.state_dict();
        Assert.That(state["weight"].dtype, Is.EqualTo(ScalarType.Int8));
        Assert.That(state["weight"].shape, Is.EqualTo(new long[] { 100, 16 }));
        Assert.That(state["weight_scale"].dtype, Is.EqualTo(ScalarType.Float32));
        Assert.That(state["weight_scale"].shape, Is.EqualTo(new long[] { 100, 1 }));
        var scales = Values(state["weight_scale"]);
        for (int row = 0; row < 100; row++)
        {
            float rowMax = original.Skip(row * 16).Take(16).Max(Math.Abs);
            Assert.That(scales[row], Is.EqualTo(rowMax / 127).Within(1e-7), $"row {row}: scale = max |w| / 127");
            for (int i = row * 16; i < (row + 1) * 16; i++)
            {
                Assert.That(Math.Abs(original[i] - restored[i]), Is.LessThanOrEqualTo((scales[row] / 2) * (1 + 1e-5)), $"row {row}, column {i - (row * 16)}");
            }
        }

        Assert.That(layer.SqnrDb, Is.GreaterThan(40), "8-bit levels per row give about 6 dB per bit");
        Assert.That(layer.ParameterCount, Is.EqualTo(1600));
        Assert.That(layer.NonzeroParameterCount, Is.EqualTo(Values(state["weight"]).Count(v => v != 0)));
        Assert.That(layer.CountMacs(zeros(1), zeros(1)), Is.Zero);
        Assert.That(layer.ToString(), Is.EqualTo("QuantizedEmbedding(count=100, dim=16, WeightOnlyInt8, int8 per-channel)"));
    }

    [Test]
    public void Forward_Int64AndInt32Ids_EqualTheDequantizedTableRows()
    {
        using var embedding = Table(50, 12, 2);
        using var layer = QuantizedEmbedding.FromEmbedding(embedding);
        using var table = layer.DequantizedWeight();
        using var ids = tensor(new long[] { 0, 49, 7, 7, 23 });
        using var expected = table.index_select(0, ids);

        using var fromInt64 = layer.call(ids);
        using var ids32 = ids.to(ScalarType.Int32);
        using var fromInt32 = layer.call(ids32);

        Assert.That(fromInt64.dtype, Is.EqualTo(ScalarType.Float32));
        Assert.That(fromInt64.shape, Is.EqualTo(new long[] { 5, 12 }));
        Assert.That(Same(fromInt64, expected), Is.True);
        Assert.That(Same(fromInt32, expected), Is.True);
    }

    [Test]
    public void Forward_MultiDimensionalIds_KeepTheirShapeAndAddTheDimension()
    {
        using var embedding = Table(30, 8, 3);
        using var layer = QuantizedEmbedding.FromEmbedding(embedding, bits: 4, QuantizationGranularity.PerGroup(8));
        using var table = layer.DequantizedWeight();
        using var ids = randint(0, 30, [2, 3, 4], dtype: ScalarType.Int64);

        using var output = layer.call(ids);

        Assert.That(output.shape, Is.EqualTo(new long[] { 2, 3, 4, 8 }));
        using var flat = ids.reshape(-1);
        using var rows = table.index_select(0, flat);
        using var expected = rows.reshape(2, 3, 4, 8);
        Assert.That(Same(output, expected), Is.True);
        using var empty = zeros([0, 5], ScalarType.Int64);
        using var none = layer.call(empty);
        Assert.That(none.shape, Is.EqualTo(new long[] { 0, 5, 8 }));
    }

    /// <summary>int4: dim below the group (one whole-row group), dim not a multiple of the group (a shorter last group), and an odd dim (a half-filled last byte).</summary>
    [TestCase(6, 64, 6, 1)]
    [TestCase(20, 8, 8, 3)]
    [TestCase(13, 8, 8, 2)]
    public void FromEmbedding_Int4Groups_MatchTheGroupRuleAndAStepPerGroup(int dim, int group, int reportedGroup, int groupsPerRow)
    {
        using var embedding = Table(40, dim, 4);
        using var layer = QuantizedEmbedding.FromEmbedding(embedding, bits: 4, QuantizationGranularity.PerGroup(group));
        var state = layer.state_dict();

        Assert.That(layer.Mode, Is.EqualTo(QuantizationMode.WeightOnlyInt4));
        Assert.That(((PerGroupGranularity)layer.WeightGranularity).Size, Is.EqualTo(reportedGroup));
        Assert.That(state["weight"].dtype, Is.EqualTo(ScalarType.Byte));
        Assert.That(state["weight"].shape, Is.EqualTo(new long[] { 40, (dim + 1) / 2 }));
        Assert.That(state["weight_scale"].dtype, Is.EqualTo(ScalarType.Float16));
        Assert.That(state["weight_scale"].shape, Is.EqualTo(new long[] { 40, groupsPerRow }));

        using var w = embedding.weight!;
        var original = Values(w);
        using var table = layer.DequantizedWeight();
        var restored = Values(table);
        var scales = Values(state["weight_scale"]);
        for (int row = 0; row < 40; row++)
        {
            for (int c = 0; c < dim; c++)
            {
                int g = c / reportedGroup;
                int start = g * reportedGroup, end = Math.Min(dim, start + reportedGroup);
                float groupMax = original.Skip((row * dim) + start).Take(end - start).Max(Math.Abs);
                float scale = scales[(row * groupsPerRow) + g];
                Assert.That(scale, Is.EqualTo((float)(Half)(groupMax / 7)).Within(1e-7), $"row {row}, group {g}: the float16 of max |w| / 7");
                Assert.That(Math.Abs(original[(row * dim) + c] - restored[(row * dim) + c]), Is.LessThanOrEqualTo((scale / 2) + 1e-6));
            }
        }

        using var ids = arange(40, dtype: ScalarType.Int64);
        using var all = layer.call(ids);
        Assert.That(Same(all, table), Is.True, "the gathered and unpacked rows equal the reference dequantization");
    }

    [TestCase(-1L)]
    [TestCase(100L)]
    [TestCase(1000L)]
    public void Forward_IdOutsideTheTable_ThrowsArgumentExceptionNamingTheSize(long bad)
    {
        using var embedding = Table(100, 4, 5);
        using var layer = QuantizedEmbedding.FromEmbedding(embedding);
        using var ids = tensor(new long[] { 3, bad, 5 });
        var ex = Assert.Throws<ArgumentException>(() => layer.call(ids).Dispose());
        Assert.That(ex!.Message, Does.Contain("100 rows").And.Contain(bad.ToString(System.Globalization.CultureInfo.InvariantCulture)));
        Assert.That(ex.ParamName, Is.EqualTo("input"));

        using var floats = zeros(3);
        Assert.Throws<ArgumentException>(() => layer.call(floats).Dispose());
    }

    [Test]
    public void FromEmbedding_NaNWeight_ThrowsArgumentExceptionAndLeavesTheLayer()
    {
        using var embedding = Table(10, 8, 6);
        using (no_grad())
        {
            using var w = embedding.weight!;
            w.narrow(0, 3, 1).narrow(1, 2, 1).fill_(float.NaN);
        }

        string before = Support.TestModels.StateHash(embedding);
        var ex = Assert.Throws<ArgumentException>(() => QuantizedEmbedding.FromEmbedding(embedding));
        Assert.That(ex!.Message, Does.Contain("Embedding").And.Contain("NaN"));
        Assert.That(Support.TestModels.StateHash(embedding), Is.EqualTo(before));
    }

    [Test]
    public void FromEmbedding_BadSettings_ThrowArgumentExceptions()
    {
        using var embedding = Table(10, 16, 7);
        Assert.Throws<ArgumentOutOfRangeException>(() => QuantizedEmbedding.FromEmbedding(embedding, bits: 2));
        Assert.Throws<ArgumentException>(() => QuantizedEmbedding.FromEmbedding(embedding, bits: 4, QuantizationGranularity.PerChannel));
        Assert.Throws<ArgumentException>(() => QuantizedEmbedding.FromEmbedding(embedding, bits: 8, QuantizationGranularity.PerGroup(12)));
    }

    [Test]
    public void LoadStateDict_AnotherTable_ChangesWhatTheLayerComputes()
    {
        using var first = Table(20, 8, 8);
        using var second = Table(20, 8, 9);
        using var layer = QuantizedEmbedding.FromEmbedding(first, bits: 4, QuantizationGranularity.PerGroup(8));
        using var other = QuantizedEmbedding.FromEmbedding(second, bits: 4, QuantizationGranularity.PerGroup(8));
        using var ids = tensor(new long[] { 0, 5, 19 });
        var before = Support.TestModels.Output(layer, ids);
        var expected = Support.TestModels.Output(other, ids);
        Assert.That(before, Is.Not.EqualTo(expected));

        layer.load_state_dict(other.state_dict());

        Assert.That(Support.TestModels.Output(layer, ids), Is.EqualTo(expected));
        using var table = layer.DequantizedWeight();
        using var otherTable = other.DequantizedWeight();
        Assert.That(Same(table, otherTable), Is.True);
    }

    [Test]
    public void To_FloatTypesAndCpu_LeaveTheIntegerTableAndScalesAsTheyAre()
    {
        using var embedding = Table(16, 8, 10);
        using var model = nn.Sequential(("embedding", QuantizedEmbedding.FromEmbedding(embedding, bits: 4, QuantizationGranularity.PerGroup(8))), ("fc", nn.Linear(8, 3)));
        using var ids = tensor(new long[] { 1, 2, 3 });
        var layer = (QuantizedEmbedding)model.named_children().First().module;
        using var before = layer.call(ids);

        model.to(ScalarType.Float64);
        model.to(CPU);
        model.to(ScalarType.Float16);
        model.to(CPU, ScalarType.BFloat16);

        var state = layer.state_dict();
        Assert.That(state["weight"].dtype, Is.EqualTo(ScalarType.Byte));
        Assert.That(state["weight_scale"].dtype, Is.EqualTo(ScalarType.Float16));
        using var fc = model.named_children().Last().module.parameters().First();
        Assert.That(fc.dtype, Is.EqualTo(ScalarType.BFloat16), "the float layers did convert");
        using var after = layer.call(ids);
        Assert.That(after.dtype, Is.EqualTo(ScalarType.Float32));
        Assert.That(Same(after, before), Is.True);
    }

    [Test]
    public void Metrics_CountTheTableAsItsDenseParametersAtItsBits()
    {
        using var embedding = Table(100, 16, 11);
        using var model = nn.Sequential(("embedding", QuantizedEmbedding.FromEmbedding(embedding)), ("flatten", nn.Flatten()), ("fc", nn.Linear(64, 4)));
        using var ids = randint(0, 100, [2, 4], dtype: ScalarType.Int64);
        var layers = ModelMetrics.Measure(model, [4], new LatencyOptions { Enabled = false }, inputType: ScalarType.Int64).Layers;
        var row = layers.Single(l => l.Name == "embedding");
        Assert.That(row.Type, Is.EqualTo(nameof(QuantizedEmbedding)));
        Assert.That(row.Parameters, Is.EqualTo(1600));
        Assert.That(row.Bits, Is.EqualTo(8));
        Assert.That(row.SqnrDb, Is.GreaterThan(40));
        Assert.That(ModelMetrics.CountMacsPerLayer(model, ids), Is.EqualTo(new Dictionary<string, long> { ["embedding"] = 0, ["fc"] = 64 * 4 }), "per sample: the lookup none, the Linear 64 × 4");
    }

    [Test]
    public void DeepClone_CopiesTheTableAndItsSqnr()
    {
        using var embedding = Table(12, 10, 12);
        using var model = nn.Sequential(("embedding", QuantizedEmbedding.FromEmbedding(embedding, bits: 4, QuantizationGranularity.PerGroup(8))));
        using var copy = ModuleCloner.DeepClone(model);
        using var ids = tensor(new long[] { 11, 0, 4 });
        Assert.That(Support.TestModels.Output(copy, ids), Is.EqualTo(Support.TestModels.Output(model, ids)));
        Assert.That(Support.TestModels.StateHash(copy), Is.EqualTo(Support.TestModels.StateHash(model)));
        var original = (QuantizedEmbedding)model.named_children().First().module;
        var copied = (QuantizedEmbedding)copy.named_children().First().module;
        Assert.That(copied.SqnrDb, Is.EqualTo(original.SqnrDb));
        Assert.That(copied.WeightGranularity.ToString(), Is.EqualTo("per-group(8)"));
    }

    [Test]
    public void Forward_ManyCalls_LeaveNoLiveTensors()
    {
        using var embedding = Table(64, 24, 13);
        using var int8 = QuantizedEmbedding.FromEmbedding(embedding, bits: 8, QuantizationGranularity.PerGroup(16));
        using var int4 = QuantizedEmbedding.FromEmbedding(embedding, bits: 4, QuantizationGranularity.PerGroup(16));
        using var ids = randint(0, 64, [3, 7], dtype: ScalarType.Int64);
        int8.call(ids).Dispose();
        int4.call(ids).Dispose();
        long before = TestModels.SettledTensorCount();
        for (int i = 0; i < 5; i++)
        {
            int8.call(ids).Dispose();
            int4.call(ids).Dispose();
            using var bad = tensor(new long[] { 64 });
            Assert.Throws<ArgumentException>(() => int8.call(bad));
        }

        Assert.That(Tensor.TotalCount, Is.EqualTo(before));
    }
}
