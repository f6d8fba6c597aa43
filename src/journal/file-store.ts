/**
 * A backing store over a `JournalFile`: replicas and test volumes that live on
 * the same (possibly simulated) file system as the journal, so that a crash
 * test covers promotion into the replica too.
 */
import { writeDataLength, type BackingStore, type Extent, type WriteData, type ZeroOptions } from '../tap/backing-store.js';
import type { JournalFile, JournalFileSystem } from './file-system.js';

const zeroChunk = Buffer.alloc(64 * 1024);

export class JournalFileBackingStore implements BackingStore {
  readonly readOnly = false;
  private constructor(private readonly file: JournalFile, readonly sizeBytes: number) {}

  /** Opens the file, creating it (sized, synced) when `create` is set. */
  static async open(fileSystem: JournalFileSystem, filePath: string, options: { sizeBytes: number; create: boolean }): Promise<JournalFileBackingStore> {
    if (options.create) {
      const file = await fileSystem.open(filePath, 'create');
      await file.truncate(options.sizeBytes);
      await file.fsync();
      return new JournalFileBackingStore(file, options.sizeBytes);
    }
    return new JournalFileBackingStore(await fileSystem.open(filePath, 'write'), options.sizeBytes);
  }

  async read(target: Buffer, offset: number): Promise<void> {
    const got = await this.file.pread(target, offset);
    target.fill(0, got);
  }

  async write(data: WriteData, offset: number): Promise<void> {
    await this.file.pwrite(Buffer.isBuffer(data) ? data : Buffer.concat(data as Buffer[], writeDataLength(data)), offset);
  }

  async writeZeroes(offset: number, lengthBytes: number, _options: ZeroOptions): Promise<void> {
    for (let done = 0; done < lengthBytes; done += zeroChunk.length) {
      await this.file.pwrite(zeroChunk.subarray(0, Math.min(zeroChunk.length, lengthBytes - done)), offset + done);
    }
  }

  trim(offset: number, lengthBytes: number): Promise<void> {
    return this.writeZeroes(offset, lengthBytes, { mayDeallocate: true, fastOnly: false });
  }

  flush(): Promise<void> {
    return this.file.fsync();
  }

  async cache(): Promise<void> {}

  extents(offset: number, lengthBytes: number): Extent[] {
    return [{ lengthBytes: Math.min(lengthBytes, this.sizeBytes - offset), hole: false, zero: false }];
  }

  close(): Promise<void> {
    return this.file.close();
  }
}
