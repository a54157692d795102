using System.Reflection;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Interop.Onnx;

/// <summary>
/// The forwards of TorchVision 0.107.0's architectures (<c>torchvision.models</c>: AlexNet, VGG, ResNet and its
/// ResNeXt/wide variants, MobileNetV2, MobileNetV3, GoogLeNet, Inception v3) and of their blocks, written as ONNX. Each
/// emitter reads the module's children by the names TorchVision registers and writes the operations its forward does
/// between them (flattening, residual additions, branch concatenations, functional pools), so a compressed child is
/// written as whatever it has become.
/// </summary>
/// <remarks>
/// TorchVision is not a dependency of this package: the types are recognised by their full names in the assembly
/// named <c>TorchVision</c>. Two settings are private fields of TorchVision's modules (an inverted residual block's
/// <c>use_res_connect</c> and the Inception models' <c>transform_input</c>), read by reflection: when a later TorchVision
/// renames them, export stops with an <see cref="UnsupportedModelException"/> naming the block instead of writing a
/// wrong graph, and the parity tests (pinned to TorchVision 0.107.0) show it.
/// </remarks>
internal static class TorchVisionEmitters
{
    private const string Assembly = "TorchVision";

    /// <summary><c>torch.flatten(x, 1)</c> between children.</summary>
    private static readonly Func<OnnxGraph, string, string, string> Flatten = (g, name, x) =>
        g.Node("Flatten", $"{At(name)}.flatten", [x], new Dictionary<string, object> { ["axis"] = 1L });

    /// <summary><c>adaptive_avg_pool2d(x, 1)</c> between children.</summary>
    private static readonly Func<OnnxGraph, string, string, string> GlobalAveragePool = (g, name, x) => g.Node("GlobalAveragePool", $"{At(name)}.pool", [x]);

    private static readonly Dictionary<string, Func<OnnxGraph, nn.Module, string, string, string>> ByTypeName = new(StringComparer.Ordinal)
    {
        ["TorchSharp.Modules.AlexNet"] = (g, m, name, x) => Chain(g, m, name, x, "features", "avgpool", Flatten, "classifier"),
        ["TorchSharp.Modules.VGG"] = (g, m, name, x) => Chain(g, m, name, x, "features", "avgpool", Flatten, "classifier"),
        ["TorchSharp.Modules.ResNet"] = (g, m, name, x) =>
            Chain(g, m, name, x, "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "flatten", "fc"),
        ["TorchSharp.Modules.ResNet+BasicBlock"] = (g, m, name, x) => ResidualBlock(g, m, name, x, "conv1", "bn1", "relu1", "conv2", "bn2"),
        ["TorchSharp.Modules.ResNet+Bottleneck"] = (g, m, name, x) =>
            ResidualBlock(g, m, name, x, "conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "conv3", "bn3"),
        ["TorchSharp.Modules.MobileNetV2"] = (g, m, name, x) => Chain(g, m, name, x, "features", GlobalAveragePool, Flatten, "classifier"),
        ["TorchSharp.Modules.MobileNetV2+InvertedResidual"] = (g, m, name, x) => InvertedResidual(g, m, name, x, "conv"),
        ["TorchSharp.Modules.MobileNetV3"] = (g, m, name, x) => Chain(g, m, name, x, "features", "avgpool", Flatten, "classifier"),
        ["TorchSharp.Modules.MobileNetV3+InvertedResidual"] = (g, m, name, x) => InvertedResidual(g, m, name, x, "block"),
        ["TorchSharp.torchvision+SqueezeExcitation"] = (g, m, name, x) =>
            g.Node("Mul", At(name), [Chain(g, m, name, x, "avgpool", "fc1", "activation", "fc2", "scale_activation"), x]),
        ["TorchSharp.Modules.GoogleNet"] = (g, m, name, x) => Chain(g, m, name, TransformInput(g, m, name, x),
            "conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
            "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4", "inception5a", "inception5b",
            "avgpool", Flatten, "dropout", "fc"),
        ["TorchSharp.Modules.GoogleNet+Inception"] = (g, m, name, x) => Concat(g, name,
            Chain(g, m, name, x, "branch1"), Chain(g, m, name, x, "branch2"), Chain(g, m, name, x, "branch3"), Chain(g, m, name, x, "branch4")),
        ["TorchSharp.Modules.InceptionV3"] = (g, m, name, x) => Chain(g, m, name, TransformInput(g, m, name, x),
            "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2",
            "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
            "avgpool", "dropout", Flatten, "fc"),
        ["TorchSharp.Modules.InceptionV3+InceptionA"] = (g, m, name, x) => Concat(g, name,
            Chain(g, m, name, x, "branch1x1"),
            Chain(g, m, name, x, "branch5x5_1", "branch5x5_2"),
            Chain(g, m, name, x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
            Chain(g, m, name, AveragePool3x3(g, name, x), "branch_pool")),
        ["TorchSharp.Modules.InceptionV3+InceptionB"] = (g, m, name, x) => Concat(g, name,
            Chain(g, m, name, x, "branch3x3"),
            Chain(g, m, name, x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
            MaxPool3x3Stride2(g, name, x)),
        ["TorchSharp.Modules.InceptionV3+InceptionC"] = (g, m, name, x) => Concat(g, name,
            Chain(g, m, name, x, "branch1x1"),
            Chain(g, m, name, x, "branch7x7_1", "branch7x7_2", "branch7x7_3"),
            Chain(g, m, name, x, "branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5"),
            Chain(g, m, name, AveragePool3x3(g, name, x), "branch_pool")),
        ["TorchSharp.Modules.InceptionV3+InceptionD"] = (g, m, name, x) => Concat(g, name,
            Chain(g, m, name, x, "branch3x3_1", "branch3x3_2"),
            Chain(g, m, name, x, "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"),
            MaxPool3x3Stride2(g, name, x)),
        ["TorchSharp.Modules.InceptionV3+InceptionE"] = (g, m, name, x) =>
        {
            string pair = Chain(g, m, name, x, "branch3x3_1");
            string doubled = Chain(g, m, name, x, "branch3x3dbl_1", "branch3x3dbl_2");
            return Concat(g, name,
                Chain(g, m, name, x, "branch1x1"),
                Concat(g, $"{name}.branch3x3", Chain(g, m, name, pair, "branch3x3_2a"), Chain(g, m, name, pair, "branch3x3_2b")),
                Concat(g, $"{name}.branch3x3dbl", Chain(g, m, name, doubled, "branch3x3dbl_3a"), Chain(g, m, name, doubled, "branch3x3dbl_3b")),
                Chain(g, m, name, AveragePool3x3(g, name, x), "branch_pool"));
        },
    };

    /// <summary>Finds the emitter of one of TorchVision's modules.</summary>
    /// <param name="module">The module.</param>
    /// <param name="emitter">Its emitter, when it is one of TorchVision's.</param>
    /// <returns>Whether the module is one of TorchVision's that this class writes.</returns>
    public static bool TryGet(nn.Module module, out Func<OnnxGraph, nn.Module, string, string, string> emitter)
    {
        var type = module.GetType();
        emitter = null!;
        return type.Assembly.GetName().Name == Assembly && type.FullName is { } fullName && ByTypeName.TryGetValue(fullName, out emitter!);
    }

    private static string At(string name) => name.Length == 0 ? "model" : name;

    private static string Join(string parent, string child) => parent.Length == 0 ? child : $"{parent}.{child}";

    /// <summary>Runs the steps in order, each on the previous result: a string is a child's name, a function an operation between children.</summary>
    private static string Chain(OnnxGraph g, nn.Module module, string name, string x, params object[] steps)
    {
        Dictionary<string, nn.Module>? children = null;
        foreach (var step in steps)
        {
            if (step is string childName)
            {
                children ??= module.named_children().ToDictionary(c => c.name, c => c.module, StringComparer.Ordinal);
                if (!children.TryGetValue(childName, out var child))
                {
                    throw new UnsupportedModelException(name, module.GetType().Name,
                        $"The {module.GetType().Name} at {Display(name)} has no child '{childName}', which TorchVision 0.107.0's forward calls; this TorchVision is not one the exporter knows.");
                }

                x = g.Emit(child, Join(name, childName), x);
            }
            else
            {
                x = ((Func<OnnxGraph, string, string, string>)step)(g, name, x);
            }
        }

        return x;
    }

    private static string Display(string name) => name.Length == 0 ? "the root" : $"'{name}'";

    /// <summary>ResNet's blocks: the main path, the input (through <c>downsample</c> when there is one) added, then ReLU.</summary>
    private static string ResidualBlock(OnnxGraph g, nn.Module module, string name, string x, params string[] path)
    {
        string main = Chain(g, module, name, x, [.. path]);
        bool downsamples = module.named_children().Any(c => c.name == "downsample");
        string identity = downsamples ? Chain(g, module, name, x, "downsample") : x;
        return g.Node("Relu", $"{At(name)}.relu", [g.Node("Add", $"{At(name)}.add", [main, identity])]);
    }

    /// <summary>MobileNet's inverted residual: the block, plus its input when the block keeps the shape.</summary>
    private static string InvertedResidual(OnnxGraph g, nn.Module module, string name, string x, string body)
    {
        string y = Chain(g, module, name, x, body);
        return PrivateField<bool>(module, name, "use_res_connect") ? g.Node("Add", $"{At(name)}.add", [x, y]) : y;
    }

    /// <summary>
    /// GoogLeNet's and Inception v3's <c>transform_input</c>: each channel c becomes x·s_c + t_c, re-normalising from
    /// ImageNet's statistics to [-1, 1] (off unless the model was built with it).
    /// </summary>
    private static string TransformInput(OnnxGraph g, nn.Module module, string name, string x)
    {
        if (!PrivateField<bool>(module, name, "transform_input"))
        {
            return x;
        }

        // The factors as TorchVision computes them, in float32.
        float[] scale = [0.229f / 0.5f, 0.224f / 0.5f, 0.225f / 0.5f];
        float[] shift = [(0.485f - 0.5f) / 0.5f, (0.456f - 0.5f) / 0.5f, (0.406f - 0.5f) / 0.5f];
        string at = $"{At(name)}.transform_input";
        using var scales = tensor(scale).reshape(3, 1, 1);
        using var shifts = tensor(shift).reshape(3, 1, 1);
        return g.Node("Add", at, [g.Node("Mul", at, [x, g.Constant($"{at}.scale", scales)]), g.Constant($"{at}.shift", shifts)]);
    }

    private static string Concat(OnnxGraph g, string name, params string[] parts) =>
        g.Node("Concat", $"{At(name)}.cat", parts, new Dictionary<string, object> { ["axis"] = 1L });

    /// <summary><c>avg_pool2d(x, 3, stride: 1, padding: 1)</c>, padding counted (PyTorch's default).</summary>
    private static string AveragePool3x3(OnnxGraph g, string name, string x) =>
        g.Node("AveragePool", $"{At(name)}.avg_pool", [x], new Dictionary<string, object>
        {
            ["kernel_shape"] = new long[] { 3, 3 },
            ["strides"] = new long[] { 1, 1 },
            ["pads"] = new long[] { 1, 1, 1, 1 },
            ["count_include_pad"] = 1L,
        });

    /// <summary><c>max_pool2d(x, 3, stride: 2)</c>.</summary>
    private static string MaxPool3x3Stride2(OnnxGraph g, string name, string x) =>
        g.Node("MaxPool", $"{At(name)}.max_pool", [x], new Dictionary<string, object>
        {
            ["kernel_shape"] = new long[] { 3, 3 },
            ["strides"] = new long[] { 2, 2 },
        });

    private static T PrivateField<T>(nn.Module module, string name, string field)
    {
        var info = module.GetType().GetField(field, BindingFlags.Instance | BindingFlags.NonPublic | BindingFlags.Public);
        if (info is null || info.FieldType != typeof(T))
        {
            throw new UnsupportedModelException(name, module.GetType().Name,
                $"The {module.GetType().Name} at {Display(name)} has no {typeof(T).Name} field '{field}', which TorchVision 0.107.0's forward reads; " +
                "this TorchVision is not one the exporter knows. Register an emitter for the type in OnnxExportOptions.CustomModules.");
        }

        return (T)info.GetValue(module)!;
    }
}
