using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Training;

// TorchSharp 0.107's optimizer steps pass temporary Scalars (a double converted implicitly, or the 1 that add_ adds)
// to LibTorch and keep no reference to them while the call runs. Once the JIT has optimised the step, a collection on
// another thread can finalize such a Scalar, freeing it while LibTorch still reads it; CI saw it twice as an error out
// of SGD.step. These subclasses run the same LibTorch operations in the same order with the same Scalar values
// (doubles converted by ToScalar, as the implicit conversion does), but every Scalar is a local disposed after the
// last call that uses it, so it lives through each call and the weights are bitwise those of TorchSharp's step.

/// <summary>TorchSharp's SGD (momentum, dampening, Nesterov, L2 weight decay) with its Scalars kept alive.</summary>
internal sealed class ScalarSafeSgd : SGD
{
    public ScalarSafeSgd(IEnumerable<Parameter> parameters, double lr, double momentum, double weightDecay, double dampening = 0, bool nesterov = false)
        : base(parameters, lr, momentum, dampening, weightDecay, nesterov)
    {
    }

    public override Tensor step(Func<Tensor>? closure = null) => _step<ParamGroup>(
        group =>
        {
            var options = group.Options;
            double momentum = options.momentum!.Value;
            double dampening = options.dampening!.Value;
            double weightDecay = options.weight_decay!.Value;
            bool nesterov = options.nesterov!.Value;
            double lr = options.LearningRate!.Value;
            using var weightDecayScalar = weightDecay.ToScalar();
            using var momentumScalar = momentum.ToScalar();
            using var gradientScale = (1 - dampening).ToScalar();
            using var stepScale = (options.maximize!.Value ? lr : -lr).ToScalar();
            foreach (var param in group.Parameters)
            {
                var state = (State)_state[param.Handle];
                var grad = param.grad;
                if (grad is null)
                {
                    continue;
                }

                if (weightDecay != 0)
                {
                    grad = grad.add(param, weightDecayScalar);
                }

                if (momentum != 0)
                {
                    var buffer = state.momentum_buffer;
                    if (buffer is null)
                    {
                        buffer = grad.clone().detach().DetachFromDisposeScope();
                        state.momentum_buffer = buffer;
                    }
                    else
                    {
                        buffer.mul_(momentumScalar).add_(grad, gradientScale);
                    }

                    grad = nesterov ? grad.add(buffer, momentumScalar) : buffer;
                }

                param.add_(grad, stepScale);
            }
        },
        closure);
}

/// <summary>TorchSharp's Adam (L2 weight decay added to the gradient) with its Scalars kept alive.</summary>
internal sealed class ScalarSafeAdam : Adam
{
    public ScalarSafeAdam(IEnumerable<Parameter> parameters, double lr, double weightDecay, bool amsgrad = false)
        : base(parameters, lr, weight_decay: weightDecay, amsgrad: amsgrad)
    {
    }

    public override Tensor step(Func<Tensor>? closure = null) => _step<ParamGroup>(
        group =>
        {
            var options = (Options)group.Options;
            using var scalars = new AdamScalars(options);
            foreach (var param in group.Parameters)
            {
                var state = (State)_state[param.Handle];
                var grad = param.grad;
                if (grad is null)
                {
                    continue;
                }

                if (options.maximize!.Value)
                {
                    grad = -grad;
                }

                state.step += 1;
                if (options.weight_decay!.Value != 0)
                {
                    grad = grad.add(param, scalars.WeightDecay);
                }

                scalars.Update(param, grad, grad.conj(), state.step, state.exp_avg, state.exp_avg_sq, ref state.max_exp_avg_sq);
            }
        },
        closure);
}

/// <summary>TorchSharp's AdamW (decoupled weight decay) with its Scalars kept alive.</summary>
internal sealed class ScalarSafeAdamW : AdamW
{
    public ScalarSafeAdamW(IEnumerable<Parameter> parameters, double lr, double weightDecay, bool amsgrad = false)
        : base(parameters, lr, weight_decay: weightDecay, amsgrad: amsgrad)
    {
    }

    public override Tensor step(Func<Tensor>? closure = null) => _step<ParamGroup>(
        group =>
        {
            var options = (Options)group.Options;
            using var scalars = new AdamScalars(options);
            using var decay = (1 - (options.LearningRate!.Value * options.weight_decay!.Value)).ToScalar();
            foreach (var param in group.Parameters)
            {
                var state = (State)_state[param.Handle];
                var grad = param.grad;
                if (grad is null)
                {
                    continue;
                }

                if (options.maximize!.Value)
                {
                    grad = -grad;
                }

                state.step += 1;
                param.mul_(decay);
                scalars.Update(param, grad, grad, state.step, state.exp_avg, state.exp_avg_sq, ref state.max_exp_avg_sq);
            }
        },
        closure);
}

/// <summary>
/// The Scalars of one Adam or AdamW parameter group's step, and the moment update and parameter step the two share.
/// </summary>
internal sealed class AdamScalars : IDisposable
{
    private readonly double beta1;
    private readonly double beta2;
    private readonly double eps;
    private readonly double lr;
    private readonly bool amsgrad;
    private readonly Scalar beta1Scalar;
    private readonly Scalar oneMinusBeta1;
    private readonly Scalar beta2Scalar;
    private readonly Scalar oneMinusBeta2;
    private readonly Scalar epsScalar;
    private readonly Scalar one;

    public AdamScalars(OptimizerOptions options)
    {
        var (b1, b2, e, ams, weightDecay) = options switch
        {
            Adam.Options adam => (adam.beta1!.Value, adam.beta2!.Value, adam.eps!.Value, adam.amsgrad!.Value, adam.weight_decay!.Value),
            AdamW.Options adamW => (adamW.beta1!.Value, adamW.beta2!.Value, adamW.eps!.Value, adamW.amsgrad!.Value, adamW.weight_decay!.Value),
            _ => throw new ArgumentException("Not Adam's or AdamW's options.", nameof(options)),
        };
        beta1 = b1;
        beta2 = b2;
        eps = e;
        amsgrad = ams;
        lr = options.LearningRate!.Value;
        beta1Scalar = beta1.ToScalar();
        oneMinusBeta1 = (1 - beta1).ToScalar();
        beta2Scalar = beta2.ToScalar();
        oneMinusBeta2 = (1 - beta2).ToScalar();
        epsScalar = eps.ToScalar();
        one = 1.ToScalar();
        WeightDecay = weightDecay.ToScalar();
    }

    /// <summary>Gets the weight decay as a Scalar.</summary>
    public Scalar WeightDecay { get; }

    /// <summary>Updates the moments and takes the bias-corrected step, in TorchSharp's order of operations.</summary>
    public void Update(Parameter param, Tensor grad, Tensor gradFactor, long step, Tensor expAvg, Tensor expAvgSq, ref Tensor? maxExpAvgSq)
    {
        double biasCorrection1 = 1 - Math.Pow(beta1, step);
        double biasCorrection2 = 1 - Math.Pow(beta2, step);
        expAvg.mul_(beta1Scalar).add_(grad, oneMinusBeta1);
        expAvgSq.mul_(beta2Scalar).addcmul_(grad, gradFactor, oneMinusBeta2);
        Tensor second = expAvgSq;
        if (amsgrad)
        {
            var previous = maxExpAvgSq!;
            maxExpAvgSq = maximum(previous, expAvgSq).DetachFromDisposeScope();
            previous.Dispose();
            second = maxExpAvgSq;
        }

        using var correction = Math.Sqrt(biasCorrection2).ToScalar();
        using var stepSize = (-(lr / biasCorrection1)).ToScalar();
        // add_(Scalar) alone would pass its alpha, the int 1, as one more temporary Scalar.
        var denominator = second.sqrt().div(correction).add_(epsScalar, one);
        param.addcdiv_(expAvg, denominator, stepSize);
    }

    public void Dispose()
    {
        beta1Scalar.Dispose();
        oneMinusBeta1.Dispose();
        beta2Scalar.Dispose();
        oneMinusBeta2.Dispose();
        epsScalar.Dispose();
        one.Dispose();
        WeightDecay.Dispose();
    }
}
