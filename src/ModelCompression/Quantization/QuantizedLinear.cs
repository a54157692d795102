using System.Runtime.InteropServices;
using ModelCompression.Metrics;
using ModelCompression.Quantization.Kernels;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Quantization;

/// <summary>
/// A Linear layer with 1- to 8-bit integer weights (never a float copy) run on the library's own integer kernel
/// (<see cref="Int8Kernel"/>). Its input is quantized to 7-bit activations per call (dynamic), with a range fixed by
/// calibration (static), or per weight group (weight-only); the output is float32. An inference layer: calls are
/// thread-safe and do not train.
/// </summary>
/// <remarks>
/// Stored tensors: <c>weight</c> (int8 [out, in] at 8 bits; below that uint8 [out, ⌈in·bits/8⌉] packed LSB first —
/// two 4-bit weights per byte, low nibble first; eight binary weights per byte, 1 = +1), <c>weight_scale</c>
/// (float32, float16 for 4-bit), <c>bias</c> (float32), for static quantization <c>input_scale</c> and
/// <c>input_zero_point</c>, and for HQQ's asymmetric weights <c>weight_zero_point</c> (float16, one per scale: the
/// weight is scale × (level − zero point)), and for AWQ's explicit scales <c>input_channel_scale</c> (float32 [in]:
/// the stored weight is W·diag(s) and the input is divided by s first, where no preceding layer could absorb 1/s).
/// </remarks>
public sealed class QuantizedLinear : QuantizedLayer
{
    private readonly Tensor weight;
    private readonly Tensor weight_scale;
    private readonly Tensor? bias;
    private readonly Tensor? input_scale;
    private readonly Tensor? input_zero_point;
    private readonly Tensor? weight_zero_point;
    private readonly Tensor? input_channel_scale;

    internal QuantizedLinear(QuantizedMatrix matrix, ActivationSettings activations, bool fusedRelu, QuantizationMode mode)
        : base(nameof(QuantizedLinear), matrix, activations, fusedRelu, mode)
    {
        (weight, weight_scale, bias, input_scale, input_zero_point, weight_zero_point, input_channel_scale) = QuantizedTensors.Create(matrix, activations, [matrix.N, matrix.K]);
        RegisterComponents();
    }

    /// <inheritdoc/>
    private protected override StoredTensors Stored => new(weight, weight_scale, bias, input_scale, input_zero_point, weight_zero_point, input_channel_scale);

    /// <summary>Gets the input features.</summary>
    public long InFeatures => Matrix.K;

    /// <summary>Gets the output features.</summary>
    public long OutFeatures => Matrix.N;

    /// <inheritdoc/>
    public override long CountMacs(Tensor input, Tensor output) => output.numel() * Matrix.K;

    /// <inheritdoc/>
    private protected override long[] WeightShape => [Matrix.N, Matrix.K];

    /// <summary>Quantizes a Linear layer (which is not changed) for dynamic or weight-only use.</summary>
    /// <param name="linear">The layer; its weight must be finite.</param>
    /// <param name="bits">8 or 4.</param>
    /// <param name="granularity">The weight scales' granularity; 4 bits need <see cref="QuantizationGranularity.PerGroup"/>.</param>
    /// <param name="activationGranularity">For dynamic quantization: per batch or per row. Ignored for weight-only (always per row and group).</param>
    /// <param name="weightOnly">Whether activations are quantized per weight group (weight-only) instead of dynamically.</param>
    /// <returns>The quantized layer, on the CPU.</returns>
    /// <exception cref="ArgumentException">The weight is not finite, or the options do not fit the layer.</exception>
    public static QuantizedLinear FromLinear(
        Linear linear,
        int bits = 8,
        QuantizationGranularity? granularity = null,
        DynamicActivationGranularity activationGranularity = DynamicActivationGranularity.PerRow,
        bool weightOnly = false)
    {
        ArgumentNullException.ThrowIfNull(linear);
        granularity ??= bits == 4 ? QuantizationGranularity.PerGroup(64) : QuantizationGranularity.PerChannel;
        var mode = ActivationMode.PerRow;
        if (weightOnly)
        {
            mode = granularity is PerGroupGranularity ? ActivationMode.PerBlock : ActivationMode.PerRow;
        }
        else if (activationGranularity == DynamicActivationGranularity.PerTensor)
        {
            mode = ActivationMode.PerTensor;
        }

        var quantMode = weightOnly ? (bits == 4 ? QuantizationMode.WeightOnlyInt4 : QuantizationMode.WeightOnlyInt8) : QuantizationMode.DynamicInt8;
        return Create(linear, bits, granularity, new ActivationSettings(mode, 0, 0, false), false, quantMode);
    }

    internal static QuantizedLinear Create(Linear linear, int bits, QuantizationGranularity granularity, ActivationSettings activations, bool fusedRelu, QuantizationMode mode, float[]? inputScales = null)
    {
        using var scope = NewDisposeScope();
        var matrix = QuantizedTensors.QuantizeWeight(Scaling.LayerNormScaling.ScaledWeight(linear, inputScales), linear.bias, bits, granularity, "Linear");
        return new QuantizedLinear(inputScales is null ? matrix : matrix.WithInputScales(inputScales), activations, fusedRelu, mode);
    }

    /// <inheritdoc/>
    public override Tensor forward(Tensor input)
    {
        ArgumentNullException.ThrowIfNull(input);
        var matrix = Matrix;
        if (input.dim() == 0 || input.shape[^1] != matrix.K)
        {
            throw new ArgumentException($"QuantizedLinear expects inputs with {matrix.K} features in the last dimension; got [{string.Join(", ", input.shape)}].", nameof(input));
        }

        if (input.dim() == 2 && input.dtype == ScalarType.Float32 && input.device_type == DeviceType.CPU && input.is_contiguous() && !input.requires_grad)
        {
            // The common case needs no conversion: every extra tensor op costs a native call per layer.
            return matrix.Run(input, Activations, FusedRelu, KernelPath);
        }

        using var scope = NewDisposeScope();
        var leading = input.shape[..^1];
        long rows = leading.Aggregate(1L, (a, b) => a * b);
        var x = input.detach().to(ScalarType.Float32).cpu().reshape(rows, matrix.K).contiguous();
        var y = matrix.Run(x, Activations, FusedRelu, KernelPath);
        return y.reshape([.. leading, matrix.N]).to(input.dtype).to(input.device).MoveToOuterDisposeScope();
    }

    /// <inheritdoc/>
    public override string ToString() =>
        $"QuantizedLinear(in={Matrix.K}, out={Matrix.N}, {Mode}, int{Matrix.Bits} {Matrix.Granularity}{(Matrix.InputScales is null ? string.Empty : ", input scales")}{(FusedRelu ? ", relu" : string.Empty)})";
}
