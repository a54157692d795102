using Microsoft.Extensions.Logging;
using ModelCompression.Distillation;
using ModelCompression.Modules;
using ModelCompression.Training;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Architecture;

/// <summary>Options of <see cref="DepthwiseSeparableRewriteStep"/>.</summary>
public sealed class DepthwiseSeparableRewriteOptions : IValidatableOptions
{
    /// <summary>Gets or sets the convolutions rewritten; only Conv2d layers with a kernel larger than 1 and groups = 1 qualify.</summary>
    /// <value>The default is every Conv2d layer.</value>
    public LayerSelection Layers { get; set; } = LayerSelection.OfType<Conv2d>();

    /// <summary>Gets or sets the recovery training after the rewrite, or <see langword="null"/> for none.</summary>
    public TrainingOptions? Recovery { get; set; }

    /// <summary>Gets or sets distillation from the original model during recovery, or <see langword="null"/> to train on the labels.</summary>
    /// <value>The default is α 0.7, T 4.</value>
    public RecoveryDistillation? Distillation { get; set; } = new();

    /// <inheritdoc/>
    public IReadOnlyList<string> Validate()
    {
        const string Name = nameof(DepthwiseSeparableRewriteOptions);
        var errors = new List<string>();
        OptionsValidationException.AddNested(errors, Name, nameof(Layers), Layers?.Validate());
        OptionsValidationException.AddNested(errors, Name, nameof(Recovery), Recovery?.Validate(), required: false);
        OptionsValidationException.AddNested(errors, Name, nameof(Distillation), Distillation?.Validate(), required: false);
        return errors;
    }

    internal DepthwiseSeparableRewriteOptions Clone() => new()
    {
        Layers = Layers.Copy(),
        Recovery = Recovery?.Clone(),
        Distillation = RecoveryDistillation.Copy(Distillation),
    };
}

/// <summary>
/// Rewrites standard convolutions as depthwise-separable ones (a k×k depthwise then a 1×1 pointwise convolution),
/// initialised from a rank-1 fit per input channel: for input channel i, the out × k² slice of the kernel is
/// approximated by its leading singular pair, the spatial factor becoming the depthwise filter and the channel factor
/// the pointwise column. Then, optionally, recovers by training with distillation from the original model.
/// </summary>
public sealed class DepthwiseSeparableRewriteStep : ICompressionStep, ICompressionStepRequirements
{
    /// <summary>The name of the step in reports.</summary>
    public const string StepName = "DepthwiseSeparableRewrite";

    private readonly DepthwiseSeparableRewriteOptions _options;

    /// <summary>Initializes a new instance of the <see cref="DepthwiseSeparableRewriteStep"/> class.</summary>
    /// <param name="options">The options; copied.</param>
    /// <exception cref="OptionsValidationException">The options are invalid.</exception>
    public DepthwiseSeparableRewriteStep(DepthwiseSeparableRewriteOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        OptionsValidationException.ThrowIfInvalid(typeof(DepthwiseSeparableRewriteOptions), options.Validate());
        _options = options.Clone();
    }

    /// <inheritdoc/>
    public string Name => _options.Recovery is null ? StepName : $"{StepName}(+{_options.Recovery.Epochs} epochs recovery{(_options.Distillation is null ? string.Empty : ", distilled")})";

    /// <inheritdoc/>
    public bool RequiresTrainingData => _options.Recovery is not null;

    /// <summary>Gets the relative Frobenius error of the rank-1 kernel fit of each rewritten layer in the last <see cref="Apply"/>.</summary>
    public IReadOnlyDictionary<string, double> LastKernelErrors { get; private set; } = new Dictionary<string, double>();

    /// <inheritdoc/>
    /// <exception cref="ArgumentException">The selection names an unknown layer or selects no qualifying convolution.</exception>
    public nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(context);
        _options.Layers.ThrowIfUnknownNames(model);

        var targets = _options.Layers.Select(model)
            .Where(t => t.Module is Conv2d c && c.groups == 1 && (c.kernel_size[0] > 1 || c.kernel_size[1] > 1) && c.padding_type is null && c.padding_mode == PaddingModes.Zeros)
            .Select(t => (t.Name, Conv: (Conv2d)t.Module))
            .ToList();
        if (targets.Count == 0)
        {
            throw new ArgumentException($"The selection ({_options.Layers}) holds no Conv2d with a kernel larger than 1, groups = 1 and explicit zero padding.", nameof(model));
        }

        foreach (var (name, _) in targets)
        {
            if (ModuleTree.WhyCannotReplace(model, name, typeof(DepthwiseSeparableConv2d)) is { } why)
            {
                throw new ArgumentException($"Cannot rewrite '{name}': {why}.", nameof(model));
            }
        }

        var root = model;
        var errors = new Dictionary<string, double>();
        foreach (var (name, conv) in targets)
        {
            var (block, error) = Rewrite(conv);
            root = ModuleTree.Replace(root, name, block);
            conv.Dispose();
            errors[name] = error;
        }

        LastKernelErrors = errors;
        context.AddNote($"rank-1 kernel fit error before training: {string.Join(", ", errors.Select(e => $"{e.Key} {e.Value * 100:0.#}%"))}");
        context.Logger.LogInformation("{Step}: rewrote {Layers}", Name, string.Join(", ", errors.Keys));
        if (_options.Recovery is { } recovery)
        {
            context.Train(root, recovery, ((TrainingCallbacks?)null).WithDistillation(_options.Distillation, context.OriginalModel));
        }

        return root;
    }

    /// <summary>Builds the depthwise-separable equivalent of a convolution with the rank-1 initialisation, and the fit's relative error.</summary>
    internal static (DepthwiseSeparableConv2d Block, double RelativeError) Rewrite(Conv2d conv)
    {
        ArgumentNullException.ThrowIfNull(conv);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var w = conv.weight!.detach();
        long o = w.shape[0], i = w.shape[1], kh = w.shape[2], kw = w.shape[3];
        var slices = w.to(float64).cpu().permute(1, 0, 2, 3).reshape(i, o, kh * kw);   // [in, out, k²]
        var (u, s, vh) = linalg.svd(slices, fullMatrices: false);
        var root = s.select(1, 0).sqrt();                                                  // [in]
        var channel = u.select(2, 0) * root.unsqueeze(1);                                  // [in, out]
        var spatial = vh.select(1, 0) * root.unsqueeze(1);                                 // [in, k²]
        var rebuilt = channel.unsqueeze(2) * spatial.unsqueeze(1);                         // [in, out, k²]
        double error = Math.Sqrt((slices - rebuilt).square().sum().item<double>() / Math.Max(1e-300, slices.square().sum().item<double>()));

        var block = new DepthwiseSeparableConv2d(
            i, o, (kh, kw), (conv.stride[0], conv.stride[1]), (conv.padding![0], conv.padding![1]), (conv.dilation[0], conv.dilation[1]),
            batchNorm: false, activation: BlockActivation.None, pointwiseBias: conv.bias is not null);
        block.to(w.device, w.dtype);
        block.Depthwise.weight!.copy_(spatial.reshape(i, 1, kh, kw));
        block.Pointwise.weight!.copy_(channel.t().reshape(o, i, 1, 1));
        if (conv.bias is not null)
        {
            block.Pointwise.bias!.copy_(conv.bias);
        }

        block.train(conv.training);
        return (block, error);
    }
}
