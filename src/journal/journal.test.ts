import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SimulatedDisk } from './sim-disk.js';
import { closeTestJournal, createReplicas, ManualClock, openTestJournal, type TestJournalConfig } from './testing.js';
import { DuplicateSequenceError, InvalidRecordError, JournalDamagedError, JournalFailedError, RecoveryPointUnavailableError, SequenceGapError } from './errors.js';
import { checkRecord, decodeHeader, encodeHeader, RecordKind } from './record.js';
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
  const header = { kind: RecordKind.write, unit: 7, generation: 3, lsn: 2 ** 40 + 5, sequence: 2 ** 33 + 1, timeMs: 1_700_000_000_123, offset: 2 ** 42, volume: 9, stream: 4, lengthBytes: data.length };
  const encoded = encodeHeader(header, data);
  assert.deepEqual(decodeHeader(encoded), header);
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

test('open refuses a journal whose damaged record is followed by acknowledged ones, instead of cutting them off', async () => {
  const { disk, config, opened } = await fixture({ unitBytes: 4096 });
  // 1 KiB records, about three a unit: five units of acknowledged records.
  for (let sequence = 1; sequence <= 15; sequence++) {
    await opened.journal.append([{ kind: 'write', stream: 0, sequence, timeMs: 1, volume: 1, offset: 0, data: Buffer.alloc(1024, sequence) }]);
  }
  await closeTestJournal(opened);
  const unitPath = [...disk.listFiles().keys()].filter((name) => name.endsWith('.unit')).sort()[1]!;
  const file = await disk.open(unitPath, 'write');
  await file.pwrite(Buffer.from([0xff]), 64 + 10);
  await assert.rejects(openTestJournal(config), (error: unknown) => {
    assert.ok(error instanceof JournalDamagedError);
    assert.match(error.message, /unit 2 at offset 0 is damaged \(checksum mismatch.*\) but unit \d+ holds later records/);
    return true;
  });
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
