using ModelCompression;
using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Samples;
using ModelCompression.Training;
using TorchSharp;
using static TorchSharp.torch;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace Scenarios;

/// <summary>TinyGpt trained on the Brown corpus, the text data and the evaluation the transformer scenarios share.</summary>
internal sealed class GptBaseline : IDisposable
{
    /// <summary>The shape the scenarios train: about 1.8M parameters with the bundled 4,096-token BPE.</summary>
    public static TinyGptConfig Config(int vocabulary) => new(Vocabulary: vocabulary, Context: 64, Width: 128, Heads: 4, Layers: 4, MlpRatio: 4);

    private GptBaseline(TinyGpt model, TensorDataset calibration, TensorDataset test, TrainedModel trained, TensorDataset? budget)
    {
        Model = model;
        Calibration = calibration;
        Test = test;
        Trained = trained;
        Budget = budget;
    }

    public TinyGpt Model { get; }

    /// <summary>Windows of the training split the methods calibrate on.</summary>
    public TensorDataset Calibration { get; }

    /// <summary>The test split, cut into windows of the model's context, every token predicted once.</summary>
    public TensorDataset Test { get; }

    public TrainedModel Trained { get; }

    /// <summary>A fixed training budget: windows spread evenly over the training split, when asked for.</summary>
    public TensorDataset? Budget { get; }

    /// <param name="context">The scenario's context.</param>
    /// <param name="calibrationWindows">Training windows kept for calibration.</param>
    /// <param name="budgetWindows">Training windows kept as <see cref="Budget"/>; 0 for none.</param>
    public static GptBaseline Load(ScenarioContext context, int calibrationWindows = 128, int budgetWindows = 0)
    {
        var corpus = BrownCorpus.LoadBundled();
        var config = Config(corpus.Tokenizer.VocabularySize);
        using var train = TinyGptTraining.Windows(corpus.TokenIds(TextSplit.Train), config.Context);
        var trained = TinyGptTraining.TrainOrLoad(config, train, context.CacheDirectory, context.Seed, progress: new SyncProgress<TrainingProgress>(p =>
        {
            if (p.Batch % 200 == 0)
            {
                context.Log.WriteLine($"  epoch {p.Epoch + 1}/{p.Epochs}, batch {p.Batch}/{p.BatchesPerEpoch}: loss {p.Loss:0.000}");
            }
        }));
        context.Log.WriteLine(trained.FromCache ? "TinyGpt: trained weights from the cache" : $"TinyGpt: trained in {trained.Seconds:0} s");

        // Calibration windows spread evenly over the training split (a fixed choice, the same every run).
        var calibration = Spread(train, calibrationWindows);
        var budget = budgetWindows > 0 ? Spread(train, budgetWindows) : null;
        var test = TinyGptTraining.Windows(corpus.TokenIds(TextSplit.Test), config.Context);
        return new GptBaseline((TinyGpt)trained.Model, calibration, test, trained, budget);
    }

    /// <summary><paramref name="count"/> windows spread evenly over <paramref name="source"/>.</summary>
    private static TensorDataset Spread(TensorDataset source, int count)
    {
        using var scope = NewDisposeScope();
        long stride = Math.Max(1, source.Count / count);
        var index = arange(0, source.Count, stride, dtype: ScalarType.Int64)[..count];
        var inputs = source.Inputs.index_select(0, index).DetachFromDisposeScope();
        var targets = source.Targets.index_select(0, index).DetachFromDisposeScope();
        return new TensorDataset(inputs, targets);
    }

    public CompressionData Data => new(Calibration, Test) { Evaluator = new PerplexityEvaluator(batchSize: 64) };

    public double Perplexity(nn.Module<Tensor, Tensor> model) => new PerplexityEvaluator(batchSize: 64).Evaluate(model, Test).Value;

    /// <summary>Quantizes a copy of the model with one step (no pipeline) and returns its test perplexity.</summary>
    public double Quantized(PostTrainingQuantizationOptions options, ScenarioContext context, string label)
    {
        var watch = System.Diagnostics.Stopwatch.StartNew();
        var stepContext = new CompressionContext(Data, Model, seed: context.Seed);
        using var quantized = new PostTrainingQuantizationStep(options).Apply(ModuleCloner.DeepClone(Model), stepContext);
        double seconds = watch.Elapsed.TotalSeconds;
        double perplexity = Perplexity(quantized);
        context.Log.WriteLine($"  {label,-22} perplexity {perplexity,8:0.00}   ({seconds:0.0} s to quantize)");
        return perplexity;
    }

    public void Dispose()
    {
        Model.Dispose();
        Calibration.Dispose();
        Test.Dispose();
        Budget?.Dispose();
    }
}

/// <summary>
/// TinyGpt on the Brown corpus at 4 and 3 bits: round-to-nearest against GPTQ, all in <c>reference</c>; the pipeline
/// run (and so <c>final</c>) is the best 4-bit model.
/// </summary>
public sealed class GptPtqScenario : IScenario
{
    public string Name => "gpt-ptq";

    public string Description => "TinyGpt (Brown corpus): test perplexity of fp32, RTN, AWQ, HQQ and GPTQ at 4, 3 and 2 bits (group 64)";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        new("GPTQ beats round-to-nearest at 4 bits", r => Get(r, "perplexityGptq4") < Get(r, "perplexityRtn4")),
        new("GPTQ beats round-to-nearest at 3 bits", r => Get(r, "perplexityGptq3") < Get(r, "perplexityRtn3")),
        new("HQQ beats round-to-nearest at 4 bits", r => Get(r, "perplexityHqq4") < Get(r, "perplexityRtn4")),
        new("AWQ beats round-to-nearest at 3 bits", r => Get(r, "perplexityAwq3") < Get(r, "perplexityRtn3")),
        new("the best 4-bit model within 5% of fp32 perplexity", r => Get(r, "best4RelativeIncrease") <= 0.05),
        new("GPTQ at 3 bits recovers ≥ 60% of RTN's perplexity gap", r => Get(r, "gptq3GapRecovered") >= 0.6),
    ];

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = GptBaseline.Load(context);
        double fp32 = baseline.Perplexity(baseline.Model);
        context.Log.WriteLine($"  {"fp32",-22} perplexity {fp32,8:0.00}");

        static PostTrainingQuantizationOptions Options(int bits, WeightRounding rounding, bool awq = false) => new()
        {
            Mode = QuantizationMode.WeightOnlyInt4,
            WeightBits = bits,
            WeightGranularity = QuantizationGranularity.PerGroup(64),
            Rounding = rounding,
            Awq = awq ? new AwqOptions() : null,
            CalibrationBatches = 4,
            CalibrationBatchSize = 32,
        };

        double rtn4 = baseline.Quantized(Options(4, WeightRounding.Nearest), context, "RTN int4 (group 64)");
        double awq4 = baseline.Quantized(Options(4, WeightRounding.Nearest, awq: true), context, "AWQ int4 (group 64)");
        double hqq4 = baseline.Quantized(Options(4, WeightRounding.Hqq()), context, "HQQ int4 (group 64)");
        double hqq3 = baseline.Quantized(Options(3, WeightRounding.Hqq()), context, "HQQ int3 (group 64)");
        double rtn3 = baseline.Quantized(Options(3, WeightRounding.Nearest), context, "RTN int3 (group 64)");
        double awq3 = baseline.Quantized(Options(3, WeightRounding.Nearest, awq: true), context, "AWQ int3 (group 64)");
        double gptq3 = baseline.Quantized(Options(3, WeightRounding.Gptq()), context, "GPTQ int3 (group 64)");
        var w8a8 = new PostTrainingQuantizationOptions { Mode = QuantizationMode.StaticInt8, CalibrationBatches = 4, CalibrationBatchSize = 32 };
        double staticInt8 = baseline.Quantized(w8a8, context, "W8A8 (static int8)");
        w8a8.SmoothQuant = new SmoothQuantOptions();
        double smoothQuant = baseline.Quantized(w8a8, context, "W8A8 + SmoothQuant");
        double rtn2 = baseline.Quantized(Options(2, WeightRounding.Nearest), context, "RTN int2 (group 64)");
        double gptq2 = baseline.Quantized(Options(2, WeightRounding.Gptq()), context, "GPTQ int2 (group 64)");

        // The best 4-bit method runs as the pipeline, so the report's final figures (size, speed) are its.
        using var result = CompressionPipeline.Create()
            .WithModelName("TinyGpt")
            .WithSeed(context.Seed)
            .AddPostTrainingQuantization(Options(4, WeightRounding.Gptq()))
            .Build()
            .Run(baseline.Model, baseline.Data);
        var report = result.Report;
        double gptq4 = report.Final.Accuracy;
        context.Log.WriteLine($"  {"GPTQ int4 (group 64)",-22} perplexity {gptq4,8:0.00}   (the pipeline's final model)");

        double best4 = new[] { rtn4, gptq4, awq4, hqq4 }.Min();
        report.Reference = new Dictionary<string, double>
        {
            ["parameters"] = baseline.Model.parameters().Sum(p => p.numel()),
            ["trainingSeconds"] = baseline.Trained.Seconds,
            ["testTokens"] = baseline.Test.Targets.ne(TinyGptTraining.IgnoreIndex).sum().item<long>(),
            ["perplexityFp32"] = fp32,
            ["perplexityRtn4"] = rtn4,
            ["perplexityGptq4"] = gptq4,
            ["perplexityAwq4"] = awq4,
            ["perplexityHqq4"] = hqq4,
            ["perplexityHqq3"] = hqq3,
            ["perplexityRtn3"] = rtn3,
            ["perplexityAwq3"] = awq3,
            ["perplexityGptq3"] = gptq3,
            ["perplexityStaticInt8"] = staticInt8,
            ["perplexityStaticInt8SmoothQuant"] = smoothQuant,
            ["perplexityRtn2"] = rtn2,
            ["perplexityGptq2"] = gptq2,
            ["best4RelativeIncrease"] = (best4 / fp32) - 1,
            ["gptq3GapRecovered"] = rtn3 > fp32 ? (rtn3 - gptq3) / (rtn3 - fp32) : double.NaN,
        };
        return report;
    }

    private static double Get(CompressionReport report, string key) =>
        report.Reference is not null && report.Reference.TryGetValue(key, out var v) ? v : double.NaN;
}

/// <summary>Progress reported on the caller's thread, in order (<see cref="Progress{T}"/> posts to the thread pool).</summary>
internal sealed class SyncProgress<T>(Action<T> report) : IProgress<T>
{
    public void Report(T value) => report(value);
}

/// <summary>
/// TinyGpt generating text at batch 1 (greedy, the whole window recomputed each token): tokens per second of fp32,
/// dynamic int8 and GPTQ int4 in one run, each model generating twice to show the same tokens come out.
/// </summary>
public sealed class GptDecodeScenario : IScenario
{
    private const int PromptTokens = 16;
    private const int NewTokens = 48;

    public string Name => "gpt-decode";

    public string Description => $"TinyGpt (Brown corpus): greedy generation of {NewTokens} tokens at batch 1 in fp32, dynamic int8 and GPTQ int4";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        global::Scenarios.Targets.ReferenceAtLeast("repeatable", 1, "every model generates the same tokens on a second run"),
    ];

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = GptBaseline.Load(context);
        var corpus = BrownCorpus.LoadBundled();
        var prompt = corpus.TokenIds(TextSplit.Test)[..PromptTokens];
        context.Log.WriteLine($"Prompt: {corpus.Tokenizer.Decode(prompt)}");

        var int8Options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.DynamicInt8, CalibrationBatches = 1, CalibrationBatchSize = 32 };
        var int4Options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, WeightGranularity = QuantizationGranularity.PerGroup(64), Rounding = WeightRounding.Gptq(), CalibrationBatches = 4, CalibrationBatchSize = 32 };
        using var int8 = Quantize(baseline, int8Options, context);
        using var int4 = Quantize(baseline, int4Options, context);

        var models = new (string Name, nn.Module<Tensor, Tensor> Model)[] { ("fp32", baseline.Model), ("int8", int8), ("int4", int4) };
        var reference = new Dictionary<string, double> { ["repeatable"] = 1 };
        // Warm each model once, then time them in turns so that load on the machine falls on all alike.
        foreach (var (_, model) in models)
        {
            Generate(model, prompt, 4);
        }

        var seconds = new double[models.Length];
        var first = new int[models.Length][];
        for (int round = 0; round < 2; round++)
        {
            for (int i = 0; i < models.Length; i++)
            {
                var watch = System.Diagnostics.Stopwatch.StartNew();
                var tokens = Generate(models[i].Model, prompt, NewTokens);
                seconds[i] += watch.Elapsed.TotalSeconds;
                if (round == 0)
                {
                    first[i] = tokens;
                }
                else if (!tokens.SequenceEqual(first[i]))
                {
                    reference["repeatable"] = 0;
                    context.Log.WriteLine($"{models[i].Name}: the second run generated different tokens");
                }
            }
        }

        for (int i = 0; i < models.Length; i++)
        {
            double perSecond = 2 * NewTokens / seconds[i];
            reference[$"tokensPerSecond{Capitalized(models[i].Name)}"] = perSecond;
            context.Log.WriteLine($"  {models[i].Name,-5} {perSecond,7:0.0} tokens/s   …{corpus.Tokenizer.Decode(first[i][PromptTokens..])}");
        }

        reference["int8SpeedupOverFp32"] = reference["tokensPerSecondInt8"] / reference["tokensPerSecondFp32"];
        reference["int4SpeedupOverFp32"] = reference["tokensPerSecondInt4"] / reference["tokensPerSecondFp32"];
        reference["int8SameTokensAsFp32"] = first[1].SequenceEqual(first[0]) ? 1 : 0;
        reference["int4SameTokensAsFp32"] = first[2].SequenceEqual(first[0]) ? 1 : 0;
        context.Log.WriteLine($"Speed-up over fp32: int8 {reference["int8SpeedupOverFp32"]:0.00}×, int4 {reference["int4SpeedupOverFp32"]:0.00}× (paired, same run)");

        return new CompressionReport
        {
            Model = "TinyGpt",
            Metric = "perplexity",
            Baseline = Figures(baseline.Perplexity(baseline.Model), baseline.Model),
            Final = Figures(baseline.Perplexity(int4), int4),
            Reference = reference,
        };
    }

    private static ModelFigures Figures(double perplexity, nn.Module<Tensor, Tensor> model)
    {
        long parameters = ModelCompression.Metrics.ModelMetrics.CountParameters(model);
        return new ModelFigures { Accuracy = perplexity, Parameters = parameters, NonzeroParameters = parameters, SizeBytes = ModelCompression.Serialization.CompressedModel.Measure(model).TotalBytes };
    }

    private static nn.Module<Tensor, Tensor> Quantize(GptBaseline baseline, PostTrainingQuantizationOptions options, ScenarioContext context)
    {
        var stepContext = new CompressionContext(baseline.Data, baseline.Model, seed: context.Seed);
        return new PostTrainingQuantizationStep(options).Apply(ModuleCloner.DeepClone(baseline.Model), stepContext);
    }

    /// <summary>Greedy decoding: the prompt and then <paramref name="count"/> tokens, each the argmax after the last window.</summary>
    private static int[] Generate(nn.Module<Tensor, Tensor> model, int[] prompt, int count)
    {
        model.eval();
        var tokens = new List<int>(prompt);
        using var noGrad = no_grad();
        for (int i = 0; i < count; i++)
        {
            using var scope = NewDisposeScope();
            var window = tokens.Skip(Math.Max(0, tokens.Count - 64)).Select(t => (long)t).ToArray();
            var logits = model.call(tensor(window, [1, window.Length], ScalarType.Int64));
            tokens.Add((int)logits[0, -1].argmax().item<long>());
        }

        return [.. tokens];
    }

    private static string Capitalized(string name) => char.ToUpperInvariant(name[0]) + name[1..];
}

/// <summary>
/// TinyGpt on the Brown corpus pruned in one shot, no fine-tuning: magnitude, Wanda and SparseGPT at 50% unstructured
/// and at 2:4, all in <c>reference</c>; the pipeline run (and so <c>final</c>) is SparseGPT at 50%.
/// </summary>
public sealed class GptSparsityScenario : IScenario
{
    public string Name => "gpt-sparsity";

    public string Description => "TinyGpt (Brown corpus): test perplexity after one-shot pruning of the blocks' Linear layers at 50% and 2:4 — magnitude, Wanda, SparseGPT";

    public IReadOnlyList<ScenarioTarget> Targets { get; } =
    [
        // Wanda is reported without a target: on a model this small it does no better than magnitude (see the README).
        new("SparseGPT beats magnitude at 50%", r => Get(r, "perplexitySparseGpt50") < Get(r, "perplexityMagnitude50")),
        new("SparseGPT beats magnitude at 2:4", r => Get(r, "perplexitySparseGpt24") < Get(r, "perplexityMagnitude24")),
        new("the best 50% model within 15% of dense perplexity", r => Get(r, "best50RelativeIncrease") <= 0.15),
    ];

    /// <summary>The blocks' projections and MLP layers; the embeddings and the output head stay dense, as in Wanda's and SparseGPT's experiments.</summary>
    private static ModelCompression.Modules.LayerSelection Blocks => ModelCompression.Modules.LayerSelection.Named("blocks.*");

    public CompressionReport Run(ScenarioContext context)
    {
        using var baseline = GptBaseline.Load(context);
        double dense = baseline.Perplexity(baseline.Model);
        context.Log.WriteLine($"  {"dense",-24} perplexity {dense,8:0.00}");

        static ModelCompression.Pruning.MagnitudePruningOptions Options(ModelCompression.Pruning.PruningCriterion criterion, bool twoOfFour) => new()
        {
            Sparsity = 0.5,
            Pattern = twoOfFour ? ModelCompression.Pruning.NMPattern.TwoOfFour : null,
            Criterion = criterion,
            Layers = Blocks,
            SparseExecution = ModelCompression.Pruning.SparseExecution.Never,
        };

        var criteria = new (string Key, ModelCompression.Pruning.PruningCriterion Criterion)[]
        {
            ("Magnitude", ModelCompression.Pruning.PruningCriterion.Magnitude),
            ("Wanda", ModelCompression.Pruning.PruningCriterion.Wanda(calibrationBatches: 4, calibrationBatchSize: 32)),
            ("SparseGpt", ModelCompression.Pruning.PruningCriterion.SparseGpt(calibrationBatches: 4, calibrationBatchSize: 32)),
        };
        var reference = new Dictionary<string, double>
        {
            ["parameters"] = baseline.Model.parameters().Sum(p => p.numel()),
            ["prunableParameters"] = baseline.Model.named_modules().Where(m => m.name.StartsWith("blocks.", StringComparison.Ordinal) && m.module is TorchSharp.Modules.Linear)
                .Sum(m => ((TorchSharp.Modules.Linear)m.module).weight!.numel()),
            ["perplexityDense"] = dense,
        };
        foreach (bool twoOfFour in new[] { false, true })
        {
            foreach (var (key, criterion) in criteria)
            {
                if (!twoOfFour && key == "SparseGpt")
                {
                    continue; // the pipeline run below
                }

                var watch = System.Diagnostics.Stopwatch.StartNew();
                var stepContext = new CompressionContext(baseline.Data, baseline.Model, seed: context.Seed);
                using var pruned = new ModelCompression.Pruning.MagnitudePruningStep(Options(criterion, twoOfFour)).Apply(ModuleCloner.DeepClone(baseline.Model), stepContext);
                double seconds = watch.Elapsed.TotalSeconds;
                double perplexity = baseline.Perplexity(pruned);
                string label = $"{criterion} {(twoOfFour ? "2:4" : "50%")}";
                context.Log.WriteLine($"  {label,-24} perplexity {perplexity,8:0.00}   ({seconds:0.0} s to prune)");
                reference[$"perplexity{key}{(twoOfFour ? "24" : "50")}"] = perplexity;
            }
        }

        using var result = CompressionPipeline.Create()
            .WithModelName("TinyGpt")
            .WithSeed(context.Seed)
            .AddMagnitudePruning(Options(criteria[2].Criterion, twoOfFour: false))
            .Build()
            .Run(baseline.Model, baseline.Data);
        var report = result.Report;
        reference["perplexitySparseGpt50"] = report.Final.Accuracy;
        context.Log.WriteLine($"  {"SparseGPT 50%",-24} perplexity {report.Final.Accuracy,8:0.00}   (the pipeline's final model)");
        double best50 = Math.Min(Math.Min(reference["perplexityMagnitude50"], reference["perplexityWanda50"]), reference["perplexitySparseGpt50"]);
        reference["best50RelativeIncrease"] = (best50 / dense) - 1;
        foreach (var pattern in new[] { "50", "24" })
        {
            double magnitude = reference[$"perplexityMagnitude{pattern}"];
            reference[$"wanda{pattern}GapClosed"] = magnitude > dense ? (magnitude - reference[$"perplexityWanda{pattern}"]) / (magnitude - dense) : double.NaN;
            reference[$"sparseGpt{pattern}GapClosed"] = magnitude > dense ? (magnitude - reference[$"perplexitySparseGpt{pattern}"]) / (magnitude - dense) : double.NaN;
        }

        report.Reference = reference;
        return report;
    }

    private static double Get(CompressionReport report, string key) =>
        report.Reference is not null && report.Reference.TryGetValue(key, out var v) ? v : double.NaN;
}
