using System.Collections;

namespace ModelCompression.Modules;

/// <summary>
/// The settings of one layer by name (its constructor's arguments, as a <see cref="LayerDescriptor"/> reads them): what
/// a copy is built from and what the compressed file stores for the layer besides its tensors. Values are whole
/// numbers, real numbers, booleans, strings or arrays of whole numbers; names are case-sensitive.
/// </summary>
public sealed class LayerAttributes : IEnumerable<KeyValuePair<string, object>>
{
    /// <summary>The most attributes one layer may have (a bound the file reader enforces).</summary>
    public const int MaxCount = 256;

    private readonly SortedDictionary<string, object> _values = new(StringComparer.Ordinal);

    /// <summary>Gets the number of attributes.</summary>
    public int Count => _values.Count;

    /// <summary>Sets a whole-number attribute.</summary>
    /// <param name="name">The attribute's name.</param>
    /// <param name="value">The value.</param>
    /// <returns>This object, for chaining.</returns>
    public LayerAttributes Set(string name, long value) => Put(name, value);

    /// <summary>Sets a real-number attribute; it must be finite.</summary>
    /// <param name="name">The attribute's name.</param>
    /// <param name="value">The value.</param>
    /// <returns>This object, for chaining.</returns>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="value"/> is NaN or infinite.</exception>
    public LayerAttributes Set(string name, double value) =>
        double.IsFinite(value) ? Put(name, value) : throw new ArgumentOutOfRangeException(nameof(value), value, $"Attribute '{name}' must be finite.");

    /// <summary>Sets a boolean attribute.</summary>
    /// <param name="name">The attribute's name.</param>
    /// <param name="value">The value.</param>
    /// <returns>This object, for chaining.</returns>
    public LayerAttributes Set(string name, bool value) => Put(name, value);

    /// <summary>Sets a string attribute.</summary>
    /// <param name="name">The attribute's name.</param>
    /// <param name="value">The value.</param>
    /// <returns>This object, for chaining.</returns>
    public LayerAttributes Set(string name, string value)
    {
        ArgumentNullException.ThrowIfNull(value);
        return Put(name, value);
    }

    /// <summary>Sets an attribute that is an array of whole numbers (a shape, kernel sizes, strides).</summary>
    /// <param name="name">The attribute's name.</param>
    /// <param name="value">The value; it is copied.</param>
    /// <returns>This object, for chaining.</returns>
    public LayerAttributes Set(string name, IReadOnlyList<long> value)
    {
        ArgumentNullException.ThrowIfNull(value);
        return Put(name, value.ToArray());
    }

    /// <summary>Says whether an attribute is present.</summary>
    /// <param name="name">The attribute's name.</param>
    /// <returns><see langword="true"/> when it is present.</returns>
    public bool Contains(string name) => _values.ContainsKey(name);

    /// <summary>Gets a whole-number attribute.</summary>
    /// <param name="name">The attribute's name.</param>
    /// <returns>The value.</returns>
    /// <exception cref="InvalidDataException">The attribute is missing or of another type (a file that does not match its layer kind).</exception>
    public long GetInt64(string name) => Get<long>(name);

    /// <summary>Gets a real-number attribute (a whole-number one is converted).</summary>
    /// <param name="name">The attribute's name.</param>
    /// <returns>The value.</returns>
    /// <exception cref="InvalidDataException">The attribute is missing or of another type.</exception>
    public double GetDouble(string name) => _values.TryGetValue(name, out var v) && v is long l ? l : Get<double>(name);

    /// <summary>Gets a boolean attribute.</summary>
    /// <param name="name">The attribute's name.</param>
    /// <returns>The value.</returns>
    /// <exception cref="InvalidDataException">The attribute is missing or of another type.</exception>
    public bool GetBoolean(string name) => Get<bool>(name);

    /// <summary>Gets a string attribute.</summary>
    /// <param name="name">The attribute's name.</param>
    /// <returns>The value.</returns>
    /// <exception cref="InvalidDataException">The attribute is missing or of another type.</exception>
    public string GetString(string name) => Get<string>(name);

    /// <summary>Gets an attribute that is an array of whole numbers.</summary>
    /// <param name="name">The attribute's name.</param>
    /// <returns>A copy of the value.</returns>
    /// <exception cref="InvalidDataException">The attribute is missing or of another type.</exception>
    public long[] GetInt64Array(string name) => Get<long[]>(name).ToArray();

    /// <summary>Gets a whole-number attribute and checks it lies in a range, as a file's values must before a layer is built from them.</summary>
    /// <param name="name">The attribute's name.</param>
    /// <param name="min">The smallest value allowed.</param>
    /// <param name="max">The largest value allowed.</param>
    /// <returns>The value.</returns>
    /// <exception cref="InvalidDataException">The attribute is missing, of another type, or out of range.</exception>
    public long GetInt64(string name, long min, long max)
    {
        long v = GetInt64(name);
        return v >= min && v <= max ? v : throw new InvalidDataException($"Layer attribute '{name}' is {v}, outside {min}..{max}.");
    }

    /// <inheritdoc/>
    public IEnumerator<KeyValuePair<string, object>> GetEnumerator() => _values.GetEnumerator();

    /// <inheritdoc/>
    IEnumerator IEnumerable.GetEnumerator() => GetEnumerator();

    /// <summary>Says whether two sets of attributes hold the same names and values.</summary>
    /// <param name="other">The other attributes.</param>
    /// <returns><see langword="true"/> when they are equal.</returns>
    public bool SameAs(LayerAttributes other)
    {
        ArgumentNullException.ThrowIfNull(other);
        return Count == other.Count && _values.All(kv => other._values.TryGetValue(kv.Key, out var o) && Equal(kv.Value, o));
    }

    /// <inheritdoc/>
    public override string ToString() =>
        string.Join(", ", _values.Select(kv => $"{kv.Key}={(kv.Value is long[] a ? $"[{string.Join(", ", a)}]" : kv.Value)}"));

    private static bool Equal(object a, object b) => a is long[] x && b is long[] y ? x.SequenceEqual(y) : a.Equals(b);

    private LayerAttributes Put(string name, object value)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        if (!_values.ContainsKey(name) && _values.Count >= MaxCount)
        {
            throw new InvalidOperationException($"A layer has at most {MaxCount} attributes.");
        }

        _values[name] = value;
        return this;
    }

    private T Get<T>(string name) =>
        _values.TryGetValue(name, out var v)
            ? v is T t ? t : throw new InvalidDataException($"Layer attribute '{name}' is a {v.GetType().Name}, not a {typeof(T).Name}.")
            : throw new InvalidDataException($"Layer attribute '{name}' is missing.");
}
