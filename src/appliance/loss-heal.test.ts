/**
 * The target loses what it had acknowledged (its group's journal and state gone, as after a
 * replaced datastore) while the source goes on: during an outage long enough for the source's queue
 * to overflow, and in the middle of the initial sync. Either way the source's next HELLO says what
 * was acknowledged, the target opens a loss window, a sync of every volume that begins after the
 * target asked (its heal token) ends it, and `latest` equals the source with no alert left.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTempDir, run, testSeed, writeRandomFile } from '../../test/helpers.js';
import type { SourceGroupStatus } from './source-group.js';
import type { TargetGroupStatus } from './target-group.js';
import { makeTwoSites, MiB, startAppliance, waitFor, type RunningAppliance, type TwoSites } from './testing.js';

const peerMsMax = 60_000;
/** Reconnect (≤ 5 s), the heal's sync of 16–24 MiB at the rates below, its acknowledgement. */
const healMsMax = 120_000;

function loseTargetGroup(sites: TwoSites): void {
  fs.rmSync(path.join(sites.targetDataDir, 'target', 'pg1'), { recursive: true, force: true });
  fs.rmSync(path.join(sites.targetDataDir, 'journal', 'pg1'), { recursive: true, force: true });
}

/** Waits until both sides are in sync with no alert, and checks that `latest` equals the source. */
async function healed(sites: TwoSites, source: RunningAppliance, target: RunningAppliance, what: string): Promise<TargetGroupStatus> {
  await waitFor(`${what}: in sync, drained, no alert`, healMsMax, async () => {
    const [sourceStatus, targetStatus] = await Promise.all([source.api<SourceGroupStatus>('GET', '/v1/groups/pg1'), target.api<TargetGroupStatus>('GET', '/v1/groups/pg1')]);
    const settled = sourceStatus.sync.state === 'in-sync' && sourceStatus.queue.queuedEntries === 0 && sourceStatus.queue.mode !== 'bitmap' && sourceStatus.alerts.length === 0;
    return settled && !targetStatus.alerts.some((alert) => alert.severity === 'error') && targetStatus.syncWindows.every((window) => window.endLsn !== undefined) ? true : undefined;
  }, 250);
  const view = await target.api<{ name: string; uri: string }>('POST', '/v1/groups/pg1/views', { volume: 'disk0', latest: true });
  try {
    const compared = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', view.uri, path.join(sites.sourceDataDir, 'disk0.img')], { timeoutMs: peerMsMax, allowFailure: true });
    assert.equal(compared.code, 0, `${what}: latest equals the source\n${compared.stdout}`);
  } finally {
    await target.api('DELETE', `/v1/groups/pg1/views/${view.name}`);
  }
  return target.api<TargetGroupStatus>('GET', '/v1/groups/pg1');
}

test('the target lost what it acknowledged while the source queue overflowed: the overflow epoch reports it, and the heal restores latest', async (t) => {
  const dir = makeTempDir('lifeline-loss-overflow-');
  const volumeBytes = 16 * MiB;
  const sites = await makeTwoSites(dir, { volumeBytes, historyMs: 3_600_000, unitBytes: 4 * MiB, memoryBytesMax: 4 * MiB, spillBytesMax: 4 * MiB });
  let target = await startAppliance({ dataDir: sites.targetDataDir, configPath: sites.targetConfigPath });
  const source = await startAppliance({ dataDir: sites.sourceDataDir, configPath: sites.sourceConfigPath });
  t.after(async () => {
    await source.kill();
    await target.kill();
  });
  await healed(sites, source, target, 'after the initial sync');
  await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xaa 0 2M', `${source.nbd}/disk0`], { timeoutMs: peerMsMax });
  const before = await waitFor('2 MiB acknowledged', healMsMax, async () => {
    const status = await source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
    return status.queue.queuedEntries === 0 && status.shipper.sequenceAcknowledged > 0 ? status : undefined;
  });
  assert.equal(await target.stop(), 0);
  loseTargetGroup(sites);
  // 12 MiB while the target is down: the 8 MiB of queue and spill overflow, and a new epoch begins.
  await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xbb 4M 12M', `${source.nbd}/disk0`], { timeoutMs: peerMsMax });
  await waitFor('a new epoch after the overflow', healMsMax, async () => ((await source.api<SourceGroupStatus>('GET', '/v1/groups/pg1')).epoch !== before.epoch ? true : undefined));
  target = await startAppliance({ dataDir: sites.targetDataDir, configPath: sites.targetConfigPath });
  const status = await healed(sites, source, target, 'after the outage');
  assert.ok(
    status.syncWindows.some((window) => window.deltaSyncNeeded && /found when the source began a new epoch/.test(window.lossReason ?? '')),
    `the target found the loss from the overflow epoch's HELLO: ${JSON.stringify(status.syncWindows)}`,
  );
});

test('the target lost part of a running initial sync: a sync of every volume begun after it heals it, not the end of the one under way', async (t) => {
  const seed = testSeed('loss-heal initial');
  const dir = makeTempDir('lifeline-loss-initial-');
  const volumeBytes = 24 * MiB;
  // 2 MiB/s stretches the initial sync over about 12 s, so that the target is lost in its middle.
  const sites = await makeTwoSites(dir, { volumeBytes, historyMs: 3_600_000, unitBytes: 8 * MiB, rateLimitBytesPerSecond: 2 * MiB, codec: 'none' });
  writeRandomFile(sites.sourceVolumePath, volumeBytes, seed);
  let target = await startAppliance({ dataDir: sites.targetDataDir, configPath: sites.targetConfigPath });
  const source = await startAppliance({ dataDir: sites.sourceDataDir, configPath: sites.sourceConfigPath });
  t.after(async () => {
    await source.kill();
    await target.kill();
  });
  await waitFor('part of the initial sync acknowledged', healMsMax, async () => {
    const status = await source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
    return status.shipper.sequenceAcknowledged >= 10 ? true : undefined;
  }, 50);
  assert.equal(await target.stop(), 0);
  loseTargetGroup(sites);
  target = await startAppliance({ dataDir: sites.targetDataDir, configPath: sites.targetConfigPath });
  const status = await healed(sites, source, target, 'after the loss in the initial sync');
  assert.ok(status.syncWindows.some((window) => window.deltaSyncNeeded && window.deltaBegun), `a heal began inside the loss window: ${JSON.stringify(status.syncWindows)}`);
});
