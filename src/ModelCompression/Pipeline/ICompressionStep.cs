using static TorchSharp.torch;

namespace ModelCompression;

/// <summary>
/// One compression technique applied to a model: pruning, quantization, factorization, distillation, a rewrite.
/// </summary>
/// <remarks>
/// <para>
/// The pipeline gives each step its own deep copy of the current model, so a step may change the model it is
/// given in place, replace submodules, or return a new root. A rejected step's model is discarded.
/// </para>
/// <para>
/// The pipeline runs <see cref="Apply"/> inside <c>torch.NewDisposeScope()</c>: parameters and buffers of modules a
/// step creates must be detached from it (<c>DetachFromDisposeScope()</c>), or they are freed when the step ends.
/// Steps should dispose the modules they replace and honour <see cref="CompressionContext.CancellationToken"/>.
/// </para>
/// </remarks>
public interface ICompressionStep
{
    /// <summary>Gets the step's name, as the report shows it.</summary>
    string Name { get; }

    /// <summary>Applies the step.</summary>
    /// <param name="model">The model to compress (the step's own copy).</param>
    /// <param name="context">Data, evaluator, device, seed, logger, progress, cancellation and the original model.</param>
    /// <returns>The compressed model: <paramref name="model"/> itself or a new root module.</returns>
    nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context);
}

/// <summary>Options that can list their own errors. Every step's options type implements it.</summary>
public interface IValidatableOptions
{
    /// <summary>Lists every invalid value; empty when the options are valid.</summary>
    /// <returns>One message per invalid value, naming the options type and property.</returns>
    IReadOnlyList<string> Validate();
}

/// <summary>
/// Optionally implemented by steps to say what data they need, so the pipeline can refuse a run before any step starts.
/// </summary>
public interface ICompressionStepRequirements
{
    /// <summary>Gets whether the step trains or fine-tunes and so needs <see cref="CompressionData.Training"/>.</summary>
    bool RequiresTrainingData { get; }
}
