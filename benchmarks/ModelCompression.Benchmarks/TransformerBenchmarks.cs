using BenchmarkDotNet.Attributes;
using ModelCompression.Data;
using ModelCompression.Modules;
using ModelCompression.Quantization;
using ModelCompression.Samples;
using ModelCompression.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Benchmarks;

/// <summary>
/// One decoding step of a <see cref="TinyGpt"/> widened to d = 1024 (4 blocks, 16 heads, 4,096-token vocabulary:
/// 58.7M parameters, random weights) at batch 1 on a 16-token window: fp32 (baseline) against int4 weight-only
/// (groups of 64, the kernel every int4 method produces; HQQ adds its zero-point correction, measured as its own
/// row). Latency does not depend on the weights' values.
/// </summary>
[MemoryDiagnoser(displayGenColumns: false)]
public class WideTinyGptDecodeBenchmarks
{
    private TinyGpt _fp32 = null!;
    private nn.Module<Tensor, Tensor> _int4 = null!;
    private nn.Module<Tensor, Tensor> _hqq = null!;
    private Tensor _window = null!;
    private IDisposable _noGrad = null!;

    [GlobalSetup]
    public void Setup()
    {
        torch.set_num_threads(Environment.ProcessorCount);
        _fp32 = TinyGpt.Create(new TinyGptConfig(Vocabulary: 4096, Context: 64, Width: 1024, Heads: 16, Layers: 4), seed: 0);
        _fp32.eval();
        _window = randint(0, 4096, [1, 16], dtype: ScalarType.Int64).DetachFromDisposeScope();
        _int4 = Quantize(WeightRounding.Nearest);
        _hqq = Quantize(WeightRounding.Hqq());
        _noGrad = no_grad();
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _noGrad.Dispose();
        _fp32.Dispose();
        _int4.Dispose();
        _hqq.Dispose();
        _window.Dispose();
    }

    [Benchmark(Baseline = true)]
    public float Fp32() => Run(_fp32);

    [Benchmark]
    public float Int4() => Run(_int4);

    [Benchmark]
    public float Int4Hqq() => Run(_hqq);

    private nn.Module<Tensor, Tensor> Quantize(WeightRounding rounding)
    {
        using var data = new TensorDataset(_window.clone(), _window.clone());
        var context = new CompressionContext(new CompressionData(data, data) { Evaluator = new PerplexityEvaluator() }, _fp32);
        var options = new PostTrainingQuantizationOptions { Mode = QuantizationMode.WeightOnlyInt4, WeightGranularity = QuantizationGranularity.PerGroup(64), Rounding = rounding, CalibrationBatches = 1, CalibrationBatchSize = 1 };
        var quantized = new PostTrainingQuantizationStep(options).Apply(ModuleCloner.DeepClone(_fp32), context);
        quantized.eval();
        return quantized;
    }

    private float Run(nn.Module<Tensor, Tensor> model)
    {
        using var scope = NewDisposeScope();
        return model.call(_window)[0, -1, 0].item<float>();
    }
}

/// <summary>
/// Time to quantize one transformer block of width 1024 (12.6M weights: query, key, value and output 1024×1024, MLP
/// 1024×4096 and 4096×1024; random weights) to 4 bits in groups of 64 with each method, calibrating on 4 batches of
/// 8 random 64-token sequences where the method calibrates. Divide by 12.6 for the time per million parameters. Each
/// method's peak resident memory above what the process held before the step (the step's copy of the block, its
/// calibration activations, Hessians and integer weights: native memory, which BenchmarkDotNet's allocation column
/// does not see) is read from Linux's VmHWM, reset before every call, and printed at the end of the method's run.
/// </summary>
[MemoryDiagnoser(displayGenColumns: false)]
[SimpleJob(launchCount: 1, warmupCount: 1, iterationCount: 3)]
public class TransformerQuantizationTimeBenchmarks
{
    private TinyGptBlock _block = null!;
    private nn.Module<Tensor, Tensor> _model = null!;
    private TensorDataset _data = null!;

    /// <summary>Gets or sets the method.</summary>
    [Params("RTN", "HQQ", "AWQ", "GPTQ")]
    public string Method { get; set; } = "RTN";

    [GlobalSetup]
    public void Setup()
    {
        torch.set_num_threads(Environment.ProcessorCount);
        torch.random.manual_seed(3);
        _block = new TinyGptBlock(1024, 16, 4);
        _block.eval();
        _model = nn.Sequential(("norm", nn.LayerNorm(1024)), ("block", _block));
        _data = new TensorDataset(randn(32, 64, 1024), zeros(32, dtype: ScalarType.Int64));
    }

    private long _peakAbove;

    [GlobalCleanup]
    public void Cleanup()
    {
        _model.Dispose();
        _data.Dispose();
        Console.WriteLine($"// PeakMemory Method={Method}: {_peakAbove / 1048576.0:0.0} MiB above the process's resident memory before the step (block: {12.6 * 4:0.0} MB in fp32)");
    }

    [Benchmark]
    public int Quantize()
    {
        long before = ResidentMemory.ResetPeak();
        try
        {
            return QuantizeOnce();
        }
        finally
        {
            _peakAbove = Math.Max(_peakAbove, ResidentMemory.Peak() - before);
        }
    }

    private int QuantizeOnce()
    {
        var options = new PostTrainingQuantizationOptions
        {
            Mode = QuantizationMode.WeightOnlyInt4,
            WeightGranularity = QuantizationGranularity.PerGroup(64),
            Rounding = Method switch { "HQQ" => WeightRounding.Hqq(), "GPTQ" => WeightRounding.Gptq(), _ => WeightRounding.Nearest },
            Awq = Method == "AWQ" ? new AwqOptions() : null,
            CalibrationBatches = 4,
            CalibrationBatchSize = 8,
        };
        var context = new CompressionContext(new CompressionData(_data, _data), _model);
        using var quantized = new PostTrainingQuantizationStep(options).Apply(ModuleCloner.DeepClone(_model), context);
        return quantized.modules().OfType<QuantizedLinear>().Count();
    }
}

/// <summary>The process's resident memory from Linux's /proc (0 elsewhere): now, and its peak since the last reset.</summary>
internal static class ResidentMemory
{
    /// <summary>Resets the peak (VmHWM) to the current resident size and returns that size in bytes.</summary>
    public static long ResetPeak()
    {
        if (OperatingSystem.IsLinux())
        {
            // "5" resets the peak resident set size (Linux 4.0 and later).
            File.WriteAllText("/proc/self/clear_refs", "5");
        }

        return Read("VmRSS:");
    }

    /// <summary>The peak resident size since the last <see cref="ResetPeak"/>, in bytes.</summary>
    public static long Peak() => Read("VmHWM:");

    private static long Read(string field)
    {
        if (!OperatingSystem.IsLinux())
        {
            return 0;
        }

        foreach (var line in File.ReadLines("/proc/self/status"))
        {
            if (line.StartsWith(field, StringComparison.Ordinal))
            {
                return long.Parse(line[field.Length..].Trim().Split(' ')[0], System.Globalization.CultureInfo.InvariantCulture) * 1024;
            }
        }

        return 0;
    }
}
