using System.Text;
using System.Text.RegularExpressions;
using Microsoft.ML.Tokenizers;

namespace ModelCompression.Samples;

/// <summary>
/// A byte-level byte-pair-encoding tokenizer: every text encodes (no unknown tokens) and decodes back to itself.
/// Token ids 0 to 255 are the single bytes of UTF-8; each learned merge adds one token, the bytes of two earlier tokens
/// joined. Encoding runs on Microsoft.ML.Tokenizers' <see cref="TiktokenTokenizer"/>.
/// </summary>
/// <remarks>
/// Text is first cut into pieces by <see cref="PreTokenizerPattern"/> (words with their leading space, numbers,
/// punctuation runs, white space); a piece never merges with its neighbours. Within a piece, encoding starts from its
/// UTF-8 bytes and repeatedly joins the adjacent pair whose joined bytes are the token with the lowest id, leftmost
/// first, until no adjacent pair joins into a token. The converter in <c>tools/text-converter</c> encodes the same way,
/// and the tests check that both agree id for id on the bundled Brown corpus.
/// </remarks>
public sealed class ByteLevelBpeTokenizer
{
    /// <summary>The number of single-byte tokens (ids 0 to 255).</summary>
    public const int ByteTokenCount = 256;

    private readonly byte[][] _tokenBytes;
    private readonly TiktokenTokenizer _tokenizer;

    private ByteLevelBpeTokenizer(string pattern, byte[][] tokenBytes, TiktokenTokenizer tokenizer)
    {
        PreTokenizerPattern = pattern;
        _tokenBytes = tokenBytes;
        _tokenizer = tokenizer;
    }

    /// <summary>Gets the number of tokens: the 256 bytes and one per merge.</summary>
    public int VocabularySize => _tokenBytes.Length;

    /// <summary>Gets the regular expression that cuts text into pieces before merging.</summary>
    public string PreTokenizerPattern { get; }

    /// <summary>Gets the underlying Microsoft.ML.Tokenizers tokenizer, for its wider API (offsets, token counting with limits).</summary>
    public Tokenizer Tokenizer => _tokenizer;

    /// <summary>Encodes a text to token ids.</summary>
    /// <param name="text">The text.</param>
    /// <returns>The token ids, each below <see cref="VocabularySize"/>.</returns>
    public int[] Encode(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        return [.. _tokenizer.EncodeToIds(text)];
    }

    /// <summary>Counts the tokens of a text without keeping them.</summary>
    /// <param name="text">The text.</param>
    /// <returns>The number of tokens <see cref="Encode"/> would return.</returns>
    public int CountTokens(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        return _tokenizer.CountTokens(text);
    }

    /// <summary>Decodes token ids to text. Ids that split a character's UTF-8 bytes decode to U+FFFD.</summary>
    /// <param name="ids">The token ids.</param>
    /// <returns>The text.</returns>
    /// <exception cref="ArgumentOutOfRangeException">An id is negative or not below <see cref="VocabularySize"/>.</exception>
    public string Decode(IEnumerable<int> ids)
    {
        ArgumentNullException.ThrowIfNull(ids);
        var bytes = new List<byte>();
        foreach (int id in ids)
        {
            bytes.AddRange(TokenBytes(id));
        }

        return Encoding.UTF8.GetString(bytes.ToArray());
    }

    /// <summary>Returns the bytes a token stands for.</summary>
    /// <param name="id">The token id.</param>
    /// <returns>Its UTF-8 bytes (possibly part of a character).</returns>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="id"/> is negative or not below <see cref="VocabularySize"/>.</exception>
    public ReadOnlySpan<byte> TokenBytes(int id)
    {
        if ((uint)id >= (uint)_tokenBytes.Length)
        {
            throw new ArgumentOutOfRangeException(nameof(id), id, $"Token ids run from 0 to {_tokenBytes.Length - 1}.");
        }

        return _tokenBytes[id];
    }

    /// <summary>Builds a tokenizer from its merges.</summary>
    /// <param name="pattern">The pre-tokenizer's regular expression.</param>
    /// <param name="merges">The merges in order: token 256 + i joins the bytes of <c>merges[i].Left</c> and <c>merges[i].Right</c>.</param>
    /// <returns>The tokenizer.</returns>
    /// <exception cref="ArgumentException">A merge refers to a later token, or yields bytes an earlier token already has.</exception>
    internal static ByteLevelBpeTokenizer Create(string pattern, IReadOnlyList<(int Left, int Right)> merges)
    {
        var tokenBytes = new byte[ByteTokenCount + merges.Count][];
        var seen = new HashSet<string>(tokenBytes.Length, StringComparer.Ordinal);
        for (int b = 0; b < ByteTokenCount; b++)
        {
            tokenBytes[b] = [(byte)b];
            seen.Add(Convert.ToBase64String(tokenBytes[b]));
        }

        // Microsoft.ML.Tokenizers reads a vocabulary in tiktoken's form: base64 of the token's bytes, a space, its id (rank).
        var vocabulary = new StringBuilder();
        for (int id = 0; id < tokenBytes.Length; id++)
        {
            if (id >= ByteTokenCount)
            {
                var (left, right) = merges[id - ByteTokenCount];
                if ((uint)left >= (uint)id || (uint)right >= (uint)id)
                {
                    throw new ArgumentException($"Merge {id - ByteTokenCount} joins tokens {left} and {right}, not both earlier than {id}.", nameof(merges));
                }

                tokenBytes[id] = [.. tokenBytes[left], .. tokenBytes[right]];
                if (!seen.Add(Convert.ToBase64String(tokenBytes[id])))
                {
                    throw new ArgumentException($"Merge {id - ByteTokenCount} yields the bytes of an earlier token.", nameof(merges));
                }
            }

            vocabulary.Append(Convert.ToBase64String(tokenBytes[id])).Append(' ').Append(id).Append('\n');
        }

        var regex = new Regex(pattern, RegexOptions.CultureInvariant | RegexOptions.Compiled);
        using var stream = new MemoryStream(Encoding.UTF8.GetBytes(vocabulary.ToString()));
        var tokenizer = TiktokenTokenizer.Create(stream, new RegexPreTokenizer(regex, specialTokens: null), normalizer: null);
        return new ByteLevelBpeTokenizer(pattern, tokenBytes, tokenizer);
    }
}
