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
