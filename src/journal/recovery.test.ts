/**
 * Recovery of promotion and of checkpoints: a crash at every operation of a
 * promotion step (and at sampled points of a promotion of several steps), then
 * open, which must finish the step that was under way before anything else.
 * After each crash the replicas must equal the model at the watermark, the
 * rebuilt checkpoints must be the durable ones, views at older times and at
 * every durable checkpoint must equal the model, the pool must count exactly
 * the unit files on disk, and further promotion must neither skip nor
 * double-apply a record.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { prng, testSeed } from '../../test/helpers.js';
import type { AppendRecord, Journal } from './journal.js';
import { readMetadata, type JournalMetadata } from './metadata.js';
import { SimulatedDisk } from './sim-disk.js';
import {
  checkpointRecord,
  closeTestJournal,
  createReplicas,
  expectedCheckpoints,
  ManualClock,
  modelAtCheckpoint,
  modelAtTime,
  modelVolumes,
  observedFileSystem,
  openTestJournal,
  randomRecord,
  readVolume,
  settle,
  type TestJournalConfig,
} from './testing.js';

/** README: promotion goes in steps of at most 4,096 records (a literal, so that changing the constant is noticed). */
const stepRecordsMax = 4096;

type Opened = Awaited<ReturnType<typeof openTestJournal>>;

interface History {
  sizes: Map<number, number>;
  records: AppendRecord[];
  sequences: number[];
}

/**
 * Appends acknowledged batches from streams 0 and 1, the clock moving on
 * between them, with checkpoints over both streams whose two markers may land
 * in different batches (so a checkpoint can be incomplete at the end).
 */
async function appendHistory(
  journal: Journal,
  clock: ManualClock,
  random: () => number,
  history: History,
  options: { batches: number; recordsMin?: number; recordsPerBatchMax: number; checkpointChance: number; idPrefix: string; record(stream: number, sequence: number, timeMs: number): AppendRecord },
): Promise<void> {
  let pending: { id: string; left: number[] } | undefined;
  let checkpointNext = 1;
  for (let count = 0; count < options.batches || history.records.length < (options.recordsMin ?? 0); count++) {
    clock.timeMs += 1 + Math.floor(random() * 30);
    if (!pending && random() < options.checkpointChance) pending = { id: `${options.idPrefix}-${checkpointNext++}`, left: random() < 0.5 ? [0, 1] : [1, 0] };
    const batch: AppendRecord[] = [];
    const size = 1 + Math.floor(random() * options.recordsPerBatchMax);
    for (let i = 0; i < size; i++) {
      if (pending && random() < 0.4) {
        const stream = pending.left.shift()!;
        batch.push(checkpointRecord(stream, ++history.sequences[stream]!, clock.timeMs, { id: pending.id, streams: [0, 1] }));
        if (pending.left.length === 0) pending = undefined;
      } else {
        const stream = Math.floor(random() * 2);
        batch.push(options.record(stream, ++history.sequences[stream]!, clock.timeMs));
      }
    }
    await journal.append(batch);
    history.records.push(...batch);
  }
}

/**
 * The recoverable checkpoints are exactly the durable ones (every marker above
 * the watermark), nothing is listed that was never written, and views at every
 * recoverable checkpoint and at older times equal the model.
 */
async function checkCheckpointsAndViews(journal: Journal, history: History, random: () => number, timesMax: number, context: string): Promise<void> {
  const { records, sizes } = history;
  const watermark = journal.watermarkLsn;
  const expected = expectedCheckpoints(records, watermark).filter((checkpoint) => checkpoint.recoverable);
  const listed = journal.checkpoints();
  const written = new Set(records.flatMap((record) => (record.checkpoint ? [record.checkpoint.id] : [])));
  for (const checkpoint of listed) assert.ok(written.has(checkpoint.id), `${context}: checkpoint ${checkpoint.id} is listed but was never written`);
  assert.deepEqual(
    listed.filter((checkpoint) => checkpoint.recoverable).map(({ id, timeMs }) => ({ id, timeMs, recoverable: true })).sort((a, b) => a.id.localeCompare(b.id)),
    expected,
    `${context}: the recoverable checkpoints are the durable ones above watermark ${watermark}`,
  );
  for (const checkpoint of expected) {
    const model = modelAtCheckpoint(sizes, records, checkpoint.id);
    for (const [volume, bytes] of model) {
      const view = await journal.openView({ volume, at: { checkpoint: checkpoint.id }, scratchBytesMax: 0 });
      const actual = await readVolume(view, bytes.length);
      await view.close();
      assert.ok(actual.equals(bytes), `${context}: volume ${volume} at checkpoint ${checkpoint.id} differs from the model`);
    }
  }
  // Older times, not only the newest: the oldest recoverable point, and random record times after it.
  const times = [...new Set(records.slice(watermark).map((record) => record.timeMs))].sort((a, b) => a - b);
  const oldest = watermark > 0 ? journal.status().oldestRecoverableMs : (times[0] ?? 1) - 1;
  const chosen = new Set<number>([oldest]);
  for (let i = 0; i < timesMax && times.length > 0; i++) chosen.add(times[Math.floor(random() * times.length)]!);
  for (const timeMs of chosen) {
    const model = modelAtTime(sizes, records, timeMs);
    for (const [volume, bytes] of model) {
      const view = await journal.openView({ volume, at: { timeMs }, scratchBytesMax: 0 });
      const actual = await readVolume(view, bytes.length);
      await view.close();
      assert.ok(actual.equals(bytes), `${context}: volume ${volume} at time ${timeMs} (oldest recoverable ${oldest}) differs from the model`);
    }
  }
}

/** The replicas hold exactly the records through the watermark, and the metadata's per-stream state agrees. */
async function checkReplicas(opened: Opened, history: History, context: string): Promise<void> {
  const { journal, replicas } = opened;
  const watermark = journal.watermarkLsn;
  const promoted = history.records.slice(0, watermark);
  for (const [volume, bytes] of modelVolumes(history.sizes, promoted)) {
    assert.ok((await readVolume(replicas.get(volume)!, bytes.length)).equals(bytes), `${context}: replica of volume ${volume} differs from the model at watermark ${watermark}`);
  }
  for (const stream of [0, 1]) {
    const last = promoted.filter((record) => record.stream === stream).at(-1)?.sequence ?? 0;
    assert.equal(journal.streamPromoted(stream), last, `${context}: stream ${stream} promoted through sequence ${last}`);
  }
  if (watermark > 0) {
    assert.equal(journal.status().oldestRecoverableMs, Math.max(...promoted.map((record) => record.timeMs)), `${context}: oldest recoverable point`);
  }
}

/** The pool counts exactly the unit files on disk, and the journal holds them all (its units and its spare). */
async function checkUnits(opened: Opened, disk: SimulatedDisk, context: string): Promise<void> {
  await settle();
  const files = [...disk.listFiles().keys()].filter((name) => name.startsWith('/pool/group1/') && name.endsWith('.unit'));
  const counted = opened.pool.usage().journals['group1']!.units;
  assert.equal(counted, files.length, `${context}: the pool counts ${counted} units, the disk holds ${files.length} (${files.join(', ')})`);
  assert.equal(opened.journal.status().units, files.length, `${context}: the journal holds every unit file on disk`);
}

/**
 * Opens a crash image and checks it; `metaAtCrash` is the metadata the crash left. A promotion
 * step whose intent is durable must be finished by open; without one, open must not move the watermark.
 */
async function openAndCheck(config: TestJournalConfig, disk: SimulatedDisk, history: History, random: () => number, timesMax: number, context: string): Promise<Opened> {
  const metaAtCrash = (await readMetadata(disk, '/meta')) as JournalMetadata;
  const opened = await openTestJournal({ ...config, fileSystem: disk });
  const { journal } = opened;
  assert.equal(journal.lsnDurable, history.records.length, `${context}: every acknowledged record is recovered`);
  if (metaAtCrash.promotingToLsn > metaAtCrash.watermarkLsn) {
    assert.ok(journal.openReport.promotionResumed, `${context}: a promotion to ${metaAtCrash.promotingToLsn} was under way: open reports it resumed`);
    assert.equal(journal.watermarkLsn, metaAtCrash.promotingToLsn, `${context}: open finished the promotion step under way`);
  } else {
    assert.equal(journal.openReport.promotionResumed, false, `${context}: no promotion was under way`);
    assert.equal(journal.watermarkLsn, metaAtCrash.watermarkLsn, `${context}: open keeps the durable watermark`);
  }
  await checkReplicas(opened, history, context);
  await checkCheckpointsAndViews(journal, history, random, timesMax, context);
  await checkUnits(opened, disk, context);
  return opened;
}

test('a promotion step cut by a crash at any operation is finished on open; checkpoints, views and units are rebuilt; promotion goes on without skipping', async () => {
  const seed = testSeed('journal promotion crash');
  const random = prng(seed);
  const started = Date.now();
  const disk = new SimulatedDisk();
  const clock = new ManualClock();
  const history: History = { sizes: new Map([[1, 16 * 1024], [2, 16 * 1024]]), records: [], sequences: [0, 0] };
  const config: TestJournalConfig = { fileSystem: disk, clock, volumes: history.sizes, unitBytes: 8192, historyMs: 1000, sizeLimitBytes: 1 << 30 };
  await createReplicas(config);
  const opened = await openTestJournal(config);
  await appendHistory(opened.journal, clock, random, history, {
    batches: 50,
    recordsPerBatchMax: 3,
    checkpointChance: 0.25,
    idPrefix: 'cp',
    record: (stream, sequence, timeMs) => randomRecord(random, { stream, sequence, timeMs, volumes: history.sizes, dataBytesMax: 1200 }),
  });
  // Some history is promoted (and its units released) first, so the step under test starts above zero.
  await opened.journal.promote(Math.floor(history.records.length / 4), { forced: false });
  const from = opened.journal.watermarkLsn;
  const to = Math.floor((history.records.length * 3) / 4);
  const unitsBefore = opened.journal.status().units;
  const before = disk.operationCount;
  await opened.journal.promote(to, { forced: false });
  const after = disk.operationCount;
  assert.equal(opened.journal.watermarkLsn, to);
  assert.ok(opened.journal.status().units < unitsBefore, 'the promotion under test releases units');
  await closeTestJournal(opened);

  let states = 0;
  let resumed = 0;
  for (let crashAt = before; crashAt <= after; crashAt++) {
    for (let image = 0; image < 3; image++) {
      const crashed = disk.crashImage(crashAt, random, { syncedOnly: image === 0 });
      const context = `seed ${seed}, crash after operation ${crashAt} (promotion ${from}..${to} in operations ${before}..${after}), image ${image}`;
      const recovered = await openAndCheck(config, crashed, history, random, 3, context);
      if (recovered.journal.openReport.promotionResumed) resumed++;
      const watermark = recovered.journal.watermarkLsn;
      assert.ok(watermark >= from && watermark <= to, `${context}: watermark ${watermark} is within the promotion`);
      await closeTestJournal(recovered);
      // A clean reopen finds the same state: same watermark, checkpoints and views.
      const again = await openAndCheck(config, crashed, history, random, 2, `${context}, clean reopen`);
      assert.equal(again.journal.watermarkLsn, watermark, `${context}: a clean reopen keeps the watermark`);
      // Promotion goes on from the recovered watermark, half way and then to the end: no record skipped or applied out of order.
      const middle = watermark + Math.ceil((history.records.length - watermark) / 2);
      for (const lsn of [middle, history.records.length]) {
        await again.journal.promote(lsn, { forced: false });
        assert.equal(again.journal.watermarkLsn, lsn, context);
        await checkReplicas(again, history, `${context}, promoted on to ${lsn}`);
        await checkCheckpointsAndViews(again.journal, history, random, 1, `${context}, promoted on to ${lsn}`);
      }
      await checkUnits(again, crashed, `${context}, everything promoted`);
      await closeTestJournal(again);
      states++;
    }
  }
  assert.ok(resumed > 0, 'some crash states left a promotion under way');
  console.log(`# journal promotion crash: ${states} states at ${after - before + 1} crash points (records ${from + 1}..${to}), ${resumed} promotions resumed on open, in ${Date.now() - started} ms`);
});

test('a promotion of more than 4,096 records goes in restartable steps: a crash in any step is finished on open', async () => {
  const seed = testSeed('journal promotion steps crash');
  const random = prng(seed);
  const started = Date.now();
  const disk = new SimulatedDisk();
  const clock = new ManualClock();
  const history: History = { sizes: new Map([[1, 32 * 1024]]), records: [], sequences: [0, 0] };
  /** Operation counts right after the metadata was replaced (renamed into place). */
  const metadataReplacedAt: number[] = [];
  const observed = observedFileSystem(disk, (operation, filePath) => {
    if (operation === 'rename' && filePath === '/meta/journal.meta') metadataReplacedAt.push(disk.operationCount);
  });
  const config: TestJournalConfig = { fileSystem: disk, clock, volumes: history.sizes, unitBytes: 64 * 1024, historyMs: 1000, sizeLimitBytes: 1 << 30 };
  await createReplicas(config);
  const opened = await openTestJournal({ ...config, fileSystem: observed });
  const sizeBytes = history.sizes.get(1)!;
  await appendHistory(opened.journal, clock, random, history, {
    batches: 0,
    recordsMin: stepRecordsMax + 400,
    recordsPerBatchMax: 75,
    checkpointChance: 0.03,
    idPrefix: 'cp',
    record: (stream, sequence, timeMs) => {
      const lengthBytes = 8 + Math.floor(random() * 57);
      const offset = Math.floor(random() * (sizeBytes - lengthBytes));
      const roll = random();
      const base = { stream, sequence, timeMs, volume: 1, offset };
      if (roll < 0.85) return { kind: 'write', ...base, data: Buffer.alloc(lengthBytes, 1 + (sequence % 255)) };
      return { kind: roll < 0.95 ? 'zero' : 'trim', ...base, lengthBytes };
    },
  });
  metadataReplacedAt.length = 0;
  const before = disk.operationCount;
  await opened.journal.promote(history.records.length, { forced: false });
  const after = disk.operationCount;
  await closeTestJournal(opened);

  // Crash points: around every metadata replacement of the promotion, and random ones between.
  const points = new Set<number>([before, after]);
  for (const at of metadataReplacedAt) for (let near = at - 2; near <= at + 1; near++) if (near >= before && near <= after) points.add(near);
  for (let i = 0; i < 6; i++) points.add(before + Math.floor(random() * (after - before + 1)));
  const intents = new Set<number>();
  let states = 0;
  let resumed = 0;
  for (const crashAt of [...points].sort((a, b) => a - b)) {
    for (let image = 0; image < 2; image++) {
      const crashed = disk.crashImage(crashAt, random, { syncedOnly: image === 0 });
      const context = `seed ${seed}, crash after operation ${crashAt} (promotion of ${history.records.length} records in operations ${before}..${after}), image ${image}`;
      const meta = (await readMetadata(crashed, '/meta'))!;
      if (meta.promotingToLsn > 0) {
        intents.add(meta.promotingToLsn);
        assert.ok(meta.promotingToLsn - meta.watermarkLsn <= stepRecordsMax, `${context}: a step of ${meta.promotingToLsn - meta.watermarkLsn} records (watermark ${meta.watermarkLsn}, intent ${meta.promotingToLsn})`);
      }
      const recovered = await openAndCheck(config, crashed, history, random, 1, context);
      if (recovered.journal.openReport.promotionResumed) resumed++;
      await recovered.journal.promote(history.records.length, { forced: false });
      await checkReplicas(recovered, history, `${context}, promoted on to the end`);
      await closeTestJournal(recovered);
      states++;
    }
  }
  assert.ok(intents.size >= 2, `the promotion went in at least two steps (intents seen: ${[...intents].join(', ')})`);
  assert.ok(resumed > 0, 'some crash states left a step under way');
  console.log(`# journal promotion steps crash: ${states} states at ${points.size} crash points, ${history.records.length} records, steps to ${[...intents].sort((a, b) => a - b).join(', ')}, ${resumed} resumed, in ${Date.now() - started} ms`);
});
