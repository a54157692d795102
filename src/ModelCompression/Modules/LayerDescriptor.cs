using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Modules;

/// <summary>
/// What the library knows about one kind of layer: how to recognise it, the settings it is built from (which the
/// compressed file stores by name), how to build a new one from those settings, and its multiply-accumulates. One
/// descriptor per kind, registered in <see cref="LayerRegistry"/> by the part of the library (or the application) that
/// owns the kind.
/// </summary>
/// <remarks>
/// <para>
/// From a descriptor the library derives the rest: a copy of a layer is <see cref="Create"/> with the layer's
/// <see cref="GetAttributes"/>, its child modules replaced by copies of the original's, and its own parameters and
/// buffers copied in; the file stores <see cref="Id"/>, <see cref="Version"/>, the attributes by name and the tensors by
/// their <c>state_dict</c> names, and loads by the same route. A layer's "own" tensors are its <c>state_dict</c> entries
/// that belong to no child the library can see; for TorchSharp's natively implemented modules (which show no children)
/// that is all of them.
/// </para>
/// <para>
/// Implement a descriptor for a layer kind of your own when its constructor takes settings (derive from this class),
/// or register a parameterless factory with <see cref="LayerRegistry.RegisterFactory{T}"/> when it does not.
/// </para>
/// </remarks>
public abstract class LayerDescriptor
{
    /// <summary>Initializes a new instance of the <see cref="LayerDescriptor"/> class.</summary>
    /// <param name="id">
    /// The kind's stable name, written in files (e.g. <c>"torch.nn.GRU"</c> or <c>"MyCompany.Gate"</c>): at most 200
    /// characters, and never changed once files exist.
    /// </param>
    /// <param name="moduleType">The exact module type the descriptor describes.</param>
    /// <exception cref="ArgumentException"><paramref name="id"/> is empty or too long, or <paramref name="moduleType"/> is not a module type.</exception>
    protected LayerDescriptor(string id, Type moduleType)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(id);
        ArgumentNullException.ThrowIfNull(moduleType);
        if (id.Length > 200)
        {
            throw new ArgumentException($"A layer kind's id has at most 200 characters (was {id.Length}).", nameof(id));
        }

        if (!typeof(nn.Module).IsAssignableFrom(moduleType) || moduleType.IsAbstract)
        {
            throw new ArgumentException($"{moduleType.FullName} is not a concrete TorchSharp module type.", nameof(moduleType));
        }

        Id = id;
        ModuleType = moduleType;
    }

    /// <summary>Gets the kind's stable name, written in files.</summary>
    public string Id { get; }

    /// <summary>Gets the exact module type the descriptor describes (subclasses need descriptors of their own).</summary>
    public Type ModuleType { get; }

    /// <summary>
    /// Gets the version of the attributes this descriptor writes. Raise it when the attributes change, and keep
    /// <see cref="Create"/> able to read every earlier version, so files written before still load.
    /// </summary>
    /// <value>The default is 1.</value>
    public virtual int Version => 1;

    /// <summary>Reads the settings a layer was built with.</summary>
    /// <param name="module">A module of <see cref="ModuleType"/>; it is not changed.</param>
    /// <returns>The settings, by name.</returns>
    /// <exception cref="UnsupportedModelException">The layer has a setting this descriptor cannot reproduce.</exception>
    public abstract LayerAttributes GetAttributes(nn.Module module);

    /// <summary>
    /// Builds a new layer with the given settings. Its weights are overwritten afterwards, so they may be anything;
    /// its children are replaced by copies, so they only need the right names and types.
    /// </summary>
    /// <param name="attributes">The settings, as <see cref="GetAttributes"/> gave them (possibly read from a file: check ranges).</param>
    /// <param name="version">The <see cref="Version"/> the attributes were written with.</param>
    /// <returns>The new layer, of <see cref="ModuleType"/>.</returns>
    /// <exception cref="InvalidDataException">The attributes are missing, of the wrong type, or out of range.</exception>
    public abstract nn.Module Create(LayerAttributes attributes, int version);

    /// <summary>
    /// Checks a layer whose own tensors were just loaded from a file, for values its settings forbid (a scale that is
    /// not positive, a level outside its range): a file can carry any bytes behind valid checksums. The default checks
    /// nothing.
    /// </summary>
    /// <param name="module">The layer <see cref="Create"/> built, its tensors loaded.</param>
    /// <exception cref="InvalidDataException">A loaded value is out of range.</exception>
    public virtual void CheckLoaded(nn.Module module)
    {
    }

    /// <summary>
    /// Counts the multiply-accumulates of one call of a tensor-to-tensor layer, over the whole batch, or returns
    /// <see langword="null"/> when the layer's work is not counted (it is negligible, or its children count it).
    /// </summary>
    /// <param name="module">The layer.</param>
    /// <param name="input">The input of the call.</param>
    /// <param name="output">The output of the call.</param>
    /// <returns>The multiply-accumulates of the call, or <see langword="null"/>.</returns>
    public virtual long? CountMacs(nn.Module module, Tensor input, Tensor output) => null;

    /// <summary>
    /// Attaches a counter of multiply-accumulates to a layer for one measurement: every call through <c>call()</c>
    /// adds its MACs (over the whole batch) to <paramref name="add"/>. The default hooks a tensor-to-tensor layer with
    /// <see cref="CountMacs"/>; override it for a layer whose forward takes or returns something else (a recurrent or
    /// attention layer), using the typed <c>register_forward_hook</c> of its TorchSharp base class.
    /// </summary>
    /// <param name="module">The layer.</param>
    /// <param name="add">Receives the MACs of each call.</param>
    /// <returns>What removes the hook after the measurement, or <see langword="null"/> when the layer's MACs are not counted.</returns>
    public virtual Action? AttachMacsCounter(nn.Module module, Action<long> add)
    {
        ArgumentNullException.ThrowIfNull(module);
        ArgumentNullException.ThrowIfNull(add);
        return module is nn.Module<Tensor, Tensor> layer
            ? layer.register_forward_hook((m, input, output) =>
            {
                if (CountMacs(m, input, output) is { } macs)
                {
                    add(macs);
                }

                return output;
            }).remove
            : null;
    }

    /// <summary>
    /// Says how the layer's output channels depend on its input channels, so that structured pruning can prune the
    /// channel groups that pass through it and shrink it with them. The default, <see langword="null"/>, means the
    /// layer may mix channels in any way: every group that reaches it is left unpruned, with the reason in the report.
    /// </summary>
    /// <remarks>
    /// A described layer is traced as one layer, even when it has children: override <see cref="ShrinkChannels"/> too,
    /// which builds its smaller copy. Its parent must be able to hold a new layer of <see cref="ModuleType"/> in its place.
    /// </remarks>
    /// <param name="module">A module of <see cref="ModuleType"/>; it is not changed.</param>
    /// <returns>The layer's channels, or <see langword="null"/> when it cannot say.</returns>
    public virtual ChannelDescription? DescribeChannels(nn.Module module) => null;

    /// <summary>
    /// Builds a copy of a layer that keeps only some of its channels, for structured pruning; called only for layers
    /// <see cref="DescribeChannels"/> describes, before anything in the model changes.
    /// </summary>
    /// <param name="module">The layer; it is not changed (the caller disposes it once every layer has been rebuilt).</param>
    /// <param name="keptOutputs">The output channels to keep, ascending, or <see langword="null"/> for all of them.</param>
    /// <param name="keptInputs">
    /// The input channels to keep, ascending, or <see langword="null"/> for all of them; for a
    /// <see cref="ChannelCoupling.PerChannel"/> layer, the same as <paramref name="keptOutputs"/>.
    /// </param>
    /// <returns>
    /// A new layer of <see cref="ModuleType"/> whose <see cref="DescribeChannels"/> gives the kept counts, with the kept
    /// channels' weights, the layer's gradient flags and its training mode.
    /// </returns>
    /// <remarks>
    /// Build the new layer outside any dispose scope of the method's own: a scope disposes the tensors created in it,
    /// the new layer's parameters included. (The library takes the new layer's tensors out of its own scope.)
    /// </remarks>
    /// <exception cref="NotSupportedException">The descriptor describes channels but does not override this method.</exception>
    public virtual nn.Module ShrinkChannels(nn.Module module, long[]? keptOutputs, long[]? keptInputs) =>
        throw new NotSupportedException($"{GetType().Name} describes the channels of {ModuleType.Name} but does not override {nameof(ShrinkChannels)}, so structured pruning cannot rebuild it.");

    /// <summary>
    /// Gets the tensor whose dimension 0 runs over the layer's output channels, which magnitude-based channel
    /// importance (L1, L2) scores; the default is the layer's own parameter named <c>weight</c>, if it has one.
    /// </summary>
    /// <param name="module">A module of <see cref="ModuleType"/>.</param>
    /// <returns>The weight, or <see langword="null"/> when the layer has none to score by.</returns>
    public virtual Tensor? GetChannelWeight(nn.Module module) => OwnWeight(module);

    /// <summary>The module's own parameter named <c>weight</c>, or null.</summary>
    internal static Tensor? OwnWeight(nn.Module module) =>
        module.named_parameters(recurse: false).Where(p => p.name == "weight").Select(p => (Tensor)p.parameter).FirstOrDefault();
}

/// <summary>A descriptor for a module kind with a parameterless constructor (a factory): no attributes, built by the factory.</summary>
/// <typeparam name="T">The module type.</typeparam>
internal sealed class FactoryLayerDescriptor<T>(string id, Func<T> factory) : LayerDescriptor(id, typeof(T))
    where T : nn.Module
{
    public override LayerAttributes GetAttributes(nn.Module module) => new();

    public override nn.Module Create(LayerAttributes attributes, int version)
    {
        var module = factory() ?? throw new InvalidOperationException($"The factory registered for {typeof(T).FullName} returned null.");
        return module.GetType() == typeof(T)
            ? module
            : throw new InvalidOperationException($"The factory registered for {typeof(T).FullName} returned a {module.GetType().FullName}.");
    }
}
