/**
 * Initial sync of a volume whose blocks are allocated but hold zeroes (a raw image preallocated
 * with `qemu-img create -o preallocation=full`, or one a guest zeroed): the zero blocks travel as
 * zero entries, so the wire, the target's journal and its replica carry only the data blocks,
 * and the replica still ends byte-identical to the source. The same for a guest's WRITE of zeroes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import { makeTempDir, prng, run, systemPython, testSeed } from '../../test/helpers.js';
import { guestZeroRunBytesMin, holdsZeroRun, syncZeroBlockBytes, zeroAndDataRuns, type SourceGroupStatus } from './source-group.js';
import type { TargetGroupStatus } from './target-group.js';
import { filesEqual, makeTwoSites, MiB, startSites, waitFor } from './testing.js';

test('zeroAndDataRuns() splits a buffer into runs of whole zero blocks and runs of the rest, in order', () => {
  const block = syncZeroBlockBytes;
  const data = Buffer.alloc(6 * block + 100);
  data[block + 7] = 1; // block 1 has data
  data[4 * block] = 2; // block 4 has data
  data[6 * block + 99] = 0; // a short last block of zeroes still counts as data
  assert.deepEqual(zeroAndDataRuns(data), [
    { at: 0, lengthBytes: block, zero: true },
    { at: block, lengthBytes: block, zero: false },
    { at: 2 * block, lengthBytes: 2 * block, zero: true },
    { at: 4 * block, lengthBytes: block, zero: false },
    { at: 5 * block, lengthBytes: block, zero: true },
    { at: 6 * block, lengthBytes: 100, zero: false },
  ]);
  assert.deepEqual(zeroAndDataRuns(Buffer.alloc(0)), []);
  // Zero runs shorter than a minimum go with the data around them, unless they are all there is.
  assert.deepEqual(zeroAndDataRuns(data, 2 * block), [
    { at: 0, lengthBytes: 2 * block, zero: false },
    { at: 2 * block, lengthBytes: 2 * block, zero: true },
    { at: 4 * block, lengthBytes: 2 * block + 100, zero: false },
  ]);
  assert.deepEqual(zeroAndDataRuns(Buffer.alloc(block), 64 * block), [{ at: 0, lengthBytes: block, zero: true }]);
});

test('holdsZeroRun() finds whole blocks of zeroes, also across the chunks a socket delivered; only whole blocks count, and only runs as long as asked or the whole write', () => {
  const block = syncZeroBlockBytes;
  const data = Buffer.alloc(4 * block, 0xa5);
  assert.equal(holdsZeroRun(data), false);
  // Block 2 zero but for its last byte, then all zero.
  data.fill(0, 2 * block, 3 * block - 1);
  const chunked = (buffer: Buffer): Buffer[] => [buffer.subarray(0, 2 * block + 3), buffer.subarray(2 * block + 3, 2 * block + 1000), ...[...buffer.subarray(2 * block + 1000, 2 * block + 1010)].map((byte) => Buffer.from([byte])), buffer.subarray(2 * block + 1010)];
  assert.equal(holdsZeroRun(data), false);
  assert.equal(holdsZeroRun(chunked(data)), false);
  data[3 * block - 1] = 0;
  assert.equal(holdsZeroRun(data), true);
  assert.equal(holdsZeroRun(chunked(data)), true);
  // Zero in its middle only: no.
  data.fill(0xa5, 2 * block, 2 * block + 8);
  assert.equal(holdsZeroRun(chunked(data)), false);
  // Zeroes not on a block boundary of the write, and a short tail of zeroes, are no whole block.
  const offset = Buffer.concat([Buffer.alloc(100, 1), Buffer.alloc(block), Buffer.alloc(100, 1)]);
  assert.equal(holdsZeroRun(offset), false);
  assert.equal(holdsZeroRun(Buffer.concat([Buffer.alloc(block, 1), Buffer.alloc(block - 1)])), false);
  assert.equal(holdsZeroRun(Buffer.alloc(0)), false);
  assert.equal(holdsZeroRun([Buffer.alloc(block / 2), Buffer.alloc(block / 2)]), true);
  // With a minimum run: two zero blocks apart are not a run of two, two together are, and a write of zeroes alone always is.
  const apart = Buffer.alloc(4 * block, 0xa5);
  apart.fill(0, 0, block);
  apart.fill(0, 2 * block, 3 * block);
  assert.equal(holdsZeroRun(apart, 2 * block), false);
  apart.fill(0, 3 * block, 4 * block);
  assert.equal(holdsZeroRun([apart.subarray(0, 5), apart.subarray(5)], 2 * block), true);
  assert.equal(holdsZeroRun([Buffer.alloc(block), Buffer.alloc(block)], 64 * block), true);
  assert.equal(holdsZeroRun(Buffer.concat([Buffer.alloc(2 * block), Buffer.alloc(1, 1)]), 64 * block), false);
});

test('an initial sync ships the zero blocks of an allocated volume as zero entries and only its data blocks as writes', async (t) => {
  const seed = testSeed('initial-sync-zero-blocks');
  const random = prng(seed);
  const dir = makeTempDir('lifeline-initial-sync-');
  const volumeBytes = 32 * MiB;
  const sites = await makeTwoSites(dir, { volumeBytes, historyMs: 500 });
  // Every block allocated (written), almost all of them zeroes; 200 scattered 4 KiB blocks and one 1 MiB stretch of data.
  const volume = Buffer.alloc(volumeBytes);
  const dataBlocks = new Set<number>();
  while (dataBlocks.size < 200) dataBlocks.add(Math.floor(random() * (volumeBytes / syncZeroBlockBytes)));
  for (const block of dataBlocks) crypto.randomFillSync(volume, block * syncZeroBlockBytes, syncZeroBlockBytes);
  crypto.randomFillSync(volume, 20 * MiB, MiB);
  fs.writeFileSync(sites.sourceVolumePath, volume);
  const dataBytesMax = dataBlocks.size * syncZeroBlockBytes + MiB;

  const { source, target } = await startSites(t, sites);
  let last: SourceGroupStatus | undefined;
  const status = await waitFor('the initial sync to finish and drain', 60_000, async () => {
    last = await source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
    return last.sync.state === 'in-sync' && last.queue.queuedEntries === 0 && last.rpoMs === 0 ? last : undefined;
  }).catch((error: Error) => {
    throw new Error(`${error.message}\nstatus: ${JSON.stringify(last)}\nsource log: ${source.logs().slice(-4000)}`);
  });
  // Raw bytes: the data blocks plus a 32-byte header per entry; nothing near the 32 MiB of the volume.
  assert.ok(status.shipper.rawBytesSent >= dataBytesMax - MiB, `shipped ${status.shipper.rawBytesSent} raw bytes, less than the data`);
  assert.ok(status.shipper.rawBytesSent < dataBytesMax + 256 * 1024, `shipped ${status.shipper.rawBytesSent} raw bytes for at most ${dataBytesMax} bytes of data in a ${volumeBytes}-byte volume`);
  await waitFor('the replica to equal the source', 60_000, async () => {
    const targetStatus = await target.api<TargetGroupStatus>('GET', '/v1/groups/pg1');
    return targetStatus.journal.records === 0 && filesEqual(sites.replicaPath, sites.sourceVolumePath) ? true : undefined;
  }, 250);

  // A guest's WRITEs of zeroes (not WRITE_ZEROES): 8 MiB in one request, and 512 KiB ones beside
  // 512 KiB of data, go as zero entries; only the data is shipped as data. Within one write of
  // 256 KiB, a long zero run goes as a zero entry and a short one with the data around it.
  const before = status.shipper.rawBytesSent;
  await run('qemu-io', ['-f', 'raw', `${source.nbd}/disk0`, '-c', `write -P 0 0 ${8 * MiB}`, '-c', `write -P 0 ${24 * MiB} ${MiB / 2}`, '-c', `write -P 0x5a ${25 * MiB} ${MiB / 2}`, '-c', `write -P 0 ${26 * MiB} ${MiB / 2}`]);
  const shortZeroBytes = guestZeroRunBytesMin / 4;
  const mixedWrite = [
    'import nbd, sys',
    'h = nbd.NBD()',
    'h.connect_uri(sys.argv[1])',
    `h.pwrite(bytes(${2 * guestZeroRunBytesMin}) + b"\\x5a" * ${guestZeroRunBytesMin} + bytes(${shortZeroBytes}) + b"\\x5a" * ${guestZeroRunBytesMin - shortZeroBytes}, ${28 * MiB})`,
    'h.flush()',
    'h.shutdown()',
  ].join('\n');
  await run(systemPython, ['-c', mixedWrite, `${source.nbd}/disk0`]);
  const dataShipped = MiB / 2 + 2 * guestZeroRunBytesMin;
  const afterWrites = await waitFor('the guest writes to drain', 60_000, async () => {
    last = await source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
    return last.queue.queuedEntries === 0 && last.rpoMs === 0 ? last : undefined;
  });
  const shipped = afterWrites.shipper.rawBytesSent - before;
  assert.ok(shipped >= dataShipped && shipped < dataShipped + 64 * 1024, `${dataShipped} bytes of data and short zero runs to ship as data: ${shipped} raw bytes shipped`);
  await waitFor('the replica to equal the source after the zero writes', 60_000, async () => {
    const targetStatus = await target.api<TargetGroupStatus>('GET', '/v1/groups/pg1');
    return targetStatus.journal.records === 0 && filesEqual(sites.replicaPath, sites.sourceVolumePath) ? true : undefined;
  }, 250);
});

test('the initial sync of a sparse volume reports the rate of what it read, not of the holes it skipped, and once in sync no reason of the sync that ended', async (t) => {
  const dir = makeTempDir('lifeline-initial-sync-sparse-');
  const volumeBytes = 256 * MiB;
  const dataBytes = 4 * MiB;
  const rateLimitBytesPerSecond = MiB;
  // A queue of 1 MiB without spill: the sync reads at most half of it ahead of what the 1 MiB/s limit ships.
  const sites = await makeTwoSites(dir, { volumeBytes, historyMs: 500, memoryBytesMax: MiB, spillBytesMax: 0, rateLimitBytesPerSecond, codec: 'none' });
  fs.writeFileSync(sites.sourceVolumePath, Buffer.alloc(0));
  fs.truncateSync(sites.sourceVolumePath, volumeBytes);
  const fd = fs.openSync(sites.sourceVolumePath, 'r+');
  fs.writeSync(fd, crypto.randomBytes(dataBytes), 0, dataBytes, 128 * MiB);
  fs.closeSync(fd);

  const { source } = await startSites(t, sites);
  const running = await source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
  assert.equal(running.sync.state, 'initial-sync');
  assert.equal(running.sync.reason, 'the group has not completed an initial sync');
  let last: SourceGroupStatus | undefined;
  const status = await waitFor('the initial sync to finish and drain', 120_000, async () => {
    last = await source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
    return last.sync.state === 'in-sync' && last.queue.queuedEntries === 0 && last.rpoMs === 0 ? last : undefined;
  }).catch((error: Error) => {
    throw new Error(`${error.message}\nstatus: ${JSON.stringify(last)}\nsource log: ${source.logs().slice(-4000)}`);
  });
  const sync = status.sync;
  console.log(`# sparse initial sync: ${sync.bytesRead} bytes read of ${sync.bytesDone} covered, ${sync.rateBytesPerSecond} bytes/s read, started ${sync.startedMs}, ended ${sync.last?.endedMs}`);
  assert.equal(sync.reason, undefined, `in sync, no reason of the sync that ended: ${JSON.stringify(sync)}`);
  assert.deepEqual([sync.last?.state, sync.last?.reason], ['initial-sync', 'the group has not completed an initial sync'], JSON.stringify(sync));
  assert.equal(sync.bytesDone, volumeBytes);
  // Only the data was read; the holes went as zero entries.
  assert.ok(sync.bytesRead! >= dataBytes && sync.bytesRead! <= dataBytes + MiB, `read ${sync.bytesRead} bytes of a volume with ${dataBytes} of data: ${JSON.stringify(sync)}`);
  // The sync reads at most about 768 KiB (half the queue and a piece) ahead of what the target
  // acknowledged, which leaves at 1 MiB/s: reading the last data takes over 2 s, so the rate of what
  // was read is under 2 MiB/s (1.2 MiB/s measured). Counting the holes it covered gave 77 MB/s. A
  // slower machine only lowers the rate.
  assert.ok(sync.rateBytesPerSecond > 0 && sync.rateBytesPerSecond <= 3 * rateLimitBytesPerSecond, `sync rate ${sync.rateBytesPerSecond} bytes/s for ${sync.bytesRead} bytes read under a limit of ${rateLimitBytesPerSecond}/s: ${JSON.stringify(sync)}`);
});
