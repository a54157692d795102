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
    private readonly object sync = new();
    private QuantizedMatrix matrix;
    private ActivationSettings activations;

    // Set whenever the stored tensors are handed out (state_dict, named_buffers, get_buffer: the only ways in, and
    // what load_state_dict writes through); the next call reads them back before computing.
    private volatile bool exposed;

    private protected QuantizedLayer(string name, QuantizedMatrix matrix, ActivationSettings activations, bool fusedRelu, QuantizationMode mode)
        : base(name)
    {
        this.matrix = matrix;
        this.activations = activations;
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
    /// <remarks>Reset to <see langword="null"/> when new tensors are loaded into the layer.</remarks>
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

    /// <summary>Gets the weights the kernel runs, read back from the stored tensors first if they were handed out.</summary>
    /// <exception cref="InvalidOperationException">The stored tensors were changed to values the layer cannot run.</exception>
    internal QuantizedMatrix Matrix
    {
        get
        {
            Synchronize();
            return matrix;
        }
    }

    /// <summary>Gets how the input is quantized, read back from the stored tensors first if they were handed out.</summary>
    internal ActivationSettings Activations
    {
        get
        {
            Synchronize();
            return activations;
        }
    }

    private protected abstract long[] WeightShape { get; }

    /// <summary>Gets the stored tensors, as the subclass registered them.</summary>
    private protected abstract StoredTensors Stored { get; }

    /// <inheritdoc/>
    public abstract long CountMacs(Tensor input, Tensor output);

    /// <summary>Returns the float weight (in the float layer's shape) that the stored integers and scales stand for.</summary>
    /// <returns>A new tensor the caller owns.</returns>
    /// <remarks>With AWQ's explicit input scales (<c>input_channel_scale</c>) the scales are divided out: this is the weight the layer computes with.</remarks>
    public Tensor DequantizedWeight() => tensor(Matrix.EffectiveWeight(), WeightShape);

    /// <inheritdoc/>
    /// <remarks>
    /// The tensors are the layer: what is copied into them (as <c>load_state_dict</c> does) is what the next call computes with.
    /// </remarks>
    public override Dictionary<string, Tensor> state_dict(Dictionary<string, Tensor>? destination = null, string? prefix = null)
    {
        exposed = true;
        return base.state_dict(destination, prefix);
    }

    /// <inheritdoc/>
    /// <remarks>
    /// The tensors are the layer: what is copied into them is what the next call computes with.
    /// </remarks>
    public override IEnumerable<(string name, Tensor buffer)> named_buffers(bool recurse = true, bool include_nonpersistent = true)
    {
        exposed = true;
        return base.named_buffers(recurse, include_nonpersistent);
    }

    /// <inheritdoc/>
    public override Tensor? get_buffer(string target)
    {
        exposed = true;
        return base.get_buffer(target);
    }

    /// <summary>
    /// Converting a model's floating-point type leaves a quantized layer as it is: its integer weights and scales are
    /// its encoding, and its output follows the input's type.
    /// </summary>
    /// <param name="dtype">The model's new floating-point type.</param>
    /// <param name="non_blocking">Ignored.</param>
    /// <returns>This layer.</returns>
    protected override nn.Module _to(ScalarType dtype, bool non_blocking)
    {
        if (!is_floating_point(dtype) && !is_complex(dtype))
        {
            throw new ArgumentException($"nn.Module.to only accepts floating point or complex types, but got desired dtype={dtype}");
        }

        return this;
    }

    /// <summary>Stays on the CPU; any other device throws.</summary>
    /// <param name="deviceType">The device type.</param>
    /// <param name="deviceIndex">The device index.</param>
    /// <param name="non_blocking">Ignored.</param>
    /// <returns>This layer.</returns>
    /// <exception cref="NotSupportedException">The device is not the CPU: the library's integer kernel runs on the CPU only.</exception>
    protected override nn.Module _to(DeviceType deviceType, int deviceIndex, bool non_blocking) =>
        deviceType == DeviceType.CPU ? this : throw CpuOnly(deviceType);

    /// <summary>Stays on the CPU in its own types; any other device throws.</summary>
    /// <param name="device">The device.</param>
    /// <param name="dtype">The model's new floating-point type (the layer keeps its own).</param>
    /// <param name="non_blocking">Ignored.</param>
    /// <returns>This layer.</returns>
    /// <exception cref="NotSupportedException">The device is not the CPU: the library's integer kernel runs on the CPU only.</exception>
    protected override nn.Module _to(Device device, ScalarType dtype, bool non_blocking)
    {
        ArgumentNullException.ThrowIfNull(device);
        return device.type == DeviceType.CPU ? _to(dtype, non_blocking) : throw CpuOnly(device.type);
    }

    private NotSupportedException CpuOnly(DeviceType device) => new(
        $"{GetType().Name} runs on the library's CPU integer kernel only and cannot move to {device}. Keep the quantized model on the CPU " +
        "(its inputs may come from any device: the output returns to the input's device), or quantize for the GPU with another tool.");

    /// <summary>Reads the stored tensors back when they were handed out, and rebuilds the kernel's weights if they changed.</summary>
    private void Synchronize()
    {
        if (!exposed)
        {
            return;
        }

        lock (sync)
        {
            if (!exposed)
            {
                return;
            }

            // Cleared before reading: a hand-out during the read leaves it set for the next call.
            exposed = false;
            var read = QuantizedTensors.Read(Stored, matrix, activations, $"{GetType().Name}(out={matrix.N}, in={matrix.K})");
            if (read is { } changed)
            {
                (matrix, activations) = changed;
                SqnrDb = null;
            }
        }
    }
}

/// <summary>The tensors a quantized layer registers.</summary>
internal sealed record StoredTensors(Tensor Weight, Tensor Scale, Tensor? Bias, Tensor? InputScale, Tensor? InputZeroPoint, Tensor? ZeroPoint = null, Tensor? InputChannelScale = null);

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

    /// <summary>
    /// Reads a layer's stored tensors back: <see langword="null"/> when they still hold what <paramref name="matrix"/>
    /// and <paramref name="activations"/> stand for, else the weights and input settings they hold now.
    /// </summary>
    /// <exception cref="InvalidOperationException">A tensor changed type, shape or device, or holds values the layer cannot run.</exception>
    public static (QuantizedMatrix Matrix, ActivationSettings Activations)? Read(StoredTensors stored, QuantizedMatrix matrix, ActivationSettings activations, string layer)
    {
        using var scope = NewDisposeScope();
        var weight = Expect(stored.Weight, matrix.Bits == 8 ? ScalarType.Int8 : ScalarType.Byte, "weight", layer);
        var scale = Expect(stored.Scale, matrix.Bits == 4 ? ScalarType.Float16 : ScalarType.Float32, "weight_scale", layer);
        var bias = stored.Bias is null ? null : Expect(stored.Bias, ScalarType.Float32, "bias", layer);
        var inputScale = stored.InputScale is null ? null : Expect(stored.InputScale, ScalarType.Float32, "input_scale", layer);
        var inputZero = stored.InputZeroPoint is null ? null : Expect(stored.InputZeroPoint, ScalarType.Byte, "input_zero_point", layer);
        var zeroPoint = stored.ZeroPoint is null ? null : Expect(stored.ZeroPoint, ScalarType.Float16, "weight_zero_point", layer);
        var channelScale = stored.InputChannelScale is null ? null : Expect(stored.InputChannelScale, ScalarType.Float32, "input_channel_scale", layer);

        var weightBytes = weight.bytes;
        bool same = matrix.Bits == 8
            ? weightBytes.SequenceEqual(MemoryMarshal.AsBytes(matrix.Q.AsSpan()))
            : weightBytes.SequenceEqual(matrix.PackBits());
        var scales = scale.to(ScalarType.Float32).data<float>().ToArray();
        same &= scales.AsSpan().SequenceEqual(matrix.Scales);
        var biasValues = bias?.data<float>().ToArray();
        same &= biasValues is null || biasValues.AsSpan().SequenceEqual(matrix.Bias);
        var zeroValues = zeroPoint?.to(ScalarType.Float32).data<float>().ToArray();
        same &= zeroValues is null || zeroValues.AsSpan().SequenceEqual(matrix.ZeroPoints);
        var channelScales = channelScale?.data<float>().ToArray();
        same &= channelScales is null || channelScales.AsSpan().SequenceEqual(matrix.InputScales);
        float newScale = inputScale?.data<float>()[0] ?? activations.Scale;
        float newZero = inputZero?.data<byte>()[0] ?? activations.ZeroPoint;
        same &= newScale.Equals(activations.Scale) && newZero.Equals(activations.ZeroPoint);
        if (same)
        {
            return null;
        }

        int qmax = QuantizedMatrix.MaxLevel(matrix.Bits), qmin = matrix.MinLevel;
        var q = matrix.Bits == 8
            ? MemoryMarshal.Cast<byte, sbyte>(weightBytes).ToArray()
            : QuantizedMatrix.UnpackBits(weightBytes, matrix.N, matrix.K, matrix.Bits);
        int outside = Array.FindIndex(q, v => v < qmin || v > qmax);
        if (outside >= 0)
        {
            throw new InvalidOperationException(
                $"{layer}: its stored 'weight' now holds the level {q[outside]} (row {outside / matrix.K}), outside the {qmin}…{qmax} of these {matrix.Bits}-bit weights. " +
                "Load tensors saved from a quantized layer with the same settings.");
        }

        if (zeroValues is not null && Array.FindIndex(zeroValues, v => !float.IsFinite(v)) is var badZero and >= 0)
        {
            throw new InvalidOperationException($"{layer}: its stored 'weight_zero_point' now holds {zeroValues[badZero]}; zero points must be finite.");
        }

        if (Array.FindIndex(scales, v => !float.IsFinite(v) || v <= 0) is var badScale and >= 0)
        {
            throw new InvalidOperationException($"{layer}: its stored 'weight_scale' now holds {scales[badScale]}; scales must be finite and positive.");
        }

        if (channelScales is not null && channelScales.Length != matrix.K)
        {
            throw new InvalidOperationException($"{layer}: its stored 'input_channel_scale' now holds {channelScales.Length} values for {matrix.K} inputs.");
        }

        if (channelScales is not null && Array.FindIndex(channelScales, v => !float.IsFinite(v) || v <= 0) is var badChannel and >= 0)
        {
            throw new InvalidOperationException($"{layer}: its stored 'input_channel_scale' now holds {channelScales[badChannel]}; input scales must be finite and positive.");
        }

        if (biasValues is not null && Array.FindIndex(biasValues, v => !float.IsFinite(v)) >= 0)
        {
            throw new InvalidOperationException($"{layer}: its stored 'bias' now holds NaN or infinite values.");
        }

        if (inputScale is not null && (!float.IsFinite(newScale) || newScale <= 0))
        {
            throw new InvalidOperationException($"{layer}: its stored 'input_scale' now holds {newScale}; it must be finite and positive.");
        }

        var rebuilt = QuantizedMatrix.FromLevels(matrix.N, matrix.K, matrix.Bits, matrix.Granularity, q, scales, biasValues, zeroValues, channelScales);
        return (rebuilt, activations with { Scale = newScale, ZeroPoint = newZero });
    }

    private static Tensor Expect(Tensor stored, ScalarType dtype, string name, string layer)
    {
        if (stored.IsInvalid)
        {
            throw new InvalidOperationException($"{layer}: its stored '{name}' was disposed.");
        }

        if (stored.dtype != dtype || stored.device_type != DeviceType.CPU)
        {
            throw new InvalidOperationException($"{layer}: its stored '{name}' is now {stored.dtype} on {stored.device_type}, not {dtype} on the CPU; the layer cannot run it.");
        }

        return stored.contiguous();
    }

    public static (Tensor Weight, Tensor Scale, Tensor? Bias, Tensor? InputScale, Tensor? InputZeroPoint, Tensor? ZeroPoint, Tensor? InputChannelScale) Create(QuantizedMatrix matrix, ActivationSettings activations, long[] weightShape)
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
            inputZero?.DetachFromDisposeScope(),
            matrix.ZeroPoints is null ? null : tensor(matrix.ZeroPoints, scaleShape).to(ScalarType.Float16).DetachFromDisposeScope(),
            matrix.InputScales is null ? null : tensor(matrix.InputScales).DetachFromDisposeScope());
    }
}
