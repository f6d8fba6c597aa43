/**
 * A source volume whose storage fails writes: the volume is a file on a FUSE
 * mount (nbdfuse) of an nbdkit memory disk behind nbdkit's error filter, which
 * fails every NBD write while a trigger file exists (nbdkit 1.32's filter
 * cannot fail flushes). Whether the guest sees its write or its flush fail, the
 * error is one a later flush would never report again, so the source keeps the
 * regions dirty for the rest of the run and records the failure; its next start
 * runs a delta sync, and the replica equals the source.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTempDir, run, testSeed, writeRandomFile } from '../../test/helpers.js';
import { nbdfuseMount, type FuseMount } from '../../test/nbdfuse.js';
import type { SourceGroupStatus } from './source-group.js';
import type { TargetGroupStatus } from './target-group.js';
import { filesEqual, makeTwoSites, MiB, startAppliance, waitFor, waitInSync, type RunningAppliance } from './testing.js';

const volumeBytes = 16 * MiB;

test('a write that fails on the source storage (the guest sees its write or flush fail) keeps the written regions dirty, is recorded, and the next start runs a delta sync; the replica equals the source', async (t) => {
  const seed = testSeed('flush-failure');
  const dir = makeTempDir('lifeline-flush-failure-');
  const socket = path.join(dir, 'nbdkit.sock');
  const inject = path.join(dir, 'fail-writes');
  // nbdkit: a memory disk whose writes fail while `inject` exists (stopped by pid when the test ends).
  const nbdkit = spawn('nbdkit', ['-f', '-U', socket, '--filter=error', 'memory', `size=${volumeBytes}`, 'error-pwrite-rate=100%', `error-pwrite-file=${inject}`, 'error=EIO'], { stdio: 'ignore' });
  const nbdkitExited = new Promise<void>((resolve) => nbdkit.once('exit', () => resolve()));
  // Stopped in order when the test ends: the appliances, the FUSE mount, then nbdkit (by pid).
  const running: { source?: RunningAppliance; target?: RunningAppliance; mount?: FuseMount } = {};
  t.after(async () => {
    await running.source?.kill();
    await running.target?.kill();
    await running.mount?.unmount();
    if (nbdkit.exitCode === null && nbdkit.signalCode === null) process.kill(nbdkit.pid!, 'SIGKILL');
    await nbdkitExited;
  });
  await waitFor('nbdkit to listen', 10_000, () => (fs.existsSync(socket) ? true : undefined), 50);
  const mount = await nbdfuseMount(path.join(dir, 'mnt'), `nbd+unix:///?socket=${socket}`, path.join(dir, 'nbdfuse.pid'));
  running.mount = mount;
  writeRandomFile(mount.file, volumeBytes, seed);

  const sites = await makeTwoSites(dir, { volumeBytes, historyMs: 1000 });
  const sourceConfig = JSON.parse(fs.readFileSync(sites.sourceConfigPath, 'utf8')) as { volumes: { path: string }[] };
  sourceConfig.volumes[0]!.path = mount.file;
  fs.writeFileSync(sites.sourceConfigPath, JSON.stringify(sourceConfig, null, 2));
  const target = await startAppliance({ dataDir: sites.targetDataDir, configPath: sites.targetConfigPath });
  running.target = target;
  let source = await startAppliance({ dataDir: sites.sourceDataDir, configPath: sites.sourceConfigPath });
  running.source = source;
  const replicaEqualsSource = (what: string): Promise<true> =>
    waitFor(`${what}: the replica to equal the source`, 60_000, async () => {
      const status = await target.api<TargetGroupStatus>('GET', '/v1/groups/pg1');
      return status.journal.records === 0 && filesEqual(sites.replicaPath, mount.file) ? true : undefined;
    }, 250);
  await waitInSync(source, 'the initial sync');
  await replicaEqualsSource('after the initial sync');

  // The storage fails writes: the guest's write or its flush fails (depending on FUSE's caching).
  fs.writeFileSync(inject, '');
  const failed = await run('qemu-io', ['-f', 'raw', `${source.nbd}/disk0`, '-c', `write -P 0x3c ${5 * MiB} 4096`, '-c', 'flush'], { allowFailure: true });
  assert.match(failed.stdout + failed.stderr, /(write|flush) failed|Input\/output error/i, `the guest sees its write or flush fail: ${failed.stdout}${failed.stderr}`);
  const pinned = await waitFor('the failure in the status', 10_000, async () => {
    const status = await source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
    return status.dirtyLog.pinnedRegions > 0 ? status : undefined;
  });
  assert.match(pinned.dirtyLog.volumeFlushError ?? '', /input\/output error|EIO/i, JSON.stringify(pinned.dirtyLog));
  assert.match(source.logs(), /cannot flush the source volumes/);

  // The storage recovers; a clean stop keeps the regions dirty, and the next start compares every block.
  fs.rmSync(inject);
  assert.equal(await source.stop(), 0);
  source = running.source = await startAppliance({ dataDir: sites.sourceDataDir, configPath: sites.sourceConfigPath });
  const restarted = await source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
  assert.equal(restarted.sync.state, 'delta-sync', JSON.stringify(restarted.sync));
  assert.match(restarted.sync.reason ?? '', /a flush of the source volumes failed in an earlier run/);
  const status = await waitInSync(source, 'the delta sync after the failed flush');
  assert.equal(status.dirtyLog.pinnedRegions, 0, 'a new run starts with nothing pinned');
  await replicaEqualsSource('after the delta sync');

  // Nothing is owed once that delta sync is acknowledged.
  await waitFor('the delta sync to be acknowledged', 30_000, () => (/"message":"delta sync acknowledged by the target"/.test(source.logs()) ? true : undefined));
  assert.equal(await source.stop(), 0);
  source = running.source = await startAppliance({ dataDir: sites.sourceDataDir, configPath: sites.sourceConfigPath });
  const clean = await source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
  assert.equal(clean.sync.state, 'in-sync', JSON.stringify(clean.sync));
  assert.equal(await source.stop(), 0);
});
