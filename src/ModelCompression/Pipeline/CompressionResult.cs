using static TorchSharp.torch;

namespace ModelCompression;

/// <summary>The outcome of a pipeline run: the compressed model (a new module the caller owns) and the report.</summary>
public sealed class CompressionResult : IDisposable
{
    internal CompressionResult(nn.Module<Tensor, Tensor> model, CompressionReport report)
    {
        Model = model;
        Report = report;
    }

    /// <summary>Gets the compressed model. It shares nothing with the model given to the pipeline.</summary>
    public nn.Module<Tensor, Tensor> Model { get; }

    /// <summary>Gets the report.</summary>
    public CompressionReport Report { get; }

    /// <summary>Disposes the compressed model.</summary>
    public void Dispose() => Model.Dispose();
}
