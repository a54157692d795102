using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace ModelCompression.Quantization.Kernels;

/// <summary>
/// Integer weights [N, K] laid out for <see cref="Int8Kernel"/>: panels of 16 output columns, inputs padded to whole
/// blocks, with per-block scales, scale × Σ weight (for the activation zero point) and the bias padded to the panels.
/// Immutable once built and safe to share between threads and model copies.
/// </summary>
internal sealed unsafe class PackedWeights
{
    private readonly byte[] data;
    private readonly float[] scale;
    private readonly float[] scaledSum;
    private readonly float[] bias;

    private PackedWeights(int n, int k, int kp, int bits, int blockSize)
    {
        N = n;
        K = k;
        Kp = kp;
        Bits = bits;
        BlockSize = blockSize;
        Blocks = kp / blockSize;
        Panels = (n + Int8Kernel.PanelWidth - 1) / Int8Kernel.PanelWidth;
        Np = Panels * Int8Kernel.PanelWidth;
        int bytesPerPair = bits == 8 ? 128 : 64;

        // Pinned, so the kernel can hold raw pointers without fixing them on every call.
        data = GC.AllocateArray<byte>(Math.Max(1, Panels * (kp / 8) * bytesPerPair), pinned: true);
        scale = GC.AllocateArray<float>(Math.Max(1, Blocks * Np), pinned: true);
        scaledSum = GC.AllocateArray<float>(Math.Max(1, Blocks * Np), pinned: true);
        bias = GC.AllocateArray<float>(Math.Max(1, Np), pinned: true);
    }

    /// <summary>Gets the output features.</summary>
    public int N { get; }

    /// <summary>Gets the input features.</summary>
    public int K { get; }

    /// <summary>Gets the input features padded to whole blocks (a multiple of 8).</summary>
    public int Kp { get; }

    /// <summary>Gets the weight bits: 8 or 4.</summary>
    public int Bits { get; }

    /// <summary>Gets the inputs per block (one scale per output and block).</summary>
    public int BlockSize { get; }

    /// <summary>Gets the number of input blocks.</summary>
    public int Blocks { get; }

    /// <summary>Gets the number of 16-column panels.</summary>
    public int Panels { get; }

    /// <summary>Gets the output features padded to whole panels.</summary>
    public int Np { get; }

    public byte* DataPointer => (byte*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(data));

    public float* ScalePointer => (float*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(scale));

    public float* ScaledSumPointer => (float*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(scaledSum));

    public float* BiasPointer => (float*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(bias));

    /// <summary>Packs quantized weights.</summary>
    /// <param name="q">The integer weights, row-major [n, k]: −127..127 for 8 bits, −8..7 for 4 bits.</param>
    /// <param name="n">Output features.</param>
    /// <param name="k">Input features.</param>
    /// <param name="bits">8 or 4.</param>
    /// <param name="groupSize">Inputs per scale (a multiple of 8), or 0 for one scale per output row.</param>
    /// <param name="scales">The scales, row-major [n, groups] (groups = 1 without a group size).</param>
    /// <param name="bias">The bias (length n), or empty.</param>
    /// <returns>The packed weights.</returns>
    public static PackedWeights Create(ReadOnlySpan<sbyte> q, int n, int k, int bits, int groupSize, ReadOnlySpan<float> scales, ReadOnlySpan<float> bias)
    {
        if (bits is not (8 or 4))
        {
            throw new ArgumentOutOfRangeException(nameof(bits), bits, "The kernel packs 8-bit or 4-bit weights.");
        }

        if (groupSize < 0 || groupSize % 8 != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(groupSize), groupSize, "The group size must be a positive multiple of 8, or 0.");
        }

        int kp = groupSize > 0 ? RoundUp(k, groupSize) : Math.Max(8, RoundUp(k, 8));
        int blockSize = groupSize > 0 ? groupSize : kp;
        var packed = new PackedWeights(n, k, kp, bits, blockSize);
        int groups = packed.Blocks;
        if (q.Length != (long)n * k || scales.Length != (long)n * groups || (bias.Length != 0 && bias.Length != n))
        {
            throw new ArgumentException("The weight, scale and bias sizes do not agree.");
        }

        int pairs = kp / 8;
        int bytesPerPair = bits == 8 ? 128 : 64;
        for (int p = 0; p < packed.Panels; p++)
        {
            for (int pair = 0; pair < pairs; pair++)
            {
                var block = packed.data.AsSpan(((p * pairs) + pair) * bytesPerPair, bytesPerPair);
                for (int c = 0; c < Int8Kernel.PanelWidth; c++)
                {
                    int row = (p * Int8Kernel.PanelWidth) + c;
                    for (int kk = 0; kk < 4; kk++)
                    {
                        int k0 = (pair * 8) + kk;
                        int w0 = Weight(q, row, k0, n, k);
                        int w1 = Weight(q, row, k0 + 4, n, k);
                        if (bits == 8)
                        {
                            block[(c * 4) + kk] = unchecked((byte)(sbyte)w0);
                            block[64 + (c * 4) + kk] = unchecked((byte)(sbyte)w1);
                        }
                        else
                        {
                            block[(c * 4) + kk] = (byte)((w0 + 8) | ((w1 + 8) << 4));
                        }
                    }
                }
            }
        }

        for (int row = 0; row < n; row++)
        {
            for (int b = 0; b < groups; b++)
            {
                int sum = 0;
                int end = Math.Min(k, (b + 1) * blockSize);
                for (int i = b * blockSize; i < end; i++)
                {
                    sum += q[(row * k) + i];
                }

                float s = scales[(row * groups) + b];
                packed.scale[(b * packed.Np) + row] = s;
                packed.scaledSum[(b * packed.Np) + row] = s * sum;
            }

            packed.bias[row] = bias.Length == 0 ? 0f : bias[row];
        }

        return packed;
    }

    private static int Weight(ReadOnlySpan<sbyte> q, int row, int col, int n, int k) =>
        row < n && col < k ? q[(row * k) + col] : 0;

    internal static int RoundUp(int value, int multiple) => (value + multiple - 1) / multiple * multiple;
}
