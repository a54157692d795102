using System.Runtime.InteropServices;
using ModelCompression.Modules;
using ModelCompression.Quantization.Kernels;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Quantization;

/// <summary>
/// An Embedding whose table is stored as int8 levels (one scale per row by default) or packed int4 levels (one scale
/// per row and group of the embedding dimension), never as a float copy. A call gathers only the rows its token ids
/// name and dequantizes them: the layer holds a quarter (int8) or an eighth (int4) of the float table plus its
/// scales. An inference layer: calls are thread-safe and do not train.
/// </summary>
/// <remarks>
/// <para>
/// Stored tensors, read directly by every call (so <c>load_state_dict</c> changes what the layer computes):
/// <c>weight</c> — int8 [count, dim] at 8 bits; at 4 bits uint8 [count, ⌈dim/2⌉], two levels per byte, low nibble
/// first (as <see cref="QuantizedLinear"/> packs them) — and <c>weight_scale</c> — float32 [count, groups] at 8 bits,
/// float16 at 4 bits, or [1] when one scale serves the whole table. Groups run along the embedding dimension; a
/// dimension shorter than the group size is one group per row, and one not a multiple of it ends each row with a
/// shorter group.
/// </para>
/// <para>
/// Input: int64 or int32 token ids of any shape; output: float32 [..., dim]. An id outside 0..count−1 is an
/// <see cref="ArgumentException"/> naming the table's size. The float layer's <c>padding_idx</c> and <c>max_norm</c>
/// are not carried over (TorchSharp 0.107 does not expose them): the padding row is quantized like any other (a zero
/// row stays exactly zero), and rows are never renormalised.
/// </para>
/// <para>
/// <c>.to(dtype)</c> leaves the integer table and its scales as they are, and the output stays float32 whatever the
/// rest of the model is converted to. <c>.to(device)</c> moves both tensors without changing their types: every call is
/// made of device-agnostic tensor operations (gather, shifts, multiply).
/// </para>
/// </remarks>
public sealed class QuantizedEmbedding : nn.Module<Tensor, Tensor>, IQuantizedLayer
{
    private Tensor weight;
    private Tensor weight_scale;

    private QuantizedEmbedding(long count, long dim, int bits, QuantizationGranularity granularity, Tensor weightLevels, Tensor scales)
        : base(nameof(QuantizedEmbedding))
    {
        NumEmbeddings = count;
        EmbeddingDim = dim;
        WeightBits = bits;
        WeightGranularity = granularity;
        weight = weightLevels;
        weight_scale = scales;
        RegisterComponents();
    }

    /// <summary>Gets the number of rows of the table (the vocabulary size).</summary>
    public long NumEmbeddings { get; }

    /// <summary>Gets the length of each row (the embedding dimension).</summary>
    public long EmbeddingDim { get; }

    /// <inheritdoc/>
    public QuantizationMode Mode => WeightBits == 4 ? QuantizationMode.WeightOnlyInt4 : QuantizationMode.WeightOnlyInt8;

    /// <inheritdoc/>
    public QuantizationGranularity WeightGranularity { get; }

    /// <inheritdoc/>
    /// <value>Always <see langword="false"/>: a lookup has nothing to fuse.</value>
    public bool FusedRelu => false;

    /// <inheritdoc/>
    /// <remarks>
    /// For an embedding this is the SQNR of the dequantized table against the float table, measured when the layer
    /// was made: a lookup's output is rows of the table, so it is the output SQNR over a uniform spread of tokens.
    /// </remarks>
    public double? SqnrDb { get; internal set; }

    /// <inheritdoc/>
    public int WeightBits { get; }

    /// <inheritdoc/>
    public int? Rank => null;

    /// <inheritdoc/>
    public long ParameterCount => NumEmbeddings * EmbeddingDim;

    /// <inheritdoc/>
    public long NonzeroParameterCount => Levels().LongCount(v => v != 0);

    /// <summary>Gets the descriptor that copies and stores this kind (registered by the library).</summary>
    internal static LayerDescriptor Descriptor { get; } = new QuantizedEmbeddingDescriptor();

    /// <summary>The columns of a group (<see cref="EmbeddingDim"/> when one scale covers a row).</summary>
    private long GroupSize => WeightGranularity is PerGroupGranularity g ? g.Size : EmbeddingDim;

    /// <summary>Quantizes an Embedding's table (the Embedding is not changed).</summary>
    /// <param name="embedding">The layer; its weight must be finite.</param>
    /// <param name="bits">8 or 4.</param>
    /// <param name="granularity">
    /// The scales' granularity along each row: per tensor, per channel (per row) or per group of the embedding
    /// dimension; 4 bits need <see cref="QuantizationGranularity.PerGroup"/>. The default is per channel for 8 bits and
    /// per group of 64 for 4 bits.
    /// </param>
    /// <returns>The quantized layer, on the CPU, with its weight SQNR measured.</returns>
    /// <exception cref="ArgumentException">The weight is not finite, <paramref name="bits"/> is not 8 or 4, or the granularity does not fit.</exception>
    public static QuantizedEmbedding FromEmbedding(Embedding embedding, int bits = 8, QuantizationGranularity? granularity = null)
    {
        ArgumentNullException.ThrowIfNull(embedding);
        using var w = embedding.weight!;
        return Create(w, bits, granularity ?? (bits == 4 ? QuantizationGranularity.PerGroup(64) : QuantizationGranularity.PerChannel));
    }

    /// <summary>Quantizes a float table [count, dim]; the checks of <see cref="FromEmbedding"/>.</summary>
    internal static QuantizedEmbedding Create(Tensor table, int bits, QuantizationGranularity granularity)
    {
        if (bits is not (8 or 4))
        {
            throw new ArgumentOutOfRangeException(nameof(bits), bits, "A quantized embedding stores 8- or 4-bit levels.");
        }

        if (granularity.Errors(nameof(QuantizedEmbedding), "granularity").FirstOrDefault() is { } error)
        {
            throw new ArgumentException(error, nameof(granularity));
        }

        if (bits == 4 && granularity is not PerGroupGranularity)
        {
            throw new ArgumentException($"4-bit embeddings need per-group scales (was {granularity}).", nameof(granularity));
        }

        if (table.dim() != 2 || table.shape[0] * table.shape[1] > Array.MaxLength)
        {
            throw new ArgumentException($"An embedding table must be [count, dim] with at most {Array.MaxLength} values; got [{string.Join(", ", table.shape)}].", nameof(table));
        }

        var matrix = QuantizedTensors.QuantizeWeight(table, null, bits, granularity, "Embedding");
        // The shared layout of quantized layers' tensors; a lookup has no activations to quantize.
        var (levels, scales, _, _, _, _, _) = QuantizedTensors.Create(matrix, new ActivationSettings(ActivationMode.PerRow, 0, 0, false), [matrix.N, matrix.K]);
        return new QuantizedEmbedding(matrix.N, matrix.K, bits, matrix.Granularity, levels, scales) { SqnrDb = WeightSqnr(table, matrix) };
    }

    /// <summary>
    /// A layer of the given settings whose tensors are to be overwritten (by a copy or a file): uninitialised, so that a
    /// file's claimed sizes cost nothing until its tensors, checked against them, arrive.
    /// </summary>
    internal static QuantizedEmbedding Skeleton(long count, long dim, int bits, QuantizationGranularity granularity)
    {
        long groups = granularity is PerGroupGranularity g ? (dim + g.Size - 1) / g.Size : 1;
        long[] scaleShape = granularity is PerTensorGranularity || (count == 1 && groups == 1) ? [1] : [count, groups];
        var levels = bits == 8 ? empty([count, dim], ScalarType.Int8) : empty([count, (dim + 1) / 2], ScalarType.Byte);
        var scales = empty(scaleShape, bits == 4 ? ScalarType.Float16 : ScalarType.Float32);
        return new QuantizedEmbedding(count, dim, bits, granularity, levels, scales);
    }

    /// <summary>Returns the float table [count, dim] that the stored levels and scales stand for.</summary>
    /// <returns>A new CPU tensor the caller owns (a full float copy: for inspection, not for inference).</returns>
    public Tensor DequantizedWeight() => tensor(ToMatrix().Dequantize(), [NumEmbeddings, EmbeddingDim]);

    /// <inheritdoc/>
    /// <returns>0: a lookup multiplies nothing.</returns>
    public long CountMacs(Tensor input, Tensor output) => 0;

    /// <summary>Looks up the rows of the given token ids and dequantizes them.</summary>
    /// <param name="input">int64 or int32 token ids of any shape, each in 0..<see cref="NumEmbeddings"/>−1.</param>
    /// <returns>float32 [..., <see cref="EmbeddingDim"/>], on the table's device.</returns>
    /// <exception cref="ArgumentException">The ids are not integers, or one is outside the table.</exception>
    public override Tensor forward(Tensor input)
    {
        ArgumentNullException.ThrowIfNull(input);
        if (input.dtype is not (ScalarType.Int64 or ScalarType.Int32))
        {
            throw new ArgumentException($"QuantizedEmbedding expects int64 or int32 token ids; got {input.dtype}.", nameof(input));
        }

        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var ids = input.to(weight.device).reshape(-1).to(ScalarType.Int64);
        if (ids.numel() > 0)
        {
            // LibTorch's own index error would name neither the layer nor the id: check the range first.
            long min = ids.min().item<long>(), max = ids.max().item<long>();
            if (min < 0 || max >= NumEmbeddings)
            {
                throw new ArgumentException(
                    $"QuantizedEmbedding: token id {(min < 0 ? min : max)} is outside the table of {NumEmbeddings} rows (ids 0..{NumEmbeddings - 1}).", nameof(input));
            }
        }

        var rows = weight.index_select(0, ids);
        var values = WeightBits == 8 ? rows.to(ScalarType.Float32) : UnpackNibbles(rows, EmbeddingDim);
        var scales = weight_scale.dim() == 1 ? weight_scale.to(ScalarType.Float32) : weight_scale.index_select(0, ids).to(ScalarType.Float32);
        if (scales.dim() == 2 && scales.shape[1] > 1)
        {
            // One scale per group of columns: repeat each across its group, the last group cut to the row's end.
            scales = scales.repeat_interleave(GroupSize, 1).narrow(1, 0, EmbeddingDim);
        }

        return values.mul_(scales).reshape([.. input.shape, EmbeddingDim]).MoveToOuterDisposeScope();
    }

    /// <inheritdoc/>
    public override string ToString() =>
        $"QuantizedEmbedding(count={NumEmbeddings}, dim={EmbeddingDim}, {Mode}, int{WeightBits} {WeightGranularity})";

    /// <summary>Leaves the integer table and its scales in their types: a quantized layer has no other precision to convert to.</summary>
    /// <param name="dtype">Ignored.</param>
    /// <param name="non_blocking">Ignored.</param>
    /// <returns>This layer.</returns>
    protected override nn.Module _to(ScalarType dtype, bool non_blocking) => this;

    /// <summary>Moves the table and its scales to a device, keeping their types.</summary>
    /// <param name="deviceType">The device type.</param>
    /// <param name="deviceIndex">The device index (CUDA).</param>
    /// <param name="non_blocking">Whether the copy may be asynchronous.</param>
    /// <returns>This layer.</returns>
    protected override nn.Module _to(DeviceType deviceType, int deviceIndex, bool non_blocking)
    {
        MoveTo(new Device(deviceType, deviceIndex), non_blocking);
        return this;
    }

    /// <summary>Moves the table and its scales to a device, keeping their types (the dtype is ignored).</summary>
    /// <param name="device">The device.</param>
    /// <param name="dtype">Ignored: the integer table and its scales keep their types.</param>
    /// <param name="non_blocking">Whether the copy may be asynchronous.</param>
    /// <returns>This layer.</returns>
    protected override nn.Module _to(Device device, ScalarType dtype, bool non_blocking)
    {
        MoveTo(device, non_blocking);
        return this;
    }

    /// <summary>The stored levels and scales as a CPU matrix (the reference math of the quantization code).</summary>
    internal QuantizedMatrix ToMatrix()
    {
        using var scope = NewDisposeScope();
        var scales = weight_scale.detach().to(ScalarType.Float32).cpu().contiguous().data<float>().ToArray();
        return QuantizedMatrix.FromLevels(checked((int)NumEmbeddings), checked((int)EmbeddingDim), WeightBits, WeightGranularity, Levels(), scales, null);
    }

    /// <summary>
    /// Checks the stored tensors as a file gave them: every scale positive and finite, every level within the
    /// symmetric range (±127, or ±7 at 4 bits).
    /// </summary>
    /// <exception cref="InvalidDataException">A scale or a level is out of range.</exception>
    internal void ThrowIfStoredInvalid()
    {
        using var scope = NewDisposeScope();
        var scales = weight_scale.detach().to(ScalarType.Float32).cpu();
        using var zero = 0.ToScalar();
        if (!(isfinite(scales).all().item<bool>() && scales.gt(zero).all().item<bool>()))
        {
            throw new InvalidDataException($"A {nameof(QuantizedEmbedding)} of {NumEmbeddings}×{EmbeddingDim} has a scale that is not positive and finite.");
        }

        int max = QuantizedMatrix.MaxLevel(WeightBits);
        if (Levels().Any(v => v < -max))
        {
            throw new InvalidDataException($"A {nameof(QuantizedEmbedding)} of {NumEmbeddings}×{EmbeddingDim} holds a level below −{max}, outside its {WeightBits}-bit range.");
        }
    }

    /// <summary>The levels row-major [count, dim], unpacked from the stored tensor.</summary>
    private sbyte[] Levels()
    {
        using var scope = NewDisposeScope();
        var stored = weight.detach().cpu().contiguous();
        return WeightBits == 8
            ? MemoryMarshal.Cast<byte, sbyte>(stored.bytes).ToArray()
            : QuantizedMatrix.UnpackBits(stored.bytes, checked((int)NumEmbeddings), checked((int)EmbeddingDim), 4);
    }

    /// <summary>Signed 4-bit levels of packed rows [n, ⌈dim/2⌉] (low nibble first) as float32 [n, dim].</summary>
    private static Tensor UnpackNibbles(Tensor packed, long dim)
    {
        using var sixteen = 16.ToScalar();
        using var seven = 7.ToScalar();
        var bytes = packed.to(ScalarType.Int16);
        var nibbles = stack([bytes.remainder(sixteen), bytes.floor_divide(sixteen)], -1).reshape(packed.shape[0], packed.shape[1] * 2).narrow(1, 0, dim);
        // Two's complement: 8..15 stand for −8..−1.
        return where(nibbles.gt(seven), nibbles.sub(sixteen), nibbles).to(ScalarType.Float32);
    }

    /// <summary>10·log10(Σ w² / Σ (w − ŵ)²) of the float table against the dequantized one.</summary>
    private static double WeightSqnr(Tensor table, QuantizedMatrix matrix)
    {
        using var scope = NewDisposeScope();
        var w = table.detach().to(ScalarType.Float32).cpu().contiguous();
        var original = MemoryMarshal.Cast<byte, float>(w.bytes);
        var restored = matrix.Dequantize();
        double signal = 0, noise = 0;
        for (int i = 0; i < restored.Length; i++)
        {
            signal += (double)original[i] * original[i];
            double d = original[i] - restored[i];
            noise += d * d;
        }

        return noise == 0 ? double.PositiveInfinity : 10 * Math.Log10(signal / noise);
    }

    private void MoveTo(Device device, bool nonBlocking)
    {
        bool same(Tensor t) => t.device_type == device.type && (device.type != DeviceType.CUDA || device.index < 0 || t.device_index == device.index);
        if (same(weight) && same(weight_scale))
        {
            return;
        }

        // Both copies are made before either is swapped in, so a failed move leaves the layer whole.
        var levels = weight.to(device, non_blocking: nonBlocking);
        Tensor scales;
        try
        {
            scales = weight_scale.to(device, non_blocking: nonBlocking);
        }
        catch
        {
            levels.Dispose();
            throw;
        }

        var (oldLevels, oldScales) = (weight, weight_scale);
        (weight, weight_scale) = (levels, scales);
        ConditionallyRegisterBuffer(nameof(weight), weight, persistent: true);
        ConditionallyRegisterBuffer(nameof(weight_scale), weight_scale, persistent: true);
        oldLevels.Dispose();
        oldScales.Dispose();
    }
}

/// <summary>
/// Copies and stores <see cref="QuantizedEmbedding"/> through the layer registry: count, dim, bits, granularity and
/// group size by name; the tensors by their <c>state_dict</c> names (int8 and packed uint8 as raw bytes, scales exactly).
/// </summary>
internal sealed class QuantizedEmbeddingDescriptor() : TorchSharpLayers.BuiltIn("ModelCompression.QuantizedEmbedding", typeof(QuantizedEmbedding))
{
    public override LayerAttributes GetAttributes(nn.Module module)
    {
        var e = (QuantizedEmbedding)module;
        var a = new LayerAttributes()
            .Set("count", e.NumEmbeddings).Set("dim", e.EmbeddingDim).Set("bits", e.WeightBits)
            .Set("granularity", e.WeightGranularity switch { PerTensorGranularity => "tensor", PerChannelGranularity => "channel", _ => "group" });
        if (e.WeightGranularity is PerGroupGranularity g)
        {
            a.Set("group", g.Size);
        }

        if (e.SqnrDb is { } sqnr && double.IsFinite(sqnr))
        {
            a.Set("sqnrDb", sqnr);
        }

        return a;
    }

    public override nn.Module Create(LayerAttributes a, int version)
    {
        long count = a.GetInt64("count", 1, TorchSharpLayers.MaxSize), dim = a.GetInt64("dim", 1, TorchSharpLayers.MaxSize);
        int bits = (int)a.GetInt64("bits", 4, 8);
        if (bits is not (4 or 8) || count * dim > Array.MaxLength)
        {
            throw new InvalidDataException($"A {nameof(QuantizedEmbedding)} of {count}×{dim} at {bits} bits cannot be built (4 or 8 bits, at most {Array.MaxLength} values).");
        }

        QuantizationGranularity granularity = a.GetString("granularity") switch
        {
            "tensor" => QuantizationGranularity.PerTensor,
            "channel" => QuantizationGranularity.PerChannel,
            "group" => QuantizationGranularity.PerGroup((int)a.GetInt64("group", 1, dim)),
            var other => throw new InvalidDataException($"A {nameof(QuantizedEmbedding)} has granularity '{other}'; expected tensor, channel or group."),
        };
        if (granularity is PerGroupGranularity g && g.Size < dim && g.Size % 8 != 0)
        {
            throw new InvalidDataException($"A {nameof(QuantizedEmbedding)} has groups of {g.Size}; a group shorter than the row ({dim}) is a multiple of 8.");
        }

        if (bits == 4 && granularity is not PerGroupGranularity)
        {
            throw new InvalidDataException($"A 4-bit {nameof(QuantizedEmbedding)} must have per-group scales (was {granularity}).");
        }

        var layer = QuantizedEmbedding.Skeleton(count, dim, bits, granularity);
        if (a.Contains("sqnrDb"))
        {
            layer.SqnrDb = a.GetDouble("sqnrDb");
        }

        return layer;
    }

    public override long? CountMacs(nn.Module module, Tensor input, Tensor output) => 0;

    public override void CheckLoaded(nn.Module module) => ((QuantizedEmbedding)module).ThrowIfStoredInvalid();
}
