/**
 * Sync windows at the target: while a sync runs (from its sync-begin marker to its sync-end), the
 * target's image is not consistent, so no checkpoint there is recoverable and no recovery view opens
 * at a time there; an initial sync's window reaches back to the start. The windows survive a restart
 * of the target.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { makeTempDir, run, testSeed, writeRandomFile } from '../../test/helpers.js';
import type { SourceGroupStatus } from './source-group.js';
import { withSyncMarkers, type GroupState, type TargetGroupStatus } from './target-group.js';
import { makeTwoSites, MiB, startAppliance, waitFor } from './testing.js';

test('withSyncMarkers() opens a window at sync-begin (at 0 for an initial sync), extends an open one, closes it at sync-end, and applies a marker once', () => {
  const empty: GroupState = { version: 1, streams: [] };
  const begin = { id: 'b1', kind: 'sync-begin' as const, name: 'resync', lsn: 10, timeMs: 1000 };
  const again = { id: 'b2', kind: 'sync-begin' as const, name: 'resync', lsn: 20, timeMs: 2000 };
  const end = { id: 'e1', kind: 'sync-end' as const, lsn: 30, timeMs: 3000 };
  const state = withSyncMarkers(empty, 'a', [begin, again, end]);
  assert.deepEqual(state.syncWindows, [{ appliance: 'a', sync: 'resync', beginLsn: 10, beginTimeMs: 1000, beginIds: ['b1', 'b2'], endLsn: 30, endTimeMs: 3000, endId: 'e1' }]);
  assert.equal(withSyncMarkers(state, 'a', [begin, end]), state, 'markers already applied change nothing');
  const initial = withSyncMarkers(empty, 'b', [{ id: 'i1', kind: 'sync-begin', name: 'initial-sync', lsn: 5, timeMs: 500 }]);
  assert.deepEqual(initial.syncWindows, [{ appliance: 'b', sync: 'initial-sync', beginLsn: 0, beginTimeMs: 0, beginIds: ['i1'] }]);
  assert.equal(withSyncMarkers(empty, 'a', [end]), empty, 'a sync-end without an open window changes nothing');
});

test('no view opens at a time inside a running or ended sync, nor at the initial sync\'s begin checkpoint; after the sync they do, also after a target restart', async (t) => {
  const seed = testSeed('sync-window');
  const dir = makeTempDir('lifeline-sync-window-');
  const volumeBytes = 16 * MiB;
  // The rate limit stretches the initial sync of 16 MiB of random data over about 8 s.
  const sites = await makeTwoSites(dir, { volumeBytes, historyMs: 600_000, rateLimitBytesPerSecond: 2 * MiB });
  writeRandomFile(sites.sourceVolumePath, volumeBytes, seed);
  let target = await startAppliance({ dataDir: sites.targetDataDir, configPath: sites.targetConfigPath });
  const source = await startAppliance({ dataDir: sites.sourceDataDir, configPath: sites.sourceConfigPath });
  t.after(async () => {
    await source.kill();
    await target.kill();
  });
  const openView = (body: Record<string, unknown>) => target.api<{ name: string; uri: string }>('POST', '/v1/groups/pg1/views', { volume: 'disk0', ...body });

  // While the initial sync runs: an open window from the start; neither a time nor 'latest' opens.
  const running = await waitFor('the initial sync to be under way at the target', 30_000, async () => {
    const status = await target.api<TargetGroupStatus>('GET', '/v1/groups/pg1');
    return status.syncWindows.length === 1 && status.journal.records > 2 ? status : undefined;
  });
  assert.equal(running.syncWindows[0]!.sync, 'initial-sync');
  assert.equal(running.syncWindows[0]!.endTimeMs, undefined);
  await assert.rejects(openView({ latest: true }), /409.*inside a sync: the initial-sync of 'site-a-appliance' ran from the start of the protection to now \(it is still running\); no point of this volume is consistent before that initial sync ends/s);
  await assert.rejects(openView({ timeMs: Date.now() - 500 }), /409.*inside a sync/s);
  const stillRunning = await target.api<TargetGroupStatus>('GET', '/v1/groups/pg1');
  assert.equal(stillRunning.syncWindows[0]!.endTimeMs, undefined, 'the sync had not ended at the target when the views were refused');

  // Once it ended: a closed window; points before its end are refused, after it they open.
  const ended = await waitFor('the initial sync to end at the target', 60_000, async () => {
    const status = await target.api<TargetGroupStatus>('GET', '/v1/groups/pg1');
    return status.syncWindows[0]?.endTimeMs !== undefined ? status : undefined;
  });
  const window = ended.syncWindows[0]!;
  const { checkpoints } = await target.api<{ checkpoints: { id: string; kind: string; recoverable: boolean; inconsistent?: string }[] }>('GET', '/v1/groups/pg1/checkpoints');
  const begin = checkpoints.find((checkpoint) => checkpoint.kind === 'sync-begin')!;
  const end = checkpoints.find((checkpoint) => checkpoint.kind === 'sync-end')!;
  assert.equal(begin.recoverable, false, 'the initial sync\'s begin is no image of the source');
  assert.match(begin.inconsistent ?? '', /initial-sync/);
  assert.equal(end.recoverable, true);
  await assert.rejects(openView({ checkpoint: begin.id }), /409/);
  await assert.rejects(openView({ timeMs: window.endTimeMs! - 1 }), /409.*inside a sync/s);
  const atEnd = await openView({ checkpoint: end.id });
  await target.api('DELETE', `/v1/groups/pg1/views/${atEnd.name}`);

  // The target restarts: the window is still there, and still refuses.
  assert.equal(await target.stop(), 0);
  target = await startAppliance({ dataDir: sites.targetDataDir, configPath: sites.targetConfigPath });
  const reopened = await target.api<TargetGroupStatus>('GET', '/v1/groups/pg1');
  assert.deepEqual(reopened.syncWindows, ended.syncWindows);
  await assert.rejects(openView({ timeMs: window.endTimeMs! - 1 }), /409.*inside a sync/s);
  const latest = await waitFor('a view at the latest point after the sync', 30_000, async () => openView({ latest: true }).catch(() => undefined));
  await target.api('DELETE', `/v1/groups/pg1/views/${latest.name}`);
  const drained = () =>
    waitFor('the source to drain', 60_000, async () => {
      const status = await source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
      return status.sync.state === 'in-sync' && status.queue.queuedEntries === 0 && status.rpoMs === 0 ? true : undefined;
    });
  await drained();

  // A later sync's window begins at its sync-begin: the refusal names the newest consistent point
  // before it, and a view there opens and equals the source (nothing was written since the initial sync).
  await source.api('POST', '/v1/groups/pg1/sync', { mode: 'delta' });
  await drained();
  const withDelta = await waitFor('the delta sync\'s window to close at the target', 30_000, async () => {
    const status = await target.api<TargetGroupStatus>('GET', '/v1/groups/pg1');
    return status.syncWindows.length === 2 && status.syncWindows[1]!.endTimeMs !== undefined ? status : undefined;
  });
  const delta = withDelta.syncWindows[1]!;
  assert.equal(delta.sync, 'delta-sync');
  const refusal = await openView({ timeMs: delta.beginTimeMs }).then(
    () => assert.fail('a view inside the delta sync opened'),
    (error: Error) => error.message,
  );
  const suggested = /the newest consistent point before it is timeMs (\d+)/.exec(refusal);
  assert.ok(suggested, refusal);
  assert.equal(Number(suggested[1]), delta.beginTimeMs - 1);
  const before = await openView({ timeMs: Number(suggested[1]) });
  await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', before.uri, sites.sourceVolumePath]);
  await target.api('DELETE', `/v1/groups/pg1/views/${before.name}`);
});
