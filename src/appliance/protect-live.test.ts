/**
 * Protection added and removed while the volumes are served, between two
 * `lifeline appliance` processes on loopback:
 *  - through the control API, while one NBD client keeps writing over the same connection: the
 *    first protection runs an initial sync, removal drains and marks the end with a checkpoint,
 *    and a later protection runs a delta sync for what was written in between;
 *  - across restarts, when the configuration dropped the group for a while or gave its volume to
 *    another group: the writes made meanwhile are found by a delta sync, not silently missed;
 *  - an owed delta sync that a crash interrupted runs again at the next start.
 * Each time the replica ends byte-identical to the source.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { lifelineBin, makeTempDir, prng, run, testSeed, writeRandomFile } from '../../test/helpers.js';
import { NbdClient } from '../nbd/client.js';
import { volumeProtectionFileName } from './appliance.js';
import { controlChangesFileName } from './control-changes.js';
import type { SourceGroupStatus } from './source-group.js';
import type { TargetGroupStatus } from './target-group.js';
import { filesEqual, makeTwoSites, MiB, setSourceProtection, startAppliance, waitFor, waitInSync, type RunningAppliance, type TwoSites } from './testing.js';

const volumeBytes = 32 * MiB;
/** The writer keeps to the start of the volume, so that a delta sync has blocks to match. */
const writerAreaBytes = 4 * MiB;

interface Sites {
  sites: TwoSites;
  source: RunningAppliance;
  target: RunningAppliance;
}

async function start(t: { after(fn: () => Promise<unknown>): void }, name: string, protect: boolean): Promise<Sites & { seed: number }> {
  const seed = testSeed(name);
  const dir = makeTempDir(`lifeline-${name}-`);
  const sites = await makeTwoSites(dir, { volumeBytes, historyMs: 1000, protect });
  writeRandomFile(sites.sourceVolumePath, volumeBytes, seed);
  const running = { sites, seed } as Sites & { seed: number };
  running.target = await startAppliance({ dataDir: sites.targetDataDir, configPath: sites.targetConfigPath });
  running.source = await startAppliance({ dataDir: sites.sourceDataDir, configPath: sites.sourceConfigPath });
  t.after(async () => {
    await running.source.kill();
    await running.target.kill();
  });
  return running;
}

/** The target promoted everything and its replica equals the source volume. */
async function replicaEqualsSource(running: Sites, what: string): Promise<void> {
  let last: TargetGroupStatus | undefined;
  try {
    await waitFor(`${what}: the replica to equal the source`, 60_000, async () => {
      last = await running.target.api<TargetGroupStatus>('GET', '/v1/groups/pg1');
      return last.journal.records === 0 && filesEqual(running.sites.replicaPath, running.sites.sourceVolumePath) ? true : undefined;
    }, 250);
  } catch (error) {
    throw new Error(`${(error as Error).message}\ntarget status: ${JSON.stringify(last)}\nsource log (tail): ${running.source.logs().slice(-4000)}`);
  }
}

/** One NBD connection that writes random 4 KiB blocks of the first `writerAreaBytes`, four at a time, until paused. */
class Writer {
  writes = 0;
  private running: Promise<void> | undefined;
  private go = false;

  private constructor(private readonly client: NbdClient, private readonly random: () => number) {}

  static async connect(uri: string, random: () => number): Promise<Writer> {
    const url = new URL(uri);
    const client = await NbdClient.connect({ host: url.hostname, port: Number(url.port) }, { exportName: 'disk0' });
    return new Writer(client, random);
  }

  resume(): void {
    if (this.running) return;
    this.go = true;
    this.running = (async () => {
      while (this.go) {
        const writes: Promise<void>[] = [];
        for (let i = 0; i < 4; i++) {
          const block = Math.floor(this.random() * (writerAreaBytes / 4096));
          const data = Buffer.alloc(4096, Math.floor(this.random() * 256));
          data.writeUInt32LE(this.writes + i, 0);
          writes.push(this.client.pwrite(data, block * 4096));
        }
        await Promise.all(writes);
        this.writes += writes.length;
      }
    })();
  }

  /** Stops after the writes in flight, and flushes. */
  async pause(): Promise<void> {
    this.go = false;
    await this.running;
    this.running = undefined;
    await this.client.flush();
  }

  async close(): Promise<void> {
    await this.pause();
    await this.client.disconnect();
  }
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

test('protection added, removed and added again through the control API while a client keeps writing over one NBD connection: initial sync, a drained removal with an end checkpoint, then a delta sync; the replica equals the source each time', async (t) => {
  const running = await start(t, 'protect-live', false);
  const { source, target, sites } = running;
  // A state file: the JSON on its first line, its checksum on the second.
  const protectedBy = (): unknown => (JSON.parse(fs.readFileSync(path.join(sites.sourceDataDir, volumeProtectionFileName), 'utf8').split('\n')[0]!) as { volumes: Record<string, { group: unknown }> }).volumes['disk0']?.group;
  assert.equal(protectedBy(), null, 'serving a volume without protection is recorded');
  await assert.rejects(source.api('GET', '/v1/groups/pg1'), /404/);

  const writer = await Writer.connect(source.nbd!, prng(running.seed));
  t.after(() => writer.close().catch(() => undefined));
  writer.resume();
  await sleep(300);

  // Protect: the first protection of the group, so an initial sync, while the client writes on.
  const added = await source.api<SourceGroupStatus>('POST', '/v1/protect', sites.protectEntry);
  assert.equal(added.group, 'pg1');
  assert.equal(added.sync.reason, 'the group has not completed an initial sync');
  await sleep(1000);
  await writer.pause();
  await waitInSync(source, 'the initial sync after protection was added');
  await replicaEqualsSource(running, 'after the initial sync');
  assert.equal(protectedBy(), 'pg1', 'the volume is recorded as protected by the group');

  // Remove protection while the client writes: the volume stays served, the queue drains.
  writer.resume();
  await sleep(500);
  const writesBefore = writer.writes;
  const removed = await source.api<{ entriesNotAcknowledged: number; syncInterrupted?: string; endCheckpoint?: string; volumes: string[] }>('DELETE', '/v1/groups/pg1');
  assert.equal(removed.entriesNotAcknowledged, 0, JSON.stringify(removed));
  assert.equal(removed.syncInterrupted, undefined);
  assert.deepEqual(removed.volumes, ['disk0']);
  assert.match(removed.endCheckpoint ?? '', /^protection-end-/);
  await assert.rejects(source.api('GET', '/v1/groups/pg1'), /404/);
  await assert.rejects(source.api('DELETE', '/v1/groups/pg1'), /404.*protects no group 'pg1'/s);
  await assert.rejects(target.api('DELETE', '/v1/groups/pg1'), /409.*removed at its source/s);
  await sleep(500);
  assert.ok(writer.writes > writesBefore, 'the client kept writing through the removal');
  assert.equal(protectedBy(), null, 'the volume is recorded as served without protection again');
  const { checkpoints } = await target.api<{ checkpoints: { id: string; recoverable: boolean; kind: string }[] }>('GET', '/v1/groups/pg1/checkpoints');
  const end = checkpoints.find((checkpoint) => checkpoint.id === removed.endCheckpoint);
  assert.ok(end, `the end checkpoint reached the target: ${JSON.stringify(checkpoints)}`);
  assert.equal(end.recoverable, true);

  // Protect again: the writes made meanwhile are found by comparing checksums with the target.
  const again = await source.api<SourceGroupStatus>('POST', '/v1/protect', sites.protectEntry);
  assert.equal(again.sync.state, 'delta-sync', JSON.stringify(again.sync));
  assert.match(again.sync.reason ?? '', /volume 'disk0' served without protection since /);
  await sleep(500);
  await writer.pause();
  const status = await waitInSync(source, 'the delta sync after protection was added again');
  console.log(`# writes ${writer.writes}; delta ${JSON.stringify(status.sync.delta)}`);
  assert.ok(status.sync.delta!.bytesShipped > 0 && status.sync.delta!.bytesShipped <= writerAreaBytes, `only blocks the client wrote were shipped: ${JSON.stringify(status.sync.delta)}`);
  await replicaEqualsSource(running, 'after the delta sync');
});

test('a volume served without protection between two runs (the group dropped from the configuration, then put back) gets a delta sync at the next protected start, and the replica equals the source', async (t) => {
  const running = await start(t, 'protect-config-gap', true);
  await waitInSync(running.source, 'the initial sync');
  await replicaEqualsSource(running, 'after the initial sync');

  setSourceProtection(running.sites, false);
  assert.equal(await running.source.stop(), 0);
  running.source = await startAppliance({ dataDir: running.sites.sourceDataDir, configPath: running.sites.sourceConfigPath });
  await run('qemu-io', ['-f', 'raw', `${running.source.nbd}/disk0`, '-c', `write -P 0x5c ${MiB} ${3 * MiB}`]);
  assert.equal(await running.source.stop(), 0);

  setSourceProtection(running.sites, true);
  running.source = await startAppliance({ dataDir: running.sites.sourceDataDir, configPath: running.sites.sourceConfigPath });
  const status = await waitInSync(running.source, 'the delta sync after the unprotected run');
  assert.equal(status.sync.state, 'in-sync');
  assert.match(status.sync.last?.reason ?? '', /volume 'disk0' served without protection since /, JSON.stringify(status.sync));
  const delta = status.sync.delta!;
  assert.ok(delta.bytesShipped >= 3 * MiB && delta.bytesShipped < volumeBytes, `the written range and little else was shipped: ${JSON.stringify(delta)}`);
  await replicaEqualsSource(running, 'after the delta sync');
});

test('a volume protected by another group between two runs of its group (the configuration moved it to pg2 and back) gets a delta sync when pg1 starts again, and the replica equals the source', async (t) => {
  const running = await start(t, 'protect-other-group', true);
  await waitInSync(running.source, 'the initial sync');
  await replicaEqualsSource(running, 'after the initial sync');

  // pg2 ships to a target that does not receive it: its writes never reach pg1's replica.
  setSourceProtection(running.sites, { ...running.sites.protectEntry, group: 'pg2' });
  assert.equal(await running.source.stop(), 0);
  running.source = await startAppliance({ dataDir: running.sites.sourceDataDir, configPath: running.sites.sourceConfigPath });
  await run('qemu-io', ['-f', 'raw', `${running.source.nbd}/disk0`, '-c', `write -P 0x6d ${2 * MiB} ${2 * MiB}`]);
  await running.source.kill();

  setSourceProtection(running.sites, true);
  running.source = await startAppliance({ dataDir: running.sites.sourceDataDir, configPath: running.sites.sourceConfigPath });
  const started = await running.source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
  assert.equal(started.sync.state, 'delta-sync', JSON.stringify(started.sync));
  assert.match(started.sync.reason ?? '', /volume 'disk0' protected by group 'pg2' since /);
  const status = await waitInSync(running.source, 'the delta sync after pg2 held the volume');
  assert.ok(status.sync.delta!.bytesShipped >= 2 * MiB, `the range written under pg2 was shipped: ${JSON.stringify(status.sync.delta)}`);
  await replicaEqualsSource(running, 'after the delta sync');
});

test('a delta sync asked for and cut short by a crash of the source runs again at its next start; once acknowledged it is not owed any more', async (t) => {
  const running = await start(t, 'protect-delta-owed', true);
  await waitInSync(running.source, 'the initial sync');
  await replicaEqualsSource(running, 'after the initial sync');

  // With the target down no piece can be compared, so the sync is still running when the source dies.
  await running.target.stop();
  const asked = await running.source.api<{ sync: SourceGroupStatus['sync'] }>('POST', '/v1/groups/pg1/sync', { mode: 'delta' });
  assert.equal(asked.sync.state, 'delta-sync');
  // No checkpoint while it runs: a conflict, not an internal error.
  await assert.rejects(running.source.api('POST', '/v1/groups/pg1/checkpoint', { kind: 'tagged' }), /409.*cannot-checkpoint.*while it is in delta-sync/s);
  await running.source.kill();

  running.source = await startAppliance({ dataDir: running.sites.sourceDataDir, configPath: running.sites.sourceConfigPath });
  const restarted = await running.source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
  assert.equal(restarted.sync.state, 'delta-sync', JSON.stringify(restarted.sync));
  assert.equal(restarted.sync.reason, 'requested through the control API');
  running.target = await startAppliance({ dataDir: running.sites.targetDataDir, configPath: running.sites.targetConfigPath });
  await waitInSync(running.source, 'the delta sync after the restart');
  await waitFor('the delta sync to be acknowledged', 30_000, () => (/"message":"delta sync acknowledged by the target"/.test(running.source.logs()) ? true : undefined));
  await replicaEqualsSource(running, 'after the delta sync');

  assert.equal(await running.source.stop(), 0);
  running.source = await startAppliance({ dataDir: running.sites.sourceDataDir, configPath: running.sites.sourceConfigPath });
  const clean = await running.source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
  assert.equal(clean.sync.state, 'in-sync', `nothing is owed after a clean stop: ${JSON.stringify(clean.sync)}`);
  assert.equal(clean.sync.reason, undefined);
});

test('protection and limits changed through the control API outlive a restart (SIGKILL included); an edited configuration file wins over them, and the status says which is in force', async (t) => {
  const running = await start(t, 'protect-api-restart', false);
  const { sites } = running;
  const configuration = async (): Promise<{ from: string; recordedMs?: number; dropped?: { groups: string[] } }> =>
    (await running.source.api<{ configuration: { from: string; recordedMs?: number; dropped?: { groups: string[] } } }>('GET', '/v1/status')).configuration;
  assert.equal((await configuration()).from, 'file');

  await running.source.api('POST', '/v1/protect', sites.protectEntry);
  await running.source.api('PUT', '/v1/groups/pg1/rate', { bytesPerSecond: 7 * MiB });
  await running.source.api('PUT', '/v1/rate', { bytesPerSecond: 9 * MiB });
  // What the record could not hold is refused, not recorded (a fraction of a byte, a group that is not here).
  await assert.rejects(running.source.api('PUT', '/v1/rate', { bytesPerSecond: 1.5 }), /400.*whole number/s);
  await assert.rejects(running.source.api('PUT', '/v1/groups/pg9/rate', { bytesPerSecond: MiB }), /404/);
  assert.equal((await configuration()).from, 'control-changes');
  await waitInSync(running.source, 'the initial sync after protection was added');

  // A crash straight after the changes: each was recorded before it was answered.
  await running.source.kill();
  const check = async (): Promise<string> => (await run(lifelineBin, ['appliance', '--data', sites.sourceDataDir, '--config', sites.sourceConfigPath, '--check'])).stdout;
  assert.match(await check(), /protection in force at the next start: the control API changes recorded \S+ \(groups: pg1; appliance rate limit 9437184 bytes\/s\) over this file/);
  running.source = await startAppliance({ dataDir: sites.sourceDataDir, configPath: sites.sourceConfigPath });
  const status = await running.source.api<{ rateLimitBytesPerSecond: number; configuration: { from: string } }>('GET', '/v1/status');
  assert.equal(status.configuration.from, 'control-changes');
  assert.equal(status.rateLimitBytesPerSecond, 9 * MiB);
  const group = await running.source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
  assert.equal(group.rateLimitBytesPerSecond, 7 * MiB);
  await run('qemu-io', ['-f', 'raw', `${running.source.nbd}/disk0`, '-c', `write -P 0x3e ${MiB} ${MiB}`]);
  await waitInSync(running.source, 'the writes after the restart');
  await replicaEqualsSource(running, 'after the restart with protection from the control API');

  // Removed through the API: stays removed across a clean restart; the volume is served unprotected.
  await running.source.api('DELETE', '/v1/groups/pg1');
  assert.equal(await running.source.stop(), 0);
  running.source = await startAppliance({ dataDir: sites.sourceDataDir, configPath: sites.sourceConfigPath });
  await assert.rejects(running.source.api('GET', '/v1/groups/pg1'), /404/);
  assert.equal((await configuration()).from, 'control-changes');

  // Protected again through the API, then the operator edits the file (a limit of its own): the file wins.
  await running.source.api('POST', '/v1/protect', sites.protectEntry);
  assert.equal(await running.source.stop(), 0);
  const config = JSON.parse(fs.readFileSync(sites.sourceConfigPath, 'utf8')) as Record<string, unknown>;
  fs.writeFileSync(sites.sourceConfigPath, JSON.stringify({ ...config, rateLimitBytesPerSecond: 11 * MiB }, null, 2));
  assert.match(await check(), /control API changes recorded \S+ \(groups: pg1\) will be dropped at the next start, as the configuration file changed since/);
  running.source = await startAppliance({ dataDir: sites.sourceDataDir, configPath: sites.sourceConfigPath });
  const edited = await running.source.api<{ rateLimitBytesPerSecond: number; configuration: { from: string; dropped?: { groups: string[] } } }>('GET', '/v1/status');
  assert.equal(edited.configuration.from, 'file');
  assert.deepEqual(edited.configuration.dropped?.groups, ['pg1']);
  assert.equal(edited.rateLimitBytesPerSecond, 11 * MiB);
  await assert.rejects(running.source.api('GET', '/v1/groups/pg1'), /404/);
  assert.match(running.source.logs(), /the configuration file changed since protection or limits were changed through the control API/);
  assert.equal(fs.existsSync(path.join(sites.sourceDataDir, controlChangesFileName)), false, 'the dropped record is removed');
});
