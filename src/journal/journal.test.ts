import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTempDir } from '../../test/helpers.js';
import { SimulatedDisk } from './sim-disk.js';
import { closeTestJournal, createReplicas, ManualClock, modelVolumes, openTestJournal, readVolume, settle, type TestJournalConfig } from './testing.js';
import type { AppendRecord } from './journal.js';
import { DatastoreFullError, DuplicateSequenceError, InvalidRecordError, JournalDamagedError, JournalFailedError, RecoveryPointUnavailableError, SequenceGapError } from './errors.js';
import { Journal, promotedCheckpointsListedMax, type JournalAlertCondition, type JournalEvent } from './journal.js';
import { JournalFileBackingStore } from './file-store.js';
import { nodeFileSystem } from './file-system.js';
import { JournalPool, type DatastoreConfig } from './pool.js';
import { readMetadata } from './metadata.js';
import { checkRecord, claimedCommitLsn, decodeHeader, encodeHeader, RecordKind } from './record.js';
import { indexBytesPerRecord, RecordIndex } from './record-index.js';

async function fixture(overrides: Partial<TestJournalConfig> = {}) {
  const disk = new SimulatedDisk();
  const clock = new ManualClock();
  const config: TestJournalConfig = { fileSystem: disk, clock, volumes: new Map([[1, 65536]]), unitBytes: 16384, historyMs: 1000, sizeLimitBytes: 1 << 20, ...overrides };
  await createReplicas(config);
  return { disk, clock, config, opened: await openTestJournal(config) };
}

const write = (stream: number, sequence: number, offset = 0, fill = sequence) => ({ kind: 'write' as const, stream, sequence, timeMs: 1, volume: 1, offset, data: Buffer.alloc(512, fill) });

test('encodeHeader() and decodeHeader() round-trip, and the CRC covers header and data', () => {
  const data = Buffer.from('hello journal');
  const header = { kind: RecordKind.write, unit: 7, generation: 3, lsn: 2 ** 40 + 5, sequence: 2 ** 33 + 1, timeMs: 1_700_000_000_123, offset: 2 ** 42, volume: 9, stream: 4, lengthBytes: data.length, uncommitted: 7 };
  const encoded = encodeHeader(header, data);
  assert.deepEqual(decodeHeader(encoded), header);
  assert.equal(claimedCommitLsn(header), 2 ** 40 - 2, 'the record claims every lsn up to 7 before it committed');
  assert.ok(checkRecord(encoded, data));
  const flipped = Buffer.from(data);
  flipped[3]! ^= 1;
  assert.ok(!checkRecord(encoded, flipped));
  encoded[20]! ^= 1;
  assert.ok(!checkRecord(encoded, data));
  assert.equal(decodeHeader(Buffer.alloc(64)), 'zero bytes (end of log)');
});

test('append() refuses a gap or a duplicate in a stream with a typed error, keeping each stream\'s order across interleaving', async () => {
  const { opened } = await fixture();
  const { journal } = opened;
  await journal.append([write(0, 1), write(1, 1), write(0, 2)]);
  await assert.rejects(journal.append([write(0, 4)]), (error: unknown) => error instanceof SequenceGapError && error.stream === 0 && error.expected === 3 && error.got === 4);
  await assert.rejects(journal.append([write(1, 1)]), (error: unknown) => error instanceof DuplicateSequenceError && error.stream === 1 && error.expected === 2 && error.got === 1);
  await assert.rejects(journal.append([write(1, 2), write(1, 2)]), DuplicateSequenceError);
  await assert.rejects(journal.append([{ ...write(1, 2), volume: 5 }]), InvalidRecordError);
  await assert.rejects(journal.append([write(1, 2, 65536 - 100)]), InvalidRecordError);
  // A refused batch leaves nothing behind: the stream goes on where it was.
  await journal.append([write(1, 2), write(0, 3)]);
  assert.deepEqual(journal.status().streams.map((stream) => [stream.stream, stream.sequenceLast]), [[0, 3], [1, 2]]);
  await closeTestJournal(opened);
});

test('concurrent batches share one sync per unit touched (group commit) and each is acknowledged after it', async () => {
  const { disk, opened } = await fixture();
  const { journal } = opened;
  const syncsBefore = disk.syncCount;
  const batches = Array.from({ length: 10 }, (_, i) => journal.append([write(0, i + 1)]));
  await Promise.all(batches);
  // The first batch is written alone; the nine queued behind its sync go in one group.
  assert.ok(disk.syncCount - syncsBefore <= 3, `syncs: ${disk.syncCount - syncsBefore}`);
  assert.equal(journal.lsnDurable, 10);
  await closeTestJournal(opened);
});

test('a failed sync fails the batch and the journal until it is reopened; acknowledged records survive', async () => {
  const { disk, config, opened } = await fixture();
  await opened.journal.append([write(0, 1)]);
  disk.failNextSync = true;
  await assert.rejects(opened.journal.append([write(0, 2)]), JournalFailedError);
  await assert.rejects(opened.journal.append([write(0, 3)]), JournalFailedError);
  const reopened = await openTestJournal({ ...config, fileSystem: disk.crashImage(disk.operationCount, Math.random, { syncedOnly: true }) });
  assert.equal(reopened.journal.lsnDurable, 1);
  await closeTestJournal(reopened);
});

test('a checkpoint is recoverable only when every stream\'s marker is durable, and not once promoted', async () => {
  const { clock, opened } = await fixture();
  const { journal } = opened;
  const checkpoint = { id: 'cp-1', kind: 'tagged', name: 'before upgrade', streams: [0, 1] };
  await journal.append([write(0, 1, 0, 0xaa), { kind: 'checkpoint', stream: 0, sequence: 2, timeMs: clock.timeMs, volume: 0, offset: 0, checkpoint }]);
  assert.equal(journal.checkpoints()[0]!.recoverable, false);
  await assert.rejects(journal.openView({ volume: 1, at: { checkpoint: 'cp-1' }, scratchBytesMax: 0 }), RecoveryPointUnavailableError);
  await journal.append([{ ...write(1, 1, 512, 0xbb), timeMs: clock.timeMs }, { kind: 'checkpoint', stream: 1, sequence: 2, timeMs: clock.timeMs, volume: 0, offset: 0, checkpoint }]);
  await journal.append([write(0, 3, 0, 0xcc)]);
  const [info] = journal.checkpoints();
  assert.deepEqual({ id: info!.id, kind: info!.kind, name: info!.name, recoverable: info!.recoverable }, { id: 'cp-1', kind: 'tagged', name: 'before upgrade', recoverable: true });
  const view = await journal.openView({ volume: 1, at: { checkpoint: 'cp-1' }, scratchBytesMax: 0 });
  const bytes = Buffer.alloc(1024);
  await view.read(bytes, 0);
  assert.ok(bytes.equals(Buffer.concat([Buffer.alloc(512, 0xaa), Buffer.alloc(512, 0xbb)])));
  await view.close();
  clock.timeMs += 10_000;
  await journal.tick();
  assert.equal(journal.checkpoints()[0]!.recoverable, false);
  await assert.rejects(journal.openView({ volume: 1, at: { timeMs: 0 }, scratchBytesMax: 0 }), RecoveryPointUnavailableError);
  await closeTestJournal(opened);
});

test('the index takes at most 48 bytes per record', () => {
  const index = new RecordIndex(1);
  const count = 1_000_000;
  for (let lsn = 1; lsn <= count; lsn++) index.add({ lsn, offset: lsn * 4096, lengthBytes: 4096, timeMs: lsn, sequence: lsn, stream: 0, volume: 1, kind: 1 }, 1, 0);
  const perRecord = index.allocatedBytes() / count;
  console.log(`# index: ${indexBytesPerRecord} bytes per record in the arrays, ${perRecord.toFixed(1)} allocated per record (sum of the arrays' byteLength) at ${count} records`);
  assert.ok(perRecord <= 48, `${perRecord} bytes per record`);
});

test('open keeps what precedes a damaged record that later ones prove acknowledged, records the loss, marks the checkpoints after it lost and refuses time views from it', async () => {
  const { disk, config, opened, clock } = await fixture({ unitBytes: 4096 });
  // 1 KiB records, about three a unit: five units of acknowledged records, a checkpoint in the fourth.
  for (let sequence = 1; sequence <= 15; sequence++) {
    clock.timeMs = 1000 + sequence;
    if (sequence === 10) await opened.journal.append([{ kind: 'checkpoint', stream: 0, sequence, timeMs: clock.timeMs, volume: 0, offset: 0, checkpoint: { id: 'cp-late', kind: 'tagged', name: 'before-upgrade', streams: [0] } }]);
    else await opened.journal.append([{ kind: 'write', stream: 0, sequence, timeMs: clock.timeMs, volume: 1, offset: 0, data: Buffer.alloc(1024, sequence) }]);
  }
  await closeTestJournal(opened);
  const unitPath = [...disk.listFiles().keys()].filter((name) => name.endsWith('.unit')).sort()[1]!;
  const file = await disk.open(unitPath, 'write');
  await file.pwrite(Buffer.from([0xff]), 64 + 10);
  const events: string[] = [];
  const reopened = await openTestJournal(config);
  const { journal } = reopened;
  const damage = journal.openReport.damage;
  assert.ok(damage, 'the loss is reported as damage, not as a torn tail');
  assert.equal(damage.unit, 2);
  assert.equal(damage.position, 0);
  assert.match(damage.reason, /checksum mismatch in record lsn 4/);
  assert.equal(damage.lsnFirst, 4);
  assert.equal(damage.lsnLast, 15);
  assert.deepEqual(damage.streams, [{ stream: 0, sequenceKept: 3, sequenceSeenMax: 15 }]);
  assert.equal(damage.timeMsFrom, 1003, 'points from the last kept record of the stream on are not images of the source');
  assert.deepEqual(damage.checkpoints.map((checkpoint) => checkpoint.id), ['cp-late']);
  assert.equal(journal.lsnDurable, 3, 'the log keeps what precedes the damage');
  const late = journal.checkpoints().find((checkpoint) => checkpoint.id === 'cp-late');
  assert.ok(late && !late.recoverable && /lost with journal records 4\.\.15/.test(late.lost ?? ''), JSON.stringify(late));
  await assert.rejects(journal.openView({ volume: 1, at: { checkpoint: 'cp-late' }, scratchBytesMax: 0 }), /lost with journal records 4\.\.15/);
  await assert.rejects(journal.openView({ volume: 1, at: { timeMs: 1010 }, scratchBytesMax: 0 }), /records 4\.\.15 were lost/);
  const early = await journal.openView({ volume: 1, at: { timeMs: 1002 }, scratchBytesMax: 0 });
  const bytes = Buffer.alloc(1024);
  await early.read(bytes, 0);
  assert.ok(bytes.equals(Buffer.alloc(1024, 2)), 'a point before the damage is served as it was');
  await early.close();
  // The stream goes on from what was kept; once healed, later points open again.
  journal.on((event) => events.push(event.type));
  clock.timeMs = 2000;
  await journal.append([{ kind: 'write', stream: 0, sequence: 4, timeMs: 2000, volume: 1, offset: 0, data: Buffer.alloc(1024, 0x44) }]);
  await journal.lossHealed(damage.id, 2000);
  const healed = await journal.openView({ volume: 1, at: { timeMs: 2000 }, scratchBytesMax: 0 });
  await healed.read(bytes, 0);
  assert.equal(bytes[0], 0x44);
  await healed.close();
  await closeTestJournal(reopened);
  // The loss is remembered across opens, and nothing past the cut is taken for damage again.
  const again = await openTestJournal(config);
  assert.equal(again.journal.openReport.damage, undefined);
  assert.deepEqual(again.journal.losses().map((loss) => [loss.id, loss.healedTimeMs]), [[damage.id, 2000]]);
  assert.equal(again.journal.lsnDurable, 4);
  await closeTestJournal(again);
});

test('a damaged record in the last group of a cleanly closed journal is damage (the close recorded the commit point), and a torn tail of a crash is cut', async () => {
  const { disk, config, opened } = await fixture({ unitBytes: 16384 });
  for (let sequence = 1; sequence <= 6; sequence++) await opened.journal.append([write(0, sequence)]);
  await closeTestJournal(opened);
  const unitPath = [...disk.listFiles().keys()].filter((name) => name.endsWith('.unit')).sort()[0]!;
  const file = await disk.open(unitPath, 'write');
  // Record 6 starts at 5 * (64 + 512): flip a byte of its data.
  await file.pwrite(Buffer.from([0x5a]), 5 * 576 + 64 + 3);
  const reopened = await openTestJournal(config);
  assert.equal(reopened.journal.openReport.damage?.lsnFirst, 6);
  assert.equal(reopened.journal.openReport.damage?.lsnLast, 6);
  await closeTestJournal(reopened);
});

test('append() refuses a sequence that is not an integer from 1', async () => {
  const { opened } = await fixture();
  for (const sequence of [Number.NaN, 1.5, 0, -1, undefined as unknown as number]) {
    await assert.rejects(opened.journal.append([write(0, sequence)]), InvalidRecordError, `sequence ${sequence}`);
  }
  await opened.journal.append([write(0, 1)]);
  await assert.rejects(opened.journal.append([write(0, 100)]), SequenceGapError);
  await closeTestJournal(opened);
});

test('a view opened in the same turn as tick() reads its own point in time, not a promoted later one', async () => {
  const { clock, opened } = await fixture({ historyMs: 7_500 });
  const { journal } = opened;
  const start = clock.timeMs;
  for (const [sequence, offsetMs, fill] of [[1, 1000, 0xaa], [2, 2000, 0xbb], [3, 3000, 0xcc]] as const) {
    await journal.append([{ ...write(0, sequence, 0, fill), timeMs: start + offsetMs }]);
  }
  clock.timeMs = start + 10_000;
  const viewOpening = journal.openView({ volume: 1, at: { timeMs: start + 1500 }, scratchBytesMax: 0 });
  const ticking = journal.tick();
  const view = await viewOpening;
  await ticking;
  const bytes = Buffer.alloc(512);
  await view.read(bytes, 0);
  assert.equal(bytes[0], 0xaa);
  await view.close();
  await closeTestJournal(opened);
});

test('append() refuses a batch over half a unit, whole, and takes one of exactly half a unit', async () => {
  const { opened } = await fixture();
  const { journal } = opened;
  const half = journal.unitBytes / 2;
  // Two records: headers of 64 bytes each, data filling the rest of half a unit, then one byte more.
  const batch = (extra: number) => [write(0, 1), { ...write(0, 2), data: Buffer.alloc(half - 2 * 64 - 512 + extra, 0xee) }];
  await assert.rejects(journal.append(batch(1)), (error: unknown) => error instanceof InvalidRecordError && /half a unit/.test(error.message));
  assert.equal(journal.status().streams.length, 0, 'nothing of the refused batch is queued');
  assert.deepEqual(await journal.append(batch(0)), { lsnFirst: 1, lsnLast: 2 });
  await closeTestJournal(opened);
});

test('the next unit (the spare) is taken in the background at open, and again whenever a unit becomes current', async () => {
  const { config, opened } = await fixture({ unitBytes: 4096 });
  await settle();
  const held = () => opened.pool.usage().journals['group1']!.units;
  assert.equal(held(), 2, 'open takes the current unit and the spare');
  // About three 1 KiB records a unit: the fourth goes into the spare, and the next spare is taken.
  for (let sequence = 1; sequence <= 4; sequence++) await opened.journal.append([{ ...write(0, sequence), data: Buffer.alloc(1024, sequence) }]);
  await settle();
  assert.equal(held(), 3, 'the spare became current and a new spare was taken');
  await closeTestJournal(opened);
  const reopened = await openTestJournal(config);
  await settle();
  assert.equal(reopened.pool.usage().journals['group1']!.units, 3, 'a reopened journal holds its two units and a spare');
  await closeTestJournal(reopened);
});

test('a commit evaluates the alerts at once, without waiting for tick()', async () => {
  const { opened } = await fixture({ sizeWarningBytes: 16384 - 1 });
  const events: JournalEvent[] = [];
  opened.journal.on((event) => events.push(event));
  await opened.journal.append([write(0, 1)]);
  assert.ok(events.some((event) => event.type === 'alert-raised' && event.alert.condition === 'size-warning'), 'size-warning raised by the commit');
  assert.deepEqual(opened.journal.status().alerts.map((alert) => alert.condition), ['size-warning']);
  await closeTestJournal(opened);
});

test('history alerts: a warning under 85 % of the configured history, an error under 75 %, both cleared once history is whole again', async () => {
  const historyMs = 100_000;
  const { clock, opened } = await fixture({ historyMs });
  const { journal } = opened;
  const events: JournalEvent[] = [];
  journal.on((event) => events.push(event));
  // The journal is far older than its history, so the whole configured history is expected.
  clock.timeMs += 10 * historyMs;
  const now = clock.timeMs;
  const agesMs = [86_000, 84_000, 76_000, 74_000];
  await journal.append(agesMs.map((ageMs, i) => ({ ...write(0, i + 1, i * 512), timeMs: now - ageMs })));
  const active = (): JournalAlertCondition[] => journal.status().alerts.map((alert) => alert.condition).sort();
  const expected: JournalAlertCondition[][] = [[], ['history-warning'], ['history-warning'], ['history-error']];
  for (let lsn = 1; lsn <= agesMs.length; lsn++) {
    // Promoting record lsn makes its time the oldest recoverable point (history of agesMs[lsn - 1]).
    await journal.promote(lsn, { forced: false });
    await journal.tick();
    assert.equal(journal.status().actualHistoryMs, agesMs[lsn - 1]);
    assert.deepEqual(active(), expected[lsn - 1], `history ${agesMs[lsn - 1]} ms of ${historyMs}`);
  }
  const raised = events.flatMap((event) => (event.type === 'alert-raised' ? [event.alert.condition] : []));
  const cleared = events.flatMap((event) => (event.type === 'alert-cleared' ? [event.condition] : []));
  assert.deepEqual(raised, ['history-warning', 'history-error']);
  assert.deepEqual(cleared, ['history-warning']);
  clock.timeMs += 30_000;
  await journal.tick();
  assert.deepEqual(active(), []);
  assert.deepEqual(events.at(-1), { type: 'alert-cleared', condition: 'history-error' });
  await closeTestJournal(opened);
});

test('once promote() resolves its watermark is durable: a crash then does not redo the step', async () => {
  const { disk, config, opened } = await fixture();
  await opened.journal.append([write(0, 1), write(0, 2, 512), write(0, 3, 1024)]);
  await opened.journal.promote(2, { forced: false });
  // No unit is released here (all three records share the current unit), so only the step's own metadata write can carry the watermark.
  const image = disk.crashImage(disk.operationCount, Math.random, { syncedOnly: true });
  const meta = (await readMetadata(image, '/meta'))!;
  assert.deepEqual({ watermarkLsn: meta.watermarkLsn, promotingToLsn: meta.promotingToLsn }, { watermarkLsn: 2, promotingToLsn: 0 });
  const reopened = await openTestJournal({ ...config, fileSystem: image });
  assert.equal(reopened.journal.openReport.promotionResumed, false);
  assert.equal(reopened.journal.watermarkLsn, 2);
  await closeTestJournal(reopened);
  await closeTestJournal(opened);
});

test('promotion reads runs of records across units and skips a record a later one of its step replaces exactly; the replica equals the model', async () => {
  const { opened, config } = await fixture({ sizeLimitBytes: 1 << 22 });
  const { journal, replicas } = opened;
  const at = (sequence: number, offset: number, lengthBytes = 512) => ({ stream: 0, sequence, timeMs: 1, volume: 1, offset, lengthBytes });
  const records: AppendRecord[] = [
    write(0, 1, 0, 1),
    write(0, 2, 512, 2),
    { ...at(3, 0), kind: 'zero' }, // replaces 1
    write(0, 4, 0, 4), // replaces 3
    { ...write(0, 5, 256, 5) }, // overlaps 4 and 2 partly: applied
    { ...at(6, 512), kind: 'trim' }, // replaces 2
    write(0, 7, 512, 7), // replaces 6
  ];
  // Enough further records to fill several 16 KiB units (28 records of 576 bytes each).
  for (let sequence = 8; sequence <= 100; sequence++) records.push(write(0, sequence, 512 * (2 + (sequence % 100)), sequence));
  for (const record of records) await journal.append([record]);
  const replica = replicas.get(1)!;
  let writesApplied = 0;
  const writeOriginal = replica.write.bind(replica);
  replica.write = (data: Buffer, offset: number) => {
    writesApplied++;
    return writeOriginal(data, offset);
  };
  await journal.promote(records.length, { forced: false });
  const writes = records.filter((record) => record.kind === 'write').length;
  assert.equal(writesApplied, writes - 2, 'writes 1 and 2 were replaced within the step');
  assert.deepEqual(await readVolume(replica, 65536), modelVolumes(config.volumes, records).get(1));
  await closeTestJournal(opened);
});

test('checkpoints promoted past stay listed (not recoverable) up to a limit; older ones are forgotten', async () => {
  const { clock, opened } = await fixture({ sizeLimitBytes: 1 << 22 });
  const { journal } = opened;
  let sequence = 0;
  const checkpointAt = (id: string) => ({ kind: 'checkpoint' as const, stream: 0, sequence: ++sequence, timeMs: clock.timeMs, volume: 0, offset: 0, checkpoint: { id, kind: 'crash-consistent', streams: [0] } });
  const total = promotedCheckpointsListedMax + 36;
  for (let i = 0; i < total; i++) await journal.append([{ ...write(0, ++sequence, 512 * (i % 64)), timeMs: clock.timeMs }, checkpointAt(`cp-${i}`)]);
  clock.timeMs += 10_000;
  await journal.tick();
  const listed = journal.checkpoints();
  assert.equal(listed.length, promotedCheckpointsListedMax);
  assert.deepEqual(listed.map((checkpoint) => checkpoint.id), Array.from({ length: promotedCheckpointsListedMax }, (_, i) => `cp-${total - promotedCheckpointsListedMax + i}`));
  assert.ok(listed.every((checkpoint) => !checkpoint.recoverable));
  await journal.append([{ ...write(0, ++sequence, 0), timeMs: clock.timeMs }, checkpointAt('cp-new')]);
  const after = journal.checkpoints();
  assert.equal(after.length, promotedCheckpointsListedMax + 1);
  assert.deepEqual({ id: after[after.length - 1]!.id, recoverable: after[after.length - 1]!.recoverable }, { id: 'cp-new', recoverable: true });
  await closeTestJournal(opened);
});

test('a missing datastore directory is skipped and not created (it may be an unmounted disk)', async () => {
  const root = makeTempDir('lifeline-journal-pool-');
  try {
    const missing = path.join(root, 'unmounted');
    const present = path.join(root, 'present');
    fs.mkdirSync(present);
    const replica = await JournalFileBackingStore.open(nodeFileSystem, path.join(root, 'volume-1.img'), { sizeBytes: 65536, create: true });
    const open = (datastores: DatastoreConfig[]): Promise<Journal> =>
      Journal.open({
        name: 'group1',
        directory: path.join(root, 'meta'),
        fileSystem: nodeFileSystem,
        pool: new JournalPool(nodeFileSystem, datastores),
        replicas: new Map([[1, replica]]),
        clock: new ManualClock(),
        unitBytes: 16384,
        historyMs: 1000,
        sizeLimitBytes: 1 << 20,
        sizeWarningBytes: 1 << 20,
      });
    // Only the missing datastore: no unit can be taken, and the directory is not made.
    await assert.rejects(open([{ path: missing, capacityBytes: 1 << 30 }]), DatastoreFullError);
    assert.equal(fs.existsSync(missing), false, 'the missing datastore directory was not created');
    // With another datastore (listed second, with less room), the units go there.
    const journal = await open([{ path: missing, capacityBytes: 1 << 30 }, { path: present, capacityBytes: 1 << 20 }]);
    await journal.append([write(0, 1)]);
    // Closing waits for the spare, which is taken in the background.
    await journal.close();
    await replica.close();
    assert.equal(fs.existsSync(missing), false, 'the missing datastore directory was not created');
    assert.equal(fs.readdirSync(path.join(present, 'group1')).filter((name) => name.endsWith('.unit')).length, 2, 'current unit and spare');
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
});

test('after a failed sync nothing more is written: appends and promotion are refused until the journal is reopened', async () => {
  const { disk, config, opened } = await fixture();
  const { journal } = opened;
  await journal.append([write(0, 1)]);
  disk.failNextSync = true;
  await assert.rejects(journal.append([write(0, 2)]), JournalFailedError);
  await settle();
  const operations = disk.operationCount;
  await assert.rejects(journal.append([write(0, 3)]), JournalFailedError);
  await assert.rejects(journal.append([write(0, 2)]), JournalFailedError);
  await assert.rejects(journal.promote(1, { forced: false }), JournalFailedError);
  await settle();
  assert.equal(disk.operationCount, operations, 'a failed journal writes nothing');
  const reopened = await openTestJournal({ ...config, fileSystem: disk.crashImage(disk.operationCount, Math.random, { syncedOnly: true }) });
  assert.equal(reopened.journal.lsnDurable, 1);
  await reopened.journal.append([write(0, 2)]);
  await closeTestJournal(reopened);
});

test('a view at a checkpoint of a new epoch includes what an earlier epoch of the same source wrote (a stream the marker does not name counts up to the marker)', async () => {
  const { opened } = await fixture();
  const { journal } = opened;
  // Stream 1 is an earlier epoch; it wrote block 0 and ended. Stream 2, its successor, wrote block 1 and took a checkpoint naming only itself.
  await journal.append([write(1, 1, 0, 0x11)]);
  await journal.append([write(2, 1, 512, 0x22), { kind: 'checkpoint', stream: 2, sequence: 2, timeMs: 1, volume: 0, offset: 0, checkpoint: { id: 'after-restart', kind: 'tagged', streams: [2] } }]);
  await journal.append([write(2, 3, 0, 0x33)]);
  const view = await journal.openView({ volume: 1, at: { checkpoint: 'after-restart' }, scratchBytesMax: 0 });
  const bytes = Buffer.alloc(1024);
  await view.read(bytes, 0);
  await view.close();
  assert.ok(bytes.subarray(0, 512).equals(Buffer.alloc(512, 0x11)), 'the earlier epoch\'s write is in the view');
  assert.ok(bytes.subarray(512).equals(Buffer.alloc(512, 0x22)));
  await closeTestJournal(opened);
});

test('damage in a record already promoted (its unit still holds newer ones) costs nothing: open goes on from the first record not promoted', async () => {
  const { disk, config, opened, clock } = await fixture({ unitBytes: 16384, historyMs: 1000 });
  const start = clock.timeMs;
  for (let sequence = 1; sequence <= 6; sequence++) await opened.journal.append([{ ...write(0, sequence), timeMs: start + sequence * 100 }]);
  clock.timeMs = start + 1350;
  await opened.journal.tick();
  assert.equal(opened.journal.watermarkLsn, 3, 'records 1..3 aged out and were promoted');
  await closeTestJournal(opened);
  const unitPath = [...disk.listFiles().keys()].filter((name) => name.endsWith('.unit')).sort()[0]!;
  const file = await disk.open(unitPath, 'write');
  await file.pwrite(Buffer.from([0xee]), 576 + 100);
  const reopened = await openTestJournal(config);
  const { journal } = reopened;
  assert.equal(journal.openReport.damage, undefined);
  assert.deepEqual(journal.openReport.promotedDamage, { unit: 1, position: 576, reason: 'checksum mismatch in record lsn 2' });
  assert.equal(journal.lsnDurable, 6, 'nothing after the promoted damage is cut');
  const view = await journal.openView({ volume: 1, at: { timeMs: start + 600 }, scratchBytesMax: 0 });
  const bytes = Buffer.alloc(512);
  await view.read(bytes, 0);
  await view.close();
  assert.ok(bytes.equals(Buffer.alloc(512, 6)));
  await closeTestJournal(reopened);
});
