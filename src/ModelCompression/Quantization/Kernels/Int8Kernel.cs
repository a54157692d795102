using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.Arm;
using System.Runtime.Intrinsics.X86;

namespace ModelCompression.Quantization.Kernels;

/// <summary>The instruction-set paths of the library's integer matrix kernel.</summary>
/// <remarks>
/// Every path computes the same exact int32 sums, so results never depend on the machine. .NET 10 exposes no
/// AVX-512 VNNI intrinsics (dotnet/runtime#86849), so AVX-512 machines without AVX-VNNI run <see cref="Avx512BW"/>.
/// </remarks>
public enum Int8KernelPath
{
    /// <summary>Plain C#, one multiply-add per weight. The reference every other path matches bit for bit.</summary>
    Scalar,

    /// <summary>AVX2: <c>vpmaddubsw</c> + <c>vpmaddwd</c>, 8 output columns per 256-bit register.</summary>
    Avx2,

    /// <summary>AVX-VNNI: <c>vpdpbusd</c>, 8 output columns per 256-bit register.</summary>
    AvxVnni,

    /// <summary>AVX-512BW: <c>vpmaddubsw</c> + <c>vpmaddwd</c>, 16 output columns per 512-bit register.</summary>
    Avx512BW,

    /// <summary>Arm64 AdvSimd without the dot-product extension: widening multiplies and pairwise adds.</summary>
    AdvSimd,

    /// <summary>Arm64 AdvSimd with the dot-product extension (<c>sdot</c>).</summary>
    AdvSimdDotProduct,
}

/// <summary>
/// The library's integer matrix kernel: y = x · Wᵀ for 8-bit or 4-bit weights and 7-bit unsigned activations,
/// with exact int32 sums per block of inputs and a float epilogue (scales, zero points, bias, ReLU).
/// </summary>
/// <remarks>
/// <para>
/// Activations use 0–127 (a 7-bit range, as fbgemm's <c>reduce_range</c> does): then no pair sum of
/// <c>vpmaddubsw</c> can saturate (2 · 127 · 128 &lt; 32,768), so every path's int32 sums are exact and equal.
/// </para>
/// <para>
/// Weights are packed once into panels of 16 output columns; within a panel, each group of 4 inputs holds the 4
/// weights of column 0, then column 1, ... (64 bytes), so one register load serves 16 columns and one broadcast of
/// 4 activation bytes. 4-bit weights pack two such groups into one 64-byte block as low and high nibbles.
/// </para>
/// </remarks>
public static unsafe class Int8Kernel
{
    /// <summary>The output columns of one packed panel.</summary>
    internal const int PanelWidth = 16;

    /// <summary>Work (multiply-adds) below which one thread is faster than several.</summary>
    private const long ParallelThreshold = 1L << 22;

    /// <summary>Gets the fastest path this machine supports.</summary>
    public static Int8KernelPath BestPath { get; } = DetectBestPath();

    /// <summary>Gets every path this machine supports, fastest last.</summary>
    public static IReadOnlyList<Int8KernelPath> SupportedPaths { get; } =
        Enum.GetValues<Int8KernelPath>().Where(IsSupported).OrderBy(Rank).ToArray();

    /// <summary>Returns whether this machine can run <paramref name="path"/>.</summary>
    /// <param name="path">The path.</param>
    /// <returns><see langword="true"/> when supported.</returns>
    public static bool IsSupported(Int8KernelPath path) => path switch
    {
        Int8KernelPath.Scalar => true,
        Int8KernelPath.Avx2 => Avx2.IsSupported,
        Int8KernelPath.AvxVnni => AvxVnni.IsSupported,
        Int8KernelPath.Avx512BW => Avx512BW.IsSupported,
        Int8KernelPath.AdvSimd => AdvSimd.Arm64.IsSupported,
        Int8KernelPath.AdvSimdDotProduct => AdvSimd.Arm64.IsSupported && Dp.IsSupported,
        _ => false,
    };

    private static int Rank(Int8KernelPath path) => path switch
    {
        Int8KernelPath.Scalar => 0,
        Int8KernelPath.Avx2 or Int8KernelPath.AdvSimd => 1,
        Int8KernelPath.AvxVnni or Int8KernelPath.AdvSimdDotProduct => 2,
        _ => 3,
    };

    private static Int8KernelPath DetectBestPath() =>
        Enum.GetValues<Int8KernelPath>().Where(IsSupported).OrderBy(Rank).Last();

    /// <summary>
    /// Computes y[m, n] = bias[n] + Σ_b sa[m, b] · (scale[b, n] · S[m, n, b] − za[m, b] · scaledSum[b, n]) for
    /// rows [0, rows), where S is the exact int32 sum of activation × weight over input block b; optionally clamps
    /// at zero. With <paramref name="raw"/>, writes the int32 sums instead (one block only).
    /// </summary>
    /// <remarks>
    /// With <paramref name="outputPlane"/> L &gt; 0, row m is output pixel m mod L of image m / L and y is written in
    /// [image, N, L] (NCHW) order instead of [rows, N].
    /// </remarks>
    internal static void Multiply(PackedWeights weights, QuantizedActivations activations, int rows, float* y, int ldy, bool relu, Int8KernelPath path, int* raw = null, int outputPlane = 0)
    {
        if (!IsSupported(path))
        {
            throw new PlatformNotSupportedException($"This machine cannot run the {path} kernel path.");
        }

        if (raw is not null && weights.Blocks != 1)
        {
            throw new ArgumentException("Raw int32 output needs a single input block.", nameof(raw));
        }

        if (rows == 0 || weights.N == 0)
        {
            return;
        }

        var args = new Args(weights, activations, y, ldy, relu, raw, outputPlane);
        long work = (long)rows * weights.Kp * weights.Np;
        int threads = work < ParallelThreshold ? 1 : Environment.ProcessorCount;
        int panels = weights.Panels;
        if (threads <= 1)
        {
            RunPanels(args, 0, panels, 0, rows, path);
            return;
        }

        // Each thread owns whole panels (output columns) or, when there are few panels (a convolution with few
        // filters), whole runs of rows: every output is computed by one thread, in one order.
        bool byPanels = panels >= 2 * threads;
        Parallel.For(0, threads, new ParallelOptions { MaxDegreeOfParallelism = threads }, t =>
        {
            if (byPanels)
            {
                RunPanels(args, (int)((long)panels * t / threads), (int)((long)panels * (t + 1) / threads), 0, rows, path);
            }
            else
            {
                int quads = (rows + 3) / 4;
                int start = (int)Math.Min(rows, 4L * (quads * (long)t / threads));
                int end = (int)Math.Min(rows, 4L * (quads * (long)(t + 1) / threads));
                RunPanels(args, 0, panels, start, end, path);
            }
        });
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void RunPanels(in Args args, int start, int end, int firstRow, int rows, Int8KernelPath path)
    {
        for (int p = start; p < end; p++)
        {
            int m = firstRow;
            switch (path)
            {
                case Int8KernelPath.Avx512BW:
                    for (; m + 4 <= rows; m += 4)
                    {
                        Rows4Avx512(args, p, m);
                    }

                    for (; m < rows; m++)
                    {
                        Rows1Avx512(args, p, m);
                    }

                    break;
                case Int8KernelPath.Avx2:
                case Int8KernelPath.AvxVnni:
                    bool vnni = path == Int8KernelPath.AvxVnni;
                    for (; m + 4 <= rows; m += 4)
                    {
                        Rows4Avx2(args, p, m, vnni);
                    }

                    for (; m < rows; m++)
                    {
                        Rows1Avx2(args, p, m, vnni);
                    }

                    break;
                case Int8KernelPath.AdvSimd:
                case Int8KernelPath.AdvSimdDotProduct:
                    bool dot = path == Int8KernelPath.AdvSimdDotProduct;
                    for (; m < rows; m++)
                    {
                        Rows1AdvSimd(args, p, m, dot);
                    }

                    break;
                default:
                    for (; m < rows; m++)
                    {
                        Rows1Scalar(args, p, m);
                    }

                    break;
            }
        }
    }

    /// <summary>Pointers and sizes of one call; plain values so that worker threads can share them.</summary>
    private readonly struct Args
    {
        public readonly nint W;
        public readonly int PairsPerPanel;
        public readonly int BytesPerPair;
        public readonly bool Int4;
        public readonly int PairsPerBlock;
        public readonly int Blocks;
        public readonly nint Scale;
        public readonly nint ScaledSum;
        public readonly nint Bias;
        public readonly int Np;
        public readonly int N;
        public readonly nint A;
        public readonly int Lda;
        public readonly nint ActScale;
        public readonly nint ActZero;
        public readonly nint Y;
        public readonly int Ldy;
        public readonly bool Relu;
        public readonly nint Raw;
        public readonly int Plane;

        public Args(PackedWeights w, QuantizedActivations a, float* y, int ldy, bool relu, int* raw, int plane)
        {
            Plane = plane;
            W = (nint)w.DataPointer;
            PairsPerPanel = w.Kp / 8;
            BytesPerPair = w.Bits == 8 ? 128 : 64;
            Int4 = w.Bits == 4;
            PairsPerBlock = w.BlockSize / 8;
            Blocks = w.Blocks;
            Scale = (nint)w.ScalePointer;
            ScaledSum = (nint)w.ScaledSumPointer;
            Bias = (nint)w.BiasPointer;
            Np = w.Np;
            N = w.N;
            A = (nint)a.Data;
            Lda = a.Stride;
            ActScale = (nint)a.Scales;
            ActZero = (nint)a.ZeroPoints;
            Y = (nint)y;
            Ldy = ldy;
            Relu = relu;
            Raw = (nint)raw;
        }

        public byte* Panel(int p) => (byte*)W + ((long)p * PairsPerPanel * BytesPerPair);

        public byte* Row(int m) => (byte*)A + ((long)m * Lda);

        public float* RowScale(int m) => (float*)ActScale + ((long)m * Blocks);

        public float* RowZero(int m) => (float*)ActZero + ((long)m * Blocks);

        public float* BlockScale(int b, int p) => (float*)Scale + ((long)b * Np) + (p * PanelWidth);

        public float* BlockSum(int b, int p) => (float*)ScaledSum + ((long)b * Np) + (p * PanelWidth);

        /// <summary>Writes 16 results of row m, panel p (fewer in the last panel), applying ReLU.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Store(int m, int p, ReadOnlySpan<float> values)
        {
            int count = Math.Min(PanelWidth, N - (p * PanelWidth));
            if (Plane > 0)
            {
                // NCHW: column n of pixel l of image b goes to y[b, n, l].
                long image = m / Plane, pixel = m % Plane;
                float* plane = (float*)Y + (((image * N) + (p * PanelWidth)) * Plane) + pixel;
                for (int i = 0; i < count; i++)
                {
                    plane[(long)i * Plane] = Relu ? MathF.Max(values[i], 0f) : values[i];
                }

                return;
            }

            float* dst = (float*)Y + ((long)m * Ldy) + (p * PanelWidth);
            for (int i = 0; i < count; i++)
            {
                dst[i] = Relu ? MathF.Max(values[i], 0f) : values[i];
            }
        }

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void StoreRaw(int m, int p, ReadOnlySpan<int> values)
        {
            int count = Math.Min(PanelWidth, N - (p * PanelWidth));
            int* dst = (int*)Raw + ((long)m * N) + (p * PanelWidth);
            for (int i = 0; i < count; i++)
            {
                dst[i] = values[i];
            }
        }
    }

    // ---------------------------------------------------------------- scalar reference

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Rows1Scalar(in Args g, int p, int m)
    {
        byte* panel = g.Panel(p);
        byte* a = g.Row(m);
        Span<float> acc = stackalloc float[PanelWidth];
        Span<int> sums = stackalloc int[PanelWidth];
        for (int c = 0; c < PanelWidth; c++)
        {
            acc[c] = ((float*)g.Bias)[(p * PanelWidth) + c];
        }

        for (int b = 0; b < g.Blocks; b++)
        {
            sums.Clear();
            for (int q = b * g.PairsPerBlock; q < (b + 1) * g.PairsPerBlock; q++)
            {
                byte* block = panel + ((long)q * g.BytesPerPair);
                for (int half = 0; half < 2; half++)
                {
                    for (int c = 0; c < PanelWidth; c++)
                    {
                        for (int kk = 0; kk < 4; kk++)
                        {
                            int weight = g.Int4
                                ? ((half == 0 ? block[(c * 4) + kk] & 0x0F : block[(c * 4) + kk] >> 4) - 8)
                                : (sbyte)block[(half * 64) + (c * 4) + kk];
                            sums[c] += a[(q * 8) + (half * 4) + kk] * weight;
                        }
                    }
                }
            }

            Epilogue(g, p, m, b, sums, acc);
        }

        Finish(g, p, m, sums, acc);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Epilogue(in Args g, int p, int m, int b, ReadOnlySpan<int> sums, Span<float> acc)
    {
        float sa = g.RowScale(m)[b];
        float za = g.RowZero(m)[b];
        float* scale = g.BlockScale(b, p);
        float* sum = g.BlockSum(b, p);
        for (int c = 0; c < PanelWidth; c++)
        {
            acc[c] += sa * ((sums[c] * scale[c]) - (za * sum[c]));
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Finish(in Args g, int p, int m, ReadOnlySpan<int> sums, ReadOnlySpan<float> acc)
    {
        if (g.Raw != 0)
        {
            g.StoreRaw(m, p, sums);
        }
        else
        {
            g.Store(m, p, acc);
        }
    }

    // ---------------------------------------------------------------- AVX-512BW

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<int> Dot512(Vector512<int> acc, int a4, Vector512<sbyte> w, Vector512<short> ones) =>
        acc + Avx512BW.MultiplyAddAdjacent(Avx512BW.MultiplyAddAdjacent(Vector512.Create(a4).AsByte(), w), ones);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Load512(byte* block, bool int4, out Vector512<sbyte> lo, out Vector512<sbyte> hi)
    {
        if (int4)
        {
            var v = Vector512.Load(block);
            var mask = Vector512.Create((byte)0x0F);
            var eight = Vector512.Create((sbyte)8);
            lo = (v & mask).AsSByte() - eight;
            hi = ((v.AsUInt16() >>> 4).AsByte() & mask).AsSByte() - eight;
        }
        else
        {
            lo = Vector512.Load((sbyte*)block);
            hi = Vector512.Load((sbyte*)block + 64);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Epilogue512(in Args g, Vector512<float> acc, Vector512<int> sums, int m, int b, Vector512<float> scale, Vector512<float> sum)
    {
        float sa = g.RowScale(m)[b];
        float za = g.RowZero(m)[b];
        return acc + (((Vector512.ConvertToSingle(sums) * scale) - (Vector512.Create(za) * sum)) * sa);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Rows4Avx512(in Args g, int p, int m)
    {
        byte* panel = g.Panel(p);
        byte* a0 = g.Row(m), a1 = g.Row(m + 1), a2 = g.Row(m + 2), a3 = g.Row(m + 3);
        var ones = Vector512.Create((short)1);
        var bias = Vector512.Load((float*)g.Bias + (p * PanelWidth));
        Vector512<float> f0 = bias, f1 = bias, f2 = bias, f3 = bias;
        Vector512<int> s0 = default, s1 = default, s2 = default, s3 = default;
        for (int b = 0; b < g.Blocks; b++)
        {
            s0 = s1 = s2 = s3 = Vector512<int>.Zero;
            int end = (b + 1) * g.PairsPerBlock;
            for (int q = b * g.PairsPerBlock; q < end; q++)
            {
                Load512(panel + ((long)q * g.BytesPerPair), g.Int4, out var lo, out var hi);
                int k = q * 8;
                s0 = Dot512(Dot512(s0, *(int*)(a0 + k), lo, ones), *(int*)(a0 + k + 4), hi, ones);
                s1 = Dot512(Dot512(s1, *(int*)(a1 + k), lo, ones), *(int*)(a1 + k + 4), hi, ones);
                s2 = Dot512(Dot512(s2, *(int*)(a2 + k), lo, ones), *(int*)(a2 + k + 4), hi, ones);
                s3 = Dot512(Dot512(s3, *(int*)(a3 + k), lo, ones), *(int*)(a3 + k + 4), hi, ones);
            }

            var scale = Vector512.Load(g.BlockScale(b, p));
            var sum = Vector512.Load(g.BlockSum(b, p));
            f0 = Epilogue512(g, f0, s0, m, b, scale, sum);
            f1 = Epilogue512(g, f1, s1, m + 1, b, scale, sum);
            f2 = Epilogue512(g, f2, s2, m + 2, b, scale, sum);
            f3 = Epilogue512(g, f3, s3, m + 3, b, scale, sum);
        }

        if (g.Plane > 0 && g.Raw == 0 && m / g.Plane == (m + 3) / g.Plane)
        {
            StorePlane4(g, p, m, f0, f1, f2, f3);
            return;
        }

        Finish512(g, p, m, s0, f0);
        Finish512(g, p, m + 1, s1, f1);
        Finish512(g, p, m + 2, s2, f2);
        Finish512(g, p, m + 3, s3, f3);
    }

    /// <summary>
    /// Writes four consecutive pixels of one image to an NCHW output: per output channel one 4-float store instead
    /// of four scattered ones.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void StorePlane4(in Args g, int p, int m, Vector512<float> f0, Vector512<float> f1, Vector512<float> f2, Vector512<float> f3)
    {
        float* rows = stackalloc float[4 * PanelWidth];
        f0.Store(rows);
        f1.Store(rows + PanelWidth);
        f2.Store(rows + (2 * PanelWidth));
        f3.Store(rows + (3 * PanelWidth));
        int count = Math.Min(PanelWidth, g.N - (p * PanelWidth));
        long image = m / g.Plane, pixel = m % g.Plane;
        float* output = (float*)g.Y + (((image * g.N) + (p * PanelWidth)) * g.Plane) + pixel;
        for (int n = 0; n < count; n++)
        {
            var v = Vector128.Create(rows[n], rows[PanelWidth + n], rows[(2 * PanelWidth) + n], rows[(3 * PanelWidth) + n]);
            (g.Relu ? Vector128.Max(v, Vector128<float>.Zero) : v).Store(output + ((long)n * g.Plane));
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Rows1Avx512(in Args g, int p, int m)
    {
        byte* panel = g.Panel(p);
        byte* a = g.Row(m);
        var ones = Vector512.Create((short)1);
        var f = Vector512.Load((float*)g.Bias + (p * PanelWidth));
        Vector512<int> s = default;
        for (int b = 0; b < g.Blocks; b++)
        {
            // Two accumulators hide the latency of the multiply-add chain.
            Vector512<int> even = Vector512<int>.Zero, odd = Vector512<int>.Zero;
            int end = (b + 1) * g.PairsPerBlock;
            for (int q = b * g.PairsPerBlock; q < end; q++)
            {
                Load512(panel + ((long)q * g.BytesPerPair), g.Int4, out var lo, out var hi);
                int k = q * 8;
                even = Dot512(even, *(int*)(a + k), lo, ones);
                odd = Dot512(odd, *(int*)(a + k + 4), hi, ones);
            }

            s = even + odd;
            f = Epilogue512(g, f, s, m, b, Vector512.Load(g.BlockScale(b, p)), Vector512.Load(g.BlockSum(b, p)));
        }

        Finish512(g, p, m, s, f);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Finish512(in Args g, int p, int m, Vector512<int> sums, Vector512<float> acc)
    {
        if (g.Raw == 0 && g.Plane == 0 && (p + 1) * PanelWidth <= g.N)
        {
            // A whole panel of a row-major output: one vector store.
            (g.Relu ? Vector512.Max(acc, Vector512<float>.Zero) : acc).Store((float*)g.Y + ((long)m * g.Ldy) + (p * PanelWidth));
            return;
        }

        Span<int> s = stackalloc int[PanelWidth];
        Span<float> f = stackalloc float[PanelWidth];
        sums.CopyTo(s);
        acc.CopyTo(f);
        Finish(g, p, m, s, f);
    }

    // ---------------------------------------------------------------- AVX2 / AVX-VNNI (two 8-column halves)

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<int> Dot256(Vector256<int> acc, Vector256<byte> a, Vector256<sbyte> w, Vector256<short> ones, bool vnni) =>
        vnni
            ? AvxVnni.MultiplyWideningAndAdd(acc, a, w)
            : acc + Avx2.MultiplyAddAdjacent(Avx2.MultiplyAddAdjacent(a, w), ones);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Load256(byte* block, bool int4, out Vector256<sbyte> lo0, out Vector256<sbyte> lo1, out Vector256<sbyte> hi0, out Vector256<sbyte> hi1)
    {
        if (int4)
        {
            var mask = Vector256.Create((byte)0x0F);
            var eight = Vector256.Create((sbyte)8);
            var v0 = Vector256.Load(block);
            var v1 = Vector256.Load(block + 32);
            lo0 = (v0 & mask).AsSByte() - eight;
            lo1 = (v1 & mask).AsSByte() - eight;
            hi0 = ((v0.AsUInt16() >>> 4).AsByte() & mask).AsSByte() - eight;
            hi1 = ((v1.AsUInt16() >>> 4).AsByte() & mask).AsSByte() - eight;
        }
        else
        {
            lo0 = Vector256.Load((sbyte*)block);
            lo1 = Vector256.Load((sbyte*)block + 32);
            hi0 = Vector256.Load((sbyte*)block + 64);
            hi1 = Vector256.Load((sbyte*)block + 96);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> Epilogue256(Vector256<float> acc, Vector256<int> sums, float sa, float za, Vector256<float> scale, Vector256<float> sum) =>
        acc + (((Vector256.ConvertToSingle(sums) * scale) - (Vector256.Create(za) * sum)) * sa);

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Rows4Avx2(in Args g, int p, int m, bool vnni)
    {
        byte* panel = g.Panel(p);
        byte* a0 = g.Row(m), a1 = g.Row(m + 1), a2 = g.Row(m + 2), a3 = g.Row(m + 3);
        var ones = Vector256.Create((short)1);
        var bias0 = Vector256.Load((float*)g.Bias + (p * PanelWidth));
        var bias1 = Vector256.Load((float*)g.Bias + (p * PanelWidth) + 8);
        Vector256<float> f00 = bias0, f01 = bias1, f10 = bias0, f11 = bias1, f20 = bias0, f21 = bias1, f30 = bias0, f31 = bias1;
        Vector256<int> s00 = default, s01 = default, s10 = default, s11 = default, s20 = default, s21 = default, s30 = default, s31 = default;
        for (int b = 0; b < g.Blocks; b++)
        {
            s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = Vector256<int>.Zero;
            int end = (b + 1) * g.PairsPerBlock;
            for (int q = b * g.PairsPerBlock; q < end; q++)
            {
                Load256(panel + ((long)q * g.BytesPerPair), g.Int4, out var lo0, out var lo1, out var hi0, out var hi1);
                int k = q * 8;
                var x = Vector256.Create(*(int*)(a0 + k)).AsByte();
                var y = Vector256.Create(*(int*)(a0 + k + 4)).AsByte();
                s00 = Dot256(Dot256(s00, x, lo0, ones, vnni), y, hi0, ones, vnni);
                s01 = Dot256(Dot256(s01, x, lo1, ones, vnni), y, hi1, ones, vnni);
                x = Vector256.Create(*(int*)(a1 + k)).AsByte();
                y = Vector256.Create(*(int*)(a1 + k + 4)).AsByte();
                s10 = Dot256(Dot256(s10, x, lo0, ones, vnni), y, hi0, ones, vnni);
                s11 = Dot256(Dot256(s11, x, lo1, ones, vnni), y, hi1, ones, vnni);
                x = Vector256.Create(*(int*)(a2 + k)).AsByte();
                y = Vector256.Create(*(int*)(a2 + k + 4)).AsByte();
                s20 = Dot256(Dot256(s20, x, lo0, ones, vnni), y, hi0, ones, vnni);
                s21 = Dot256(Dot256(s21, x, lo1, ones, vnni), y, hi1, ones, vnni);
                x = Vector256.Create(*(int*)(a3 + k)).AsByte();
                y = Vector256.Create(*(int*)(a3 + k + 4)).AsByte();
                s30 = Dot256(Dot256(s30, x, lo0, ones, vnni), y, hi0, ones, vnni);
                s31 = Dot256(Dot256(s31, x, lo1, ones, vnni), y, hi1, ones, vnni);
            }

            var scale0 = Vector256.Load(g.BlockScale(b, p));
            var scale1 = Vector256.Load(g.BlockScale(b, p) + 8);
            var sum0 = Vector256.Load(g.BlockSum(b, p));
            var sum1 = Vector256.Load(g.BlockSum(b, p) + 8);
            float sa = g.RowScale(m)[b], za = g.RowZero(m)[b];
            f00 = Epilogue256(f00, s00, sa, za, scale0, sum0);
            f01 = Epilogue256(f01, s01, sa, za, scale1, sum1);
            sa = g.RowScale(m + 1)[b];
            za = g.RowZero(m + 1)[b];
            f10 = Epilogue256(f10, s10, sa, za, scale0, sum0);
            f11 = Epilogue256(f11, s11, sa, za, scale1, sum1);
            sa = g.RowScale(m + 2)[b];
            za = g.RowZero(m + 2)[b];
            f20 = Epilogue256(f20, s20, sa, za, scale0, sum0);
            f21 = Epilogue256(f21, s21, sa, za, scale1, sum1);
            sa = g.RowScale(m + 3)[b];
            za = g.RowZero(m + 3)[b];
            f30 = Epilogue256(f30, s30, sa, za, scale0, sum0);
            f31 = Epilogue256(f31, s31, sa, za, scale1, sum1);
        }

        Finish256(g, p, m, s00, s01, f00, f01);
        Finish256(g, p, m + 1, s10, s11, f10, f11);
        Finish256(g, p, m + 2, s20, s21, f20, f21);
        Finish256(g, p, m + 3, s30, s31, f30, f31);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Rows1Avx2(in Args g, int p, int m, bool vnni)
    {
        byte* panel = g.Panel(p);
        byte* a = g.Row(m);
        var ones = Vector256.Create((short)1);
        var f0 = Vector256.Load((float*)g.Bias + (p * PanelWidth));
        var f1 = Vector256.Load((float*)g.Bias + (p * PanelWidth) + 8);
        Vector256<int> s0 = default, s1 = default;
        for (int b = 0; b < g.Blocks; b++)
        {
            Vector256<int> e0 = Vector256<int>.Zero, e1 = Vector256<int>.Zero, o0 = Vector256<int>.Zero, o1 = Vector256<int>.Zero;
            int end = (b + 1) * g.PairsPerBlock;
            for (int q = b * g.PairsPerBlock; q < end; q++)
            {
                Load256(panel + ((long)q * g.BytesPerPair), g.Int4, out var lo0, out var lo1, out var hi0, out var hi1);
                int k = q * 8;
                var x = Vector256.Create(*(int*)(a + k)).AsByte();
                var y = Vector256.Create(*(int*)(a + k + 4)).AsByte();
                e0 = Dot256(e0, x, lo0, ones, vnni);
                e1 = Dot256(e1, x, lo1, ones, vnni);
                o0 = Dot256(o0, y, hi0, ones, vnni);
                o1 = Dot256(o1, y, hi1, ones, vnni);
            }

            s0 = e0 + o0;
            s1 = e1 + o1;
            float sa = g.RowScale(m)[b], za = g.RowZero(m)[b];
            f0 = Epilogue256(f0, s0, sa, za, Vector256.Load(g.BlockScale(b, p)), Vector256.Load(g.BlockSum(b, p)));
            f1 = Epilogue256(f1, s1, sa, za, Vector256.Load(g.BlockScale(b, p) + 8), Vector256.Load(g.BlockSum(b, p) + 8));
        }

        Finish256(g, p, m, s0, s1, f0, f1);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Finish256(in Args g, int p, int m, Vector256<int> s0, Vector256<int> s1, Vector256<float> f0, Vector256<float> f1)
    {
        Span<int> s = stackalloc int[PanelWidth];
        Span<float> f = stackalloc float[PanelWidth];
        s0.CopyTo(s);
        s1.CopyTo(s[8..]);
        f0.CopyTo(f);
        f1.CopyTo(f[8..]);
        Finish(g, p, m, s, f);
    }

    // ---------------------------------------------------------------- Arm64 AdvSimd (four 4-column quarters)

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector128<int> Dot128(Vector128<int> acc, Vector128<sbyte> a, Vector128<sbyte> w, bool dot)
    {
        if (dot)
        {
            return Dp.DotProduct(acc, w, a);
        }

        // Products of 0..127 and -128..127 fit in int16; two pairwise widening adds give one int32 per column.
        var low = AdvSimd.AddPairwiseWidening(AdvSimd.MultiplyWideningLower(w.GetLower(), a.GetLower()));
        var high = AdvSimd.AddPairwiseWidening(AdvSimd.MultiplyWideningUpper(w, a));
        return acc + AdvSimd.Arm64.AddPairwise(low, high);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Rows1AdvSimd(in Args g, int p, int m, bool dot)
    {
        byte* panel = g.Panel(p);
        byte* a = g.Row(m);
        var mask = Vector128.Create((byte)0x0F);
        var eight = Vector128.Create((sbyte)8);
        Span<int> sums = stackalloc int[PanelWidth];
        Span<float> acc = stackalloc float[PanelWidth];
        new ReadOnlySpan<float>((float*)g.Bias + (p * PanelWidth), PanelWidth).CopyTo(acc);
        for (int b = 0; b < g.Blocks; b++)
        {
            Vector128<int> s0 = default, s1 = default, s2 = default, s3 = default;
            int end = (b + 1) * g.PairsPerBlock;
            for (int q = b * g.PairsPerBlock; q < end; q++)
            {
                byte* block = panel + ((long)q * g.BytesPerPair);
                int k = q * 8;
                var x = Vector128.Create(*(int*)(a + k)).AsSByte();
                var y = Vector128.Create(*(int*)(a + k + 4)).AsSByte();
                for (int part = 0; part < 4; part++)
                {
                    Vector128<sbyte> lo, hi;
                    if (g.Int4)
                    {
                        var v = Vector128.Load(block + (part * 16));
                        lo = (v & mask).AsSByte() - eight;
                        hi = ((v.AsUInt16() >>> 4).AsByte() & mask).AsSByte() - eight;
                    }
                    else
                    {
                        lo = Vector128.Load((sbyte*)block + (part * 16));
                        hi = Vector128.Load((sbyte*)block + 64 + (part * 16));
                    }

                    var s = part switch { 0 => s0, 1 => s1, 2 => s2, _ => s3 };
                    s = Dot128(Dot128(s, x, lo, dot), y, hi, dot);
                    switch (part)
                    {
                        case 0: s0 = s; break;
                        case 1: s1 = s; break;
                        case 2: s2 = s; break;
                        default: s3 = s; break;
                    }
                }
            }

            s0.CopyTo(sums);
            s1.CopyTo(sums[4..]);
            s2.CopyTo(sums[8..]);
            s3.CopyTo(sums[12..]);
            Epilogue(g, p, m, b, sums, acc);
        }

        Finish(g, p, m, sums, acc);
    }
}
