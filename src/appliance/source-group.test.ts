/**
 * A source group and a target group in one process, joined by the real shipper and receiver over
 * loopback TCP (no TLS: the appliance tests cover it): how a source answers what the target tells it
 * in the WELCOME.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as net from 'node:net';
import * as path from 'node:path';
import { makeTempDir, testSeed, writeRandomFile } from '../../test/helpers.js';
import { nodeFileSystem } from '../journal/file-system.js';
import { SocketFrameLink, type FrameLink } from '../replication/link.js';
import { TokenBucket } from '../replication/rate.js';
import { Receiver } from '../replication/receiver.js';
import { protocolVersion } from '../replication/wire.js';
import { systemScheduler } from '../replication/scheduler.js';
import { FileBackingStore } from '../tap/backing-store.js';
import type { Logger, LogFields } from '../util/logger.js';
import { parseProtectConfig, type ReceiveGroupConfig } from './config.js';
import { SourceGroup } from './source-group.js';
import { TargetGroup } from './target-group.js';
import { MiB, waitFor } from './testing.js';

class CapturingLogger implements Logger {
  readonly lines: { level: string; message: string; fields?: LogFields }[] = [];
  debug(): void {}
  info(message: string, fields?: LogFields): void {
    this.lines.push({ level: 'info', message, ...(fields ? { fields } : {}) });
  }
  warn(message: string, fields?: LogFields): void {
    this.lines.push({ level: 'warn', message, ...(fields ? { fields } : {}) });
  }
  error(message: string, fields?: LogFields): void {
    this.lines.push({ level: 'error', message, ...(fields ? { fields } : {}) });
  }
}

test('a sync window the target holds open while the source owes nothing (a crash came between a sync-begin and its end) is ended by an empty resync when the next session begins; later checkpoints are recoverable', async (t) => {
  const seed = testSeed('welcome-window');
  const dir = makeTempDir('lifeline-welcome-window-');
  const volumeBytes = 4 * MiB;
  const volumePath = path.join(dir, 'disk0.img');
  writeRandomFile(volumePath, volumeBytes, seed);
  const logger = new CapturingLogger();

  const receiveConfig: ReceiveGroupConfig = {
    group: 'pg1',
    sources: ['site-a-appliance'],
    volumes: [{ name: 'disk0', sizeBytes: volumeBytes, replica: path.join(dir, 'replica-disk0.img') }],
    historyMs: 600_000,
    journal: { unitBytes: 4 * MiB, sizeLimitBytes: 64 * MiB, sizeWarningBytes: 48 * MiB, datastores: [{ path: path.join(dir, 'journal'), capacityBytes: 64 * MiB, freeBytesMin: 0 }] },
  };
  const target = await TargetGroup.open({ config: receiveConfig, directory: path.join(dir, 'target'), fileSystem: nodeFileSystem, clock: systemScheduler, logger });
  const receiver = new Receiver({ target: { openStream: (hello, peer) => target.openStream(hello, peer) }, scheduler: systemScheduler, appliance: 'site-b-appliance', logger });
  const server = net.createServer((socket) => receiver.accept(new SocketFrameLink(socket, 'from the source')));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  t.after(async () => {
    await receiver.close();
    await new Promise<void>((resolve) => server.close(() => resolve()));
    await target.close();
  });

  const protect = parseProtectConfig({ group: 'pg1', volumes: ['disk0'], target: { address: `127.0.0.1:${port}`, appliance: 'site-b-appliance' } }, 'protect', dir);
  const connect = (): Promise<FrameLink> =>
    new Promise((resolve, reject) => {
      const socket = net.connect(port, '127.0.0.1', () => resolve(new SocketFrameLink(socket, 'to the target')));
      socket.once('error', reject);
    });
  const runSource = async (what: string, during: (group: SourceGroup) => Promise<void>): Promise<void> => {
    const file = FileBackingStore.open({ path: volumePath, readOnly: false });
    const group = await SourceGroup.open({
      config: protect,
      site: 'site-a',
      appliance: 'site-a-appliance',
      volumes: [{ id: 0, name: 'disk0', file }],
      directory: path.join(dir, 'source'),
      fileSystem: nodeFileSystem,
      scheduler: systemScheduler,
      connect,
      applianceRateLimit: new TokenBucket(systemScheduler, 0),
      logger,
    });
    try {
      group.begin();
      await waitFor(`${what}: the source in sync with nothing queued`, 30_000, () => {
        const status = group.status();
        return status.sync.state === 'in-sync' && status.queue.queuedEntries === 0 ? true : undefined;
      });
      await during(group);
    } finally {
      const stopped = await group.stop(10_000);
      await file.close();
      assert.equal(stopped.entriesNotAcknowledged, 0, `${what}: drained`);
    }
  };
  const openWindows = (): unknown[] => target.status().syncWindows.filter((window) => window.endLsn === undefined);

  await runSource('the first run', async () => {});
  assert.deepEqual(openWindows(), [], 'the initial sync ended its window');

  // What a source that crashed right after its sync-begin was durable at the target leaves behind:
  // a stream of its own epoch whose last entry opens a window, and (its resync having nothing to
  // read) no region owed in its dirty-region log.
  const opened = await target.openStream({ protocolVersion, site: 'site-a', appliance: 'site-a-appliance', group: 'pg1', epoch: 'crashed-epoch', sequenceBase: 0, volumes: [{ id: 0, name: 'disk0', sizeBytes: volumeBytes }] }, undefined);
  assert.ok('stream' in opened);
  const marker = { id: `sync-begin-${Date.now()}-crashed`, kind: 'sync-begin', name: 'resync' };
  await opened.stream.append([{ sequence: 1, kind: 'checkpoint', volume: 0, offset: 0, lengthBytes: 0, timeMs: Date.now(), data: Buffer.from(JSON.stringify(marker)) }]);
  opened.stream.release();
  assert.equal(openWindows().length, 1, 'the crashed session left a window open');

  await runSource('the run after the crash', async (group) => {
    await waitFor('the window to be ended', 30_000, () => (openWindows().length === 0 ? true : undefined));
    const checkpoint = group.checkpoint('tagged', 'after the window');
    await waitFor('the checkpoint to be recoverable at the target', 30_000, () => {
      const found = target.checkpoints().find((entry) => entry.id === checkpoint.id);
      if (found && !found.recoverable) throw new Error(`the checkpoint after the window is not recoverable: ${found.inconsistent}`);
      return found ? true : undefined;
    });
  });
  const warned = logger.lines.find((line) => line.message.startsWith('the target holds a sync window open that no sync here would end'));
  assert.ok(warned, 'the source said why it ran a resync');
  assert.equal(warned.fields?.['sync'], 'resync');
  // A session whose WELCOME shows no open window runs no sync at all.
  const resyncsBefore = logger.lines.filter((line) => line.message === 'sync finished').length;
  await runSource('a third run', async () => {});
  assert.equal(logger.lines.filter((line) => line.message === 'sync finished').length, resyncsBefore, 'no sync ran with no window open');
});
