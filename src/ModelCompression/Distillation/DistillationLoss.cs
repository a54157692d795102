using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Distillation;

/// <summary>The knowledge-distillation loss terms (Hinton, Vinyals and Dean 2015).</summary>
public static class DistillationLoss
{
    /// <summary>
    /// T²·KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the batch: the soft-target term. The T² factor keeps
    /// its gradients on the scale of the hard-label term when the temperature changes.
    /// </summary>
    /// <param name="studentLogits">
    /// The student's logits: [batch, classes], [batch, classes, ...] (a dense prediction, classes along dimension 1) or
    /// [batch, time, classes] (a language model: a distribution per token, averaged over the tokens).
    /// </param>
    /// <param name="teacherLogits">The teacher's logits, the same shape (no gradient flows into them).</param>
    /// <param name="temperature">The temperature T, positive.</param>
    /// <returns>A scalar tensor.</returns>
    public static Tensor SoftTargets(Tensor studentLogits, Tensor teacherLogits, double temperature)
    {
        ArgumentNullException.ThrowIfNull(studentLogits);
        ArgumentNullException.ThrowIfNull(teacherLogits);
        if (!(temperature > 0) || double.IsInfinity(temperature))
        {
            throw new ArgumentOutOfRangeException(nameof(temperature), temperature, "Must be positive and finite.");
        }

        if (!studentLogits.shape.SequenceEqual(teacherLogits.shape))
        {
            throw new ArgumentException($"Student logits [{string.Join(", ", studentLogits.shape)}] and teacher logits [{string.Join(", ", teacherLogits.shape)}] differ in shape.", nameof(teacherLogits));
        }

        using var scope = NewDisposeScope();
        using var t = temperature.ToScalar();
        using var squared = (temperature * temperature).ToScalar();
        long classes = studentLogits.dim() == 3 ? 2 : 1;
        var logStudent = nn.functional.log_softmax(studentLogits.div(t), classes);
        var logTeacher = nn.functional.log_softmax(teacherLogits.detach().div(t), classes);
        var kl = (logTeacher.exp() * (logTeacher - logStudent)).sum(classes).mean();
        return kl.mul(squared).MoveToOuterDisposeScope();
    }

    /// <summary>α·T²·KL(teacher ‖ student) + (1 − α)·CE(labels, student): the whole classification loss.</summary>
    /// <param name="studentLogits">The student's logits.</param>
    /// <param name="teacherLogits">The teacher's logits.</param>
    /// <param name="labels">The class indices.</param>
    /// <param name="alpha">The weight of the soft-target term, 0 to 1.</param>
    /// <param name="temperature">The temperature, positive.</param>
    /// <returns>A scalar tensor.</returns>
    public static Tensor Combined(Tensor studentLogits, Tensor teacherLogits, Tensor labels, double alpha, double temperature)
    {
        ArgumentNullException.ThrowIfNull(labels);
        if (!(alpha >= 0 && alpha <= 1))
        {
            throw new ArgumentOutOfRangeException(nameof(alpha), alpha, "Must be between 0 and 1.");
        }

        using var scope = NewDisposeScope();
        var hard = nn.functional.cross_entropy(studentLogits, labels);
        using var soft = alpha.ToScalar();
        using var rest = (1 - alpha).ToScalar();
        var total = alpha == 0 ? hard : SoftTargets(studentLogits, teacherLogits, temperature).mul(soft).Plus(hard.mul(rest));
        return total.MoveToOuterDisposeScope();
    }
}
