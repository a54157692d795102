using System.Buffers.Binary;
using System.Text;

namespace ModelCompression.Interop.PyTorch;

/// <summary>A tensor as a <c>torch.save</c> pickle describes it: a view (offset, shape, strides) of a storage entry.</summary>
/// <param name="Key">The state_dict key.</param>
/// <param name="StorageType">The storage type's name, such as <c>FloatStorage</c>.</param>
/// <param name="StorageKey">The storage's name in the archive (<c>data/{StorageKey}</c>).</param>
/// <param name="StorageElements">The storage's element count as the pickle declares it.</param>
/// <param name="Offset">The view's storage offset, in elements.</param>
/// <param name="Shape">The view's shape.</param>
/// <param name="Strides">The view's strides, in elements.</param>
internal sealed record PickledTensor(string Key, string StorageType, string StorageKey, long StorageElements, long Offset, long[] Shape, long[] Strides);

/// <summary>
/// Reads what a <c>torch.save(state_dict)</c> pickle describes without running it: a small pickle machine that knows the
/// opcodes torch.save and Python's pickler emit for a dict of tensors, builds inert values (nothing is called, no type is
/// looked up), and accepts only <c>collections.OrderedDict</c> and <c>torch._utils._rebuild_tensor_v2</c> as calls.
/// </summary>
/// <remarks>
/// It runs before TorchSharp.PyBridge sees the file, so that every storage and every view can be checked against the
/// bytes present before a tensor is allocated. Every length is checked against the bytes left before anything is
/// allocated, and values are kept small (shared constants, no copies), so memory stays in proportion to the pickle.
/// </remarks>
internal static class StateDictPickle
{
    private static readonly object True = true;
    private static readonly object False = false;
    private static readonly object[] SmallInts = Enumerable.Range(0, 256).Select(i => (object)(long)i).ToArray();
    private static readonly Tuple EmptyTuple = new([]);

    /// <summary>Reads the tensors a state_dict pickle holds, in the order it holds them.</summary>
    /// <param name="pickle">The pickle (the archive's <c>data.pkl</c>).</param>
    /// <param name="fail">Makes the exception for a problem, given its description.</param>
    /// <returns>The tensors.</returns>
    public static List<PickledTensor> Read(byte[] pickle, Func<string, InvalidDataException> fail)
    {
        var machine = new Machine(pickle, fail);
        var root = machine.Run();
        if (root is not Dict dict)
        {
            throw fail($"its pickle holds a {Describe(root)}, not a state_dict (a dict of tensors)");
        }

        var tensors = new List<PickledTensor>(dict.Items.Count);
        var keys = new HashSet<string>(StringComparer.Ordinal);
        var wrong = new List<string>();
        foreach (var (key, value) in dict.Items)
        {
            if (key is not string name)
            {
                throw fail($"its state_dict has a key that is a {Describe(key)}, not a string");
            }

            if (!keys.Add(name))
            {
                throw fail($"its state_dict holds the key '{name}' twice");
            }

            if (value is TensorCall call)
            {
                tensors.Add(call.ToTensor(name, fail));
            }
            else
            {
                wrong.Add($"'{name}' ({Describe(value)})");
            }
        }

        if (wrong.Count > 0)
        {
            throw fail($"it does not hold a bare state_dict: its entries {string.Join(", ", wrong)} are not tensors. A training checkpoint holding a state_dict and more must be re-saved as the state_dict alone");
        }

        return tensors;
    }

    private static string Describe(object? value) => value switch
    {
        null => "None",
        string => "string",
        long => "int",
        bool => "bool",
        double => "float",
        Tuple => "tuple",
        List<object?> => "list",
        Dict => "dict",
        Global g => $"reference to {g.Module}.{g.Name}",
        TensorCall => "tensor",
        Storage => "storage",
        _ => value.GetType().Name,
    };

    /// <summary>A tuple's items.</summary>
    private sealed record Tuple(object?[] Items);

    /// <summary>A dict or OrderedDict, its items in insertion order (a repeated key is kept twice and rejected later).</summary>
    private sealed class Dict
    {
        private List<(object? Key, object? Value)>? items;

        /// <summary>Gets the items, made on first use so that an empty dict costs one small object.</summary>
        public List<(object? Key, object? Value)> Items => items ??= [];
    }

    /// <summary>A module-level name (GLOBAL); never resolved.</summary>
    private sealed record Global(string Module, string Name);

    /// <summary>A storage named by a persistent id <c>('storage', torch.XStorage, key, location, numel)</c>.</summary>
    private sealed record Storage(string Type, string Key, long Elements);

    /// <summary>A call of <c>torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, ...)</c>.</summary>
    private sealed record TensorCall(object?[] Args)
    {
        public PickledTensor ToTensor(string key, Func<string, InvalidDataException> fail)
        {
            // TorchSharp.PyBridge reads the first five arguments with these types; anything else would fail inside it.
            if (Args.Length < 5 || Args[0] is not Storage storage || Args[1] is not long offset
                || Args[2] is not Tuple shape || Args[3] is not Tuple strides || Args[4] is not bool)
            {
                throw fail($"tensor '{key}' is not written as torch._utils._rebuild_tensor_v2(storage, offset, shape, strides, requires_grad, ...)");
            }

            return new PickledTensor(key, storage.Type, storage.Key, storage.Elements, offset, Ints(shape, "shape"), Ints(strides, "strides"));

            long[] Ints(Tuple tuple, string what)
            {
                var result = new long[tuple.Items.Length];
                for (int i = 0; i < result.Length; i++)
                {
                    result[i] = tuple.Items[i] is long value ? value : throw fail($"tensor '{key}' has a {what} that is not a tuple of integers");
                }

                return result;
            }
        }
    }

    private sealed class Machine(byte[] pickle, Func<string, InvalidDataException> fail)
    {
        private readonly List<object?> stack = [];
        private readonly List<int> marks = [];
        private readonly Dictionary<long, object?> memo = [];
        private int at;

        public object? Run()
        {
            while (at < pickle.Length)
            {
                int opcodeAt = at;
                byte op = pickle[at++];
                switch (op)
                {
                    case 0x80: Take(1); break;                                   // PROTO
                    case 0x95: Take(8); break;                                   // FRAME: framing only
                    case (byte)'.':                                              // STOP
                        return Pop();
                    case (byte)'(': marks.Add(stack.Count); break;               // MARK
                    case (byte)'0': Pop(); break;                                // POP
                    case (byte)'1': PopMark(); break;                            // POP_MARK
                    case (byte)'2': stack.Add(Peek()); break;                    // DUP
                    case (byte)'N': stack.Add(null); break;                      // NONE
                    case 0x88: stack.Add(True); break;                           // NEWTRUE
                    case 0x89: stack.Add(False); break;                          // NEWFALSE
                    case (byte)'K': stack.Add(Int(Take(1)[0])); break;           // BININT1
                    case (byte)'M': stack.Add(Int(BinaryPrimitives.ReadUInt16LittleEndian(Take(2)))); break; // BININT2
                    case (byte)'J': stack.Add(Int(BinaryPrimitives.ReadInt32LittleEndian(Take(4)))); break;  // BININT
                    case 0x8A: stack.Add(Long1()); break;                        // LONG1
                    case (byte)'G': stack.Add(BinaryPrimitives.ReadDoubleBigEndian(Take(8))); break; // BINFLOAT
                    case (byte)'X': stack.Add(Text(BinaryPrimitives.ReadUInt32LittleEndian(Take(4)))); break; // BINUNICODE
                    case 0x8C: stack.Add(Text(Take(1)[0])); break;              // SHORT_BINUNICODE
                    case 0x8D: stack.Add(Text(BinaryPrimitives.ReadUInt64LittleEndian(Take(8)))); break; // BINUNICODE8
                    case (byte)')': stack.Add(EmptyTuple); break;                // EMPTY_TUPLE
                    case (byte)'t': stack.Add(new Tuple(PopMark())); break;      // TUPLE
                    case 0x85: stack.Add(new Tuple(PopN(1))); break;             // TUPLE1
                    case 0x86: stack.Add(new Tuple(PopN(2))); break;             // TUPLE2
                    case 0x87: stack.Add(new Tuple(PopN(3))); break;             // TUPLE3
                    case (byte)']': stack.Add(new List<object?>()); break;       // EMPTY_LIST
                    case (byte)'a': Append(PopN(1)); break;                      // APPEND
                    case (byte)'e': Append(PopMark()); break;                    // APPENDS
                    case (byte)'}': stack.Add(new Dict()); break;                // EMPTY_DICT
                    case (byte)'s': SetItems(PopN(2)); break;                    // SETITEM
                    case (byte)'u': SetItems(PopMark()); break;                  // SETITEMS
                    case (byte)'c': stack.Add(new Global(Line(), Line())); break; // GLOBAL
                    case 0x93:                                                   // STACK_GLOBAL
                        var names = PopN(2);
                        stack.Add(names[0] is string module && names[1] is string name ? new Global(module, name) : throw fail($"its pickle has a STACK_GLOBAL without two strings at byte {opcodeAt}"));
                        break;
                    case (byte)'R': Reduce(opcodeAt); break;                     // REDUCE
                    case (byte)'b': Build(opcodeAt); break;                      // BUILD
                    case (byte)'Q': stack.Add(Persistent(Pop(), opcodeAt)); break; // BINPERSID
                    case (byte)'q': memo[Take(1)[0]] = Peek(); break;            // BINPUT
                    case (byte)'r': memo[BinaryPrimitives.ReadUInt32LittleEndian(Take(4))] = Peek(); break; // LONG_BINPUT
                    case 0x94: memo[memo.Count] = Peek(); break;                 // MEMOIZE
                    case (byte)'h': stack.Add(Get(Take(1)[0], opcodeAt)); break; // BINGET
                    case (byte)'j': stack.Add(Get(BinaryPrimitives.ReadUInt32LittleEndian(Take(4)), opcodeAt)); break; // LONG_BINGET
                    default:
                        throw fail($"its pickle has opcode 0x{op:X2} at byte {opcodeAt}, which a torch.save state_dict does not use");
                }
            }

            throw fail("its pickle ends without a STOP opcode (it is truncated)");
        }

        private static object Int(long value) => value is >= 0 and < 256 ? SmallInts[value] : value;

        private ReadOnlySpan<byte> Take(long count)
        {
            if (count > pickle.Length - at)
            {
                throw fail($"its pickle needs {count} bytes at byte {at} but has {pickle.Length - at} left (it is truncated or corrupt)");
            }

            var span = pickle.AsSpan(at, (int)count);
            at += (int)count;
            return span;
        }

        private object Long1()
        {
            var bytes = Take(Take(1)[0]);
            if (bytes.Length > 8)
            {
                throw fail($"its pickle has an integer of {bytes.Length} bytes at byte {at - bytes.Length}, too large for a tensor's metadata");
            }

            Span<byte> wide = stackalloc byte[8];
            wide.Fill(bytes.Length > 0 && (bytes[^1] & 0x80) != 0 ? (byte)0xFF : (byte)0);
            bytes.CopyTo(wide);
            return Int(BinaryPrimitives.ReadInt64LittleEndian(wide));
        }

        private string Text(ulong length)
        {
            int start = at;
            var bytes = Take(length > int.MaxValue ? long.MaxValue : (long)length);
            try
            {
                return Strict.GetString(bytes);
            }
            catch (DecoderFallbackException)
            {
                throw fail($"its pickle has a string that is not valid UTF-8 at byte {start}");
            }
        }

        /// <summary>A GLOBAL operand: ASCII up to a newline.</summary>
        private string Line()
        {
            int end = pickle.AsSpan(at).IndexOf((byte)'\n');
            if (end < 0 || end > 256)
            {
                throw fail($"its pickle has a GLOBAL without a short newline-terminated name at byte {at}");
            }

            string line = Encoding.ASCII.GetString(pickle, at, end);
            at += end + 1;
            return line;
        }

        private object? Pop()
        {
            if (stack.Count == 0 || (marks.Count > 0 && marks[^1] == stack.Count))
            {
                throw fail($"its pickle pops an empty stack at byte {at - 1}");
            }

            var value = stack[^1];
            stack.RemoveAt(stack.Count - 1);
            return value;
        }

        private object? Peek() => stack.Count > 0 ? stack[^1] : throw fail($"its pickle reads an empty stack at byte {at - 1}");

        private object?[] PopN(int count)
        {
            int floor = marks.Count > 0 ? marks[^1] : 0;
            if (stack.Count - floor < count)
            {
                throw fail($"its pickle needs {count} values on the stack at byte {at - 1}");
            }

            var items = stack.GetRange(stack.Count - count, count).ToArray();
            stack.RemoveRange(stack.Count - count, count);
            return items;
        }

        private object?[] PopMark()
        {
            if (marks.Count == 0)
            {
                throw fail($"its pickle has no MARK for the opcode at byte {at - 1}");
            }

            int mark = marks[^1];
            marks.RemoveAt(marks.Count - 1);
            var items = stack.GetRange(mark, stack.Count - mark).ToArray();
            stack.RemoveRange(mark, stack.Count - mark);
            return items;
        }

        private object? Get(long index, int opcodeAt) =>
            memo.TryGetValue(index, out var value) ? value : throw fail($"its pickle refers to memo {index}, never stored, at byte {opcodeAt}");

        private void Append(object?[] items)
        {
            if (Peek() is not List<object?> list)
            {
                throw fail($"its pickle appends to something that is not a list at byte {at - 1}");
            }

            list.AddRange(items);
        }

        private void SetItems(object?[] items)
        {
            if (items.Length % 2 != 0 || Peek() is not Dict dict)
            {
                throw fail($"its pickle sets items on something that is not a dict at byte {at - 1}");
            }

            for (int i = 0; i < items.Length; i += 2)
            {
                dict.Items.Add((items[i], items[i + 1]));
            }
        }

        private void Reduce(int opcodeAt)
        {
            var args = Pop();
            var callable = Pop();
            if (callable is not Global global || args is not Tuple tuple)
            {
                throw fail($"its pickle calls something other than a named function at byte {opcodeAt}");
            }

            stack.Add((global.Module, global.Name) switch
            {
                ("collections", "OrderedDict") when tuple.Items.Length == 0 => new Dict(),
                ("torch._utils", "_rebuild_tensor_v2") => new TensorCall(tuple.Items),
                ("torch._utils", "_rebuild_parameter") => throw fail("it holds a whole pickled model (nn.Parameter objects), not a state_dict: save torch.save(model.state_dict(), path) instead"),
                _ => throw fail($"its pickle calls {global.Module}.{global.Name} at byte {opcodeAt}, which a state_dict loader does not run"),
            });
        }

        private void Build(int opcodeAt)
        {
            // torch.save sets an OrderedDict's _metadata (layer versions) this way; it carries no tensor.
            Pop();
            if (Peek() is not Dict)
            {
                throw fail($"its pickle sets the state of something other than a dict at byte {opcodeAt}");
            }
        }

        private Storage Persistent(object? pid, int opcodeAt)
        {
            if (pid is Tuple { Items: ["storage", Global { Module: "torch" } type, string key, string, long elements] })
            {
                return key.Length > 0 && elements >= 0
                    ? new Storage(type.Name, key, elements)
                    : throw fail($"its pickle names storage '{key}' with {elements} elements at byte {opcodeAt}");
            }

            throw fail($"its pickle has a persistent id that is not ('storage', torch.XStorage, key, location, size) at byte {opcodeAt}");
        }
    }

    private static readonly UTF8Encoding Strict = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);
}
