using TorchSharp;
using TorchSharp.Modules;
using ModelCompression.Metrics;
using static TorchSharp.torch;

namespace ModelCompression.Quantization;

/// <summary>
/// A layer whose parameters are stored in a 16-bit float type. It casts its input to that type, runs the wrapped
/// layer, and casts the output back to the input's type.
/// </summary>
/// <remarks>
/// Some native 16-bit kernels are wrong on some CPUs (LibTorch 2.10's oneDNN bfloat16 convolution on AVX-512 BF16
/// CPUs gives 20–90% relative error when the output channels are not a multiple of 16). So at construction the layer
/// runs its native 16-bit kernel on a fixed probe input and compares it with a float32 computation from the same
/// 16-bit weights. When the error is far above what 16-bit rounding explains, the layer computes in float32 from its
/// 16-bit weights instead (see <see cref="ComputeType"/>). Storage stays 16-bit either way.
/// </remarks>
public sealed class HalfPrecisionLayer : nn.Module<Tensor, Tensor>, ICompressedLayer
{
    // Fixed, so the probe input (and so the chosen path) is the same on every run on a given machine.
    private const ulong ProbeSeed = 0x5EED_16B1;

    // Probe outputs per spatial dimension (conv) and probe batch size: small, yet wide enough to use the same kernels
    // as real inputs.
    private const long ProbeOutputSize = 8;
    private const long ProbeBatch = 2;

    private readonly nn.Module<Tensor, Tensor> inner;

    /// <summary>Initializes a new instance of the <see cref="HalfPrecisionLayer"/> class, converting <paramref name="layer"/>'s parameters in place.</summary>
    /// <param name="layer">The layer to convert; becomes this layer's child.</param>
    /// <param name="dtype"><see cref="ScalarType.BFloat16"/> or <see cref="ScalarType.Float16"/>.</param>
    /// <exception cref="ArgumentException"><paramref name="dtype"/> is not a 16-bit float type.</exception>
    public HalfPrecisionLayer(nn.Module<Tensor, Tensor> layer, ScalarType dtype)
        : base(nameof(HalfPrecisionLayer))
    {
        ArgumentNullException.ThrowIfNull(layer);
        if (dtype is not (ScalarType.BFloat16 or ScalarType.Float16))
        {
            throw new ArgumentException($"A half-precision layer stores BFloat16 or Float16, not {dtype}.", nameof(dtype));
        }

        DType = dtype;
        inner = layer;
        inner.to(dtype);
        RegisterComponents();
        (ComputeType, ProbeError) = ChooseComputeType();
    }

    /// <summary>Gets the storage type.</summary>
    public ScalarType DType { get; }

    /// <summary>
    /// Gets the type the layer computes in: <see cref="DType"/> when the native 16-bit kernel matched a float32
    /// computation on the probe input (or could not be checked, see <see cref="ProbeError"/>), or
    /// <see cref="ScalarType.Float32"/> when it did not, in which case each call casts the 16-bit weights up to
    /// float32. Chosen once, at construction, from the layer's shape and the machine.
    /// </summary>
    public ScalarType ComputeType { get; }

    /// <summary>
    /// Gets the relative L2 error of the native 16-bit kernel against float32 on the probe input, or
    /// <see langword="null"/> when the layer is of a kind that cannot be computed in float32 from 16-bit weights (only
    /// <see cref="Linear"/>, <see cref="Conv1d"/> and <see cref="Conv2d"/> with numeric zero padding can); such a layer
    /// always runs its native 16-bit kernel, unchecked.
    /// </summary>
    public double? ProbeError { get; }

    /// <summary>Gets the largest <see cref="ProbeError"/> that 16-bit rounding explains; above it the layer computes in float32.</summary>
    /// <remarks>
    /// Four units of roundoff of <see cref="DType"/> (bfloat16: 1.6%, float16: 0.2%). Correct kernels measured
    /// 0.2–0.3% (bfloat16) and 0.02% (float16) here; the faulty bfloat16 convolutions 8–94%.
    /// </remarks>
    public double ProbeTolerance => DType == ScalarType.BFloat16 ? 4.0 / 256 : 4.0 / 2048;

    /// <summary>Gets the wrapped layer.</summary>
    public nn.Module<Tensor, Tensor> Inner => inner;

    /// <inheritdoc/>
    public int WeightBits => 16;

    /// <inheritdoc/>
    public int? Rank => null;

    /// <inheritdoc/>
    public long ParameterCount => inner.parameters().Sum(p => p.numel());

    /// <inheritdoc/>
    public long NonzeroParameterCount
    {
        get
        {
            using var scope = NewDisposeScope();
            return inner.parameters().Sum(p => p.count_nonzero().item<long>());
        }
    }

    /// <inheritdoc/>
    public long CountMacs(Tensor input, Tensor output) => ModelMetrics.LayerMacs(inner, input, output);

    /// <inheritdoc/>
    public override Tensor forward(Tensor input)
    {
        ArgumentNullException.ThrowIfNull(input);
        using var scope = NewDisposeScope();
        var result = ComputeType == DType
            ? inner.call(input.to(DType))
            : ForwardInFloat32(input.to(ScalarType.Float32));
        return result.to(input.dtype).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Converting a model's floating-point type leaves the layer as it is: its 16-bit weights are its encoding, and its
    /// output follows the input's type (so a model converted to float64 still runs, with this layer computing as before).
    /// </summary>
    /// <param name="dtype">The model's new floating-point type.</param>
    /// <param name="non_blocking">Ignored.</param>
    /// <returns>This layer.</returns>
    /// <exception cref="ArgumentException"><paramref name="dtype"/> is not a floating-point or complex type.</exception>
    protected override nn.Module _to(ScalarType dtype, bool non_blocking)
    {
        if (!is_floating_point(dtype) && !is_complex(dtype))
        {
            throw new ArgumentException($"nn.Module.to only accepts floating point or complex types, but got desired dtype={dtype}");
        }

        return this;
    }

    /// <summary>Moves the layer to the device, keeping its 16-bit weights.</summary>
    /// <param name="device">The device.</param>
    /// <param name="dtype">The model's new floating-point type (the layer keeps its own).</param>
    /// <param name="non_blocking">Whether to copy asynchronously.</param>
    /// <returns>This layer.</returns>
    protected override nn.Module _to(Device device, ScalarType dtype, bool non_blocking)
    {
        ArgumentNullException.ThrowIfNull(device);
        _to(dtype, non_blocking);
        return _to(device.type, device.index, non_blocking);
    }

    /// <inheritdoc/>
    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            inner.Dispose();
        }

        base.Dispose(disposing);
    }

    /// <summary>Whether <see cref="ForwardInFloat32"/> can compute <paramref name="layer"/> exactly as its own forward does.</summary>
    private static bool HasFloat32Path(nn.Module layer) => layer switch
    {
        Linear => true,

        // Padding modes other than zeros and 'same'/'valid' padding would need their own code; left to the native kernel.
        Conv1d c => c.padding_mode == PaddingModes.Zeros && c.padding_type is null,
        Conv2d c => c.padding_mode == PaddingModes.Zeros && c.padding_type is null,
        _ => false,
    };

    /// <summary>A probe input for the layer: batch 2, and for a convolution a spatial size giving 8 outputs per dimension without padding.</summary>
    private static long[] ProbeShape(nn.Module layer) => layer switch
    {
        Linear l => [ProbeBatch, l.in_features],
        Conv1d c => [ProbeBatch, c.in_channels, ProbeExtent(c.kernel_size[0], c.stride[0], c.dilation[0])],
        Conv2d c => [ProbeBatch, c.in_channels, ProbeExtent(c.kernel_size[0], c.stride[0], c.dilation[0]), ProbeExtent(c.kernel_size[1], c.stride[1], c.dilation[1])],
        _ => throw new InvalidOperationException($"No probe shape for {layer.GetType().Name}."),
    };

    private static long ProbeExtent(long kernel, long stride, long dilation) => (dilation * (kernel - 1)) + 1 + (stride * (ProbeOutputSize - 1));

    /// <summary>Runs the native 16-bit kernel and float32 on the probe input and picks the compute type from the error.</summary>
    private (ScalarType ComputeType, double? Error) ChooseComputeType()
    {
        if (!HasFloat32Path(inner))
        {
            return (DType, null);
        }

        using var scope = NewDisposeScope();
        using var noGrad = no_grad();

        // A generator of its own: the probe must not move (or depend on) the caller's random stream.
        using var generator = new Generator(ProbeSeed);
        var device = inner.parameters().First().device;
        var probe = randn(ProbeShape(inner), generator: generator).to(DType).to(device);

        // forward(), not call(): the probe is not a real input, so hooks on the wrapped layer must not see it.
        var native = inner.forward(probe).to(ScalarType.Float32);
        var reference = ForwardInFloat32(probe.to(ScalarType.Float32));
        double referenceNorm = reference.norm().item<float>();
        double differenceNorm = (native - reference).norm().item<float>();
        double error = referenceNorm > 0 ? differenceNorm / referenceNorm : differenceNorm == 0 ? 0 : double.PositiveInfinity;

        // NaN (an overflow in the 16-bit kernel) fails the check too.
        return (error <= ProbeTolerance ? DType : ScalarType.Float32, error);
    }

    /// <summary>The wrapped layer's computation in float32, from its 16-bit weights cast up per call (storage stays 16-bit).</summary>
    private Tensor ForwardInFloat32(Tensor input)
    {
        switch (inner)
        {
            case Linear l:
                return nn.functional.linear(input, l.weight!.to(ScalarType.Float32), l.bias?.to(ScalarType.Float32));
            case Conv1d c:
                return nn.functional.conv1d(input, c.weight!.to(ScalarType.Float32), c.bias?.to(ScalarType.Float32), c.stride[0], c.padding![0], c.dilation[0], c.groups);
            case Conv2d c:
                return nn.functional.conv2d(input, c.weight!.to(ScalarType.Float32), c.bias?.to(ScalarType.Float32), c.stride, c.padding, c.dilation, c.groups);
            default:
                throw new InvalidOperationException($"{inner.GetType().Name} has no float32 path.");
        }
    }
}
