#nullable enable
using System;
using System.IO;
using System.Runtime.InteropServices;
using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;

namespace ModelCompression.Benchmarks.Peers;

/// <summary>
/// Peer baseline: a float32 linear layer <c>y = x · Wᵀ + b</c> run by ONNX Runtime's CPU contrib operator
/// <c>com.microsoft.DynamicQuantizeMatMul</c>. The weight is quantized once to int8, symmetric, one scale per
/// output channel (zero point 0); each call quantizes the activations to uint8 on the fly (per tensor), runs
/// ORT's int8 GEMM (MLAS) and dequantizes the result with the bias added.
/// </summary>
/// <remarks>
/// The ONNX model (a single node) is built in memory, so no file and no <c>onnx</c> package is involved.
/// <see cref="Run"/> binds the caller's arrays to the session without copying (the arrays are pinned while
/// bound); calling it repeatedly with the same arrays and batch size reuses the binding, so the per-call
/// overhead is a single native run. Not thread-safe: one instance serves one caller at a time.
/// </remarks>
public sealed class OnnxRuntimeDynamicInt8Linear : IDisposable
{
    private const string InputName = "A";
    private const string OutputName = "Y";

    // onnx.proto TensorProto.DataType values.
    private const int OnnxFloat = 1;
    private const int OnnxInt8 = 3;

    private readonly InferenceSession _session;
    private readonly RunOptions _runOptions;
    private readonly OrtIoBinding _binding;
    private readonly float[] _scales;

    private OrtValue? _boundInput;
    private OrtValue? _boundOutput;
    private float[]? _boundX;
    private float[]? _boundY;
    private int _boundBatch = -1;
    private bool _disposed;

    /// <summary>
    /// Quantizes <paramref name="weight"/>, builds the one-node ONNX model and creates the ONNX Runtime session.
    /// </summary>
    /// <param name="weight">Float32 weight, <c>[outFeatures, inFeatures]</c> row-major (the PyTorch/TorchSharp
    /// <c>Linear.weight</c> layout). It is not kept.</param>
    /// <param name="bias">Float32 bias of length <paramref name="outFeatures"/>, or <see langword="null"/> for none.</param>
    /// <param name="inFeatures">Input features K (columns of the weight).</param>
    /// <param name="outFeatures">Output features N (rows of the weight).</param>
    /// <param name="intraOpThreads">ONNX Runtime intra-op thread count (default 2).</param>
    /// <exception cref="ArgumentException">A size does not match.</exception>
    public OnnxRuntimeDynamicInt8Linear(float[] weight, float[]? bias, int inFeatures, int outFeatures, int intraOpThreads = 2)
    {
        ArgumentNullException.ThrowIfNull(weight);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(inFeatures);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(outFeatures);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(intraOpThreads);
        if ((long)inFeatures * outFeatures != weight.Length)
            throw new ArgumentException($"weight has {weight.Length} elements, expected {outFeatures}x{inFeatures}.", nameof(weight));
        if (bias is not null && bias.Length != outFeatures)
            throw new ArgumentException($"bias has {bias.Length} elements, expected {outFeatures}.", nameof(bias));
        if (!BitConverter.IsLittleEndian)
            throw new PlatformNotSupportedException("ONNX raw_data is little-endian; this writer assumes a little-endian host.");

        InFeatures = inFeatures;
        OutFeatures = outFeatures;

        // Per-output-channel symmetric int8; B is stored transposed, [K, N], as the op multiplies A[M,K]·B[K,N].
        _scales = new float[outFeatures];
        var quantizedKn = new byte[(long)inFeatures * outFeatures];
        float maxError = 0f;
        for (int n = 0; n < outFeatures; n++)
        {
            ReadOnlySpan<float> row = weight.AsSpan(n * inFeatures, inFeatures);
            float maxAbs = 0f;
            foreach (float v in row) maxAbs = MathF.Max(maxAbs, MathF.Abs(v));
            float scale = maxAbs > 0f ? maxAbs / 127f : 1f;
            _scales[n] = scale;
            float inv = 1f / scale;
            for (int k = 0; k < inFeatures; k++)
            {
                int q = (int)MathF.Round(row[k] * inv);
                q = Math.Clamp(q, -127, 127);
                quantizedKn[(long)k * outFeatures + n] = unchecked((byte)(sbyte)q);
                maxError = MathF.Max(maxError, MathF.Abs(row[k] - q * scale));
            }
        }
        MaxAbsWeightError = maxError;

        ModelBytes = BuildModel(quantizedKn, _scales, bias ?? new float[outFeatures], inFeatures, outFeatures);

        using var options = new SessionOptions
        {
            IntraOpNumThreads = intraOpThreads,
            InterOpNumThreads = 1,
            ExecutionMode = ExecutionMode.ORT_SEQUENTIAL,
            GraphOptimizationLevel = GraphOptimizationLevel.ORT_ENABLE_ALL,
        };
        _session = new InferenceSession(ModelBytes, options);
        _runOptions = new RunOptions();
        _binding = _session.CreateIoBinding();
    }

    /// <summary>Input features K.</summary>
    public int InFeatures { get; }

    /// <summary>Output features N.</summary>
    public int OutFeatures { get; }

    /// <summary>Largest |w − dequantize(quantize(w))| over the whole weight (the int8 weight rounding error).</summary>
    public float MaxAbsWeightError { get; }

    /// <summary>Per-output-channel weight scales (<c>max|w_row| / 127</c>), length <see cref="OutFeatures"/>.</summary>
    public ReadOnlySpan<float> WeightScales => _scales;

    /// <summary>The serialized ONNX model the session was created from (for inspection or saving).</summary>
    public byte[] ModelBytes { get; }

    /// <summary>The underlying ONNX Runtime session.</summary>
    public InferenceSession Session => _session;

    /// <summary>
    /// Computes <c>y[b, :] = x[b, :] · Wᵀ + bias</c> for <paramref name="batch"/> rows.
    /// </summary>
    /// <param name="x">Input, <c>[batch, InFeatures]</c> row-major; at least <c>batch·InFeatures</c> elements.</param>
    /// <param name="batch">Number of rows.</param>
    /// <param name="y">Output, <c>[batch, OutFeatures]</c> row-major; at least <c>batch·OutFeatures</c> elements.</param>
    /// <remarks>Reusing the same <paramref name="x"/>, <paramref name="y"/> and <paramref name="batch"/> across
    /// calls avoids re-binding; the arrays stay pinned until another pair is bound or the instance is disposed.</remarks>
    public void Run(float[] x, int batch, float[] y)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentNullException.ThrowIfNull(x);
        ArgumentNullException.ThrowIfNull(y);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(batch);
        if (!ReferenceEquals(x, _boundX) || !ReferenceEquals(y, _boundY) || batch != _boundBatch)
            Bind(x, batch, y);
        _session.RunWithBinding(_runOptions, _binding);
    }

    private void Bind(float[] x, int batch, float[] y)
    {
        long inCount = (long)batch * InFeatures, outCount = (long)batch * OutFeatures;
        if (x.Length < inCount) throw new ArgumentException($"x has {x.Length} elements, expected at least {inCount}.", nameof(x));
        if (y.Length < outCount) throw new ArgumentException($"y has {y.Length} elements, expected at least {outCount}.", nameof(y));

        ReleaseBinding();
        _boundInput = OrtValue.CreateTensorValueFromMemory(OrtMemoryInfo.DefaultInstance,
            x.AsMemory(0, (int)inCount), new long[] { batch, InFeatures });
        _boundOutput = OrtValue.CreateTensorValueFromMemory(OrtMemoryInfo.DefaultInstance,
            y.AsMemory(0, (int)outCount), new long[] { batch, OutFeatures });
        _binding.BindInput(InputName, _boundInput);
        _binding.BindOutput(OutputName, _boundOutput);
        _boundX = x;
        _boundY = y;
        _boundBatch = batch;
    }

    private void ReleaseBinding()
    {
        _binding.ClearBoundInputs();
        _binding.ClearBoundOutputs();
        _boundInput?.Dispose();
        _boundOutput?.Dispose();
        _boundInput = null;
        _boundOutput = null;
        _boundX = null;
        _boundY = null;
        _boundBatch = -1;
    }

    /// <summary>Releases the session, the binding and the pinned arrays.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        ReleaseBinding();
        _binding.Dispose();
        _runOptions.Dispose();
        _session.Dispose();
    }

    // ---- ONNX protobuf, written field by field (numbers from onnx/onnx.proto) ----

    private static byte[] BuildModel(byte[] quantizedKn, float[] scales, float[] bias, int k, int n)
    {
        byte[] node = Message(o =>
        {
            WriteString(o, 1, InputName);        // NodeProto.input
            WriteString(o, 1, "B");
            WriteString(o, 1, "b_scale");
            WriteString(o, 1, "b_zero_point");
            WriteString(o, 1, "bias");
            WriteString(o, 2, OutputName);       // NodeProto.output
            WriteString(o, 3, "dqmm");           // NodeProto.name
            WriteString(o, 4, "DynamicQuantizeMatMul"); // NodeProto.op_type
            WriteString(o, 7, "com.microsoft");  // NodeProto.domain
        });

        byte[] graph = Message(o =>
        {
            WriteMessage(o, 1, node);            // GraphProto.node
            WriteString(o, 2, "int8_linear");    // GraphProto.name
            WriteMessage(o, 5, Tensor("B", OnnxInt8, new long[] { k, n }, quantizedKn)); // GraphProto.initializer
            WriteMessage(o, 5, Tensor("b_scale", OnnxFloat, new long[] { n }, MemoryMarshal.AsBytes(scales.AsSpan()).ToArray()));
            WriteMessage(o, 5, Tensor("b_zero_point", OnnxInt8, new long[] { n }, new byte[n]));
            WriteMessage(o, 5, Tensor("bias", OnnxFloat, new long[] { n }, MemoryMarshal.AsBytes(bias.AsSpan()).ToArray()));
            WriteMessage(o, 11, ValueInfo(InputName, OnnxFloat, "batch", k));  // GraphProto.input
            WriteMessage(o, 12, ValueInfo(OutputName, OnnxFloat, "batch", n)); // GraphProto.output
        });

        return Message(o =>
        {
            o.WriteTag(1, WireFormat.WireType.Varint);   // ModelProto.ir_version
            o.WriteInt64(8);
            WriteString(o, 2, "ModelCompression.Benchmarks"); // ModelProto.producer_name
            WriteMessage(o, 8, OpsetImport("", 17));     // ModelProto.opset_import
            WriteMessage(o, 8, OpsetImport("com.microsoft", 1));
            WriteMessage(o, 7, graph);                   // ModelProto.graph
        });
    }

    private static byte[] Tensor(string name, int dataType, long[] dims, byte[] rawData) => Message(o =>
    {
        foreach (long d in dims)
        {
            o.WriteTag(1, WireFormat.WireType.Varint);  // TensorProto.dims (unpacked repeated int64 is valid proto2)
            o.WriteInt64(d);
        }
        o.WriteTag(2, WireFormat.WireType.Varint);      // TensorProto.data_type
        o.WriteInt32(dataType);
        WriteString(o, 8, name);                        // TensorProto.name
        o.WriteTag(9, WireFormat.WireType.LengthDelimited); // TensorProto.raw_data
        o.WriteBytes(UnsafeByteOperations.UnsafeWrap(rawData));
    });

    // ValueInfoProto{name=1, type=2: TypeProto{tensor_type=1: Tensor{elem_type=1, shape=2: TensorShapeProto{dim=1}}}}
    private static byte[] ValueInfo(string name, int elemType, string batchParam, long features)
    {
        byte[] batchDim = Message(o => WriteString(o, 2, batchParam));   // Dimension.dim_param
        byte[] featureDim = Message(o =>
        {
            o.WriteTag(1, WireFormat.WireType.Varint);                   // Dimension.dim_value
            o.WriteInt64(features);
        });
        byte[] shape = Message(o =>
        {
            WriteMessage(o, 1, batchDim);
            WriteMessage(o, 1, featureDim);
        });
        byte[] tensorType = Message(o =>
        {
            o.WriteTag(1, WireFormat.WireType.Varint);                   // TypeProto.Tensor.elem_type
            o.WriteInt32(elemType);
            WriteMessage(o, 2, shape);                                   // TypeProto.Tensor.shape
        });
        byte[] type = Message(o => WriteMessage(o, 1, tensorType));      // TypeProto.tensor_type
        return Message(o =>
        {
            WriteString(o, 1, name);
            WriteMessage(o, 2, type);
        });
    }

    private static byte[] OpsetImport(string domain, long version) => Message(o =>
    {
        WriteString(o, 1, domain);                      // OperatorSetIdProto.domain
        o.WriteTag(2, WireFormat.WireType.Varint);      // OperatorSetIdProto.version
        o.WriteInt64(version);
    });

    private static byte[] Message(Action<CodedOutputStream> write)
    {
        using var stream = new MemoryStream();
        using (var output = new CodedOutputStream(stream, leaveOpen: true))
        {
            write(output);
            output.Flush();
        }
        return stream.ToArray();
    }

    private static void WriteString(CodedOutputStream output, int field, string value)
    {
        output.WriteTag(field, WireFormat.WireType.LengthDelimited);
        output.WriteString(value);
    }

    private static void WriteMessage(CodedOutputStream output, int field, byte[] message)
    {
        output.WriteTag(field, WireFormat.WireType.LengthDelimited);
        output.WriteBytes(UnsafeByteOperations.UnsafeWrap(message));
    }
}
