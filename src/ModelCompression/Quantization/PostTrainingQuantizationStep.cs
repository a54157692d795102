using System.Runtime.InteropServices;
using Microsoft.Extensions.Logging;
using ModelCompression.Data;
using ModelCompression.Metrics;
using ModelCompression.Modules;
using ModelCompression.Quantization.Gptq;
using ModelCompression.Quantization.Kernels;
using ModelCompression.Quantization.Scaling;
using ModelCompression.Training;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Quantization;

/// <summary>
/// Post-training quantization: replaces the selected Linear and Conv2d layers with <see cref="QuantizedLinear"/> /
/// <see cref="QuantizedConv2d"/> layers holding int8 or int4 weights and running on the library's integer kernel —
/// dynamic (activations ranged per call), static (ranges calibrated by an observer; BatchNorm folded, ReLU fused)
/// or weight-only — or converts them to float16/bfloat16. Measures each layer's SQNR and, with
/// <see cref="PostTrainingQuantizationOptions.Fallback"/>, keeps the most sensitive layers in float.
/// </summary>
/// <remarks>
/// Selected Embedding layers (add <c>typeof(Embedding)</c> to <see cref="LayerSelection.Types"/>) become
/// <see cref="QuantizedEmbedding"/> tables in the weight-only modes, with the options' granularity; their SQNR is the
/// table's, and <see cref="PostTrainingQuantizationOptions.KeepFloatWhenSlower"/> does not time them (a lookup has
/// no float kernel to beat). The dynamic and static modes leave them in float, as PyTorch does, and say so in the report.
/// </remarks>
public sealed class PostTrainingQuantizationStep : ICompressionStep
{
    /// <summary>The base name of the step in reports.</summary>
    public const string StepName = "PostTrainingQuantization";

    private readonly PostTrainingQuantizationOptions _options;

    /// <summary>Initializes a new instance of the <see cref="PostTrainingQuantizationStep"/> class.</summary>
    /// <param name="options">The options; copied.</param>
    /// <exception cref="OptionsValidationException">The options are invalid (every error listed).</exception>
    public PostTrainingQuantizationStep(PostTrainingQuantizationOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        OptionsValidationException.ThrowIfInvalid(typeof(PostTrainingQuantizationOptions), options.Validate());
        _options = options.Clone();
    }

    /// <inheritdoc/>
    public string Name => _options.Mode switch
    {
        QuantizationMode.DynamicInt8 => $"{StepName}(dynamic int8)",
        QuantizationMode.StaticInt8 => $"{StepName}(static int8, {_options.Observer})",
        QuantizationMode.WeightOnlyInt8 => $"{StepName}(weight-only int8, {_options.EffectiveGranularity})",
        QuantizationMode.WeightOnlyInt4 => $"{StepName}(weight-only int4, {_options.EffectiveGranularity})",
        QuantizationMode.Float16 => $"{StepName}(fp16)",
        _ => $"{StepName}(bf16)",
    };

    /// <inheritdoc/>
    /// <exception cref="ArgumentException">
    /// The selection names an unknown layer or selects none; a selected layer's weight or bias, or a calibration
    /// activation, is NaN or infinite (the message names the layer). Nothing has changed.
    /// </exception>
    /// <exception cref="InvalidOperationException">Static quantization found no calibration data.</exception>
    /// <exception cref="UnsupportedModelException">
    /// <see cref="PostTrainingQuantizationOptions.FixedTypeLayers"/> is <see cref="FixedTypeLayers.Fail"/> and a selected layer cannot be replaced. Nothing has changed.
    /// </exception>
    public nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(context);
        if (!_options.IsInteger)
        {
            var format = _options.Mode == QuantizationMode.Float16 ? HalfPrecisionFormat.Float16 : HalfPrecisionFormat.BFloat16;
            return new HalfPrecisionStep(new HalfPrecisionOptions { Format = format, Layers = _options.Layers, FixedTypeLayers = _options.FixedTypeLayers })
                .Apply(model, context);
        }

        var fixedTypes = new Dictionary<string, string>(StringComparer.Ordinal);
        string? whyEmbeddingStaysFloat = _options.Mode switch
        {
            QuantizationMode.DynamicInt8 => "Embedding: use weight-only int8/int4; dynamic quantization leaves lookups in float, as PyTorch does",
            QuantizationMode.StaticInt8 => "Embedding: use weight-only int8/int4; static quantization leaves lookups in float, as PyTorch does",
            _ => null,
        };
        var native = new List<(string Name, nn.Module Module)>();
        var (targets, leftInFloat) = QuantizationTargets.Select(model, _options.Layers, fixedTypes, whyEmbeddingStaysFloat, native);
        if (_options.FixedTypeLayers == FixedTypeLayers.Fail)
        {
            // Raises the UnsupportedModelException, naming every such layer, before anything changes.
            FixedTypeLayerPolicy.Find(
                model,
                fixedTypes.Keys.Select(n => (n, QuantizationTargets.ReplacementType(ModuleTree.GetSubmodule(model, n)))),
                FixedTypeLayers.Fail,
                Name,
                nameof(PostTrainingQuantizationOptions));
            if (native.Count > 0)
            {
                throw new UnsupportedModelException(
                    native[0].Name,
                    native[0].Module.GetType().Name,
                    $"Step '{Name}' has no quantized layer for {string.Join(", ", native.Select(n => $"'{n.Name}' ({n.Module.GetType().Name})"))}: " +
                    $"no integer kernel here runs their kinds (TorchSharp's native modules are sealed), so they run in float. Nothing was changed. Set {nameof(PostTrainingQuantizationOptions)}." +
                    $"{nameof(FixedTypeLayers)} to {nameof(FixedTypeLayers.CompressInPlace)} (weights rounded to integer levels in place) or " +
                    $"{nameof(FixedTypeLayers.Skip)}, or leave them out of the layer selection.");
            }
        }

        // Layers no quantized layer can replace: with CompressInPlace their weights are rounded to integer levels in place.
        bool inPlace = _options.FixedTypeLayers == FixedTypeLayers.CompressInPlace;
        var rounded = inPlace
            ? [.. native, .. fixedTypes.Keys.Select(n => (Name: n, Module: ModuleTree.GetSubmodule(model, n)))]
            : new List<(string Name, nn.Module Module)>();
        if (targets.Count == 0 && rounded.Count == 0)
        {
            if (_options.Layers.Include.Count > 0 && fixedTypes.Count == 0 && native.Count == 0)
            {
                throw new ArgumentException($"The layer selection ({_options.Layers}) selects no layer that can be quantized: {string.Join(", ", leftInFloat)}.", nameof(model));
            }

            context.AddNote($"no layer to quantize ({_options.Layers}){(leftInFloat.Count > 0 ? $"; left in float: {string.Join(", ", leftInFloat)}" : string.Empty)}");
            ReportLeftAlone(fixedTypes, native, context);
            return model;
        }

        // Every check that can fail runs before the first change.
        foreach (var target in targets)
        {
            QuantizationTargets.ThrowIfNotFinite(target);
        }

        foreach (var (name, module) in rounded)
        {
            InPlaceQuantization.ThrowIfNotFinite(name, module);
        }

        if (!inPlace)
        {
            ReportLeftAlone(fixedTypes, native, context);
        }

        if (targets.Count == 0)
        {
            RoundInPlace(rounded, fixedTypes, context);
            return model;
        }

        using var scope = NewDisposeScope();
        var structure = _options.FoldBatchNorm || _options.FuseRelu ? QuantizationTargets.FollowingLayers(model, targets) : [];
        // Scales folded into the LayerNorms before anything is observed or rounded (the float model computes the same;
        // AWQ's explicit scales stay beside it until rounding, and only its clipping search changes float weights).
        var inputScales = new Dictionary<string, float[]>(StringComparer.Ordinal);
        if (_options.Awq is { } awq)
        {
            (var notes, inputScales) = LayerNormScaling.Awq(model, targets, _options, awq, context);
            notes.ForEach(note => context.AddNote($"AWQ: {note}"));
        }

        if (_options.SmoothQuant is { } smooth)
        {
            LayerNormScaling.SmoothQuant(model, targets, _options, smooth, context).ForEach(note => context.AddNote($"SmoothQuant: {note}"));
        }

        var calibration = Calibrate(model, targets, context);
        try
        {
            if (_options.Mode == QuantizationMode.StaticInt8)
            {
                // A layer the model never calls on the calibration data (Inception's auxiliary head, used only in
                // training, or a branch the data never takes) has no activation range: it stays in float, said out loud.
                var uncalled = targets.Where(t => t.Module is not Embedding && !calibration.Ranges.ContainsKey(t.Name)).ToList();
                if (uncalled.Count == targets.Count(t => t.Module is not Embedding) && uncalled.Count > 0)
                {
                    throw new ArgumentException(
                        $"No layer to quantize was called on the calibration data ({string.Join(", ", uncalled.Select(t => t.Name))}), so no activation range is known. " +
                        "Are the layers called through call(), and does the model's forward use them?",
                        nameof(model));
                }

                if (uncalled.Count > 0)
                {
                    context.AddNote($"left in float (never called on the calibration data, so no activation range): {string.Join(", ", uncalled.Select(t => t.Name))}");
                    targets = [.. targets.Except(uncalled)];
                }
            }

            var result = Convert(model, targets, leftInFloat, structure, calibration, inputScales, context);
            RoundInPlace(rounded, fixedTypes, context);
            return result;
        }
        finally
        {
            foreach (var input in calibration.Inputs.Values)
            {
                input.Dispose();
            }
        }
    }

    /// <summary>Rounds the weights of the layers no quantized layer can replace to the step's integer levels, in place, and says so.</summary>
    private void RoundInPlace(List<(string Name, nn.Module Module)> layers, Dictionary<string, string> fixedTypes, CompressionContext context)
    {
        if (layers.Count == 0)
        {
            return;
        }

        int bits = _options.Mode == QuantizationMode.WeightOnlyInt4 ? 4 : 8;
        int group = WeightGrid.StorableGroup(_options.EffectiveGranularity is PerGroupGranularity g ? g.Size : 0);
        var described = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var (name, module) in layers)
        {
            context.CancellationToken.ThrowIfCancellationRequested();
            long weights = InPlaceQuantization.Round(module, bits, group);
            described[name] = fixedTypes.TryGetValue(name, out var why)
                ? $"{why}; {weights:N0} weights"
                : InPlaceQuantization.IsNativeKind(module)
                    ? $"{module.GetType().Name}, TorchSharp's native module, sealed; {weights:N0} weights"
                    : $"{module.GetType().Name}, no integer kernel for its kind; {weights:N0} weights";
        }

        string grid = group == 0 ? "a scale per row" : $"a scale per group of {group}";
        FixedTypeLayerPolicy.Report(
            context,
            Name,
            $"weights rounded in place to int{bits} levels with {grid} (the layer computes in float; the file stores the levels and scales)",
            described);
    }

    /// <summary>With <see cref="FixedTypeLayers.Skip"/> (or nothing else to do): the layers left in float because no quantized layer can replace them.</summary>
    private void ReportLeftAlone(Dictionary<string, string> fixedTypes, List<(string Name, nn.Module Module)> native, CompressionContext context)
    {
        ReportFixedTypes(fixedTypes, context);
        FixedTypeLayerPolicy.Report(
            context,
            Name,
            "left in float, no quantized layer for their kinds (TorchSharp's native modules, the other registered leaf kinds)",
            native.ToDictionary(n => n.Name, n => n.Module.GetType().Name, StringComparer.Ordinal));
    }

    /// <summary>The layers left in float because their field's type cannot hold a quantized layer.</summary>
    private void ReportFixedTypes(Dictionary<string, string> fixedTypes, CompressionContext context) => FixedTypeLayerPolicy.Report(
        context,
        Name,
        "left in float, their type cannot hold a quantized layer",
        fixedTypes);

    private nn.Module<Tensor, Tensor> Convert(
        nn.Module<Tensor, Tensor> model,
        List<Target> targets,
        List<string> leftInFloat,
        Dictionary<string, Following> structure,
        Calibration calibration,
        Dictionary<string, float[]> inputScales,
        CompressionContext context)
    {
        nn.Module<Tensor, Tensor> root = model;
        using (no_grad())
        {
            if (_options.FoldBatchNorm)
            {
                foreach (var target in targets)
                {
                    if (structure.TryGetValue(target.Name, out var next) && next.BatchNorm is { } bn)
                    {
                        var batchNorm = ModuleTree.GetSubmodule(root, bn);
                        BatchNormFolding.FoldInto(target.Module, batchNorm);
                        root = ModuleTree.Replace(root, bn, nn.Identity());
                        batchNorm.Dispose();
                    }
                }
            }

            // GPTQ solves each Linear layer's rounding in the order the model calls them, the layers before it quantized.
            var solved = _options.Rounding switch
            {
                GptqRounding gptq => GptqLayers.Solve(ref root, targets, gptq, _options, t => Activations(calibration.Ranges.GetValueOrDefault(t.Name)), inputScales, context),
                HqqRounding hqq => Hqq.Solve(targets, hqq, _options, inputScales, context),
                _ => null,
            };

            var quantized = new List<(Target Target, nn.Module<Tensor, Tensor> Layer, IQuantizedLayer Info)>();
            foreach (var target in targets)
            {
                context.CancellationToken.ThrowIfCancellationRequested();
                // A lookup has nothing to fuse; its SQNR is its table's, measured when it is made.
                bool relu = target.Module is not Embedding && _options.FuseRelu && structure.TryGetValue(target.Name, out var next) && next.Relu is not null;
                var settings = Activations(calibration.Ranges.GetValueOrDefault(target.Name));
                var layer = solved is not null && solved.TryGetValue(target.Name, out var matrix)
                    ? new QuantizedLinear(matrix, settings, relu, _options.Mode)
                    : Quantize(target.Module, settings, relu, inputScales.GetValueOrDefault(target.Name));
                var info = (IQuantizedLayer)layer;
                if (layer is QuantizedLayer integerLayer)
                {
                    double sqnr = calibration.Inputs.TryGetValue(target.Name, out var input) ? Sqnr(target.Module, layer, input, relu) : double.NaN;
                    integerLayer.SqnrDb = double.IsNaN(sqnr) ? null : sqnr;
                }

                quantized.Add((target, layer, info));
                context.Logger.LogDebug("Quantized {Layer}: {Kind}, SQNR {Sqnr:0.0} dB", target.Name, layer, info.SqnrDb);
            }

            var baselineMetric = _options.Fallback is null ? null : (double?)context.CalibrationScore(root);
            foreach (var (target, layer, _) in quantized)
            {
                root = ModuleTree.Replace(root, target.Name, layer);
            }

            HashSet<string> fallbackRestored = _options.Fallback is { } fallback ? FallBack(ref root, quantized, baselineMetric!.Value, fallback, context) : [];
            var restored = new HashSet<string>(fallbackRestored, StringComparer.Ordinal);
            if (_options.KeepFloatWhenSlower)
            {
                restored.UnionWith(KeepFasterLayers(ref root, quantized, restored, calibration, context));
            }

            // A fused ReLU's own module is now redundant: the kernel clamps.
            foreach (var (target, layer, info) in quantized)
            {
                if (!restored.Contains(target.Name) && info.FusedRelu && structure[target.Name].Relu is { } reluName)
                {
                    var reluModule = ModuleTree.GetSubmodule(root, reluName);
                    root = ModuleTree.Replace(root, reluName, nn.Identity());
                    reluModule.Dispose();
                }
            }

            foreach (var (target, layer, _) in quantized)
            {
                if (restored.Contains(target.Name))
                {
                    layer.Dispose();
                }
                else
                {
                    target.Module.Dispose();
                }
            }

            var kept = quantized.Where(q => !restored.Contains(q.Target.Name)).ToList();
            context.AddNote(
                $"{kept.Count} layer(s) quantized on the {Int8Kernel.BestPath} kernel path " +
                $"({string.Join(", ", kept.Select(q => $"{q.Target.Name} {(q.Info.SqnrDb is { } s ? $"{s:0.0} dB" : "int")}"))})");
            if (_options.EffectiveGranularity is PerGroupGranularity requested)
            {
                // A layer with fewer inputs than the group has one scale per row: say so, as its granularity does.
                var wholeRow = kept
                    .Where(q => q.Info.WeightGranularity is PerGroupGranularity own && own.Size < requested.Size)
                    .Select(q => $"{q.Target.Name} ({q.Info.WeightGranularity})")
                    .ToList();
                if (wholeRow.Count > 0)
                {
                    context.AddNote($"fewer inputs than the group size {requested.Size}, one group per row: {string.Join(", ", wholeRow)}");
                }
            }

            if (fallbackRestored.Count > 0)
            {
                context.AddNote($"kept in float by the fallback: {string.Join(", ", fallbackRestored)}");
            }

            if (leftInFloat.Count > 0)
            {
                context.AddNote($"left in float (unsupported): {string.Join(", ", leftInFloat)}");
            }
        }

        return root;
    }

    private sealed record Calibration(Dictionary<string, (float Min, float Max)> Ranges, Dictionary<string, Tensor> Inputs);

    /// <summary>
    /// Static mode: observes each target's input over the calibration batches (and keeps the first batch's input for
    /// the SQNR). Other modes: keeps one batch's input per target for the SQNR only. Embeddings are not observed:
    /// their input is token ids, and their SQNR is their table's.
    /// </summary>
    private Calibration Calibrate(nn.Module<Tensor, Tensor> model, IReadOnlyList<Target> allTargets, CompressionContext context)
    {
        bool isStatic = _options.Mode == QuantizationMode.StaticInt8;
        var targets = allTargets.Where(t => t.Module is not Embedding).ToList();
        var data = context.CalibrationData;
        if (targets.Count == 0 && !isStatic)
        {
            return new Calibration([], []);
        }

        if (data.Count == 0)
        {
            if (isStatic)
            {
                throw new InvalidOperationException($"Step '{Name}' needs calibration data, and the calibration data is empty.");
            }

            return new Calibration([], []);
        }

        var observers = targets.ToDictionary(t => t.Name, _ => _options.Observer.Create(), StringComparer.Ordinal);
        var inputs = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        var removers = new List<Action>();
        int batches = isStatic ? _options.CalibrationBatches : 1;
        string? failed = null;
        try
        {
            foreach (var target in targets)
            {
                string name = target.Name;
                var remover = target.Module.register_forward_hook((m, x, y) =>
                {
                    var values = x.detach().to(ScalarType.Float32).cpu().contiguous();
                    if (!isfinite(values).all().item<bool>())
                    {
                        failed ??= name;
                        return y;
                    }

                    if (!inputs.ContainsKey(name))
                    {
                        inputs[name] = values.clone().DetachFromDisposeScope();
                    }

                    if (isStatic)
                    {
                        observers[name].Observe(MemoryMarshal.Cast<byte, float>(values.bytes));
                    }

                    return y;
                });
                removers.Add(remover.remove);
            }

            QuantizationTargets.RunCalibrationBatches(model, data, batches, _options.CalibrationBatchSize, context, seen =>
            {
                context.ReportProgress(CompressionPhase.Applying, 0.5 * seen / batches);
                if (failed is not null)
                {
                    throw new ArgumentException($"Layer '{failed}' received NaN or infinite activations during calibration; nothing was quantized.", "model");
                }
            });
        }
        catch
        {
            foreach (var t in inputs.Values)
            {
                t.Dispose();
            }

            throw;
        }
        finally
        {
            foreach (var remove in removers)
            {
                remove();
            }
        }

        var ranges = new Dictionary<string, (float, float)>(StringComparer.Ordinal);
        if (isStatic)
        {
            foreach (var target in targets)
            {
                if (!inputs.ContainsKey(target.Name))
                {
                    continue; // never called on the calibration data: no range, so the layer stays in float (see Apply)
                }

                ranges[target.Name] = observers[target.Name].ComputeRange(_options.SymmetricActivations);
            }
        }

        return new Calibration(ranges, inputs);
    }

    private ActivationSettings Activations((float Min, float Max) range) => _options.Mode switch
    {
        QuantizationMode.StaticInt8 => StaticSettings(range),
        QuantizationMode.DynamicInt8 => new ActivationSettings(
            _options.DynamicActivations == DynamicActivationGranularity.PerTensor ? ActivationMode.PerTensor : ActivationMode.PerRow, 0, 0, _options.SymmetricActivations),
        _ => new ActivationSettings(_options.EffectiveGranularity is PerGroupGranularity ? ActivationMode.PerBlock : ActivationMode.PerRow, 0, 0, _options.SymmetricActivations),
    };

    private ActivationSettings StaticSettings((float Min, float Max) range)
    {
        var (scale, zero) = QuantizedActivations.Range(range.Min, range.Max, _options.SymmetricActivations);
        return new ActivationSettings(ActivationMode.Static, scale, zero, _options.SymmetricActivations);
    }

    private nn.Module<Tensor, Tensor> Quantize(nn.Module<Tensor, Tensor> module, ActivationSettings settings, bool relu, float[]? inputScales) => module switch
    {
        Linear linear when inputScales is not null => QuantizedLinear.Create(linear, _options.Bits, _options.EffectiveGranularity, settings, relu, _options.Mode, inputScales),
        Embedding embedding => QuantizedEmbedding.FromEmbedding(embedding, _options.Bits <= 4 ? 4 : 8, _options.EffectiveGranularity), // tables come in 4 or 8 bits
        Linear linear => QuantizedLinear.Create(linear, _options.Bits, _options.EffectiveGranularity, settings, relu, _options.Mode),
        Conv2d conv => QuantizedConv2d.Create(conv, _options.Bits, _options.EffectiveGranularity, settings, relu, _options.Mode),
        _ => throw new ArgumentException($"Cannot quantize a {module.GetType().Name}.", nameof(module)),
    };

    /// <summary>10·log10(Σ y² / Σ (y − ŷ)²) of the layer's float output y against the quantized ŷ on one batch.</summary>
    internal static double Sqnr(nn.Module<Tensor, Tensor> floatLayer, nn.Module<Tensor, Tensor> quantized, Tensor input, bool relu)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var reference = floatLayer.call(input.to(EvaluationLoop.ModelDevice(floatLayer))).to(ScalarType.Float32).cpu();
        if (relu)
        {
            reference = nn.functional.relu(reference);
        }

        var output = quantized.call(input).to(ScalarType.Float32).cpu();
        double signal = reference.square().sum().item<float>();
        double noise = (reference - output).square().sum().item<float>();
        return noise == 0 ? double.PositiveInfinity : 10 * Math.Log10(signal / noise);
    }

    /// <summary>
    /// Times each quantized layer against its float original on the layer's own input shape (paired, batch 1 and 64)
    /// and returns to float those not faster at either batch size. Returns the names restored.
    /// </summary>
    private static List<string> KeepFasterLayers(
        ref nn.Module<Tensor, Tensor> root,
        IReadOnlyList<(Target Target, nn.Module<Tensor, Tensor> Layer, IQuantizedLayer Info)> quantized,
        HashSet<string> restored,
        Calibration calibration,
        CompressionContext context)
    {
        var slower = new List<string>();
        foreach (var (target, layer, _) in quantized)
        {
            if (restored.Contains(target.Name) || !calibration.Inputs.TryGetValue(target.Name, out var input))
            {
                continue;
            }

            context.CancellationToken.ThrowIfCancellationRequested();
            // The float layer is timed without its ReLU (which stays a module when the layer stays float): a small
            // handicap for the quantized layer, whose kernel applies the fused ReLU.
            var shape = input.shape[1..];
            var (floatTime, quantizedTime) = ModelMetrics.MeasureLatencyPaired(target.Module, layer, shape, new LatencyOptions { Warmup = 5, Repeats = 21 });
            // A 10% margin keeps the choice stable where timing noise would decide it.
            bool faster = quantizedTime.Batch1 < floatTime.Batch1 * 0.9 || quantizedTime.Batch64 < floatTime.Batch64 * 0.9;
            context.Logger.LogInformation(
                "{Layer}: float {Float1:0.###}/{Float64:0.###} ms, int {Int1:0.###}/{Int64:0.###} ms at batch 1/64 → {Choice}",
                target.Name, floatTime.Batch1, floatTime.Batch64, quantizedTime.Batch1, quantizedTime.Batch64, faster ? "quantized" : "float");
            if (!faster)
            {
                root = ModuleTree.Replace(root, target.Name, target.Module);
                slower.Add(target.Name);
            }
        }

        if (slower.Count > 0)
        {
            context.AddNote($"kept in float because the quantized layer was not faster: {string.Join(", ", slower)}");
        }

        return slower;
    }

    /// <summary>Returns the lowest-SQNR quantized layers to float while the calibration metric has dropped too far.</summary>
    private static HashSet<string> FallBack(
        ref nn.Module<Tensor, Tensor> root,
        IReadOnlyList<(Target Target, nn.Module<Tensor, Tensor> Layer, IQuantizedLayer Info)> quantized,
        double baseline,
        QuantizationFallback fallback,
        CompressionContext context)
    {
        var restored = new HashSet<string>(StringComparer.Ordinal);
        var order = quantized.OrderBy(q => q.Info.SqnrDb ?? double.PositiveInfinity).ToList();
        int limit = fallback.MaxFloatLayers ?? order.Count;
        double current = context.CalibrationScore(root);
        foreach (var (target, _, info) in order)
        {
            if (baseline - current <= fallback.MaxAccuracyDrop || restored.Count >= limit)
            {
                break;
            }

            context.CancellationToken.ThrowIfCancellationRequested();
            root = ModuleTree.Replace(root, target.Name, target.Module);
            restored.Add(target.Name);
            double before = current;
            current = context.CalibrationScore(root);
            context.Logger.LogInformation(
                "Fallback: {Layer} (SQNR {Sqnr:0.0} dB) back to float; calibration {Metric} {Before:0.####} → {After:0.####} (float {Baseline:0.####})",
                target.Name, info.SqnrDb, context.Evaluator.MetricName, before, current, baseline);
        }

        if (baseline - current > fallback.MaxAccuracyDrop)
        {
            context.AddNote($"the fallback could not bring the calibration {context.Evaluator.MetricName} within {fallback.MaxAccuracyDrop:0.####} of float ({current:0.####} vs {baseline:0.####})");
        }

        return restored;
    }
}
