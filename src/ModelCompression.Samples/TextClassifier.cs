using ModelCompression.Pruning;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Samples;

/// <summary>The shape of a <see cref="TextClassifier"/>.</summary>
/// <param name="Vocabulary">Token ids the model reads, the padding and start ids included.</param>
/// <param name="Length">The longest sequence the model reads (its learned positions).</param>
/// <param name="Width">The model width d.</param>
/// <param name="Heads">Attention heads; must divide <paramref name="Width"/>.</param>
/// <param name="Layers">Encoder blocks.</param>
/// <param name="MlpRatio">The MLP's hidden width over <paramref name="Width"/>.</param>
/// <param name="Classes">Output classes.</param>
public sealed record TextClassifierConfig(int Vocabulary = 4098, int Length = 128, int Width = 128, int Heads = 4, int Layers = 2, int MlpRatio = 4, int Classes = 2)
{
    /// <summary>Throws when a setting is out of range.</summary>
    /// <exception cref="ArgumentException">A setting is not positive, the vocabulary holds no token besides padding and start, or the heads do not divide the width.</exception>
    public void Validate()
    {
        if (Vocabulary <= TextClassifier.FirstTokenId || Length < 1 || Width < 1 || Heads < 1 || Layers < 1 || MlpRatio < 1 || Classes < 2)
        {
            throw new ArgumentException($"Every TextClassifier setting must be positive, with at least {TextClassifier.FirstTokenId + 1} token ids and 2 classes: {this}.");
        }

        if (Width % Heads != 0)
        {
            throw new ArgumentException($"TextClassifier's {Heads} heads must divide its width {Width}.");
        }
    }
}

/// <summary>
/// A transformer encoder classifier: token and learned position embeddings, pre-LayerNorm blocks of bidirectional
/// multi-head self-attention (padding masked out) and a GELU MLP, a final LayerNorm, the mean over the real tokens and a
/// Linear head. It maps token ids [batch, time] (int64, <see cref="PadId"/> after the text) to class logits
/// [batch, classes].
/// </summary>
/// <remarks>
/// As in <see cref="TinyGpt"/>, the projections are <c>nn.Linear</c> layers around
/// <c>functional.scaled_dot_product_attention</c> rather than the natively implemented <c>nn.TransformerEncoderLayer</c>,
/// whose projections are not .NET layers that quantization could replace. Every sequence starts with
/// <see cref="StartId"/>, so no row of the attention is all padding. <see cref="TextClassifierTraining.Encode(SpamAssassinCorpus, TextSplit, ByteLevelBpeTokenizer, int)"/> builds
/// such inputs from text.
/// </remarks>
public sealed class TextClassifier : nn.Module<Tensor, Tensor>
{
    /// <summary>The padding id, after the end of a text.</summary>
    public const long PadId = 0;

    /// <summary>The id every sequence starts with.</summary>
    public const long StartId = 1;

    /// <summary>The first id of a tokenizer's token: token t is id t + <see cref="FirstTokenId"/>.</summary>
    public const int FirstTokenId = 2;

    private readonly Embedding tokens;
    private readonly Embedding positions;
    private readonly ModuleList<TextEncoderBlock> blocks;
    private readonly LayerNorm norm;
    private readonly nn.Module<Tensor, Tensor> head;

    /// <summary>Initializes a new instance of the <see cref="TextClassifier"/> class with weights from the current random state.</summary>
    /// <param name="config">The shape.</param>
    public TextClassifier(TextClassifierConfig config) : base(nameof(TextClassifier))
    {
        ArgumentNullException.ThrowIfNull(config);
        config.Validate();
        Config = config;
        tokens = nn.Embedding(config.Vocabulary, config.Width);
        positions = nn.Embedding(config.Length, config.Width);
        blocks = nn.ModuleList([.. Enumerable.Range(0, config.Layers).Select(_ => new TextEncoderBlock(config.Width, config.Heads, config.MlpRatio))]);
        norm = nn.LayerNorm(config.Width);
        head = nn.Linear(config.Width, config.Classes);
        RegisterComponents();
        using (no_grad())
        {
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
    public TextClassifierConfig Config { get; }

    /// <summary>Creates a model with weights initialised from <paramref name="seed"/>.</summary>
    /// <param name="config">The shape; the default when <see langword="null"/>.</param>
    /// <param name="seed">The seed of the initialisation.</param>
    /// <returns>A new model in training mode.</returns>
    public static TextClassifier Create(TextClassifierConfig? config = null, int seed = 0)
    {
        torch.random.manual_seed(seed);
        return new TextClassifier(config ?? new TextClassifierConfig());
    }

    /// <inheritdoc/>
    /// <exception cref="ArgumentException">The input is not int64 ids [batch, time] with time at most the length.</exception>
    public override Tensor forward(Tensor input)
    {
        ArgumentNullException.ThrowIfNull(input);
        if (input.dim() != 2 || input.dtype != ScalarType.Int64)
        {
            throw new ArgumentException($"TextClassifier reads int64 token ids [batch, time]; got {input.dtype} [{string.Join(", ", input.shape)}].", nameof(input));
        }

        if (input.shape[1] > Config.Length)
        {
            throw new ArgumentException($"TextClassifier reads at most {Config.Length} tokens; got {input.shape[1]}.", nameof(input));
        }

        using var scope = NewDisposeScope();
        using var pad = PadId.ToScalar();
        using var one = 1.ToScalar();
        var real = input.ne(pad);
        var position = KeptScalars.Range(input.shape[1], dtype: ScalarType.Int64, device: input.device);
        var x = tokens.call(input).Plus(positions.call(position));
        foreach (var block in blocks)
        {
            x = block.call(x, real);
        }

        var weights = real.unsqueeze(-1).to(x.dtype);
        var pooled = (norm.call(x) * weights).sum(1) / weights.sum(1).clamp_min(one);
        return head.call(pooled).MoveToOuterDisposeScope();
    }
}

/// <summary>One pre-LayerNorm block of <see cref="TextClassifier"/>: x + attention(norm(x)) over the real tokens, then x + MLP(norm(x)).</summary>
/// <remarks>
/// The head count is read from the query projection's output size (the head width is fixed), so the block keeps working
/// when structured pruning removes heads or MLP width (<see cref="ITransformerBlock"/>).
/// </remarks>
public sealed class TextEncoderBlock : nn.Module<Tensor, Tensor, Tensor>, ITransformerBlock
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

    /// <summary>Initializes a new instance of the <see cref="TextEncoderBlock"/> class.</summary>
    /// <param name="width">The model width.</param>
    /// <param name="heads">The attention heads; must divide <paramref name="width"/>.</param>
    /// <param name="mlpRatio">The MLP's hidden width over <paramref name="width"/>.</param>
    public TextEncoderBlock(long width, long heads, long mlpRatio) : base(nameof(TextEncoderBlock))
    {
        if (width < 1 || heads < 1 || width % heads != 0 || mlpRatio < 1)
        {
            throw new ArgumentException($"An encoder block needs a positive width divisible by its heads and a positive MLP ratio (width {width}, heads {heads}, ratio {mlpRatio}).");
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

    /// <summary>Runs the block.</summary>
    /// <param name="input">The residual stream [batch, time, width].</param>
    /// <param name="real">Which positions hold a token rather than padding [batch, time] (bool); padding is not attended to.</param>
    /// <returns>The new residual stream.</returns>
    public override Tensor forward(Tensor input, Tensor real)
    {
        ArgumentNullException.ThrowIfNull(input);
        ArgumentNullException.ThrowIfNull(real);
        using var scope = NewDisposeScope();
        long batch = input.shape[0], time = input.shape[1];
        var h = norm1.call(input);
        var q = query.call(h);
        long inner = q.shape[2];
        Tensor Split(Tensor t) => t.view(batch, time, inner / HeadWidth, HeadWidth).transpose(1, 2);
        var mask = real.view(batch, 1, 1, time);
        var attended = nn.functional.scaled_dot_product_attention(Split(q), Split(key.call(h)), Split(value.call(h)), mask);
        var x = input.Plus(output.call(attended.transpose(1, 2).reshape(batch, time, inner)));
        x = x.Plus(down.call(gelu.call(up.call(norm2.call(x)))));
        return x.MoveToOuterDisposeScope();
    }
}
