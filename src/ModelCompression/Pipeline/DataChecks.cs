using System.Globalization;
using ModelCompression.Data;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression;

/// <summary>
/// Reads a data set once before the first step and rejects what would otherwise fail, or silently mislead, only after
/// a step has run: batches whose input and target counts differ, inputs of the wrong shape or type, NaN or infinite
/// values, class labels outside the model's outputs, and a <see cref="IBatchSource.Count"/> that is not what the
/// batches hold.
/// </summary>
/// <remarks>One pass over each distinct source, batch by batch (memory: one batch at a time).</remarks>
internal static class DataChecks
{
    private const int BatchSize = 256;

    /// <summary>The target the library's losses and evaluators leave out (cross-entropy's default ignore index).</summary>
    private const long IgnoredLabel = -100;

    /// <summary>Checks <paramref name="source"/>.</summary>
    /// <param name="source">The data.</param>
    /// <param name="role">What the data is for, as the messages name it ("training data").</param>
    /// <param name="outputShape">The model's output on a batch of two (batch dimension included).</param>
    /// <param name="cancellationToken">Stops the pass.</param>
    /// <exception cref="ArgumentException">The data is inconsistent; the message names the batch and the problem.</exception>
    public static void Check(IBatchSource source, string role, long[] outputShape, CancellationToken cancellationToken)
    {
        long seen = 0;
        int batch = 0;
        foreach (var (input, target) in source.ScopedBatches(BatchSize))
        {
            cancellationToken.ThrowIfCancellationRequested();
            string at = $"The {role}'s batch {batch} (samples {seen}–{seen + input.shape.FirstOrDefault() - 1})";
            if (input.dim() == 0 || target.dim() == 0 || input.shape[0] != target.shape[0])
            {
                throw new ArgumentException($"{at} holds {Count(input)} inputs but {Count(target)} targets.", "data");
            }

            if (!input.shape[1..].SequenceEqual(source.SampleShape))
            {
                throw new ArgumentException(
                    $"{at} holds inputs of shape [{string.Join(", ", input.shape[1..])}] per sample; the data's {nameof(IBatchSource.SampleShape)} is [{string.Join(", ", source.SampleShape)}].", "data");
            }

            if (input.dtype != source.InputType)
            {
                throw new ArgumentException($"{at} holds {input.dtype} inputs; the data's {nameof(IBatchSource.InputType)} is {source.InputType}.", "data");
            }

            CheckFinite(input, $"{at}: an input", role);
            CheckFinite(target, $"{at}: a target", role);
            if (!is_floating_point(target) && target.dtype != ScalarType.Bool && IsClassification(target, outputShape))
            {
                CheckLabels(target, outputShape[^1], at);
            }

            seen += input.shape[0];
            batch++;
        }

        if (seen != source.Count)
        {
            throw new ArgumentException(
                $"The {role} says it has {source.Count.ToString(CultureInfo.InvariantCulture)} samples ({nameof(IBatchSource.Count)}) but its batches hold {seen.ToString(CultureInfo.InvariantCulture)}.", "data");
        }
    }

    private static string Count(Tensor t) => t.dim() == 0 ? "a scalar of" : t.shape[0].ToString(CultureInfo.InvariantCulture);

    private static void CheckFinite(Tensor values, string what, string role)
    {
        if (!is_floating_point(values) || values.numel() == 0)
        {
            return;
        }

        var bad = values.isfinite().logical_not();
        if (bad.any().item<bool>())
        {
            long index = bad.reshape(-1).nonzero()[0, 0].item<long>();
            double value = values.reshape(-1)[index].to(ScalarType.Float64).item<double>();
            throw new ArgumentException($"{what} holds {value.ToString(CultureInfo.InvariantCulture)} (element {index} of the batch); the {role} must be finite.", "data");
        }
    }

    /// <summary>Integer targets one dimension short of the outputs, with more than one output per position: class labels.</summary>
    private static bool IsClassification(Tensor target, long[] outputShape) =>
        outputShape.Length == target.dim() + 1 && outputShape[^1] > 1;

    private static void CheckLabels(Tensor target, long classes, string at)
    {
        using var zero = 0.ToScalar();
        using var count = classes.ToScalar();
        using var ignored = IgnoredLabel.ToScalar();
        var valid = target.ge(zero).logical_and(target.lt(count)).logical_or(target.eq(ignored));
        if (!valid.all().item<bool>())
        {
            long index = valid.logical_not().reshape(-1).nonzero()[0, 0].item<long>();
            long label = target.reshape(-1)[index].item<long>();
            throw new ArgumentException(
                $"{at} holds the label {label} (element {index}); the model has {classes} outputs, so labels must be 0 to {classes - 1} (or {IgnoredLabel}, ignored).", "data");
        }
    }
}
