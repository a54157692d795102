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
/// TorchSharp has no <c>copy.deepcopy</c>. This cloner creates each module object without running its
/// own constructor, runs the base <c>Module(string name)</c> constructor on it (which creates a fresh native
/// module), then copies the fields the module's own classes declare: tensors and parameters are cloned,
/// submodules cloned recursively, arrays, lists and dictionaries copied element by element, and any other
/// value (numbers, strings, options records, delegates) shared. The registry of submodules, parameters and
/// buffers is rebuilt in the original order, so <c>state_dict()</c> keys and order match.
/// </para>
/// <para>
/// Tied weights stay tied (one tensor cloned once). Forward hooks are not copied. A module holding state
/// the cloner cannot see (for example a delegate that captures the original module) should be cloned by a
/// cloner of your own, given to the pipeline with <c>WithModelCloner</c>.
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
    /// <exception cref="NotSupportedException">The module (or one of its submodules) is of a kind the cloner cannot copy.</exception>
    public static T DeepClone<T>(T module)
        where T : nn.Module
    {
        ArgumentNullException.ThrowIfNull(module);
        var state = new CloneState();
        T clone;
        using (no_grad())
        {
            clone = (T)CloneModule(module, state);
        }

        // Training flags live in the native modules: copy them parent first, so each module's own flag wins.
        foreach (var (original, copy) in state.ModulesInOrder)
        {
            copy.train(original.training);
        }

        return clone;
    }

    private sealed class CloneState
    {
        public Dictionary<object, object> Map { get; } = new(ReferenceEqualityComparer.Instance);

        public List<(nn.Module Original, nn.Module Copy)> ModulesInOrder { get; } = [];
    }

    private static nn.Module CloneModule(nn.Module original, CloneState state)
    {
        if (state.Map.TryGetValue(original, out var existing))
        {
            return (nn.Module)existing;
        }

        var type = original.GetType();
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

                field.SetValue(copy, CloneValue(field.GetValue(original), state, $"{type.Name}.{field.Name}"));
            }
        }

        RebuildRegistry(original, copy, state);
        RegisteredField?.SetValue(copy, RegisteredField.GetValue(original));
        DeviceTypeField?.SetValue(copy, DeviceTypeField.GetValue(original));
        DeviceIndexField?.SetValue(copy, DeviceIndexField.GetValue(original));
        return copy;
    }

    private static void RebuildRegistry(nn.Module original, nn.Module copy, CloneState state)
    {
        var subs = SubmodulesField.GetValue(original)!;
        var copySubs = SubmodulesField.GetValue(copy)!;
        var addModule = copySubs.GetType().GetMethod("Add", [typeof(string), typeof(nn.Module)])!;
        foreach (var (key, value) in Pairs<nn.Module>(subs))
        {
            addModule.Invoke(copySubs, [key, CloneModule(value, state)]);
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
                return CloneModule(module, state);
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
