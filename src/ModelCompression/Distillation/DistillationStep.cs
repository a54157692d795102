using Microsoft.Extensions.Logging;
using ModelCompression.Data;
using ModelCompression.Modules;
using ModelCompression.Training;
using TorchSharp;
using TorchSharp.Modules;
using TensorDataset = ModelCompression.Data.TensorDataset;
using static TorchSharp.torch;

namespace ModelCompression.Distillation;

/// <summary>
/// Knowledge distillation: trains a student (the pipeline's current model, or a given smaller architecture) to match a
/// teacher (by default the original model) — soft targets at a temperature for classification, the teacher's outputs
/// for regression — plus optional hints: intermediate layer outputs matched through learned adapters.
/// </summary>
public sealed class DistillationStep : ICompressionStep, ICompressionStepRequirements
{
    /// <summary>The base name of the step in reports.</summary>
    public const string StepName = "Distillation";

    private readonly DistillationOptions _options;

    /// <summary>Initializes a new instance of the <see cref="DistillationStep"/> class.</summary>
    /// <param name="options">The options; copied (the teacher and student modules are referenced, never changed).</param>
    /// <exception cref="OptionsValidationException">The options are invalid (every error listed).</exception>
    public DistillationStep(DistillationOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        OptionsValidationException.ThrowIfInvalid(typeof(DistillationOptions), options.Validate());
        _options = options.Clone();
    }

    /// <inheritdoc/>
    public string Name => $"{StepName}({(_options.Student is null ? "current model" : _options.Student.GetType().Name)}, α {_options.Alpha}, T {_options.Temperature}{(_options.Hints.Count > 0 ? $", {_options.Hints.Count} hints" : string.Empty)})";

    /// <inheritdoc/>
    public bool RequiresTrainingData => true;

    /// <summary>Gets, after <see cref="Apply"/>, each hint adapter's weight shape and how far training moved it (L2 norm), or null for same-width pairs.</summary>
    internal IReadOnlyList<(long[] Shape, double Change)?> LastAdapters { get; private set; } = [];

    /// <inheritdoc/>
    /// <exception cref="ArgumentException">
    /// Teacher and student outputs differ in shape, a hint names an unknown layer, or hint features cannot be matched.
    /// Nothing has been trained.
    /// </exception>
    public nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(context);
        var data = context.TrainingData ?? throw new InvalidOperationException($"Step '{Name}' needs training data.");
        var teacher = _options.Teacher ?? context.OriginalModel;
        var teacherModes = ModuleModes.Record(teacher);
        var student = _options.Student is null ? model : ModuleCloner.DeepClone(_options.Student);
        if (_options.Student is not null)
        {
            student.to(context.Device);
        }

        var adapters = new List<nn.Module<Tensor, Tensor>?>();
        var removers = new List<Action>();
        TensorDataset? cached = null;
        try
        {
            teacher.eval();
            CheckShapesAndBuildAdapters(teacher, student, data, context.Device, adapters);
            var harness = new DistillationHarness(student, adapters.Where(a => a is not null).Cast<nn.Module<Tensor, Tensor>>().ToList());
            var teacherFeatures = new Tensor?[_options.Hints.Count];
            var studentFeatures = new Tensor?[_options.Hints.Count];
            for (int i = 0; i < _options.Hints.Count; i++)
            {
                int k = i;
                removers.Add(Hook(teacher, _options.Hints[i].TeacherLayer, t => teacherFeatures[k] = t));
                removers.Add(Hook(student, _options.Hints[i].StudentLayer, t => studentFeatures[k] = t));
            }

            bool useCache = _options.CacheTeacherOutputs && _options.Hints.Count == 0;
            if (useCache)
            {
                cached = CacheTeacherOutputs(teacher, data, context);
            }

            var training = _options.Training.Clone();
            var task = training.Loss ?? (_options.Task == DistillationTask.Classification
                ? (o, t) => nn.functional.cross_entropy(o, t)
                : (o, t) => nn.functional.mse_loss(o, t));
            if (useCache)
            {
                training.Loss = (o, packed) => task(o, Labels(packed));
            }

            var callbacks = new TrainingCallbacks
            {
                TaskLossWeight = 1 - _options.Alpha,
                ExtraLoss = batch =>
                {
                    Tensor teacherOutput;
                    if (useCache)
                    {
                        teacherOutput = TeacherPart(batch.Target);
                    }
                    else
                    {
                        using (no_grad())
                        {
                            teacherOutput = teacher.call(batch.Input);
                        }
                    }

                    var loss = _options.Task == DistillationTask.Classification
                        ? DistillationLoss.SoftTargets(batch.Output, teacherOutput, _options.Temperature)
                        : nn.functional.mse_loss(batch.Output, teacherOutput.detach());
                    using (var alpha = _options.Alpha.ToScalar())
                    {
                        loss = loss.mul(alpha);
                    }

                    for (int i = 0; i < _options.Hints.Count; i++)
                    {
                        var s = studentFeatures[i] ?? throw new InvalidOperationException($"Hint layer '{_options.Hints[i].StudentLayer}' did not run: call children with call() for hooks to fire.");
                        var t = teacherFeatures[i] ?? throw new InvalidOperationException($"Hint layer '{_options.Hints[i].TeacherLayer}' did not run.");
                        var matched = adapters[i] is { } adapter ? adapter.call(s) : s;
                        using var weight = _options.Hints[i].Weight.ToScalar();
                        loss = loss.Plus(nn.functional.mse_loss(matched, t.detach()).mul(weight));
                    }

                    return loss;
                },
            };

            context.Logger.LogInformation("{Step}: training {Student} from {Teacher}", Name, student.GetType().Name, teacher.GetType().Name);
            var initial = adapters.Select(a => a?.parameters().First().detach().clone().DetachFromDisposeScope()).ToList();
            var summary = context.Train(harness, training, callbacks, cached ?? data);
            LastAdapters = adapters.Select((a, i) =>
            {
                if (a is null)
                {
                    return ((long[], double)?)null;
                }

                using var scope = NewDisposeScope();
                var weight = a.parameters().First();
                double change = (weight.detach() - initial[i]!).square().sum().sqrt().item<float>();
                initial[i]!.Dispose();
                return (weight.shape, change);
            }).ToList();
            context.AddNote($"{summary.Steps} optimizer steps{(useCache ? ", teacher outputs cached" : string.Empty)}, final loss {summary.FinalLoss:0.####}");
            return student;
        }
        catch
        {
            if (!ReferenceEquals(student, model))
            {
                student.Dispose();
            }

            throw;
        }
        finally
        {
            removers.ForEach(r => r());
            adapters.ForEach(a => a?.Dispose());
            cached?.Dispose();
            teacherModes.Dispose();
        }
    }

    /// <summary>The task's targets from a packed batch: class indices for classification, the targets for regression.</summary>
    private Tensor Labels(Tensor packed) =>
        _options.Task == DistillationTask.Classification ? packed.select(1, 0).to(ScalarType.Int64) : packed.select(1, 0);

    private Tensor TeacherPart(Tensor packed) =>
        _options.Task == DistillationTask.Classification ? packed.narrow(1, 1, packed.shape[1] - 1) : packed.select(1, 1);

    /// <summary>Runs the teacher once over the training data and packs its outputs beside the targets.</summary>
    private TensorDataset CacheTeacherOutputs(nn.Module<Tensor, Tensor> teacher, IBatchSource data, CompressionContext context)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var inputs = new List<Tensor>();
        var packed = new List<Tensor>();
        foreach (var (input, target) in data.GetBatches(256))
        {
            context.CancellationToken.ThrowIfCancellationRequested();
            var output = teacher.call(input.to(context.Device)).cpu();
            inputs.Add(input);
            if (_options.Task == DistillationTask.Classification)
            {
                if (target.dim() != 1 || target.is_floating_point())
                {
                    throw new ArgumentException("Classification distillation needs integer class-index targets.", nameof(data));
                }

                packed.Add(cat([target.to(float32).unsqueeze(1), output.to(float32)], 1));
            }
            else
            {
                packed.Add(stack([target.to(float32), output.to(float32)], 1));
            }
        }

        return new TensorDataset(cat(inputs, 0), cat(packed, 0));
    }

    private void CheckShapesAndBuildAdapters(nn.Module<Tensor, Tensor> teacher, nn.Module<Tensor, Tensor> student, IBatchSource data, Device device, List<nn.Module<Tensor, Tensor>?> adapters)
    {
        foreach (var hint in _options.Hints)
        {
            Resolve(teacher, hint.TeacherLayer, "teacher");
            Resolve(student, hint.StudentLayer, "student");
        }

        var teacherFeatures = new Tensor?[_options.Hints.Count];
        var studentFeatures = new Tensor?[_options.Hints.Count];
        var removers = new List<Action>();
        var studentModes = ModuleModes.Record(student);
        try
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            for (int i = 0; i < _options.Hints.Count; i++)
            {
                int k = i;
                removers.Add(Hook(teacher, _options.Hints[i].TeacherLayer, t => teacherFeatures[k] = t));
                removers.Add(Hook(student, _options.Hints[i].StudentLayer, t => studentFeatures[k] = t));
            }

            var (input, _) = data.FirstBatch(2);
            student.eval();
            var t = teacher.call(input.to(device));
            var s = student.call(input.to(device));
            if (!t.shape.SequenceEqual(s.shape))
            {
                throw new ArgumentException($"The teacher's outputs [{string.Join(", ", t.shape)}] and the student's [{string.Join(", ", s.shape)}] differ in shape.");
            }

            for (int i = 0; i < _options.Hints.Count; i++)
            {
                var hint = _options.Hints[i];
                var tf = teacherFeatures[i] ?? throw new ArgumentException($"Teacher layer '{hint.TeacherLayer}' did not run on a sample (is it called with call()?).");
                var sf = studentFeatures[i] ?? throw new ArgumentException($"Student layer '{hint.StudentLayer}' did not run on a sample (is it called with call()?).");
                adapters.Add(Adapter(hint, tf, sf, device));
            }
        }
        finally
        {
            removers.ForEach(r => r());
            studentModes.Dispose();
        }
    }

    private static nn.Module<Tensor, Tensor>? Adapter(HintPair hint, Tensor teacherFeature, Tensor studentFeature, Device device)
    {
        var t = teacherFeature.shape;
        var s = studentFeature.shape;
        bool sameExceptChannels = t.Length == s.Length && t.Length >= 2 && t.Where((d, i) => i != 1 && d != s[i]).Any() is false;
        if (!sameExceptChannels)
        {
            throw new ArgumentException(
                $"Hint ({hint.TeacherLayer}, {hint.StudentLayer}): features [{string.Join(", ", t)}] and [{string.Join(", ", s)}] differ in more than their channel dimension.");
        }

        if (t[1] == s[1])
        {
            return null;
        }

        nn.Module<Tensor, Tensor> adapter = t.Length switch
        {
            2 => nn.Linear(s[1], t[1], device: device),
            4 => nn.Conv2d(s[1], t[1], 1, device: device),
            _ => throw new ArgumentException($"Hint ({hint.TeacherLayer}, {hint.StudentLayer}): no adapter for {t.Length}-D features."),
        };
        return adapter;
    }

    private static nn.Module Resolve(nn.Module model, string name, string role)
    {
        try
        {
            return ModuleTree.GetSubmodule(model, name);
        }
        catch (ArgumentException)
        {
            throw new ArgumentException($"The {role} has no layer named '{name}'.");
        }
    }

    /// <summary>
    /// Hooks a layer and hands a view of each output to <paramref name="capture"/>. Containers such as Sequential free
    /// their intermediate tensors when their forward ends, so the view is kept outside every dispose scope (it shares
    /// the output's storage and autograd graph); the previous view is freed at each new call and the last one when the
    /// returned action removes the hook.
    /// </summary>
    private static Action Hook(nn.Module model, string name, Action<Tensor> capture)
    {
        if (ModuleTree.GetSubmodule(model, name) is not nn.Module<Tensor, Tensor> layer)
        {
            throw new ArgumentException($"Layer '{name}' does not map one tensor to one tensor.");
        }

        Tensor? kept = null;
        var remover = layer.register_forward_hook((m, x, y) =>
        {
            kept?.Dispose();
            kept = y.view_as(y).DetachFromDisposeScope();
            capture(kept);
            return y;
        });
        return () =>
        {
            remover.remove();
            kept?.Dispose();
            kept = null;
        };
    }

    /// <summary>Trains the student together with the hint adapters (their parameters are in the same optimizer).</summary>
    private sealed class DistillationHarness : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module<Tensor, Tensor> student;
        private readonly ModuleList<nn.Module<Tensor, Tensor>> adapters;

        public DistillationHarness(nn.Module<Tensor, Tensor> student, IList<nn.Module<Tensor, Tensor>> adapters)
            : base(nameof(DistillationHarness))
        {
            this.student = student;
            this.adapters = new ModuleList<nn.Module<Tensor, Tensor>>([.. adapters]);
            RegisterComponents();
        }

        public override Tensor forward(Tensor input) => student.call(input);
    }
}
