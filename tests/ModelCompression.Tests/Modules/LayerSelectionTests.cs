using ModelCompression.Modules;
using ModelCompression.Samples;
using NUnit.Framework;
using TorchSharp.Modules;

namespace ModelCompression.Tests.Modules;

[TestFixture]
public sealed class LayerSelectionTests
{
    [Test]
    public void Default_SelectsLinearAndConvLayers()
    {
        using var model = ModelZoo.LeNet5();
        Assert.That(LayerSelection.Default.Select(model).Select(s => s.Name), Is.EqualTo(new[] { "conv1", "conv2", "fc1", "fc2", "fc3" }));
    }

    [Test]
    public void OfType_Named_Except_Combine()
    {
        using var model = ModelZoo.LeNet5();
        Assert.That(LayerSelection.OfType<Linear>().Except("fc3").Select(model).Select(s => s.Name), Is.EqualTo(new[] { "fc1", "fc2" }));
        Assert.That(LayerSelection.Named("conv*", "fc?").Except("fc2").Select(model).Select(s => s.Name), Is.EqualTo(new[] { "conv1", "conv2", "fc1", "fc3" }));
    }

    [Test]
    public void FindUnknownNames_ReportsTyposButNotPatterns()
    {
        using var model = ModelZoo.LeNet5();
        Assert.That(LayerSelection.Named("fc1", "fcx", "conv*").FindUnknownNames(model), Is.EqualTo(new[] { "The model has no layer named 'fcx'." }));
    }

    [Test]
    public void Validate_EmptyTypesOrNames_ListsErrors()
    {
        var selection = new LayerSelection { Types = [], Include = [" "], Exclude = [""] };
        Assert.That(selection.Validate(), Has.Count.EqualTo(3));
        Assert.That(new LayerSelection { Types = [typeof(string)] }.Validate(), Has.Count.EqualTo(1));
    }
}
