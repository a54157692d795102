using ModelCompression.Modules;
using ModelCompression.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Distillation;

/// <summary>Turns a step's fine-tuning into distillation from the original model.</summary>
internal static class RecoveryDistillationExtensions
{
    /// <summary>
    /// Adds the soft-target term against <paramref name="teacher"/> to <paramref name="callbacks"/> (creating them when
    /// null) and weights the hard-label term by 1 − α. The teacher runs in evaluation mode without gradients.
    /// </summary>
    public static TrainingCallbacks WithDistillation(this TrainingCallbacks? callbacks, RecoveryDistillation? distillation, nn.Module<Tensor, Tensor> teacher)
    {
        callbacks ??= new TrainingCallbacks();
        if (distillation is null)
        {
            return callbacks;
        }

        var previous = callbacks.ExtraLoss;
        callbacks.TaskLossWeight = 1 - distillation.Alpha;
        callbacks.ExtraLoss = batch =>
        {
            Tensor teacherLogits;
            using (ModuleModes.Evaluating(teacher))
            using (no_grad())
            {
                teacherLogits = teacher.call(batch.Input);
            }

            using var alpha = distillation.Alpha.ToScalar();
            var soft = DistillationLoss.SoftTargets(batch.Output, teacherLogits, distillation.Temperature).mul(alpha);
            return previous?.Invoke(batch) is { } other ? soft.Plus(other) : soft;
        };
        return callbacks;
    }
}
