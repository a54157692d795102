namespace ModelCompression.Quantization;

/// <summary>
/// How many weights share one scale: the whole tensor, each output channel, or each group of consecutive inputs of
/// an output channel. Use <see cref="PerTensor"/>, <see cref="PerChannel"/> or <see cref="PerGroup"/>.
/// </summary>
public abstract class QuantizationGranularity
{
    private protected QuantizationGranularity()
    {
    }

    /// <summary>Gets one scale for the whole weight tensor.</summary>
    public static QuantizationGranularity PerTensor { get; } = new PerTensorGranularity();

    /// <summary>Gets one scale per output channel (row of a Linear weight, filter of a convolution).</summary>
    public static QuantizationGranularity PerChannel { get; } = new PerChannelGranularity();

    /// <summary>
    /// One scale per output channel and group of <paramref name="size"/> consecutive inputs. A layer with fewer inputs
    /// than <paramref name="size"/> uses its whole row as one group and reports PerGroup(its input count); a layer whose
    /// inputs are not a multiple of <paramref name="size"/> ends each row with a shorter group.
    /// </summary>
    /// <param name="size">The inputs per group: a positive multiple of 8.</param>
    /// <returns>The granularity (validated by the options that use it).</returns>
    public static QuantizationGranularity PerGroup(int size) => new PerGroupGranularity(size);

    /// <summary>Lists what is invalid about this granularity, as the options property <paramref name="property"/> of <paramref name="owner"/>.</summary>
    internal virtual IEnumerable<string> Errors(string owner, string property) => [];
}

/// <summary>One scale for the whole tensor.</summary>
public sealed class PerTensorGranularity : QuantizationGranularity
{
    internal PerTensorGranularity()
    {
    }

    /// <inheritdoc/>
    public override string ToString() => "per-tensor";
}

/// <summary>One scale per output channel.</summary>
public sealed class PerChannelGranularity : QuantizationGranularity
{
    internal PerChannelGranularity()
    {
    }

    /// <inheritdoc/>
    public override string ToString() => "per-channel";
}

/// <summary>One scale per output channel and group of consecutive inputs.</summary>
public sealed class PerGroupGranularity : QuantizationGranularity
{
    internal PerGroupGranularity(int size) => Size = size;

    /// <summary>
    /// Gets the inputs per group. Options take a positive multiple of 8; a layer reports its own input count here
    /// (any positive number) when that is smaller, its whole row being one group.
    /// </summary>
    public int Size { get; }

    /// <inheritdoc/>
    internal override IEnumerable<string> Errors(string owner, string property)
    {
        if (Size <= 0 || Size % 8 != 0)
        {
            yield return $"{owner}.{property}: the group size must be a positive multiple of 8 (was {Size}).";
        }
    }

    /// <inheritdoc/>
    public override string ToString() => $"per-group({Size})";
}

/// <summary>How dynamic quantization ranges its activations at run time.</summary>
public enum DynamicActivationGranularity
{
    /// <summary>One range for the whole batch of each call.</summary>
    PerTensor,

    /// <summary>One range per row (sample, or output pixel of a convolution): more accurate, a little slower.</summary>
    PerRow,
}

/// <summary>What <see cref="PostTrainingQuantizationStep"/> produces.</summary>
public enum QuantizationMode
{
    /// <summary>int8 weights; activations quantized at run time from each call's range (no calibration).</summary>
    DynamicInt8,

    /// <summary>int8 weights and activations, activation ranges fixed from calibration data by an observer; BatchNorm folded, ReLU fused.</summary>
    StaticInt8,

    /// <summary>int8 weights per channel or group; no calibration, the kernel quantizes each row's activations per weight group.</summary>
    WeightOnlyInt8,

    /// <summary>int4 weights in groups (two per byte); no calibration, the kernel quantizes each row's activations per weight group.</summary>
    WeightOnlyInt4,

    /// <summary>IEEE float16 weights (see <see cref="HalfPrecisionLayer"/>).</summary>
    Float16,

    /// <summary>bfloat16 weights (see <see cref="HalfPrecisionLayer"/>).</summary>
    BFloat16,
}
