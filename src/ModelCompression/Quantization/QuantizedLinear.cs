using System.Runtime.InteropServices;
using ModelCompression.Metrics;
using ModelCompression.Quantization.Kernels;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Quantization;

/// <summary>
/// A Linear layer with 8-bit or 4-bit integer weights (never a float copy) run on the library's own integer kernel
/// (<see cref="Int8Kernel"/>). Its input is quantized to 7-bit activations per call (dynamic), with a range fixed by
/// calibration (static), or per weight group (weight-only); the output is float32. An inference layer: calls are
/// thread-safe and do not train.
/// </summary>
/// <remarks>
/// Stored tensors: <c>weight</c> (int8 [out, in], or uint8 [out, ⌈in/2⌉] holding two 4-bit weights per byte, low
/// nibble first), <c>weight_scale</c> (float32, float16 for 4-bit), <c>bias</c> (float32) and, for static
/// quantization, <c>input_scale</c> and <c>input_zero_point</c>.
/// </remarks>
public sealed class QuantizedLinear : nn.Module<Tensor, Tensor>, ICompressedLayer, IQuantizedLayer
{
    private readonly Tensor weight;
    private readonly Tensor weight_scale;
    private readonly Tensor? bias;
    private readonly Tensor? input_scale;
    private readonly Tensor? input_zero_point;
    private readonly QuantizedMatrix matrix;
    private readonly ActivationSettings activations;

    internal QuantizedLinear(QuantizedMatrix matrix, ActivationSettings activations, bool fusedRelu, QuantizationMode mode)
        : base(nameof(QuantizedLinear))
    {
        this.matrix = matrix;
        this.activations = activations;
        FusedRelu = fusedRelu;
        Mode = mode;
        (weight, weight_scale, bias, input_scale, input_zero_point) = QuantizedTensors.Create(matrix, activations, [matrix.N, matrix.K]);
        RegisterComponents();
    }

    /// <summary>Gets the input features.</summary>
    public long InFeatures => matrix.K;

    /// <summary>Gets the output features.</summary>
    public long OutFeatures => matrix.N;

    /// <inheritdoc/>
    public QuantizationMode Mode { get; }

    /// <inheritdoc/>
    public QuantizationGranularity WeightGranularity => matrix.Granularity;

    /// <inheritdoc/>
    public bool FusedRelu { get; }

    /// <inheritdoc/>
    public double? SqnrDb { get; internal set; }

    /// <summary>Gets or sets the kernel path. The default is <see cref="Int8Kernel.BestPath"/>; set another to compare paths.</summary>
    /// <exception cref="PlatformNotSupportedException">This machine cannot run the path (on the next call).</exception>
    public Int8KernelPath KernelPath { get; set; } = Int8Kernel.BestPath;

    /// <inheritdoc/>
    public int WeightBits => matrix.Bits;

    /// <inheritdoc/>
    public int? Rank => null;

    /// <inheritdoc/>
    public long ParameterCount => ((long)matrix.N * matrix.K) + (matrix.Bias?.Length ?? 0);

    /// <inheritdoc/>
    public long NonzeroParameterCount => matrix.Q.LongCount(v => v != 0) + (matrix.Bias?.LongCount(v => v != 0) ?? 0);

    /// <inheritdoc/>
    public long CountMacs(Tensor input, Tensor output) => output.numel() * matrix.K;

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

    internal static QuantizedLinear Create(Linear linear, int bits, QuantizationGranularity granularity, ActivationSettings activations, bool fusedRelu, QuantizationMode mode)
    {
        var matrix = QuantizedTensors.QuantizeWeight(linear.weight!, linear.bias, bits, granularity, "Linear");
        return new QuantizedLinear(matrix, activations, fusedRelu, mode);
    }

    /// <summary>Returns the float weight [out, in] that the stored integers and scales stand for.</summary>
    /// <returns>A new tensor the caller owns.</returns>
    public Tensor DequantizedWeight() => tensor(matrix.Dequantize(), [matrix.N, matrix.K]);

    /// <inheritdoc/>
    public override Tensor forward(Tensor input)
    {
        ArgumentNullException.ThrowIfNull(input);
        if (input.dim() == 0 || input.shape[^1] != matrix.K)
        {
            throw new ArgumentException($"QuantizedLinear expects inputs with {matrix.K} features in the last dimension; got [{string.Join(", ", input.shape)}].", nameof(input));
        }

        if (input.dim() == 2 && input.dtype == ScalarType.Float32 && input.device_type == DeviceType.CPU && input.is_contiguous() && !input.requires_grad)
        {
            // The common case needs no conversion: every extra tensor op costs a native call per layer.
            return matrix.Run(input, activations, FusedRelu, KernelPath);
        }

        using var scope = NewDisposeScope();
        var leading = input.shape[..^1];
        long rows = leading.Aggregate(1L, (a, b) => a * b);
        var x = input.detach().to(ScalarType.Float32).cpu().reshape(rows, matrix.K).contiguous();
        var y = matrix.Run(x, activations, FusedRelu, KernelPath);
        return y.reshape([.. leading, matrix.N]).to(input.dtype).to(input.device).MoveToOuterDisposeScope();
    }

    /// <inheritdoc/>
    public override string ToString() =>
        $"QuantizedLinear(in={matrix.K}, out={matrix.N}, {Mode}, int{matrix.Bits} {matrix.Granularity}{(FusedRelu ? ", relu" : string.Empty)})";
}

/// <summary>Describes a layer produced by post-training quantization or quantization-aware training.</summary>
public interface IQuantizedLayer : ICompressedLayer
{
    /// <summary>Gets what the layer computes with: dynamic, static or weight-only integers.</summary>
    QuantizationMode Mode { get; }

    /// <summary>Gets how many weights share a scale.</summary>
    QuantizationGranularity WeightGranularity { get; }

    /// <summary>Gets whether a following ReLU is applied by the kernel.</summary>
    bool FusedRelu { get; }

    /// <summary>
    /// Gets the signal-to-quantization-noise ratio of the layer's output in dB, measured on calibration data when
    /// the layer was made (higher is better; <see langword="null"/> when not measured).
    /// </summary>
    double? SqnrDb { get; }
}

/// <summary>The tensors a quantized layer stores, and weight quantization shared by the quantized layers.</summary>
internal static class QuantizedTensors
{
    public static QuantizedMatrix QuantizeWeight(Tensor weight, Tensor? bias, int bits, QuantizationGranularity granularity, string kind)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var w = weight.detach().to(ScalarType.Float32).cpu().reshape(weight.shape[0], -1).contiguous();
        if (!isfinite(w).all().item<bool>())
        {
            throw new ArgumentException($"The {kind} layer's weight holds NaN or infinite values.", nameof(weight));
        }

        float[]? b = null;
        if (bias is not null)
        {
            var bf = bias.detach().to(ScalarType.Float32).cpu().contiguous();
            if (!isfinite(bf).all().item<bool>())
            {
                throw new ArgumentException($"The {kind} layer's bias holds NaN or infinite values.", nameof(bias));
            }

            b = bf.data<float>().ToArray();
        }

        int n = checked((int)w.shape[0]);
        int k = checked((int)w.shape[1]);
        return QuantizedMatrix.FromFloat(MemoryMarshal.Cast<byte, float>(w.bytes), n, k, bits, granularity, b ?? [], b is not null);
    }

    public static (Tensor Weight, Tensor Scale, Tensor? Bias, Tensor? InputScale, Tensor? InputZeroPoint) Create(QuantizedMatrix matrix, ActivationSettings activations, long[] weightShape)
    {
        using var scope = NewDisposeScope();
        // 8 bits: int8 in the layer's shape; fewer: bit-packed rows (two int4 per byte, eight signs per byte, ...).
        var weight = matrix.Bits == 8
            ? tensor(matrix.Q, weightShape)
            : tensor(matrix.PackBits(), [matrix.N, ((matrix.K * matrix.Bits) + 7) / 8]);
        long[] scaleShape = matrix.Scales.Length == 1 ? [1] : [matrix.N, matrix.GroupsPerRow];
        var scale = tensor(matrix.Scales, scaleShape);
        if (matrix.Bits == 4)
        {
            scale = scale.to(ScalarType.Float16);
        }

        var bias = matrix.Bias is null ? null : tensor(matrix.Bias);
        Tensor? inputScale = null, inputZero = null;
        if (activations.Mode == ActivationMode.Static)
        {
            inputScale = tensor(new[] { activations.Scale });
            inputZero = tensor(new[] { (byte)activations.ZeroPoint });
        }

        return (
            weight.DetachFromDisposeScope(),
            scale.DetachFromDisposeScope(),
            bias?.DetachFromDisposeScope(),
            inputScale?.DetachFromDisposeScope(),
            inputZero?.DetachFromDisposeScope());
    }
}
