/**
 * Stream queue tests: sequence numbers and order, memory → spill → bitmap
 * with exact byte accounting, reads back from the spill across
 * acknowledgements and resends, bitmap coverage, spill damage and spill
 * failures, and a fast-check model test against a plain model of the queue.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { testSeed } from '../../test/helpers.js';
import { SimulatedDisk } from '../journal/sim-disk.js';
import type { JournalFile, JournalFileSystem } from '../journal/file-system.js';
import {
  EntriesDiscardedError,
  entryOverheadBytes,
  SpillDamagedError,
  spillRecordHeaderBytes,
  StreamQueue,
  type ByteRange,
  type StreamCheckpoint,
  type StreamEntry,
  type StreamEntryInput,
  type StreamQueueOptions,
} from './queue.js';

const KiB = 1024;
const region = 64 * KiB;
const startMs = Date.UTC(2024, 0, 2, 12, 0, 0);

class ManualClock {
  constructor(public timeMs = startMs) {}
  nowMs(): number {
    return this.timeMs;
  }
}

function pattern(seed: number, lengthBytes: number): Buffer {
  const data = Buffer.alloc(lengthBytes);
  for (let i = 0; i < lengthBytes; i++) data[i] = (seed * 131 + i * 7 + (i >> 8)) & 0xff;
  return data;
}

function write(volume: number, offset: number, data: Buffer, timeMs = startMs): StreamEntryInput {
  return { kind: 'write', volume, offset, lengthBytes: data.length, timeMs, data };
}

const spillDirectory = '/spill';

async function openQueue(overrides: Partial<StreamQueueOptions> = {}, disk: JournalFileSystem = new SimulatedDisk()) {
  const clock = new ManualClock();
  const queue = await StreamQueue.open({
    name: 'group-a',
    fileSystem: disk,
    spillDirectory,
    volumes: new Map([[1, 4096 * KiB], [2, 200_000]]),
    memoryBytesMax: 1 << 20,
    spillBytesMax: 1 << 20,
    clock,
    ...overrides,
  });
  return { queue, clock, disk };
}

function spillFiles(disk: SimulatedDisk): string[] {
  return [...disk.listFiles().keys()].filter((name) => name.startsWith(`${spillDirectory}/spill-`));
}

test('push() numbers entries from sequenceNext without gaps; read() returns them in order with copied data', async () => {
  const { queue } = await openQueue({ sequenceNext: 41 });
  assert.equal(queue.stats().sequenceLast, 40);
  assert.equal(queue.stats().sequenceAcknowledged, 40);
  const first = pattern(1, 1000);
  const chunks = [pattern(2, 300), pattern(3, 200)];
  const expectedChunks = Buffer.concat(chunks);
  const checkpoint: StreamCheckpoint = { id: 'cp-1', kind: 'tagged', name: 'before upgrade' };
  assert.equal(queue.push(write(1, 4096, first, startMs + 1)), 41);
  assert.equal(queue.push({ kind: 'write', volume: 2, offset: 0, lengthBytes: 500, timeMs: startMs + 2, data: chunks }), 42);
  assert.equal(queue.push({ kind: 'zero', volume: 1, offset: 8192, lengthBytes: 70_000, timeMs: startMs + 3 }), 43);
  assert.equal(queue.push({ kind: 'checkpoint', volume: 0, offset: 0, lengthBytes: 0, timeMs: startMs + 4, checkpoint }), 44);
  assert.equal(queue.push({ kind: 'trim', volume: 2, offset: 100, lengthBytes: 50, timeMs: startMs + 5 }), 45);
  // The tap's buffers are borrowed: changing them after push must not change the queue.
  first.fill(0xee);
  chunks[0]!.fill(0xee);
  const entries = await queue.read(41, 1 << 20);
  assert.deepEqual(entries.map((entry) => entry.sequence), [41, 42, 43, 44, 45]);
  assert.deepEqual(entries.map((entry) => entry.kind), ['write', 'write', 'zero', 'checkpoint', 'trim']);
  assert.ok(entries[0]!.data!.equals(pattern(1, 1000)));
  assert.ok(entries[1]!.data!.equals(expectedChunks));
  assert.deepEqual(entries[2], { sequence: 43, kind: 'zero', volume: 1, offset: 8192, lengthBytes: 70_000, timeMs: startMs + 3 });
  assert.deepEqual(entries[3]!.checkpoint, checkpoint);
  assert.equal(entries[3]!.volume, 0);
  assert.deepEqual((await queue.read(44, 1)).map((entry) => entry.sequence), [44]);
  assert.deepEqual(await queue.read(46, 1000), []);
  const stats = queue.stats();
  assert.equal(stats.queuedEntries, 5);
  assert.equal(stats.queuedBytes, 1500 + 5 * entryOverheadBytes);
  assert.equal(stats.memoryBytes, stats.queuedBytes);
  assert.equal(stats.oldestUnacknowledgedTimeMs, startMs + 1);
  queue.acknowledge(42);
  await assert.rejects(queue.read(42, 1000), RangeError);
  assert.equal(queue.stats().oldestUnacknowledgedTimeMs, startMs + 3);
  queue.acknowledge(41); // an older acknowledgement (a resent ACK) is ignored
  assert.equal(queue.stats().sequenceAcknowledged, 42);
  assert.throws(() => queue.acknowledge(46), RangeError);
  queue.acknowledge(45);
  assert.equal(queue.stats().queuedBytes, 0);
  assert.equal(queue.stats().oldestUnacknowledgedTimeMs, undefined);
  await queue.close();
});

test('open() validates its limits and push() asserts entries', async () => {
  await assert.rejects(openQueue({ memoryBytesMax: 0 }), /memoryBytesMax 0/);
  await assert.rejects(openQueue({ spillBytesMax: -1 }), /spillBytesMax -1/);
  await assert.rejects(openQueue({ memoryBytesMax: 1.5 }), RangeError);
  await assert.rejects(openQueue({ sequenceNext: 0 }), /sequenceNext 0/);
  const { queue } = await openQueue();
  assert.throws(() => queue.push(write(3, 0, Buffer.alloc(10))), /no such volume/);
  assert.throws(() => queue.push(write(2, 199_995, Buffer.alloc(10))), /holds 200000 bytes/);
  assert.throws(() => queue.push({ kind: 'write', volume: 1, offset: 0, lengthBytes: 11, timeMs: 1, data: Buffer.alloc(10) }), /11 bytes with 10 bytes/);
  assert.throws(() => queue.push({ kind: 'zero', volume: 1, offset: 0, lengthBytes: 10, timeMs: 1, data: Buffer.alloc(10) }), TypeError);
  assert.throws(() => queue.push({ kind: 'checkpoint', volume: 0, offset: 0, lengthBytes: 0, timeMs: 1 }), TypeError);
  assert.equal(queue.stats().sequenceLast, 0);
  await queue.close();
  assert.throws(() => queue.push(write(1, 0, Buffer.alloc(1))), /closed/);
});

test('open() deletes spill segments an earlier run left behind', async () => {
  const disk = new SimulatedDisk();
  for (const name of ['spill-000000000001.seg', 'spill-000000000002.seg']) {
    const file = await disk.open(`${spillDirectory}/${name}`, 'create');
    await file.pwrite(Buffer.alloc(100, 1), 0);
  }
  const other = await disk.open(`${spillDirectory}/keep.txt`, 'create');
  await other.pwrite(Buffer.from('not ours'), 0);
  const { queue } = await openQueue({}, disk);
  assert.deepEqual(spillFiles(disk), []);
  assert.ok(disk.listFiles().has(`${spillDirectory}/keep.txt`));
  await queue.close();
});

test('memory → spill → bitmap with exact byte accounting, and the reasons name the limit and the time', async () => {
  const disk = new SimulatedDisk();
  const cost = 1000 + entryOverheadBytes;
  const record = spillRecordHeaderBytes + 1000;
  const { queue, clock } = await openQueue({ memoryBytesMax: 3 * cost, spillBytesMax: 2 * record, spillSegmentBytes: record }, disk);
  for (let i = 0; i < 3; i++) assert.equal(queue.push(write(1, i * region, pattern(i, 1000))), i + 1);
  let stats = queue.stats();
  assert.equal(stats.mode, 'memory');
  assert.deepEqual([stats.queuedEntries, stats.queuedBytes, stats.memoryBytes, stats.spillBytes], [3, 3 * cost, 3 * cost, 0]);
  clock.timeMs = Date.UTC(2024, 0, 2, 12, 0, 3);
  assert.equal(queue.push(write(1, 3 * region, pattern(3, 1000))), 4);
  stats = queue.stats();
  assert.equal(stats.mode, 'spill');
  assert.equal(stats.modeReason, 'memory limit 3.3 KiB reached at 2024-01-02T12:00:03.000Z');
  assert.deepEqual([stats.queuedEntries, stats.queuedBytes, stats.memoryBytes, stats.spillBytes], [4, 4 * cost, 3 * cost, record]);
  assert.equal(stats.spillWriteBytesPending, 1000);
  assert.equal(queue.push(write(1, 4 * region, pattern(4, 1000))), 5);
  await queue.idle();
  stats = queue.stats();
  assert.deepEqual([stats.queuedEntries, stats.queuedBytes, stats.memoryBytes, stats.spillBytes, stats.spillWriteBytesPending], [5, 5 * cost, 3 * cost, 2 * record, 0]);
  assert.equal(spillFiles(disk).length, 2);
  clock.timeMs = Date.UTC(2024, 0, 2, 12, 0, 4);
  queue.acknowledge(1); // acknowledged before bitmap mode: not marked
  assert.equal(queue.push(write(2, 196_608, pattern(5, 3392), startMs - 5)), undefined);
  stats = queue.stats();
  assert.equal(stats.mode, 'bitmap');
  assert.equal(stats.modeReason, 'spill limit 2.1 KiB reached at 2024-01-02T12:00:04.000Z');
  assert.deepEqual([stats.queuedEntries, stats.queuedBytes, stats.memoryBytes, stats.spillBytes], [0, 0, 0, 0]);
  // Entries 2..5 (four regions of volume 1) and the new write (volume 2's last region, 3392 bytes).
  assert.equal(stats.resyncBytes, 4 * region + 3392);
  assert.equal(stats.sequenceLast, 5);
  assert.equal(stats.oldestUnacknowledgedTimeMs, startMs - 5);
  assert.equal(queue.push({ kind: 'zero', volume: 1, offset: 10 * region + 1, lengthBytes: region, timeMs: startMs }), undefined);
  assert.equal(queue.push({ kind: 'checkpoint', volume: 0, offset: 0, lengthBytes: 0, timeMs: startMs, checkpoint: { id: 'x', kind: 'automatic' } }), undefined);
  stats = queue.stats();
  assert.equal(stats.resyncBytes, 6 * region + 3392);
  assert.equal(stats.checkpointsDiscarded, 1);
  assert.equal(stats.sequenceLast, 5);
  await queue.idle();
  assert.deepEqual(spillFiles(disk), [], 'the spill segments are deleted in bitmap mode');
  await queue.close();
});

test('spillBytesMax 0 goes from memory straight to bitmap mode', async () => {
  const cost = 100 + entryOverheadBytes;
  const { queue, disk } = await openQueue({ memoryBytesMax: cost, spillBytesMax: 0 });
  assert.equal(queue.push(write(1, 0, pattern(1, 100))), 1);
  assert.equal(queue.push(write(1, 5 * region, pattern(2, 100))), undefined);
  const stats = queue.stats();
  assert.equal(stats.mode, 'bitmap');
  assert.match(stats.modeReason, /^memory limit 228 B reached at .* and no spill file is configured$/);
  assert.equal(stats.resyncBytes, 2 * region);
  assert.deepEqual(spillFiles(disk as SimulatedDisk), []);
  await queue.close();
});

test('spilled entries read back after memory is full, across acknowledgements and resends; segments go when acknowledged', async () => {
  const cost = 1000 + entryOverheadBytes;
  const record = spillRecordHeaderBytes + 1000;
  const disk = new SimulatedDisk();
  const { queue } = await openQueue({ memoryBytesMax: 2 * cost, spillBytesMax: 100_000, spillSegmentBytes: 2 * record + 10 }, disk);
  for (let i = 1; i <= 8; i++) assert.equal(queue.push(write(1, i * 2000, pattern(i, 1000), startMs + i)), i);
  // Before the background writes finish, reads are served from the data still held.
  const early = await queue.read(1, 1 << 20);
  assert.deepEqual(early.map((entry) => entry.sequence), [1, 2, 3, 4, 5, 6, 7, 8]);
  await queue.idle();
  assert.equal(spillFiles(disk).length, 3);
  assert.equal(queue.stats().spillBytes, 6 * record);
  assert.equal(queue.stats().memoryBytes, 2 * cost);
  const check = (entries: StreamEntry[], sequences: number[]): void => {
    assert.deepEqual(entries.map((entry) => entry.sequence), sequences);
    for (const entry of entries) {
      assert.equal(entry.offset, entry.sequence * 2000);
      assert.equal(entry.timeMs, startMs + entry.sequence);
      assert.ok(entry.data!.equals(pattern(entry.sequence, 1000)), `data of sequence ${entry.sequence}`);
    }
  };
  check(await queue.read(1, 1 << 20), [1, 2, 3, 4, 5, 6, 7, 8]);
  check(await queue.read(3, 2 * cost), [3, 4]);
  check(await queue.read(4, 1), [4]);
  check(await queue.read(2, 3 * cost + 1), [2, 3, 4]);
  queue.acknowledge(3);
  assert.equal(queue.stats().memoryBytes, 0);
  assert.equal(queue.stats().queuedBytes, 5 * cost);
  assert.equal(queue.stats().spillBytes, 6 * record, 'segment 1 still holds sequence 4');
  queue.acknowledge(4);
  assert.equal(queue.stats().spillBytes, 4 * record);
  await queue.idle();
  assert.equal(spillFiles(disk).length, 2);
  // A resend after a reconnect reads the same entries again.
  check(await queue.read(5, 1 << 20), [5, 6, 7, 8]);
  check(await queue.read(5, 1 << 20), [5, 6, 7, 8]);
  // While the spill holds entries, new ones spill too (memory is empty): the order stays simple.
  assert.equal(queue.push(write(1, 9 * 2000, pattern(9, 1000), startMs + 9)), 9);
  assert.equal(queue.stats().memoryBytes, 0);
  assert.equal(queue.stats().spillBytes, 5 * record);
  check(await queue.read(7, 1 << 20), [7, 8, 9]);
  queue.acknowledge(9);
  const stats = queue.stats();
  assert.equal(stats.mode, 'memory');
  assert.match(stats.modeReason, /^spill drained at /);
  assert.deepEqual([stats.queuedEntries, stats.queuedBytes, stats.memoryBytes, stats.spillBytes], [0, 0, 0, 0]);
  await queue.idle();
  assert.deepEqual(spillFiles(disk), []);
  assert.equal(queue.push(write(1, 0, pattern(10, 1000))), 10);
  assert.equal(queue.stats().memoryBytes, cost);
  await queue.close();
});

test('bitmap regions cover exactly the dropped entries\' ranges plus later pushes, coalesced and clipped', async () => {
  const { queue } = await openQueue({ memoryBytesMax: 4 * (10 + entryOverheadBytes), spillBytesMax: 0 });
  queue.push(write(1, region - 5, pattern(1, 10))); // regions 0 and 1
  queue.push({ kind: 'trim', volume: 1, offset: 5 * region, lengthBytes: 3 * region, timeMs: startMs }); // 5, 6, 7
  queue.push({ kind: 'checkpoint', volume: 0, offset: 0, lengthBytes: 0, timeMs: startMs, checkpoint: { id: 'c', kind: 'automatic' } });
  queue.push(write(2, 0, pattern(2, 10))); // volume 2 region 0
  queue.acknowledge(1); // acknowledged before bitmap mode: not dropped, not marked
  assert.equal(queue.push({ kind: 'zero', volume: 1, offset: 8 * region, lengthBytes: 1, timeMs: startMs }), 5);
  assert.equal(queue.push(write(2, 199_990, pattern(3, 10))), undefined); // volume 2's last (partial) region
  assert.equal(queue.stats().mode, 'bitmap');
  // Later pushes only mark: a large zero over regions 10..40 of volume 1 (whole bitmap bytes inside).
  queue.push({ kind: 'zero', volume: 1, offset: 10 * region, lengthBytes: 31 * region, timeMs: startMs });
  queue.push(write(1, 20 * region, pattern(4, 100)));
  queue.push({ kind: 'trim', volume: 1, offset: 0, lengthBytes: 0, timeMs: startMs });
  const expected = new Map<number, ByteRange[]>([
    [1, [{ offset: 5 * region, lengthBytes: 4 * region }, { offset: 10 * region, lengthBytes: 31 * region }]],
    [2, [{ offset: 0, lengthBytes: region }, { offset: 3 * region, lengthBytes: 200_000 - 3 * region }]],
  ]);
  const stats = queue.stats();
  assert.equal(stats.resyncBytes, (4 + 31 + 1) * region + 200_000 - 3 * region);
  const taken = queue.takeResyncRegions();
  assert.deepEqual(taken.volumes, expected);
  assert.equal(taken.resyncBytes, stats.resyncBytes);
  assert.deepEqual([taken.sequenceDiscardedFirst, taken.sequenceDiscardedLast], [2, 5]);
  assert.match(taken.reason, /^memory limit .* no spill file is configured$/);
  assert.equal(queue.stats().mode, 'memory');
  assert.match(queue.stats().modeReason, /^resync of 2\.3 MiB taken at /);
  assert.equal(queue.stats().resyncBytes, 0);
  // Sequences continue after the discarded ones; reading a discarded one says so.
  assert.equal(queue.push(write(1, 0, pattern(5, 10))), 6);
  await assert.rejects(queue.read(3, 1000), (error: unknown) => error instanceof EntriesDiscardedError && error.sequenceDiscardedFirst === 2 && error.sequenceDiscardedLast === 5);
  assert.deepEqual((await queue.read(6, 1000)).map((entry) => entry.sequence), [6]);
  const again = queue.takeResyncRegions();
  assert.equal(again.resyncBytes, 0);
  assert.ok(again.sequenceDiscardedFirst > again.sequenceDiscardedLast, 'a second take reports no discarded sequences');
  await queue.close();
});

test('markForResync() marks a range in memory mode; takeResyncRegions() hands it out and keeps the mode', async () => {
  const { queue } = await openQueue();
  queue.push(write(1, 0, pattern(1, 10)));
  queue.markForResync(2, 70_000, 10, 'a write failed at the backing store');
  let stats = queue.stats();
  assert.equal(stats.mode, 'memory');
  assert.equal(stats.resyncBytes, region);
  assert.equal(stats.queuedEntries, 1);
  const taken = queue.takeResyncRegions();
  assert.deepEqual(taken.volumes, new Map([[2, [{ offset: region, lengthBytes: region }]]]));
  assert.match(taken.reason, /^a write failed at the backing store \(marked at /);
  stats = queue.stats();
  assert.equal(stats.mode, 'memory');
  assert.equal(stats.resyncBytes, 0);
  assert.deepEqual((await queue.read(1, 100)).map((entry) => entry.sequence), [1]);
  await queue.close();
});

test('a damaged spill file is detected, not trusted: the read fails and the queue goes to bitmap mode covering every entry', async () => {
  for (const damage of ['flip a data byte', 'cut the file short', 'swap two records'] as const) {
    const disk = new SimulatedDisk();
    const cost = 500 + entryOverheadBytes;
    const { queue } = await openQueue({ memoryBytesMax: cost, spillBytesMax: 100_000 }, disk);
    for (let i = 1; i <= 4; i++) queue.push(write(1, i * 3 * region, pattern(i, 500)));
    await queue.idle();
    const [segment] = spillFiles(disk);
    const file = await disk.open(segment!, 'write');
    const record = spillRecordHeaderBytes + 500;
    if (damage === 'flip a data byte') {
      const byte = Buffer.alloc(1);
      await file.pread(byte, record + spillRecordHeaderBytes + 17);
      byte[0]! ^= 0x40;
      await file.pwrite(byte, record + spillRecordHeaderBytes + 17);
    } else if (damage === 'cut the file short') {
      await file.truncate(2 * record + 100);
    } else {
      const first = Buffer.alloc(record);
      const second = Buffer.alloc(record);
      await file.pread(first, 0);
      await file.pread(second, record);
      await file.pwrite(second, 0);
      await file.pwrite(first, record);
    }
    assert.deepEqual((await queue.read(1, 1)).map((entry) => entry.sequence), [1], 'the entry in memory is not affected');
    await assert.rejects(queue.read(2, 1 << 20), (error: unknown) => error instanceof SpillDamagedError && error.filePath === segment, damage);
    const stats = queue.stats();
    assert.equal(stats.mode, 'bitmap', damage);
    assert.match(stats.modeReason, /^spill file damaged at /, damage);
    assert.equal(stats.resyncBytes, 4 * region, damage);
    await assert.rejects(queue.read(2, 1 << 20), EntriesDiscardedError);
    await queue.idle();
    assert.deepEqual(spillFiles(disk), []);
    await queue.close();
  }
});

/** Wraps a disk so spill writes can fail or wait. */
class FaultyFileSystem implements JournalFileSystem {
  failWrites = false;
  hold: Promise<void> | undefined;
  constructor(readonly inner: SimulatedDisk) {}
  async open(filePath: string, mode: 'read' | 'write' | 'create'): Promise<JournalFile> {
    const file = await this.inner.open(filePath, mode);
    const wrapper = Object.create(file) as JournalFile;
    wrapper.pwrite = async (data, position) => {
      if (this.hold) await this.hold;
      if (this.failWrites) throw Object.assign(new Error(`ENOSPC: no space left on device, path is ${filePath}`), { code: 'ENOSPC' });
      return file.pwrite(data, position);
    };
    return wrapper;
  }
  rename = (from: string, to: string) => this.inner.rename(from, to);
  unlink = (filePath: string) => this.inner.unlink(filePath);
  readdir = (directory: string) => this.inner.readdir(directory);
  mkdir = async (_directory: string) => this.inner.mkdir();
  fsyncDirectory = (directory: string) => this.inner.fsyncDirectory(directory);
  freeBytes = async (_directory: string) => this.inner.freeBytes();
}

test('a failed spill write sends the queue to bitmap mode with the error as the reason', async () => {
  const fileSystem = new FaultyFileSystem(new SimulatedDisk());
  const cost = 100 + entryOverheadBytes;
  const { queue } = await openQueue({ memoryBytesMax: cost, spillBytesMax: 100_000 }, fileSystem);
  fileSystem.failWrites = true;
  queue.push(write(1, 0, pattern(1, 100)));
  queue.push(write(1, region, pattern(2, 100)));
  assert.equal(queue.stats().mode, 'spill');
  await queue.idle();
  const stats = queue.stats();
  assert.equal(stats.mode, 'bitmap');
  assert.match(stats.modeReason, /^spill file write failed at .*: ENOSPC: no space left on device/);
  assert.equal(stats.resyncBytes, 2 * region);
  assert.equal(stats.spillWriteBytesPending, 0);
  await queue.close();
});

test('spill writes that fall too far behind send the queue to bitmap mode rather than block push()', async () => {
  const disk = new SimulatedDisk();
  const fileSystem = new FaultyFileSystem(disk);
  let release!: () => void;
  fileSystem.hold = new Promise((resolve) => (release = resolve));
  const cost = 1000 + entryOverheadBytes;
  const { queue } = await openQueue({ memoryBytesMax: cost, spillBytesMax: 100_000, spillWriteBytesPendingMax: 2500 }, fileSystem);
  assert.equal(queue.push(write(1, 0, pattern(1, 1000))), 1);
  assert.equal(queue.push(write(1, region, pattern(2, 1000))), 2);
  assert.equal(queue.push(write(1, 2 * region, pattern(3, 1000))), 3);
  assert.equal(queue.stats().spillWriteBytesPending, 2000);
  assert.equal(queue.push(write(1, 3 * region, pattern(4, 1000))), undefined);
  const stats = queue.stats();
  assert.equal(stats.mode, 'bitmap');
  assert.match(stats.modeReason, /^spill file writes fell 2\.0 KiB behind \(limit 2\.4 KiB\) at /);
  assert.equal(stats.resyncBytes, 4 * region);
  release();
  await queue.idle();
  assert.equal(queue.stats().spillWriteBytesPending, 0);
  assert.deepEqual(spillFiles(disk), []);
  await queue.close();
});

// ---- model test ----------------------------------------------------------------

const modelRegionBytes = 4096;
const modelVolumes = new Map([[1, 64 * modelRegionBytes + 1000], [2, 50_000]]);

interface ModelEntry {
  sequence: number;
  input: StreamEntryInput;
  costBytes: number;
  spilled: boolean;
}

interface QueueModel {
  memoryBytesMax: number;
  spillBytesMax: number;
  segmentBytes: number;
  entries: ModelEntry[];
  segments: { sizeBytes: number; sequenceLast: number }[];
  spilling: boolean;
  mode: 'memory' | 'spill' | 'bitmap';
  bitmap: Map<number, Set<number>>;
  sequenceLast: number;
  sequenceAcknowledged: number;
  checkpoints: number;
}

interface QueueReal {
  queue: StreamQueue;
  checks: { reads: number; entriesRead: number; bitmapEpisodes: number; spilled: number; takes: number };
}

type QueueCommand = fc.AsyncCommand<QueueModel, QueueReal>;

function modelMark(model: QueueModel, input: StreamEntryInput): void {
  if (input.kind === 'checkpoint' || input.lengthBytes === 0) return;
  let set = model.bitmap.get(input.volume);
  if (!set) model.bitmap.set(input.volume, (set = new Set()));
  for (let r = Math.floor(input.offset / modelRegionBytes); r <= Math.floor((input.offset + input.lengthBytes - 1) / modelRegionBytes); r++) set.add(r);
}

function modelRanges(model: QueueModel): { volumes: Map<number, ByteRange[]>; bytes: number } {
  const volumes = new Map<number, ByteRange[]>();
  let bytes = 0;
  for (const volume of [...model.bitmap.keys()].sort((a, b) => a - b)) {
    const size = modelVolumes.get(volume)!;
    const ranges: ByteRange[] = [];
    for (const r of [...model.bitmap.get(volume)!].sort((a, b) => a - b)) {
      const offset = r * modelRegionBytes;
      const end = Math.min(offset + modelRegionBytes, size);
      bytes += end - offset;
      const last = ranges[ranges.length - 1];
      if (last && last.offset + last.lengthBytes === offset) last.lengthBytes = end - last.offset;
      else ranges.push({ offset, lengthBytes: end - offset });
    }
    if (ranges.length > 0) volumes.set(volume, ranges);
  }
  return { volumes, bytes };
}

function modelDataBytes(input: StreamEntryInput): number {
  return input.kind === 'write' ? input.lengthBytes : 0;
}

function checkStats(model: QueueModel, real: QueueReal): void {
  const stats = real.queue.stats();
  const memory = model.entries.filter((entry) => !entry.spilled).reduce((sum, entry) => sum + entry.costBytes, 0);
  const queued = model.entries.reduce((sum, entry) => sum + entry.costBytes, 0);
  const spill = model.segments.reduce((sum, segment) => sum + segment.sizeBytes, 0);
  assert.deepEqual(
    {
      mode: stats.mode,
      queuedEntries: stats.queuedEntries,
      queuedBytes: stats.queuedBytes,
      memoryBytes: stats.memoryBytes,
      spillBytes: stats.spillBytes,
      resyncBytes: stats.resyncBytes,
      sequenceLast: stats.sequenceLast,
      sequenceAcknowledged: stats.sequenceAcknowledged,
    },
    {
      mode: model.mode,
      queuedEntries: model.entries.length,
      queuedBytes: queued,
      memoryBytes: memory,
      spillBytes: spill,
      resyncBytes: modelRanges(model).bytes,
      sequenceLast: model.sequenceLast,
      sequenceAcknowledged: model.sequenceAcknowledged,
    },
  );
  assert.ok(stats.spillBytes <= model.spillBytesMax, 'the spill stays within its limit');
  assert.ok(stats.memoryBytes <= model.memoryBytesMax, 'memory stays within its limit');
}

class PushCommand implements QueueCommand {
  constructor(readonly kind: StreamEntryInput['kind'], readonly volume: number, readonly offsetFraction: number, readonly lengthFraction: number) {}
  check(): boolean {
    return true;
  }
  async run(model: QueueModel, real: QueueReal): Promise<void> {
    const input = this.input(model);
    const sequence = real.queue.push(input);
    const expected = modelPush(model, input);
    assert.equal(sequence, expected);
    if (expected !== undefined && model.entries[model.entries.length - 1]!.spilled) real.checks.spilled++;
    checkStats(model, real);
  }
  private input(model: QueueModel): StreamEntryInput {
    const timeMs = startMs + model.sequenceLast;
    if (this.kind === 'checkpoint') {
      return { kind: 'checkpoint', volume: 0, offset: 0, lengthBytes: 0, timeMs, checkpoint: { id: `cp-${++model.checkpoints}`, kind: 'automatic' } };
    }
    const size = modelVolumes.get(this.volume)!;
    const offset = Math.floor(this.offsetFraction * size);
    const lengthMax = this.kind === 'write' ? Math.min(3000, size - offset) : size - offset;
    const lengthBytes = Math.floor(this.lengthFraction * lengthMax);
    if (this.kind === 'write') return { kind: 'write', volume: this.volume, offset, lengthBytes, timeMs, data: pattern(model.sequenceLast + 1, lengthBytes) };
    return { kind: this.kind, volume: this.volume, offset, lengthBytes, timeMs };
  }
  toString(): string {
    return `push(${this.kind}, ${this.volume}, ${this.offsetFraction.toFixed(3)}, ${this.lengthFraction.toFixed(3)})`;
  }
}

function modelPush(model: QueueModel, input: StreamEntryInput): number | undefined {
  if (model.mode === 'bitmap') {
    modelMark(model, input);
    return undefined;
  }
  const dataBytes = modelDataBytes(input);
  const costBytes = dataBytes + entryOverheadBytes;
  const memory = model.entries.filter((entry) => !entry.spilled).reduce((sum, entry) => sum + entry.costBytes, 0);
  let spilled = false;
  if (model.spilling || memory + costBytes > model.memoryBytesMax) {
    const recordBytes = spillRecordHeaderBytes + (input.kind === 'checkpoint' ? Buffer.byteLength(JSON.stringify(input.checkpoint)) : dataBytes);
    const spill = model.segments.reduce((sum, segment) => sum + segment.sizeBytes, 0);
    if (model.spillBytesMax === 0 || spill + recordBytes > model.spillBytesMax) {
      for (const entry of model.entries) modelMark(model, entry.input);
      modelMark(model, input);
      model.entries = [];
      model.segments = [];
      model.spilling = false;
      model.mode = 'bitmap';
      return undefined;
    }
    let segment = model.segments[model.segments.length - 1];
    if (!segment || (segment.sizeBytes > 0 && segment.sizeBytes + recordBytes > model.segmentBytes)) {
      segment = { sizeBytes: 0, sequenceLast: 0 };
      model.segments.push(segment);
    }
    segment.sizeBytes += recordBytes;
    segment.sequenceLast = model.sequenceLast + 1;
    model.spilling = true;
    model.mode = 'spill';
    spilled = true;
  }
  const sequence = ++model.sequenceLast;
  model.entries.push({ sequence, input, costBytes, spilled });
  return sequence;
}

class AckCommand implements QueueCommand {
  constructor(readonly fraction: number) {}
  check(): boolean {
    return true;
  }
  async run(model: QueueModel, real: QueueReal): Promise<void> {
    const sequence = model.sequenceAcknowledged + Math.round(this.fraction * (model.sequenceLast - model.sequenceAcknowledged));
    real.queue.acknowledge(sequence);
    model.sequenceAcknowledged = Math.max(model.sequenceAcknowledged, sequence);
    model.entries = model.entries.filter((entry) => entry.sequence > sequence);
    while (model.segments.length > 0 && model.segments[0]!.sequenceLast <= sequence) model.segments.shift();
    if (model.spilling && model.segments.length === 0) {
      model.spilling = false;
      model.mode = 'memory';
    }
    checkStats(model, real);
  }
  toString(): string {
    return `ack(${this.fraction.toFixed(3)})`;
  }
}

class ReadCommand implements QueueCommand {
  constructor(readonly fraction: number, readonly bytesMax: number) {}
  check(): boolean {
    return true;
  }
  async run(model: QueueModel, real: QueueReal): Promise<void> {
    const from = model.sequenceAcknowledged + 1 + Math.floor(this.fraction * (model.sequenceLast - model.sequenceAcknowledged + 1));
    const first = model.entries[0];
    if (from <= model.sequenceLast && (!first || from < first.sequence)) {
      await assert.rejects(real.queue.read(from, this.bytesMax), EntriesDiscardedError);
      return;
    }
    const entries = await real.queue.read(from, this.bytesMax);
    const expected: ModelEntry[] = [];
    let total = 0;
    for (const entry of model.entries) {
      if (entry.sequence < from) continue;
      if (expected.length > 0 && total + entry.costBytes > this.bytesMax) break;
      total += entry.costBytes;
      expected.push(entry);
    }
    assert.deepEqual(entries.map((entry) => entry.sequence), expected.map((entry) => entry.sequence));
    for (let i = 0; i < entries.length; i++) {
      const got = entries[i]!;
      const want = expected[i]!.input;
      assert.equal(got.kind, want.kind);
      assert.equal(got.timeMs, want.timeMs);
      if (want.kind === 'checkpoint') {
        assert.deepEqual(got.checkpoint, want.checkpoint);
        continue;
      }
      assert.deepEqual([got.volume, got.offset, got.lengthBytes], [want.volume, want.offset, want.lengthBytes]);
      if (want.kind === 'write') assert.ok(got.data!.equals(want.data as Buffer), `data of sequence ${got.sequence}`);
      else assert.equal(got.data, undefined);
    }
    real.checks.reads++;
    real.checks.entriesRead += entries.length;
  }
  toString(): string {
    return `read(${this.fraction.toFixed(3)}, ${this.bytesMax})`;
  }
}

class TakeCommand implements QueueCommand {
  check(): boolean {
    return true;
  }
  async run(model: QueueModel, real: QueueReal): Promise<void> {
    const expected = modelRanges(model);
    const taken = real.queue.takeResyncRegions();
    assert.deepEqual(taken.volumes, expected.volumes);
    assert.equal(taken.resyncBytes, expected.bytes);
    if (model.mode === 'bitmap') {
      real.checks.bitmapEpisodes++;
      model.mode = 'memory';
    }
    if (expected.bytes > 0) real.checks.takes++;
    model.bitmap.clear();
    checkStats(model, real);
  }
  toString(): string {
    return 'take()';
  }
}

class IdleCommand implements QueueCommand {
  check(): boolean {
    return true;
  }
  async run(model: QueueModel, real: QueueReal): Promise<void> {
    await real.queue.idle();
    assert.equal(real.queue.stats().spillWriteBytesPending, 0);
    checkStats(model, real);
  }
  toString(): string {
    return 'idle()';
  }
}

/** A fraction in [0, 1) (integers divided, so the values spread evenly). */
const fraction = fc.integer({ min: 0, max: 999_999 }).map((value) => value / 1_000_000);
/** A fraction in [0, 1], with the ends common. */
const fractionClosed = fc.oneof(fc.constantFrom(0, 1), fc.integer({ min: 0, max: 1_000_000 }).map((value) => value / 1_000_000));
const queueCommands = [
  fc.tuple(fc.constantFrom('write', 'write', 'write', 'zero', 'trim', 'checkpoint') as fc.Arbitrary<StreamEntryInput['kind']>, fc.constantFrom(1, 2), fraction, fractionClosed).map(
    ([kind, volume, offset, length]) => new PushCommand(kind, volume, offset, length),
  ),
  fc.tuple(fc.constantFrom('write') as fc.Arbitrary<StreamEntryInput['kind']>, fc.constantFrom(1, 2), fraction, fractionClosed).map(
    ([kind, volume, offset, length]) => new PushCommand(kind, volume, offset, length),
  ),
  fractionClosed.map((value) => new AckCommand(value)),
  fc.tuple(fractionClosed, fc.integer({ min: 1, max: 12_000 })).map(([from, bytesMax]) => new ReadCommand(from, bytesMax)),
  fc.constant(new TakeCommand()),
  fc.constant(new IdleCommand()),
];

test('model: random pushes, acknowledgements, reads, takes and limits match a plain model of the queue', async () => {
  const seed = testSeed('stream queue model');
  const runs = Number(process.env.LIFELINE_MODEL_RUNS ?? 300);
  const totals = { runs: 0, reads: 0, entriesRead: 0, bitmapEpisodes: 0, spilled: 0, takes: 0 };
  await fc.assert(
    fc.asyncProperty(
      fc.commands(queueCommands, { maxCommands: 80, size: 'large' }),
      fc.integer({ min: 1, max: 8_000 }),
      fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 20_000 })),
      fc.integer({ min: 1, max: 12_000 }),
      fc.integer({ min: 1, max: 1000 }),
      async (commands, memoryBytesMax, spillBytesMax, segmentBytes, sequenceNext) => {
        const disk = new SimulatedDisk();
        const queue = await StreamQueue.open({
          name: 'model',
          fileSystem: disk,
          spillDirectory,
          volumes: modelVolumes,
          memoryBytesMax,
          spillBytesMax,
          spillSegmentBytes: segmentBytes,
          regionBytes: modelRegionBytes,
          sequenceNext,
          clock: new ManualClock(),
        });
        const model: QueueModel = {
          memoryBytesMax,
          spillBytesMax,
          segmentBytes,
          entries: [],
          segments: [],
          spilling: false,
          mode: 'memory',
          bitmap: new Map(),
          sequenceLast: sequenceNext - 1,
          sequenceAcknowledged: sequenceNext - 1,
          checkpoints: 0,
        };
        const real: QueueReal = { queue, checks: { reads: 0, entriesRead: 0, bitmapEpisodes: 0, spilled: 0, takes: 0 } };
        try {
          await fc.asyncModelRun(() => ({ model, real }), commands);
          await queue.idle();
          // Every live spill segment exists on disk; no other spill file does.
          assert.equal(spillFiles(disk).length, model.segments.filter((segment) => segment.sizeBytes > 0).length);
        } finally {
          await queue.close();
        }
        assert.deepEqual(spillFiles(disk), [], 'close() deletes the spill');
        totals.runs++;
        totals.reads += real.checks.reads;
        totals.entriesRead += real.checks.entriesRead;
        totals.bitmapEpisodes += real.checks.bitmapEpisodes;
        totals.spilled += real.checks.spilled;
        totals.takes += real.checks.takes;
      },
    ),
    { numRuns: runs, seed },
  );
  console.log(
    `# stream queue model: ${totals.runs} runs, ${totals.reads} reads checked (${totals.entriesRead} entries), ${totals.spilled} entries spilled, ${totals.bitmapEpisodes} bitmap episodes taken, ${totals.takes} non-empty takes`,
  );
});
