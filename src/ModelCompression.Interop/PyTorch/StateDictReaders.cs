using System.Buffers;
using System.Buffers.Binary;
using System.Collections;
using System.IO.Compression;
using System.Text;
using static TorchSharp.torch;

namespace ModelCompression.Interop.PyTorch;

/// <summary>
/// Reads the two formats' tensors with TorchSharp.PyBridge, in file order. The files are checked here first, as far as
/// they can be without making a tensor (the zip archive, its pickle, every storage against the bytes its entry really
/// inflates to, every tensor's view against its storage, the safetensors header against the data), with the decoded
/// size bounded, so that a bad file gets a message naming the file and the entry rather than PyBridge's, LibTorch's, or
/// an allocation out of proportion to the file; whatever PyBridge still throws becomes an
/// <see cref="InvalidDataException"/> naming the file.
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
    /// <param name="limit">The most bytes the import may decode.</param>
    /// <returns>The tensors by key, in the order the pickle holds them.</returns>
    public static List<(string Key, Tensor Tensor)> ReadPyTorch(Stream stream, string source, DecodeLimit limit)
    {
        // Everything PyBridge will read is checked first, without allocating a tensor: the pickle, every storage's size
        // against the bytes its entry really inflates to, and every tensor's view against its storage.
        var described = Inspect(stream, source, limit);
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

        var tensors = new List<(string Key, Tensor Tensor)>(described.Count);
        foreach (var expected in described)
        {
            tensors.Add((expected.Key, table[expected.Key] is Tensor tensor && tensor.shape.SequenceEqual(expected.Shape)
                ? tensor
                : throw Invalid(source, $"tensor '{expected.Key}' was not read as its pickle describes it")));
        }

        if (table.Count != described.Count)
        {
            throw Invalid(source, $"the reader returned {table.Count} entries where its pickle describes {described.Count} tensors");
        }

        return tensors;
    }

    /// <summary>
    /// Checks a PyTorch zip file as far as it can be checked without making a tensor, reading its entries with bounded
    /// memory, and returns the tensors its pickle describes, in order.
    /// </summary>
    private static List<PickledTensor> Inspect(Stream stream, string source, DecodeLimit limit)
    {
        ZipArchive zip;
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
            List<ZipArchiveEntry> entries;
            try
            {
                entries = zip.Entries.ToList();
            }
            catch (InvalidDataException ex)
            {
                throw Invalid(source, $"its zip directory is corrupt ({ex.Message})", ex);
            }

            // PyBridge reads the first entry whose name ends with data.pkl (by the default, culture-sensitive comparison,
            // which ignores some characters), so there must be exactly one such entry, and it is the one checked here.
            var pickles = entries.Where(e => e.Name.EndsWith(PickleName, StringComparison.CurrentCulture)).ToList();
            if (pickles.Count != 1 || pickles[0].Name != PickleName)
            {
                throw Invalid(source, pickles.Count switch
                {
                    0 => $"the zip archive has no {PickleName} (it was not written by torch.save)",
                    1 => $"the zip archive's pickle is named '{pickles[0].FullName}', not {PickleName}",
                    _ => $"the zip archive has {pickles.Count} entries named like {PickleName} ({string.Join(", ", pickles.Take(4).Select(p => $"'{p.FullName}'"))})",
                });
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

            byte[] pickle = ReadEntry(pickles[0], Math.Min(limit.Bytes, Array.MaxLength), source, limit);
            var unsupported = StorageTypes(pickle).Except(SupportedStorages, StringComparer.Ordinal).ToList();
            if (unsupported.Count > 0)
            {
                throw new InvalidDataException(
                    $"{source} holds tensors of storage type {string.Join(", ", unsupported.Select(u => $"torch.{u}"))}, which cannot be read here (supported: {string.Join(", ", SupportedStorages)}).");
            }

            string pickleName = pickles[0].FullName;
            var tensors = StateDictPickle.Read(pickle, message => Invalid(source, $"{message} (entry '{pickleName}')"));
            if (System.IO.Hashing.Crc32.HashToUInt32(pickle) != pickles[0].Crc32)
            {
                throw Invalid(source, $"its entry '{pickleName}' does not match its CRC-32 (it is corrupt, or its declared length is wrong)");
            }

            var storages = CheckStorages(tensors, entries, pickle.Length, source, limit);
            CheckViews(tensors, storages, source, limit);
            return tensors;
        }
    }

    /// <summary>
    /// Finds each storage's entry as PyBridge will, checks that its declared size is the storage's elements times their
    /// size and that the decoded total stays within the limit, then inflates each entry once, counting, to prove the
    /// bytes are really there (a zip entry's declared length can lie either way).
    /// </summary>
    /// <returns>Each storage key's element count.</returns>
    private static Dictionary<string, long> CheckStorages(List<PickledTensor> tensors, List<ZipArchiveEntry> entries, long pickleBytes, string source, DecodeLimit limit)
    {
        var storages = new Dictionary<string, (ZipArchiveEntry Entry, PickledTensor First)>(StringComparer.Ordinal);
        long decoded = pickleBytes;
        foreach (var tensor in tensors)
        {
            string name = $"storage '{tensor.StorageKey}' of tensor '{tensor.Key}'";
            if (storages.TryGetValue(tensor.StorageKey, out var known))
            {
                if (known.First.StorageType != tensor.StorageType || known.First.StorageElements != tensor.StorageElements)
                {
                    throw Invalid(source, $"{name} is declared as {tensor.StorageElements} x torch.{tensor.StorageType}, but as {known.First.StorageElements} x torch.{known.First.StorageType} for tensor '{known.First.Key}'");
                }

                continue;
            }

            if (!tensor.StorageKey.All(char.IsAsciiLetterOrDigit))
            {
                throw Invalid(source, $"{name} has a name that is not letters and digits");
            }

            // PyBridge takes the first entry whose full name ends with data/{key}, with the default (culture) comparison.
            string suffix = "data/" + tensor.StorageKey;
            var entry = entries.Find(e => e.FullName.EndsWith(suffix, StringComparison.CurrentCulture))
                ?? throw Invalid(source, $"{name} has no entry data/{tensor.StorageKey} in the zip archive");
            long elementBytes = ElementBytes(tensor.StorageType);
            if (tensor.StorageElements > long.MaxValue / elementBytes)
            {
                throw Invalid(source, $"{name} declares {tensor.StorageElements} elements, too many to hold");
            }

            long bytes = tensor.StorageElements * elementBytes;
            if (entry.Length != bytes)
            {
                throw Invalid(source, $"{name} declares {tensor.StorageElements} x torch.{tensor.StorageType} ({bytes} bytes), but its entry '{entry.FullName}' holds {entry.Length} bytes");
            }

            decoded += bytes;
            if (decoded > limit.Bytes)
            {
                throw Invalid(source, $"its pickle and storages up to {name} decode to {decoded} bytes, more than {limit}");
            }

            storages.Add(tensor.StorageKey, (entry, tensor));
        }

        var buffer = ArrayPool<byte>.Shared.Rent(1 << 16);
        try
        {
            foreach (var (key, (entry, first)) in storages)
            {
                var (actual, crc) = Inflate(entry, entry.Length, buffer, source, $"storage '{key}' of tensor '{first.Key}'");
                if (actual != entry.Length)
                {
                    throw Invalid(source, actual > entry.Length
                        ? $"the entry '{entry.FullName}' of storage '{key}' (tensor '{first.Key}') inflates to more than the {entry.Length} bytes it declares"
                        : $"the entry '{entry.FullName}' of storage '{key}' (tensor '{first.Key}') inflates to {actual} bytes, fewer than the {entry.Length} it declares");
                }

                // The zip reader stops at the declared length, so a length that lies short reads a prefix: the CRC tells.
                if (crc != entry.Crc32)
                {
                    throw Invalid(source, $"the entry '{entry.FullName}' of storage '{key}' (tensor '{first.Key}') does not match its CRC-32 (it is corrupt, or its declared length is wrong)");
                }
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }

        return storages.ToDictionary(s => s.Key, s => s.Value.First.StorageElements, StringComparer.Ordinal);
    }

    /// <summary>
    /// Checks each tensor's view (offset, shape, strides) against its storage, and that the view is one the reader
    /// rebuilds correctly: PyBridge allocates a tensor of the view's shape and fills it from the storage's first bytes, so
    /// only a contiguous view at offset 0 reads back as saved. The tensors' total size is bounded too, since several
    /// tensors sharing one storage each get their own copy.
    /// </summary>
    private static void CheckViews(List<PickledTensor> tensors, Dictionary<string, long> storages, string source, DecodeLimit limit)
    {
        long allocated = 0;
        foreach (var tensor in tensors)
        {
            string name = $"tensor '{tensor.Key}' (storage '{tensor.StorageKey}')";
            if (tensor.Shape.Length != tensor.Strides.Length || tensor.Shape.Length > 64)
            {
                throw Invalid(source, $"{name} has {tensor.Shape.Length} dimensions but {tensor.Strides.Length} strides");
            }

            if (tensor.Shape.Any(d => d is < 0 or > int.MaxValue) || tensor.Strides.Any(s => s is < 0 or > int.MaxValue) || tensor.Offset is < 0 or > int.MaxValue)
            {
                throw Invalid(source, $"{name} has a size, stride or offset that is negative or beyond 2^31 - 1 (shape [{string.Join(", ", tensor.Shape)}], strides [{string.Join(", ", tensor.Strides)}], offset {tensor.Offset})");
            }

            long elements = 1;
            long last = tensor.Offset;
            foreach (var (size, stride) in tensor.Shape.Zip(tensor.Strides))
            {
                elements = size == 0 || elements == 0 ? 0 : elements <= long.MaxValue / size ? elements * size : long.MaxValue;
                last = size == 0 || last == long.MaxValue ? last : (size - 1) * stride <= long.MaxValue - last ? last + (size - 1) * stride : long.MaxValue;
            }

            long storageElements = storages[tensor.StorageKey];
            if (elements > 0 && last >= storageElements)
            {
                throw Invalid(source, $"{name} is a view (offset {tensor.Offset}, shape [{string.Join(", ", tensor.Shape)}], strides [{string.Join(", ", tensor.Strides)}]) that reaches element {last} of a storage of {storageElements} elements");
            }

            if (elements > 0 && (tensor.Offset != 0 || !IsContiguous(tensor.Shape, tensor.Strides)))
            {
                throw Invalid(source, $"{name} is saved as a non-contiguous view (offset {tensor.Offset}, shape [{string.Join(", ", tensor.Shape)}], strides [{string.Join(", ", tensor.Strides)}]) of its storage, which cannot be read here: save contiguous tensors (tensor.contiguous(), or clone() for slices of a larger tensor)");
            }

            allocated += elements * ElementBytes(tensor.StorageType);
            if (allocated > limit.Bytes)
            {
                throw Invalid(source, $"its tensors up to {name} need {allocated} bytes, more than {limit}");
            }
        }
    }

    private static bool IsContiguous(long[] shape, long[] strides)
    {
        long expected = 1;
        for (int i = shape.Length - 1; i >= 0; i--)
        {
            if (shape[i] != 1 && strides[i] != expected)
            {
                return false;
            }

            expected *= shape[i];
        }

        return true;
    }

    /// <summary>The bytes of one element of a storage type (one of <see cref="SupportedStorages"/>).</summary>
    private static long ElementBytes(string storageType) => storageType switch
    {
        "DoubleStorage" or "LongStorage" or "ComplexFloatStorage" => 8,
        "FloatStorage" or "IntStorage" => 4,
        "HalfStorage" or "BFloat16Storage" or "ShortStorage" => 2,
        "CharStorage" or "ByteStorage" or "BoolStorage" => 1,
        "ComplexDoubleStorage" => 16,
        _ => throw new InvalidDataException($"Unknown storage type torch.{storageType}."),
    };

    /// <summary>Inflates an entry into a scratch buffer, counting its bytes and their CRC-32, and stops one byte past <paramref name="expected"/>.</summary>
    /// <returns>The bytes the entry inflated to (<paramref name="expected"/> + 1 when it holds more), and their CRC-32.</returns>
    private static (long Bytes, uint Crc) Inflate(ZipArchiveEntry entry, long expected, byte[] buffer, string source, string what)
    {
        long total = 0;
        var crc = new System.IO.Hashing.Crc32();
        try
        {
            using var data = entry.Open();
            int read;
            while (total <= expected && (read = data.Read(buffer, 0, (int)Math.Min(buffer.Length, expected - total + 1))) > 0)
            {
                total += read;
                crc.Append(buffer.AsSpan(0, read));
            }
        }
        catch (Exception ex) when (ex is InvalidDataException or IOException or NotSupportedException)
        {
            throw Invalid(source, $"the entry '{entry.FullName}' of {what} cannot be read ({ex.Message})", ex);
        }

        return (total, crc.GetCurrentHashAsUInt32());
    }

    /// <summary>Reads a safetensors file's tensors.</summary>
    /// <param name="stream">A seekable stream holding the file from position 0.</param>
    /// <param name="source">The file, for messages.</param>
    /// <param name="limit">The most bytes the import may decode.</param>
    /// <returns>The tensors by key, in data order.</returns>
    public static List<(string Key, Tensor Tensor)> ReadSafetensors(Stream stream, string source, DecodeLimit limit)
    {
        var order = SafetensorsHeader.Read(stream, source, limit);
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

    /// <summary>Reads a whole entry, which must inflate to exactly its declared length, no more than <paramref name="limit"/>.</summary>
    private static byte[] ReadEntry(ZipArchiveEntry entry, long limit, string source, DecodeLimit? decodeLimit = null)
    {
        if (entry.Length > limit)
        {
            throw Invalid(source, decodeLimit is { } bound
                ? $"its entry '{entry.FullName}' is {entry.Length} bytes, more than {bound}"
                : $"its entry '{entry.FullName}' is {entry.Length} bytes, more than the {limit} expected");
        }

        var bytes = new byte[entry.Length];
        bool more;
        try
        {
            using var data = entry.Open();
            data.ReadExactly(bytes);
            more = data.ReadByte() >= 0;
        }
        catch (Exception ex) when (ex is InvalidDataException or IOException or NotSupportedException)
        {
            throw Invalid(source, $"its entry '{entry.FullName}' cannot be read ({ex.Message})", ex);
        }

        if (more)
        {
            throw Invalid(source, $"its entry '{entry.FullName}' inflates to more than the {entry.Length} bytes it declares");
        }

        return bytes;
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
