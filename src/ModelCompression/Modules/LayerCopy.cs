using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Modules;

/// <summary>Copies a layer through its <see cref="LayerDescriptor"/>: a new layer from its settings, the children copied, its own tensors loaded.</summary>
internal static class LayerCopy
{
    /// <summary>The tensors a module holds itself: its <c>state_dict</c> entries under no child the library can see, with their parameters' gradient flags.</summary>
    public static List<(string Name, Tensor Tensor)> OwnTensors(nn.Module module)
    {
        var children = module.named_children().Select(c => c.name + ".").ToList();
        return module.state_dict()
            .Where(kv => !children.Any(prefix => kv.Key.StartsWith(prefix, StringComparison.Ordinal)))
            .Select(kv => (kv.Key, kv.Value))
            .ToList();
    }

    /// <summary>Builds a copy of <paramref name="original"/> with <paramref name="descriptor"/>; <paramref name="copyChild"/> copies each child.</summary>
    public static nn.Module Copy(nn.Module original, LayerDescriptor descriptor, Func<string, nn.Module, nn.Module> copyChild, string path)
    {
        var attributes = descriptor.GetAttributes(original);
        var copy = descriptor.Create(attributes, descriptor.Version);
        try
        {
            if (copy.GetType() != original.GetType())
            {
                throw new InvalidOperationException($"The descriptor '{descriptor.Id}' built a {copy.GetType().FullName} for a {original.GetType().FullName}.");
            }

            var expected = original.named_children().Select(c => c.name).ToList();
            var built = copy.named_children().Select(c => c.name).ToList();
            if (!expected.SequenceEqual(built))
            {
                throw new UnsupportedModelException(path, original.GetType().Name,
                    $"The {original.GetType().Name} at {Where(path)} has children [{string.Join(", ", expected)}] but the one its descriptor '{descriptor.Id}' builds has [{string.Join(", ", built)}]: " +
                    "a module that adds or removes children after construction cannot be copied by its constructor.");
            }

            foreach (var (name, child) in original.named_children().ToList())
            {
                var old = copy.named_children().First(c => c.name == name).module;
                var replacement = copyChild(name, child);
                if (!ReferenceEquals(old, replacement))
                {
                    ModuleTree.SetChild(copy, name, replacement);
                    old.Dispose();
                }
            }

            CopyOwnTensors(original, copy, path);
            return copy;
        }
        catch
        {
            copy.Dispose();
            throw;
        }
    }

    /// <summary>Copies the values (and gradient flags) of <paramref name="source"/>'s own tensors into <paramref name="target"/>'s, which must match by name and shape.</summary>
    public static void CopyOwnTensors(nn.Module source, nn.Module target, string path)
    {
        // A module moved to another dtype or device as a whole: move the new one alike before copying into it
        // (outside the scope below: moving a module makes new parameters, which must outlive it).
        var (sourcePlacement, targetPlacement) = (Placement(source), Placement(target));
        if (sourcePlacement is { } s && targetPlacement is { } t && (s.DType != t.DType || s.Device != t.Device))
        {
            target.to(s.Device);
            target.to(s.DType);
        }

        // The scope frees the wrappers that natively implemented modules hand out for their tensors on every call;
        // a managed module's own tensors are not created here, so they are not touched.
        using var scope = NewDisposeScope();
        var from = OwnTensors(source);
        var to = OwnTensors(target).ToDictionary(t => t.Name, t => t.Tensor);
        if (from.Count != to.Count || from.Any(t => !to.ContainsKey(t.Name)))
        {
            throw new UnsupportedModelException(path, source.GetType().Name,
                $"The {source.GetType().Name} at {Where(path)} holds tensors [{string.Join(", ", from.Select(t => t.Name))}] but a new one holds [{string.Join(", ", to.Keys)}]: " +
                "it registers tensors after construction, so it cannot be copied by its constructor.");
        }

        var gradients = source.named_parameters().ToDictionary(p => p.name, p => p.parameter.requires_grad);
        var targetParameters = target.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        using var noGrad = no_grad();
        foreach (var (name, value) in from)
        {
            var destination = to[name];
            if (!destination.shape.SequenceEqual(value.shape) || destination.dtype != value.dtype)
            {
                throw new UnsupportedModelException(path, source.GetType().Name,
                    $"The tensor '{name}' of the {source.GetType().Name} at {Where(path)} is {value.dtype} [{string.Join(", ", value.shape)}], " +
                    $"but a new one built with the same settings holds {destination.dtype} [{string.Join(", ", destination.shape)}].");
            }

            destination.copy_(value);
            if (gradients.TryGetValue(name, out bool requiresGrad) && targetParameters.TryGetValue(name, out var parameter))
            {
                parameter.requires_grad = requiresGrad;
            }
        }
    }

    /// <summary>The dtype and device of a module's first floating-point tensor of its own, or <see langword="null"/>.</summary>
    private static (ScalarType DType, Device Device)? Placement(nn.Module module)
    {
        using var scope = NewDisposeScope();
        var first = OwnTensors(module).Select(t => t.Tensor).FirstOrDefault(t => t.is_floating_point());
        return first is null ? null : (first.dtype, first.device);
    }

    public static string Where(string path) => path.Length == 0 ? "the root" : $"'{path}'";
}
