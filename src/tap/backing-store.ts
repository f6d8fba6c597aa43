/**
 * Backing stores: where a volume's bytes live on the protected host.
 *
 * The NBD server talks to a `BackingStore`; the tap is a `BackingStore` that
 * wraps another one. Every implementation promises the same semantics, checked
 * by one contract suite (`backing-store.test.ts`):
 * - `read` fills the whole target buffer (bytes past the written data read as zero);
 * - `writeZeroes` and `trim` leave the range reading as zeroes, so that a
 *   replica can apply a trim as a zero range and end with the same bytes;
 * - `flush` makes every completed write durable.
 */
import * as fs from 'node:fs';
import { native } from '../native/index.js';

export interface Extent {
  /** Bytes covered, starting where the previous extent ended. */
  lengthBytes: number;
  /** Not allocated in the store (a hole). */
  hole: boolean;
  /** Reads as zeroes. A hole always reads as zeroes. */
  zero: boolean;
}

/**
 * Bytes to write: one buffer, or several chunks written back to back (a large
 * NBD payload arrives as many socket reads; passing them on as they are avoids a copy).
 */
export type WriteData = Buffer | readonly Buffer[];

export function writeDataLength(data: WriteData): number {
  if (Buffer.isBuffer(data)) return data.length;
  let total = 0;
  for (const chunk of data) total += chunk.length;
  return total;
}

export interface ZeroOptions {
  /** The range may be deallocated (punched) rather than written. */
  mayDeallocate: boolean;
  /** Fail with `FastZeroUnsupportedError` rather than fall back to writing zero bytes. */
  fastOnly: boolean;
}

export interface BackingStore {
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  read(target: Buffer, offset: number): Promise<void>;
  write(data: WriteData, offset: number): Promise<void>;
  writeZeroes(offset: number, lengthBytes: number, options: ZeroOptions): Promise<void>;
  trim(offset: number, lengthBytes: number): Promise<void>;
  flush(): Promise<void>;
  /** Hints that the range will be read soon. */
  cache(offset: number, lengthBytes: number): Promise<void>;
  /**
   * Allocation of the range, as contiguous extents starting at `offset`. The
   * answer covers at least one byte and at most `lengthBytes`, and holds at most
   * `extentCountMax` extents.
   */
  extents(offset: number, lengthBytes: number, extentCountMax: number): Extent[];
  close(): Promise<void>;
}

/** Raised by `writeZeroes` with `fastOnly` when the store cannot zero quickly. */
export class FastZeroUnsupportedError extends Error {
  readonly code = 'ENOTSUP';
  constructor(what: string) {
    super(`Cannot zero ${what} quickly: the filesystem does not support fallocate for it`);
  }
}

/** A zeroed buffer used when a range must be written as zero bytes. */
const zeroChunkBytes = 1 << 20;
const zeroChunk = Buffer.alloc(zeroChunkBytes);

/** Largest single read done while warming the page cache for CMD_CACHE. */
const cacheReadBytesMax = 1 << 20;

/**
 * Writes up to this size go straight to the page cache with a synchronous
 * pwrite on the event loop: it takes microseconds, where a hop through the
 * thread pool costs two thread wake-ups per request. Larger writes use the pool.
 */
export const syncWriteBytesMax = 64 * 1024;

/** Reads up to this size try the page cache on the event loop first (see `read`). */
export const cachedReadBytesMax = 64 * 1024;

function writeAllSync(fd: number, data: Buffer, offset: number): void {
  let done = 0;
  while (done < data.length) {
    const written = fs.writeSync(fd, data, done, data.length - done, offset + done);
    if (written === 0) throw Object.assign(new Error('write returned 0 bytes'), { code: 'EIO' });
    done += written;
  }
}

function writeChunks(fd: number, chunks: readonly Buffer[], offset: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (remaining: readonly Buffer[], position: number): void => {
      fs.writev(fd, remaining, position, (error, written) => {
        if (error) return reject(error);
        if (written === 0) return reject(Object.assign(new Error('writev returned 0 bytes'), { code: 'EIO' }));
        // A short vectored write: continue from the first byte not written.
        let skip = written;
        let index = 0;
        while (index < remaining.length && skip >= remaining[index]!.length) skip -= remaining[index++]!.length;
        if (index === remaining.length) return resolve();
        const rest = [remaining[index]!.subarray(skip), ...remaining.slice(index + 1)];
        step(rest, position + written);
      });
    };
    step(chunks, offset);
  });
}

function writeAll(fd: number, data: Buffer, offset: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (done: number): void => {
      fs.write(fd, data, done, data.length - done, offset + done, (error, written) => {
        if (error) return reject(error);
        if (written === 0) return reject(Object.assign(new Error('write returned 0 bytes'), { code: 'EIO' }));
        const total = done + written;
        if (total < data.length) step(total);
        else resolve();
      });
    };
    step(0);
  });
}

function readAll(fd: number, target: Buffer, offset: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (done: number): void => {
      fs.read(fd, target, done, target.length - done, offset + done, (error, bytesRead) => {
        if (error) return reject(error);
        const total = done + bytesRead;
        if (bytesRead === 0) {
          // Past the end of the file: a sparse tail reads as zeroes.
          target.fill(0, total);
          return resolve();
        }
        if (total < target.length) step(total);
        else resolve();
      });
    };
    step(0);
  });
}

function fallocate(fd: number, kind: 'punch' | 'zero', offset: number, lengthBytes: number): Promise<void> {
  return new Promise((resolve, reject) => {
    native.fallocate(fd, kind === 'punch' ? 0 : 1, offset, lengthBytes, (error) => (error ? reject(error) : resolve()));
  });
}

function isUnsupported(error: unknown): boolean {
  const code = (error as { code?: string }).code;
  return code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'EINVAL';
}

export interface FileBackingStoreOptions {
  path: string;
  readOnly: boolean;
  /** Create the file sparse with this size when it is missing. */
  createSizeBytes?: number;
}

/** A raw image file. */
export class FileBackingStore implements BackingStore {
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly path: string;
  private readonly fd: number;
  private closed = false;
  private punchSupported = true;
  private zeroRangeSupported = true;

  private constructor(path: string, fd: number, sizeBytes: number, readOnly: boolean) {
    this.path = path;
    this.fd = fd;
    this.sizeBytes = sizeBytes;
    this.readOnly = readOnly;
  }

  static open(options: FileBackingStoreOptions): FileBackingStore {
    const { path, readOnly, createSizeBytes } = options;
    let exists = true;
    try {
      if (!fs.statSync(path).isFile()) throw new Error(`Cannot open backing file as it is not a regular file: path is ${path}`);
    } catch (error) {
      if ((error as { code?: string }).code !== 'ENOENT') throw error;
      exists = false;
    }
    if (!exists) {
      if (createSizeBytes === undefined) {
        throw new Error(`Cannot open backing file as it is missing and no size was given to create it: path is ${path}`);
      }
      if (readOnly) {
        throw new Error(`Cannot create backing file for a read-only export: path is ${path}`);
      }
      const fd = fs.openSync(path, 'wx', 0o600);
      try {
        fs.ftruncateSync(fd, createSizeBytes);
      } finally {
        fs.closeSync(fd);
      }
    }
    let fd: number;
    try {
      fd = fs.openSync(path, readOnly ? 'r' : 'r+');
    } catch (error) {
      throw new Error(`Cannot open backing file ${readOnly ? 'for reading' : 'for reading and writing'}: path is ${path} (${(error as Error).message})`, { cause: error });
    }
    const stat = fs.fstatSync(fd);
    if (!stat.isFile()) {
      fs.closeSync(fd);
      throw new Error(`Cannot open backing file as it is not a regular file: path is ${path}`);
    }
    if (createSizeBytes !== undefined && exists && stat.size !== createSizeBytes) {
      fs.closeSync(fd);
      throw new Error(
        `Cannot open backing file with size ${createSizeBytes} as it already holds ${stat.size} bytes: path is ${path} (drop size= to use its size, or resize it with qemu-img resize)`,
      );
    }
    return new FileBackingStore(path, fd, stat.size, readOnly);
  }

  read(target: Buffer, offset: number): Promise<void> {
    // What the page cache holds is copied at once on the event loop; only the
    // rest waits for the thread pool (and the disk).
    let done = 0;
    if (target.length <= cachedReadBytesMax) {
      try {
        while (done < target.length) {
          const got = native.readCached(this.fd, target.subarray(done), offset + done);
          if (got < 0) break;
          if (got === 0) {
            target.fill(0, done);
            return Promise.resolve();
          }
          done += got;
        }
      } catch (error) {
        return Promise.reject(error);
      }
    }
    if (done === target.length) return Promise.resolve();
    return readAll(this.fd, target.subarray(done), offset + done);
  }

  write(data: WriteData, offset: number): Promise<void> {
    if (!Buffer.isBuffer(data)) return writeChunks(this.fd, data, offset);
    if (data.length <= syncWriteBytesMax) {
      try {
        writeAllSync(this.fd, data, offset);
        return Promise.resolve();
      } catch (error) {
        return Promise.reject(error);
      }
    }
    return writeAll(this.fd, data, offset);
  }

  async writeZeroes(offset: number, lengthBytes: number, options: ZeroOptions): Promise<void> {
    if (options.mayDeallocate && this.punchSupported) {
      try {
        await fallocate(this.fd, 'punch', offset, lengthBytes);
        return;
      } catch (error) {
        if (!isUnsupported(error)) throw error;
        this.punchSupported = false;
      }
    }
    if (this.zeroRangeSupported) {
      try {
        await fallocate(this.fd, 'zero', offset, lengthBytes);
        return;
      } catch (error) {
        if (!isUnsupported(error)) throw error;
        this.zeroRangeSupported = false;
      }
    }
    if (options.fastOnly) throw new FastZeroUnsupportedError(`${this.path}`);
    await this.writeZeroBytes(offset, lengthBytes);
  }

  async trim(offset: number, lengthBytes: number): Promise<void> {
    // A trim must leave zeroes behind (see the file comment), so fall back to
    // writing them where the filesystem cannot punch holes.
    await this.writeZeroes(offset, lengthBytes, { mayDeallocate: true, fastOnly: false });
  }

  private async writeZeroBytes(offset: number, lengthBytes: number): Promise<void> {
    let done = 0;
    while (done < lengthBytes) {
      const step = Math.min(zeroChunkBytes, lengthBytes - done);
      await writeAll(this.fd, zeroChunk.subarray(0, step), offset + done);
      done += step;
    }
  }

  flush(): Promise<void> {
    return new Promise((resolve, reject) => fs.fdatasync(this.fd, (error) => (error ? reject(error) : resolve())));
  }

  async cache(offset: number, lengthBytes: number): Promise<void> {
    // Node has no posix_fadvise; reading the data pulls it into the page cache.
    const scratch = Buffer.allocUnsafe(Math.min(cacheReadBytesMax, lengthBytes));
    let done = 0;
    while (done < lengthBytes) {
      const step = Math.min(scratch.length, lengthBytes - done);
      const extents = this.extents(offset + done, step, 64);
      let cursor = offset + done;
      for (const extent of extents) {
        if (!extent.hole) await readAll(this.fd, scratch.subarray(0, extent.lengthBytes), cursor);
        cursor += extent.lengthBytes;
      }
      done = cursor - offset;
    }
  }

  extents(offset: number, lengthBytes: number, extentCountMax: number): Extent[] {
    const end = offset + lengthBytes;
    const out: Extent[] = [];
    let cursor = offset;
    while (cursor < end && out.length < extentCountMax) {
      const dataStart = native.seek(this.fd, cursor, 0);
      if (dataStart < 0 || dataStart >= end) {
        out.push({ lengthBytes: end - cursor, hole: true, zero: true });
        break;
      }
      if (dataStart > cursor) {
        out.push({ lengthBytes: dataStart - cursor, hole: true, zero: true });
        cursor = dataStart;
        continue;
      }
      const holeStart = native.seek(this.fd, cursor, 1);
      const dataEnd = holeStart < 0 ? end : Math.min(holeStart, end);
      out.push({ lengthBytes: dataEnd - cursor, hole: false, zero: false });
      cursor = dataEnd;
    }
    return mergeExtents(out);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await new Promise<void>((resolve, reject) => fs.close(this.fd, (error) => (error ? reject(error) : resolve())));
  }
}

function mergeExtents(extents: Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const extent of extents) {
    const last = out[out.length - 1];
    if (last && last.hole === extent.hole && last.zero === extent.zero) last.lengthBytes += extent.lengthBytes;
    else out.push({ ...extent });
  }
  return out;
}

/** Granularity of allocation tracking in the memory store. */
export const memoryBlockBytes = 4096;

/** An in-memory store for tests; tracks allocation per 4 KiB block. */
export class MemoryBackingStore implements BackingStore {
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly bytes: Buffer;
  private readonly allocated: Uint8Array;

  constructor(sizeBytes: number, options: { readOnly?: boolean } = {}) {
    this.sizeBytes = sizeBytes;
    this.readOnly = options.readOnly ?? false;
    this.bytes = Buffer.alloc(sizeBytes);
    this.allocated = new Uint8Array(Math.ceil(sizeBytes / memoryBlockBytes));
  }

  async read(target: Buffer, offset: number): Promise<void> {
    this.bytes.copy(target, 0, offset, offset + target.length);
  }

  async write(data: WriteData, offset: number): Promise<void> {
    let cursor = offset;
    for (const chunk of Buffer.isBuffer(data) ? [data] : data) {
      chunk.copy(this.bytes, cursor);
      cursor += chunk.length;
    }
    this.markAllocated(offset, cursor - offset, 1);
  }

  async writeZeroes(offset: number, lengthBytes: number, options: ZeroOptions): Promise<void> {
    this.bytes.fill(0, offset, offset + lengthBytes);
    if (options.mayDeallocate) this.deallocateWholeBlocks(offset, lengthBytes);
    else this.markAllocated(offset, lengthBytes, 1);
  }

  async trim(offset: number, lengthBytes: number): Promise<void> {
    this.bytes.fill(0, offset, offset + lengthBytes);
    this.deallocateWholeBlocks(offset, lengthBytes);
  }

  async flush(): Promise<void> {}

  async cache(): Promise<void> {}

  extents(offset: number, lengthBytes: number, extentCountMax: number): Extent[] {
    const end = offset + lengthBytes;
    const out: Extent[] = [];
    let cursor = offset;
    while (cursor < end) {
      const block = Math.floor(cursor / memoryBlockBytes);
      const blockEnd = Math.min(end, (block + 1) * memoryBlockBytes);
      const hole = this.allocated[block] === 0;
      const last = out[out.length - 1];
      if (last && last.hole === hole) last.lengthBytes += blockEnd - cursor;
      else {
        if (out.length === extentCountMax) break;
        out.push({ lengthBytes: blockEnd - cursor, hole, zero: hole });
      }
      cursor = blockEnd;
    }
    return out;
  }

  async close(): Promise<void> {}

  private markAllocated(offset: number, lengthBytes: number, value: number): void {
    if (lengthBytes === 0) return;
    const first = Math.floor(offset / memoryBlockBytes);
    const last = Math.floor((offset + lengthBytes - 1) / memoryBlockBytes);
    this.allocated.fill(value, first, last + 1);
  }

  private deallocateWholeBlocks(offset: number, lengthBytes: number): void {
    const first = Math.ceil(offset / memoryBlockBytes);
    const endBlock = Math.floor((offset + lengthBytes) / memoryBlockBytes);
    const endIsEof = offset + lengthBytes === this.sizeBytes;
    const last = endIsEof ? this.allocated.length : endBlock;
    if (last > first) this.allocated.fill(0, first, last);
  }
}
