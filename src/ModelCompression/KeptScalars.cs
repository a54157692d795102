using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression;

/// <summary>
/// Tensor additions whose Scalars live through the native call, for code that must not race TorchSharp's finalizers.
/// </summary>
/// <remarks>
/// <para>
/// A TorchSharp 0.107 <see cref="Scalar"/> frees its native object in its finalizer, and TorchSharp's methods do not
/// keep a Scalar argument alive while LibTorch reads it. A temporary Scalar — a number converted implicitly, or the
/// alpha of 1 that <c>Tensor.add(Tensor)</c> and the <c>+</c> operator make — can therefore be finalized by a
/// collection on another thread in the middle of the call; LibTorch then reads freed memory ("Unknown scalar type",
/// "Expected false to be true", a crash, or a silently wrong number). A child-process job that steps TorchSharp's own
/// SGD while another thread collects dies within two seconds.
/// </para>
/// <para>
/// The library's code therefore holds every Scalar it passes: numbers as <c>using var s = value.ToScalar();</c> locals
/// (the same Scalar type the implicit conversion makes, so results are bitwise unchanged), and additions through
/// <see cref="Plus(Tensor, Tensor)"/> and its siblings, which pass <see cref="One"/>, a Scalar held for the life of the
/// process. The build enforces it: the repository's analyzer (MC0001) reports any Scalar that nothing holds.
/// </para>
/// </remarks>
internal static class KeptScalars
{
    /// <summary>The integer 1 that TorchSharp passes as the scale of an addition; held for the process.</summary>
    public static readonly Scalar One = 1.ToScalar();

    /// <summary>The integer 0 (the start TorchSharp passes for a range); held for the process.</summary>
    public static readonly Scalar Zero = 0.ToScalar();

    /// <summary>0, 1, …, <paramref name="count"/> − 1, as <c>torch.arange(count)</c> makes them.</summary>
    public static Tensor Range(long count, ScalarType? dtype = null, Device? device = null)
    {
        using var stop = count.ToScalar();
        return arange(Zero, stop, One, dtype, device);
    }

    /// <summary><paramref name="left"/> + <paramref name="right"/>, as the <c>+</c> operator computes it.</summary>
    public static Tensor Plus(this Tensor left, Tensor right) => left.add(right, One);

    /// <summary><paramref name="left"/> + <paramref name="right"/> (a Scalar the caller holds).</summary>
    public static Tensor Plus(this Tensor left, Scalar right) => left.add(right, One);

    /// <summary>Adds <paramref name="right"/> to <paramref name="left"/> in place.</summary>
    public static Tensor PlusInPlace(this Tensor left, Tensor right) => left.add_(right, One);

    /// <summary><paramref name="left"/> − <paramref name="right"/> for a held Scalar on the left, as TorchSharp computes it.</summary>
    public static Tensor SubtractedFrom(this Tensor right, Scalar left) => right.negative().add(left, One);
}
