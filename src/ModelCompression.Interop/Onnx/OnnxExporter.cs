using Google.Protobuf;
using ModelCompression.Architecture;
using ModelCompression.Clustering;
using ModelCompression.Factorization;
using ModelCompression.Interop.Onnx.Proto;
using ModelCompression.Modules;
using ModelCompression.Pruning;
using ModelCompression.Quantization;
using ModelCompression.Quantization.Kernels;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Interop.Onnx;

/// <summary>How int8 layers with quantized activations are written.</summary>
public enum OnnxInt8Form
{
    /// <summary>
    /// int8 weights behind a DequantizeLinear feeding a float MatMul, the input rounded per row as the library's kernel
    /// does (step for step in float ops): the closest to the library's numbers.
    /// </summary>
    Qdq,

    /// <summary>
    /// <c>DynamicQuantizeLinear</c> then <c>MatMulInteger</c> on the int8 weights, rescaled in float: ONNX Runtime's
    /// integer kernel. It ranges each call's whole batch where the library ranges each row, so the two agree exactly
    /// at batch 1 and closely otherwise. Convolutions with run-time ranges are always written in the QDQ form.
    /// </summary>
    Integer,
}

/// <summary>Options of <see cref="OnnxExporter"/>.</summary>
public sealed class OnnxExportOptions
{
    /// <summary>Gets or sets how int8 Linear layers with run-time activation ranges are written (static layers are always QDQ).</summary>
    /// <value>The default is <see cref="OnnxInt8Form.Integer"/>, measured faster in ONNX Runtime 1.31 (see the README's interop section).</value>
    public OnnxInt8Form Int8Form { get; set; } = OnnxInt8Form.Integer;

    /// <summary>
    /// Gets emitters for modules the exporter does not know (a residual block of your own), by module type: each
    /// receives the graph, the module, its dotted name and its input value's name, and returns its output value's name.
    /// A layer kind whose registered descriptor implements <see cref="IOnnxLayerEmitter"/> needs no entry here.
    /// </summary>
    public IDictionary<Type, Func<OnnxGraph, nn.Module, string, string, string>> CustomModules { get; } =
        new Dictionary<Type, Func<OnnxGraph, nn.Module, string, string, string>>();

    /// <summary>
    /// Gets or sets the element type of the model's input: <see cref="ScalarType.Float32"/> for images and features,
    /// <see cref="ScalarType.Int64"/> (or <see cref="ScalarType.Int32"/>) for token ids fed to an <c>Embedding</c>.
    /// </summary>
    /// <value>The default is <see cref="ScalarType.Float32"/>.</value>
    public ScalarType InputType { get; set; } = ScalarType.Float32;

    /// <summary>Gets or sets the producer name written into the model.</summary>
    /// <value>The default is <c>ModelCompression</c>.</value>
    public string ProducerName { get; set; } = "ModelCompression";
}

/// <summary>
/// Exports models — plain and compressed — to ONNX (opset <see cref="InteropInfo.OnnxOpset"/>, IR version
/// <see cref="InteropInfo.OnnxIrVersion"/>) for ONNX Runtime: float32 layers as they are, half-precision layers with
/// 16-bit weights cast to float32, sparse and clustered layers as dense, low-rank layers as two MatMuls or
/// convolutions, int8 layers as QDQ or integer MatMul, int4 weight-only layers as blocked int4 DequantizeLinear,
/// quantized embeddings as DequantizeLinear of their int8/int4 table and a Gather.
/// </summary>
/// <remarks>
/// The whole graph is built in memory first: an unsupported module is an <see cref="UnsupportedModelException"/> naming
/// it, before anything is written. The exported model's input is <c>input</c> [batch, sample shape…], its output
/// <c>output</c>; the model is evaluated in inference mode (dropout off, BatchNorm with running statistics).
/// </remarks>
public static class OnnxExporter
{
    /// <summary>Exports a model to an ONNX file, atomically.</summary>
    /// <param name="model">The model; it is not changed.</param>
    /// <param name="path">The file to write.</param>
    /// <param name="sampleShape">The shape of one input sample, without the batch dimension (e.g. [1, 28, 28]).</param>
    /// <param name="options">Options; the defaults when <see langword="null"/>.</param>
    /// <exception cref="UnsupportedModelException">A module cannot be exported (the message and <see cref="UnsupportedModelException.LayerName"/> name it); nothing is written.</exception>
    /// <exception cref="ArgumentException"><see cref="OnnxExportOptions.InputType"/> is not Float32, Int64 or Int32, or the model rejects a sample of <paramref name="sampleShape"/>; nothing is written.</exception>
    public static void Export(nn.Module<Tensor, Tensor> model, string path, IReadOnlyList<long> sampleShape, OnnxExportOptions? options = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        var bytes = ToBytes(model, sampleShape, options);
        Serialization.AtomicFile.Write(path, stream => stream.Write(bytes));
    }

    private static string FirstLine(string message) => message.Split('\n', 2)[0].Trim();

    /// <summary>Exports a model to ONNX bytes (a serialized <c>ModelProto</c>).</summary>
    /// <param name="model">The model; it is not changed.</param>
    /// <param name="sampleShape">The shape of one input sample, without the batch dimension.</param>
    /// <param name="options">Options; the defaults when <see langword="null"/>.</param>
    /// <returns>The model's bytes.</returns>
    /// <exception cref="UnsupportedModelException">A module cannot be exported (the message and <see cref="UnsupportedModelException.LayerName"/> name it).</exception>
    /// <exception cref="ArgumentException"><see cref="OnnxExportOptions.InputType"/> is not Float32, Int64 or Int32, or the model rejects a sample of <paramref name="sampleShape"/>.</exception>
    public static byte[] ToBytes(nn.Module<Tensor, Tensor> model, IReadOnlyList<long> sampleShape, OnnxExportOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(sampleShape);
        if (sampleShape.Any(d => d <= 0))
        {
            throw new ArgumentException($"The sample shape [{string.Join(", ", sampleShape)}] has a dimension that is not positive.", nameof(sampleShape));
        }

        options ??= new OnnxExportOptions();
        var inputType = options.InputType switch
        {
            ScalarType.Float32 => TensorProto.Types.DataType.Float,
            ScalarType.Int64 => TensorProto.Types.DataType.Int64,
            ScalarType.Int32 => TensorProto.Types.DataType.Int32,
            _ => throw new ArgumentException($"OnnxExportOptions.InputType is {options.InputType}; the exporter writes Float32, Int64 or Int32 inputs.", nameof(options)),
        };
        long[] outputShape;
        var modes = ModuleModes.Record(model);
        // Adaptive pools to sizes other than 1 become fixed pools or averaging matrices, which need their input's size:
        // the sample run records it.
        var poolInputs = new Dictionary<nn.Module, long[]>(ReferenceEqualityComparer.Instance);
        var hooks = model.modules().OfType<AdaptiveAvgPool2d>()
            .Select(pool => pool.register_forward_pre_hook((m, input) => { poolInputs[m] = input.shape; return input; }))
            .ToList();
        try
        {
            model.eval();
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            // Zeros are valid token ids as well as valid features, so one sample serves every input type.
            var sample = zeros([1, .. sampleShape], options.InputType, model.parameters().FirstOrDefault()?.device ?? CPU);
            outputShape = model.call(sample).shape[1..];
        }
        catch (System.Runtime.InteropServices.ExternalException ex)
        {
            // LibTorch's error (a C++ stack trace) for a sample the model cannot take: say which shape was wrong.
            throw new ArgumentException(
                $"The model rejects a sample of shape [{string.Join(", ", sampleShape)}] ({options.InputType}, batch 1 added): {FirstLine(ex.Message)}",
                nameof(sampleShape),
                ex);
        }
        finally
        {
            hooks.ForEach(hook => hook.remove());
            modes.Dispose();
        }

        var exporter = new Emitter(options, poolInputs);
        var graph = exporter.Graph;
        graph.Input("input", sampleShape, inputType);
        string output;
        using (NewDisposeScope())
        using (no_grad())
        {
            output = graph.Emit(model, string.Empty, "input");
        }

        graph.Proto.Node.Add(new NodeProto { OpType = "Identity", Name = "output/Identity", Input = { output }, Output = { "output" } });
        graph.Output("output", outputShape);
        var proto = new ModelProto
        {
            IrVersion = InteropInfo.OnnxIrVersion,
            ProducerName = options.ProducerName,
            ProducerVersion = typeof(OnnxExporter).Assembly.GetName().Version?.ToString() ?? "0",
            Graph = graph.Proto,
        };
        proto.OpsetImport.Add(new OperatorSetIdProto { Domain = string.Empty, Version = InteropInfo.OnnxOpset });
        if (graph.UsesMicrosoftDomain)
        {
            proto.OpsetImport.Add(new OperatorSetIdProto { Domain = "com.microsoft", Version = 1 });
        }

        return proto.ToByteArray();
    }

    /// <summary>Turns modules into nodes.</summary>
    private sealed class Emitter
    {
        private readonly OnnxExportOptions options;
        private readonly Dictionary<nn.Module, long[]> poolInputs;

        public Emitter(OnnxExportOptions options, Dictionary<nn.Module, long[]> poolInputs)
        {
            this.options = options;
            this.poolInputs = poolInputs;
            Graph = new OnnxGraph(Emit);
        }

        public OnnxGraph Graph { get; }

        private static string Display(string name) => name.Length == 0 ? "the root" : $"'{name}'";

        private static string Child(string parent, string child) => parent.Length == 0 ? child : $"{parent}.{child}";

        private string Emit(nn.Module module, string name, string x)
        {
            var g = Graph;
            string at = name.Length == 0 ? "model" : name;
            if (options.CustomModules.TryGetValue(module.GetType(), out var custom))
            {
                return custom(g, module, name, x);
            }

            if (ModelCompression.Modules.LayerRegistry.Find(module) is IOnnxLayerEmitter registered)
            {
                return registered.EmitOnnx(g, module, name, x);
            }

            if (TorchVisionEmitters.TryGet(module, out var vision))
            {
                return vision(g, module, name, x);
            }

            switch (module)
            {
                case Sequential or LowRankLayer or DepthwiseSeparableConv2d:
                    return EmitChildren(module, name, x);
                case ClusteredLayer clustered:
                    return Emit(clustered.Inner, Child(name, "inner"), x);
                case Linear linear:
                    return Linear(at, x, linear.weight!, linear.bias);
                case SparseLinear sparse:
                {
                    using var dense = sparse.ToDenseWeight();
                    return Linear(at, x, dense, sparse.Bias);
                }

                case ConvolutionTranspose transposed:
                    return ConvTranspose(at, x, transposed, g.Constant($"{at}.weight", transposed.weight!.to(ScalarType.Float32)), transposed.bias is null ? null : g.Constant($"{at}.bias", transposed.bias.to(ScalarType.Float32)), name);

                case Conv1d or Conv2d or Conv3d:
                {
                    var conv = (Convolution)module;
                    return Conv(at, x, conv, g.Constant($"{at}.weight", conv.weight!.to(ScalarType.Float32)), conv.bias is null ? null : g.Constant($"{at}.bias", conv.bias.to(ScalarType.Float32)), name);
                }

                case Embedding embedding:
                    // Gather picks rows of the table by token id; the model's input must then be integer (OnnxExportOptions.InputType).
                    return g.Node("Gather", at, [g.Constant($"{at}.weight", embedding.weight!.to(ScalarType.Float32)), x], new Dictionary<string, object> { ["axis"] = 0L });
                case QuantizedEmbedding quantizedEmbedding:
                    return QuantizedEmbedding(at, x, quantizedEmbedding);
                case LayerNorm norm:
                {
                    long[] shape = norm.normalized_shape;
                    var inputs = new List<string> { norm.elementwise_affine ? g.Constant($"{at}.scale", norm.weight.to(ScalarType.Float32)) : g.Constant($"{at}.scale", ones(shape)) };
                    if (norm.bias is not null)
                    {
                        inputs.Add(g.Constant($"{at}.bias", norm.bias.to(ScalarType.Float32)));
                    }

                    return g.Node("LayerNormalization", at, [x, .. inputs], new Dictionary<string, object> { ["axis"] = (long)-shape.Length, ["epsilon"] = norm.eps });
                }

                case GroupNorm norm:
                    return GroupNorm(at, x, norm);
                case GELU gelu:
                    return g.Node("Gelu", at, [x], new Dictionary<string, object> { ["approximate"] = gelu.approximate == GELU.Approximate.tanh ? "tanh" : "none" });
                case ELU elu:
                    return g.Node("Elu", at, [x], new Dictionary<string, object> { ["alpha"] = elu.alpha });
                case Mish:
                    return g.Node("Mish", at, [x]);
                case Softplus softplus:
                {
                    // PyTorch: log(1 + exp(βx)) / β, and x itself where βx > threshold (ONNX's Softplus has neither β nor the threshold).
                    string scaled = softplus.beta == 1 ? x : g.Node("Mul", at, [x, Scalar($"{at}.beta", (float)softplus.beta)]);
                    string soft = g.Node("Softplus", at, [scaled]);
                    soft = softplus.beta == 1 ? soft : g.Node("Div", at, [soft, Scalar($"{at}.beta", (float)softplus.beta)]);
                    return g.Node("Where", at, [g.Node("Greater", at, [scaled, Scalar($"{at}.threshold", (float)softplus.threshold)]), x, soft]);
                }

                case Hardsigmoid:
                    // PyTorch's relu6(x + 3) / 6 is ONNX's max(0, min(1, x/6 + 1/2)).
                    return g.Node("HardSigmoid", at, [x], new Dictionary<string, object> { ["alpha"] = 1f / 6, ["beta"] = 0.5f });
                case PReLU prelu:
                {
                    using var slope = prelu.weight.detach().to(ScalarType.Float32);
                    return prelu.num_parameters == 1
                        ? g.Node("PRelu", at, [x, g.Constant($"{at}.slope", slope)])
                        : PerChannel(at, x, prelu.num_parameters, y => g.Node("PRelu", at, [y, g.Constant($"{at}.slope", slope.reshape(prelu.num_parameters, 1))]));
                }

                case MaxPool1d pool:
                    return g.Node("MaxPool", at, [x], new Dictionary<string, object>
                    {
                        ["kernel_shape"] = new[] { pool.kernel_size },
                        ["strides"] = new[] { pool.stride ?? pool.kernel_size },
                        ["pads"] = new[] { pool.padding ?? 0, pool.padding ?? 0 },
                        ["dilations"] = new[] { pool.dilation ?? 1 },
                        ["ceil_mode"] = pool.ceil_mode ? 1L : 0L,
                    });
                case AvgPool1d avg:
                    return g.Node("AveragePool", at, [x], new Dictionary<string, object>
                    {
                        ["kernel_shape"] = new[] { avg.kernel_size },
                        ["strides"] = new[] { avg.stride ?? avg.kernel_size },
                        ["pads"] = new[] { avg.padding ?? 0, avg.padding ?? 0 },
                        ["ceil_mode"] = avg.ceil_mode ? 1L : 0L,
                        ["count_include_pad"] = avg.count_include_pad ? 1L : 0L,
                    });
                case AdaptiveAvgPool1d adaptive1 when adaptive1.output_size == 1:
                    return g.Node("GlobalAveragePool", at, [x]);
                case BatchNorm1d or BatchNorm2d:
                {
                    var bn = (NormBase)module;
                    if (!bn.track_running_stats || bn.running_mean is null)
                    {
                        throw new UnsupportedModelException(name, module.GetType().Name, $"The BatchNorm at {Display(name)} keeps no running statistics; ONNX inference needs them.");
                    }

                    long c = bn.num_features;
                    var scale = bn.weight is null ? g.Constant($"{at}.scale", ones(c)) : g.Constant($"{at}.scale", bn.weight.to(ScalarType.Float32));
                    var shift = bn.bias is null ? g.Constant($"{at}.shift", zeros(c)) : g.Constant($"{at}.shift", bn.bias.to(ScalarType.Float32));
                    return g.Node("BatchNormalization", at, [x, scale, shift, g.Constant($"{at}.mean", bn.running_mean.to(ScalarType.Float32)), g.Constant($"{at}.var", bn.running_var!.to(ScalarType.Float32))], new Dictionary<string, object> { ["epsilon"] = bn.eps });
                }

                case ReLU:
                    return g.Node("Relu", at, [x]);
                case ReLU6:
                    return g.Node("Clip", at, [x, Scalar($"{at}.min", 0), Scalar($"{at}.max", 6)]);
                case Sigmoid:
                    return g.Node("Sigmoid", at, [x]);
                case Tanh:
                    return g.Node("Tanh", at, [x]);
                case SiLU:
                    return g.Node("Mul", at, [x, g.Node("Sigmoid", at, [x])]);
                case Hardswish:
                    return g.Node("HardSwish", at, [x]);
                case LeakyReLU leaky:
                    return g.Node("LeakyRelu", at, [x], new Dictionary<string, object> { ["alpha"] = leaky.negative_slope });
                case Identity or Dropout:
                    return x;
                case Softmax softmax:
                    return g.Node("Softmax", at, [x], new Dictionary<string, object> { ["axis"] = softmax.dim });
                case Flatten flatten when flatten.start_dim == 1 && flatten.end_dim == -1:
                    return g.Node("Flatten", at, [x], new Dictionary<string, object> { ["axis"] = 1L });
                case MaxPool2d pool:
                    return g.Node("MaxPool", at, [x], new Dictionary<string, object>
                    {
                        ["kernel_shape"] = pool.kernel_size,
                        ["strides"] = pool.stride,
                        ["pads"] = new[] { pool.padding[0], pool.padding[1], pool.padding[0], pool.padding[1] },
                        ["dilations"] = pool.dilation,
                        ["ceil_mode"] = pool.ceil_mode ? 1L : 0L,
                    });
                case AvgPool2d avg when avg.divisor_override is null:
                    return g.Node("AveragePool", at, [x], new Dictionary<string, object>
                    {
                        ["kernel_shape"] = avg.kernel_size,
                        ["strides"] = avg.stride,
                        ["pads"] = new[] { avg.padding[0], avg.padding[1], avg.padding[0], avg.padding[1] },
                        ["ceil_mode"] = avg.ceil_mode ? 1L : 0L,
                        ["count_include_pad"] = avg.count_include_pad ? 1L : 0L,
                    });
                case AdaptiveAvgPool2d adaptive when adaptive.output_size.All(s => s == 1):
                    return g.Node("GlobalAveragePool", at, [x]);
                case AdaptiveAvgPool2d adaptive when poolInputs.TryGetValue(module, out var poolInput) && poolInput.Length == 4:
                    return AdaptiveAveragePool(at, x, poolInput[2..], adaptive.output_size);
                case HalfPrecisionLayer half:
                    return Half(half, name, x);
                case QuantizedLinear q:
                    return QuantizedLinear(at, x, q);
                case QuantizedConv2d qc:
                    return QuantizedConv(at, x, qc);
                case InvertedResidual block:
                {
                    string y = EmitChildren(module, name, x);
                    return block.UsesResidual ? g.Node("Add", at, [y, x]) : y;
                }

                case SqueezeExcitation:
                    return g.Node("Mul", at, [x, EmitChildren(module, name, x)]);

                case TransformerEncoderLayer encoderLayer:
                    return EncoderLayer(at, x, encoderLayer, encoderLayer.state_dict(), string.Empty);
                case TransformerEncoder encoder:
                {
                    // The stack's layers are copies of one layer's settings, so the registry's reading of the stack holds for each.
                    var state = encoder.state_dict();
                    long layers = ModelCompression.Modules.LayerRegistry.Find(encoder)!.GetAttributes(encoder).GetInt64("layers");
                    for (long i = 0; i < layers; i++)
                    {
                        x = EncoderLayer($"{at}.layers.{i}", x, encoder, state, $"layers.{i}.");
                    }

                    return x;
                }

                case GRU or LSTM:
                    // Their forward takes and returns tuples, so only the module that calls them knows what flows in and out.
                    throw new UnsupportedModelException(name, module.GetType().Name,
                        $"The {module.GetType().Name} at {Display(name)} returns a tuple, so it cannot be exported on its own: register an emitter for the module " +
                        "that calls it in OnnxExportOptions.CustomModules and emit it there with OnnxEmitters.Recurrent.");
                default:
                    throw new UnsupportedModelException(name, module.GetType().Name,
                        $"The {module.GetType().Name} at {Display(name)} cannot be exported to ONNX. Supported: Sequential, Linear, Conv1d/Conv2d/Conv3d, ConvTranspose1d/2d/3d, " +
                        "BatchNorm, LayerNorm, GroupNorm, Embedding and QuantizedEmbedding (integer input), ReLU/ReLU6/Sigmoid/Tanh/SiLU/Hardswish/LeakyReLU/GELU/ELU/Mish/Softplus/" +
                        "Hardsigmoid/PReLU, Softmax, Flatten(1, -1), MaxPool1d/2d, AvgPool1d/2d, AdaptiveAvgPool1d(1), AdaptiveAvgPool2d, Dropout, Identity, the library's " +
                        "compressed layers and blocks, TransformerEncoderLayer/TransformerEncoder (no masks; GRU/LSTM through OnnxEmitters.Recurrent), torchvision.models' architectures; for other modules, implement IOnnxLayerEmitter in the kind's registered LayerDescriptor, or add an emitter to OnnxExportOptions.CustomModules.");
            }
        }

        /// <summary>
        /// PyTorch's adaptive average pool of [N, C, H, W] to [N, C, h, w] for the input size the sample run saw: a plain
        /// AveragePool when each size divides evenly, otherwise averaging matrices (output i averages inputs
        /// ⌊i·H/h⌋ to ⌈(i+1)·H/h⌉ − 1, windows that may overlap or repeat an input) applied by two MatMuls.
        /// </summary>
        private string AdaptiveAveragePool(string at, string x, long[] input, long[] output)
        {
            var g = Graph;
            if (input[0] % output[0] == 0 && input[1] % output[1] == 0)
            {
                long[] kernel = [input[0] / output[0], input[1] / output[1]];
                return g.Node("AveragePool", at, [x], new Dictionary<string, object> { ["kernel_shape"] = kernel, ["strides"] = kernel });
            }

            static Tensor Averaging(long from, long to)
            {
                var matrix = zeros(to, from);
                for (long i = 0; i < to; i++)
                {
                    long start = i * from / to, end = ((i + 1) * from + to - 1) / to;
                    using var share = (1f / (end - start)).ToScalar();
                    matrix[i, TensorIndex.Slice(start, end)].fill_(share);
                }

                return matrix;
            }

            using var rows = Averaging(input[0], output[0]);
            using var columns = Averaging(input[1], output[1]).t().contiguous();
            string pooledColumns = g.Node("MatMul", at, [x, g.Constant($"{at}.columns", columns)]);
            return g.Node("MatMul", at, [g.Constant($"{at}.rows", rows), pooledColumns]);
        }

        /// <summary>Runs a module's children in order, each on the previous one's output (what Sequential and the blocks' branches do).</summary>
        private string EmitChildren(nn.Module module, string name, string x)
        {
            foreach (var (childName, child) in module.named_children())
            {
                x = Emit(child, Child(name, childName), x);
            }

            return x;
        }

        private string Scalar(string name, float value) => Graph.Constant(name, [value]);

        private string Linear(string at, string x, Tensor weight, Tensor? bias)
        {
            var g = Graph;
            using var wt = weight.detach().to(ScalarType.Float32).t().contiguous();
            string y = g.Node("MatMul", at, [x, g.Constant($"{at}.weight_t", wt)]);
            return bias is null ? y : g.Node("Add", at, [y, g.Constant($"{at}.bias", bias.detach().to(ScalarType.Float32))]);
        }

        private string Conv(string at, string x, Convolution conv, string weight, string? bias, string name)
        {
            if (conv.padding_mode != PaddingModes.Zeros)
            {
                throw new UnsupportedModelException(name, conv.GetType().Name, $"The {conv.GetType().Name} at {Display(name)} uses {conv.padding_mode} padding; only zero padding is exported.");
            }

            // ONNX pads are all the starts, then all the ends. PyTorch's 'same' pads (stride 1) put the odd one at the end.
            int dims = conv.kernel_size.Length;
            var pads = new long[2 * dims];
            for (int d = 0; d < dims; d++)
            {
                long total = conv.padding_type == Padding.Same ? conv.dilation[d] * (conv.kernel_size[d] - 1) : 0;
                (pads[d], pads[dims + d]) = conv.padding_type is null ? (conv.padding![d], conv.padding[d]) : (total / 2, total - (total / 2));
            }

            return Graph.Node("Conv", at, bias is null ? [x, weight] : [x, weight, bias], new Dictionary<string, object>
            {
                ["kernel_shape"] = conv.kernel_size,
                ["strides"] = conv.stride,
                ["pads"] = pads,
                ["dilations"] = conv.dilation,
                ["group"] = conv.groups,
            });
        }

        /// <summary>
        /// A transposed convolution: ONNX's ConvTranspose takes the same weight layout [in, out / groups, kernel…] and
        /// the same implicit padding on each side, with the output padding added at the end.
        /// </summary>
        private string ConvTranspose(string at, string x, ConvolutionTranspose conv, string weight, string? bias, string name)
        {
            int dims = conv.kernel_size.Length;
            if (conv.output_padding.Distinct().Count() > 1)
            {
                // Measured: TorchSharp 0.107's output with output padding (0, 1) has the size (0, 0) gives.
                throw new UnsupportedModelException(name, conv.GetType().Name, $"The {conv.GetType().Name} at {Display(name)} has a different output padding per dimension ({string.Join(", ", conv.output_padding)}), which TorchSharp does not apply as ONNX would; only equal output paddings are exported.");
            }

            var padding = conv.padding ?? new long[dims];
            return Graph.Node("ConvTranspose", at, bias is null ? [x, weight] : [x, weight, bias], new Dictionary<string, object>
            {
                ["kernel_shape"] = conv.kernel_size,
                ["strides"] = conv.stride,
                ["pads"] = padding.Concat(padding).ToArray(),
                ["output_padding"] = conv.output_padding,
                ["dilations"] = conv.dilation,
                ["group"] = conv.groups,
            });
        }

        /// <summary>
        /// One of TorchSharp's transformer encoder layers, without masks: post-norm, sequence-first [L, N, E].
        /// x₁ = LayerNorm(x + attention(x)), then LayerNorm(x₁ + linear2(activation(linear1(x₁)))), with attention
        /// written out as the per-head projections, scaled dot products, softmax and output projection.
        /// </summary>
        private string EncoderLayer(string at, string x, nn.Module module, Dictionary<string, Tensor> state, string prefix)
        {
            var g = Graph;
            var settings = ModelCompression.Modules.LayerRegistry.Find(module)!.GetAttributes(module);
            long heads = settings.GetInt64("heads");
            string activation = settings.GetString("activation");
            Tensor? Get(string key) => state.TryGetValue(prefix + key, out var t) ? t.detach().to(ScalarType.Float32) : null;
            string Dense(string name, string input, Tensor weight, Tensor? bias) => Linear($"{at}.{name}", input, weight, bias);

            string attention = OnnxEmitters.Attention(
                g, $"{at}.self_attn", x, Get("self_attn.in_proj_weight")!, Get("self_attn.in_proj_bias"), Get("self_attn.out_proj.weight")!, Get("self_attn.out_proj.bias"), heads, causal: false);

            // TorchSharp's encoder layer is built with LayerNorm's default epsilon, 1e-5, and has no setting for it.
            string Norm(string name, string input) =>
                g.Node("LayerNormalization", at, [input, g.Constant($"{at}.{name}.weight", Get($"{name}.weight")!), g.Constant($"{at}.{name}.bias", Get($"{name}.bias")!)], new Dictionary<string, object> { ["axis"] = -1L, ["epsilon"] = 1e-5f });
            string x1 = Norm("norm1", g.Node("Add", at, [x, attention]));
            string hidden = Dense("linear1", x1, Get("linear1.weight")!, Get("linear1.bias"));
            hidden = activation == nameof(nn.Activations.GELU)
                ? g.Node("Gelu", at, [hidden])
                : g.Node("Relu", at, [hidden]);
            string ff = Dense("linear2", hidden, Get("linear2.weight")!, Get("linear2.bias"));
            return Norm("norm2", g.Node("Add", at, [x1, ff]));
        }

        /// <summary>
        /// Applies <paramref name="op"/> to <paramref name="x"/> [N, C, …] viewed as [N, C, rest]: parameters shaped [C, 1]
        /// then broadcast per channel whatever the input's rank, which the graph does not know.
        /// </summary>
        private string PerChannel(string at, string x, long channels, Func<string, string> op)
        {
            var g = Graph;
            string flat = g.Node("Reshape", at, [x, g.Int64s($"{at}.channels_shape", 0, channels, -1)]);
            return g.Node("Reshape", at, [op(flat), g.Node("Shape", at, [x])]);
        }

        /// <summary>
        /// GroupNorm as [N, G, rest] normalized by InstanceNormalization (mean and biased variance per sample and group,
        /// as PyTorch computes them), then the per-channel scale and shift. Opset 21's GroupNormalization is one node,
        /// but runtimes that predate it (and its opset 18 form, whose scale was per group) all run this.
        /// </summary>
        private string GroupNorm(string at, string x, GroupNorm norm)
        {
            var g = Graph;
            long groups = norm.num_groups;
            long? channels = norm.weight?.shape[0];
            string grouped = g.Node("Reshape", at, [x, g.Int64s($"{at}.group_shape", 0, groups, -1)]);
            string normalized = g.Node("InstanceNormalization", at, [grouped, g.Constant($"{at}.ones", ones(groups)), g.Constant($"{at}.zeros", zeros(groups))], new Dictionary<string, object> { ["epsilon"] = norm.eps });
            string y = g.Node("Reshape", at, [normalized, g.Node("Shape", at, [x])]);
            if (!norm.affine || channels is not { } c)
            {
                return y;
            }

            using var scale = norm.weight!.detach().to(ScalarType.Float32).reshape(c, 1);
            using var shift = norm.bias is null ? zeros(c, 1) : norm.bias.detach().to(ScalarType.Float32).reshape(c, 1);
            return PerChannel(at, y, c, v => g.Node("Add", at, [g.Node("Mul", at, [v, g.Constant($"{at}.scale", scale)]), g.Constant($"{at}.shift", shift)]));
        }

        /// <summary>A 16-bit layer: its weights stored in 16 bits, cast to float32 in the graph (ONNX Runtime folds the casts at load).</summary>
        private string Half(HalfPrecisionLayer half, string name, string x)
        {
            var g = Graph;
            string at = name.Length == 0 ? "model" : name;
            string Cast(string value) => g.Node("Cast", at, [value], new Dictionary<string, object> { ["to"] = (long)TensorProto.Types.DataType.Float });
            switch (half.Inner)
            {
                case Linear linear:
                {
                    using var wt = linear.weight!.detach().t().contiguous();
                    string y = g.Node("MatMul", at, [x, Cast(g.Constant($"{at}.weight_t", wt))]);
                    return linear.bias is null ? y : g.Node("Add", at, [y, Cast(g.Constant($"{at}.bias", linear.bias))]);
                }

                case Conv2d conv:
                    return Conv(at, x, conv, Cast(g.Constant($"{at}.weight", conv.weight!)), conv.bias is null ? null : Cast(g.Constant($"{at}.bias", conv.bias)), Display(name));
                default:
                    // Other inner modules (BatchNorm, blocks) run on float32 copies of their weights.
                    return Emit(half.Inner, Child(name, "inner"), x);
            }
        }

        private string QuantizedLinear(string at, string x, QuantizedLinear layer)
        {
            var g = Graph;
            var m = layer.Matrix;
            var a = layer.Activations;
            if (m.InputScales is not null)
            {
                // AWQ's explicit scales: the levels stand for W·diag(s), so the input is divided by s first, as the layer does.
                x = g.Node("Div", at, [x, g.Constant($"{at}.input_channel_scale", m.InputScales, m.K)]);
            }

            string y;
            if (a.Mode is ActivationMode.PerRow or ActivationMode.PerTensor && m.Bits == 8 && m.GroupSize == 0 && options.Int8Form == OnnxInt8Form.Integer)
            {
                // x → uint8 (one range per call) · int8 weights → int32 → float × (x scale · weight scales).
                var q = g.NodeWithOutputs("DynamicQuantizeLinear", at, [x], 3);
                string wt = WeightLevels(at, m, transpose: true);
                string product = g.Node("MatMulInteger", at, [q[0], wt, q[2]]);
                string asFloat = g.Node("Cast", at, [product], new Dictionary<string, object> { ["to"] = (long)TensorProto.Types.DataType.Float });
                y = g.Node("Mul", at, [g.Node("Mul", at, [asFloat, q[1]]), g.Constant($"{at}.weight_scale", m.Scales, m.Scales.Length == 1 ? [] : [m.N])]);
            }
            else if (m.Bits == 4 && m.GroupSize >= 16 && (m.GroupSize & (m.GroupSize - 1)) == 0 && a.Mode == ActivationMode.PerBlock)
            {
                y = MatMulNBits(at, x, m);
            }
            else if (m.ZeroPoints is not null)
            {
                // HQQ's asymmetric weights outside MatMulNBits: DequantizeLinear takes integer zero points only, so the
                // weight the levels, scales and zero points stand for is stored as float.
                using var dequantized = tensor(m.Dequantize(), [m.N, m.K]).t().contiguous();
                y = g.Node("MatMul", at, [RoundRows(at, x, a, m), g.Constant($"{at}.weight_t", dequantized)]);
            }
            else
            {
                y = g.Node("MatMul", at, [RoundRows(at, x, a, m), DequantizedWeight(at, m, transpose: true)]);
            }

            if (m.Bias is not null)
            {
                y = g.Node("Add", at, [y, g.Constant($"{at}.bias", m.Bias, m.N)]);
            }

            return layer.FusedRelu ? g.Node("Relu", at, [y]) : y;
        }

        /// <summary>
        /// A quantized embedding: its levels as an int8 (or, at 4 bits, int4) initializer behind a DequantizeLinear —
        /// per-row scales on axis 0, or per-group scales in blocks along the embedding dimension (opset 21's
        /// <c>block_size</c>) — and a Gather of the token ids' rows. The file keeps the table's integer size; ONNX
        /// Runtime may fold the dequantized table to float when it loads the model.
        /// </summary>
        private string QuantizedEmbedding(string at, string x, QuantizedEmbedding layer) =>
            Graph.Node("Gather", at, [DequantizedWeight(at, layer.ToMatrix(), transpose: false), x], new Dictionary<string, object> { ["axis"] = 0L });

        private string QuantizedConv(string at, string x, QuantizedConv2d layer)
        {
            var g = Graph;
            var m = layer.Matrix;
            var a = layer.Activations;
            var shape = layer.Shape;
            long[] weightShape = [m.N, shape.InChannels, shape.KernelSize[0], shape.KernelSize[1]];
            var geometry = new Dictionary<string, object>
            {
                ["kernel_shape"] = shape.KernelSize,
                ["strides"] = shape.Stride,
                ["pads"] = new[] { shape.Padding[0], shape.Padding[1], shape.Padding[0], shape.Padding[1] },
                ["dilations"] = shape.Dilation,
            };
            if (a.Mode is ActivationMode.PerRow or ActivationMode.PerBlock)
            {
                // The library rounds each im2col row (one output pixel's C·kh·kw inputs, or groups of them): build
                // those rows with a one-hot convolution, round them, and apply the weight as a 1×1 convolution.
                long k = m.K;
                var oneHot = new byte[k * k];
                for (long i = 0; i < k; i++)
                {
                    oneHot[(i * k) + i] = 1;
                }

                // Stored as bytes (a quarter of float32's size) and cast once; ONNX Runtime folds the cast at load.
                string selector = g.Node("Cast", at, [g.Initializer($"{at}.im2col", TensorProto.Types.DataType.Uint8, oneHot, k, shape.InChannels, shape.KernelSize[0], shape.KernelSize[1])], new Dictionary<string, object> { ["to"] = (long)TensorProto.Types.DataType.Float });
                string patches = g.Node("Conv", at, [x, selector], geometry);
                string rows = g.Node("Transpose", at, [patches], new Dictionary<string, object> { ["perm"] = new long[] { 0, 2, 3, 1 } });
                string rounded = g.Node("Transpose", at, [RoundRows(at, rows, a, m)], new Dictionary<string, object> { ["perm"] = new long[] { 0, 3, 1, 2 } });
                string pointwise = g.Node("Reshape", at, [DequantizedWeight(at, m, transpose: false), g.Int64s($"{at}.weight_shape", m.N, k, 1, 1)]);
                var pointwiseInputs = new List<string> { rounded, pointwise };
                if (m.Bias is not null)
                {
                    pointwiseInputs.Add(g.Constant($"{at}.bias", m.Bias, m.N));
                }

                string result = g.Node("Conv", at, pointwiseInputs, new Dictionary<string, object> { ["kernel_shape"] = new long[] { 1, 1 } });
                return layer.FusedRelu ? g.Node("Relu", at, [result]) : result;
            }

            string input = Activations(at, x, a);
            // Per-channel: DequantizeLinear straight into the Conv, the pattern ONNX Runtime fuses into its integer
            // convolution. Per-group scales run along C·kh·kw: dequantize [N, C·kh·kw], then shape it for the Conv.
            string dq = m.GroupSize == 0
                ? DequantizedWeight(at, m, transpose: false, weightShape)
                : g.Node("Reshape", at, [DequantizedWeight(at, m, transpose: false), g.Int64s($"{at}.weight_shape", weightShape)]);
            var inputs = new List<string> { input, dq };
            if (m.Bias is not null)
            {
                inputs.Add(g.Constant($"{at}.bias", m.Bias, m.N));
            }

            string y = g.Node("Conv", at, inputs, geometry);
            return layer.FusedRelu ? g.Node("Relu", at, [y]) : y;
        }

        /// <summary>
        /// The layer's input as ONNX Runtime should see it: the calibrated range (static); one range per batch
        /// (dynamic per tensor, <c>DynamicQuantizeLinear</c>); and float for ranges per row or per weight group, which
        /// ONNX has no operator for: there the library's 7-bit rounding of each row is the only difference.
        /// </summary>
        private string Activations(string at, string x, ActivationSettings a) => a.Mode switch
        {
            ActivationMode.Static => StaticQdq(at, x, a),
            ActivationMode.PerTensor => DynamicQdq(at, x),
            _ => x,
        };

        /// <summary>
        /// The library's run-time rounding of activations, step for step in float: the range of each group of values
        /// along <paramref name="axis"/> (widened to hold 0), mapped onto the 7-bit levels 0..127 (or ±63 around 64
        /// when symmetric), rounded half to even, and mapped back. ONNX has no operator for ranges per row or per
        /// block, so this is how an exported per-row or per-group layer computes what the library's kernel does.
        /// </summary>
        private string RuntimeRounding(string at, string x, int axis, bool symmetric)
        {
            var g = Graph;
            var axes = g.Int64s($"{at}.range_axes", axis);
            string min = g.Node("ReduceMin", at, [x, axes], new Dictionary<string, object> { ["keepdims"] = 1L });
            string max = g.Node("ReduceMax", at, [x, axes], new Dictionary<string, object> { ["keepdims"] = 1L });
            string scale, zero;
            if (symmetric)
            {
                string magnitude = g.Node("Max", at, [g.Node("Abs", at, [min]), g.Node("Abs", at, [max])]);
                scale = g.Node("Max", at, [g.Node("Div", at, [magnitude, Scalar($"{at}.levels", 63)]), Scalar($"{at}.tiny", 1e-30f)]);
                zero = Scalar($"{at}.zero", 64);
            }
            else
            {
                string lo = g.Node("Min", at, [min, Scalar($"{at}.zero_floor", 0)]);
                string hi = g.Node("Max", at, [max, Scalar($"{at}.zero_ceiling", 0)]);
                scale = g.Node("Max", at, [g.Node("Div", at, [g.Node("Sub", at, [hi, lo]), Scalar($"{at}.levels", 127)]), Scalar($"{at}.tiny", 1e-30f)]);
                zero = Clip127(at, g.Node("Round", at, [g.Node("Div", at, [g.Node("Neg", at, [lo]), scale])]));
            }

            string inverse = g.Node("Reciprocal", at, [scale]);
            string q = g.Node("Round", at, [Clip127(at, g.Node("Add", at, [g.Node("Mul", at, [x, inverse]), zero]))]);
            return g.Node("Mul", at, [g.Node("Sub", at, [q, zero]), scale]);
        }

        private string Clip127(string at, string x) => Graph.Node("Clip", at, [x, Scalar($"{at}.level_min", 0), Scalar($"{at}.level_max", 127)]);

        /// <summary>Rounds a Linear layer's input [rows, K] as the library does: per row, or per weight group along K.</summary>
        private string RoundRows(string at, string x, ActivationSettings a, QuantizedMatrix m)
        {
            if (a.Mode == ActivationMode.PerRow || (a.Mode == ActivationMode.PerBlock && m.GroupSize == 0))
            {
                return RuntimeRounding(at, x, -1, a.Symmetric);
            }

            if (a.Mode != ActivationMode.PerBlock)
            {
                return Activations(at, x, a);
            }

            // Per group of G inputs: pad K to whole groups with zeros (a zero never changes a range that holds 0),
            // view as [rows, groups, G], round each group, and take the K inputs back.
            var g = Graph;
            int groups = m.GroupsPerRow;
            long padded = (long)groups * m.GroupSize;
            string input = padded == m.K ? x : g.Node("Pad", at, [x, g.Int64s($"{at}.pads", 0, padded - m.K), string.Empty, g.Int64s($"{at}.pad_axes", -1)]);
            string blocks = g.Node("Reshape", at, [input, g.Int64s($"{at}.block_shape", -1, groups, m.GroupSize)]);
            string rounded = g.Node("Reshape", at, [RuntimeRounding(at, blocks, -1, a.Symmetric), g.Node("Shape", at, [input])]);
            return padded == m.K ? rounded : g.Node("Slice", at, [rounded, g.Int64s($"{at}.slice_start", 0), g.Int64s($"{at}.slice_end", m.K), g.Int64s($"{at}.slice_axes", -1)]);
        }

        /// <summary>
        /// The calibrated range as the library's kernel applies it: clip to the 7-bit levels 0..127 around the zero
        /// point, then quantize and dequantize with the layer's scale and zero point.
        /// </summary>
        private string StaticQdq(string at, string x, ActivationSettings a)
        {
            var g = Graph;
            string clipped = g.Node("Clip", at, [x, Scalar($"{at}.input_min", (0 - a.ZeroPoint) * a.Scale), Scalar($"{at}.input_max", (127 - a.ZeroPoint) * a.Scale)]);
            string scale = Scalar($"{at}.input_scale", a.Scale);
            string zero = g.Initializer($"{at}.input_zero_point", TensorProto.Types.DataType.Uint8, [(byte)a.ZeroPoint]);
            string q = g.Node("QuantizeLinear", at, [clipped, scale, zero]);
            return g.Node("DequantizeLinear", at, [q, scale, zero]);
        }

        private string DynamicQdq(string at, string x)
        {
            var q = Graph.NodeWithOutputs("DynamicQuantizeLinear", at, [x], 3);
            return Graph.Node("DequantizeLinear", at, [q[0], q[1], q[2]]);
        }

        /// <summary>The weight levels as int8 [K, N] (transposed for MatMul), [N, K], or <paramref name="shape"/> (rows of N first).</summary>
        private string WeightLevels(string at, QuantizedMatrix m, bool transpose, long[]? shape = null)
        {
            using var levels = tensor(m.Q, shape ?? [m.N, m.K]);
            using var laid = transpose ? levels.t().contiguous() : levels.alias();
            return Graph.Constant($"{at}.weight_q", laid);
        }

        /// <summary>
        /// A 4-bit weight-only layer as ONNX Runtime's <c>com.microsoft.MatMulNBits</c> (measured fastest for int4 in
        /// ONNX Runtime 1.31): weights [N, blocks, block/2] as unsigned nibbles around the default zero point 8, one
        /// scale per block (and HQQ's zero points, as floats); accuracy level 4 quantizes the input to int8 per block, as
        /// the library's kernel does.
        /// </summary>
        private string MatMulNBits(string at, string x, QuantizedMatrix m)
        {
            int groups = m.GroupsPerRow;
            int blob = m.GroupSize / 2;
            var packed = new byte[(long)m.N * groups * blob];
            for (int n = 0; n < m.N; n++)
            {
                for (int k = 0; k < m.K; k++)
                {
                    long at4 = ((long)n * groups * m.GroupSize) + k;
                    int nibble = m.Q[(n * m.K) + k] + 8;
                    packed[at4 >> 1] |= (byte)((at4 & 1) == 0 ? nibble : nibble << 4);
                }

                // Inputs past K (the last block's padding) take the zero point 8: weight 0.
                for (long k = m.K; k < (long)groups * m.GroupSize; k++)
                {
                    long at4 = ((long)n * groups * m.GroupSize) + k;
                    packed[at4 >> 1] |= (byte)((at4 & 1) == 0 ? 8 : 8 << 4);
                }
            }

            var g = Graph;
            string weight = g.Initializer($"{at}.weight_q4", TensorProto.Types.DataType.Uint8, packed, m.N, groups, blob);
            string scales = g.Constant($"{at}.weight_scale", m.Scales, (long)m.N * groups);
            string[] inputs = [x, weight, scales];
            if (m.ZeroPoints is not null)
            {
                // HQQ's zero points, as floats in the unsigned nibbles' terms (level + 8).
                inputs = [.. inputs, g.Constant($"{at}.weight_zero_point", [.. m.ZeroPoints.Select(z => z + 8)], (long)m.N * groups)];
            }

            return g.NodeWithOutputs("MatMulNBits", at, inputs, 1, new Dictionary<string, object>
            {
                ["K"] = (long)m.K,
                ["N"] = (long)m.N,
                ["bits"] = 4L,
                ["block_size"] = (long)m.GroupSize,
                ["accuracy_level"] = 4L,
            }, "com.microsoft")[0];
        }

        /// <summary>
        /// DequantizeLinear of the weight as [K, N] (<paramref name="transpose"/>, for MatMul), [N, K], or a convolution's
        /// [N, C, kh, kw] (<paramref name="shape"/>, per-tensor or per-channel scales only): int8 with
        /// per-tensor or per-output scales, or int4 (int8 for other widths) in blocks along K.
        /// </summary>
        private string DequantizedWeight(string at, QuantizedMatrix m, bool transpose, long[]? shape = null)
        {
            var g = Graph;
            long outputAxis = transpose ? 1 : 0;
            if (m.GroupSize == 0)
            {
                string w = WeightLevels(at, m, transpose, shape);
                return m.Scales.Length == 1
                    ? g.Node("DequantizeLinear", at, [w, Scalar($"{at}.weight_scale", m.Scales[0])])
                    : g.Node("DequantizeLinear", at, [w, g.Constant($"{at}.weight_scale", m.Scales, m.N)], new Dictionary<string, object> { ["axis"] = outputAxis });
            }

            // Blocked along K: scales [N, groups] for an [N, K] weight, [groups, N] for [K, N].
            int groups = m.GroupsPerRow;
            var scales = new float[groups * m.N];
            for (int n = 0; n < m.N; n++)
            {
                for (int b = 0; b < groups; b++)
                {
                    scales[transpose ? (b * m.N) + n : (n * groups) + b] = m.Scales[(n * groups) + b];
                }
            }

            string weight;
            if (m.Bits == 4)
            {
                // INT4 raw data: two per byte, the first element in the low nibble, row-major.
                var packed = new byte[(((long)m.K * m.N) + 1) / 2];
                long i = 0;
                int rows = transpose ? m.K : m.N, columns = transpose ? m.N : m.K;
                for (int r = 0; r < rows; r++)
                {
                    for (int c = 0; c < columns; c++, i++)
                    {
                        int nibble = m.Q[transpose ? (c * m.K) + r : (r * m.K) + c] & 0x0F;
                        packed[i >> 1] |= (byte)((i & 1) == 0 ? nibble : nibble << 4);
                    }
                }

                weight = g.Initializer($"{at}.weight_q4", TensorProto.Types.DataType.Int4, packed, rows, columns);
            }
            else
            {
                weight = WeightLevels(at, m, transpose);
            }

            long[] scaleDims = transpose ? [groups, m.N] : [m.N, groups];
            return g.Node("DequantizeLinear", at, [weight, g.Constant($"{at}.weight_scale", scales, scaleDims)], new Dictionary<string, object>
            {
                ["axis"] = transpose ? 0L : 1L,
                ["block_size"] = (long)m.GroupSize,
            });
        }
    }
}
