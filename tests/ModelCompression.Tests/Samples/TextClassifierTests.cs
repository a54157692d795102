using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Samples;
using ModelCompression.Serialization;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace ModelCompression.Tests.Samples;

[TestFixture]
public sealed class TextClassifierTests
{
    private static readonly TextClassifierConfig Small = new(Vocabulary: 40, Length: 16, Width: 16, Heads: 2, Layers: 2, MlpRatio: 2, Classes: 3);

    [Test]
    public void Forward_GivesClassLogits_PaddingChangesNothing()
    {
        using var model = TextClassifier.Create(Small, seed: 1);
        model.eval();
        using var noGrad = no_grad();
        var ids = randint(TextClassifier.FirstTokenId, 40, [3, 10], dtype: ScalarType.Int64);
        ids[.., 0] = TextClassifier.StartId;
        ids[1, 6..] = TextClassifier.PadId;
        var logits = model.call(ids);
        Assert.That(logits.shape, Is.EqualTo(new long[] { 3, 3 }));

        // The same texts padded to 16 positions: padding is neither attended to nor pooled.
        var padded = cat([ids, zeros([3, 6], dtype: ScalarType.Int64)], 1);
        Assert.That(model.call(padded).allclose(logits, rtol: 0, atol: 1e-5), Is.True);

        // A token in the text does change the logits of its own row only.
        var changed = ids.clone();
        changed[1, 3] = (changed[1, 3] + 1 - TextClassifier.FirstTokenId).remainder(40 - TextClassifier.FirstTokenId) + TextClassifier.FirstTokenId;
        var other = model.call(changed);
        Assert.That(other[0].eq(logits[0]).all().item<bool>(), Is.True);
        Assert.That(other[1].eq(logits[1]).all().item<bool>(), Is.False);
    }

    [Test]
    public void Forward_BadInput_ClearErrors()
    {
        using var model = TextClassifier.Create(Small);
        Assert.Throws<ArgumentException>(() => model.call(randn(2, 5)));
        Assert.Throws<ArgumentException>(() => model.call(ones([2, 17], dtype: ScalarType.Int64)));
        Assert.Throws<ArgumentException>(() => new TextClassifier(Small with { Heads = 3 }));
        Assert.Throws<ArgumentException>(() => new TextClassifier(Small with { Vocabulary = 2 }));
        Assert.Throws<ArgumentException>(() => new TextClassifier(Small with { Classes = 1 }));
    }

    [Test]
    public void Encode_StartsTruncatesAndPads()
    {
        var tokenizer = BrownCorpus.LoadBundled().Tokenizer;
        string longText = string.Join(' ', Enumerable.Repeat("the quick brown fox", 20));
        using var data = TextClassifierTraining.Encode(["the", longText, string.Empty], [0, 1, 1], tokenizer, length: 6);
        Assert.That(data.Inputs.shape, Is.EqualTo(new long[] { 3, 6 }));
        Assert.That(data.Targets.data<long>().ToArray(), Is.EqualTo(new long[] { 0, 1, 1 }));
        var rows = data.Inputs.data<long>().ToArray();
        long the = tokenizer.Encode("the")[0] + TextClassifier.FirstTokenId;
        Assert.That(rows[..6], Is.EqualTo(new[] { TextClassifier.StartId, the, 0, 0, 0, 0 }));
        Assert.That(rows[6..12], Is.EqualTo(new long[] { TextClassifier.StartId }.Concat(tokenizer.Encode(longText)[..5].Select(t => (long)t + TextClassifier.FirstTokenId))));
        Assert.That(rows[12..], Is.EqualTo(new[] { TextClassifier.StartId, 0, 0, 0, 0, 0 }));

        Assert.Throws<ArgumentException>(() => TextClassifierTraining.Encode([], [], tokenizer, 6));
        Assert.Throws<ArgumentException>(() => TextClassifierTraining.Encode(["a"], [0, 1], tokenizer, 6));
        Assert.Throws<ArgumentException>(() => TextClassifierTraining.Encode(["a"], [0], tokenizer, 1));
    }

    [Test]
    public void StaticInt8_WithSmoothQuant_FoldsIntoTheBlocks_AndSavesAndLoads()
    {
        using var original = TextClassifier.Create(Small, seed: 6);
        var ids = randint(TextClassifier.FirstTokenId, 40, [48, 12], dtype: ScalarType.Int64);
        ids[.., 0] = TextClassifier.StartId;
        ids[..24, 8..] = TextClassifier.PadId;
        using var data = new TensorDataset(ids, randint(0, 3, [48], dtype: ScalarType.Int64));
        var context = new CompressionContext(new ModelCompression.CompressionData(data, data), original);
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8, SmoothQuant = new SmoothQuantOptions(), CalibrationBatches = 2, CalibrationBatchSize = 24 };
        using var quantized = new PostTrainingQuantizationStep(options).Apply(ModuleCloner.DeepClone(original), context);

        // Every projection and the head is an int8 layer (2 blocks × 6 + 1); both LayerNorms of both blocks absorbed scales.
        Assert.That(quantized.modules().OfType<QuantizedLinear>().Count(), Is.EqualTo(13));
        Assert.That(context.Notes, Has.Some.Contains("blocks.1.norm1 → blocks.1.query, blocks.1.key, blocks.1.value"));
        Assert.That(context.Notes, Has.Some.Contains("blocks.0.norm2 → blocks.0.up"));

        using var stream = new MemoryStream();
        CompressedModel.Save(quantized, stream);
        stream.Position = 0;
        using var loaded = CompressedModel.Load(stream, TextClassifier.Create(Small));
        using var noGrad = no_grad();
        quantized.eval();
        Assert.That(loaded.call(ids).eq(quantized.call(ids)).all().item<bool>(), Is.True);
        original.eval();
        Assert.That(quantized.call(ids).allclose(original.call(ids), rtol: 0, atol: 0.05), Is.True);
    }
}
