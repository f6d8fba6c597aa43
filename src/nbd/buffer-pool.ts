/**
 * Reusable buffers for read replies. A fresh multi-megabyte allocation per read
 * costs page faults and garbage collection; buffers here go back to a free list
 * once the socket has taken their bytes.
 */

/** Smallest pooled size; smaller reads use Node's own small-buffer pool. */
export const pooledBytesMin = 64 * 1024;
/** Largest pooled size (the maximum payload). */
export const pooledBytesMax = 32 * 1024 * 1024;
/** Bytes kept on the free lists in all; beyond it, released buffers are left to the GC. */
export const poolFreeBytesMax = 128 * 1024 * 1024;

export interface PooledBuffer {
  /** Exactly the bytes asked for. */
  buffer: Buffer;
  /** Returns the memory to the pool; call once, after the last use of `buffer`. */
  release(): void;
}

const noRelease = (): void => {};

export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private freeBytes = 0;

  acquire(lengthBytes: number): PooledBuffer {
    if (lengthBytes < pooledBytesMin || lengthBytes > pooledBytesMax) {
      return { buffer: Buffer.allocUnsafe(lengthBytes), release: noRelease };
    }
    const classBytes = 2 ** Math.ceil(Math.log2(lengthBytes));
    let base = this.free.get(classBytes)?.pop();
    if (base) this.freeBytes -= classBytes;
    else base = Buffer.allocUnsafeSlow(classBytes);
    const pooled = base;
    let released = false;
    return {
      buffer: pooled.subarray(0, lengthBytes),
      release: () => {
        if (released) throw new Error('BufferPool: buffer released twice');
        released = true;
        this.put(classBytes, pooled);
      },
    };
  }

  get freeBytesHeld(): number {
    return this.freeBytes;
  }

  private put(classBytes: number, base: Buffer): void {
    if (this.freeBytes + classBytes > poolFreeBytesMax) return;
    let list = this.free.get(classBytes);
    if (!list) this.free.set(classBytes, (list = []));
    list.push(base);
    this.freeBytes += classBytes;
  }
}
