using ModelCompression.Modules;
using ModelCompression.Pruning;
using ModelCompression.Tests.Support;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;
using Linear = TorchSharp.Modules.Linear;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace ModelCompression.Tests.Pruning;

[TestFixture]
public sealed class CalibratedPruningTests
{
    [Test]
    public void Wanda_PrunesTheLowestWeightTimesInputNorm_PerRow()
    {
        // Inputs whose channels differ in size: column j's norm is ‖x_j‖₂ over all rows.
        torch.random.manual_seed(1);
        var x = randn(40, 6) * tensor(new float[] { 0.1f, 1, 5, 1, 0.5f, 2 });
        using var model = nn.Sequential(("fc", nn.Linear(6, 3)));
        var weight = ((Linear)model[0]).weight!;
        var w = weight.detach().clone();
        using var data = new TensorDataset(x, zeros(40, dtype: ScalarType.Int64));
        var options = new MagnitudePruningOptions { Sparsity = 0.5, Criterion = PruningCriterion.Wanda(calibrationBatches: 2, calibrationBatchSize: 20), SparseExecution = SparseExecution.Never };
        using var pruned = new MagnitudePruningStep(options).Apply(model, Context(data, model));

        // By hand: score_ij = |w_ij| · sqrt(Σ_r x_rj²); each row keeps its 3 highest of 6.
        var norms = x.square().sum(dim: 0).sqrt();
        var scores = (w.abs() * norms).data<float>().ToArray();
        var result = Weight(pruned, "fc").detach().data<float>().ToArray();
        var original = w.data<float>().ToArray();
        for (int row = 0; row < 3; row++)
        {
            var keep = Enumerable.Range(0, 6).OrderByDescending(j => scores[(row * 6) + j]).Take(3).ToHashSet();
            for (int j = 0; j < 6; j++)
            {
                Assert.That(result[(row * 6) + j], Is.EqualTo(keep.Contains(j) ? original[(row * 6) + j] : 0f), $"row {row}, input {j}");
            }
        }

        // The small-input channel loses weights that magnitude alone would keep.
        Assert.That(Enumerable.Range(0, 3).Count(r => result[(r * 6) + 0] == 0), Is.GreaterThan(Enumerable.Range(0, 3).Count(r => result[(r * 6) + 2] == 0)));
    }

    [TestCase(null)]
    [TestCase("2:4")]
    public void OutputError_SparseGptAtMostWanda_AtMostMagnitude(string? pattern)
    {
        var nm = pattern is null ? null : new NMPattern(2, 4);
        using var generator = new Generator(3);
        // Correlated inputs with channels of different sizes, as a transformer's activations are.
        var mix = (randn([32, 32], generator: generator) / Math.Sqrt(32)) + eye(32);
        var x = randn([512, 32], generator: generator).matmul(mix) * (rand([32], generator: generator) * 3 + 0.1);
        torch.random.manual_seed(2);
        using var model = nn.Sequential(("fc", nn.Linear(32, 24)));
        using var data = new TensorDataset(x, zeros(512, dtype: ScalarType.Int64));
        var errors = new Dictionary<string, double>();
        foreach (var criterion in new PruningCriterion[] { PruningCriterion.Magnitude, PruningCriterion.Wanda(4, 128), PruningCriterion.SparseGpt(blockSize: 8, calibrationBatches: 4, calibrationBatchSize: 128) })
        {
            using var copy = ModuleCloner.DeepClone(model);
            var options = new MagnitudePruningOptions { Sparsity = 0.5, Pattern = nm, Criterion = criterion, SparseExecution = SparseExecution.Never };
            using var pruned = new MagnitudePruningStep(options).Apply(copy, Context(data, model));
            var w = Weight(pruned, "fc").detach();
            Assert.That(w.eq(0).sum().item<long>(), Is.EqualTo(24 * 16), $"{criterion}: exactly half the weights removed");
            if (nm is not null)
            {
                Assert.That(w.reshape(-1, 4).ne(0).sum(1).eq(2).all().item<bool>(), Is.True, $"{criterion}: every group of 4 keeps exactly 2");
            }

            using var noGrad = no_grad();
            var reference = model.call(x);
            errors[criterion.ToString()!] = (pruned.call(x) - reference).square().sum().item<float>();
        }

        TestContext.Out.WriteLine(string.Join(", ", errors.Select(e => $"{e.Key} {e.Value:G4}")));
        Assert.That(errors["SparseGPT"], Is.LessThanOrEqualTo(errors["Wanda"]));
        Assert.That(errors["Wanda"], Is.LessThanOrEqualTo(errors["magnitude"]));
    }

    [Test]
    public void SparseGpt_ZeroSparsityOnAnOverdeterminedLayer_ChangesNothing_AndSameSeedSameResult()
    {
        torch.random.manual_seed(4);
        var x = randn(256, 12);
        using var model = nn.Sequential(("fc1", nn.Linear(12, 16)), ("relu", nn.ReLU()), ("fc2", nn.Linear(16, 5)));
        using var data = new TensorDataset(x, zeros(256, dtype: ScalarType.Int64));
        var none = new MagnitudePruningOptions { Sparsity = 0, Criterion = PruningCriterion.SparseGpt(blockSize: 4), SparseExecution = SparseExecution.Never };
        using (var copy = ModuleCloner.DeepClone(model))
        using (var same = new MagnitudePruningStep(none).Apply(copy, Context(data, model)))
        {
            Assert.That(TestModels.StateHash(same), Is.EqualTo(TestModels.StateHash(model)));
        }

        var half = new MagnitudePruningOptions { Sparsity = 0.5, Criterion = PruningCriterion.SparseGpt(blockSize: 4), SparseExecution = SparseExecution.Never };
        using var a = new MagnitudePruningStep(half).Apply(ModuleCloner.DeepClone(model), Context(data, model, seed: 7));
        using var b = new MagnitudePruningStep(half).Apply(ModuleCloner.DeepClone(model), Context(data, model, seed: 7));
        Assert.That(TestModels.StateHash(a), Is.EqualTo(TestModels.StateHash(b)));
        Assert.That(TestModels.StateHash(a), Is.Not.EqualTo(TestModels.StateHash(model)));
    }

    [Test]
    public void NaNActivationsAtALaterLayer_ClearError_EarlierLayersRestored()
    {
        torch.random.manual_seed(5);
        using var model = nn.Sequential(("fc1", nn.Linear(8, 8)), ("log", new Log()), ("fc2", nn.Linear(8, 3)));
        using var data = new TensorDataset(randn(64, 8), zeros(64, dtype: ScalarType.Int64));
        string before = TestModels.StateHash(model);
        foreach (var criterion in new PruningCriterion[] { PruningCriterion.Wanda(), PruningCriterion.SparseGpt() })
        {
            var options = new MagnitudePruningOptions { Sparsity = 0.5, Criterion = criterion, SparseExecution = SparseExecution.Never };
            var ex = Assert.Throws<ArgumentException>(() => new MagnitudePruningStep(options).Apply(model, Context(data, model)));
            Assert.That(ex!.Message, Does.Contain("fc2").And.Contain("NaN"));
            Assert.That(TestModels.StateHash(model), Is.EqualTo(before), $"{criterion}: fc1 was pruned first and is put back");
        }
    }

    [Test]
    public void InvalidCombinations_ClearErrorsBeforeAnything()
    {
        Assert.That(new MagnitudePruningOptions { Criterion = PruningCriterion.Wanda(), Scope = PruningScope.Global }.Validate(), Has.Some.Contains("layer-wise"));
        Assert.That(new MagnitudePruningOptions { Criterion = PruningCriterion.SparseGpt(), Quality = 1 }.Validate(), Has.Some.Contains("Quality"));
        Assert.That(new MagnitudePruningOptions { Criterion = PruningCriterion.Wanda(), Schedule = new IterativePruning(3), FineTuning = new ModelCompression.Training.TrainingOptions() }.Validate(), Has.Some.Contains("one-shot"));
        Assert.That(new MagnitudePruningOptions { Criterion = PruningCriterion.SparseGpt(blockSize: 6), Pattern = NMPattern.TwoOfFour }.Validate(), Has.Some.Contains("multiple of the pattern's M"));
        Assert.That(new MagnitudePruningOptions { Criterion = PruningCriterion.SparseGpt(dampingFraction: 0), Pattern = NMPattern.TwoOfFour }.Validate(), Has.Some.Contains("DampingFraction"));
        Assert.That(new MagnitudePruningOptions { Criterion = PruningCriterion.Wanda(calibrationBatches: 0) }.Validate(), Has.Some.Contains("CalibrationBatches"));
        Assert.That(new MagnitudePruningOptions { Criterion = null! }.Validate(), Has.Some.Contains("Criterion"));
        Assert.That(new MagnitudePruningOptions { Criterion = PruningCriterion.SparseGpt(), Pattern = NMPattern.TwoOfFour, FineTuning = new ModelCompression.Training.TrainingOptions() }.Validate(), Is.Empty);

        // A convolution in the selection: named, before any change.
        torch.random.manual_seed(6);
        using var cnn = nn.Sequential(("conv", nn.Conv2d(1, 4, 3)), ("flatten", nn.Flatten()), ("fc", nn.Linear(4 * 36, 3)));
        using var images = new TensorDataset(randn(8, 1, 8, 8), zeros(8, dtype: ScalarType.Int64));
        string before = TestModels.StateHash(cnn);
        var ex = Assert.Throws<ArgumentException>(() => new MagnitudePruningStep(new MagnitudePruningOptions { Criterion = PruningCriterion.Wanda() }).Apply(cnn, Context(images, cnn)));
        Assert.That(ex!.Message, Does.Contain("'conv'").And.Contain("Conv2d"));
        Assert.That(TestModels.StateHash(cnn), Is.EqualTo(before));
        using var linearOnly = new MagnitudePruningStep(new MagnitudePruningOptions { Criterion = PruningCriterion.Wanda(1, 8), Layers = LayerSelection.OfType<Linear>(), SparseExecution = SparseExecution.Never }).Apply(cnn, Context(images, cnn));
        Assert.That(Weight(linearOnly, "fc").eq(0).sum().item<long>(), Is.EqualTo(3 * 72));
    }

    [TestCase(true)]
    [TestCase(false)]
    public void Step_LeavesNoLiveTensors(bool sparseGpt)
    {
        torch.random.manual_seed(14);
        using var original = nn.Sequential(("fc1", nn.Linear(16, 32)), ("relu", nn.ReLU()), ("fc2", nn.Linear(32, 4)));
        using var data = new TensorDataset(randn(64, 16), zeros(64, dtype: ScalarType.Int64));
        var options = new MagnitudePruningOptions { Sparsity = 0.5, Criterion = sparseGpt ? PruningCriterion.SparseGpt(blockSize: 8) : PruningCriterion.Wanda(), SparseExecution = SparseExecution.Never };
        var step = new MagnitudePruningStep(options);
        using (var warm = ModuleCloner.DeepClone(original))
        {
            step.Apply(warm, Context(data, original));
        }

        using var model = ModuleCloner.DeepClone(original);
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long before = TestModels.SettledTensorCount();
        step.Apply(model, Context(data, original));
        GC.Collect();
        GC.WaitForPendingFinalizers();
        Assert.That(Tensor.TotalCount - before, Is.EqualTo(0), "the Hessians, masks, originals and calibration tensors are all released");
    }

    private static Tensor Weight(nn.Module model, string layer) => model.named_parameters().Single(p => p.name == layer + ".weight").parameter;

    private static CompressionContext Context(TensorDataset data, nn.Module<Tensor, Tensor> original, int seed = 0) =>
        new(new ModelCompression.CompressionData(data, data), original, seed: seed);

    private sealed class Log() : nn.Module<Tensor, Tensor>(nameof(Log))
    {
        public override Tensor forward(Tensor input) => input.log();
    }
}
