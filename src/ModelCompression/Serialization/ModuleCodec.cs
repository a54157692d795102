using ModelCompression.Architecture;
using ModelCompression.Clustering;
using ModelCompression.Factorization;
using ModelCompression.Pruning;
using ModelCompression.Quantization;
using ModelCompression.Quantization.Kernels;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Serialization;

/// <summary>The module kinds the file describes. Values are part of the format: never renumber.</summary>
internal enum NodeKind : byte
{
    Sequential = 1,
    Custom = 2,
    Linear = 3,
    Conv2d = 4,
    BatchNorm1d = 5,
    BatchNorm2d = 6,
    LayerNorm = 7,
    ReLU = 8,
    ReLU6 = 9,
    SiLU = 10,
    Sigmoid = 11,
    Tanh = 12,
    GELU = 13,
    LeakyReLU = 14,
    Hardswish = 15,
    Identity = 16,
    Flatten = 17,
    Dropout = 18,
    MaxPool2d = 19,
    AvgPool2d = 20,
    AdaptiveAvgPool2d = 21,
    Softmax = 22,
    SparseLinear = 40,
    QuantizedLinear = 41,
    QuantizedConv2d = 42,
    LowRankLinear = 43,
    LowRankConv2d = 44,
    HalfPrecision = 45,
    Clustered = 46,
    DepthwiseSeparableConv2d = 47,
    InvertedResidual = 48,
    SqueezeExcitation = 49,

    /// <summary>A <see cref="QuantizedLinear"/> with a zero point per scale (HQQ): the levels span the bits' whole two's complement range.</summary>
    AsymmetricQuantizedLinear = 50,

    /// <summary>
    /// A <see cref="QuantizedLinear"/> with AWQ's explicit input scales (its input divided by them before the kernel),
    /// symmetric or (attribute <c>asymmetric</c>) with HQQ's zero points.
    /// </summary>
    ScaledQuantizedLinear = 51,

    /// <summary>A layer kind of the <see cref="Modules.LayerRegistry"/>: its id, version and named attributes, its own tensors by name, its children.</summary>
    Registered = 60,
}

/// <summary>One module of the architecture as read from the file, with its decoded tensors, before it is built.</summary>
internal sealed class NodeSpec
{
    public required string Name { get; init; }

    public required string Path { get; init; }

    public required NodeKind Kind { get; init; }

    public required int Index { get; init; }

    public long[] Ints { get; set; } = [];

    public double[] Reals { get; set; } = [];

    public long[] Dims { get; set; } = [];

    public string TypeName { get; set; } = string.Empty;

    public int Version { get; set; }

    public Modules.LayerAttributes? Attributes { get; set; }

    public bool HasData { get; set; }

    public List<NodeSpec> Children { get; } = [];

    public List<object> Arrays { get; } = [];

    public List<(string Name, ScalarType Type, long[] Shape, object Values)> Named { get; } = [];

    public long Scalar { get; set; }

    public string Describe => Path.Length == 0 ? $"the root ({Kind})" : $"'{Path}' ({Kind})";
}

/// <summary>Writes modules to the file's architecture and data sections, and reads them back (see <see cref="CompressedModel"/>).</summary>
internal static class ModuleCodec
{
    public const int MaxDepth = 64;
    public const int MaxChildren = 4096;
    private const long MaxDim = 1L << 30;
    private const long MaxKernel = 1L << 16;

    /// <summary>Per kind: the integer fields (name, min, max), the float fields, whether it has a variable dims list, children, and tensors.</summary>
    private static readonly Dictionary<NodeKind, (string Name, long Min, long Max)[]> IntFields = new()
    {
        [NodeKind.Linear] = [("in", 1, MaxDim), ("out", 1, MaxDim), ("bias", 0, 1)],
        [NodeKind.SparseLinear] = [("in", 1, MaxDim), ("out", 1, MaxDim), ("bias", 0, 1)],
        [NodeKind.Conv2d] = [("in", 1, MaxDim), ("out", 1, MaxDim), ("kh", 1, MaxKernel), ("kw", 1, MaxKernel), ("sh", 1, MaxKernel), ("sw", 1, MaxKernel), ("ph", 0, MaxKernel), ("pw", 0, MaxKernel), ("dh", 1, MaxKernel), ("dw", 1, MaxKernel), ("groups", 1, MaxDim), ("bias", 0, 1), ("paddingMode", 0, 3)],
        [NodeKind.BatchNorm1d] = [("features", 1, MaxDim), ("affine", 0, 1), ("track", 0, 1), ("hasMomentum", 0, 1)],
        [NodeKind.BatchNorm2d] = [("features", 1, MaxDim), ("affine", 0, 1), ("track", 0, 1), ("hasMomentum", 0, 1)],
        [NodeKind.LayerNorm] = [("affine", 0, 1)],
        [NodeKind.GELU] = [("approximate", 0, 1)],
        [NodeKind.Softmax] = [("dim", -16, 16)],
        [NodeKind.Flatten] = [("start", -16, 16), ("end", -16, 16)],
        [NodeKind.MaxPool2d] = [("kh", 1, MaxKernel), ("kw", 1, MaxKernel), ("sh", 1, MaxKernel), ("sw", 1, MaxKernel), ("ph", 0, MaxKernel), ("pw", 0, MaxKernel), ("dh", 1, MaxKernel), ("dw", 1, MaxKernel), ("ceil", 0, 1)],
        [NodeKind.AvgPool2d] = [("kh", 1, MaxKernel), ("kw", 1, MaxKernel), ("sh", 1, MaxKernel), ("sw", 1, MaxKernel), ("ph", 0, MaxKernel), ("pw", 0, MaxKernel), ("ceil", 0, 1), ("countIncludePad", 0, 1), ("divisor", 0, MaxDim)],
        [NodeKind.AdaptiveAvgPool2d] = [("oh", 1, MaxDim), ("ow", 1, MaxDim)],
        [NodeKind.QuantizedLinear] = [("n", 1, MaxDim), ("k", 1, MaxDim), ("bits", 1, 8), ("granularity", 0, 2), ("groupSize", 0, MaxDim), ("mode", 0, 5), ("activations", 0, 3), ("symmetric", 0, 1), ("relu", 0, 1), ("bias", 0, 1)],
        [NodeKind.AsymmetricQuantizedLinear] = [("n", 1, MaxDim), ("k", 1, MaxDim), ("bits", 2, 8), ("granularity", 1, 2), ("groupSize", 0, MaxDim), ("mode", 0, 5), ("activations", 0, 3), ("symmetric", 0, 1), ("relu", 0, 1), ("bias", 0, 1)],
        [NodeKind.ScaledQuantizedLinear] = [("n", 1, MaxDim), ("k", 1, MaxDim), ("bits", 1, 8), ("granularity", 0, 2), ("groupSize", 0, MaxDim), ("mode", 0, 5), ("activations", 0, 3), ("symmetric", 0, 1), ("relu", 0, 1), ("bias", 0, 1), ("asymmetric", 0, 1)],
        [NodeKind.QuantizedConv2d] = [("n", 1, MaxDim), ("k", 1, MaxDim), ("bits", 1, 8), ("granularity", 0, 2), ("groupSize", 0, MaxDim), ("mode", 0, 5), ("activations", 0, 3), ("symmetric", 0, 1), ("relu", 0, 1), ("bias", 0, 1), ("in", 1, MaxDim), ("kh", 1, MaxKernel), ("kw", 1, MaxKernel), ("sh", 1, MaxKernel), ("sw", 1, MaxKernel), ("ph", 0, MaxKernel), ("pw", 0, MaxKernel), ("dh", 1, MaxKernel), ("dw", 1, MaxKernel)],
        [NodeKind.LowRankConv2d] = [("decomposition", 0, 1)],
        [NodeKind.HalfPrecision] = [("bfloat16", 0, 1)],
        [NodeKind.InvertedResidual] = [("residual", 0, 1)],
    };

    private static readonly Dictionary<NodeKind, string[]> RealFields = new()
    {
        [NodeKind.BatchNorm1d] = ["eps", "momentum"],
        [NodeKind.BatchNorm2d] = ["eps", "momentum"],
        [NodeKind.LayerNorm] = ["eps"],
        [NodeKind.LeakyReLU] = ["slope"],
        [NodeKind.Dropout] = ["p"],
        [NodeKind.QuantizedLinear] = ["inputScale", "inputZeroPoint"],
        [NodeKind.AsymmetricQuantizedLinear] = ["inputScale", "inputZeroPoint"],
        [NodeKind.ScaledQuantizedLinear] = ["inputScale", "inputZeroPoint"],
        [NodeKind.QuantizedConv2d] = ["inputScale", "inputZeroPoint"],
    };

    private static readonly HashSet<NodeKind> WithChildren =
    [
        NodeKind.Sequential, NodeKind.Custom, NodeKind.LowRankLinear, NodeKind.LowRankConv2d, NodeKind.HalfPrecision,
        NodeKind.Clustered, NodeKind.DepthwiseSeparableConv2d, NodeKind.InvertedResidual, NodeKind.SqueezeExcitation, NodeKind.Registered,
    ];

    private static readonly HashSet<NodeKind> WithData =
    [
        NodeKind.Linear, NodeKind.SparseLinear, NodeKind.Conv2d, NodeKind.BatchNorm1d, NodeKind.BatchNorm2d, NodeKind.LayerNorm,
        NodeKind.QuantizedLinear, NodeKind.QuantizedConv2d, NodeKind.AsymmetricQuantizedLinear, NodeKind.ScaledQuantizedLinear,
    ];

    /// <summary>What was stored for one module, for size reports.</summary>
    public sealed record Written(string Path, NodeKind Kind, string TypeName, int DataBytes, IReadOnlyList<string> Encodings);

    // ---------------------------------------------------------------- writing

    /// <summary>Writes a model; <paramref name="forSaving"/> refuses training-time layers, which a measurement stores as custom modules.</summary>
    public static void WriteTree(nn.Module<Tensor, Tensor> root, FormatWriter architecture, List<byte[]> data, List<Written> written, bool forSaving)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        WriteNode(root, string.Empty, string.Empty, 0, architecture, data, written, forSaving);
    }

    private static void WriteNode(nn.Module module, string name, string path, int depth, FormatWriter arch, List<byte[]> data, List<Written> written, bool forSaving)
    {
        if (depth > MaxDepth)
        {
            throw new NotSupportedException($"The model nests modules deeper than {MaxDepth} levels at '{path}'.");
        }

        var kind = KindOf(module, path, forSaving);
        int index = written.Count;
        arch.String(name);
        arch.Byte((byte)kind);
        var (ints, reals, dims) = Attributes(kind, module, path);
        foreach (long v in ints)
        {
            arch.VarInt(v);
        }

        foreach (double v in reals)
        {
            arch.Float64(v);
        }

        if (kind == NodeKind.LayerNorm)
        {
            arch.VarUInt(dims.Length);
            foreach (long d in dims)
            {
                arch.VarUInt(d);
            }
        }

        if (kind == NodeKind.Custom)
        {
            arch.String(module.GetType().FullName ?? module.GetType().Name);
        }

        if (kind == NodeKind.Registered)
        {
            WriteRegistered(module, path, arch);
        }

        var payload = new FormatWriter();
        payload.VarUInt(index);
        var encodings = new List<string>();
        WriteTensors(kind, module, payload, encodings, path);
        bool hasData = WithData.Contains(kind) || (kind is NodeKind.Custom or NodeKind.Registered && encodings.Count > 0);
        arch.Bool(hasData);
        if (hasData)
        {
            data.Add(payload.ToArray());
        }

        written.Add(new Written(path, kind, module.GetType().Name, hasData ? payload.Length : 0, encodings));
        var children = WithChildren.Contains(kind) ? module.named_children().ToList() : [];
        if (!WithChildren.Contains(kind) && module.named_children().Any())
        {
            throw new NotSupportedException($"The {module.GetType().Name} at '{path}' has child modules, which this kind of layer cannot hold in the file.");
        }

        arch.VarUInt(children.Count);
        foreach (var (childName, child) in children)
        {
            WriteNode(child, childName, path.Length == 0 ? childName : $"{path}.{childName}", depth + 1, arch, data, written, forSaving);
        }
    }

    private static NodeKind KindOf(nn.Module module, string path, bool forSaving) =>
        LegacyKindOf(module, path, forSaving)
        ?? (Modules.LayerRegistry.Find(module) is not null ? NodeKind.Registered
            : module is nn.Module<Tensor, Tensor> || !Modules.ModuleCloner.IsNativeWrapper(module.GetType()) ? NodeKind.Custom
            : throw new UnsupportedModelException(path, module.GetType().Name,
                $"The {module.GetType().Name} at '{path}' is implemented natively by TorchSharp and its kind is not registered, so the file cannot store it: " +
                $"register it with {nameof(Modules.LayerRegistry)}.{nameof(Modules.LayerRegistry.Register)} or {nameof(Modules.LayerRegistry.RegisterFactory)}."));

    /// <summary>The kinds with a fixed encoding of their own (files before the layer registry use them; they are written the same way still).</summary>
    private static NodeKind? LegacyKindOf(nn.Module module, string path, bool forSaving) => module switch
    {
        Sequential => NodeKind.Sequential,
        Linear => NodeKind.Linear,
        Conv2d conv when conv.padding_type is null => NodeKind.Conv2d,
        BatchNorm1d => NodeKind.BatchNorm1d,
        BatchNorm2d => NodeKind.BatchNorm2d,
        LayerNorm => NodeKind.LayerNorm,
        ReLU => NodeKind.ReLU,
        ReLU6 => NodeKind.ReLU6,
        SiLU => NodeKind.SiLU,
        Sigmoid => NodeKind.Sigmoid,
        Tanh => NodeKind.Tanh,
        GELU => NodeKind.GELU,
        LeakyReLU => NodeKind.LeakyReLU,
        Hardswish => NodeKind.Hardswish,
        Identity => NodeKind.Identity,
        Flatten => NodeKind.Flatten,
        Dropout => NodeKind.Dropout,
        MaxPool2d => NodeKind.MaxPool2d,
        AvgPool2d => NodeKind.AvgPool2d,
        AdaptiveAvgPool2d => NodeKind.AdaptiveAvgPool2d,
        Softmax => NodeKind.Softmax,
        SparseLinear => NodeKind.SparseLinear,
        QuantizedLinear { Matrix.InputScales: not null } => NodeKind.ScaledQuantizedLinear,
        QuantizedLinear { Matrix.ZeroPoints: not null } => NodeKind.AsymmetricQuantizedLinear,
        QuantizedLinear => NodeKind.QuantizedLinear,
        QuantizedConv2d => NodeKind.QuantizedConv2d,
        LowRankLinear => NodeKind.LowRankLinear,
        LowRankConv2d => NodeKind.LowRankConv2d,
        HalfPrecisionLayer => NodeKind.HalfPrecision,
        ClusteredLayer => NodeKind.Clustered,
        DepthwiseSeparableConv2d => NodeKind.DepthwiseSeparableConv2d,
        InvertedResidual => NodeKind.InvertedResidual,
        SqueezeExcitation => NodeKind.SqueezeExcitation,
        FakeQuantLayer when forSaving => throw new NotSupportedException(
            $"The FakeQuantLayer at '{path}' is a training-time layer; convert the model with QuantizationAwareTrainingStep.Convert before saving it."),
        _ => null,
    };

    /// <summary>Attribute value codes in the file: part of the format, never renumber.</summary>
    private enum AttributeType : byte
    {
        Integer = 1,
        Real = 2,
        Boolean = 3,
        Text = 4,
        Integers = 5,
    }

    private static void WriteRegistered(nn.Module module, string path, FormatWriter arch)
    {
        var descriptor = Modules.LayerRegistry.Find(module)!;
        Modules.LayerAttributes attributes;
        try
        {
            attributes = descriptor.GetAttributes(module);
        }
        catch (UnsupportedModelException ex) when (ex.LayerName is null)
        {
            throw new UnsupportedModelException(path, module.GetType().Name, $"Cannot store '{path}': {ex.Message}", ex);
        }

        arch.String(descriptor.Id);
        arch.VarUInt(descriptor.Version);
        arch.VarUInt(attributes.Count);
        foreach (var (name, value) in attributes)
        {
            arch.String(name);
            switch (value)
            {
                case long l:
                    arch.Byte((byte)AttributeType.Integer);
                    arch.VarInt(l);
                    break;
                case double d:
                    arch.Byte((byte)AttributeType.Real);
                    arch.Float64(d);
                    break;
                case bool b:
                    arch.Byte((byte)AttributeType.Boolean);
                    arch.Bool(b);
                    break;
                case string text:
                    arch.Byte((byte)AttributeType.Text);
                    arch.String(text);
                    break;
                case long[] values:
                    arch.Byte((byte)AttributeType.Integers);
                    arch.VarUInt(values.Length);
                    foreach (long v in values)
                    {
                        arch.VarInt(v);
                    }

                    break;
            }
        }
    }

    private static (int Version, Modules.LayerAttributes Attributes) ReadRegistered(ref FormatReader reader, string describe)
    {
        int version = (int)reader.VarUInt($"{describe} version", 1, int.MaxValue);
        long count = reader.VarUInt($"{describe} attribute count", 0, Modules.LayerAttributes.MaxCount);
        var attributes = new Modules.LayerAttributes();
        for (long i = 0; i < count; i++)
        {
            string name = reader.String();
            if (name.Length == 0 || attributes.Contains(name))
            {
                throw reader.Fail($"{describe} has an empty or repeated attribute name '{name}'");
            }

            byte type = reader.Byte();
            switch ((AttributeType)type)
            {
                case AttributeType.Integer:
                    attributes.Set(name, reader.VarInt());
                    break;
                case AttributeType.Real:
                    double d = reader.Float64();
                    attributes.Set(name, double.IsFinite(d) ? d : throw reader.Fail($"{describe} attribute '{name}' is not finite"));
                    break;
                case AttributeType.Boolean:
                    attributes.Set(name, reader.Bool());
                    break;
                case AttributeType.Text:
                    attributes.Set(name, reader.String());
                    break;
                case AttributeType.Integers:
                    var values = new long[reader.VarUInt($"{describe} attribute '{name}' length", 0, 64)];
                    for (int j = 0; j < values.Length; j++)
                    {
                        values[j] = reader.VarInt();
                    }

                    attributes.Set(name, values);
                    break;
                default:
                    throw reader.Fail($"{describe} attribute '{name}' has unknown type code {type}");
            }
        }

        return (version, attributes);
    }

    private static (long[] Ints, double[] Reals, long[] Dims) Attributes(NodeKind kind, nn.Module module, string path)
    {
        static long B(bool b) => b ? 1 : 0;
        switch (module)
        {
            case Linear l:
                return ([l.in_features, l.out_features, B(l.bias is not null)], [], []);
            case SparseLinear s:
                return ([s.InFeatures, s.OutFeatures, B(s.Bias is not null)], [], []);
            case Conv2d c:
                return ([c.in_channels, c.out_channels, c.kernel_size[0], c.kernel_size[1], c.stride[0], c.stride[1], c.padding![0], c.padding![1], c.dilation[0], c.dilation[1], c.groups, B(c.bias is not null), (long)c.padding_mode], [], []);
            case NormBase bn when kind is NodeKind.BatchNorm1d or NodeKind.BatchNorm2d:
                return ([bn.num_features, B(bn.affine), B(bn.track_running_stats), B(bn.momentum is not null)], [bn.eps, bn.momentum ?? 0], []);
            case LayerNorm ln:
                return ([B(ln.elementwise_affine)], [ln.eps], ln.normalized_shape);
            case GELU g:
                return ([(long)g.approximate], [], []);
            case Softmax sm:
                return ([sm.dim], [], []);
            case Flatten f:
                return ([f.start_dim, f.end_dim], [], []);
            case LeakyReLU lr:
                return ([], [lr.negative_slope], []);
            case Dropout d:
                return ([], [d.p], []);
            case MaxPool2d mp:
                return ([mp.kernel_size[0], mp.kernel_size[1], mp.stride[0], mp.stride[1], mp.padding[0], mp.padding[1], mp.dilation[0], mp.dilation[1], B(mp.ceil_mode)], [], []);
            case AvgPool2d ap:
                return ([ap.kernel_size[0], ap.kernel_size[1], ap.stride[0], ap.stride[1], ap.padding[0], ap.padding[1], B(ap.ceil_mode), B(ap.count_include_pad), ap.divisor_override ?? 0], [], []);
            case AdaptiveAvgPool2d aap:
                return ([aap.output_size[0], aap.output_size[^1]], [], []);
            case QuantizedLayer q:
            {
                var m = q.Matrix;
                var a = q.Activations;
                long granularity = m.Granularity switch { PerTensorGranularity => 0, PerChannelGranularity => 1, _ => 2 };
                long[] common = [m.N, m.K, m.Bits, granularity, m.GroupSize, (long)q.Mode, (long)a.Mode, B(a.Symmetric), B(q.FusedRelu), B(m.Bias is not null)];
                if (q is QuantizedConv2d qc)
                {
                    var s = qc.Shape;
                    common = [.. common, s.InChannels, s.KernelSize[0], s.KernelSize[1], s.Stride[0], s.Stride[1], s.Padding[0], s.Padding[1], s.Dilation[0], s.Dilation[1]];
                }
                else if (kind == NodeKind.ScaledQuantizedLinear)
                {
                    common = [.. common, B(m.ZeroPoints is not null)];
                }

                return (common, [a.Scale, a.ZeroPoint], []);
            }

            case LowRankConv2d lrc:
                return ([(long)lrc.Decomposition], [], []);
            case HalfPrecisionLayer h:
                return ([B(h.DType == ScalarType.BFloat16)], [], []);
            case InvertedResidual ir:
                return ([B(ir.UsesResidual)], [], []);
            default:
                return IntFields.ContainsKey(kind) || RealFields.ContainsKey(kind)
                    ? throw new InvalidOperationException($"No attributes written for {kind} at '{path}'.")
                    : ([], [], []);
        }
    }

    private static void WriteTensors(NodeKind kind, nn.Module module, FormatWriter w, List<string> encodings, string path)
    {
        void Floats(Tensor t, string role)
        {
            var values = t.detach().to(ScalarType.Float32).cpu().contiguous().data<float>().ToArray();
            var e = ValueCodec.WriteFloats(w, values, $"The {role} of '{path}'", t.dim() >= 2 ? t.shape[0] : 0);
            encodings.Add(Describe(role, e));
        }

        switch (module)
        {
            case Linear l:
                Floats(l.weight!, "weight");
                OptionalFloats(l.bias);
                break;
            case SparseLinear s:
            {
                using var dense = s.ToDenseWeight();
                Floats(dense, "weight");
                OptionalFloats(s.Bias);
                break;
            }

            case Conv2d c when kind == NodeKind.Conv2d:
                Floats(c.weight!, "weight");
                OptionalFloats(c.bias);
                break;
            case NormBase bn when kind is NodeKind.BatchNorm1d or NodeKind.BatchNorm2d:
                if (bn.affine)
                {
                    Floats(bn.weight!, "weight");
                    Floats(bn.bias!, "bias");
                }

                if (bn.track_running_stats)
                {
                    Floats(bn.running_mean!, "running mean");
                    Floats(bn.running_var!, "running variance");
                    w.VarUInt(Math.Max(0, bn.num_batches_tracked!.to(ScalarType.Int64).item<long>()));
                }

                break;
            case LayerNorm ln:
                if (ln.elementwise_affine)
                {
                    Floats(ln.weight!, "weight");
                    Floats(ln.bias!, "bias");
                }

                break;
            case QuantizedLayer q:
            {
                var m = q.Matrix;
                // The levels' alphabet is symmetric: ±2ᵇ⁻¹ holds the asymmetric grid's −2ᵇ⁻¹ (its +2ᵇ⁻¹ stays unused).
                var e = ValueCodec.WriteLevels(w, m.Q, -m.MinLevel);
                encodings.Add(Describe($"int{m.Bits} weight", e));
                encodings.Add(Describe("scales", ValueCodec.WriteFloats(w, m.Scales, $"The scales of '{path}'")));
                if (m.ZeroPoints is not null)
                {
                    encodings.Add(Describe("zero points", ValueCodec.WriteFloats(w, m.ZeroPoints, $"The zero points of '{path}'")));
                }
                if (m.Bias is not null)
                {
                    encodings.Add(Describe("bias", ValueCodec.WriteFloats(w, m.Bias, $"The bias of '{path}'")));
                }

                if (m.InputScales is not null)
                {
                    encodings.Add(Describe("input scales", ValueCodec.WriteFloats(w, m.InputScales, $"The input scales of '{path}'")));
                }

                break;
            }

            default:
                if (kind == NodeKind.Custom)
                {
                    WriteOwnTensors(OwnTensorsOfCustom(module), w, encodings, path);
                }
                else if (kind == NodeKind.Registered)
                {
                    WriteOwnTensors(Modules.LayerCopy.OwnTensors(module), w, encodings, path);
                }

                break;
        }

        void OptionalFloats(Tensor? t)
        {
            if (t is not null)
            {
                Floats(t, "bias");
            }
        }
    }

    private static string Describe(string role, ValueCodec.Encoding e) =>
        $"{role}: {(e.Sparse ? $"sparse ({e.Positions})" : "dense")}, {e.Values}, {e.Bytes} B";

    private static List<(string Name, Tensor Tensor)> OwnTensorsOfCustom(nn.Module module) =>
        module.named_parameters(recurse: false).Select(p => (p.name, (Tensor)p.parameter))
            .Concat(module.named_buffers(recurse: false).Select(b => (b.name, b.buffer)))
            .ToList();

    private static void WriteOwnTensors(List<(string Name, Tensor Tensor)> own, FormatWriter w, List<string> encodings, string path)
    {
        if (own.Count == 0)
        {
            return;
        }

        w.VarUInt(own.Count);
        foreach (var (name, t) in own)
        {
            w.String(name);
            w.Byte((byte)t.dtype);
            w.VarUInt(t.dim());
            foreach (long d in t.shape)
            {
                w.VarUInt(d);
            }

            var cpu = t.detach().cpu().contiguous();
            if (t.dtype is ScalarType.Float32 or ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float64)
            {
                if (t.dtype == ScalarType.Float64 && !cpu.to(ScalarType.Float32).to(ScalarType.Float64).eq(cpu).all().item<bool>())
                {
                    throw new NotSupportedException($"The float64 tensor '{name}' of '{path}' holds values float32 cannot; the file stores float32 at most.");
                }

                var e = ValueCodec.WriteFloats(w, cpu.to(ScalarType.Float32).data<float>().ToArray(), $"The tensor '{name}' of '{path}'", t.dim() >= 2 ? t.shape[0] : 0);
                encodings.Add(Describe(name, e));
            }
            else if (t.dtype is ScalarType.Int64 or ScalarType.Int32)
            {
                foreach (long v in cpu.to(ScalarType.Int64).data<long>().ToArray())
                {
                    w.VarInt(v);
                }

                encodings.Add($"{name}: {t.dtype} varints");
            }
            else if (t.dtype is ScalarType.Int8 or ScalarType.Byte or ScalarType.Bool)
            {
                w.Bytes(cpu.bytes);
                encodings.Add($"{name}: {t.dtype} bytes");
            }
            else
            {
                throw new NotSupportedException($"The {t.dtype} tensor '{name}' of '{path}' has a type the file cannot hold.");
            }
        }
    }

    // ---------------------------------------------------------------- reading

    public static NodeSpec ReadTree(ref FormatReader reader)
    {
        int count = 0;
        var root = ReadNode(ref reader, string.Empty, 0, ref count);
        reader.ExpectEnd();
        return root;
    }

    private static NodeSpec ReadNode(ref FormatReader reader, string parentPath, int depth, ref int count)
    {
        if (depth > MaxDepth)
        {
            throw reader.Fail($"modules nest deeper than {MaxDepth} levels");
        }

        string name = reader.String();
        string path = parentPath.Length == 0 ? name : $"{parentPath}.{name}";
        if (depth > 0 && (name.Length == 0 || name.Contains('.', StringComparison.Ordinal)))
        {
            throw reader.Fail($"a module under '{parentPath}' has the name '{name}' (names are non-empty, without dots)");
        }

        byte kindByte = reader.Byte();
        if (!Enum.IsDefined((NodeKind)kindByte))
        {
            throw reader.Fail($"'{path}' has unknown module kind {kindByte}");
        }

        var node = new NodeSpec { Name = name, Path = depth == 0 ? string.Empty : path, Kind = (NodeKind)kindByte, Index = count++ };
        if (IntFields.TryGetValue(node.Kind, out var fields))
        {
            node.Ints = new long[fields.Length];
            for (int i = 0; i < fields.Length; i++)
            {
                node.Ints[i] = reader.VarInt($"{node.Describe} field '{fields[i].Name}'", fields[i].Min, fields[i].Max);
            }
        }

        if (RealFields.TryGetValue(node.Kind, out var reals))
        {
            node.Reals = new double[reals.Length];
            for (int i = 0; i < reals.Length; i++)
            {
                double v = reader.Float64();
                if (!double.IsFinite(v))
                {
                    throw reader.Fail($"{node.Describe} field '{reals[i]}' is not finite");
                }

                node.Reals[i] = v;
            }
        }

        if (node.Kind == NodeKind.LayerNorm)
        {
            node.Dims = new long[reader.VarUInt($"{node.Describe} rank", 1, 8)];
            for (int i = 0; i < node.Dims.Length; i++)
            {
                node.Dims[i] = reader.VarUInt($"{node.Describe} dimension", 1, MaxDim);
            }
        }

        if (node.Kind == NodeKind.Custom)
        {
            node.TypeName = reader.String();
        }

        if (node.Kind == NodeKind.Registered)
        {
            node.TypeName = reader.String();
            (node.Version, node.Attributes) = ReadRegistered(ref reader, node.Describe);
        }

        node.HasData = reader.Bool();
        if (node.HasData != WithData.Contains(node.Kind) && node.Kind is not (NodeKind.Custom or NodeKind.Registered))
        {
            throw reader.Fail($"{node.Describe} {(node.HasData ? "claims a data section it cannot have" : "has no data section")}");
        }

        long children = reader.VarUInt($"{node.Describe} child count", 0, WithChildren.Contains(node.Kind) ? MaxChildren : 0);
        var names = new HashSet<string>(StringComparer.Ordinal);
        for (long i = 0; i < children; i++)
        {
            var child = ReadNode(ref reader, node.Path, depth + 1, ref count);
            if (!names.Add(child.Name))
            {
                throw reader.Fail($"{node.Describe} has two children named '{child.Name}'");
            }

            node.Children.Add(child);
        }

        return node;
    }

    /// <summary>Reads one node's data section (its payload after the node index).</summary>
    public static void ReadTensors(NodeSpec node, ref FormatReader r, DecodeBudget budget)
    {
        long[] I = node.Ints;
        string at = node.Describe;
        switch (node.Kind)
        {
            case NodeKind.Linear or NodeKind.SparseLinear:
                node.Arrays.Add(ValueCodec.ReadFloats(ref r, Product(ref r, at, I[0], I[1]), budget, $"the weight of {at}"));
                if (I[2] == 1)
                {
                    node.Arrays.Add(ValueCodec.ReadFloats(ref r, I[1], budget, $"the bias of {at}"));
                }

                break;
            case NodeKind.Conv2d:
                if (I[0] % I[10] != 0 || I[1] % I[10] != 0)
                {
                    throw r.Fail($"{at} has {I[0]} inputs and {I[1]} outputs, not divisible into {I[10]} groups");
                }

                node.Arrays.Add(ValueCodec.ReadFloats(ref r, Product(ref r, at, I[1], I[0] / I[10], I[2], I[3]), budget, $"the weight of {at}"));
                if (I[11] == 1)
                {
                    node.Arrays.Add(ValueCodec.ReadFloats(ref r, I[1], budget, $"the bias of {at}"));
                }

                break;
            case NodeKind.BatchNorm1d or NodeKind.BatchNorm2d:
                if (I[1] == 1)
                {
                    node.Arrays.Add(ValueCodec.ReadFloats(ref r, I[0], budget, $"the weight of {at}"));
                    node.Arrays.Add(ValueCodec.ReadFloats(ref r, I[0], budget, $"the bias of {at}"));
                }

                if (I[2] == 1)
                {
                    node.Arrays.Add(ValueCodec.ReadFloats(ref r, I[0], budget, $"the running mean of {at}"));
                    node.Arrays.Add(ValueCodec.ReadFloats(ref r, I[0], budget, $"the running variance of {at}"));
                    node.Scalar = r.VarUInt();
                }

                break;
            case NodeKind.LayerNorm:
                if (I[0] == 1)
                {
                    long features = Product(ref r, at, node.Dims);
                    node.Arrays.Add(ValueCodec.ReadFloats(ref r, features, budget, $"the weight of {at}"));
                    node.Arrays.Add(ValueCodec.ReadFloats(ref r, features, budget, $"the bias of {at}"));
                }

                break;
            case NodeKind.QuantizedLinear or NodeKind.QuantizedConv2d or NodeKind.AsymmetricQuantizedLinear or NodeKind.ScaledQuantizedLinear:
            {
                long n = I[0], k = I[1];
                int bits = (int)I[2];
                long groupSize = I[4];
                // A group longer than the row is accepted: files written before groups were capped at K hold one
                // (e.g. 64 for a 16-input layer); it is one scale per row, as the count below says.
                if ((I[3] == 2) != (groupSize > 0))
                {
                    throw r.Fail($"{at} has granularity {I[3]} with group size {groupSize} for {k} inputs");
                }

                long scales = I[3] switch { 0 => 1, 1 => n, _ => Product(ref r, at, n, (k + groupSize - 1) / groupSize) };
                bool asymmetric = node.Kind == NodeKind.AsymmetricQuantizedLinear || (node.Kind == NodeKind.ScaledQuantizedLinear && I[10] == 1);
                int maxLevel = asymmetric ? 1 << (bits - 1) : QuantizedMatrix.MaxLevel(bits);
                node.Arrays.Add(ValueCodec.ReadLevels(ref r, Product(ref r, at, n, k), maxLevel, budget, $"the weight of {at}", highest: asymmetric ? maxLevel - 1 : maxLevel));
                node.Arrays.Add(ValueCodec.ReadFloats(ref r, scales, budget, $"the scales of {at}"));
                node.Arrays.Add(asymmetric ? ValueCodec.ReadFloats(ref r, scales, budget, $"the zero points of {at}") : null!);
                node.Arrays.Add(I[9] == 1 ? ValueCodec.ReadFloats(ref r, n, budget, $"the bias of {at}") : null!);
                node.Arrays.Add(node.Kind == NodeKind.ScaledQuantizedLinear ? ValueCodec.ReadFloats(ref r, k, budget, $"the input scales of {at}") : null!);

                break;
            }

            case NodeKind.Custom or NodeKind.Registered when node.HasData:
                ReadOwnTensors(node, ref r, budget);
                break;
            default:
                if (node.HasData)
                {
                    throw r.Fail($"{at} cannot have a data section");
                }

                break;
        }
    }

    private static void ReadOwnTensors(NodeSpec node, ref FormatReader r, DecodeBudget budget)
    {
        long count = r.VarUInt($"the tensor count of {node.Describe}", 1, 1024);
        var names = new HashSet<string>(StringComparer.Ordinal);
        for (long i = 0; i < count; i++)
        {
            string name = r.String();
            if (!names.Add(name))
            {
                throw r.Fail($"{node.Describe} holds two tensors named '{name}'");
            }

            byte type = r.Byte();
            var dtype = (ScalarType)type;
            var shape = new long[r.VarUInt($"the rank of tensor '{name}'", 0, 8)];
            for (int d = 0; d < shape.Length; d++)
            {
                shape[d] = r.VarUInt($"a dimension of tensor '{name}'", 0, MaxDim);
            }

            long numel = Product(ref r, node.Describe, shape);
            string what = $"the tensor '{name}' of {node.Describe}";
            object values;
            switch (dtype)
            {
                case ScalarType.Float32 or ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float64:
                    values = ValueCodec.ReadFloats(ref r, numel, budget, what);
                    break;
                case ScalarType.Int64 or ScalarType.Int32:
                {
                    budget.Take(numel * 2, what, ref r);
                    if (numel > r.Remaining)
                    {
                        throw r.Fail($"{what} declares {numel} integers but only {r.Remaining} bytes are left");
                    }

                    var ints = new long[numel];
                    for (long j = 0; j < numel; j++)
                    {
                        ints[j] = dtype == ScalarType.Int32 ? r.VarInt(what, int.MinValue, int.MaxValue) : r.VarInt();
                    }

                    values = ints;
                    break;
                }

                case ScalarType.Int8 or ScalarType.Byte or ScalarType.Bool:
                    budget.Take((numel + 3) / 4, what, ref r);
                    if (numel > r.Remaining)
                    {
                        throw r.Fail($"{what} declares {numel} bytes but only {r.Remaining} are left");
                    }

                    values = r.Bytes((int)numel, what).ToArray();
                    break;
                default:
                    throw r.Fail($"{what} has type code {type}, which the file does not hold");
            }

            node.Named.Add((name, dtype, shape, values));
        }
    }

    /// <summary>The product of dimensions, checked for overflow and against the largest array.</summary>
    public static long Product(ref FormatReader reader, string at, params long[] dims)
    {
        long product = 1;
        foreach (long d in dims)
        {
            if (d < 0 || (d > 0 && product > Array.MaxLength / d))
            {
                throw reader.Fail($"{at} declares a tensor of {string.Join(" × ", dims)} elements, more than any array can hold");
            }

            product *= d;
        }

        return product;
    }

    // ---------------------------------------------------------------- building

    /// <summary>Builds the module a node describes; custom modules come from <paramref name="customModule"/>.</summary>
    public static nn.Module Build(NodeSpec node, Func<NodeSpec, nn.Module> customModule)
    {
        var children = new List<nn.Module>();
        try
        {
            foreach (var child in node.Children)
            {
                children.Add(Build(child, customModule));
            }

            return BuildOne(node, children, customModule);
        }
        catch
        {
            foreach (var child in children)
            {
                child.Dispose();
            }

            throw;
        }
    }

    private static nn.Module BuildOne(NodeSpec node, List<nn.Module> children, Func<NodeSpec, nn.Module> customModule)
    {
        long[] I = node.Ints;
        double[] R = node.Reals;
        using var noGrad = no_grad();
        switch (node.Kind)
        {
            case NodeKind.Sequential:
                return nn.Sequential(node.Children.Select((c, i) => (c.Name, children[i] as nn.Module<Tensor, Tensor>
                    ?? throw new InvalidDataException($"{c.Describe} is a {children[i].GetType().Name}, which a Sequential cannot hold."))).ToArray());
            case NodeKind.Linear:
            {
                var linear = nn.Linear(I[0], I[1], hasBias: I[2] == 1);
                Fill(linear.weight!, node.Arrays[0]);
                if (I[2] == 1)
                {
                    Fill(linear.bias!, node.Arrays[1]);
                }

                return linear;
            }

            case NodeKind.SparseLinear:
            {
                using var linear = nn.Linear(I[0], I[1], hasBias: I[2] == 1);
                Fill(linear.weight!, node.Arrays[0]);
                if (I[2] == 1)
                {
                    Fill(linear.bias!, node.Arrays[1]);
                }

                return SparseLinear.FromLinear(linear);
            }

            case NodeKind.Conv2d:
            {
                var conv = NewInScope(() => nn.Conv2d(I[0], I[1], (I[2], I[3]), (I[4], I[5]), (I[6], I[7]), (I[8], I[9]), (PaddingModes)I[12], I[10], I[11] == 1));
                Fill(conv.weight!, node.Arrays[0]);
                if (I[11] == 1)
                {
                    Fill(conv.bias!, node.Arrays[1]);
                }

                return conv;
            }

            case NodeKind.BatchNorm1d or NodeKind.BatchNorm2d:
            {
                NormBase bn = node.Kind == NodeKind.BatchNorm1d
                    ? nn.BatchNorm1d(I[0], R[0], I[3] == 1 ? R[1] : 0.1, I[1] == 1, I[2] == 1)
                    : nn.BatchNorm2d(I[0], R[0], I[3] == 1 ? R[1] : 0.1, I[1] == 1, I[2] == 1);
                if (I[3] == 0)
                {
                    // A null momentum (a cumulative average) has no factory argument.
                    typeof(NormBase).GetProperty(nameof(NormBase.momentum))!.SetValue(bn, null);
                }

                int a = 0;
                if (I[1] == 1)
                {
                    Fill(bn.weight!, node.Arrays[a++]);
                    Fill(bn.bias!, node.Arrays[a++]);
                }

                if (I[2] == 1)
                {
                    Fill(bn.running_mean!, node.Arrays[a++]);
                    Fill(bn.running_var!, node.Arrays[a]);
                    using var count = node.Scalar.ToScalar();
                    bn.num_batches_tracked!.fill_(count);
                }

                return (nn.Module<Tensor, Tensor>)(object)bn;
            }

            case NodeKind.LayerNorm:
            {
                var ln = nn.LayerNorm(node.Dims, R[0], I[0] == 1);
                if (I[0] == 1)
                {
                    Fill(ln.weight!, node.Arrays[0]);
                    Fill(ln.bias!, node.Arrays[1]);
                }

                return ln;
            }

            case NodeKind.ReLU:
                return nn.ReLU();
            case NodeKind.ReLU6:
                return nn.ReLU6();
            case NodeKind.SiLU:
                return nn.SiLU();
            case NodeKind.Sigmoid:
                return nn.Sigmoid();
            case NodeKind.Tanh:
                return nn.Tanh();
            case NodeKind.GELU:
            {
                var gelu = nn.GELU();
                var approximate = typeof(GELU).GetProperty(nameof(GELU.approximate))!;
                approximate.SetValue(gelu, Enum.ToObject(approximate.PropertyType, I[0]));
                return gelu;
            }
            case NodeKind.LeakyReLU:
                return nn.LeakyReLU(R[0]);
            case NodeKind.Hardswish:
                return nn.Hardswish();
            case NodeKind.Identity:
                return nn.Identity();
            case NodeKind.Softmax:
                return nn.Softmax(I[0]);
            case NodeKind.Flatten:
                return nn.Flatten(I[0], I[1]);
            case NodeKind.Dropout:
                return R[0] is >= 0 and < 1 ? nn.Dropout(R[0]) : throw new InvalidDataException($"{node.Describe} has dropout probability {R[0]}, outside [0, 1).");
            case NodeKind.MaxPool2d:
                return nn.MaxPool2d((I[0], I[1]), (I[2], I[3]), (I[4], I[5]), (I[6], I[7]), I[8] == 1);
            case NodeKind.AvgPool2d:
                return nn.AvgPool2d((I[0], I[1]), (I[2], I[3]), (I[4], I[5]), I[6] == 1, I[7] == 1, I[8] == 0 ? null : I[8]);
            case NodeKind.AdaptiveAvgPool2d:
                return nn.AdaptiveAvgPool2d((I[0], I[1]));
            case NodeKind.QuantizedLinear or NodeKind.QuantizedConv2d or NodeKind.AsymmetricQuantizedLinear or NodeKind.ScaledQuantizedLinear:
                return BuildQuantized(node);
            case NodeKind.LowRankLinear:
                return children is [Linear first, Linear second]
                    ? new LowRankLinear(first, second)
                    : Fill(node, LowRankSkeleton(node, conv: false), children);
            case NodeKind.LowRankConv2d:
                return children is [Conv2d firstConv, Conv2d secondConv]
                    ? new LowRankConv2d(firstConv, secondConv, (ConvDecomposition)I[0])
                    : Fill(node, LowRankSkeleton(node, conv: true), children);
            case NodeKind.HalfPrecision:
                return children is [nn.Module<Tensor, Tensor> inner]
                    ? new HalfPrecisionLayer(inner, I[0] == 1 ? ScalarType.BFloat16 : ScalarType.Float16)
                    : throw Mismatch(node, "one inner layer");
            case NodeKind.Clustered:
                return children is [nn.Module<Tensor, Tensor> clustered and (Linear or Conv2d or SparseLinear)]
                    ? new ClusteredLayer(clustered)
                    : throw Mismatch(node, "one Linear, Conv2d or SparseLinear");
            case NodeKind.DepthwiseSeparableConv2d:
                return Fill(node, NewInScope(() => new DepthwiseSeparableConv2d(1, 1, 1)), children);
            case NodeKind.SqueezeExcitation:
                return Fill(node, NewInScope(() => new SqueezeExcitation(1, 1)), children);
            case NodeKind.InvertedResidual:
                // Every child is replaced; the skeleton only has to add its input (or not) the same way.
                return Fill(node, NewInScope(() => new InvertedResidual(1, I[0] == 1 ? 1 : 2, 1, 2)), children);
            case NodeKind.Custom:
                return Fill(node, customModule(node), children);
            case NodeKind.Registered:
            {
                var registered = Fill(node, CreateRegistered(node), children);
                try
                {
                    Modules.LayerRegistry.Find(registered)!.CheckLoaded(registered);
                }
                catch (InvalidDataException ex)
                {
                    registered.Dispose();
                    throw new InvalidDataException($"{node.Describe}: {ex.Message}", ex);
                }

                return registered;
            }

            default:
                throw new InvalidDataException($"{node.Describe} cannot be built.");
        }
    }

    /// <summary>
    /// A low-rank layer whose factors a later step compressed in turn (half precision, quantization, clustering): built
    /// around placeholder factors of the stored sizes, which <see cref="Fill"/> then replaces with the built ones.
    /// </summary>
    private static nn.Module LowRankSkeleton(NodeSpec node, bool conv)
    {
        if (node.Children is not [var first, var second])
        {
            throw Mismatch(node, "two factors");
        }

        var (firstIn, firstOut) = FactorSize(node, first);
        var (secondIn, secondOut) = FactorSize(node, second);
        if (firstOut != secondIn)
        {
            throw new InvalidDataException($"{node.Describe} has factors that do not chain: {firstOut} outputs into {secondIn} inputs.");
        }

        return conv
            ? new LowRankConv2d(NewInScope(() => nn.Conv2d(firstIn, firstOut, 1)), NewInScope(() => nn.Conv2d(secondIn, secondOut, 1)), (ConvDecomposition)node.Ints[0])
            : new LowRankLinear(nn.Linear(firstIn, firstOut), nn.Linear(secondIn, secondOut));
    }

    /// <summary>
    /// Builds a module made only of TorchSharp's built-in layers inside a dispose scope: TorchSharp's Conv2d constructor
    /// leaves the tensor its bias initialisation returns to the finalizer, and the scope disposes it (built-in layers
    /// detach their own parameters from the scope).
    /// </summary>
    private static T NewInScope<T>(Func<T> create)
        where T : nn.Module
    {
        using var scope = NewDisposeScope();
        return create();
    }

    /// <summary>The inputs and outputs of a factor, looking through single-layer wrappers.</summary>
    private static (long In, long Out) FactorSize(NodeSpec owner, NodeSpec factor) => factor.Kind switch
    {
        NodeKind.Linear or NodeKind.SparseLinear or NodeKind.Conv2d => (factor.Ints[0], factor.Ints[1]),
        NodeKind.QuantizedLinear or NodeKind.AsymmetricQuantizedLinear or NodeKind.ScaledQuantizedLinear => (factor.Ints[1], factor.Ints[0]),
        NodeKind.QuantizedConv2d => (factor.Ints[10], factor.Ints[0]),
        NodeKind.HalfPrecision or NodeKind.Clustered when factor.Children is [var inner] => FactorSize(owner, inner),
        _ => throw Mismatch(owner, "two Linear or Conv2d factors, possibly compressed"),
    };

    /// <summary>
    /// Checks, before anything is built, what building the tree would refuse in the file's values (a quantized layer's
    /// scales and groups, a dropout probability, the factors of a low-rank layer, a wrapper's one child). Loading runs
    /// it on every file, and saving on the file it is about to write, so that Save never writes what Load refuses.
    /// </summary>
    public static void Check(NodeSpec node)
    {
        switch (node.Kind)
        {
            case NodeKind.QuantizedLinear or NodeKind.QuantizedConv2d or NodeKind.AsymmetricQuantizedLinear or NodeKind.ScaledQuantizedLinear:
                CheckQuantized(node);
                break;
            case NodeKind.Dropout when node.Reals[0] is not (>= 0 and < 1):
                throw new InvalidDataException($"{node.Describe} has dropout probability {node.Reals[0]}, outside [0, 1).");
            case NodeKind.HalfPrecision or NodeKind.Clustered when node.Children.Count != 1:
                throw Mismatch(node, "one inner layer");
            case NodeKind.Clustered when node.Children[0].Kind is not (NodeKind.Linear or NodeKind.Conv2d or NodeKind.SparseLinear or NodeKind.Registered or NodeKind.Custom):
                throw Mismatch(node, "one Linear, Conv2d or SparseLinear");
            case NodeKind.LowRankLinear or NodeKind.LowRankConv2d:
                if (node.Children.Count != 2)
                {
                    throw Mismatch(node, "two factors");
                }

                // Plain factors (or ones the registry builds) are taken as they are; compressed ones must chain.
                if (!node.Children.Any(c => c.Kind is NodeKind.Linear or NodeKind.Conv2d or NodeKind.Registered or NodeKind.Custom))
                {
                    var (_, firstOut) = FactorSize(node, node.Children[0]);
                    var (secondIn, _) = FactorSize(node, node.Children[1]);
                    if (firstOut != secondIn)
                    {
                        throw new InvalidDataException($"{node.Describe} has factors that do not chain: {firstOut} outputs into {secondIn} inputs.");
                    }
                }

                break;
        }

        foreach (var child in node.Children)
        {
            Check(child);
        }
    }

    private static void CheckQuantized(NodeSpec node)
    {
        long[] I = node.Ints;
        int k = (int)I[1], bits = (int)I[2];
        var q = (sbyte[])node.Arrays[0];
        var scales = (float[])node.Arrays[1];
        var zeroPoints = (float[]?)node.Arrays[2];
        if (bits == 1 && Array.IndexOf(q, (sbyte)0) >= 0)
        {
            throw new InvalidDataException($"{node.Describe} is binary but holds zero weights.");
        }

        if (scales.Any(s => !(s > 0)))
        {
            throw new InvalidDataException($"{node.Describe} has a scale that is not positive.");
        }

        var activationMode = (ActivationMode)I[6];
        float inputScale = (float)node.Reals[0], inputZero = (float)node.Reals[1];
        if (activationMode == ActivationMode.Static && !(inputScale > 0 && inputZero is >= 0 and <= 127 && inputZero == MathF.Round(inputZero)))
        {
            throw new InvalidDataException($"{node.Describe} has input scale {inputScale} and zero point {inputZero}; a static layer needs a positive scale and an integer zero point in 0..127.");
        }

        if (bits == 4 && I[3] != 2)
        {
            throw new InvalidDataException($"{node.Describe} stores 4-bit weights without groups.");
        }

        if (I[3] == 2 && I[4] < k && I[4] % 8 != 0)
        {
            throw new InvalidDataException($"{node.Describe} has groups of {I[4]} inputs; a group shorter than the row ({k}) is a multiple of 8.");
        }

        if (zeroPoints is not null && Array.FindIndex(zeroPoints, z => !float.IsFinite(z)) is var badZero and >= 0)
        {
            throw new InvalidDataException($"{node.Describe} has the zero point {zeroPoints[badZero]}; zero points must be finite.");
        }

        if (node.Kind == NodeKind.ScaledQuantizedLinear && I[10] == 1 && (bits < 2 || I[3] == 0))
        {
            throw new InvalidDataException($"{node.Describe} has zero points with {bits} bit(s) and granularity {I[3]}; zero points need at least 2 bits and a scale per row or group.");
        }

        if (node.Arrays.Count > 4 && node.Arrays[4] is float[] inputScales && Array.FindIndex(inputScales, v => !float.IsFinite(v) || !(v > 0)) is var badInput and >= 0)
        {
            throw new InvalidDataException($"{node.Describe} has the input scale {inputScales[badInput]}; input scales must be finite and positive.");
        }

        if (node.Kind == NodeKind.QuantizedConv2d && I[10] * I[11] * I[12] != k)
        {
            throw new InvalidDataException($"{node.Describe} has {k} inputs per output, not {I[10]} channels × {I[11]} × {I[12]}.");
        }
    }

    private static QuantizedLayer BuildQuantized(NodeSpec node)
    {
        CheckQuantized(node);
        long[] I = node.Ints;
        int n = (int)I[0], k = (int)I[1], bits = (int)I[2];
        var q = (sbyte[])node.Arrays[0];
        var scales = (float[])node.Arrays[1];
        var zeroPoints = (float[]?)node.Arrays[2];
        var bias = I[9] == 1 ? (float[])node.Arrays[3] : null;
        var inputScales = (float[]?)node.Arrays[4];
        var activationMode = (ActivationMode)I[6];
        float inputScale = (float)node.Reals[0], inputZero = (float)node.Reals[1];
        var granularity = I[3] switch
        {
            0 => QuantizationGranularity.PerTensor,
            1 => QuantizationGranularity.PerChannel,
            _ => QuantizationGranularity.PerGroup((int)I[4]),
        };

        var matrix = QuantizedMatrix.FromLevels(n, k, bits, granularity, q, scales, bias, zeroPoints, inputScales);
        var settings = new ActivationSettings(activationMode, inputScale, inputZero, I[7] == 1);
        var mode = (QuantizationMode)I[5];
        if (node.Kind is NodeKind.QuantizedLinear or NodeKind.AsymmetricQuantizedLinear or NodeKind.ScaledQuantizedLinear)
        {
            return new QuantizedLinear(matrix, settings, I[8] == 1, mode);
        }

        var shape = new ConvShape(I[10], [I[11], I[12]], [I[13], I[14]], [I[15], I[16]], [I[17], I[18]]);
        return new QuantizedConv2d(shape, matrix, settings, I[8] == 1, mode);
    }

    /// <summary>Puts the built children into a container (library block or custom module) and loads its own tensors.</summary>
    private static nn.Module CreateRegistered(NodeSpec node)
    {
        var descriptor = Modules.LayerRegistry.Find(node.TypeName) ?? throw new InvalidDataException(
            $"{node.Describe} is a layer of kind '{node.TypeName}', which is not registered: register it with {nameof(Modules.LayerRegistry)} before loading.");
        if (node.Version > descriptor.Version)
        {
            throw new InvalidDataException($"{node.Describe} was written by version {node.Version} of '{node.TypeName}'; the registered descriptor reads up to version {descriptor.Version}.");
        }

        var module = descriptor.Create(node.Attributes!, node.Version);
        if (module.GetType() != descriptor.ModuleType)
        {
            module.Dispose();
            throw new InvalidOperationException($"The descriptor '{descriptor.Id}' built a {module.GetType().FullName} instead of a {descriptor.ModuleType.FullName}.");
        }

        return module;
    }

    private static T Fill<T>(NodeSpec node, T container, List<nn.Module> children)
        where T : nn.Module
    {
        try
        {
            var expected = container.named_children().Select(c => c.name).ToList();
            var stored = node.Children.Select(c => c.Name).ToList();
            if (!expected.SequenceEqual(stored))
            {
                throw new InvalidDataException(
                    $"{node.Describe} holds children [{string.Join(", ", stored)}] but its module has [{string.Join(", ", expected)}].");
            }

            for (int i = 0; i < children.Count; i++)
            {
                var old = container.named_children().First(c => c.name == node.Children[i].Name).module;
                if (Modules.ModuleTree.WhyCannotReplace(container, node.Children[i].Name, children[i].GetType()) is { } why)
                {
                    throw new InvalidDataException($"{node.Describe}: child '{node.Children[i].Name}' cannot be a {children[i].GetType().Name}: {why}.");
                }

                Modules.ModuleTree.SetChild(container, node.Children[i].Name, children[i]);
                old.Dispose();
            }

            LoadOwnTensors(node, container, node.Kind == NodeKind.Registered ? Modules.LayerCopy.OwnTensors(container) : OwnTensorsOfCustom(container));
            return container;
        }
        catch
        {
            container.Dispose();
            throw;
        }
    }

    private static void LoadOwnTensors(NodeSpec node, nn.Module container, List<(string Name, Tensor Tensor)> ownTensors)
    {
        var own = ownTensors.ToDictionary(t => t.Name, t => t.Tensor);
        var storedNames = node.Named.Select(t => t.Name).ToHashSet();
        var missing = own.Keys.Where(k => !storedNames.Contains(k)).ToList();
        var extra = storedNames.Where(k => !own.ContainsKey(k)).ToList();
        if (missing.Count > 0 || extra.Count > 0)
        {
            throw new InvalidDataException(
                $"{node.Describe}: the module's own tensors do not match the file's (missing from the file: [{string.Join(", ", missing)}]; not in the module: [{string.Join(", ", extra)}]).");
        }

        foreach (var (name, dtype, shape, values) in node.Named)
        {
            var target = own[name];
            if (target.dtype != dtype || !target.shape.SequenceEqual(shape))
            {
                throw new InvalidDataException(
                    $"{node.Describe}: tensor '{name}' is {dtype} [{string.Join(", ", shape)}] in the file but {target.dtype} [{string.Join(", ", target.shape)}] in the module.");
            }

            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var source = values switch
            {
                float[] f => tensor(f, shape).to(dtype),
                long[] l => tensor(l, shape).to(dtype),
                byte[] b when dtype == ScalarType.Int8 => tensor(b.Select(x => unchecked((sbyte)x)).ToArray(), shape),
                byte[] b when dtype == ScalarType.Bool => tensor(b.Select(x => x != 0).ToArray(), shape),
                byte[] b => tensor(b, shape),
                _ => throw new InvalidDataException($"{node.Describe}: tensor '{name}' has no values."),
            };
            target.copy_(source);
        }
    }

    private static void Fill(Tensor target, object values)
    {
        using var source = tensor((float[])values, target.shape);
        target.copy_(source);
    }

    private static InvalidDataException Mismatch(NodeSpec node, string expected) =>
        new($"{node.Describe} must hold {expected}; the file gives [{string.Join(", ", node.Children.Select(c => c.Kind))}].");
}
