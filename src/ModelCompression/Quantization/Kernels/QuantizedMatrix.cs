using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace ModelCompression.Quantization.Kernels;

/// <summary>How a layer quantizes its input: the mode, and the fixed range for static quantization.</summary>
internal readonly record struct ActivationSettings(ActivationMode Mode, float Scale, float ZeroPoint, bool Symmetric);

/// <summary>
/// A weight matrix [N, K] quantized to 1–8 bits with symmetric scales (per tensor, channel or group) or, from HQQ,
/// asymmetric ones (a zero point per scale: w = s · (q − z)), its bias, and the packed copy the kernel reads.
/// Immutable; shared by a layer and its copies.
/// </summary>
internal sealed unsafe class QuantizedMatrix
{
    private QuantizedMatrix(int n, int k, int bits, QuantizationGranularity granularity, int groupSize, sbyte[] q, float[] scales, float[]? bias, float[]? zeroPoints = null, float[]? inputScales = null)
    {
        ZeroPoints = zeroPoints;
        InputScales = inputScales;
        N = n;
        K = k;
        Bits = bits;
        Granularity = granularity;
        GroupSize = groupSize;
        Q = q;
        Scales = scales;
        Bias = bias;
        // The kernel runs 4-bit weights from nibbles and every other width (1–8 bits) from bytes. Its blocks are whole
        // multiples of 8 inputs: a whole-row group of K inputs packs as one block of ⌈K/8⌉·8, padded with zero weights.
        int packedGroup = groupSize == k ? PackedWeights.RoundUp(k, 8) : groupSize;
        Packed = PackedWeights.Create(q, n, k, bits == 4 ? 4 : 8, packedGroup, ExpandScales(), bias ?? []);
    }

    public int N { get; }

    public int K { get; }

    public int Bits { get; }

    public QuantizationGranularity Granularity { get; }

    /// <summary>
    /// Gets the inputs per scale, or 0 for one scale per row (per channel or per tensor). Never more than
    /// <see cref="K"/>: a group of K is the whole row; with K not a multiple of it, the last group of each row is shorter.
    /// </summary>
    public int GroupSize { get; }

    /// <summary>Gets the integer weights, row-major [N, K].</summary>
    public sbyte[] Q { get; }

    /// <summary>Gets the scales: one (per tensor), N (per channel) or N × groups (per group).</summary>
    public float[] Scales { get; }

    public float[]? Bias { get; }

    /// <summary>
    /// Gets the zero points, one per scale, in level units (w = s · (q − z)), or <see langword="null"/> for the
    /// symmetric grid (z = 0). With zero points the levels span the whole two's complement range of the bits
    /// (−8…7 at 4 bits), see <see cref="MinLevel"/>.
    /// </summary>
    public float[]? ZeroPoints { get; }

    /// <summary>
    /// Gets AWQ's explicit per-input scales s (K values, all positive), or <see langword="null"/>: the levels and
    /// scales stand for W·diag(s), and the input is divided by s before the kernel, so the layer computes x·Wᵀ. Used
    /// where no preceding layer can absorb 1/s.
    /// </summary>
    public float[]? InputScales { get; }

    /// <summary>Gets the lowest level: −<see cref="MaxLevel(int)"/> on the symmetric grid, −2ᵇ⁻¹ with zero points.</summary>
    public int MinLevel => ZeroPoints is null ? -MaxLevel(Bits) : -(1 << (Bits - 1));

    public PackedWeights Packed { get; }

    /// <summary>Gets the number of scales per row.</summary>
    public int GroupsPerRow => GroupSize == 0 ? 1 : (K + GroupSize - 1) / GroupSize;

    /// <summary>
    /// The granularity a matrix of <paramref name="k"/> inputs really has: a group of more than K inputs is the whole
    /// row, <see cref="QuantizationGranularity.PerGroup"/>(K), so the layer reports (and the file stores) the group it uses.
    /// </summary>
    public static QuantizationGranularity ForInputs(QuantizationGranularity granularity, int k) =>
        granularity is PerGroupGranularity g && g.Size > k ? QuantizationGranularity.PerGroup(k) : granularity;

    /// <summary>The largest integer magnitude of a <paramref name="bits"/>-bit symmetric weight (1 for binary ±1 weights).</summary>
    public static int MaxLevel(int bits) => bits == 1 ? 1 : (1 << (bits - 1)) - 1;

    /// <summary>
    /// Quantizes a float weight with scales from each group's largest magnitude, rounding to nearest (1 bit: the
    /// sign times the mean magnitude, as XNOR-Net). 4-bit scales are rounded to float16 first, as stored.
    /// </summary>
    public static QuantizedMatrix FromFloat(ReadOnlySpan<float> weight, int n, int k, int bits, QuantizationGranularity granularity, ReadOnlySpan<float> bias, bool hasBias)
    {
        granularity = ForInputs(granularity, k);
        int qmax = MaxLevel(bits);
        int groupSize = granularity is PerGroupGranularity g ? g.Size : 0;
        int groups = groupSize == 0 ? 1 : (k + groupSize - 1) / groupSize;
        var scales = new float[granularity is PerTensorGranularity ? 1 : n * groups];
        if (granularity is PerTensorGranularity)
        {
            scales[0] = ScaleFor(weight, qmax, bits);
        }
        else
        {
            for (int row = 0; row < n; row++)
            {
                for (int b = 0; b < groups; b++)
                {
                    int start = groupSize == 0 ? 0 : b * groupSize;
                    int end = groupSize == 0 ? k : Math.Min(k, start + groupSize);
                    scales[(row * groups) + b] = ScaleFor(weight.Slice((row * k) + start, end - start), qmax, bits);
                }
            }
        }

        return FromScales(weight, n, k, bits, granularity, scales, bias, hasBias);
    }

    /// <summary>Quantizes a float weight with the given scales (one, N, or N × groups), rounding to nearest.</summary>
    public static QuantizedMatrix FromScales(ReadOnlySpan<float> weight, int n, int k, int bits, QuantizationGranularity granularity, float[] scales, ReadOnlySpan<float> bias, bool hasBias)
    {
        // A group longer than the row had one scale per row already (⌈K/size⌉ = 1): the scales need no change.
        granularity = ForInputs(granularity, k);
        int qmax = MaxLevel(bits);
        int groupSize = granularity is PerGroupGranularity g ? g.Size : 0;
        int groups = groupSize == 0 ? 1 : (k + groupSize - 1) / groupSize;
        var q = new sbyte[n * k];
        for (int row = 0; row < n; row++)
        {
            for (int i = 0; i < k; i++)
            {
                float w = weight[(row * k) + i];
                if (bits == 1)
                {
                    q[(row * k) + i] = (sbyte)(w >= 0 ? 1 : -1);
                    continue;
                }

                float s = scales.Length == 1 ? scales[0] : scales[(row * groups) + (groupSize == 0 ? 0 : i / groupSize)];
                q[(row * k) + i] = (sbyte)Math.Clamp(MathF.Round(w / s, MidpointRounding.ToEven), -qmax, qmax);
            }
        }

        return new QuantizedMatrix(n, k, bits, granularity, groupSize, q, scales, hasBias ? bias.ToArray() : null);
    }

    /// <summary>
    /// Rebuilds a matrix from stored integer weights and scales (the file format's reader; counts already checked).
    /// A stored group longer than the row (written before groups were capped at K) becomes the whole-row group it
    /// always was: one scale per row, the same outputs.
    /// </summary>
    public static QuantizedMatrix FromLevels(int n, int k, int bits, QuantizationGranularity granularity, sbyte[] q, float[] scales, float[]? bias, float[]? zeroPoints = null, float[]? inputScales = null)
    {
        granularity = ForInputs(granularity, k);
        return new(n, k, bits, granularity, granularity is PerGroupGranularity g ? g.Size : 0, q, scales, bias, zeroPoints, inputScales);
    }

    /// <summary>The same weights with explicit input scales (see <see cref="InputScales"/>): the levels already stand for W·diag(s).</summary>
    public QuantizedMatrix WithInputScales(float[]? inputScales) =>
        inputScales is not null && inputScales.Length != K
            ? throw new ArgumentException($"{inputScales.Length} input scales for {K} inputs.", nameof(inputScales))
            : new(N, K, Bits, Granularity, GroupSize, Q, Scales, Bias, ZeroPoints, inputScales);

    /// <summary>
    /// Returns the float weight the integers stand for, row-major [N, K]: with <see cref="InputScales"/>, the scaled
    /// W·diag(s) the kernel multiplies (see <see cref="EffectiveWeight"/> for W).
    /// </summary>
    public float[] Dequantize()
    {
        var w = new float[N * K];
        for (int row = 0; row < N; row++)
        {
            for (int i = 0; i < K; i++)
            {
                w[(row * K) + i] = (Q[(row * K) + i] - ZeroAt(row, i)) * ScaleAt(row, i);
            }
        }

        return w;
    }

    /// <summary>Returns the float weight the layer computes with, row-major [N, K]: <see cref="Dequantize"/> with the input scales divided out.</summary>
    public float[] EffectiveWeight()
    {
        var w = Dequantize();
        if (InputScales is { } s)
        {
            for (int i = 0; i < w.Length; i++)
            {
                w[i] /= s[i % K];
            }
        }

        return w;
    }

    public float ScaleAt(int row, int column) =>
        Scales.Length == 1 ? Scales[0] : Scales[(row * GroupsPerRow) + (GroupSize == 0 ? 0 : column / GroupSize)];

    /// <summary>The zero point of a weight (0 on the symmetric grid).</summary>
    public float ZeroAt(int row, int column) =>
        ZeroPoints is null ? 0 : ZeroPoints.Length == 1 ? ZeroPoints[0] : ZeroPoints[(row * GroupsPerRow) + (GroupSize == 0 ? 0 : column / GroupSize)];

    /// <summary>Runs y = x · Wᵀ + b for x [rows, K] (float32, contiguous, CPU), returning a new [rows, N] tensor.</summary>
    public Tensor Run(Tensor x, ActivationSettings activations, bool relu, Int8KernelPath path)
    {
        if (InputScales is not null)
        {
            using var s = tensor(InputScales);
            using var divided = x.div(s);
            return RunScaled(divided, activations, relu, path);
        }

        return RunScaled(x, activations, relu, path);
    }

    /// <summary>Runs the kernel on an input already divided by <see cref="InputScales"/>.</summary>
    private Tensor RunScaled(Tensor x, ActivationSettings activations, bool relu, Int8KernelPath path)
    {
        int rows = checked((int)x.shape[0]);
        var y = empty([rows, N], dtype: ScalarType.Float32);
        var xs = MemoryMarshal.Cast<byte, float>(x.bytes);
        using var quantized = QuantizedActivations.Quantize(xs, rows, Packed, activations.Mode, activations.Scale, activations.ZeroPoint, activations.Symmetric);
        fixed (byte* py = y.bytes)
        {
            Int8Kernel.Multiply(Packed, quantized, rows, (float*)py, N, relu && ZeroPoints is null, path);
        }

        if (ZeroPoints is not null)
        {
            // w = s · (q − z): the kernel computed Σ s·q·x; subtract Σ_groups (s·z) · (the group's input sum).
            using var scope = NewDisposeScope();
            y.sub_(GroupSums(x).matmul(ScaledZeroPoints()));
            if (relu)
            {
                y.relu_();
            }
        }

        return y;
    }

    private float[]? _scaledZeroPoints;

    /// <summary>Each row's input sum per weight group, [rows, groups].</summary>
    private Tensor GroupSums(Tensor x)
    {
        int groups = GroupsPerRow;
        int size = GroupSize == 0 ? K : GroupSize;
        int full = K / size;
        var sums = x[.., ..(full * size)].reshape(x.shape[0], full, size).sum(-1);
        return full == groups ? sums : cat([sums, x[.., (full * size)..].sum(-1, keepdim: true)], 1);
    }

    /// <summary>s · z as [groups, N], the matrix the group sums multiply (computed once; the matrix never changes).</summary>
    private Tensor ScaledZeroPoints()
    {
        int groups = GroupsPerRow;
        var sz = _scaledZeroPoints;
        if (sz is not null)
        {
            return tensor(sz, [groups, N]);
        }

        sz = new float[groups * N];
        for (int row = 0; row < N; row++)
        {
            for (int g = 0; g < groups; g++)
            {
                int at = Scales.Length == 1 ? 0 : (row * groups) + g;
                sz[(g * N) + row] = Scales[at] * (ZeroPoints!.Length == 1 ? ZeroPoints[0] : ZeroPoints[at]);
            }
        }

        // Racing threads compute the same values; either array may win.
        _scaledZeroPoints = sz;
        return tensor(sz, [groups, N]);
    }

    /// <summary>Runs a convolution on an NCHW float32 CPU batch through byte im2col, returning a new [batch, N, OH, OW] tensor.</summary>
    public Tensor RunImages(Tensor x, ConvGeometry geometry, ActivationSettings activations, bool relu, Int8KernelPath path)
    {
        if (ZeroPoints is not null || InputScales is not null)
        {
            throw new InvalidOperationException("A convolution's weights have no zero points or input scales (HQQ and AWQ's explicit scales are for Linear layers only).");
        }

        var y = empty([geometry.Batch, N, geometry.OutHeight, geometry.OutWidth], dtype: ScalarType.Float32);
        var xs = MemoryMarshal.Cast<byte, float>(x.bytes);
        using var quantized = QuantizedActivations.FromImages(xs, geometry, Packed, activations.Mode, activations.Scale, activations.ZeroPoint, activations.Symmetric);
        fixed (byte* py = y.bytes)
        {
            Int8Kernel.Multiply(Packed, quantized, quantized.Rows, (float*)py, N, relu, path, outputPlane: geometry.OutHeight * geometry.OutWidth);
        }

        return y;
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

    /// <summary>
    /// Packs b-bit weights LSB first, row by row, each row starting on a byte: two's complement fields for 2–7 bits
    /// (4 bits: low nibble first), one sign bit for 1 bit (1 = +1, 0 = −1).
    /// </summary>
    public byte[] PackBits()
    {
        int perRow = ((K * Bits) + 7) / 8;
        var packed = new byte[N * perRow];
        int mask = (1 << Bits) - 1;
        for (int row = 0; row < N; row++)
        {
            for (int i = 0; i < K; i++)
            {
                int value = Q[(row * K) + i];
                int field = Bits == 1 ? (value > 0 ? 1 : 0) : value & mask;
                int bit = i * Bits;
                int index = (row * perRow) + (bit / 8);
                int shifted = field << (bit % 8);
                packed[index] |= (byte)shifted;
                if ((bit % 8) + Bits > 8)
                {
                    packed[index + 1] |= (byte)(shifted >> 8);
                }
            }
        }

        return packed;
    }

    /// <summary>Inverts <see cref="PackBits"/>.</summary>
    public static sbyte[] UnpackBits(ReadOnlySpan<byte> packed, int n, int k, int bits)
    {
        int perRow = ((k * bits) + 7) / 8;
        var q = new sbyte[n * k];
        int mask = (1 << bits) - 1;
        for (int row = 0; row < n; row++)
        {
            for (int i = 0; i < k; i++)
            {
                int bit = i * bits;
                int index = (row * perRow) + (bit / 8);
                int word = packed[index] | (index + 1 < packed.Length ? packed[index + 1] << 8 : 0);
                int field = (word >> (bit % 8)) & mask;
                q[(row * k) + i] = (sbyte)(bits == 1 ? (field == 1 ? 1 : -1) : (field << (32 - bits)) >> (32 - bits));
            }
        }

        return q;
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

    /// <summary>The scale of an all-zero binary group: float's smallest normal value.</summary>
    internal const float SmallestBinaryScale = 1.17549435E-38f;

    internal static float ScaleFor(ReadOnlySpan<float> values, int qmax, int bits)
    {
        if (bits == 1)
        {
            // Binary weights: the mean magnitude minimises the squared error of sign(w)·α (XNOR-Net).
            double sum = 0;
            foreach (float v in values)
            {
                sum += Math.Abs(v);
            }

            // An all-zero group (a pruned row) cannot be ±α with α = 0 (scales are positive): the smallest normal
            // float stands in, so it dequantizes to ±1.2e-38, zero for every practical purpose.
            return values.Length == 0 || sum == 0 ? SmallestBinaryScale : (float)(sum / values.Length);
        }

        float maxAbs = MaxAbs(values);
        float s = maxAbs == 0 ? 1f : maxAbs / qmax;
        // 4-bit layers store their scales as float16: quantize with the scale that will be stored.
        return bits == 4 ? (float)(Half)Math.Max(s, 1e-4f) : s;
    }
}
