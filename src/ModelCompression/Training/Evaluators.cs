using ModelCompression.Data;
using ModelCompression.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Training;

/// <summary>The outcome of evaluating a model.</summary>
/// <param name="Value">The metric (e.g. top-1 accuracy, or mean loss).</param>
/// <param name="SampleCount">The number of samples evaluated.</param>
/// <param name="PerSampleCorrect">Whether each sample was right, in data order; <see langword="null"/> for metrics without a per-sample verdict.</param>
public sealed record EvaluationResult(double Value, long SampleCount, IReadOnlyList<bool>? PerSampleCorrect = null);

/// <summary>Scores a model on data. The pipeline's accuracy check compares these scores.</summary>
public interface IEvaluator
{
    /// <summary>Gets the name of the metric, e.g. <c>accuracy</c> or <c>loss</c>.</summary>
    string MetricName { get; }

    /// <summary>Gets whether a higher value is better (accuracy) or worse (loss).</summary>
    bool HigherIsBetter { get; }

    /// <summary>Evaluates <paramref name="model"/> in evaluation mode, without gradients; the model's mode is restored afterwards.</summary>
    /// <param name="model">The model.</param>
    /// <param name="data">The data.</param>
    /// <param name="cancellationToken">Cancels between batches.</param>
    /// <returns>The score.</returns>
    EvaluationResult Evaluate(nn.Module<Tensor, Tensor> model, IBatchSource data, CancellationToken cancellationToken = default);
}

/// <summary>Top-1 classification accuracy, with the per-sample verdicts the McNemar test needs.</summary>
/// <param name="batchSize">The evaluation batch size. The default is 256.</param>
public sealed class AccuracyEvaluator(int batchSize = 256) : IEvaluator
{
    /// <summary>Gets the evaluation batch size.</summary>
    public int BatchSize { get; } = batchSize > 0 ? batchSize : throw new ArgumentOutOfRangeException(nameof(batchSize), batchSize, "Must be positive.");

    /// <inheritdoc/>
    public string MetricName => "accuracy";

    /// <inheritdoc/>
    public bool HigherIsBetter => true;

    /// <inheritdoc/>
    /// <exception cref="ArgumentException">The model's output is not <c>[batch, classes]</c>, or the targets are not class indices in range.</exception>
    public EvaluationResult Evaluate(nn.Module<Tensor, Tensor> model, IBatchSource data, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(data);
        var correct = new List<bool>((int)Math.Min(data.Count, int.MaxValue));
        long hits = 0;
        EvaluationLoop.Run(model, data, BatchSize, cancellationToken, (input, output, target) =>
        {
            if (output.dim() != 2 || output.shape[0] != input.shape[0])
            {
                throw new ArgumentException(
                    $"Accuracy needs model outputs of shape [batch, classes]; the model gave [{string.Join(", ", output.shape)}] for a batch of {input.shape[0]}.",
                    nameof(model));
            }

            if (target.dim() != 1 || target.is_floating_point() || target.dtype == ScalarType.Bool || target.is_complex())
            {
                throw new ArgumentException($"Accuracy needs integer class-index targets of shape [batch]; got {target.dtype} [{string.Join(", ", target.shape)}].", nameof(data));
            }

            target = target.to(ScalarType.Int64);

            long classes = output.shape[1];
            if (target.min().item<long>() < 0 || target.max().item<long>() >= classes)
            {
                throw new ArgumentException($"A target lies outside the model's {classes} classes.", nameof(data));
            }

            var right = output.argmax(1).eq(target).cpu();
            foreach (var r in right.data<bool>())
            {
                correct.Add(r);
                hits += r ? 1 : 0;
            }
        });

        return new EvaluationResult((double)hits / correct.Count, correct.Count, correct);
    }
}

/// <summary>Mean loss over the data (lower is better), for regression or any task without a notion of "correct".</summary>
/// <param name="loss">The loss of a batch, reduced to a mean over the batch. The default is mean squared error.</param>
/// <param name="batchSize">The evaluation batch size. The default is 256.</param>
public sealed class LossEvaluator(Func<Tensor, Tensor, Tensor>? loss = null, int batchSize = 256) : IEvaluator
{
    private readonly Func<Tensor, Tensor, Tensor> _loss = loss ?? ((output, target) => nn.functional.mse_loss(output, target));

    /// <summary>Gets the evaluation batch size.</summary>
    public int BatchSize { get; } = batchSize > 0 ? batchSize : throw new ArgumentOutOfRangeException(nameof(batchSize), batchSize, "Must be positive.");

    /// <inheritdoc/>
    public string MetricName => "loss";

    /// <inheritdoc/>
    public bool HigherIsBetter => false;

    /// <inheritdoc/>
    public EvaluationResult Evaluate(nn.Module<Tensor, Tensor> model, IBatchSource data, CancellationToken cancellationToken = default)
    {
        double sum = 0;
        long count = 0;
        EvaluationLoop.Run(model, data, BatchSize, cancellationToken, (input, output, target) =>
        {
            long n = input.shape[0];
            sum += _loss(output, target).item<float>() * n;
            count += n;
        });

        return new EvaluationResult(sum / count, count);
    }
}

/// <summary>The loop both evaluators share: evaluation mode, no gradients, one dispose scope per batch, mode restored.</summary>
internal static class EvaluationLoop
{
    /// <summary>Runs the model over the data and hands each (input, output, target) to <paramref name="onBatch"/>, all on the model's device.</summary>
    public static void Run(nn.Module<Tensor, Tensor> model, IBatchSource data, int batchSize, CancellationToken cancellationToken, Action<Tensor, Tensor, Tensor> onBatch)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(data);
        if (data.Count == 0)
        {
            throw new ArgumentException("The evaluation data is empty.", nameof(data));
        }

        using var modes = ModuleModes.Evaluating(model);
        using var noGrad = no_grad();
        var device = ModelDevice(model);
        foreach (var (input, target) in data.ScopedBatches(batchSize))
        {
            cancellationToken.ThrowIfCancellationRequested();
            var onDevice = input.to(device);
            onBatch(onDevice, model.call(onDevice), target.to(device));
        }
    }

    /// <summary>The device of the model's first parameter or buffer; CPU for a model with neither.</summary>
    public static Device ModelDevice(nn.Module model) =>
        model.parameters().FirstOrDefault()?.device ?? model.buffers().FirstOrDefault()?.device ?? CPU;
}
