using System.Collections.Concurrent;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Modules;

/// <summary>
/// The layer kinds the library knows, one <see cref="LayerDescriptor"/> each: the copy, the compressed file and the
/// metrics walk this registry instead of switching over types. TorchSharp's modules are registered by the library;
/// register your own kinds once, at start-up, before compressing, saving or loading models that hold them.
/// </summary>
/// <remarks>
/// TorchSharp 0.107 hides some constructor arguments of its natively implemented modules. Their descriptors read
/// sizes, layers, directions and biases from the weights and find the hidden settings that change the output
/// (attention heads, batch-first layout, a transformer layer's activation, an RNN's non-linearity) by running the
/// layer on a small probe input. Settings that only matter in training or to gradients (dropout, an embedding's
/// padding index) cannot be seen: copies and loaded files get TorchSharp's defaults for them, and an embedding's
/// <c>max_norm</c> is not reproduced.
/// </remarks>
/// <example>
/// <code>
/// // A module with a parameterless constructor: copies and files build it with the factory, then load its tensors.
/// LayerRegistry.RegisterFactory(() =&gt; new MyBlock());
/// // A module whose constructor takes settings: a descriptor reads and rebuilds them.
/// LayerRegistry.Register(new MyGateDescriptor());
/// </code>
/// </example>
public static class LayerRegistry
{
    private static readonly ConcurrentDictionary<Type, LayerDescriptor> ByType = new();
    private static readonly ConcurrentDictionary<string, LayerDescriptor> ById = new(StringComparer.Ordinal);
    private static readonly Lock Gate = new();

    static LayerRegistry()
    {
        // TorchSharp's kinds, then the kinds this library's techniques define (each descriptor lives with its technique).
        foreach (var descriptor in TorchSharpLayers.All().Append(Quantization.QuantizedEmbedding.Descriptor))
        {
            Add(descriptor);
        }
    }

    /// <summary>Gets every registered descriptor.</summary>
    public static IReadOnlyCollection<LayerDescriptor> Descriptors => ById.Values.ToList();

    /// <summary>Registers a layer kind.</summary>
    /// <param name="descriptor">The descriptor.</param>
    /// <exception cref="ArgumentNullException"><paramref name="descriptor"/> is <see langword="null"/>.</exception>
    /// <exception cref="InvalidOperationException">A descriptor with the same id or module type is already registered.</exception>
    public static void Register(LayerDescriptor descriptor)
    {
        ArgumentNullException.ThrowIfNull(descriptor);
        Add(descriptor);
    }

    /// <summary>
    /// Registers a module type that has a parameterless constructor: a copy (or a loaded file) is built by
    /// <paramref name="factory"/>, its children replaced by copies of the original's, its own tensors loaded.
    /// </summary>
    /// <typeparam name="T">The module type.</typeparam>
    /// <param name="factory">Builds a new module of exactly <typeparamref name="T"/>.</param>
    /// <param name="id">The kind's stable name in files; the default is the type's full name.</param>
    /// <exception cref="InvalidOperationException">The type or id is already registered.</exception>
    public static void RegisterFactory<T>(Func<T> factory, string? id = null)
        where T : nn.Module
    {
        ArgumentNullException.ThrowIfNull(factory);
        if (typeof(T).IsAbstract)
        {
            throw new ArgumentException($"{typeof(T).FullName} is abstract; register the concrete module type.", nameof(T));
        }

        Add(new FactoryLayerDescriptor<T>(id ?? typeof(T).FullName ?? typeof(T).Name, factory));
    }

    /// <summary>Removes a registration (for tests and plug-ins that unload); TorchSharp's built-in kinds cannot be removed.</summary>
    /// <param name="moduleType">The module type.</param>
    /// <returns><see langword="true"/> when a registration was removed.</returns>
    public static bool Unregister(Type moduleType)
    {
        ArgumentNullException.ThrowIfNull(moduleType);
        lock (Gate)
        {
            if (!ByType.TryGetValue(moduleType, out var d) || d is TorchSharpLayers.BuiltIn)
            {
                return false;
            }

            ByType.TryRemove(moduleType, out _);
            ById.TryRemove(d.Id, out _);
            return true;
        }
    }

    /// <summary>Finds the descriptor of a module's exact type.</summary>
    /// <param name="module">The module.</param>
    /// <returns>The descriptor, or <see langword="null"/> when its kind is not registered.</returns>
    public static LayerDescriptor? Find(nn.Module module)
    {
        ArgumentNullException.ThrowIfNull(module);
        return ByType.GetValueOrDefault(module.GetType());
    }

    /// <summary>Finds a descriptor by its id (as a file names it).</summary>
    /// <param name="id">The id.</param>
    /// <returns>The descriptor, or <see langword="null"/>.</returns>
    public static LayerDescriptor? Find(string id)
    {
        ArgumentNullException.ThrowIfNull(id);
        return ById.GetValueOrDefault(id);
    }

    private static void Add(LayerDescriptor descriptor)
    {
        lock (Gate)
        {
            if (ByType.TryGetValue(descriptor.ModuleType, out var existing))
            {
                throw new InvalidOperationException($"{descriptor.ModuleType.FullName} is already registered (as '{existing.Id}').");
            }

            if (ById.TryGetValue(descriptor.Id, out existing))
            {
                throw new InvalidOperationException($"The id '{descriptor.Id}' is already registered for {existing.ModuleType.FullName}.");
            }

            ByType[descriptor.ModuleType] = descriptor;
            ById[descriptor.Id] = descriptor;
        }
    }
}
