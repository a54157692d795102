using Microsoft.Extensions.Logging;
using ModelCompression.Distillation;
using ModelCompression.Metrics;
using ModelCompression.Modules;
using ModelCompression.Training;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Pruning;

/// <summary>
/// Unstructured magnitude pruning: zeroes the smallest weights of the selected layers (layer-wise or with one global
/// threshold, to a target or by Han et al.'s quality × std rule, or in an N:M pattern), following a schedule
/// (one-shot, iterative, gradual), fine-tuning with the masks held so pruned weights stay exactly zero. The result
/// carries no masks: plain layers with zeros, or <see cref="SparseLinear"/> layers where they are faster.
/// </summary>
public sealed class MagnitudePruningStep : ICompressionStep, ICompressionStepRequirements
{
    /// <summary>The base name of the step in reports.</summary>
    public const string StepName = "MagnitudePruning";

    private readonly MagnitudePruningOptions _options;

    /// <summary>Initializes a new instance of the <see cref="MagnitudePruningStep"/> class.</summary>
    /// <param name="options">The options; copied.</param>
    /// <exception cref="OptionsValidationException">The options are invalid (every error listed).</exception>
    public MagnitudePruningStep(MagnitudePruningOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        OptionsValidationException.ThrowIfInvalid(typeof(MagnitudePruningOptions), options.Validate());
        _options = options.Clone();
    }

    /// <inheritdoc/>
    public string Name => _options.Criterion is CalibratedPruningCriterion criterion
        ? $"{criterion}({(_options.Pattern is { } nm ? nm.ToString() : $"{_options.Sparsity * 100:0.#}%{(_options.LayerSparsity.Count > 0 ? " with overrides" : string.Empty)}")})"
        : _options.Pattern is { } p
        ? $"{StepName}({p})"
        : _options.Quality is { } q
            ? $"{StepName}(q={q:0.###}, {_options.Schedule})"
            : $"{StepName}({_options.Sparsity * 100:0.#}% {(_options.Scope == PruningScope.Global ? "global" : "layer-wise")}{(_options.LayerSparsity.Count > 0 ? " with overrides" : string.Empty)}, {_options.Schedule})";

    /// <inheritdoc/>
    public bool RequiresTrainingData => _options.FineTuning is not null;

    /// <inheritdoc/>
    /// <exception cref="ArgumentException">
    /// The selection names an unknown layer or selects none, a selected layer has no weight, an override names a
    /// layer that is not selected, or an N:M pattern does not divide a layer's inputs. Nothing has changed.
    /// </exception>
    public nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(context);
        var targets = SelectTargets(model);
        if (_options.FineTuning is not null && context.TrainingData is null)
        {
            throw new InvalidOperationException($"Step '{Name}' fine-tunes and needs training data.");
        }

        var schedule = _options.Schedule;
        // The layers the last masks held at the per-layer floor (every computation replaces it; the last one stands).
        var floored = new Dictionary<string, double>(StringComparer.Ordinal);
        for (int round = 0; round < schedule.Rounds; round++)
        {
            context.CancellationToken.ThrowIfCancellationRequested();
            context.ReportProgress(CompressionPhase.Applying, (double)round / schedule.Rounds);
            using var masks = _options.Criterion is CalibratedPruningCriterion criterion
                ? CalibratedPruning.Prune(model, targets, criterion, name => _options.LayerSparsity.TryGetValue(name, out double own) ? own : _options.Sparsity, _options.Pattern, context)
                : ComputeMasks(targets, final => schedule.RoundSparsity(round, final), round, floored);
            masks.ApplyToWeights();
            context.Logger.LogInformation("{Step}: round {Round} pruned to {Sparsity:P1} sparsity", Name, round + 1, Sparsity(targets));

            if (_options.FineTuning is { } fineTuning)
            {
                var current = masks;
                var callbacks = new TrainingCallbacks
                {
                    BeforeOptimizerStep = _ => current.ApplyToGradients(),
                    AfterOptimizerStep = info =>
                    {
                        current.ApplyToWeights();
                        if (schedule.SparsityDuringTraining(info.Step, info.TotalSteps, _options.Sparsity) is not null)
                        {
                            // Gradual pruning: recompute the masks from the current magnitudes at the scheduled sparsity.
                            using var updated = ComputeMasks(targets, final => schedule.SparsityDuringTraining(info.Step, info.TotalSteps, final) ?? final, round, floored);
                            updated.ApplyToWeights();
                            current.TakeFrom(updated);
                        }
                    },
                };
                context.Train(model, fineTuning, callbacks.WithDistillation(_options.Distillation, context.OriginalModel));
                masks.ApplyToWeights();
            }
        }

        // A gradual schedule whose fine-tuning ended early still leaves the model at the final sparsity.
        if (schedule is GradualPruning)
        {
            using var final = ComputeMasks(targets, f => f, 0, floored);
            final.ApplyToWeights();
        }

        foreach (var (layer, alone) in floored)
        {
            context.Logger.LogWarning(
                "{Step}: the global threshold would keep {Alone:0.0%} of {Layer}; it keeps its largest weights up to the floor of {Floor:0.0#%} instead",
                Name, alone, layer, _options.MinLayerKeptFraction);
        }

        if (floored.Count > 0)
        {
            context.AddNote(
                $"held at the per-layer floor of {_options.MinLayerKeptFraction * 100:0.##}% (the global threshold alone would have kept): " +
                string.Join(", ", floored.Select(f => $"{f.Key} {f.Value * 100:0.0}%")));
        }

        double sparsity = Sparsity(targets);
        context.AddNote($"{sparsity * 100:0.0}% of the selected weights removed ({string.Join(", ", targets.Select(t => $"{t.Name} keeps {(1 - LayerSparsity(t.Weight)) * 100:0.0}%"))})");
        return _options.SparseExecution == SparseExecution.Never ? model : ToSparse(model, targets, context);
    }

    private List<(string Name, nn.Module Module, Parameter Weight)> SelectTargets(nn.Module<Tensor, Tensor> model)
    {
        var selection = _options.Layers;
        selection.ThrowIfUnknownNames(model);

        var targets = new List<(string, nn.Module, Parameter)>();
        foreach (var (name, module) in selection.Select(model))
        {
            var weight = module.named_parameters(recurse: false).FirstOrDefault(p => p.name == "weight").parameter
                ?? throw new ArgumentException($"Layer '{name}' ({module.GetType().Name}) has no weight parameter to prune.", nameof(model));
            if (_options.Criterion is CalibratedPruningCriterion calibrated && module is not Linear)
            {
                throw new ArgumentException(
                    $"{calibrated} prunes Linear layers from their calibration inputs; layer '{name}' is a {module.GetType().Name}. Select Linear layers only (LayerSelection.OfType<Linear>()), or prune it by magnitude in another step.",
                    nameof(model));
            }

            if (_options.Pattern is { } pattern && (weight.dim() < 2 || weight.shape[1] % pattern.M != 0))
            {
                throw new ArgumentException(
                    $"Layer '{name}' has {(weight.dim() < 2 ? 0 : weight.shape[1])} inputs, not a multiple of M = {pattern.M}: the {pattern} pattern cannot apply. Exclude it from the selection.",
                    nameof(model));
            }

            targets.Add((name, module, weight));
        }

        if (targets.Count == 0)
        {
            throw new ArgumentException($"The layer selection ({selection}) selects no layer of the model.", nameof(model));
        }

        var names = targets.Select(t => t.Item1).ToHashSet(StringComparer.Ordinal);
        var strayOverride = _options.LayerSparsity.Keys.FirstOrDefault(k => !names.Contains(k));
        if (strayOverride is not null)
        {
            throw new ArgumentException($"{nameof(MagnitudePruningOptions.LayerSparsity)} names '{strayOverride}', which is not a selected layer.", nameof(model));
        }

        return targets;
    }

    /// <summary>Masks for every target; <paramref name="atFinal"/> maps a layer's final sparsity to the sparsity wanted now.</summary>
    private MaskSet ComputeMasks(IReadOnlyList<(string Name, nn.Module Module, Parameter Weight)> targets, Func<double, double> atFinal, int round, Dictionary<string, double> floored)
    {
        // Filled with the layers this call holds at the per-layer floor, and what the threshold alone would have kept.
        floored.Clear();
        var masks = new MaskSet();
        using var scope = NewDisposeScope();
        if (_options.Pattern is { } pattern)
        {
            foreach (var (name, _, weight) in targets)
            {
                masks.Add(name, weight, MagnitudeMasks.NOfM(weight, pattern.N, pattern.M));
            }

            return masks;
        }

        if (_options.Quality is { } quality)
        {
            // Han's rule over rounds: the quality parameter rises to its final value.
            double q = quality * (round + 1) / _options.Schedule.Rounds;
            foreach (var (name, _, weight) in targets)
            {
                masks.Add(name, weight, MagnitudeMasks.Threshold(weight, q));
            }

            return masks;
        }

        var pooled = new List<(string Name, Parameter Weight)>();
        foreach (var (name, _, weight) in targets)
        {
            if (_options.LayerSparsity.TryGetValue(name, out double own))
            {
                masks.Add(name, weight, MagnitudeMasks.TopMagnitude(weight, atFinal(own)));
            }
            else if (_options.Scope == PruningScope.LayerWise)
            {
                masks.Add(name, weight, MagnitudeMasks.TopMagnitude(weight, atFinal(_options.Sparsity)));
            }
            else
            {
                pooled.Add((name, weight));
            }
        }

        if (pooled.Count > 0)
        {
            var (global, under) = MagnitudeMasks.GlobalWithFloor(pooled.Select(p => (Tensor)p.Weight).ToList(), atFinal(_options.Sparsity), _options.MinLayerKeptFraction);
            for (int i = 0; i < pooled.Count; i++)
            {
                masks.Add(pooled[i].Name, pooled[i].Weight, global[i]);
                if (under[i] is { } alone)
                {
                    floored[pooled[i].Name] = alone;
                }
            }
        }

        return masks;
    }

    private static double LayerSparsity(Tensor weight)
    {
        using var scope = NewDisposeScope();
        return 1 - ((double)weight.count_nonzero().item<long>() / weight.numel());
    }

    private static double Sparsity(IReadOnlyList<(string Name, nn.Module Module, Parameter Weight)> targets)
    {
        using var scope = NewDisposeScope();
        long total = targets.Sum(t => t.Weight.numel());
        long nonzero = targets.Sum(t => t.Weight.count_nonzero().item<long>());
        return 1 - ((double)nonzero / total);
    }

    private nn.Module<Tensor, Tensor> ToSparse(nn.Module<Tensor, Tensor> model, IReadOnlyList<(string Name, nn.Module Module, Parameter Weight)> targets, CompressionContext context)
    {
        var root = model;
        var chosen = new List<string>();
        var skipped = new List<string>();
        foreach (var (name, module, _) in targets)
        {
            if (module is not Linear linear)
            {
                continue;
            }

            // The kernel is for the CPU; elsewhere a sparse layer would rebuild its dense weight on every call.
            string? why = linear.weight!.device_type != DeviceType.CPU ? "not on the CPU" : ModuleTree.WhyCannotReplace(root, name, typeof(SparseLinear));
            if (why is not null)
            {
                skipped.Add($"{name} ({why})");
                continue;
            }

            var sparse = SparseLinear.FromLinear(linear);
            if (_options.SparseExecution == SparseExecution.Auto)
            {
                var (denseTime, sparseTime) = ModelMetrics.MeasureLatencyPaired(linear, sparse, [linear.in_features], new LatencyOptions { Warmup = 5, Repeats = 21 });
                double dense1 = denseTime.Batch1, dense64 = denseTime.Batch64, sparse1 = sparseTime.Batch1, sparse64 = sparseTime.Batch64;
                // A margin keeps the choice stable near the break-even point, where timing noise would decide it.
                bool faster = sparse1 < dense1 * 0.9 && sparse64 <= dense64 * 1.1;
                context.Logger.LogInformation(
                    "{Layer}: dense {Dense1:0.###}/{Dense64:0.###} ms, sparse {Sparse1:0.###}/{Sparse64:0.###} ms at batch 1/64 → {Choice}",
                    name, dense1, dense64, sparse1, sparse64, faster ? "sparse" : "dense");
                if (!faster)
                {
                    sparse.Dispose();
                    continue;
                }
            }

            try
            {
                root = ModuleTree.Replace(root, name, sparse);
            }
            catch
            {
                sparse.Dispose();
                throw;
            }

            linear.Dispose();
            chosen.Add(name);
        }

        context.AddNote(chosen.Count == 0 ? "no layer ran faster sparse; all stay dense" : $"sparse kernel for {string.Join(", ", chosen)}");
        if (skipped.Count > 0)
        {
            // Their zeros are kept, and the file stores them sparse; only the sparse kernel's speed is missed.
            string note = $"kept dense (pruned, zeros stored sparse in the file): {string.Join(", ", skipped)}";
            context.AddNote(note);
            context.Logger.LogWarning("{Step}: {Note}", Name, note);
        }

        return root;
    }

}
