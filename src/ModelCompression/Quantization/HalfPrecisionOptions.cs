using ModelCompression.Modules;

namespace ModelCompression.Quantization;

/// <summary>The 16-bit floating-point formats weights can be stored in.</summary>
public enum HalfPrecisionFormat
{
    /// <summary>bfloat16: fp32's 8-bit exponent with a 7-bit mantissa. Same range as fp32; fast on CPUs with AVX-512 BF16.</summary>
    BFloat16,

    /// <summary>IEEE 754 binary16: 5-bit exponent, 10-bit mantissa. More precise than bf16, smaller range (±65,504).</summary>
    Float16,
}

/// <summary>Options of <see cref="HalfPrecisionStep"/>.</summary>
public sealed class HalfPrecisionOptions : IValidatableOptions
{
    /// <summary>Gets or sets the format.</summary>
    /// <value>The default is <see cref="HalfPrecisionFormat.BFloat16"/>.</value>
    public HalfPrecisionFormat Format { get; set; } = HalfPrecisionFormat.BFloat16;

    /// <summary>Gets or sets the layers to convert.</summary>
    /// <value>The default is every Linear and Conv2d layer.</value>
    public LayerSelection Layers { get; set; } = LayerSelection.Default;

    /// <summary>
    /// Gets or sets what happens to a selected layer that a <see cref="HalfPrecisionLayer"/> cannot replace (its parent
    /// holds it in a field typed <c>Linear</c> or <c>Conv2d</c>). <see cref="FixedTypeLayers.CompressInPlace"/> keeps
    /// the layer, in float32, with its parameters rounded to the 16-bit values (the file then stores them in 2 bytes
    /// each; its input is not cast to 16 bits, as a converted layer's is).
    /// </summary>
    /// <value>The default is <see cref="FixedTypeLayers.CompressInPlace"/>.</value>
    public FixedTypeLayers FixedTypeLayers { get; set; } = FixedTypeLayers.CompressInPlace;

    /// <inheritdoc/>
    public IReadOnlyList<string> Validate()
    {
        var errors = new List<string>();
        if (!Enum.IsDefined(Format))
        {
            errors.Add($"{nameof(HalfPrecisionOptions)}.{nameof(Format)} is not a known format (was {(int)Format}).");
        }

        if (!Enum.IsDefined(FixedTypeLayers))
        {
            errors.Add($"{nameof(HalfPrecisionOptions)}.{nameof(FixedTypeLayers)} is not a known choice (was {(int)FixedTypeLayers}).");
        }

        OptionsValidationException.AddNested(errors, nameof(HalfPrecisionOptions), nameof(Layers), Layers?.Validate());

        return errors;
    }

    internal HalfPrecisionOptions Clone() => new() { Format = Format, Layers = Layers.Copy(), FixedTypeLayers = FixedTypeLayers };
}
