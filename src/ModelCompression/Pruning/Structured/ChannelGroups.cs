using System.Globalization;
using ModelCompression.Modules;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Pruning.Structured;

/// <summary>How a layer touches a group of coupled channels.</summary>
internal enum ChannelRole
{
    /// <summary>Produces the channels (Linear outputs, convolution output channels): its output rows are removed.</summary>
    Producer,

    /// <summary>Carries the channels through with one parameter per channel (BatchNorm, LayerNorm, GroupNorm, depthwise convolution): sliced alike.</summary>
    PassThrough,

    /// <summary>Reads the channels (Linear inputs, convolution input channels): its input columns are removed.</summary>
    Consumer,
}

/// <summary>One layer's part in a channel group.</summary>
/// <param name="Name">The layer's dotted name.</param>
/// <param name="Module">The layer.</param>
/// <param name="Role">How it touches the group.</param>
/// <param name="Expansion">For consumers behind a Flatten: input features per channel (the spatial size), else 1.</param>
/// <param name="Offset">
/// Where the group's first channel sits in the channel dimension the layer sees (not 0 when the layer reads a
/// concatenation of several groups' channels); producers always have 0.
/// </param>
/// <param name="Width">The number of channels in the channel dimension the layer sees (before <paramref name="Expansion"/>).</param>
internal sealed record GroupMember(string Name, nn.Module Module, ChannelRole Role, long Expansion, long Offset, long Width);

/// <summary>Why a group of channels cannot be pruned: the layer where the tracer lost track, its type, and why.</summary>
/// <param name="Layer">The dotted name of the layer (or a phrase such as "the model's output").</param>
/// <param name="LayerType">The layer's type name, or null.</param>
/// <param name="Why">What the tracer could not follow.</param>
internal sealed record UnresolvedReason(string Layer, string? LayerType, string Why);

/// <summary>
/// A set of channels that must be pruned together: everything one producer's output channels flow into, joined with
/// other producers where their outputs meet (a residual addition).
/// </summary>
internal sealed class ChannelGroup
{
    public ChannelGroup(int id, long channels)
    {
        Id = id;
        Channels = channels;
    }

    public int Id { get; }

    public long Channels { get; }

    public List<GroupMember> Members { get; } = [];

    /// <summary>Gets or sets why the group cannot be pruned (it reaches the model's input or output), or null.</summary>
    public string? Fixed { get; set; }

    /// <summary>Gets or sets the layer whose dependency could not be resolved, with why, or null.</summary>
    public UnresolvedReason? Unresolved { get; set; }

    /// <summary>
    /// Gets or sets the number of equal blocks the channels fall into (a GroupNorm's groups): every block must keep the
    /// same number of channels. 1 when there is no such constraint.
    /// </summary>
    public long Blocks { get; set; } = 1;

    public IEnumerable<GroupMember> Producers => Members.Where(m => m.Role == ChannelRole.Producer);

    public string Describe() => string.Join(" + ", Producers.Select(p => p.Name));
}

/// <summary>
/// Finds which layers' channels are coupled by running one sample through the model with hooks on every leaf layer,
/// matching each layer's input (read before the layer runs, so in-place layers do not hide it) to the output that
/// produced it. An input no layer produced is explained, when it can be, by what models commonly compute between
/// layers: the sum of two earlier outputs (a residual addition, which couples their channels), optionally followed by
/// an activation; an activation of one output; a concatenation along the channel dimension; a flatten; a global
/// pooling. An input that cannot be explained marks every channel group seen so far as unresolved, naming the
/// consuming layer: the step refuses to prune those groups instead of guessing.
/// </summary>
internal static class ChannelGroupTracer
{
    private static readonly HashSet<Type> ElementwiseTypes =
    [
        typeof(ReLU), typeof(ReLU6), typeof(LeakyReLU), typeof(GELU), typeof(SiLU), typeof(Sigmoid), typeof(Tanh),
        typeof(Hardswish), typeof(Hardtanh), typeof(Hardsigmoid), typeof(Mish), typeof(ELU), typeof(SELU), typeof(CELU),
        typeof(Softplus), typeof(Softsign), typeof(LogSigmoid), typeof(Tanhshrink), typeof(Hardshrink), typeof(Softshrink),
        typeof(Dropout), typeof(Dropout1d), typeof(Dropout2d), typeof(Dropout3d), typeof(AlphaDropout), typeof(Identity),
        typeof(MaxPool1d), typeof(MaxPool2d), typeof(MaxPool3d), typeof(AvgPool1d), typeof(AvgPool2d),
        typeof(AdaptiveAvgPool1d), typeof(AdaptiveAvgPool2d), typeof(AdaptiveMaxPool1d), typeof(AdaptiveMaxPool2d),
    ];

    /// <summary>ReLU6's bounds, held for the process (see <see cref="KeptScalars"/>).</summary>
    private static readonly Scalar Relu6Low = 0.ToScalar(), Relu6High = 6.ToScalar();

    /// <summary>Activations models apply outside any layer (e.g. <c>x.add_(identity).relu_()</c>), tried when explaining a tensor.</summary>
    private static readonly (string Name, Func<Tensor, Tensor> Apply)[] Activations =
    [
        ("", t => t),
        ("relu", t => t.relu()),
        ("relu6", t => t.clamp(Relu6Low, Relu6High)),
    ];

    private const int MaxCandidates = 64;

    /// <summary>A channel space: channels that flow together; joined with others (union-find) where tensors are added.</summary>
    private sealed class Space(long channels)
    {
        public Space? Parent;
        public long Channels = channels;
        public bool ModelInput;
        public bool ModelOutput;
        public long Blocks = 1;
        public readonly List<GroupMember> Members = [];
        public UnresolvedReason? Unresolved;

        /// <summary>Why the channels must keep their width although the tracer follows them (an attention reads them).</summary>
        public string? Held;

        public Space Root() => Parent is null ? this : (Parent = Parent.Root());

        public void MarkUnresolved(UnresolvedReason why) => Root().Unresolved ??= why;
    }

    /// <summary>
    /// A tensor seen during the trace: a snapshot of its values, the channel spaces laid end to end along the channel
    /// dimension (one unless it is a concatenation; null for tensors with no channel dimension), behind a flatten the
    /// features per channel, and whether the channels are in the last dimension (a Linear layer's output on a sequence,
    /// [L, N, E] or [N, L, E]) rather than in dimension 1 (a convolution's [N, C, …]; the two agree for 2-D tensors).
    /// </summary>
    private sealed record Seen(Tensor Value, Space[]? Layout, long Expansion, bool Last = false);

    private sealed class TraceState
    {
        public readonly List<Seen> Seen = [];
        public readonly Dictionary<Tensor, Seen> ByObject = new(ReferenceEqualityComparer.Instance);
        public readonly List<Space> Spaces = [];

        public Space NewSpace(long channels)
        {
            var s = new Space(channels);
            Spaces.Add(s);
            return s;
        }

        public Seen Record(Tensor original, Space[]? layout, long expansion, bool last = false)
        {
            var copy = new Seen(original.detach().clone().DetachFromDisposeScope(), layout, expansion, last && original.dim() > 2);
            Seen.Add(copy);
            ByObject[original] = copy;
            return copy;
        }
    }

    public static IReadOnlyList<ChannelGroup> Trace(nn.Module<Tensor, Tensor> model, Tensor sample)
    {
        // A layer whose descriptor describes its channels is traced as one layer, children and all.
        var described = model.named_modules().Where(m => m.name.Length > 0 && Describe(m.name, m.module) is not null).Select(m => m.name).ToList();
        bool Inside(string name) => described.Any(d => name.StartsWith(d + ".", StringComparison.Ordinal));
        var leaves = model.named_modules()
            .Where(m => (!m.module.named_children().Any() || described.Contains(m.name)) && !Inside(m.name))
            .ToList();
        var state = new TraceState();
        var calls = new Dictionary<nn.Module, int>(ReferenceEqualityComparer.Instance);
        var touched = new Dictionary<nn.Module, List<Space>>(ReferenceEqualityComparer.Instance);

        // Inputs resolved by the pre-hooks, per layer, waiting for the layer's output (a stack: a layer may be called again).
        var pending = new Dictionary<nn.Module, Stack<Seen>>(ReferenceEqualityComparer.Instance);
        var removers = new List<Action>();
        Exception? failure = null;

        var modes = ModuleModes.Record(model);
        try
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            model.eval();
            var input = sample.detach().clone();
            Space[]? inputLayout = null;
            if (input.dim() >= 2)
            {
                var inputSpace = state.NewSpace(input.shape[1]);
                inputSpace.ModelInput = true;
                inputLayout = [inputSpace];
            }

            state.Record(input, inputLayout, 1);

            foreach (var (name, module) in leaves)
            {
                if (module is MultiheadAttention attention)
                {
                    removers.Add(HookAttention(name, attention, state, () => failure, ex => failure = ex));
                    continue;
                }

                if (module is not nn.Module<Tensor, Tensor> layer)
                {
                    continue;
                }

                string layerName = name;

                // The input is read before the layer runs: an in-place layer (ReLU(inplace: true)) overwrites it, and the
                // forward hook would see the changed values.
                var preRemover = layer.register_forward_pre_hook((m, x) =>
                {
                    if (failure is null)
                    {
                        try
                        {
                            var source = Resolve(x, layerName, m.GetType().Name, state);
                            (pending.TryGetValue(m, out var stack) ? stack : pending[m] = new Stack<Seen>()).Push(source);
                        }
                        catch (Exception ex)
                        {
                            failure = ex;
                        }
                    }

                    return x;
                });
                removers.Add(preRemover.remove);

                var remover = layer.register_forward_hook((m, x, y) =>
                {
                    if (failure is not null)
                    {
                        return y;
                    }

                    try
                    {
                        int count = calls[m] = calls.GetValueOrDefault(m) + 1;
                        var spacesOfLayer = touched.TryGetValue(m, out var list) ? list : touched[m] = [];
                        var source = pending[m].Pop();
                        var (layout, expansion, last) = Propagate(layerName, m, source, x, y, state, spacesOfLayer);
                        if (count > 1 && m.parameters().Any())
                        {
                            // A layer with weights used twice would need one slicing to fit every group it touches.
                            var why = new UnresolvedReason(layerName, m.GetType().Name, "the layer is called more than once in one forward pass, and its weights would have to fit every place it is used");
                            spacesOfLayer.ForEach(s => s.MarkUnresolved(why));
                        }

                        state.Record(y, layout, expansion, last);
                    }
                    catch (Exception ex)
                    {
                        failure = ex;
                    }

                    return y;
                });
                removers.Add(remover.remove);
            }

            // Modules with children and parameters or buffers of their own use them in code the tracer cannot see:
            // the channels flowing into and out of them are not pruned.
            foreach (var (name, module) in model.named_modules().Prepend(("(the model)", model)).Where(m => m.module.named_children().Any() && !described.Contains(m.name) && !Inside(m.name)))
            {
                if (module is not nn.Module<Tensor, Tensor> container
                    || (!module.named_parameters(recurse: false).Any() && !module.named_buffers(recurse: false).Any()))
                {
                    continue;
                }

                string containerName = name;
                var remover = container.register_forward_hook((m, x, y) =>
                {
                    var why = new UnresolvedReason(containerName, m.GetType().Name, "the module holds parameters or buffers of its own, used outside any layer");
                    foreach (var t in new[] { x, y })
                    {
                        if (state.ByObject.TryGetValue(t, out var s))
                        {
                            foreach (var space in s.Layout ?? [])
                            {
                                space.MarkUnresolved(why);
                            }
                        }
                    }

                    return y;
                });
                removers.Add(remover.remove);
            }

            var output = model.call(input);
            if (failure is not null)
            {
                throw failure;
            }

            var outSeen = Resolve(output, "the model's output", null, state);
            foreach (var space in outSeen.Layout ?? [])
            {
                space.Root().ModelOutput = true;
            }
        }
        finally
        {
            foreach (var remove in removers)
            {
                remove();
            }

            foreach (var s in state.Seen)
            {
                s.Value.Dispose();
            }

            modes.Dispose();
        }

        return BuildGroups(state.Spaces);
    }

    /// <summary>
    /// TorchSharp's <c>MultiheadAttention</c> (native, with a tuple-valued forward): its query, key and value channels
    /// feed projections the tracer does not prune (head pruning is another matter), so they are held, and its output is
    /// a new channel space in the last dimension that nothing may prune either. Layers around it prune as usual, and a
    /// residual addition of its output is explained like any other.
    /// </summary>
    private static Action HookAttention(string name, MultiheadAttention attention, TraceState state, Func<Exception?> failure, Action<Exception> fail)
    {
        var remover = attention.register_forward_hook((m, query, key, value, padding, needWeights, mask, result) =>
        {
            if (failure() is not null)
            {
                return result;
            }

            try
            {
                // The projections' weights fix the width of what they read and of what the attention writes: those
                // channels keep their width (the model's other channels still prune), as the model's input channels do.
                string held = $"it feeds or leaves the attention '{name}', whose projections keep their width";
                foreach (var input in new[] { query, key, value }.Distinct(ReferenceEqualityComparer.Instance).Cast<Tensor>())
                {
                    foreach (var space in Resolve(input, name, nameof(MultiheadAttention), state).Layout ?? [])
                    {
                        space.Root().Held ??= held;
                    }
                }

                var output = result.Item1;
                var produced = state.NewSpace(output.shape[^1]);
                produced.Held = held;
                state.Record(output, [produced], 1, last: true);
            }
            catch (Exception ex)
            {
                fail(ex);
            }

            return result;
        });
        return remover.remove;
    }

    // NaN counts as equal to NaN: a model whose forward yields a NaN somewhere (torchvision's GoogLeNet does, now and
    // then, on its first call here) is still traced by where its tensors came from.
    private static bool Close(Tensor a, Tensor b, double rtol = 1e-5, double atol = 1e-6) =>
        a.dtype == b.dtype && a.shape.SequenceEqual(b.shape) && a.allclose(b, rtol, atol, equal_nan: true);

    /// <summary>Finds where a layer's input (or the model's output) came from; records tensors computed between layers.</summary>
    private static Seen Resolve(Tensor x, string consumer, string? consumerType, TraceState state)
    {
        using var scope = NewDisposeScope();
        var value = x.detach();

        // The same tensor object a layer produced, unchanged since (an in-place op would have changed its values).
        state.ByObject.TryGetValue(x, out var known);
        if (known is not null && Close(known.Value, value))
        {
            return known;
        }

        if (!value.is_floating_point())
        {
            // Token ids and other integer tensors carry no channels: nothing to couple, nothing to compare them with.
            return state.Record(x, null, 1);
        }

        var explained = ExplainSum(value, known, consumer, consumerType, state)
            ?? ExplainScale(value, consumer, consumerType, state)
            ?? ExplainCopy(value, state)
            ?? ExplainFlatten(value, state)
            ?? ExplainPooling(value, state)
            ?? ExplainConcatenation(value, state)
            ?? ExplainSequenceReduction(value, consumer, consumerType, state);
        if (explained is not null)
        {
            // Later readers of the same tensor (a residual identity, a second branch) find it directly.
            return state.Record(x, explained.Value.Layout, explained.Value.Expansion, explained.Value.Last);
        }

        // The tensor may have been computed from anything seen so far: none of those channels may be pruned.
        var why = new UnresolvedReason(consumer, consumerType, "its input is computed outside any layer by code the tracer cannot follow (it understands additions, per-channel scaling, activations, concatenation along the channel dimension, flattening and global pooling of layer outputs)");
        foreach (var space in state.Spaces)
        {
            space.MarkUnresolved(why);
        }

        Space[]? layout = null;
        if (value.dim() >= 2)
        {
            var unknown = state.NewSpace(value.shape[1]);
            unknown.MarkUnresolved(why);
            layout = [unknown];
        }

        return state.Record(x, layout, 1);
    }

    private static List<Seen> Candidates(Func<Seen, bool> fits, TraceState state) =>
        state.Seen.AsEnumerable().Reverse().Where(s => s.Value.is_floating_point() && fits(s)).Take(MaxCandidates).ToList();

    /// <summary>
    /// The sum of two outputs, possibly followed by an activation: a residual addition. Tried even when one output
    /// alone matches: x + 0 (a branch that is exactly zero on this sample) still couples the two branches' channels.
    /// </summary>
    private static (Space[]? Layout, long Expansion, bool Last)? ExplainSum(Tensor value, Seen? known, string consumer, string? consumerType, TraceState state)
    {
        var candidates = Candidates(s => s.Value.shape.SequenceEqual(value.shape), state);

        // An in-place addition (x.add_(identity)) leaves the result in one operand's tensor: try that operand first.
        var pairs = new List<(Seen A, Seen B)>();
        if (known is not null && known.Value.shape.SequenceEqual(value.shape))
        {
            pairs.AddRange(candidates.Where(c => !ReferenceEquals(c, known)).Select(c => (known, c)));
        }

        for (int i = 0; i < candidates.Count; i++)
        {
            for (int j = i + 1; j < candidates.Count; j++)
            {
                pairs.Add((candidates[i], candidates[j]));
            }
        }

        foreach (var (_, activation) in Activations)
        {
            foreach (var (a, b) in pairs)
            {
                using var scope = NewDisposeScope();
                if (!activation(a.Value.Plus(b.Value)).allclose(value, rtol: 1e-4, atol: 1e-5, equal_nan: true))
                {
                    continue;
                }

                if (value.dim() > 2 && a.Last != b.Last)
                {
                    // One operand's channels lie in dimension 1, the other's in the last: nothing to couple, nothing pruned.
                    var why = new UnresolvedReason(consumer, consumerType, "its input adds two tensors whose channels lie in different dimensions");
                    MarkEach(a.Layout, why);
                    MarkEach(b.Layout, why);
                    // The side in the last dimension came from a Linear layer; the other is one the tracer could not place.
                    return (a.Last ? a.Layout : b.Layout, 1, true);
                }

                // Both operands' channels meet here and must be pruned together.
                return (Join(a, b, consumer, consumerType), a.Expansion, a.Last);
            }
        }

        return null;
    }

    /// <summary>
    /// An output scaled per channel by another output of shape [N, C, 1, …]: a squeeze-excitation block's
    /// <c>scale * input</c>. The scale's channels and the input's are the same channels and are pruned together.
    /// </summary>
    private static (Space[]? Layout, long Expansion, bool Last)? ExplainScale(Tensor value, string consumer, string? consumerType, TraceState state)
    {
        if (value.dim() < 3)
        {
            return null;
        }

        var inputs = Candidates(s => s.Value.shape.SequenceEqual(value.shape) && s.Expansion == 1 && !s.Last, state);
        var scales = Candidates(
            s => s.Value.dim() == value.dim() && s.Value.shape[0] == value.shape[0] && s.Value.shape[1] == value.shape[1]
                && s.Value.shape.Skip(2).All(d => d == 1) && s.Expansion == 1 && !s.Last,
            state);
        foreach (var scale in scales)
        {
            foreach (var input in inputs)
            {
                using var scope = NewDisposeScope();
                if ((input.Value * scale.Value).allclose(value, rtol: 1e-4, atol: 1e-5, equal_nan: true))
                {
                    return (Join(input, scale, consumer, consumerType), 1, false);
                }
            }
        }

        return null;
    }

    private static Space[]? Join(Seen a, Seen b, string consumer, string? consumerType)
    {
        if (a.Layout is null || b.Layout is null)
        {
            return a.Layout ?? b.Layout;
        }

        if (a.Expansion != b.Expansion || a.Layout.Length != b.Layout.Length
            || a.Layout.Zip(b.Layout).Any(p => p.First.Root().Channels != p.Second.Root().Channels))
        {
            // Channels laid out differently on the two sides: nothing can be pruned on either.
            var why = new UnresolvedReason(consumer, consumerType, "its input adds two tensors whose channels are laid out differently");
            foreach (var s in a.Layout.Concat(b.Layout))
            {
                s.MarkUnresolved(why);
            }

            return a.Layout;
        }

        for (int i = 0; i < a.Layout.Length; i++)
        {
            Union(a.Layout[i], b.Layout[i]);
        }

        return a.Layout;
    }

    private static void Union(Space first, Space second)
    {
        var ra = first.Root();
        var rb = second.Root();
        if (ReferenceEquals(ra, rb))
        {
            return;
        }

        rb.Parent = ra;
        ra.ModelInput |= rb.ModelInput;
        ra.ModelOutput |= rb.ModelOutput;
        ra.Unresolved ??= rb.Unresolved;
        ra.Held ??= rb.Held;
        ra.Blocks = Lcm(ra.Blocks, rb.Blocks);
        ra.Members.AddRange(rb.Members);
        rb.Members.Clear();
    }

    private static long Lcm(long a, long b)
    {
        long x = a, y = b;
        while (y != 0)
        {
            (x, y) = (y, x % y);
        }

        return a / x * b;
    }

    /// <summary>A copy of one output, or an activation of it (e.g. <c>functional.relu(x)</c>).</summary>
    private static (Space[]? Layout, long Expansion, bool Last)? ExplainCopy(Tensor value, TraceState state)
    {
        var candidates = Candidates(s => s.Value.shape.SequenceEqual(value.shape), state);
        foreach (var (_, activation) in Activations)
        {
            foreach (var c in candidates)
            {
                using var scope = NewDisposeScope();
                if (activation(c.Value).allclose(value, rtol: 1e-5, atol: 1e-6, equal_nan: true))
                {
                    return (c.Layout, c.Expansion, c.Last);
                }
            }
        }

        return null;
    }

    /// <summary><c>x.flatten(1)</c> of an output with spatial dimensions: each channel becomes a run of features.</summary>
    private static (Space[]? Layout, long Expansion, bool Last)? ExplainFlatten(Tensor value, TraceState state)
    {
        if (value.dim() != 2)
        {
            return null;
        }

        var candidates = Candidates(s => s.Value.dim() > 2 && !s.Last && s.Value.shape[0] == value.shape[0] && s.Value.numel() == value.numel(), state);
        foreach (var c in candidates)
        {
            using var scope = NewDisposeScope();
            if (c.Value.reshape(value.shape).allclose(value, rtol: 1e-5, atol: 1e-6, equal_nan: true))
            {
                long spatial = c.Value.shape.Skip(2).Aggregate(1L, (p, d) => p * d);
                return (c.Layout, c.Expansion * spatial, false);
            }
        }

        return null;
    }

    /// <summary>A global average or max pooling (<c>functional.adaptive_avg_pool2d(x, 1)</c>): channels unchanged.</summary>
    private static (Space[]? Layout, long Expansion, bool Last)? ExplainPooling(Tensor value, TraceState state)
    {
        if (value.dim() < 3 || value.shape.Skip(2).Any(d => d != 1))
        {
            return null;
        }

        var candidates = Candidates(
            s => s.Value.dim() == value.dim() && s.Value.shape[0] == value.shape[0] && s.Value.shape[1] == value.shape[1] && s.Expansion == 1 && !s.Last,
            state);
        long[] spatial = Enumerable.Range(2, (int)value.dim() - 2).Select(d => (long)d).ToArray();
        foreach (var c in candidates)
        {
            using var scope = NewDisposeScope();
            if (c.Value.mean(spatial, keepdim: true).allclose(value, rtol: 1e-4, atol: 1e-5, equal_nan: true)
                || c.Value.amax(spatial, keepdim: true).allclose(value, rtol: 1e-5, atol: 1e-6, equal_nan: true))
            {
                return (c.Layout, 1, false);
            }
        }

        return null;
    }

    /// <summary>
    /// <c>torch.cat(outputs, 1)</c>: consecutive slices of the channel dimension, each one earlier output (an Inception
    /// block's branches). The concatenation's channels are those outputs' channel spaces laid end to end.
    /// </summary>
    private static (Space[]? Layout, long Expansion, bool Last)? ExplainConcatenation(Tensor value, TraceState state)
    {
        if (value.dim() < 2)
        {
            return null;
        }

        bool SameExceptChannels(Tensor t) =>
            t.dim() == value.dim() && t.shape[1] < value.shape[1] && t.shape.Select((d, i) => i == 1 || d == value.shape[i]).All(b => b);

        var candidates = Candidates(s => s.Layout is not null && !s.Last && SameExceptChannels(s.Value), state);
        var layout = new List<Space>();
        long expansion = -1;
        long offset = 0;
        while (offset < value.shape[1])
        {
            Seen? piece = null;
            foreach (var c in candidates)
            {
                long width = c.Value.shape[1];
                if (offset + width > value.shape[1] || (expansion != -1 && c.Expansion != expansion))
                {
                    continue;
                }

                using var scope = NewDisposeScope();
                if (value.narrow(1, offset, width).allclose(c.Value, rtol: 1e-5, atol: 1e-6, equal_nan: true))
                {
                    piece = c;
                    break;
                }
            }

            if (piece is null)
            {
                return null;
            }

            expansion = piece.Expansion;
            layout.AddRange(piece.Layout!);
            offset += piece.Value.shape[1];
        }

        return layout.Count < 2 ? null : (layout.ToArray(), expansion, false);
    }

    /// <summary>
    /// One position of a sequence (<c>x[-1]</c>, <c>x[:, 0]</c>) or its mean or maximum over positions, from an output
    /// whose channels are in the last dimension, or from the sum of two such outputs (a transformer's last residual
    /// addition, read only through the pooling): the channels are unchanged.
    /// </summary>
    private static (Space[]? Layout, long Expansion, bool Last)? ExplainSequenceReduction(Tensor value, string consumer, string? consumerType, TraceState state)
    {
        var candidates = Candidates(
            s => s.Last && s.Layout is not null && s.Value.dim() == value.dim() + 1 && s.Value.shape[^1] == value.shape[^1],
            state);

        bool Reduces(Tensor t)
        {
            for (long d = 0; d < t.dim() - 1; d++)
            {
                using var scope = NewDisposeScope();
                if (t.shape.Where((_, i) => i != d).SequenceEqual(value.shape)
                    && (t.select(d, -1).allclose(value, rtol: 1e-5, atol: 1e-6, equal_nan: true)
                        || t.select(d, 0).allclose(value, rtol: 1e-5, atol: 1e-6, equal_nan: true)
                        || t.mean([d]).allclose(value, rtol: 1e-4, atol: 1e-5, equal_nan: true)
                        || t.amax([d]).allclose(value, rtol: 1e-5, atol: 1e-6, equal_nan: true)))
                {
                    return true;
                }
            }

            return false;
        }

        foreach (var c in candidates)
        {
            if (Reduces(c.Value))
            {
                return (c.Layout, 1, value.dim() > 2);
            }
        }

        for (int i = 0; i < candidates.Count; i++)
        {
            for (int j = i + 1; j < candidates.Count; j++)
            {
                var (a, b) = (candidates[i], candidates[j]);
                if (!a.Value.shape.SequenceEqual(b.Value.shape))
                {
                    continue;
                }

                using var scope = NewDisposeScope();
                if (Reduces(a.Value.Plus(b.Value)))
                {
                    return (Join(a, b, consumer, consumerType), 1, value.dim() > 2);
                }
            }
        }

        return null;
    }

    private static (Space[]? Layout, long Expansion, bool Last) Propagate(string name, nn.Module module, Seen source, Tensor x, Tensor y, TraceState state, List<Space> touched)
    {
        var (result, expansion, last) = PropagateOnce(name, module, source, x, y, state);
        touched.AddRange(source.Layout ?? []);
        touched.AddRange(result ?? []);
        return (result, expansion, last);
    }

    /// <summary>Adds a member to every segment of a layout, with the segment's offset in the layer's channel dimension.</summary>
    private static void AddToEach(Space[] layout, string name, nn.Module module, ChannelRole role, long expansion)
    {
        long width = layout.Sum(s => s.Root().Channels);
        long offset = 0;
        foreach (var segment in layout)
        {
            var root = segment.Root();
            root.Members.Add(new GroupMember(name, module, role, expansion, offset, width));
            offset += root.Channels;
        }
    }

    private static void MarkEach(Space[]? layout, UnresolvedReason why)
    {
        foreach (var s in layout ?? [])
        {
            s.MarkUnresolved(why);
        }
    }

    private static Space[] Produce(string name, nn.Module module, long channels, TraceState state)
    {
        var produced = state.NewSpace(channels);
        produced.Members.Add(new GroupMember(name, module, ChannelRole.Producer, 1, 0, channels));
        return [produced];
    }

    private static (Space[]? Layout, long Expansion, bool Last) PropagateOnce(string name, nn.Module module, Seen source, Tensor x, Tensor y, TraceState state)
    {
        var layout = source.Layout;
        UnresolvedReason Why(string why) => new(name, module.GetType().Name, why);
        var description = module is Linear or Convolution or BatchNorm1d or BatchNorm2d or LayerNorm or GroupNorm or Flatten ? null : Describe(name, module);
        if (description is not null)
        {
            return PropagateDescribed(name, module, description, source, x, y, state);
        }

        if (source.Last && x.dim() > 2 && module is not (Linear or LayerNorm) && !(ElementwiseTypes.Contains(module.GetType()) && x.shape.SequenceEqual(y.shape)))
        {
            // A convolution, BatchNorm, flatten… reads channels in dimension 1, where this tensor has sequence positions.
            MarkEach(layout, Why("the layer reads channels in dimension 1, and its input's channels are in the last dimension"));
            layout = null;
        }

        switch (module)
        {
            case Linear linear:
                if (layout is not null && (x.dim() == 2 || source.Last))
                {
                    AddToEach(layout, name, module, ChannelRole.Consumer, source.Expansion);
                }
                else
                {
                    MarkEach(layout, Why($"the layer reads a {x.dim()}-D input whose last dimension is not the channel dimension"));
                }

                // On a sequence ([L, N, E] or [N, L, E]) its output's channels are in the last dimension.
                return (Produce(name, module, linear.out_features, state), 1, y.dim() > 2);

            case Conv1d or Conv2d when ((Convolution)module).groups == 1:
                if (layout is not null)
                {
                    if (source.Expansion != 1)
                    {
                        MarkEach(layout, Why("the layer reads a flattened tensor"));
                    }

                    AddToEach(layout, name, module, ChannelRole.Consumer, 1);
                }

                return (Produce(name, module, ((Convolution)module).out_channels, state), 1, false);

            case Conv1d or Conv2d when ((Convolution)module) is var conv && conv.groups == conv.in_channels && conv.out_channels == conv.in_channels:
                // Depthwise: channel c in → channel c out, with its own filter.
                if (layout is not null)
                {
                    AddToEach(layout, name, module, ChannelRole.PassThrough, 1);
                }

                return (layout, source.Expansion, false);

            case Conv1d or Conv2d:
                MarkEach(layout, Why("the layer is a grouped convolution, which couples channels in blocks"));

                // Its output channels come in blocks too: they are not pruned, and their readers keep them all.
                return (layout is null ? null : [state.NewSpace(y.shape[1])], 1, false);

            case BatchNorm1d or BatchNorm2d:
                if (source.Expansion != 1)
                {
                    // One BatchNorm feature per flattened position, not per channel.
                    MarkEach(layout, Why("the layer normalises a flattened tensor (one feature per position, not per channel)"));
                }

                if (layout is not null)
                {
                    AddToEach(layout, name, module, ChannelRole.PassThrough, 1);
                }

                return (layout, source.Expansion, false);

            case LayerNorm norm when source.Last && x.dim() > 2:
                if (norm.normalized_shape.Length != 1)
                {
                    MarkEach(layout, Why("the layer normalises over the channels and positions of a sequence"));
                }
                else if (layout is not null)
                {
                    // A transformer's LayerNorm over the last dimension: one weight per channel, sliced with them.
                    AddToEach(layout, name, module, ChannelRole.PassThrough, 1);
                }

                return (layout, source.Expansion, true);

            case LayerNorm norm:
            {
                long first = x.dim() - norm.normalized_shape.Length;
                if (first >= 2)
                {
                    // Normalises within each channel: the channels pass through untouched.
                    return (layout, source.Expansion, false);
                }

                if (first != 1 || source.Expansion != 1)
                {
                    MarkEach(layout, Why(first != 1 ? "the layer normalises over the batch dimension" : "the layer normalises a flattened tensor"));
                }

                if (layout is not null)
                {
                    // Over the channels (and what follows them): one weight per channel (row), sliced with them.
                    AddToEach(layout, name, module, ChannelRole.PassThrough, 1);
                }

                return (layout, source.Expansion, false);
            }

            case GroupNorm norm:
                if (layout is not null)
                {
                    if (layout.Length != 1 || source.Expansion != 1)
                    {
                        MarkEach(layout, Why("the layer normalises a concatenated or flattened tensor in groups"));
                    }
                    else
                    {
                        // Each group must keep the same number of channels for GroupNorm to apply.
                        var root = layout[0].Root();
                        root.Blocks = Lcm(root.Blocks, norm.num_groups);
                    }

                    AddToEach(layout, name, module, ChannelRole.PassThrough, 1);
                }

                return (layout, source.Expansion, false);

            case Flatten flatten:
            {
                long end = flatten.end_dim < 0 ? x.dim() + flatten.end_dim : flatten.end_dim;
                if (x.dim() > 2 && flatten.start_dim == 1 && end == x.dim() - 1)
                {
                    return (layout, source.Expansion * x.shape.Skip(2).Aggregate(1L, (p, d) => p * d), false);
                }

                if (x.dim() == 2)
                {
                    return (layout, source.Expansion, false);
                }

                MarkEach(layout, Why($"the layer flattens dimensions {flatten.start_dim}..{flatten.end_dim}, which the tracer does not map"));
                return (null, 1, false);
            }

            default:
                if (source.Last && x.dim() > 2 && layout is not null)
                {
                    // An activation or dropout between a transformer's Linear layers.
                    return (layout, source.Expansion, true);
                }

                if (ElementwiseTypes.Contains(module.GetType()) && x.dim() == y.dim() && (x.dim() < 2 || x.shape[1] == y.shape[1]))
                {
                    return (layout, source.Expansion, false);
                }

                // Anything else (softmax over channels, shuffles, custom layers) may mix channels in ways the tracer
                // cannot know: its groups are not pruned.
                var unknownWhy = Why($"the layer's effect on channels is unknown (a {nameof(LayerDescriptor)} registered for it can say, with {nameof(LayerDescriptor.DescribeChannels)})");
                MarkEach(layout, unknownWhy);
                if (y.dim() < 2)
                {
                    return (null, 1, false);
                }

                var unknown = state.NewSpace(y.shape[1]);
                unknown.MarkUnresolved(unknownWhy);
                return ([unknown], 1, false);
        }
    }

    /// <summary>The channels a layer's registered descriptor describes, checked for consistency; null when it does not describe them.</summary>
    internal static ChannelDescription? Describe(string name, nn.Module module)
    {
        if (LayerRegistry.Find(module) is not { } descriptor || descriptor.DescribeChannels(module) is not { } description)
        {
            return null;
        }

        return description.Problem() is { } problem
            ? throw new InvalidOperationException($"{descriptor.GetType().Name}.{nameof(LayerDescriptor.DescribeChannels)} is inconsistent for layer '{name}' ({module.GetType().Name}): {problem}.")
            : description;
    }

    /// <summary>A layer its descriptor describes: per channel (a pass-through) or dense (a consumer and a producer).</summary>
    private static (Space[]? Layout, long Expansion, bool Last) PropagateDescribed(string name, nn.Module module, ChannelDescription description, Seen source, Tensor x, Tensor y, TraceState state)
    {
        var layout = source.Layout;
        bool last = source.Last && x.dim() > 2;
        long? read = x.dim() >= 2 ? (last ? x.shape[^1] : x.shape[1]) : null;
        long? written = y.dim() >= 2 ? (last ? y.shape[^1] : y.shape[1]) : null;
        if (read != description.InputChannels || written != description.OutputChannels)
        {
            string dimension = last ? "the last dimension" : "dimension 1";
            var mismatch = new UnresolvedReason(
                name,
                module.GetType().Name,
                $"its descriptor gives {description.InputChannels} input and {description.OutputChannels} output channels, but the layer read {read?.ToString(CultureInfo.InvariantCulture) ?? "no"} and wrote {written?.ToString(CultureInfo.InvariantCulture) ?? "no"} channels in {dimension}");
            MarkEach(layout, mismatch);
            if (written is not { } width)
            {
                return (null, 1, false);
            }

            var unknown = state.NewSpace(width);
            unknown.MarkUnresolved(mismatch);
            return ([unknown], 1, last);
        }

        if (description.Coupling == ChannelCoupling.PerChannel)
        {
            if (source.Expansion != 1)
            {
                MarkEach(layout, new UnresolvedReason(name, module.GetType().Name, "the layer works per channel on a flattened tensor (one feature per position, not per channel)"));
            }

            if (layout is not null)
            {
                AddToEach(layout, name, module, ChannelRole.PassThrough, 1);
            }

            return (layout, source.Expansion, last);
        }

        if (layout is not null)
        {
            AddToEach(layout, name, module, ChannelRole.Consumer, source.Expansion);
        }

        return (Produce(name, module, description.OutputChannels, state), 1, last);
    }

    private static List<ChannelGroup> BuildGroups(List<Space> spaces)
    {
        var groups = new List<ChannelGroup>();
        foreach (var root in spaces.Where(s => s.Parent is null))
        {
            if (!root.Members.Any(m => m.Role == ChannelRole.Producer))
            {
                continue;
            }

            var group = new ChannelGroup(groups.Count, root.Channels)
            {
                Fixed = root.ModelInput ? "it carries the model's input channels" : root.ModelOutput ? "it carries the model's output" : root.Held,
                Unresolved = root.Unresolved,
                Blocks = root.Blocks,
            };
            group.Members.AddRange(root.Members.DistinctBy(m => (m.Name, m.Role, m.Offset)));
            groups.Add(group);
        }

        return groups;
    }
}
