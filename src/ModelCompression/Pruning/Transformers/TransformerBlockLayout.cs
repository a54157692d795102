using System.Collections.Concurrent;
using static TorchSharp.torch;

namespace ModelCompression.Pruning;

/// <summary>
/// Where a transformer block's multi-head attention lives: the query, key, value and output projections (Linear layers,
/// dotted names relative to the block) and the head count. Head h owns outputs [h·d, (h+1)·d) of the query, key and value
/// projections and the same inputs of the output projection, d being the head width.
/// </summary>
/// <param name="Query">The query projection.</param>
/// <param name="Key">The key projection.</param>
/// <param name="Value">The value projection.</param>
/// <param name="Output">The output projection, which reads the heads' concatenated outputs.</param>
/// <param name="Heads">The block's current head count.</param>
public sealed record AttentionLayout(string Query, string Key, string Value, string Output, long Heads);

/// <summary>
/// Where a transformer block's MLP lives: the layers that produce its hidden units (the up projection, and the gate of a
/// gated MLP) and the layer that reads them (the down projection); anything between them must act on each hidden unit
/// alone (an activation, a product of gate and up).
/// </summary>
/// <param name="Inputs">The up projection (and gate): Linear layers whose outputs are the hidden units.</param>
/// <param name="Output">The down projection: the Linear layer whose inputs are the hidden units.</param>
public sealed record MlpLayout(IReadOnlyList<string> Inputs, string Output);

/// <summary>
/// How <see cref="TransformerPruningStep"/> sees one transformer block: its attention and its MLP (either may be absent).
/// The block must be residual — its output is its input plus what it adds — for a depth cut to remove it, and its
/// forward must take the head count from the projections' sizes (head width fixed), so that it keeps working with
/// fewer heads.
/// </summary>
/// <param name="Attention">The attention, or <see langword="null"/>.</param>
/// <param name="Mlp">The MLP, or <see langword="null"/>.</param>
public sealed record TransformerBlockLayout(AttentionLayout? Attention, MlpLayout? Mlp);

/// <summary>
/// Implemented by a transformer block to describe itself to <see cref="TransformerPruningStep"/>. Blocks of types one
/// cannot change are described through <see cref="TransformerLayouts.Register{TBlock}"/> instead.
/// </summary>
public interface ITransformerBlock
{
    /// <summary>Describes the block as it stands now (after pruning, with its current head count).</summary>
    /// <returns>The layout.</returns>
    TransformerBlockLayout DescribeLayout();
}

/// <summary>
/// The registry of transformer block layouts: how <see cref="TransformerPruningStep"/> finds the attention and MLP of a
/// block type it does not know. A type registered here wins over its own <see cref="ITransformerBlock"/>.
/// </summary>
public static class TransformerLayouts
{
    private static readonly ConcurrentDictionary<Type, Func<nn.Module, TransformerBlockLayout>> Describers = new();

    /// <summary>Registers (or replaces) the layout of a block type.</summary>
    /// <typeparam name="TBlock">The block type (exact type: subclasses register on their own).</typeparam>
    /// <param name="describe">Describes a block of that type as it stands.</param>
    public static void Register<TBlock>(Func<TBlock, TransformerBlockLayout> describe)
        where TBlock : nn.Module
    {
        ArgumentNullException.ThrowIfNull(describe);
        Describers[typeof(TBlock)] = m => describe((TBlock)m);
    }

    /// <summary>Removes a registered layout.</summary>
    /// <typeparam name="TBlock">The block type.</typeparam>
    /// <returns>Whether one was registered.</returns>
    public static bool Unregister<TBlock>()
        where TBlock : nn.Module => Describers.TryRemove(typeof(TBlock), out _);

    /// <summary>The layout of a module: registered, else its own, else <see langword="null"/> (not a known block).</summary>
    /// <param name="module">The module.</param>
    /// <returns>The layout, or <see langword="null"/>.</returns>
    public static TransformerBlockLayout? Describe(nn.Module module)
    {
        ArgumentNullException.ThrowIfNull(module);
        if (Describers.TryGetValue(module.GetType(), out var describe))
        {
            return describe(module);
        }

        return (module as ITransformerBlock)?.DescribeLayout();
    }
}
