using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Support;

/// <summary>
/// A model written as users (and torchvision) write them: <c>conv</c> and <c>fc</c> sit in fields typed
/// <see cref="Conv2d"/> and <see cref="Linear"/>, which no compressed layer can fill; <c>head</c> sits in a field typed
/// <c>Module&lt;Tensor, Tensor&gt;</c> and can be replaced. Input 1×12×12, 10 outputs.
/// </summary>
internal sealed class FixedTypeNet : nn.Module<Tensor, Tensor>
{
    private readonly Conv2d conv;
    private readonly Linear fc;
    private readonly nn.Module<Tensor, Tensor> head;

    public FixedTypeNet(int seed = 0)
        : base(nameof(FixedTypeNet))
    {
        random.manual_seed(seed);
        conv = nn.Conv2d(1, 8, 3);
        fc = nn.Linear(8 * 10 * 10, 64);
        head = nn.Linear(64, 10);
        RegisterComponents();
    }

    public static long[] SampleShape => [1, 12, 12];

    public override Tensor forward(Tensor input)
    {
        using var scope = NewDisposeScope();
        var x = nn.functional.relu(conv.call(input)).flatten(1);
        return head.call(nn.functional.relu(fc.call(x))).MoveToOuterDisposeScope();
    }
}
