/**
 * Loads the native helper (`lifeline_native.c`), built by `npm ci` through node-gyp.
 */
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

export interface NativeHelpers {
  /** lseek SEEK_DATA (whence 0) or SEEK_HOLE (whence 1); -1 when no data lies at or past offset. */
  seek(fd: number, offset: number, whence: 0 | 1): number;
  /** fallocate with PUNCH_HOLE (kind 0) or ZERO_RANGE (kind 1), both keeping the size, or a plain reservation of blocks (kind 2). */
  /**
   * Reads from the page cache without waiting for the disk (preadv2 RWF_NOWAIT):
   * bytes read (0 at end of file), or -1 when nothing could be read without blocking.
   */
  readCached(fd: number, target: Uint8Array, position: number): number;
  /** Sets SO_SNDBUF and SO_RCVBUF on a socket; returns the send buffer size granted. */
  setSocketBuffers(fd: number, bytes: number): number;
  /** CRC-32C of the buffer, chained from `seed` (0 to start). */
  crc32c(data: Uint8Array, seed?: number): number;
  fallocate(fd: number, kind: 0 | 1 | 2, offset: number, lengthBytes: number, done: (error: Error | null) => void): void;
  /** Worst-case LZ4 block size of `sourceBytes` bytes (all literals); a target this large always fits. */
  lz4CompressBound(sourceBytes: number): number;
  /**
   * Compresses `source` into one LZ4 block (the bare block format: no frame, no size, no checksum)
   * in `target`. Returns the bytes written, or 0 when the block would not fit in `target`, so a
   * target smaller than the source stops early on incompressible data. Throws a RangeError above
   * 1 GiB of input or when the buffers overlap.
   */
  lz4Compress(source: Uint8Array, target: Uint8Array): number;
  /**
   * lz4Compress of the chunks' concatenation (one block; matches reach across chunks). The chunks
   * are gathered in C into `scratch` (at least their total size; reuse it across calls to spare
   * the page faults of fresh memory) or, without it, into a temporary buffer.
   */
  lz4CompressChunks(chunks: readonly Uint8Array[], target: Uint8Array, scratch?: Uint8Array): number;
  /**
   * Decompresses one LZ4 block into `target`; returns the bytes produced. Malformed input (or output
   * larger than `target`) throws an Error with code 'ERR_LZ4_MALFORMED', `reason` and `position`;
   * nothing is read or written outside the two buffers. Bytes of `target` past the returned length
   * may have been overwritten.
   */
  lz4Decompress(source: Uint8Array, target: Uint8Array): number;
}

const addonPath = fileURLToPath(new URL('../../../build/Release/lifeline_native.node', import.meta.url));

function load(): NativeHelpers {
  try {
    return createRequire(import.meta.url)(addonPath) as NativeHelpers;
  } catch (error) {
    throw new Error(
      `Cannot load Lifeline's native helper as it is not built: path is ${addonPath} (run 'npm ci', or 'npm run install' to rebuild it, in the repository)`,
      { cause: error },
    );
  }
}

export const native: NativeHelpers = load();

/** The error lz4Decompress throws for a malformed block. */
export interface Lz4MalformedError extends Error {
  code: 'ERR_LZ4_MALFORMED';
  /** What is wrong, in words. */
  reason: string;
  /** The input byte where decoding stopped. */
  position: number;
}

/** Whether `error` is the error lz4Decompress throws for a malformed block. */
export function isLz4MalformedError(error: unknown): error is Lz4MalformedError {
  return error instanceof Error && (error as { code?: unknown }).code === 'ERR_LZ4_MALFORMED';
}
