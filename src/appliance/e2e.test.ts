/**
 * End to end: two `lifeline appliance` processes on loopback with mutual TLS.
 * fio writes (with verification) through NBD into the source volume while the
 * stream runs; a tagged checkpoint is exported as a recovery view over NBD at
 * the target and read with nbdcopy; after the history window passes the
 * replica equals the source byte for byte.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTempDir, run, testSeed, writeRandomFile } from '../../test/helpers.js';
import { filesEqual, makeTwoSites, MiB, startAppliance, waitFor, type RunningAppliance } from './testing.js';
import type { SourceGroupStatus } from './source-group.js';
import type { TargetGroupStatus } from './target-group.js';

const peerMsMax = 120_000;

let statusLast: SourceGroupStatus | undefined;

async function sourceInSync(source: RunningAppliance): Promise<SourceGroupStatus | undefined> {
  const status = await source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
  statusLast = status;
  return status.sync.state === 'in-sync' && status.queue.queuedEntries === 0 && status.rpoMs === 0 ? status : undefined;
}

test('two appliances: fio through NBD at the source, a checkpoint view and the replica at the target equal the source', async (t) => {
  const dir = makeTempDir('lifeline-e2e-');
  const sites = await makeTwoSites(dir, { volumeBytes: 64 * MiB, historyMs: 4000 });
  const seed = testSeed('e2e');
  // Data before protection starts: the initial sync must carry it.
  fs.mkdirSync(sites.sourceDataDir, { recursive: true });
  const before = path.join(dir, 'before.bin');
  writeRandomFile(before, 8 * MiB, seed);
  fs.writeFileSync(sites.sourceVolumePath, Buffer.alloc(0));
  fs.truncateSync(sites.sourceVolumePath, sites.volumeBytes);
  const fd = fs.openSync(sites.sourceVolumePath, 'r+');
  fs.writeSync(fd, fs.readFileSync(before), 0, 8 * MiB, 40 * MiB);
  fs.closeSync(fd);

  const target = await startAppliance({ dataDir: sites.targetDataDir, configPath: sites.targetConfigPath });
  t.after(() => target.kill());
  const source = await startAppliance({ dataDir: sites.sourceDataDir, configPath: sites.sourceConfigPath });
  t.after(() => source.kill());

  await run('fio', [
    '--name=e2e', '--ioengine=nbd', '--thread', `--uri=${source.nbd}/disk0`, '--rw=randwrite', '--bs=4k', '--iodepth=16',
    `--size=${32 * MiB}`, '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', `--randseed=${seed}`, '--verify_state_save=0',
  ], { timeoutMs: peerMsMax, cwd: dir });
  await run('fio', [
    '--name=e2e-seq', '--ioengine=nbd', '--thread', `--uri=${source.nbd}/disk0`, '--rw=write', '--bs=1m', '--iodepth=4', `--offset=${48 * MiB}`,
    `--size=${8 * MiB}`, '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', `--randseed=${seed + 1}`, '--verify_state_save=0',
  ], { timeoutMs: peerMsMax, cwd: dir });

  // Writes have stopped: everything so far must reach the target, and the checkpoint marks it.
  await waitFor('the source to be in sync with nothing queued', 60_000, () => sourceInSync(source)).catch((error: Error) => {
    throw new Error(`${error.message}\nstatus: ${JSON.stringify(statusLast)}\nsource log: ${source.logs().slice(-4000)}\ntarget log: ${target.logs().slice(-4000)}`);
  });
  const snapshot = path.join(dir, 'at-checkpoint.img');
  fs.copyFileSync(sites.sourceVolumePath, snapshot);
  const checkpoint = await source.api<{ id: string }>('POST', '/v1/groups/pg1/checkpoint', { kind: 'tagged', name: 'after-fio' });
  const status = await waitFor('the source to be acknowledged up to the checkpoint', 30_000, () => sourceInSync(source));
  assert.ok(status.shipper.sequenceAcknowledged > 0);
  assert.equal(status.shipper.sequenceAcknowledged, status.shipper.sequenceSent);
  // fio writes random data: batches go uncompressed, and only the batch headers cost extra.
  assert.ok(status.compressionRatio > 0.99, `compression ratio ${status.compressionRatio}`);

  // Overwrite part of the volume after the checkpoint: the view must not show it.
  await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a ${4 * MiB} ${MiB}`, `${source.nbd}/disk0`], { timeoutMs: peerMsMax });
  await waitFor('the overwrite to be acknowledged', 30_000, () => sourceInSync(source));

  const checkpoints = await target.api<{ checkpoints: { id: string; name?: string; recoverable: boolean }[] }>('GET', '/v1/groups/pg1/checkpoints');
  const found = checkpoints.checkpoints.find((entry) => entry.id === checkpoint.id);
  assert.ok(found, `checkpoint ${checkpoint.id} listed at the target: ${JSON.stringify(checkpoints)}`);
  assert.equal(found.name, 'after-fio');
  const view = await target.api<{ name: string; uri: string }>('POST', '/v1/groups/pg1/views', { volume: 'disk0', checkpoint: checkpoint.id });
  const copied = path.join(dir, 'view.img');
  await run('nbdcopy', [view.uri, copied], { timeoutMs: peerMsMax });
  assert.ok(filesEqual(copied, snapshot), 'the view at the checkpoint equals the source at the checkpoint');
  await target.api('DELETE', `/v1/groups/pg1/views/${view.name}`);

  // After the history window, everything is promoted: the replica equals the source.
  await waitFor('the replica to equal the source', 60_000, async () => {
    const group = await target.api<TargetGroupStatus>('GET', '/v1/groups/pg1');
    return group.journal.records === 0 && filesEqual(sites.replicaPath, sites.sourceVolumePath) ? true : undefined;
  }, 250);

  assert.equal(await source.stop(), 0, `source exit\n${source.logs()}`);
  assert.equal(await target.stop(), 0, `target exit\n${target.logs()}`);
  for (const [name, appliance] of [['source', source], ['target', target]] as const) {
    const problems = appliance.logs().split('\n').filter((line) => /"level":"(error)"/.test(line));
    assert.deepEqual(problems, [], `${name} logged errors`);
  }
});
