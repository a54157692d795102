using ModelCompression.Data;
using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Serialization;
using ModelCompression.Tests.Support;
using ModelCompression.Training;
using NUnit.Framework;
using TorchSharp;
using TorchSharp.Modules;
using TensorDataset = ModelCompression.Data.TensorDataset;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Modules;

/// <summary>Module lists and dictionaries of any element type, and TorchSharp's parameter-free layers in the file.</summary>
[TestFixture]
public sealed class ContainerLayerTests
{
    /// <summary>Blocks in a <c>ModuleList&lt;Block&gt;</c>, linear heads in a <c>ModuleDict&lt;Linear&gt;</c> (neither element type can hold a compressed layer).</summary>
    private sealed class ListNet : nn.Module<Tensor, Tensor>
    {
        private readonly ModuleList<Block> blocks;
        private readonly ModuleDict<Linear> heads;

        public ListNet(int seed)
            : base(nameof(ListNet))
        {
            torch.manual_seed(seed);
            blocks = nn.ModuleList(new Block(), new Block());
            heads = nn.ModuleDict(("a", nn.Linear(16, 3)), ("b", nn.Linear(16, 3)));
            RegisterComponents();
        }

        public override Tensor forward(Tensor input)
        {
            using var scope = NewDisposeScope();
            var x = input;
            foreach (var block in blocks)
            {
                x = block.call(x);
            }

            return (heads["a"].call(x) + heads["b"].call(x)).MoveToOuterDisposeScope();
        }
    }

    private sealed class Block : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module<Tensor, Tensor> fc = nn.Linear(16, 16);

        public Block()
            : base(nameof(Block)) => RegisterComponents();

        public override Tensor forward(Tensor input) => nn.functional.relu(fc.call(input));
    }

    private sealed class Holder : nn.Module<Tensor, Tensor>
    {
        private readonly ModuleList<nn.Module<Tensor, Tensor>> any = nn.ModuleList<nn.Module<Tensor, Tensor>>(nn.Linear(4, 4), nn.ReLU());
        private readonly ModuleList<Linear> typed = nn.ModuleList(nn.Linear(4, 4));

        public Holder()
            : base(nameof(Holder)) => RegisterComponents();

        public ModuleList<nn.Module<Tensor, Tensor>> Any => any;

        public override Tensor forward(Tensor input) => typed[0].call(input);
    }

    private static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.equal(b).all().item<bool>();

    [Test]
    public void ModuleListAndDict_QuantizeSaveAndLoad()
    {
        using var original = new ListNet(1);
        original.eval();
        using var model = ModuleCloner.DeepClone(original);
        using var generator = new Generator(2);
        using var data = new TensorDataset(randn([32, 16], generator: generator), zeros(32, dtype: int64));
        var context = new CompressionContext(new CompressionData(data, data) { Evaluator = new AccuracyEvaluator() }, original);

        var result = new PostTrainingQuantizationStep(new PostTrainingQuantizationOptions()).Apply(model, context);

        Assert.That(result.named_modules().Where(m => m.module is QuantizedLinear).Select(m => m.name), Is.EquivalentTo(new[] { "blocks.0.fc", "blocks.1.fc" }));
        Assert.That(context.Notes, Has.Some.Contains("'heads.a'").And.Contains("holds Linear modules"), "a ModuleDict<Linear> cannot hold a quantized layer: rounded in place");

        using var input = randn(4, 16);
        using var expected = result.call(input);
        using var stream = new MemoryStream();
        CompressedModel.Save(result, stream);
        stream.Position = 0;
        using var loaded = CompressedModel.Load(stream, new ListNet(9));
        using var actual = loaded.call(input);
        Assert.That(Same(actual, expected), Is.True, "the list's and dictionary's children load in their slots");
        Assert.That(loaded.named_modules().Count(m => m.module is QuantizedLinear), Is.EqualTo(2));
    }

    [Test]
    public void ReplacingAModuleListSlot_UpdatesTheListItself()
    {
        using var holder = new Holder();
        var replacement = nn.Tanh();
        ModuleTree.SetChild(holder.Any, "1", replacement);
        Assert.That(holder.Any[1], Is.SameAs(replacement));
        Assert.That(holder.Any.named_children().Single(c => c.name == "1").module, Is.SameAs(replacement));
        Assert.That(ModuleTree.WhyCannotReplace(holder, "typed.0", typeof(QuantizedLinear)), Does.Contain("holds Linear modules"));
        Assert.That(ModuleTree.WhyCannotReplace(holder, "any.0", typeof(QuantizedLinear)), Is.Null);
    }

    private static IEnumerable<TestCaseData> ParameterFreeLayers()
    {
        yield return new TestCaseData((Func<nn.Module<Tensor, Tensor>>)(() => nn.AdaptiveAvgPool1d(3)), new long[] { 2, 4, 9 }).SetName("AdaptiveAvgPool1d");
        yield return new TestCaseData((Func<nn.Module<Tensor, Tensor>>)(() => nn.AdaptiveMaxPool1d(2)), new long[] { 2, 4, 9 }).SetName("AdaptiveMaxPool1d");
        yield return new TestCaseData((Func<nn.Module<Tensor, Tensor>>)(() => nn.AdaptiveMaxPool2d([2, 3])), new long[] { 2, 4, 7, 9 }).SetName("AdaptiveMaxPool2d");
        yield return new TestCaseData((Func<nn.Module<Tensor, Tensor>>)(() => nn.MaxPool1d(3, 2, 1, 1, true)), new long[] { 2, 4, 9 }).SetName("MaxPool1d");
        yield return new TestCaseData((Func<nn.Module<Tensor, Tensor>>)(() => nn.AvgPool1d(3, 2, 1, true, false)), new long[] { 2, 4, 9 }).SetName("AvgPool1d");
        yield return new TestCaseData((Func<nn.Module<Tensor, Tensor>>)(() => nn.ELU(0.7)), new long[] { 3, 5 }).SetName("ELU");
        yield return new TestCaseData((Func<nn.Module<Tensor, Tensor>>)(() => nn.Softplus(2, 10)), new long[] { 3, 5 }).SetName("Softplus");
        yield return new TestCaseData((Func<nn.Module<Tensor, Tensor>>)(() => nn.Mish()), new long[] { 3, 5 }).SetName("Mish");
        yield return new TestCaseData((Func<nn.Module<Tensor, Tensor>>)(() => nn.Hardsigmoid()), new long[] { 3, 5 }).SetName("Hardsigmoid");
        yield return new TestCaseData((Func<nn.Module<Tensor, Tensor>>)(() => nn.Softsign()), new long[] { 3, 5 }).SetName("Softsign");
        yield return new TestCaseData((Func<nn.Module<Tensor, Tensor>>)(() => nn.GLU(1)), new long[] { 3, 6 }).SetName("GLU");
        yield return new TestCaseData((Func<nn.Module<Tensor, Tensor>>)(() => nn.Dropout1d(0.25)), new long[] { 2, 4, 5 }).SetName("Dropout1d");
        yield return new TestCaseData((Func<nn.Module<Tensor, Tensor>>)(() => nn.Dropout2d(0.25)), new long[] { 2, 4, 5, 5 }).SetName("Dropout2d");
    }

    [TestCaseSource(nameof(ParameterFreeLayers))]
    public void ParameterFreeLayer_InASequential_LoadsWithoutItsArchitecture(Func<nn.Module<Tensor, Tensor>> build, long[] shape)
    {
        using var model = nn.Sequential(("layer", build()), ("out", nn.Identity()));
        model.eval();
        using var input = randn(shape);
        using var expected = model.call(input);
        using var stream = new MemoryStream();
        CompressedModel.Save(model, stream);
        stream.Position = 0;

        using var loaded = CompressedModel.Load(stream);

        var layer = loaded.named_children().First().module;
        Assert.That(layer.GetType(), Is.EqualTo(model.named_children().First().module.GetType()));
        using var actual = loaded.call(input);
        Assert.That(Same(actual, expected), Is.True);
    }
}
