using ModelCompression.Quantization.Kernels;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Quantization;

/// <summary>
/// HQQ's optimisation for one weight matrix (Badri and Shaji, "Half-Quadratic Quantization of Large Machine Learning
/// Models", 2023): each group of weights gets an asymmetric grid w ≈ s · (q − z) with q in 0…2ᵇ − 1, the scale from
/// the group's range and the zero point z found by half-quadratic splitting of an Lp (p &lt; 1) loss on the weight
/// error, which tolerates the few weights a group cannot fit and fits the rest better. No calibration data.
/// </summary>
internal static class Hqq
{
    /// <summary>The outcome: levels shifted to −2ᵇ⁻¹…2ᵇ⁻¹ − 1 (two's complement fields), scales and zero points (float16 values) in the same shift.</summary>
    /// <param name="Levels">The levels, row-major [N, K].</param>
    /// <param name="Scales">One per row and group, [N × groups].</param>
    /// <param name="ZeroPoints">One per row and group, in level units: w = s · (q − z).</param>
    /// <param name="WeightErrorBefore">The mean |w − ŵ| of the min–max asymmetric grid before optimising.</param>
    /// <param name="WeightErrorAfter">The mean |w − ŵ| after.</param>
    public sealed record Result(sbyte[] Levels, float[] Scales, float[] ZeroPoints, double WeightErrorBefore, double WeightErrorAfter);

    /// <summary>Quantizes every Linear target with HQQ and returns the matrices by name; other targets are left to round-to-nearest.</summary>
    /// <param name="targets">The layers to quantize.</param>
    /// <param name="settings">HQQ's settings.</param>
    /// <param name="options">The step's options (bits, granularity).</param>
    /// <param name="inputScales">AWQ's explicit input scales by layer name: those layers' weights are fitted as W·diag(s).</param>
    /// <param name="context">The step's context (progress, notes, cancellation).</param>
    /// <returns>The matrices by layer name.</returns>
    public static Dictionary<string, QuantizedMatrix> Solve(IReadOnlyList<Target> targets, HqqRounding settings, PostTrainingQuantizationOptions options, IReadOnlyDictionary<string, float[]> inputScales, CompressionContext context)
    {
        var solved = new Dictionary<string, QuantizedMatrix>(StringComparer.Ordinal);
        var linear = targets.Where(t => t.Module is Linear).ToList();
        double before = 0, after = 0;
        for (int index = 0; index < linear.Count; index++)
        {
            context.CancellationToken.ThrowIfCancellationRequested();
            var target = linear[index];
            var layer = (Linear)target.Module;
            using var scope = NewDisposeScope();
            int n = checked((int)layer.out_features), k = checked((int)layer.in_features);
            var granularity = QuantizedMatrix.ForInputs(options.EffectiveGranularity, k);
            var scales = inputScales.GetValueOrDefault(target.Name);
            var result = Quantize(Scaling.LayerNormScaling.ScaledWeight(layer, scales), options.Bits, granularity is PerGroupGranularity g ? g.Size : 0, settings);
            before += result.WeightErrorBefore;
            after += result.WeightErrorAfter;
            float[]? bias = layer.bias is { } b ? b.detach().to(ScalarType.Float32).cpu().contiguous().data<float>().ToArray() : null;
            solved[target.Name] = QuantizedMatrix.FromLevels(n, k, options.Bits, granularity, result.Levels, result.Scales, bias, result.ZeroPoints, scales);
            context.ReportProgress(CompressionPhase.Applying, 0.5 * (index + 1) / linear.Count);
        }

        if (linear.Count > 0)
        {
            context.AddNote($"HQQ ({settings}) fitted {linear.Count} Linear layer(s) with a zero point per scale: mean weight error {after / before:P0} of the min–max asymmetric grid's");
        }

        var others = targets.Where(t => t.Module is not Linear).Select(t => t.Name).ToList();
        if (others.Count > 0)
        {
            context.AddNote($"rounded to nearest on the symmetric grid (HQQ covers Linear layers): {string.Join(", ", others)}");
        }

        return solved;
    }

    /// <summary>Quantizes a weight [N, K] in groups of <paramref name="groupSize"/> inputs (0: one group per row).</summary>
    /// <param name="weight">The float weight.</param>
    /// <param name="bits">Bits per weight, 2 to 8.</param>
    /// <param name="groupSize">Inputs per group; 0 or at least K for one per row.</param>
    /// <param name="settings">The optimisation's settings.</param>
    /// <returns>The levels, scales and zero points.</returns>
    public static Result Quantize(Tensor weight, int bits, int groupSize, HqqRounding settings)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        int n = checked((int)weight.shape[0]);
        int k = checked((int)weight.shape[1]);
        int group = groupSize <= 0 || groupSize >= k ? k : groupSize;
        int groups = (k + group - 1) / group;
        int full = k / group;
        var w = weight.detach().to(ScalarType.Float32).cpu();
        int offset = 1 << (bits - 1);
        var levels = new sbyte[n * k];
        var scales = new float[n * groups];
        var zeros = new float[n * groups];
        double before = 0, after = 0;

        // Full groups as one [N·full, group] matrix, and the shorter last group of each row (if any) as another.
        void Part(Tensor values, int firstGroup, int width, int count)
        {
            var (q, s, z, errorBefore, errorAfter) = Optimise(values, bits, settings);
            before += errorBefore * values.numel();
            after += errorAfter * values.numel();
            var qs = q.to(ScalarType.Int32).contiguous().data<int>().ToArray();
            var ss = s.contiguous().data<float>().ToArray();
            var zs = z.contiguous().data<float>().ToArray();
            for (int row = 0; row < n; row++)
            {
                for (int g = 0; g < count; g++)
                {
                    int cell = (row * count) + g;
                    int target = (row * groups) + firstGroup + g;
                    scales[target] = ss[cell];
                    zeros[target] = zs[cell];
                    for (int i = 0; i < width; i++)
                    {
                        levels[(row * k) + ((firstGroup + g) * group) + i] = (sbyte)(qs[(cell * width) + i] - offset);
                    }
                }
            }
        }

        if (full > 0)
        {
            Part(w[.., ..(full * group)].reshape(n * full, group), 0, group, full);
        }

        if (full < groups)
        {
            Part(w[.., (full * group)..].contiguous(), full, k - (full * group), 1);
        }

        return new Result(levels, scales, zeros, before / (n * k), after / (n * k));
    }

    /// <summary>Optimises the zero points of the rows of <paramref name="w"/> [G, L], each row a group.</summary>
    private static (Tensor Levels, Tensor Scales, Tensor Zeros, double Before, double After) Optimise(Tensor w, int bits, HqqRounding settings)
    {
        double top = (1 << bits) - 1;
        using var zeroScalar = 0.ToScalar();
        using var topScalar = top.ToScalar();
        using var tiny = 1e-30.ToScalar();
        var low = w.amin([1], keepdim: true);
        var high = w.amax([1], keepdim: true);
        // The min–max grid: q = round(w · scale + zero), w ≈ (q − zero) / scale; a constant group gets scale 1.
        var range = high - low;
        var scale = where(range.gt(zeroScalar), range.clamp_min(tiny).reciprocal().mul(topScalar), ones_like(range));
        var zero = -low * scale;

        Tensor Levels(Tensor z) => (w * scale).Plus(z).round().clamp(zeroScalar, topScalar);
        double ErrorOf(Tensor z) => (w - ((Levels(z) - z) / scale)).abs().mean().item<float>();

        double initial = ErrorOf(zero);
        double best = initial;
        var bestZero = zero.clone();
        double beta = settings.Beta;
        for (int i = 0; i < settings.Iterations; i++)
        {
            using var step = NewDisposeScope();
            var q = Levels(zero);
            var reconstructed = (q - zero) / scale;
            // The proximal step of the Lp loss: a generalised soft threshold of the weight error.
            var error = w - reconstructed;
            var magnitude = error.abs();
            using var floor = 1e-12.ToScalar();
            using var exponent = (settings.LpNorm - 1).ToScalar();
            using var betaScalar = beta.ToScalar();
            var shrunk = error.sign() * (magnitude - magnitude.clamp_min(floor).pow(exponent).div(betaScalar)).relu();
            // The zero point that best explains the rest in the least-squares sense, per group.
            var updated = (q - ((w - shrunk) * scale)).mean([1], keepdim: true);
            zero.copy_(updated);
            beta *= settings.Kappa;
            double current = ErrorOf(zero);
            if (current < best)
            {
                best = current;
                bestZero.copy_(zero);
            }
            else
            {
                break;
            }
        }

        // Scales and zero points are kept as float16 (as the file stores them), the zero point shifted to the signed
        // levels first, and the levels are rounded again on the grid they define.
        int offset = 1 << (bits - 1);
        using var offsetScalar = offset.ToScalar();
        var stored = scale.reciprocal().mul(KeptScalars.One).to(ScalarType.Float16).to(ScalarType.Float32);
        var storedZero = bestZero.sub(offsetScalar).to(ScalarType.Float16).to(ScalarType.Float32);
        var levels = (w / stored).Plus(storedZero).Plus(offsetScalar).round().clamp(zeroScalar, topScalar);
        double final = (w - ((levels.sub(offsetScalar) - storedZero) * stored)).abs().mean().item<float>();
        return (levels.MoveToOuterDisposeScope(), stored.flatten().MoveToOuterDisposeScope(), storedZero.flatten().MoveToOuterDisposeScope(), initial, final);
    }
}
