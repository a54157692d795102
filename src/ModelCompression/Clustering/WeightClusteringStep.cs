using Microsoft.Extensions.Logging;
using ModelCompression.Distillation;
using ModelCompression.Modules;
using ModelCompression.Pruning;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Clustering;

/// <summary>
/// Weight sharing (Han, Mao and Dally 2016, §3): the non-zero weights of each selected layer are clustered by 1-D
/// k-means into at most 2^bits shared values, every weight is replaced by its centroid, and the centroids are
/// optionally fine-tuned with the summed gradient of their weights. Pruned (zero) weights stay zero. Each layer
/// becomes a <see cref="ClusteredLayer"/>, which the compressed file stores as a codebook plus entropy-coded indices; a
/// Linear or Conv2d held in a field of its own type keeps that type with its weights set to the shared values, as
/// <see cref="WeightClusteringOptions.FixedTypeLayers"/> says.
/// </summary>
public sealed class WeightClusteringStep : ICompressionStep, ICompressionStepRequirements
{
    /// <summary>The base name of the step in reports.</summary>
    public const string StepName = "WeightClustering";

    private readonly WeightClusteringOptions _options;

    /// <summary>Initializes a new instance of the <see cref="WeightClusteringStep"/> class.</summary>
    /// <param name="options">The options; copied.</param>
    /// <exception cref="OptionsValidationException">The options are invalid (every error listed).</exception>
    public WeightClusteringStep(WeightClusteringOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        OptionsValidationException.ThrowIfInvalid(typeof(WeightClusteringOptions), options.Validate());
        _options = options.Clone();
    }

    /// <inheritdoc/>
    public string Name => $"{StepName}({_options.Bits} bits{(_options.LayerBits.Count > 0 ? " with overrides" : string.Empty)}{(_options.FineTuning is null ? string.Empty : ", fine-tuned")})";

    /// <inheritdoc/>
    public bool RequiresTrainingData => _options.FineTuning is not null;

    /// <inheritdoc/>
    /// <exception cref="ArgumentException">
    /// The selection names an unknown layer or selects none, a layer is of a kind that cannot be clustered (not a
    /// Linear, Conv2d or SparseLinear, or a Conv2d with non-zero padding modes), a weight is NaN or infinite, or an
    /// override names a layer that is not selected. Nothing has changed.
    /// </exception>
    /// <exception cref="UnsupportedModelException">
    /// <see cref="WeightClusteringOptions.FixedTypeLayers"/> is <see cref="FixedTypeLayers.Fail"/> and a selected layer cannot be replaced. Nothing has changed.
    /// </exception>
    public nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(context);
        var (targets, fixedTypes) = SelectTargets(model);
        if (_options.FineTuning is not null && context.TrainingData is null)
        {
            throw new InvalidOperationException($"Step '{Name}' fine-tunes and needs training data.");
        }

        using var scope = NewDisposeScope();

        // Only a Linear or Conv2d can hold shared values in place; anything else that cannot be replaced is left.
        bool inPlaceAsked = _options.FixedTypeLayers == FixedTypeLayers.CompressInPlace;
        var leftAlone = fixedTypes
            .Where(f => !inPlaceAsked || ModuleTree.GetSubmodule(model, f.Key) is not (Linear or Conv2d))
            .ToDictionary(f => f.Key, f => f.Value, StringComparer.Ordinal);
        var inPlaceReasons = fixedTypes.Where(f => !leftAlone.ContainsKey(f.Key)).ToDictionary(f => f.Key, f => f.Value, StringComparer.Ordinal);

        // Cluster every layer first (pure computation), then swap them all in.
        var layers = new List<(string Name, ClusterTrainingLayer Layer)>();
        var inPlace = new List<InPlaceClusters>();
        try
        {
            foreach (var (name, module) in targets)
            {
                context.CancellationToken.ThrowIfCancellationRequested();
                int bits = _options.LayerBits.TryGetValue(name, out int b) ? b : _options.Bits;
                if (inPlaceReasons.ContainsKey(name))
                {
                    inPlace.Add(InPlaceClusters.Create(name, module, 1 << bits, _options.Initialization, _options.MaxIterations));
                }
                else if (!leftAlone.ContainsKey(name))
                {
                    layers.Add((name, ClusterTrainingLayer.Create(module, 1 << bits, _options.Initialization, _options.MaxIterations, name)));
                }
            }
        }
        catch
        {
            layers.ForEach(l => l.Layer.Dispose());
            inPlace.ForEach(l => l.Dispose());
            throw;
        }

        try
        {
            foreach (var (name, layer) in layers)
            {
                var old = ModuleTree.GetSubmodule(model, name);
                model = ModuleTree.Replace(model, name, layer);
                old.Dispose();
            }

            inPlace.ForEach(l => l.Assign());
            context.Logger.LogInformation(
                "{Step}: {Layers}",
                Name,
                string.Join(", ", layers.Select(l => $"{l.Name} {l.Layer.Clusters} clusters").Concat(inPlace.Select(l => $"{l.Name} {l.Clusters} clusters in place"))));
            if (_options.FineTuning is { } fineTuning)
            {
                context.ReportProgress(CompressionPhase.Applying, 0.5);
                // A weight held in place is its own parameter: giving every weight of a cluster the cluster's summed
                // gradient moves them all as one centroid would move (element-wise optimizers treat them alike).
                var callbacks = new Training.TrainingCallbacks { BeforeOptimizerStep = inPlace.Count == 0 ? null : _ => inPlace.ForEach(l => l.ShareGradients()) };
                context.Train(model, fineTuning, callbacks.WithDistillation(_options.Distillation, context.OriginalModel));
            }

            var notes = new List<string>();
            foreach (var (name, layer) in layers)
            {
                var clustered = layer.ToClusteredLayer(_options.HalfPrecisionValues);
                notes.Add($"{name}: {clustered.Codebook.Count} shared values over {layer.Clustered} weights");
                model = ModuleTree.Replace(model, name, clustered);
                layer.Dispose();
            }

            foreach (var layer in inPlace)
            {
                int shared = layer.Snap(_options.HalfPrecisionValues);
                notes.Add($"{layer.Name}: {shared} shared values over {layer.Clustered} weights, in place");
            }

            if (notes.Count > 0)
            {
                context.AddNote(string.Join("; ", notes));
            }
        }
        finally
        {
            inPlace.ForEach(l => l.Dispose());
        }

        FixedTypeLayerPolicy.Report(
            context,
            Name,
            "kept their type, each weight set to its shared value in place (the file stores them as a codebook plus indices where that is smaller)",
            inPlaceReasons);
        FixedTypeLayerPolicy.Report(context, Name, "left as they are, their type cannot hold a clustered layer", leftAlone);
        return model;
    }

    private (List<(string Name, nn.Module Module)> Targets, Dictionary<string, string> FixedTypes) SelectTargets(nn.Module<Tensor, Tensor> model)
    {
        var selection = _options.Layers;
        selection.ThrowIfUnknownNames(model);
        var targets = selection.Select(model)
            .Where(t => !ModuleTree.HasAncestor<Metrics.ICompressedLayer>(model, t.Name) || ModuleTree.GetSubmodule(model, t.Name) is SparseLinear)
            .ToList();
        if (targets.Count == 0)
        {
            throw new ArgumentException($"The layer selection ({selection}) selects no layer of the model.", nameof(model));
        }

        foreach (var (name, module) in targets)
        {
            if (ClusterTrainingLayer.WhyUnsupported(module) is { } why)
            {
                throw new ArgumentException($"Layer '{name}' cannot be clustered: {why}.", nameof(model));
            }
        }

        var names = targets.Select(t => t.Name).ToHashSet(StringComparer.Ordinal);
        var stray = _options.LayerBits.Keys.FirstOrDefault(k => !names.Contains(k));
        if (stray is not null)
        {
            throw new ArgumentException($"{nameof(WeightClusteringOptions.LayerBits)} names '{stray}', which is not a selected layer.", nameof(model));
        }

        var fixedTypes = FixedTypeLayerPolicy.Find(
            model, targets.Select(t => t.Name), typeof(ClusteredLayer), _options.FixedTypeLayers, Name, nameof(WeightClusteringOptions));
        return (targets, fixedTypes);
    }
}

/// <summary>
/// Weight sharing in a Linear or Conv2d that must keep its type: the layer's own weight holds the shared values
/// (pruned weights stay zero), and fine-tuning gives every weight of a cluster the cluster's summed gradient, which is
/// the gradient <see cref="ClusterTrainingLayer"/> gives its centroid.
/// </summary>
internal sealed class InPlaceClusters : IDisposable
{
    private readonly nn.Module module;
    private readonly Tensor centroids;
    private readonly Tensor index;

    private InPlaceClusters(string name, nn.Module module, Tensor centroids, Tensor index, long clustered)
    {
        Name = name;
        this.module = module;
        this.centroids = centroids;
        this.index = index;
        Clustered = clustered;
    }

    public string Name { get; }

    public int Clusters => (int)centroids.shape[0];

    public long Clustered { get; }

    private Parameter Weight => module switch
    {
        Linear l => l.weight!,
        Conv2d c => c.weight!,
        _ => throw new InvalidOperationException($"Layer '{Name}' is a {module.GetType().Name}; only a Linear or Conv2d holds shared values in place."),
    };

    private Parameter? Bias => module switch
    {
        Linear l => l.bias,
        Conv2d c => c.bias,
        _ => null,
    };

    /// <summary>Runs k-means on the layer's non-zero weights without changing the layer.</summary>
    public static InPlaceClusters Create(string name, nn.Module module, int maxClusters, CentroidInitialization initialization, int maxIterations)
    {
        using var layer = ClusterTrainingLayer.Create(module, maxClusters, initialization, maxIterations, name);
        using var scope = NewDisposeScope();
        return new InPlaceClusters(
            name,
            module,
            layer.Centroids.detach().clone().DetachFromDisposeScope(),
            layer.Index.flatten().clone().DetachFromDisposeScope(),
            layer.Clustered);
    }

    /// <summary>Sets every weight to its centroid.</summary>
    public void Assign()
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var weight = Weight;
        var table = cat([centroids, zeros(1, dtype: centroids.dtype)]).to(weight.dtype).to(weight.device);
        weight.copy_(table.index_select(0, index.to(weight.device)).reshape(weight.shape));
    }

    /// <summary>Replaces each weight's gradient by its cluster's sum (zero for pruned weights).</summary>
    public void ShareGradients()
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        if (Weight.grad is not { } gradient)
        {
            return;
        }

        var where = index.to(gradient.device);
        var sums = zeros(Clusters + 1, dtype: gradient.dtype, device: gradient.device).index_add_(0, where, gradient.flatten(), KeptScalars.One);
        sums.narrow(0, Clusters, 1).zero_();
        gradient.copy_(sums.index_select(0, where).reshape(gradient.shape));
    }

    /// <summary>
    /// Sets every weight to its cluster's mean (the weights of a cluster moved together, so this only removes rounding
    /// drift), rounding the shared values and the bias to float16 values when asked. Returns the number of shared values.
    /// </summary>
    public int Snap(bool half)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var weight = Weight;
        var where = index.to(weight.device);
        var values = weight.detach().flatten().to(ScalarType.Float64);
        var sums = zeros(Clusters + 1, dtype: ScalarType.Float64, device: weight.device).index_add_(0, where, values, KeptScalars.One);
        var counts = zeros(Clusters + 1, dtype: ScalarType.Float64, device: weight.device).index_add_(0, where, ones_like(values), KeptScalars.One);
        var table = (sums / counts.clamp_min(KeptScalars.One)).to(weight.dtype);
        table.narrow(0, Clusters, 1).zero_();
        if (half)
        {
            table = table.to(ScalarType.Float16).to(weight.dtype);
            if (Bias is { } bias)
            {
                bias.copy_(bias.to(ScalarType.Float16).to(bias.dtype));
            }
        }

        weight.copy_(table.index_select(0, where).reshape(weight.shape));
        return (int)counts.narrow(0, 0, Clusters).count_nonzero().item<long>();
    }

    public void Dispose()
    {
        centroids.Dispose();
        index.Dispose();
    }
}

/// <summary>
/// A layer during weight sharing: its weight is <c>centroids[index]</c> (pruned weights index a fixed zero), so
/// autograd sums the gradients of every weight of a cluster into its centroid, as Deep Compression's fine-tuning does.
/// </summary>
internal sealed class ClusterTrainingLayer : nn.Module<Tensor, Tensor>
{
    private readonly Parameter centroids;
    private readonly Tensor index;
    private readonly Parameter? bias;
    private readonly long[] weightShape;
    private readonly ConvShapeSpec? conv;
    private readonly bool sparse;

    private ClusterTrainingLayer(float[] centroidValues, long[] assignment, long[] weightShape, Tensor? bias, ConvShapeSpec? conv, bool sparse, long clustered)
        : base(nameof(ClusterTrainingLayer))
    {
        centroids = new Parameter(tensor(centroidValues));
        index = tensor(assignment);
        this.bias = bias is null ? null : new Parameter(bias);
        this.weightShape = weightShape;
        this.conv = conv;
        this.sparse = sparse;
        Clustered = clustered;
        RegisterComponents();
    }

    public int Clusters => (int)centroids.shape[0];

    public long Clustered { get; }

    /// <summary>Gets the shared values (the fixed zero of pruned weights excluded).</summary>
    internal Tensor Centroids => centroids;

    /// <summary>Gets each weight's cluster, in the weight's order; <see cref="Clusters"/> marks a pruned weight.</summary>
    internal Tensor Index => index;

    public static string? WhyUnsupported(nn.Module module) => module switch
    {
        Linear or SparseLinear => null,
        Conv2d c when c.padding_mode != PaddingModes.Zeros || c.padding_type is not null => "only zero numeric padding is supported",
        Conv2d => null,
        _ => $"a {module.GetType().Name} is not a Linear, Conv2d or SparseLinear",
    };

    public static ClusterTrainingLayer Create(nn.Module module, int maxClusters, CentroidInitialization initialization, int maxIterations, string name)
    {
        float[] values;
        long[] shape;
        float[]? bias;
        using (NewDisposeScope())
        using (no_grad())
        {
            var weight = ClusteredLayer.DenseWeight(module).to(ScalarType.Float32).cpu().contiguous();
            if (!isfinite(weight).all().item<bool>())
            {
                throw new ArgumentException($"Layer '{name}' has NaN or infinite weights.", nameof(module));
            }

            values = weight.flatten().data<float>().ToArray();
            shape = weight.shape;
            var b = module switch
            {
                Linear l => l.bias,
                SparseLinear s => s.Bias,
                Conv2d c => c.bias,
                _ => throw new ArgumentException(WhyUnsupported(module), nameof(module)),
            };
            bias = b?.detach().to(ScalarType.Float32).cpu().data<float>().ToArray();
        }

        var nonzero = values.Where(v => v != 0).ToArray();
        var (book, assignment) = KMeans1D.Cluster(nonzero, maxClusters, initialization, maxIterations);
        var indices = new long[values.Length];
        int next = 0;
        for (int i = 0; i < values.Length; i++)
        {
            indices[i] = values[i] == 0 ? book.Length : assignment[next++];
        }

        var spec = module is Conv2d c2 ? new ConvShapeSpec(c2.in_channels, [.. c2.stride], [.. c2.padding!], [.. c2.dilation], c2.groups) : null;
        return new ClusterTrainingLayer(book, indices, shape, bias is null ? null : tensor(bias), spec, module is SparseLinear, nonzero.Length);
    }

    public override Tensor forward(Tensor input)
    {
        using var scope = NewDisposeScope();
        var weight = Weight();
        var output = conv is { } c
            ? nn.functional.conv2d(input, weight, bias, c.Stride, c.Padding, c.Dilation, c.Groups)
            : nn.functional.linear(input, weight, bias);
        return output.MoveToOuterDisposeScope();
    }

    /// <summary>Builds the inference layer: the original kind of layer holding the centroid values, wrapped as clustered.</summary>
    public ClusteredLayer ToClusteredLayer(bool half)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var weight = Weight().detach().cpu();
        var b = bias?.detach().cpu();
        if (half)
        {
            weight = weight.to(ScalarType.Float16).to(ScalarType.Float32);
            b = b?.to(ScalarType.Float16).to(ScalarType.Float32);
        }

        nn.Module<Tensor, Tensor> inner;
        if (conv is { } c)
        {
            var layer = nn.Conv2d(c.InChannels, weightShape[0], (weightShape[2], weightShape[3]), (c.Stride[0], c.Stride[1]), (c.Padding[0], c.Padding[1]), (c.Dilation[0], c.Dilation[1]), PaddingModes.Zeros, c.Groups, b is not null);
            layer.weight!.copy_(weight);
            layer.bias?.copy_(b!);
            inner = layer;
        }
        else
        {
            var layer = nn.Linear(weightShape[1], weightShape[0], hasBias: b is not null);
            layer.weight!.copy_(weight);
            layer.bias?.copy_(b!);
            if (sparse)
            {
                inner = SparseLinear.FromLinear(layer);
                layer.Dispose();
            }
            else
            {
                inner = layer;
            }
        }

        return new ClusteredLayer(inner);
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            index.Dispose();
        }

        base.Dispose(disposing);
    }

    private Tensor Weight()
    {
        var table = cat([centroids, zeros(1, dtype: centroids.dtype, device: centroids.device)]);
        return table.index_select(0, index.to(centroids.device)).reshape(weightShape);
    }

    private sealed record ConvShapeSpec(long InChannels, long[] Stride, long[] Padding, long[] Dilation, long Groups);
}

/// <summary>One-dimensional k-means (Lloyd's algorithm on sorted values, so each pass is linear).</summary>
internal static class KMeans1D
{
    /// <summary>Clusters the values; returns the centroids (ascending, no empty cluster) and each value's cluster.</summary>
    public static (float[] Centroids, int[] Assignment) Cluster(float[] values, int maxClusters, CentroidInitialization initialization, int maxIterations)
    {
        if (values.Length == 0)
        {
            return ([], []);
        }

        var order = Enumerable.Range(0, values.Length).ToArray();
        var sorted = (float[])values.Clone();
        Array.Sort(sorted, order);
        int k = Math.Min(maxClusters, CountDistinct(sorted));
        var centroids = new double[k];
        for (int c = 0; c < k; c++)
        {
            centroids[c] = k == 1 ? sorted.Average(v => (double)v)
                : initialization == CentroidInitialization.Linear
                    ? sorted[0] + ((sorted[^1] - (double)sorted[0]) * c / (k - 1))
                    : sorted[(int)Math.Min(sorted.Length - 1, (c + 0.5) * sorted.Length / k)];
        }

        // cluster[i]: the cluster of sorted[i]; with sorted values and centroids each cluster is a contiguous run.
        var cluster = new int[sorted.Length];
        for (int iteration = 0; iteration < maxIterations; iteration++)
        {
            Array.Sort(centroids);
            bool changed = false;
            int current = 0;
            for (int i = 0; i < sorted.Length; i++)
            {
                while (current + 1 < k && Math.Abs(sorted[i] - centroids[current + 1]) <= Math.Abs(sorted[i] - centroids[current]))
                {
                    current++;
                }

                changed |= cluster[i] != current || iteration == 0;
                cluster[i] = current;
            }

            var sums = new double[k];
            var counts = new int[k];
            for (int i = 0; i < sorted.Length; i++)
            {
                sums[cluster[i]] += sorted[i];
                counts[cluster[i]]++;
            }

            for (int c = 0; c < k; c++)
            {
                if (counts[c] > 0)
                {
                    centroids[c] = sums[c] / counts[c];
                }
            }

            if (!changed)
            {
                break;
            }
        }

        // Drop empty clusters and renumber.
        var used = cluster.Distinct().Order().ToArray();
        var renumber = new int[k];
        for (int i = 0; i < used.Length; i++)
        {
            renumber[used[i]] = i;
        }

        var book = used.Select(c => (float)centroids[c]).ToArray();
        var assignment = new int[values.Length];
        for (int i = 0; i < sorted.Length; i++)
        {
            assignment[order[i]] = renumber[cluster[i]];
        }

        return (book, assignment);
    }

    private static int CountDistinct(float[] sorted)
    {
        int count = sorted.Length == 0 ? 0 : 1;
        for (int i = 1; i < sorted.Length; i++)
        {
            count += sorted[i] != sorted[i - 1] ? 1 : 0;
        }

        return count;
    }
}
