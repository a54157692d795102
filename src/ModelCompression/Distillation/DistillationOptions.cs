using ModelCompression.Training;
using static TorchSharp.torch;

namespace ModelCompression.Distillation;

/// <summary>The kind of task, which decides how the student matches the teacher's outputs.</summary>
public enum DistillationTask
{
    /// <summary>Classification: soft targets (KL at a temperature) plus cross-entropy on the labels.</summary>
    Classification,

    /// <summary>Regression: mean squared error to the teacher's outputs plus the task loss on the targets.</summary>
    Regression,
}

/// <summary>A pair of layers whose outputs the student learns to match (a "hint", Romero et al. 2015).</summary>
/// <param name="TeacherLayer">The teacher layer's dotted name.</param>
/// <param name="StudentLayer">The student layer's dotted name.</param>
/// <param name="Weight">The weight of this pair's mean squared error in the loss. The default is 1.</param>
public sealed record HintPair(string TeacherLayer, string StudentLayer, double Weight = 1.0);

/// <summary>Distilling from the original model during a step's fine-tuning ("recovery mode").</summary>
public sealed class RecoveryDistillation : IValidatableOptions
{
    /// <summary>Gets or sets the weight α of the soft-target term.</summary>
    /// <value>The default is 0.7. Must be between 0 and 1.</value>
    public double Alpha { get; set; } = 0.7;

    /// <summary>Gets or sets the temperature T.</summary>
    /// <value>The default is 4. Must be positive and finite.</value>
    public double Temperature { get; set; } = 4;

    /// <inheritdoc/>
    public IReadOnlyList<string> Validate()
    {
        var errors = new List<string>();
        if (!(Alpha >= 0 && Alpha <= 1))
        {
            errors.Add($"{nameof(RecoveryDistillation)}.{nameof(Alpha)} must be between 0 and 1 (was {Alpha}).");
        }

        if (!(Temperature > 0) || double.IsInfinity(Temperature))
        {
            errors.Add($"{nameof(RecoveryDistillation)}.{nameof(Temperature)} must be positive and finite (was {Temperature}).");
        }

        return errors;
    }

    /// <inheritdoc/>
    public override string ToString() => $"distilled (α {Alpha}, T {Temperature})";

    /// <summary>Adds the errors of a step's recovery distillation: its own, and a missing fine-tuning to distil in.</summary>
    internal static void AddErrors(List<string> errors, string owner, RecoveryDistillation? distillation, TrainingOptions? fineTuning)
    {
        OptionsValidationException.AddNested(errors, owner, "Distillation", distillation?.Validate(), required: false);
        if (distillation is not null && fineTuning is null)
        {
            errors.Add($"{owner}.Distillation distils during fine-tuning: set FineTuning too.");
        }
    }

    /// <summary>Returns an independent copy, or <see langword="null"/>.</summary>
    internal static RecoveryDistillation? Copy(RecoveryDistillation? distillation) =>
        distillation is null ? null : new RecoveryDistillation { Alpha = distillation.Alpha, Temperature = distillation.Temperature };
}

/// <summary>Options of <see cref="DistillationStep"/>.</summary>
public sealed class DistillationOptions : IValidatableOptions
{
    /// <summary>Gets or sets the weight α of the teacher term (soft targets, or MSE to the teacher for regression).</summary>
    /// <value>The default is 0.9. Must be between 0 and 1 (0 trains on the labels alone).</value>
    public double Alpha { get; set; } = 0.9;

    /// <summary>Gets or sets the temperature T of the soft targets.</summary>
    /// <value>The default is 4. Must be positive and finite.</value>
    public double Temperature { get; set; } = 4;

    /// <summary>Gets or sets the task.</summary>
    /// <value>The default is <see cref="DistillationTask.Classification"/>.</value>
    public DistillationTask Task { get; set; } = DistillationTask.Classification;

    /// <summary>Gets or sets the teacher, or <see langword="null"/> for the pipeline's original model. It is never changed.</summary>
    public nn.Module<Tensor, Tensor>? Teacher { get; set; }

    /// <summary>
    /// Gets or sets a student architecture to train from the teacher (it is copied, never changed), or
    /// <see langword="null"/> to distill into the pipeline's current model.
    /// </summary>
    public nn.Module<Tensor, Tensor>? Student { get; set; }

    /// <summary>Gets the hint pairs (feature distillation), matched with an adapter when their widths differ.</summary>
    public IList<HintPair> Hints { get; init; } = [];

    /// <summary>Gets or sets the training of the student.</summary>
    /// <value>The default is 10 epochs of Adam at 0.001.</value>
    public TrainingOptions Training { get; set; } = new() { Epochs = 10 };

    /// <summary>
    /// Gets or sets whether the teacher's outputs on the training data are computed once and reused every epoch (valid
    /// when the data is the same every epoch: no augmentation). Not used with hints, which need the teacher's features.
    /// </summary>
    /// <value>The default is <see langword="true"/>.</value>
    public bool CacheTeacherOutputs { get; set; } = true;

    /// <inheritdoc/>
    public IReadOnlyList<string> Validate()
    {
        const string Name = nameof(DistillationOptions);
        var errors = new List<string>();
        if (!(Alpha >= 0 && Alpha <= 1))
        {
            errors.Add($"{Name}.{nameof(Alpha)} must be between 0 and 1 (was {Alpha}).");
        }

        if (!(Temperature > 0) || double.IsInfinity(Temperature))
        {
            errors.Add($"{Name}.{nameof(Temperature)} must be positive and finite (was {Temperature}).");
        }

        if (!Enum.IsDefined(Task))
        {
            errors.Add($"{Name}.{nameof(Task)} is not a known task (was {(int)Task}).");
        }

        if (Hints is null)
        {
            errors.Add($"{Name}.{nameof(Hints)} must not be null.");
        }
        else
        {
            foreach (var hint in Hints)
            {
                if (hint is null || string.IsNullOrWhiteSpace(hint.TeacherLayer) || string.IsNullOrWhiteSpace(hint.StudentLayer))
                {
                    errors.Add($"{Name}.{nameof(Hints)} holds a pair without both layer names.");
                }
                else if (!(hint.Weight > 0) || double.IsInfinity(hint.Weight))
                {
                    errors.Add($"{Name}.{nameof(Hints)}: the weight of ({hint.TeacherLayer}, {hint.StudentLayer}) must be positive (was {hint.Weight}).");
                }
            }
        }

        OptionsValidationException.AddNested(errors, Name, nameof(Training), Training?.Validate());
        return errors;
    }

    internal DistillationOptions Clone() => new()
    {
        Alpha = Alpha,
        Temperature = Temperature,
        Task = Task,
        Teacher = Teacher,
        Student = Student,
        Hints = [.. Hints],
        Training = Training.Clone(),
        CacheTeacherOutputs = CacheTeacherOutputs,
    };
}
