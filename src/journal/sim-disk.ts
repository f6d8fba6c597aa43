/**
 * A simulated disk for crash-state testing. It implements `JournalFileSystem`
 * in memory and records every operation (writes, truncates, syncs, directory
 * changes) in order. `crashImage(k, random)` builds a disk that a crash after
 * the first k operations could leave: everything synced by then, plus any
 * subset of the later file writes (each possibly torn into 512-byte sectors),
 * plus a prefix of the later unsynced directory changes.
 *
 * Simplifications, stated: directories exist implicitly (mkdir is always
 * durable); a crash keeps directory changes as a prefix in issue order (as a
 * journaling filesystem such as ext4 does), not an arbitrary subset.
 */
import * as path from 'node:path';
import type { JournalFile, JournalFileSystem } from './file-system.js';

export const sectorBytes = 512;

interface Inode {
  data: Buffer;
  sizeBytes: number;
}

type Operation =
  | { type: 'write'; inode: number; position: number; data: Buffer }
  | { type: 'truncate'; inode: number; sizeBytes: number }
  | { type: 'fsync'; inode: number }
  | { type: 'link'; filePath: string; inode: number }
  | { type: 'remove'; filePath: string }
  | { type: 'fsyncdir'; directory: string };

function writeInto(inode: Inode, position: number, data: Buffer): void {
  const end = position + data.length;
  if (end > inode.data.length) {
    const grown = Buffer.alloc(Math.max(end, inode.data.length * 2));
    inode.data.copy(grown, 0, 0, inode.sizeBytes);
    inode.data = grown;
  }
  data.copy(inode.data, position);
  inode.sizeBytes = Math.max(inode.sizeBytes, end);
}

function truncateTo(inode: Inode, sizeBytes: number): void {
  if (sizeBytes < inode.sizeBytes) inode.data.fill(0, sizeBytes, inode.sizeBytes);
  if (sizeBytes > inode.data.length) {
    const grown = Buffer.alloc(sizeBytes);
    inode.data.copy(grown, 0, 0, inode.sizeBytes);
    inode.data = grown;
  }
  inode.sizeBytes = sizeBytes;
}

function cloneInode(inode: Inode): Inode {
  return { data: Buffer.from(inode.data.subarray(0, Math.max(inode.sizeBytes, 1))), sizeBytes: inode.sizeBytes };
}

export interface SimulatedDiskOptions {
  /** Capacity reported through freeBytes (sum of file sizes is subtracted). */
  capacityBytes?: number;
}

export class SimulatedDisk implements JournalFileSystem {
  private readonly inodes = new Map<number, Inode>();
  private readonly names = new Map<string, number>();
  private inodeNext = 1;
  /** State at the start of the log; crash images replay the log over it. */
  private readonly base: { inodes: Map<number, Inode>; names: Map<string, number>; inodeNext: number };
  private readonly log: Operation[] = [];
  capacityBytes: number;
  /** Fault injection: the next fsync fails (for failure-path tests). */
  failNextSync = false;
  syncCount = 0;

  constructor(options: SimulatedDiskOptions = {}) {
    this.capacityBytes = options.capacityBytes ?? 2 ** 40;
    this.base = { inodes: new Map(), names: new Map(), inodeNext: 1 };
  }

  /** Operations recorded so far; a crash point is a number in [0, operationCount]. */
  get operationCount(): number {
    return this.log.length;
  }

  /** Files that exist now, with their sizes (for tests and the pool test). */
  listFiles(): Map<string, number> {
    const out = new Map<string, number>();
    for (const [name, inode] of this.names) out.set(name, this.inodes.get(inode)!.sizeBytes);
    return out;
  }

  private record(operation: Operation): void {
    this.log.push(operation);
  }

  private lookup(filePath: string): number {
    const inode = this.names.get(path.normalize(filePath));
    if (inode === undefined) throw Object.assign(new Error(`ENOENT: no such file, path is ${filePath}`), { code: 'ENOENT' });
    return inode;
  }

  async open(filePath: string, mode: 'read' | 'write' | 'create'): Promise<JournalFile> {
    const normal = path.normalize(filePath);
    let inodeNumber = this.names.get(normal);
    if (mode === 'create') {
      if (inodeNumber === undefined) {
        inodeNumber = this.inodeNext++;
        this.inodes.set(inodeNumber, { data: Buffer.alloc(0), sizeBytes: 0 });
        this.names.set(normal, inodeNumber);
        this.record({ type: 'link', filePath: normal, inode: inodeNumber });
      } else {
        truncateTo(this.inodes.get(inodeNumber)!, 0);
        this.record({ type: 'truncate', inode: inodeNumber, sizeBytes: 0 });
      }
    } else if (inodeNumber === undefined) {
      this.lookup(normal);
    }
    return this.handle(normal, inodeNumber!);
  }

  private handle(filePath: string, inodeNumber: number): JournalFile {
    const disk = this;
    const inode = (): Inode => disk.inodes.get(inodeNumber)!;
    return {
      path: filePath,
      async pwrite(data, position) {
        const whole = Buffer.isBuffer(data) ? Buffer.from(data) : Buffer.concat(data as Buffer[]);
        writeInto(inode(), position, whole);
        disk.record({ type: 'write', inode: inodeNumber, position, data: whole });
      },
      async pread(target, position) {
        const node = inode();
        const end = Math.min(node.sizeBytes, position + target.length);
        if (end <= position) return 0;
        node.data.copy(target, 0, position, end);
        return end - position;
      },
      async fsync() {
        if (disk.failNextSync) {
          disk.failNextSync = false;
          throw Object.assign(new Error(`EIO: simulated sync failure, path is ${filePath}`), { code: 'EIO' });
        }
        disk.syncCount++;
        disk.record({ type: 'fsync', inode: inodeNumber });
      },
      async truncate(sizeBytes) {
        truncateTo(inode(), sizeBytes);
        disk.record({ type: 'truncate', inode: inodeNumber, sizeBytes });
      },
      async allocate(sizeBytes) {
        truncateTo(inode(), sizeBytes);
        disk.record({ type: 'truncate', inode: inodeNumber, sizeBytes });
        disk.record({ type: 'fsync', inode: inodeNumber });
      },
      async sizeBytes() {
        return inode().sizeBytes;
      },
      async close() {},
    };
  }

  async rename(from: string, to: string): Promise<void> {
    const inodeNumber = this.lookup(from);
    this.names.delete(path.normalize(from));
    this.names.set(path.normalize(to), inodeNumber);
    this.record({ type: 'remove', filePath: path.normalize(from) });
    this.record({ type: 'link', filePath: path.normalize(to), inode: inodeNumber });
  }

  async unlink(filePath: string): Promise<void> {
    this.lookup(filePath);
    this.names.delete(path.normalize(filePath));
    this.record({ type: 'remove', filePath: path.normalize(filePath) });
  }

  async readdir(directory: string): Promise<string[]> {
    const normal = path.normalize(directory);
    const out = new Set<string>();
    for (const name of this.names.keys()) {
      if (path.dirname(name) === normal) out.add(path.basename(name));
      else if (name.startsWith(normal + path.sep)) out.add(name.slice(normal.length + 1).split(path.sep)[0]!);
    }
    return [...out].sort();
  }

  async mkdir(): Promise<void> {}

  async fsyncDirectory(directory: string): Promise<void> {
    this.syncCount++;
    this.record({ type: 'fsyncdir', directory: path.normalize(directory) });
  }

  async freeBytes(): Promise<number> {
    let used = 0;
    for (const inode of this.inodes.values()) used += inode.sizeBytes;
    return Math.max(0, this.capacityBytes - used);
  }

  /**
   * A new disk holding what a crash after the first `operations` operations
   * could leave. With `syncedOnly`, no unsynced write survives.
   */
  crashImage(operations: number, random: () => number, options: { syncedOnly?: boolean } = {}): SimulatedDisk {
    // Durable state and what is still pending, replayed from the log.
    const durable = new Map<number, Inode>();
    for (const [number, inode] of this.base.inodes) durable.set(number, cloneInode(inode));
    const durableNames = new Map(this.base.names);
    const pendingFile = new Map<number, Operation[]>();
    const pendingNames: Operation[] = [];
    for (let index = 0; index < operations; index++) {
      const operation = this.log[index]!;
      switch (operation.type) {
        case 'write':
        case 'truncate': {
          if (!durable.has(operation.inode)) durable.set(operation.inode, { data: Buffer.alloc(0), sizeBytes: 0 });
          const list = pendingFile.get(operation.inode) ?? [];
          list.push(operation);
          pendingFile.set(operation.inode, list);
          break;
        }
        case 'fsync': {
          const node = durable.get(operation.inode) ?? { data: Buffer.alloc(0), sizeBytes: 0 };
          durable.set(operation.inode, node);
          for (const pending of pendingFile.get(operation.inode) ?? []) applyFileOperation(node, pending);
          pendingFile.delete(operation.inode);
          break;
        }
        case 'link':
          if (!durable.has(operation.inode)) durable.set(operation.inode, { data: Buffer.alloc(0), sizeBytes: 0 });
          pendingNames.push(operation);
          break;
        case 'remove':
          pendingNames.push(operation);
          break;
        case 'fsyncdir': {
          // Directory changes in this directory become durable, in order.
          for (let at = 0; at < pendingNames.length; ) {
            const pending = pendingNames[at] as { filePath: string };
            if (path.dirname(pending.filePath) === operation.directory) {
              applyNameOperation(durableNames, pendingNames[at]!);
              pendingNames.splice(at, 1);
            } else at++;
          }
          break;
        }
      }
    }
    if (!options.syncedOnly) {
      for (const [number, list] of pendingFile) {
        const node = durable.get(number)!;
        for (const pending of list) {
          if (random() < 0.5) continue;
          if (pending.type === 'truncate' || random() < 0.5) applyFileOperation(node, pending);
          else tornWrite(node, pending as { position: number; data: Buffer }, random);
        }
      }
      const keep = Math.floor(random() * (pendingNames.length + 1));
      for (let at = 0; at < keep; at++) applyNameOperation(durableNames, pendingNames[at]!);
    }
    const image = new SimulatedDisk({ capacityBytes: this.capacityBytes });
    for (const [name, number] of durableNames) {
      const inode = durable.get(number)!;
      image.base.inodes.set(number, cloneInode(inode));
      image.inodes.set(number, cloneInode(inode));
      image.base.names.set(name, number);
      image.names.set(name, number);
    }
    image.inodeNext = image.base.inodeNext = this.inodeNext;
    return image;
  }
}

function applyFileOperation(node: Inode, operation: Operation): void {
  if (operation.type === 'write') writeInto(node, operation.position, operation.data);
  else if (operation.type === 'truncate') truncateTo(node, operation.sizeBytes);
}

function applyNameOperation(names: Map<string, number>, operation: Operation): void {
  if (operation.type === 'link') names.set(operation.filePath, operation.inode);
  else if (operation.type === 'remove') names.delete(operation.filePath);
}

/** Keeps a random subset of the write's sectors (sector boundaries are absolute, as on a disk). */
function tornWrite(node: Inode, write: { position: number; data: Buffer }, random: () => number): void {
  const end = write.position + write.data.length;
  let cursor = write.position;
  while (cursor < end) {
    const sectorEnd = Math.min(end, (Math.floor(cursor / sectorBytes) + 1) * sectorBytes);
    if (random() < 0.5) writeInto(node, cursor, write.data.subarray(cursor - write.position, sectorEnd - write.position));
    cursor = sectorEnd;
  }
}
