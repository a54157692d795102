namespace ModelCompression.Training;

/// <summary>A step that only fine-tunes the current model with the shared trainer (e.g. after a step that did not).</summary>
public sealed class FineTuningStep : ICompressionStep, ICompressionStepRequirements
{
    /// <summary>The name of the step in reports.</summary>
    public const string StepName = "FineTuning";

    private readonly TrainingOptions _options;

    /// <summary>Initializes a new instance of the <see cref="FineTuningStep"/> class.</summary>
    /// <param name="options">The training options; copied.</param>
    /// <exception cref="OptionsValidationException">The options are invalid.</exception>
    public FineTuningStep(TrainingOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        OptionsValidationException.ThrowIfInvalid(typeof(TrainingOptions), options.Validate());
        _options = options.Clone();
    }

    /// <inheritdoc/>
    public string Name => $"{StepName}({_options.Epochs} epochs)";

    /// <inheritdoc/>
    public bool RequiresTrainingData => true;

    /// <inheritdoc/>
    public TorchSharp.torch.nn.Module<TorchSharp.torch.Tensor, TorchSharp.torch.Tensor> Apply(
        TorchSharp.torch.nn.Module<TorchSharp.torch.Tensor, TorchSharp.torch.Tensor> model, CompressionContext context)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(context);
        var summary = context.Train(model, _options);
        context.AddNote($"{summary.Steps} optimizer steps, final loss {summary.FinalLoss:0.####}");
        return model;
    }
}
