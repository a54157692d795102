using System.Diagnostics;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using ModelCompression.Data;
using ModelCompression.Distillation;
using ModelCompression.Factorization;
using ModelCompression.Metrics;
using ModelCompression.Modules;
using ModelCompression.Pruning;
using ModelCompression.Pruning.Structured;
using ModelCompression.Training;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Architecture;

/// <summary>What a budgeted search measures.</summary>
public enum SearchBudgetKind
{
    /// <summary>Multiply-accumulates per sample.</summary>
    Macs,

    /// <summary>Parameters.</summary>
    Parameters,

    /// <summary>Measured latency at batch 1 (median of repeats).</summary>
    Latency,
}

/// <summary>Options of <see cref="BudgetedSearchStep"/>.</summary>
public sealed class BudgetedSearchOptions : IValidatableOptions
{
    /// <summary>Gets or sets what the budget measures.</summary>
    /// <value>The default is <see cref="SearchBudgetKind.Macs"/>.</value>
    public SearchBudgetKind Kind { get; set; } = SearchBudgetKind.Macs;

    /// <summary>Gets or sets the budget as a fraction of the model's cost at the start of the step.</summary>
    /// <value>The default is 0.5. Must be in (0, 1).</value>
    public double Fraction { get; set; } = 0.5;

    /// <summary>Gets or sets how much each iteration must save, as a fraction of the starting cost (NetAdapt's resource reduction schedule).</summary>
    /// <value>The default is 0.1. Must be in (0, 1).</value>
    public double StepFraction { get; set; } = 0.1;

    /// <summary>Gets or sets the short fine-tuning every candidate gets before it is scored.</summary>
    /// <value>The default is 1 epoch.</value>
    public TrainingOptions ShortFineTuning { get; set; } = new() { Epochs = 1 };

    /// <summary>Gets or sets the fine-tuning of the chosen model once the search ends, or <see langword="null"/> for none.</summary>
    public TrainingOptions? FinalFineTuning { get; set; }

    /// <summary>Gets or sets distillation from the original model in every fine-tuning, or <see langword="null"/>.</summary>
    public RecoveryDistillation? Distillation { get; set; }

    /// <summary>Gets or sets the layers whose width or rank the search may reduce.</summary>
    /// <value>The default is every Linear and Conv2d layer.</value>
    public LayerSelection Layers { get; set; } = LayerSelection.Default;

    /// <summary>Gets or sets the wall-clock limit of the search; when it passes, the best model so far is returned.</summary>
    /// <value>The default is 10 minutes. Must be positive.</value>
    public TimeSpan TimeLimit { get; set; } = TimeSpan.FromMinutes(10);

    /// <inheritdoc/>
    public IReadOnlyList<string> Validate()
    {
        const string Name = nameof(BudgetedSearchOptions);
        var errors = new List<string>();
        if (!Enum.IsDefined(Kind))
        {
            errors.Add($"{Name}.{nameof(Kind)} is not a known kind (was {(int)Kind}).");
        }

        if (!(Fraction > 0 && Fraction < 1))
        {
            errors.Add($"{Name}.{nameof(Fraction)} must be in (0, 1) (was {Fraction}).");
        }

        if (!(StepFraction > 0 && StepFraction < 1))
        {
            errors.Add($"{Name}.{nameof(StepFraction)} must be in (0, 1) (was {StepFraction}).");
        }

        if (TimeLimit <= TimeSpan.Zero)
        {
            errors.Add($"{Name}.{nameof(TimeLimit)} must be positive (was {TimeLimit}).");
        }

        OptionsValidationException.AddNested(errors, Name, nameof(ShortFineTuning), ShortFineTuning?.Validate());
        OptionsValidationException.AddNested(errors, Name, nameof(FinalFineTuning), FinalFineTuning?.Validate(), required: false);
        OptionsValidationException.AddNested(errors, Name, nameof(Distillation), Distillation?.Validate(), required: false);
        OptionsValidationException.AddNested(errors, Name, nameof(Layers), Layers?.Validate());
        return errors;
    }

    internal BudgetedSearchOptions Clone() => new()
    {
        Kind = Kind,
        Fraction = Fraction,
        StepFraction = StepFraction,
        ShortFineTuning = ShortFineTuning.Clone(),
        FinalFineTuning = FinalFineTuning?.Clone(),
        Distillation = RecoveryDistillation.Copy(Distillation),
        Layers = Layers.Copy(),
        TimeLimit = TimeLimit,
    };
}

/// <summary>One candidate the search tried.</summary>
/// <param name="Iteration">The iteration (1-based).</param>
/// <param name="Operation">"prune" (channel width) or "factorize" (rank).</param>
/// <param name="Layers">The layers the candidate changed.</param>
/// <param name="Setting">The channels kept or the rank.</param>
/// <param name="Cost">The candidate's cost (MACs, parameters or milliseconds).</param>
/// <param name="CostFraction">The cost as a fraction of the starting cost.</param>
/// <param name="Accuracy">The metric after the short fine-tuning, on the calibration data.</param>
/// <param name="Chosen">Whether the iteration kept this candidate.</param>
public sealed record SearchCandidate(int Iteration, string Operation, string Layers, long Setting, double Cost, double CostFraction, double Accuracy, bool Chosen);

/// <summary>
/// A NetAdapt-style budgeted search (Yang et al. 2018): every iteration proposes, for each layer group, the smallest
/// reduction — fewer channels by structured pruning, or a lower rank by SVD factorization — that saves a set share of the
/// budget, fine-tunes each candidate briefly, and keeps the most accurate; until the budget is met or time runs out.
/// <see cref="LastTrace"/> holds every candidate tried, for plotting the accuracy/cost front.
/// </summary>
public sealed class BudgetedSearchStep : ICompressionStep, ICompressionStepRequirements
{
    /// <summary>The name of the step in reports.</summary>
    public const string StepName = "BudgetedSearch";

    private static readonly double[] Ratios = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

    private readonly BudgetedSearchOptions _options;

    /// <summary>Initializes a new instance of the <see cref="BudgetedSearchStep"/> class.</summary>
    /// <param name="options">The options; copied.</param>
    /// <exception cref="OptionsValidationException">The options are invalid (every error listed).</exception>
    public BudgetedSearchStep(BudgetedSearchOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        OptionsValidationException.ThrowIfInvalid(typeof(BudgetedSearchOptions), options.Validate());
        _options = options.Clone();
    }

    /// <inheritdoc/>
    public string Name => $"{StepName}({_options.Fraction * 100:0.#}% of {_options.Kind})";

    /// <inheritdoc/>
    public bool RequiresTrainingData => true;

    /// <summary>Gets the candidates of the last <see cref="Apply"/>, in the order tried.</summary>
    public IReadOnlyList<SearchCandidate> LastTrace { get; private set; } = [];

    /// <summary>Gets whether the last <see cref="Apply"/> met its budget.</summary>
    public bool LastMetBudget { get; private set; }

    /// <inheritdoc/>
    public nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(context);
        _options.Layers.ThrowIfUnknownNames(model);

        var clock = Stopwatch.StartNew();
        var trace = new List<SearchCandidate>();
        var quiet = new CompressionContext(context.Data, context.OriginalModel, context.Device, context.StepSeed, NullLogger.Instance, null, context.CancellationToken);
        double start = Cost(model, context);
        double target = _options.Fraction * start;
        double currentCost = start;
        var current = model;
        int iteration = 0;
        try
        {
            while (currentCost > target && clock.Elapsed < _options.TimeLimit)
            {
                context.CancellationToken.ThrowIfCancellationRequested();
                iteration++;
                double goal = Math.Max(target, currentCost - (_options.StepFraction * start));
                context.ReportProgress(CompressionPhase.Applying, Math.Clamp((start - currentCost) / (start - target), 0, 1));
                var candidates = Propose(current, goal, quiet, context);
                if (candidates.Count == 0)
                {
                    context.AddNote($"iteration {iteration}: no candidate reaches the goal; search stopped");
                    break;
                }

                (nn.Module<Tensor, Tensor> Model, SearchCandidate Entry)? best = null;
                foreach (var (candidate, operation, layers, setting, cost) in candidates)
                {
                    if (clock.Elapsed >= _options.TimeLimit && best is not null)
                    {
                        candidate.Dispose();
                        continue;
                    }

                    try
                    {
                        quiet.Train(candidate, _options.ShortFineTuning, ((TrainingCallbacks?)null).WithDistillation(_options.Distillation, context.OriginalModel));
                    }
                    catch (TrainingDivergedException ex)
                    {
                        // One candidate that cannot be fine-tuned does not end the search: it is discarded and said so.
                        context.AddNote($"iteration {iteration}: candidate {operation} {layers} ({setting}) discarded: {ex.Message}");
                        candidate.Dispose();
                        continue;
                    }

                    double accuracy = context.CalibrationScore(candidate);
                    var entry = new SearchCandidate(iteration, operation, layers, setting, cost, cost / start, accuracy, false);
                    if (best is null || accuracy > best.Value.Entry.Accuracy)
                    {
                        best?.Model.Dispose();
                        best = (candidate, entry);
                    }
                    else
                    {
                        candidate.Dispose();
                    }

                    trace.Add(entry);
                }

                if (best is null)
                {
                    context.AddNote($"iteration {iteration}: every candidate diverged in fine-tuning; search stopped");
                    break;
                }

                int chosen = trace.IndexOf(best.Value.Entry);
                trace[chosen] = trace[chosen] with { Chosen = true };
                if (!ReferenceEquals(current, model))
                {
                    current.Dispose();
                }

                current = best.Value.Model;
                currentCost = best.Value.Entry.Cost;
                context.Logger.LogInformation("{Step}: iteration {Iteration}: {Operation} {Layers} → {Setting}, cost {Cost:P1}, accuracy {Accuracy:0.####}",
                    Name, iteration, best.Value.Entry.Operation, best.Value.Entry.Layers, best.Value.Entry.Setting, best.Value.Entry.CostFraction, best.Value.Entry.Accuracy);
            }

            LastMetBudget = currentCost <= target;
            LastTrace = trace;
            context.AddNote($"{iteration} iterations, {trace.Count} candidates, {clock.Elapsed.TotalSeconds:0} s; cost {currentCost / start:P1} of the start{(LastMetBudget ? string.Empty : " — budget NOT met (time limit or no candidate)")}");
            if (_options.FinalFineTuning is { } final)
            {
                FineTuneOrUndo(current, final, context);
            }

            return current;
        }
        catch
        {
            if (!ReferenceEquals(current, model))
            {
                current.Dispose();
            }

            throw;
        }
    }

    /// <summary>
    /// The final fine-tuning; when it diverges (LibTorch's intermittent non-finite convolution gradients on some CPUs,
    /// see the README), the searched model as it was before is kept, with a note and a warning. Holds one copy of the
    /// model's state while it trains.
    /// </summary>
    private void FineTuneOrUndo(nn.Module<Tensor, Tensor> model, TrainingOptions final, CompressionContext context)
    {
        var saved = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        try
        {
            using (no_grad())
            {
                foreach (var (name, tensor) in model.state_dict())
                {
                    saved[name] = tensor.detach().clone().DetachFromDisposeScope();
                }
            }

            context.Train(model, final, ((TrainingCallbacks?)null).WithDistillation(_options.Distillation, context.OriginalModel));
        }
        catch (TrainingDivergedException ex)
        {
            using (no_grad())
            {
                foreach (var (name, tensor) in model.state_dict())
                {
                    tensor.copy_(saved[name]);
                }
            }

            string note = $"the final fine-tuning diverged and was undone (the searched model is kept as the search left it): {ex.Message}";
            context.AddNote(note);
            context.Logger.LogWarning("{Step}: {Note}", Name, note);
        }
        finally
        {
            foreach (var tensor in saved.Values)
            {
                tensor.Dispose();
            }
        }
    }

    private double Cost(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        switch (_options.Kind)
        {
            case SearchBudgetKind.Parameters:
                return ModelMetrics.CountParameters(model);
            case SearchBudgetKind.Latency:
                return ModelMetrics.MeasureLatency(model, context.SampleShape, new LatencyOptions { Warmup = 3, Repeats = 11 }, context.Device, context.InputType).Batch1;
            default:
                using (NewDisposeScope())
                {
                    var (sample, _) = context.EvaluationData.FirstBatch(1);
                    return ModelMetrics.CountMacs(model, sample.to(context.Device));
                }
        }
    }

    /// <summary>For each group of coupled channels and each factorizable layer, the smallest reduction reaching the goal.</summary>
    private List<(nn.Module<Tensor, Tensor> Model, string Operation, string Layers, long Setting, double Cost)> Propose(
        nn.Module<Tensor, Tensor> current, double goal, CompressionContext quiet, CompressionContext context)
    {
        var result = new List<(nn.Module<Tensor, Tensor>, string, string, long, double)>();
        IReadOnlyList<ChannelGroup> groups;
        using (NewDisposeScope())
        {
            var (sample, _) = context.CalibrationData.FirstBatch(1);
            groups = ChannelGroupTracer.Trace(current, sample.to(context.Device));
        }

        // Layers inside layers this library produced (low-rank factors, sparse or half-precision layers) are not
        // reshaped again: their own bookkeeping (rank, storage) would go stale.
        bool Free(string name) => !ModuleTree.HasAncestor<ICompressedLayer>(current, name, includeRoot: true);
        foreach (var group in groups.Where(g => g.Fixed is null && g.Unresolved is null && g.Members.All(m => Free(m.Name)) && g.Producers.All(p => _options.Layers.Matches(p.Name, p.Module))))
        {
            var names = group.Producers.Select(p => p.Name).ToArray();
            foreach (double ratio in Ratios)
            {
                if (Math.Round(group.Channels * (1 - ratio)) < 1)
                {
                    break;
                }

                var candidate = ModuleCloner.DeepClone(current);
                nn.Module<Tensor, Tensor> pruned;
                try
                {
                    pruned = new StructuredPruningStep(new StructuredPruningOptions { Ratio = ratio, Layers = LayerSelection.Named(names) }).Apply(candidate, quiet);
                }
                catch (Exception ex) when (ex is ArgumentException or UnsupportedModelException)
                {
                    candidate.Dispose();
                    break;
                }

                double cost = Cost(pruned, context);
                if (cost <= goal)
                {
                    result.Add((pruned, "prune", string.Join("+", names), (long)Math.Round(group.Channels * (1 - ratio)), cost));
                    break;
                }

                pruned.Dispose();
            }
        }

        foreach (var (name, module) in _options.Layers.Select(current).Where(m => m.Module is Linear or Conv2d { groups: 1 } && Free(m.Name)))
        {
            var weight = module.named_parameters(recurse: false).First(p => p.name == "weight").parameter;
            long full = module is Linear ? Math.Min(weight.shape[0], weight.shape[1]) : Math.Min(weight.shape[0], weight.numel() / weight.shape[0]);
            for (long rank = full / 2; rank >= 1; rank /= 2)
            {
                var candidate = ModuleCloner.DeepClone(current);
                nn.Module<Tensor, Tensor> factored;
                try
                {
                    factored = new SvdFactorizationStep(new SvdFactorizationOptions { Rank = RankRule.Fixed((int)rank), Layers = LayerSelection.Named(name) }).Apply(candidate, quiet);
                }
                catch (ArgumentException)
                {
                    candidate.Dispose();
                    break;
                }

                if (ModuleTree.GetSubmodule(factored, name) is not LowRankLayer)
                {
                    factored.Dispose();
                    continue; // no gain at this rank: try a lower one
                }

                double cost = Cost(factored, context);
                if (cost <= goal)
                {
                    result.Add((factored, "factorize", name, rank, cost));
                    break;
                }

                factored.Dispose();
            }
        }

        return result;
    }
}
