using ModelCompression.Calibration;
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

    /// <summary>
    /// AWQ: α on a grid, for the smallest output error of the rounded layers on the calibration inputs; folded into the
    /// LayerNorm the layers read, else (with <see cref="AwqOptions.ExplicitScales"/>) kept as the layer's explicit input
    /// scales; then, with <see cref="AwqOptions.ClipSearch"/>, each weight group's range clipped where that lowers the
    /// output error.
    /// </summary>
    /// <returns>The notes, and the explicit input scales by layer name (their weights are not scaled: the rounding multiplies them).</returns>
    public static (List<string> Notes, Dictionary<string, float[]> InputScales) Awq(nn.Module<Tensor, Tensor> root, IReadOnlyList<Target> targets, PostTrainingQuantizationOptions options, AwqOptions awq, CompressionContext context)
    {
        int groupSize = options.EffectiveGranularity is PerGroupGranularity g ? g.Size : 0;
        bool clip = awq.ClipSearch && options.Rounding is not HqqRounding && options.Bits > 1;
        var clipped = new List<string>();
        var scaled = new HashSet<string>(StringComparer.Ordinal);
        var notes = Fold(root, targets, options, awq.MaxRows, context, (x, layers) =>
        {
            var (alpha, before, after, scales) = Search(x, layers, options.Bits, groupSize, awq.GridPoints);
            return (scales, $"α = {alpha:0.00}, output error {after / before:P0} of round-to-nearest's");
        }, scaled, clip ? (x, scales, layers) =>
        {
            // The folded layers now read x / s with weights W·diag(s).
            using var scope = NewDisposeScope();
            var input = x / scales.unsqueeze(0);
            foreach (var (name, layer) in layers)
            {
                clipped.Add($"{name} ({ClipInPlace(input, layer.weight!, null, options.Bits, groupSize, awq):P0})");
            }
        }
        : null);

        var inputScales = new Dictionary<string, float[]>(StringComparer.Ordinal);
        var rest = targets.Where(t => t.Module is Linear && !scaled.Contains(t.Name)).ToList();
        if (rest.Count > 0 && (awq.ExplicitScales || clip))
        {
            var explicitNotes = new List<string>();
            int batches = 1;
            foreach (var target in rest)
            {
                context.CancellationToken.ThrowIfCancellationRequested();
                using var scope = NewDisposeScope();
                var layer = (Linear)target.Module;
                var (x, rowsPerBatch) = Rows(root, target, layer, batches, awq.MaxRows, options, context);
                if (x is null)
                {
                    continue; // never called on the calibration data: rounded as it is
                }

                // As many batches as give MaxRows rows (one layer's rows at a time: the memory stays one layer's); the
                // first layer, read with one batch to learn the rows per batch, is read again when it needs more.
                int needed = Math.Clamp((int)Math.Ceiling((double)awq.MaxRows / Math.Max(1, rowsPerBatch)), 1, options.CalibrationBatches);
                if (needed > batches)
                {
                    batches = needed;
                    x = Rows(root, target, layer, batches, awq.MaxRows, options, context).Rows ?? x;
                }
                Tensor? s = null;
                if (awq.ExplicitScales)
                {
                    var (alpha, before, after, scales) = Search(x, [layer], options.Bits, groupSize, awq.GridPoints);
                    if (alpha > 0 && after < before)
                    {
                        s = scales;
                        inputScales[target.Name] = scales.contiguous().data<float>().ToArray();
                        explicitNotes.Add($"{target.Name} (α = {alpha:0.00}, {after / before:P0})");
                    }
                }

                if (clip)
                {
                    clipped.Add($"{target.Name} ({ClipInPlace(s is null ? x : x / s.unsqueeze(0), layer.weight!, s, options.Bits, groupSize, awq):P0})");
                }
            }

            if (explicitNotes.Count > 0)
            {
                notes.Add($"explicit input scales (no preceding layer absorbs them; the quantized layer divides its input), output error of round-to-nearest's: {string.Join(", ", explicitNotes)}");
            }
        }

        if (clipped.Count > 0)
        {
            notes.Add($"clipping search, output error of the unclipped grid's: {string.Join(", ", clipped)}");
        }
        else if (awq.ClipSearch && options.Rounding is HqqRounding)
        {
            notes.Add("no clipping search: HQQ fits each group's range itself");
        }

        return (notes, inputScales);
    }

    /// <summary>The weight W·diag(s) a layer with explicit input scales rounds (or the weight itself without them).</summary>
    public static Tensor ScaledWeight(Linear layer, float[]? inputScales)
    {
        var weight = layer.weight!.detach();
        if (inputScales is null)
        {
            return weight;
        }

        using var s = tensor(inputScales);
        return weight.to(ScalarType.Float32) * s.unsqueeze(0);
    }

    /// <summary>Up to <paramref name="maxRows"/> calibration input rows of one layer (float32 [rows, K]), and the rows one batch gave.</summary>
    private static (Tensor? Rows, long RowsPerBatch) Rows(nn.Module<Tensor, Tensor> root, Target target, Linear layer, int batches, int maxRows, PostTrainingQuantizationOptions options, CompressionContext context)
    {
        var parts = new List<Tensor>();
        long kept = 0;
        long rows = LayerInputs.Collect(root, target.Name, layer, checked((int)layer.in_features), batches, options.CalibrationBatchSize, context, x =>
        {
            if (kept < maxRows)
            {
                var part = x[..(int)Math.Min(x.shape[0], maxRows - kept)].to(ScalarType.Float32).clone();
                kept += part.shape[0];
                parts.Add(part.DetachFromDisposeScope());
            }
        });
        try
        {
            return (parts.Count == 0 ? null : cat(parts, 0), rows / Math.Max(1, batches));
        }
        finally
        {
            parts.ForEach(p => p.Dispose());
        }
    }

    /// <summary>
    /// AWQ's clipping search: for each row's weight group, the largest magnitude shrunk by the factor on a grid (down to
    /// 1 − <see cref="AwqOptions.MaxShrink"/>) that gives the smallest error of that group's share of the output after
    /// rounding, on calibration rows; the weights are clamped to it in place.
    /// </summary>
    /// <param name="x">Calibration inputs as the rounded weight sees them [rows, K] (divided by the explicit scales, if any).</param>
    /// <param name="weight">The layer's float weight [N, K], clamped in place.</param>
    /// <param name="inputScales">The explicit input scales s: the search runs on W·diag(s) and the clamp is applied in that domain.</param>
    /// <param name="bits">Bits per weight.</param>
    /// <param name="groupSize">Inputs per scale (0: the whole row).</param>
    /// <param name="awq">The grid and the rows used.</param>
    /// <returns>The output error after clipping as a fraction of the error without.</returns>
    private static double ClipInPlace(Tensor x, Tensor weight, Tensor? inputScales, int bits, int groupSize, AwqOptions awq)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        long n = weight.shape[0], k = weight.shape[1];
        int size = groupSize <= 0 || groupSize >= k ? (int)k : groupSize;
        long groups = (k + size - 1) / size;
        long padded = groups * size;
        // Evenly spread rows: the search's memory is rows × N × groups per shrink factor.
        long rows = Math.Min(x.shape[0], awq.ClipRows);
        var picked = x.shape[0] == rows ? x : x.index_select(0, linspace(0, x.shape[0] - 1, rows).round().to(ScalarType.Int64));
        var w = weight.to(ScalarType.Float32);
        if (inputScales is not null)
        {
            w = w * inputScales.unsqueeze(0);
        }

        var xg = nn.functional.pad(picked.to(ScalarType.Float32), [0, padded - k]).reshape(rows, groups, size);
        var wg = nn.functional.pad(w, [0, padded - k]).reshape(n, groups, size);
        int qmax = Kernels.QuantizedMatrix.MaxLevel(bits);
        using var levels = ((double)qmax).ToScalar();
        using var negative = (-(double)qmax).ToScalar();
        using var tiny = 1e-12.ToScalar();
        using var infinity = float.PositiveInfinity.ToScalar();
        var largest = wg.abs().amax([-1], keepdim: true);
        var best = largest.clone();
        double before = 0, after = 0;
        int steps = Math.Max(1, (int)Math.Round(awq.MaxShrink * awq.ClipGridPoints));
        // Output rows in chunks keep the [chunk, rows, groups] products small; each chunk's unrounded output once.
        const long Chunk = 256;
        for (long start = 0; start < n; start += Chunk)
        {
            using var chunkScope = NewDisposeScope();
            long count = Math.Min(Chunk, n - start);
            var wc = wg.narrow(0, start, count);
            var reference = einsum("tgk,ngk->ntg", xg, wc);
            var bestError = full([count, groups], infinity, ScalarType.Float32);
            var bestLimit = best.narrow(0, start, count);
            for (int i = 0; i < steps; i++)
            {
                using var step = NewDisposeScope();
                using var factor = (1.0 - ((double)i / awq.ClipGridPoints)).ToScalar();
                var limit = largest.narrow(0, start, count) * factor;
                var scale = (limit / levels).clamp_min(tiny);
                var rounded = (minimum(maximum(wc, -limit), limit) / scale).round().clamp(negative, levels) * scale;
                var error = (einsum("tgk,ngk->ntg", xg, rounded) - reference).square().mean([1]);
                if (i == 0)
                {
                    before += error.sum().item<float>();
                }

                var better = error.lt(bestError);
                bestError.copy_(where(better, error, bestError));
                bestLimit.copy_(where(better.unsqueeze(-1), limit, bestLimit));
            }

            after += bestError.sum().item<float>();
        }

        var bound = best.expand(n, groups, size).reshape(n, padded)[.., ..(int)k];
        var result = minimum(maximum(w, -bound), bound);
        if (inputScales is not null)
        {
            result = result / inputScales.unsqueeze(0);
        }

        weight.copy_(result.to(weight.dtype));
        return before > 0 ? after / before : 1;
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
    /// <param name="scaled">Receives the names of the layers whose scales were folded.</param>
    /// <param name="afterFold">Called after each accepted fold with the group's inputs (before scaling), its scales and its layers.</param>
    private static List<string> Fold(nn.Module<Tensor, Tensor> root, IReadOnlyList<Target> targets, PostTrainingQuantizationOptions options, int maxRows, CompressionContext context, ScaleChooser choose, HashSet<string>? scaled = null, Action<Tensor, Tensor, List<(string Name, Linear Layer)>>? afterFold = null)
    {
        var linear = targets.Where(t => t.Module is Linear).ToDictionary(t => (object)t.Module, t => t.Name, ReferenceEqualityComparer.Instance);
        var norms = root.named_modules().Where(m => m.module is LayerNorm).ToDictionary(m => (object)m.module, m => m.name, ReferenceEqualityComparer.Instance);
        if (linear.Count == 0 || norms.Count == 0)
        {
            return ["no Linear layer reads a LayerNorm's output directly, so nothing was folded"];
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
            return Scale(root, linear, readers, inputs, unfoldable, maxRows, choose, context, scaled, afterFold);
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
        CompressionContext context,
        HashSet<string>? scaled,
        Action<Tensor, Tensor, List<(string Name, Linear Layer)>>? afterFold)
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
            scaled?.UnionWith(names);
            afterFold?.Invoke(x, scales, [.. names.Zip(layers)]);
        }

        var unscaled = linear.Values.Where(n => !readers.Values.Any(r => r.Contains(n))).ToList();
        if (unscaled.Count > 0)
        {
            notes.Add($"not folded (their input is not a LayerNorm's output, so no layer absorbs the inverse scale): {string.Join(", ", unscaled)}");
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
