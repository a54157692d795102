using System.Text.RegularExpressions;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Modules;

/// <summary>
/// Says which layers a step compresses, separately from how: by module type, by dotted name (as
/// <c>named_modules()</c> gives it), by glob pattern (<c>*</c> and <c>?</c>), minus exclusions, and an optional filter.
/// Every step uses this one type.
/// </summary>
/// <example><code>
/// var layers = LayerSelection.OfType&lt;Linear&gt;().Except("classifier.*");
/// </code></example>
public sealed class LayerSelection
{
    /// <summary>Gets the module types selected; a layer must be of one of them.</summary>
    /// <value>The default is <see cref="Linear"/> and <see cref="Conv2d"/>.</value>
    public IList<Type> Types { get; init; } = [typeof(Linear), typeof(Conv2d)];

    /// <summary>Gets the names or glob patterns a layer's dotted name must match; empty selects every layer of the types.</summary>
    public IList<string> Include { get; init; } = [];

    /// <summary>Gets the names or glob patterns of layers never selected.</summary>
    public IList<string> Exclude { get; init; } = [];

    /// <summary>Gets or sets an extra filter on (dotted name, module); <see langword="null"/> for none.</summary>
    public Func<string, nn.Module, bool>? Filter { get; init; }

    /// <summary>Selects every <see cref="Linear"/> and <see cref="Conv2d"/> layer.</summary>
    public static LayerSelection Default => new();

    /// <summary>Selects every layer of type <typeparamref name="T"/>.</summary>
    /// <typeparam name="T">The module type.</typeparam>
    /// <returns>A new selection.</returns>
    public static LayerSelection OfType<T>()
        where T : nn.Module => new() { Types = [typeof(T)] };

    /// <summary>Selects the layers with the given names or glob patterns (of the default types).</summary>
    /// <param name="namesOrPatterns">Dotted names or patterns, e.g. <c>fc1</c> or <c>features.*</c>.</param>
    /// <returns>A new selection.</returns>
    public static LayerSelection Named(params string[] namesOrPatterns) => new() { Include = [.. namesOrPatterns] };

    /// <summary>Returns a copy of this selection that also excludes the given names or patterns.</summary>
    /// <param name="namesOrPatterns">Dotted names or patterns to exclude.</param>
    /// <returns>A new selection.</returns>
    public LayerSelection Except(params string[] namesOrPatterns) =>
        new() { Types = [.. Types], Include = [.. Include], Exclude = [.. Exclude, .. namesOrPatterns], Filter = Filter };

    /// <summary>Returns a copy whose lists are independent of this selection's (options copy it so later changes do not leak in).</summary>
    /// <returns>A new selection.</returns>
    public LayerSelection Copy() => new() { Types = [.. Types], Include = [.. Include], Exclude = [.. Exclude], Filter = Filter };

    /// <summary>Returns whether a layer is selected.</summary>
    /// <param name="name">The layer's dotted name.</param>
    /// <param name="module">The layer.</param>
    /// <returns><see langword="true"/> when selected.</returns>
    public bool Matches(string name, nn.Module module)
    {
        ArgumentNullException.ThrowIfNull(name);
        ArgumentNullException.ThrowIfNull(module);
        return Types.Any(t => t.IsInstanceOfType(module))
            && (Include.Count == 0 || Include.Any(p => Glob(p, name)))
            && !Exclude.Any(p => Glob(p, name))
            && (Filter is null || Filter(name, module));
    }

    /// <summary>Returns the selected layers of a model, in <c>named_modules()</c> order.</summary>
    /// <param name="model">The model.</param>
    /// <returns>The selected (name, module) pairs.</returns>
    public IReadOnlyList<(string Name, nn.Module Module)> Select(nn.Module model)
    {
        ArgumentNullException.ThrowIfNull(model);
        return model.named_modules().Where(m => Matches(m.name, m.module)).Select(m => (m.name, m.module)).ToList();
    }

    /// <summary>Lists problems with the selection itself (not with any model).</summary>
    /// <returns>One message per problem.</returns>
    public IReadOnlyList<string> Validate()
    {
        var errors = new List<string>();
        if (Types is null || Types.Count == 0)
        {
            errors.Add($"{nameof(LayerSelection)}.{nameof(Types)} must name at least one module type.");
        }
        else if (Types.Any(t => t is null || !typeof(nn.Module).IsAssignableFrom(t)))
        {
            errors.Add($"{nameof(LayerSelection)}.{nameof(Types)} may hold only module types.");
        }

        if (Include is null || Include.Any(string.IsNullOrWhiteSpace))
        {
            errors.Add($"{nameof(LayerSelection)}.{nameof(Include)} must not hold empty names.");
        }

        if (Exclude is null || Exclude.Any(string.IsNullOrWhiteSpace))
        {
            errors.Add($"{nameof(LayerSelection)}.{nameof(Exclude)} must not hold empty names.");
        }

        return errors;
    }

    /// <summary>
    /// Lists the explicit (pattern-free) names in <see cref="Include"/> that name no layer of the model, so a typo is
    /// an error rather than a silent no-op.
    /// </summary>
    /// <param name="model">The model.</param>
    /// <returns>One message per unknown name.</returns>
    public IReadOnlyList<string> FindUnknownNames(nn.Module model)
    {
        ArgumentNullException.ThrowIfNull(model);
        var names = model.named_modules().Select(m => m.name).ToHashSet(StringComparer.Ordinal);
        return Include.Where(n => !n.Contains('*') && !n.Contains('?') && !names.Contains(n))
            .Select(n => $"The model has no layer named '{n}'.")
            .ToList();
    }

    /// <summary>Throws when <see cref="FindUnknownNames"/> finds any: a step calls this before it changes anything.</summary>
    /// <param name="model">The model.</param>
    /// <exception cref="ArgumentException">The selection names a layer the model does not have.</exception>
    public void ThrowIfUnknownNames(nn.Module model)
    {
        var unknown = FindUnknownNames(model);
        if (unknown.Count > 0)
        {
            throw new ArgumentException(string.Join(" ", unknown), nameof(model));
        }
    }

    private static bool Glob(string pattern, string name) =>
        pattern.Contains('*') || pattern.Contains('?')
            ? Regex.IsMatch(name, "^" + Regex.Escape(pattern).Replace("\\*", ".*", StringComparison.Ordinal).Replace("\\?", ".", StringComparison.Ordinal) + "$", RegexOptions.CultureInvariant)
            : string.Equals(pattern, name, StringComparison.Ordinal);

    /// <inheritdoc/>
    public override string ToString() =>
        $"types [{string.Join(", ", Types.Select(t => t.Name))}]" +
        (Include.Count > 0 ? $", include [{string.Join(", ", Include)}]" : string.Empty) +
        (Exclude.Count > 0 ? $", exclude [{string.Join(", ", Exclude)}]" : string.Empty);
}
