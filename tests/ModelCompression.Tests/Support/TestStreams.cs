namespace ModelCompression.Tests.Support;

/// <summary>A read-only stream that cannot seek and hands out at most an odd number of bytes per read, as a pipe or socket does.</summary>
internal sealed class NonSeekableStream(Stream inner, int largestRead = 4093) : Stream
{
    public override bool CanRead => true;

    public override bool CanSeek => false;

    public override bool CanWrite => false;

    public override long Length => throw new NotSupportedException();

    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

    public override void Flush()
    {
    }

    public override int Read(byte[] buffer, int offset, int count) => inner.Read(buffer, offset, Math.Min(count, largestRead));

    public override int Read(Span<byte> buffer) => inner.Read(buffer[..Math.Min(buffer.Length, largestRead)]);

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

    public override void SetLength(long value) => throw new NotSupportedException();

    public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
}

/// <summary>A non-seekable stream that serves <paramref name="prefix"/> and then <paramref name="fill"/> bytes forever (or until <paramref name="end"/>).</summary>
internal sealed class EndlessStream(byte[] prefix, byte fill, long end = long.MaxValue) : Stream
{
    public long Served { get; private set; }

    public override bool CanRead => true;

    public override bool CanSeek => false;

    public override bool CanWrite => false;

    public override long Length => throw new NotSupportedException();

    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

    public override void Flush()
    {
    }

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    public override int Read(Span<byte> buffer)
    {
        int n = (int)Math.Min(buffer.Length, end - Served);
        for (int i = 0; i < n; i++)
        {
            long at = Served + i;
            buffer[i] = at < prefix.Length ? prefix[at] : fill;
        }

        Served += n;
        return n;
    }

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

    public override void SetLength(long value) => throw new NotSupportedException();

    public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
}
