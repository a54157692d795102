using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Quantization.Gptq;
using ModelCompression.Quantization.Kernels;
using ModelCompression.Serialization;
using ModelCompression.Tests.Support;
using ModelCompression.Training;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;
using Linear = TorchSharp.Modules.Linear;
using TensorDataset = ModelCompression.Data.TensorDataset;

namespace ModelCompression.Tests.Quantization;

[TestFixture]
public sealed class GptqTests
{
    [TestCase(false)]
    [TestCase(true)]
    public void Solver_TinyMatrix_EqualsTheSequentialDefinition(bool actOrder)
    {
        // The definition GPTQ computes fast: round columns one by one (in act-order if asked), and after each, move
        // the columns still free by −error · H_F⁻¹[:, c] / H_F⁻¹[c, c], with H_F the Hessian of the free columns.
        using var scope = NewDisposeScope();
        using var generator = new Generator(5);
        var w = randn([6, 10], generator: generator);
        var x = Correlated(200, 10, generator);
        var h = Hessian(x);
        const int Bits = 3;
        var result = GptqSolver.Quantize(w, h, Bits, groupSize: 0, actOrder, dampingFraction: 0.01, blockSize: 4);

        var damped = h + (eye(10, dtype: ScalarType.Float64) * (0.01 * h.diagonal().mean().item<double>()));
        var expected = BruteForce(w.to(ScalarType.Float64), damped, Bits, actOrder);
        Assert.That(result.Levels, Is.EqualTo(expected));
        Assert.That(result.Retries, Is.EqualTo(0));
    }

    [TestCase(3, 0)]
    [TestCase(4, 16)]
    [TestCase(8, 0)]
    public void Solver_CorrelatedInputs_OutputErrorBelowRoundToNearest(int bits, int groupSize)
    {
        using var scope = NewDisposeScope();
        using var generator = new Generator(7);
        var w = randn([32, 64], generator: generator);
        var x = Correlated(512, 64, generator);
        var result = GptqSolver.Quantize(w, Hessian(x), bits, groupSize, actOrder: false, dampingFraction: 0.01, blockSize: 16);
        var granularity = groupSize == 0 ? QuantizationGranularity.PerChannel : QuantizationGranularity.PerGroup(groupSize);
        var gptq = QuantizedMatrix.FromLevels(32, 64, bits, granularity, result.Levels, result.Scales, null).Dequantize();
        var rtn = QuantizedMatrix.FromFloat(w.contiguous().data<float>().ToArray(), 32, 64, bits, granularity, [], false).Dequantize();

        double gptqError = OutputError(w, gptq, x);
        double rtnError = OutputError(w, rtn, x);
        TestContext.Out.WriteLine($"{bits} bits, group {groupSize}: GPTQ {gptqError:G4}, RTN {rtnError:G4}");
        Assert.That(gptqError, Is.LessThan(rtnError * 0.9));
    }

    [Test]
    public void Solver_OutlierChannels_ActOrderBelowNoActOrder()
    {
        using var scope = NewDisposeScope();
        using var generator = new Generator(11);
        var w = randn([32, 64], generator: generator);
        var x = Correlated(512, 64, generator);
        x[.., 3] *= 30;
        x[.., 41] *= 20;
        x[.., 57] *= 25;
        var h = Hessian(x);
        double Error(bool actOrder)
        {
            var r = GptqSolver.Quantize(w, h, 3, 0, actOrder, 0.01, 16);
            return OutputError(w, QuantizedMatrix.FromLevels(32, 64, 3, QuantizationGranularity.PerChannel, r.Levels, r.Scales, null).Dequantize(), x);
        }

        double with = Error(true), without = Error(false);
        TestContext.Out.WriteLine($"act-order {with:G4}, without {without:G4}");
        Assert.That(with, Is.LessThan(without));
    }

    [Test]
    public void Solver_IndefiniteHessian_RaisesTheDampingAndSaysHowOften()
    {
        using var scope = NewDisposeScope();
        var w = tensor(new float[] { 0.3f, -0.2f, 0.1f, 0.5f }, [2, 2]);
        var h = tensor(new double[] { 1, 2, 2, 1 }, [2, 2]); // eigenvalues −1 and 3
        var result = GptqSolver.Quantize(w, h, 4, 0, false, 0.01, 128);
        Assert.That(result.Retries, Is.GreaterThanOrEqualTo(2));
        Assert.That(result.Damping, Is.EqualTo(0.01 * Math.Pow(10, result.Retries)).Within(1e-12));

        var ex = Assert.Throws<ArgumentException>(() => GptqSolver.Quantize(w, h, 4, 0, false, 0.01, 128, maxRetries: 1));
        Assert.That(ex!.Message, Does.Contain("not positive definite"));
    }

    [Test]
    public void Step_Int4Mlp_BelowRoundToNearestOnHeldOutData_SavesLoadsAndRepeats()
    {
        torch.random.manual_seed(12);
        using var original = nn.Sequential(("fc1", nn.Linear(32, 64)), ("gelu", nn.GELU()), ("fc2", nn.Linear(64, 64)), ("gelu2", nn.GELU()), ("fc3", nn.Linear(64, 10)));
        using var generator = new Generator(13);
        var inputs = Correlated(768, 32, generator).to(ScalarType.Float32); // one distribution, split
        var calibration = inputs[..512];
        var heldOut = inputs[512..];
        using var data = new TensorDataset(calibration, zeros(512, dtype: ScalarType.Int64));
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, WeightBits = 3, WeightGranularity = QuantizationGranularity.PerGroup(16), CalibrationBatches = 4, CalibrationBatchSize = 128 };

        nn.Module<Tensor, Tensor> Quantize(WeightRounding rounding, out CompressionContext context)
        {
            context = new CompressionContext(new ModelCompression.CompressionData(data, data), original);
            options.Rounding = rounding;
            return new PostTrainingQuantizationStep(options).Apply(ModuleCloner.DeepClone(original), context);
        }

        using var rtn = Quantize(WeightRounding.Nearest, out _);
        using var gptq = Quantize(WeightRounding.Gptq(), out var gptqContext);
        using var again = Quantize(WeightRounding.Gptq(), out _);
        Assert.That(gptq.modules().OfType<QuantizedLinear>().Count(), Is.EqualTo(3));
        Assert.That(gptqContext.Notes, Has.Some.Contains("GPTQ").And.Contains("3 Linear layer(s)"));

        using var noGrad = no_grad();
        var reference = original.call(heldOut);
        double rtnError = (rtn.call(heldOut) - reference).square().mean().item<float>();
        double gptqError = (gptq.call(heldOut) - reference).square().mean().item<float>();
        TestContext.Out.WriteLine($"held-out MSE: RTN {rtnError:G4}, GPTQ {gptqError:G4}");
        Assert.That(gptqError, Is.LessThan(rtnError));
        Assert.That(again.call(heldOut).eq(gptq.call(heldOut)).all().item<bool>(), Is.True, "same seed and data, same model");

        using var stream = new MemoryStream();
        CompressedModel.Save(gptq, stream);
        stream.Position = 0;
        using var loaded = CompressedModel.Load(stream);
        Assert.That(loaded.call(heldOut).eq(gptq.call(heldOut)).all().item<bool>(), Is.True);
    }

    [Test]
    public void Step_PaddedPositions_LeftOutOfTheHessian()
    {
        // Sequences [batch, time, features] whose last positions are padding (target −100): whatever the padding holds,
        // GPTQ must find the same weights, because only scored positions enter the Hessian.
        torch.random.manual_seed(15);
        using var original = nn.Sequential(("fc1", nn.Linear(8, 16)), ("relu", nn.ReLU()), ("fc2", nn.Linear(16, 5)));
        using var generator = new Generator(16);
        var inputs = randn([32, 6, 8], generator: generator);
        var targets = randint(0, 5, [32, 6], generator: generator, dtype: ScalarType.Int64);
        targets[.., 4..] = -100;
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, WeightGranularity = QuantizationGranularity.PerGroup(8), Rounding = WeightRounding.Gptq(), CalibrationBatches = 2, CalibrationBatchSize = 16 };

        float[] Quantize(Tensor padding)
        {
            var x = inputs.clone();
            x[.., 4..] = padding;
            using var data = new TensorDataset(x, targets);
            var context = new CompressionContext(new ModelCompression.CompressionData(data, data) { Evaluator = new PerplexityEvaluator() }, original);
            using var quantized = new PostTrainingQuantizationStep(options).Apply(ModuleCloner.DeepClone(original), context);
            using var noGrad = no_grad();
            return quantized.call(inputs).contiguous().data<float>().ToArray();
        }

        var a = Quantize(randn([32, 2, 8], generator: generator) * 100);
        var b = Quantize(zeros([32, 2, 8]));
        Assert.That(a, Is.EqualTo(b));
    }

    [TestCase(true)]
    [TestCase(false)]
    public void Step_LeavesNoLiveTensors(bool gptq)
    {
        torch.random.manual_seed(14);
        using var original = nn.Sequential(("fc1", nn.Linear(16, 32)), ("relu", nn.ReLU()), ("fc2", nn.Linear(32, 4)));
        using var data = new TensorDataset(randn(64, 16), zeros(64, dtype: ScalarType.Int64));
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, Rounding = gptq ? WeightRounding.Gptq() : WeightRounding.Nearest, CalibrationBatches = 2, CalibrationBatchSize = 32 };
        var step = new PostTrainingQuantizationStep(options);
        using (var warm = ModuleCloner.DeepClone(original))
        {
            step.Apply(warm, new CompressionContext(new ModelCompression.CompressionData(data, data), original)).Dispose();
        }

        // TorchSharp 0.107 leaves a disposed module's parameter wrappers counted, so the count is taken with the
        // model already built: what the step adds must be exactly the quantized layers' state.
        using var model = ModuleCloner.DeepClone(original);
        int oldState = model.state_dict().Count;
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long before = TestModels.SettledTensorCount();
        using var result = step.Apply(model, new CompressionContext(new ModelCompression.CompressionData(data, data), original));
        GC.Collect();
        GC.WaitForPendingFinalizers();
        Assert.That(Tensor.TotalCount - before, Is.EqualTo(result.state_dict().Count - oldState), "the Hessians, stand-ins and calibration tensors are all released");
    }

    [TestCase(0.5, 0, 0)]
    [TestCase(0.5, 16, 0)]
    [TestCase(0, 0, 2)]
    public void Solver_JointSparseGpt_ExactZerosAndAsGoodAsPruningThenRounding(double sparsity, int groupSize, int n)
    {
        // SparseGPT's joint mode: the sweep prunes and rounds, carrying both errors on. Its output error must match
        // pruning first (SparseGPT's own float update) then rounding the survivors to nearest, in one pass.
        using var scope = NewDisposeScope();
        using var generator = new Generator(11);
        var w = randn([32, 64], generator: generator);
        var x = Correlated(512, 64, generator);
        var pattern = n > 0 ? new ModelCompression.Pruning.NMPattern(n, 4) : null;
        const int Bits = 4;
        var granularity = groupSize == 0 ? QuantizationGranularity.PerChannel : QuantizationGranularity.PerGroup(groupSize);

        var joint = GptqSolver.Quantize(w, Hessian(x), Bits, groupSize, actOrder: false, dampingFraction: 0.01, blockSize: 16, sparsity: sparsity, pattern: pattern);

        // Exact sparsity: half the levels are zero, or two of every four consecutive inputs of each row.
        var levels = joint.Levels;
        if (pattern is null)
        {
            Assert.That(levels.Count(l => l == 0), Is.GreaterThanOrEqualTo(32 * 64 / 2));
        }
        else
        {
            for (int row = 0; row < 32; row++)
            {
                for (int start = 0; start < 64; start += 4)
                {
                    Assert.That(levels.Skip((row * 64) + start).Take(4).Count(l => l == 0), Is.GreaterThanOrEqualTo(2), $"row {row}, inputs {start}–{start + 3}");
                }
            }
        }

        var jointWeights = QuantizedMatrix.FromLevels(32, 64, Bits, granularity, levels, joint.Scales, null).Dequantize();
        using var sweep = ModelCompression.Calibration.HessianSweep.Prepare(w, Hessian(x), actOrder: false, 0.01, 4, "SparseGPT");
        var rule = new ModelCompression.Calibration.SparseGptRule(32, 64, pattern is null ? sparsity : 0, pattern);
        sweep.Run(16, rule);
        var prunedFloat = (sweep.WeightsInInputOrder().to(ScalarType.Float32) * rule.Mask(ScalarType.Float32)).contiguous().data<float>().ToArray();
        var prunedThenRounded = QuantizedMatrix.FromFloat(prunedFloat, 32, 64, Bits, granularity, [], false).Dequantize();
        Assert.That(prunedThenRounded.Count(v => v == 0), Is.GreaterThanOrEqualTo(32 * 64 / 2), "rounding keeps the zeros");

        var magnitudeMask = pattern is { } p ? ModelCompression.Pruning.MagnitudeMasks.NOfM(w, p.N, p.M) : ModelCompression.Pruning.MagnitudeMasks.TopMagnitude(w, sparsity);
        var magnitudePruned = (w * magnitudeMask).contiguous().data<float>().ToArray();
        var magnitudeThenRounded = QuantizedMatrix.FromFloat(magnitudePruned, 32, 64, Bits, granularity, [], false).Dequantize();

        double jointError = OutputError(w, jointWeights, x);
        double sequentialError = OutputError(w, prunedThenRounded, x);
        double prunedOnlyError = OutputError(w, prunedFloat, x);
        double magnitudeError = OutputError(w, magnitudeThenRounded, x);
        TestContext.Out.WriteLine($"sparsity {sparsity}, pattern {pattern}, group {groupSize}: joint {jointError:G4}, SparseGPT then RTN {sequentialError:G4}, SparseGPT float {prunedOnlyError:G4}, magnitude then RTN {magnitudeError:G4}");
        // One sweep does what two passes do (within 5%), and far better than magnitude pruning then rounding.
        Assert.That(jointError, Is.LessThan(sequentialError * 1.05));
        Assert.That(jointError, Is.LessThan(magnitudeError * 0.8));
    }

    [Test]
    public void Options_JointPruningNeedsInputOrderAndOneTarget()
    {
        var both = new PostTrainingQuantizationOptions
        {
            Mode = QuantizationMode.WeightOnlyInt4,
            Rounding = new GptqRounding { Sparsity = 0.5, Pattern = ModelCompression.Pruning.NMPattern.TwoOfFour, BlockSize = 18 },
        };
        var errors = both.Validate();
        Assert.That(errors, Has.Some.Contains("ActOrder"));
        Assert.That(errors, Has.Some.Contains("exclude each other"));
        Assert.That(errors, Has.Some.Contains("multiple of the pattern's M"));
        Assert.That(new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, Rounding = WeightRounding.SparseGpt(0.5) }.Validate(), Is.Empty);
        Assert.That(new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, Rounding = WeightRounding.SparseGpt(1.0) }.Validate(), Has.Some.Contains("Sparsity"));
    }

    [Test]
    public void Step_JointSparseGpt_GivesSparseInt4LayersThatSaveAndLoad()
    {
        var (model, train, test) = TestModels.TrainedMlp(21);
        using var _ = model;
        using var __ = train;
        using var ___ = test;
        using var result = CompressionPipeline.Create()
            .WithLatencyMeasurement(new ModelCompression.Metrics.LatencyOptions { Enabled = false })
            .WithAccuracyCheck(1.0)
            .AddPostTrainingQuantization(new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, Rounding = WeightRounding.SparseGpt(pattern: ModelCompression.Pruning.NMPattern.TwoOfFour, blockSize: 4) })
            .Build()
            .Run(model, new ModelCompression.CompressionData(train, test));

        var layers = result.Model.modules().OfType<QuantizedLinear>().ToList();
        Assert.That(layers, Has.Count.EqualTo(2));
        foreach (var layer in layers)
        {
            var q = layer.Matrix.Q;
            Assert.That(q.Count(l => l == 0), Is.GreaterThanOrEqualTo(q.Length / 2), "2:4 zeros");
        }

        Assert.That(result.Report.Steps[0].Message, Does.Contain("SparseGPT 2:4"));
        using var stream = new MemoryStream();
        CompressedModel.Save(result.Model, stream);
        stream.Position = 0;
        using var loaded = CompressedModel.Load(stream);
        Assert.That(TestModels.Output(loaded, test.Inputs), Is.EqualTo(TestModels.Output(result.Model, test.Inputs)));
    }

    [Test]
    public void Options_InvalidGptqSettings_ListedBeforeAnything()
    {
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.Float16, Rounding = WeightRounding.Gptq(dampingFraction: 0, blockSize: 0), WeightBits = 3 };
        var errors = options.Validate();
        Assert.That(errors, Has.Some.Contains("DampingFraction"));
        Assert.That(errors, Has.Some.Contains("BlockSize"));
        Assert.That(errors, Has.Some.Contains("integer grid"));
        Assert.That(errors, Has.Some.Contains("WeightBits"));
        Assert.That(new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, WeightBits = 2, Rounding = WeightRounding.Gptq() }.Validate(), Is.Empty);
    }

    /// <summary>Inputs whose features are mixed by a random matrix, so the Hessian is far from diagonal.</summary>
    private static Tensor Correlated(int rows, int features, Generator generator)
    {
        var mix = randn([features, features], generator: generator) / Math.Sqrt(features);
        return randn([rows, features], generator: generator).matmul(mix + eye(features)).to(ScalarType.Float64);
    }

    private static Tensor Hessian(Tensor x) => x.t().matmul(x) * (2.0 / x.shape[0]);

    private static double OutputError(Tensor w, float[] quantized, Tensor x)
    {
        var q = tensor(quantized, w.shape).to(ScalarType.Float64);
        return (x.matmul(w.to(ScalarType.Float64).t()) - x.matmul(q.t())).square().sum().item<double>();
    }

    private static sbyte[] BruteForce(Tensor w, Tensor h, int bits, bool actOrder)
    {
        int n = (int)w.shape[0], k = (int)w.shape[1];
        int qmax = QuantizedMatrix.MaxLevel(bits);
        var values = w.clone();
        var original = w.to(ScalarType.Float32).contiguous().data<float>().ToArray();
        var scales = Enumerable.Range(0, n).Select(r => QuantizedMatrix.ScaleFor(original.AsSpan(r * k, k), qmax, bits)).ToArray();
        var order = actOrder
            ? h.diagonal().sort(descending: true, stable: true).Indices.data<long>().Select(i => (int)i).ToArray()
            : Enumerable.Range(0, k).ToArray();
        var free = Enumerable.Range(0, k).ToList();
        var levels = new sbyte[n * k];
        foreach (int c in order)
        {
            var index = tensor(free.Select(i => (long)i).ToArray());
            var hinv = linalg.inv(h.index_select(0, index).index_select(1, index));
            int at = free.IndexOf(c);
            double d = hinv[at, at].item<double>();
            for (int row = 0; row < n; row++)
            {
                double v = values[row, c].item<double>();
                float level = Math.Clamp(MathF.Round((float)v / scales[row], MidpointRounding.ToEven), -qmax, qmax);
                levels[(row * k) + c] = (sbyte)level;
                double error = (v - ((double)level * scales[row])) / d;
                for (int j = 0; j < free.Count; j++)
                {
                    values[row, free[j]] = values[row, free[j]].item<double>() - (error * hinv[j, at].item<double>());
                }
            }

            free.Remove(c);
        }

        return levels;
    }
}
