/**
 * Bandwidth limits between two `lifeline appliance` processes over mutual TLS on loopback: with a
 * backlog much larger than the link may carry, the shipped rate (wire bytes of batches) stays within
 * ±5 % of the group's limit over a minute; after the limits change at run time through the control
 * API, the tighter of the appliance's and the group's limit holds, again within ±5 %.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTempDir, run, testSeed, writeRandomFile } from '../../test/helpers.js';
import type { SourceGroupStatus } from './source-group.js';
import { makeTwoSites, MiB, startSites, waitInSync, type RunningAppliance } from './testing.js';

interface Sample {
  atMs: number;
  wireBytesSent: number;
  queuedBytes: number;
}

async function sample(source: RunningAppliance): Promise<Sample> {
  const status = await source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
  return { atMs: Date.now(), wireBytesSent: status.shipper.wireBytesSent, queuedBytes: status.queue.queuedBytes };
}

/** The shipped rate between now and `windowMs` later, checking that a backlog remained throughout. */
async function measureRate(source: RunningAppliance, windowMs: number): Promise<{ bytesPerSecond: number; first: Sample; last: Sample }> {
  const first = await sample(source);
  let last = first;
  while (last.atMs - first.atMs < windowMs) {
    await new Promise((resolve) => setTimeout(resolve, 1000));
    last = await sample(source);
    assert.ok(last.queuedBytes > 8 * MiB, `the backlog ran out ${last.atMs - first.atMs} ms into the measurement (${last.queuedBytes} bytes queued): the rate measured would be the source's, not the limit's`);
  }
  return { bytesPerSecond: ((last.wireBytesSent - first.wireBytesSent) * 1000) / (last.atMs - first.atMs), first, last };
}

function within(bytesPerSecond: number, limit: number, tolerance: number): boolean {
  return Math.abs(bytesPerSecond / limit - 1) <= tolerance;
}

test('the shipped rate stays within 5 % of the group limit over a minute, and of the tighter limit after both change at run time', async (t) => {
  const seed = testSeed('rate-limit');
  const dir = makeTempDir('lifeline-rate-');
  const volumeBytes = 64 * MiB;
  const groupRate = 2 * MiB;
  const sites = await makeTwoSites(dir, { volumeBytes, rateLimitBytesPerSecond: groupRate, spillBytesMax: 1024 * MiB });
  const { source, target } = await startSites(t, sites);
  await waitInSync(source, 'the initial sync of the empty volume');

  // A backlog of 384 MiB of fresh random data (incompressible: wire bytes are the data's), written
  // through NBD far faster than the link may carry it.
  const dataPath = path.join(dir, 'random.img');
  writeRandomFile(dataPath, volumeBytes, seed);
  for (let pass = 0; pass < 6; pass++) await run('nbdcopy', ['--sparse=0', dataPath, `${source.nbd}/disk0`], { timeoutMs: 120_000 });
  fs.rmSync(dataPath);

  // Past the bucket's burst and the first batches, one minute at the group's limit.
  await new Promise((resolve) => setTimeout(resolve, 3000));
  const minute = await measureRate(source, 60_000);
  console.log(`# group limit ${groupRate} B/s: shipped ${Math.round(minute.bytesPerSecond)} B/s over ${minute.last.atMs - minute.first.atMs} ms (${((minute.bytesPerSecond / groupRate - 1) * 100).toFixed(2)} %)`);
  assert.ok(within(minute.bytesPerSecond, groupRate, 0.05), `shipped ${minute.bytesPerSecond} B/s over a minute with a group limit of ${groupRate} B/s`);

  // At run time: the group's limit goes above the appliance's new one, which then governs.
  const applianceRate = 6 * MiB;
  await source.api('PUT', '/v1/groups/pg1/rate', { bytesPerSecond: 8 * MiB });
  await source.api('PUT', '/v1/rate', { bytesPerSecond: applianceRate });
  const status = await source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
  assert.equal(status.rateLimitBytesPerSecond, 8 * MiB);
  await new Promise((resolve) => setTimeout(resolve, 2000));
  const after = await measureRate(source, 30_000);
  console.log(`# appliance limit ${applianceRate} B/s (group ${8 * MiB}): shipped ${Math.round(after.bytesPerSecond)} B/s over ${after.last.atMs - after.first.atMs} ms (${((after.bytesPerSecond / applianceRate - 1) * 100).toFixed(2)} %)`);
  assert.ok(within(after.bytesPerSecond, applianceRate, 0.05), `shipped ${after.bytesPerSecond} B/s with an appliance limit of ${applianceRate} B/s and a group limit of ${8 * MiB} B/s`);
});
