using Microsoft.Extensions.Logging;
using ModelCompression.Data;
using ModelCompression.Distillation;
using ModelCompression.Training;
using ModelCompression.Modules;
using ModelCompression.Pruning.Structured;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Pruning;

/// <summary>
/// Structured pruning: removes whole neurons (Linear outputs) and filters (Conv2d output channels) and physically
/// shrinks the model — the layer, its BatchNorm, and every layer that reads those channels (including a Linear behind a
/// Flatten), with channels that meet at a residual addition removed together. Which channels are coupled is found by
/// tracing one sample through the model; a dependency the tracer cannot resolve is an exception naming the layer,
/// raised before anything changes.
/// </summary>
public sealed class StructuredPruningStep : ICompressionStep, ICompressionStepRequirements
{
    /// <summary>The base name of the step in reports.</summary>
    public const string StepName = "StructuredPruning";

    private readonly StructuredPruningOptions _options;

    /// <summary>Initializes a new instance of the <see cref="StructuredPruningStep"/> class.</summary>
    /// <param name="options">The options; copied.</param>
    /// <exception cref="OptionsValidationException">The options are invalid (every error listed).</exception>
    public StructuredPruningStep(StructuredPruningOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        OptionsValidationException.ThrowIfInvalid(typeof(StructuredPruningOptions), options.Validate());
        _options = options.Clone();
    }

    /// <inheritdoc/>
    public string Name => $"{StepName}({_options.Ratio * 100:0.#}% of channels, {_options.Importance}{(_options.Rounds > 1 ? $", {_options.Rounds} rounds" : string.Empty)})";

    /// <inheritdoc/>
    public bool RequiresTrainingData => _options.FineTuning is not null || _options.Importance.NeedsTaylorScores;

    /// <inheritdoc/>
    /// <exception cref="ArgumentException">
    /// A channel dependency of a layer to prune cannot be resolved, the selection names an unknown layer, or a ratio
    /// would leave a group with no channel. Nothing has changed.
    /// </exception>
    public nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(context);
        _options.Layers.ThrowIfUnknownNames(model);

        var stray = _options.LayerRatio.Keys.FirstOrDefault(k => !model.named_modules().Any(m => m.name == k && m.module is Linear or Conv2d));
        if (stray is not null)
        {
            throw new ArgumentException($"{nameof(StructuredPruningOptions.LayerRatio)} names '{stray}', which is not a Linear or Conv2d layer of the model.", nameof(model));
        }

        var root = model;
        var originalChannels = new Dictionary<string, long>(StringComparer.Ordinal);
        var summary = new List<string>();
        for (int round = 1; round <= _options.Rounds; round++)
        {
            context.CancellationToken.ThrowIfCancellationRequested();
            context.ReportProgress(CompressionPhase.Applying, (round - 1.0) / _options.Rounds);
            var plans = Plan(root, context, round, originalChannels);
            if (plans.Count == 0)
            {
                break;
            }

            root = Rewrite(root, plans, context);
            summary = plans.Select(p => $"{p.Group.Describe()} {p.Group.Channels}→{p.Keep.Length}").ToList();
            context.Logger.LogInformation("{Step}: round {Round}: {Groups}", Name, round, string.Join(", ", summary));
            if (_options.FineTuning is { } fineTuning)
            {
                context.Train(root, fineTuning, ((TrainingCallbacks?)null).WithDistillation(_options.Distillation, context.OriginalModel));
            }
        }

        context.AddNote(summary.Count == 0 ? "no prunable channel group" : $"channels kept: {string.Join(", ", summary)}");
        return root;
    }

    private sealed record GroupPlan(ChannelGroup Group, long[] Keep);

    private List<GroupPlan> Plan(nn.Module<Tensor, Tensor> model, CompressionContext context, int round, Dictionary<string, long> originalChannels)
    {
        IReadOnlyList<ChannelGroup> groups;
        using (NewDisposeScope())
        {
            var (sample, _) = context.CalibrationData.FirstBatch(1);
            groups = ChannelGroupTracer.Trace(model, sample.to(context.Device));
        }

        var selected = new List<ChannelGroup>();
        foreach (var group in groups)
        {
            if (group.Fixed is not null)
            {
                continue;
            }

            if (!group.Producers.All(p => _options.Layers.Matches(p.Name, p.Module)))
            {
                continue;
            }

            if (group.Unresolved is not null)
            {
                throw new ArgumentException($"Structured pruning cannot prune the channels of {group.Describe()}: {group.Unresolved}. Exclude those layers from the selection.");
            }

            selected.Add(group);
        }

        var taylor = _options.Importance.NeedsTaylorScores ? TaylorScores(model, selected, context) : null;
        var plans = new List<GroupPlan>();
        try
        {
            foreach (var group in selected)
            {
                string key = group.Producers.First().Name;
                if (!originalChannels.TryGetValue(key, out long original))
                {
                    original = group.Channels;
                    originalChannels[key] = original;
                }

                double ratio = group.Producers.Select(p => _options.LayerRatio.TryGetValue(p.Name, out var r) ? r : (double?)null).FirstOrDefault(r => r is not null) ?? _options.Ratio;
                if (Math.Round(original * (1 - ratio)) < 1)
                {
                    // Checked against the final ratio in the first round, before anything changes.
                    throw new ArgumentException($"Pruning {group.Describe()} at ratio {ratio} would remove all of its {original} channels.");
                }

                double removedShare = ratio * round / _options.Rounds;
                long keep = (long)Math.Round(original * (1 - removedShare));
                keep = Math.Max(_options.RoundTo, (long)Math.Round((double)keep / _options.RoundTo) * _options.RoundTo);
                keep = Math.Min(keep, group.Channels);

                if (keep == group.Channels)
                {
                    continue;
                }

                using var scope = NewDisposeScope();
                var scores = zeros(group.Channels, dtype: float32);
                var batchNorms = group.Members.Where(m => m.Role == ChannelRole.PassThrough && m.Module is BatchNorm1d or BatchNorm2d).Select(m => m.Module).ToList();
                foreach (var producer in group.Producers)
                {
                    var ctx = new ChannelImportanceContext(producer.Name, producer.Module, batchNorms, taylor?.GetValueOrDefault(producer.Name));
                    var s = _options.Importance.Score(ctx).to(float32).cpu();
                    if (s.shape.Length != 1 || s.shape[0] != group.Channels)
                    {
                        throw new InvalidOperationException($"The importance criterion {_options.Importance} gave {string.Join("x", s.shape)} scores for the {group.Channels} channels of '{producer.Name}'.");
                    }

                    scores.add_(s);
                }

                // Keep the highest scores; ties go to the lower index, so the choice is deterministic.
                var (_, order) = scores.neg().sort(stable: true);
                var kept = order.narrow(0, 0, keep).sort().Values.data<long>().ToArray();
                plans.Add(new GroupPlan(group, kept));
            }
        }
        finally
        {
            foreach (var t in taylor?.Values ?? Enumerable.Empty<Tensor>())
            {
                t.Dispose();
            }
        }

        return plans;
    }

    /// <summary>
    /// First-order Taylor scores of every producer's output channels: a zero "probe" tensor is added to each producer's
    /// output so that its gradient after backward is the gradient of the loss with respect to that output.
    /// </summary>
    private Dictionary<string, Tensor> TaylorScores(nn.Module<Tensor, Tensor> model, IReadOnlyList<ChannelGroup> groups, CompressionContext context)
    {
        var data = context.TrainingData ?? throw new InvalidOperationException("The Taylor criterion needs training data.");
        int batches = ((TaylorImportance)_options.Importance).Batches;
        var producers = groups.SelectMany(g => g.Producers).DistinctBy(p => p.Name).ToList();
        var sums = producers.ToDictionary(p => p.Name, p => zeros(p.Module is Linear l ? l.out_features : ((Conv2d)p.Module).out_channels, dtype: float32).DetachFromDisposeScope());
        var probes = new Dictionary<string, (Tensor Output, Tensor Probe)>();
        var removers = new List<Action>();
        bool wasTraining = model.training;
        try
        {
            foreach (var producer in producers)
            {
                string name = producer.Name;
                var remover = ((nn.Module<Tensor, Tensor>)producer.Module).register_forward_hook((m, x, y) =>
                {
                    // Layers may run inside their parents' dispose scopes: keep the probe and the activation alive
                    // until the backward pass has filled the probe's gradient (they are disposed after each batch).
                    var probe = zeros_like(y).requires_grad_().DetachFromDisposeScope();
                    probes[name] = (y.detach().DetachFromDisposeScope(), probe);
                    return y + probe;
                });
                removers.Add(remover.remove);
            }

            model.eval();
            int seen = 0;
            foreach (var (input, target) in data.ScopedBatches(64, shuffle: true, seed: context.StepSeed))
            {
                if (seen++ == batches)
                {
                    break;
                }

                context.CancellationToken.ThrowIfCancellationRequested();
                var output = model.call(input.to(context.Device));
                var lossFunction = _options.FineTuning?.Loss ?? ((o, t) => nn.functional.cross_entropy(o, t));
                var loss = lossFunction(output, target.to(context.Device));
                loss.backward();
                using var noGrad = no_grad();
                foreach (var (name, (activation, probe)) in probes)
                {
                    // Per sample: |mean over positions of activation × gradient|; then the mean over the batch.
                    var product = activation * probe.grad!;
                    var positions = Enumerable.Range(2, Math.Max(0, (int)product.dim() - 2)).Select(d => (long)d).ToArray();
                    var perSample = positions.Length == 0 ? product : product.mean(positions);
                    sums[name].add_(perSample.abs().mean([0L]).cpu());
                }

                DisposeProbes(probes);
                model.zero_grad();
            }

            foreach (var sum in sums.Values)
            {
                sum.div_(Math.Max(1, Math.Min(seen, batches)));
            }

            return sums;
        }
        catch
        {
            foreach (var sum in sums.Values)
            {
                sum.Dispose();
            }

            throw;
        }
        finally
        {
            foreach (var remove in removers)
            {
                remove();
            }

            DisposeProbes(probes);
            using (NewDisposeScope())
            {
                model.zero_grad();
            }

            model.train(wasTraining);
        }
    }

    private static void DisposeProbes(Dictionary<string, (Tensor Output, Tensor Probe)> probes)
    {
        foreach (var (output, probe) in probes.Values)
        {
            output.Dispose();
            probe.Dispose();
        }

        probes.Clear();
    }

    private static nn.Module<Tensor, Tensor> Rewrite(nn.Module<Tensor, Tensor> root, IReadOnlyList<GroupPlan> plans, CompressionContext context)
    {
        // Gather every layer's new output and input channels first, so that conflicting plans fail before any change.
        var edits = new Dictionary<string, (nn.Module Module, long[]? Out, long[]? In)>(StringComparer.Ordinal);
        foreach (var plan in plans)
        {
            foreach (var member in plan.Group.Members)
            {
                var (module, outKeep, inKeep) = edits.GetValueOrDefault(member.Name, (member.Module, null, null));
                switch (member.Role)
                {
                    case ChannelRole.Producer:
                    case ChannelRole.PassThrough:
                        if (outKeep is not null && !outKeep.SequenceEqual(plan.Keep))
                        {
                            throw new ArgumentException($"Layer '{member.Name}' would need two different channel selections.");
                        }

                        outKeep = plan.Keep;
                        if (member.Role == ChannelRole.PassThrough && member.Module is Conv2d)
                        {
                            inKeep = plan.Keep;
                        }

                        break;
                    case ChannelRole.Consumer:
                        var expanded = Expand(plan.Keep, member.Expansion);
                        if (inKeep is not null && !inKeep.SequenceEqual(expanded))
                        {
                            throw new ArgumentException($"Layer '{member.Name}' would need two different input channel selections.");
                        }

                        inKeep = expanded;
                        break;
                }

                edits[member.Name] = (module, outKeep, inKeep);
            }
        }

        // Every layer must be replaceable before the first one is replaced.
        foreach (var (name, (module, _, _)) in edits)
        {
            if (ModuleTree.WhyCannotReplace(root, name, module.GetType()) is { } why)
            {
                throw new ArgumentException($"Structured pruning cannot rebuild layer '{name}': {why}.");
            }
        }

        var replacements = new List<(string Name, nn.Module Old, nn.Module<Tensor, Tensor> New)>();
        try
        {
            using (no_grad())
            {
                foreach (var (name, (module, outKeep, inKeep)) in edits)
                {
                    replacements.Add((name, module, Shrink(name, module, outKeep, inKeep)));
                }
            }
        }
        catch
        {
            replacements.ForEach(r => r.New.Dispose());
            throw;
        }

        foreach (var (name, old, replacement) in replacements)
        {
            root = ModuleTree.Replace(root, name, replacement);
            old.Dispose();
        }

        return root;
    }

    /// <summary>Fills a new layer's weight (already sliced) and bias (sliced here), keeping the old ones' requires_grad.</summary>
    private static void CopyWeightAndBias(Parameter weight, Parameter? bias, Tensor slicedWeight, Parameter oldWeight, Parameter? oldBias, long[]? outKeep)
    {
        weight.copy_(slicedWeight);
        weight.requires_grad = oldWeight.requires_grad;
        if (oldBias is not null && bias is not null)
        {
            using var selected = outKeep is null ? oldBias.detach().clone() : oldBias.detach().index_select(0, tensor(outKeep, device: oldBias.device));
            bias.copy_(selected);
            bias.requires_grad = oldBias.requires_grad;
        }
    }

    private static long[] Expand(long[] keep, long expansion) =>
        expansion == 1 ? keep : keep.SelectMany(c => Enumerable.Range(0, (int)expansion).Select(i => (c * expansion) + i)).ToArray();

    private static nn.Module<Tensor, Tensor> Shrink(string name, nn.Module module, long[]? outKeep, long[]? inKeep)
    {
        using var scope = NewDisposeScope();
        Tensor Select(Tensor t, int dim, long[]? keep) => keep is null ? t : t.index_select(dim, tensor(keep, device: t.device));
        switch (module)
        {
            case Linear linear:
            {
                var w = Select(Select(linear.weight!.detach(), 0, outKeep), 1, inKeep);
                var result = nn.Linear(w.shape[1], w.shape[0], hasBias: linear.bias is not null, device: w.device, dtype: w.dtype);
                CopyWeightAndBias(result.weight!, result.bias, w, linear.weight!, linear.bias, outKeep);
                result.train(linear.training);
                return result;
            }

            case Conv2d conv:
            {
                bool depthwise = conv.groups > 1;
                var w = Select(conv.weight!.detach(), 0, outKeep);
                if (!depthwise)
                {
                    w = Select(w, 1, inKeep);
                }

                long outChannels = w.shape[0];
                long inChannels = depthwise ? outChannels : w.shape[1];
                var kernel = (conv.kernel_size[0], conv.kernel_size[1]);
                var stride = (conv.stride[0], conv.stride[1]);
                var dilation = (conv.dilation[0], conv.dilation[1]);
                long groups = depthwise ? outChannels : 1;
                var result = conv.padding_type is { } paddingType
                    ? nn.Conv2d(inChannels, outChannels, kernel, paddingType, stride, dilation, conv.padding_mode, groups, conv.bias is not null, w.device, w.dtype)
                    : nn.Conv2d(inChannels, outChannels, kernel, stride, (conv.padding![0], conv.padding![1]), dilation, conv.padding_mode, groups, conv.bias is not null, w.device, w.dtype);
                CopyWeightAndBias(result.weight!, result.bias, w, conv.weight!, conv.bias, outKeep);
                result.train(conv.training);
                return result;
            }

            case BatchNorm1d or BatchNorm2d:
            {
                var bn = (NormBase)module;
                long channels = outKeep?.Length ?? bn.num_features;
                var reference = bn.parameters().Cast<Tensor>().Concat(bn.buffers()).FirstOrDefault(t => t.is_floating_point());
                var device = reference?.device ?? CPU;
                var dtype = reference?.dtype ?? ScalarType.Float32;
                NormBase result = module is BatchNorm2d
                    ? nn.BatchNorm2d(channels, bn.eps, bn.momentum ?? 0.1, bn.affine, bn.track_running_stats, device, dtype)
                    : nn.BatchNorm1d(channels, bn.eps, bn.momentum ?? 0.1, bn.affine, bn.track_running_stats, device, dtype);
                result.momentum = bn.momentum;
                foreach (var (key, p) in module.named_parameters(recurse: false))
                {
                    result.named_parameters(recurse: false).First(q => q.name == key).parameter.requires_grad = p.requires_grad;
                }

                var target = result.state_dict();
                foreach (var (key, value) in module.state_dict())
                {
                    if (!target.TryGetValue(key, out var destination))
                    {
                        continue;
                    }

                    destination.copy_(value.dim() == 1 && value.shape[0] == bn.num_features ? Select(value.detach(), 0, outKeep) : value.detach());
                }

                result.train(module.training);
                return (nn.Module<Tensor, Tensor>)(nn.Module)result;
            }

            default:
                throw new ArgumentException($"Structured pruning cannot shrink layer '{name}' of type {module.GetType().Name}.");
        }
    }
}
