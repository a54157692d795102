using Microsoft.Extensions.Logging;
using ModelCompression.Metrics;
using static TorchSharp.torch;

namespace ModelCompression;

/// <summary>
/// Builds a <see cref="CompressionPipeline"/>: steps in the order they are added, an optional accuracy check, and run
/// settings. Options are validated when added and again by <see cref="Build"/>, which lists every error in one
/// exception. A builder builds once.
/// </summary>
public sealed class CompressionPipelineBuilder
{
    private readonly List<StepEntry> _steps = [];
    private AccuracyCheckOptions? _accuracyCheck;
    private LatencyOptions _latency = new();
    private int _seed;
    private Device? _device;
    private ILogger? _logger;
    private string? _modelName;
    private Func<nn.Module<Tensor, Tensor>, nn.Module<Tensor, Tensor>>? _cloner;
    private bool _built;

    internal CompressionPipelineBuilder()
    {
    }

    /// <summary>Gets the number of steps added so far.</summary>
    public int StepCount => _steps.Count;

    /// <summary>Adds a step object (any <see cref="ICompressionStep"/>). Steps run in the order they are added.</summary>
    /// <param name="step">The step.</param>
    /// <returns>This builder.</returns>
    /// <exception cref="ArgumentNullException"><paramref name="step"/> is <see langword="null"/>.</exception>
    /// <exception cref="ArgumentException">The step has an empty name.</exception>
    /// <exception cref="InvalidOperationException">The builder has already built its pipeline.</exception>
    public CompressionPipelineBuilder AddStep(ICompressionStep step)
    {
        ArgumentNullException.ThrowIfNull(step);
        EnsureNotBuilt();
        if (string.IsNullOrWhiteSpace(step.Name))
        {
            throw new ArgumentException("A step must have a non-empty name.", nameof(step));
        }

        _steps.Add(new StepEntry(step.Name, () => [], () => step));
        return this;
    }

    /// <summary>
    /// Adds a step created at <see cref="Build"/> from an options object, validated now and again at <see cref="Build"/>.
    /// Technique extensions (<c>AddMagnitudePruning</c> and the others) use this.
    /// </summary>
    /// <typeparam name="TOptions">The options type.</typeparam>
    /// <param name="name">The step's name, for error messages.</param>
    /// <param name="options">The options.</param>
    /// <param name="factory">Creates the step from the options.</param>
    /// <returns>This builder.</returns>
    /// <exception cref="OptionsValidationException">The options are invalid (every error listed).</exception>
    /// <exception cref="InvalidOperationException">The builder has already built its pipeline.</exception>
    public CompressionPipelineBuilder AddStep<TOptions>(string name, TOptions options, Func<TOptions, ICompressionStep> factory)
        where TOptions : class, IValidatableOptions
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(name);
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(factory);
        EnsureNotBuilt();
        OptionsValidationException.ThrowIfInvalid(typeof(TOptions), options.Validate());
        _steps.Add(new StepEntry(name, options.Validate, () => factory(options)));
        return this;
    }

    /// <summary>Checks the evaluation metric after every step against an absolute maximum drop from the baseline.</summary>
    /// <param name="maxDrop">The largest drop allowed, 0 to 1 (0.01 = one percentage point of accuracy).</param>
    /// <param name="policy">What to do when a step drops further. The default is <see cref="AccuracyCheckPolicy.Fail"/>.</param>
    /// <returns>This builder.</returns>
    /// <exception cref="OptionsValidationException"><paramref name="maxDrop"/> is outside 0 to 1, or the policy is unknown.</exception>
    public CompressionPipelineBuilder WithAccuracyCheck(double maxDrop, AccuracyCheckPolicy policy = AccuracyCheckPolicy.Fail) =>
        WithAccuracyCheck(new AccuracyCheckOptions { MaxDrop = maxDrop, Policy = policy });

    /// <summary>Checks the evaluation metric after every step.</summary>
    /// <param name="options">The check's options.</param>
    /// <returns>This builder.</returns>
    /// <exception cref="OptionsValidationException">The options are invalid (every error listed).</exception>
    public CompressionPipelineBuilder WithAccuracyCheck(AccuracyCheckOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        EnsureNotBuilt();
        OptionsValidationException.ThrowIfInvalid(typeof(AccuracyCheckOptions), options.Validate());
        _accuracyCheck = options;
        return this;
    }

    /// <summary>Sets the seed of the run. The same seed, model and data give the same compressed model.</summary>
    /// <param name="seed">The seed. The default is 0.</param>
    /// <returns>This builder.</returns>
    public CompressionPipelineBuilder WithSeed(int seed)
    {
        EnsureNotBuilt();
        _seed = seed;
        return this;
    }

    /// <summary>Sets the device the pipeline's copy of the model runs on.</summary>
    /// <param name="device">The device. The default is CPU.</param>
    /// <returns>This builder.</returns>
    public CompressionPipelineBuilder WithDevice(Device device)
    {
        ArgumentNullException.ThrowIfNull(device);
        EnsureNotBuilt();
        _device = device;
        return this;
    }

    /// <summary>Sets a logger; the library never writes to the console.</summary>
    /// <param name="logger">The logger.</param>
    /// <returns>This builder.</returns>
    public CompressionPipelineBuilder WithLogger(ILogger logger)
    {
        ArgumentNullException.ThrowIfNull(logger);
        EnsureNotBuilt();
        _logger = logger;
        return this;
    }

    /// <summary>Sets the model name the report shows.</summary>
    /// <param name="name">The name. The default is the model's type name.</param>
    /// <returns>This builder.</returns>
    public CompressionPipelineBuilder WithModelName(string name)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(name);
        EnsureNotBuilt();
        _modelName = name;
        return this;
    }

    /// <summary>Sets how latency is measured for the report, or turns it off (<see cref="LatencyOptions.Enabled"/>).</summary>
    /// <param name="options">The options.</param>
    /// <returns>This builder.</returns>
    /// <exception cref="OptionsValidationException">The options are invalid.</exception>
    public CompressionPipelineBuilder WithLatencyMeasurement(LatencyOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        EnsureNotBuilt();
        OptionsValidationException.ThrowIfInvalid(typeof(LatencyOptions), options.Validate());
        _latency = options;
        return this;
    }

    /// <summary>
    /// Replaces the deep copy the pipeline makes of the caller's model (by default <see cref="Modules.ModuleCloner.DeepClone{T}"/>),
    /// for models holding state that cloner cannot see. The function must return a new model sharing no tensor with its argument.
    /// </summary>
    /// <param name="cloner">The copy function.</param>
    /// <returns>This builder.</returns>
    public CompressionPipelineBuilder WithModelCloner(Func<nn.Module<Tensor, Tensor>, nn.Module<Tensor, Tensor>> cloner)
    {
        ArgumentNullException.ThrowIfNull(cloner);
        EnsureNotBuilt();
        _cloner = cloner;
        return this;
    }

    /// <summary>Validates everything and builds the pipeline. A builder builds once.</summary>
    /// <returns>The pipeline.</returns>
    /// <exception cref="OptionsValidationException">Some options are invalid; every error of every step is listed.</exception>
    /// <exception cref="InvalidOperationException">The builder has already built its pipeline.</exception>
    public CompressionPipeline Build()
    {
        EnsureNotBuilt();
        var errors = new List<string>();
        for (int i = 0; i < _steps.Count; i++)
        {
            errors.AddRange(_steps[i].Validate().Select(e => $"step {i + 1} ({_steps[i].Name}): {e}"));
        }

        if (_accuracyCheck is not null)
        {
            errors.AddRange(_accuracyCheck.Validate());
        }

        errors.AddRange(_latency.Validate());
        if (errors.Count > 0)
        {
            throw new OptionsValidationException(nameof(CompressionPipeline), errors);
        }

        _built = true;
        var steps = _steps.Select(s => s.Create()).ToList();
        return new CompressionPipeline(
            steps,
            _accuracyCheck?.Clone(),
            new LatencyOptions { Enabled = _latency.Enabled, Warmup = _latency.Warmup, Repeats = _latency.Repeats },
            _seed,
            _device ?? CPU,
            _logger,
            _modelName,
            _cloner);
    }

    private void EnsureNotBuilt()
    {
        if (_built)
        {
            throw new InvalidOperationException("This builder has already built its pipeline; create a new one with CompressionPipeline.Create().");
        }
    }

    private sealed record StepEntry(string Name, Func<IReadOnlyList<string>> Validate, Func<ICompressionStep> Create);
}
