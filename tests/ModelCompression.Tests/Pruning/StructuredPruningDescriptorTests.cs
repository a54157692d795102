using ModelCompression.Interop.Onnx;
using ModelCompression.Modules;
using ModelCompression.Pruning;
using ModelCompression.Pruning.Structured;
using ModelCompression.Serialization;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace ModelCompression.Tests.Pruning;

/// <summary>
/// Layer kinds of an application's own, pruned by structured pruning through their registered descriptors: one that
/// scales each channel (per channel) and one that projects and gates (dense, with a child Linear and a parameter of
/// its own, which the tracer could not see into without its descriptor).
/// </summary>
[TestFixture]
[NonParallelizable]
public sealed class StructuredPruningDescriptorTests
{
    [Test]
    public void DescribedKinds_ArePrunedThrough_KeptChannelsComputeWhatTheyDid()
    {
        using var registration = Register(new ChannelScaleDescriptor(), new GatedProjectionDescriptor());
        torch.random.manual_seed(3);
        using var original = Model();
        using (no_grad())
        {
            // fc1's channels 8..15 and the projection's outputs 6..11 are zero, so removing them changes nothing.
            var fc1 = (Linear)ModuleTree.GetSubmodule(original, "fc1");
            fc1.weight![TensorIndex.Slice(8, 16)].zero_();
            fc1.bias![TensorIndex.Slice(8, 16)].zero_();
            var projection = (GatedProjection)ModuleTree.GetSubmodule(original, "gated");
            projection.Projection.weight![TensorIndex.Slice(6, 12)].zero_();
            projection.Projection.bias![TensorIndex.Slice(6, 12)].zero_();
        }

        using var input = randn(5, 8);
        var expected = TestModels.Output(original, input);
        using var pruned = Prune(ModuleCloner.DeepClone(original), new StructuredPruningOptions { Ratio = 0.5, Layers = new LayerSelection { Types = [typeof(Linear), typeof(GatedProjection)] } });

        Assert.That(((Linear)ModuleTree.GetSubmodule(pruned, "fc1")).out_features, Is.EqualTo(8));
        Assert.That(((ChannelScale)ModuleTree.GetSubmodule(pruned, "scale")).Channels, Is.EqualTo(8), "the per-channel layer shrinks with its group");
        var gated = (GatedProjection)ModuleTree.GetSubmodule(pruned, "gated");
        Assert.That((gated.Inputs, gated.Outputs), Is.EqualTo((8L, 6L)), "the dense layer loses input and output channels");
        Assert.That(((Linear)ModuleTree.GetSubmodule(pruned, "fc2")).in_features, Is.EqualTo(6));
        Assert.That(TestModels.Output(pruned, input), Is.EqualTo(expected).Within(1e-5));
    }

    [Test]
    public void PerChannelKind_OnASequence_ChannelsInTheLastDimension_PrunedWithTheMlp()
    {
        // [N, L, E] after a Linear: the channels are in the last dimension, and the described layer scales them there.
        using var registration = Register(new LastDimensionScaleDescriptor());
        torch.random.manual_seed(9);
        using var original = nn.Sequential(("up", nn.Linear(8, 16)), ("scale", new LastDimensionScale(16)), ("gelu", nn.GELU()), ("down", nn.Linear(16, 4)));
        using (no_grad())
        {
            var up = (Linear)ModuleTree.GetSubmodule(original, "up");
            up.weight![TensorIndex.Slice(0, 4)].zero_();
            up.bias![TensorIndex.Slice(0, 4)].zero_();
        }

        using var input = randn(3, 5, 8);
        var expected = TestModels.Output(original, input);
        var data = new TensorDataset(randn(6, 5, 8), randn(6, 5, 4));
        using var copy = ModuleCloner.DeepClone(original);
        using var pruned = new StructuredPruningStep(new StructuredPruningOptions { Ratio = 0.25 }).Apply(copy, new CompressionContext(new CompressionData(data, data), copy));

        Assert.That(((LastDimensionScale)ModuleTree.GetSubmodule(pruned, "scale")).Channels, Is.EqualTo(12));
        Assert.That(((Linear)ModuleTree.GetSubmodule(pruned, "down")).in_features, Is.EqualTo(12));
        Assert.That(TestModels.Output(pruned, input), Is.EqualTo(expected).Within(1e-5));
    }

    [Test]
    public void ThirdPartyKinds_FlowThroughPruningQuantizationTheFileAndOnnx()
    {
        // One registration per kind covers everything: structured pruning, dynamic int8 of the Linear inside the
        // gated projection, the file (saved and loaded without the architecture) and ONNX (the descriptors emit it).
        using var registration = Register(new ChannelScaleDescriptor(), new GatedProjectionDescriptor());
        torch.random.manual_seed(10);
        using var model = Model();
        using var images = randn(64, 8);
        using var labels = model.call(images).argmax(1);
        var data = new TensorDataset(images, labels);
        using var result = CompressionPipeline.Create()
            .AddStructuredPruning(new StructuredPruningOptions { Ratio = 0.25, Layers = new LayerSelection { Types = [typeof(Linear), typeof(GatedProjection)] } })
            .AddPostTrainingQuantization(ModelCompression.Quantization.QuantizationMode.DynamicInt8)
            .WithAccuracyCheck(1.0, AccuracyCheckPolicy.SkipStep)
            .WithLatencyMeasurement(new ModelCompression.Metrics.LatencyOptions { Enabled = false })
            .Build()
            .Run(model, new CompressionData(data, data));
        var compressed = result.Model;
        Assert.That(result.Report.Steps.Select(s => s.Accepted), Is.All.True, string.Join("; ", result.Report.Steps.Select(s => s.Message)));
        Assert.That(((GatedProjection)ModuleTree.GetSubmodule(compressed, "gated")).Outputs, Is.EqualTo(9));

        using var stream = new MemoryStream();
        CompressedModel.Save(compressed, stream);
        stream.Position = 0;
        using var loaded = CompressedModel.Load(stream);
        Assert.That(TestModels.Output(loaded, images), Is.EqualTo(TestModels.Output(compressed, images)));

        ModelCompression.Tests.Interop.Onnx.OnnxLayerKindsTests.AssertParity(compressed, images, new ModelCompression.Interop.Onnx.OnnxExportOptions(), tolerance: 2e-2);
    }

    [Test]
    public void DescribedKinds_WithoutDescriptors_RefusedNamingTheWayToDescribeThem()
    {
        torch.random.manual_seed(4);
        using var model = Model();
        var ex = Assert.Throws<UnsupportedModelException>(() => Prune(model, new StructuredPruningOptions { Ratio = 0.5 }));
        Assert.That(ex!.Message, Does.Contain("scale").And.Contain(nameof(LayerDescriptor.DescribeChannels)));
    }

    [Test]
    public void Taylor_ScoresADescribedProducer_L1NeedsItsWeight()
    {
        using var registration = Register(new ChannelScaleDescriptor(), new GatedProjectionDescriptor(weight: false));
        torch.random.manual_seed(5);
        using var model = Model();
        var selection = new LayerSelection { Types = [typeof(Linear), typeof(GatedProjection)] };
        var ex = Assert.Throws<InvalidOperationException>(() => Prune(ModuleCloner.DeepClone(model), new StructuredPruningOptions { Ratio = 0.5, Layers = selection }));
        Assert.That(ex!.Message, Does.Contain("gated").And.Contain(nameof(TaylorImportance)));

        using var pruned = Prune(ModuleCloner.DeepClone(model), new StructuredPruningOptions { Ratio = 0.5, Layers = selection, Importance = new TaylorImportance(2) });
        Assert.That(((GatedProjection)ModuleTree.GetSubmodule(pruned, "gated")).Outputs, Is.EqualTo(6));
    }

    [Test]
    public void DescriptorThatShrinksWrongly_InvalidOperationException_ModelUnchanged()
    {
        using var registration = Register(new ChannelScaleDescriptor(shrinkWrongly: true), new GatedProjectionDescriptor());
        torch.random.manual_seed(6);
        using var model = Model();
        string before = TestModels.StateHash(model);
        var ex = Assert.Throws<InvalidOperationException>(() => Prune(model, new StructuredPruningOptions { Ratio = 0.5, Layers = new LayerSelection { Types = [typeof(Linear), typeof(GatedProjection)] } }));
        Assert.That(ex!.Message, Does.Contain(nameof(ChannelScaleDescriptor)).And.Contain("scale").And.Contain("Nothing has been changed"));
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
        Assert.That(((Linear)ModuleTree.GetSubmodule(model, "fc1")).out_features, Is.EqualTo(16));
    }

    [Test]
    public void InconsistentDescription_InvalidOperationExceptionNamingTheDescriptor()
    {
        using var registration = Register(new ChannelScaleDescriptor(describeWrongly: true), new GatedProjectionDescriptor());
        torch.random.manual_seed(7);
        using var model = Model();
        var ex = Assert.Throws<InvalidOperationException>(() => Prune(model, new StructuredPruningOptions { Ratio = 0.5 }));
        Assert.That(ex!.Message, Does.Contain(nameof(ChannelScaleDescriptor)).And.Contain("per-channel"));
    }

    [Test]
    public void DescriptionThatDisagreesWithTheTensors_GroupNotPrunedWithTheReason()
    {
        // The descriptor says 4 channels where the layer reads 16: the tracer believes the tensors, not the descriptor.
        using var registration = Register(new ChannelScaleDescriptor(channelsOverride: 4), new GatedProjectionDescriptor());
        torch.random.manual_seed(8);
        using var model = Model();
        var ex = Assert.Throws<UnsupportedModelException>(() => Prune(model, new StructuredPruningOptions { Ratio = 0.5 }));
        Assert.That(ex!.Message, Does.Contain("gives 4 input and 4 output channels").And.Contain("read 16"));
    }

    private static nn.Module<Tensor, Tensor> Model() => nn.Sequential(
        ("fc1", nn.Linear(8, 16)),
        ("scale", new ChannelScale(16)),
        ("relu", nn.ReLU()),
        ("gated", new GatedProjection(16, 12)),
        ("relu2", nn.ReLU()),
        ("fc2", nn.Linear(12, 3)));

    private static nn.Module<Tensor, Tensor> Prune(nn.Module<Tensor, Tensor> model, StructuredPruningOptions options)
    {
        var data = new TensorDataset(randn(16, 8), randint(0, 3, [16], dtype: int64));
        return new StructuredPruningStep(options).Apply(model, new CompressionContext(new CompressionData(data, data), model));
    }

    private static Registration Register(params LayerDescriptor[] descriptors)
    {
        foreach (var descriptor in descriptors)
        {
            LayerRegistry.Register(descriptor);
        }

        return new Registration(descriptors.Select(d => d.ModuleType).ToList());
    }

    private sealed class Registration(List<Type> types) : IDisposable
    {
        public void Dispose() => types.ForEach(t => LayerRegistry.Unregister(t));
    }

    /// <summary>y = x · s, one learned scale per channel (dimension 1).</summary>
    internal sealed class ChannelScale : nn.Module<Tensor, Tensor>
    {
        private readonly Parameter scale;

        public ChannelScale(long channels)
            : base(nameof(ChannelScale))
        {
            scale = new Parameter(rand(channels) + 0.5);
            RegisterComponents();
        }

        public Parameter Scale => scale;

        public long Channels => scale.shape[0];

        public override Tensor forward(Tensor input) => input * scale.view([1, -1, .. Enumerable.Repeat(1L, (int)input.dim() - 2)]);
    }

    /// <summary>y = Linear(x) · sigmoid(g): a child layer and a parameter of its own.</summary>
    internal sealed class GatedProjection : nn.Module<Tensor, Tensor>
    {
        private readonly Linear projection;
        private readonly Parameter gate;

        public GatedProjection(long inputs, long outputs)
            : base(nameof(GatedProjection))
        {
            projection = nn.Linear(inputs, outputs);
            gate = new Parameter(randn(outputs));
            RegisterComponents();
        }

        public Linear Projection => projection;

        public Parameter Gate => gate;

        public long Inputs => projection.in_features;

        public long Outputs => projection.out_features;

        public override Tensor forward(Tensor input) => projection.call(input) * gate.sigmoid();
    }

    /// <summary>y = x · s over the last dimension (a sequence's channels).</summary>
    internal sealed class LastDimensionScale : nn.Module<Tensor, Tensor>
    {
        private readonly Parameter scale;

        public LastDimensionScale(long channels)
            : base(nameof(LastDimensionScale))
        {
            scale = new Parameter(rand(channels) + 0.5);
            RegisterComponents();
        }

        public Parameter Scale => scale;

        public long Channels => scale.shape[0];

        public override Tensor forward(Tensor input) => input * scale;
    }

    private sealed class LastDimensionScaleDescriptor() : LayerDescriptor("tests.LastDimensionScale", typeof(LastDimensionScale))
    {
        public override LayerAttributes GetAttributes(nn.Module module) => new LayerAttributes().Set("channels", ((LastDimensionScale)module).Channels);

        public override nn.Module Create(LayerAttributes attributes, int version) => new LastDimensionScale(attributes.GetInt64("channels", 1, 1 << 20));

        public override ChannelDescription? DescribeChannels(nn.Module module) => ChannelDescription.PerChannel(((LastDimensionScale)module).Channels);

        public override nn.Module ShrinkChannels(nn.Module module, long[]? keptOutputs, long[]? keptInputs)
        {
            var old = (LastDimensionScale)module;
            var result = new LastDimensionScale(keptOutputs?.Length ?? old.Channels);
            using var kept = tensor(keptOutputs ?? [.. Enumerable.Range(0, (int)old.Channels).Select(i => (long)i)]);
            using (no_grad())
            {
                result.Scale.copy_(old.Scale.index_select(0, kept));
            }

            return result;
        }
    }

    private sealed class ChannelScaleDescriptor(bool shrinkWrongly = false, bool describeWrongly = false, long? channelsOverride = null)
        : LayerDescriptor("tests.ChannelScale", typeof(ChannelScale)), IOnnxLayerEmitter
    {
        public string EmitOnnx(OnnxGraph graph, nn.Module module, string name, string input)
        {
            var scale = ((ChannelScale)module).Scale;
            using var values = scale.detach().reshape(1, -1);
            return graph.Node("Mul", name, [input, graph.Constant(name + ".scale", values)]);
        }

        public override LayerAttributes GetAttributes(nn.Module module) => new LayerAttributes().Set("channels", ((ChannelScale)module).Channels);

        public override nn.Module Create(LayerAttributes attributes, int version) => new ChannelScale(attributes.GetInt64("channels", 1, 1 << 20));

        public override ChannelDescription? DescribeChannels(nn.Module module)
        {
            long channels = channelsOverride ?? ((ChannelScale)module).Channels;
            return describeWrongly ? new ChannelDescription(ChannelCoupling.PerChannel, channels, channels + 1) : ChannelDescription.PerChannel(channels);
        }

        public override nn.Module ShrinkChannels(nn.Module module, long[]? keptOutputs, long[]? keptInputs)
        {
            var old = (ChannelScale)module;
            Assert.That(keptInputs, Is.EqualTo(keptOutputs), "per channel: the same channels on both sides");
            using var kept = tensor(keptOutputs ?? [.. Enumerable.Range(0, (int)old.Channels).Select(i => (long)i)]);
            var result = new ChannelScale(shrinkWrongly ? kept.shape[0] + 1 : kept.shape[0]);
            if (!shrinkWrongly)
            {
                using (no_grad())
                {
                    result.Scale.copy_(old.Scale.index_select(0, kept));
                }
            }

            result.train(old.training);
            return result;
        }
    }

    private sealed class GatedProjectionDescriptor(bool weight = true) : LayerDescriptor("tests.GatedProjection", typeof(GatedProjection)), IOnnxLayerEmitter
    {
        public string EmitOnnx(OnnxGraph graph, nn.Module module, string name, string input)
        {
            var gated = (GatedProjection)module;
            string projected = graph.Emit(gated.Projection, name + ".projection", input);
            using var gate = gated.Gate.detach().sigmoid().reshape(1, -1);
            return graph.Node("Mul", name, [projected, graph.Constant(name + ".gate", gate)]);
        }

        public override LayerAttributes GetAttributes(nn.Module module)
        {
            var g = (GatedProjection)module;
            return new LayerAttributes().Set("in", g.Inputs).Set("out", g.Outputs);
        }

        public override nn.Module Create(LayerAttributes attributes, int version) =>
            new GatedProjection(attributes.GetInt64("in", 1, 1 << 20), attributes.GetInt64("out", 1, 1 << 20));

        public override ChannelDescription? DescribeChannels(nn.Module module)
        {
            var g = (GatedProjection)module;
            return ChannelDescription.Dense(g.Inputs, g.Outputs);
        }

        public override Tensor? GetChannelWeight(nn.Module module) => weight ? ((GatedProjection)module).Projection.weight : null;

        public override nn.Module ShrinkChannels(nn.Module module, long[]? keptOutputs, long[]? keptInputs)
        {
            var old = (GatedProjection)module;
            // The new layer is built outside the dispose scope: its parameters must outlive it.
            var result = new GatedProjection(keptInputs?.Length ?? old.Inputs, keptOutputs?.Length ?? old.Outputs);
            using var scope = NewDisposeScope();
            var rows = tensor(keptOutputs ?? [.. Enumerable.Range(0, (int)old.Outputs).Select(i => (long)i)]);
            var columns = tensor(keptInputs ?? [.. Enumerable.Range(0, (int)old.Inputs).Select(i => (long)i)]);
            using (no_grad())
            {
                result.Projection.weight!.copy_(old.Projection.weight!.index_select(0, rows).index_select(1, columns));
                result.Projection.bias!.copy_(old.Projection.bias!.index_select(0, rows));
                result.Gate.copy_(old.Gate.index_select(0, rows));
            }

            result.train(old.training);
            return result;
        }
    }
}
