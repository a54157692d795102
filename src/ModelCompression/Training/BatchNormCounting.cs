using System.Reflection;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Training;

/// <summary>
/// Counts the training batches of a model's batch normalizations itself while the model trains, instead of letting
/// TorchSharp's <c>BatchNorm.forward</c> do it, which races the finalizer thread.
/// </summary>
/// <remarks>
/// TorchSharp 0.107's <c>BatchNorm.forward</c> runs <c>num_batches_tracked.add_(1)</c>, which makes two temporary
/// <c>Scalar</c> wrappers that nothing keeps alive during the native call: a collection on another thread can finalize
/// one mid-call, and LibTorch then reads freed memory (seen in CI as "Expected false to be true" from
/// <c>Scalar::toFloat</c>, a crash at worst). While a training run lasts, each batch normalization with a momentum (the
/// counter then only counts; it does not weight the running averages) has its counter field cleared, so its forward
/// skips the increment; a forward pre-hook counts the training calls, and <see cref="Dispose"/> puts the counter back,
/// advanced by that count with scalars held alive. The buffer stays registered throughout, so state dictionaries are
/// unchanged. A batch normalization without a momentum (a cumulative average, which reads the counter) is left alone.
/// </remarks>
internal sealed class BatchNormCounting : IDisposable
{
    private static readonly FieldInfo? CounterField =
        typeof(NormBase).GetField("_num_batches_tracked", BindingFlags.Instance | BindingFlags.NonPublic);

    private readonly List<Entry> entries = [];

    /// <summary>Takes over the counters of every batch normalization in <paramref name="model"/> that can be.</summary>
    /// <param name="model">The model about to train.</param>
    public BatchNormCounting(nn.Module model)
    {
        if (CounterField is null || CounterField.FieldType != typeof(Tensor))
        {
            return; // a TorchSharp whose BatchNorm keeps its counter elsewhere: leave the forward as it is.
        }

        foreach (var module in model.modules())
        {
            if (module is BatchNorm norm && norm.momentum is not null && CounterField.GetValue(norm) is Tensor counter)
            {
                var entry = new Entry(norm, counter);
                entry.RemoveHook = norm.register_forward_pre_hook((nn.Module m) =>
                {
                    if (m.training)
                    {
                        entry.Calls++;
                    }
                }).remove;
                CounterField.SetValue(norm, null);
                entries.Add(entry);
            }
        }
    }

    /// <summary>Puts every counter back, advanced by the training calls its layer saw.</summary>
    public void Dispose()
    {
        foreach (var entry in entries)
        {
            entry.RemoveHook?.Invoke();
            CounterField!.SetValue(entry.Norm, entry.Counter);
            if (entry.Calls > 0)
            {
                using var scope = NewDisposeScope();
                using var calls = entry.Calls.ToScalar();
                using (no_grad())
                {
                    entry.Counter.add_(calls, KeptScalars.One);
                }
            }
        }

        entries.Clear();
    }

    private sealed class Entry(BatchNorm norm, Tensor counter)
    {
        public BatchNorm Norm { get; } = norm;

        public Tensor Counter { get; } = counter;

        public long Calls { get; set; }

        public Action? RemoveHook { get; set; }
    }
}
