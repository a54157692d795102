using System.Runtime.InteropServices;
using Google.Protobuf;
using ModelCompression.Interop.Onnx.Proto;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Interop.Onnx;

/// <summary>
/// The ONNX graph being built by <see cref="OnnxExporter"/>: nodes, initializers and unique value names. Custom
/// module emitters (<see cref="OnnxExportOptions.CustomModules"/>) use it to describe their module's forward.
/// </summary>
public sealed class OnnxGraph
{
    private readonly GraphProto graph = new() { Name = "model" };
    private readonly Dictionary<string, int> counters = new(StringComparer.Ordinal);
    private readonly Func<nn.Module, string, string, string> emit;

    internal OnnxGraph(Func<nn.Module, string, string, string> emit) => this.emit = emit;

    internal GraphProto Proto => graph;

    internal bool UsesMicrosoftDomain { get; private set; }

    /// <summary>Emits a child module (any kind the exporter knows, or a registered custom one) on an input value.</summary>
    /// <param name="module">The module.</param>
    /// <param name="name">Its dotted name (for node names and error messages).</param>
    /// <param name="input">The name of its input value.</param>
    /// <returns>The name of its output value.</returns>
    public string Emit(nn.Module module, string name, string input) => emit(module, name, input);

    /// <summary>Adds a node with one output.</summary>
    /// <param name="opType">The ONNX operator, e.g. <c>Add</c>.</param>
    /// <param name="name">A prefix for the output's name (usually the module's dotted name).</param>
    /// <param name="inputs">The input value names (empty string for an omitted optional input).</param>
    /// <param name="attributes">Attributes: <see cref="long"/>, <see cref="float"/>, <see cref="string"/>, <see cref="long"/>[] or <see cref="float"/>[] values.</param>
    /// <returns>The output value's name.</returns>
    public string Node(string opType, string name, IReadOnlyList<string> inputs, IReadOnlyDictionary<string, object>? attributes = null) =>
        NodeWithOutputs(opType, name, inputs, 1, attributes)[0];

    /// <summary>Adds a node with several outputs.</summary>
    /// <param name="opType">The ONNX operator.</param>
    /// <param name="name">A prefix for the outputs' names.</param>
    /// <param name="inputs">The input value names.</param>
    /// <param name="outputs">How many outputs.</param>
    /// <param name="attributes">Attributes, as for <see cref="Node"/>.</param>
    /// <param name="domain">The operator's domain; empty for the default ONNX domain, <c>com.microsoft</c> for ONNX Runtime's.</param>
    /// <returns>The output value names.</returns>
    public IReadOnlyList<string> NodeWithOutputs(string opType, string name, IReadOnlyList<string> inputs, int outputs, IReadOnlyDictionary<string, object>? attributes = null, string domain = "")
    {
        var node = new NodeProto { OpType = opType, Name = Unique($"{name}/{opType}"), Domain = domain };
        node.Input.AddRange(inputs);
        var names = Enumerable.Range(0, outputs).Select(i => Unique($"{name}/{opType}_out{i}")).ToList();
        node.Output.AddRange(names);
        foreach (var (key, value) in attributes ?? new Dictionary<string, object>())
        {
            node.Attribute.Add(Attribute(key, value));
        }

        UsesMicrosoftDomain |= domain == "com.microsoft";
        graph.Node.Add(node);
        return names;
    }

    /// <summary>Adds a float32 initializer.</summary>
    /// <param name="name">A prefix for its name.</param>
    /// <param name="values">The values, row-major.</param>
    /// <param name="dims">The shape.</param>
    /// <returns>The initializer's value name.</returns>
    public string Constant(string name, ReadOnlySpan<float> values, params long[] dims) =>
        Initializer(name, TensorProto.Types.DataType.Float, MemoryMarshal.AsBytes(values), dims);

    /// <summary>Adds an initializer holding a tensor's values (float32, float16, bfloat16, int8, uint8, int32 or int64).</summary>
    /// <param name="name">A prefix for its name.</param>
    /// <param name="tensor">The tensor (any device); its bytes are copied.</param>
    /// <returns>The initializer's value name.</returns>
    public string Constant(string name, Tensor tensor)
    {
        ArgumentNullException.ThrowIfNull(tensor);
        using var cpu = tensor.detach().cpu().contiguous();
        var type = tensor.dtype switch
        {
            ScalarType.Float32 => TensorProto.Types.DataType.Float,
            ScalarType.Float16 => TensorProto.Types.DataType.Float16,
            ScalarType.BFloat16 => TensorProto.Types.DataType.Bfloat16,
            ScalarType.Int8 => TensorProto.Types.DataType.Int8,
            ScalarType.Byte => TensorProto.Types.DataType.Uint8,
            ScalarType.Int32 => TensorProto.Types.DataType.Int32,
            ScalarType.Int64 => TensorProto.Types.DataType.Int64,
            _ => throw new NotSupportedException($"An ONNX initializer of {tensor.dtype} is not supported."),
        };
        return Initializer(name, type, cpu.bytes, cpu.shape);
    }

    /// <summary>Adds an int64 initializer (shapes, axes).</summary>
    /// <param name="name">A prefix for its name.</param>
    /// <param name="values">The values.</param>
    /// <returns>The initializer's value name.</returns>
    public string Int64s(string name, params long[] values) =>
        Initializer(name, TensorProto.Types.DataType.Int64, MemoryMarshal.AsBytes(values.AsSpan()), values.Length);

    internal string Initializer(string name, TensorProto.Types.DataType type, ReadOnlySpan<byte> bytes, params long[] dims)
    {
        var tensor = new TensorProto { Name = Unique(name), DataType = (int)type, RawData = ByteString.CopyFrom(bytes) };
        tensor.Dims.AddRange(dims);
        graph.Initializer.Add(tensor);
        return tensor.Name;
    }

    internal void Input(string name, IReadOnlyList<long> sampleShape) => graph.Input.Add(Value(name, sampleShape));

    internal void Output(string name, IReadOnlyList<long> sampleShape) => graph.Output.Add(Value(name, sampleShape));

    private static ValueInfoProto Value(string name, IReadOnlyList<long> sampleShape)
    {
        var shape = new TensorShapeProto();
        shape.Dim.Add(new TensorShapeProto.Types.Dimension { DimParam = "batch" });
        foreach (long d in sampleShape)
        {
            shape.Dim.Add(new TensorShapeProto.Types.Dimension { DimValue = d });
        }

        return new ValueInfoProto
        {
            Name = name,
            Type = new TypeProto { TensorType = new TypeProto.Types.Tensor { ElemType = (int)TensorProto.Types.DataType.Float, Shape = shape } },
        };
    }

    private static AttributeProto Attribute(string name, object value)
    {
        var attribute = new AttributeProto { Name = name };
        switch (value)
        {
            case long or int:
                attribute.Type = AttributeProto.Types.AttributeType.Int;
                attribute.I = Convert.ToInt64(value, System.Globalization.CultureInfo.InvariantCulture);
                break;
            case float or double:
                attribute.Type = AttributeProto.Types.AttributeType.Float;
                attribute.F = Convert.ToSingle(value, System.Globalization.CultureInfo.InvariantCulture);
                break;
            case string s:
                attribute.Type = AttributeProto.Types.AttributeType.String;
                attribute.S = ByteString.CopyFromUtf8(s);
                break;
            case long[] ints:
                attribute.Type = AttributeProto.Types.AttributeType.Ints;
                attribute.Ints.AddRange(ints);
                break;
            case float[] floats:
                attribute.Type = AttributeProto.Types.AttributeType.Floats;
                attribute.Floats.AddRange(floats);
                break;
            default:
                throw new ArgumentException($"Attribute '{name}' has a value of type {value.GetType().Name}, which ONNX attributes cannot hold.", nameof(value));
        }

        return attribute;
    }

    private string Unique(string name)
    {
        int n = counters.GetValueOrDefault(name);
        counters[name] = n + 1;
        return n == 0 ? name : $"{name}_{n}";
    }
}

/// <summary>Ready-made emitters for <see cref="OnnxExportOptions.CustomModules"/>.</summary>
public static class OnnxEmitters
{
    /// <summary>
    /// A residual block: runs the named children in order on the input, adds the input to the result, then runs the
    /// children named in <paramref name="afterAdd"/> (for example a ReLU).
    /// </summary>
    /// <param name="body">The children on the residual branch, in order.</param>
    /// <param name="afterAdd">The children after the addition, in order.</param>
    /// <returns>The emitter.</returns>
    public static Func<OnnxGraph, nn.Module, string, string, string> Residual(IReadOnlyList<string> body, params string[] afterAdd)
    {
        ArgumentNullException.ThrowIfNull(body);
        ArgumentNullException.ThrowIfNull(afterAdd);
        return (graph, module, name, input) =>
        {
            var children = module.named_children().ToDictionary(c => c.name, c => c.module);
            string Run(string child, string x) => children.TryGetValue(child, out var m)
                ? graph.Emit(m, name.Length == 0 ? child : $"{name}.{child}", x)
                : throw new NotSupportedException($"The {module.GetType().Name} at '{name}' has no child '{child}' for its residual emitter.");
            string y = body.Aggregate(input, (x, child) => Run(child, x));
            y = graph.Node("Add", name.Length == 0 ? "model" : name, [y, input]);
            return afterAdd.Aggregate(y, (x, child) => Run(child, x));
        };
    }
}
