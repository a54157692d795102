using System.Buffers.Binary;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Interop.PyTorch;

/// <summary>The file formats <see cref="PyTorchImport"/> reads.</summary>
public enum StateDictFormat
{
    /// <summary>Tell the format from the content: a zip file is a PyTorch file, a length and a JSON object safetensors.</summary>
    Detect,

    /// <summary>A PyTorch <c>torch.save</c> file (<c>.pt</c>, <c>.pth</c>, <c>.bin</c>) in the zip format PyTorch has written since 1.6.</summary>
    PyTorch,

    /// <summary>A safetensors file (<c>.safetensors</c>).</summary>
    Safetensors,
}

/// <summary>What <see cref="PyTorchImport.LoadStateDict(nn.Module, string, PyTorchImportOptions?)"/> loaded and left.</summary>
/// <param name="Format">The format the file was read as.</param>
/// <param name="MatchedByOrder">Whether the file's tensors were paired with the model's by position (<see cref="PyTorchImportOptions.MatchByOrder"/>) rather than by name.</param>
/// <param name="Loaded">The model's names of the tensors loaded, in <c>state_dict()</c> order.</param>
/// <param name="Converted">The model's names of the tensors converted from another floating-point dtype.</param>
/// <param name="Skipped">The file keys <see cref="PyTorchImportOptions.KeyMap"/> skipped.</param>
/// <param name="Unexpected">The file keys that map to no model tensor, which were ignored (only when not <see cref="PyTorchImportOptions.Strict"/>).</param>
/// <param name="Missing">The model's names that no file tensor maps to, which kept their values (only when not <see cref="PyTorchImportOptions.Strict"/>).</param>
/// <param name="Bytes">The bytes of the loaded tensors as stored in the file.</param>
public sealed record StateDictImportSummary(
    StateDictFormat Format,
    bool MatchedByOrder,
    IReadOnlyList<string> Loaded,
    IReadOnlyList<string> Converted,
    IReadOnlyList<string> Skipped,
    IReadOnlyList<string> Unexpected,
    IReadOnlyList<string> Missing,
    long Bytes);

/// <summary>
/// Loads a PyTorch <c>state_dict</c>, saved with <c>torch.save(model.state_dict(), path)</c> or as safetensors, into a
/// TorchSharp model built with the same layers. TorchSharp.PyBridge reads the files; this class checks that they fit.
/// </summary>
/// <remarks>
/// <para>Nothing in the model changes unless everything fits: the file is read and every tensor checked against the
/// model's <c>state_dict()</c> first (names, shapes, dtypes, finite values), every problem is collected into one
/// <see cref="StateDictMismatchException"/>, and only then are the tensors copied into the model's parameters and buffers,
/// in place, under <c>no_grad</c>, on whatever device they are.</para>
/// <para>A corrupt, truncated or unreadable file raises an <see cref="InvalidDataException"/> naming it and the entry
/// (zip entry, storage or tensor) at fault, before any tensor is made where the file's structure shows the fault. The
/// bytes an import decodes are bounded by <see cref="PyTorchImportOptions.MaxDecodedBytesPerFileByte"/> times the file's
/// length and by <see cref="PyTorchImportOptions.MaxDecodedBytes"/>, so a small file cannot inflate to a large one. Older PyTorch
/// files (before 1.6, not zip) and whole pickled models (<c>torch.save(model)</c>) are not supported; re-save the
/// state_dict with a current PyTorch.</para>
/// </remarks>
public static class PyTorchImport
{
    private const string StreamSource = "the stream";

    /// <summary>Loads a state_dict file into a model, telling the format from the file's content.</summary>
    /// <param name="model">The model whose parameters and buffers receive the file's tensors.</param>
    /// <param name="path">A PyTorch (<c>.pt</c>, <c>.pth</c>, <c>.bin</c>) or safetensors file.</param>
    /// <param name="options">How names map and how strict the match is; the defaults when <see langword="null"/>.</param>
    /// <returns>What was loaded, skipped and left.</returns>
    /// <exception cref="StateDictMismatchException">The file's tensors do not fit the model (the message lists every problem); the model is unchanged.</exception>
    /// <exception cref="InvalidDataException">The file is corrupt, truncated, or not a state_dict in either format; the model is unchanged.</exception>
    /// <exception cref="OptionsValidationException"><paramref name="options"/> is invalid.</exception>
    public static StateDictImportSummary LoadStateDict(nn.Module model, string path, PyTorchImportOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentException.ThrowIfNullOrEmpty(path);
        options = Validated(options);
        using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read);
        return Load(model, file, StateDictFormat.Detect, options, $"'{path}'");
    }

    /// <summary>Loads a state_dict from a stream into a model.</summary>
    /// <param name="model">The model whose parameters and buffers receive the stream's tensors.</param>
    /// <param name="stream">The file's content, read from its current position to its end; it is left open.</param>
    /// <param name="format">The format, or <see cref="StateDictFormat.Detect"/> to tell it from the content.</param>
    /// <param name="options">How names map and how strict the match is; the defaults when <see langword="null"/>.</param>
    /// <returns>What was loaded, skipped and left.</returns>
    /// <exception cref="StateDictMismatchException">The tensors do not fit the model (the message lists every problem); the model is unchanged.</exception>
    /// <exception cref="InvalidDataException">The data is corrupt, truncated, or not of the format; the model is unchanged.</exception>
    /// <exception cref="OptionsValidationException"><paramref name="options"/> is invalid.</exception>
    public static StateDictImportSummary LoadStateDict(nn.Module model, Stream stream, StateDictFormat format = StateDictFormat.Detect, PyTorchImportOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(stream);
        if (!Enum.IsDefined(format))
        {
            throw new ArgumentOutOfRangeException(nameof(format), format, "Unknown state_dict format.");
        }

        options = Validated(options);

        // The readers need a seekable stream that starts with the file (PyBridge seeks to 0).
        if (stream.CanSeek && stream.Position == 0)
        {
            return Load(model, stream, format, options, StreamSource);
        }

        using var copy = new MemoryStream();
        long most = Math.Min(options.MaxDecodedBytes, Array.MaxLength);
        var buffer = new byte[81920];
        int read;
        while ((read = stream.Read(buffer, 0, (int)Math.Min(buffer.Length, most + 1 - copy.Length))) > 0)
        {
            copy.Write(buffer, 0, read);
            if (copy.Length > most)
            {
                throw new InvalidDataException($"{StreamSource} is longer than {most} bytes, the most an import reads ({nameof(PyTorchImportOptions)}.{nameof(PyTorchImportOptions.MaxDecodedBytes)}, or the largest array).");
            }
        }

        copy.Position = 0;
        return Load(model, copy, format, options, StreamSource);
    }

    /// <summary>Tells a state_dict file's format from its first bytes.</summary>
    /// <param name="stream">A seekable stream at the file's start; it is left there.</param>
    /// <param name="source">The file, for messages.</param>
    /// <returns><see cref="StateDictFormat.PyTorch"/> or <see cref="StateDictFormat.Safetensors"/>.</returns>
    internal static StateDictFormat Detect(Stream stream, string source)
    {
        Span<byte> head = stackalloc byte[9];
        int read = stream.ReadAtLeast(head, head.Length, throwOnEndOfStream: false);
        stream.Position = 0;
        head = head[..read];
        if (head.StartsWith("PK\x03\x04"u8))
        {
            return StateDictFormat.PyTorch;
        }

        if (read == 9 && head[8] == (byte)'{' && BinaryPrimitives.ReadUInt64LittleEndian(head) >= 2)
        {
            return StateDictFormat.Safetensors;
        }

        if (read >= 2 && head[0] == 0x80 && head[1] <= 5)
        {
            throw new InvalidDataException(
                $"{source} is a PyTorch file in the format used before PyTorch 1.6 (a bare pickle), which is not supported: load it in PyTorch and save the state_dict again with torch.save, or as safetensors.");
        }

        throw new InvalidDataException($"{source} is neither a PyTorch file (a zip archive) nor a safetensors file ({read} bytes start with {Convert.ToHexString(head)}).");
    }

    private static PyTorchImportOptions Validated(PyTorchImportOptions? options)
    {
        options ??= new PyTorchImportOptions();
        OptionsValidationException.ThrowIfInvalid(typeof(PyTorchImportOptions), options.Validate());
        return options;
    }

    private static StateDictImportSummary Load(nn.Module model, Stream stream, StateDictFormat format, PyTorchImportOptions options, string source)
    {
        // Every tensor read, converted or compared lives in this scope; the model's own tensors were made outside it.
        using var scope = torch.NewDisposeScope();
        if (format == StateDictFormat.Detect)
        {
            format = Detect(stream, source);
        }

        var limit = options.LimitFor(stream.Length);
        var fileTensors = format == StateDictFormat.PyTorch ? StateDictReaders.ReadPyTorch(stream, source, limit) : StateDictReaders.ReadSafetensors(stream, source, limit);
        var plan = Plan(model, fileTensors, format, options, source);
        using (torch.no_grad())
        {
            foreach (var (target, value) in plan.Copies)
            {
                target.copy_(value);
            }
        }

        return plan.Summary;
    }

    /// <summary>Matches the file's tensors to the model's and checks every pair; throws listing every problem.</summary>
    private static (List<(Tensor Target, Tensor Value)> Copies, StateDictImportSummary Summary) Plan(
        nn.Module model, List<(string Key, Tensor Tensor)> file, StateDictFormat format, PyTorchImportOptions options, string source)
    {
        var problems = new List<string>();
        var skipped = new List<string>();
        var mapped = new List<(string Key, string Name, Tensor Tensor)>();
        foreach (var (key, tensor) in file)
        {
            string? name = options.Map(key);
            if (name is null)
            {
                skipped.Add(key);
            }
            else
            {
                mapped.Add((key, name, tensor));
            }
        }

        foreach (var group in mapped.GroupBy(m => m.Name, StringComparer.Ordinal).Where(g => g.Count() > 1))
        {
            problems.Add($"file keys {string.Join(", ", group.Select(m => $"'{m.Key}'"))} all map to '{group.Key}'");
        }

        var stateDict = model.state_dict();
        var targets = stateDict.ToList();
        var targetNames = new HashSet<string>(targets.Select(t => t.Key), StringComparer.Ordinal);
        bool namesMatch = problems.Count == 0 && mapped.Count == targets.Count && mapped.All(m => targetNames.Contains(m.Name));
        bool byOrder = options.MatchByOrder && !namesMatch;
        if (byOrder)
        {
            targets = PyTorchOrder(model, stateDict);
        }

        var pairs = new List<(string Key, string Name, Tensor Value, Tensor Target)>();
        var missing = new List<string>();
        var unexpected = new List<string>();
        if (byOrder)
        {
            if (mapped.Count != targets.Count)
            {
                problems.Add($"matching by order needs as many tensors in the file as in the model, but the file has {mapped.Count}{(skipped.Count > 0 ? $" (after skipping {skipped.Count})" : string.Empty)} and the model's state_dict {targets.Count}");
            }

            for (int i = 0; i < Math.Min(mapped.Count, targets.Count); i++)
            {
                pairs.Add((mapped[i].Key, targets[i].Key, mapped[i].Tensor, targets[i].Value));
            }
        }
        else
        {
            var byName = new Dictionary<string, (string Key, Tensor Tensor)>(StringComparer.Ordinal);
            foreach (var (key, name, tensor) in mapped)
            {
                byName.TryAdd(name, (key, tensor));
                if (!targetNames.Contains(name))
                {
                    unexpected.Add(key);
                    if (options.Strict)
                    {
                        problems.Add(name == key ? $"unexpected key '{key}': the model has no such tensor" : $"unexpected key '{key}' (mapped to '{name}'): the model has no such tensor");
                    }
                }
            }

            foreach (var (name, target) in targets)
            {
                if (byName.TryGetValue(name, out var found))
                {
                    pairs.Add((found.Key, name, found.Tensor, target));
                }
                else
                {
                    missing.Add(name);
                    if (options.Strict)
                    {
                        problems.Add($"missing key '{name}': the file has no tensor for it");
                    }
                }
            }
        }

        var shapeMismatches = new List<TensorShapeMismatch>();
        var dtypeMismatches = new List<TensorDtypeMismatch>();
        var nonFinite = new List<string>();
        var converted = new List<string>();
        var copies = new List<(Tensor Target, Tensor Value)>();
        long bytes = 0;
        foreach (var (key, name, value, target) in pairs)
        {
            string label = key == name ? $"'{name}'" : $"'{name}' (file key '{key}')";
            var fileShape = value.shape;
            if (!fileShape.SequenceEqual(target.shape))
            {
                shapeMismatches.Add(new TensorShapeMismatch(name, key, fileShape, target.shape));
                problems.Add($"shape of {label}: file [{string.Join(", ", fileShape)}], model [{string.Join(", ", target.shape)}]");
                continue;
            }

            var incoming = value;
            if (value.dtype != target.dtype)
            {
                if (!(options.AllowDtypeConversion && IsFloat(value.dtype) && IsFloat(target.dtype)))
                {
                    dtypeMismatches.Add(new TensorDtypeMismatch(name, key, value.dtype, target.dtype));
                    problems.Add($"dtype of {label}: file {value.dtype}, model {target.dtype}{(IsFloat(value.dtype) && IsFloat(target.dtype) ? $" ({nameof(PyTorchImportOptions.AllowDtypeConversion)} is off)" : " (only floating-point dtypes convert)")}");
                    continue;
                }

                incoming = incoming.to_type(target.dtype);
                converted.Add(name);
            }

            if (incoming.is_floating_point() && !isfinite(incoming).all().item<bool>())
            {
                nonFinite.Add(name);
                problems.Add($"{label} holds NaN or infinite values{(value.dtype != target.dtype ? $" (after conversion from {value.dtype} to {target.dtype})" : string.Empty)}");
                continue;
            }

            copies.Add((target, incoming));
            bytes += value.numel() * value.ElementSize;
        }

        if (problems.Count > 0)
        {
            throw new StateDictMismatchException(
                source,
                options.Strict ? missing : [],
                options.Strict ? unexpected : [],
                shapeMismatches,
                dtypeMismatches,
                nonFinite,
                problems);
        }

        var loaded = new HashSet<string>(pairs.Select(p => p.Name), StringComparer.Ordinal);
        var summary = new StateDictImportSummary(
            format,
            byOrder,
            stateDict.Keys.Where(loaded.Contains).ToList(),
            converted,
            skipped,
            unexpected,
            missing,
            bytes);
        return (copies, summary);
    }

    private static bool IsFloat(ScalarType dtype) => dtype is ScalarType.Float64 or ScalarType.Float32 or ScalarType.Float16 or ScalarType.BFloat16;

    /// <summary>
    /// The model's state_dict in PyTorch's order: module by module, depth first, children in registration order, each
    /// module's own parameters then its own buffers. TorchSharp's <c>state_dict()</c> lists every parameter first, then
    /// every buffer, which is not the order a PyTorch file holds them in once a model has BatchNorm layers.
    /// </summary>
    internal static List<KeyValuePair<string, Tensor>> PyTorchOrder(nn.Module model, Dictionary<string, Tensor> stateDict)
    {
        var order = new List<KeyValuePair<string, Tensor>>(stateDict.Count);
        var seen = new HashSet<string>(StringComparer.Ordinal);
        Visit(string.Empty, model);

        // Anything the walk did not reach keeps its state_dict position, after the rest.
        order.AddRange(stateDict.Where(p => !seen.Contains(p.Key)));
        return order;

        void Visit(string prefix, nn.Module module)
        {
            var own = module.named_parameters(recurse: false).Select(p => p.name).Concat(module.named_buffers(recurse: false).Select(b => b.name));
            foreach (string name in own)
            {
                string key = prefix + name;
                if (stateDict.TryGetValue(key, out var tensor) && seen.Add(key))
                {
                    order.Add(new(key, tensor));
                }
            }

            foreach (var (name, child) in module.named_children())
            {
                Visit(prefix + name + ".", child);
            }
        }
    }
}
