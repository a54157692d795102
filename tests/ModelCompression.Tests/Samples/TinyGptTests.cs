using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Samples;
using ModelCompression.Serialization;
using ModelCompression.Tests.Support;
using ModelCompression.Training;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace ModelCompression.Tests.Samples;

[TestFixture]
public sealed class TinyGptTests
{
    private static readonly TinyGptConfig Small = new(Vocabulary: 50, Context: 12, Width: 16, Heads: 2, Layers: 2, MlpRatio: 2);

    [Test]
    public void Forward_GivesNextTokenLogits_AndIsCausal()
    {
        using var model = TinyGpt.Create(Small, seed: 1);
        model.eval();
        using var noGrad = no_grad();
        var ids = randint(0, 50, [3, 10], dtype: ScalarType.Int64);
        var logits = model.call(ids);
        Assert.That(logits.shape, Is.EqualTo(new long[] { 3, 10, 50 }));

        // Changing token 6 leaves the logits of positions 0–5 exactly as they were, and changes position 6's.
        var changed = ids.clone();
        changed[.., 6] = (changed[.., 6] + 1).remainder(50);
        var other = model.call(changed);
        Assert.That(other[.., ..6].eq(logits[.., ..6]).all().item<bool>(), Is.True);
        Assert.That(other[.., 6].eq(logits[.., 6]).all().item<bool>(), Is.False);
    }

    [Test]
    public void Forward_BadInput_ClearErrors()
    {
        using var model = TinyGpt.Create(Small);
        Assert.Throws<ArgumentException>(() => model.call(randn(2, 5)));
        Assert.Throws<ArgumentException>(() => model.call(zeros([2, 13], dtype: ScalarType.Int64)));
        Assert.Throws<ArgumentException>(() => new TinyGpt(Small with { Heads = 3 }));
    }

    [Test]
    public void Create_SameSeed_SameWeights()
    {
        using var a = TinyGpt.Create(Small, seed: 4);
        using var b = TinyGpt.Create(Small, seed: 4);
        using var c = TinyGpt.Create(Small, seed: 5);
        Assert.That(TestModels.StateHash(a), Is.EqualTo(TestModels.StateHash(b)));
        Assert.That(TestModels.StateHash(a), Is.Not.EqualTo(TestModels.StateHash(c)));
    }

    [Test]
    public void Perplexity_UniformModel_IsTheVocabulary_PaddingIgnored()
    {
        // A model whose logits are all equal predicts every token with 1/V: perplexity V exactly.
        using var uniform = new ConstantLogits(50);
        var targets = randint(0, 50, [8, 10], dtype: ScalarType.Int64);
        targets[.., 7..] = -100;
        using var data = new TensorDataset(zeros([8, 10], dtype: ScalarType.Int64), targets);
        var result = new PerplexityEvaluator(batchSize: 3).Evaluate(uniform, data);
        Assert.That(result.Value, Is.EqualTo(50).Within(1e-3));
        Assert.That(result.SampleCount, Is.EqualTo(8 * 7));

        using var allPadding = new TensorDataset(zeros([2, 4], dtype: ScalarType.Int64), full([2, 4], -100L, dtype: ScalarType.Int64));
        Assert.Throws<ArgumentException>(() => new PerplexityEvaluator().Evaluate(uniform, allPadding));
        using var outside = new TensorDataset(zeros([2, 4], dtype: ScalarType.Int64), full([2, 4], 50L, dtype: ScalarType.Int64));
        Assert.Throws<ArgumentException>(() => new PerplexityEvaluator().Evaluate(uniform, outside));
    }

    [Test]
    public void Gptq_Int4_SavesAndLoadsIntoAFreshArchitecture()
    {
        using var original = TinyGpt.Create(Small, seed: 6);
        var ids = randint(0, 50, [32, 12], dtype: ScalarType.Int64);
        using var data = new TensorDataset(ids[.., ..^1], ids[.., 1..]);
        var context = new CompressionContext(new ModelCompression.CompressionData(data, data) { Evaluator = new PerplexityEvaluator() }, original);
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, WeightGranularity = QuantizationGranularity.PerGroup(16), Rounding = WeightRounding.Gptq(), CalibrationBatches = 1, CalibrationBatchSize = 32 };
        using var quantized = new PostTrainingQuantizationStep(options).Apply(ModuleCloner.DeepClone(original), context);

        // Every projection and the output head is an int4 layer: 2 blocks × 6 + 1.
        Assert.That(quantized.modules().OfType<QuantizedLinear>().Count(), Is.EqualTo(13));
        Assert.That(context.Notes, Has.Some.Contains("GPTQ").And.Contains("13 Linear layer(s)"));

        using var stream = new MemoryStream();
        CompressedModel.Save(quantized, stream);
        stream.Position = 0;
        using var loaded = CompressedModel.Load(stream, TinyGpt.Create(Small));
        using var noGrad = no_grad();
        quantized.eval();
        var input = ids[..4, ..^1];
        Assert.That(loaded.call(input).eq(quantized.call(input)).all().item<bool>(), Is.True);
    }

    [Test]
    public void Windows_PredictEveryTokenOnce_LastWindowPadded()
    {
        int[] tokens = [5, 6, 7, 8, 9, 10, 11];
        using var windows = TinyGptTraining.Windows(tokens, context: 4);
        Assert.That(windows.Inputs.shape, Is.EqualTo(new long[] { 2, 4 }));
        Assert.That(windows.Inputs.data<long>().ToArray(), Is.EqualTo(new long[] { 5, 6, 7, 8, 9, 10, 0, 0 }));
        Assert.That(windows.Targets.data<long>().ToArray(), Is.EqualTo(new long[] { 6, 7, 8, 9, 10, 11, -100, -100 }));
        using var overlapping = TinyGptTraining.Windows(tokens, context: 4, stride: 2);
        Assert.That(overlapping.Inputs.shape[0], Is.EqualTo(3));
        Assert.Throws<ArgumentException>(() => TinyGptTraining.Windows([1], 4));
    }

    private sealed class ConstantLogits(long vocabulary) : nn.Module<Tensor, Tensor>(nameof(ConstantLogits))
    {
        public override Tensor forward(Tensor input) => zeros([input.shape[0], input.shape[1], vocabulary]);
    }
}
