using ModelCompression.Data;
using ModelCompression.Modules;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Quantization.Scaling;

/// <summary>
/// Per-input-channel scales for the Linear layers that read one LayerNorm's output, folded into that LayerNorm: the
/// layers' weight columns are multiplied by s and the LayerNorm's weight and bias divided by s, so the float model
/// computes the same. AWQ (Lin et al., MLSys 2024) chooses s to protect the weights of salient input channels from
/// rounding; SmoothQuant (Xiao et al., ICML 2023) chooses it to move activation outliers into the weights, where int8
/// handles them. Both share the discovery of which Linear layers read which LayerNorm, from one calibration pass.
/// </summary>
internal static class LayerNormScaling
{
    /// <summary>Chooses the scales of one group from its calibration inputs [rows, channels] and its layers; returns them and a note.</summary>
    public delegate (Tensor Scales, string Note) ScaleChooser(Tensor inputs, List<Linear> layers);

    /// <summary>AWQ: α on a grid, for the smallest output error of the rounded layers on the calibration inputs.</summary>
    public static List<string> Awq(nn.Module<Tensor, Tensor> root, IReadOnlyList<Target> targets, PostTrainingQuantizationOptions options, AwqOptions awq, CompressionContext context)
    {
        int groupSize = options.EffectiveGranularity is PerGroupGranularity g ? g.Size : 0;
        return Fold(root, targets, options, awq.MaxRows, context, (x, layers) =>
        {
            var (alpha, before, after, scales) = Search(x, layers, options.Bits, groupSize, awq.GridPoints);
            return (scales, $"α = {alpha:0.00}, output error {after / before:P0} of round-to-nearest's");
        });
    }

    /// <summary>SmoothQuant: s = max|x|^α / max|w|^(1−α) per input channel, α the migration strength.</summary>
    public static List<string> SmoothQuant(nn.Module<Tensor, Tensor> root, IReadOnlyList<Target> targets, PostTrainingQuantizationOptions options, SmoothQuantOptions smooth, CompressionContext context) =>
        Fold(root, targets, options, int.MaxValue, context, (x, layers) =>
        {
            using var noGrad = no_grad();
            using var floor = 1e-5.ToScalar();
            using var strength = smooth.MigrationStrength.ToScalar();
            using var rest = (1 - smooth.MigrationStrength).ToScalar();
            var activation = x.abs().amax([0]).clamp_min(floor);
            var weight = stack(layers.Select(l => l.weight!.detach().abs().amax([0])).ToList()).amax([0]).clamp_min(floor);
            var scales = (activation.pow(strength) / weight.pow(rest)).clamp_min(floor);
            double before = activation.max().item<float>() / activation.median().item<float>();
            var smoothed = activation / scales;
            double after = smoothed.max().item<float>() / smoothed.median().item<float>();
            return (scales, $"α = {smooth.MigrationStrength:0.00}, largest/median channel range {before:0.0} → {after:0.0}");
        });

    /// <summary>Scales every foldable group in place and returns one line per group for the notes.</summary>
    /// <param name="root">The model (changed in place: LayerNorm and Linear weights).</param>
    /// <param name="targets">The layers to be quantized; only Linear ones are scaled.</param>
    /// <param name="options">The step's options (calibration).</param>
    /// <param name="maxRows">The most calibration rows per group handed to <paramref name="choose"/>.</param>
    /// <param name="context">The step's context.</param>
    /// <param name="choose">Chooses each group's scales.</param>
    /// <returns>What was scaled, and what could not be.</returns>
    private static List<string> Fold(nn.Module<Tensor, Tensor> root, IReadOnlyList<Target> targets, PostTrainingQuantizationOptions options, int maxRows, CompressionContext context, ScaleChooser choose)
    {
        var linear = targets.Where(t => t.Module is Linear).ToDictionary(t => (object)t.Module, t => t.Name, ReferenceEqualityComparer.Instance);
        var norms = root.named_modules().Where(m => m.module is LayerNorm).ToDictionary(m => (object)m.module, m => m.name, ReferenceEqualityComparer.Instance);
        if (linear.Count == 0 || norms.Count == 0)
        {
            return ["no Linear layer reads a LayerNorm's output directly, so nothing was scaled"];
        }

        // One calibration pass: which LayerNorm output each Linear reads, and that input's rows.
        var producedBy = new Dictionary<object, string>(ReferenceEqualityComparer.Instance);
        var readers = new Dictionary<string, List<string>>(StringComparer.Ordinal);
        var inputs = new Dictionary<string, List<Tensor>>(StringComparer.Ordinal);
        var unfoldable = new HashSet<string>(StringComparer.Ordinal);
        var removers = new List<Action>();
        using var scope = NewDisposeScope();
        try
        {
            foreach (var (module, name) in norms)
            {
                removers.Add(((LayerNorm)module).register_forward_hook((m, x, y) =>
                {
                    producedBy[y] = name;
                    return y;
                }).remove);
            }

            foreach (var (module, name) in linear)
            {
                removers.Add(((Linear)module).register_forward_pre_hook((m, x) =>
                {
                    if (!producedBy.TryGetValue(x, out var norm))
                    {
                        unfoldable.Add(name);
                        return x;
                    }

                    if (!readers.TryGetValue(norm, out var list))
                    {
                        readers[norm] = list = [];
                        inputs[norm] = [];
                    }

                    if (!list.Contains(name))
                    {
                        list.Add(name);
                    }

                    if (list[0] == name)
                    {
                        // Kept past the batch's dispose scope; freed below.
                        inputs[norm].Add(x.detach().reshape(-1, x.shape[^1]).to(ScalarType.Float32).cpu().clone().DetachFromDisposeScope());
                    }

                    return x;
                }).remove);
            }

            QuantizationTargets.RunCalibrationBatches(root, context.CalibrationData, options.CalibrationBatches, options.CalibrationBatchSize, context, afterBatch: _ => producedBy.Clear());
        }
        finally
        {
            removers.ForEach(remove => remove());
        }

        try
        {
            return Scale(root, linear, readers, inputs, unfoldable, maxRows, choose, context);
        }
        finally
        {
            foreach (var t in inputs.Values.SelectMany(list => list))
            {
                t.Dispose();
            }
        }
    }

    private static List<string> Scale(
        nn.Module<Tensor, Tensor> root,
        Dictionary<object, string> linear,
        Dictionary<string, List<string>> readers,
        Dictionary<string, List<Tensor>> inputs,
        HashSet<string> unfoldable,
        int maxRows,
        ScaleChooser choose,
        CompressionContext context)
    {
        using var scope = NewDisposeScope();
        var notes = new List<string>();
        // A LayerNorm whose output something else also reads (a post-norm block's residual path) cannot absorb a
        // scale: each fold is checked on a calibration batch and undone when the model's output moved.
        var (sample, _) = context.CalibrationData.FirstBatch(Math.Min(8, (int)Math.Min(int.MaxValue, context.CalibrationData.Count)));
        sample = sample.to(context.Device);
        var reference = Output(root, sample);
        double tolerance = 1e-4 * Math.Max(1e-6, reference.abs().max().item<float>());
        foreach (var (normName, names) in readers)
        {
            context.CancellationToken.ThrowIfCancellationRequested();
            var norm = (LayerNorm)ModuleTree.GetSubmodule(root, normName);
            if (norm.weight is null || names.Any(unfoldable.Contains))
            {
                notes.Add($"{normName}: not scaled ({(norm.weight is null ? "the LayerNorm has no affine weight to fold into" : "a reader also reads other inputs")})");
                continue;
            }

            var layers = names.Select(n => (Linear)ModuleTree.GetSubmodule(root, n)).ToList();
            var x = cat(inputs[normName], 0);
            if (x.shape[0] > maxRows)
            {
                x = x[..maxRows];
            }

            var (scales, note) = choose(x, layers);
            if (!isfinite(scales).all().item<bool>() || !(scales.min().item<float>() > 0))
            {
                // NaN or infinite calibration activations: the step's calibration names the layer; nothing is folded.
                notes.Add($"{normName}: not scaled (its calibration inputs gave no finite positive scales)");
                continue;
            }

            var saved = layers.Select(l => l.weight!.detach().clone()).Append(norm.weight.detach().clone()).Append(norm.bias?.detach().clone()).ToList();
            using (no_grad())
            {
                foreach (var layer in layers)
                {
                    layer.weight!.mul_(scales.unsqueeze(0));
                }

                norm.weight.div_(scales);
                norm.bias?.div_(scales);
            }

            if (!((Output(root, sample) - reference).abs().max().item<float>() <= tolerance))
            {
                using (no_grad())
                {
                    for (int i = 0; i < layers.Count; i++)
                    {
                        layers[i].weight!.copy_(saved[i]!);
                    }

                    norm.weight.copy_(saved[layers.Count]!);
                    norm.bias?.copy_(saved[layers.Count + 1]!);
                }

                notes.Add($"{normName}: not scaled (something besides {string.Join(", ", names)} reads its output, so the scale changed the model)");
                continue;
            }

            notes.Add($"{normName} → {string.Join(", ", names)}: {note}");
        }

        var unscaled = linear.Values.Where(n => !readers.Values.Any(r => r.Contains(n))).ToList();
        if (unscaled.Count > 0)
        {
            notes.Add($"not scaled (their input is not a LayerNorm's output, so no layer absorbs the inverse scale): {string.Join(", ", unscaled)}");
        }

        return notes;
    }

    /// <summary>The model's output on <paramref name="sample"/> in evaluation mode, without gradients; the mode is restored.</summary>
    private static Tensor Output(nn.Module<Tensor, Tensor> root, Tensor sample)
    {
        using var modes = ModuleModes.Evaluating(root);
        using var noGrad = no_grad();
        return root.call(sample).to(ScalarType.Float32);
    }

    /// <summary>The exponent α on a grid from 0 with the smallest output error of the rounded, scaled layers.</summary>
    private static (double Alpha, double Before, double After, Tensor Scales) Search(Tensor x, List<Linear> layers, int bits, int groupSize, int gridPoints)
    {
        using var noGrad = no_grad();
        using var floor = 1e-8.ToScalar();
        var magnitude = x.abs().mean([0]).clamp_min(floor);
        var references = layers.Select(l => x.matmul(l.weight!.detach().t())).ToList();
        double best = double.PositiveInfinity, before = double.NaN, bestAlpha = 0;
        Tensor bestScales = ones_like(magnitude);
        for (int i = 0; i < gridPoints; i++)
        {
            using var step = NewDisposeScope();
            double alpha = (double)i / gridPoints;
            using var exponent = alpha.ToScalar();
            var s = magnitude.pow(exponent);
            s = s / (s.max() * s.min()).sqrt();
            double error = 0;
            for (int j = 0; j < layers.Count; j++)
            {
                var w = layers[j].weight!.detach();
                var rounded = RoundToNearest(w * s.unsqueeze(0), bits, groupSize) / s.unsqueeze(0);
                error += (x.matmul(rounded.t()) - references[j]).square().sum().item<float>();
            }

            if (i == 0)
            {
                before = error;
            }

            if (error < best)
            {
                best = error;
                bestAlpha = alpha;
                bestScales = s.MoveToOuterDisposeScope();
            }
        }

        return (bestAlpha, before, best, bestScales);
    }

    /// <summary>Symmetric round-to-nearest with a scale per row or per group of consecutive inputs: the grid <see cref="WeightGrid"/> rounds onto.</summary>
    private static Tensor RoundToNearest(Tensor w, int bits, int groupSize)
    {
        var values = w.to(ScalarType.Float32).contiguous().data<float>().ToArray();
        WeightGrid.Round(values, w.shape[0], bits, groupSize);
        return tensor(values, w.shape);
    }
}
