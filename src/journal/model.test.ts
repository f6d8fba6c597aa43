/**
 * Model-based test: fast-check drives random sequences of appends from several
 * streams, checkpoints, promotion (with unit release), view creation, view
 * reads and writes and crash-and-reopen against the real journal on a
 * simulated disk, and compares every view read with a plain model: the list
 * of acknowledged records, applied to zeroed buffers up to the view's point.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { prng, testSeed } from '../../test/helpers.js';
import { SimulatedDisk } from './sim-disk.js';
import { closeTestJournal, createReplicas, ManualClock, openTestJournal, type TestJournalConfig } from './testing.js';
import type { AppendRecord, Journal } from './journal.js';
import type { JournalPool } from './pool.js';
import type { RecoveryView } from './view.js';
import type { JournalFileBackingStore } from './file-store.js';

const runs = Number(process.env.LIFELINE_MODEL_RUNS ?? 2000);
const streamCount = 3;
const volumeSizes = new Map([[1, 8192], [2, 12288]]);

interface Model {
  records: AppendRecord[];
  sequences: number[];
  checkpoints: { id: string; markers: number[] }[];
  views: Map<number, Buffer>;
}

interface Real {
  disk: SimulatedDisk;
  config: TestJournalConfig;
  clock: ManualClock;
  journal: Journal;
  pool: JournalPool;
  replicas: Map<number, JournalFileBackingStore>;
  views: Map<number, RecoveryView>;
  viewNext: number;
  random: () => number;
  checks: { reads: number; views: number; crashes: number; released: number };
}

type Command = fc.AsyncCommand<Model, Real>;

function pattern(seed: number, lengthBytes: number): Buffer {
  const data = Buffer.alloc(lengthBytes);
  for (let i = 0; i < lengthBytes; i++) data[i] = (seed * 31 + i * 7) & 0xff;
  return data;
}

interface RecordSpec {
  stream: number;
  volume: number;
  kind: 'write' | 'zero' | 'trim';
  offsetFraction: number;
  lengthBytes: number;
}

class AppendCommand implements Command {
  constructor(readonly specs: RecordSpec[]) {}
  check(): boolean {
    return true;
  }
  async run(model: Model, real: Real): Promise<void> {
    const batch: AppendRecord[] = this.specs.map((spec, i) => {
      const sizeBytes = volumeSizes.get(spec.volume)!;
      const offset = Math.floor(spec.offsetFraction * (sizeBytes - spec.lengthBytes));
      const sequence = ++model.sequences[spec.stream]!;
      const base = { stream: spec.stream, sequence, timeMs: real.clock.timeMs, volume: spec.volume, offset };
      return spec.kind === 'write' ? { kind: 'write', ...base, data: pattern(model.records.length + i + sequence, spec.lengthBytes) } : { kind: spec.kind, ...base, lengthBytes: spec.lengthBytes };
    });
    await real.journal.append(batch);
    model.records.push(...batch);
  }
  toString(): string {
    return `append(${this.specs.map((spec) => `${spec.kind}:s${spec.stream}v${spec.volume}+${spec.lengthBytes}`).join(',')})`;
  }
}

class CheckpointCommand implements Command {
  constructor(readonly tagged: boolean) {}
  check(): boolean {
    return true;
  }
  async run(model: Model, real: Real): Promise<void> {
    const id = `cp-${model.checkpoints.length + 1}`;
    const streams = [...Array(streamCount).keys()];
    const batch: AppendRecord[] = streams.map((stream) => ({
      kind: 'checkpoint',
      stream,
      sequence: ++model.sequences[stream]!,
      timeMs: real.clock.timeMs,
      volume: 0,
      offset: 0,
      checkpoint: { id, kind: this.tagged ? 'tagged' : 'automatic', ...(this.tagged ? { name: `tag ${id}` } : {}), streams },
    }));
    await real.journal.append(batch);
    model.records.push(...batch);
    model.checkpoints.push({ id, markers: batch.map((record) => record.sequence) });
    const listed = real.journal.checkpoints().find((checkpoint) => checkpoint.id === id);
    assert.ok(listed?.recoverable, `checkpoint ${id} is listed as recoverable once its markers are durable`);
  }
  toString(): string {
    return `checkpoint(${this.tagged ? 'tagged' : 'automatic'})`;
  }
}

class TickCommand implements Command {
  constructor(readonly advanceMs: number) {}
  check(): boolean {
    return true;
  }
  async run(_model: Model, real: Real): Promise<void> {
    real.clock.timeMs += this.advanceMs;
    const before = real.journal.status().units;
    await real.journal.tick();
    const status = real.journal.status();
    if (status.units < before) real.checks.released++;
    assert.equal(real.pool.usage().journals['group1']!.units, status.units, 'pool and journal agree on units held');
    // Without open views, nothing older than the window stays unpromoted.
    if (real.views.size === 0 && status.records > 0) {
      const oldest = real.journal.index.get(status.watermarkLsn + 1);
      assert.ok(oldest.timeMs >= real.clock.timeMs - real.journal.historyMs, 'aged records are promoted');
    }
  }
  toString(): string {
    return `tick(+${this.advanceMs} ms)`;
  }
}

/** The model's content of a volume with, per stream, records up to the cut. */
function modelAt(model: Model, volume: number, include: (record: AppendRecord) => boolean): Buffer {
  const bytes = Buffer.alloc(volumeSizes.get(volume)!);
  for (const record of model.records) {
    if (record.kind === 'checkpoint' || record.volume !== volume || !include(record)) continue;
    if (record.kind === 'write') record.data!.copy(bytes, record.offset);
    else bytes.fill(0, record.offset, record.offset + record.lengthBytes!);
  }
  return bytes;
}

class OpenViewCommand implements Command {
  constructor(readonly volume: number, readonly atCheckpoint: boolean, readonly fraction: number) {}
  check(model: Model): boolean {
    return model.views.size < 3;
  }
  async run(model: Model, real: Real): Promise<void> {
    const id = real.viewNext++;
    let expected: Buffer;
    let view: RecoveryView;
    const recoverable = real.journal.checkpoints().filter((checkpoint) => checkpoint.recoverable);
    if (this.atCheckpoint && recoverable.length > 0) {
      const chosen = recoverable[Math.floor(this.fraction * recoverable.length)]!;
      const markers = model.checkpoints.find((checkpoint) => checkpoint.id === chosen.id)!.markers;
      expected = modelAt(model, this.volume, (record) => record.sequence < markers[record.stream]!);
      view = await real.journal.openView({ volume: this.volume, at: { checkpoint: chosen.id }, scratchBytesMax: 8192 });
    } else {
      const oldest = real.journal.status().oldestRecoverableMs;
      const timeMs = Math.round(oldest + this.fraction * (real.clock.timeMs - oldest));
      const ended = new Set<number>();
      const included = new Set<AppendRecord>();
      for (const record of model.records) {
        if (ended.has(record.stream)) continue;
        if (record.timeMs > timeMs) ended.add(record.stream);
        else included.add(record);
      }
      expected = modelAt(model, this.volume, (record) => included.has(record));
      view = await real.journal.openView({ volume: this.volume, at: { timeMs }, scratchBytesMax: 8192 });
    }
    real.views.set(id, view);
    model.views.set(id, expected);
    real.checks.views++;
  }
  toString(): string {
    return `openView(v${this.volume}, ${this.atCheckpoint ? 'checkpoint' : 'time'} ${this.fraction.toFixed(2)})`;
  }
}

function pickView(model: Model, pick: number): number | undefined {
  const ids = [...model.views.keys()];
  return ids.length === 0 ? undefined : ids[pick % ids.length];
}

class ViewReadCommand implements Command {
  constructor(readonly pick: number, readonly offsetFraction: number, readonly lengthFraction: number) {}
  check(model: Model): boolean {
    return model.views.size > 0;
  }
  async run(model: Model, real: Real): Promise<void> {
    const id = pickView(model, this.pick)!;
    const expected = model.views.get(id)!;
    const offset = Math.floor(this.offsetFraction * expected.length);
    const lengthBytes = Math.max(1, Math.floor(this.lengthFraction * (expected.length - offset)));
    const actual = Buffer.alloc(lengthBytes);
    await real.views.get(id)!.read(actual, offset);
    assert.ok(actual.equals(expected.subarray(offset, offset + lengthBytes)), `view ${id} read ${lengthBytes} at ${offset} equals the model`);
    real.checks.reads++;
  }
  toString(): string {
    return `viewRead(${this.pick}, ${this.offsetFraction.toFixed(2)}, ${this.lengthFraction.toFixed(2)})`;
  }
}

class ViewWriteCommand implements Command {
  constructor(readonly pick: number, readonly offsetFraction: number, readonly lengthBytes: number, readonly zero: boolean) {}
  check(model: Model): boolean {
    return model.views.size > 0;
  }
  async run(model: Model, real: Real): Promise<void> {
    const id = pickView(model, this.pick)!;
    const expected = model.views.get(id)!;
    const offset = Math.floor(this.offsetFraction * (expected.length - this.lengthBytes));
    const view = real.views.get(id)!;
    try {
      if (this.zero) await view.writeZeroes(offset, this.lengthBytes, { mayDeallocate: true, fastOnly: false });
      else await view.write(pattern(offset, this.lengthBytes), offset);
    } catch (error) {
      // The scratch limit (8 KiB) is part of the contract: the write is refused whole or in part, block by block.
      assert.equal((error as { code?: string }).code, 'ENOSPC');
      const fresh = Buffer.alloc(expected.length);
      await view.read(fresh, 0);
      fresh.copy(expected);
      return;
    }
    if (this.zero) expected.fill(0, offset, offset + this.lengthBytes);
    else pattern(offset, this.lengthBytes).copy(expected, offset);
  }
  toString(): string {
    return `viewWrite(${this.pick}, ${this.offsetFraction.toFixed(2)}, ${this.lengthBytes}, ${this.zero ? 'zero' : 'data'})`;
  }
}

class CloseViewCommand implements Command {
  constructor(readonly pick: number) {}
  check(model: Model): boolean {
    return model.views.size > 0;
  }
  async run(model: Model, real: Real): Promise<void> {
    const id = pickView(model, this.pick)!;
    await real.views.get(id)!.close();
    real.views.delete(id);
    model.views.delete(id);
  }
  toString(): string {
    return `closeView(${this.pick})`;
  }
}

class CrashCommand implements Command {
  constructor(readonly syncedOnly: boolean) {}
  check(): boolean {
    return true;
  }
  async run(model: Model, real: Real): Promise<void> {
    // Every append was acknowledged, so every crash state must keep them all.
    const recoverable = real.journal.checkpoints().filter((checkpoint) => checkpoint.recoverable);
    const image = real.disk.crashImage(real.disk.operationCount, real.random, { syncedOnly: this.syncedOnly });
    real.views.clear();
    model.views.clear();
    real.disk = image;
    const opened = await openTestJournal({ ...real.config, fileSystem: image });
    Object.assign(real, { journal: opened.journal, pool: opened.pool, replicas: opened.replicas });
    assert.equal(real.journal.lsnDurable, model.records.length, 'every acknowledged record survives the crash');
    // Open rebuilds the checkpoints from their markers: the same ones are recoverable (nothing was promoted meanwhile).
    assert.deepEqual(real.journal.checkpoints().filter((checkpoint) => checkpoint.recoverable), recoverable, 'the same checkpoints are recoverable after the crash');
    real.checks.crashes++;
  }
  toString(): string {
    return `crash(${this.syncedOnly ? 'synced only' : 'random unsynced subset'})`;
  }
}

const recordSpec = fc.record({
  stream: fc.integer({ min: 0, max: streamCount - 1 }),
  volume: fc.constantFrom(1, 2),
  kind: fc.constantFrom<'write' | 'zero' | 'trim'>('write', 'write', 'write', 'zero', 'trim'),
  offsetFraction: fc.double({ min: 0, max: 1, noNaN: true }),
  lengthBytes: fc.oneof(fc.integer({ min: 1, max: 700 }), fc.constantFrom(512, 1024, 1536)),
});

const appendCommand = fc.array(recordSpec, { minLength: 1, maxLength: 4 }).filter((specs) => specs.reduce((sum, spec) => sum + 64 + spec.lengthBytes, 0) <= 2048).map((specs) => new AppendCommand(specs));
const readCommand = fc.tuple(fc.nat(), fc.double({ min: 0, max: 0.999, noNaN: true }), fc.double({ min: 0, max: 1, noNaN: true })).map(([pick, offset, length]) => new ViewReadCommand(pick, offset, length));
const commands = [
  appendCommand,
  appendCommand,
  appendCommand,
  readCommand,
  readCommand,
  fc.boolean().map((tagged) => new CheckpointCommand(tagged)),
  fc.integer({ min: 0, max: 400 }).map((advanceMs) => new TickCommand(advanceMs)),
  fc.tuple(fc.constantFrom(1, 2), fc.boolean(), fc.double({ min: 0, max: 0.999, noNaN: true })).map(([volume, checkpoint, fraction]) => new OpenViewCommand(volume, checkpoint, fraction)),
  readCommand,
  fc.tuple(fc.nat(), fc.double({ min: 0, max: 1, noNaN: true }), fc.integer({ min: 1, max: 5000 }), fc.boolean()).map(([pick, offset, length, zero]) => new ViewWriteCommand(pick, offset, length, zero)),
  fc.nat().map((pick) => new CloseViewCommand(pick)),
  fc.boolean().map((syncedOnly) => new CrashCommand(syncedOnly)),
];

test('every view read equals the model, through appends, checkpoints, promotion, unit release and crashes', async () => {
  const seed = testSeed('journal model');
  const started = Date.now();
  const totals = { reads: 0, views: 0, crashes: 0, released: 0, sequences: 0 };
  await fc.assert(
    fc.asyncProperty(fc.commands(commands, { maxCommands: 60, size: 'medium' }), fc.integer(), async (sequence, diskSeed) => {
      const disk = new SimulatedDisk();
      const clock = new ManualClock();
      const config: TestJournalConfig = { fileSystem: disk, clock, volumes: volumeSizes, unitBytes: 4096, historyMs: 300, sizeLimitBytes: 1 << 30 };
      await createReplicas(config);
      const opened = await openTestJournal(config);
      const real: Real = { disk, config, clock, ...opened, views: new Map(), viewNext: 1, random: prng(diskSeed), checks: { reads: 0, views: 0, crashes: 0, released: 0 } };
      const model: Model = { records: [], sequences: Array(streamCount).fill(0), checkpoints: [], views: new Map() };
      try {
        await fc.asyncModelRun(() => ({ model, real }), sequence);
      } finally {
        for (const view of real.views.values()) await view.close();
        await closeTestJournal(real);
      }
      totals.sequences++;
      totals.reads += real.checks.reads;
      totals.views += real.checks.views;
      totals.crashes += real.checks.crashes;
      totals.released += real.checks.released;
    }),
    { numRuns: runs, seed },
  );
  console.log(`# journal model: ${totals.sequences} sequences (${runs} runs), ${totals.views} views, ${totals.reads} view reads checked, ${totals.crashes} crashes, ${totals.released} ticks released units, in ${Date.now() - started} ms`);
});
