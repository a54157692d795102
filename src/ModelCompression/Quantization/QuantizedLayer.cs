using System.Runtime.InteropServices;
using ModelCompression.Metrics;
using ModelCompression.Quantization.Kernels;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Quantization;

/// <summary>
/// What <see cref="QuantizedLinear"/> and <see cref="QuantizedConv2d"/> share: the integer weights and scales, how the
/// input is quantized, the kernel path, and the descriptions the reports read.
/// </summary>
public abstract class QuantizedLayer : nn.Module<Tensor, Tensor>, IQuantizedLayer
{
    private protected QuantizedLayer(string name, QuantizedMatrix matrix, ActivationSettings activations, bool fusedRelu, QuantizationMode mode)
        : base(name)
    {
        Matrix = matrix;
        Activations = activations;
        FusedRelu = fusedRelu;
        Mode = mode;
    }

    /// <inheritdoc/>
    public QuantizationMode Mode { get; }

    /// <inheritdoc/>
    public QuantizationGranularity WeightGranularity => Matrix.Granularity;

    /// <inheritdoc/>
    public bool FusedRelu { get; }

    /// <inheritdoc/>
    public double? SqnrDb { get; internal set; }

    /// <summary>Gets or sets the kernel path. The default is <see cref="Int8Kernel.BestPath"/>; set another to compare paths.</summary>
    /// <exception cref="PlatformNotSupportedException">This machine cannot run the path (on the next call).</exception>
    public Int8KernelPath KernelPath { get; set; } = Int8Kernel.BestPath;

    /// <inheritdoc/>
    public int WeightBits => Matrix.Bits;

    /// <inheritdoc/>
    public int? Rank => null;

    /// <inheritdoc/>
    public long ParameterCount => ((long)Matrix.N * Matrix.K) + (Matrix.Bias?.Length ?? 0);

    /// <inheritdoc/>
    public long NonzeroParameterCount => Matrix.Q.LongCount(v => v != 0) + (Matrix.Bias?.LongCount(v => v != 0) ?? 0);

    internal QuantizedMatrix Matrix { get; }

    internal ActivationSettings Activations { get; }

    private protected abstract long[] WeightShape { get; }

    /// <inheritdoc/>
    public abstract long CountMacs(Tensor input, Tensor output);

    /// <summary>Returns the float weight (in the float layer's shape) that the stored integers and scales stand for.</summary>
    /// <returns>A new tensor the caller owns.</returns>
    public Tensor DequantizedWeight() => tensor(Matrix.Dequantize(), WeightShape);
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
