using System.Globalization;
using ModelCompression.Data;
using ModelCompression.Metrics;
using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Serialization;
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
}
