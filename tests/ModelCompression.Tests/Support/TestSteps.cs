using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Support;

/// <summary>Records its name when applied; changes nothing.</summary>
internal sealed class RecordingStep(string name, List<string> log) : ICompressionStep
{
    public string Name => name;

    public nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        log.Add(name);
        return model;
    }
}

/// <summary>Destroys the model: every parameter set to zero (accuracy falls to one class).</summary>
internal sealed class DestructiveStep(string name = "Destroy") : ICompressionStep
{
    public string Name => name;

    public nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        using var noGrad = no_grad();
        foreach (var p in model.parameters())
        {
            p.zero_();
        }

        return model;
    }
}

/// <summary>Changes the weights (in place, on the pipeline's copy) and then throws.</summary>
internal sealed class ThrowingStep : ICompressionStep
{
    public string Name => "Throws";

    public nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        using (no_grad())
        {
            foreach (var p in model.parameters())
            {
                p.mul_(3);
            }
        }

        throw new InvalidOperationException("step failed on purpose");
    }
}

/// <summary>Changes the weights, cancels the run, and observes the cancellation.</summary>
internal sealed class CancellingStep(CancellationTokenSource source) : ICompressionStep
{
    public string Name => "Cancels";

    public nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        using (no_grad())
        {
            foreach (var p in model.parameters())
            {
                p.add_(1);
            }
        }

        source.Cancel();
        context.CancellationToken.ThrowIfCancellationRequested();
        return model;
    }
}

/// <summary>Fine-tunes with the shared trainer (uses the step seed), to test determinism.</summary>
internal sealed class FineTuneStep : ICompressionStep, ICompressionStepRequirements
{
    public string Name => "FineTune";

    public bool RequiresTrainingData => true;

    public nn.Module<Tensor, Tensor> Apply(nn.Module<Tensor, Tensor> model, CompressionContext context)
    {
        using (no_grad())
        {
            // Perturb first so the fine-tuning has something to recover, with randomness from the step seed.
            foreach (var p in model.parameters())
            {
                p.add_(torch.randn_like(p) * 0.3);
            }
        }

        context.Train(model, new ModelCompression.Training.TrainingOptions { Epochs = 2, BatchSize = 16, LearningRate = 0.01 });
        return model;
    }
}
