using ModelCompression.Calibration;
using ModelCompression.Modules;
using ModelCompression.Quantization.Kernels;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Quantization.Gptq;

/// <summary>
/// Runs <see cref="GptqSolver"/> over a model's Linear targets, one at a time in the order the model calls them: each
/// layer's Hessian comes from calibration inputs that the already quantized layers before it produced, as GPTQ's
/// sequential mode does, and only one Hessian is held at a time.
/// </summary>
internal static class GptqLayers
{
    /// <summary>Solves every Linear target the calibration data reaches and returns its integer weights by name.</summary>
    /// <param name="root">The model; quantized layers stand in for solved ones while later ones are calibrated, and the originals are put back before this returns.</param>
    /// <param name="targets">The layers to quantize (only the Linear ones are solved).</param>
    /// <param name="rounding">GPTQ's settings.</param>
    /// <param name="options">The step's options (bits, granularity, calibration, mode).</param>
    /// <param name="activationsFor">The activation settings each target's quantized layer gets.</param>
    /// <param name="inputScales">AWQ's explicit input scales by layer name: those layers are solved as W·diag(s) for inputs x / s.</param>
    /// <param name="context">The step's context (calibration data, progress, notes, cancellation).</param>
    /// <returns>The solved matrices by layer name.</returns>
    public static Dictionary<string, QuantizedMatrix> Solve(
        ref nn.Module<Tensor, Tensor> root,
        IReadOnlyList<Target> targets,
        GptqRounding rounding,
        PostTrainingQuantizationOptions options,
        Func<Target, ActivationSettings> activationsFor,
        IReadOnlyDictionary<string, float[]> inputScales,
        CompressionContext context)
    {
        var solved = new Dictionary<string, QuantizedMatrix>(StringComparer.Ordinal);
        var linear = targets.Where(t => t.Module is Linear).ToList();
        if (linear.Count == 0)
        {
            return solved;
        }

        if (rounding.Pattern is { } pattern && linear.FirstOrDefault(t => ((Linear)t.Module).in_features % pattern.M != 0) is { } odd)
        {
            throw new ArgumentException(
                $"Layer '{odd.Name}' has {((Linear)odd.Module).in_features} inputs, not a multiple of M = {pattern.M}: the {pattern} pattern cannot apply. Exclude it from the selection.",
                "model");
        }

        var order = LayerInputs.CallOrder(root, linear, t => t.Module, options.CalibrationBatchSize, context);
        var standIns = new List<(string Name, nn.Module<Tensor, Tensor> Original, nn.Module<Tensor, Tensor> StandIn)>();
        var raised = new List<string>();
        var dead = new List<string>();
        var granularityRequested = options.EffectiveGranularity;
        try
        {
            for (int index = 0; index < order.Count; index++)
            {
                context.CancellationToken.ThrowIfCancellationRequested();
                var target = order[index];
                var layer = (Linear)target.Module;
                int k = checked((int)layer.in_features);
                int n = checked((int)layer.out_features);
                using var scope = NewDisposeScope();
                var hessian = LayerInputs.Hessian(root, target.Name, target.Module, k, options.CalibrationBatches, options.CalibrationBatchSize, context);
                var granularity = QuantizedMatrix.ForInputs(granularityRequested, k);
                int groupSize = granularity is PerGroupGranularity g ? g.Size : 0;
                var scales = inputScales.GetValueOrDefault(target.Name);
                if (scales is not null)
                {
                    // Inputs x / s: the Hessian of x / s is H / (s·sᵀ).
                    using var s = tensor(scales, ScalarType.Float64);
                    hessian.div_(s.unsqueeze(1)).div_(s.unsqueeze(0));
                }

                var result = GptqSolver.Quantize(Scaling.LayerNormScaling.ScaledWeight(layer, scales), hessian, options.Bits, groupSize, rounding.ActOrder, rounding.DampingFraction, rounding.BlockSize, sparsity: rounding.Sparsity, pattern: rounding.Pattern);
                if (result.Retries > 0)
                {
                    raised.Add($"{target.Name} ({result.Damping:G3})");
                }

                if (result.DeadInputs > 0)
                {
                    dead.Add($"{target.Name} ({result.DeadInputs})");
                }

                float[]? bias = layer.bias is { } b ? b.detach().to(ScalarType.Float32).cpu().contiguous().data<float>().ToArray() : null;
                solved[target.Name] = QuantizedMatrix.FromLevels(n, k, options.Bits, granularity, result.Levels, result.Scales, bias, inputScales: scales);
                scope.Dispose();

                // The layers after this one calibrate on what the quantized layer computes (built outside the scope,
                // which would free its tensors).
                var standIn = new QuantizedLinear(solved[target.Name], activationsFor(target), false, options.Mode);
                root = ModuleTree.Replace(root, target.Name, standIn);
                standIns.Add((target.Name, target.Module, standIn));
                context.ReportProgress(CompressionPhase.Applying, 0.5 * (index + 1) / order.Count);
            }
        }
        finally
        {
            foreach (var (name, original, standIn) in standIns)
            {
                root = ModuleTree.Replace(root, name, original);
                standIn.Dispose();
            }
        }

        context.AddNote($"{rounding} solved {solved.Count} Linear layer(s) in call order, {options.CalibrationBatches} calibration batch(es) of {options.CalibrationBatchSize} each");
        if (raised.Count > 0)
        {
            context.AddNote($"GPTQ raised the Hessian damping (not positive definite) for: {string.Join(", ", raised)}");
        }

        if (dead.Count > 0)
        {
            context.AddNote($"GPTQ found inputs that were zero in every calibration sample (weights set to zero): {string.Join(", ", dead)}");
        }

        var skipped = linear.Where(t => !solved.ContainsKey(t.Name)).Select(t => t.Name).ToList();
        if (skipped.Count > 0)
        {
            context.AddNote($"rounded to nearest (never called on the calibration data, so GPTQ has no Hessian): {string.Join(", ", skipped)}");
        }

        return solved;
    }
}
