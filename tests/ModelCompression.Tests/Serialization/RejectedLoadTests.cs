using System.Runtime;
using ModelCompression.Samples;
using ModelCompression.Serialization;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Serialization;

/// <summary>A rejected file leaves nothing behind: no tensors for the finalizer, whatever stage refused it.</summary>
[TestFixture]
public sealed class RejectedLoadTests
{
    [Test]
    public void Load_RejectedAtEveryStage_LeavesNoTensorsForTheFinalizer()
    {
        // Every model, file and architecture is built before counting.
        var files = SerializationModels.Names.ToDictionary(name => name, name =>
        {
            var (model, input) = SerializationModels.Create(name);
            using var _ = model;
            input.Dispose();
            using var stream = new MemoryStream();
            CompressedModel.Save(model, stream);
            return stream.ToArray();
        });
        using var lenet = ModelZoo.Create(ZooModel.LeNet5);
        using var resnet = ModelZoo.Create(ZooModel.SmallResNet, 7);
        var wrongFactory = new CompressedModelLoadOptions();
        wrongFactory.ModuleFactories[SerializationModels.ResidualBlockType] = () => nn.Sequential(("x", nn.Linear(2, 2)));
        var cases = new List<(string What, Func<nn.Module<Tensor, Tensor>> Load)>
        {
            // While decoding: no tensor exists yet.
            ("truncated", () => CompressedModel.Load(new MemoryStream(files["quantized"][..^7]))),
            ("swapped sections", () => CompressedModel.Load(new MemoryStream(FormatFuzzer.SwapDataSections(files["dense"], 0, 1)!))),

            // While building: the modules already built from the file must be disposed.
            ("custom module without a factory", () => CompressedModel.Load(new MemoryStream(files["custom"]))),
            ("architecture without the module", () => CompressedModel.Load(new MemoryStream(files["custom"]), lenet)),
            ("factory with other children", () => CompressedModel.Load(new MemoryStream(files["custom"]), null, wrongFactory)),
        };
        foreach (var (name, bytes) in files)
        {
            cases.Add(($"valid {name}", () => CompressedModel.Load(new MemoryStream(bytes), resnet, SerializationModels.LoadOptions())));
        }

        for (int i = 0; i < 120; i++)
        {
            var bytes = FormatFuzzer.Mutate(files[SerializationModels.Names.ElementAt(i % files.Count)], new Random(1000 + i)).Bytes;
            cases.Add(($"mutant {i}", () => CompressedModel.Load(new MemoryStream(bytes), resnet, SerializationModels.LoadOptions())));
        }

        int rejected = 0;
        var leaks = new List<string>();
        foreach (var (what, load) in cases)
        {
            // TorchSharp counts a parameter's emptied wrapper until the end (see TORCHSHARP_NOTES): compare the count
            // just after the load, with no collection in between, with the count once finalizers have run. Any
            // difference is tensors that nothing disposed.
            TestModels.SettledTensorCount();
            Assert.That(GC.TryStartNoGCRegion(64L << 20), Is.True);
            long live;
            string outcome = "loaded";
            try
            {
                try
                {
                    using var loaded = load();
                }
                catch (InvalidDataException ex)
                {
                    rejected++;
                    outcome = ex.Message;
                }

                live = Tensor.TotalCount;
            }
            finally
            {
                if (GCSettings.LatencyMode == GCLatencyMode.NoGCRegion)
                {
                    GC.EndNoGCRegion();
                }
            }

            long finalized = live - TestModels.SettledTensorCount();
            if (finalized != 0)
            {
                leaks.Add($"{what}: {finalized} ({outcome})");
            }
        }

        Assert.That(rejected, Is.GreaterThan(cases.Count / 2));
        Assert.That(leaks, Is.Empty, "tensors left to the finalizer");
    }
}
