using System.Security.Cryptography;
using ModelCompression.Data;
using ModelCompression.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Support;

/// <summary>Tiny models and data built in the tests.</summary>
internal static class TestModels
{
    /// <summary>A 4-8-3 MLP.</summary>
    public static nn.Module<Tensor, Tensor> Mlp(int seed = 0)
    {
        torch.random.manual_seed(seed);
        return nn.Sequential(("fc1", nn.Linear(4, 8)), ("relu", nn.ReLU()), ("fc2", nn.Linear(8, 3)));
    }

    /// <summary>
    /// A 3-class problem a 4-8-3 MLP learns well: inputs from N(0, 1), label = argmax of a fixed linear map.
    /// </summary>
    public static TensorDataset Classification(int count, int seed)
    {
        using var scope = NewDisposeScope();
        using var generator = new Generator((ulong)seed);
        var x = randn([count, 4], generator: generator);
        var w = tensor(new float[] { 1, -1, 0.5f, 0, 1, -0.5f, -1, 0.5f, 1, 0.3f, -0.7f, 0.2f }, [4, 3]);
        var y = x.matmul(w).argmax(1);
        return new TensorDataset(x, y);
    }

    /// <summary>A trained MLP and its data (train 600, test 300).</summary>
    public static (nn.Module<Tensor, Tensor> Model, TensorDataset Train, TensorDataset Test) TrainedMlp(int seed = 0)
    {
        var train = Classification(600, seed + 1);
        var test = Classification(300, seed + 2);
        var model = Mlp(seed);
        new Trainer(new TrainingOptions { Epochs = 30, LearningRate = 0.01, BatchSize = 32 }).Train(model, train, seed: seed);
        model.eval();
        return (model, train, test);
    }

    /// <summary>A BatchNorm2d in evaluation mode with random running statistics, scale and shift (folding tests).</summary>
    public static TorchSharp.Modules.BatchNorm2d RandomBatchNorm2d(int channels)
    {
        var bn = nn.BatchNorm2d(channels);
        using (no_grad())
        {
            bn.running_mean!.copy_(randn(channels));
            bn.running_var!.copy_(rand(channels) + 0.5);
            bn.weight!.copy_(randn(channels));
            bn.bias!.copy_(randn(channels));
        }

        bn.eval();
        return bn;
    }

    /// <summary>
    /// The live tensor count once earlier garbage is collected and finalized: taken as a leak test's baseline, so that
    /// other tests' tensors finalized during the measurement cannot lower the count.
    /// </summary>
    public static long SettledTensorCount()
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        GC.Collect();
        return Tensor.TotalCount;
    }

    /// <summary>SHA-256 of every state_dict entry's name, dtype, shape and bytes, in order.</summary>
    public static string StateHash(nn.Module module)
    {
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        foreach (var (name, t) in module.state_dict())
        {
            sha.AppendData(System.Text.Encoding.UTF8.GetBytes($"{name}|{t.dtype}|{string.Join(",", t.shape)}|"));
            using var cpu = t.detach().cpu().contiguous();
            sha.AppendData(cpu.bytes);
        }

        return Convert.ToHexString(sha.GetHashAndReset());
    }

    public static float[] Output(nn.Module<Tensor, Tensor> model, Tensor input)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        bool training = model.training;
        model.eval();
        var result = model.call(input).to(float32).data<float>().ToArray();
        model.train(training);
        return result;
    }
}
