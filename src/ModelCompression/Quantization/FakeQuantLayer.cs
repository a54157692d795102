using ModelCompression.Metrics;
using ModelCompression.Quantization.Kernels;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Quantization;

/// <summary>
/// A Linear or Conv2d layer during quantization-aware training: its input is fake-quantized to the kernel's
/// 7-bit activation levels (range from a moving-average observer, or a learned step size), its weight to the
/// chosen bit width (per channel or group; 1 bit = sign × mean magnitude), and a BatchNorm that followed it is
/// folded in with its running statistics, so training sees what the converted layer will compute. Made by
/// <see cref="QuantizationAwareTrainingStep"/>; <see cref="Convert"/> turns it into the real quantized layer.
/// </summary>
public sealed class FakeQuantLayer : nn.Module<Tensor, Tensor>, ICompressedLayer
{
    private const double ObserverMomentum = 0.1;

    /// <summary>Added to a learned scale's magnitude so it is never zero; held for the process (see <see cref="KeptScalars"/>).</summary>
    private static readonly Scalar ScaleEpsilon = 1e-8.ToScalar();

    private readonly nn.Module<Tensor, Tensor> layer;
    private readonly nn.Module<Tensor, Tensor>? batch_norm;
    private readonly Parameter? activation_scale;
    private readonly Parameter? weight_scale;
    private readonly QuantizationGranularity granularity;
    private float observedMin = float.NaN;
    private float observedMax = float.NaN;
    private float lsqZeroPoint;

    internal FakeQuantLayer(nn.Module<Tensor, Tensor> layer, nn.Module<Tensor, Tensor>? batchNorm, int weightBits, QuantizationGranularity granularity, bool quantizeActivations, bool learnedStepSize)
        : base(nameof(FakeQuantLayer))
    {
        this.layer = layer;
        batch_norm = batchNorm;
        this.granularity = granularity;
        WeightBits = weightBits;
        QuantizesActivations = quantizeActivations;
        LearnedStepSize = learnedStepSize;
        if (learnedStepSize)
        {
            // Initialised from the data on the first training call (see InitialiseStepSizes).
            using var noGrad = no_grad();
            var weight = Weight;
            if (weightBits > 1)
            {
                long groups = granularity is PerGroupGranularity g ? (WeightMatrix(weight).shape[1] + g.Size - 1) / g.Size : 1;
                weight_scale = new Parameter(ones(granularity is PerTensorGranularity ? 1 : weight.shape[0], groups, dtype: weight.dtype, device: weight.device).DetachFromDisposeScope());
            }

            if (quantizeActivations)
            {
                activation_scale = new Parameter(ones(1, dtype: weight.dtype, device: weight.device).DetachFromDisposeScope());
            }
        }

        RegisterComponents();
    }

    /// <summary>Gets the wrapped float layer (trained in place).</summary>
    public nn.Module<Tensor, Tensor> Layer => layer;

    /// <summary>Gets the folded BatchNorm, or <see langword="null"/>.</summary>
    public nn.Module<Tensor, Tensor>? BatchNorm => batch_norm;

    /// <inheritdoc/>
    public int WeightBits { get; }

    /// <summary>Gets whether the input is fake-quantized (static int8 after conversion) or only the weight (weight-only).</summary>
    public bool QuantizesActivations { get; }

    /// <summary>Gets whether scales are trained (LSQ) instead of set from observed ranges.</summary>
    public bool LearnedStepSize { get; }

    /// <summary>Gets or sets whether the activation observer still updates its range (in training mode).</summary>
    public bool ObserverEnabled { get; set; } = true;

    /// <summary>Gets or sets whether the observer updates in evaluation mode too (the calibration pass before training).</summary>
    public bool Calibrating { get; set; }

    /// <summary>Gets or sets whether the folded BatchNorm's running statistics are frozen.</summary>
    public bool BatchNormFrozen { get; set; }

    /// <summary>Gets the observed activation range, or NaN before the first call.</summary>
    public (float Min, float Max) ObservedRange => (observedMin, observedMax);

    /// <inheritdoc/>
    public int? Rank => null;

    /// <inheritdoc/>
    public long ParameterCount => layer.parameters().Sum(p => p.numel());

    /// <inheritdoc/>
    public long NonzeroParameterCount
    {
        get
        {
            using var scope = NewDisposeScope();
            return layer.parameters().Sum(p => p.count_nonzero().item<long>());
        }
    }

    private Tensor Weight => BatchNormFolding.WeightAndBias(layer).Weight;

    private Tensor? Bias => BatchNormFolding.WeightAndBias(layer).Bias;

    /// <inheritdoc/>
    public long CountMacs(Tensor input, Tensor output) => ModelMetrics.LayerMacs(layer, input, output);

    /// <summary>Gets the activation scale and zero point the converted layer will use.</summary>
    /// <returns>The scale and zero point, from the learned step size or the observed range.</returns>
    /// <exception cref="InvalidOperationException">The layer has never seen data.</exception>
    public (float Scale, float ZeroPoint) ActivationQuantization()
    {
        if (float.IsNaN(observedMin))
        {
            throw new InvalidOperationException("The layer has not been called yet, so its activation range is unknown.");
        }

        if (activation_scale is not null)
        {
            return (Math.Abs(activation_scale.detach().cpu().item<float>()) + 1e-8f, lsqZeroPoint);
        }

        return QuantizedActivations.Range(observedMin, observedMax, symmetric: false);
    }

    /// <inheritdoc/>
    public override Tensor forward(Tensor input)
    {
        ArgumentNullException.ThrowIfNull(input);
        using var scope = NewDisposeScope();
        var x = input;
        if (QuantizesActivations)
        {
            if ((training && ObserverEnabled) || Calibrating || float.IsNaN(observedMin))
            {
                Observe(input);
            }

            x = QuantizeInput(input);
        }

        var (weight, bias) = FoldedWeightAndBias(input);
        var quantizedWeight = QuantizeWeight(weight);
        var output = layer switch
        {
            Linear => nn.functional.linear(x, quantizedWeight, bias),
            Conv2d c => nn.functional.conv2d(x, quantizedWeight, bias, c.stride, c.padding, c.dilation, c.groups),
            _ => throw new InvalidOperationException(),
        };
        return output.MoveToOuterDisposeScope();
    }

    /// <summary>The weight and bias with the BatchNorm folded in (running statistics; updated first while training and not frozen).</summary>
    internal (Tensor Weight, Tensor? Bias) FoldedWeightAndBias(Tensor? input)
    {
        if (batch_norm is null)
        {
            return (Weight, Bias);
        }

        if (training && !BatchNormFrozen && input is not null)
        {
            // Update the running statistics from the float layer's output on this batch, as the BatchNorm would.
            using var noGrad = no_grad();
            batch_norm.train();
            var floatOutput = layer.call(input);
            batch_norm.call(floatOutput);
            batch_norm.eval();
        }

        return BatchNormFolding.Folded(layer, batch_norm);
    }

    private void Observe(Tensor input)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var (min, max) = input.aminmax();
        float bmin = min.cpu().item<float>(), bmax = max.cpu().item<float>();
        if (!float.IsFinite(bmin) || !float.IsFinite(bmax))
        {
            throw new ArgumentException("The layer received NaN or infinite activations during quantization-aware training.", nameof(input));
        }

        bool first = float.IsNaN(observedMin);
        observedMin = first ? bmin : observedMin + (float)(ObserverMomentum * (bmin - observedMin));
        observedMax = first ? bmax : observedMax + (float)(ObserverMomentum * (bmax - observedMax));
        if (first && activation_scale is not null)
        {
            var (scale, zero) = QuantizedActivations.Range(observedMin, observedMax, symmetric: false);
            using var value = scale.ToScalar();
            activation_scale.detach().fill_(value);
            lsqZeroPoint = zero;
        }
    }

    private Tensor QuantizeInput(Tensor input)
    {
        if (activation_scale is not null)
        {
            double g = 1 / Math.Sqrt(input.numel() / Math.Max(1, input.shape[0]) * (double)QuantizedActivations.MaxLevel);
            return FakeQuantization.WithLearnedScale(input, activation_scale.abs().Plus(ScaleEpsilon), lsqZeroPoint, 0, QuantizedActivations.MaxLevel, g);
        }

        var (scale, zero) = QuantizedActivations.Range(observedMin, observedMax, symmetric: false);
        return FakeQuantization.WithFixedScale(input, tensor(scale, dtype: input.dtype, device: input.device), zero, 0, QuantizedActivations.MaxLevel);
    }

    private Tensor QuantizeWeight(Tensor weight)
    {
        if (WeightBits == 1)
        {
            return FakeQuantization.Binary(weight);
        }

        int qmax = QuantizedMatrix.MaxLevel(WeightBits);
        var matrix = WeightMatrix(weight);
        Tensor quantized;
        if (weight_scale is not null)
        {
            if (!lsqInitialised)
            {
                InitialiseWeightScale(matrix, qmax);
            }

            var grouped = Grouped(matrix, out long padded);
            double g = 1 / Math.Sqrt(matrix.shape[1] * (double)qmax);
            var scale = weight_scale.abs().Plus(ScaleEpsilon);
            quantized = Ungroup(FakeQuantization.WithLearnedScale(grouped, scale.unsqueeze(-1), 0, -qmax, qmax, g), matrix, padded);
        }
        else
        {
            var grouped = Grouped(matrix, out long padded);
            // The kernel's rule (QuantizedMatrix.ScaleFor): an all-zero group (a pruned row or channel) gets scale 1,
            // so it stays zero; 4-bit scales are floored at 1e-4 and stored as float16, so train with that rounding.
            using var levels = qmax.ToScalar();
            using var zero = 0.ToScalar();
            var scale = grouped.detach().abs().amax([-1L], keepdim: true).div(levels);
            scale = where(scale > zero, scale, ones_like(scale));
            if (WeightBits == 4)
            {
                using var floor = 1e-4.ToScalar();
                scale = scale.clamp_min(floor).to(ScalarType.Float16).to(scale.dtype);
            }

            quantized = Ungroup(FakeQuantization.WithFixedScale(grouped, scale, 0, -qmax, qmax), matrix, padded);
        }

        return quantized.reshape(weight.shape);
    }

    private bool lsqInitialised;

    private void InitialiseWeightScale(Tensor matrix, int qmax)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var grouped = Grouped(matrix.detach(), out _);
        using var levels = qmax.ToScalar();
        var init = grouped.abs().amax([-1L]).div(levels).clamp_min(ScaleEpsilon);
        weight_scale!.copy_(granularity is PerTensorGranularity ? init.amax().reshape(1, 1) : init);
        lsqInitialised = true;
    }

    /// <summary>The weight as [rows, groups, group size] (the whole row, or the whole tensor, as one group), zero-padded.</summary>
    private Tensor Grouped(Tensor matrix, out long padded)
    {
        long k = matrix.shape[1];
        if (granularity is PerTensorGranularity)
        {
            padded = 0;
            return matrix.reshape(1, 1, -1);
        }

        if (granularity is PerGroupGranularity g)
        {
            padded = ((k + g.Size - 1) / g.Size * g.Size) - k;
            var wide = padded > 0 ? nn.functional.pad(matrix, [0, padded]) : matrix;
            return wide.reshape(matrix.shape[0], -1, g.Size);
        }

        padded = 0;
        return matrix.unsqueeze(1);
    }

    private static Tensor Ungroup(Tensor grouped, Tensor matrix, long padded)
    {
        var flat = grouped.reshape(matrix.shape[0], -1);
        return padded > 0 ? flat.narrow(1, 0, matrix.shape[1]) : flat;
    }

    private static Tensor WeightMatrix(Tensor weight) => weight.reshape(weight.shape[0], -1);

    /// <summary>The real quantized layer this one stands for: the same scales, levels and folded BatchNorm.</summary>
    /// <returns>A <see cref="QuantizedLinear"/> or <see cref="QuantizedConv2d"/>, on the CPU.</returns>
    public nn.Module<Tensor, Tensor> Convert()
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        bool wasTraining = training;
        eval();
        try
        {
            var (weight, bias) = FoldedWeightAndBias(null);
            var matrixTensor = WeightMatrix(weight).detach().to(ScalarType.Float32).cpu().contiguous();
            int n = (int)matrixTensor.shape[0], k = (int)matrixTensor.shape[1];
            var w = matrixTensor.data<float>().ToArray();
            var b = bias?.detach().to(ScalarType.Float32).cpu().data<float>().ToArray();
            QuantizedMatrix matrix;
            if (weight_scale is not null && WeightBits > 1)
            {
                var scales = weight_scale.detach().abs().Plus(ScaleEpsilon).to(ScalarType.Float32).cpu().data<float>().ToArray();
                if (WeightBits == 4)
                {
                    // Stored as float16, whose smallest normal is 6.1e-5: floored as QuantizedMatrix.ScaleFor floors
                    // them, so a learned scale near zero (an all-zero group) is not stored as 0.
                    for (int i = 0; i < scales.Length; i++)
                    {
                        scales[i] = (float)(Half)Math.Max(scales[i], 1e-4f);
                    }
                }

                matrix = QuantizedMatrix.FromScales(w, n, k, WeightBits, granularity, scales, b ?? [], b is not null);
            }
            else
            {
                matrix = QuantizedMatrix.FromFloat(w, n, k, WeightBits, granularity, b ?? [], b is not null);
            }

            var (scale, zero) = QuantizesActivations ? ActivationQuantization() : (0f, 0f);
            var settings = QuantizesActivations
                ? new ActivationSettings(ActivationMode.Static, scale, zero, false)
                : new ActivationSettings(granularity is PerGroupGranularity ? ActivationMode.PerBlock : ActivationMode.PerRow, 0, 0, false);
            var mode = QuantizesActivations ? QuantizationMode.StaticInt8 : (WeightBits == 4 ? QuantizationMode.WeightOnlyInt4 : QuantizationMode.WeightOnlyInt8);
            return layer switch
            {
                Linear => new QuantizedLinear(matrix, settings, false, mode),
                Conv2d conv => new QuantizedConv2d(conv, matrix, settings, false, mode),
                _ => throw new InvalidOperationException(),
            };
        }
        finally
        {
            train(wasTraining);
        }
    }

    /// <inheritdoc/>
    public override string ToString() =>
        $"FakeQuantLayer({layer.GetType().Name}, w{WeightBits} {granularity}{(QuantizesActivations ? ", a7" : string.Empty)}{(LearnedStepSize ? ", LSQ" : string.Empty)}{(batch_norm is null ? string.Empty : ", BN folded")})";

    /// <inheritdoc/>
    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            layer.Dispose();
            batch_norm?.Dispose();
        }

        base.Dispose(disposing);
    }
}
