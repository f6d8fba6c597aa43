/**
 * Fixtures shared by the journal's tests: a journal on a simulated disk with
 * replicas on the same disk, a manual clock, and the reference model (volumes
 * as plain buffers, records applied in order).
 */
import type { Clock } from '../tap/tap.js';
import { JournalFileBackingStore } from './file-store.js';
import type { JournalFileSystem } from './file-system.js';
import { Journal, type AppendRecord, type JournalOptions } from './journal.js';
import { JournalPool, type DatastoreConfig } from './pool.js';

export class ManualClock implements Clock {
  constructor(public timeMs = 1_700_000_000_000) {}
  nowMs(): number {
    return this.timeMs;
  }
}

export interface TestJournalConfig {
  fileSystem: JournalFileSystem;
  clock: Clock;
  volumes: Map<number, number>;
  unitBytes: number;
  historyMs: number;
  sizeLimitBytes: number;
  sizeWarningBytes?: number;
  datastores?: DatastoreConfig[];
}

/** Creates the replica files (synced) for a new test journal. */
export async function createReplicas(config: TestJournalConfig): Promise<void> {
  await config.fileSystem.mkdir('/replicas');
  for (const [volume, sizeBytes] of config.volumes) {
    const store = await JournalFileBackingStore.open(config.fileSystem, `/replicas/volume-${volume}.img`, { sizeBytes, create: true });
    await store.close();
  }
  await config.fileSystem.fsyncDirectory('/replicas');
}

export async function openTestJournal(config: TestJournalConfig): Promise<{ journal: Journal; pool: JournalPool; replicas: Map<number, JournalFileBackingStore> }> {
  const replicas = new Map<number, JournalFileBackingStore>();
  for (const [volume, sizeBytes] of config.volumes) {
    replicas.set(volume, await JournalFileBackingStore.open(config.fileSystem, `/replicas/volume-${volume}.img`, { sizeBytes, create: false }));
  }
  const pool = new JournalPool(config.fileSystem, config.datastores ?? [{ path: '/pool', capacityBytes: 1 << 30 }]);
  const options: JournalOptions = {
    name: 'group1',
    directory: '/meta',
    fileSystem: config.fileSystem,
    pool,
    replicas,
    clock: config.clock,
    unitBytes: config.unitBytes,
    historyMs: config.historyMs,
    sizeLimitBytes: config.sizeLimitBytes,
    sizeWarningBytes: config.sizeWarningBytes ?? config.sizeLimitBytes,
  };
  return { journal: await Journal.open(options), pool, replicas };
}

export async function closeTestJournal(opened: { journal: Journal; replicas: Map<number, JournalFileBackingStore> }): Promise<void> {
  await opened.journal.close();
  for (const replica of opened.replicas.values()) await replica.close();
}

/** Applies one record to the model volumes. */
export function applyToModel(volumes: Map<number, Buffer>, record: AppendRecord): void {
  if (record.kind === 'checkpoint') return;
  const volume = volumes.get(record.volume)!;
  if (record.kind === 'write') record.data!.copy(volume, record.offset);
  else volume.fill(0, record.offset, record.offset + record.lengthBytes!);
}

export function modelVolumes(sizes: Map<number, number>, records: readonly AppendRecord[]): Map<number, Buffer> {
  const volumes = new Map<number, Buffer>();
  for (const [volume, sizeBytes] of sizes) volumes.set(volume, Buffer.alloc(sizeBytes));
  for (const record of records) applyToModel(volumes, record);
  return volumes;
}

/** A random data/zero/trim record for a stream (offsets and lengths sector-aligned or not, by chance). */
export function randomRecord(random: () => number, options: { stream: number; sequence: number; timeMs: number; volumes: Map<number, number>; dataBytesMax: number }): AppendRecord {
  const volumeIds = [...options.volumes.keys()];
  const volume = volumeIds[Math.floor(random() * volumeIds.length)]!;
  const sizeBytes = options.volumes.get(volume)!;
  const aligned = random() < 0.7;
  let lengthBytes = 1 + Math.floor(random() * options.dataBytesMax);
  if (aligned) lengthBytes = Math.max(512, lengthBytes - (lengthBytes % 512));
  let offset = Math.floor(random() * (sizeBytes - lengthBytes));
  if (aligned) offset -= offset % 512;
  const roll = random();
  const base = { stream: options.stream, sequence: options.sequence, timeMs: options.timeMs, volume, offset };
  if (roll < 0.8) {
    const data = Buffer.alloc(lengthBytes);
    let state = Math.floor(random() * 0xffffffff) | 1;
    for (let i = 0; i < lengthBytes; i++) {
      state ^= state << 13;
      state ^= state >>> 17;
      state ^= state << 5;
      data[i] = state & 0xff;
    }
    return { kind: 'write', ...base, data };
  }
  return { kind: roll < 0.9 ? 'zero' : 'trim', ...base, lengthBytes };
}

/** A checkpoint marker record of one stream. */
export function checkpointRecord(stream: number, sequence: number, timeMs: number, checkpoint: { id: string; kind?: string; streams: number[] }): AppendRecord {
  return { kind: 'checkpoint', stream, sequence, timeMs, volume: 0, offset: 0, checkpoint: { id: checkpoint.id, kind: checkpoint.kind ?? 'automatic', streams: checkpoint.streams } };
}

/**
 * The model at a point in time, as a view cuts it: per stream, its records up
 * to (not including) its first record newer than `timeMs`.
 */
export function modelAtTime(sizes: Map<number, number>, records: readonly AppendRecord[], timeMs: number): Map<number, Buffer> {
  const ended = new Set<number>();
  return modelVolumes(
    sizes,
    records.filter((record) => {
      if (ended.has(record.stream)) return false;
      if (record.timeMs <= timeMs) return true;
      ended.add(record.stream);
      return false;
    }),
  );
}

/**
 * The model at a checkpoint: per stream, its records before the stream's
 * marker. Every stream of the records must have a marker of the checkpoint.
 */
export function modelAtCheckpoint(sizes: Map<number, number>, records: readonly AppendRecord[], id: string): Map<number, Buffer> {
  const markers = new Map<number, number>();
  for (const record of records) if (record.kind === 'checkpoint' && record.checkpoint?.id === id) markers.set(record.stream, record.sequence);
  for (const record of records) {
    if (!markers.has(record.stream)) throw new Error(`assertion: stream ${record.stream} has no marker of checkpoint ${id}`);
  }
  return modelVolumes(sizes, records.filter((record) => record.sequence < markers.get(record.stream)!));
}

export interface ExpectedCheckpoint {
  id: string;
  /** Source time of the newest of its markers that are in the journal. */
  timeMs: number;
  recoverable: boolean;
}

/**
 * The checkpoints a journal holding `records` (lsn = index + 1) with the given
 * watermark must list after it is opened: those with a marker above the
 * watermark; recoverable when every stream's marker is above the watermark.
 */
export function expectedCheckpoints(records: readonly AppendRecord[], watermarkLsn: number): ExpectedCheckpoint[] {
  const found = new Map<string, { streams: number[]; markers: Map<number, { lsn: number; timeMs: number }> }>();
  records.forEach((record, at) => {
    if (record.kind !== 'checkpoint' || !record.checkpoint) return;
    const entry = found.get(record.checkpoint.id) ?? { streams: record.checkpoint.streams, markers: new Map() };
    entry.markers.set(record.stream, { lsn: at + 1, timeMs: record.timeMs });
    found.set(record.checkpoint.id, entry);
  });
  const out: ExpectedCheckpoint[] = [];
  for (const [id, { streams, markers }] of found) {
    const live = [...markers.values()].filter((marker) => marker.lsn > watermarkLsn);
    if (live.length === 0) continue;
    const recoverable = streams.every((stream) => (markers.get(stream)?.lsn ?? 0) > watermarkLsn);
    out.push({ id, timeMs: Math.max(...live.map((marker) => marker.timeMs)), recoverable });
  }
  return out.sort((a, b) => a.id.localeCompare(b.id));
}

/** Reads a whole volume (a replica or a view). */
export async function readVolume(store: { read(target: Buffer, offset: number): Promise<void> }, sizeBytes: number): Promise<Buffer> {
  const bytes = Buffer.alloc(sizeBytes);
  await store.read(bytes, 0);
  return bytes;
}

/** Lets background work on the simulated disk (the spare unit) finish: it only waits on promises. */
export async function settle(): Promise<void> {
  for (let turn = 0; turn < 3; turn++) await new Promise((resolve) => setImmediate(resolve));
}

/** A file system that reports each operation after it (to find crash points on the simulated disk). */
export function observedFileSystem(inner: JournalFileSystem, after: (operation: 'rename' | 'unlink' | 'fsyncDirectory', filePath: string) => void): JournalFileSystem {
  return {
    open: (filePath, mode) => inner.open(filePath, mode),
    rename: async (from, to) => {
      await inner.rename(from, to);
      after('rename', to);
    },
    unlink: async (filePath) => {
      await inner.unlink(filePath);
      after('unlink', filePath);
    },
    readdir: (directory) => inner.readdir(directory),
    mkdir: (directory) => inner.mkdir(directory),
    fsyncDirectory: async (directory) => {
      await inner.fsyncDirectory(directory);
      after('fsyncDirectory', directory);
    },
    freeBytes: (directory) => inner.freeBytes(directory),
  };
}
