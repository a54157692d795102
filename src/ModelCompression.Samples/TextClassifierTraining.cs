using ModelCompression.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Samples;

/// <summary>Turns mails into <see cref="TextClassifier"/> inputs and trains the classifier, with a cache of trained weights.</summary>
public static class TextClassifierTraining
{
    // Bump when the recipe or the architecture changes, so stale cached weights are not reused.
    private const int RecipeVersion = 1;

    /// <summary>
    /// Returns the training recipe: AdamW with cosine decay and cross-entropy, tuned to train the default
    /// <see cref="TextClassifierConfig"/> on the SpamAssassin training split in a few minutes on two cores.
    /// </summary>
    /// <param name="epochs">Passes over the training mails.</param>
    /// <returns>New training options.</returns>
    public static TrainingOptions Recipe(int epochs = 3) => new()
    {
        Epochs = epochs,
        BatchSize = 32,
        Optimizer = OptimizerKind.AdamW,
        LearningRate = 1e-3,
        WeightDecay = 0.05,
        Schedule = new CosineLearningRate(),
    };

    /// <summary>
    /// Encodes texts as classifier inputs: <see cref="TextClassifier.StartId"/>, then the text's first tokens (token t as
    /// id t + <see cref="TextClassifier.FirstTokenId"/>), then <see cref="TextClassifier.PadId"/> up to
    /// <paramref name="length"/>.
    /// </summary>
    /// <param name="texts">The texts.</param>
    /// <param name="labels">Each text's class.</param>
    /// <param name="tokenizer">The tokenizer.</param>
    /// <param name="length">Ids per sequence, the start id included.</param>
    /// <returns>Inputs [N, length] and targets [N], int64.</returns>
    /// <exception cref="ArgumentException">No text, a length below 2, or as many labels as texts missing.</exception>
    public static ModelCompression.Data.TensorDataset Encode(IReadOnlyList<string> texts, IReadOnlyList<int> labels, ByteLevelBpeTokenizer tokenizer, int length)
    {
        ArgumentNullException.ThrowIfNull(texts);
        ArgumentNullException.ThrowIfNull(labels);
        ArgumentNullException.ThrowIfNull(tokenizer);
        if (texts.Count == 0 || texts.Count != labels.Count)
        {
            throw new ArgumentException($"Encoding needs at least one text and one label per text (got {texts.Count} texts and {labels.Count} labels).");
        }

        if (length < 2)
        {
            throw new ArgumentException($"The length must be at least 2 (was {length}).", nameof(length));
        }

        var inputs = new long[texts.Count * length];
        var targets = new long[texts.Count];
        for (int i = 0; i < texts.Count; i++)
        {
            int row = i * length;
            inputs[row] = TextClassifier.StartId;
            // Only the beginning is read, so encode a prefix long enough for length tokens (a token is at least one character).
            string text = texts[i];
            int[] ids = tokenizer.Encode(text.Length > length * 16 ? text[..(length * 16)] : text);
            for (int t = 0; t < ids.Length && t + 1 < length; t++)
            {
                inputs[row + t + 1] = ids[t] + TextClassifier.FirstTokenId;
            }

            targets[i] = labels[i];
        }

        using var scope = NewDisposeScope();
        return new ModelCompression.Data.TensorDataset(
            tensor(inputs, [texts.Count, length], ScalarType.Int64).MoveToOuterDisposeScope(),
            tensor(targets, [texts.Count], ScalarType.Int64).MoveToOuterDisposeScope());
    }

    /// <summary>Encodes one split of the SpamAssassin corpus, each mail's subject and body as its text.</summary>
    /// <param name="corpus">The corpus.</param>
    /// <param name="split">The split.</param>
    /// <param name="tokenizer">The tokenizer.</param>
    /// <param name="length">Ids per mail, the start id included.</param>
    /// <returns>Inputs [N, length] and labels [N] (<see cref="SpamAssassinCorpus.SpamLabel"/> for spam).</returns>
    public static ModelCompression.Data.TensorDataset Encode(SpamAssassinCorpus corpus, TextSplit split, ByteLevelBpeTokenizer tokenizer, int length)
    {
        ArgumentNullException.ThrowIfNull(corpus);
        var mails = corpus.GetMails(split);
        return Encode([.. mails.Select(m => m.Text)], [.. mails.Select(m => m.Label)], tokenizer, length);
    }

    /// <summary>
    /// Returns a trained model: read from <paramref name="cacheDirectory"/> when a copy trained with the same recipe,
    /// shape, seed and data is there, else trained on <paramref name="train"/> and written to the cache.
    /// </summary>
    /// <param name="config">The model's shape.</param>
    /// <param name="train">Encoded mails (<see cref="Encode(SpamAssassinCorpus, TextSplit, ByteLevelBpeTokenizer, int)"/>).</param>
    /// <param name="cacheDirectory">Where trained weights are kept; <see langword="null"/> to always train.</param>
    /// <param name="seed">The seed of initialisation and training.</param>
    /// <param name="epochs">Passes over the training mails.</param>
    /// <param name="progress">Optional training progress.</param>
    /// <returns>The trained model, in evaluation mode.</returns>
    public static TrainedModel TrainOrLoad(TextClassifierConfig config, ModelCompression.Data.TensorDataset train, string? cacheDirectory = null, int seed = 0, int epochs = 3, IProgress<TrainingProgress>? progress = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(train);
        string key = $"TextClassifier-v{config.Vocabulary}-n{config.Length}-w{config.Width}-h{config.Heads}-l{config.Layers}-m{config.MlpRatio}-c{config.Classes}";
        string? path = cacheDirectory is null ? null : Path.Combine(cacheDirectory, $"{key}-e{epochs}-seed{seed}-r{RecipeVersion}-{ZooTraining.Fingerprint(train)}.weights");
        return ZooTraining.TrainOrLoadCached(() => TextClassifier.Create(config, seed), path, net => new Trainer(Recipe(epochs)).Train(net, train, seed: seed, progress: progress).Seconds);
    }
}
