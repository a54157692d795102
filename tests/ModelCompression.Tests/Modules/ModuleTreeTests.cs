using ModelCompression.Modules;
using ModelCompression.Samples;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Modules;

[TestFixture]
public sealed class ModuleTreeTests
{
    [Test]
    public void Replace_ChildOfSequentialRoot_ReturnsNewRootWithSameNames()
    {
        using var model = ModelZoo.LeNet300100();
        var replacement = nn.Linear(784, 300);
        var root = ModuleTree.Replace(model, "fc1", replacement);

        Assert.That(root, Is.Not.SameAs(model));
        Assert.That(root.named_children().Select(c => c.name), Is.EqualTo(model.named_children().Select(c => c.name)));
        Assert.That(ModuleTree.GetSubmodule(root, "fc1"), Is.SameAs(replacement));
        Assert.That(ModuleTree.GetSubmodule(root, "fc2"), Is.SameAs(ModuleTree.GetSubmodule(model, "fc2")));
        using var x = randn(2, 784);
        Assert.That(root.call(x).shape, Is.EqualTo(new long[] { 2, 10 }));
    }

    [Test]
    public void Replace_InsideCustomModule_UpdatesFieldAndRegistryInPlace()
    {
        using var model = ModelZoo.SmallResNet();
        var keys = model.state_dict().Keys.ToList();
        var replacement = nn.Conv2d(16, 16, 3, padding: 1, bias: false);
        using (no_grad())
        {
            replacement.weight!.zero_();
        }

        var root = ModuleTree.Replace(model, "block.conv2", replacement);

        Assert.That(root, Is.SameAs(model));
        Assert.That(ModuleTree.GetSubmodule(model, "block.conv2"), Is.SameAs(replacement));
        Assert.That(model.state_dict().Keys, Is.EqualTo(keys), "order of the state_dict is kept");
        Assert.That(model.parameters().Any(p => ReferenceEquals(p, replacement.weight)), Is.True);

        // forward() reads the field: with conv2 zeroed, bn2 (eval mode, fresh statistics) gives its bias, 0, so the
        // block returns relu(0 + input) = relu(input).
        var block = (nn.Module<Tensor, Tensor>)ModuleTree.GetSubmodule(model, "block");
        block.eval();
        using var x = randn(2, 16, 7, 7);
        using var y = block.call(x);
        using var expected = x.relu();
        Assert.That(y.allclose(expected, rtol: 1e-5, atol: 1e-5), Is.True);
    }

    [Test]
    public void Replace_UnknownName_Throws()
    {
        using var model = ModelZoo.LeNet300100();
        var ex = Assert.Throws<ArgumentException>(() => ModuleTree.Replace(model, "fc9", nn.Linear(1, 1)));
        Assert.That(ex!.Message, Does.Contain("fc9"));
    }

    [Test]
    public void Replace_FieldOfAnIncompatibleType_ThrowsAndChangesNothing()
    {
        using var model = new Holder();
        string before = TestModels.StateHash(model);
        var ex = Assert.Throws<ArgumentException>(() => ModuleTree.Replace(model, "inner", nn.Identity()));
        Assert.That(ex!.Message, Does.Contain("Linear"));
        Assert.That(ModuleTree.GetSubmodule(model, "inner"), Is.InstanceOf<Linear>());
        Assert.That(TestModels.StateHash(model), Is.EqualTo(before));
    }

    private sealed class Holder : nn.Module<Tensor, Tensor>
    {
        private readonly Linear inner = nn.Linear(2, 2);

        public Holder()
            : base(nameof(Holder)) => RegisterComponents();

        public override Tensor forward(Tensor input) => inner.call(input);
    }
}
