/**
 * A FIFO of received bytes kept as the chunks the socket delivered, so that a
 * request whose payload sits inside one chunk is handed on without a copy.
 */
const emptyBuffer = Buffer.alloc(0);

export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0;
  /** Offset of the first unread byte inside `chunks[head]`. */
  private headOffset = 0;
  length = 0;

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.length += chunk.length;
  }

  /** The first `n` bytes, contiguous, without consuming them. Requires `n <= length`. */
  peek(n: number): Buffer {
    if (n === 0) return emptyBuffer;
    const first = this.chunks[this.head]!;
    if (first.length - this.headOffset >= n) return first.subarray(this.headOffset, this.headOffset + n);
    // Merge the leading chunks so that the next take() of these bytes is free.
    const merged = this.copyOut(this.length);
    this.chunks = [merged];
    this.head = 0;
    this.headOffset = 0;
    return merged.subarray(0, n);
  }

  /** Consumes and returns `n` bytes. Requires `n <= length`. */
  take(n: number): Buffer {
    if (n === 0) return emptyBuffer;
    const first = this.chunks[this.head]!;
    const available = first.length - this.headOffset;
    if (available >= n) {
      const out = first.subarray(this.headOffset, this.headOffset + n);
      this.advance(n);
      return out;
    }
    const out = this.copyOut(n);
    this.drop(n);
    return out;
  }

  /**
   * Consumes `n` bytes as the chunks they sit in (subarrays, no copy).
   * Requires `n <= length`.
   */
  takeChunks(n: number): Buffer[] {
    const out: Buffer[] = [];
    let left = n;
    while (left > 0) {
      const first = this.chunks[this.head]!;
      const step = Math.min(first.length - this.headOffset, left);
      out.push(first.subarray(this.headOffset, this.headOffset + step));
      this.advance(step);
      left -= step;
    }
    return out;
  }

  /** Discards up to `n` bytes; returns how many were discarded. */
  drop(n: number): number {
    const dropped = Math.min(n, this.length);
    let left = dropped;
    while (left > 0) {
      const first = this.chunks[this.head]!;
      const available = first.length - this.headOffset;
      const step = Math.min(available, left);
      this.advance(step);
      left -= step;
    }
    return dropped;
  }

  clear(): void {
    this.chunks = [];
    this.head = 0;
    this.headOffset = 0;
    this.length = 0;
  }

  private advance(n: number): void {
    this.headOffset += n;
    this.length -= n;
    if (this.headOffset === this.chunks[this.head]!.length) {
      this.head++;
      this.headOffset = 0;
      if (this.head === this.chunks.length) {
        this.chunks = [];
        this.head = 0;
      } else if (this.head > 64) {
        this.chunks = this.chunks.slice(this.head);
        this.head = 0;
      }
    }
  }

  private copyOut(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    let written = 0;
    let index = this.head;
    let offset = this.headOffset;
    while (written < n) {
      const chunk = this.chunks[index]!;
      const step = Math.min(chunk.length - offset, n - written);
      chunk.copy(out, written, offset, offset + step);
      written += step;
      index++;
      offset = 0;
    }
    return out;
  }
}
