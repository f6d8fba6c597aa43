/**
 * The journal's only door to files. The real implementation uses node:fs; the
 * simulated disk (`sim-disk.ts`) records writes and syncs so that a test can
 * build the states a crash could leave behind.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { native } from '../native/index.js';
import { cachedReadBytesMax } from '../tap/backing-store.js';

export interface JournalFile {
  readonly path: string;
  /** Writes every byte of `data` (chunks back to back) at `position`. */
  pwrite(data: Buffer | readonly Buffer[], position: number): Promise<void>;
  /** Reads up to `target.length` bytes; returns the count (short only at end of file). */
  pread(target: Buffer, position: number): Promise<number>;
  /**
   * Optional fast path: copies what the page cache holds without waiting for the disk; returns
   * true only when the whole target was filled.
   */
  preadCached?(target: Buffer, position: number): boolean;
  /** Makes the file's data durable. */
  fsync(): Promise<void>;
  truncate(sizeBytes: number): Promise<void>;
  /** Sets the size and reserves the space where the filesystem can (fallocate). */
  allocate(sizeBytes: number): Promise<void>;
  sizeBytes(): Promise<number>;
  close(): Promise<void>;
}

export interface JournalFileSystem {
  /** 'create' creates or truncates; 'write' opens an existing file for reading and writing. */
  open(filePath: string, mode: 'read' | 'write' | 'create'): Promise<JournalFile>;
  rename(from: string, to: string): Promise<void>;
  unlink(filePath: string): Promise<void>;
  /** Names in the directory; empty when it does not exist. */
  readdir(directory: string): Promise<string[]>;
  mkdir(directory: string): Promise<void>;
  /** Makes the directory's entries (creations, renames, removals) durable. */
  fsyncDirectory(directory: string): Promise<void>;
  /** Free bytes on the filesystem that holds the directory. */
  freeBytes(directory: string): Promise<number>;
}

class NodeJournalFile implements JournalFile {
  constructor(readonly path: string, private readonly handle: fs.promises.FileHandle) {}

  async pwrite(data: Buffer | readonly Buffer[], position: number): Promise<void> {
    let chunks = Buffer.isBuffer(data) ? [data] : [...data];
    while (chunks.length > 0) {
      const { bytesWritten } = await this.handle.writev(chunks, position);
      if (bytesWritten === 0) throw Object.assign(new Error(`writev returned 0 bytes: path is ${this.path}`), { code: 'EIO' });
      position += bytesWritten;
      let skip = bytesWritten;
      while (chunks.length > 0 && skip >= chunks[0]!.length) skip -= chunks.shift()!.length;
      if (chunks.length > 0 && skip > 0) chunks[0] = chunks[0]!.subarray(skip);
    }
  }

  preadCached(target: Buffer, position: number): boolean {
    let done = 0;
    while (done < target.length) {
      const got = native.readCached(this.handle.fd, target.subarray(done), position + done);
      if (got <= 0) return false;
      done += got;
    }
    return true;
  }

  async pread(target: Buffer, position: number): Promise<number> {
    let done = 0;
    // What the page cache holds is copied at once on the event loop (as FileBackingStore does);
    // only the rest goes through the thread pool.
    if (target.length <= cachedReadBytesMax) {
      while (done < target.length) {
        const got = native.readCached(this.handle.fd, target.subarray(done), position + done);
        if (got < 0) break;
        if (got === 0) return done;
        done += got;
      }
    }
    while (done < target.length) {
      const { bytesRead } = await this.handle.read(target, done, target.length - done, position + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return done;
  }

  fsync(): Promise<void> {
    return this.handle.datasync();
  }

  truncate(sizeBytes: number): Promise<void> {
    return this.handle.truncate(sizeBytes);
  }

  async allocate(sizeBytes: number): Promise<void> {
    await this.handle.truncate(sizeBytes);
    // Reserve the blocks so that a full disk shows at allocation, not in the middle of a batch.
    // A filesystem that cannot reserve leaves the unit sparse; any other failure (ENOSPC) is raised.
    await new Promise<void>((resolve, reject) =>
      native.fallocate(this.handle.fd, 2, 0, sizeBytes, (error) => {
        const code = (error as { code?: string } | null)?.code;
        if (error && code !== 'EOPNOTSUPP' && code !== 'ENOTSUP') reject(Object.assign(error, { path: this.path }));
        else resolve();
      }),
    );
    await this.handle.sync();
  }

  async sizeBytes(): Promise<number> {
    return (await this.handle.stat()).size;
  }

  close(): Promise<void> {
    return this.handle.close();
  }
}

export const nodeFileSystem: JournalFileSystem = {
  async open(filePath, mode) {
    const flags = mode === 'read' ? 'r' : mode === 'write' ? 'r+' : 'w+';
    return new NodeJournalFile(filePath, await fs.promises.open(filePath, flags, 0o600));
  },
  rename: (from, to) => fs.promises.rename(from, to),
  unlink: (filePath) => fs.promises.unlink(filePath),
  async readdir(directory) {
    try {
      return await fs.promises.readdir(directory);
    } catch (error) {
      if ((error as { code?: string }).code === 'ENOENT') return [];
      throw error;
    }
  },
  async mkdir(directory) {
    const created = await fs.promises.mkdir(directory, { recursive: true });
    if (created !== undefined) await nodeFileSystem.fsyncDirectory(path.dirname(directory));
  },
  async fsyncDirectory(directory) {
    const handle = await fs.promises.open(directory, 'r');
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  },
  async freeBytes(directory) {
    const stats = await fs.promises.statfs(directory);
    return stats.bavail * stats.bsize;
  },
};

/** Reads the whole file (small files: metadata). */
export async function readWholeFile(fileSystem: JournalFileSystem, filePath: string): Promise<Buffer> {
  const file = await fileSystem.open(filePath, 'read');
  try {
    const size = await file.sizeBytes();
    const target = Buffer.alloc(size);
    const got = await file.pread(target, 0);
    return target.subarray(0, got);
  } finally {
    await file.close();
  }
}
