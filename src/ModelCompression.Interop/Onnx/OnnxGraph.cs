using System.Runtime.InteropServices;
using Google.Protobuf;
using ModelCompression.Interop.Onnx.Proto;
using TorchSharp;
using TorchSharp.Modules;
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

    internal void Input(string name, IReadOnlyList<long> sampleShape, TensorProto.Types.DataType type) => graph.Input.Add(Value(name, sampleShape, type));

    internal void Output(string name, IReadOnlyList<long> sampleShape) => graph.Output.Add(Value(name, sampleShape, TensorProto.Types.DataType.Float));

    private static ValueInfoProto Value(string name, IReadOnlyList<long> sampleShape, TensorProto.Types.DataType type)
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
            Type = new TypeProto { TensorType = new TypeProto.Types.Tensor { ElemType = (int)type, Shape = shape } },
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

/// <summary>The values of a recurrent layer written by <see cref="OnnxEmitters.Recurrent"/>, shaped as TorchSharp returns them.</summary>
/// <param name="Output">The output sequence: [sequence, batch, directions·hidden], or [batch, sequence, directions·hidden] for a batch-first layer.</param>
/// <param name="Hidden">The last hidden state of every layer and direction: [layers·directions, batch, hidden].</param>
/// <param name="Cell">An LSTM's last cell state, shaped as <paramref name="Hidden"/>; <see langword="null"/> for a GRU or RNN.</param>
public sealed record OnnxRecurrentValues(string Output, string Hidden, string? Cell);

/// <summary>Ready-made emitters for <see cref="OnnxExportOptions.CustomModules"/>.</summary>
public static class OnnxEmitters
{
    /// <summary>
    /// Writes TorchSharp's <c>GRU</c>, <c>LSTM</c> or tanh <c>RNN</c> as ONNX's GRU, LSTM or RNN operators, one per
    /// stacked layer, starting from zero states. These layers take and return tuples, so the exporter cannot walk
    /// them on its own: call this from the <see cref="OnnxExportOptions.CustomModules"/> emitter of the module whose
    /// forward calls the layer.
    /// </summary>
    /// <param name="graph">The graph being built.</param>
    /// <param name="layer">The recurrent layer.</param>
    /// <param name="name">Its dotted name (for node names and error messages).</param>
    /// <param name="input">Its input sequence's value: [sequence, batch, input], or [batch, sequence, input] when the layer is batch-first.</param>
    /// <returns>The output sequence and the last states.</returns>
    /// <exception cref="UnsupportedModelException">The layer is not a GRU, LSTM or tanh RNN.</exception>
    public static OnnxRecurrentValues Recurrent(OnnxGraph graph, nn.Module layer, string name, string input)
    {
        ArgumentNullException.ThrowIfNull(graph);
        ArgumentNullException.ThrowIfNull(layer);
        ArgumentNullException.ThrowIfNull(name);
        ArgumentException.ThrowIfNullOrEmpty(input);
        // ONNX orders the gates differently: GRU (r, z, n) becomes (z, r, h); LSTM (i, f, g, o) becomes (i, o, f, c).
        (string op, int[] order) = layer switch
        {
            GRU => ("GRU", new[] { 1, 0, 2 }),
            LSTM => ("LSTM", new[] { 0, 3, 1, 2 }),
            RNN => ("RNN", new[] { 0 }),
            _ => throw new UnsupportedModelException(name, layer.GetType().Name, $"The {layer.GetType().Name} at '{name}' is not a GRU, LSTM or RNN."),
        };
        var settings = ModelCompression.Modules.LayerRegistry.Find(layer)!.GetAttributes(layer);
        if (layer is RNN && settings.GetString("nonlinearity") != nameof(nn.NonLinearities.Tanh))
        {
            throw new UnsupportedModelException(name, nameof(RNN), $"The RNN at '{name}' uses {settings.GetString("nonlinearity")}; only tanh RNNs are exported.");
        }

        string at = name.Length == 0 ? "model" : name;
        long hidden = settings.GetInt64("hidden"), layers = settings.GetInt64("layers");
        bool bias = settings.GetBoolean("bias"), batchFirst = settings.GetBoolean("batchFirst"), bidirectional = settings.GetBoolean("bidirectional");
        string[] suffixes = bidirectional ? [string.Empty, "_reverse"] : [string.Empty];
        var attributes = new Dictionary<string, object> { ["hidden_size"] = hidden, ["direction"] = bidirectional ? "bidirectional" : "forward" };
        if (layer is GRU)
        {
            // PyTorch applies the reset gate after the hidden state's linear transform (ONNX's default is before).
            attributes["linear_before_reset"] = 1L;
        }

        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var state = layer.state_dict();
        Tensor Gates(Tensor t) => torch.cat(order.Select(i => t.detach().to(ScalarType.Float32).chunk(order.Length, 0)[i]).ToArray(), 0);
        Tensor PerDirection(Func<string, Tensor> part) => torch.stack(suffixes.Select(part).ToArray());

        // ONNX Runtime's recurrent kernels read time-major sequences, so batch-first layers are transposed in and out.
        string x = batchFirst ? graph.Node("Transpose", at, [input], new Dictionary<string, object> { ["perm"] = new long[] { 1, 0, 2 } }) : input;
        var lastHidden = new List<string>();
        var lastCell = new List<string>();
        for (long k = 0; k < layers; k++)
        {
            string w = graph.Constant($"{at}.W{k}", PerDirection(d => Gates(state[$"weight_ih_l{k}{d}"])));
            string r = graph.Constant($"{at}.R{k}", PerDirection(d => Gates(state[$"weight_hh_l{k}{d}"])));
            string b = bias ? graph.Constant($"{at}.B{k}", PerDirection(d => torch.cat([Gates(state[$"bias_ih_l{k}{d}"]), Gates(state[$"bias_hh_l{k}{d}"])]))) : string.Empty;
            var outputs = graph.NodeWithOutputs(op, at, [x, w, r, b], layer is LSTM ? 3 : 2, attributes);
            // Y is [sequence, directions, batch, hidden]; PyTorch's output puts the directions side by side in the features.
            string y = graph.Node("Transpose", at, [outputs[0]], new Dictionary<string, object> { ["perm"] = new long[] { 0, 2, 1, 3 } });
            x = graph.Node("Reshape", at, [y, graph.Int64s($"{at}.sequence_shape", 0, 0, -1)]);
            lastHidden.Add(outputs[1]);
            if (layer is LSTM)
            {
                lastCell.Add(outputs[2]);
            }
        }

        string Stack(List<string> values) => values.Count == 1 ? values[0] : graph.Node("Concat", at, values, new Dictionary<string, object> { ["axis"] = 0L });
        string output = batchFirst ? graph.Node("Transpose", at, [x], new Dictionary<string, object> { ["perm"] = new long[] { 1, 0, 2 } }) : x;
        return new OnnxRecurrentValues(output, Stack(lastHidden), layer is LSTM ? Stack(lastCell) : null);
    }

    /// <summary>
    /// Writes TorchSharp's <c>MultiheadAttention</c> used as self-attention, <c>attention.call(x, x, x, null, false,
    /// mask)</c> on a sequence-first input [L, N, E]: the per-head projections, scaled dot products, softmax and output
    /// projection, optionally with the causal mask (−∞ above the diagonal) built in the graph for any sequence length.
    /// Call it from the <see cref="OnnxExportOptions.CustomModules"/> emitter of the module whose forward calls the
    /// attention: the exporter cannot know which query, key, value and mask a module passes.
    /// </summary>
    /// <param name="graph">The graph being built.</param>
    /// <param name="attention">The attention layer.</param>
    /// <param name="name">Its dotted name (for node names and error messages).</param>
    /// <param name="input">The sequence's value, [L, N, E].</param>
    /// <param name="causal">Whether each position attends only to itself and earlier ones.</param>
    /// <returns>The attention's output value, [L, N, E] (the first item of the layer's result).</returns>
    /// <exception cref="UnsupportedModelException">The layer has separate key/value sizes or bias_k/bias_v, which this emitter does not write.</exception>
    public static string SelfAttention(OnnxGraph graph, MultiheadAttention attention, string name, string input, bool causal = false)
    {
        ArgumentNullException.ThrowIfNull(graph);
        ArgumentNullException.ThrowIfNull(attention);
        ArgumentNullException.ThrowIfNull(name);
        ArgumentException.ThrowIfNullOrEmpty(input);
        using var scope = NewDisposeScope();
        var state = attention.state_dict();
        if (!state.ContainsKey("in_proj_weight") || state.ContainsKey("bias_k"))
        {
            throw new UnsupportedModelException(name, nameof(MultiheadAttention),
                $"The MultiheadAttention at '{name}' has separate key and value sizes or bias_k/bias_v; only self-attention with one in_proj_weight is exported.");
        }

        long heads = ModelCompression.Modules.LayerRegistry.Find(attention)!.GetAttributes(attention).GetInt64("heads");
        Tensor? Get(string key) => state.TryGetValue(key, out var t) ? t.detach().to(ScalarType.Float32) : null;
        string at = name.Length == 0 ? "attention" : name;
        return Attention(graph, at, input, Get("in_proj_weight")!, Get("in_proj_bias"), Get("out_proj.weight")!, Get("out_proj.bias"), heads, causal);
    }

    /// <summary>Self-attention on [L, N, E] from the packed in-projection [3E, E] and the out-projection, as PyTorch computes it.</summary>
    internal static string Attention(OnnxGraph g, string at, string x, Tensor inWeight, Tensor? inBias, Tensor outWeight, Tensor? outBias, long heads, bool causal)
    {
        long dim = inWeight.shape[1], headDim = dim / heads;
        var weights = inWeight.chunk(3, 0);
        var biases = inBias?.chunk(3, 0);
        string Dense(string name, string value, Tensor weight, Tensor? bias)
        {
            using var wt = weight.t().contiguous();
            string y = g.Node("MatMul", $"{at}.{name}", [value, g.Constant($"{at}.{name}.weight_t", wt)]);
            return bias is null ? y : g.Node("Add", $"{at}.{name}", [y, g.Constant($"{at}.{name}.bias", bias.contiguous())]);
        }

        var perHead = g.Int64s($"{at}.heads_shape", 0, -1, headDim);
        // [L, N, E] → [L, N·heads, d] → [N·heads, L, d], the batched layout the attention's MatMuls need.
        string Heads(string name, int part, long[] perm) =>
            g.Node("Transpose", at, [g.Node("Reshape", at, [Dense(name, x, weights[part], biases?[part]), perHead])], new Dictionary<string, object> { ["perm"] = perm });
        string q = Heads("q", 0, [1, 0, 2]);
        string kT = Heads("k", 1, [1, 2, 0]);
        string v = Heads("v", 2, [1, 0, 2]);
        string scores = g.Node("Mul", at, [g.Node("MatMul", at, [q, kT]), g.Constant($"{at}.scale", [(float)(1 / Math.Sqrt(headDim))])]);
        if (causal)
        {
            // −∞ strictly above the diagonal of an [L, L] matrix, L read from the input: Trilu keeps that triangle of a
            // matrix filled with −∞ (a scalar expanded) and zeroes the rest.
            string length = g.Node("Slice", at, [g.Node("Shape", at, [x]), g.Int64s($"{at}.zero", 0), g.Int64s($"{at}.one", 1)]);
            string square = g.Node("Concat", at, [length, length], new Dictionary<string, object> { ["axis"] = 0L });
            string filled = g.Node("Expand", at, [g.Constant($"{at}.minus_infinity", [float.NegativeInfinity]), square]);
            string mask = g.Node("Trilu", at, [filled, g.Int64s($"{at}.diagonal", 1)], new Dictionary<string, object> { ["upper"] = 1L });
            scores = g.Node("Add", at, [scores, mask]);
        }

        string probabilities = g.Node("Softmax", at, [scores], new Dictionary<string, object> { ["axis"] = -1L });
        string mixed = g.Node("Transpose", at, [g.Node("MatMul", at, [probabilities, v])], new Dictionary<string, object> { ["perm"] = new long[] { 1, 0, 2 } });
        return Dense("out_proj", g.Node("Reshape", at, [mixed, g.Node("Shape", at, [x])]), outWeight, outBias);
    }

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
                : throw new UnsupportedModelException(name, module.GetType().Name, $"The {module.GetType().Name} at '{name}' has no child '{child}' for its residual emitter.");
            string y = body.Aggregate(input, (x, child) => Run(child, x));
            y = graph.Node("Add", name.Length == 0 ? "model" : name, [y, input]);
            return afterAdd.Aggregate(y, (x, child) => Run(child, x));
        };
    }
}
