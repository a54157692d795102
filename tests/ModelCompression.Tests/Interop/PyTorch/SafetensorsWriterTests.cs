using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using ModelCompression.Interop.PyTorch;
using ModelCompression.Samples;
using NUnit.Framework;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Interop.PyTorch;

[TestFixture]
public sealed class SafetensorsWriterTests
{
    private string directory = string.Empty;

    [SetUp]
    public void SetUp()
    {
        directory = Path.Combine(Path.GetTempPath(), "mc-safetensors-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(directory);
    }

    [TearDown]
    public void TearDown() => Directory.Delete(directory, recursive: true);

    /// <summary>A tensor of every supported dtype, plus a scalar, an empty tensor and a non-contiguous one.</summary>
    private static Dictionary<string, Tensor> EveryDtype()
    {
        using var generator = new Generator(5);
        var x = randn([3, 4], generator: generator);
        return new Dictionary<string, Tensor>
        {
            ["f64"] = x.to_type(float64),
            ["f32"] = x.clone(),
            ["f16"] = x.to_type(float16),
            ["bf16"] = x.to_type(bfloat16),
            ["i64"] = arange(-5, 7, dtype: int64).reshape(3, 4) * 1_000_000_007L,
            ["i32"] = arange(-6, 6, dtype: int32),
            ["i16"] = arange(-300, 300, 50, dtype: int16),
            ["i8"] = arange(-128, 128, 37, dtype: int8),
            ["u8"] = arange(0, 256, 23, dtype: uint8),
            ["bool"] = x > 0,
            ["scalar"] = tensor(2.5f),
            ["empty"] = zeros(0, 3),
            ["transposed"] = x.t(),
        };
    }

    [Test]
    public void Save_EverySupportedDtype_PyBridgeReadsIdenticalTensors()
    {
        using var scope = NewDisposeScope();
        var tensors = EveryDtype();
        using var stream = new MemoryStream();

        long written = SafetensorsWriter.Save(tensors, stream);

        Assert.That(stream.Length, Is.EqualTo(written));
        stream.Position = 0;
        var read = TorchSharp.PyBridge.Safetensors.LoadStateDict(stream, leaveOpen: true, keysToKeep: null);
        Assert.That(read.Keys, Is.EquivalentTo(tensors.Keys));
        foreach (var (name, expected) in tensors)
        {
            var actual = read[name];
            Assert.That(actual.dtype, Is.EqualTo(expected.dtype), name);
            Assert.That(actual.shape, Is.EqualTo(expected.shape), name);
            Assert.That(actual.bytes.ToArray(), Is.EqualTo(expected.contiguous().bytes.ToArray()), name);
        }
    }

    [Test]
    public void Save_Header_DescribesEveryTensorInReferenceOrderPaddedToEightBytes()
    {
        using var scope = NewDisposeScope();
        var tensors = EveryDtype();
        using var stream = new MemoryStream();
        SafetensorsWriter.Save(tensors, stream, new Dictionary<string, string> { ["source"] = "test" });
        var file = stream.ToArray();

        ulong length = BinaryPrimitives.ReadUInt64LittleEndian(file);
        Assert.That(length % 8, Is.EqualTo(0UL), "the data starts 8-byte aligned");
        string json = Encoding.UTF8.GetString(file, 8, (int)length);
        Assert.That(json, Does.StartWith("{\"__metadata__\":{"));
        Assert.That(json.TrimEnd(' '), Does.EndWith("}"), "padded with spaces only");
        Assert.That(json.Length - json.TrimEnd(' ').Length, Is.LessThan(8));

        using var header = JsonDocument.Parse(json);
        var properties = header.RootElement.EnumerateObject().ToList();
        Assert.That(properties[0].Value.GetProperty("format").GetString(), Is.EqualTo("pt"));
        Assert.That(properties[0].Value.GetProperty("source").GetString(), Is.EqualTo("test"));
        var names = properties.Skip(1).Select(p => p.Name).ToList();
        Assert.That(names, Is.EqualTo(new[] { "f64", "i64", "empty", "f32", "i32", "scalar", "transposed", "bf16", "f16", "i16", "bool", "i8", "u8" }),
            "largest element first, then by name, as the reference implementation orders them");

        long offset = 0;
        foreach (var property in properties.Skip(1))
        {
            var tensor = tensors[property.Name];
            long bytes = tensor.numel() * tensor.ElementSize;
            Assert.That(property.Value.GetProperty("shape").EnumerateArray().Select(e => e.GetInt64()), Is.EqualTo(tensor.shape), property.Name);
            Assert.That(property.Value.GetProperty("data_offsets").EnumerateArray().Select(e => e.GetInt64()), Is.EqualTo(new[] { offset, offset + bytes }), property.Name);
            Assert.That(offset % tensor.ElementSize, Is.EqualTo(0), $"{property.Name} is aligned to its element size");
            offset += bytes;
        }

        Assert.That(file.Length, Is.EqualTo(8 + (long)length + offset));
        Assert.That(properties.Skip(1).Select(p => p.Value.GetProperty("dtype").GetString()).Distinct(),
            Is.EquivalentTo(new[] { "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL" }));
    }

    [Test]
    public void Save_ToPath_ReplacesTheFileAndLeavesNoTemporaryFile()
    {
        string path = Path.Combine(directory, "model.safetensors");
        File.WriteAllText(path, "old");
        using var model = ModelZoo.Create(ZooModel.LeNet5, 1);

        long written = SafetensorsWriter.Save(model, path);

        Assert.That(new FileInfo(path).Length, Is.EqualTo(written));
        Assert.That(Directory.GetFiles(directory), Is.EqualTo(new[] { path }));
    }

    [Test]
    public void Save_UnsupportedDtypeOrName_ThrowsAndLeavesTheFileAsItWas()
    {
        string path = Path.Combine(directory, "model.safetensors");
        File.WriteAllText(path, "old");
        using var complex = zeros(2, dtype: complex64);
        using var real = zeros(2);

        var ex = Assert.Throws<NotSupportedException>(() => SafetensorsWriter.Save(new Dictionary<string, Tensor> { ["a"] = real, ["z"] = complex }, path));
        Assert.That(ex!.Message, Does.Contain("'z'").And.Contain("ComplexFloat32").And.Contain("BF16"));
        Assert.Throws<ArgumentException>(() => SafetensorsWriter.Save(new Dictionary<string, Tensor> { ["__metadata__"] = real }, path));
        Assert.Throws<ArgumentException>(() => SafetensorsWriter.Save(new Dictionary<string, Tensor> { [string.Empty] = real }, path));

        Assert.That(File.ReadAllText(path), Is.EqualTo("old"));
        Assert.That(Directory.GetFiles(directory), Is.EqualTo(new[] { path }));
    }
}
