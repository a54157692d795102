using ModelCompression.Interop.Onnx;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Scenarios;

/// <summary>One architecture of the zoo matrix: how to build it, what it eats, and which techniques it gets.</summary>
/// <param name="Name">The row name (torchvision's function name for torchvision models).</param>
/// <param name="Build">Builds the model with fresh random weights (the caller seeds the generator).</param>
/// <param name="SampleShape">One input sample's shape, without the batch dimension.</param>
/// <param name="Vocabulary">For token models, the number of token ids (inputs are int64 in [0, Vocabulary)); 0 for float inputs.</param>
/// <param name="Samples">Samples in each of the training and the test set.</param>
/// <param name="HasConv2d">Whether the model has standard k×k convolutions (where the depthwise-separable rewrite applies).</param>
/// <param name="CustomModules">Whether the model holds modules of its own kind, so loading its file needs the architecture.</param>
/// <param name="Techniques">The technique keys run on it; others that apply are "not run" (time), and said so.</param>
public sealed record ZooModelSpec(
    string Name,
    Func<nn.Module<Tensor, Tensor>> Build,
    long[] SampleShape,
    long Vocabulary,
    int Samples,
    bool HasConv2d,
    bool CustomModules,
    IReadOnlyList<string>? Techniques = null)
{
    /// <summary>Gets the ONNX emitters for the model's own module kinds, as a user of the exporter writes them.</summary>
    public IReadOnlyDictionary<Type, Func<OnnxGraph, nn.Module, string, string, string>> OnnxEmitters { get; init; } =
        new Dictionary<Type, Func<OnnxGraph, nn.Module, string, string, string>>();
}

/// <summary>The architectures of the zoo matrix: torchvision's models and a few TorchSharp-layer models of our own.</summary>
public static class ZooMatrixModels
{
    /// <summary>Number of classes of every model we build (mobilenet_v3_* take no argument and keep 1,000).</summary>
    public const int Classes = 10;

    private const long Vocabulary = 100;

    private const long TokenCount = 12;

    /// <summary>
    /// torchvision functions left out, with why. TorchVision 0.107.0 has no squeezenet, densenet, shufflenet_v2,
    /// efficientnet, mnasnet or regnet; the deeper members of families already in the matrix add time, not coverage.
    /// </summary>
    public static IReadOnlyList<(string Name, string Reason)> Skipped { get; } =
    [
        ("squeezenet, densenet*, shufflenet_v2_*, efficientnet_*, mnasnet*, regnet_*", "not in TorchVision 0.107.0"),
        ("resnet34, resnet101, resnet152", "same blocks as resnet18/resnet50, deeper: time only"),
        ("resnext101_32x8d, resnext101_64x4d, wide_resnet101_2", "same blocks as resnext50_32x4d/wide_resnet50_2, deeper: time only"),
        ("vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19, vgg19_bn", "same layers as vgg11/vgg11_bn, deeper; each has a 25088×4096 classifier (≥ 120M weights)"),
    ];

    /// <summary>Every row of the matrix, light models first.</summary>
    public static IReadOnlyList<ZooModelSpec> All { get; } =
    [
        new("gelu-layernorm-mlp", GeluMlp, [64], 0, 256, HasConv2d: false, CustomModules: false),
        new("conv1d", Conv1dNet, [8, 64], 0, 256, HasConv2d: false, CustomModules: false),
        new("lstm-classifier", () => new RecurrentClassifier(gru: false), [TokenCount], Vocabulary, 256, HasConv2d: false, CustomModules: true)
        {
            OnnxEmitters = new Dictionary<Type, Func<OnnxGraph, nn.Module, string, string, string>> { [typeof(RecurrentClassifier)] = RecurrentClassifier.Emit },
        },
        new("gru-classifier", () => new RecurrentClassifier(gru: true), [TokenCount], Vocabulary, 256, HasConv2d: false, CustomModules: true)
        {
            OnnxEmitters = new Dictionary<Type, Func<OnnxGraph, nn.Module, string, string, string>> { [typeof(RecurrentClassifier)] = RecurrentClassifier.Emit },
        },
        new("transformer-encoder", () => new EncoderClassifier(), [TokenCount], Vocabulary, 256, HasConv2d: false, CustomModules: true)
        {
            OnnxEmitters = new Dictionary<Type, Func<OnnxGraph, nn.Module, string, string, string>> { [typeof(EncoderClassifier)] = EncoderClassifier.Emit },
        },
        new("causal-decoder", () => new CausalDecoder(), [TokenCount], Vocabulary, 256, HasConv2d: false, CustomModules: true)
        {
            OnnxEmitters = new Dictionary<Type, Func<OnnxGraph, nn.Module, string, string, string>> { [typeof(CausalDecoder)] = CausalDecoder.Emit },
        },
        new("resnet18", () => torchvision.models.resnet18(num_classes: Classes), [3, 32, 32], 0, 64, HasConv2d: true, CustomModules: true, ["prune", "struct", "dyn8", "stat8", "int4", "fp16", "bf16", "svd", "cluster", "qat", "dwsep"]),
        new("mobilenet_v2", () => torchvision.models.mobilenet_v2(num_classes: Classes), [3, 32, 32], 0, 64, HasConv2d: true, CustomModules: true, ["struct", "stat8", "int4", "fp16", "dwsep"]),
        new("mobilenet_v3_small", () => torchvision.models.mobilenet_v3_small(), [3, 32, 32], 0, 64, HasConv2d: true, CustomModules: true, ["struct", "dyn8", "fp16", "cluster", "qat"]),
        new("mobilenet_v3_large", () => torchvision.models.mobilenet_v3_large(), [3, 32, 32], 0, 64, HasConv2d: true, CustomModules: true, ["prune", "dyn8", "bf16"]),
        new("googlenet", () => torchvision.models.googlenet(num_classes: Classes), [3, 64, 64], 0, 64, HasConv2d: true, CustomModules: true, ["struct", "dyn8", "fp16", "svd"]),
        new("inception_v3", () => torchvision.models.inception_v3(num_classes: Classes), [3, 80, 80], 0, 64, HasConv2d: true, CustomModules: true, ["stat8", "bf16"]),
        new("resnet50", () => torchvision.models.resnet50(num_classes: Classes), [3, 32, 32], 0, 64, HasConv2d: true, CustomModules: true, ["struct", "svd"]),
        new("resnext50_32x4d", () => torchvision.models.resnext50_32x4d(num_classes: Classes), [3, 32, 32], 0, 64, HasConv2d: true, CustomModules: true, ["stat8", "cluster"]),
        new("wide_resnet50_2", () => torchvision.models.wide_resnet50_2(num_classes: Classes), [3, 32, 32], 0, 64, HasConv2d: true, CustomModules: true, ["int4"]),
        new("alexnet", () => torchvision.models.alexnet(num_classes: Classes), [3, 64, 64], 0, 64, HasConv2d: true, CustomModules: true, ["prune", "dyn8"]),
        new("vgg11", () => torchvision.models.vgg11(num_classes: Classes), [3, 32, 32], 0, 64, HasConv2d: true, CustomModules: true, ["fp16"]),
        new("vgg11_bn", () => torchvision.models.vgg11_bn(num_classes: Classes), [3, 32, 32], 0, 64, HasConv2d: true, CustomModules: true, ["struct", "qat"]),
    ];

    private static nn.Module<Tensor, Tensor> GeluMlp() => nn.Sequential(
        nn.Linear(64, 128), nn.LayerNorm(128), nn.GELU(),
        nn.Linear(128, 128), nn.LayerNorm(128), nn.GELU(),
        nn.Linear(128, Classes));

    private static nn.Module<Tensor, Tensor> Conv1dNet() => nn.Sequential(
        nn.Conv1d(8, 32, 5, padding: 2), nn.ReLU(),
        nn.Conv1d(32, 32, 3, padding: 1), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        nn.Linear(32, Classes));

    /// <summary>Token ids → embedding → an LSTM or a GRU (batch first) → the last step's state → a linear head.</summary>
    private sealed class RecurrentClassifier : nn.Module<Tensor, Tensor>
    {
        private readonly Embedding embed = nn.Embedding(Vocabulary, 32);
        private readonly nn.Module? recurrent;
        private readonly nn.Module<Tensor, Tensor> head;
        private readonly bool gru;

        public RecurrentClassifier(bool gru)
            : base(gru ? "ZooGruClassifier" : "ZooLstmClassifier")
        {
            this.gru = gru;
            recurrent = gru ? nn.GRU(32, 48, numLayers: 2, batchFirst: true) : nn.LSTM(32, 48, batchFirst: true);
            head = nn.Linear(48, Classes);
            RegisterComponents();
        }

        public override Tensor forward(Tensor tokens)
        {
            using var scope = NewDisposeScope();
            var embedded = embed.call(tokens);
            var output = gru ? ((GRU)recurrent!).call(embedded).Item1 : ((LSTM)recurrent!).call(embedded).Item1;
            return head.call(output.select(1, -1)).MoveToOuterDisposeScope();
        }

        /// <summary>The ONNX form of <see cref="forward"/>: the children through the exporter, the recurrent layer through OnnxEmitters.Recurrent.</summary>
        public static string Emit(OnnxGraph graph, nn.Module module, string name, string input)
        {
            var children = module.named_children().ToDictionary(c => c.name, c => c.module);
            string embedded = graph.Emit(children["embed"], Join(name, "embed"), input);
            var sequence = ModelCompression.Interop.Onnx.OnnxEmitters.Recurrent(graph, children["recurrent"], Join(name, "recurrent"), embedded).Output;
            string last = graph.Node("Gather", Join(name, "last"), [sequence, graph.Int64s(Join(name, "last_index"), -1)], new Dictionary<string, object> { ["axis"] = 1L });
            last = graph.Node("Squeeze", Join(name, "last"), [last, graph.Int64s(Join(name, "last_axis"), 1)]);
            return graph.Emit(children["head"], Join(name, "head"), last);
        }
    }

    /// <summary>Token ids → embedding → TorchSharp's native TransformerEncoder (sequence first) → mean over tokens → a linear head.</summary>
    private sealed class EncoderClassifier : nn.Module<Tensor, Tensor>
    {
        private readonly Embedding embed = nn.Embedding(Vocabulary, 32);
        private readonly TransformerEncoder encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, 0.0), 2);
        private readonly nn.Module<Tensor, Tensor> head = nn.Linear(32, Classes);

        public EncoderClassifier()
            : base("ZooEncoderClassifier") => RegisterComponents();

        public override Tensor forward(Tensor tokens)
        {
            using var scope = NewDisposeScope();
            var encoded = encoder.call(embed.call(tokens).transpose(0, 1));
            return head.call(encoded.mean([0])).MoveToOuterDisposeScope();
        }

        /// <summary>The ONNX form of <see cref="forward"/>.</summary>
        public static string Emit(OnnxGraph graph, nn.Module module, string name, string input)
        {
            var children = module.named_children().ToDictionary(c => c.name, c => c.module);
            string x = graph.Emit(children["embed"], Join(name, "embed"), input);
            x = graph.Node("Transpose", Join(name, "to_sequence_first"), [x], new Dictionary<string, object> { ["perm"] = new long[] { 1, 0, 2 } });
            x = graph.Emit(children["encoder"], Join(name, "encoder"), x);
            x = graph.Node("ReduceMean", Join(name, "mean"), [x, graph.Int64s(Join(name, "mean_axes"), 0)], new Dictionary<string, object> { ["keepdims"] = 0L });
            return graph.Emit(children["head"], Join(name, "head"), x);
        }
    }

    /// <summary>
    /// A GPT-style decoder: token and position embeddings, two pre-norm blocks of causal self-attention (TorchSharp's
    /// MultiheadAttention with an upper-triangular -inf mask built in forward) and a GELU MLP, then the last token's logits.
    /// </summary>
    private sealed class CausalDecoder : nn.Module<Tensor, Tensor>
    {
        private readonly Embedding tokens = nn.Embedding(Vocabulary, 32);
        private readonly Embedding positions = nn.Embedding(TokenCount, 32);
        private readonly ModuleList<DecoderBlock> blocks = nn.ModuleList(new DecoderBlock(), new DecoderBlock());
        private readonly LayerNorm norm = nn.LayerNorm(32);
        private readonly nn.Module<Tensor, Tensor> head = nn.Linear(32, Classes);

        public CausalDecoder()
            : base("ZooCausalDecoder") => RegisterComponents();

        public override Tensor forward(Tensor ids)
        {
            using var scope = NewDisposeScope();
            long length = ids.shape[1];
            var x = tokens.call(ids) + positions.call(arange(length, device: ids.device));
            x = x.transpose(0, 1);
            var mask = triu(full(length, length, float.NegativeInfinity, device: ids.device), 1);
            foreach (var block in blocks)
            {
                x = block.Run(x, mask);
            }

            return head.call(norm.call(x[-1])).MoveToOuterDisposeScope();
        }

        /// <summary>The ONNX form of <see cref="forward"/>: positions as a Range over the input's length, attention through OnnxEmitters.SelfAttention with the causal mask.</summary>
        public static string Emit(OnnxGraph graph, nn.Module module, string name, string input)
        {
            var children = module.named_children().ToDictionary(c => c.name, c => c.module);
            string Child(string child, string x) => graph.Emit(children[child], Join(name, child), x);
            string length = graph.Node("Squeeze", Join(name, "length"), [
                graph.Node("Slice", Join(name, "length"), [graph.Node("Shape", Join(name, "length"), [input]), graph.Int64s(Join(name, "one"), 1), graph.Int64s(Join(name, "two"), 2)])]);
            string Scalar(string what, long value) => graph.Node("Squeeze", Join(name, what), [graph.Int64s(Join(name, what), value)]);
            string positions = graph.Node("Range", Join(name, "positions"), [Scalar("start", 0), length, Scalar("step", 1)]);
            string x = graph.Node("Add", Join(name, "embed"), [Child("tokens", input), Child("positions", positions)]);
            x = graph.Node("Transpose", Join(name, "to_sequence_first"), [x], new Dictionary<string, object> { ["perm"] = new long[] { 1, 0, 2 } });
            foreach (var (index, block) in children["blocks"].named_children())
            {
                x = DecoderBlock.Emit(graph, block, Join(name, $"blocks.{index}"), x);
            }

            string last = graph.Node("Gather", Join(name, "last"), [x, graph.Int64s(Join(name, "last_index"), [-1])], new Dictionary<string, object> { ["axis"] = 0L });
            last = graph.Node("Squeeze", Join(name, "last"), [last, graph.Int64s(Join(name, "last_axis"), 0)]);
            return Child("head", Child("norm", last));
        }
    }

    /// <summary>One pre-norm decoder block: a module of our own, so loading the model's file takes the architecture.</summary>
    private sealed class DecoderBlock : nn.Module<Tensor, Tensor>
    {
        private readonly LayerNorm norm1 = nn.LayerNorm(32);
        private readonly MultiheadAttention attention = nn.MultiheadAttention(32, 4);
        private readonly LayerNorm norm2 = nn.LayerNorm(32);
        private readonly nn.Module<Tensor, Tensor> up = nn.Linear(32, 128);
        private readonly GELU gelu = nn.GELU();
        private readonly nn.Module<Tensor, Tensor> down = nn.Linear(128, 32);

        public DecoderBlock()
            : base("ZooDecoderBlock") => RegisterComponents();

        /// <summary>Without a mask, attention is not causal: the model always calls <see cref="Run"/>.</summary>
        public override Tensor forward(Tensor input) => Run(input, null);

        public Tensor Run(Tensor x, Tensor? mask)
        {
            var normed = norm1.call(x);
            x = x + attention.call(normed, normed, normed, null, false, mask).Item1;
            return x + down.call(gelu.call(up.call(norm2.call(x))));
        }

        /// <summary>The ONNX form of <see cref="Run"/> with the causal mask.</summary>
        public static string Emit(OnnxGraph graph, nn.Module module, string name, string x)
        {
            var children = module.named_children().ToDictionary(c => c.name, c => c.module);
            string Child(string child, string value) => graph.Emit(children[child], Join(name, child), value);
            string attended = ModelCompression.Interop.Onnx.OnnxEmitters.SelfAttention(graph, (MultiheadAttention)children["attention"], Join(name, "attention"), Child("norm1", x), causal: true);
            x = graph.Node("Add", Join(name, "residual1"), [x, attended]);
            string mlp = Child("down", Child("gelu", Child("up", Child("norm2", x))));
            return graph.Node("Add", Join(name, "residual2"), [x, mlp]);
        }
    }

    private static string Join(string parent, string child) => parent.Length == 0 ? child : $"{parent}.{child}";
}
