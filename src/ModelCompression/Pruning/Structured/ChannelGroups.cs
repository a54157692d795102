using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Pruning.Structured;

/// <summary>How a layer touches a group of coupled channels.</summary>
internal enum ChannelRole
{
    /// <summary>Produces the channels (Linear outputs, Conv2d output channels): its output rows are removed.</summary>
    Producer,

    /// <summary>Carries the channels through with one parameter per channel (BatchNorm, depthwise Conv2d): sliced alike.</summary>
    PassThrough,

    /// <summary>Reads the channels (Linear inputs, Conv2d input channels): its input columns are removed.</summary>
    Consumer,
}

/// <summary>One layer's part in a channel group.</summary>
/// <param name="Name">The layer's dotted name.</param>
/// <param name="Module">The layer.</param>
/// <param name="Role">How it touches the group.</param>
/// <param name="Expansion">For consumers behind a Flatten: input features per channel (the spatial size), else 1.</param>
internal sealed record GroupMember(string Name, nn.Module Module, ChannelRole Role, long Expansion = 1);

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
    public string? Unresolved { get; set; }

    public IEnumerable<GroupMember> Producers => Members.Where(m => m.Role == ChannelRole.Producer);

    public string Describe() => string.Join(" + ", Producers.Select(p => p.Name));
}

/// <summary>
/// Finds which layers' channels are coupled by running one sample through the model with hooks on every leaf layer,
/// matching each layer's input to the output that produced it. An input no layer produced is explained, when it can
/// be, as the sum of two earlier outputs (a residual addition, which couples their channels) or a copy of one; an
/// input that cannot be explained is a dependency the tracer cannot resolve, reported with the consuming layer's name.
/// </summary>
internal static class ChannelGroupTracer
{
    private static readonly HashSet<Type> ElementwiseTypes =
    [
        typeof(ReLU), typeof(ReLU6), typeof(LeakyReLU), typeof(GELU), typeof(SiLU), typeof(Sigmoid), typeof(Tanh),
        typeof(Hardswish), typeof(Hardtanh), typeof(Mish), typeof(ELU), typeof(Dropout), typeof(Dropout2d), typeof(Identity),
        typeof(MaxPool2d), typeof(AvgPool2d), typeof(AdaptiveAvgPool2d), typeof(AdaptiveMaxPool2d), typeof(MaxPool1d), typeof(AvgPool1d),
    ];

    private sealed class Space(long channels)
    {
        public Space? Parent;
        public long Channels = channels;
        public bool ModelInput;
        public bool ModelOutput;
        public readonly List<GroupMember> Members = [];
        public string? Unresolved;

        public Space Root() => Parent is null ? this : (Parent = Parent.Root());

        public void MarkUnresolved(string why) => Root().Unresolved ??= why;
    }

    /// <summary>A tensor seen during the trace: its channel space (dim 1) and, behind a Flatten, the expansion.</summary>
    private sealed record Seen(Tensor Value, Space? Space, long Expansion);

    public static IReadOnlyList<ChannelGroup> Trace(nn.Module<Tensor, Tensor> model, Tensor sample)
    {
        var leaves = model.named_modules().Where(m => !m.module.named_children().Any()).ToList();
        var seen = new List<Seen>();
        var byObject = new Dictionary<Tensor, Seen>(ReferenceEqualityComparer.Instance);
        var touched = new Dictionary<nn.Module, List<Space>>(ReferenceEqualityComparer.Instance);
        var removers = new List<Action>();
        var spaces = new List<Space>();
        Exception? failure = null;

        Space NewSpace(long channels)
        {
            var s = new Space(channels);
            spaces.Add(s);
            return s;
        }

        Seen Record(Tensor original, Space? space, long expansion)
        {
            var copy = new Seen(original.detach().clone().DetachFromDisposeScope(), space, expansion);
            seen.Add(copy);
            byObject[original] = copy;
            return copy;
        }

        bool wasTraining = model.training;
        try
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            model.eval();
            var input = sample.detach().clone();
            var inputSpace = input.dim() >= 2 ? NewSpace(input.shape[1]) : null;
            if (inputSpace is not null)
            {
                inputSpace.ModelInput = true;
            }

            Record(input, inputSpace, 1);

            foreach (var (name, module) in leaves)
            {
                if (module is not nn.Module<Tensor, Tensor> layer)
                {
                    continue;
                }

                string layerName = name;
                var remover = layer.register_forward_hook((m, x, y) =>
                {
                    if (failure is not null)
                    {
                        return y;
                    }

                    try
                    {
                        bool again = touched.ContainsKey(m);
                        var spacesOfLayer = touched.TryGetValue(m, out var list) ? list : touched[m] = [];
                        var source = Resolve(x, layerName, seen, byObject, NewSpace);
                        var (space, expansion) = Propagate(layerName, m, source, x, y, NewSpace, spacesOfLayer);
                        if (again && m.parameters().Any())
                        {
                            // A layer used twice would need one slicing to fit every group it touches.
                            spacesOfLayer.ForEach(s => s.MarkUnresolved($"'{layerName}' is called more than once"));
                        }

                        Record(y, space, expansion);
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
            foreach (var (name, module) in model.named_modules().Prepend(("(the model)", model)).Where(m => m.module.named_children().Any()))
            {
                if (module is not nn.Module<Tensor, Tensor> container
                    || (!module.named_parameters(recurse: false).Any() && !module.named_buffers(recurse: false).Any()))
                {
                    continue;
                }

                string containerName = name;
                var remover = container.register_forward_hook((m, x, y) =>
                {
                    string why = $"'{containerName}' ({m.GetType().Name}) holds parameters of its own, used outside any layer";
                    foreach (var t in new[] { x, y })
                    {
                        if (byObject.TryGetValue(t, out var s))
                        {
                            s.Space?.MarkUnresolved(why);
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

            var outSeen = Resolve(output, "the model's output", seen, byObject, NewSpace);
            if (outSeen.Space is { } outSpace)
            {
                outSpace.Root().ModelOutput = true;
            }
        }
        finally
        {
            foreach (var remove in removers)
            {
                remove();
            }

            foreach (var s in seen)
            {
                s.Value.Dispose();
            }

            model.train(wasTraining);
        }

        return BuildGroups(spaces);
    }

    private static Seen Resolve(Tensor x, string consumer, List<Seen> seen, Dictionary<Tensor, Seen> byObject, Func<long, Space> newSpace)
    {
        using var scope = NewDisposeScope();
        var value = x.detach();

        // The same tensor object a layer produced, unchanged since (an in-place op would have changed its values).
        if (byObject.TryGetValue(x, out var known) && known.Value.shape.SequenceEqual(value.shape) && known.Value.allclose(value, rtol: 1e-5, atol: 1e-6))
        {
            return known;
        }

        var candidates = seen.Where(s => s.Value.shape.SequenceEqual(value.shape)).Reverse().Take(64).ToList();
        Seen? copy = candidates.FirstOrDefault(c => c.Value.allclose(value, rtol: 1e-5, atol: 1e-6));

        // Look for a sum of two outputs even when one output alone matches: x + 0 (a branch that is exactly zero on
        // this sample) still couples the two branches' channels.
        for (int i = 0; i < candidates.Count; i++)
        {
            for (int j = i + 1; j < candidates.Count; j++)
            {
                if ((candidates[i].Value + candidates[j].Value).allclose(value, rtol: 1e-4, atol: 1e-5))
                {
                    // A residual addition: both operands' channels meet here and must be pruned together.
                    var a = candidates[i];
                    var b = candidates[j];
                    if (a.Expansion != b.Expansion || (a.Space is null) != (b.Space is null))
                    {
                        throw new Unresolvable(consumer, "its input adds two tensors laid out differently");
                    }

                    if (a.Space is not null && b.Space is not null)
                    {
                        var ra = a.Space.Root();
                        var rb = b.Space.Root();
                        if (!ReferenceEquals(ra, rb))
                        {
                            rb.Parent = ra;
                            ra.ModelInput |= rb.ModelInput;
                            ra.ModelOutput |= rb.ModelOutput;
                            ra.Unresolved ??= rb.Unresolved;
                            ra.Members.AddRange(rb.Members);
                            rb.Members.Clear();
                        }

                        if (ra.Channels != rb.Channels)
                        {
                            throw new Unresolvable(consumer, "its input adds tensors with different channel counts");
                        }
                    }

                    return new Seen(a.Value, a.Space, a.Expansion);
                }
            }
        }

        if (copy is not null)
        {
            return copy;
        }

        throw new Unresolvable(consumer, "its input is computed by code outside any layer that the tracer cannot explain (only additions of two layer outputs are understood)");
    }

    private static (Space? Space, long Expansion) Propagate(string name, nn.Module module, Seen source, Tensor x, Tensor y, Func<long, Space> newSpace, List<Space> touched)
    {
        var space = source.Space?.Root();
        var (result, expansion) = PropagateOnce(name, module, source, space, x, y, newSpace);
        if (space is not null)
        {
            touched.Add(space);
        }

        if (result is not null)
        {
            touched.Add(result);
        }

        return (result, expansion);
    }

    private static (Space? Space, long Expansion) PropagateOnce(string name, nn.Module module, Seen source, Space? space, Tensor x, Tensor y, Func<long, Space> newSpace)
    {

        switch (module)
        {
            case Linear linear:
                if (space is not null && source.Value.dim() >= 2 && x.dim() == 2)
                {
                    space.Members.Add(new GroupMember(name, module, ChannelRole.Consumer, source.Expansion));
                }
                else
                {
                    space?.MarkUnresolved($"'{name}' reads a {x.dim()}-D input whose last dimension is not the channel dimension");
                }

                var produced = newSpace(linear.out_features);
                produced.Members.Add(new GroupMember(name, module, ChannelRole.Producer));
                return (produced, 1);

            case Conv2d conv when conv.groups == 1:
                if (space is not null)
                {
                    if (source.Expansion != 1)
                    {
                        space.MarkUnresolved($"'{name}' reads a flattened tensor");
                    }

                    space.Members.Add(new GroupMember(name, module, ChannelRole.Consumer));
                }

                var convOut = newSpace(conv.out_channels);
                convOut.Members.Add(new GroupMember(name, module, ChannelRole.Producer));
                return (convOut, 1);

            case Conv2d conv when conv.groups == conv.in_channels && conv.out_channels == conv.in_channels:
                // Depthwise: channel c in → channel c out, with its own filter.
                space?.Members.Add(new GroupMember(name, module, ChannelRole.PassThrough));
                return (space, source.Expansion);

            case Conv2d:
                space?.MarkUnresolved($"'{name}' is a grouped convolution, which couples channels in blocks");
                return (space is null ? null : newSpace(y.shape[1]), 1);

            case BatchNorm1d or BatchNorm2d:
                if (source.Expansion != 1)
                {
                    // One BatchNorm feature per flattened position, not per channel.
                    space?.MarkUnresolved($"'{name}' normalises a flattened tensor");
                }

                space?.Members.Add(new GroupMember(name, module, ChannelRole.PassThrough));
                return (space, source.Expansion);

            case Flatten flatten:
                if (x.dim() == 4 && flatten.start_dim == 1 && (flatten.end_dim == -1 || flatten.end_dim == 3))
                {
                    return (space, x.shape[2] * x.shape[3]);
                }

                if (x.dim() == 2)
                {
                    return (space, source.Expansion);
                }

                space?.MarkUnresolved($"'{name}' flattens dimensions {flatten.start_dim}..{flatten.end_dim}, which the tracer does not map");
                return (null, 1);

            default:
                if (ElementwiseTypes.Contains(module.GetType()) && x.dim() == y.dim() && (x.dim() < 2 || x.shape[1] == y.shape[1]))
                {
                    return (space, source.Expansion);
                }

                // Anything else (normalisations across channels, softmax over channels, shuffles, custom layers) may
                // mix channels in ways the tracer cannot know: its groups are not pruned.
                space?.MarkUnresolved($"'{name}' ({module.GetType().Name}) is a layer whose effect on channels is unknown");
                var unknown = y.dim() >= 2 ? newSpace(y.shape[1]) : null;
                unknown?.MarkUnresolved($"'{name}' ({module.GetType().Name}) is a layer whose effect on channels is unknown");
                return (unknown, 1);
        }
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
                Fixed = root.ModelInput ? "it carries the model's input channels" : root.ModelOutput ? "it carries the model's output" : null,
                Unresolved = root.Unresolved,
            };
            group.Members.AddRange(root.Members.DistinctBy(m => (m.Name, m.Role)));
            groups.Add(group);
        }

        return groups;
    }

    /// <summary>A dependency the tracer cannot resolve, naming the layer.</summary>
    internal sealed class Unresolvable(string layer, string why)
        : ArgumentException($"Structured pruning cannot resolve the channel dependencies at {(layer.StartsWith("the ", StringComparison.Ordinal) ? layer : $"layer '{layer}'")}: {why}.")
    {
        public string Layer { get; } = layer;
    }
}
