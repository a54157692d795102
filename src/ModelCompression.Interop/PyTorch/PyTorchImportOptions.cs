namespace ModelCompression.Interop.PyTorch;

/// <summary>
/// Options of <see cref="PyTorchImport.LoadStateDict(TorchSharp.torch.nn.Module, string, PyTorchImportOptions?)"/>: how the
/// file's tensor names map onto the model's <c>state_dict()</c> names, and how strict the match must be.
/// </summary>
/// <remarks>
/// Each file key is mapped in three stages, in this order: <see cref="StripPrefix"/>, then the longest matching prefix of
/// <see cref="Renames"/>, then <see cref="KeyMap"/>. Shape mismatches, dtype mismatches that may not be converted, and NaN
/// or infinite values are errors whatever these options say.
/// </remarks>
public sealed class PyTorchImportOptions
{
    /// <summary>
    /// Gets or sets a value indicating whether every model tensor must be in the file and every file tensor in the model.
    /// When <see langword="false"/>, model tensors the file lacks keep their values and file tensors the model lacks are
    /// ignored; both are listed in the <see cref="StateDictImportSummary"/>.
    /// </summary>
    /// <value>The default is <see langword="true"/>, as for PyTorch's <c>load_state_dict</c>.</value>
    public bool Strict { get; set; } = true;

    /// <summary>
    /// Gets or sets a prefix removed from every file key that starts with it (keys without it are kept as they are), such
    /// as <c>module.</c> in checkpoints saved from a <c>DataParallel</c> model, or <c>model.</c>.
    /// </summary>
    /// <value>The default is <see langword="null"/> (nothing removed). Must not be empty.</value>
    public string? StripPrefix { get; set; }

    /// <summary>
    /// Gets the prefix renames, file prefix to model prefix: a file key starting with a key of this dictionary has that
    /// prefix replaced (the longest matching one, once). Include the trailing dot, so that <c>1.</c> does not match
    /// <c>11.weight</c>. The usual case is a PyTorch <c>nn.Sequential</c>, whose children are named by index
    /// (<c>0.weight</c>), loaded into a TorchSharp <c>Sequential</c> with named layers: <c>["0."] = "conv1."</c>.
    /// </summary>
    /// <value>The default is empty. Keys must not be empty; values may be empty (the prefix is removed).</value>
    public IDictionary<string, string> Renames { get; } = new Dictionary<string, string>(StringComparer.Ordinal);

    /// <summary>
    /// Gets or sets a function applied last to each file key (after <see cref="StripPrefix"/> and <see cref="Renames"/>),
    /// returning the model's name for it, or <see langword="null"/> to skip the tensor (it is listed in
    /// <see cref="StateDictImportSummary.Skipped"/>).
    /// </summary>
    /// <value>The default is <see langword="null"/> (keys are used as they are).</value>
    public Func<string, string?>? KeyMap { get; set; }

    /// <summary>
    /// Gets or sets a value indicating whether, when the mapped file keys are not exactly the model's <c>state_dict()</c>
    /// keys, the file's tensors are paired with the model's by position instead: the first tensor in the file (in the
    /// order it was written) with the model's first, and so on, the model's taken in PyTorch's order (module by module,
    /// depth first, each module's parameters then its buffers; TorchSharp's own <c>state_dict()</c> lists every parameter
    /// before every buffer). The counts and every pair's shape must then agree, whatever <see cref="Strict"/> says.
    /// </summary>
    /// <value>The default is <see langword="false"/>.</value>
    /// <remarks>
    /// This suits a PyTorch <c>nn.Sequential</c> (numeric names) loaded into a TorchSharp <c>Sequential</c> of the same
    /// layers with other names, and custom modules whose children are declared in the same order as in the PyTorch
    /// class. Shapes are the only check, so two tensors of equal shape stored in another order would be swapped
    /// silently: prefer <see cref="Renames"/> when the orders might differ. A safetensors file's order is its data order,
    /// which writers usually sort by name, so this rarely suits safetensors files.
    /// </remarks>
    public bool MatchByOrder { get; set; }

    /// <summary>
    /// Gets or sets a value indicating whether a floating-point tensor of another floating-point dtype than the model's
    /// (float64, float32, float16, bfloat16) is converted to the model's dtype. Narrowing conversions round (float64 to
    /// float32, for example); a value that overflows to infinity is then rejected as non-finite. Integer and boolean
    /// tensors must always match the model's dtype exactly.
    /// </summary>
    /// <value>The default is <see langword="true"/>.</value>
    public bool AllowDtypeConversion { get; set; } = true;

    /// <summary>The default of <see cref="MaxDecodedBytes"/>: 16 GiB.</summary>
    public const long DefaultMaxDecodedBytes = 16L << 30;

    /// <summary>The default of <see cref="MaxDecodedBytesPerFileByte"/>: 64.</summary>
    public const int DefaultMaxDecodedBytesPerFileByte = 64;

    /// <summary>
    /// Gets or sets the most bytes one import may decode, whatever the file's size: the pickle and storages a PyTorch
    /// file's zip entries inflate to, the tensors its pickle builds from them, or a safetensors file's data. A file that
    /// needs more is rejected with an <see cref="InvalidDataException"/> before its tensors are read. A stream that cannot
    /// seek is copied into memory first, and no more than this is copied.
    /// </summary>
    /// <value>The default is <see cref="DefaultMaxDecodedBytes"/> (16 GiB). Must be positive.</value>
    public long MaxDecodedBytes { get; set; } = DefaultMaxDecodedBytes;

    /// <summary>
    /// Gets or sets the most bytes one import may decode per byte of the file, which bounds a file that inflates far
    /// beyond its size (a zip bomb, or storages shared by many tensors). <c>torch.save</c> stores its entries uncompressed
    /// and safetensors is never compressed, so a genuine file decodes to about its own size; tensors sharing one storage
    /// (tied weights) count once per tensor. The bound used is the smaller of this times the file's length and
    /// <see cref="MaxDecodedBytes"/>.
    /// </summary>
    /// <value>The default is <see cref="DefaultMaxDecodedBytesPerFileByte"/> (64). Must be at least 1.</value>
    public int MaxDecodedBytesPerFileByte { get; set; } = DefaultMaxDecodedBytesPerFileByte;

    /// <summary>Lists every invalid value.</summary>
    /// <returns>One message per invalid value.</returns>
    public IReadOnlyList<string> Validate()
    {
        var errors = new List<string>();
        if (StripPrefix is { Length: 0 })
        {
            errors.Add($"{nameof(PyTorchImportOptions)}.{nameof(StripPrefix)} must not be empty (use null to remove nothing).");
        }

        foreach (var (from, to) in Renames)
        {
            if (from.Length == 0)
            {
                errors.Add($"{nameof(PyTorchImportOptions)}.{nameof(Renames)} has an empty prefix; every file key would match it.");
            }

            if (to is null)
            {
                errors.Add($"{nameof(PyTorchImportOptions)}.{nameof(Renames)}['{from}'] is null (use an empty string to remove the prefix).");
            }
        }

        if (MaxDecodedBytes <= 0)
        {
            errors.Add($"{nameof(PyTorchImportOptions)}.{nameof(MaxDecodedBytes)} must be positive, but is {MaxDecodedBytes}.");
        }

        if (MaxDecodedBytesPerFileByte < 1)
        {
            errors.Add($"{nameof(PyTorchImportOptions)}.{nameof(MaxDecodedBytesPerFileByte)} must be at least 1, but is {MaxDecodedBytesPerFileByte}.");
        }

        return errors;
    }

    /// <summary>The most bytes an import of a file of <paramref name="fileBytes"/> bytes may decode, and why, for messages.</summary>
    internal DecodeLimit LimitFor(long fileBytes)
    {
        long proportional = fileBytes <= MaxDecodedBytes / MaxDecodedBytesPerFileByte ? fileBytes * MaxDecodedBytesPerFileByte : MaxDecodedBytes;
        return proportional < MaxDecodedBytes
            ? new DecodeLimit(proportional, $"{MaxDecodedBytesPerFileByte} x the file's {fileBytes} bytes ({nameof(PyTorchImportOptions)}.{nameof(MaxDecodedBytesPerFileByte)})")
            : new DecodeLimit(MaxDecodedBytes, $"{nameof(PyTorchImportOptions)}.{nameof(MaxDecodedBytes)}");
    }

    /// <summary>Maps a file key to the model's name, or <see langword="null"/> to skip it.</summary>
    internal string? Map(string key)
    {
        if (StripPrefix is not null && key.StartsWith(StripPrefix, StringComparison.Ordinal))
        {
            key = key[StripPrefix.Length..];
        }

        string? longest = null;
        foreach (var from in Renames.Keys)
        {
            if (key.StartsWith(from, StringComparison.Ordinal) && (longest is null || from.Length > longest.Length))
            {
                longest = from;
            }
        }

        if (longest is not null)
        {
            key = Renames[longest] + key[longest.Length..];
        }

        return KeyMap is null ? key : KeyMap(key);
    }
}

/// <summary>The most bytes one import may decode, and where the figure comes from (for messages).</summary>
/// <param name="Bytes">The bound.</param>
/// <param name="Reason">The option or proportion that set it.</param>
internal readonly record struct DecodeLimit(long Bytes, string Reason)
{
    /// <summary>Describes the bound, for messages.</summary>
    public override string ToString() => $"the {Bytes}-byte limit ({Reason})";
}
