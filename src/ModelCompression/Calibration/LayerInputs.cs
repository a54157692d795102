using ModelCompression.Quantization;
using ModelCompression.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Calibration;

/// <summary>
/// The calibration inputs of one layer at a time, as the model stands: what GPTQ, SparseGPT and Wanda learn each layer
/// from. Layers are visited in the order the model calls them, so methods that change a layer before calibrating the
/// next see the changed layers' outputs (the sequential mode of GPTQ and SparseGPT), and only one layer's statistics
/// are held at a time.
/// </summary>
internal static class LayerInputs
{
    /// <summary>The layers in the order of their first call on one calibration batch; layers never called are left out.</summary>
    /// <typeparam name="T">What identifies a layer.</typeparam>
    /// <param name="root">The model.</param>
    /// <param name="layers">The layers.</param>
    /// <param name="moduleOf">A layer's module.</param>
    /// <param name="batchSize">Samples in the batch.</param>
    /// <param name="context">The step's context (calibration data, device, cancellation).</param>
    /// <returns>The called layers, first called first.</returns>
    public static List<T> CallOrder<T>(nn.Module<Tensor, Tensor> root, IReadOnlyList<T> layers, Func<T, nn.Module<Tensor, Tensor>> moduleOf, int batchSize, CompressionContext context)
    {
        var order = new List<T>();
        var removers = new List<Action>();
        try
        {
            foreach (var layer in layers)
            {
                removers.Add(PreHook(moduleOf(layer), _ =>
                {
                    if (!order.Contains(layer))
                    {
                        order.Add(layer);
                    }
                }));
            }

            using var scope = NewDisposeScope();
            QuantizationTargets.RunCalibrationBatches(root, context.CalibrationData, 1, batchSize, context);
        }
        finally
        {
            removers.ForEach(remove => remove());
        }

        return order;
    }

    /// <summary>
    /// Runs the calibration batches through the model and hands every input row that <paramref name="module"/> receives
    /// to <paramref name="accumulate"/>, as float64 [rows, <paramref name="features"/>] on the CPU. Positions whose
    /// next-token target is the ignored id (padding) are left out when the targets are token ids [batch, time].
    /// </summary>
    /// <param name="root">The model, as it stands.</param>
    /// <param name="name">The layer's dotted name, for errors.</param>
    /// <param name="module">The layer.</param>
    /// <param name="features">The layer's input features: the last dimension of its input.</param>
    /// <param name="batches">Calibration batches.</param>
    /// <param name="batchSize">Samples per batch.</param>
    /// <param name="context">The step's context.</param>
    /// <param name="accumulate">Receives each call's rows (the tensor is freed after the call).</param>
    /// <returns>The rows handed over.</returns>
    /// <exception cref="ArgumentException">The layer received NaN or infinite values.</exception>
    public static long Collect(nn.Module<Tensor, Tensor> root, string name, nn.Module<Tensor, Tensor> module, int features, int batches, int batchSize, CompressionContext context, Action<Tensor> accumulate)
    {
        long rows = 0;
        bool finite = true;
        long ignored = context.Evaluator is PerplexityEvaluator perplexity ? perplexity.IgnoreIndex : -100;
        using var ignoredScalar = ignored.ToScalar();
        Tensor? scored = null;
        var remove = PreHook(module, input =>
        {
            using var scope = NewDisposeScope();
            var values = input.detach();
            if (scored is not null && values.dim() == 3 && values.shape[0] == scored.shape[0] && values.shape[1] == scored.shape[1])
            {
                values = values.masked_select(scored.to(values.device).unsqueeze(-1)).reshape(-1, features);
            }

            var x = values.to(ScalarType.Float64).cpu().reshape(-1, features);
            if (!isfinite(x).all().item<bool>())
            {
                finite = false;
                return;
            }

            accumulate(x);
            rows += x.shape[0];
        });
        try
        {
            QuantizationTargets.RunCalibrationBatches(root, context.CalibrationData, batches, batchSize, context, beforeBatch: (_, target) =>
            {
                // Token targets [batch, time] mark the positions to use; anything else uses every row.
                scored = target.dtype == ScalarType.Int64 && target.dim() == 2 ? target.ne(ignoredScalar) : null;
            });
        }
        finally
        {
            remove();
        }

        if (!finite)
        {
            throw new ArgumentException($"Layer '{name}' received NaN or infinite activations during calibration; nothing was changed.", "model");
        }

        return rows;
    }

    /// <summary>The Hessian 2·XᵀX/n of one layer's calibration inputs (float64 [features, features]), with the model as it stands.</summary>
    /// <param name="root">The model.</param>
    /// <param name="name">The layer's dotted name, for errors.</param>
    /// <param name="module">The layer.</param>
    /// <param name="features">The layer's input features.</param>
    /// <param name="batches">Calibration batches.</param>
    /// <param name="batchSize">Samples per batch.</param>
    /// <param name="context">The step's context.</param>
    /// <returns>The Hessian (in the caller's dispose scope).</returns>
    public static Tensor Hessian(nn.Module<Tensor, Tensor> root, string name, nn.Module<Tensor, Tensor> module, int features, int batches, int batchSize, CompressionContext context)
    {
        var sum = zeros([features, features], ScalarType.Float64);
        long rows = Collect(root, name, module, features, batches, batchSize, context, x => sum.addmm_(x.t(), x));
        using var factor = (2.0 / Math.Max(1, rows)).ToScalar();
        return sum.mul_(factor);
    }

    /// <summary>Registers a forward pre-hook that reads a layer's input; returns its remover.</summary>
    private static Action PreHook(nn.Module<Tensor, Tensor> module, Action<Tensor> read) =>
        module.register_forward_pre_hook((_, input) =>
        {
            read(input);
            return input;
        }).remove;
}
