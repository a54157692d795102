using ModelCompression.Data;
using ModelCompression.Training;

namespace ModelCompression;

/// <summary>The data a pipeline run uses: what steps train and calibrate on, and what the accuracy check evaluates on.</summary>
public sealed class CompressionData
{
    /// <summary>Initializes a new instance of the <see cref="CompressionData"/> class.</summary>
    /// <param name="training">The data fine-tuning steps train on; <see langword="null"/> when no step trains.</param>
    /// <param name="evaluation">The data the baseline and every step are evaluated on (held out from training).</param>
    /// <exception cref="ArgumentNullException"><paramref name="evaluation"/> is <see langword="null"/>.</exception>
    public CompressionData(IBatchSource? training, IBatchSource evaluation)
    {
        ArgumentNullException.ThrowIfNull(evaluation);
        Training = training;
        Evaluation = evaluation;
    }

    /// <summary>Gets the training data, or <see langword="null"/>.</summary>
    public IBatchSource? Training { get; }

    /// <summary>Gets the evaluation data.</summary>
    public IBatchSource Evaluation { get; }

    /// <summary>Gets or sets the calibration data (quantization observers, importance scores).</summary>
    /// <value>The default is <see langword="null"/>: the training data, else the evaluation data.</value>
    public IBatchSource? Calibration { get; init; }

    /// <summary>Gets or sets the evaluator.</summary>
    /// <value>The default is <see cref="AccuracyEvaluator"/> (top-1 accuracy).</value>
    public IEvaluator Evaluator { get; init; } = new AccuracyEvaluator();
}
