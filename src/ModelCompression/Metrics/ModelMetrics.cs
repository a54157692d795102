using System.Diagnostics;
using ModelCompression.Modules;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Metrics;

/// <summary>Latency of a model at the two batch sizes the report uses, in milliseconds.</summary>
/// <param name="Batch1">The median latency of one sample.</param>
/// <param name="Batch64">The median latency of a batch of 64.</param>
public sealed record LatencyMeasurement(double Batch1, double Batch64);

/// <summary>Counts of one layer.</summary>
/// <param name="Name">The dotted name, as <c>named_modules()</c> gives it.</param>
/// <param name="Type">The module type name.</param>
/// <param name="Parameters">The number of parameters the layer itself holds (not its children).</param>
/// <param name="NonzeroParameters">The number of those that are not zero.</param>
/// <param name="Macs">The multiply-accumulates of one sample through the layer.</param>
/// <param name="Bits">The bits per stored weight.</param>
/// <param name="Rank">The rank, for low-rank layers.</param>
/// <param name="SqnrDb">A quantized layer's signal-to-quantization-noise ratio in dB, when measured.</param>
/// <param name="SizeBytes">The bytes the layer's tensors (its children's included) take in the compressed file.</param>
public sealed record LayerMeasurement(string Name, string Type, long Parameters, long NonzeroParameters, long Macs, int Bits, int? Rank, double? SqnrDb = null, long? SizeBytes = null);

/// <summary>What the metrics measured of one model.</summary>
/// <param name="Parameters">The number of parameters.</param>
/// <param name="NonzeroParameters">The number of parameters that are not zero.</param>
/// <param name="SizeBytes">The length of the model's compressed file (<see cref="ModelMetrics.SizeInBytes"/>).</param>
/// <param name="Macs">The multiply-accumulates of one sample.</param>
/// <param name="Latency">The measured latency, or <see langword="null"/> when not measured.</param>
/// <param name="Layers">The per-layer breakdown (layers that hold parameters or count MACs).</param>
public sealed record ModelMeasurement(long Parameters, long NonzeroParameters, long SizeBytes, long Macs, LatencyMeasurement? Latency, IReadOnlyList<LayerMeasurement> Layers);

/// <summary>Options of latency measurement.</summary>
public sealed class LatencyOptions
{
    /// <summary>Gets or sets whether latency is measured at all.</summary>
    /// <value>The default is <see langword="true"/>.</value>
    public bool Enabled { get; set; } = true;

    /// <summary>Gets or sets the number of untimed calls before timing.</summary>
    /// <value>The default is 3. Must be between 0 and 1000.</value>
    public int Warmup { get; set; } = 3;

    /// <summary>Gets or sets the number of timed calls; the median is reported.</summary>
    /// <value>The default is 15. Must be between 1 and 10,000.</value>
    public int Repeats { get; set; } = 15;

    /// <summary>Lists every invalid value.</summary>
    /// <returns>One message per invalid value.</returns>
    public IReadOnlyList<string> Validate()
    {
        var errors = new List<string>();
        if (Warmup is < 0 or > 1000)
        {
            errors.Add($"{nameof(LatencyOptions)}.{nameof(Warmup)} must be between 0 and 1000 (was {Warmup}).");
        }

        if (Repeats is < 1 or > 10_000)
        {
            errors.Add($"{nameof(LatencyOptions)}.{nameof(Repeats)} must be between 1 and 10000 (was {Repeats}).");
        }

        return errors;
    }
}

/// <summary>
/// Measures models: parameters, non-zero parameters, bytes, multiply-accumulates (by running one sample through
/// forward hooks) and latency.
/// </summary>
public static class ModelMetrics
{
    /// <summary>
    /// Counts the parameters of a model. Layers of this library (<see cref="ICompressedLayer"/>) count as the dense
    /// layer they stand for, so a sparse layer still counts in × out. A tensor or layer shared by several modules
    /// (tied weights) counts once.
    /// </summary>
    /// <param name="model">The model.</param>
    /// <returns>The number of parameter elements.</returns>
    public static long CountParameters(nn.Module model)
    {
        ArgumentNullException.ThrowIfNull(model);
        var (parameters, layers) = Distinct(model);
        return parameters.Sum(p => p.numel()) + layers.Sum(l => l.ParameterCount);
    }

    /// <summary>Counts the parameters that are not exactly zero (for a sparse layer, the weights it stores that are not zero).</summary>
    /// <param name="model">The model.</param>
    /// <returns>The number of non-zero parameter elements.</returns>
    public static long CountNonzeroParameters(nn.Module model)
    {
        ArgumentNullException.ThrowIfNull(model);
        var (parameters, layers) = Distinct(model);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        return parameters.Sum(p => p.count_nonzero().item<long>()) + layers.Sum(l => l.NonzeroParameterCount);
    }

    /// <summary>The distinct plain parameters and compressed layers of a model (compressed layers stand for their own parameters).</summary>
    private static (List<Parameter> Parameters, List<ICompressedLayer> Layers) Distinct(nn.Module model)
    {
        var seen = new HashSet<object>(ReferenceEqualityComparer.Instance);
        var parameters = new List<Parameter>();
        var layers = new List<ICompressedLayer>();
        void Visit(nn.Module module)
        {
            if (!seen.Add(module))
            {
                return;
            }

            if (module is ICompressedLayer compressed)
            {
                layers.Add(compressed);
                return;
            }

            foreach (var (_, p) in module.named_parameters(recurse: false))
            {
                if (seen.Add(p))
                {
                    parameters.Add(p);
                }
            }

            foreach (var (_, child) in module.named_children())
            {
                Visit(child);
            }
        }

        Visit(model);
        return (parameters, layers);
    }

    /// <summary>
    /// Returns the size of the model as the library's compressed file stores it (<see cref="Serialization.CompressedModel"/>):
    /// the architecture and every tensor, each in the layout and coding that measures smallest. This is what every
    /// report's <c>sizeBytes</c> gives; a dense float32 model takes its parameter bytes plus a few hundred bytes.
    /// </summary>
    /// <param name="model">The model; it is not changed.</param>
    /// <returns>The file's length in bytes.</returns>
    public static long SizeInBytes(nn.Module<Tensor, Tensor> model)
    {
        ArgumentNullException.ThrowIfNull(model);
        return Serialization.CompressedModel.Measure(model).TotalBytes;
    }

    /// <summary>
    /// Returns the bytes of every parameter and persistent buffer in memory, at its element size (4 for fp32, 2 for
    /// fp16/bf16, 1 for int8, ...; bit-packed layers by the tensors they hold). Tied tensors count once.
    /// </summary>
    /// <param name="model">The model.</param>
    /// <returns>The bytes of the model's tensors.</returns>
    public static long TensorBytes(nn.Module model)
    {
        ArgumentNullException.ThrowIfNull(model);
        return model.state_dict().Values.DistinctBy(t => t.Handle).Sum(t => t.numel() * t.ElementSize);
    }

    /// <summary>
    /// Counts the multiply-accumulates of one sample, per layer, by running <paramref name="sample"/> through the model
    /// with forward hooks on every <see cref="ICompressedLayer"/> and every layer whose <see cref="Modules.LayerDescriptor"/>
    /// counts MACs (Linear, convolutions, recurrent, attention and transformer layers, and kinds registered by the
    /// application). Custom modules must call their children with <c>call()</c> for the hooks to fire.
    /// </summary>
    /// <param name="model">The model.</param>
    /// <param name="sample">An input batch; MACs are divided by its first dimension.</param>
    /// <returns>The MACs per sample of each counted layer, by dotted name.</returns>
    public static IReadOnlyDictionary<string, long> CountMacsPerLayer(nn.Module<Tensor, Tensor> model, Tensor sample)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(sample);
        long batch = sample.dim() == 0 ? 1 : Math.Max(1, sample.shape[0]);
        var counts = new Dictionary<string, long>();
        var removers = new List<Action>();
        var modes = ModuleModes.Record(model);
        try
        {
            // named_modules() leaves out the root, which may itself be a layer (a bare Linear); it gets the empty name.
            var all = new List<(string Name, nn.Module Module)> { (string.Empty, model) };
            all.AddRange(model.named_modules());
            // A compressed root counts the whole model itself: every descendant is skipped.
            var compressed = model is ICompressedLayer
                ? [string.Empty]
                : all.Where(m => m.Module is ICompressedLayer && m.Name.Length > 0).Select(m => m.Name + ".").ToList();
            foreach (var (name, module) in all)
            {
                // A compressed layer counts its own MACs; the modules inside it are not counted again.
                bool inside = name.Length > 0 && compressed.Any(prefix => name.StartsWith(prefix, StringComparison.Ordinal));
                if (inside)
                {
                    continue;
                }

                string key = name;
                void Add(long macs) => counts[key] = counts.GetValueOrDefault(key) + macs;
                if (module is ICompressedLayer compressedLayer && module is nn.Module<Tensor, Tensor> layer)
                {
                    removers.Add(layer.register_forward_hook((m, input, output) =>
                    {
                        Add(compressedLayer.CountMacs(input, output));
                        return output;
                    }).remove);
                }
                else if (Modules.LayerRegistry.Find(module)?.AttachMacsCounter(module, Add) is { } remove)
                {
                    removers.Add(remove);
                }
            }

            model.eval();
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            model.call(sample);
        }
        finally
        {
            foreach (var remove in removers)
            {
                remove();
            }

            modes.Dispose();
        }

        return counts.ToDictionary(kv => kv.Key, kv => kv.Value / batch);
    }

    /// <summary>Counts the multiply-accumulates of one sample through the whole model.</summary>
    /// <param name="model">The model.</param>
    /// <param name="sample">An input batch; MACs are divided by its first dimension.</param>
    /// <returns>The MACs per sample.</returns>
    public static long CountMacs(nn.Module<Tensor, Tensor> model, Tensor sample) => CountMacsPerLayer(model, sample).Values.Sum();

    /// <summary>Measures the median latency of the model at batch 1 and 64 on random inputs of the given sample shape.</summary>
    /// <param name="model">The model, measured in evaluation mode without gradients (its mode is restored).</param>
    /// <param name="sampleShape">The shape of one sample, without the batch dimension.</param>
    /// <param name="options">Warm-up and repeats; the defaults when <see langword="null"/>.</param>
    /// <param name="device">The device of the inputs. The default is CPU.</param>
    /// <param name="inputType">The element type of the inputs (e.g. <see cref="ScalarType.Int64"/> for token ids, which are all zero). The default is float32, uniform in [0, 1).</param>
    /// <returns>The median latencies in milliseconds.</returns>
    public static LatencyMeasurement MeasureLatency(nn.Module<Tensor, Tensor> model, IReadOnlyList<long> sampleShape, LatencyOptions? options = null, Device? device = null, ScalarType inputType = ScalarType.Float32)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(sampleShape);
        options ??= new LatencyOptions();
        OptionsValidationException.ThrowIfInvalid(typeof(LatencyOptions), options.Validate());
        return new LatencyMeasurement(
            MedianMilliseconds(model, sampleShape, 1, options, device ?? CPU, inputType),
            MedianMilliseconds(model, sampleShape, 64, options, device ?? CPU, inputType));
    }

    /// <summary>
    /// Measures two models' latency together, alternating calls (A, B, B, A, …) so that drifts in the machine's speed
    /// fall on both alike: the right way to compare a compressed model with its baseline on a noisy machine.
    /// </summary>
    /// <param name="first">The first model (e.g. the baseline).</param>
    /// <param name="second">The second model (e.g. the compressed one).</param>
    /// <param name="sampleShape">The shape of one sample, without the batch dimension.</param>
    /// <param name="options">Warm-up and repeats; the defaults when <see langword="null"/>.</param>
    /// <param name="device">The device of the inputs. The default is CPU.</param>
    /// <param name="inputType">The element type of the inputs (integer inputs are all zero). The default is float32.</param>
    /// <returns>The median latencies of both, in milliseconds.</returns>
    public static (LatencyMeasurement First, LatencyMeasurement Second) MeasureLatencyPaired(
        nn.Module<Tensor, Tensor> first, nn.Module<Tensor, Tensor> second, IReadOnlyList<long> sampleShape, LatencyOptions? options = null, Device? device = null,
        ScalarType inputType = ScalarType.Float32)
    {
        ArgumentNullException.ThrowIfNull(first);
        ArgumentNullException.ThrowIfNull(second);
        ArgumentNullException.ThrowIfNull(sampleShape);
        options ??= new LatencyOptions();
        OptionsValidationException.ThrowIfInvalid(typeof(LatencyOptions), options.Validate());
        var (a1, b1) = PairedMedians(first, second, sampleShape, 1, options, device ?? CPU, inputType);
        var (a64, b64) = PairedMedians(first, second, sampleShape, 64, options, device ?? CPU, inputType);
        return (new LatencyMeasurement(a1, a64), new LatencyMeasurement(b1, b64));
    }

    /// <summary>Measures everything: counts, bytes, MACs, latency (when enabled) and the per-layer breakdown.</summary>
    /// <param name="model">The model.</param>
    /// <param name="sampleShape">The shape of one sample, without the batch dimension.</param>
    /// <param name="latency">Latency options; <see langword="null"/> or disabled skips latency.</param>
    /// <param name="device">The device of the inputs. The default is CPU.</param>
    /// <param name="inputType">The element type of the inputs (integer inputs are all zero). The default is float32.</param>
    /// <returns>The measurement.</returns>
    public static ModelMeasurement Measure(nn.Module<Tensor, Tensor> model, IReadOnlyList<long> sampleShape, LatencyOptions? latency = null, Device? device = null,
        ScalarType inputType = ScalarType.Float32)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(sampleShape);
        device ??= CPU;
        IReadOnlyDictionary<string, long> macs;
        using (NewDisposeScope())
        {
            var sample = zeros([1, .. sampleShape], dtype: inputType, device: device);
            macs = CountMacsPerLayer(model, sample);
        }

        var stored = Serialization.CompressedModel.Measure(model);
        long StoredBytes(string name) => stored.Layers
            .Where(l => l.Name == name || l.Name.StartsWith(name + ".", StringComparison.Ordinal))
            .Sum(l => l.Bytes);
        var layers = new List<LayerMeasurement>();
        using (NewDisposeScope())
        using (no_grad())
        {
            foreach (var (name, module) in model.named_modules())
            {
                var own = module.named_parameters(recurse: false).Select(p => p.parameter).ToList();
                bool counted = macs.ContainsKey(name);
                if (own.Count == 0 && !counted && module is not ICompressedLayer)
                {
                    continue;
                }

                // A compressed layer describes itself as a whole; its children are part of it.
                if (Modules.ModuleTree.HasAncestor<ICompressedLayer>(model, name))
                {
                    continue;
                }

                long count = module is ICompressedLayer layer ? layer.ParameterCount : own.Sum(p => p.numel());
                long nonzero = module is ICompressedLayer nz ? nz.NonzeroParameterCount : own.Sum(p => p.count_nonzero().item<long>());
                int bits = module is ICompressedLayer c ? c.WeightBits : BitsOf(own.FirstOrDefault());
                int? rank = (module as ICompressedLayer)?.Rank;
                layers.Add(new LayerMeasurement(name, module.GetType().Name, count, nonzero, macs.GetValueOrDefault(name), bits, rank, (module as Quantization.IQuantizedLayer)?.SqnrDb, StoredBytes(name)));
            }
        }

        LatencyMeasurement? latencyResult = latency is { Enabled: true } ? MeasureLatency(model, sampleShape, latency, device, inputType) : null;
        return new ModelMeasurement(
            CountParameters(model),
            CountNonzeroParameters(model),
            stored.TotalBytes,
            macs.Values.Sum(),
            latencyResult,
            layers);
    }

    private static int BitsOf(Tensor? tensor) => tensor is null ? 32 : (int)(tensor.ElementSize * 8);

    /// <summary>MACs of one call of a layer, over the whole batch: a compressed layer counts itself, other kinds through their descriptor.</summary>
    internal static long LayerMacs(nn.Module module, Tensor input, Tensor output) => CountLayerMacs(module, input, output) ?? 0;

    private static long? CountLayerMacs(nn.Module module, Tensor input, Tensor output) =>
        module is ICompressedLayer compressed ? compressed.CountMacs(input, output)
        : Modules.LayerRegistry.Find(module)?.CountMacs(module, input, output);

    private static double MedianMilliseconds(nn.Module<Tensor, Tensor> model, IReadOnlyList<long> sampleShape, int batch, LatencyOptions options, Device device, ScalarType inputType) =>
        Medians([model], sampleShape, batch, options, device, inputType)[0];

    private static (double First, double Second) PairedMedians(nn.Module<Tensor, Tensor> first, nn.Module<Tensor, Tensor> second, IReadOnlyList<long> sampleShape, int batch, LatencyOptions options, Device device, ScalarType inputType)
    {
        var medians = Medians([first, second], sampleShape, batch, options, device, inputType);
        return (medians[0], medians[1]);
    }

    /// <summary>Median milliseconds of each model, the models' calls alternating within every repeat.</summary>
    private static double[] Medians(IReadOnlyList<nn.Module<Tensor, Tensor>> models, IReadOnlyList<long> sampleShape, int batch, LatencyOptions options, Device device, ScalarType inputType)
    {
        var modes = models.Select(ModuleModes.Evaluating).ToArray();
        try
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            using var generator = new Generator(12345);
            // Integer inputs (token ids, indices) are all zero: a valid index for any embedding or lookup.
            var input = (is_floating_point(inputType)
                ? rand([batch, .. sampleShape], generator: generator).to(inputType)
                : zeros([batch, .. sampleShape], dtype: inputType)).to(device);
            for (int i = 0; i < options.Warmup; i++)
            {
                foreach (var model in models)
                {
                    using var warm = NewDisposeScope();
                    model.call(input);
                }
            }

            var times = models.Select(_ => new double[options.Repeats]).ToArray();
            for (int i = 0; i < options.Repeats; i++)
            {
                for (int k = 0; k < models.Count; k++)
                {
                    // Alternate the order so neither model always runs second.
                    int m = i % 2 == 0 ? k : models.Count - 1 - k;
                    using var timed = NewDisposeScope();
                    long start = Stopwatch.GetTimestamp();
                    models[m].call(input);
                    if (device.type == DeviceType.CUDA)
                    {
                        // Kernels run asynchronously: wait for them, or only the launches are timed.
                        torch.cuda.synchronize(device);
                    }

                    times[m][i] = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
                }
            }

            return times.Select(Median).ToArray();
        }
        finally
        {
            // Last recorded first: the same model may be measured against itself.
            foreach (var mode in modes.Reverse())
            {
                mode.Dispose();
            }
        }
    }

    private static double Median(double[] values)
    {
        var sorted = values.ToArray();
        Array.Sort(sorted);
        int n = sorted.Length;
        return n % 2 == 1 ? sorted[n / 2] : (sorted[(n / 2) - 1] + sorted[n / 2]) / 2;
    }
}
