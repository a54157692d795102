using ModelCompression.Metrics;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Metrics;

[TestFixture]
public sealed class ModelMetricsTests
{
    [Test]
    public void Linear_ParametersAndMacs()
    {
        using var layer = nn.Linear(20, 30);
        using var x = zeros(1, 20);
        Assert.That(ModelMetrics.CountParameters(layer), Is.EqualTo((20 * 30) + 30));
        Assert.That(ModelMetrics.CountMacs(layer, x), Is.EqualTo(20 * 30));
        Assert.That(ModelMetrics.TensorBytes(layer), Is.EqualTo(((20 * 30) + 30) * 4));
        Assert.That(ModelMetrics.SizeInBytes(layer), Is.InRange(((20 * 30) + 30) * 4, (((20 * 30) + 30) * 4) + 100), "the file: the tensors plus a small header");
    }

    [Test]
    public void Linear_MacsArePerSample()
    {
        using var layer = nn.Linear(20, 30);
        using var x = zeros(5, 20);
        Assert.That(ModelMetrics.CountMacs(layer, x), Is.EqualTo(20 * 30));
    }

    [Test]
    public void Conv2d_ParametersAndMacs()
    {
        // Output 8×10×10, each needs 3·3·3 = 27 MACs.
        using var conv = nn.Conv2d(3, 8, 3, padding: 1);
        using var x = zeros(1, 3, 10, 10);
        Assert.That(ModelMetrics.CountParameters(conv), Is.EqualTo((8 * 3 * 9) + 8));
        Assert.That(ModelMetrics.CountMacs(conv, x), Is.EqualTo(8 * 10 * 10 * 27));
    }

    [Test]
    public void StridedConv2d_Macs()
    {
        // Output 8×5×5 (stride 2, padding 1 on 10×10).
        using var conv = nn.Conv2d(3, 8, 3, stride: 2, padding: 1);
        using var x = zeros(1, 3, 10, 10);
        Assert.That(ModelMetrics.CountMacs(conv, x), Is.EqualTo(8 * 5 * 5 * 27));
    }

    [Test]
    public void GroupedConv2d_ParametersAndMacs()
    {
        // groups = 2: weight [8, 2, 3, 3]; each output needs 2·9 = 18 MACs.
        using var conv = nn.Conv2d(4, 8, 3, padding: 1, groups: 2);
        using var x = zeros(1, 4, 10, 10);
        Assert.That(ModelMetrics.CountParameters(conv), Is.EqualTo((8 * 2 * 9) + 8));
        Assert.That(ModelMetrics.CountMacs(conv, x), Is.EqualTo(8 * 10 * 10 * 18));
    }

    [Test]
    public void DepthwiseConv2d_ParametersAndMacs()
    {
        // groups = channels: weight [4, 1, 3, 3]; each output needs 9 MACs.
        using var conv = nn.Conv2d(4, 4, 3, padding: 1, groups: 4, bias: false);
        using var x = zeros(1, 4, 10, 10);
        Assert.That(ModelMetrics.CountParameters(conv), Is.EqualTo(4 * 9));
        Assert.That(ModelMetrics.CountMacs(conv, x), Is.EqualTo(4 * 10 * 10 * 9));
    }

    [Test]
    public void Sequential_PerLayerMacsAndNonzeroCount()
    {
        using var model = nn.Sequential(("conv", nn.Conv2d(1, 2, 3)), ("flat", nn.Flatten()), ("fc", nn.Linear(2 * 4 * 4, 5)));
        using (no_grad())
        {
            model.named_parameters().Single(p => p.name == "fc.weight").parameter.zero_();
        }

        using var x = zeros(1, 1, 6, 6);
        var macs = ModelMetrics.CountMacsPerLayer(model, x);
        Assert.That(macs["conv"], Is.EqualTo(2 * 4 * 4 * 9));
        Assert.That(macs["fc"], Is.EqualTo(32 * 5));
        long parameters = (2 * 9) + 2 + (32 * 5) + 5;
        Assert.That(ModelMetrics.CountParameters(model), Is.EqualTo(parameters));
        Assert.That(ModelMetrics.CountNonzeroParameters(model), Is.EqualTo(parameters - (32 * 5)));
    }

    [Test]
    public void Measure_ListsLayersAndLatency()
    {
        using var model = nn.Sequential(("fc1", nn.Linear(8, 4)), ("relu", nn.ReLU()), ("fc2", nn.Linear(4, 2)));
        var m = ModelMetrics.Measure(model, [8], new LatencyOptions { Warmup = 1, Repeats = 3 });
        Assert.That(m.Layers.Select(l => l.Name), Is.EqualTo(new[] { "fc1", "fc2" }));
        Assert.That(m.Layers.Select(l => l.Macs), Is.EqualTo(new long[] { 32, 8 }));
        Assert.That(m.Macs, Is.EqualTo(40));
        Assert.That(m.Latency!.Batch1, Is.GreaterThan(0));
        Assert.That(m.Latency.Batch64, Is.GreaterThan(0));
    }

    [Test]
    public void MeasureLatency_InvalidOptions_Throws()
    {
        using var model = nn.Linear(2, 2);
        var ex = Assert.Throws<OptionsValidationException>(() => ModelMetrics.MeasureLatency(model, [2], new LatencyOptions { Warmup = -1, Repeats = 0 }));
        Assert.That(ex!.Errors, Has.Count.EqualTo(2));
    }

    [Test]
    public void CountMacs_RemovesItsHooks()
    {
        using var layer = nn.Linear(3, 3);
        using var x = zeros(1, 3);
        ModelMetrics.CountMacs(layer, x);
        // A second count gives the same figure: no hook left behind adds to it.
        Assert.That(ModelMetrics.CountMacs(layer, x), Is.EqualTo(9));
    }

    [Test]
    public void TiedWeights_CountOnce()
    {
        using var first = nn.Linear(3, 3, hasBias: false);
        using var second = nn.Linear(3, 3, hasBias: false);
        second.weight = first.weight;
        using var model = nn.Sequential(("a", first), ("b", second));
        Assert.That(ModelMetrics.CountParameters(model), Is.EqualTo(9));
        Assert.That(ModelMetrics.TensorBytes(model), Is.EqualTo(9 * 4));
        // The file stores each module's tensors: a tied weight is written (and loaded) once per module.
        Assert.That(ModelMetrics.SizeInBytes(model), Is.GreaterThan(2 * 9 * 4));
    }
}
