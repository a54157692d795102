using ModelCompression.Data;
using ModelCompression.Metrics;
using ModelCompression.Modules;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Quantization;

/// <summary>A layer a quantization step converts.</summary>
internal sealed record Target(string Name, nn.Module<Tensor, Tensor> Module);

/// <summary>The BatchNorm and ReLU that directly follow a layer in a Sequential, by dotted name.</summary>
internal sealed record Following(string? BatchNorm, string? Relu);

/// <summary>Which layers the quantization steps convert, checked the same way by both.</summary>
internal static class QuantizationTargets
{
    /// <summary>Why an Embedding stays in float under quantization-aware training.</summary>
    public const string EmbeddingInTraining = "Embedding: use post-training weight-only int8/int4; quantization-aware training leaves lookups in float";

    /// <summary>
    /// The selected Linear and Conv2d layers the kernel can run (and the selected Embeddings, unless
    /// <paramref name="whyEmbeddingStaysFloat"/> says why not), and the selected layers it cannot (with why). With
    /// <paramref name="fixedTypes"/>, the layers the kernel could run but a quantized layer cannot replace go there
    /// (name → why) instead of into the left-in-float list, so that the caller can apply its <see cref="FixedTypeLayers"/> choice.
    /// With <paramref name="inPlace"/>, the selected native modules whose weights <see cref="InPlaceQuantization"/> rounds go there.
    /// </summary>
    public static (List<Target> Targets, List<string> LeftInFloat) Select(
        nn.Module<Tensor, Tensor> model,
        LayerSelection selection,
        Dictionary<string, string>? fixedTypes = null,
        string? whyEmbeddingStaysFloat = EmbeddingInTraining,
        List<(string Name, nn.Module Module)>? inPlace = null)
    {
        selection.ThrowIfUnknownNames(model);
        var targets = new List<Target>();
        var left = new List<string>();
        foreach (var (name, module) in selection.Select(model))
        {
            if (ModuleTree.HasAncestor<ICompressedLayer>(model, name) || module is ICompressedLayer)
            {
                continue;
            }

            if (inPlace is not null && InPlaceQuantization.IsInPlaceKind(module))
            {
                inPlace.Add((name, module));
                continue;
            }

            string? why = module switch
            {
                Linear => null,
                Conv2d conv => QuantizedConv2d.WhyUnsupported(conv),
                Embedding => whyEmbeddingStaysFloat,
                _ => $"{module.GetType().Name} has no quantized kernel",
            };
            var replacement = ReplacementType(module);
            if (why is null && fixedTypes is not null && ModuleTree.WhyCannotReplace(model, name, replacement) is { } cannot)
            {
                fixedTypes[name] = cannot;
                continue;
            }

            why ??= ModuleTree.WhyCannotReplace(model, name, replacement);
            if (why is null)
            {
                targets.Add(new Target(name, (nn.Module<Tensor, Tensor>)module));
            }
            else
            {
                left.Add($"{name} ({why})");
            }
        }

        return (targets, left);
    }

    /// <summary>The quantized layer type that replaces a float layer (a QuantizedConv2d fits wherever a QuantizedLinear does).</summary>
    public static Type ReplacementType(nn.Module module) => module is Embedding ? typeof(QuantizedEmbedding) : typeof(QuantizedLinear);

    /// <summary>Throws, naming the layer, when any of its parameters holds NaN or infinity.</summary>
    public static void ThrowIfNotFinite(Target target)
    {
        using var scope = NewDisposeScope();
        foreach (var (name, parameter) in target.Module.named_parameters())
        {
            if (!isfinite(parameter).all().item<bool>())
            {
                throw new ArgumentException($"Layer '{target.Name}' has NaN or infinite values in its {name}; nothing was quantized.", "model");
            }
        }
    }

    /// <summary>For each target directly inside a Sequential: the BatchNorm and ReLU that follow it there.</summary>
    public static Dictionary<string, Following> FollowingLayers(nn.Module<Tensor, Tensor> model, IReadOnlyList<Target> targets)
    {
        var result = new Dictionary<string, Following>(StringComparer.Ordinal);
        var containers = new List<(string Prefix, nn.Module Module)> { (string.Empty, model) };
        containers.AddRange(model.named_modules().Select(m => ($"{m.name}.", m.module)));
        var wanted = targets.ToDictionary(t => t.Name, t => t.Module, StringComparer.Ordinal);
        foreach (var (prefix, container) in containers)
        {
            if (container is not Sequential)
            {
                continue;
            }

            var children = container.named_children().Select(c => (Name: prefix + c.name, c.module)).ToList();
            for (int i = 0; i < children.Count; i++)
            {
                if (!wanted.TryGetValue(children[i].Name, out var layer))
                {
                    continue;
                }

                string? bn = null, relu = null;
                int j = i + 1;
                if (j < children.Count && IsMatchingBatchNorm(layer, children[j].module))
                {
                    bn = children[j].Name;
                    j++;
                }

                if (j < children.Count && children[j].module is ReLU)
                {
                    relu = children[j].Name;
                }

                result[children[i].Name] = new Following(bn, relu);
            }
        }

        return result;
    }

    /// <summary>
    /// Runs up to <paramref name="batches"/> shuffled batches (the step's seed) of <paramref name="data"/> through the
    /// model in evaluation mode without gradients, its mode restored after; <paramref name="afterBatch"/> gets the
    /// number of batches run so far.
    /// </summary>
    public static void RunCalibrationBatches(nn.Module<Tensor, Tensor> model, IBatchSource data, int batches, int batchSize, CompressionContext context, Action<int>? afterBatch = null, Action<Tensor, Tensor>? beforeBatch = null)
    {
        using var modes = ModuleModes.Evaluating(model);
        using var noGrad = no_grad();
        int seen = 0;
        foreach (var (input, target) in data.ScopedBatches(batchSize, shuffle: true, seed: context.StepSeed))
        {
            if (seen == batches)
            {
                break;
            }

            context.CancellationToken.ThrowIfCancellationRequested();
            beforeBatch?.Invoke(input, target);
            model.call(input.to(context.Device));
            seen++;
            afterBatch?.Invoke(seen);
        }
    }

    private static bool IsMatchingBatchNorm(nn.Module layer, nn.Module next) => (layer, next) switch
    {
        (Conv2d conv, BatchNorm2d bn) => bn.running_mean is not null && bn.running_mean.shape[0] == conv.out_channels,
        (Linear linear, BatchNorm1d bn) => bn.running_mean is not null && bn.running_mean.shape[0] == linear.out_features,
        _ => false,
    };
}

/// <summary>Folding an evaluation-mode BatchNorm into the Conv2d or Linear before it, shared by both quantization steps.</summary>
internal static class BatchNormFolding
{
    /// <summary>
    /// w' = w · γ/√(σ²+ε) per output channel and b' = (b − μ) · γ/√(σ²+ε) + β, from the running statistics: the
    /// layer followed by the BatchNorm in evaluation mode, exactly. Differentiable in w, b, γ and β.
    /// </summary>
    public static (Tensor Weight, Tensor Bias) Folded(nn.Module layer, nn.Module batchNorm)
    {
        var (mean, variance, gamma, beta, eps) = batchNorm switch
        {
            BatchNorm2d b => (b.running_mean!, b.running_var!, b.weight, b.bias, b.eps),
            BatchNorm1d b => (b.running_mean!, b.running_var!, b.weight, b.bias, b.eps),
            _ => throw new ArgumentException($"Cannot fold a {batchNorm.GetType().Name}.", nameof(batchNorm)),
        };
        var (weight, bias) = WeightAndBias(layer);
        using var epsilon = eps.ToScalar();
        var factor = (gamma ?? ones_like(variance)) / variance.Plus(epsilon).sqrt();
        var shape = Enumerable.Repeat(1L, (int)weight.dim()).ToArray();
        shape[0] = -1;
        var foldedWeight = weight * factor.reshape(shape).to(weight.dtype);
        var foldedBias = (((bias ?? zeros_like(mean)) - mean) * factor).Plus(beta ?? zeros_like(mean));
        return (foldedWeight, foldedBias.to(weight.dtype));
    }

    /// <summary>Folds <paramref name="batchNorm"/> into <paramref name="layer"/>'s parameters in place (adding a bias if it had none).</summary>
    public static void FoldInto(nn.Module<Tensor, Tensor> layer, nn.Module batchNorm)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var (weight, bias) = WeightAndBias(layer);
        var (foldedWeight, foldedBias) = Folded(layer, batchNorm);
        weight.copy_(foldedWeight);
        if (bias is not null)
        {
            bias.copy_(foldedBias);
        }
        else if (layer is Conv2d conv)
        {
            conv.bias = new Parameter(foldedBias.DetachFromDisposeScope(), requires_grad: false);
        }
        else
        {
            ((Linear)layer).bias = new Parameter(foldedBias.DetachFromDisposeScope(), requires_grad: false);
        }
    }

    /// <summary>The weight and bias of a Conv2d or Linear.</summary>
    public static (Tensor Weight, Tensor? Bias) WeightAndBias(nn.Module layer) => layer switch
    {
        Conv2d c => (c.weight!, c.bias),
        Linear l => (l.weight!, l.bias),
        _ => throw new ArgumentException($"Cannot fold a BatchNorm into a {layer.GetType().Name}.", nameof(layer)),
    };
}
