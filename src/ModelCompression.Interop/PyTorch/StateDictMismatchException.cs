using static TorchSharp.torch;

namespace ModelCompression.Interop.PyTorch;

/// <summary>A tensor whose shape in the file differs from the model's.</summary>
/// <param name="Name">The model's name for the tensor.</param>
/// <param name="FileKey">The tensor's key in the file.</param>
/// <param name="FileShape">The shape in the file.</param>
/// <param name="ModelShape">The shape in the model.</param>
public sealed record TensorShapeMismatch(string Name, string FileKey, IReadOnlyList<long> FileShape, IReadOnlyList<long> ModelShape);

/// <summary>A tensor whose dtype in the file differs from the model's and may not be converted.</summary>
/// <param name="Name">The model's name for the tensor.</param>
/// <param name="FileKey">The tensor's key in the file.</param>
/// <param name="FileDtype">The dtype in the file.</param>
/// <param name="ModelDtype">The dtype in the model.</param>
public sealed record TensorDtypeMismatch(string Name, string FileKey, ScalarType FileDtype, ScalarType ModelDtype);

/// <summary>
/// Thrown when a state_dict file does not fit the model it is loaded into. It lists every problem at once (missing and
/// unexpected keys, shape and dtype mismatches, NaN or infinite values) and is thrown before any of the model's tensors
/// changes.
/// </summary>
/// <remarks>
/// It is not an <see cref="InvalidDataException"/> (which is sealed, and which the import keeps for files that are
/// corrupt or unreadable), so a caller can tell a file that does not fit from a file that is broken.
/// </remarks>
public sealed class StateDictMismatchException : Exception
{
    /// <summary>Initializes a new instance of the <see cref="StateDictMismatchException"/> class.</summary>
    /// <param name="source">The file, quoted, or a description of the stream.</param>
    /// <param name="missing">The model's names that no file tensor maps to.</param>
    /// <param name="unexpected">The file keys that map to no model tensor.</param>
    /// <param name="shapeMismatches">The tensors whose shapes differ.</param>
    /// <param name="dtypeMismatches">The tensors whose dtypes differ and may not be converted.</param>
    /// <param name="nonFinite">The model's names of the tensors holding NaN or infinite values.</param>
    /// <param name="problems">Every problem as one line, those above included, plus any other (two file keys mapping to one name, counts that differ when matching by order).</param>
    public StateDictMismatchException(
        string source,
        IReadOnlyList<string> missing,
        IReadOnlyList<string> unexpected,
        IReadOnlyList<TensorShapeMismatch> shapeMismatches,
        IReadOnlyList<TensorDtypeMismatch> dtypeMismatches,
        IReadOnlyList<string> nonFinite,
        IReadOnlyList<string> problems)
        : base(BuildMessage(source, problems))
    {
        Origin = source;
        Missing = missing;
        Unexpected = unexpected;
        ShapeMismatches = shapeMismatches;
        DtypeMismatches = dtypeMismatches;
        NonFinite = nonFinite;
        Problems = problems;
    }

    /// <summary>Gets the file, quoted, or a description of the stream the state_dict came from.</summary>
    public string Origin { get; }

    /// <summary>Gets the model's names that no file tensor maps to, in <c>state_dict()</c> order.</summary>
    public IReadOnlyList<string> Missing { get; }

    /// <summary>Gets the file keys (as written in the file) that map to no model tensor, in file order.</summary>
    public IReadOnlyList<string> Unexpected { get; }

    /// <summary>Gets the tensors whose shapes differ, with both shapes.</summary>
    public IReadOnlyList<TensorShapeMismatch> ShapeMismatches { get; }

    /// <summary>Gets the tensors whose dtypes differ and may not be converted.</summary>
    public IReadOnlyList<TensorDtypeMismatch> DtypeMismatches { get; }

    /// <summary>Gets the model's names of the tensors whose values in the file (after any conversion) are NaN or infinite.</summary>
    public IReadOnlyList<string> NonFinite { get; }

    /// <summary>Gets every problem, one line each, as the message lists them.</summary>
    public IReadOnlyList<string> Problems { get; }

    private static string BuildMessage(string source, IReadOnlyList<string> problems) =>
        $"The state_dict in {source} does not fit the model; nothing was loaded. {problems.Count} problem{(problems.Count == 1 ? string.Empty : "s")}:" +
        string.Concat(problems.Select(p => Environment.NewLine + "  - " + p));
}
