// QuickStart: train LeNet-300-100 on the bundled MNIST digits (or reuse a cached copy), compress it with a
// pipeline (magnitude pruning, then int8 quantization) that checks accuracy after every step, print the report, write its
// JSON, and save the compressed model file (then load it back).
//
//   dotnet run -c Release --project examples/QuickStart -- [--report PATH] [--seed N] [--no-cache]
using System.Diagnostics;
using ModelCompression;
using ModelCompression.Examples;
using ModelCompression.Samples;
using ModelCompression.Serialization;
using Spectre.Console;

var options = ExampleArguments.Parse(args, defaultReportPath: "artifacts/quickstart/report.json");
if (options is null)
{
    Console.Error.WriteLine("Usage: QuickStart [--report PATH] [--seed N] [--no-cache]");
    return 2;
}

int seed = options.Seed;
var total = Stopwatch.StartNew();
using var split = MnistDigits.LoadBundled().Split(trainCount: 8000, seed: seed, layout: MnistLayout.Flat);
Console.WriteLine($"Data: {split.Train.Count} training and {split.Test.Count} test digits (bundled MNIST).");

var trained = ZooTraining.TrainOrLoad(ZooModel.LeNet300100, split, options.CacheDirectory, seed);
using var model = trained.Model;
Console.WriteLine(trained.FromCache
    ? "LeNet-300-100: reused the cached trained weights."
    : $"LeNet-300-100: trained in {trained.Seconds:0.0} s.");

// 90% of the weights removed by one global magnitude threshold, then 5 epochs of fine-tuning with the masks held
// (layers that run faster sparse become SparseLinear layers on this library's own kernel); then int8 weights (per
// channel) for the layers still dense, with activations quantized at run time, on this library's own integer kernel.
// See QuickStartRecipe in src/ModelCompression.Samples for the options.
var pipeline = QuickStartRecipe.Create(seed).Build();

// A live progress bar (Spectre.Console) fed by the pipeline's IProgress<CompressionProgress>: the baseline, then each
// step's training, evaluation and measurement. The library itself never writes to the console.
CompressionResult? run = null;
AnsiConsole.Progress()
    .AutoClear(false)
    .HideCompleted(false)
    .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn())
    .Start(progressContext =>
    {
        var bar = progressContext.AddTask("Measuring the baseline", maxValue: 1.0);
        var progress = new ImmediateProgress<CompressionProgress>(p =>
        {
            // The baseline counts as one stage before the steps; each stage fills its share of the bar.
            bar.Value = Math.Clamp((p.StepIndex + 1 + p.Fraction) / (p.StepCount + 1), 0, 1);
            string stage = p.StepName is null ? "baseline" : $"{p.StepIndex + 1}/{p.StepCount} {p.StepName}";
            string epoch = p.Epoch is { } e ? $", epoch {e + 1}" : string.Empty;
            bar.Description = Markup.Escape($"{stage}: {p.Phase.ToString().ToLowerInvariant()}{epoch}");
        });
        run = pipeline.Run(model, new CompressionData(split.Train, split.Test), progress);
        bar.Value = 1;
        bar.Description = "Compressed";
    });
using var result = run!;
Console.WriteLine();
Console.WriteLine(result.Report);
Console.WriteLine($"Report JSON: {ReportFiles.Write(result.Report, options.ReportPath!)}");

// Ship it: the library's compressed file (architecture + every tensor, entropy coded), loaded back as a runnable model.
string modelPath = Path.Combine(Path.GetDirectoryName(Path.GetFullPath(options.ReportPath!))!, "model.mcmf");
var saved = CompressedModel.Save(result.Model, modelPath);
using var loaded = CompressedModel.Load(modelPath);
using (TorchSharp.torch.NewDisposeScope())
using (TorchSharp.torch.no_grad())
{
    var (inputs, _) = split.Test.GetBatches(256).First();
    var expected = result.Model.call(inputs);
    var actual = loaded.call(inputs);
    bool same = actual.equal(expected).all().item<bool>();
    Console.WriteLine($"Compressed file: {modelPath}, {saved.TotalBytes:N0} bytes (the report's sizeBytes); loaded back, {(same ? "identical" : "DIFFERENT")} outputs.");
    if (!same)
    {
        return 1;
    }
}

Console.WriteLine($"QuickStart finished in {total.Elapsed.TotalSeconds:0.0} s.");
return 0;

/// <summary>Reports on the caller's thread at once (<see cref="Progress{T}"/> would post to the thread pool and arrive late).</summary>
internal sealed class ImmediateProgress<T>(Action<T> report) : IProgress<T>
{
    public void Report(T value) => report(value);
}
