/**
 * A target whose journal datastore is full cannot store a batch: it refuses it with the reason
 * (`cannot-store`) before closing the link, so the source's status says why its RPO grows instead
 * of "link closed"; the source keeps every entry and resends, and once promotion gave units back
 * everything lands and the replica equals the source.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { makeTempDir, run, testSeed, writeRandomFile } from '../../test/helpers.js';
import type { SourceGroupStatus } from './source-group.js';
import type { TargetGroupStatus } from './target-group.js';
import { filesEqual, makeTwoSites, MiB, startSites, waitFor, waitInSync } from './testing.js';

test('a full journal datastore: the target refuses the batch with the reason, the source reports it and resends until it is stored', async (t) => {
  const seed = testSeed('store-full');
  const dir = makeTempDir('lifeline-store-full-');
  const volumeBytes = 64 * MiB;
  // Four 4 MiB units at most (the current one and the spare included), history 2 s: 64 MiB written at
  // once cannot fit until promotion gives units back.
  const sites = await makeTwoSites(dir, { volumeBytes, historyMs: 2000, unitBytes: 4 * MiB, datastoreCapacityBytes: 16 * MiB });
  const { source, target } = await startSites(t, sites);
  await waitInSync(source, 'the initial sync of the empty volume');

  const dataPath = path.join(dir, 'random.img');
  writeRandomFile(dataPath, volumeBytes, seed);
  await run('nbdcopy', ['--sparse=0', dataPath, `${source.nbd}/disk0`], { timeoutMs: 120_000 });

  const reasons = new Set<string>();
  let last: SourceGroupStatus | undefined;
  await waitFor('the source to report the refusal and then drain', 120_000, async () => {
    last = await source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
    if (last.shipper.reason) reasons.add(`${last.shipper.state}: ${last.shipper.reason}`);
    return last.queue.queuedEntries === 0 && last.rpoMs === 0 && last.shipper.state === 'streaming' ? true : undefined;
  }, 50).catch((error: Error) => {
    throw new Error(`${error.message}\nreasons seen: ${[...reasons].join(' | ')}\nstatus: ${JSON.stringify(last)}\ntarget log: ${target.logs().slice(-3000)}`);
  });
  const refusal = [...reasons].find((reason) => reason.includes('(cannot-store)'));
  assert.ok(refusal, `the source reported why the target did not store the stream; it reported: ${[...reasons].join(' | ')}`);
  assert.match(refusal, /^refused: .*could not be stored: Cannot take a storage unit .* every datastore is full/);
  assert.match(target.logs(), /replication batch not stored/);

  await waitFor('the replica to equal the source', 60_000, async () => {
    const status = await target.api<TargetGroupStatus>('GET', '/v1/groups/pg1');
    return status.journal.records === 0 && filesEqual(sites.replicaPath, sites.sourceVolumePath) ? true : undefined;
  }, 250);
});
