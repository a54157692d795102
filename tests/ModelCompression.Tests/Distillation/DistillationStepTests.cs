using ModelCompression.Distillation;
using ModelCompression.Modules;
using ModelCompression.Pruning;
using ModelCompression.Tests.Support;
using ModelCompression.Training;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace ModelCompression.Tests.Distillation;

[TestFixture]
public sealed class DistillationStepTests
{
    private nn.Module<Tensor, Tensor> _teacher = null!;
    private TensorDataset _train = null!;
    private TensorDataset _test = null!;

    [OneTimeSetUp]
    public void TrainTeacher() => (_teacher, _train, _test) = TestModels.TrainedMlp(seed: 11);

    [OneTimeTearDown]
    public void Cleanup()
    {
        _teacher.Dispose();
        _train.Dispose();
        _test.Dispose();
    }

    private CompressionContext Context() => new(new CompressionData(_train, _test), _teacher, seed: 2);

    private static nn.Module<Tensor, Tensor> Student(int hidden, int seed)
    {
        torch.random.manual_seed(seed);
        return nn.Sequential(("fc1", nn.Linear(4, hidden)), ("relu", nn.ReLU()), ("fc2", nn.Linear(hidden, 3)));
    }

    [Test]
    public void SoftTargets_EqualAHandComputedValue()
    {
        // T = 2, student [1, 2, 3], teacher [3, 2, 1]: KL(softmax(t/2) ‖ softmax(s/2)) = 0.3201566678, × T² = 1.2806266713.
        using var s = tensor(new float[] { 1, 2, 3 }, [1, 3]);
        using var t = tensor(new float[] { 3, 2, 1 }, [1, 3]);
        using var loss = DistillationLoss.SoftTargets(s, t, 2);
        Assert.That(loss.item<float>(), Is.EqualTo(1.2806266713).Within(1e-5));
    }

    [Test]
    public void SoftTargets_AreScaledByTheSquaredTemperature()
    {
        using var s = randn(5, 4);
        using var t = randn(5, 4);
        foreach (double temperature in new[] { 1.0, 3.0, 7.5 })
        {
            using var scope = NewDisposeScope();
            var logS = nn.functional.log_softmax(s / temperature, 1);
            var logT = nn.functional.log_softmax(t / temperature, 1);
            double raw = (logT.exp() * (logT - logS)).sum(1).mean().item<float>();
            Assert.That(DistillationLoss.SoftTargets(s, t, temperature).item<float>(), Is.EqualTo(raw * temperature * temperature).Within(1e-5 * temperature * temperature));
        }
    }

    [Test]
    public void AlphaZero_IsPlainCrossEntropy()
    {
        using var s = randn(6, 3);
        using var t = randn(6, 3);
        using var y = tensor(new long[] { 0, 1, 2, 0, 1, 2 });
        using var combined = DistillationLoss.Combined(s, t, y, alpha: 0, temperature: 4);
        using var ce = nn.functional.cross_entropy(s, y);
        Assert.That(combined.item<float>(), Is.EqualTo(ce.item<float>()));
    }

    [Test]
    public void Apply_GivenStudent_LearnsFromTheTeacherAndLeavesTheTeacherAlone()
    {
        string teacherHash = TestModels.StateHash(_teacher);
        using var student = Student(5, 1);
        string studentHash = TestModels.StateHash(student);
        var step = new DistillationStep(new DistillationOptions { Teacher = _teacher, Student = student, Training = new TrainingOptions { Epochs = 15, LearningRate = 0.01, BatchSize = 32 } });
        using var trained = step.Apply(ModuleCloner.DeepClone(_teacher), Context());

        Assert.That(TestModels.StateHash(_teacher), Is.EqualTo(teacherHash), "teacher weights bit-identical");
        Assert.That(TestModels.StateHash(student), Is.EqualTo(studentHash), "the given student architecture is copied, not trained");
        Assert.That(new AccuracyEvaluator().Evaluate(trained, _test).Value, Is.GreaterThan(0.8));
    }

    [Test]
    public void Apply_Hints_CreateAdaptersOfTheRightShapeAndTrainThem()
    {
        // Teacher fc1 has 8 outputs, the student's 5: an adapter Linear(5 → 8) (weight [8, 5]) is learned.
        using var student = Student(5, 2);
        var options = new DistillationOptions
        {
            Teacher = _teacher,
            Student = student,
            Hints = [new HintPair("fc1", "fc1", 0.5), new HintPair("fc2", "fc2")],
            Training = new TrainingOptions { Epochs = 2, BatchSize = 50 },
        };
        var step = new DistillationStep(options);
        using var trained = step.Apply(ModuleCloner.DeepClone(_teacher), Context());
        Assert.That(step.LastAdapters, Has.Count.EqualTo(2));
        Assert.That(step.LastAdapters[0]!.Value.Shape, Is.EqualTo(new long[] { 8, 5 }));
        Assert.That(step.LastAdapters[0]!.Value.Change, Is.GreaterThan(0));
        Assert.That(step.LastAdapters[1], Is.Null, "equal widths need no adapter");
    }

    [Test]
    public void Apply_MismatchedOutputs_ThrowBeforeTraining()
    {
        torch.random.manual_seed(3);
        using var wrong = nn.Sequential(("fc1", nn.Linear(4, 5)), ("fc2", nn.Linear(5, 7)));
        string hash = TestModels.StateHash(wrong);
        var step = new DistillationStep(new DistillationOptions { Teacher = _teacher, Student = wrong });
        var ex = Assert.Throws<ArgumentException>(() => step.Apply(ModuleCloner.DeepClone(_teacher), Context()));
        Assert.That(ex!.Message, Does.Contain("differ in shape"));
        Assert.That(TestModels.StateHash(wrong), Is.EqualTo(hash));
    }

    [Test]
    public void Apply_UnknownHintLayer_ThrowsNamingIt()
    {
        using var student = Student(5, 4);
        var step = new DistillationStep(new DistillationOptions { Teacher = _teacher, Student = student, Hints = [new HintPair("fc1", "fc9")] });
        var ex = Assert.Throws<ArgumentException>(() => step.Apply(ModuleCloner.DeepClone(_teacher), Context()));
        Assert.That(ex!.Message, Does.Contain("'fc9'"));
    }

    [TestCase(1.0)]
    [TestCase(0.5)]
    public void Apply_Regression_MatchesTheTeachersOutputs(double alpha)
    {
        using var x = randn(200, 4);
        using var y = x.matmul(tensor(new float[] { 1, -2, 0.5f, 3 }, [4, 1]));
        using var data = new TensorDataset(x, y);
        torch.random.manual_seed(5);
        using var teacher = nn.Sequential(("fc", nn.Linear(4, 1)));
        new Trainer(new TrainingOptions { Epochs = 40, LearningRate = 0.05, Loss = (o, t) => nn.functional.mse_loss(o, t) }).Train(teacher, data);
        var context = new CompressionContext(new CompressionData(data, data) { Evaluator = new LossEvaluator() }, teacher);
        torch.random.manual_seed(6);
        using var student = nn.Sequential(("fc", nn.Linear(4, 1)));
        var step = new DistillationStep(new DistillationOptions
        {
            Task = DistillationTask.Regression,
            Teacher = teacher,
            Student = student,
            Alpha = alpha,
            Training = new TrainingOptions { Epochs = 40, LearningRate = 0.05 },
        });
        using var trained = step.Apply(ModuleCloner.DeepClone(teacher), context);
        Assert.That(new LossEvaluator().Evaluate(trained, data).Value, Is.LessThan(0.05));
    }

    [Test]
    public void Options_InvalidValues_AreAllListed()
    {
        var options = new DistillationOptions { Alpha = 1.5, Temperature = 0, Hints = [new HintPair("a", "b", -1)] };
        var ex = Assert.Throws<OptionsValidationException>(() => new DistillationStep(options));
        Assert.That(ex!.Errors, Has.Count.EqualTo(3));
        var recovery = new MagnitudePruningOptions { Distillation = new RecoveryDistillation() };
        Assert.That(recovery.Validate(), Has.Some.Contains("set FineTuning too"));
    }

    [TestCase(true)]
    [TestCase(false)]
    public void Apply_IntoTheCurrentModel_LeavesNoLiveTensors(bool cache)
    {
        var step = new DistillationStep(new DistillationOptions { CacheTeacherOutputs = cache, Training = new TrainingOptions { Epochs = 1, BatchSize = 100 } });
        using var model = Student(8, 7);
        var context = Context();
        step.Apply(model, context); // warm-up
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long before = TestModels.SettledTensorCount();
        step.Apply(model, context);
        Assert.That(Tensor.TotalCount, Is.EqualTo(before));
    }

    [Test]
    public void RecoveryDistillation_InMagnitudePruningFineTuning_Runs()
    {
        using var model = ModuleCloner.DeepClone(_teacher);
        var options = new MagnitudePruningOptions
        {
            Sparsity = 0.5,
            FineTuning = new TrainingOptions { Epochs = 2, BatchSize = 50 },
            Distillation = new RecoveryDistillation { Alpha = 0.5, Temperature = 2 },
            SparseExecution = SparseExecution.Never,
        };
        var result = new MagnitudePruningStep(options).Apply(model, Context());
        Assert.That(new AccuracyEvaluator().Evaluate(result, _test).Value, Is.GreaterThan(0.6));
    }
}
