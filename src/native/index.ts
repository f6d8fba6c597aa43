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
