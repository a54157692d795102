using ModelCompression.Pruning;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Samples;

/// <summary>The shape of a <see cref="TinyGpt"/>.</summary>
/// <param name="Vocabulary">Tokens in the vocabulary.</param>
/// <param name="Context">The longest sequence the model reads (its learned positions).</param>
/// <param name="Width">The model width d.</param>
/// <param name="Heads">Attention heads; must divide <paramref name="Width"/>.</param>
/// <param name="Layers">Transformer blocks.</param>
/// <param name="MlpRatio">The MLP's hidden width over <paramref name="Width"/>.</param>
public sealed record TinyGptConfig(int Vocabulary = 4096, int Context = 64, int Width = 128, int Heads = 4, int Layers = 4, int MlpRatio = 4)
{
    /// <summary>Throws when a setting is out of range.</summary>
    /// <exception cref="ArgumentException">A setting is not positive, or the heads do not divide the width.</exception>
    public void Validate()
    {
        if (Vocabulary < 2 || Context < 1 || Width < 1 || Heads < 1 || Layers < 1 || MlpRatio < 1)
        {
            throw new ArgumentException($"Every TinyGpt setting must be positive (vocabulary at least 2): {this}.");
        }

        if (Width % Heads != 0)
        {
            throw new ArgumentException($"TinyGpt's {Heads} heads must divide its width {Width}.");
        }
    }
}

/// <summary>
/// A decoder-only transformer (GPT-style): token and learned position embeddings, pre-LayerNorm blocks of causal
/// multi-head self-attention and a GELU MLP, a final LayerNorm and an untied output projection. It maps token ids
/// [batch, time] (int64) to next-token logits [batch, time, vocabulary].
/// </summary>
/// <remarks>
/// The attention's query, key, value and output projections are <c>nn.Linear</c> layers around
/// <c>functional.scaled_dot_product_attention</c> (causal), rather than TorchSharp's natively implemented
/// <c>nn.MultiheadAttention</c>, whose projections are not .NET layers: here every projection is an ordinary Linear that
/// post-training quantization replaces with an integer kernel and GPTQ solves, which is what makes an int4 model faster
/// and not only smaller. Everything else is TorchSharp's own modules (<c>Embedding</c>, <c>LayerNorm</c>, <c>GELU</c>).
/// </remarks>
public sealed class TinyGpt : nn.Module<Tensor, Tensor>
{
    private readonly Embedding tokens;
    private readonly Embedding positions;
    private readonly ModuleList<nn.Module<Tensor, Tensor>> blocks;
    private readonly LayerNorm norm;
    private readonly nn.Module<Tensor, Tensor> head;

    /// <summary>Initializes a new instance of the <see cref="TinyGpt"/> class with weights from the current random state.</summary>
    /// <param name="config">The shape.</param>
    public TinyGpt(TinyGptConfig config) : base(nameof(TinyGpt))
    {
        ArgumentNullException.ThrowIfNull(config);
        config.Validate();
        Config = config;
        tokens = nn.Embedding(config.Vocabulary, config.Width);
        positions = nn.Embedding(config.Context, config.Width);
        blocks = nn.ModuleList<nn.Module<Tensor, Tensor>>([.. Enumerable.Range(0, config.Layers).Select(_ => new TinyGptBlock(config.Width, config.Heads, config.MlpRatio))]);
        norm = nn.LayerNorm(config.Width);
        head = nn.Linear(config.Width, config.Vocabulary);
        RegisterComponents();
        using (no_grad())
        {
            // GPT-2's initialisation: N(0, 0.02) for embeddings and projections, zero biases.
            foreach (var (_, parameter) in named_parameters())
            {
                if (parameter.dim() >= 2)
                {
                    nn.init.normal_(parameter, 0, 0.02);
                }
            }
        }
    }

    /// <summary>Gets the shape.</summary>
    public TinyGptConfig Config { get; }

    /// <summary>Creates a model with weights initialised from <paramref name="seed"/>.</summary>
    /// <param name="config">The shape; the default when <see langword="null"/>.</param>
    /// <param name="seed">The seed of the initialisation.</param>
    /// <returns>A new model in training mode.</returns>
    public static TinyGpt Create(TinyGptConfig? config = null, int seed = 0)
    {
        torch.random.manual_seed(seed);
        return new TinyGpt(config ?? new TinyGptConfig());
    }

    /// <inheritdoc/>
    /// <exception cref="ArgumentException">The input is not int64 token ids [batch, time] with time at most the context.</exception>
    public override Tensor forward(Tensor input)
    {
        ArgumentNullException.ThrowIfNull(input);
        if (input.dim() != 2 || input.dtype != ScalarType.Int64)
        {
            throw new ArgumentException($"TinyGpt reads int64 token ids [batch, time]; got {input.dtype} [{string.Join(", ", input.shape)}].", nameof(input));
        }

        if (input.shape[1] > Config.Context)
        {
            throw new ArgumentException($"TinyGpt reads at most {Config.Context} tokens; got {input.shape[1]}.", nameof(input));
        }

        using var scope = NewDisposeScope();
        var position = KeptScalars.Range(input.shape[1], dtype: ScalarType.Int64, device: input.device);
        var x = tokens.call(input).Plus(positions.call(position));
        foreach (var block in blocks)
        {
            x = block.call(x);
        }

        return head.call(norm.call(x)).MoveToOuterDisposeScope();
    }
}

/// <summary>One pre-LayerNorm block of <see cref="TinyGpt"/>: x + attention(norm(x)), then x + MLP(norm(x)).</summary>
/// <remarks>
/// The head count is read from the query projection's output size (the head width is fixed), so the block keeps working
/// when structured pruning removes heads or MLP width; it describes itself to that pruning through
/// <see cref="ITransformerBlock"/>.
/// </remarks>
public sealed class TinyGptBlock : nn.Module<Tensor, Tensor>, ITransformerBlock
{
    private readonly LayerNorm norm1;
    private readonly nn.Module<Tensor, Tensor> query;
    private readonly nn.Module<Tensor, Tensor> key;
    private readonly nn.Module<Tensor, Tensor> value;
    private readonly nn.Module<Tensor, Tensor> output;
    private readonly LayerNorm norm2;
    private readonly nn.Module<Tensor, Tensor> up;
    private readonly GELU gelu;
    private readonly nn.Module<Tensor, Tensor> down;

    /// <summary>Initializes a new instance of the <see cref="TinyGptBlock"/> class.</summary>
    /// <param name="width">The model width.</param>
    /// <param name="heads">The attention heads; must divide <paramref name="width"/>.</param>
    /// <param name="mlpRatio">The MLP's hidden width over <paramref name="width"/>.</param>
    public TinyGptBlock(long width, long heads, long mlpRatio) : base(nameof(TinyGptBlock))
    {
        if (width < 1 || heads < 1 || width % heads != 0 || mlpRatio < 1)
        {
            throw new ArgumentException($"A TinyGpt block needs a positive width divisible by its heads and a positive MLP ratio (width {width}, heads {heads}, ratio {mlpRatio}).");
        }

        HeadWidth = width / heads;
        norm1 = nn.LayerNorm(width);
        query = nn.Linear(width, width);
        key = nn.Linear(width, width);
        value = nn.Linear(width, width);
        output = nn.Linear(width, width);
        norm2 = nn.LayerNorm(width);
        up = nn.Linear(width, width * mlpRatio);
        gelu = nn.GELU();
        down = nn.Linear(width * mlpRatio, width);
        RegisterComponents();
    }

    /// <summary>Gets the width of one attention head.</summary>
    public long HeadWidth { get; }

    /// <inheritdoc/>
    public TransformerBlockLayout DescribeLayout() => new(
        new AttentionLayout(nameof(query), nameof(key), nameof(value), nameof(output), query is Linear q ? q.out_features / HeadWidth : 0),
        new MlpLayout([nameof(up)], nameof(down)));

    /// <inheritdoc/>
    public override Tensor forward(Tensor input)
    {
        ArgumentNullException.ThrowIfNull(input);
        using var scope = NewDisposeScope();
        long batch = input.shape[0], time = input.shape[1];
        var h = norm1.call(input);
        var q = query.call(h);
        long inner = q.shape[2];
        Tensor Split(Tensor t) => t.view(batch, time, inner / HeadWidth, HeadWidth).transpose(1, 2);
        var attended = nn.functional.scaled_dot_product_attention(Split(q), Split(key.call(h)), Split(value.call(h)), is_casual: true);
        var x = input.Plus(output.call(attended.transpose(1, 2).reshape(batch, time, inner)));
        x = x.Plus(down.call(gelu.call(up.call(norm2.call(x)))));
        return x.MoveToOuterDisposeScope();
    }
}
