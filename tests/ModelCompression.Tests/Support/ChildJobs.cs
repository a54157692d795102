using System.Globalization;
using ModelCompression.Data;
using ModelCompression.Metrics;
using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Serialization;
using ModelCompression.Training;
using ModelCompression.Distillation;
using TorchSharp;
using static TorchSharp.torch;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace ModelCompression.Tests.Support;

/// <summary>Work run in a child process by <see cref="ChildProcess"/>.</summary>
internal static class ChildJobs
{
    /// <summary>Loads, copies and compresses in a loop while another thread forces garbage collections.</summary>
    public const string LoadUnderCollections = "load-under-collections";

    /// <summary>
    /// Arguments: seconds to run. TorchSharp 0.107 wraps native objects (the default generator, temporary scalars) in
    /// finalizable objects that a call may not keep alive; a collection on another thread then frees one mid-call and
    /// the process dies (SIGSEGV). Prints the counts and returns 0 when the time is up.
    /// </summary>
    public static int RunLoadUnderCollections(string[] args)
    {
        double seconds = args.Length > 0 ? double.Parse(args[0], CultureInfo.InvariantCulture) : 5;
        string folder = Directory.CreateTempSubdirectory("mc-child-").FullName;
        try
        {
            string path = Path.Combine(folder, "linear.mcz");
            torch.random.manual_seed(1);
            using (var small = nn.Sequential(("fc", nn.Linear(2, 2))))
            {
                CompressedModel.Save(small, path);
            }

            using var model = TestModels.Mlp(2);
            using var data = TestModels.Classification(64, 3);
            var pipeline = CompressionPipeline.Create()
                .WithLatencyMeasurement(new LatencyOptions { Enabled = false })
                .WithAccuracyCheck(1.0)
                .AddPostTrainingQuantization(QuantizationMode.DynamicInt8)
                .Build();

            var collector = new BackgroundCollector(burst: 16, waitForFinalizers: false);

            long loads = 0, copies = 0, runs = 0, states = 0;
            var until = DateTime.UtcNow.AddSeconds(seconds);
            while (DateTime.UtcNow < until)
            {
                // The generator round trip every load and copy makes, many times: the race window is a few
                // instructions wide, so the bare round trip is what finds it within seconds.
                for (int i = 0; i < 256; i++, states++)
                {
                    using var state = RandomState.Save();
                    RandomState.Restore(state);
                }

                CompressedModel.Load(path).Dispose();
                loads++;
                ModuleCloner.DeepClone(model).Dispose();
                copies++;
                if (loads % 64 == 0)
                {
                    using var result = pipeline.Run(model, new CompressionData(data, data));
                    runs++;
                }
            }

            collector.Dispose();
            Console.WriteLine($"ok loads={loads} copies={copies} pipelines={runs} generator-states={states}");
            return 0;
        }
        finally
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    /// <summary>Steps an optimizer over many small parameters while another thread forces garbage collections.</summary>
    public const string OptimizerUnderCollections = "optimizer-under-collections";

    /// <summary>
    /// Arguments: the optimizer (<c>sgd</c>, <c>adam</c> or <c>adamw</c>), the implementation (<c>safe</c> for the
    /// library's, <c>torchsharp</c> for TorchSharp's own) and seconds to run. TorchSharp's steps pass temporary Scalars
    /// that a collection can free mid-call. Prints the step count and returns 0 when the time is up.
    /// </summary>
    public static int RunOptimizerUnderCollections(string[] args)
    {
        string kind = args[0];
        bool safe = args[1] == "safe";
        double seconds = double.Parse(args[2], CultureInfo.InvariantCulture);
        torch.random.manual_seed(1);
        // Many tiny parameters: the steps are mostly call overhead, so the Scalars' windows are most of the run.
        var parameters = Enumerable.Range(0, 64).Select(_ => new TorchSharp.Modules.Parameter(randn(4))).ToList();
        using var optimizer = (kind, safe) switch
        {
            ("sgd", true) => (TorchSharp.Modules.OptimizerHelper)new ScalarSafeSgd(parameters, 0.01, 0.9, 1e-4),
            ("sgd", false) => optim.SGD(parameters, 0.01, momentum: 0.9, weight_decay: 1e-4),
            ("adam", true) => new ScalarSafeAdam(parameters, 0.01, 1e-4),
            ("adam", false) => optim.Adam(parameters, 0.01, weight_decay: 1e-4),
            ("adamw", true) => new ScalarSafeAdamW(parameters, 0.01, 1e-4),
            ("adamw", false) => optim.AdamW(parameters, 0.01, weight_decay: 1e-4),
            _ => throw new ArgumentException($"Unknown optimizer {kind}.", nameof(args)),
        };
        using (no_grad())
        {
            foreach (var parameter in parameters)
            {
                parameter.grad = ones_like(parameter).mul_(0.001);
            }
        }

        var collector = new BackgroundCollector(burst: 4, waitForFinalizers: false);
        long steps = 0;
        var until = DateTime.UtcNow.AddSeconds(seconds);
        while (DateTime.UtcNow < until)
        {
            optimizer.step();
            steps++;
        }

        collector.Dispose();
        bool finite;
        using (var scope = NewDisposeScope())
        {
            finite = parameters.All(p => isfinite(p).all().item<bool>());
        }

        Console.WriteLine($"ok steps={steps} finite={finite}");
        foreach (var parameter in parameters)
        {
            parameter.Dispose();
        }

        return finite ? 0 : 1;
    }

    /// <summary>Runs one training technique's pipeline over and over while another thread forces garbage collections.</summary>
    public const string TrainUnderCollections = "train-under-collections";

    /// <summary>
    /// Arguments: the technique (<c>finetune</c>, <c>qat</c>, <c>distill</c> or <c>prune</c>) and seconds to run: the
    /// library's own training code on top of its optimizers, under the same collections. Prints the run count and
    /// returns 0 when the time is up.
    /// </summary>
    public static int RunTrainUnderCollections(string[] args)
    {
        string technique = args[0];
        double seconds = double.Parse(args[1], CultureInfo.InvariantCulture);
        var training = new TrainingOptions { Epochs = 1, BatchSize = 8, Optimizer = OptimizerKind.Sgd, LearningRate = 0.01, Momentum = 0.9, WeightDecay = 1e-4 };
        var builder = CompressionPipeline.Create()
            .WithLatencyMeasurement(new LatencyOptions { Enabled = false })
            .WithAccuracyCheck(1.0);
        builder = technique switch
        {
            "finetune" => builder.AddFineTuning(training),
            "qat" => builder.AddQuantizationAwareTraining(new QuantizationAwareTrainingOptions { WeightBits = 4, Training = training }),
            "distill" => builder.AddDistillation(new DistillationOptions { Training = training }),
            "prune" => builder.AddMagnitudePruning(0.5, training),
            _ => throw new ArgumentException($"Unknown technique {technique}.", nameof(args)),
        };
        var pipeline = builder.Build();
        using var model = TestModels.Mlp(2);
        using var data = TestModels.Classification(64, 3);
        var collector = new BackgroundCollector(burst: 4, waitForFinalizers: false);
        long runs = 0;
        var until = DateTime.UtcNow.AddSeconds(seconds);
        while (DateTime.UtcNow < until)
        {
            using var result = pipeline.Run(model, new CompressionData(data, data));
            runs++;
        }

        collector.Dispose();
        Console.WriteLine($"ok runs={runs}");
        return 0;
    }
}
