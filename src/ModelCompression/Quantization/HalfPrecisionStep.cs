using Microsoft.Extensions.Logging;
using ModelCompression.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Quantization;

/// <summary>
/// Converts the weights of selected layers to bfloat16 or float16. Each converted layer becomes a
/// <see cref="HalfPrecisionLayer"/> that casts its input to the 16-bit type and its output back, so the rest of the
/// model is unchanged.
/// </summary>
/// <remarks>
/// Each layer checks its native 16-bit kernel on a probe input (see <see cref="HalfPrecisionLayer.ComputeType"/>); the
/// step logs a warning and adds a note naming the layers whose kernel was wrong and that compute in float32 instead.
/// </remarks>
public sealed class HalfPrecisionStep : ICompressionStep
{
    /// <summary>The base name of the step in reports.</summary>
    public const string StepName = "HalfPrecision";

    private readonly HalfPrecisionOptions _options;

    /// <summary>Initializes a new instance of the <see cref="HalfPrecisionStep"/> class.</summary>
    /// <param name="options">The options; copied.</param>
    /// <exception cref="OptionsValidationException">The options are invalid.</exception>
    public HalfPrecisionStep(HalfPrecisionOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        OptionsValidationException.ThrowIfInvalid(typeof(HalfPrecisionOptions), options.Validate());
        _options = options.Clone();
    }

    /// <inheritdoc/>
    public string Name => $"{StepName}({(_options.Format == HalfPrecisionFormat.BFloat16 ? "bf16" : "fp16")})";

    /// <inheritdoc/>
    /// <exception cref="ArgumentException">The selection names a layer the model does not have, or its named layers match none.</exception>
    public nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(context);
        _options.Layers.ThrowIfUnknownNames(model);

        // Layers already converted are not converted twice, nor are layers inside them.
        var targets = _options.Layers.Select(model)
            .Where(t => t.Module is not HalfPrecisionLayer && !ModuleTree.HasAncestor<HalfPrecisionLayer>(model, t.Name))
            .ToList();
        if (targets.Count == 0)
        {
            if (_options.Layers.Include.Count > 0)
            {
                throw new ArgumentException($"The layer selection ({_options.Layers}) selects no layer of the model.", nameof(model));
            }

            // Selection by type only: a model with no such layer left (e.g. all became sparse) is not an error.
            context.AddNote($"no layer matched ({_options.Layers}); nothing converted");
            return model;
        }

        var dtype = _options.Format == HalfPrecisionFormat.BFloat16 ? ScalarType.BFloat16 : ScalarType.Float16;
        var root = model;
        var fallbacks = new List<string>();
        var unverified = new List<string>();
        using (no_grad())
        {
            foreach (var (name, module) in targets)
            {
                context.CancellationToken.ThrowIfCancellationRequested();
                var layer = new HalfPrecisionLayer((nn.Module<Tensor, Tensor>)module, dtype);
                root = ModuleTree.Replace(root, name, layer);
                context.Logger.LogDebug("Converted {Layer} to {Type} (computes in {ComputeType}, probe error {Error})", name, dtype, layer.ComputeType, layer.ProbeError);
                if (layer.ComputeType != dtype)
                {
                    // The weights are still stored in 16 bits; only the arithmetic is wider, so the user should know why
                    // this layer is not faster.
                    context.Logger.LogWarning(
                        "The native {Type} kernel of {Layer} is wrong on this machine (relative error {Error:G3} on a probe input); it computes in float32 from its {Type} weights",
                        dtype, name, layer.ProbeError, dtype);
                    fallbacks.Add($"{name} ({layer.ProbeError:G3})");
                }
                else if (layer.ProbeError is null)
                {
                    unverified.Add(name);
                }
            }
        }

        if (fallbacks.Count > 0)
        {
            context.AddNote($"native {dtype} kernel wrong on this machine (relative error on a probe input); computing in float32 from {dtype} weights: {string.Join(", ", fallbacks)}");
        }

        if (unverified.Count > 0)
        {
            context.AddNote($"native {dtype} kernel not checked (no float32 path for this layer kind): {string.Join(", ", unverified)}");
        }

        return root;
    }
}
