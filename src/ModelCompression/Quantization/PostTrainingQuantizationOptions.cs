using ModelCompression.Modules;

namespace ModelCompression.Quantization;

/// <summary>Options of <see cref="PostTrainingQuantizationStep"/>.</summary>
public sealed class PostTrainingQuantizationOptions : IValidatableOptions
{
    /// <summary>Gets or sets what to produce.</summary>
    /// <value>The default is <see cref="QuantizationMode.DynamicInt8"/>.</value>
    public QuantizationMode Mode { get; set; } = QuantizationMode.DynamicInt8;

    /// <summary>Gets or sets the layers to quantize. Selected layers that cannot be quantized stay in float and are listed in the report.</summary>
    /// <value>
    /// The default is <see cref="DefaultLayers"/>: every Linear and Conv2d layer, and TorchSharp's recurrent,
    /// attention, Conv1d, Conv3d, transposed-convolution and RNN-cell modules (whose weights are rounded in place, see
    /// <see cref="FixedTypeLayers"/>). A leaf kind an application registers with the layer registry is rounded in place
    /// too when the selection names its type.
    /// </value>
    public LayerSelection Layers { get; set; } = DefaultLayers;

    /// <summary>
    /// Gets a new selection of what post-training quantization converts by default: Linear and Conv2d layers,
    /// TorchSharp's natively implemented LSTM, GRU, RNN, MultiheadAttention, TransformerEncoderLayer,
    /// TransformerEncoder, TransformerDecoderLayer and TransformerDecoder (as PyTorch's dynamic quantization covers
    /// Linear and recurrent layers), and the leaf kinds with a weight but no integer kernel here: Conv1d, Conv3d,
    /// ConvTranspose1d/2d/3d, GRUCell, LSTMCell and RNNCell (rounded in place).
    /// </summary>
    public static LayerSelection DefaultLayers => new() { Types = [typeof(TorchSharp.Modules.Linear), typeof(TorchSharp.Modules.Conv2d), .. InPlaceQuantization.NativeKinds, .. InPlaceQuantization.LeafKinds] };

    /// <summary>
    /// Gets or sets what happens to a selected layer that a quantized layer cannot replace: its parent holds it in a
    /// field typed <c>Linear</c> or <c>Conv2d</c>, or it is one of TorchSharp's natively implemented recurrent or
    /// attention modules (sealed types with no integer kernel here). For <see cref="QuantizationMode.Float16"/> and
    /// <see cref="QuantizationMode.BFloat16"/>, <see cref="FixedTypeLayers.CompressInPlace"/> rounds its parameters to the
    /// 16-bit values in place, as <see cref="HalfPrecisionOptions.FixedTypeLayers"/> does. For the integer modes it
    /// rounds each weight (every floating-point parameter of two or more dimensions; biases and norms stay) in place to
    /// int8 levels with a scale per row (int4 with <see cref="QuantizationMode.WeightOnlyInt4"/>, a scale per group of
    /// <see cref="WeightGranularity"/>): the layer keeps its type and computes in float with those values, and the
    /// compressed file stores them as levels and scales, about a quarter (an eighth) of float32. Either way the layer
    /// is named in the report and logged as a warning.
    /// </summary>
    /// <value>The default is <see cref="FixedTypeLayers.CompressInPlace"/>.</value>
    public FixedTypeLayers FixedTypeLayers { get; set; } = FixedTypeLayers.CompressInPlace;

    /// <summary>Gets or sets how many weights share a scale.</summary>
    /// <value>
    /// The default (<see langword="null"/>) is <see cref="QuantizationGranularity.PerChannel"/> for 8 bits and
    /// <see cref="QuantizationGranularity.PerGroup"/>(64) for 4 bits, which needs groups.
    /// </value>
    /// <remarks>
    /// Groups run along each output's K inputs (a convolution's input channels × kernel height × width). A layer with
    /// K at most the group size gets one group per row, the whole row: its <see cref="IQuantizedLayer.WeightGranularity"/>
    /// reports <see cref="QuantizationGranularity.PerGroup"/>(K) (e.g. per-group(27) for a 3-channel 3×3 convolution
    /// under the default 64), and the report's notes list such layers. When K is larger but not a multiple of the group
    /// size, each row ends with a shorter group of the K mod size remaining inputs, with its own scale (e.g. 784
    /// inputs in groups of 64: twelve groups of 64 and one of 16). Either way the layer saves and loads exactly.
    /// </remarks>
    public QuantizationGranularity? WeightGranularity { get; set; }

    /// <summary>Gets or sets how <see cref="QuantizationMode.DynamicInt8"/> ranges activations at run time.</summary>
    /// <value>The default is <see cref="DynamicActivationGranularity.PerRow"/>.</value>
    public DynamicActivationGranularity DynamicActivations { get; set; } = DynamicActivationGranularity.PerRow;

    /// <summary>Gets or sets how <see cref="QuantizationMode.StaticInt8"/> chooses activation ranges from calibration data.</summary>
    /// <value>The default is <see cref="ActivationObserver.Mse"/>.</value>
    public ActivationObserver Observer { get; set; } = ActivationObserver.Mse;

    /// <summary>Gets or sets whether activation ranges are symmetric around zero (zero point fixed at the middle level) instead of asymmetric.</summary>
    /// <value>The default is <see langword="false"/>.</value>
    public bool SymmetricActivations { get; set; }

    /// <summary>Gets or sets the calibration batches static quantization observes (and the first of which measures each layer's error).</summary>
    /// <value>The default is 8; at least 1.</value>
    public int CalibrationBatches { get; set; } = 8;

    /// <summary>Gets or sets the calibration batch size.</summary>
    /// <value>The default is 128; at least 1.</value>
    public int CalibrationBatchSize { get; set; } = 128;

    /// <summary>
    /// Gets or sets whether a BatchNorm that directly follows a quantized Conv2d or Linear in a Sequential is folded
    /// into its weights (the BatchNorm becomes an Identity).
    /// </summary>
    /// <value>The default is <see langword="true"/>.</value>
    public bool FoldBatchNorm { get; set; } = true;

    /// <summary>Gets or sets whether a ReLU that directly follows a quantized layer in a Sequential is applied by the kernel (the ReLU becomes an Identity).</summary>
    /// <value>The default is <see langword="true"/>.</value>
    public bool FuseRelu { get; set; } = true;

    /// <summary>Gets or sets the sensitivity-driven fallback: keep the most sensitive layers in float until the accuracy on calibration data is close enough.</summary>
    /// <value>The default is <see langword="null"/> (every selected layer is quantized).</value>
    public QuantizationFallback? Fallback { get; set; }

    /// <summary>
    /// Gets or sets whether each quantized layer is timed against its float original (paired, at batch 1 and 64, on
    /// the layer's input shape from calibration) and kept in float when it is not faster at either. Quantized layers
    /// are always smaller; this trades some of that size for never being slower.
    /// </summary>
    /// <value>The default is <see langword="false"/>: every selected layer is quantized.</value>
    public bool KeepFloatWhenSlower { get; set; }

    /// <summary>Gets or sets how weights are put on the integer grid: <see cref="WeightRounding.Nearest"/>, <see cref="WeightRounding.Gptq"/> or <see cref="WeightRounding.Hqq"/>.</summary>
    /// <value>The default is <see cref="WeightRounding.Nearest"/>.</value>
    public WeightRounding Rounding { get; set; } = WeightRounding.Nearest;

    /// <summary>
    /// Gets or sets AWQ's activation-aware scaling, applied before rounding in the weight-only modes; <see langword="null"/>
    /// (the default) for none. See <see cref="AwqOptions"/>.
    /// </summary>
    public AwqOptions? Awq { get; set; }

    /// <summary>
    /// Gets or sets SmoothQuant's migration of activation outliers into the weights, applied before quantizing in the int8
    /// modes that quantize activations; <see langword="null"/> (the default) for none. See <see cref="SmoothQuantOptions"/>.
    /// </summary>
    public SmoothQuantOptions? SmoothQuant { get; set; }

    /// <summary>
    /// Gets or sets the bits per weight of the weight-only modes: 2, 3 or 4 under <see cref="QuantizationMode.WeightOnlyInt4"/>
    /// (levels ±1, ±3 or ±7) and 5 to 8 under <see cref="QuantizationMode.WeightOnlyInt8"/>; the file stores that many
    /// bits per weight before entropy coding.
    /// </summary>
    /// <value>The default (<see langword="null"/>) is 4 and 8 respectively; the activation-quantizing modes use 8.</value>
    public int? WeightBits { get; set; }

    internal int Bits => WeightBits ?? (Mode == QuantizationMode.WeightOnlyInt4 ? 4 : 8);

    internal bool IsInteger => Mode is QuantizationMode.DynamicInt8 or QuantizationMode.StaticInt8 or QuantizationMode.WeightOnlyInt8 or QuantizationMode.WeightOnlyInt4;

    internal QuantizationGranularity EffectiveGranularity =>
        WeightGranularity ?? (Mode == QuantizationMode.WeightOnlyInt4 ? QuantizationGranularity.PerGroup(64) : QuantizationGranularity.PerChannel);

    /// <inheritdoc/>
    public IReadOnlyList<string> Validate()
    {
        const string Owner = nameof(PostTrainingQuantizationOptions);
        var errors = new List<string>();
        if (!Enum.IsDefined(Mode))
        {
            errors.Add($"{Owner}.{nameof(Mode)} is not a known mode (was {(int)Mode}).");
        }

        if (!Enum.IsDefined(DynamicActivations))
        {
            errors.Add($"{Owner}.{nameof(DynamicActivations)} is not a known granularity (was {(int)DynamicActivations}).");
        }

        errors.AddRange(WeightGranularity?.Errors(Owner, nameof(WeightGranularity)) ?? []);

        if (Mode == QuantizationMode.WeightOnlyInt4 && WeightGranularity is not (null or PerGroupGranularity))
        {
            errors.Add($"{Owner}.{nameof(WeightGranularity)}: 4-bit weights need per-group scales (was {WeightGranularity}); 15 levels per channel lose too much.");
        }

        if (Mode is QuantizationMode.DynamicInt8 or QuantizationMode.StaticInt8 && WeightGranularity is PerGroupGranularity)
        {
            errors.Add($"{Owner}.{nameof(WeightGranularity)}: per-group scales are for the weight-only modes; {Mode} uses per-tensor or per-channel weights.");
        }

        if (Observer is null)
        {
            errors.Add($"{Owner}.{nameof(Observer)} is required.");
        }
        else
        {
            errors.AddRange(Observer.Validate().Select(e => $"{Owner}.{nameof(Observer)}: {e}"));
        }

        if (CalibrationBatches < 1)
        {
            errors.Add($"{Owner}.{nameof(CalibrationBatches)} must be at least 1 (was {CalibrationBatches}).");
        }

        if (CalibrationBatchSize < 1)
        {
            errors.Add($"{Owner}.{nameof(CalibrationBatchSize)} must be at least 1 (was {CalibrationBatchSize}).");
        }

        if (!Enum.IsDefined(FixedTypeLayers))
        {
            errors.Add($"{Owner}.{nameof(FixedTypeLayers)} is not a known choice (was {(int)FixedTypeLayers}).");
        }

        if (WeightBits is { } bits && !(Mode == QuantizationMode.WeightOnlyInt4 ? bits is >= 2 and <= 4 : Mode == QuantizationMode.WeightOnlyInt8 && bits is >= 5 and <= 8))
        {
            errors.Add($"{Owner}.{nameof(WeightBits)} must be 2 to 4 under {nameof(QuantizationMode.WeightOnlyInt4)} and 5 to 8 under {nameof(QuantizationMode.WeightOnlyInt8)}; other modes use 8 bits (was {bits} under {Mode}).");
        }

        if (Rounding is null)
        {
            errors.Add($"{Owner}.{nameof(Rounding)} is required.");
        }
        else
        {
            errors.AddRange(Rounding.Errors($"{Owner}.{nameof(Rounding)}"));
            if (Rounding is GptqRounding && !IsInteger)
            {
                errors.Add($"{Owner}.{nameof(Rounding)}: GPTQ rounds onto an integer grid; {Mode} has none.");
            }

            if (Rounding is HqqRounding && Mode is not (QuantizationMode.WeightOnlyInt4 or QuantizationMode.WeightOnlyInt8))
            {
                errors.Add($"{Owner}.{nameof(Rounding)}: HQQ's asymmetric weights run in the weight-only modes; {Mode} is not one.");
            }

            if (Rounding is HqqRounding && WeightGranularity is PerTensorGranularity)
            {
                errors.Add($"{Owner}.{nameof(Rounding)}: HQQ needs a scale and zero point per row or per group; {nameof(WeightGranularity)} is per tensor.");
            }

            if (Rounding is GptqRounding && WeightGranularity is PerTensorGranularity)
            {
                errors.Add($"{Owner}.{nameof(Rounding)}: GPTQ needs a scale per row or per group; {nameof(WeightGranularity)} is per tensor.");
            }
        }

        if (Awq is not null)
        {
            errors.AddRange(Awq.Errors($"{Owner}.{nameof(Awq)}"));
            if (Mode is not (QuantizationMode.WeightOnlyInt4 or QuantizationMode.WeightOnlyInt8))
            {
                errors.Add($"{Owner}.{nameof(Awq)} applies to the weight-only modes; {Mode} quantizes activations too (SmoothQuant's migration is what balances those).");
            }
        }

        if (SmoothQuant is not null)
        {
            errors.AddRange(SmoothQuant.Errors($"{Owner}.{nameof(SmoothQuant)}"));
            if (Mode is not (QuantizationMode.StaticInt8 or QuantizationMode.DynamicInt8))
            {
                errors.Add($"{Owner}.{nameof(SmoothQuant)} applies to the modes that quantize activations (StaticInt8, DynamicInt8); {Mode} does not.");
            }
        }

        OptionsValidationException.AddNested(errors, Owner, nameof(Layers), Layers?.Validate());
        if (Fallback is not null)
        {
            OptionsValidationException.AddNested(errors, Owner, nameof(Fallback), Fallback.Validate());
        }

        return errors;
    }

    internal PostTrainingQuantizationOptions Clone() => new()
    {
        Mode = Mode,
        Layers = Layers.Copy(),
        FixedTypeLayers = FixedTypeLayers,
        WeightGranularity = WeightGranularity,
        DynamicActivations = DynamicActivations,
        Observer = Observer,
        SymmetricActivations = SymmetricActivations,
        CalibrationBatches = CalibrationBatches,
        CalibrationBatchSize = CalibrationBatchSize,
        FoldBatchNorm = FoldBatchNorm,
        FuseRelu = FuseRelu,
        KeepFloatWhenSlower = KeepFloatWhenSlower,
        Rounding = Rounding,
        WeightBits = WeightBits,
        Awq = Awq?.Clone(),
        SmoothQuant = SmoothQuant is null ? null : new SmoothQuantOptions { MigrationStrength = SmoothQuant.MigrationStrength },
        Fallback = Fallback is null ? null : new QuantizationFallback { MaxAccuracyDrop = Fallback.MaxAccuracyDrop, MaxFloatLayers = Fallback.MaxFloatLayers },
    };
}

/// <summary>
/// Sensitivity-driven fallback: after quantizing, the step measures the metric on calibration data and, while it
/// has dropped by more than <see cref="MaxAccuracyDrop"/>, returns the quantized layer with the lowest SQNR to float.
/// </summary>
public sealed class QuantizationFallback
{
    /// <summary>Gets or sets the largest drop of the evaluator's metric on calibration data accepted before layers return to float.</summary>
    /// <value>The default is 0.003 (0.3 points of accuracy); 0 to 1.</value>
    public double MaxAccuracyDrop { get; set; } = 0.003;

    /// <summary>Gets or sets the most layers that may return to float.</summary>
    /// <value>The default is <see langword="null"/>: as many as needed.</value>
    public int? MaxFloatLayers { get; set; }

    /// <summary>Lists invalid settings.</summary>
    /// <returns>One message per invalid setting.</returns>
    public IReadOnlyList<string> Validate()
    {
        var errors = new List<string>();
        if (!(MaxAccuracyDrop is >= 0 and <= 1))
        {
            errors.Add($"{nameof(MaxAccuracyDrop)} must be in [0, 1] (was {MaxAccuracyDrop}).");
        }

        if (MaxFloatLayers is < 1)
        {
            errors.Add($"{nameof(MaxFloatLayers)} must be at least 1 (was {MaxFloatLayers}).");
        }

        return errors;
    }
}
