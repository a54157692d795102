namespace ModelCompression.Modules;

/// <summary>How a layer's output channels depend on its input channels, as structured pruning needs to know it.</summary>
public enum ChannelCoupling
{
    /// <summary>
    /// Output channel c depends on input channel c alone (a normalisation, a per-channel scale or gate, a depthwise
    /// filter): the layer's input and output channels are one group, pruned together, and the layer is shrunk to the
    /// kept channels.
    /// </summary>
    PerChannel,

    /// <summary>
    /// Any output channel may read any input channel (a linear map, a convolution): the layer's input channels are
    /// pruned with the group that reaches it, and its output channels start a group of their own.
    /// </summary>
    Dense,
}

/// <summary>
/// What structured pruning needs to know about the channels of one layer, given by
/// <see cref="LayerDescriptor.DescribeChannels"/>.
/// </summary>
/// <remarks>
/// Channels are in dimension 1 of the layer's input and output ([N, C, …]), or in the last dimension when the layer
/// reads a sequence whose channels are there ([N, L, E] after a <c>Linear</c>). The tracer checks the counts against the
/// tensors the layer actually receives and returns, and leaves every group unpruned when they disagree.
/// </remarks>
/// <param name="Coupling">How output channels depend on input channels.</param>
/// <param name="InputChannels">The channels the layer reads.</param>
/// <param name="OutputChannels">The channels the layer writes; equal to <paramref name="InputChannels"/> for <see cref="ChannelCoupling.PerChannel"/>.</param>
public sealed record ChannelDescription(ChannelCoupling Coupling, long InputChannels, long OutputChannels)
{
    /// <summary>A layer whose output channel c depends on its input channel c alone.</summary>
    /// <param name="channels">The channels the layer reads and writes.</param>
    /// <returns>The description.</returns>
    public static ChannelDescription PerChannel(long channels) => new(ChannelCoupling.PerChannel, channels, channels);

    /// <summary>A layer whose output channels may each read every input channel.</summary>
    /// <param name="inputChannels">The channels the layer reads.</param>
    /// <param name="outputChannels">The channels the layer writes.</param>
    /// <returns>The description.</returns>
    public static ChannelDescription Dense(long inputChannels, long outputChannels) => new(ChannelCoupling.Dense, inputChannels, outputChannels);

    /// <summary>Why the description is impossible, or <see langword="null"/> when it is consistent.</summary>
    internal string? Problem() =>
        InputChannels < 1 || OutputChannels < 1 ? $"it gives {InputChannels} input and {OutputChannels} output channels; both must be positive"
        : Coupling == ChannelCoupling.PerChannel && InputChannels != OutputChannels ? $"it calls the layer per-channel with {InputChannels} input and {OutputChannels} output channels"
        : !Enum.IsDefined(Coupling) ? $"its coupling {(int)Coupling} is not a {nameof(ChannelCoupling)}"
        : null;
}
