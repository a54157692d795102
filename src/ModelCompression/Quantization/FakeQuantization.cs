using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Quantization;

/// <summary>
/// Differentiable fake quantization for quantization-aware training: the forward pass rounds to the integer grid
/// the kernel will use; the backward pass is the straight-through estimator (gradient 1 inside the clamping range,
/// 0 outside). Built from TorchSharp ops with the <c>x + (q − x).detach()</c> construction, since the C# API's
/// <c>fake_quantize_*</c> functions cannot be called.
/// </summary>
public static class FakeQuantization
{
    /// <summary>
    /// Fake-quantizes <paramref name="x"/> to levels [<paramref name="qmin"/>, <paramref name="qmax"/>] with a fixed
    /// scale and zero point: out = (clamp(round(x / s) + z, qmin, qmax) − z) · s.
    /// </summary>
    /// <param name="x">The values.</param>
    /// <param name="scale">The scale: a scalar tensor or one broadcastable against <paramref name="x"/> (per channel).</param>
    /// <param name="zeroPoint">The zero point (a level).</param>
    /// <param name="qmin">The lowest level.</param>
    /// <param name="qmax">The highest level.</param>
    /// <returns>The fake-quantized values; gradient 1 where x is inside the range, 0 outside; none to the scale.</returns>
    /// <remarks>
    /// A scale of zero (the scale of an all-zero row, channel or group, or one rounded to zero in float16) is taken as
    /// 1, so zeros quantize to zero instead of 0 / 0.
    /// </remarks>
    public static Tensor WithFixedScale(Tensor x, Tensor scale, double zeroPoint, int qmin, int qmax)
    {
        ArgumentNullException.ThrowIfNull(x);
        ArgumentNullException.ThrowIfNull(scale);
        using var scope = NewDisposeScope();
        using var zero = 0.ToScalar();
        using var lowest = (qmin - zeroPoint).ToScalar();
        using var highest = (qmax - zeroPoint).ToScalar();
        using var z = zeroPoint.ToScalar();
        using var levelMin = qmin.ToScalar();
        using var levelMax = qmax.ToScalar();
        var detached = scale.detach();
        var s = where(detached == zero, ones_like(detached), detached);
        var low = s.mul(lowest);
        var high = s.mul(highest);
        var clipped = x.clamp(low, high);
        var levels = (clipped / s).round().Plus(z);
        var quantized = (levels.clamp(levelMin, levelMax) - z) * s;
        return clipped.Plus((quantized - clipped).detach()).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Learned step size quantization (Esser et al. 2020): like <see cref="WithFixedScale"/>, but the scale is a
    /// trained parameter whose gradient is scaled by <paramref name="gradientScale"/> (the paper uses
    /// 1 / √(elements · qmax)).
    /// </summary>
    /// <param name="x">The values.</param>
    /// <param name="scale">The trained scale (positive), scalar or broadcastable per channel.</param>
    /// <param name="zeroPoint">The zero point (a level).</param>
    /// <param name="qmin">The lowest level.</param>
    /// <param name="qmax">The highest level.</param>
    /// <param name="gradientScale">The factor applied to the scale's gradient.</param>
    /// <returns>The fake-quantized values; gradients flow to <paramref name="x"/> (inside the range) and to the scale.</returns>
    public static Tensor WithLearnedScale(Tensor x, Tensor scale, double zeroPoint, int qmin, int qmax, double gradientScale)
    {
        ArgumentNullException.ThrowIfNull(x);
        ArgumentNullException.ThrowIfNull(scale);
        using var scope = NewDisposeScope();

        using var factor = gradientScale.ToScalar();
        using var z = zeroPoint.ToScalar();
        using var levelMin = qmin.ToScalar();
        using var levelMax = qmax.ToScalar();

        // Same value as the scale, gradient multiplied by gradientScale.
        var scaled = scale.mul(factor);
        var s = (scale - scaled).detach().Plus(scaled);
        var v = (x / s).Plus(z).clamp(levelMin, levelMax);
        var rounded = v.Plus((v.round() - v).detach());
        return ((rounded - z) * s).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Binary weights (BinaryConnect / XNOR-Net): sign(w) · α with α the mean magnitude per output channel (dim 0);
    /// the gradient passes where |w| ≤ 1 and is 0 elsewhere.
    /// </summary>
    /// <param name="weight">The weight, output channels first.</param>
    /// <returns>The binarized weight.</returns>
    public static Tensor Binary(Tensor weight)
    {
        ArgumentNullException.ThrowIfNull(weight);
        using var scope = NewDisposeScope();
        var dims = Enumerable.Range(1, (int)weight.dim() - 1).Select(d => (long)d).ToArray();
        var alpha = (dims.Length == 0 ? weight.abs() : weight.abs().mean(dims, keepdim: true)).detach();
        using var zero = 0.ToScalar();
        using var minusOne = (-1).ToScalar();
        using var one = 1.ToScalar();
        var sign = where(weight >= zero, ones_like(weight), -ones_like(weight));
        var clipped = weight.clamp(minusOne, one);
        return clipped.Plus(((sign * alpha) - clipped).detach()).MoveToOuterDisposeScope();
    }
}
