using ModelCompression.Calibration;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Pruning;

/// <summary>
/// Runs a <see cref="CalibratedPruningCriterion"/> over the selected Linear layers, one at a time in the order the
/// model calls them: each layer is pruned from the inputs it receives with the layers before it already pruned (the
/// sequential mode of SparseGPT and Wanda), and only one layer's statistics are held at a time.
/// </summary>
internal static class CalibratedPruning
{
    /// <summary>Prunes every target in place and returns the masks (1 kept, 0 pruned).</summary>
    /// <param name="root">The model.</param>
    /// <param name="targets">The selected layers; all Linear.</param>
    /// <param name="criterion">Wanda or SparseGPT.</param>
    /// <param name="sparsityOf">Each layer's sparsity (unused under a pattern).</param>
    /// <param name="pattern">An N:M pattern, or <see langword="null"/>.</param>
    /// <param name="context">The step's context.</param>
    /// <returns>The masks; on an exception every weight is as it was.</returns>
    public static MaskSet Prune(
        nn.Module<Tensor, Tensor> root,
        IReadOnlyList<(string Name, nn.Module Module, Parameter Weight)> targets,
        CalibratedPruningCriterion criterion,
        Func<string, double> sparsityOf,
        NMPattern? pattern,
        CompressionContext context)
    {
        var order = LayerInputs.CallOrder(root, targets, t => (nn.Module<Tensor, Tensor>)t.Module, criterion.CalibrationBatchSize, context);
        var masks = new MaskSet();
        // The original weights of the layers already pruned, so that a failure (NaN activations further on,
        // cancellation) leaves the model as it was: at most one copy of the selected layers' weights.
        var originals = new List<(Parameter Weight, Tensor Original)>();
        var raised = new List<string>();
        var dead = new List<string>();
        bool completed = false;
        try
        {
            for (int index = 0; index < order.Count; index++)
            {
                context.CancellationToken.ThrowIfCancellationRequested();
                var (name, module, weight) = order[index];
                var layer = (Linear)module;
                int k = checked((int)layer.in_features);
                using var scope = NewDisposeScope();
                using var noGrad = no_grad();
                double sparsity = sparsityOf(name);
                Tensor mask, pruned;
                if (criterion is SparseGptCriterion sparseGpt)
                {
                    var hessian = LayerInputs.Hessian(root, name, layer, k, criterion.CalibrationBatches, criterion.CalibrationBatchSize, context);
                    using var sweep = HessianSweep.Prepare(weight, hessian, actOrder: false, sparseGpt.DampingFraction, maxRetries: 4, "SparseGPT");
                    hessian.Dispose();
                    var rule = new SparseGptRule(sweep.Rows, sweep.Columns, sparsity, pattern);
                    sweep.Run(sparseGpt.BlockSize, rule);
                    mask = rule.Mask(weight.dtype);
                    pruned = sweep.WeightsInInputOrder().to(weight.dtype) * mask;
                    if (sweep.Retries > 0)
                    {
                        raised.Add($"{name} ({sweep.Damping:G3})");
                    }

                    if (sweep.DeadInputs > 0)
                    {
                        dead.Add($"{name} ({sweep.DeadInputs})");
                    }
                }
                else
                {
                    var squares = zeros(k, ScalarType.Float64);
                    LayerInputs.Collect(root, name, layer, k, criterion.CalibrationBatches, criterion.CalibrationBatchSize, context, x => squares.PlusInPlace(x.square().sum(dim: 0)));
                    var scores = WandaScores(weight, squares);
                    mask = pattern is { } p ? MagnitudeMasks.NOfM(scores, p.N, p.M) : PerRow(scores, sparsity);
                    mask = mask.to(weight.dtype);
                    pruned = weight.detach() * mask;
                }

                if (!isfinite(pruned).all().item<bool>())
                {
                    throw new ArgumentException($"{criterion} produced non-finite weights for layer '{name}'; nothing was changed. Give more calibration samples or a larger damping.", "model");
                }

                originals.Add((weight, weight.detach().clone().DetachFromDisposeScope()));
                weight.copy_(pruned.to(weight.device));
                masks.Add(name, weight, mask.to(weight.device));
                context.ReportProgress(CompressionPhase.Applying, (index + 1.0) / order.Count);
            }

            completed = true;
        }
        finally
        {
            if (!completed)
            {
                using var noGrad = no_grad();
                foreach (var (weight, original) in originals)
                {
                    weight.copy_(original);
                }

                masks.Dispose();
            }

            originals.ForEach(o => o.Original.Dispose());
        }

        context.AddNote($"{criterion} pruned {order.Count} Linear layer(s) in call order, each from {criterion.CalibrationBatches} calibration batch(es) of {criterion.CalibrationBatchSize} with the layers before it already pruned");
        if (raised.Count > 0)
        {
            context.AddNote($"SparseGPT raised the Hessian damping (not positive definite) for: {string.Join(", ", raised)}");
        }

        if (dead.Count > 0)
        {
            context.AddNote($"SparseGPT found inputs that were zero in every calibration sample (their weights set to zero as well): {string.Join(", ", dead)}");
        }

        // Layers the calibration data never reaches have no statistics: they are pruned by magnitude.
        var uncalled = targets.Where(t => !order.Contains(t)).ToList();
        foreach (var (name, _, weight) in uncalled)
        {
            using var scope = NewDisposeScope();
            var mask = pattern is { } p ? MagnitudeMasks.NOfM(weight, p.N, p.M) : MagnitudeMasks.TopMagnitude(weight, sparsityOf(name));
            masks.Add(name, weight, mask);
        }

        if (uncalled.Count > 0)
        {
            context.AddNote($"pruned by magnitude (never called on the calibration data, so {criterion} has no statistics): {string.Join(", ", uncalled.Select(t => t.Name))}");
        }

        return masks;
    }

    /// <summary>Wanda's scores |w_ij| · ‖x_j‖₂, float32 [N, K], from the inputs' summed squares per column.</summary>
    /// <param name="weight">The weight [N, K].</param>
    /// <param name="squares">Σ x_j² over the calibration rows, [K].</param>
    /// <returns>The scores (in the caller's dispose scope).</returns>
    public static Tensor WandaScores(Tensor weight, Tensor squares)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var norms = squares.to(ScalarType.Float64).sqrt().to(weight.device);
        return (weight.detach().to(ScalarType.Float64).abs() * norms.unsqueeze(0)).to(ScalarType.Float32).MoveToOuterDisposeScope();
    }

    /// <summary>Per output row, prunes the round(sparsity × K) lowest scores (ties broken by position), as Wanda compares weights within a row.</summary>
    /// <param name="scores">The scores [N, K].</param>
    /// <param name="sparsity">The fraction of each row pruned.</param>
    /// <returns>The mask, 1 kept and 0 pruned, float32 (in the caller's dispose scope).</returns>
    public static Tensor PerRow(Tensor scores, double sparsity)
    {
        using var scope = NewDisposeScope();
        long count = (long)Math.Round(sparsity * scores.shape[1]);
        var mask = ones_like(scores, dtype: ScalarType.Float32);
        if (count > 0)
        {
            var (_, order) = scores.sort(dim: 1, stable: true);
            mask.scatter_(1, order.narrow(1, 0, count), zeros([scores.shape[0], count], ScalarType.Float32, device: scores.device));
        }

        return mask.MoveToOuterDisposeScope();
    }
}
