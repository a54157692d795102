using ModelCompression.Quantization.Kernels;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Quantization;

/// <summary>
/// A Conv2d layer (groups = 1, zero padding) with int8 weights, run as im2col + the library's integer kernel
/// (<see cref="Int8Kernel"/>). Like <see cref="QuantizedLinear"/>, its input is quantized statically (calibrated
/// range), dynamically, or per weight group; a BatchNorm that followed it may be folded in, and a ReLU fused.
/// </summary>
public sealed class QuantizedConv2d : QuantizedLayer
{
    private readonly Tensor weight;
    private readonly Tensor weight_scale;
    private readonly Tensor? bias;
    private readonly Tensor? input_scale;
    private readonly Tensor? input_zero_point;
    private readonly long[] kernelSize;
    private readonly long[] stride;
    private readonly long[] padding;
    private readonly long[] dilation;

    internal QuantizedConv2d(Conv2d conv, QuantizedMatrix matrix, ActivationSettings activations, bool fusedRelu, QuantizationMode mode)
        : this(new ConvShape(conv.in_channels, [conv.kernel_size[0], conv.kernel_size[1]], [conv.stride[0], conv.stride[1]], [conv.padding![0], conv.padding![1]], [conv.dilation[0], conv.dilation[1]]), matrix, activations, fusedRelu, mode)
    {
    }

    internal QuantizedConv2d(ConvShape shape, QuantizedMatrix matrix, ActivationSettings activations, bool fusedRelu, QuantizationMode mode)
        : base(nameof(QuantizedConv2d), matrix, activations, fusedRelu, mode)
    {
        kernelSize = shape.KernelSize;
        stride = shape.Stride;
        padding = shape.Padding;
        dilation = shape.Dilation;
        InChannels = shape.InChannels;
        (weight, weight_scale, bias, input_scale, input_zero_point, _, _) =
            QuantizedTensors.Create(matrix, activations, [matrix.N, InChannels, kernelSize[0], kernelSize[1]]);
        RegisterComponents();
    }

    /// <inheritdoc/>
    private protected override StoredTensors Stored => new(weight, weight_scale, bias, input_scale, input_zero_point);

    /// <summary>Gets the geometry of the convolution (for the file format).</summary>
    internal ConvShape Shape => new(InChannels, kernelSize, stride, padding, dilation);

    /// <summary>Gets the input channels.</summary>
    public long InChannels { get; }

    /// <summary>Gets the output channels.</summary>
    public long OutChannels => Matrix.N;

    /// <inheritdoc/>
    public override long CountMacs(Tensor input, Tensor output) => output.numel() * Matrix.K;

    /// <inheritdoc/>
    private protected override long[] WeightShape => [Matrix.N, InChannels, kernelSize[0], kernelSize[1]];

    /// <summary>Gets why a convolution cannot be quantized by this layer, or <see langword="null"/> when it can.</summary>
    /// <param name="conv">The layer.</param>
    /// <returns>The reason, or <see langword="null"/>.</returns>
    public static string? WhyUnsupported(Conv2d conv)
    {
        ArgumentNullException.ThrowIfNull(conv);
        return conv.groups != 1 ? $"groups = {conv.groups} (grouped and depthwise convolutions stay in float)"
            : conv.padding_type is not null ? "string padding ('same'/'valid')"
            : conv.padding_mode != PaddingModes.Zeros ? $"padding mode {conv.padding_mode}"
            : null;
    }

    internal static QuantizedConv2d Create(Conv2d conv, int bits, QuantizationGranularity granularity, ActivationSettings activations, bool fusedRelu, QuantizationMode mode)
    {
        if (WhyUnsupported(conv) is { } why)
        {
            throw new ArgumentException($"This Conv2d cannot be quantized: {why}.", nameof(conv));
        }

        var matrix = QuantizedTensors.QuantizeWeight(conv.weight!, conv.bias, bits, granularity, "Conv2d");
        return new QuantizedConv2d(conv, matrix, activations, fusedRelu, mode);
    }

    /// <inheritdoc/>
    public override Tensor forward(Tensor input)
    {
        ArgumentNullException.ThrowIfNull(input);
        if (input.dim() != 4 || input.shape[1] != InChannels)
        {
            throw new ArgumentException($"QuantizedConv2d expects [batch, {InChannels}, height, width] inputs; got [{string.Join(", ", input.shape)}].", nameof(input));
        }

        using var scope = NewDisposeScope();
        var matrix = Matrix;
        var activations = Activations;
        long batch = input.shape[0];
        long outH = ((input.shape[2] + (2 * padding[0]) - (dilation[0] * (kernelSize[0] - 1)) - 1) / stride[0]) + 1;
        long outW = ((input.shape[3] + (2 * padding[1]) - (dilation[1] * (kernelSize[1] - 1)) - 1) / stride[1]) + 1;
        var x = input.detach().to(ScalarType.Float32).cpu().contiguous();
        if (activations.Mode is ActivationMode.Static or ActivationMode.PerTensor)
        {
            // One range for the whole batch: quantize the image once and build im2col rows of bytes.
            var geometry = new ConvGeometry(
                checked((int)batch), checked((int)InChannels), checked((int)x.shape[2]), checked((int)x.shape[3]),
                (int)kernelSize[0], (int)kernelSize[1], (int)stride[0], (int)stride[1], (int)padding[0], (int)padding[1],
                (int)dilation[0], (int)dilation[1], checked((int)outH), checked((int)outW));
            return matrix.RunImages(x, geometry, activations, FusedRelu, KernelPath).to(input.dtype).to(input.device).MoveToOuterDisposeScope();
        }

        // Per-row ranges: im2col in float, one row per output pixel in the weight's (c, kh, kw) order.
        var columns = nn.functional.unfold(x, (kernelSize[0], kernelSize[1]), (dilation[0], dilation[1]), (padding[0], padding[1]), (stride[0], stride[1]));
        var rows = columns.transpose(1, 2).reshape(-1, matrix.K).contiguous();
        var y = matrix.Run(rows, activations, FusedRelu, KernelPath);
        var output = y.reshape(batch, outH * outW, matrix.N).transpose(1, 2).reshape(batch, matrix.N, outH, outW).contiguous();
        return output.to(input.dtype).to(input.device).MoveToOuterDisposeScope();
    }

    /// <summary>Runs im2col rows [pixels, C·kh·kw] through the layer's matrix (for tests of the image path).</summary>
    internal Tensor RunRowsForTest(Tensor rows) => Matrix.Run(rows.contiguous(), Activations, FusedRelu, KernelPath);

    /// <inheritdoc/>
    public override string ToString() =>
        $"QuantizedConv2d({InChannels}→{Matrix.N}, k={kernelSize[0]}x{kernelSize[1]}, {Mode}, int{Matrix.Bits} {Matrix.Granularity}{(FusedRelu ? ", relu" : string.Empty)})";
}

/// <summary>The geometry of a 2-D convolution: input channels and (height, width) pairs.</summary>
internal sealed record ConvShape(long InChannels, long[] KernelSize, long[] Stride, long[] Padding, long[] Dilation);
