/**
 * Bandwidth limits between two `lifeline appliance` processes over mutual TLS on loopback: with a
 * backlog throughout, the shipped rate (wire bytes of batches) stays within ±5 % of the group's
 * limit over a minute; after the limits change at run time through the control API, the tighter of
 * the appliance's and the group's limit holds, again within ±5 % over half a minute.
 *
 * Nothing here depends on how fast or idle the machine is:
 * - The backlog is kept, not written once: whenever less than 32 MiB waits to be sent, the test
 *   writes 8 MiB more through NBD, and only once the queue's spill file has caught up, so the queue
 *   keeps every entry. (The backlog used to be 384 MiB written at once as fast as NBD took it: a busy
 *   disk let the spill writes fall 64 MiB behind, the queue went to bitmap mode, and the backlog
 *   collapsed into a resync of the 64 MiB volume that ran out half-way through the minute.)
 * - The rate is measured between the moments batches leave, as seen by polling the source every
 *   100 ms, not between arbitrary instants: batches are 3-4 MiB (one every 1.5 s at 2 MiB/s), so
 *   bytes counted between two arbitrary instants are off by up to a batch, 3 % of a minute's worth.
 * - The limiter lets a batch leave once the previous one's bytes at the limit have passed (less the
 *   bucket's burst, 100 ms at the rate). A batch that leaves later than that was held by something
 *   else (a starved process, a target slow to acknowledge, no backlog): that gap, and the next one
 *   (shortened by what the bucket saved meanwhile), are not the limiter's doing, and the
 *   measurement runs on until it has the window's length of gaps that are. The limit is then
 *   checked over those gaps, and over every gap as an upper bound (other causes only slow it).
 * A limiter that ships too much fails the bounds; one that holds batches too long fails the lower
 * bound, or (past about 15 % at 2 MiB/s) makes every gap look held and fails when two and a half
 * windows pass without one window's worth of the limiter's gaps.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { makeTempDir, testSeed } from '../../test/helpers.js';
import { NbdClient } from '../nbd/client.js';
import { burstMsAtRate } from '../replication/rate.js';
import type { SourceGroupStatus } from './source-group.js';
import { makeTwoSites, MiB, startSites, waitFor, waitInSync, type RunningAppliance } from './testing.js';

/** Bytes waiting to be sent below which the shipper might wait for entries. */
const backlogFloorBytes = 8 * MiB;
/** Bytes waiting to be sent that the test keeps: whenever fewer wait, it writes `writeBytes` more. */
const backlogBytes = 32 * MiB;
const writeBytes = 8 * MiB;
/** The spill file's lag (data not yet written to it) at which the writer waits: far below the queue's 64 MiB, past which it drops to bitmap mode. */
const spillLagBytesMax = 16 * MiB;
const pollMs = 100;

function group(source: RunningAppliance): Promise<SourceGroupStatus> {
  return source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
}

/** Bytes queued and not yet sent (queued bytes count entries until the target acknowledges them). */
function unsentBytes(status: SourceGroupStatus): number {
  return status.queue.queuedBytes - status.shipper.bytesUnacknowledged;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** `bytes` of pseudo-random data (xorshift32 from `seed`): incompressible, so wire bytes are the data's. */
function randomData(bytes: number, seed: number): Buffer {
  const data = Buffer.alloc(bytes);
  let state = seed >>> 0 || 1;
  for (let i = 0; i < bytes; i += 4) {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    data.writeUInt32LE(state >>> 0, i);
  }
  return data;
}

/**
 * Writes through `client` (over the volume again and again) whenever fewer than `backlogBytes` wait
 * to be sent, waiting while the spill file lags by more than `spillLagBytesMax`, until stopped;
 * `stop` fails if the queue ever dropped entries (bitmap mode) or a write failed.
 */
function keepBacklog(source: RunningAppliance, client: NbdClient, data: Buffer): { stop(): Promise<void> } {
  let stopping = false;
  let offset = 0;
  const running = (async () => {
    while (!stopping) {
      const status = await group(source);
      if (status.queue.bitmapEpisodes > 0) throw new Error(`the queue went to bitmap mode (${status.queue.modeReason}): the backlog is no longer what was written`);
      if (unsentBytes(status) < backlogBytes && status.queue.spillWriteBytesPending <= spillLagBytesMax) {
        await client.pwrite(data.subarray(offset, offset + writeBytes), offset);
        offset = (offset + writeBytes) % data.length;
      } else {
        await sleep(pollMs);
      }
    }
  })();
  running.catch(() => undefined);
  return {
    async stop() {
      stopping = true;
      await running;
    },
  };
}

interface Seen {
  /** Middle of the poll interval in which the batch was seen to leave, and half that interval. */
  atMs: number;
  uncertaintyMs: number;
  /** Wire bytes that left then (more than one batch if several left within one poll). */
  bytes: number;
  /** Whether a backlog was there throughout the poll interval. */
  backlog: boolean;
}

interface Measured {
  /** Over the gaps the limiter timed, and over every gap. */
  limited: { bytes: number; ms: number; gaps: number };
  all: { bytes: number; ms: number; gaps: number };
  uncertaintyMs: number;
}

/**
 * Watches batches leave until the gaps the limiter timed (see the file's comment) add up to
 * `windowMs`; fails after two and a half times as long (the whole test stays within the runner's 300 s).
 */
async function measure(source: RunningAppliance, limit: number, windowMs: number): Promise<Measured> {
  const startMs = Date.now();
  const measured: Measured = { limited: { bytes: 0, ms: 0, gaps: 0 }, all: { bytes: 0, ms: 0, gaps: 0 }, uncertaintyMs: 0 };
  let previousPoll = { atMs: Date.now(), wireBytesSent: (await group(source)).shipper.wireBytesSent };
  let previous: Seen | undefined;
  let backlog = true;
  let previousHeld = true;
  while (measured.limited.ms < windowMs) {
    if (Date.now() - startMs > 2.5 * windowMs) {
      throw new Error(
        `in ${Date.now() - startMs} ms, batches left when the limits allowed for only ${Math.round(measured.limited.ms)} ms of gaps (${measured.limited.gaps} of ${measured.all.gaps} gaps): the others' batches left later than their bytes at ${limit} B/s allow (a limiter holding batches too long, or the shipper held by something else throughout)`,
      );
    }
    await sleep(pollMs);
    const beforeMs = Date.now();
    const status = await group(source);
    assert.equal(status.queue.bitmapEpisodes, 0, `the queue went to bitmap mode (${status.queue.modeReason}): the backlog is no longer what was written`);
    const poll = { atMs: (beforeMs + Date.now()) / 2, wireBytesSent: status.shipper.wireBytesSent };
    backlog &&= unsentBytes(status) >= backlogFloorBytes;
    if (poll.wireBytesSent > previousPoll.wireBytesSent) {
      const seen: Seen = { atMs: (previousPoll.atMs + poll.atMs) / 2, uncertaintyMs: (poll.atMs - previousPoll.atMs) / 2, bytes: poll.wireBytesSent - previousPoll.wireBytesSent, backlog };
      if (previous) {
        const gapMs = seen.atMs - previous.atMs;
        const allowedMs = (previous.bytes * 1000) / limit;
        // Later than the limiter would have let it leave, beyond what the polls may be off and the
        // bucket may make up: held by something else.
        const held = !seen.backlog || gapMs > allowedMs + previous.uncertaintyMs + seen.uncertaintyMs + burstMsAtRate;
        measured.all.bytes += previous.bytes;
        measured.all.ms += gapMs;
        measured.all.gaps++;
        if (!held && !previousHeld) {
          measured.limited.bytes += previous.bytes;
          measured.limited.ms += gapMs;
          measured.limited.gaps++;
          measured.uncertaintyMs = Math.max(measured.uncertaintyMs, previous.uncertaintyMs, seen.uncertaintyMs);
        }
        previousHeld = held;
      }
      previous = seen;
      backlog = true;
    }
    previousPoll = poll;
  }
  return measured;
}

/** Measures for `windowMs` of the limiter's gaps, logs the figures, and checks them against `limit`. */
async function checkRate(source: RunningAppliance, windowMs: number, limit: number, what: string): Promise<void> {
  const measured = await measure(source, limit, windowMs);
  const limitedRate = (measured.limited.bytes * 1000) / measured.limited.ms;
  const allRate = (measured.all.bytes * 1000) / measured.all.ms;
  const percent = (rate: number): string => `${((rate / limit - 1) * 100).toFixed(2)} %`;
  console.log(
    `# ${what}: shipped ${Math.round(limitedRate)} B/s (${percent(limitedRate)}) over ${Math.round(measured.limited.ms)} ms of ${measured.limited.gaps} gaps the limiter timed; ` +
      `${Math.round(allRate)} B/s (${percent(allRate)}) over all ${measured.all.gaps} gaps, ${Math.round(measured.all.ms)} ms (batch moments known to ±${Math.round(measured.uncertaintyMs)} ms)`,
  );
  assert.ok(Math.abs(limitedRate / limit - 1) <= 0.05, `${what}: shipped ${limitedRate} B/s (${percent(limitedRate)}) over the gaps the limiter timed`);
  assert.ok(allRate / limit - 1 <= 0.05, `${what}: shipped ${allRate} B/s (${percent(allRate)}) over all the gaps`);
}

test('the shipped rate stays within 5 % of the group limit over a minute, and of the tighter limit after both change at run time', async (t) => {
  const seed = testSeed('rate-limit');
  const volumeBytes = 64 * MiB;
  const groupRate = 2 * MiB;
  const sites = await makeTwoSites(makeTempDir('lifeline-rate-'), { volumeBytes, rateLimitBytesPerSecond: groupRate, spillBytesMax: 1024 * MiB });
  const { source } = await startSites(t, sites);
  await waitInSync(source, 'the initial sync of the empty volume');
  const nbd = new URL(source.nbd!);
  const client = await NbdClient.connect({ host: nbd.hostname, port: Number(nbd.port) }, { exportName: 'disk0' });
  t.after(() => client.destroy());
  const writer = keepBacklog(source, client, randomData(volumeBytes, seed));
  t.after(() => writer.stop().catch(() => undefined));
  await waitFor('the backlog', 60_000, async () => (unsentBytes(await group(source)) >= backlogBytes ? true : undefined));

  // One minute at the group's limit, past the bucket's burst and the first batches.
  await sleep(3000);
  await checkRate(source, 60_000, groupRate, `group limit ${groupRate} B/s`);

  // At run time: the group's limit goes above the appliance's new one, which then governs.
  const applianceRate = 6 * MiB;
  await source.api('PUT', '/v1/groups/pg1/rate', { bytesPerSecond: 8 * MiB });
  await source.api('PUT', '/v1/rate', { bytesPerSecond: applianceRate });
  assert.equal((await group(source)).rateLimitBytesPerSecond, 8 * MiB);
  await sleep(2000);
  await checkRate(source, 30_000, applianceRate, `appliance limit ${applianceRate} B/s (group ${8 * MiB})`);

  await writer.stop();
  await client.disconnect();
});
