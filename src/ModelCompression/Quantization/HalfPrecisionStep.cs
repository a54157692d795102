using Microsoft.Extensions.Logging;
using ModelCompression.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Quantization;

/// <summary>
/// Converts the weights of selected layers to bfloat16 or float16. Each converted layer becomes a
/// <see cref="HalfPrecisionLayer"/> that casts its input to the 16-bit type and its output back, so the rest of the
/// model is unchanged. A layer held in a field typed <c>Linear</c> or <c>Conv2d</c>, which cannot hold a
/// <see cref="HalfPrecisionLayer"/>, is handled as <see cref="HalfPrecisionOptions.FixedTypeLayers"/> says: by default
/// it keeps its type with its parameters rounded to the 16-bit values.
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
    /// <exception cref="UnsupportedModelException">
    /// <see cref="HalfPrecisionOptions.FixedTypeLayers"/> is <see cref="FixedTypeLayers.Fail"/> and a selected layer cannot be replaced. Nothing has changed.
    /// </exception>
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

        // Every layer is checked before the first one changes: Fail must leave the model as it was.
        var fixedTypes = FixedTypeLayerPolicy.Find(
            model, targets.Where(t => t.Module is nn.Module<Tensor, Tensor>).Select(t => t.Name), typeof(HalfPrecisionLayer), _options.FixedTypeLayers, Name, nameof(HalfPrecisionOptions));

        // A selected module of another call signature (TorchSharp's LSTM, GRU, RNN, MultiheadAttention) cannot be
        // wrapped: it is rounded in place, skipped, or refused, as a layer in a fixed-type field is.
        var otherSignatures = targets.Where(t => t.Module is not nn.Module<Tensor, Tensor>).ToList();
        if (otherSignatures.Count > 0 && _options.FixedTypeLayers == FixedTypeLayers.Fail)
        {
            throw new UnsupportedModelException(
                otherSignatures[0].Name,
                otherSignatures[0].Module.GetType().Name,
                $"Step '{Name}' cannot wrap {string.Join(", ", otherSignatures.Select(t => $"'{t.Name}' ({t.Module.GetType().Name})"))}: its forward is not " +
                $"Tensor → Tensor. Nothing was changed. Set {nameof(HalfPrecisionOptions)}.{nameof(FixedTypeLayers)} to " +
                $"{nameof(FixedTypeLayers.CompressInPlace)} or {nameof(FixedTypeLayers.Skip)}, or leave them out of the layer selection.");
        }

        foreach (var (name, module) in otherSignatures)
        {
            fixedTypes[name] = $"{module.GetType().Name}, not a Tensor → Tensor module";
        }
        var dtype = _options.Format == HalfPrecisionFormat.BFloat16 ? ScalarType.BFloat16 : ScalarType.Float16;
        var root = model;
        var fallbacks = new List<string>();
        var unverified = new List<string>();
        using (NewDisposeScope())
        using (no_grad())
        {
            foreach (var (name, module) in targets)
            {
                context.CancellationToken.ThrowIfCancellationRequested();
                if (fixedTypes.ContainsKey(name))
                {
                    if (_options.FixedTypeLayers == FixedTypeLayers.CompressInPlace)
                    {
                        RoundInPlace(module, dtype);
                        context.Logger.LogDebug("Rounded {Layer} to {Type} values in place", name, dtype);
                    }

                    continue;
                }

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

        string format = dtype == ScalarType.BFloat16 ? "bf16" : "fp16";
        FixedTypeLayerPolicy.Report(
            context,
            Name,
            _options.FixedTypeLayers == FixedTypeLayers.CompressInPlace
                ? $"kept their type, parameters rounded in place to {format} values (stored as float32 in memory, 16 bits in the file; inputs not cast)"
                : "left in float32, their type cannot hold a half-precision layer",
            fixedTypes);
        return root;
    }

    /// <summary>
    /// Rounds every floating-point parameter and buffer of <paramref name="module"/> to the nearest <paramref name="dtype"/>
    /// value, keeping its own type: the same values a <see cref="HalfPrecisionLayer"/> would hold, in a layer whose
    /// field cannot hold one. The file's value codec stores such arrays in 16 bits.
    /// </summary>
    internal static void RoundInPlace(nn.Module module, ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        foreach (var tensor in module.parameters().Concat(module.buffers()))
        {
            if (tensor.is_floating_point() && tensor.ElementSize > 2)
            {
                tensor.copy_(tensor.to(dtype).to(tensor.dtype));
            }
        }
    }
}
