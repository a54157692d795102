using ModelCompression.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Samples;

/// <summary>Trains <see cref="TinyGpt"/> on token windows (next-token prediction), with a cache of trained weights.</summary>
public static class TinyGptTraining
{
    // Bump when the recipe or the architecture changes, so stale cached weights are not reused.
    private const int RecipeVersion = 1;

    /// <summary>Gets the target id that marks a position not to score or train on (PyTorch's −100).</summary>
    public const long IgnoreIndex = -100;

    /// <summary>
    /// Returns the training recipe: AdamW with cosine decay and a next-token cross-entropy that skips
    /// <see cref="IgnoreIndex"/>; tuned to train the default <see cref="TinyGptConfig"/> in about five minutes on two cores.
    /// </summary>
    /// <param name="epochs">Passes over the training windows.</param>
    /// <returns>New training options.</returns>
    public static TrainingOptions Recipe(int epochs = 1) => new()
    {
        Epochs = epochs,
        BatchSize = 32,
        Optimizer = OptimizerKind.AdamW,
        LearningRate = 2e-3,
        WeightDecay = 0.05,
        Schedule = new CosineLearningRate(),
        Loss = NextTokenLoss,
    };

    /// <summary>The mean cross-entropy of next-token logits [batch, time, vocabulary] against targets [batch, time], skipping <see cref="IgnoreIndex"/>.</summary>
    /// <param name="logits">The model's output.</param>
    /// <param name="targets">The next token ids.</param>
    /// <returns>The loss, a scalar.</returns>
    public static Tensor NextTokenLoss(Tensor logits, Tensor targets)
    {
        ArgumentNullException.ThrowIfNull(logits);
        ArgumentNullException.ThrowIfNull(targets);
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[^1]), targets.reshape(-1), ignore_index: IgnoreIndex);
    }

    /// <summary>
    /// Returns a trained model: read from <paramref name="cacheDirectory"/> when a copy trained with the same recipe,
    /// shape, seed and data is there, else trained on <paramref name="train"/> and written to the cache.
    /// </summary>
    /// <param name="config">The model's shape.</param>
    /// <param name="train">Token windows: inputs [N, time] and next-token targets [N, time], int64.</param>
    /// <param name="cacheDirectory">Where trained weights are kept; <see langword="null"/> to always train.</param>
    /// <param name="seed">The seed of initialisation and training.</param>
    /// <param name="epochs">Passes over the training windows.</param>
    /// <param name="progress">Optional training progress.</param>
    /// <returns>The trained model, in evaluation mode.</returns>
    public static TrainedModel TrainOrLoad(TinyGptConfig config, ModelCompression.Data.TensorDataset train, string? cacheDirectory = null, int seed = 0, int epochs = 1, IProgress<TrainingProgress>? progress = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(train);
        string key = $"TinyGpt-v{config.Vocabulary}-c{config.Context}-w{config.Width}-h{config.Heads}-l{config.Layers}-m{config.MlpRatio}";
        string? path = cacheDirectory is null ? null : Path.Combine(cacheDirectory, $"{key}-e{epochs}-seed{seed}-r{RecipeVersion}-{ZooTraining.Fingerprint(train)}.weights");
        return ZooTraining.TrainOrLoadCached(() => TinyGpt.Create(config, seed), path, net => new Trainer(Recipe(epochs)).Train(net, train, seed: seed, progress: progress).Seconds);
    }

    /// <summary>
    /// Cuts a token stream into next-token windows: inputs are <paramref name="context"/> tokens starting every
    /// <paramref name="stride"/>, targets the same positions shifted by one. A last partial window is padded with
    /// <see cref="IgnoreIndex"/> targets (and token 0 inputs), so every token is predicted once when the stride equals
    /// the context.
    /// </summary>
    /// <param name="tokens">The token ids.</param>
    /// <param name="context">Tokens per window.</param>
    /// <param name="stride">Tokens between window starts; the default is <paramref name="context"/>.</param>
    /// <returns>The windows.</returns>
    /// <exception cref="ArgumentException">Fewer than two tokens, or a context or stride below 1.</exception>
    public static ModelCompression.Data.TensorDataset Windows(ReadOnlySpan<int> tokens, int context, int? stride = null)
    {
        int step = stride ?? context;
        if (context < 1 || step < 1)
        {
            throw new ArgumentException($"The context and stride must be at least 1 (were {context} and {step}).");
        }

        if (tokens.Length < 2)
        {
            throw new ArgumentException("Windows need at least two tokens.", nameof(tokens));
        }

        int predicted = tokens.Length - 1;
        int count = ((predicted - 1) / step) + 1;
        var inputs = new long[count * context];
        var targets = new long[count * context];
        Array.Fill(targets, IgnoreIndex);
        for (int w = 0; w < count; w++)
        {
            int start = w * step;
            for (int t = 0; t < context && start + t < predicted; t++)
            {
                inputs[(w * context) + t] = tokens[start + t];
                targets[(w * context) + t] = tokens[start + t + 1];
            }
        }

        using var scope = NewDisposeScope();
        return new ModelCompression.Data.TensorDataset(
            tensor(inputs, [count, context], ScalarType.Int64).MoveToOuterDisposeScope(),
            tensor(targets, [count, context], ScalarType.Int64).MoveToOuterDisposeScope());
    }
}
