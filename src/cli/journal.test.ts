import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { lifelineBin, makeTempDir, run } from '../../test/helpers.js';
import { FileBackingStore } from '../tap/backing-store.js';
import { Journal } from '../journal/journal.js';
import { JournalPool } from '../journal/pool.js';
import { nodeFileSystem } from '../journal/file-system.js';

/** Opens (or reopens) the test journal 'group1' in `dir`, with one replica. */
function openJournalAt(dir: string, replica: FileBackingStore, unitBytes: number): Promise<Journal> {
  return Journal.open({
    name: 'group1',
    directory: path.join(dir, 'meta'),
    fileSystem: nodeFileSystem,
    pool: new JournalPool(nodeFileSystem, [{ path: path.join(dir, 'datastore'), capacityBytes: 1 << 30 }]),
    replicas: new Map([[1, replica]]),
    unitBytes,
    historyMs: 3_600_000,
    sizeLimitBytes: 1 << 24,
    sizeWarningBytes: 1 << 23,
  });
}

test('journal inspect lists units, streams and checkpoints; verify passes a sound journal and names the unit and offset of damage', async () => {
  const dir = makeTempDir('lifeline-journal-cli-');
  try {
    fs.mkdirSync(path.join(dir, 'datastore'));
    const replica = FileBackingStore.open({ path: path.join(dir, 'replica.img'), readOnly: false, createSizeBytes: 1 << 20 });
    const journal = await openJournalAt(dir, replica, 65536);
    let timeMs = Date.now();
    for (let sequence = 1; sequence <= 40; sequence++) {
      await journal.append([
        { kind: 'write', stream: 0, sequence, timeMs: timeMs++, volume: 1, offset: sequence * 4096, data: Buffer.alloc(4096, sequence) },
        { kind: 'zero', stream: 1, sequence, timeMs: timeMs++, volume: 1, offset: 0, lengthBytes: 512 },
      ]);
    }
    const checkpoint = { id: 'cp-1', kind: 'tagged', name: 'nightly', streams: [0, 1] };
    await journal.append([
      { kind: 'checkpoint', stream: 0, sequence: 41, timeMs, volume: 0, offset: 0, checkpoint },
      { kind: 'checkpoint', stream: 1, sequence: 41, timeMs, volume: 0, offset: 0, checkpoint },
    ]);
    await journal.close();
    await replica.close();
    const metaDir = path.join(dir, 'meta');
    const inspect = await run(lifelineBin, ['journal', 'inspect', metaDir], { timeoutMs: 30_000 });
    assert.match(inspect.stdout, /stream 0: sequences 1\.\.41 \(41 records\)/);
    assert.match(inspect.stdout, /stream 1: sequences 1\.\.41/);
    assert.match(inspect.stdout, /cp-1 {2}tagged 'nightly' .* complete/);
    assert.match(inspect.stdout, /units \(\d+\):/);
    const json = JSON.parse((await run(lifelineBin, ['journal', 'inspect', '--json', metaDir], { timeoutMs: 30_000 })).stdout);
    assert.equal(json.lsnLast, 82);
    const verify = await run(lifelineBin, ['journal', 'verify', metaDir], { timeoutMs: 30_000 });
    assert.match(verify.stdout, /^ok: 82 records in \d+ units verified/);
    // Flip one byte in the data of a record in the first unit.
    const unitPath = json.units[0].path as string;
    const bytes = fs.readFileSync(unitPath);
    const recordBytes = 64 + 4096 + 64;
    bytes[5 * recordBytes + 64 + 100]! ^= 0xff;
    fs.writeFileSync(unitPath, bytes);
    const damaged = await run(lifelineBin, ['journal', 'verify', metaDir], { timeoutMs: 30_000, allowFailure: true });
    assert.equal(damaged.code, 1);
    const place = `unit ${json.units[0].unit} at offset ${5 * recordBytes}: checksum mismatch in record lsn 11`;
    assert.match(damaged.stderr, new RegExp(`damaged record: the log ended in ${place}.*records 11\\.\\.82 were acknowledged`));
    // inspect exits non-zero on damage too, naming the same record.
    const inspectDamaged = await run(lifelineBin, ['journal', 'inspect', metaDir], { timeoutMs: 30_000, allowFailure: true });
    assert.equal(inspectDamaged.code, 1);
    assert.match(inspectDamaged.stderr, new RegExp(place));
    // A bit flip that makes a record's lsn look older (a stale leftover) is damage too, not a clean end:
    // verify must say so, and open must record the loss rather than cut acknowledged records silently.
    bytes[5 * recordBytes + 64 + 100]! ^= 0xff;
    const lsnAt = 5 * recordBytes + 16;
    assert.equal(bytes.readUInt32LE(lsnAt), 11);
    bytes[lsnAt]! ^= 0x08;
    fs.writeFileSync(unitPath, bytes);
    const lsnFlip = await run(lifelineBin, ['journal', 'verify', metaDir], { timeoutMs: 30_000, allowFailure: true });
    assert.equal(lsnFlip.code, 1, lsnFlip.stdout);
    assert.match(lsnFlip.stderr, new RegExp(`unit ${json.units[0].unit} at offset ${5 * recordBytes}`));
    const reopenReplica = FileBackingStore.open({ path: path.join(dir, 'replica.img'), readOnly: false });
    try {
      const reopened = await openJournalAt(dir, reopenReplica, 65536);
      const damage = reopened.openReport.damage;
      await reopened.close();
      assert.ok(damage, 'open reports damage, not a torn tail');
      // The journal's open names the same first damaged record as verify.
      assert.match(lsnFlip.stderr, new RegExp(`the log ended in unit ${damage.unit} at offset ${damage.position}: ${damage.reason.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`));
      assert.deepEqual([damage.lsnFirst, damage.lsnLast], [11, 82]);
      const after = await run(lifelineBin, ['journal', 'inspect', metaDir], { timeoutMs: 30_000 });
      assert.match(after.stdout, /earlier damage .*records 11\.\.82 cut on open/);
    } finally {
      await reopenReplica.close();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('after a torn tail is cut and a shorter record written over it, journal verify finds a sound journal', async () => {
  const dir = makeTempDir('lifeline-journal-cut-');
  const record = (sequence: number, lengthBytes: number) => ({ kind: 'write' as const, stream: 0, sequence, timeMs: sequence, volume: 1, offset: 0, data: Buffer.alloc(lengthBytes, sequence) });
  try {
    fs.mkdirSync(path.join(dir, 'datastore'));
    const replica = FileBackingStore.open({ path: path.join(dir, 'replica.img'), readOnly: false, createSizeBytes: 1 << 20 });
    let journal = await openJournalAt(dir, replica, 16384);
    for (let sequence = 1; sequence <= 5; sequence++) await journal.append([record(sequence, 1024)]);
    await journal.close();
    // Tear the last record: the second half of its data never reached the disk.
    const unitPath = path.join(dir, 'datastore', 'group1', '000000000001.unit');
    const fd = fs.openSync(unitPath, 'r+');
    fs.writeSync(fd, Buffer.alloc(512), 0, 512, 4 * (64 + 1024) + 64 + 512);
    fs.closeSync(fd);
    journal = await openJournalAt(dir, replica, 16384);
    assert.equal(journal.openReport.cut?.position, 4 * (64 + 1024));
    assert.equal(journal.lsnDurable, 4);
    await journal.append([record(5, 100)]);
    await journal.close();
    await replica.close();
    const verify = await run(lifelineBin, ['journal', 'verify', path.join(dir, 'meta')], { timeoutMs: 30_000, allowFailure: true });
    assert.equal(verify.code, 0, verify.stderr);
    assert.match(verify.stdout, /^ok: 5 records/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
