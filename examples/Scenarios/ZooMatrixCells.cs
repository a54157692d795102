using System.Diagnostics;
using System.Reflection;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using Microsoft.ML.OnnxRuntime;
using ModelCompression;
using ModelCompression.Architecture;
using ModelCompression.Clustering;
using ModelCompression.Data;
using ModelCompression.Interop.Onnx;
using ModelCompression.Metrics;
using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Serialization;
using ModelCompression.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace Scenarios;

/// <summary>A column of the zoo matrix: one technique, added with the library's short <c>Add…</c> overloads where they fit.</summary>
/// <param name="Key">The column's short name.</param>
/// <param name="Add">Adds the technique to a pipeline.</param>
/// <param name="OnnxTolerance">ONNX Runtime's largest allowed logit difference, relative to the largest logit (at least 1).</param>
public sealed record ZooTechnique(string Key, Func<CompressionPipelineBuilder, CompressionPipelineBuilder> Add, double OnnxTolerance)
{
    /// <summary>The columns, in table order.</summary>
    public static IReadOnlyList<ZooTechnique> All { get; } =
    [
        new("prune", b => b.AddMagnitudePruning(0.5), 1e-4),
        // Half the channels, kept in multiples of 16: LibTorch's float32 k×k convolutions on other counts above 16 are wrong on
        // this machine (README, LibTorch faults), which would measure LibTorch rather than the pruning.
        new("struct", b => b.AddStructuredPruning(new ModelCompression.Pruning.StructuredPruningOptions { Ratio = 0.5, RoundTo = 16 }), 1e-4),
        new("dyn8", b => b.AddPostTrainingQuantization(QuantizationMode.DynamicInt8), 0.1),
        new("stat8", b => b.AddPostTrainingQuantization(new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8, CalibrationBatches = 2, CalibrationBatchSize = 32 }), 0.1),
        new("int4", b => b.AddPostTrainingQuantization(QuantizationMode.WeightOnlyInt4), 0.1),
        new("fp16", b => b.AddHalfPrecision(HalfPrecisionFormat.Float16), 0.02),
        new("bf16", b => b.AddHalfPrecision(HalfPrecisionFormat.BFloat16), 0.05),
        new("svd", b => b.AddSvdFactorization(0.9), 1e-4),
        new("cluster", b => b.AddWeightClustering(4), 1e-4),
        new("qat", b => b.AddQuantizationAwareTraining(8, new TrainingOptions { Epochs = 1, BatchSize = 32, Optimizer = OptimizerKind.Sgd, LearningRate = 0.001 }), 0.1),
        new("dwsep", b => b.AddDepthwiseSeparableRewrite(new DepthwiseSeparableRewriteOptions { Recovery = null, Distillation = null }), 1e-4),
    ];

    /// <summary>Whether the technique applies to the model at all (the depthwise-separable rewrite needs k×k convolutions).</summary>
    public bool AppliesTo(ZooModelSpec model) => Key != "dwsep" || model.HasConv2d;
}

/// <summary>How one stage of a cell ended.</summary>
public enum ZooOutcome
{
    /// <summary>It ran (for save/load: outputs bit-identical; for ONNX: within tolerance).</summary>
    Works,

    /// <summary>It ran, but the result is wrong (save/load outputs differ; ONNX outside tolerance) or, for the pipeline, nothing was compressed.</summary>
    Mismatch,

    /// <summary>A documented, public exception thrown on purpose by the library (e.g. <see cref="UnsupportedModelException"/>).</summary>
    ClearError,

    /// <summary>Any other exception: an internal type, LibTorch's <see cref="ExternalException"/>, a null reference, an index out of range…</summary>
    Failed,

    /// <summary>The process died (a signal) or hung in this stage.</summary>
    Crash,
}

/// <summary>One cell's result, as the child process writes it (one JSON line) and the parent tabulates it.</summary>
public sealed class ZooCell
{
    public string Model { get; set; } = string.Empty;

    public string Technique { get; set; } = string.Empty;

    public ZooOutcome Pipeline { get; set; }

    public ZooOutcome? SaveLoad { get; set; }

    public ZooOutcome? Onnx { get; set; }

    /// <summary>The first error of the cell: stage, exception type and shortened message.</summary>
    public string? Error { get; set; }

    public string? SaveLoadError { get; set; }

    public string? OnnxError { get; set; }

    public double Agreement { get; set; }

    public double SizeRatio { get; set; }

    public double Speedup1 { get; set; }

    public double Speedup64 { get; set; }

    public double Seconds { get; set; }

    public long SizeBytes { get; set; }

    public long BaselineSizeBytes { get; set; }

    public double? OnnxMaxDifference { get; set; }

    public double? OnnxAllowedDifference { get; set; }

    /// <summary>Whether the caller's model hashed the same (state_dict bytes, SHA-256) after the cell as before it.</summary>
    public bool CallerUnchanged { get; set; } = true;

    /// <summary>Whether any stage threw an exception whose type is not a clear, public error, or the process crashed.</summary>
    public bool Internal => Pipeline is ZooOutcome.Failed or ZooOutcome.Crash || SaveLoad is ZooOutcome.Failed || Onnx is ZooOutcome.Failed;

    /// <summary>The short code of the table: pipeline, save/load and ONNX, one character each.</summary>
    public string Code => Pipeline switch
    {
        ZooOutcome.Works => "W" + Sub(SaveLoad) + Sub(Onnx),
        ZooOutcome.Mismatch => "N",
        ZooOutcome.ClearError => "E",
        ZooOutcome.Failed => "F",
        _ => "X",
    };

    private static string Sub(ZooOutcome? o) => o switch
    {
        ZooOutcome.Works => "=",
        ZooOutcome.Mismatch => "≠",
        ZooOutcome.ClearError => "e",
        ZooOutcome.Failed => "f",
        ZooOutcome.Crash => "x",
        _ => "?",
    };
}

/// <summary>Runs the cells of one model, in the child process, writing a line before each stage so the parent can name the stage that crashed.</summary>
internal sealed class ZooCellRunner(ZooModelSpec spec, int seed, TextWriter journal, TextWriter log)
{
    /// <summary>Samples run one at a time through ONNX Runtime and TorchSharp for parity.</summary>
    private const int OnnxSamples = 8;

    public static JsonSerializerOptions Json { get; } = new() { PropertyNamingPolicy = JsonNamingPolicy.CamelCase, Converters = { new System.Text.Json.Serialization.JsonStringEnumConverter() } };

    public void Run(IReadOnlyList<ZooTechnique> techniques)
    {
        Stage("-", "build");
        var watch = Stopwatch.StartNew();
        manual_seed(seed);
        using var model = spec.Build();
        model.eval();
        double buildSeconds = watch.Elapsed.TotalSeconds;

        // Inputs and labels: labels are the model's own predictions, so accuracy is agreement with the original.
        Stage("-", "data");
        watch.Restart();
        using var train = MakeData(model, seed + 1);
        using var test = MakeData(model, seed + 2);
        double forwardSeconds = watch.Elapsed.TotalSeconds;
        string hash = Hash(model);
        log.WriteLine($"[{spec.Name}] built in {buildSeconds:0.00} s; {2 * spec.Samples} labelling forwards in {forwardSeconds:0.00} s; {model.parameters().Sum(p => p.numel()):N0} parameters");
        Write(new { kind = "model", model = spec.Name, buildSeconds, forwardSeconds, parameters = model.parameters().Sum(p => p.numel()) });

        foreach (var technique in techniques)
        {
            var cell = RunCell(model, technique, new CompressionData(train, test));
            string after = Hash(model);
            cell.CallerUnchanged = after == hash;
            hash = after;
            Write(new { kind = "cell", cell });
            log.WriteLine($"[{spec.Name}] {technique.Key,-8} {cell.Code,-3} {cell.Seconds,6:0.0} s  {cell.Error ?? cell.SaveLoadError ?? cell.OnnxError ?? string.Empty}");
        }
    }

    private ZooCell RunCell(nn.Module<Tensor, Tensor> model, ZooTechnique technique, CompressionData data)
    {
        var cell = new ZooCell { Model = spec.Name, Technique = technique.Key };
        var watch = Stopwatch.StartNew();
        using var scope = NewDisposeScope();
        CompressionResult result;
        Stage(technique.Key, "pipeline");
        try
        {
            var builder = CompressionPipeline.Create()
                .WithModelName(spec.Name)
                .WithSeed(seed)
                .WithAccuracyCheck(1.0, AccuracyCheckPolicy.SkipStep)
                .WithLatencyMeasurement(new LatencyOptions { Warmup = 1, Repeats = 3 });
            result = technique.Add(builder).Build().Run(model, data);
        }
        catch (Exception e)
        {
            (cell.Pipeline, cell.Error) = Classify("pipeline", e);
            cell.Seconds = watch.Elapsed.TotalSeconds;
            return cell;
        }

        using (result)
        {
            var report = result.Report;
            var f = report.Final;
            var b = report.Baseline;
            cell.Agreement = f.Accuracy;
            cell.SizeBytes = f.SizeBytes;
            cell.BaselineSizeBytes = b.SizeBytes;
            cell.SizeRatio = report.CompressionRatio;
            cell.Speedup1 = report.Speedup?.Batch1 ?? 0;
            cell.Speedup64 = report.Speedup?.Batch64 ?? 0;

            // A step the pipeline ran but that changed nothing (no layer it could take) is not a working cell.
            // (A converted layer — fewer bits, a rank — counts even where the file does not shrink. Kept fractions
            // below 1 do not: zero-initialised biases, as in attention, are not pruning.)
            bool changed = report.Steps.Any(s => s.Accepted) &&
                (f.SizeBytes < b.SizeBytes || f.Parameters != b.Parameters || f.NonzeroParameters < b.NonzeroParameters ||
                 (report.Layers ?? []).Any(l => l.Bits is > 0 and < 32 || l.Rank is not null));
            cell.Pipeline = changed ? ZooOutcome.Works : ZooOutcome.Mismatch;
            if (!changed)
            {
                cell.Error = $"pipeline: nothing compressed ({report.Steps.FirstOrDefault()?.Message ?? "step accepted, sizes unchanged"})";
            }

            using var probe = Probe(data.Evaluation);
            Stage(technique.Key, "save/load");
            (cell.SaveLoad, cell.SaveLoadError) = SaveAndLoad(result.Model, probe);
            Stage(technique.Key, "onnx");
            (cell.Onnx, cell.OnnxError, cell.OnnxMaxDifference, cell.OnnxAllowedDifference) = Onnx(result.Model, probe, technique.OnnxTolerance);
        }

        cell.Seconds = watch.Elapsed.TotalSeconds;
        return cell;
    }

    private (ZooOutcome, string?) SaveAndLoad(nn.Module<Tensor, Tensor> compressed, Tensor probe)
    {
        string path = Path.Combine(Path.GetTempPath(), $"zoo-matrix-{Environment.ProcessId}-{spec.Name}.mcz");
        try
        {
            CompressedModel.Save(compressed, path);

            // Models holding modules of their own (torchvision's blocks, our classifiers) load into a fresh architecture.
            using var architecture = spec.CustomModules ? spec.Build() : null;
            using var loaded = architecture is null ? CompressedModel.Load(path) : CompressedModel.Load(path, architecture);
            using var noGrad = no_grad();
            compressed.eval();
            using var expected = compressed.call(probe);
            using var actual = loaded.call(probe);
            if (expected.shape.SequenceEqual(actual.shape) && expected.dtype == actual.dtype && Identical(expected, actual))
            {
                return (ZooOutcome.Works, null);
            }

            // LibTorch's float32 kernels that are wrong on this machine (see the README's LibTorch faults) are not even
            // repeatable: where float32 outputs differ, both models run in float64, where they must agree bit for bit.
            if (expected.shape.SequenceEqual(actual.shape) && Float64Identical(compressed, loaded, probe))
            {
                return (ZooOutcome.Works, "save/load: identical in float64 (LibTorch's float32 outputs are not repeatable here)");
            }

            return (ZooOutcome.Mismatch, $"save/load: outputs differ after load (max {(expected.shape.SequenceEqual(actual.shape) ? (expected - actual).abs().max().item<float>() : float.NaN):G3})");
        }
        catch (Exception e)
        {
            return Classify("save/load", e);
        }
        finally
        {
            File.Delete(path);
        }
    }

    /// <summary>Whether float64 copies of the two models give identical outputs (false when they cannot run in float64).</summary>
    private static bool Float64Identical(nn.Module<Tensor, Tensor> first, nn.Module<Tensor, Tensor> second, Tensor probe)
    {
        try
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            using var a = ModuleCloner.DeepClone(first);
            using var b = ModuleCloner.DeepClone(second);
            a.to(ScalarType.Float64).eval();
            b.to(ScalarType.Float64).eval();
            var x = probe.is_floating_point() ? probe.to(ScalarType.Float64) : probe;
            return Identical(a.call(x), b.call(x));
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            return false;
        }
    }

    private static bool Identical(Tensor expected, Tensor actual)
    {
        using var scope = NewDisposeScope();
        var nan = expected.isnan();
        return nan.eq(actual.isnan()).all().item<bool>()
            && expected.masked_fill(nan, 0).eq(actual.masked_fill(nan, 0)).all().item<bool>();
    }

    private (ZooOutcome, string?, double?, double?) Onnx(nn.Module<Tensor, Tensor> compressed, Tensor probe, double tolerance)
    {
        try
        {
            var exportOptions = new OnnxExportOptions { InputType = spec.Vocabulary > 0 ? ScalarType.Int64 : ScalarType.Float32 };
            foreach (var (type, emitter) in spec.OnnxEmitters)
            {
                exportOptions.CustomModules[type] = emitter;
            }

            var bytes = OnnxExporter.ToBytes(compressed, spec.SampleShape, exportOptions);
            using var options = new SessionOptions { IntraOpNumThreads = 2 };
            using var session = new InferenceSession(bytes, options);
            double maxDifference = 0, maxLogit = 0;

            // One sample a call, as a service answers requests: ONNX Runtime's dynamic int8 ranges a whole call, the library each row.
            for (int i = 0; i < probe.shape[0]; i++)
            {
                using var scope = NewDisposeScope();
                using var noGrad = no_grad();
                var x = probe[i..(i + 1)];
                var expected = compressed.call(x).contiguous().data<float>().ToArray();
                using var input = spec.Vocabulary > 0
                    ? OrtValue.CreateTensorValueFromMemory(x.contiguous().data<long>().ToArray(), x.shape)
                    : OrtValue.CreateTensorValueFromMemory(x.contiguous().data<float>().ToArray(), x.shape);
                using var runOptions = new RunOptions();
                using var outputs = session.Run(runOptions, ["input"], [input], ["output"]);
                var actual = outputs[0].GetTensorDataAsSpan<float>().ToArray();
                maxDifference = Math.Max(maxDifference, actual.Zip(expected).Max(p => Math.Abs(p.First - p.Second)));
                maxLogit = Math.Max(maxLogit, expected.Max(Math.Abs));
            }

            double allowed = tolerance * Math.Max(1, maxLogit);
            if (maxDifference <= allowed)
            {
                return (ZooOutcome.Works, null, maxDifference, allowed);
            }

            // LibTorch's own float32 kernels are wrong on this machine for some layers (convolutions whose input
            // channels are not a multiple of 16, the LSTM; see the README's LibTorch faults), where its float64
            // kernels and ONNX Runtime agree: compare with the model in float64 before calling it a mismatch.
            double? float64Difference = Float64Difference(compressed, probe, session);
            return float64Difference <= allowed
                ? (ZooOutcome.Works, $"onnx: parity with the float64 model (LibTorch float32 differs by {maxDifference:G3})", float64Difference, allowed)
                : (ZooOutcome.Mismatch, $"onnx: max difference {maxDifference:G3} > {allowed:G3}" + (float64Difference is { } d ? $" (float64 model: {d:G3})" : string.Empty), maxDifference, allowed);
        }
        catch (Exception e)
        {
            var (outcome, text) = Classify("onnx", e);
            return (outcome, text, null, null);
        }
    }

    /// <summary>The largest difference between ONNX Runtime and a float64 copy of the model, or null when the model cannot run in float64.</summary>
    private double? Float64Difference(nn.Module<Tensor, Tensor> compressed, Tensor probe, InferenceSession session)
    {
        try
        {
            using var copy = ModuleCloner.DeepClone(compressed);
            copy.to(ScalarType.Float64).eval();
            double maxDifference = 0;
            for (int i = 0; i < probe.shape[0]; i++)
            {
                using var scope = NewDisposeScope();
                using var noGrad = no_grad();
                var x = probe[i..(i + 1)];
                var expected = copy.call(x.is_floating_point() ? x.to(ScalarType.Float64) : x).to(ScalarType.Float32).contiguous().data<float>().ToArray();
                using var input = spec.Vocabulary > 0
                    ? OrtValue.CreateTensorValueFromMemory(x.contiguous().data<long>().ToArray(), x.shape)
                    : OrtValue.CreateTensorValueFromMemory(x.contiguous().data<float>().ToArray(), x.shape);
                using var runOptions = new RunOptions();
                using var outputs = session.Run(runOptions, ["input"], [input], ["output"]);
                var actual = outputs[0].GetTensorDataAsSpan<float>().ToArray();
                maxDifference = Math.Max(maxDifference, actual.Zip(expected).Max(p => Math.Abs(p.First - p.Second)));
            }

            return maxDifference;
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            // A layer that cannot run in float64: no float64 reference.
            return null;
        }
    }

    /// <summary>
    /// A clear error is a public exception the library threw on purpose: a public type of the library, or one of the
    /// BCL's argument/state/support types raised from a library method. Anything else — a non-public type, LibTorch's
    /// ExternalException, a BCL exception raised inside the BCL or TorchSharp (a null reference, an index out of range,
    /// LINQ's "Sequence contains no elements") — is a failure of the library.
    /// </summary>
    public static (ZooOutcome, string) Classify(string stage, Exception e)
    {
        while (e is TargetInvocationException or AggregateException { InnerExceptions.Count: 1 } && e.InnerException is not null)
        {
            e = e.InnerException;
        }

        var type = e.GetType();
        bool isPublic = type.IsPublic || type.IsNestedPublic;
        bool libraryType = type.Namespace?.StartsWith("ModelCompression", StringComparison.Ordinal) == true;
        string? thrower = e.TargetSite?.DeclaringType?.Namespace;
        bool thrownByLibrary = thrower?.StartsWith("ModelCompression", StringComparison.Ordinal) == true ||
            (e.TargetSite?.Name.StartsWith("Throw", StringComparison.Ordinal) == true && new StackTrace(e).GetFrames()
                .Select(f => f.GetMethod()?.DeclaringType?.Namespace)
                .FirstOrDefault(n => n is not null && !n.StartsWith("System", StringComparison.Ordinal))?.StartsWith("ModelCompression", StringComparison.Ordinal) == true);
        bool clear = isPublic && (libraryType ||
            (thrownByLibrary && e is NotSupportedException or InvalidOperationException or ArgumentException or InvalidDataException or OperationCanceledException
                && e is not ObjectDisposedException));
        string message = e.Message.ReplaceLineEndings(" ");
        message = message.Length > 160 ? message[..157] + "..." : message;
        return (clear ? ZooOutcome.ClearError : ZooOutcome.Failed, $"{stage}: {type.Name}: {message}");
    }

    private TensorDataset MakeData(nn.Module<Tensor, Tensor> model, int dataSeed)
    {
        using var scope = NewDisposeScope();
        manual_seed(dataSeed);
        long[] shape = [spec.Samples, .. spec.SampleShape];
        var inputs = spec.Vocabulary > 0 ? randint(0, spec.Vocabulary, shape, dtype: ScalarType.Int64) : randn(shape);
        using var noGrad = no_grad();
        var labels = cat(inputs.split(32).Select(x => model.call(x).argmax(1)).ToList(), 0);
        return new TensorDataset(inputs, labels);
    }

    private static Tensor Probe(IBatchSource evaluation) =>
        ((TensorDataset)evaluation).Inputs.narrow(0, 0, OnnxSamples).clone().DetachFromDisposeScope();

    private static string Hash(nn.Module<Tensor, Tensor> model)
    {
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        foreach (var (name, tensor) in model.state_dict())
        {
            hash.AppendData(Encoding.UTF8.GetBytes(name));
            using var contiguous = tensor.detach().cpu().contiguous();
            hash.AppendData(contiguous.bytes);
        }

        return Convert.ToHexString(hash.GetHashAndReset());
    }

    private void Stage(string technique, string stage) => Write(new { kind = "stage", model = spec.Name, technique, stage });

    private void Write(object line)
    {
        journal.WriteLine(JsonSerializer.Serialize(line, Json));
        journal.Flush();
    }
}
