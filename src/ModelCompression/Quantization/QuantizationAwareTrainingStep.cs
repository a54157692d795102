using Microsoft.Extensions.Logging;
using ModelCompression.Data;
using ModelCompression.Distillation;
using ModelCompression.Modules;
using ModelCompression.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Quantization;

/// <summary>How closely the converted model follows the fake-quantized model it came from, on the evaluation data.</summary>
/// <param name="Samples">The samples compared.</param>
/// <param name="Agreement">The fraction whose predicted class (argmax) is the same.</param>
/// <param name="MaxLogitDifference">The largest absolute difference of any output.</param>
public sealed record QuantizationConversionCheck(long Samples, double Agreement, double MaxLogitDifference);

/// <summary>
/// Quantization-aware training: wraps the selected Linear and Conv2d layers in <see cref="FakeQuantLayer"/>s
/// (weights at 1–8 bits, activations at the kernel's 7-bit levels, BatchNorm folded), trains with the pipeline's
/// trainer (straight-through gradients; observers, then BatchNorm statistics, frozen after set epochs; optionally
/// learned step sizes and distillation from the original model), then converts every layer to the same
/// <see cref="QuantizedLinear"/> / <see cref="QuantizedConv2d"/> layers and kernel that post-training quantization
/// produces.
/// </summary>
public sealed class QuantizationAwareTrainingStep : ICompressionStep, ICompressionStepRequirements
{
    /// <summary>The base name of the step in reports.</summary>
    public const string StepName = "QuantizationAwareTraining";

    private const int CalibrationBatches = 8;
    private const int CalibrationBatchSize = 128;

    private readonly QuantizationAwareTrainingOptions _options;

    /// <summary>Initializes a new instance of the <see cref="QuantizationAwareTrainingStep"/> class.</summary>
    /// <param name="options">The options; copied.</param>
    /// <exception cref="OptionsValidationException">The options are invalid (every error listed).</exception>
    public QuantizationAwareTrainingStep(QuantizationAwareTrainingOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        OptionsValidationException.ThrowIfInvalid(typeof(QuantizationAwareTrainingOptions), options.Validate());
        _options = options.Clone();
    }

    /// <inheritdoc/>
    public string Name =>
        $"{StepName}(w{_options.WeightBits}{(_options.LayerWeightBits.Count > 0 ? $" ({string.Join(", ", _options.LayerWeightBits.Select(p => $"{p.Key} w{p.Value}"))})" : string.Empty)}" +
        $"{(_options.QuantizeActivations ? ", a7" : ", weight-only")}{(_options.LearnedStepSize ? ", LSQ" : string.Empty)})";

    /// <inheritdoc/>
    public bool RequiresTrainingData => true;

    /// <summary>Gets the agreement between the fake-quantized and the converted model in the last run, or <see langword="null"/>.</summary>
    public QuantizationConversionCheck? LastConversion { get; private set; }

    /// <inheritdoc/>
    /// <exception cref="ArgumentException">
    /// The selection names an unknown layer or selects none that can be quantized, a per-layer bit width names a
    /// layer that is not selected, or a selected layer holds NaN or infinite values. Nothing has changed.
    /// </exception>
    /// <exception cref="InvalidOperationException">There is no training data.</exception>
    public nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(context);
        var (targets, leftInFloat) = QuantizationTargets.Select(model, _options.Layers);
        if (targets.Count == 0)
        {
            throw new ArgumentException($"The layer selection ({_options.Layers}) selects no layer that can be quantized{(leftInFloat.Count > 0 ? $": {string.Join(", ", leftInFloat)}" : string.Empty)}.", nameof(model));
        }

        var names = targets.Select(t => t.Name).ToHashSet(StringComparer.Ordinal);
        var stray = _options.LayerWeightBits.Keys.FirstOrDefault(k => !names.Contains(k));
        if (stray is not null)
        {
            throw new ArgumentException($"{nameof(QuantizationAwareTrainingOptions.LayerWeightBits)} names '{stray}', which is not a selected layer.", nameof(model));
        }

        foreach (var target in targets)
        {
            QuantizationTargets.ThrowIfNotFinite(target);
        }

        if (context.TrainingData is null)
        {
            throw new InvalidOperationException($"Step '{Name}' trains and needs training data.");
        }

        var root = Prepare(model, targets, context);
        var fake = root.modules().OfType<FakeQuantLayer>().ToList();
        Calibrate(root, fake, context);
        var callbacks = new TrainingCallbacks
        {
            AfterEpoch = (epoch, _) =>
            {
                foreach (var layer in fake)
                {
                    layer.ObserverEnabled &= epoch + 1 < _options.ObserverEpochs;
                    layer.BatchNormFrozen |= _options.FreezeBatchNormAfterEpoch is { } freeze && epoch + 1 >= freeze;
                }
            },
        };
        context.Train(root, _options.Training, callbacks.WithDistillation(_options.Distillation, context.OriginalModel));
        foreach (var layer in fake)
        {
            layer.ObserverEnabled = false;
            layer.BatchNormFrozen = true;
        }

        root.eval();
        using var before = Outputs(root, context);
        root = Convert(root);
        using var after = Outputs(root, context);
        LastConversion = Compare(before, after);
        context.AddNote(
            $"{fake.Count} layer(s) trained and converted ({string.Join(", ", targets.Select(t => $"{t.Name} w{_options.BitsFor(t.Name)}"))}); " +
            $"converted vs fake-quantized: {LastConversion.Agreement:P2} same predictions, max output difference {LastConversion.MaxLogitDifference:0.####}");
        if (leftInFloat.Count > 0)
        {
            context.AddNote($"left in float (unsupported): {string.Join(", ", leftInFloat)}");
        }

        return root;
    }

    /// <summary>Replaces every <see cref="FakeQuantLayer"/> in <paramref name="model"/> by the quantized layer it stands for.</summary>
    /// <param name="model">A model prepared for quantization-aware training.</param>
    /// <returns>The root of the converted model (the same module unless the root itself is replaced).</returns>
    public static nn.Module<Tensor, Tensor> Convert(nn.Module<Tensor, Tensor> model)
    {
        ArgumentNullException.ThrowIfNull(model);
        var root = model;
        foreach (var (name, module) in model.named_modules().Where(m => m.module is FakeQuantLayer).ToList())
        {
            var layer = (FakeQuantLayer)module;
            root = ModuleTree.Replace(root, name, layer.Convert());
            layer.Dispose();
        }

        return root;
    }

    private nn.Module<Tensor, Tensor> Prepare(nn.Module<Tensor, Tensor> model, IReadOnlyList<Target> targets, CompressionContext context)
    {
        var structure = _options.FoldBatchNorm ? QuantizationTargets.FollowingLayers(model, targets) : [];
        var root = model;
        foreach (var target in targets)
        {
            nn.Module<Tensor, Tensor>? batchNorm = null;
            if (structure.TryGetValue(target.Name, out var next) && next.BatchNorm is { } bn)
            {
                batchNorm = (nn.Module<Tensor, Tensor>)ModuleTree.GetSubmodule(root, bn);
                root = ModuleTree.Replace(root, bn, nn.Identity());
            }

            int bits = _options.BitsFor(target.Name);
            var layer = new FakeQuantLayer(target.Module, batchNorm, bits, _options.GranularityFor(bits), _options.QuantizeActivations, _options.LearnedStepSize);
            layer.BatchNormFrozen = _options.FreezeBatchNormAfterEpoch == 0;
            layer.ObserverEnabled = _options.ObserverEpochs > 0;
            root = ModuleTree.Replace(root, target.Name, layer);
            context.Logger.LogDebug("{Layer}: {Fake}", target.Name, layer);
        }

        return root;
    }

    /// <summary>
    /// Sets every activation range (and learned step size) from a few training batches before training starts, so
    /// training begins from calibrated ranges — and with zero epochs the step is post-training quantization at
    /// the same bit widths.
    /// </summary>
    private static void Calibrate(nn.Module<Tensor, Tensor> root, IReadOnlyList<FakeQuantLayer> fake, CompressionContext context)
    {
        foreach (var layer in fake)
        {
            layer.Calibrating = true;
        }

        try
        {
            QuantizationTargets.RunCalibrationBatches(root, context.TrainingData!, CalibrationBatches, CalibrationBatchSize, context);
        }
        finally
        {
            foreach (var layer in fake)
            {
                layer.Calibrating = false;
            }
        }
    }

    /// <summary>The model's outputs on the evaluation data, [samples, outputs], on the CPU.</summary>
    private static Tensor Outputs(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        var outputs = new List<Tensor>();
        try
        {
            EvaluationLoop.Run(model, context.EvaluationData, 256, context.CancellationToken, (_, output, _) =>
                outputs.Add(output.to(ScalarType.Float32).cpu().reshape(output.shape[0], -1).DetachFromDisposeScope()));
            return cat(outputs, 0);
        }
        finally
        {
            foreach (var t in outputs)
            {
                t.Dispose();
            }
        }
    }

    private static QuantizationConversionCheck Compare(Tensor before, Tensor after)
    {
        using var scope = NewDisposeScope();
        long samples = before.shape[0];
        double agreement = (before.argmax(1) == after.argmax(1)).to(ScalarType.Float64).mean().item<double>();
        double difference = (before - after).abs().max().item<float>();
        return new QuantizationConversionCheck(samples, agreement, difference);
    }
}
