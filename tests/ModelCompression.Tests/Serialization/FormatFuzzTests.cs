using System.Buffers.Binary;
using System.Diagnostics;
using ModelCompression.Serialization;
using NUnit.Framework;
using static TorchSharp.torch;

namespace ModelCompression.Tests.Serialization;

/// <summary>Mutations of valid files: what a corrupt disk, a cut download or a hostile sender produces.</summary>
internal static class FormatFuzzer
{
    public const int HeaderBytes = 24;

    /// <summary>The sections (start of the section, its payload length), walking the framing while it is consistent.</summary>
    public static List<(int Start, int Length)> Sections(byte[] file)
    {
        var sections = new List<(int, int)>();
        int at = HeaderBytes;
        while (file.Length - at >= 16)
        {
            ulong length = BinaryPrimitives.ReadUInt64LittleEndian(file.AsSpan(at + 4));
            if (length > (ulong)(file.Length - at - 16))
            {
                break;
            }

            sections.Add((at, (int)length));
            at += 16 + (int)length;
        }

        return sections;
    }

    /// <summary>Recomputes the header's and every section's CRC, so a mutation reaches the parser behind them.</summary>
    public static void FixChecksums(byte[] file)
    {
        if (file.Length < HeaderBytes)
        {
            return;
        }

        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(20), System.IO.Hashing.Crc32.HashToUInt32(file.AsSpan(0, 20)));
        foreach (var (start, length) in Sections(file))
        {
            BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(start + 12 + length), System.IO.Hashing.Crc32.HashToUInt32(file.AsSpan(start, 12 + length)));
        }
    }

    /// <summary>Swaps data sections <paramref name="a"/> and <paramref name="b"/> (0 is the first after the architecture); null if absent.</summary>
    public static byte[]? SwapDataSections(byte[] file, int a, int b)
    {
        var sections = Sections(file);
        if (Math.Max(a, b) + 1 >= sections.Count || a == b)
        {
            return null;
        }

        var pieces = sections.Select(s => file.AsSpan(s.Start, s.Length + 16).ToArray()).ToList();
        (pieces[a + 1], pieces[b + 1]) = (pieces[b + 1], pieces[a + 1]);
        var end = sections[^1].Start + sections[^1].Length + 16;
        return [.. file.AsSpan(0, HeaderBytes), .. pieces.SelectMany(p => p), .. file.AsSpan(end)];
    }

    /// <summary>One mutation, chosen and placed by <paramref name="random"/>; returns the bytes and what was done.</summary>
    public static (byte[] Bytes, string What) Mutate(byte[] valid, Random random)
    {
        var file = (byte[])valid.Clone();
        var sections = Sections(file);
        int kind = random.Next(8);
        switch (kind)
        {
            case 0:
            {
                int flips = random.Next(1, 5);
                for (int i = 0; i < flips; i++)
                {
                    file[random.Next(file.Length)] ^= (byte)(1 << random.Next(8));
                }

                return (file, $"{flips} bit flips");
            }

            case 1:
            {
                int length = random.Next(file.Length);
                return (file[..length], $"truncated to {length} bytes");
            }

            case 2:
            {
                // A length field set huge or negative: the header's file length or section count, or a section's length.
                ulong[] values = [ulong.MaxValue, long.MaxValue, 1UL << 40, (ulong)int.MaxValue + 1, unchecked((ulong)-100), (ulong)random.Next()];
                ulong value = values[random.Next(values.Length)];
                int target = random.Next(sections.Count + 2);
                if (target == 0)
                {
                    BinaryPrimitives.WriteUInt64LittleEndian(file.AsSpan(12), value);
                }
                else if (target == 1)
                {
                    BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(8), (uint)value);
                }
                else
                {
                    BinaryPrimitives.WriteUInt64LittleEndian(file.AsSpan(sections[target - 2].Start + 4), value);
                }

                if (random.Next(2) == 0)
                {
                    FixChecksums(file);
                }

                return (file, $"length field {target} set to {value}");
            }

            case 3:
            {
                int count = Math.Max(0, sections.Count - 1);
                var swapped = count >= 2 ? SwapDataSections(file, random.Next(count), random.Next(count)) : null;
                return swapped is null ? (file[..^1], "truncated by one byte") : (swapped, "data sections swapped");
            }

            default:
            {
                // Structural mutations behind valid checksums: the parser itself must catch them.
                var (start, length) = sections[random.Next(sections.Count)];
                if (length == 0)
                {
                    return (file[..^2], "truncated by two bytes");
                }

                int at = start + 12 + random.Next(length);
                string what;
                switch (kind)
                {
                    case 4:
                        file[at] ^= (byte)(1 << random.Next(8));
                        what = $"bit flip at {at}";
                        break;
                    case 5:
                        file[at] = 0xFF;
                        what = $"0xFF (a varint that never ends, or a huge value) at {at}";
                        break;
                    case 6:
                        file[at] = (byte)random.Next(256);
                        what = $"random byte at {at}";
                        break;
                    default:
                    {
                        int run = Math.Min(random.Next(1, 9), start + 12 + length - at);
                        random.NextBytes(file.AsSpan(at, run));
                        what = $"{run} random bytes at {at}";
                        break;
                    }
                }

                FixChecksums(file);
                return (file, what + ", checksums fixed");
            }
        }
    }
}

[TestFixture]
public sealed class FormatFuzzTests
{
    /// <summary>The cases of the test run; <c>MC_FUZZ_CASES</c> raises it for the longer run the README documents.</summary>
    private static int Cases => int.TryParse(Environment.GetEnvironmentVariable("MC_FUZZ_CASES"), out int n) && n > 0 ? n : 1100;

    [Test]
    [CancelAfter(900_000)]
    public void Load_MutatedFilesOfEveryKind_OnlyInvalidDataOrSuccess()
    {
        var files = SerializationModels.SavedFiles();

        int rejected = 0, loaded = 0;
        long slowestTicks = 0;
        var outcomes = new Dictionary<string, int>();
        for (int i = 0; i < Cases; i++)
        {
            var (name, valid) = files[i % files.Count];
            var (bytes, what) = FormatFuzzer.Mutate(valid, new Random(i));
            long allocatedBefore = GC.GetAllocatedBytesForCurrentThread();
            long start = Stopwatch.GetTimestamp();
            try
            {
                using var model = CompressedModel.Load(new MemoryStream(bytes), null, SerializationModels.LoadOptions());
                loaded++;
            }
            catch (InvalidDataException ex)
            {
                rejected++;
                string key = ex.Message.Length > 60 ? ex.Message[..60] : ex.Message;
                outcomes[key] = outcomes.GetValueOrDefault(key) + 1;
            }
            catch (Exception ex)
            {
                Assert.Fail($"case {i} ({name}, {what}): {ex.GetType().Name}: {ex.Message}");
            }

            slowestTicks = Math.Max(slowestTicks, Stopwatch.GetTimestamp() - start);
            long allocated = GC.GetAllocatedBytesForCurrentThread() - allocatedBefore;
            Assert.That(allocated, Is.LessThanOrEqualTo((16L * 4096 * bytes.Length) + (1 << 20)), $"case {i} ({name}, {what}) allocated {allocated} bytes");
        }

        TestContext.Out.WriteLine($"{Cases} cases: {rejected} rejected with InvalidDataException, {loaded} loaded (the mutation left a valid file: a weight value or a name changed behind fixed checksums), slowest {Stopwatch.GetElapsedTime(0, slowestTicks).TotalMilliseconds:0.0} ms");
        foreach (var (message, count) in outcomes.OrderByDescending(o => o.Value).Take(12))
        {
            TestContext.Out.WriteLine($"  {count,5}  {message}");
        }

        Assert.That(rejected + loaded, Is.EqualTo(Cases));
        Assert.That(rejected, Is.GreaterThan(Cases / 2), "most mutations must be caught");
    }
}
