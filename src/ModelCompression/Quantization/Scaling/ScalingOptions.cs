namespace ModelCompression.Quantization;

/// <summary>
/// Options of AWQ's activation-aware scaling (<see cref="PostTrainingQuantizationOptions.Awq"/>; Lin et al., MLSys 2024):
/// the Linear layers that read one LayerNorm's output get per-input-channel scales s = mean|x|^α, folded into that
/// LayerNorm (its weight and bias divided by s, the layers' weights multiplied), with α chosen on the calibration
/// inputs for the smallest output error after rounding. The float model computes the same; the salient input
/// channels' weights lose less to rounding.
/// </summary>
/// <remarks>
/// Linear layers whose input is not a LayerNorm's output (an attention's output projection, an MLP's second layer)
/// cannot fold: no layer before them absorbs the inverse scale. With <see cref="ExplicitScales"/> they get their own α
/// search on their inputs and keep the scales as a stored tensor (<c>input_channel_scale</c> of
/// <see cref="QuantizedLinear"/>). AWQ composes with every rounding (<see cref="WeightRounding.Nearest"/>,
/// <see cref="WeightRounding.Gptq"/>, <see cref="WeightRounding.Hqq"/>), which then rounds the scaled weights.
/// Calibration holds the inputs of one layer per LayerNorm, at most <see cref="MaxRows"/> rows each, and then one
/// unfolded layer's rows at a time (one calibration pass per such layer).
/// </remarks>
public sealed class AwqOptions
{
    /// <summary>Gets or sets the number of exponents α tried, evenly from 0 (no scaling) to below 1.</summary>
    /// <value>The default is 20 (AWQ's grid); at least 2.</value>
    public int GridPoints { get; set; } = 20;

    /// <summary>Gets or sets the most calibration rows (tokens) per LayerNorm used to measure the output error.</summary>
    /// <value>The default is 4,096; at least 1.</value>
    public int MaxRows { get; set; } = 4096;

    /// <summary>
    /// Gets or sets whether Linear layers whose input no LayerNorm produces (an attention's output projection, an MLP's
    /// second layer) get explicit per-input scales: the quantized layer stores W·diag(s) and divides its input by s,
    /// one elementwise division per call; the file and ONNX export carry s.
    /// </summary>
    /// <value>The default is <see langword="true"/>; a layer keeps no scales when none lowers its output error.</value>
    public bool ExplicitScales { get; set; } = true;

    /// <summary>
    /// Gets or sets whether each weight group's range is clipped where that lowers the group's output error after
    /// rounding (AWQ's clipping search), after scaling. Not with <see cref="WeightRounding.Hqq"/>, which fits ranges itself.
    /// The clamp is applied to the float weights before rounding: a layer that <see cref="PostTrainingQuantizationOptions.Fallback"/>
    /// or <see cref="PostTrainingQuantizationOptions.KeepFloatWhenSlower"/> keeps in float keeps its clipped weights.
    /// </summary>
    /// <value>The default is <see langword="true"/>.</value>
    public bool ClipSearch { get; set; } = true;

    /// <summary>Gets or sets the most a group's range is shrunk by the clipping search, as a fraction of its largest magnitude.</summary>
    /// <value>The default is 0.5 (AWQ's); above 0 and below 1.</value>
    public double MaxShrink { get; set; } = 0.5;

    /// <summary>Gets or sets the clipping search's grid: shrink factors are tried in steps of 1 / this.</summary>
    /// <value>The default is 20 (AWQ's); at least 2.</value>
    public int ClipGridPoints { get; set; } = 20;

    /// <summary>Gets or sets the calibration rows (tokens) the clipping search measures each layer's output error on, evenly spread.</summary>
    /// <value>The default is 512 (AWQ's); at least 1. The search holds rows × output features × groups floats at a time (in chunks of 256 outputs).</value>
    public int ClipRows { get; set; } = 512;

    internal AwqOptions Clone() => (AwqOptions)MemberwiseClone();

    internal IEnumerable<string> Errors(string owner)
    {
        if (!(MaxShrink > 0 && MaxShrink < 1))
        {
            yield return $"{owner}.{nameof(MaxShrink)} must be above 0 and below 1 (was {MaxShrink}).";
        }

        if (ClipGridPoints < 2)
        {
            yield return $"{owner}.{nameof(ClipGridPoints)} must be at least 2 (was {ClipGridPoints}).";
        }

        if (ClipRows < 1)
        {
            yield return $"{owner}.{nameof(ClipRows)} must be at least 1 (was {ClipRows}).";
        }

        if (GridPoints < 2)
        {
            yield return $"{owner}.{nameof(GridPoints)} must be at least 2 (was {GridPoints}).";
        }

        if (MaxRows < 1)
        {
            yield return $"{owner}.{nameof(MaxRows)} must be at least 1 (was {MaxRows}).";
        }
    }
}

/// <summary>
/// Options of SmoothQuant's migration (<see cref="PostTrainingQuantizationOptions.SmoothQuant"/>; Xiao et al.,
/// "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models", ICML 2023): before int8
/// quantization of weights and activations, each input channel of the Linear layers that read one LayerNorm's output is
/// divided by s = max|x|^α / max|w|^(1−α) in the LayerNorm and multiplied back in the weights, so activation outliers
/// move into the weights, whose per-channel scales absorb them. The float model computes the same.
/// </summary>
/// <remarks>
/// For <see cref="QuantizationMode.StaticInt8"/> (one activation range per layer, where outliers hurt most) and
/// <see cref="QuantizationMode.DynamicInt8"/>. Layers whose input is not a LayerNorm's output are not smoothed, and the
/// step's notes name them. Calibration holds the inputs of one layer per LayerNorm.
/// </remarks>
public sealed class SmoothQuantOptions
{
    /// <summary>Gets or sets the migration strength α: 0 leaves activations alone, 1 moves their whole range into the weights.</summary>
    /// <value>The default is 0.5 (SmoothQuant's for most models); 0 to 1.</value>
    public double MigrationStrength { get; set; } = 0.5;

    internal IEnumerable<string> Errors(string owner)
    {
        if (!(MigrationStrength >= 0 && MigrationStrength <= 1))
        {
            yield return $"{owner}.{nameof(MigrationStrength)} must be in [0, 1] (was {MigrationStrength}).";
        }
    }
}
