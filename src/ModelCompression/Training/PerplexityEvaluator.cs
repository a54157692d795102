using ModelCompression.Data;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Training;

/// <summary>
/// Perplexity of a language model: exp of the mean cross-entropy per predicted token. The model maps inputs to logits
/// [batch, time, vocabulary]; the targets are the next token ids [batch, time] (int64), and a target equal to
/// <see cref="IgnoreIndex"/> (padding) is left out of the mean. Lower is better.
/// </summary>
/// <param name="batchSize">The evaluation batch size (sequences). The default is 32.</param>
/// <param name="ignoreIndex">The target id that marks a position not to score. The default is −100, PyTorch's.</param>
public sealed class PerplexityEvaluator(int batchSize = 32, long ignoreIndex = -100) : IEvaluator
{
    /// <summary>Gets the evaluation batch size.</summary>
    public int BatchSize { get; } = batchSize > 0 ? batchSize : throw new ArgumentOutOfRangeException(nameof(batchSize), batchSize, "Must be positive.");

    /// <summary>Gets the target id left out of the score.</summary>
    public long IgnoreIndex { get; } = ignoreIndex;

    /// <inheritdoc/>
    public string MetricName => "perplexity";

    /// <inheritdoc/>
    public bool HigherIsBetter => false;

    /// <inheritdoc/>
    /// <returns>The perplexity; <see cref="EvaluationResult.SampleCount"/> is the number of tokens scored.</returns>
    /// <exception cref="ArgumentException">
    /// The outputs are not [batch, time, vocabulary] logits matching [batch, time] int64 targets, a target lies outside
    /// the vocabulary, or no target is scored.
    /// </exception>
    public EvaluationResult Evaluate(nn.Module<Tensor, Tensor> model, IBatchSource data, CancellationToken cancellationToken = default)
    {
        double sum = 0;
        long tokens = 0;
        EvaluationLoop.Run(model, data, BatchSize, cancellationToken, (input, output, target) =>
        {
            if (output.dim() != 3 || target.dim() != 2 || output.shape[0] != target.shape[0] || output.shape[1] != target.shape[1])
            {
                throw new ArgumentException(
                    $"Perplexity needs logits [batch, time, vocabulary] and next-token targets [batch, time]; got [{string.Join(", ", output.shape)}] and [{string.Join(", ", target.shape)}].",
                    nameof(data));
            }

            if (target.dtype != ScalarType.Int64)
            {
                throw new ArgumentException($"Perplexity needs int64 token-id targets; got {target.dtype}.", nameof(data));
            }

            long vocabulary = output.shape[2];
            using var ignored = IgnoreIndex.ToScalar();
            var scored = target.ne(ignored);
            long count = scored.sum().item<long>();
            if (count == 0)
            {
                return;
            }

            var ids = target.masked_select(scored);
            if (ids.min().item<long>() < 0 || ids.max().item<long>() >= vocabulary)
            {
                throw new ArgumentException($"A target token lies outside the model's vocabulary of {vocabulary}.", nameof(data));
            }

            var logits = output.reshape(-1, vocabulary).to(ScalarType.Float32);
            var losses = nn.functional.cross_entropy(logits, target.reshape(-1), ignore_index: IgnoreIndex, reduction: nn.Reduction.Sum);
            sum += losses.item<float>();
            tokens += count;
        });

        if (tokens == 0)
        {
            throw new ArgumentException($"No target is scored: every target equals the ignored id {IgnoreIndex}.", nameof(data));
        }

        return new EvaluationResult(Math.Exp(sum / tokens), tokens);
    }
}
