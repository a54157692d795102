using ModelCompression.Modules;
using ModelCompression.Pruning.Structured;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Pruning;

/// <summary>What an importance criterion sees of one producing layer: its weights and, for Taylor, its activations' statistics.</summary>
public sealed class ChannelImportanceContext
{
    internal ChannelImportanceContext(string layerName, nn.Module layer, IReadOnlyList<nn.Module> batchNorms, Tensor? taylorScores)
    {
        LayerName = layerName;
        Layer = layer;
        BatchNorms = batchNorms;
        TaylorScores = taylorScores;
    }

    /// <summary>Gets the dotted name of the producing layer.</summary>
    public string LayerName { get; }

    /// <summary>Gets the producing layer (Linear, Conv1d, Conv2d, or a kind whose registered descriptor describes its channels).</summary>
    public nn.Module Layer { get; }

    /// <summary>Gets the BatchNorm layers that normalise these channels (two in a residual group, one per branch; none without BatchNorm).</summary>
    public IReadOnlyList<nn.Module> BatchNorms { get; }

    /// <summary>Gets the first-order Taylor scores of the layer's output channels, when the criterion asked for them.</summary>
    public Tensor? TaylorScores { get; }

    /// <summary>
    /// Gets the layer's weight with output channels first: the tensor its registered descriptor's
    /// <see cref="LayerDescriptor.GetChannelWeight"/> names (by default the layer's own parameter named <c>weight</c>).
    /// </summary>
    /// <exception cref="InvalidOperationException">The layer has no such weight: use an activation-based criterion such as Taylor, or override <see cref="LayerDescriptor.GetChannelWeight"/>.</exception>
    public Tensor Weight =>
        (LayerRegistry.Find(Layer) is { } descriptor ? descriptor.GetChannelWeight(Layer) : LayerDescriptor.OwnWeight(Layer))
        ?? throw new InvalidOperationException($"Layer '{LayerName}' ({Layer.GetType().Name}) has no weight to score its channels by: use {nameof(TaylorImportance)}, or override {nameof(LayerDescriptor)}.{nameof(LayerDescriptor.GetChannelWeight)} in its descriptor.");
}

/// <summary>
/// Scores the output channels of a layer: the channels with the lowest scores are removed. One score per channel,
/// non-negative; scores of layers pruned together (a residual group) are added.
/// </summary>
public interface IChannelImportance
{
    /// <summary>Gets whether the criterion needs activation × gradient statistics from training batches.</summary>
    bool NeedsTaylorScores { get; }

    /// <summary>Returns one score per output channel of <see cref="ChannelImportanceContext.Layer"/>.</summary>
    /// <param name="context">The layer and its statistics.</param>
    /// <returns>A float tensor of shape [channels]; the caller disposes it.</returns>
    Tensor Score(ChannelImportanceContext context);
}

/// <summary>The L1 norm of each output channel's weights (Li et al. 2017, "Pruning Filters for Efficient ConvNets").</summary>
public sealed class L1Importance : IChannelImportance
{
    /// <inheritdoc/>
    public bool NeedsTaylorScores => false;

    /// <inheritdoc/>
    public Tensor Score(ChannelImportanceContext context)
    {
        ArgumentNullException.ThrowIfNull(context);
        using var noGrad = no_grad();
        var w = context.Weight.detach();
        return w.abs().reshape(w.shape[0], -1).sum(1).to(float32);
    }

    /// <inheritdoc/>
    public override string ToString() => "L1";
}

/// <summary>The L2 norm of each output channel's weights.</summary>
public sealed class L2Importance : IChannelImportance
{
    /// <inheritdoc/>
    public bool NeedsTaylorScores => false;

    /// <inheritdoc/>
    public Tensor Score(ChannelImportanceContext context)
    {
        ArgumentNullException.ThrowIfNull(context);
        using var noGrad = no_grad();
        var w = context.Weight.detach();
        return w.square().reshape(w.shape[0], -1).sum(1).sqrt().to(float32);
    }

    /// <inheritdoc/>
    public override string ToString() => "L2";
}

/// <summary>
/// The magnitude of the BatchNorm scale (γ) behind each channel (Liu et al. 2017, "network slimming"), averaged over
/// the BatchNorm layers of the group. Layers with no BatchNorm behind them fall back to the L1 norm.
/// </summary>
public sealed class BatchNormScaleImportance : IChannelImportance
{
    /// <inheritdoc/>
    public bool NeedsTaylorScores => false;

    /// <inheritdoc/>
    public Tensor Score(ChannelImportanceContext context)
    {
        ArgumentNullException.ThrowIfNull(context);
        using var noGrad = no_grad();
        var gammas = context.BatchNorms
            .Select(bn => bn.named_parameters(recurse: false).FirstOrDefault(p => p.name == "weight").parameter)
            .Where(g => g is not null)
            .ToList();
        if (gammas.Count == 0)
        {
            return new L1Importance().Score(context);
        }

        using var scope = NewDisposeScope();
        return stack(gammas.Select(g => g.detach().abs().to(float32)).ToList()).mean([0L]).MoveToOuterDisposeScope();
    }

    /// <inheritdoc/>
    public override string ToString() => "BatchNorm scale";
}

/// <summary>
/// First-order Taylor expansion of the loss change when a channel is removed (Molchanov et al. 2017): the mean over
/// training batches of |mean over batch and positions of activation × gradient|.
/// </summary>
/// <param name="batches">The training batches averaged. The default is 8.</param>
public sealed class TaylorImportance(int batches = 8) : IChannelImportance
{
    /// <summary>Gets the number of training batches averaged.</summary>
    public int Batches { get; } = batches > 0 ? batches : throw new ArgumentOutOfRangeException(nameof(batches), batches, "Must be positive.");

    /// <inheritdoc/>
    public bool NeedsTaylorScores => true;

    /// <inheritdoc/>
    public Tensor Score(ChannelImportanceContext context)
    {
        ArgumentNullException.ThrowIfNull(context);
        return (context.TaylorScores ?? throw new InvalidOperationException("The Taylor criterion needs scores from training batches.")).clone();
    }

    /// <inheritdoc/>
    public override string ToString() => $"Taylor ({Batches} batches)";
}
