using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace ModelCompression.Quantization.Kernels;

/// <summary>How a layer quantizes its input: the mode, and the fixed range for static quantization.</summary>
internal readonly record struct ActivationSettings(ActivationMode Mode, float Scale, float ZeroPoint, bool Symmetric);

/// <summary>
/// A weight matrix [N, K] quantized to 8 or 4 bits with symmetric scales (per tensor, channel or group), its bias,
/// and the packed copy the kernel reads. Immutable; shared by a layer and its copies.
/// </summary>
internal sealed unsafe class QuantizedMatrix
{
    private QuantizedMatrix(int n, int k, int bits, QuantizationGranularity granularity, int groupSize, sbyte[] q, float[] scales, float[]? bias)
    {
        N = n;
        K = k;
        Bits = bits;
        Granularity = granularity;
        GroupSize = groupSize;
        Q = q;
        Scales = scales;
        Bias = bias;
        Packed = PackedWeights.Create(q, n, k, bits, groupSize, ExpandScales(), bias ?? []);
    }

    public int N { get; }

    public int K { get; }

    public int Bits { get; }

    public QuantizationGranularity Granularity { get; }

    /// <summary>Gets the inputs per scale, or 0 for one scale per row (per channel or per tensor).</summary>
    public int GroupSize { get; }

    /// <summary>Gets the integer weights, row-major [N, K].</summary>
    public sbyte[] Q { get; }

    /// <summary>Gets the scales: one (per tensor), N (per channel) or N × groups (per group).</summary>
    public float[] Scales { get; }

    public float[]? Bias { get; }

    public PackedWeights Packed { get; }

    /// <summary>Gets the number of scales per row.</summary>
    public int GroupsPerRow => GroupSize == 0 ? 1 : (K + GroupSize - 1) / GroupSize;

    /// <summary>Quantizes a float weight, rounding to nearest. 4-bit scales are rounded to float16 first, as stored.</summary>
    public static QuantizedMatrix FromFloat(ReadOnlySpan<float> weight, int n, int k, int bits, QuantizationGranularity granularity, ReadOnlySpan<float> bias, bool hasBias)
    {
        int qmax = bits == 8 ? 127 : 7;
        int groupSize = granularity is PerGroupGranularity g ? g.Size : 0;
        int groups = groupSize == 0 ? 1 : (k + groupSize - 1) / groupSize;
        var scales = new float[granularity is PerTensorGranularity ? 1 : n * groups];
        var q = new sbyte[n * k];
        if (granularity is PerTensorGranularity)
        {
            scales[0] = ScaleFor(MaxAbs(weight), qmax, bits);
        }
        else
        {
            for (int row = 0; row < n; row++)
            {
                for (int b = 0; b < groups; b++)
                {
                    int start = groupSize == 0 ? 0 : b * groupSize;
                    int end = groupSize == 0 ? k : Math.Min(k, start + groupSize);
                    scales[(row * groups) + b] = ScaleFor(MaxAbs(weight.Slice((row * k) + start, end - start)), qmax, bits);
                }
            }
        }

        var matrix = new float[scales.Length];
        for (int row = 0; row < n; row++)
        {
            for (int i = 0; i < k; i++)
            {
                float s = scales.Length == 1 ? scales[0] : scales[(row * groups) + (groupSize == 0 ? 0 : i / groupSize)];
                q[(row * k) + i] = (sbyte)Math.Clamp(MathF.Round(weight[(row * k) + i] / s, MidpointRounding.ToEven), -qmax, qmax);
            }
        }

        return new QuantizedMatrix(n, k, bits, granularity, groupSize, q, scales, hasBias ? bias.ToArray() : null);
    }

    /// <summary>Rebuilds a matrix from stored integers and scales.</summary>
    public static QuantizedMatrix FromStored(sbyte[] q, int n, int k, int bits, QuantizationGranularity granularity, float[] scales, float[]? bias) =>
        new(n, k, bits, granularity, granularity is PerGroupGranularity g ? g.Size : 0, q, scales, bias);

    /// <summary>Returns the float weight the integers stand for, row-major [N, K].</summary>
    public float[] Dequantize()
    {
        var w = new float[N * K];
        for (int row = 0; row < N; row++)
        {
            for (int i = 0; i < K; i++)
            {
                w[(row * K) + i] = Q[(row * K) + i] * ScaleAt(row, i);
            }
        }

        return w;
    }

    public float ScaleAt(int row, int column) =>
        Scales.Length == 1 ? Scales[0] : Scales[(row * GroupsPerRow) + (GroupSize == 0 ? 0 : column / GroupSize)];

    /// <summary>Runs y = x · Wᵀ + b for x [rows, K] (float32, contiguous, CPU), returning a new [rows, N] tensor.</summary>
    public Tensor Run(Tensor x, ActivationSettings activations, bool relu, Int8KernelPath path)
    {
        int rows = checked((int)x.shape[0]);
        var y = empty([rows, N], dtype: ScalarType.Float32);
        var xs = MemoryMarshal.Cast<byte, float>(x.bytes);
        using var quantized = QuantizedActivations.Quantize(xs, rows, Packed, activations.Mode, activations.Scale, activations.ZeroPoint, activations.Symmetric);
        fixed (byte* py = y.bytes)
        {
            Int8Kernel.Multiply(Packed, quantized, rows, (float*)py, N, relu, path);
        }

        return y;
    }

    /// <summary>Runs a convolution on an NCHW float32 CPU batch through byte im2col, returning a new [batch, N, OH, OW] tensor.</summary>
    public Tensor RunImages(Tensor x, ConvGeometry geometry, ActivationSettings activations, bool relu, Int8KernelPath path)
    {
        var y = empty([geometry.Batch, N, geometry.OutHeight, geometry.OutWidth], dtype: ScalarType.Float32);
        var xs = MemoryMarshal.Cast<byte, float>(x.bytes);
        using var quantized = QuantizedActivations.FromImages(xs, geometry, Packed, activations.Mode, activations.Scale, activations.ZeroPoint, activations.Symmetric);
        fixed (byte* py = y.bytes)
        {
            Int8Kernel.Multiply(Packed, quantized, quantized.Rows, (float*)py, N, relu, path, outputPlane: geometry.OutHeight * geometry.OutWidth);
        }

        return y;
    }

    /// <summary>Packs the nibbles of 4-bit weights two per byte (low nibble first), row by row.</summary>
    public byte[] PackNibbles()
    {
        int perRow = (K + 1) / 2;
        var packed = new byte[N * perRow];
        for (int row = 0; row < N; row++)
        {
            for (int i = 0; i < K; i++)
            {
                int nibble = Q[(row * K) + i] & 0x0F;
                packed[(row * perRow) + (i / 2)] |= (byte)(i % 2 == 0 ? nibble : nibble << 4);
            }
        }

        return packed;
    }

    /// <summary>Inverts <see cref="PackNibbles"/>.</summary>
    public static sbyte[] UnpackNibbles(ReadOnlySpan<byte> packed, int n, int k)
    {
        int perRow = (k + 1) / 2;
        var q = new sbyte[n * k];
        for (int row = 0; row < n; row++)
        {
            for (int i = 0; i < k; i++)
            {
                int b = packed[(row * perRow) + (i / 2)];
                int nibble = i % 2 == 0 ? b & 0x0F : b >> 4;
                q[(row * k) + i] = (sbyte)(nibble >= 8 ? nibble - 16 : nibble);
            }
        }

        return q;
    }

    private float[] ExpandScales()
    {
        int groups = GroupsPerRow;
        if (Scales.Length == N * groups)
        {
            return Scales;
        }

        var expanded = new float[N * groups];
        Array.Fill(expanded, Scales[0]);
        return expanded;
    }

    private static float MaxAbs(ReadOnlySpan<float> values)
    {
        float max = 0;
        foreach (float v in values)
        {
            max = MathF.Max(max, MathF.Abs(v));
        }

        return max;
    }

    private static float ScaleFor(float maxAbs, int qmax, int bits)
    {
        float s = maxAbs == 0 ? 1f : maxAbs / qmax;
        // 4-bit layers store their scales as float16: quantize with the scale that will be stored.
        return bits == 4 ? (float)(Half)Math.Max(s, 1e-4f) : s;
    }
}
