namespace ModelCompression.Interop;

/// <summary>What this package reads and writes.</summary>
public static class InteropInfo
{
    /// <summary>The ONNX default-domain opset the exporter targets.</summary>
    public const int OnnxOpset = 21;

    /// <summary>The ONNX IR version the exporter writes (the one opset 21 belongs to).</summary>
    public const int OnnxIrVersion = 10;
}
