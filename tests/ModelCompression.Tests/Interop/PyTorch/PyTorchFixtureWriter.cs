using System.Buffers.Binary;
using System.IO.Compression;
using System.Text;
using ModelCompression.Samples;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Interop.PyTorch;

/// <summary>
/// Writes a state_dict as <c>torch.save(model.state_dict(), path)</c> does (the zip format of PyTorch 1.6 and later),
/// assembled by hand so the import tests do not depend on PyTorch, nor on the pickler of the library under test.
/// Interop/Fixtures/README.md describes the layout and the committed fixtures made with it.
/// </summary>
internal static class PyTorchFixtureWriter
{
    /// <summary>The committed fixtures' file names.</summary>
    public const string LeNet5File = "lenet5.pt";

    /// <summary>The committed SmallResNet fixture's file name.</summary>
    public const string SmallResNetFile = "smallresnet.pt";

    /// <summary>The seed of the zoo model each fixture holds.</summary>
    public const int Seed = 1;

    /// <summary>The batch counter written into every BatchNorm of the SmallResNet fixture.</summary>
    public const long BatchesTracked = 7;

    /// <summary>Every zip entry's timestamp, so that the fixtures are byte-for-byte reproducible.</summary>
    private static readonly DateTimeOffset Timestamp = new(1980, 1, 1, 0, 0, 0, TimeSpan.Zero);

    /// <summary>
    /// Gets the PyTorch names of LeNet-5's layers: an <c>nn.Sequential</c> of the zoo's twelve layers names its children
    /// by index, so conv1 is 0, conv2 3, fc1 7, fc2 9 and fc3 11. Keys are PyTorch prefixes, values the zoo's.
    /// </summary>
    public static IReadOnlyDictionary<string, string> LeNet5Renames { get; } = new Dictionary<string, string>
    {
        ["0."] = "conv1.",
        ["3."] = "conv2.",
        ["7."] = "fc1.",
        ["9."] = "fc2.",
        ["11."] = "fc3.",
    };

    /// <summary>
    /// Gets the PyTorch names of SmallResNet's layers in an <c>nn.Sequential</c>: conv1 0, bn1 1, block 4 (whose own
    /// children keep their attribute names), conv2 5, bn2 6, fc 10. Keys are PyTorch prefixes, values the zoo's.
    /// </summary>
    public static IReadOnlyDictionary<string, string> SmallResNetRenames { get; } = new Dictionary<string, string>
    {
        ["0."] = "conv1.",
        ["1."] = "bn1.",
        ["4."] = "block.",
        ["5."] = "conv2.",
        ["6."] = "bn2.",
        ["10."] = "fc.",
    };

    /// <summary>Builds a committed fixture's bytes from scratch.</summary>
    /// <param name="file">One of <see cref="LeNet5File"/> and <see cref="SmallResNetFile"/>.</param>
    /// <returns>The file's bytes.</returns>
    public static byte[] Create(string file)
    {
        using var model = file switch
        {
            LeNet5File => ModelZoo.Create(ZooModel.LeNet5, Seed),
            SmallResNetFile => SmallResNetSource(),
            _ => throw new ArgumentException($"No fixture '{file}'.", nameof(file)),
        };
        var renames = file == LeNet5File ? LeNet5Renames : SmallResNetRenames;
        return Write(Path.GetFileNameWithoutExtension(file), PyTorchStateDict(model, renames));
    }

    /// <summary>
    /// The model the SmallResNet fixture holds: the zoo's SmallResNet of <see cref="Seed"/>, in evaluation mode, with
    /// every BatchNorm's running mean from U(-0.5, 0.5) and running variance from U(0.5, 1.5) (one generator of seed
    /// <see cref="Seed"/>, layer by layer) and its batch counter <see cref="BatchesTracked"/>, so the buffers matter.
    /// </summary>
    /// <returns>A new model.</returns>
    public static nn.Module<Tensor, Tensor> SmallResNetSource()
    {
        var model = ModelZoo.Create(ZooModel.SmallResNet, Seed);
        using var generator = new Generator(Seed);
        using (no_grad())
        {
            foreach (var bn in model.modules().OfType<TorchSharp.Modules.BatchNorm2d>())
            {
                using var scope = NewDisposeScope();
                long channels = bn.running_mean!.shape[0];
                bn.running_mean.copy_(rand(channels, generator: generator) - 0.5);
                bn.running_var!.copy_(rand(channels, generator: generator) + 0.5);
                bn.num_batches_tracked!.fill_(BatchesTracked);
            }
        }

        model.eval();
        return model;
    }

    /// <summary>
    /// A model's tensors under the names and in the order PyTorch's <c>state_dict()</c> gives them: module by module,
    /// depth first, each module's own parameters then its own buffers; our prefixes renamed to PyTorch's.
    /// </summary>
    /// <param name="model">The model.</param>
    /// <param name="renames">PyTorch prefix to our prefix.</param>
    /// <returns>The tensors, the model's own (not copies).</returns>
    public static List<(string Key, Tensor Tensor)> PyTorchStateDict(nn.Module model, IReadOnlyDictionary<string, string> renames)
    {
        var result = new List<(string Key, Tensor Tensor)>();
        Visit(string.Empty, model);
        return result;

        void Visit(string prefix, nn.Module module)
        {
            var own = module.named_parameters(recurse: false).Select(p => (p.name, (Tensor)p.parameter))
                .Concat(module.named_buffers(recurse: false).Select(b => (b.name, b.buffer)));
            foreach (var (name, tensor) in own)
            {
                string key = prefix + name;
                var rename = renames.Where(r => key.StartsWith(r.Value, StringComparison.Ordinal)).OrderByDescending(r => r.Value.Length).FirstOrDefault();
                result.Add((rename.Key is null ? key : rename.Key + key[rename.Value.Length..], tensor));
            }

            foreach (var (name, child) in module.named_children())
            {
                Visit(prefix + name + ".", child);
            }
        }
    }

    /// <summary>
    /// Writes a PyTorch zip file: <c>{archive}/data.pkl</c> (the pickle), <c>{archive}/byteorder</c>,
    /// <c>{archive}/data/0</c>… (each tensor's storage, raw little-endian) and <c>{archive}/version</c>, every entry
    /// stored uncompressed with a fixed timestamp.
    /// </summary>
    /// <param name="archive">The archive's folder name (torch.save uses the file name without its extension).</param>
    /// <param name="stateDict">The tensors in state_dict order.</param>
    /// <returns>The file's bytes.</returns>
    public static byte[] Write(string archive, IReadOnlyList<(string Key, Tensor Tensor)> stateDict)
    {
        using var buffer = new MemoryStream();
        using (var zip = new ZipArchive(buffer, ZipArchiveMode.Create, leaveOpen: true))
        {
            Add(zip, $"{archive}/data.pkl", Pickle(stateDict));
            Add(zip, $"{archive}/byteorder", "little"u8.ToArray());
            for (int i = 0; i < stateDict.Count; i++)
            {
                using var scope = NewDisposeScope();
                Add(zip, $"{archive}/data/{i}", stateDict[i].Tensor.detach().cpu().contiguous().bytes.ToArray());
            }

            Add(zip, $"{archive}/version", "3\n"u8.ToArray());
        }

        return buffer.ToArray();
    }

    /// <summary>
    /// The pickle (protocol 2) of an <c>OrderedDict</c> of tensors, as <c>torch.save</c> writes it without memoization:
    /// each tensor is a call of <c>torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)</c>
    /// whose storage is a persistent id <c>('storage', torch.FloatStorage, '0', 'cpu', numel)</c>; then the dict's
    /// <c>_metadata</c> attribute (<c>{'': {'version': 1}, '0': {'version': 1}, ...}</c>) set by BUILD.
    /// </summary>
    /// <param name="stateDict">The tensors in state_dict order.</param>
    /// <returns>The pickle's bytes.</returns>
    public static byte[] Pickle(IReadOnlyList<(string Key, Tensor Tensor)> stateDict) =>
        Pickle(stateDict.Select((t, i) => new PickledView(
            t.Key, StorageName(t.Tensor.dtype), i.ToString(System.Globalization.CultureInfo.InvariantCulture), t.Tensor.numel(), 0, t.Tensor.shape, ContiguousStrides(t.Tensor.shape))).ToList());

    /// <summary>
    /// The pickle of an <c>OrderedDict</c> of tensors described field by field, so that tests can write any storage
    /// size, offset, shape and strides, consistent with the storages' bytes or not.
    /// </summary>
    /// <param name="views">The tensors in state_dict order.</param>
    /// <returns>The pickle's bytes.</returns>
    public static byte[] Pickle(IReadOnlyList<PickledView> views)
    {
        var p = new PickleBuilder();
        p.Op(0x80).Byte(2); // PROTO 2
        p.NewOrderedDict();
        p.SetItems(views.Count, i =>
        {
            var view = views[i];
            p.Unicode(view.Key);
            p.Global("torch._utils", "_rebuild_tensor_v2");
            p.Op('(');                                 // MARK: the call's arguments
            p.Op('(');                                 // MARK: the persistent id
            p.Unicode("storage");
            p.Global("torch", view.StorageType);
            p.Unicode(view.StorageKey);
            p.Unicode("cpu");
            p.Int(view.StorageElements);
            p.Op('t');                                 // TUPLE
            p.Op('Q');                                 // BINPERSID
            p.Int(view.Offset);                        // storage offset
            p.Tuple(view.Shape);
            p.Tuple(view.Strides);
            p.Op(0x89);                                // NEWFALSE: requires_grad
            p.NewOrderedDict();                        // backward hooks
            p.Op('t');                                 // TUPLE
            p.Op('R');                                 // REDUCE
        });

        // The state: {'_metadata': OrderedDict(module -> {'version': 1})}, every module that owns a tensor and its parents.
        var modules = new List<string> { string.Empty };
        foreach (var key in views.Select(v => v.Key))
        {
            var parts = key.Split('.');
            for (int depth = 1; depth < parts.Length; depth++)
            {
                string module = string.Join('.', parts[..depth]);
                if (!modules.Contains(module))
                {
                    modules.Add(module);
                }
            }
        }

        p.Op('}');                                     // EMPTY_DICT
        p.Unicode("_metadata");
        p.NewOrderedDict();
        p.SetItems(modules.Count, i =>
        {
            p.Unicode(modules[i]);
            p.Op('}');
            p.Unicode("version");
            p.Int(1);
            p.Op('s');                                 // SETITEM
        });
        p.Op('s');                                     // SETITEM
        p.Op('b');                                     // BUILD
        p.Op('.');                                     // STOP
        return p.ToArray();
    }

    /// <summary>The storage type PyTorch names for a dtype (<c>FloatStorage</c> for float32, and so on).</summary>
    /// <param name="dtype">The dtype.</param>
    /// <returns>The storage type's name.</returns>
    public static string StorageName(ScalarType dtype) => dtype switch
    {
        ScalarType.Float64 => "DoubleStorage",
        ScalarType.Float32 => "FloatStorage",
        ScalarType.Float16 => "HalfStorage",
        ScalarType.BFloat16 => "BFloat16Storage",
        ScalarType.Int64 => "LongStorage",
        ScalarType.Int32 => "IntStorage",
        ScalarType.Int16 => "ShortStorage",
        ScalarType.Int8 => "CharStorage",
        ScalarType.Byte => "ByteStorage",
        ScalarType.Bool => "BoolStorage",
        _ => throw new NotSupportedException($"No PyTorch storage for {dtype}."),
    };

    /// <summary>The strides of a contiguous tensor of a shape.</summary>
    /// <param name="shape">The shape.</param>
    /// <returns>The strides, in elements.</returns>
    public static long[] ContiguousStrides(long[] shape)
    {
        var strides = new long[shape.Length];
        long stride = 1;
        for (int i = shape.Length - 1; i >= 0; i--)
        {
            strides[i] = stride;
            stride *= shape[i];
        }

        return strides;
    }

    private static void Add(ZipArchive zip, string name, byte[] data)
    {
        var entry = zip.CreateEntry(name, CompressionLevel.NoCompression);
        entry.LastWriteTime = Timestamp;
        using var stream = entry.Open();
        stream.Write(data);
    }

    /// <summary>Pickle opcodes, written as Python's pickle module writes them at protocol 2.</summary>
    private sealed class PickleBuilder
    {
        private readonly MemoryStream bytes = new();

        public PickleBuilder Op(char opcode) => Byte((byte)opcode);

        public PickleBuilder Op(byte opcode) => Byte(opcode);

        public PickleBuilder Byte(byte value)
        {
            bytes.WriteByte(value);
            return this;
        }

        /// <summary>GLOBAL: <c>c</c>, module, newline, name, newline.</summary>
        public void Global(string module, string name)
        {
            Op('c');
            bytes.Write(Encoding.ASCII.GetBytes($"{module}\n{name}\n"));
        }

        /// <summary>BINUNICODE: <c>X</c>, a 4-byte little-endian length, UTF-8.</summary>
        public void Unicode(string value)
        {
            var utf8 = Encoding.UTF8.GetBytes(value);
            Op('X');
            Span<byte> length = stackalloc byte[4];
            BinaryPrimitives.WriteInt32LittleEndian(length, utf8.Length);
            bytes.Write(length);
            bytes.Write(utf8);
        }

        /// <summary>BININT1 (<c>K</c>), BININT2 (<c>M</c>), BININT (<c>J</c>) or LONG1, the shortest that holds the value.</summary>
        public void Int(long value)
        {
            Span<byte> buffer = stackalloc byte[4];
            if (value is >= 0 and < 256)
            {
                Op('K').Byte((byte)value);
            }
            else if (value is >= 0 and < 65536)
            {
                Op('M');
                BinaryPrimitives.WriteUInt16LittleEndian(buffer, (ushort)value);
                bytes.Write(buffer[..2]);
            }
            else if (value is >= int.MinValue and <= int.MaxValue)
            {
                Op('J');
                BinaryPrimitives.WriteInt32LittleEndian(buffer, (int)value);
                bytes.Write(buffer);
            }
            else
            {
                // LONG1: a length byte, then the value in two's complement, little-endian.
                Span<byte> wide = stackalloc byte[8];
                BinaryPrimitives.WriteInt64LittleEndian(wide, value);
                Op(0x8A).Byte(8);
                bytes.Write(wide);
            }
        }

        /// <summary>A tuple of ints: EMPTY_TUPLE, TUPLE1, TUPLE2, TUPLE3, or MARK … TUPLE for longer ones.</summary>
        public void Tuple(long[] values)
        {
            if (values.Length > 3)
            {
                Op('(');
            }

            foreach (long value in values)
            {
                Int(value);
            }

            Op(values.Length switch { 0 => (byte)')', 1 => (byte)0x85, 2 => (byte)0x86, 3 => (byte)0x87, _ => (byte)'t' });
        }

        /// <summary><c>collections.OrderedDict()</c>: GLOBAL, EMPTY_TUPLE, REDUCE.</summary>
        public void NewOrderedDict()
        {
            Global("collections", "OrderedDict");
            Op(')').Op('R');
        }

        /// <summary>Items of the dict on the stack: MARK … SETITEMS for several, a bare SETITEM for one, as pickle batches them.</summary>
        public void SetItems(int count, Action<int> writeItem)
        {
            if (count == 1)
            {
                writeItem(0);
                Op('s');
                return;
            }

            if (count > 1)
            {
                Op('(');
                for (int i = 0; i < count; i++)
                {
                    writeItem(i);
                }

                Op('u');
            }
        }

        public byte[] ToArray() => bytes.ToArray();
    }
}

/// <summary>One tensor of a hand-written pickle: a view of storage <c>data/{StorageKey}</c>.</summary>
/// <param name="Key">The state_dict key.</param>
/// <param name="StorageType">The storage type, such as <c>FloatStorage</c>.</param>
/// <param name="StorageKey">The storage's entry name under <c>data/</c>.</param>
/// <param name="StorageElements">The storage's element count as declared.</param>
/// <param name="Offset">The view's storage offset.</param>
/// <param name="Shape">The view's shape.</param>
/// <param name="Strides">The view's strides.</param>
public sealed record PickledView(string Key, string StorageType, string StorageKey, long StorageElements, long Offset, long[] Shape, long[] Strides);
