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
/// Structured pruning: removes whole neurons (Linear outputs) and filters (Conv1d and Conv2d output channels) and
/// physically shrinks the model — the layer, its BatchNorm, LayerNorm or GroupNorm, depthwise convolutions, and every
/// layer that reads those channels (including a Linear behind a flatten, and layers reading a concatenation of several
/// layers' channels), with channels that meet at a residual addition removed together. Which channels are coupled is
/// found by tracing one sample through the model; a dependency the tracer cannot resolve is an
/// <see cref="UnsupportedModelException"/> naming the layer, raised before anything changes.
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
    /// <exception cref="UnsupportedModelException">
    /// A channel dependency of a layer to prune cannot be resolved, or a layer that would lose channels cannot be
    /// rebuilt. The exception names the layer; nothing has changed.
    /// </exception>
    /// <exception cref="ArgumentException">
    /// The selection names an unknown layer, or a ratio would leave a group with no channel. Nothing has changed.
    /// </exception>
    public nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(context);
        _options.Layers.ThrowIfUnknownNames(model);

        var stray = _options.LayerRatio.Keys.FirstOrDefault(k => !model.named_modules().Any(m => m.name == k && m.module is Linear or Conv1d or Conv2d));
        if (stray is not null)
        {
            throw new ArgumentException($"{nameof(StructuredPruningOptions.LayerRatio)} names '{stray}', which is not a Linear, Conv1d or Conv2d layer of the model.", nameof(model));
        }

        var root = model;
        var originalChannels = new Dictionary<string, long>(StringComparer.Ordinal);
        var summary = new List<string>();
        var notes = new List<string>();
        for (int round = 1; round <= _options.Rounds; round++)
        {
            context.CancellationToken.ThrowIfCancellationRequested();
            context.ReportProgress(CompressionPhase.Applying, (round - 1.0) / _options.Rounds);
            var plans = Plan(root, context, round, originalChannels, notes);
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
        foreach (var note in notes)
        {
            context.AddNote(note);
        }

        return root;
    }

    private sealed record GroupPlan(ChannelGroup Group, long[] Keep);

    private static long OutChannels(string name, nn.Module module) => module switch
    {
        Linear linear => linear.out_features,
        Convolution conv => conv.out_channels,
        _ => ChannelGroupTracer.Describe(name, module)?.OutputChannels ?? throw new InvalidOperationException($"{module.GetType().Name} produces no channels."),
    };

    private List<GroupPlan> Plan(nn.Module<Tensor, Tensor> model, CompressionContext context, int round, Dictionary<string, long> originalChannels, List<string> notes)
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
                // A producer whose type the selection does not name (a Conv1d under a Linear/Conv2d-only selection)
                // is said out loud: otherwise such a model would come back unchanged without a word.
                var unnamedTypes = group.Producers.Where(p => !_options.Layers.Types.Any(t => t.IsInstanceOfType(p.Module))).ToList();
                if (round == 1 && unnamedTypes.Count > 0)
                {
                    string note = $"{group.Describe()} not pruned: {string.Join(", ", unnamedTypes.Select(p => p.Module.GetType().Name).Distinct())} is not among the selected layer types ({_options.Layers})";
                    context.Logger.LogWarning("{Step}: {Note}", Name, note);
                    notes.Add(note);
                }

                continue;
            }

            if (group.Unresolved is { } unresolved)
            {
                throw Unsupported(group, unresolved);
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

                // A GroupNorm needs the same number of channels in each of its groups.
                long blocks = group.Blocks;
                keep = Math.Max(blocks, (long)Math.Round((double)keep / blocks) * blocks);
                keep = Math.Min(keep, group.Channels);

                if (keep == group.Channels)
                {
                    continue;
                }

                using var scope = NewDisposeScope();
                var scores = zeros(group.Channels, dtype: float32);
                var batchNorms = group.Members
                    .Where(m => m.Role == ChannelRole.PassThrough && m.Module is BatchNorm1d or BatchNorm2d && m.Offset == 0 && m.Width == group.Channels)
                    .Select(m => m.Module)
                    .ToList();
                foreach (var producer in group.Producers)
                {
                    var ctx = new ChannelImportanceContext(producer.Name, producer.Module, batchNorms, taylor?.GetValueOrDefault(producer.Name));
                    var s = _options.Importance.Score(ctx).to(float32).cpu();
                    if (s.shape.Length != 1 || s.shape[0] != group.Channels)
                    {
                        throw new InvalidOperationException($"The importance criterion {_options.Importance} gave {string.Join("x", s.shape)} scores for the {group.Channels} channels of '{producer.Name}'.");
                    }

                    scores.PlusInPlace(s);
                }

                // Keep the highest scores (within each block, when there are blocks); ties go to the lower index, so
                // the choice is deterministic.
                long blockSize = group.Channels / blocks;
                var (_, order) = scores.view(blocks, blockSize).neg().sort(dim: 1, stable: true);
                using var blockScalar = blockSize.ToScalar();
                var chosen = order.narrow(1, 0, keep / blocks).Plus(KeptScalars.Range(blocks, dtype: int64).mul(blockScalar).unsqueeze(1));
                var kept = chosen.flatten().sort().Values.data<long>().ToArray();
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

    private UnsupportedModelException Unsupported(ChannelGroup group, UnresolvedReason reason)
    {
        bool isLayer = !reason.Layer.StartsWith("the ", StringComparison.Ordinal);
        string where = isLayer ? $"layer '{reason.Layer}'{(reason.LayerType is null ? string.Empty : $" ({reason.LayerType})")}" : reason.Layer;
        string producers = string.Join(", ", group.Producers.Select(p => $"\"{p.Name}\""));
        return new UnsupportedModelException(
            isLayer ? reason.Layer : null,
            reason.LayerType,
            $"Structured pruning cannot follow the channels produced by {group.Describe()} at {where}: {reason.Why}. Nothing has been changed. " +
            $"To prune the rest of the model, leave these channels alone by excluding their producers from {nameof(StructuredPruningOptions)}.{nameof(StructuredPruningOptions.Layers)} " +
            $"(e.g. Layers = options.Layers.Except({producers})).");
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
        var sums = producers.ToDictionary(p => p.Name, p => zeros(OutChannels(p.Name, p.Module), dtype: float32).DetachFromDisposeScope());
        var probes = new Dictionary<string, (Tensor Output, Tensor Probe)>();
        var removers = new List<Action>();
        var modes = ModuleModes.Record(model);
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
                    return y.Plus(probe);
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
                    sums[name].PlusInPlace(perSample.abs().mean([0L]).cpu());
                }

                DisposeProbes(probes);
                model.zero_grad();
            }

            foreach (var sum in sums.Values)
            {
                using var count = Math.Max(1, Math.Min(seen, batches)).ToScalar();
                sum.div_(count);
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

            modes.Dispose();
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

    /// <summary>The channels one layer loses: output channels (rows) and input channels or features (columns).</summary>
    private sealed class LayerEdit(nn.Module module)
    {
        public nn.Module Module { get; } = module;

        public long OutWidth { get; private set; } = -1;

        public long InWidth { get; private set; } = -1;

        public HashSet<long> OutRemoved { get; } = [];

        public HashSet<long> InRemoved { get; } = [];

        public long[]? OutKeep => Keep(OutWidth, OutRemoved);

        public long[]? InKeep => Keep(InWidth, InRemoved);

        public void RemoveOut(string name, long width, IEnumerable<long> removed) => OutWidth = Remove(name, OutWidth, width, OutRemoved, removed);

        public void RemoveIn(string name, long width, IEnumerable<long> removed) => InWidth = Remove(name, InWidth, width, InRemoved, removed);

        private static long Remove(string name, long known, long width, HashSet<long> set, IEnumerable<long> removed)
        {
            if (known != -1 && known != width)
            {
                throw new InvalidOperationException($"The channel groups disagree about the width of layer '{name}' ({known} and {width}).");
            }

            set.UnionWith(removed);
            return width;
        }

        private static long[]? Keep(long width, HashSet<long> removed) =>
            removed.Count == 0 ? null : Enumerable.Range(0, (int)width).Select(i => (long)i).Where(i => !removed.Contains(i)).ToArray();
    }

    private static nn.Module<Tensor, Tensor> Rewrite(nn.Module<Tensor, Tensor> root, IReadOnlyList<GroupPlan> plans, CompressionContext context)
    {
        // Gather every layer's removed output and input channels from all groups first (a layer reading a
        // concatenation loses channels of several groups), so that nothing changes before every layer is checked.
        var edits = new Dictionary<string, LayerEdit>(StringComparer.Ordinal);
        foreach (var plan in plans)
        {
            var kept = plan.Keep.ToHashSet();
            var removed = Enumerable.Range(0, (int)plan.Group.Channels).Select(i => (long)i).Where(i => !kept.Contains(i)).ToArray();
            foreach (var member in plan.Group.Members)
            {
                var edit = edits.TryGetValue(member.Name, out var e) ? e : edits[member.Name] = new LayerEdit(member.Module);
                var shifted = removed.Select(c => c + member.Offset);
                switch (member.Role)
                {
                    case ChannelRole.Producer:
                        edit.RemoveOut(member.Name, member.Width, shifted);
                        break;
                    case ChannelRole.PassThrough:
                        edit.RemoveOut(member.Name, member.Width, shifted);
                        if (member.Module is Convolution || ChannelGroupTracer.Describe(member.Name, member.Module) is { Coupling: ChannelCoupling.PerChannel })
                        {
                            // Depthwise or described per channel: its input channels go with its output channels.
                            edit.RemoveIn(member.Name, member.Width, shifted);
                        }

                        break;
                    case ChannelRole.Consumer:
                        // Behind a flatten each channel is a run of Expansion features.
                        long expansion = member.Expansion;
                        edit.RemoveIn(member.Name, member.Width * expansion, shifted.SelectMany(c => Enumerable.Range(0, (int)expansion).Select(i => (c * expansion) + i)));
                        break;
                }
            }
        }

        // Every layer must be replaceable before the first one is replaced.
        foreach (var (name, edit) in edits)
        {
            if (ModuleTree.WhyCannotReplace(root, name, edit.Module.GetType()) is { } why)
            {
                throw new UnsupportedModelException(
                    name,
                    edit.Module.GetType().Name,
                    $"Structured pruning cannot rebuild layer '{name}': {why}. Nothing has been changed. Exclude the layers whose channels reach it from {nameof(StructuredPruningOptions)}.{nameof(StructuredPruningOptions.Layers)}.");
            }
        }

        TorchVisionChannelSettings.Check(root);
        var replacements = new List<(string Name, nn.Module Old, nn.Module<Tensor, Tensor> New)>();
        try
        {
            using (no_grad())
            {
                foreach (var (name, edit) in edits)
                {
                    replacements.Add((name, edit.Module, Shrink(name, edit)));
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

        TorchVisionChannelSettings.Synchronize(root);
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

    private static Tensor Select(Tensor t, int dim, long[]? keep) => keep is null ? t : t.index_select(dim, tensor(keep, device: t.device));

    /// <summary>
    /// A new Linear holding the given output rows and input columns of <paramref name="linear"/> (all when null), with
    /// its bias rows, gradient flags and training mode; shared with <see cref="TransformerPruningStep"/>.
    /// </summary>
    internal static Linear SliceLinear(Linear linear, long[]? outKeep, long[]? inKeep)
    {
        using var scope = NewDisposeScope();
        var w = Select(Select(linear.weight!.detach(), 0, outKeep), 1, inKeep);
        var result = nn.Linear(w.shape[1], w.shape[0], hasBias: linear.bias is not null, device: w.device, dtype: w.dtype);
        CopyWeightAndBias(result.weight!, result.bias, w, linear.weight!, linear.bias, outKeep);
        result.train(linear.training);
        return result;
    }

    private static nn.Module<Tensor, Tensor> Shrink(string name, LayerEdit edit)
    {
        using var scope = NewDisposeScope();
        var module = edit.Module;
        var (outKeep, inKeep) = (edit.OutKeep, edit.InKeep);
        switch (module)
        {
            case Linear linear:
                return SliceLinear(linear, outKeep, inKeep);

            case Conv1d or Conv2d:
            {
                var conv = (Convolution)module;
                bool depthwise = conv.groups > 1;
                var w = Select(conv.weight!.detach(), 0, outKeep);
                if (!depthwise)
                {
                    w = Select(w, 1, inKeep);
                }

                long outChannels = w.shape[0];
                long inChannels = depthwise ? outChannels : w.shape[1];
                long groups = depthwise ? outChannels : 1;
                bool hasBias = conv.bias is not null;
                Convolution result = module is Conv2d
                    ? conv.padding_type is { } paddingType
                        ? nn.Conv2d(inChannels, outChannels, (conv.kernel_size[0], conv.kernel_size[1]), paddingType, (conv.stride[0], conv.stride[1]), (conv.dilation[0], conv.dilation[1]), conv.padding_mode, groups, hasBias, w.device, w.dtype)
                        : nn.Conv2d(inChannels, outChannels, (conv.kernel_size[0], conv.kernel_size[1]), (conv.stride[0], conv.stride[1]), (conv.padding![0], conv.padding![1]), (conv.dilation[0], conv.dilation[1]), conv.padding_mode, groups, hasBias, w.device, w.dtype)
                    : conv.padding_type is { } paddingType1
                        ? nn.Conv1d(inChannels, outChannels, conv.kernel_size[0], paddingType1, conv.stride[0], conv.dilation[0], conv.padding_mode, groups, hasBias, w.device, w.dtype)
                        : nn.Conv1d(inChannels, outChannels, conv.kernel_size[0], conv.stride[0], conv.padding![0], conv.dilation[0], conv.padding_mode, groups, hasBias, w.device, w.dtype);
                CopyWeightAndBias(result.weight!, result.bias, w, conv.weight!, conv.bias, outKeep);
                result.train(conv.training);
                return result;
            }

            case BatchNorm1d or BatchNorm2d:
            {
                var bn = (NormBase)module;
                var (device, dtype) = Placement(module);
                long channels = outKeep?.Length ?? bn.num_features;
                NormBase result = module is BatchNorm2d
                    ? nn.BatchNorm2d(channels, bn.eps, bn.momentum ?? 0.1, bn.affine, bn.track_running_stats, device, dtype)
                    : nn.BatchNorm1d(channels, bn.eps, bn.momentum ?? 0.1, bn.affine, bn.track_running_stats, device, dtype);
                result.momentum = bn.momentum;
                return CopyNormState(module, result, bn.num_features, outKeep);
            }

            case LayerNorm norm:
            {
                // Normalised over the channels and what follows them: the first normalised dimension shrinks.
                var (device, dtype) = Placement(module);
                long[] shape = [outKeep?.Length ?? norm.normalized_shape[0], .. norm.normalized_shape.Skip(1)];
                var result = nn.LayerNorm(shape, norm.eps, norm.elementwise_affine, norm.bias is not null, device, dtype);
                return CopyNormState(module, result, norm.normalized_shape[0], outKeep);
            }

            case GroupNorm norm:
            {
                // The planner kept the same number of channels in every group, so the group count stays.
                var (device, dtype) = Placement(module);
                long channels = outKeep?.Length ?? edit.OutWidth;
                var result = nn.GroupNorm(norm.num_groups, channels, norm.eps, norm.affine, device, dtype);
                return CopyNormState(module, result, edit.OutWidth, outKeep);
            }

            default:
                if (LayerRegistry.Find(module) is { } descriptor && ChannelGroupTracer.Describe(name, module) is { } description)
                {
                    return ShrinkDescribed(name, descriptor, module, description, outKeep, inKeep);
                }

                throw new UnsupportedModelException(name, module.GetType().Name, $"Structured pruning cannot shrink layer '{name}' of type {module.GetType().Name}. Nothing has been changed. Exclude the layers whose channels reach it from {nameof(StructuredPruningOptions)}.{nameof(StructuredPruningOptions.Layers)}.");
        }
    }

    /// <summary>A layer of a kind registered with a channel description, rebuilt by its descriptor and checked.</summary>
    private static nn.Module<Tensor, Tensor> ShrinkDescribed(string name, LayerDescriptor descriptor, nn.Module module, ChannelDescription before, long[]? outKeep, long[]? inKeep)
    {
        var result = descriptor.ShrinkChannels(module, outKeep, inKeep);
        try
        {
            // A descriptor's constructor calls may have put the new tensors in this dispose scope: they must outlive it.
            foreach (var (_, parameter) in result.named_parameters())
            {
                parameter.DetachFromDisposeScope();
            }

            foreach (var (_, buffer) in result.named_buffers())
            {
                buffer.DetachFromDisposeScope();
            }

            long expectedIn = inKeep?.Length ?? before.InputChannels, expectedOut = outKeep?.Length ?? before.OutputChannels;
            var after = result.GetType() == descriptor.ModuleType ? ChannelGroupTracer.Describe(name, result) : null;
            if (result is not nn.Module<Tensor, Tensor> layer || after is null || after.Coupling != before.Coupling || after.InputChannels != expectedIn || after.OutputChannels != expectedOut)
            {
                throw new InvalidOperationException(
                    $"{descriptor.GetType().Name}.{nameof(LayerDescriptor.ShrinkChannels)} returned {(after is null ? $"a {result.GetType().Name} it does not describe" : $"a layer of {after.InputChannels} → {after.OutputChannels} channels")} for layer '{name}', which should have {expectedIn} → {expectedOut} ({before.Coupling}). Nothing has been changed.");
            }

            return layer;
        }
        catch
        {
            if (!ReferenceEquals(result, module))
            {
                result.Dispose();
            }

            throw;
        }
    }

    private static (Device Device, ScalarType DType) Placement(nn.Module module)
    {
        var reference = module.parameters().Cast<Tensor>().Concat(module.buffers()).FirstOrDefault(t => t.is_floating_point());
        return (reference?.device ?? CPU, reference?.dtype ?? ScalarType.Float32);
    }

    /// <summary>Copies a normalisation layer's parameters and buffers into its smaller replacement, slicing every per-channel tensor.</summary>
    private static nn.Module<Tensor, Tensor> CopyNormState(nn.Module old, nn.Module result, long channels, long[]? keep)
    {
        foreach (var (key, p) in old.named_parameters(recurse: false))
        {
            result.named_parameters(recurse: false).First(q => q.name == key).parameter.requires_grad = p.requires_grad;
        }

        var target = result.state_dict();
        foreach (var (key, value) in old.state_dict())
        {
            if (!target.TryGetValue(key, out var destination))
            {
                continue;
            }

            destination.copy_(value.dim() >= 1 && value.shape[0] == channels ? Select(value.detach(), 0, keep) : value.detach());
        }

        result.train(old.training);
        return (nn.Module<Tensor, Tensor>)result;
    }
}
