/**
 * Delta sync by block checksums, between two `lifeline appliance` processes on loopback:
 *  - after a source crash whose dirty-region log is damaged (the regions the target lacks are
 *    unknown), the restarted source compares every block with the target and ships exactly the
 *    blocks that differ;
 *  - on demand through the control API, while fio writes, after the target's replica was damaged
 *    behind the journal's back: the damaged blocks are shipped again, nothing else.
 * In both, the replica ends byte-identical to the source.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTempDir, prng, run, testSeed, writeRandomFile } from '../../test/helpers.js';
import { dirtyLogFileName } from '../replication/dirty-log.js';
import { deltaBlockBytes, type SourceGroupStatus } from './source-group.js';
import type { TargetGroupStatus } from './target-group.js';
import { filesEqual, makeTwoSites, MiB, startAppliance, waitFor, type RunningAppliance, type TwoSites } from './testing.js';

const volumeBytes = 32 * MiB;
const blocks = volumeBytes / deltaBlockBytes;

interface Pair {
  sites: TwoSites;
  source: RunningAppliance;
  target: RunningAppliance;
  last: { source?: SourceGroupStatus; target?: TargetGroupStatus };
}

async function startPair(t: { after(fn: () => Promise<unknown>): void }, name: string): Promise<Pair & { seed: number; dir: string }> {
  const seed = testSeed(name);
  const dir = makeTempDir(`lifeline-${name}-`);
  const sites = await makeTwoSites(dir, { volumeBytes, historyMs: 1000 });
  // Data before protection: the initial sync carries it, and delta sync later compares it.
  writeRandomFile(sites.sourceVolumePath, volumeBytes, seed);
  const pair = { sites, seed, dir, last: {} } as Pair & { seed: number; dir: string };
  pair.target = await startAppliance({ dataDir: sites.targetDataDir, configPath: sites.targetConfigPath });
  pair.source = await startAppliance({ dataDir: sites.sourceDataDir, configPath: sites.sourceConfigPath });
  t.after(async () => {
    await pair.source.kill();
    await pair.target.kill();
  });
  return pair;
}

function describe(pair: Pair): string {
  return [
    `source status: ${JSON.stringify(pair.last.source)}`,
    `target status: ${JSON.stringify(pair.last.target)}`,
    `source log (tail): ${pair.source.logs().slice(-6000)}`,
    `target log (tail): ${pair.target.logs().slice(-4000)}`,
  ].join('\n');
}

/** Everything is acknowledged and the group in sync; resolves with the source's status. */
async function drained(pair: Pair, what: string): Promise<SourceGroupStatus> {
  try {
    return await waitFor(`${what}: the source to drain in sync`, 60_000, async () => {
      const status = (pair.last.source = await pair.source.api<SourceGroupStatus>('GET', '/v1/groups/pg1'));
      const done = status.sync.state === 'in-sync' && status.shipper.state === 'streaming' && status.queue.queuedEntries === 0 && status.rpoMs === 0 && status.shipper.sequenceAcknowledged === status.queue.sequenceLast;
      return done ? status : undefined;
    });
  } catch (error) {
    throw new Error(`${(error as Error).message}\n${describe(pair)}`);
  }
}

/** The target promoted everything and its replica equals the source volume. */
async function replicaEqualsSource(pair: Pair, what: string): Promise<void> {
  try {
    await waitFor(`${what}: the replica to equal the source`, 60_000, async () => {
      const status = (pair.last.target = await pair.target.api<TargetGroupStatus>('GET', '/v1/groups/pg1'));
      return status.journal.records === 0 && filesEqual(pair.sites.replicaPath, pair.sites.sourceVolumePath) ? true : undefined;
    }, 250);
  } catch (error) {
    throw new Error(`${(error as Error).message}\n${describe(pair)}`);
  }
}

/** Overwrites `count` distinct blocks (chosen by `random`) of a file with fresh bytes; returns their numbers. */
function scribbleBlocks(filePath: string, count: number, random: () => number): number[] {
  const chosen = new Set<number>();
  while (chosen.size < count) chosen.add(Math.floor(random() * blocks));
  const fd = fs.openSync(filePath, 'r+');
  try {
    for (const block of chosen) {
      const data = Buffer.alloc(deltaBlockBytes);
      for (let at = 0; at < data.length; at += 4) data.writeUInt32LE(Math.floor(random() * 0x1_0000_0000), at);
      // Only part of the block changes: a checksum of the whole block must still see it.
      const part = 512 + Math.floor(random() * (deltaBlockBytes - 1024));
      fs.writeSync(fd, data, 0, part, block * deltaBlockBytes + 512);
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  return [...chosen].sort((a, b) => a - b);
}

test('a source crash with a damaged dirty-region log: the restart delta-syncs, ships exactly the blocks that differ, and the replica equals the source', async (t) => {
  const pair = await startPair(t, 'delta-damaged-log');
  const initial = await drained(pair, 'initial sync');
  // In sync: no reason of a sync that ended is shown as current; the last sync says why it ran.
  assert.equal(initial.sync.reason, undefined, JSON.stringify(initial.sync));
  assert.deepEqual([initial.sync.last?.state, initial.sync.last?.reason], ['initial-sync', 'the group has not completed an initial sync'], JSON.stringify(initial.sync));
  await replicaEqualsSource(pair, 'after the initial sync');

  // The source dies; writes reach its volume that no log recorded (the log itself is damaged).
  await pair.source.kill();
  const changed = scribbleBlocks(pair.sites.sourceVolumePath, 9, prng(pair.seed));
  const logPath = path.join(pair.sites.sourceDataDir, 'source', 'pg1', 'dirty-log', dirtyLogFileName);
  const log = fs.openSync(logPath, 'r+');
  fs.writeSync(log, Buffer.alloc(64, 0xa5), 0, 64, 0);
  fs.closeSync(log);
  console.log(`# seed ${pair.seed}: changed blocks ${changed.join(', ')}`);

  pair.source = await startAppliance({ dataDir: pair.sites.sourceDataDir, configPath: pair.sites.sourceConfigPath });
  const status = await drained(pair, 'after the restart');
  assert.match(pair.source.logs(), /"message":"the dirty-region log is damaged; a delta sync of every volume follows"/);
  assert.match(status.sync.last?.reason ?? '', /dirty-region log could not be trusted/, JSON.stringify(status.sync));
  assert.deepEqual(status.sync.delta, { bytesMatched: volumeBytes - changed.length * deltaBlockBytes, bytesShipped: changed.length * deltaBlockBytes, piecesShippedWhole: 0 }, 'only the changed blocks were shipped');
  assert.match(pair.source.logs(), /"message":"sync finished".*"state":"delta-sync"/);
  await replicaEqualsSource(pair, 'after the delta sync');
  console.log(`# delta sync shipped ${status.sync.delta!.bytesShipped} of ${volumeBytes} bytes`);
});

test('delta sync on demand while fio writes, after the replica was damaged behind the journal: the damaged blocks are shipped again and the replica equals the source', async (t) => {
  const pair = await startPair(t, 'delta-on-demand');
  await drained(pair, 'initial sync');
  await replicaEqualsSource(pair, 'after the initial sync');

  // Refused with a clear error: an unknown mode.
  await assert.rejects(pair.source.api('POST', '/v1/groups/pg1/sync', { mode: 'everything' }), /400.*'mode' must be 'delta'/s);

  // The target's replica is damaged while its appliance is down.
  await pair.target.stop();
  const damaged = scribbleBlocks(pair.sites.replicaPath, 5, prng(pair.seed));
  pair.target = await startAppliance({ dataDir: pair.sites.targetDataDir, configPath: pair.sites.targetConfigPath });
  await drained(pair, 'after the target restarted');
  assert.ok(!filesEqual(pair.sites.replicaPath, pair.sites.sourceVolumePath), 'the damage is there before the delta sync');

  // fio writes through NBD while the delta sync runs, away from the damaged blocks' count check:
  // its blocks differ too and may be shipped, so the figures are bounded, not exact.
  const fio = run('fio', [
    '--name=delta', '--ioengine=nbd', '--thread', `--uri=${pair.source.nbd}/disk0`, '--rw=randwrite', '--bs=4k', '--iodepth=8', `--size=${4 * MiB}`, `--offset=${8 * MiB}`,
    '--rate_iops=2000', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', `--randseed=${pair.seed}`, '--verify_state_save=0',
  ], { timeoutMs: 120_000, cwd: pair.dir });
  const started = await pair.source.api<{ sync: SourceGroupStatus['sync'] }>('POST', '/v1/groups/pg1/sync', { mode: 'delta' });
  assert.equal(started.sync.state, 'delta-sync');
  // A second request while it runs is refused.
  await assert.rejects(pair.source.api('POST', '/v1/groups/pg1/sync', { mode: 'delta' }), /409.*delta-sync/s);
  await fio;
  const status = await drained(pair, 'after the delta sync');
  const delta = status.sync.delta!;
  console.log(`# seed ${pair.seed}: damaged blocks ${damaged.join(', ')}; delta ${JSON.stringify(delta)}`);
  assert.equal(delta.bytesMatched + delta.bytesShipped, volumeBytes);
  assert.ok(delta.bytesShipped >= damaged.length * deltaBlockBytes, 'every damaged block was shipped');
  // Besides the damaged blocks only those fio wrote in its 4 MiB may differ.
  assert.ok(delta.bytesShipped <= damaged.length * deltaBlockBytes + 4 * MiB, `no more than the damaged blocks and fio's area: ${JSON.stringify(delta)}`);
  assert.equal(delta.piecesShippedWhole, 0);
  await replicaEqualsSource(pair, 'after the delta sync');
  // One checksum request per piece, several in flight at once (sent ahead, not one round trip after another).
  const { receiver } = await pair.target.api<{ receiver?: { sumsRequests: number; sumsRequestsInFlightMax: number } }>('GET', '/v1/status');
  assert.ok(receiver, 'the target reports its receiver counters');
  assert.ok(receiver.sumsRequests >= volumeBytes / MiB, `a request per 1 MiB piece at least: ${JSON.stringify(receiver)}`);
  assert.ok(receiver.sumsRequestsInFlightMax >= 2, `requests were sent ahead of the piece being compared: ${JSON.stringify(receiver)}`);
});

test('delta sync with the target down: pieces without checksums are shipped whole, and once the target is back the replica equals the source', async (t) => {
  const pair = await startPair(t, 'delta-target-down');
  await drained(pair, 'initial sync');
  await pair.target.stop();
  const changed = scribbleBlocks(pair.sites.sourceVolumePath, 3, prng(pair.seed));
  console.log(`# seed ${pair.seed}: changed blocks behind the tap ${changed.join(', ')}`);
  await pair.source.api('POST', '/v1/groups/pg1/sync', { mode: 'delta' });
  // Nothing can be compared: after the first piece's attempts every piece is shipped whole.
  await waitFor('the delta sync to read the whole volume', 60_000, async () => {
    const status = (pair.last.source = await pair.source.api<SourceGroupStatus>('GET', '/v1/groups/pg1'));
    return status.sync.bytesLeft === 0 ? status : undefined;
  });
  pair.target = await startAppliance({ dataDir: pair.sites.targetDataDir, configPath: pair.sites.targetConfigPath });
  const status = await drained(pair, 'after the target came back');
  assert.equal(status.sync.state, 'in-sync');
  const delta = status.sync.delta!;
  assert.equal(delta.bytesMatched, 0, `nothing was matched: ${JSON.stringify(delta)}`);
  assert.equal(delta.bytesShipped, volumeBytes, 'every byte was shipped');
  assert.ok(delta.piecesShippedWhole > 1, `pieces were shipped whole: ${JSON.stringify(delta)}`);
  assert.match(pair.source.logs(), /"message":"delta sync: no checksums from the target; the piece is shipped whole"/);
  await replicaEqualsSource(pair, 'after the target came back');
});
