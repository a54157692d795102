using ModelCompression.Modules;
using ModelCompression.Samples;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Modules;

[TestFixture]
public sealed class ModuleClonerTests
{
    [TestCase(ZooModel.LeNet300100)]
    [TestCase(ZooModel.LeNet5)]
    [TestCase(ZooModel.SmallResNet)]
    public void DeepClone_ZooModel_SameOutputsAndStateButIndependent(ZooModel kind)
    {
        using var model = ModelZoo.Create(kind, 3);
        using var input = randn(2, 1, 28, 28);
        model.train();
        using (no_grad())
        {
            model.call(input); // moves BatchNorm running statistics away from their defaults
        }

        model.eval();
        using var clone = ModuleCloner.DeepClone(model);

        Assert.That(clone.GetType(), Is.EqualTo(model.GetType()));
        Assert.That(clone.state_dict().Keys, Is.EqualTo(model.state_dict().Keys));
        Assert.That(TestModels.StateHash(clone), Is.EqualTo(TestModels.StateHash(model)));
        Assert.That(TestModels.Output(clone, input), Is.EqualTo(TestModels.Output(model, input)));
        Assert.That(clone.training, Is.False);

        string before = TestModels.StateHash(model);
        using (no_grad())
        {
            foreach (var p in clone.parameters())
            {
                p.add_(1);
            }

            foreach (var b in clone.buffers())
            {
                b.add_(1);
            }
        }

        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
        Assert.That(clone.parameters().Select(p => p.Handle).Intersect(model.parameters().Select(p => p.Handle)), Is.Empty);
    }

    [Test]
    public void DeepClone_KeepsRequiresGradAndTrainingFlagsPerModule()
    {
        using var model = nn.Sequential(("a", nn.Linear(2, 2)), ("b", nn.Dropout(0.5)));
        model.train();
        model.named_children().Single(c => c.name == "b").module.eval();
        model.named_parameters().Single(p => p.name == "a.bias").parameter.requires_grad = false;

        using var clone = ModuleCloner.DeepClone(model);

        Assert.That(clone.training, Is.True);
        Assert.That(clone.named_children().Single(c => c.name == "b").module.training, Is.False);
        Assert.That(clone.named_parameters().Single(p => p.name == "a.bias").parameter.requires_grad, Is.False);
        Assert.That(clone.named_parameters().Single(p => p.name == "a.weight").parameter.requires_grad, Is.True);
    }

    [Test]
    public void DeepClone_TiedWeightsStayTied()
    {
        using var model = new Tied();
        using var clone = ModuleCloner.DeepClone(model);
        Assert.That(ReferenceEquals(clone.First.weight, clone.Second.weight), Is.True);
        Assert.That(ReferenceEquals(clone.First.weight, model.First.weight), Is.False);
    }

    [Test]
    public void DeepClone_CloneTrainsWithoutTouchingTheOriginal()
    {
        var (model, train, test) = TestModels.TrainedMlp();
        using (model)
        using (train)
        using (test)
        {
            string before = TestModels.StateHash(model);
            using var clone = ModuleCloner.DeepClone(model);
            new ModelCompression.Training.Trainer(new() { Epochs = 1 }).Train(clone, train);
            Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
            Assert.That(TestModels.StateHash(clone), Is.Not.EqualTo(before));
        }
    }

    private sealed class Tied : nn.Module<Tensor, Tensor>
    {
        public Tied()
            : base(nameof(Tied))
        {
            First = nn.Linear(3, 3);
            Second = nn.Linear(3, 3);
            Second.weight = First.weight;
            RegisterComponents();
        }

        public TorchSharp.Modules.Linear First { get; }

        public TorchSharp.Modules.Linear Second { get; }

        public override Tensor forward(Tensor input) => Second.call(First.call(input));
    }
}
