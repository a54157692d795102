using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace ModelCompression.Quantization.Kernels;

/// <summary>How a quantized layer turns its float input into the kernel's 7-bit activations.</summary>
internal enum ActivationMode
{
    /// <summary>One scale and zero point fixed at conversion (from calibration).</summary>
    Static,

    /// <summary>One scale and zero point per call, from the whole batch's range.</summary>
    PerTensor,

    /// <summary>One scale and zero point per row (sample), from that row's range.</summary>
    PerRow,

    /// <summary>One scale and zero point per row and weight group, from that part's range.</summary>
    PerBlock,
}

/// <summary>The shape of one convolution call: input, kernel, stride, padding, dilation and output sizes.</summary>
internal readonly record struct ConvGeometry(
    int Batch, int Channels, int Height, int Width,
    int KernelHeight, int KernelWidth, int StrideHeight, int StrideWidth,
    int PadHeight, int PadWidth, int DilationHeight, int DilationWidth,
    int OutHeight, int OutWidth);

/// <summary>
/// A batch of activations quantized to 0..127 for <see cref="Int8Kernel"/>, rows padded to the weights' blocks,
/// with a scale and zero point per row and block. Owns native memory; one per call, so calls never share state.
/// </summary>
internal sealed unsafe class QuantizedActivations : IDisposable
{
    /// <summary>The largest quantized value: activations use 7 bits so that no kernel path saturates.</summary>
    public const int MaxLevel = 127;

    private QuantizedActivations(int rows, int stride, int blocks)
    {
        Rows = rows;
        Stride = stride;
        Blocks = blocks;
        Data = (byte*)NativeMemory.AlignedAlloc((nuint)Math.Max(64L, (long)rows * stride), 64);
        Scales = (float*)NativeMemory.Alloc((nuint)Math.Max(1L, (long)rows * blocks), sizeof(float));
        ZeroPoints = (float*)NativeMemory.Alloc((nuint)Math.Max(1L, (long)rows * blocks), sizeof(float));
    }

    public int Rows { get; }

    public int Stride { get; }

    public int Blocks { get; }

    public byte* Data { get; private set; }

    public float* Scales { get; private set; }

    public float* ZeroPoints { get; private set; }

    /// <summary>The scale and zero point that map [min, max] (widened to hold 0) onto 0..127.</summary>
    public static (float Scale, float ZeroPoint) Range(float min, float max, bool symmetric)
    {
        if (!float.IsFinite(min) || !float.IsFinite(max))
        {
            throw new ArgumentException("The activations hold NaN or infinite values.");
        }

        if (symmetric)
        {
            float m = MathF.Max(MathF.Abs(min), MathF.Abs(max));
            return m == 0 ? (1f, 64f) : (m / 63f, 64f);
        }

        float lo = MathF.Min(min, 0f), hi = MathF.Max(max, 0f);
        if (hi == lo)
        {
            return (1f, 0f);
        }

        float scale = (hi - lo) / MaxLevel;
        float zero = Math.Clamp(MathF.Round(-lo / scale), 0f, MaxLevel);
        return (scale, zero);
    }

    /// <summary>Quantizes rows of <paramref name="x"/> ([rows, k], row-major) for <paramref name="weights"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static QuantizedActivations Quantize(ReadOnlySpan<float> x, int rows, PackedWeights weights, ActivationMode mode, float staticScale, float staticZero, bool symmetric)
    {
        int k = weights.K;
        if (x.Length != (long)rows * k)
        {
            throw new ArgumentException($"Expected {rows} × {k} inputs, got {x.Length}.");
        }

        var result = new QuantizedActivations(rows, weights.Kp, weights.Blocks);
        try
        {
            int blockSize = weights.BlockSize;
            var (tensorScale, tensorZero) = mode switch
            {
                ActivationMode.Static => (staticScale, staticZero),
                ActivationMode.PerTensor => RangeOf(x, symmetric),
                _ => (0f, 0f),
            };

            for (int r = 0; r < rows; r++)
            {
                var row = x.Slice(r * k, k);
                byte* dst = result.Data + ((long)r * result.Stride);
                var (rowScale, rowZero) = mode == ActivationMode.PerRow ? RangeOf(row, symmetric) : (tensorScale, tensorZero);
                for (int b = 0; b < weights.Blocks; b++)
                {
                    int start = b * blockSize;
                    int end = Math.Min(k, start + blockSize);
                    var part = start < end ? row[start..end] : [];
                    var (scale, zero) = mode == ActivationMode.PerBlock ? RangeOf(part, symmetric) : (rowScale, rowZero);
                    result.Scales[(r * weights.Blocks) + b] = scale;
                    result.ZeroPoints[(r * weights.Blocks) + b] = zero;
                    QuantizeSpan(part, 1f / scale, zero, new Span<byte>(dst + start, part.Length));
                }

                // Padding multiplies zero weights; any value works, zero keeps it tidy.
                new Span<byte>(dst + k, result.Stride - k).Clear();
            }

            return result;
        }
        catch
        {
            result.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Quantizes an NCHW image batch with one scale and zero point (static, or this call's range) and lays it out as
    /// im2col rows for a convolution: one row per output pixel, in the weight's (channel, kh, kw) order, padding
    /// at the zero point (the quantized 0).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static QuantizedActivations FromImages(ReadOnlySpan<float> x, ConvGeometry geometry, PackedWeights weights, ActivationMode mode, float staticScale, float staticZero, bool symmetric)
    {
        if (mode is not (ActivationMode.Static or ActivationMode.PerTensor))
        {
            throw new ArgumentException($"Image rows are quantized with one range; {mode} needs the float path.", nameof(mode));
        }

        var (scale, zero) = mode == ActivationMode.Static ? (staticScale, staticZero) : RangeOf(x, symmetric);
        var g = geometry;
        int rows = checked(g.Batch * g.OutHeight * g.OutWidth);
        // 8 spare bytes per row: the 8-byte copies below may spill past the last kernel column of a row.
        var result = new QuantizedActivations(rows, weights.Kp + 8, weights.Blocks);
        byte[]? levels = null;
        try
        {
            // 8 spare bytes: the 8-byte copies below may read past the last pixel.
            levels = System.Buffers.ArrayPool<byte>.Shared.Rent(x.Length + 8);
            QuantizeSpan(x, 1f / scale, zero, levels.AsSpan(0, x.Length));
            for (int i = 0; i < (long)rows * weights.Blocks; i++)
            {
                result.Scales[i] = scale;
                result.ZeroPoints[i] = zero;
            }

            byte pad = (byte)zero;
            int stride = result.Stride;
            byte* data = result.Data;
            var source = levels;

            // The im2col loop itself: fully optimized from the first call (a short latency measurement never tiers up).
            // For each (channel, kernel row), each output pixel takes the kernel width's run of input bytes: inside
            // the image one 8-byte copy (whatever it carries past the run is overwritten by the next run, or lands in
            // the row's spare bytes), at the border byte by byte with the zero point as padding. Every run is
            // written, padding included. Bytes past K in a row multiply zero weights, so their value does not matter.
            [MethodImpl(MethodImplOptions.AggressiveOptimization)]
            void Image(int image)
            {
                fixed (byte* q = source)
                {
                    byte* input = q + ((long)image * g.Channels * g.Height * g.Width);
                    byte* rowsOfImage = data + ((long)image * g.OutHeight * g.OutWidth * stride);
                    int kernelWidth = g.KernelWidth, strideWidth = g.StrideWidth, padWidth = g.PadWidth, width = g.Width;
                    bool wordCopies = g.DilationWidth == 1 && kernelWidth <= 8;
                    for (int c = 0; c < g.Channels; c++)
                    {
                        byte* channel = input + ((long)c * g.Height * width);
                        for (int kh = 0; kh < g.KernelHeight; kh++)
                        {
                            int k = ((c * g.KernelHeight) + kh) * kernelWidth;
                            for (int oh = 0; oh < g.OutHeight; oh++)
                            {
                                int ih = (oh * g.StrideHeight) - g.PadHeight + (kh * g.DilationHeight);
                                byte* dst = rowsOfImage + ((long)oh * g.OutWidth * stride) + k;
                                if ((uint)ih >= (uint)g.Height)
                                {
                                    // Padding rows are written too: an earlier run's spare bytes may have landed here.
                                    for (int ow = 0; ow < g.OutWidth; ow++, dst += stride)
                                    {
                                        new Span<byte>(dst, kernelWidth).Fill(pad);
                                    }

                                    continue;
                                }

                                byte* line = channel + ((long)ih * width);
                                for (int ow = 0; ow < g.OutWidth; ow++, dst += stride)
                                {
                                    int iw0 = (ow * strideWidth) - padWidth;
                                    if (wordCopies && iw0 >= 0 && iw0 + kernelWidth <= width)
                                    {
                                        *(ulong*)dst = *(ulong*)(line + iw0);
                                        continue;
                                    }

                                    for (int kw = 0; kw < kernelWidth; kw++)
                                    {
                                        int iw = iw0 + (kw * g.DilationWidth);
                                        dst[kw] = (uint)iw < (uint)width ? line[iw] : pad;
                                    }
                                }
                            }
                        }
                    }
                }
            }

            if ((long)rows * stride < 1 << 18 || g.Batch == 1)
            {
                for (int image = 0; image < g.Batch; image++)
                {
                    Image(image);
                }
            }
            else
            {
                Parallel.For(0, g.Batch, Image);
            }

            return result;
        }
        catch
        {
            result.Dispose();
            throw;
        }
        finally
        {
            if (levels is not null)
            {
                System.Buffers.ArrayPool<byte>.Shared.Return(levels);
            }
        }
    }

    /// <summary>q = clamp(round(x / scale + zero), 0, 127), rounding half to even, identically in every lane.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void QuantizeSpan(ReadOnlySpan<float> x, float inverseScale, float zero, Span<byte> q)
    {
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            var inv = Vector256.Create(inverseScale);
            var z = Vector256.Create(zero);
            var max = Vector256.Create((float)MaxLevel);
            for (; i + 32 <= x.Length; i += 32)
            {
                var i0 = Level(x.Slice(i, 8), inv, z, max);
                var i1 = Level(x.Slice(i + 8, 8), inv, z, max);
                var i2 = Level(x.Slice(i + 16, 8), inv, z, max);
                var i3 = Level(x.Slice(i + 24, 8), inv, z, max);
                var bytes = Vector256.Narrow(Vector256.Narrow(i0, i1), Vector256.Narrow(i2, i3)).AsByte();
                bytes.CopyTo(q.Slice(i, 32));
            }
        }

        for (; i < x.Length; i++)
        {
            q[i] = (byte)MathF.Round(Math.Clamp((x[i] * inverseScale) + zero, 0f, MaxLevel), MidpointRounding.ToEven);
        }
    }

    private static Vector256<int> Level(ReadOnlySpan<float> x, Vector256<float> inverseScale, Vector256<float> zero, Vector256<float> max) =>
        Vector256.ConvertToInt32(Vector256.Round(Vector256.Min(Vector256.Max((Vector256.Create(x) * inverseScale) + zero, Vector256<float>.Zero), max)));

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static (float Scale, float ZeroPoint) RangeOf(ReadOnlySpan<float> x, bool symmetric)
    {
        if (x.IsEmpty)
        {
            return (1f, symmetric ? 64f : 0f);
        }

        float min = float.PositiveInfinity, max = float.NegativeInfinity;
        int i = 0;
        if (Vector256.IsHardwareAccelerated && x.Length >= 8)
        {
            var vmin = Vector256.Create(float.PositiveInfinity);
            var vmax = Vector256.Create(float.NegativeInfinity);
            var nan = Vector256<float>.Zero;
            for (; i + 8 <= x.Length; i += 8)
            {
                var v = Vector256.Create(x.Slice(i, 8));
                vmin = Vector256.Min(vmin, v);
                vmax = Vector256.Max(vmax, v);
                nan |= ~Vector256.Equals(v, v);
            }

            if (nan != Vector256<float>.Zero)
            {
                throw new ArgumentException("The activations hold NaN values.");
            }

            for (int j = 0; j < 8; j++)
            {
                min = MathF.Min(min, vmin.GetElement(j));
                max = MathF.Max(max, vmax.GetElement(j));
            }
        }

        for (; i < x.Length; i++)
        {
            if (float.IsNaN(x[i]))
            {
                throw new ArgumentException("The activations hold NaN values.");
            }

            min = MathF.Min(min, x[i]);
            max = MathF.Max(max, x[i]);
        }

        return Range(min, max, symmetric);
    }

    /// <summary>Frees the native buffers. Every caller disposes in a <c>using</c>, so no finalizer is needed.</summary>
    public void Dispose()
    {
        NativeMemory.AlignedFree(Data);
        NativeMemory.Free(Scales);
        NativeMemory.Free(ZeroPoints);
        Data = null;
        Scales = null;
        ZeroPoints = null;
    }
}
