using System.Buffers;
using System.Buffers.Binary;
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Interop.PyTorch;

/// <summary>
/// Writes tensors in the safetensors format (Hugging Face's <c>safetensors</c>), which PyTorch, JAX and most model hubs
/// read: an 8-byte little-endian header length, a JSON header
/// <c>{"__metadata__": {...}, "name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}</c> padded
/// with spaces to a multiple of 8 bytes, then every tensor's data, little-endian and contiguous.
/// </summary>
/// <remarks>
/// <para>Supported dtypes: float64 (F64), float32 (F32), float16 (F16), bfloat16 (BF16), int64 (I64), int32 (I32),
/// int16 (I16), int8 (I8), uint8 (U8) and bool (BOOL).</para>
/// <para>Tensors are laid out as the reference implementation lays them out: largest element size first, then by name
/// (ordinal), so every tensor's data starts at a multiple of its element size; the header lists them in that order.
/// Tensors that share storage (tied weights) are written once each, as copies.</para>
/// <para>The metadata always holds <c>"format": "pt"</c> (which Hugging Face loaders look for) unless the caller's
/// metadata gives another value.</para>
/// </remarks>
public static class SafetensorsWriter
{
    /// <summary>Saves a model's <c>state_dict()</c> (parameters and buffers) to a file, atomically: the file is written
    /// beside the target under a temporary name, flushed to disk, then renamed over it.</summary>
    /// <param name="model">The model; it is not changed.</param>
    /// <param name="path">The file to write; an existing file is replaced only once the new one is complete.</param>
    /// <param name="metadata">String metadata for the header, or <see langword="null"/>.</param>
    /// <returns>The length of the file, in bytes.</returns>
    /// <exception cref="NotSupportedException">A tensor has a dtype the format cannot hold here; nothing is written.</exception>
    public static long Save(nn.Module model, string path, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        return Save(model.state_dict(), path, metadata);
    }

    /// <summary>Saves named tensors to a file, atomically (see <see cref="Save(nn.Module, string, IReadOnlyDictionary{string, string}?)"/>).</summary>
    /// <param name="tensors">The tensors by name, on any device; they are not changed.</param>
    /// <param name="path">The file to write; an existing file is replaced only once the new one is complete.</param>
    /// <param name="metadata">String metadata for the header, or <see langword="null"/>.</param>
    /// <returns>The length of the file, in bytes.</returns>
    /// <exception cref="ArgumentException">A name is empty or <c>__metadata__</c>.</exception>
    /// <exception cref="NotSupportedException">A tensor has a dtype the format cannot hold here; nothing is written.</exception>
    public static long Save(IReadOnlyDictionary<string, Tensor> tensors, string path, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        var layout = Layout.Create(tensors, metadata);
        Serialization.AtomicFile.Write(path, layout.WriteTo);
        return layout.TotalBytes;
    }

    /// <summary>Writes named tensors in the safetensors format to a stream.</summary>
    /// <param name="tensors">The tensors by name, on any device; they are not changed.</param>
    /// <param name="stream">A writable stream; it is left open.</param>
    /// <param name="metadata">String metadata for the header, or <see langword="null"/>.</param>
    /// <returns>The bytes written.</returns>
    /// <exception cref="ArgumentException">A name is empty or <c>__metadata__</c>.</exception>
    /// <exception cref="NotSupportedException">A tensor has a dtype the format cannot hold here; nothing is written.</exception>
    public static long Save(IReadOnlyDictionary<string, Tensor> tensors, Stream stream, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(stream);
        var layout = Layout.Create(tensors, metadata);
        layout.WriteTo(stream);
        return layout.TotalBytes;
    }

    /// <summary>The header and the order of the data, checked and built before a byte is written.</summary>
    private sealed class Layout
    {
        private readonly byte[] header;
        private readonly List<(string Name, Tensor Tensor)> order;

        private Layout(byte[] header, List<(string Name, Tensor Tensor)> order, long totalBytes)
        {
            this.header = header;
            this.order = order;
            TotalBytes = totalBytes;
        }

        public long TotalBytes { get; }

        public static Layout Create(IReadOnlyDictionary<string, Tensor> tensors, IReadOnlyDictionary<string, string>? metadata)
        {
            ArgumentNullException.ThrowIfNull(tensors);
            if (!BitConverter.IsLittleEndian)
            {
                throw new PlatformNotSupportedException("Writing safetensors needs a little-endian machine.");
            }

            foreach (var (name, tensor) in tensors)
            {
                if (string.IsNullOrEmpty(name) || name == SafetensorsHeader.MetadataKey)
                {
                    throw new ArgumentException($"A tensor may not be named '{name}' in a safetensors file.", nameof(tensors));
                }

                ArgumentNullException.ThrowIfNull(tensor, $"{nameof(tensors)}['{name}']");
                if (SafetensorsHeader.NameOf(tensor.dtype) is null)
                {
                    throw new NotSupportedException($"Tensor '{name}' is {tensor.dtype}, which cannot be written to safetensors here (supported: {SafetensorsHeader.SupportedNames}).");
                }

                if (tensor.numel() * tensor.ElementSize > Array.MaxLength)
                {
                    throw new NotSupportedException($"Tensor '{name}' has {tensor.numel() * tensor.ElementSize} bytes, more than one tensor may have here ({Array.MaxLength}).");
                }
            }

            var order = tensors.Select(p => (Name: p.Key, Tensor: p.Value))
                .OrderByDescending(p => p.Tensor.ElementSize)
                .ThenBy(p => p.Name, StringComparer.Ordinal)
                .ToList();

            var json = new ArrayBufferWriter<byte>();
            long offset = 0;
            using (var writer = new Utf8JsonWriter(json))
            {
                writer.WriteStartObject();
                writer.WriteStartObject(SafetensorsHeader.MetadataKey);
                var fields = new SortedDictionary<string, string>(StringComparer.Ordinal) { ["format"] = "pt" };
                foreach (var (key, value) in metadata ?? new Dictionary<string, string>())
                {
                    ArgumentNullException.ThrowIfNull(value, $"{nameof(metadata)}['{key}']");
                    fields[key] = value;
                }

                foreach (var (key, value) in fields)
                {
                    writer.WriteString(key, value);
                }

                writer.WriteEndObject();
                foreach (var (name, tensor) in order)
                {
                    long bytes = tensor.numel() * tensor.ElementSize;
                    writer.WriteStartObject(name);
                    writer.WriteString("dtype", SafetensorsHeader.NameOf(tensor.dtype));
                    writer.WriteStartArray("shape");
                    foreach (long size in tensor.shape)
                    {
                        writer.WriteNumberValue(size);
                    }

                    writer.WriteEndArray();
                    writer.WriteStartArray("data_offsets");
                    writer.WriteNumberValue(offset);
                    writer.WriteNumberValue(offset + bytes);
                    writer.WriteEndArray();
                    writer.WriteEndObject();
                    offset += bytes;
                }

                writer.WriteEndObject();
            }

            // Spaces pad the JSON so the data starts 8-byte aligned, as the reference implementation does.
            int padded = (json.WrittenCount + 7) / 8 * 8;
            var header = new byte[8 + padded];
            BinaryPrimitives.WriteUInt64LittleEndian(header, (ulong)padded);
            json.WrittenSpan.CopyTo(header.AsSpan(8));
            header.AsSpan(8 + json.WrittenCount).Fill((byte)' ');
            return new Layout(header, order, header.Length + offset);
        }

        public void WriteTo(Stream stream)
        {
            stream.Write(header);
            foreach (var (_, tensor) in order)
            {
                // The scope frees the detached, CPU and contiguous copies; the caller's tensor is never among them.
                using var scope = torch.NewDisposeScope();
                var data = tensor.detach().cpu().contiguous();
                stream.Write(data.bytes);
            }
        }
    }
}
