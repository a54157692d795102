using System.Diagnostics;
using ModelCompression.Data;
using ModelCompression.Modules;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Training;

/// <summary>
/// Trains or fine-tunes a model: the one training loop every compression step shares.
/// </summary>
/// <remarks>
/// Each batch runs inside its own <c>torch.NewDisposeScope()</c>, so a run leaves no tensors behind.
/// Given the same seed, data and model, two runs give the same weights.
/// </remarks>
public sealed class Trainer
{
    /// <summary>Initializes a new instance of the <see cref="Trainer"/> class.</summary>
    /// <param name="options">The options; copied, so later changes do not affect this trainer.</param>
    /// <exception cref="OptionsValidationException">The options are invalid (every error listed).</exception>
    public Trainer(TrainingOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        OptionsValidationException.ThrowIfInvalid(typeof(TrainingOptions), options.Validate());
        Options = options.Clone();
    }

    /// <summary>Gets a copy of the options of this trainer.</summary>
    public TrainingOptions Options { get; }

    /// <summary>Trains <paramref name="model"/> in place on <paramref name="data"/>.</summary>
    /// <param name="model">The model; its parameters that require gradients are trained. Left in training mode as it was.</param>
    /// <param name="data">The training data.</param>
    /// <param name="callbacks">Optional extra loss and after-step hooks.</param>
    /// <param name="seed">The seed used when <see cref="TrainingOptions.Seed"/> is not set.</param>
    /// <param name="progress">Optional progress, reported after every batch.</param>
    /// <param name="cancellationToken">Cancels between batches.</param>
    /// <returns>What the run did.</returns>
    /// <exception cref="ArgumentException">The data set is empty.</exception>
    /// <exception cref="InvalidOperationException">The loss became NaN or infinite.</exception>
    /// <exception cref="OperationCanceledException">The run was cancelled; the model keeps the weights of the last finished step.</exception>
    public TrainingSummary Train(
        nn.Module<Tensor, Tensor> model,
        IBatchSource data,
        TrainingCallbacks? callbacks = null,
        int seed = 0,
        IProgress<TrainingProgress>? progress = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(data);
        if (data.Count == 0)
        {
            throw new ArgumentException("The training data is empty.", nameof(data));
        }

        var options = Options;
        int runSeed = options.Seed ?? seed;
        var parameters = model.parameters().Where(p => p.requires_grad).ToList();
        if (parameters.Count == 0 || options.Epochs == 0)
        {
            return new TrainingSummary(0, 0, [], 0);
        }

        var device = parameters[0].device;
        long batchesPerEpoch = (data.Count + options.BatchSize - 1) / options.BatchSize;
        long totalSteps = batchesPerEpoch * options.Epochs;
        var loss = options.Loss ?? ((output, target) => nn.functional.cross_entropy(output, target));
        double taskWeight = callbacks?.TaskLossWeight ?? 1.0;

        var stopwatch = Stopwatch.StartNew();
        var epochLosses = new List<double>();
        var modes = ModuleModes.Record(model);
        // Dropout and any layer built during training draw from the process-wide generator: seed it, and hold it
        // until the run ends, so a run gives the same model whatever else runs in the process.
        using var exclusive = RandomState.Gate.EnterScope();
        torch.random.manual_seed(runSeed);
        using var optimizer = CreateOptimizer(options, parameters);
        long step = 0, skipped = 0;
        using var batchNormCounting = new BatchNormCounting(model);
        try
        {
            model.train();
            for (int epoch = 0; epoch < options.Epochs; epoch++)
            {
                double sum = 0;
                long batches = 0;
                int shuffleSeed = unchecked((runSeed * 7919) + epoch);
                foreach (var (rawInput, rawTarget) in data.ScopedBatches(options.BatchSize, options.Shuffle, shuffleSeed))
                {
                    cancellationToken.ThrowIfCancellationRequested();
                    var input = rawInput.device == device ? rawInput : rawInput.to(device);
                    var target = rawTarget.device == device ? rawTarget : rawTarget.to(device);

                    double lr = options.Schedule.GetLearningRate(options.LearningRate, step, totalSteps);
                    foreach (var group in optimizer.ParamGroups)
                    {
                        group.LearningRate = lr;
                    }

                    optimizer.zero_grad();
                    var total = TotalLoss(input, target, epoch, step);
                    double value = total.item<float>();
                    if (!double.IsFinite(value))
                    {
                        throw new TrainingDivergedException($"Training diverged: the loss was {value} at epoch {epoch}, step {step}. Lower the learning rate.", epoch, step);
                    }

                    total.backward();

                    // Non-finite gradients under a finite loss come from kernels that compute garbage now and then on
                    // some CPUs: compute the step again (twice at most) before giving it up. A retry runs the forward
                    // again, so a BatchNorm's running statistics see the batch once more.
                    for (int retry = 0; retry < 2 && !GradientsFinite(parameters); retry++)
                    {
                        optimizer.zero_grad();
                        TotalLoss(input, target, epoch, step).backward();
                    }

                    if (!GradientsFinite(parameters))
                    {
                        // A finite loss with non-finite gradients: drop this step rather than poison the weights.
                        skipped++;
                        if (skipped > options.MaxSkippedStepFraction * totalSteps)
                        {
                            throw new TrainingDivergedException(
                                $"Training diverged: the gradients were not finite in {skipped} of {step + 1} steps (the last at epoch {epoch}, step {step}), " +
                                $"more than {nameof(TrainingOptions)}.{nameof(TrainingOptions.MaxSkippedStepFraction)} = {options.MaxSkippedStepFraction} of the run allows. Lower the learning rate.",
                                epoch,
                                step);
                        }

                        optimizer.zero_grad();
                        sum += value;
                        batches++;
                        progress?.Report(new TrainingProgress(epoch, options.Epochs, batches - 1, batchesPerEpoch, value));
                        step++;
                        continue;
                    }

                    if (callbacks?.BeforeOptimizerStep is { } before)
                    {
                        using (no_grad())
                        {
                            before(new TrainingStepInfo(model, epoch, step, totalSteps, value));
                        }
                    }

                    optimizer.step();
                    if (callbacks?.AfterOptimizerStep is { } after)
                    {
                        using (no_grad())
                        {
                            after(new TrainingStepInfo(model, epoch, step, totalSteps, value));
                        }
                    }

                    sum += value;
                    batches++;
                    progress?.Report(new TrainingProgress(epoch, options.Epochs, batches - 1, batchesPerEpoch, value));
                    step++;
                }

                double mean = batches == 0 ? double.NaN : sum / batches;
                epochLosses.Add(mean);
                callbacks?.AfterEpoch?.Invoke(epoch, mean);
            }
        }
        finally
        {
            // Drop the last gradients; zero_grad touches every .grad, which makes tensor wrappers: keep them in a scope.
            using (NewDisposeScope())
            {
                optimizer.zero_grad();
            }

            modes.Dispose();
        }

        return new TrainingSummary(options.Epochs, step, epochLosses, stopwatch.Elapsed.TotalSeconds) { SkippedSteps = skipped };

        // The forward pass and the loss of one batch: the task loss (weighted) and any extra loss the callbacks add.
        Tensor TotalLoss(Tensor input, Tensor target, int epoch, long step)
        {
            var output = model.call(input);
            using var weight = taskWeight.ToScalar();
            var total = taskWeight == 0 ? zeros([], device: device) : loss(output, target).mul(weight);
            return callbacks?.ExtraLoss is { } extra && extra(new TrainingBatch(model, input, target, output, epoch, step)) is { } extraLoss
                ? total.Plus(extraLoss)
                : total;
        }
    }

    /// <summary>Whether every gradient is finite: one reduction per parameter and a single read-back.</summary>
    private static bool GradientsFinite(IList<Parameter> parameters)
    {
        using var scope = NewDisposeScope();
        var sums = parameters.Select(p => p.grad).Where(g => g is not null).Select(g => g!.sum()).ToList();
        // NaN and ±∞ survive a sum (∞ − ∞ is NaN), so one finite total means finite gradients.
        return sums.Count == 0 || isfinite(stack(sums).sum()).item<bool>();
    }

    private static OptimizerHelper CreateOptimizer(TrainingOptions options, IList<Parameter> parameters) => options.Optimizer switch
    {
        OptimizerKind.Sgd => new ScalarSafeSgd(parameters, options.LearningRate, options.Momentum, options.WeightDecay),
        OptimizerKind.Adam => new ScalarSafeAdam(parameters, options.LearningRate, options.WeightDecay),
        OptimizerKind.AdamW => new ScalarSafeAdamW(parameters, options.LearningRate, options.WeightDecay),
        _ => throw new ArgumentOutOfRangeException(nameof(options), options.Optimizer, "Unknown optimizer."),
    };
}
