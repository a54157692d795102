using System.Buffers.Binary;
using System.Collections;
using System.IO.Compression;
using System.Text;
using static TorchSharp.torch;

namespace ModelCompression.Interop.PyTorch;

/// <summary>
/// Reads the two formats' tensors with TorchSharp.PyBridge, in file order. The files are checked here first (the zip
/// archive and its pickle entry, the safetensors header) so that a bad file gets a message about the file rather than
/// PyBridge's; whatever PyBridge still throws becomes an <see cref="InvalidDataException"/> naming the file.
/// </summary>
internal static class StateDictReaders
{
    private const string PickleName = "data.pkl";

    /// <summary>The storage types TorchSharp.PyBridge reads (PyTorch's legacy typed storage names, as torch.save still writes them).</summary>
    private static readonly string[] SupportedStorages =
    [
        "DoubleStorage", "FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "IntStorage", "ShortStorage",
        "CharStorage", "ByteStorage", "BoolStorage", "ComplexDoubleStorage", "ComplexFloatStorage",
    ];

    /// <summary>Reads a PyTorch zip file's state_dict.</summary>
    /// <param name="stream">A seekable stream holding the file from position 0.</param>
    /// <param name="source">The file, for messages.</param>
    /// <returns>The tensors by key, in the order the pickle holds them.</returns>
    public static List<(string Key, Tensor Tensor)> ReadPyTorch(Stream stream, string source)
    {
        byte[] pickle = ReadPickle(stream, source);
        var unsupported = StorageTypes(pickle).Except(SupportedStorages, StringComparer.Ordinal).ToList();
        if (unsupported.Count > 0)
        {
            throw new InvalidDataException(
                $"{source} holds tensors of storage type {string.Join(", ", unsupported.Select(u => $"torch.{u}"))}, which cannot be read here (supported: {string.Join(", ", SupportedStorages)}).");
        }

        stream.Position = 0;
        Hashtable table;
        try
        {
            table = TorchSharp.PyBridge.PyTorchUnpickler.UnpickleStateDict(stream, leaveOpen: true, skipTensorRead: false);
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            // PyBridge reports bad data with whatever the pickle library or a cast throws (NotImplementedException,
            // InvalidCastException and the pickle library's PickleException among them): each means the file could
            // not be read.
            throw new InvalidDataException($"{source} could not be read as a PyTorch state_dict: {ex.Message}", ex);
        }

        var tensors = new List<(string Key, Tensor Tensor)>(table.Count);
        var wrong = new List<string>();
        foreach (DictionaryEntry entry in table)
        {
            if (entry.Key is string key && entry.Value is Tensor tensor)
            {
                tensors.Add((key, tensor));
            }
            else
            {
                wrong.Add($"'{entry.Key}' ({entry.Value?.GetType().Name ?? "None"})");
            }
        }

        if (wrong.Count > 0)
        {
            throw new InvalidDataException(
                $"{source} does not hold a bare state_dict: its entries {string.Join(", ", wrong)} are not tensors. A training checkpoint holding a state_dict and more must be re-saved as the state_dict alone.");
        }

        var order = KeyPositions(pickle, tensors.Select(t => t.Key));
        return tensors.OrderBy(t => order.GetValueOrDefault(t.Key, int.MaxValue)).ThenBy(t => t.Key, StringComparer.Ordinal).ToList();
    }

    /// <summary>Reads a safetensors file's tensors.</summary>
    /// <param name="stream">A seekable stream holding the file from position 0.</param>
    /// <param name="source">The file, for messages.</param>
    /// <returns>The tensors by key, in data order.</returns>
    public static List<(string Key, Tensor Tensor)> ReadSafetensors(Stream stream, string source)
    {
        var order = SafetensorsHeader.Read(stream, source);
        stream.Position = 0;
        Dictionary<string, Tensor> tensors;
        try
        {
            tensors = TorchSharp.PyBridge.Safetensors.LoadStateDict(stream, leaveOpen: true, keysToKeep: null);
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            throw new InvalidDataException($"{source} could not be read as a safetensors file: {ex.Message}", ex);
        }

        var result = new List<(string Key, Tensor Tensor)>(order.Count);
        foreach (string key in order)
        {
            result.Add((key, tensors.TryGetValue(key, out var tensor) ? tensor : throw new InvalidDataException($"{source} could not be read as a safetensors file: the reader returned no tensor '{key}'.")));
        }

        return result;
    }

    /// <summary>Opens the zip archive, checks it is a torch.save archive of little-endian data, and returns its pickle.</summary>
    private static byte[] ReadPickle(Stream stream, string source)
    {
        ZipArchive zip;
        List<ZipArchiveEntry> pickles;
        try
        {
            zip = new ZipArchive(stream, ZipArchiveMode.Read, leaveOpen: true);
        }
        catch (InvalidDataException ex)
        {
            throw Invalid(source, $"it is not a readable zip archive ({ex.Message})", ex);
        }

        using (zip)
        {
            try
            {
                pickles = zip.Entries.Where(e => e.FullName == PickleName || e.FullName.EndsWith("/" + PickleName, StringComparison.Ordinal)).ToList();
            }
            catch (InvalidDataException ex)
            {
                throw Invalid(source, $"its zip directory is corrupt ({ex.Message})", ex);
            }

            if (pickles.Count != 1)
            {
                throw Invalid(source, pickles.Count == 0
                    ? $"the zip archive has no {PickleName} (it was not written by torch.save)"
                    : $"the zip archive has {pickles.Count} {PickleName} entries");
            }

            string prefix = pickles[0].FullName[..^PickleName.Length];
            if (zip.GetEntry(prefix + "byteorder") is { } byteorder)
            {
                string order = Encoding.ASCII.GetString(ReadEntry(byteorder, 16, source)).Trim();
                if (order != "little")
                {
                    throw Invalid(source, $"its tensors are stored '{order}'-endian; only little-endian files are supported");
                }
            }

            return ReadEntry(pickles[0], Array.MaxLength, source);
        }
    }

    private static byte[] ReadEntry(ZipArchiveEntry entry, long limit, string source)
    {
        if (entry.Length > limit)
        {
            throw Invalid(source, $"its entry '{entry.FullName}' is {entry.Length} bytes, more than the {limit} expected");
        }

        var bytes = new byte[entry.Length];
        try
        {
            using var data = entry.Open();
            data.ReadExactly(bytes);
        }
        catch (Exception ex) when (ex is InvalidDataException or EndOfStreamException)
        {
            throw Invalid(source, $"its entry '{entry.FullName}' cannot be read ({ex.Message})", ex);
        }

        return bytes;
    }

    /// <summary>
    /// Finds where each key is first written in the pickle, which is the state_dict's order (pickle writes an
    /// OrderedDict's items in order). PyBridge returns an unordered table, so the order is recovered by looking for each
    /// key as pickle encodes a string: BINUNICODE (<c>X</c>, 4-byte length) or SHORT_BINUNICODE (<c>0x8C</c>, 1-byte
    /// length) followed by its UTF-8 bytes.
    /// </summary>
    /// <param name="pickle">The pickle.</param>
    /// <param name="keys">The state_dict's keys.</param>
    /// <returns>The offset where each key found is first written.</returns>
    internal static Dictionary<string, int> KeyPositions(byte[] pickle, IEnumerable<string> keys)
    {
        var wanted = new HashSet<string>(keys, StringComparer.Ordinal);
        var lengths = new HashSet<int>(wanted.Select(Encoding.UTF8.GetByteCount));
        var positions = new Dictionary<string, int>(StringComparer.Ordinal);
        for (int i = 0; i < pickle.Length && positions.Count < wanted.Count; i++)
        {
            long length;
            int start;
            if (pickle[i] == (byte)'X' && pickle.Length - i >= 5)
            {
                length = BinaryPrimitives.ReadUInt32LittleEndian(pickle.AsSpan(i + 1));
                start = i + 5;
            }
            else if (pickle[i] == 0x8C && pickle.Length - i >= 2)
            {
                length = pickle[i + 1];
                start = i + 2;
            }
            else
            {
                continue;
            }

            if (length <= pickle.Length - start && lengths.Contains((int)length))
            {
                string candidate = Encoding.UTF8.GetString(pickle, start, (int)length);
                if (wanted.Contains(candidate))
                {
                    positions.TryAdd(candidate, i);
                }
            }
        }

        return positions;
    }

    /// <summary>The storage types the pickle names, from its GLOBAL opcodes <c>c torch\n XxxStorage\n</c> (torch.save pickles at protocol 2).</summary>
    internal static IEnumerable<string> StorageTypes(byte[] pickle)
    {
        var global = "ctorch\n"u8;
        var types = new HashSet<string>(StringComparer.Ordinal);
        var rest = pickle.AsSpan();
        for (int at = rest.IndexOf(global); at >= 0; at = rest.IndexOf(global))
        {
            rest = rest[(at + global.Length)..];
            int end = rest.IndexOf((byte)'\n');
            if (end < 0)
            {
                break;
            }

            string name = Encoding.ASCII.GetString(rest[..end]);
            if (name.EndsWith("Storage", StringComparison.Ordinal))
            {
                types.Add(name);
            }
        }

        return types;
    }

    private static InvalidDataException Invalid(string source, string message, Exception? inner = null) =>
        new($"{source} is not a valid PyTorch file: {message}.", inner);
}
