/**
 * Crash-state testing: the real journal runs on a simulated disk; crash images
 * keep what was synced plus any subset of later writes, torn in 512-byte
 * sectors. After each crash the journal must reopen with every acknowledged
 * record, and with nothing that was not written whole, in the replicas or the
 * journal; the checkpoints it lists as recoverable must be exactly those whose
 * markers are all durable and unpromoted, and views at each of them and at
 * older times (not only the newest) must equal the model. A clean reopen at
 * the end of each trial must list the same checkpoints.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { prng, testSeed } from '../../test/helpers.js';
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
  openTestJournal,
  randomRecord,
  readVolume,
  type TestJournalConfig,
} from './testing.js';
import type { AppendRecord, Journal } from './journal.js';
import { readMetadata } from './metadata.js';
import { parseUnitFileName } from './pool.js';
import { recordDataBytes, recordHeaderBytes } from './record.js';
import { scanUnits } from './scan.js';

const crashStatesMin = Number(process.env.LIFELINE_CRASH_STATES ?? 10_000);
const damageStatesMin = Number(process.env.LIFELINE_CRASH_DAMAGE_STATES ?? 2_000);
const crashPointsPerTrial = 25;
const imagesPerPoint = 4;
/** Older points in time checked after each crash, besides the oldest recoverable one. */
const olderTimesPerState = 2;

/**
 * The recoverable checkpoints are exactly those whose markers are all in the recovered log above
 * the watermark, and views at each of them, at the oldest recoverable point and at older record
 * times equal the model of the recovered records.
 */
async function checkOlderPoints(journal: Journal, volumes: Map<number, number>, records: readonly AppendRecord[], random: () => number, context: string): Promise<{ checkpoints: number; times: number }> {
  const watermark = journal.watermarkLsn;
  const expected = expectedCheckpoints(records, watermark).filter((checkpoint) => checkpoint.recoverable);
  const listed = journal
    .checkpoints()
    .filter((checkpoint) => checkpoint.recoverable)
    .map(({ id, timeMs }) => ({ id, timeMs, recoverable: true }))
    .sort((a, b) => a.id.localeCompare(b.id));
  assert.deepEqual(listed, expected, `${context}: recoverable checkpoints after recovery (watermark ${watermark})`);
  for (const checkpoint of expected) {
    for (const [volume, bytes] of modelAtCheckpoint(volumes, records, checkpoint.id)) {
      const view = await journal.openView({ volume, at: { checkpoint: checkpoint.id }, scratchBytesMax: 0 });
      const actual = await readVolume(view, bytes.length);
      await view.close();
      assert.ok(actual.equals(bytes), `${context}: volume ${volume} at checkpoint ${checkpoint.id} differs from the model`);
    }
  }
  const times = [...new Set(records.slice(watermark).map((record) => record.timeMs))];
  const chosen = new Set<number>([watermark > 0 ? journal.status().oldestRecoverableMs : (times[0] ?? 1) - 1]);
  for (let i = 0; i < olderTimesPerState && times.length > 0; i++) chosen.add(times[Math.floor(random() * times.length)]!);
  const volumeIds = [...volumes.keys()];
  for (const timeMs of chosen) {
    // One volume a time, by chance: over thousands of states every volume is seen at many times.
    const volume = volumeIds[Math.floor(random() * volumeIds.length)]!;
    const bytes = modelAtTime(volumes, records, timeMs).get(volume)!;
    const view = await journal.openView({ volume, at: { timeMs }, scratchBytesMax: 0 });
    const actual = await readVolume(view, bytes.length);
    await view.close();
    assert.ok(actual.equals(bytes), `${context}: volume ${volume} at time ${timeMs} differs from the model`);
  }
  return { checkpoints: expected.length, times: chosen.size };
}

/** One trial's history: random batches (checkpoints among them), ticks and waits, on a fresh simulated disk. */
async function runTrial(random: () => number, trials: number) {
  const disk = new SimulatedDisk();
  const clock = new ManualClock();
  const config: TestJournalConfig = {
    fileSystem: disk,
    clock,
    volumes: new Map([[1, 16 * 1024], [2, 16 * 1024]]),
    unitBytes: 8192,
    historyMs: 50,
    sizeLimitBytes: 8 * 8192,
  };
  await createReplicas(config);
  const opened = await openTestJournal(config);
  const operationsAtOpen = disk.operationCount;
  const submitted: AppendRecord[] = [];
  /** Operation count at which each submitted record was acknowledged. */
  const acknowledgedAt: number[] = [];
  /**
   * Records acknowledged when each record was submitted (acknowledgements come in order): the
   * journal's commit point when it encodes the record is at least that, so the record claims it.
   */
  const ackedCountAtSubmit: number[] = [];
  let ackedCount = 0;
  const sequences = [0, 0];
  const inFlight: Promise<unknown>[] = [];
  /** A checkpoint whose markers are still to be appended (they may land in different batches). */
  let checkpoint: { id: string; left: number[] } | undefined;
  let checkpointNext = 1;
  const steps = 10 + Math.floor(random() * 30);
  for (let step = 0; step < steps; step++) {
    const roll = random();
    if (roll < 0.65) {
      const batch: AppendRecord[] = [];
      const count = 1 + Math.floor(random() * 3);
      if (!checkpoint && random() < 0.2) checkpoint = { id: `cp-${trials}-${checkpointNext++}`, left: random() < 0.5 ? [0, 1] : [1, 0] };
      for (let i = 0; i < count; i++) {
        if (checkpoint && random() < 0.5) {
          const stream = checkpoint.left.shift()!;
          batch.push(checkpointRecord(stream, ++sequences[stream]!, clock.timeMs, { id: checkpoint.id, streams: [0, 1] }));
          if (checkpoint.left.length === 0) checkpoint = undefined;
          continue;
        }
        const stream = Math.floor(random() * 2);
        batch.push(randomRecord(random, { stream, sequence: ++sequences[stream]!, timeMs: clock.timeMs, volumes: config.volumes, dataBytesMax: 1200 }));
      }
      const first = submitted.length;
      submitted.push(...batch);
      for (let i = 0; i < batch.length; i++) {
        acknowledgedAt.push(Infinity);
        ackedCountAtSubmit.push(ackedCount);
      }
      inFlight.push(
        opened.journal.append(batch).then(() => {
          for (let i = 0; i < batch.length; i++) acknowledgedAt[first + i] = disk.operationCount;
          ackedCount = Math.max(ackedCount, first + batch.length);
        }),
      );
    } else if (roll < 0.85) {
      clock.timeMs += Math.floor(random() * 40);
      await opened.journal.tick();
    } else {
      await Promise.all(inFlight);
    }
  }
  await Promise.all(inFlight);
  return { disk, clock, config, opened, operationsAtOpen, submitted, acknowledgedAt, ackedCountAtSubmit };
}

test('journal reopens after any crash state with every acknowledged record and no damaged one', async () => {
  const seed = testSeed('journal crash states');
  const random = prng(seed);
  const started = Date.now();
  let states = 0;
  let trials = 0;
  let cuts = 0;
  let promotionsResumed = 0;
  let checkpointViews = 0;
  let olderTimeViews = 0;
  while (states < crashStatesMin) {
    trials++;
    const { disk, clock, config, opened, operationsAtOpen, submitted, acknowledgedAt } = await runTrial(random, trials);
    const operations = disk.operationCount;
    for (let point = 0; point < crashPointsPerTrial; point++) {
      const crashAt = operationsAtOpen + Math.floor(random() * (operations - operationsAtOpen + 1));
      let acknowledged = 0;
      for (let i = 0; i < submitted.length; i++) if (acknowledgedAt[i]! <= crashAt) acknowledged = i + 1;
      for (let image = 0; image < imagesPerPoint; image++) {
        const crashed = disk.crashImage(crashAt, random, { syncedOnly: image === 0 });
        const reopened = await openTestJournal({ ...config, fileSystem: crashed });
        const { journal } = reopened;
        const context = `seed ${seed}, trial ${trials}, crash after operation ${crashAt}, image ${image}`;
        if (journal.openReport.cut) cuts++;
        // A crash tears only what was never acknowledged: that is a torn tail, never damage.
        assert.equal(journal.openReport.damage, undefined, `${context}: a torn tail was taken for damage: ${JSON.stringify(journal.openReport.damage)}`);
        if (journal.openReport.promotionResumed) promotionsResumed++;
        assert.ok(journal.lsnDurable >= acknowledged, `${context}: ${acknowledged} records acknowledged, only ${journal.lsnDurable} recovered`);
        assert.ok(journal.lsnDurable <= submitted.length, `${context}: more records than submitted`);
        for (let lsn = journal.watermarkLsn + 1; lsn <= journal.lsnDurable; lsn++) {
          const entry = journal.index.get(lsn);
          const expected = submitted[lsn - 1]!;
          assert.equal(entry.stream, expected.stream, context);
          assert.equal(entry.sequence, expected.sequence, context);
          assert.equal(entry.offset, expected.offset, context);
        }
        const model = modelVolumes(config.volumes, submitted.slice(0, journal.lsnDurable));
        for (const [volume, expected] of model) {
          const view = await journal.openView({ volume, at: { timeMs: clock.timeMs + 1 }, scratchBytesMax: 0 });
          const actual = Buffer.alloc(expected.length);
          await view.read(actual, 0);
          await view.close();
          assert.ok(actual.equals(expected), `${context}: volume ${volume} differs from the model`);
        }
        const older = await checkOlderPoints(journal, config.volumes, submitted.slice(0, journal.lsnDurable), random, context);
        checkpointViews += older.checkpoints;
        olderTimeViews += older.times;
        if (image === 1 && point % 2 === 0) {
          // Life goes on after the cut: a new record is durable, and a second crash keeps it. It
          // takes the place (and size) of the first record lost, so a stale copy of the records
          // after it would line up exactly if the scan trusted them.
          const lost = submitted[journal.lsnDurable]?.kind === 'checkpoint' ? undefined : submitted[journal.lsnDurable];
          const stream = lost?.stream ?? 0;
          const next = journal.status().streams.find((entry) => entry.stream === stream)?.sequenceLast ?? 0;
          const record: AppendRecord = lost
            ? { ...lost, sequence: next + 1, ...(lost.data ? { data: Buffer.from(lost.data.map((byte) => byte ^ 0x5a)) } : {}) }
            : randomRecord(random, { stream, sequence: next + 1, timeMs: clock.timeMs, volumes: config.volumes, dataBytesMax: 1200 });
          await journal.append([record]);
          const again = await openTestJournal({ ...config, fileSystem: crashed.crashImage(crashed.operationCount, random) });
          const model2 = modelVolumes(config.volumes, [...submitted.slice(0, journal.lsnDurable - 1), record]);
          assert.equal(again.journal.lsnDurable, journal.lsnDurable, `${context}: second crash lost the new record`);
          const view = await again.journal.openView({ volume: record.volume, at: { timeMs: clock.timeMs + 1 }, scratchBytesMax: 0 });
          const actual = Buffer.alloc(config.volumes.get(record.volume)!);
          await view.read(actual, 0);
          assert.ok(actual.equals(model2.get(record.volume)!), `${context}: after a second crash the volume differs`);
          await view.close();
          await closeTestJournal(again);
        }
        await closeTestJournal(reopened);
        states++;
      }
    }
    // A clean reopen lists the same recoverable checkpoints, and its views at them and at older times equal the model.
    const listedBefore = opened.journal.checkpoints().filter((checkpoint) => checkpoint.recoverable);
    await closeTestJournal(opened);
    const clean = await openTestJournal(config);
    const context = `seed ${seed}, trial ${trials}, clean reopen`;
    assert.equal(clean.journal.lsnDurable, submitted.length, context);
    assert.deepEqual(clean.journal.checkpoints().filter((checkpoint) => checkpoint.recoverable), listedBefore, `${context}: the same recoverable checkpoints`);
    await checkOlderPoints(clean.journal, config.volumes, submitted, random, context);
    await closeTestJournal(clean);
  }
  console.log(
    `# journal crash states: ${states} states from ${trials} trials (${cuts} torn tails cut, ${promotionsResumed} promotions resumed; ${checkpointViews} recoverable checkpoints and ${olderTimeViews} older times viewed) in ${Date.now() - started} ms`,
  );
});

test('damage to an acknowledged record in a crash state is a recorded loss whenever a later record or the metadata proves it acknowledged, never a silent cut; what precedes it is kept and served', async () => {
  const seed = testSeed('journal crash damage');
  const random = prng(seed);
  const started = Date.now();
  let states = 0;
  let trials = 0;
  let proven = 0;
  let reportedBeyondProof = 0;
  let cutAsTail = 0;
  let views = 0;
  while (states < damageStatesMin) {
    trials++;
    const { disk, config, opened, operationsAtOpen, submitted, acknowledgedAt, ackedCountAtSubmit } = await runTrial(random, trials);
    const operations = disk.operationCount;
    for (let point = 0; point < crashPointsPerTrial; point++) {
      const crashAt = operationsAtOpen + Math.floor(random() * (operations - operationsAtOpen + 1));
      const crashed = disk.crashImage(crashAt, random, { syncedOnly: random() < 0.5 });
      // Where each record lies in the image, read as the offline tool would (nothing written).
      const meta = await readMetadata(crashed, '/meta');
      const units = [...crashed.listFiles().keys()]
        .map((filePath) => ({ number: parseUnitFileName(filePath.slice(filePath.lastIndexOf('/') + 1)), path: filePath }))
        .filter((unit): unit is { number: number; path: string } => unit.number !== undefined && unit.number >= (meta?.unitFirst ?? 1))
        .sort((a, b) => a.number - b.number);
      const located = new Map<number, { path: string; position: number; bytes: number }>();
      await scanUnits({
        fileSystem: crashed,
        units,
        unitBytes: config.unitBytes,
        onRecord(header, unit, position) {
          located.set(header.lsn, { path: units.find((candidate) => candidate.number === unit)!.path, position, bytes: recordHeaderBytes + recordDataBytes(header.kind, header.lengthBytes) });
        },
      });
      const watermark = meta?.watermarkLsn ?? 0;
      const acknowledged = submitted.filter((_, i) => acknowledgedAt[i]! <= crashAt).length;
      const candidates = [...located.keys()].filter((lsn) => lsn > watermark && lsn <= acknowledged);
      if (candidates.length === 0) continue;
      const damaged = candidates[Math.floor(random() * candidates.length)]!;
      const place = located.get(damaged)!;
      const at = place.position + Math.floor(random() * place.bytes);
      const file = await crashed.open(place.path, 'write');
      const byte = Buffer.alloc(1);
      await file.pread(byte, at);
      byte[0]! ^= 1 << Math.floor(random() * 8);
      await file.pwrite(byte, at);
      await file.close();
      // Proof the journal can have: an acknowledged record after it that was submitted once the damaged
      // one was acknowledged (it claims a commit point at or past it), or the metadata's commit point.
      const provable = Math.max(meta?.lsnCommitted ?? 0, meta?.promotingToLsn ?? 0) >= damaged || submitted.some((_, i) => i + 1 > damaged && acknowledgedAt[i]! <= crashAt && ackedCountAtSubmit[i]! >= damaged);
      const context = `seed ${seed}, trial ${trials}, crash after operation ${crashAt}, damaged lsn ${damaged} at byte ${at - place.position} of ${place.bytes} (${place.path})`;
      const reopened = await openTestJournal({ ...config, fileSystem: crashed });
      const { journal } = reopened;
      const damage = journal.openReport.damage;
      assert.equal(journal.lsnDurable, damaged - 1, `${context}: the journal keeps exactly what precedes the damaged record`);
      for (let lsn = journal.watermarkLsn + 1; lsn < damaged; lsn++) {
        const entry = journal.index.get(lsn);
        assert.equal(entry.sequence, submitted[lsn - 1]!.sequence, context);
        assert.equal(entry.stream, submitted[lsn - 1]!.stream, context);
      }
      if (provable) {
        proven++;
        assert.ok(damage, `${context}: acknowledged records after the damage were cut silently (a later record or the metadata proves them acknowledged)`);
      } else if (damage) reportedBeyondProof++;
      else cutAsTail++;
      const kept = submitted.slice(0, damaged - 1);
      if (damage) {
        assert.equal(damage.lsnFirst, damaged, context);
        assert.ok(damage.lsnLast >= acknowledged, `${context}: the loss (to ${damage.lsnLast}) covers every acknowledged record (to ${acknowledged})`);
        assert.ok(journal.losses().some((loss) => loss.id === damage.id), `${context}: the loss is in the metadata`);
      }
      // Every checkpoint still listed recoverable has all its markers before the damage, and its view equals the model.
      for (const checkpoint of journal.checkpoints().filter((candidate) => candidate.recoverable)) {
        for (const [volume, bytes] of modelAtCheckpoint(config.volumes, kept, checkpoint.id)) {
          const view = await journal.openView({ volume, at: { checkpoint: checkpoint.id }, scratchBytesMax: 0 });
          assert.ok((await readVolume(view, bytes.length)).equals(bytes), `${context}: volume ${volume} at checkpoint ${checkpoint.id} differs from the model`);
          await view.close();
          views++;
        }
      }
      // A checkpoint with a marker at or past the damage is not recoverable.
      for (let i = damaged - 1; i < submitted.length; i++) {
        const id = submitted[i]!.checkpoint?.id;
        if (id !== undefined) assert.ok(!journal.checkpoints().some((candidate) => candidate.id === id && candidate.recoverable), `${context}: checkpoint ${id} has a marker at lsn ${i + 1}, past the damage, yet is listed recoverable`);
      }
      // Times: before the loss a view equals the model; from it on, a view is refused (never served short).
      const times = [...new Set(kept.slice(journal.watermarkLsn).map((record) => record.timeMs))];
      for (const timeMs of times.length === 0 ? [] : [times[Math.floor(random() * times.length)]!, times[times.length - 1]! + 1]) {
        const volume = [...config.volumes.keys()][Math.floor(random() * config.volumes.size)]!;
        if (damage && timeMs >= damage.timeMsFrom) {
          await assert.rejects(journal.openView({ volume, at: { timeMs }, scratchBytesMax: 0 }), /were lost|oldest recoverable point/, `${context}: a view at ${timeMs}, inside the loss from ${damage.timeMsFrom}`);
          continue;
        }
        if (!damage && timeMs > (kept[kept.length - 1]?.timeMs ?? 0)) continue;
        const bytes = modelAtTime(config.volumes, kept, timeMs).get(volume)!;
        const view = await journal.openView({ volume, at: { timeMs }, scratchBytesMax: 0 });
        assert.ok((await readVolume(view, bytes.length)).equals(bytes), `${context}: volume ${volume} at time ${timeMs} differs from the model`);
        await view.close();
        views++;
      }
      await closeTestJournal(reopened);
      // The loss outlives the next open, and nothing past the cut is taken for damage again.
      const again = await openTestJournal({ ...config, fileSystem: crashed });
      assert.equal(again.journal.openReport.damage, undefined, `${context}: damage reported twice`);
      assert.equal(again.journal.lsnDurable, damaged - 1, context);
      if (damage) assert.ok(again.journal.losses().some((loss) => loss.id === damage.id), `${context}: the loss is remembered`);
      await closeTestJournal(again);
      states++;
    }
    await closeTestJournal(opened);
  }
  console.log(
    `# journal crash damage: ${states} damaged crash states from ${trials} trials (${proven} provable and reported as damage, ${reportedBeyondProof} reported beyond the test's proof, ${cutAsTail} unprovable and cut as a torn tail; ${views} views checked) in ${Date.now() - started} ms`,
  );
});
