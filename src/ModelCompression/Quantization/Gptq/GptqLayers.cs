using ModelCompression.Modules;
using ModelCompression.Quantization.Kernels;
using ModelCompression.Training;
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
    /// <param name="context">The step's context (calibration data, progress, notes, cancellation).</param>
    /// <returns>The solved matrices by layer name.</returns>
    public static Dictionary<string, QuantizedMatrix> Solve(
        ref nn.Module<Tensor, Tensor> root,
        IReadOnlyList<Target> targets,
        GptqRounding rounding,
        PostTrainingQuantizationOptions options,
        Func<Target, ActivationSettings> activationsFor,
        CompressionContext context)
    {
        var solved = new Dictionary<string, QuantizedMatrix>(StringComparer.Ordinal);
        var linear = targets.Where(t => t.Module is Linear).ToList();
        if (linear.Count == 0)
        {
            return solved;
        }

        var order = CallOrder(root, linear, options, context);
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
                var hessian = Hessian(root, target, k, options, context);
                var granularity = QuantizedMatrix.ForInputs(granularityRequested, k);
                int groupSize = granularity is PerGroupGranularity g ? g.Size : 0;
                var result = GptqSolver.Quantize(layer.weight!, hessian, options.Bits, groupSize, rounding.ActOrder, rounding.DampingFraction, rounding.BlockSize);
                if (result.Retries > 0)
                {
                    raised.Add($"{target.Name} ({result.Damping:G3})");
                }

                if (result.DeadInputs > 0)
                {
                    dead.Add($"{target.Name} ({result.DeadInputs})");
                }

                float[]? bias = layer.bias is { } b ? b.detach().to(ScalarType.Float32).cpu().contiguous().data<float>().ToArray() : null;
                solved[target.Name] = QuantizedMatrix.FromLevels(n, k, options.Bits, granularity, result.Levels, result.Scales, bias);
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

        context.AddNote($"GPTQ ({rounding}) solved {solved.Count} Linear layer(s) in call order, {options.CalibrationBatches} calibration batch(es) of {options.CalibrationBatchSize} each");
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

    /// <summary>The Linear targets in the order of their first call on one calibration batch; layers never called are left out.</summary>
    private static List<Target> CallOrder(nn.Module<Tensor, Tensor> root, List<Target> linear, PostTrainingQuantizationOptions options, CompressionContext context)
    {
        var order = new List<Target>();
        var removers = new List<Action>();
        try
        {
            foreach (var target in linear)
            {
                removers.Add(target.Module.register_forward_pre_hook((m, input) =>
                {
                    if (!order.Contains(target))
                    {
                        order.Add(target);
                    }

                    return input;
                }).remove);
            }

            using var scope = NewDisposeScope();
            QuantizationTargets.RunCalibrationBatches(root, context.CalibrationData, 1, options.CalibrationBatchSize, context);
        }
        finally
        {
            removers.ForEach(remove => remove());
        }

        return order;
    }

    /// <summary>2·XᵀX/n of one layer's inputs over the calibration batches (float64), with the model as it stands.</summary>
    private static Tensor Hessian(nn.Module<Tensor, Tensor> root, Target target, int k, PostTrainingQuantizationOptions options, CompressionContext context)
    {
        var sum = zeros([k, k], ScalarType.Float64);
        long rows = 0;
        bool finite = true;
        // Padding: positions whose next-token target is the ignored id say nothing about the layer's real inputs.
        long ignored = context.Evaluator is PerplexityEvaluator perplexity ? perplexity.IgnoreIndex : -100;
        Tensor? scored = null;
        var remove = target.Module.register_forward_pre_hook((m, input) =>
        {
            using var scope = NewDisposeScope();
            var values = input.detach();
            if (scored is not null && values.dim() == 3 && values.shape[0] == scored.shape[0] && values.shape[1] == scored.shape[1])
            {
                values = values.masked_select(scored.to(values.device).unsqueeze(-1)).reshape(-1, k);
            }

            var x = values.to(ScalarType.Float64).cpu().reshape(-1, k);
            if (!isfinite(x).all().item<bool>())
            {
                finite = false;
                return input;
            }

            sum.addmm_(x.t(), x);
            rows += x.shape[0];
            return input;
        }).remove;
        try
        {
            QuantizationTargets.RunCalibrationBatches(root, context.CalibrationData, options.CalibrationBatches, options.CalibrationBatchSize, context, beforeBatch: (_, target) =>
            {
                // Token targets [batch, time] mark the positions to use; anything else uses every row.
                scored = target.dtype == ScalarType.Int64 && target.dim() == 2 ? target.ne(ignored) : null;
            });
        }
        finally
        {
            remove();
        }

        if (!finite)
        {
            throw new ArgumentException($"Layer '{target.Name}' received NaN or infinite activations during calibration; nothing was quantized.", "model");
        }

        return sum.mul_(2.0 / Math.Max(1, rows));
    }
}
