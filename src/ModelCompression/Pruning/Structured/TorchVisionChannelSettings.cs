using System.Reflection;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Pruning;

/// <summary>
/// Channel counts that TorchVision's modules keep in private fields besides their layers, brought in line after
/// structured pruning changes the layers, or a file's layers replace those of the architecture given to <c>CompressedModel.Load</c>: TorchVision 0.107.0's <c>SqueezeExcitation</c> (MobileNetV3's) checks its input
/// against an <c>input_channels</c> field, which must follow its <c>fc1</c> when the block's channels are pruned.
/// </summary>
/// <remarks>
/// TorchVision is not a dependency of the library, so the type is recognised by its full name in the assembly named
/// <c>TorchVision</c>. A later TorchVision without the field is refused before anything changes, never half-pruned.
/// </remarks>
internal static class TorchVisionChannelSettings
{
    private const string SqueezeExcitation = "TorchSharp.torchvision+SqueezeExcitation";

    /// <summary>Throws when the model holds a TorchVision block whose channel field this class cannot find.</summary>
    public static void Check(nn.Module root)
    {
        foreach (var (name, module) in root.named_modules())
        {
            if (IsSqueezeExcitation(module) && InputChannels(module) is null)
            {
                throw new UnsupportedModelException(
                    name,
                    module.GetType().Name,
                    $"Structured pruning cannot prune through the SqueezeExcitation at '{name}': it has no Int64 field 'input_channels' (TorchVision 0.107.0's), " +
                    $"which must follow its channels. Nothing has been changed. Exclude the layers whose channels reach it from {nameof(StructuredPruningOptions)}.{nameof(StructuredPruningOptions.Layers)}.");
            }
        }
    }

    /// <summary>Sets each block's channel field from its layers, after they were rebuilt.</summary>
    public static void Synchronize(nn.Module root)
    {
        foreach (var (_, module) in root.named_modules())
        {
            if (IsSqueezeExcitation(module) && InputChannels(module) is { } field
                && module.named_children().FirstOrDefault(c => c.name == "fc1").module is Conv2d fc1)
            {
                field.SetValue(module, fc1.in_channels);
            }
        }
    }

    private static bool IsSqueezeExcitation(nn.Module module)
    {
        var type = module.GetType();
        return type.FullName == SqueezeExcitation && type.Assembly.GetName().Name == "TorchVision";
    }

    private static FieldInfo? InputChannels(nn.Module module) =>
        module.GetType().GetField("input_channels", BindingFlags.Instance | BindingFlags.NonPublic | BindingFlags.Public) is { } f && f.FieldType == typeof(long) ? f : null;
}
