using System.Buffers.Binary;
using ModelCompression.Modules;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Serialization;

/// <summary>Options of <see cref="CompressedModel.Load(string, CompressedModelLoadOptions?)"/>.</summary>
public sealed class CompressedModelLoadOptions
{
    /// <summary>
    /// Gets or sets the largest file accepted, in bytes. A stream is read no further than this: its header's declared
    /// length is checked against it before the rest is read, and the buffer grows only as data arrives.
    /// </summary>
    /// <value>The default is 2,147,483,591 (the largest array .NET holds). Must be between 24 and that.</value>
    public long MaxFileBytes { get; set; } = Array.MaxLength;

    /// <summary>
    /// Gets or sets the ceiling of one load: the most bytes its decoded tensors may take, 4 bytes per element of each
    /// tensor's declared shape. Each tensor is charged before any of it is decoded; decoding it then allocates in
    /// proportion to its declared shape (its values, and at most as much again in transient symbols and positions), and
    /// only once the file's data has shown it holds that many elements. A file whose tensors claim more fails with an
    /// <see cref="InvalidDataException"/> before the allocation; raise this to load a larger model.
    /// </summary>
    /// <value>The default is 8 GiB. Must be positive.</value>
    public long MaxDecodedBytes { get; set; } = 8L << 30;

    /// <summary>
    /// Gets the factories of the custom (non-library) modules a file may hold, by the module type's full name as the
    /// file records it. A custom module is built only from a factory given here (or from the architecture passed to
    /// <see cref="CompressedModel.Load(string, nn.Module{Tensor, Tensor}, CompressedModelLoadOptions?)"/>): the file's
    /// type names are looked up, never instantiated. The factory's children and own tensors are replaced by the file's.
    /// </summary>
    public IDictionary<string, Func<nn.Module<Tensor, Tensor>>> ModuleFactories { get; } = new Dictionary<string, Func<nn.Module<Tensor, Tensor>>>(StringComparer.Ordinal);

    /// <summary>Gets or sets the device the loaded model is moved to; <see langword="null"/> leaves it on the CPU.</summary>
    public Device? Device { get; set; }

    /// <summary>Lists every invalid value.</summary>
    /// <returns>One message per invalid value.</returns>
    public IReadOnlyList<string> Validate()
    {
        var errors = new List<string>();
        if (MaxFileBytes < ModelFile.HeaderBytes || MaxFileBytes > Array.MaxLength)
        {
            errors.Add($"{nameof(CompressedModelLoadOptions)}.{nameof(MaxFileBytes)} must be between {ModelFile.HeaderBytes} and {Array.MaxLength} (was {MaxFileBytes}).");
        }

        if (MaxDecodedBytes <= 0)
        {
            errors.Add($"{nameof(CompressedModelLoadOptions)}.{nameof(MaxDecodedBytes)} must be positive (was {MaxDecodedBytes}).");
        }

        return errors;
    }
}

/// <summary>What one module takes in the compressed file.</summary>
/// <param name="Name">The dotted name, as <c>named_modules()</c> gives it (empty for the root).</param>
/// <param name="Type">The module type name.</param>
/// <param name="Bytes">The bytes of its data section (its tensors), 0 for modules without tensors.</param>
/// <param name="Encodings">How each tensor was stored, e.g. <c>weight: sparse (gaps &lt; 16, Huffman), codebook of 32 (float32), Huffman, 2311 B</c>.</param>
public sealed record StoredLayer(string Name, string Type, long Bytes, IReadOnlyList<string> Encodings);

/// <summary>The size of a model's compressed file and where the bytes go.</summary>
/// <param name="TotalBytes">The length of the file.</param>
/// <param name="ArchitectureBytes">The bytes of the header, the architecture description and the section framing.</param>
/// <param name="Layers">Every module, in file order.</param>
public sealed record CompressedModelSize(long TotalBytes, long ArchitectureBytes, IReadOnlyList<StoredLayer> Layers);

/// <summary>
/// The library's compressed model file: one file holding the architecture and every tensor of every layer kind the
/// library produces (dense float32/16, sparse, int8 to binary with scales and zero points, low-rank factors, clustered
/// codebooks), each array stored in the layout and coding that measures smallest, with a versioned header and a
/// CRC-32 per section, little-endian throughout. The format is described in <c>docs/file-format.md</c>.
/// </summary>
/// <remarks>
/// <para>Saving is atomic: the file is written beside the target under a temporary name, flushed to disk, then renamed
/// over it, so an interrupted save leaves the previous file as it was.</para>
/// <para>Loading trusts nothing in the file: every count, length and shape is checked against the file's length and
/// fixed limits before anything is allocated, only the library's own module kinds are built (custom modules come
/// from the caller), and anything wrong raises an <see cref="InvalidDataException"/> saying what.</para>
/// </remarks>
public static class CompressedModel
{
    /// <summary>Saves a model to a file, atomically (see the remarks of <see cref="CompressedModel"/>).</summary>
    /// <param name="model">The model; it is not changed.</param>
    /// <param name="path">The file to write; an existing file is replaced only once the new one is complete.</param>
    /// <returns>The size of the file and where its bytes go.</returns>
    /// <exception cref="NotSupportedException">A module cannot be stored (for example a training-time fake-quantization layer); nothing is written.</exception>
    /// <exception cref="UnsupportedModelException">The file would break a limit or check that <see cref="Load(string, CompressedModelLoadOptions?)"/> enforces (the file is read back before it is written); nothing is written.</exception>
    /// <exception cref="ArgumentException">A weight is NaN or infinite; nothing is written.</exception>
    public static CompressedModelSize Save(nn.Module<Tensor, Tensor> model, string path) => SaveCore(model, path, null);

    /// <summary>Writes a model's compressed file to a stream.</summary>
    /// <param name="model">The model; it is not changed.</param>
    /// <param name="stream">A writable stream; the file is encoded completely before the first byte is written.</param>
    /// <returns>The size of the file and where its bytes go.</returns>
    /// <exception cref="NotSupportedException">A module cannot be stored, or the file would not load (<see cref="UnsupportedModelException"/>); nothing is written.</exception>
    public static CompressedModelSize Save(nn.Module<Tensor, Tensor> model, Stream stream)
    {
        ArgumentNullException.ThrowIfNull(stream);
        var (bytes, size) = Encode(model, forSaving: true);
        stream.Write(bytes);
        return size;
    }

    /// <summary>Encodes a model without writing it anywhere: the size every report's <c>sizeBytes</c> gives.</summary>
    /// <param name="model">The model; it is not changed.</param>
    /// <returns>The size of the file the model would be saved as, and where its bytes go.</returns>
    /// <remarks>A training-time layer (a fake-quantization wrapper during quantization-aware training) is measured as a custom module holding its float layer, which <see cref="Save(nn.Module{Tensor, Tensor}, string)"/> refuses.</remarks>
    public static CompressedModelSize Measure(nn.Module<Tensor, Tensor> model) => Encode(model, forSaving: false).Size;

    /// <summary>Loads a model from a file. Every module must be of a kind the library builds, or have a factory in <paramref name="options"/>.</summary>
    /// <param name="path">The file.</param>
    /// <param name="options">Limits and custom module factories; the defaults when <see langword="null"/>.</param>
    /// <returns>The model, in evaluation mode.</returns>
    /// <exception cref="InvalidDataException">The file is corrupt, truncated or not a compressed model, or it holds a custom module with no factory.</exception>
    public static nn.Module<Tensor, Tensor> Load(string path, CompressedModelLoadOptions? options = null) => Decode(ReadFile(path, options), null, options);

    /// <summary>
    /// Loads a model from a file into an architecture the caller built: modules of the library's kinds are built from
    /// the file, and every custom module (one the library cannot build, such as a residual block of your own) is a copy of
    /// the module at the same dotted name in <paramref name="architecture"/>, with its children and tensors from the file.
    /// </summary>
    /// <param name="path">The file.</param>
    /// <param name="architecture">A model built the way the saved one was; it is not changed.</param>
    /// <param name="options">Limits; the defaults when <see langword="null"/>.</param>
    /// <returns>The model, in evaluation mode.</returns>
    /// <exception cref="InvalidDataException">The file is corrupt, or does not fit <paramref name="architecture"/> (the message lists the differences).</exception>
    public static nn.Module<Tensor, Tensor> Load(string path, nn.Module<Tensor, Tensor> architecture, CompressedModelLoadOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(architecture);
        return Decode(ReadFile(path, options), architecture, options);
    }

    /// <summary>Loads a model from a stream holding a compressed file.</summary>
    /// <param name="stream">The stream, read up to the length its header declares (and one byte more, to see that it ends there).</param>
    /// <param name="architecture">A model supplying custom modules, or <see langword="null"/>.</param>
    /// <param name="options">Limits and custom module factories; the defaults when <see langword="null"/>.</param>
    /// <returns>The model, in evaluation mode.</returns>
    /// <exception cref="InvalidDataException">The data is corrupt, truncated, too large, or does not fit.</exception>
    public static nn.Module<Tensor, Tensor> Load(Stream stream, nn.Module<Tensor, Tensor>? architecture = null, CompressedModelLoadOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(stream);
        return Decode(ReadStream(stream, Validated(options).MaxFileBytes), architecture, options);
    }

    /// <summary>Saves, with a hook that wraps the temporary file's stream (tests use it to fail a save midway).</summary>
    internal static CompressedModelSize SaveCore(nn.Module<Tensor, Tensor> model, string path, Func<Stream, Stream>? wrap)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        var (bytes, size) = Encode(model, forSaving: true);
        AtomicFile.Write(path, stream => stream.Write(bytes), wrap);
        return size;
    }

    private static (byte[] Bytes, CompressedModelSize Size) Encode(nn.Module<Tensor, Tensor> model, bool forSaving)
    {
        ArgumentNullException.ThrowIfNull(model);
        var architecture = new FormatWriter();
        var data = new List<byte[]>();
        var written = new List<ModuleCodec.Written>();
        ModuleCodec.WriteTree(model, architecture, data, written, forSaving);
        var bytes = ModelFile.Write(architecture.ToArray(), data);
        if (forSaving)
        {
            VerifyLoadable(bytes);
        }

        long dataBytes = written.Sum(w => (long)w.DataBytes);
        var layers = written.Select(w => new StoredLayer(w.Path, w.TypeName, w.DataBytes, w.Encodings)).ToList();
        return (bytes, new CompressedModelSize(bytes.Length, bytes.Length - dataBytes, layers));
    }

    /// <summary>Reads the encoded file back as Load would (every limit, every check before building), so Save never writes what Load refuses.</summary>
    private static void VerifyLoadable(byte[] file)
    {
        try
        {
            Parse(file, new DecodeBudget(long.MaxValue));
        }
        catch (InvalidDataException ex)
        {
            throw new UnsupportedModelException(
                null,
                null,
                $"The model cannot be saved: the file would break a limit or check of the format, so loading it would fail, and nothing was written. {ex.Message}",
                ex);
        }
    }

    private static CompressedModelLoadOptions Validated(CompressedModelLoadOptions? options)
    {
        options ??= new CompressedModelLoadOptions();
        OptionsValidationException.ThrowIfInvalid(typeof(CompressedModelLoadOptions), options.Validate());
        return options;
    }

    private static byte[] ReadFile(string path, CompressedModelLoadOptions? options)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        long limit = Validated(options).MaxFileBytes;
        using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read);
        if (file.Length > limit)
        {
            throw new InvalidDataException($"'{path}' is {file.Length} bytes, more than the {limit} allowed.");
        }

        var bytes = new byte[file.Length];
        file.ReadExactly(bytes);
        return bytes;
    }

    /// <summary>
    /// Reads a file from a stream with memory bounded by its header: the header is read and checked first, its declared
    /// length checked against <paramref name="limit"/>, and then no more than that is read (and one byte more, to see
    /// that the stream ends there). The buffer grows as data arrives, so a stream that ends early allocates what it held.
    /// </summary>
    private static byte[] ReadStream(Stream stream, long limit)
    {
        var header = new byte[ModelFile.HeaderBytes];
        int got = stream.ReadAtLeast(header, header.Length, throwOnEndOfStream: false);
        if (got < header.Length)
        {
            return header[..got];
        }

        ulong declared = ModelFile.CheckHeader(header);
        if (declared > (ulong)limit)
        {
            throw new InvalidDataException($"The compressed model's header gives its length as {declared} bytes, more than the {limit} allowed ({nameof(CompressedModelLoadOptions)}.{nameof(CompressedModelLoadOptions.MaxFileBytes)}).");
        }

        if (declared <= (ulong)header.Length)
        {
            // Shorter than its header, or exactly it: the framing check says which.
            return header;
        }

        const int FirstBuffer = 1 << 20;
        var buffer = new byte[Math.Min((long)declared, FirstBuffer)];
        header.CopyTo(buffer, 0);
        long length = header.Length;
        while (length < (long)declared)
        {
            if (length == buffer.Length)
            {
                Array.Resize(ref buffer, (int)Math.Min((long)declared, buffer.Length * 2L));
            }

            int read = stream.Read(buffer, (int)length, buffer.Length - (int)length);
            if (read == 0)
            {
                // Truncated: the framing check says so, as it does for a file of this length.
                return buffer[..(int)length];
            }

            length += read;
        }

        Span<byte> probe = stackalloc byte[1];
        if (stream.Read(probe) != 0)
        {
            throw new InvalidDataException($"The compressed model file is not valid: the header gives its length as {declared} bytes but the stream holds more (it has extra bytes).");
        }

        return buffer;
    }

    private static nn.Module<Tensor, Tensor> Decode(byte[] file, nn.Module<Tensor, Tensor>? architecture, CompressedModelLoadOptions? options)
    {
        options = Validated(options);
        var root = Parse(file, new DecodeBudget(options.MaxDecodedBytes));

        // Every byte is checked and decoded; only now are modules built (no random initialisation leaks into the caller's RNG).
        using var exclusive = RandomState.Gate.EnterScope();
        using var rng = RandomState.Save();
        try
        {
            var built = ModuleCodec.Build(root, node => CustomModule(node, architecture, options));
            if (built is not nn.Module<Tensor, Tensor> model)
            {
                built.Dispose();
                throw new InvalidDataException($"The file's root is a {built.GetType().Name}, not a tensor-to-tensor model.");
            }

            try
            {
                // A custom module taken from the architecture kept the channel counts it was built with; where TorchVision
                // keeps one in a field besides its layers (SqueezeExcitation), it must follow the file's, perhaps pruned, layers.
                Pruning.TorchVisionChannelSettings.Synchronize(model);
                model.eval();
                if (options.Device is not null)
                {
                    model.to(options.Device);
                }
            }
            catch
            {
                model.Dispose();
                throw;
            }

            return model;
        }
        catch (Exception ex) when (ex is ArgumentException or InvalidOperationException or OverflowException or System.Runtime.InteropServices.ExternalException)
        {
            throw new InvalidDataException($"The compressed model file is not valid: a module could not be built from it ({ex.Message}).", ex);
        }
        finally
        {
            RandomState.Restore(rng);
        }
    }

    /// <summary>
    /// Checks the framing, reads the architecture and decodes every data section, checking each node as the builder
    /// will: what loading does before it builds a module, and what saving does to the file it is about to write.
    /// </summary>
    internal static NodeSpec Parse(byte[] file, DecodeBudget budget)
    {
        var sections = ModelFile.Read(file);
        var archReader = new FormatReader(file.AsSpan(sections[0].Offset, sections[0].Length), "the architecture section");
        var root = ModuleCodec.ReadTree(ref archReader);
        var withData = new List<NodeSpec>();
        Collect(root, withData);
        if (withData.Count != sections.Count - 1)
        {
            throw new InvalidDataException(
                $"The compressed model file is not valid: its architecture has {withData.Count} modules with tensors but the file has {sections.Count - 1} data sections.");
        }

        for (int i = 0; i < withData.Count; i++)
        {
            var (offset, length) = sections[i + 1];
            var reader = new FormatReader(file.AsSpan(offset, length), $"data section {i + 1}");
            long index = reader.VarUInt();
            if (index != withData[i].Index)
            {
                throw reader.Fail($"it belongs to module #{index}, but {withData[i].Describe} (#{withData[i].Index}) comes next: sections are out of order");
            }

            ModuleCodec.ReadTensors(withData[i], ref reader, budget);
            reader.ExpectEnd();
        }

        ModuleCodec.Check(root);
        return root;
    }

    private static void Collect(NodeSpec node, List<NodeSpec> withData)
    {
        if (node.HasData)
        {
            withData.Add(node);
        }

        foreach (var child in node.Children)
        {
            Collect(child, withData);
        }
    }

    private static nn.Module CustomModule(NodeSpec node, nn.Module<Tensor, Tensor>? architecture, CompressedModelLoadOptions options)
    {
        if (architecture is not null)
        {
            nn.Module? found;
            try
            {
                found = node.Path.Length == 0 ? architecture : Modules.ModuleTree.GetSubmodule(architecture, node.Path);
            }
            catch (ArgumentException)
            {
                found = null;
            }

            if (found is not { } module)
            {
                throw new InvalidDataException($"The file holds a custom module {node.TypeName} at {node.Describe}, but the architecture given has no module there.");
            }

            string name = module.GetType().FullName ?? module.GetType().Name;
            if (name != node.TypeName)
            {
                throw new InvalidDataException($"The file holds a {node.TypeName} at {node.Describe}, but the architecture given has a {name} there.");
            }

            return Modules.ModuleCloner.DeepClone(module);
        }

        if (options.ModuleFactories.TryGetValue(node.TypeName, out var factory))
        {
            return factory() ?? throw new InvalidOperationException($"The factory for {node.TypeName} returned null.");
        }

        // A type registered with the layer registry since the file was written (as a custom module) builds from its factory.
        if (Modules.LayerRegistry.Descriptors.FirstOrDefault(d => d.ModuleType.FullName == node.TypeName) is { } descriptor
            && descriptor.Create(new Modules.LayerAttributes(), descriptor.Version) is var created)
        {
            return created as nn.Module<Tensor, Tensor> ?? throw new InvalidDataException($"{node.Describe} is not a tensor-to-tensor module.");
        }

        throw new InvalidDataException(
            $"The file holds a custom module {node.TypeName} at {node.Describe}, which the library does not build: load it with " +
            $"{nameof(CompressedModel)}.{nameof(Load)}(path, architecture), add a factory to {nameof(CompressedModelLoadOptions)}.{nameof(CompressedModelLoadOptions.ModuleFactories)}, " +
            $"or register the type with {nameof(Modules.LayerRegistry)}.{nameof(Modules.LayerRegistry.RegisterFactory)}.");
    }
}

/// <summary>The file's framing: the header and the checksummed sections.</summary>
internal static class ModelFile
{
    public const int HeaderBytes = 24;
    public const ushort Version = 1;
    private const uint Magic = 0x464D434D; // "MCMF" little-endian
    private const uint ArchitectureTag = 0x48435241; // "ARCH"
    private const uint DataTag = 0x41544144; // "DATA"
    private const int SectionOverhead = 16;

    public static byte[] Write(byte[] architecture, List<byte[]> data)
    {
        long total = HeaderBytes + SectionOverhead + architecture.Length + data.Sum(d => (long)SectionOverhead + d.Length);
        if (total > Array.MaxLength)
        {
            throw new NotSupportedException($"The model's file would be {total} bytes, more than one file of this format holds ({Array.MaxLength}).");
        }

        var file = new byte[total];
        var span = file.AsSpan();
        BinaryPrimitives.WriteUInt32LittleEndian(span, Magic);
        BinaryPrimitives.WriteUInt16LittleEndian(span[4..], Version);
        BinaryPrimitives.WriteUInt16LittleEndian(span[6..], 0);
        BinaryPrimitives.WriteUInt32LittleEndian(span[8..], (uint)(data.Count + 1));
        BinaryPrimitives.WriteUInt64LittleEndian(span[12..], (ulong)total);
        BinaryPrimitives.WriteUInt32LittleEndian(span[20..], System.IO.Hashing.Crc32.HashToUInt32(span[..20]));
        int at = HeaderBytes;
        at = WriteSection(span, at, ArchitectureTag, architecture);
        foreach (var d in data)
        {
            at = WriteSection(span, at, DataTag, d);
        }

        return file;
    }

    /// <summary>Checks the framing and every checksum; returns each section's payload (offset, length), the architecture first.</summary>
    public static List<(int Offset, int Length)> Read(byte[] file)
    {
        var span = file.AsSpan();
        if (file.Length < HeaderBytes)
        {
            throw Invalid($"it is {file.Length} bytes long, shorter than the {HeaderBytes}-byte header");
        }

        ulong declared = CheckHeader(span);
        if (declared != (ulong)file.Length)
        {
            throw Invalid($"the header gives its length as {declared} bytes but it is {file.Length} ({(declared > (ulong)file.Length ? "truncated" : "has extra bytes")})");
        }

        uint count = BinaryPrimitives.ReadUInt32LittleEndian(span[8..]);
        if (count < 1 || count > (file.Length - HeaderBytes) / SectionOverhead)
        {
            throw Invalid($"the header declares {count} sections, which a file of {file.Length} bytes cannot hold");
        }

        var sections = new List<(int, int)>((int)count);
        int at = HeaderBytes;
        for (int i = 0; i < count; i++)
        {
            if (file.Length - at < SectionOverhead)
            {
                throw Invalid($"it ends before section {i} of {count}");
            }

            uint tag = BinaryPrimitives.ReadUInt32LittleEndian(span[at..]);
            ulong length = BinaryPrimitives.ReadUInt64LittleEndian(span[(at + 4)..]);
            uint expectedTag = i == 0 ? ArchitectureTag : DataTag;
            if (tag != expectedTag)
            {
                throw Invalid($"section {i} at byte {at} has tag 0x{tag:X8}, not the {(i == 0 ? "architecture" : "data")} tag");
            }

            if (length > (ulong)(file.Length - at - SectionOverhead))
            {
                throw Invalid($"section {i} at byte {at} declares {length} bytes, more than the {file.Length - at - SectionOverhead} left");
            }

            int payload = (int)length;
            var checksummed = span.Slice(at, 12 + payload);
            if (BinaryPrimitives.ReadUInt32LittleEndian(span[(at + 12 + payload)..]) != System.IO.Hashing.Crc32.HashToUInt32(checksummed))
            {
                throw Invalid($"section {i} at byte {at} fails its checksum (the data is corrupt)");
            }

            sections.Add((at + 12, payload));
            at += SectionOverhead + payload;
        }

        if (at != file.Length)
        {
            throw Invalid($"{file.Length - at} bytes follow the last section");
        }

        return sections;
    }

    /// <summary>Checks the signature, version and checksum of a header of <see cref="HeaderBytes"/> bytes; returns the length it declares.</summary>
    public static ulong CheckHeader(ReadOnlySpan<byte> span)
    {
        if (BinaryPrimitives.ReadUInt32LittleEndian(span) != Magic)
        {
            throw Invalid("it does not start with the format's signature 'MCMF' (not a compressed model file)");
        }

        ushort version = BinaryPrimitives.ReadUInt16LittleEndian(span[4..]);
        if (version != Version)
        {
            throw Invalid($"it is format version {version}; this library reads version {Version}");
        }

        if (BinaryPrimitives.ReadUInt32LittleEndian(span[20..]) != System.IO.Hashing.Crc32.HashToUInt32(span[..20]))
        {
            throw Invalid("the header's checksum does not match (the header is corrupt)");
        }

        return BinaryPrimitives.ReadUInt64LittleEndian(span[12..]);
    }

    private static int WriteSection(Span<byte> file, int at, uint tag, byte[] payload)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(file[at..], tag);
        BinaryPrimitives.WriteUInt64LittleEndian(file[(at + 4)..], (ulong)payload.Length);
        payload.CopyTo(file[(at + 12)..]);
        BinaryPrimitives.WriteUInt32LittleEndian(file[(at + 12 + payload.Length)..], System.IO.Hashing.Crc32.HashToUInt32(file.Slice(at, 12 + payload.Length)));
        return at + SectionOverhead + payload.Length;
    }

    private static InvalidDataException Invalid(string message) => new($"The compressed model file is not valid: {message}.");
}
