using System.Globalization;
using Microsoft.Extensions.Logging;
using ModelCompression.Data;
using ModelCompression.Distillation;
using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Training;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Pruning;

/// <summary>
/// Structured transformer pruning (Minitron-style): removes attention heads (the matching slices of the query, key,
/// value and output projections), MLP hidden units (the up/gate projections' outputs and the down projection's inputs)
/// and whole blocks (depth), ranked from calibration activations or calibration loss, and rebuilds the layers smaller —
/// the file shrinks and the model runs faster. Recovery is by fine-tuning, with distillation from the original model.
/// </summary>
/// <remarks>
/// <para>
/// Blocks are found through <see cref="TransformerLayouts"/>: a module that implements <see cref="ITransformerBlock"/>
/// or whose type is registered. An attention module outside such a block (TorchSharp's natively implemented
/// <c>MultiheadAttention</c> and <c>Transformer*</c> modules, or any module whose type name says attention) is an
/// <see cref="UnsupportedModelException"/> naming it, raised before anything changes.
/// </para>
/// <para>
/// Memory: one calibration batch's activations plus, per block, the scores (a float per head and per hidden unit).
/// With <see cref="TransformerPruningOptions.ParameterFraction"/>, one candidate copy of the model at a time.
/// </para>
/// </remarks>
public sealed class TransformerPruningStep : ICompressionStep, ICompressionStepRequirements
{
    /// <summary>The base name of the step in reports.</summary>
    public const string StepName = "TransformerPruning";

    private readonly TransformerPruningOptions _options;

    /// <summary>Initializes a new instance of the <see cref="TransformerPruningStep"/> class.</summary>
    /// <param name="options">The options; copied.</param>
    /// <exception cref="OptionsValidationException">The options are invalid (every error listed).</exception>
    public TransformerPruningStep(TransformerPruningOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        OptionsValidationException.ThrowIfInvalid(typeof(TransformerPruningOptions), options.Validate());
        _options = options.Clone();
    }

    /// <inheritdoc/>
    public string Name => _options.ParameterFraction is { } fraction
        ? string.Create(CultureInfo.InvariantCulture, $"{StepName}({fraction * 100:0.#}% of block parameters, {_options.Importance})")
        : string.Create(CultureInfo.InvariantCulture, $"{StepName}(heads {_options.HeadFraction * 100:0.#}%, MLP {_options.MlpFraction * 100:0.#}%, {_options.BlocksRemoved} blocks, {_options.Importance})");

    /// <inheritdoc/>
    public bool RequiresTrainingData => _options.FineTuning is not null;

    /// <inheritdoc/>
    /// <exception cref="UnsupportedModelException">
    /// The model has no described transformer block, an attention module the step cannot explain, a block whose layout
    /// names layers that are not Linear or whose shapes disagree, or a layer that cannot be replaced. The exception
    /// names the module; nothing has changed.
    /// </exception>
    /// <exception cref="ArgumentException">The cuts would remove every block, or calibration produced NaN or infinite activations.</exception>
    public nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(context);
        var blocks = Find(model);
        bool depthPossible = blocks.All(b => b.Skippable);
        if (_options.BlocksRemoved > 0)
        {
            if (_options.BlocksRemoved >= blocks.Count)
            {
                throw new ArgumentException($"{nameof(TransformerPruningOptions.BlocksRemoved)} is {_options.BlocksRemoved} but the model has {blocks.Count} blocks: at least one must stay.", nameof(model));
            }

            if (blocks.FirstOrDefault(b => !b.Skippable) is { } fixedBlock)
            {
                throw new UnsupportedModelException(fixedBlock.Name, fixedBlock.Module.GetType().Name, $"Block '{fixedBlock.Name}' cannot be removed: only a Module<Tensor, Tensor> block whose parent can hold an Identity in its place can be cut.");
            }
        }

        context.ReportProgress(CompressionPhase.Applying, 0);
        var scores = Rank(model, blocks, context);
        context.ReportProgress(CompressionPhase.Applying, 0.3);
        var cuts = _options.ParameterFraction is { } fraction
            ? Search(model, blocks, scores, fraction, depthPossible, context)
            : new Cuts(_options.BlocksRemoved, _options.HeadFraction, _options.MlpFraction);
        long before = blocks.Sum(b => b.Parameters);
        long after = CountAfter(blocks, scores, cuts);
        var root = Prune(model, blocks, scores, cuts, out var summary);
        Verify(root, blocks, cuts, scores, context);
        string note = string.Create(CultureInfo.InvariantCulture, $"{summary}; block parameters {before:N0} → {after:N0} ({100.0 * (before - after) / Math.Max(1, before):0.#}% removed), ranked by {_options.Importance}");
        context.AddNote(note);
        context.Logger.LogInformation("{Step}: {Note}", Name, note);
        context.ReportProgress(CompressionPhase.Applying, 0.6);
        if (_options.FineTuning is { } fineTuning)
        {
            context.Train(root, fineTuning, ((TrainingCallbacks?)null).WithDistillation(_options.Distillation, context.OriginalModel));
        }

        return root;
    }

    /// <summary>The cuts: blocks removed (least important first), and the fractions of heads and hidden units removed in each remaining block.</summary>
    internal sealed record Cuts(int Blocks, double HeadFraction, double MlpFraction);

    private sealed record Block(string Name, nn.Module Module, TransformerBlockLayout Layout, Linear[] Qkv, Linear? AttentionOutput, long Heads, Linear[] MlpInputs, Linear? MlpOutput, long Parameters, bool Skippable)
    {
        public long HeadWidth => Heads == 0 ? 0 : AttentionOutput!.in_features / Heads;

        public long Hidden => MlpOutput?.in_features ?? 0;

        /// <summary>Parameters that go with one head: its rows of query, key and value (and their biases) and its output-projection columns.</summary>
        public long PerHead => Qkv.Sum(l => HeadWidth * (l.in_features + (l.bias is null ? 0 : 1))) + (HeadWidth * (AttentionOutput?.out_features ?? 0));

        /// <summary>Parameters that go with one hidden unit.</summary>
        public long PerUnit => MlpInputs.Sum(l => l.in_features + (l.bias is null ? 0 : 1)) + (MlpOutput?.out_features ?? 0);
    }

    private sealed record Scores(double[][] Heads, double[][] Units, double[] Blocks);

    private static readonly Type[] NativeAttention =
    [
        typeof(MultiheadAttention), typeof(TransformerEncoderLayer), typeof(TransformerEncoder),
        typeof(TransformerDecoderLayer), typeof(TransformerDecoder), typeof(Transformer),
    ];

    /// <summary>Finds and checks every described block; throws for anything attention-like it cannot explain.</summary>
    private static List<Block> Find(nn.Module<Tensor, Tensor> model)
    {
        var blocks = new List<Block>();
        foreach (var (name, module) in model.named_modules())
        {
            if (name.Length == 0 || blocks.Any(b => name.StartsWith(b.Name + ".", StringComparison.Ordinal)))
            {
                continue;
            }

            TransformerBlockLayout? layout;
            try
            {
                layout = TransformerLayouts.Describe(module);
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                throw new UnsupportedModelException(name, module.GetType().Name, $"Describing the block '{name}' failed: {e.Message}", e);
            }

            if (layout is not null)
            {
                blocks.Add(Resolve(model, name, module, layout));
            }
            else if (NativeAttention.Any(t => t.IsInstanceOfType(module)) || module.GetType().Name.Contains("Attention", StringComparison.OrdinalIgnoreCase))
            {
                throw new UnsupportedModelException(name, module.GetType().Name,
                    $"The attention module '{name}' ({module.GetType().Name}) is not part of a transformer block the pruner can explain: its heads cannot be removed without knowing its projections. " +
                    $"Build the block from Linear projections and implement {nameof(ITransformerBlock)}, or describe its type with {nameof(TransformerLayouts)}.{nameof(TransformerLayouts.Register)}.");
            }
        }

        if (blocks.Count == 0)
        {
            throw new UnsupportedModelException(null, model.GetType().Name,
                $"The model ({model.GetType().Name}) has no transformer block the pruner knows: implement {nameof(ITransformerBlock)} on the block type or register it with {nameof(TransformerLayouts)}.{nameof(TransformerLayouts.Register)}.");
        }

        return blocks;
    }

    private static Block Resolve(nn.Module<Tensor, Tensor> root, string name, nn.Module module, TransformerBlockLayout layout)
    {
        string type = module.GetType().Name;
        Linear Layer(string relative, string role)
        {
            if (string.IsNullOrEmpty(relative))
            {
                throw new UnsupportedModelException(name, type, $"The layout of block '{name}' names no {role}.");
            }

            nn.Module found;
            try
            {
                found = ModuleTree.GetSubmodule(module, relative);
            }
            catch (ArgumentException e)
            {
                throw new UnsupportedModelException(name, type, $"The layout of block '{name}' names {role} '{relative}', which the block does not have.", e);
            }

            if (found is not Linear linear)
            {
                throw new UnsupportedModelException($"{name}.{relative}", found.GetType().Name, $"The {role} '{name}.{relative}' is a {found.GetType().Name}; only Linear layers can be sliced (prune before quantizing or factorizing).");
            }

            if (ModuleTree.WhyCannotReplace(root, $"{name}.{relative}", typeof(Linear)) is { } why)
            {
                throw new UnsupportedModelException($"{name}.{relative}", nameof(Linear), why);
            }

            return linear;
        }

        Linear[] qkv = [];
        Linear? attentionOutput = null;
        long heads = 0;
        if (layout.Attention is { } attention)
        {
            qkv = [Layer(attention.Query, "query projection"), Layer(attention.Key, "key projection"), Layer(attention.Value, "value projection")];
            attentionOutput = Layer(attention.Output, "attention output projection");
            heads = attention.Heads;
            long inner = attentionOutput.in_features;
            if (heads < 1 || inner % heads != 0 || qkv.Any(l => l.out_features != inner))
            {
                throw new UnsupportedModelException(name, type,
                    $"The attention of block '{name}' does not split into {heads} equal heads: query, key and value give {string.Join("/", qkv.Select(l => l.out_features))} outputs and the output projection reads {inner} " +
                    "(grouped-query attention, with fewer key/value heads, is not supported).");
            }
        }

        Linear[] mlpInputs = [];
        Linear? mlpOutput = null;
        if (layout.Mlp is { } mlp)
        {
            if (mlp.Inputs is null || mlp.Inputs.Count == 0)
            {
                throw new UnsupportedModelException(name, type, $"The MLP layout of block '{name}' names no input (up) projection.");
            }

            mlpInputs = [.. mlp.Inputs.Select(i => Layer(i, "MLP input projection"))];
            mlpOutput = Layer(mlp.Output, "MLP output projection");
            if (mlpInputs.Any(l => l.out_features != mlpOutput.in_features))
            {
                throw new UnsupportedModelException(name, type, $"The MLP of block '{name}' does not agree on its hidden width: inputs give {string.Join("/", mlpInputs.Select(l => l.out_features))}, the output projection reads {mlpOutput.in_features}.");
            }
        }

        bool skippable = module is nn.Module<Tensor, Tensor> && ModuleTree.WhyCannotReplace(root, name, typeof(Identity)) is null;
        long parameters = module.parameters().Sum(p => p.numel());
        return new Block(name, module, layout, qkv, attentionOutput, heads, mlpInputs, mlpOutput, parameters, skippable);
    }

    /// <summary>Activation-based scores from one calibration pass, replaced by loss-based ones for heads and blocks when asked.</summary>
    private Scores Rank(nn.Module<Tensor, Tensor> model, List<Block> blocks, CompressionContext context)
    {
        var heads = blocks.Select(b => new double[b.Heads]).ToArray();
        var units = blocks.Select(b => new double[b.Hidden]).ToArray();
        var influence = new double[blocks.Count];
        var unitSums = blocks.Select(b => b.Hidden > 0 ? zeros(b.Hidden, ScalarType.Float64) : null).ToArray();
        long[] headRows = new long[blocks.Count], unitRows = new long[blocks.Count], blockRows = new long[blocks.Count];
        bool finite = true;
        var removers = new List<Action>();
        try
        {
            for (int i = 0; i < blocks.Count; i++)
            {
                int b = i;
                var block = blocks[b];
                if (block.AttentionOutput is { } output)
                {
                    removers.Add(output.register_forward_pre_hook((_, input) =>
                    {
                        using var scope = NewDisposeScope();
                        using var noGrad = no_grad();
                        var x = input.detach().reshape(-1, output.in_features).to(ScalarType.Float32);
                        finite &= isfinite(x).all().item<bool>();
                        var w = output.weight!.detach().to(ScalarType.Float32);
                        long d = block.HeadWidth;
                        for (long h = 0; h < block.Heads; h++)
                        {
                            var contribution = x.narrow(1, h * d, d).matmul(w.narrow(1, h * d, d).t());
                            heads[b][h] += contribution.norm(1, false).sum().item<float>();
                        }

                        headRows[b] += x.shape[0];
                        return input;
                    }).remove);
                }

                if (block.MlpOutput is { } down)
                {
                    removers.Add(down.register_forward_pre_hook((_, input) =>
                    {
                        using var scope = NewDisposeScope();
                        var a = input.detach().reshape(-1, down.in_features).to(ScalarType.Float64);
                        finite &= isfinite(a).all().item<bool>();
                        unitSums[b]!.PlusInPlace(a.abs().sum(dim: 0).cpu());
                        unitRows[b] += a.shape[0];
                        return input;
                    }).remove);
                }

                if (block.Module is nn.Module<Tensor, Tensor> single)
                {
                    removers.Add(single.register_forward_hook((_, input, result) =>
                    {
                        AddInfluence(b, input, result);
                        return result;
                    }).remove);
                }
                else if (block.Module is nn.Module<Tensor, Tensor, Tensor> pair)
                {
                    removers.Add(pair.register_forward_hook((_, input, _, result) =>
                    {
                        AddInfluence(b, input, result);
                        return result;
                    }).remove);
                }
            }

            QuantizationTargets.RunCalibrationBatches(model, context.CalibrationData, _options.CalibrationBatches, _options.CalibrationBatchSize, context);
        }
        finally
        {
            foreach (var remove in removers)
            {
                remove();
            }
        }

        void AddInfluence(int b, Tensor input, Tensor result)
        {
            if (!input.shape.SequenceEqual(result.shape))
            {
                return;
            }

            using var scope = NewDisposeScope();
            long width = input.shape[^1];
            var x = input.detach().reshape(-1, width).to(ScalarType.Float32);
            var y = result.detach().reshape(-1, width).to(ScalarType.Float32);
            influence[b] += nn.functional.cosine_similarity(x, y, 1, 1e-8).SubtractedFrom(KeptScalars.One).sum().item<float>();
            blockRows[b] += x.shape[0];
        }

        try
        {
            if (!finite)
            {
                throw new ArgumentException("The model produced NaN or infinite activations during calibration; nothing was changed.", nameof(model));
            }

            for (int b = 0; b < blocks.Count; b++)
            {
                for (int h = 0; h < heads[b].Length; h++)
                {
                    heads[b][h] /= Math.Max(1, headRows[b]);
                }

                if (unitSums[b] is { } sums)
                {
                    using var scope = NewDisposeScope();
                    var columnNorms = blocks[b].MlpOutput!.weight!.detach().to(ScalarType.Float64).cpu().norm(0, false);
                    using var rows = Math.Max(1, unitRows[b]).ToScalar();
                    units[b] = (sums.div(rows) * columnNorms).data<double>().ToArray();
                }

                influence[b] = blockRows[b] == 0 ? double.NaN : influence[b] / blockRows[b];
            }
        }
        finally
        {
            foreach (var sums in unitSums)
            {
                sums?.Dispose();
            }
        }

        if (_options.Importance == TransformerImportance.CalibrationLoss)
        {
            RankByLoss(model, blocks, heads, influence, context);
        }

        return new Scores(heads, units, influence);
    }

    /// <summary>Replaces head and block scores with the KL divergence from the original outputs when each alone is removed.</summary>
    private void RankByLoss(nn.Module<Tensor, Tensor> model, List<Block> blocks, double[][] heads, double[] influence, CompressionContext context)
    {
        for (int b = 0; b < blocks.Count; b++)
        {
            context.CancellationToken.ThrowIfCancellationRequested();
            var block = blocks[b];
            if (block.AttentionOutput is { } output)
            {
                var weight = output.weight!;
                using var saved = weight.detach().clone();
                long d = block.HeadWidth;
                for (long h = 0; h < block.Heads; h++)
                {
                    try
                    {
                        using (no_grad())
                        {
                            weight.narrow(1, h * d, d).zero_();
                        }

                        heads[b][h] = Divergence(model, context);
                    }
                    finally
                    {
                        using (no_grad())
                        {
                            weight.copy_(saved);
                        }
                    }
                }
            }

            if (block.Skippable)
            {
                var remove = Bypass(block);
                try
                {
                    influence[b] = Divergence(model, context);
                }
                finally
                {
                    remove();
                }
            }
        }
    }

    /// <summary>Makes a skippable block pass its input through (its output replaced by its input), as removing it does; returns the remover.</summary>
    private static Action Bypass(Block block) =>
        ((nn.Module<Tensor, Tensor>)block.Module).register_forward_hook((_, input, _) => input.alias()).remove;

    /// <summary>Mean KL divergence of the model's outputs from the original model's on the calibration batches.</summary>
    private double Divergence(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        var original = context.OriginalModel;
        using var originalModes = ModuleModes.Evaluating(original);
        using var modelModes = ModuleModes.Evaluating(model);
        double total = 0;
        int count = 0;
        using var noGrad = no_grad();
        foreach (var (input, _) in context.CalibrationData.ScopedBatches(_options.CalibrationBatchSize).Take(_options.CalibrationBatches))
        {
            var x = input.to(context.Device);
            total += DistillationLoss.SoftTargets(model.call(x), original.call(x), 1).item<float>();
            count++;
        }

        return count == 0 ? 0 : total / count;
    }

    /// <summary>Tries every (blocks, heads) combination, fills the target with MLP width, keeps the closest candidate to the original outputs.</summary>
    private Cuts Search(nn.Module<Tensor, Tensor> model, List<Block> blocks, Scores scores, double fraction, bool depthPossible, CompressionContext context)
    {
        long total = blocks.Sum(b => b.Parameters);
        double target = fraction * total;
        double tolerance = 0.025 * total;
        long maxHeads = blocks.Max(b => b.Heads);
        var candidates = new List<(Cuts Cuts, long Removed)>();
        for (int depth = 0; depth <= (depthPossible ? blocks.Count - 1 : 0); depth++)
        {
            for (long headsRemoved = 0; headsRemoved < Math.Max(1, maxHeads); headsRemoved++)
            {
                double headFraction = maxHeads == 0 ? 0 : (double)headsRemoved / maxHeads;
                (Cuts Cuts, long Removed)? best = null;
                // The MLP fraction in steps of RoundTo units of the widest MLP: the one whose total lands closest to the target.
                long widest = blocks.Max(b => b.Hidden);
                long steps = widest == 0 ? 1 : Math.Max(1, widest / _options.RoundTo);
                for (long step = 0; step < steps; step++)
                {
                    double mlpFraction = widest == 0 ? 0 : (double)step / steps;
                    var cuts = new Cuts(depth, headFraction, mlpFraction);
                    long removed = total - CountAfter(blocks, scores, cuts);
                    if (best is null || Math.Abs(removed - target) < Math.Abs(best.Value.Removed - target))
                    {
                        best = (cuts, removed);
                    }
                }

                if (best is { } found && Math.Abs(found.Removed - target) <= tolerance && !candidates.Any(c => c.Cuts == found.Cuts))
                {
                    candidates.Add(found);
                }
            }
        }

        if (candidates.Count == 0)
        {
            throw new ArgumentException(string.Create(CultureInfo.InvariantCulture, $"No combination of blocks, heads and MLP width removes {fraction * 100:0.#}% of the blocks' {total:N0} parameters (within 2.5%)."), nameof(model));
        }

        var tried = new List<string>();
        Cuts? chosen = null;
        double bestLoss = double.PositiveInfinity;
        for (int i = 0; i < candidates.Count; i++)
        {
            context.CancellationToken.ThrowIfCancellationRequested();
            context.ReportProgress(CompressionPhase.Applying, 0.3 + (0.3 * i / candidates.Count));
            var (cuts, removed) = candidates[i];
            double loss = DivergenceWithCuts(model, blocks, scores, cuts, context);
            tried.Add(string.Create(CultureInfo.InvariantCulture, $"{Describe(cuts)} ({100.0 * removed / total:0.#}%): KL {loss:G4}"));
            if (loss < bestLoss)
            {
                (bestLoss, chosen) = (loss, cuts);
            }
        }

        context.AddNote($"candidates: {string.Join("; ", tried)}; chosen: {Describe(chosen!)}");
        return chosen!;
    }

    /// <summary>
    /// The divergence of the model with the cuts simulated in place: a removed head's output-projection columns and a
    /// removed unit's down-projection column zeroed, a removed block bypassed — the same outputs as the rebuilt model,
    /// without a copy of it. Everything is restored afterwards.
    /// </summary>
    private double DivergenceWithCuts(nn.Module<Tensor, Tensor> model, List<Block> blocks, Scores scores, Cuts cuts, CompressionContext context)
    {
        var removed = RemovedBlocks(scores, cuts.Blocks);
        var saved = new List<(Parameter Weight, Tensor Original)>();
        var removers = new List<Action>();
        try
        {
            using var noGrad = no_grad();
            for (int b = 0; b < blocks.Count; b++)
            {
                var block = blocks[b];
                if (removed.Contains(b))
                {
                    removers.Add(Bypass(block));
                    continue;
                }

                if (block.AttentionOutput is { } output)
                {
                    var keep = KeptHeads(block, scores, b, cuts).ToHashSet();
                    long d = block.HeadWidth;
                    ZeroColumns(output.weight!, Enumerable.Range(0, (int)block.Heads).Where(h => !keep.Contains(h)).SelectMany(h => Enumerable.Range(h * (int)d, (int)d)), saved);
                }

                if (block.MlpOutput is { } down)
                {
                    var keep = KeptUnits(block, scores, b, cuts).ToHashSet();
                    ZeroColumns(down.weight!, Enumerable.Range(0, (int)block.Hidden).Where(j => !keep.Contains(j)), saved);
                }
            }

            return Divergence(model, context);
        }
        finally
        {
            foreach (var remove in removers)
            {
                remove();
            }

            using var noGrad = no_grad();
            foreach (var (weight, original) in saved)
            {
                weight.copy_(original);
                original.Dispose();
            }
        }
    }

    private static void ZeroColumns(Parameter weight, IEnumerable<int> columns, List<(Parameter Weight, Tensor Original)> saved)
    {
        var list = columns.Select(c => (long)c).ToArray();
        if (list.Length == 0)
        {
            return;
        }

        saved.Add((weight, weight.detach().clone().DetachFromDisposeScope()));
        using var index = tensor(list, device: weight.device);
        using var zero = 0.ToScalar();
        weight.index_fill_(1, index, zero);
    }

    private static string Describe(Cuts cuts) => string.Create(CultureInfo.InvariantCulture, $"{cuts.Blocks} blocks, {cuts.HeadFraction * 100:0.#}% of heads, {cuts.MlpFraction * 100:0.#}% of MLP width");

    private static long HeadsKept(Block block, Cuts cuts) =>
        block.Heads - Math.Min(block.Heads - 1, (long)Math.Round(cuts.HeadFraction * block.Heads, MidpointRounding.AwayFromZero));

    private long UnitsKept(Block block, Cuts cuts)
    {
        long hidden = block.Hidden;
        long keep = (long)Math.Round((1 - cuts.MlpFraction) * hidden, MidpointRounding.AwayFromZero);
        if (hidden >= _options.RoundTo)
        {
            keep = Math.Max(_options.RoundTo, (long)Math.Round((double)keep / _options.RoundTo, MidpointRounding.AwayFromZero) * _options.RoundTo);
        }

        return Math.Clamp(keep, 1, hidden);
    }

    private static long[] KeptHeads(Block block, Scores scores, int index, Cuts cuts) => TopSorted(scores.Heads[index], HeadsKept(block, cuts));

    private long[] KeptUnits(Block block, Scores scores, int index, Cuts cuts) => TopSorted(scores.Units[index], UnitsKept(block, cuts));

    /// <summary>The indices of the <paramref name="keep"/> highest scores, ascending (ties to the lower index).</summary>
    private static long[] TopSorted(double[] scores, long keep) =>
        [.. scores.Select((s, i) => (Score: double.IsNaN(s) ? double.NegativeInfinity : s, Index: (long)i))
            .OrderByDescending(p => p.Score).ThenBy(p => p.Index).Take((int)keep).Select(p => p.Index).Order()];

    /// <summary>The blocks removed: the lowest scores (ties to the later block).</summary>
    private static HashSet<int> RemovedBlocks(Scores scores, int count) =>
        [.. scores.Blocks.Select((s, i) => (Score: double.IsNaN(s) ? double.PositiveInfinity : s, Index: i))
            .OrderBy(p => p.Score).ThenByDescending(p => p.Index).Take(count).Select(p => p.Index)];

    private long CountAfter(List<Block> blocks, Scores scores, Cuts cuts)
    {
        var removed = RemovedBlocks(scores, cuts.Blocks);
        long count = 0;
        for (int b = 0; b < blocks.Count; b++)
        {
            if (removed.Contains(b))
            {
                continue;
            }

            var block = blocks[b];
            count += block.Parameters;
            if (block.Heads > 0)
            {
                count -= (block.Heads - HeadsKept(block, cuts)) * block.PerHead;
            }

            if (block.Hidden > 0)
            {
                count -= (block.Hidden - UnitsKept(block, cuts)) * block.PerUnit;
            }
        }

        return count;
    }

    /// <summary>Applies the cuts in place (replacing layers); returns the root.</summary>
    private nn.Module<Tensor, Tensor> Prune(nn.Module<Tensor, Tensor> model, List<Block> blocks, Scores scores, Cuts cuts, out string summary)
    {
        var removed = RemovedBlocks(scores, cuts.Blocks);
        var root = model;
        var parts = new List<string>();
        using var noGrad = no_grad();
        for (int b = 0; b < blocks.Count; b++)
        {
            var block = blocks[b];
            if (removed.Contains(b))
            {
                root = ModuleTree.Replace(root, block.Name, nn.Identity());
                block.Module.Dispose();
                parts.Add($"{block.Name} removed");
                continue;
            }

            var layout = block.Layout;
            var edits = new List<string>();
            if (layout.Attention is { } attention && block.AttentionOutput is { } output)
            {
                var keep = KeptHeads(block, scores, b, cuts);
                if (keep.Length < block.Heads)
                {
                    long d = block.HeadWidth;
                    var rows = keep.SelectMany(h => Enumerable.Range(0, (int)d).Select(j => (h * d) + j)).ToArray();
                    string[] names = [attention.Query, attention.Key, attention.Value];
                    for (int i = 0; i < 3; i++)
                    {
                        root = ModuleTree.Replace(root, $"{block.Name}.{names[i]}", StructuredPruningStep.SliceLinear(block.Qkv[i], rows, null));
                        block.Qkv[i].Dispose();
                    }

                    root = ModuleTree.Replace(root, $"{block.Name}.{attention.Output}", StructuredPruningStep.SliceLinear(output, null, rows));
                    output.Dispose();
                    edits.Add($"heads {block.Heads}→{keep.Length}");
                }
            }

            if (layout.Mlp is { } mlp && block.MlpOutput is { } down)
            {
                var keep = KeptUnits(block, scores, b, cuts);
                if (keep.Length < block.Hidden)
                {
                    for (int i = 0; i < mlp.Inputs.Count; i++)
                    {
                        root = ModuleTree.Replace(root, $"{block.Name}.{mlp.Inputs[i]}", StructuredPruningStep.SliceLinear(block.MlpInputs[i], keep, null));
                        block.MlpInputs[i].Dispose();
                    }

                    root = ModuleTree.Replace(root, $"{block.Name}.{mlp.Output}", StructuredPruningStep.SliceLinear(down, null, keep));
                    down.Dispose();
                    edits.Add($"MLP {block.Hidden}→{keep.Length}");
                }
            }

            if (edits.Count > 0)
            {
                parts.Add($"{block.Name} {string.Join(", ", edits)}");
            }
        }

        summary = parts.Count == 0 ? "nothing removed" : string.Join("; ", parts);
        return root;
    }

    /// <summary>Runs one calibration batch through the pruned model and re-reads each block's layout: a block that did not follow the pruned shapes is named.</summary>
    private void Verify(nn.Module<Tensor, Tensor> root, List<Block> blocks, Cuts cuts, Scores scores, CompressionContext context)
    {
        var removed = RemovedBlocks(scores, cuts.Blocks);
        for (int b = 0; b < blocks.Count; b++)
        {
            if (removed.Contains(b) || blocks[b].Heads == 0)
            {
                continue;
            }

            long kept = HeadsKept(blocks[b], cuts);
            var layout = TransformerLayouts.Describe(ModuleTree.GetSubmodule(root, blocks[b].Name));
            if (layout?.Attention?.Heads != kept)
            {
                throw new UnsupportedModelException(blocks[b].Name, blocks[b].Module.GetType().Name,
                    $"Block '{blocks[b].Name}' reports {layout?.Attention?.Heads} heads after {kept} were kept: its layout (and forward) must take the head count from the projections' sizes.");
            }
        }

        using var modes = ModuleModes.Evaluating(root);
        try
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var (input, _) = context.CalibrationData.FirstBatch(Math.Min(2, _options.CalibrationBatchSize));
            root.call(input.to(context.Device));
        }
        catch (Exception e) when (e is not OutOfMemoryException and not OperationCanceledException)
        {
            throw new UnsupportedModelException(null, root.GetType().Name,
                $"The pruned model no longer runs ({e.Message}): every block's forward must take its head count from its projections' sizes and its hidden width from its MLP's.", e);
        }
    }
}
