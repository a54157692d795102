using System.Collections;
using System.Reflection;
using System.Runtime.CompilerServices;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Modules;

/// <summary>
/// Makes deep copies of TorchSharp modules: a new module tree of the same types, with copies of every
/// parameter and buffer, sharing no tensor and no native module with the original.
/// </summary>
/// <remarks>
/// <para>
/// A module whose kind is registered in <see cref="LayerRegistry"/> (TorchSharp's Linear, convolutions, GroupNorm,
/// Embedding, recurrent, attention and transformer layers, and any kind an application registers, e.g. with
/// <see cref="LayerRegistry.RegisterFactory{T}"/>) is copied through its descriptor: a new module built by its
/// constructor, its children copied, its own parameters and buffers copied in.
/// </para>
/// <para>
/// Any other module (TorchSharp's managed containers, activations, pooling and normalisation layers, this library's
/// layers, and users' own modules) is copied by the reflection fallback that this file keeps in one place: the object
/// is created without running its own constructor, the base <c>Module(string name)</c> constructor runs on it (which
/// creates a fresh native module), then the fields its own classes declare are copied: tensors and parameters cloned,
/// submodules copied recursively, arrays, lists and dictionaries element by element, and other values (numbers,
/// strings, options records, delegates) shared. The registry of submodules, parameters and buffers is rebuilt in the
/// original order, so <c>state_dict()</c> keys and order match. The fallback reads TorchSharp's private fields and is
/// pinned to TorchSharp 0.107 by a test.
/// </para>
/// <para>
/// A module the fallback cannot copy safely — a natively implemented TorchSharp module without a descriptor, whose
/// .NET object only wraps a native handle — is refused with an <see cref="UnsupportedModelException"/> before anything
/// is copied. Tied weights stay tied (one tensor cloned once). Forward hooks are not copied. A module holding state
/// neither route can see (for example a delegate that captures the original module) should be registered with a
/// descriptor or factory, or the whole model copied by a cloner given to the pipeline with <c>WithModelCloner</c>.
/// </para>
/// </remarks>
public static class ModuleCloner
{
    private const BindingFlags InstanceFields = BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.DeclaredOnly;

    private static readonly FieldInfo NameField = typeof(nn.Module).GetField("name", InstanceFields)
        ?? throw new InvalidOperationException("This TorchSharp version has no Module.name field; the cloner needs TorchSharp 0.107.");

    private static readonly FieldInfo SubmodulesField = typeof(nn.Module).GetField("_internal_submodules", InstanceFields)
        ?? throw new InvalidOperationException("This TorchSharp version has no Module._internal_submodules field; the cloner needs TorchSharp 0.107.");

    private static readonly FieldInfo BuffersField = typeof(nn.Module).GetField("_internal_buffers", InstanceFields)
        ?? throw new InvalidOperationException("This TorchSharp version has no Module._internal_buffers field; the cloner needs TorchSharp 0.107.");

    private static readonly FieldInfo ParamsField = typeof(nn.Module).GetField("_internal_params", InstanceFields)
        ?? throw new InvalidOperationException("This TorchSharp version has no Module._internal_params field; the cloner needs TorchSharp 0.107.");

    private static readonly FieldInfo? RegisteredField = typeof(nn.Module).GetField("_areComponentsRegistered", InstanceFields);
    private static readonly FieldInfo? DeviceTypeField = typeof(nn.Module).GetField("_deviceType", InstanceFields);
    private static readonly FieldInfo? DeviceIndexField = typeof(nn.Module).GetField("_deviceIndex", InstanceFields);

    /// <summary>Returns a deep copy of <paramref name="module"/>.</summary>
    /// <typeparam name="T">The module type.</typeparam>
    /// <param name="module">The module to copy; it is not changed.</param>
    /// <returns>A new module of the same type that shares no tensor with <paramref name="module"/>.</returns>
    /// <exception cref="ArgumentNullException"><paramref name="module"/> is <see langword="null"/>.</exception>
    /// <exception cref="UnsupportedModelException">The module (or one of its submodules) is of a kind that cannot be copied safely.</exception>
    public static T DeepClone<T>(T module)
        where T : nn.Module
    {
        ArgumentNullException.ThrowIfNull(module);
        var state = new CloneState(SharedTensors(module));
        T clone;

        // Layers built by their constructors draw random initial weights: leave the caller's random stream as it was,
        // and let no other thread draw from it meanwhile.
        using var exclusive = RandomState.Gate.EnterScope();
        using var rng = RandomState.Save();
        try
        {
            using (no_grad())
            {
                clone = (T)CloneModule(module, state, string.Empty);
            }
        }
        catch
        {
            // Nothing half-built is left behind: dispose every module made so far (the original is untouched).
            foreach (var (_, copy) in state.ModulesInOrder)
            {
                copy?.Dispose();
            }

            throw;
        }
        finally
        {
            RandomState.Restore(rng);
        }

        // Training flags live in the native modules: copy them parent first, so each module's own flag wins.
        foreach (var (original, copy) in state.ModulesInOrder)
        {
            copy!.train(original.training);
        }

        // Layers rebuilt by their constructors (an Embedding, say) may have put their tensors in the caller's dispose
        // scope: a copy made inside a step must outlive it, so every tensor of the copy leaves the scope.
        foreach (var (_, parameter) in clone.named_parameters())
        {
            parameter.DetachFromDisposeScope();
        }

        foreach (var (_, buffer) in clone.named_buffers())
        {
            buffer.DetachFromDisposeScope();
        }

        return clone;
    }

    /// <summary>The parameters and buffers that several modules hold (tied weights).</summary>
    private static HashSet<object> SharedTensors(nn.Module root)
    {
        var seen = new HashSet<object>(ReferenceEqualityComparer.Instance);
        var shared = new HashSet<object>(ReferenceEqualityComparer.Instance);
        foreach (var module in root.modules().Prepend(root).Distinct(ReferenceEqualityComparer.Instance).Cast<nn.Module>())
        {
            foreach (var tensor in module.named_parameters(recurse: false).Select(p => (object)p.parameter).Concat(module.named_buffers(recurse: false).Select(b => b.buffer)))
            {
                if (!seen.Add(tensor))
                {
                    shared.Add(tensor);
                }
            }
        }

        return shared;
    }

    private sealed class CloneState(HashSet<object> sharedTensors)
    {
        public HashSet<object> SharedTensors { get; } = sharedTensors;

        public Dictionary<object, object> Map { get; } = new(ReferenceEqualityComparer.Instance);

        public List<(nn.Module Original, nn.Module? Copy)> ModulesInOrder { get; } = [];
    }

    private static nn.Module CloneModule(nn.Module original, CloneState state, string path)
    {
        if (state.Map.TryGetValue(original, out var existing))
        {
            return (nn.Module)existing;
        }

        var type = original.GetType();
        bool native = IsNativeWrapper(type);
        // A layer built by its constructor gets tensors of its own; a managed layer that shares a tensor with another
        // (tied weights) goes through the field copy, which keeps the tie.
        if (LayerRegistry.Find(original) is { } descriptor
            && (native || !original.named_parameters(recurse: false).Select(p => (object)p.parameter)
                .Concat(original.named_buffers(recurse: false).Select(b => b.buffer)).Any(state.SharedTensors.Contains)))
        {
            // Keep parents before their children in the list, whichever is built first: training flags are set in that order.
            int slot = state.ModulesInOrder.Count;
            state.ModulesInOrder.Add((original, null));
            nn.Module copied;
            try
            {
                copied = LayerCopy.Copy(original, descriptor, (name, child) => CloneModule(child, state, Join(path, name)), path);
            }
            catch (UnsupportedModelException ex) when (ex.LayerName is null)
            {
                throw new UnsupportedModelException(path, type.Name, $"Cannot copy {LayerCopy.Where(path)}: {ex.Message}", ex);
            }

            state.Map[original] = copied;
            state.ModulesInOrder[slot] = (original, copied);
            return copied;
        }

        if (native)
        {
            throw new UnsupportedModelException(path, type.Name,
                $"Cannot copy the {type.Name} at {LayerCopy.Where(path)}: it is implemented natively by TorchSharp and no descriptor for it is registered. " +
                $"Register one with {nameof(LayerRegistry)}.{nameof(LayerRegistry.Register)}, or give the pipeline a cloner of your own with WithModelCloner.");
        }

        var (baseType, ctor) = FindBaseConstructor(type);
        var copy = (nn.Module)RuntimeHelpers.GetUninitializedObject(type);
        state.Map[original] = copy;
        state.ModulesInOrder.Add((original, copy));

        var name = (string?)NameField.GetValue(original) ?? type.Name;
        ctor.Invoke(copy, [name]);

        // Fields declared by the classes between the concrete type and the base whose constructor ran.
        for (var t = type; t is not null && t != baseType; t = t.BaseType)
        {
            foreach (var field in t.GetFields(InstanceFields))
            {
                if (field.IsLiteral || field.FieldType.IsPointer)
                {
                    continue;
                }

                field.SetValue(copy, CloneValue(field.GetValue(original), state, Join(path, field.Name)));
            }
        }

        RebuildRegistry(original, copy, state, path);
        RegisteredField?.SetValue(copy, RegisteredField.GetValue(original));
        DeviceTypeField?.SetValue(copy, DeviceTypeField.GetValue(original));
        DeviceIndexField?.SetValue(copy, DeviceIndexField.GetValue(original));
        return copy;
    }

    private static string Join(string path, string name) => path.Length == 0 ? name : $"{path}.{name}";

    /// <summary>
    /// Whether a TorchSharp type is a thin wrapper around a native module (it declares a constructor taking the native
    /// handles): copying its .NET fields would share or lose the native module, so only a descriptor may copy it.
    /// </summary>
    internal static bool IsNativeWrapper(Type type) =>
        type.Assembly == typeof(nn.Module).Assembly
        && type.GetConstructors(BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic)
            .Any(c => c.GetParameters() is [{ ParameterType: var a }, { ParameterType: var b }, ..] && a == typeof(IntPtr) && b == typeof(IntPtr));

    private static void RebuildRegistry(nn.Module original, nn.Module copy, CloneState state, string path)
    {
        var subs = SubmodulesField.GetValue(original)!;
        var copySubs = SubmodulesField.GetValue(copy)!;
        var addModule = copySubs.GetType().GetMethod("Add", [typeof(string), typeof(nn.Module)])!;
        foreach (var (key, value) in Pairs<nn.Module>(subs))
        {
            addModule.Invoke(copySubs, [key, CloneModule(value, state, Join(path, key))]);
        }

        var pars = ParamsField.GetValue(original)!;
        var copyPars = ParamsField.GetValue(copy)!;
        var addParam = copyPars.GetType().GetMethod("Add", [typeof(string), typeof(Parameter)])!;
        foreach (var (key, value) in Pairs<Parameter>(pars))
        {
            addParam.Invoke(copyPars, [key, value is null ? null : CloneTensor(value, state)]);
        }

        var bufs = BuffersField.GetValue(original)!;
        var copyBufs = BuffersField.GetValue(copy)!;
        var addBuffer = copyBufs.GetType().GetMethod("Add", [typeof(string), typeof((Tensor, bool))])!;
        foreach (var (key, value) in Pairs<(Tensor Tensor, bool Persistent)>(bufs))
        {
            addBuffer.Invoke(copyBufs, [key, (value.Tensor is null ? null! : CloneTensor(value.Tensor, state), value.Persistent)]);
        }
    }

    private static IEnumerable<(string Key, T Value)> Pairs<T>(object orderedDict) =>
        orderedDict as IEnumerable<(string, T)>
        ?? throw new NotSupportedException($"This TorchSharp version's module registry ({orderedDict.GetType().Name}) is not an ordered list of pairs.");

    private static (Type BaseType, ConstructorInfo Ctor) FindBaseConstructor(Type type)
    {
        // Run the constructor of the closest TorchSharp base class that builds a custom (managed) module:
        // Module<T, TResult>(string name) and friends. The concrete type's own constructor is skipped.
        for (var t = type.BaseType; t is not null; t = t.BaseType)
        {
            if (t.Assembly != typeof(nn.Module).Assembly)
            {
                continue;
            }

            var ctor = t.GetConstructor(BindingFlags.Instance | BindingFlags.NonPublic | BindingFlags.Public, [typeof(string)]);
            if (ctor is not null)
            {
                return (t, ctor);
            }
        }

        throw new NotSupportedException($"Cannot copy a module of type {type.FullName}: no TorchSharp base class with a name constructor.");
    }

    private static Tensor CloneTensor(Tensor original, CloneState state)
    {
        if (state.Map.TryGetValue(original, out var existing))
        {
            return (Tensor)existing;
        }

        Tensor copy;
        using (var alias = original.detach())
        {
            if (original is Parameter parameter)
            {
                var data = alias.clone().DetachFromDisposeScope();
                copy = new Parameter(data, parameter.requires_grad).DetachFromDisposeScope();
            }
            else
            {
                copy = alias.clone().DetachFromDisposeScope();
            }
        }

        if (original.name is not null)
        {
            copy.name = original.name;
        }

        state.Map[original] = copy;
        return copy;
    }

    private static object? CloneValue(object? value, CloneState state, string where)
    {
        switch (value)
        {
            case null:
                return null;
            case nn.Module module:
                return CloneModule(module, state, where);
            case Tensor tensor:
                return tensor.IsInvalid ? tensor : CloneTensor(tensor, state);
            case string or Delegate or Type:
                return value;
        }

        var type = value.GetType();
        if (type.IsPrimitive || type.IsEnum || value is decimal)
        {
            return value;
        }

        if (state.Map.TryGetValue(value, out var existing))
        {
            return existing;
        }

        if (value is Array array)
        {
            var copy = (Array)array.Clone();
            state.Map[value] = copy;
            if (NeedsDeepCopy(type.GetElementType()!))
            {
                for (int i = 0; i < array.Length; i++)
                {
                    copy.SetValue(CloneValue(array.GetValue(i), state, where), i);
                }
            }

            return copy;
        }

        if (type.IsGenericType)
        {
            var definition = type.GetGenericTypeDefinition();
            if (definition == typeof(List<>))
            {
                var list = (IList)Activator.CreateInstance(type)!;
                state.Map[value] = list;
                foreach (var item in (IList)value)
                {
                    list.Add(CloneValue(item, state, where));
                }

                return list;
            }

            if (definition == typeof(Dictionary<,>))
            {
                var dict = (IDictionary)Activator.CreateInstance(type)!;
                state.Map[value] = dict;
                foreach (DictionaryEntry entry in (IDictionary)value)
                {
                    dict.Add(CloneValue(entry.Key, state, where)!, CloneValue(entry.Value, state, where));
                }

                return dict;
            }

            if (type.FullName!.StartsWith("System.ValueTuple`", StringComparison.Ordinal))
            {
                var items = type.GetFields().Select(f => CloneValue(f.GetValue(value), state, where)).ToArray();
                return Activator.CreateInstance(type, items);
            }
        }

        if (type.IsValueType)
        {
            return value;
        }

        if (type.Assembly == typeof(nn.Module).Assembly && type.Namespace?.StartsWith("TorchSharp", StringComparison.Ordinal) == true
            && value is IDisposable)
        {
            throw new NotSupportedException($"Cannot copy {where}: it holds a native TorchSharp object of type {type.FullName}.");
        }

        // Immutable settings, records and other managed objects are shared by reference.
        return value;
    }

    private static bool NeedsDeepCopy(Type elementType) =>
        !(elementType.IsPrimitive || elementType.IsEnum || elementType == typeof(string));
}
