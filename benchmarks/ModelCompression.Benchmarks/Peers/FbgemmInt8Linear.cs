#nullable enable
using System;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Benchmarks.Peers;

/// <summary>
/// Peer baseline: LibTorch's FBGEMM int8-weight dynamic linear (<c>aten::fbgemm_linear_int8_weight</c>), which
/// TorchSharp does not expose, reached through a TorchScript compilation unit. The weight is quantized once to
/// int8 (per tensor, affine, as <c>aten::fbgemm_linear_quantize_weight</c> chooses) and packed once into FBGEMM's
/// blocked layout; each call quantizes the activations to uint8 (per tensor, dynamic), runs FBGEMM's int8 GEMM and
/// dequantizes the result with the bias added.
/// </summary>
/// <remarks>
/// These ATen ops are deprecated (LibTorch prints a one-time warning) but present in LibTorch 2.10. They need a CPU
/// that FBGEMM supports (AVX2 or better) and fail with an exception otherwise. Not thread-safe per instance.
/// </remarks>
public sealed class FbgemmInt8Linear : IDisposable
{
    // Kept minimal and type-annotated: a TorchScript compile error aborts the process instead of throwing.
    // The prepack function returns tensors only (the scale and zero point wrapped in one-element tensors)
    // so that TorchSharp hands back a plain 5-tuple of tensors. Dtype constants such as torch.float64 cannot be
    // used as values in a script compiled from a string ("builtin cannot be used as a value"), so the wrappers use
    // torch.tensor's defaults: float32 for the scale (exact: FBGEMM computes it in float32) and int64 for the zero point.
    private const string Script = @"
def prepack(weight: Tensor):
    q, col_offsets, scale, zero_point = torch.fbgemm_linear_quantize_weight(weight)
    packed = torch.fbgemm_pack_quantized_matrix(q)
    return (q, packed, col_offsets, torch.tensor([scale]), torch.tensor([zero_point]))

def linear(x: Tensor, q: Tensor, packed: Tensor, col_offsets: Tensor, scale: float, zero_point: int, bias: Tensor):
    return torch.fbgemm_linear_int8_weight(x, q, packed, col_offsets, scale, zero_point, bias)
";

    private static readonly Lazy<jit.CompilationUnit> Compiled = new(() => jit.compile(Script));

    private readonly Tensor _quantized;
    private readonly Tensor _packed;
    private readonly Tensor _colOffsets;
    private readonly Tensor _bias;
    private readonly Scalar _scale;
    private readonly int _zeroPoint;
    private bool _disposed;

    /// <summary>Quantizes and packs the weight (once).</summary>
    /// <param name="weight">Float32 CPU weight <c>[outFeatures, inFeatures]</c>. It is not kept.</param>
    /// <param name="bias">Float32 bias <c>[outFeatures]</c>, or <see langword="null"/> for none. A copy is kept.</param>
    /// <exception cref="ArgumentException">The weight is not a 2-D float32 CPU tensor, or the bias does not match.</exception>
    public FbgemmInt8Linear(Tensor weight, Tensor? bias)
    {
        ArgumentNullException.ThrowIfNull(weight);
        if (weight.dim() != 2 || weight.dtype != ScalarType.Float32 || weight.device_type != DeviceType.CPU)
            throw new ArgumentException("weight must be a 2-D float32 CPU tensor [out, in].", nameof(weight));
        OutFeatures = (int)weight.shape[0];
        InFeatures = (int)weight.shape[1];
        if (bias is not null && (bias.dim() != 1 || bias.shape[0] != OutFeatures || bias.dtype != ScalarType.Float32 || bias.device_type != DeviceType.CPU))
            throw new ArgumentException($"bias must be a float32 CPU tensor [{OutFeatures}].", nameof(bias));

        using (NewDisposeScope())
        {
            using var w = weight.detach().contiguous();
            var packedTuple = Compiled.Value.invoke<(Tensor, Tensor, Tensor, Tensor, Tensor)>("prepack", w);
            (_quantized, _packed, _colOffsets, Tensor scaleTensor, Tensor zeroPointTensor) = packedTuple;
            WeightScale = scaleTensor.item<float>();
            WeightZeroPoint = (int)zeroPointTensor.item<long>();

            // The fbgemm op requires a bias tensor; "no bias" is a zero bias.
            _bias = bias is null ? zeros(OutFeatures, dtype: ScalarType.Float32) : bias.detach().contiguous().clone();

            using var dequantized = (_quantized.to_type(ScalarType.Float32) - WeightZeroPoint) * WeightScale;
            MaxAbsWeightError = (dequantized - w).abs().max().item<float>();

            _quantized.DetachFromDisposeScope();
            _packed.DetachFromDisposeScope();
            _colOffsets.DetachFromDisposeScope();
            _bias.DetachFromDisposeScope();
        }
        _scale = WeightScale.ToScalar();
        _zeroPoint = WeightZeroPoint;
    }

    /// <summary>Input features K.</summary>
    public int InFeatures { get; }

    /// <summary>Output features N.</summary>
    public int OutFeatures { get; }

    /// <summary>The single (per-tensor) weight scale chosen by FBGEMM.</summary>
    public double WeightScale { get; }

    /// <summary>The single (per-tensor) int8 weight zero point chosen by FBGEMM.</summary>
    public int WeightZeroPoint { get; }

    /// <summary>Largest |w − dequantize(quantize(w))| over the whole weight (the int8 weight rounding error).</summary>
    public float MaxAbsWeightError { get; }

    /// <summary>
    /// Computes <c>x · Wᵀ + bias</c> with the int8 weight. Returns a new tensor the caller owns (it joins the
    /// current dispose scope, if any).
    /// </summary>
    /// <param name="x">Float32 CPU input <c>[..., InFeatures]</c>; a 1-D input is treated as one row.</param>
    /// <returns>Float32 output <c>[..., OutFeatures]</c>.</returns>
    public Tensor Forward(Tensor x)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentNullException.ThrowIfNull(x);
        if (x.dtype != ScalarType.Float32 || x.device_type != DeviceType.CPU || x.dim() < 1 || x.shape[^1] != InFeatures)
            throw new ArgumentException($"x must be a float32 CPU tensor [..., {InFeatures}].", nameof(x));
        if (x.dim() == 1)
        {
            using var row = x.unsqueeze(0);
            using var y = Linear(row);
            return y.squeeze(0);
        }
        return Linear(x);
    }

    private Tensor Linear(Tensor x) =>
        Compiled.Value.invoke<Tensor>("linear", x, _quantized, _packed, _colOffsets, _scale, _zeroPoint, _bias);

    /// <summary>Releases the packed weight and the other native tensors.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _packed.Dispose();
        _quantized.Dispose();
        _colOffsets.Dispose();
        _bias.Dispose();
        _scale.Dispose();
    }
}
