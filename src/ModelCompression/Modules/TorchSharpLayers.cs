using System.Runtime.CompilerServices;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Modules;

/// <summary>
/// The descriptors of TorchSharp's own layer kinds that the library copies and stores through their constructors:
/// layers without a fixed file encoding of their own (Conv1d, Conv3d, GroupNorm, Embedding) and the natively
/// implemented ones (recurrent layers, attention, transformer layers), whose .NET objects are thin wrappers around a
/// native module and cannot be copied field by field.
/// </summary>
/// <remarks>
/// TorchSharp 0.107 does not expose every constructor argument of its native modules. What the weights show is read
/// from their shapes (sizes, layers, directions, biases); what changes the forward computation but is hidden (attention
/// heads, batch-first layout, the activation of transformer layers, an RNN's non-linearity) is found by running the
/// layer on a small probe input and keeping the candidate settings whose output matches exactly. Settings that only
/// matter in training (dropout) or to gradients (an embedding's padding index) cannot be recovered: copies and loaded
/// files use TorchSharp's defaults for them, as the remarks of <see cref="LayerRegistry"/> say.
/// </remarks>
internal static class TorchSharpLayers
{
    /// <summary>Marks the library's own registrations, which cannot be removed.</summary>
    internal abstract class BuiltIn(string id, Type type) : LayerDescriptor(id, type);

    /// <summary>
    /// A native layer whose settings are found by probing: once per module instance (the result is kept as long as the
    /// module lives), inside a dispose scope that frees the tensor wrappers the native module hands out.
    /// </summary>
    private abstract class ProbedBuiltIn(string id, Type type) : BuiltIn(id, type)
    {
        private readonly ConditionalWeakTable<nn.Module, LayerAttributes> _probed = new();

        public sealed override LayerAttributes GetAttributes(nn.Module module) => _probed.GetValue(module, m =>
        {
            using var scope = NewDisposeScope();
            return Probe(m);
        });

        protected abstract LayerAttributes Probe(nn.Module module);
    }

    public static IEnumerable<LayerDescriptor> All() =>
    [
        new LinearLayer(), new ConvLayer<Conv1d>("torch.nn.Conv1d", 1), new ConvLayer<Conv2d>("torch.nn.Conv2d", 2), new ConvLayer<Conv3d>("torch.nn.Conv3d", 3),
        new ConvTransposeLayer<ConvTranspose1d>("torch.nn.ConvTranspose1d", 1), new ConvTransposeLayer<ConvTranspose2d>("torch.nn.ConvTranspose2d", 2),
        new ConvTransposeLayer<ConvTranspose3d>("torch.nn.ConvTranspose3d", 3),
        new GroupNormLayer(), new EmbeddingLayer(), new EmbeddingBagLayer(),
        new RecurrentLayer<GRU>("torch.nn.GRU", 3), new RecurrentLayer<LSTM>("torch.nn.LSTM", 4), new RecurrentLayer<RNN>("torch.nn.RNN", 1),
        new RecurrentCell<GRUCell>("torch.nn.GRUCell", 3), new RecurrentCell<LSTMCell>("torch.nn.LSTMCell", 4), new RecurrentCell<RNNCell>("torch.nn.RNNCell", 1),
        new AttentionLayer(), new EncoderLayer(), new EncoderStack(), new DecoderLayer(), new DecoderStack(),
        .. ParameterFree(),
    ];

    /// <summary>
    /// TorchSharp's parameter-free layers without a fixed file encoding of their own, so that a <c>Sequential</c> of
    /// them loads without its architecture: their settings are public properties.
    /// </summary>
    private static IEnumerable<LayerDescriptor> ParameterFree() =>
    [
        new Settings<AdaptiveAvgPool1d>("torch.nn.AdaptiveAvgPool1d", m => new LayerAttributes().Set("size", m.output_size), a => nn.AdaptiveAvgPool1d(a.GetInt64("size", 1, MaxSize))),
        new Settings<AdaptiveMaxPool1d>("torch.nn.AdaptiveMaxPool1d", m => new LayerAttributes().Set("size", m.output_size), a => nn.AdaptiveMaxPool1d(a.GetInt64("size", 1, MaxSize))),
        new Settings<AdaptiveMaxPool2d>("torch.nn.AdaptiveMaxPool2d", m => new LayerAttributes().Set("size", m.output_size), a => nn.AdaptiveMaxPool2d(Sizes(a, "size", 2))),
        new Settings<MaxPool1d>(
            "torch.nn.MaxPool1d",
            m => new LayerAttributes().Set("kernel", m.kernel_size).Set("stride", m.stride ?? m.kernel_size).Set("padding", m.padding ?? 0).Set("dilation", m.dilation ?? 1).Set("ceil", m.ceil_mode),
            a => nn.MaxPool1d(a.GetInt64("kernel", 1, MaxSize), a.GetInt64("stride", 1, MaxSize), a.GetInt64("padding", 0, MaxSize), a.GetInt64("dilation", 1, MaxSize), a.GetBoolean("ceil"))),
        new Settings<AvgPool1d>(
            "torch.nn.AvgPool1d",
            m => new LayerAttributes().Set("kernel", m.kernel_size).Set("stride", m.stride ?? m.kernel_size).Set("padding", m.padding ?? 0).Set("ceil", m.ceil_mode).Set("countPad", m.count_include_pad),
            a => nn.AvgPool1d(a.GetInt64("kernel", 1, MaxSize), a.GetInt64("stride", 1, MaxSize), a.GetInt64("padding", 0, MaxSize), a.GetBoolean("ceil"), a.GetBoolean("countPad"))),
        new Settings<ELU>("torch.nn.ELU", m => new LayerAttributes().Set("alpha", m.alpha), a => nn.ELU(Finite(a, "alpha"))),
        new Settings<Softplus>("torch.nn.Softplus", m => new LayerAttributes().Set("beta", m.beta).Set("threshold", m.threshold), a => nn.Softplus(Finite(a, "beta"), Finite(a, "threshold"))),
        new Settings<Mish>("torch.nn.Mish", _ => new LayerAttributes(), _ => nn.Mish()),
        new Settings<Hardsigmoid>("torch.nn.Hardsigmoid", _ => new LayerAttributes(), _ => nn.Hardsigmoid()),
        new Settings<Softsign>("torch.nn.Softsign", _ => new LayerAttributes(), _ => nn.Softsign()),
        new Settings<GLU>("torch.nn.GLU", m => new LayerAttributes().Set("dim", m.dim), a => nn.GLU(a.GetInt64("dim", -8, 8))),
        new Settings<Dropout1d>("torch.nn.Dropout1d", m => new LayerAttributes().Set("p", m.p), a => nn.Dropout1d(Probability(a))),
        new Settings<Dropout2d>("torch.nn.Dropout2d", m => new LayerAttributes().Set("p", m.p), a => nn.Dropout2d(Probability(a))),
    ];

    private static long[] Sizes(LayerAttributes a, string name, int count)
    {
        var sizes = a.GetInt64Array(name);
        return sizes.Length == count && sizes.All(v => v is >= 1 and <= MaxSize)
            ? sizes
            : throw new InvalidDataException($"The attribute '{name}' must hold {count} sizes from 1 to {MaxSize}.");
    }

    private static double Finite(LayerAttributes a, string name) =>
        a.GetDouble(name) is var v && double.IsFinite(v) ? v : throw new InvalidDataException($"The attribute '{name}' must be finite.");

    private static double Probability(LayerAttributes a) =>
        a.GetDouble("p") is var p && p is >= 0 and <= 1 ? p : throw new InvalidDataException("The attribute 'p' must lie in [0, 1].");

    /// <summary>A managed layer whose settings are public properties, read and rebuilt by the given functions (no multiply-adds).</summary>
    private sealed class Settings<T>(string id, Func<T, LayerAttributes> read, Func<LayerAttributes, nn.Module> create) : BuiltIn(id, typeof(T))
        where T : nn.Module
    {
        public override LayerAttributes GetAttributes(nn.Module module) => read((T)module);

        public override nn.Module Create(LayerAttributes attributes, int version) => create(attributes);

        public override long? CountMacs(nn.Module module, Tensor input, Tensor output) => 0;
    }

    internal const long MaxSize = 1L << 30;

    // ------------------------------------------------------------------ managed layers

    private sealed class LinearLayer() : BuiltIn("torch.nn.Linear", typeof(Linear))
    {
        public override LayerAttributes GetAttributes(nn.Module module)
        {
            var l = (Linear)module;
            return new LayerAttributes().Set("in", l.in_features).Set("out", l.out_features).Set("bias", l.bias is not null);
        }

        public override nn.Module Create(LayerAttributes a, int version) =>
            nn.Linear(a.GetInt64("in", 1, MaxSize), a.GetInt64("out", 1, MaxSize), a.GetBoolean("bias"));

        public override long? CountMacs(nn.Module module, Tensor input, Tensor output) => output.numel() * ((Linear)module).in_features;
    }

    private sealed class ConvLayer<T>(string id, int dims) : BuiltIn(id, typeof(T))
        where T : Convolution
    {
        public override LayerAttributes GetAttributes(nn.Module module)
        {
            var c = (Convolution)module;
            var a = new LayerAttributes()
                .Set("in", c.in_channels).Set("out", c.out_channels).Set("kernel", c.kernel_size).Set("stride", c.stride)
                .Set("dilation", c.dilation).Set("groups", c.groups).Set("bias", c.bias is not null).Set("paddingMode", c.padding_mode.ToString());
            return c.padding_type is { } type ? a.Set("paddingType", type.ToString()) : a.Set("padding", c.padding!);
        }

        public override nn.Module Create(LayerAttributes a, int version)
        {
            long inC = a.GetInt64("in", 1, MaxSize), outC = a.GetInt64("out", 1, MaxSize), groups = a.GetInt64("groups", 1, MaxSize);
            long[] kernel = Sizes(a, "kernel", 1), stride = Sizes(a, "stride", 1), dilation = Sizes(a, "dilation", 1);
            if (inC % groups != 0 || outC % groups != 0)
            {
                throw new InvalidDataException($"A convolution with {inC} inputs and {outC} outputs cannot have {groups} groups.");
            }

            var mode = Parse<PaddingModes>(a.GetString("paddingMode"));
            bool bias = a.GetBoolean("bias");
            Convolution conv = dims switch
            {
                1 => nn.Conv1d(inC, outC, kernel[0], stride[0], 0, dilation[0], mode, groups, bias),
                2 => nn.Conv2d(inC, outC, (kernel[0], kernel[1]), (stride[0], stride[1]), (0, 0), (dilation[0], dilation[1]), mode, groups, bias),
                _ => nn.Conv3d(inC, outC, (kernel[0], kernel[1], kernel[2]), (stride[0], stride[1], stride[2]), (0, 0, 0), (dilation[0], dilation[1], dilation[2]), mode, groups, bias),
            };
            if (a.Contains("paddingType"))
            {
                conv.SetPadding(Parse<Padding>(a.GetString("paddingType")));
            }
            else
            {
                var padding = a.GetInt64Array("padding");
                conv.SetPadding(padding.Length == dims && padding.All(p => p is >= 0 and <= 1 << 16)
                    ? padding
                    : throw new InvalidDataException($"Convolution attribute 'padding' is [{string.Join(", ", padding)}], not {dims} sizes in 0..65536."));
            }

            return conv;
        }

        public override long? CountMacs(nn.Module module, Tensor input, Tensor output)
        {
            var weight = ((Convolution)module).weight;
            long perOutput = 1;
            for (int d = 1; d < weight.dim(); d++)
            {
                perOutput *= weight.shape[d];
            }

            return output.numel() * perOutput;
        }

        private long[] Sizes(LayerAttributes a, string name, long min) => ConvolutionSizes(a, name, dims, min, "Convolution");
    }

    /// <summary>
    /// ConvTranspose1d/2d/3d (managed): every setting is a public property. Each input element is multiplied by its
    /// channel's filters: input elements × (outputs / groups) × kernel multiply-adds.
    /// </summary>
    private sealed class ConvTransposeLayer<T>(string id, int dims) : BuiltIn(id, typeof(T))
        where T : ConvolutionTranspose
    {
        public override LayerAttributes GetAttributes(nn.Module module)
        {
            var c = (ConvolutionTranspose)module;
            return new LayerAttributes()
                .Set("in", c.in_channels).Set("out", c.out_channels).Set("kernel", c.kernel_size).Set("stride", c.stride)
                .Set("padding", c.padding ?? new long[dims]).Set("outputPadding", c.output_padding).Set("dilation", c.dilation)
                .Set("groups", c.groups).Set("bias", c.bias is not null);
        }

        public override nn.Module Create(LayerAttributes a, int version)
        {
            long inC = a.GetInt64("in", 1, MaxSize), outC = a.GetInt64("out", 1, MaxSize), groups = a.GetInt64("groups", 1, MaxSize);
            if (inC % groups != 0 || outC % groups != 0)
            {
                throw new InvalidDataException($"A transposed convolution with {inC} inputs and {outC} outputs cannot have {groups} groups.");
            }

            long[] k = Sizes(a, "kernel", 1), s = Sizes(a, "stride", 1), p = Sizes(a, "padding", 0), o = Sizes(a, "outputPadding", 0), d = Sizes(a, "dilation", 1);
            if (o.Where((v, i) => v >= Math.Max(s[i], d[i])).Any())
            {
                throw new InvalidDataException($"Transposed convolution attribute 'outputPadding' [{string.Join(", ", o)}] must be smaller than the stride or the dilation.");
            }

            bool bias = a.GetBoolean("bias");
            return dims switch
            {
                1 => nn.ConvTranspose1d(inC, outC, k[0], s[0], p[0], o[0], d[0], groups: groups, bias: bias),
                2 => nn.ConvTranspose2d(inC, outC, (k[0], k[1]), (s[0], s[1]), (p[0], p[1]), (o[0], o[1]), (d[0], d[1]), groups: groups, bias: bias),
                _ => nn.ConvTranspose3d(inC, outC, (k[0], k[1], k[2]), (s[0], s[1], s[2]), (p[0], p[1], p[2]), (o[0], o[1], o[2]), (d[0], d[1], d[2]), groups: groups, bias: bias),
            };
        }

        public override long? CountMacs(nn.Module module, Tensor input, Tensor output)
        {
            var weight = ((ConvolutionTranspose)module).weight;
            long perInput = 1;
            for (int i = 1; i < weight.dim(); i++)
            {
                perInput *= weight.shape[i];
            }

            return input.numel() * perInput;
        }

        private long[] Sizes(LayerAttributes a, string name, long min) => ConvolutionSizes(a, name, dims, min, "Transposed convolution");
    }

    /// <summary>A convolution's per-dimension setting: <paramref name="dims"/> sizes from <paramref name="min"/> to 65,536.</summary>
    private static long[] ConvolutionSizes(LayerAttributes a, string name, int dims, long min, string kind)
    {
        var v = a.GetInt64Array(name);
        return v.Length == dims && v.All(x => x >= min && x <= 1 << 16)
            ? v
            : throw new InvalidDataException($"{kind} attribute '{name}' is [{string.Join(", ", v)}], not {dims} sizes in {min}..65536.");
    }

    private sealed class GroupNormLayer() : BuiltIn("torch.nn.GroupNorm", typeof(GroupNorm))
    {
        public override LayerAttributes GetAttributes(nn.Module module)
        {
            var g = (GroupNorm)module;
            long channels = g.weight?.shape[0] ?? throw new UnsupportedModelException(null, nameof(GroupNorm), "A GroupNorm without affine parameters does not show its channel count; build it with affine: true.");
            return new LayerAttributes().Set("groups", g.num_groups).Set("channels", channels).Set("eps", g.eps).Set("affine", g.affine);
        }

        public override nn.Module Create(LayerAttributes a, int version)
        {
            long groups = a.GetInt64("groups", 1, MaxSize), channels = a.GetInt64("channels", 1, MaxSize);
            return channels % groups == 0
                ? nn.GroupNorm(groups, channels, a.GetDouble("eps"), a.GetBoolean("affine"))
                : throw new InvalidDataException($"A GroupNorm cannot split {channels} channels into {groups} groups.");
        }
    }

    // ------------------------------------------------------------------ native layers

    private sealed class EmbeddingLayer() : BuiltIn("torch.nn.Embedding", typeof(Embedding))
    {
        public override LayerAttributes GetAttributes(nn.Module module)
        {
            // The weight getter of a native module makes a new wrapper on every call: free it here.
            using var w = ((Embedding)module).weight!;
            return new LayerAttributes().Set("count", w.shape[0]).Set("dim", w.shape[1]);
        }

        public override nn.Module Create(LayerAttributes a, int version) => nn.Embedding(a.GetInt64("count", 1, MaxSize), a.GetInt64("dim", 1, MaxSize));
    }

    /// <summary>
    /// EmbeddingBag (native): sizes from the weight; the reduction, whether the offsets include the end, and the padding
    /// index by probing. The padding candidates are the ids whose one-id bag comes out zero (the first 8) and none; where
    /// two candidates compute the same bags (a zero row), either is exact.
    /// </summary>
    private sealed class EmbeddingBagLayer() : ProbedBuiltIn("torch.nn.EmbeddingBag", typeof(EmbeddingBag))
    {
        private const int MaxPaddingCandidates = 8;

        public override nn.Module Create(LayerAttributes a, int version)
        {
            long count = a.GetInt64("count", 1, MaxSize), dim = a.GetInt64("dim", 1, MaxSize);
            long padding = a.GetInt64("padding", -1, count - 1);
            return nn.EmbeddingBag(count, dim, mode: Parse<EmbeddingBagMode>(a.GetString("mode")), include_last_offset: a.GetBoolean("lastOffset"), padding_index: padding);
        }

        protected override LayerAttributes Probe(nn.Module module)
        {
            var w = module.state_dict()["weight"];
            long count = w.shape[0];
            var paddingCandidates = PaddingCandidates((EmbeddingBag)module, w);
            var basis = new LayerAttributes().Set("count", count).Set("dim", w.shape[1]);
            var candidates = (from mode in new[] { EmbeddingBagMode.Sum, EmbeddingBagMode.Mean, EmbeddingBagMode.Max }
                              from last in new[] { false, true }
                              from padding in paddingCandidates.Prepend(-1L)
                              select With(basis, a => a.Set("mode", mode.ToString()).Set("lastOffset", last).Set("padding", padding))).ToList();

            // Bags of 3, 2, 4 and the rest of random ids, each zero row among them; the last offset is the end, so the
            // two offset conventions give different numbers of bags.
            Tensor[] Inputs(Generator g)
            {
                var ids = cat([randint(0, count, [12], generator: g, dtype: ScalarType.Int64), tensor(paddingCandidates)]);
                return [ids, tensor(new long[] { 0, 3, 5, 9, ids.shape[0] })];
            }

            return ProbeSettings(module, candidates, this, Inputs, (m, x) => ((EmbeddingBag)m).call(x[0], x[1], null));
        }

        // One bag per id: a padding id's bag is empty, so its row comes out zero where its weight row is not (or the row
        // is zero anyway, and then any choice computes the same). Under the other offset convention the last id is in no bag.
        private static long[] PaddingCandidates(EmbeddingBag bag, Tensor weight)
        {
            using var noGrad = no_grad();
            using (ModuleModes.Evaluating(bag))
            {
                long count = weight.shape[0];
                var ids = KeptScalars.Range(count, ScalarType.Int64, weight.device);
                var rows = bag.call(ids, ids, null);
                long seen = Math.Min(rows.shape[0], count);
                var emptyBag = rows.narrow(0, 0, seen).abs().sum(1).eq(KeptScalars.Zero);
                var candidates = emptyBag.nonzero().flatten().data<long>().ToList();
                if (seen < count)
                {
                    candidates.Add(count - 1);
                }

                return [.. candidates.Take(MaxPaddingCandidates)];
            }
        }
    }

    /// <summary>GRU (3 gates), LSTM (4) and RNN (1): sizes, layers, directions and biases from the weights; layout and non-linearity by probe.</summary>
    private sealed class RecurrentLayer<T>(string id, int gates) : ProbedBuiltIn(id, typeof(T))
        where T : nn.Module
    {
        public override nn.Module Create(LayerAttributes a, int version)
        {
            long input = a.GetInt64("input", 1, MaxSize), hidden = a.GetInt64("hidden", 1, MaxSize), layers = a.GetInt64("layers", 1, 1024);
            bool bias = a.GetBoolean("bias"), batchFirst = a.GetBoolean("batchFirst"), bidirectional = a.GetBoolean("bidirectional");
            return gates switch
            {
                3 => nn.GRU(input, hidden, layers, bias, batchFirst, 0, bidirectional),
                4 => nn.LSTM(input, hidden, layers, bias, batchFirst, 0, bidirectional),
                _ => nn.RNN(input, hidden, layers, Parse<nn.NonLinearities>(a.GetString("nonlinearity")), bias, batchFirst, 0, bidirectional),
            };
        }

        protected override LayerAttributes Probe(nn.Module module)
        {
            var state = module.state_dict();
            if (state.Keys.Any(k => k.StartsWith("weight_hr", StringComparison.Ordinal)))
            {
                throw new UnsupportedModelException(null, typeof(T).Name, $"The {typeof(T).Name} has projections (proj_size), which TorchSharp's constructor cannot build.");
            }

            var w = state["weight_ih_l0"];
            long hidden = state["weight_hh_l0"].shape[1];
            long layers = state.Keys.Count(k => k.StartsWith("weight_ih_l", StringComparison.Ordinal) && !k.EndsWith("_reverse", StringComparison.Ordinal));
            var basis = new LayerAttributes()
                .Set("input", w.shape[1]).Set("hidden", hidden).Set("layers", layers)
                .Set("bias", state.ContainsKey("bias_ih_l0")).Set("bidirectional", state.ContainsKey("weight_ih_l0_reverse"));
            string[] nonlinearities = gates == 1 ? [nameof(nn.NonLinearities.Tanh), nameof(nn.NonLinearities.ReLU)] : [string.Empty];
            var candidates = from batchFirst in new[] { false, true }
                             from nl in nonlinearities
                             select With(basis, a => { a.Set("batchFirst", batchFirst); if (nl.Length > 0) { a.Set("nonlinearity", nl); } });
            // [3, 2, input]: time-major and batch-first read it differently, so only the right layout matches.
            return ProbeSettings(module, candidates.ToList(), this, g => [randn([3, 2, w.shape[1]], generator: g)], Run);
        }

        public override Action? AttachMacsCounter(nn.Module module, Action<long> add)
        {
            ArgumentNullException.ThrowIfNull(add);
            var a = GetAttributes(module);
            long hidden = a.GetInt64("hidden"), input = a.GetInt64("input"), layers = a.GetInt64("layers");
            long directions = a.GetBoolean("bidirectional") ? 2 : 1;
            long perToken = 0;
            for (long l = 0; l < layers; l++)
            {
                // Each gate multiplies the step's input and the previous hidden state by its weights.
                perToken += directions * gates * hidden * ((l == 0 ? input : hidden * directions) + hidden);
            }

            long Macs(Tensor x) => (x.dim() == 3 ? x.shape[0] * x.shape[1] : x.shape[0]) * perToken;
            return module switch
            {
                GRU gru => gru.register_forward_hook((m, x, h, output) => { add(Macs(x)); return output; }).remove,
                LSTM lstm => lstm.register_forward_hook((m, x, h, output) => { add(Macs(x)); return output; }).remove,
                RNN rnn => rnn.register_forward_hook((m, x, h, output) => { add(Macs(x)); return output; }).remove,
                _ => null,
            };
        }

        private static Tensor Run(nn.Module m, Tensor[] x) => m switch
        {
            GRU gru => gru.forward(x[0], null).Item1,
            LSTM lstm => lstm.forward(x[0], null).Item1,
            RNN rnn => rnn.forward(x[0], null).Item1,
            _ => throw new InvalidOperationException(),
        };
    }

    /// <summary>
    /// TorchSharp's GRUCell, LSTMCell and RNNCell (native, one time step): sizes and bias from the weights, an RNN
    /// cell's non-linearity by probing (the one setting TorchSharp hides).
    /// </summary>
    private sealed class RecurrentCell<T>(string id, int gates) : ProbedBuiltIn(id, typeof(T))
        where T : nn.Module
    {
        public override nn.Module Create(LayerAttributes a, int version)
        {
            long input = a.GetInt64("input", 1, MaxSize), hidden = a.GetInt64("hidden", 1, MaxSize);
            bool bias = a.GetBoolean("bias");
            return gates switch
            {
                3 => nn.GRUCell(input, hidden, bias),
                4 => nn.LSTMCell(input, hidden, bias),
                _ => nn.RNNCell(input, hidden, Parse<nn.NonLinearities>(a.GetString("nonlinearity")), bias),
            };
        }

        protected override LayerAttributes Probe(nn.Module module)
        {
            var state = module.state_dict();
            var w = state["weight_ih"];
            long hidden = state["weight_hh"].shape[1];
            if (w.shape[0] != gates * hidden)
            {
                throw new UnsupportedModelException(null, typeof(T).Name, $"The {typeof(T).Name}'s input weight has {w.shape[0]} rows where {gates} gates of {hidden} need {gates * hidden}.");
            }

            var basis = new LayerAttributes().Set("input", w.shape[1]).Set("hidden", hidden).Set("bias", state.ContainsKey("bias_ih"));
            string[] nonlinearities = gates == 1 ? [nameof(nn.NonLinearities.Tanh), nameof(nn.NonLinearities.ReLU)] : [string.Empty];
            var candidates = nonlinearities.Select(nl => With(basis, a => { if (nl.Length > 0) { a.Set("nonlinearity", nl); } })).ToList();
            return ProbeSettings(module, candidates, this, g => [randn([2, w.shape[1]], generator: g), randn([2, hidden], generator: g)], Run);
        }

        public override Action? AttachMacsCounter(nn.Module module, Action<long> add)
        {
            ArgumentNullException.ThrowIfNull(add);
            var a = GetAttributes(module);
            long perSample = gates * a.GetInt64("hidden") * (a.GetInt64("input") + a.GetInt64("hidden"));
            long Macs(Tensor x) => (x.dim() == 2 ? x.shape[0] : 1) * perSample;
            return module switch
            {
                GRUCell gru => gru.register_forward_hook((m, x, h, output) => { add(Macs(x)); return output; }).remove,
                LSTMCell lstm => lstm.register_forward_hook((m, x, h, output) => { add(Macs(x)); return output; }).remove,
                RNNCell rnn => rnn.register_forward_hook((m, x, h, output) => { add(Macs(x)); return output; }).remove,
                _ => null,
            };
        }

        // The probe starts from a non-zero state, so the hidden-to-hidden weights and the non-linearity both show.
        private static Tensor Run(nn.Module m, Tensor[] x) => m switch
        {
            GRUCell gru => gru.forward(x[0], x[1]),
            LSTMCell lstm => lstm.forward(x[0], (x[1], x[1])).Item1,
            RNNCell rnn => rnn.forward(x[0], x[1]),
            _ => throw new InvalidOperationException(),
        };
    }

    private sealed class AttentionLayer() : ProbedBuiltIn("torch.nn.MultiheadAttention", typeof(MultiheadAttention))
    {
        public override nn.Module Create(LayerAttributes a, int version)
        {
            long dim = a.GetInt64("dim", 1, MaxSize), heads = a.GetInt64("heads", 1, dim);
            return dim % heads == 0
                ? nn.MultiheadAttention(dim, heads, 0, a.GetBoolean("bias"), a.GetBoolean("biasKv"), a.GetBoolean("zeroAttention"), a.GetInt64("kdim", 1, MaxSize), a.GetInt64("vdim", 1, MaxSize))
                : throw new InvalidDataException($"An attention layer of width {dim} cannot have {heads} heads.");
        }

        public override Action? AttachMacsCounter(nn.Module module, Action<long> add)
        {
            ArgumentNullException.ThrowIfNull(add);
            var a = GetAttributes(module);
            long dim = a.GetInt64("dim"), kdim = a.GetInt64("kdim"), vdim = a.GetInt64("vdim");
            return ((MultiheadAttention)module).register_forward_hook((m, q, k, v, padding, weights, mask, output) =>
            {
                if (q.dim() == 3 && k.dim() == 3)
                {
                    long lq = q.shape[0], lk = k.shape[0], batch = q.shape[1];
                    // Query, key, value and output projections, then scores and the weighted sum of values.
                    add((lq * batch * dim * dim * 2) + (lk * batch * dim * (kdim + vdim)) + (2 * lq * lk * batch * dim));
                }

                return output;
            }).remove;
        }

        protected override LayerAttributes Probe(nn.Module module)
        {
            var state = module.state_dict();
            bool packed = state.ContainsKey("in_proj_weight");
            long dim = state["out_proj.weight"].shape[0];
            long kdim = packed ? dim : state["k_proj_weight"].shape[1], vdim = packed ? dim : state["v_proj_weight"].shape[1];
            var basis = new LayerAttributes().Set("dim", dim).Set("kdim", kdim).Set("vdim", vdim)
                .Set("bias", state.ContainsKey("in_proj_bias")).Set("biasKv", state.ContainsKey("bias_k"));
            var candidates = (from heads in Divisors(dim)
                              from zero in new[] { false, true }
                              select With(basis, a => a.Set("heads", heads).Set("zeroAttention", zero))).ToList();
            return ProbeSettings(module, candidates, this, g => [randn([3, 2, dim], generator: g), randn([4, 2, kdim], generator: g), randn([4, 2, vdim], generator: g)],
                (m, x) => ((MultiheadAttention)m).forward(x[0], x[1], x[2], null, false, null).Item1);
        }
    }

    /// <summary>What encoder and decoder layers share: width, feed-forward size; heads and activation by probe.</summary>
    private static LayerAttributes TransformerBasis(Dictionary<string, Tensor> state, string prefix) =>
        new LayerAttributes().Set("dim", state[prefix + "linear1.weight"].shape[1]).Set("feedForward", state[prefix + "linear1.weight"].shape[0]);

    private static List<LayerAttributes> TransformerCandidates(LayerAttributes basis, long? layers) =>
        (from heads in Divisors(basis.GetInt64("dim"))
         from activation in new[] { nameof(nn.Activations.ReLU), nameof(nn.Activations.GELU) }
         select With(basis, a =>
         {
             a.Set("heads", heads).Set("activation", activation);
             if (layers is { } n)
             {
                 a.Set("layers", n);
             }
         })).ToList();

    private static (long Dim, long Heads, long FeedForward, nn.Activations Activation) TransformerSettings(LayerAttributes a)
    {
        long dim = a.GetInt64("dim", 1, MaxSize), heads = a.GetInt64("heads", 1, dim);
        return dim % heads == 0
            ? (dim, heads, a.GetInt64("feedForward", 1, MaxSize), Parse<nn.Activations>(a.GetString("activation")))
            : throw new InvalidDataException($"A transformer layer of width {dim} cannot have {heads} heads.");
    }

    private static long CountLayers(Dictionary<string, Tensor> state) =>
        state.Keys.Where(k => k.StartsWith("layers.", StringComparison.Ordinal)).Select(k => k.Split('.')[1]).Distinct().Count();

    private sealed class EncoderLayer() : ProbedBuiltIn("torch.nn.TransformerEncoderLayer", typeof(TransformerEncoderLayer))
    {
        protected override LayerAttributes Probe(nn.Module m)
        {
            var basis = TransformerBasis(m.state_dict(), string.Empty);
            return ProbeSettings(m, TransformerCandidates(basis, null), this, g => [randn([3, 2, basis.GetInt64("dim")], generator: g)],
                (l, x) => ((TransformerEncoderLayer)l).forward(x[0]));
        }

        public override nn.Module Create(LayerAttributes a, int version)
        {
            var (dim, heads, ff, activation) = TransformerSettings(a);
            return nn.TransformerEncoderLayer(dim, heads, ff, 0.1, activation);
        }

        public override long? CountMacs(nn.Module module, Tensor input, Tensor output) => TransformerMacs(input, input, GetAttributes(module).GetInt64("feedForward"), crossAttention: false);
    }

    private sealed class EncoderStack() : ProbedBuiltIn("torch.nn.TransformerEncoder", typeof(TransformerEncoder))
    {
        protected override LayerAttributes Probe(nn.Module m)
        {
            var state = m.state_dict();
            var basis = TransformerBasis(state, "layers.0.");
            return ProbeSettings(m, TransformerCandidates(basis, CountLayers(state)), this, g => [randn([3, 2, basis.GetInt64("dim")], generator: g)],
                (l, x) => ((TransformerEncoder)l).forward(x[0], null!, null!));
        }

        public override nn.Module Create(LayerAttributes a, int version)
        {
            var (dim, heads, ff, activation) = TransformerSettings(a);
            using var layer = nn.TransformerEncoderLayer(dim, heads, ff, 0.1, activation);
            return nn.TransformerEncoder(layer, a.GetInt64("layers", 1, 1024));
        }

        public override Action? AttachMacsCounter(nn.Module module, Action<long> add)
        {
            ArgumentNullException.ThrowIfNull(add);
            var a = GetAttributes(module);
            long layers = a.GetInt64("layers"), ff = a.GetInt64("feedForward");
            return ((TransformerEncoder)module).register_forward_hook((m, src, mask, padding, output) =>
            {
                add(layers * TransformerMacs(src, src, ff, crossAttention: false));
                return output;
            }).remove;
        }
    }

    private sealed class DecoderLayer() : ProbedBuiltIn("torch.nn.TransformerDecoderLayer", typeof(TransformerDecoderLayer))
    {
        protected override LayerAttributes Probe(nn.Module m)
        {
            var basis = TransformerBasis(m.state_dict(), string.Empty);
            long dim = basis.GetInt64("dim");
            return ProbeSettings(m, TransformerCandidates(basis, null), this, g => [randn([3, 2, dim], generator: g), randn([4, 2, dim], generator: g)],
                (l, x) => ((TransformerDecoderLayer)l).forward(x[0], x[1], null!, null!, null!, null!));
        }

        public override nn.Module Create(LayerAttributes a, int version)
        {
            var (dim, heads, ff, activation) = TransformerSettings(a);
            return nn.TransformerDecoderLayer(dim, heads, ff, 0.1, activation);
        }

        public override Action? AttachMacsCounter(nn.Module module, Action<long> add)
        {
            ArgumentNullException.ThrowIfNull(add);
            long ff = GetAttributes(module).GetInt64("feedForward");
            return ((TransformerDecoderLayer)module).register_forward_hook((m, target, memory, targetMask, memoryMask, targetPadding, memoryPadding, output) =>
            {
                add(TransformerMacs(target, memory, ff, crossAttention: true));
                return output;
            }).remove;
        }
    }

    private sealed class DecoderStack() : ProbedBuiltIn("torch.nn.TransformerDecoder", typeof(TransformerDecoder))
    {
        protected override LayerAttributes Probe(nn.Module m)
        {
            var state = m.state_dict();
            var basis = TransformerBasis(state, "layers.0.");
            long dim = basis.GetInt64("dim");
            return ProbeSettings(m, TransformerCandidates(basis, CountLayers(state)), this, g => [randn([3, 2, dim], generator: g), randn([4, 2, dim], generator: g)],
                (l, x) => ((TransformerDecoder)l).forward(x[0], x[1], null!, null, null, null));
        }

        public override nn.Module Create(LayerAttributes a, int version)
        {
            var (dim, heads, ff, activation) = TransformerSettings(a);
            using var layer = nn.TransformerDecoderLayer(dim, heads, ff, 0.1, activation);
            return nn.TransformerDecoder(layer, a.GetInt64("layers", 1, 1024));
        }

        public override Action? AttachMacsCounter(nn.Module module, Action<long> add)
        {
            ArgumentNullException.ThrowIfNull(add);
            var a = GetAttributes(module);
            long layers = a.GetInt64("layers"), ff = a.GetInt64("feedForward");
            return ((TransformerDecoder)module).register_forward_hook((m, target, memory, targetMask, memoryMask, targetPadding, memoryPadding, output) =>
            {
                add(layers * TransformerMacs(target, memory, ff, crossAttention: true));
                return output;
            }).remove;
        }
    }

    /// <summary>
    /// MACs of one transformer layer on time-major inputs [L, N, E]: the self-attention's projections, scores and mix,
    /// for a decoder layer also the cross-attention over the memory [M, N, E], and the feed-forward block.
    /// </summary>
    private static long TransformerMacs(Tensor input, Tensor memory, long feedForward, bool crossAttention)
    {
        if (input.dim() != 3 || memory.dim() != 3)
        {
            return 0;
        }

        long length = input.shape[0], batch = input.shape[1], dim = input.shape[2], memoryLength = memory.shape[0];
        long tokens = length * batch;
        long selfAttention = (tokens * 4 * dim * dim) + (batch * 2 * length * length * dim);
        long cross = crossAttention ? (tokens * 2 * dim * dim) + (memoryLength * batch * 2 * dim * dim) + (batch * 2 * length * memoryLength * dim) : 0;
        return selfAttention + cross + (tokens * 2 * dim * feedForward);
    }

    // ------------------------------------------------------------------ probing

    /// <summary>
    /// Runs the layer and each candidate (built from the settings, holding the layer's weights) on the same probe input,
    /// in evaluation mode without gradients, and returns the first settings whose output matches exactly.
    /// </summary>
    private static LayerAttributes ProbeSettings(nn.Module module, List<LayerAttributes> candidates, LayerDescriptor descriptor, Func<Generator, Tensor[]> inputs, Func<nn.Module, Tensor[], Tensor> run)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var reference = module.parameters().FirstOrDefault();
        using (ModuleModes.Evaluating(module))
        {
            using var generator = new Generator(20261204);
            var x = inputs(generator);
            if (reference is not null)
            {
                // Ids and offsets keep their integer type; values take the layer's.
                x = x.Select(t => t.is_floating_point() ? t.to(reference.dtype, reference.device) : t.to(reference.device)).ToArray();
            }

            var expected = run(module, x);
            foreach (var candidate in candidates)
            {
                using var built = descriptor.Create(candidate, descriptor.Version);
                LayerCopy.CopyOwnTensors(module, built, string.Empty);
                built.eval();
                var actual = run(built, x);
                if (actual.shape.SequenceEqual(expected.shape) && actual.eq(expected).all().item<bool>())
                {
                    return candidate;
                }
            }
        }

        throw new UnsupportedModelException(null, module.GetType().Name,
            $"The {module.GetType().Name} has a setting that TorchSharp does not expose and that no candidate reproduces (tried {candidates.Count}); " +
            $"it cannot be copied or stored safely. Register a descriptor of your own for it with {nameof(LayerRegistry)}.{nameof(LayerRegistry.Register)}.");
    }

    private static IEnumerable<long> Divisors(long n)
    {
        for (long d = 1; d <= n; d++)
        {
            if (n % d == 0)
            {
                yield return d;
            }
        }
    }

    private static LayerAttributes With(LayerAttributes basis, Action<LayerAttributes> change)
    {
        var a = new LayerAttributes();
        foreach (var (k, v) in basis)
        {
            _ = v switch
            {
                long l => a.Set(k, l),
                double d => a.Set(k, d),
                bool b => a.Set(k, b),
                string s => a.Set(k, s),
                long[] arr => a.Set(k, arr),
                _ => a,
            };
        }

        change(a);
        return a;
    }

    private static TEnum Parse<TEnum>(string text)
        where TEnum : struct, Enum =>
        Enum.TryParse<TEnum>(text, ignoreCase: false, out var value) && Enum.IsDefined(value)
            ? value
            : throw new InvalidDataException($"'{text}' is not a {typeof(TEnum).Name} ({string.Join(", ", Enum.GetNames<TEnum>())}).");
}
