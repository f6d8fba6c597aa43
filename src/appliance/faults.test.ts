/**
 * Faults between and of the appliances, with real processes: a FaultProxy (in
 * this test process) sits between the source appliance and the target's
 * replication port, and writes go through NBD at the source (fio with
 * verification, and qemu-io runs of overlapping writes, zeroes and discards
 * whose final content depends on their order) while the faults act.
 *
 * After each fault heals: no acknowledged write is lost (the target's durable
 * sequence never goes below what the source saw acknowledged), none is
 * reordered (the replica, and a checkpoint view, equal the source byte for
 * byte once the history window has passed), and the RPO is back under its
 * target within a bounded time.
 *
 *  1. network faults in sequence: latency with jitter, a bandwidth cap, a
 *     blackhole that holds (short, then longer than the link's silence
 *     timeout), a blackhole that drops, connection resets (resetAll, and
 *     resetAfterBytes), slow closes, corruption;
 *  2. SIGKILL of the source during writes, then a restart: a new epoch and a
 *     resync of the dirty-region log's regions; and SIGKILL of the source
 *     after its initial sync was read but before all of it was acknowledged;
 *  3. SIGKILL of the target during writes, then a restart: the source resumes
 *     from the target's durable sequence;
 *  4. queue overflow (1 MiB queue, no spill) while the target is blackholed:
 *     bitmap mode, then a new session with a resync; and an overflow during a
 *     resync followed by SIGKILL of the source.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { freePort, makeTempDir, prng, run, testSeed, writeRandomFile } from '../../test/helpers.js';
import { FaultProxy } from '../faultproxy/proxy.js';
import { filesEqual, makeTwoSites, MiB, startAppliance, waitFor, type RunningAppliance, type TwoSites, type TwoSitesOptions } from './testing.js';
import type { SourceGroupStatus } from './source-group.js';
import type { TargetGroupStatus } from './target-group.js';

/** The link's silence timeout set in these tests (protect[].linkSilenceMs), so that a blackhole longer than it stays short. */
const linkSilenceMs = 4_000;
/** Time allowed, after a fault heals, for the RPO to be back under its target and the queue to drain. */
const recoverMsMax = 30_000;
/** Time allowed for the replica to equal the source once writes have stopped (history window 3 s). */
const replicaMsMax = 60_000;

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

interface Rig {
  dir: string;
  sites: TwoSites;
  proxy: FaultProxy;
  source: RunningAppliance;
  target: RunningAppliance;
  random: () => number;
  seed: number;
  startSource(): Promise<RunningAppliance>;
  startTarget(): Promise<RunningAppliance>;
  sourceStatus(): Promise<SourceGroupStatus>;
  targetStatus(): Promise<TargetGroupStatus>;
  /** The last statuses read (for failure messages). */
  last: { source?: SourceGroupStatus; target?: TargetGroupStatus };
  describe(): string;
}

/** Two sites with the source shipping through a FaultProxy; everything is stopped (by pid) after the test. */
async function startRig(t: TestContext, name: string, options: TwoSitesOptions & { beforeStart?: (sites: TwoSites, proxy: FaultProxy, seed: number) => void } = {}): Promise<Rig> {
  const seed = testSeed(name);
  const dir = makeTempDir(`lifeline-${name}-`);
  const proxyPort = await freePort();
  const sites = await makeTwoSites(dir, { volumeBytes: 64 * MiB, historyMs: 3000, ...options, sourceTargetPort: proxyPort });
  // The tests' shorter silence timeout (see linkSilenceMs).
  const sourceConfig = JSON.parse(fs.readFileSync(sites.sourceConfigPath, 'utf8')) as { protect: Record<string, unknown>[] };
  sourceConfig.protect[0]!['linkSilenceMs'] = linkSilenceMs;
  fs.writeFileSync(sites.sourceConfigPath, JSON.stringify(sourceConfig, null, 2));
  const proxy = new FaultProxy({ target: { host: '127.0.0.1', port: sites.replicationPort }, seed });
  await proxy.listen({ host: '127.0.0.1', port: proxyPort });
  options.beforeStart?.(sites, proxy, seed);
  const rig: Rig = {
    dir,
    sites,
    proxy,
    source: undefined as unknown as RunningAppliance,
    target: undefined as unknown as RunningAppliance,
    random: prng(seed),
    seed,
    last: {},
    async startSource() {
      rig.source = await startAppliance({ dataDir: sites.sourceDataDir, configPath: sites.sourceConfigPath });
      return rig.source;
    },
    async startTarget() {
      rig.target = await startAppliance({ dataDir: sites.targetDataDir, configPath: sites.targetConfigPath });
      return rig.target;
    },
    async sourceStatus() {
      rig.last.source = await rig.source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
      return rig.last.source;
    },
    async targetStatus() {
      rig.last.target = await rig.target.api<TargetGroupStatus>('GET', '/v1/groups/pg1');
      return rig.last.target;
    },
    describe() {
      return [
        `seed ${seed}; directory ${dir}`,
        `source status: ${JSON.stringify(rig.last.source)}`,
        `target status: ${JSON.stringify(rig.last.target)}`,
        `proxy: ${JSON.stringify(proxy.stats())}`,
        `source ${rig.source?.pid} exit ${rig.source?.process.exitCode ?? rig.source?.process.signalCode}; log (tail): ${rig.source?.logs().slice(-8000)}`,
        `target ${rig.target?.pid} exit ${rig.target?.process.exitCode ?? rig.target?.process.signalCode}; log (tail): ${rig.target?.logs().slice(-8000)}`,
      ].join('\n');
    },
  };
  t.after(async () => {
    await boundedStep('killing the source', () => rig.source?.kill());
    await boundedStep('killing the target', () => rig.target?.kill());
    await boundedStep('closing the fault proxy', () => proxy.close());
  });
  await rig.startTarget();
  await rig.startSource();
  return rig;
}

/**
 * One clean-up step, failed with its name after `timeoutMs`: a step that never ends would otherwise
 * let the event loop run dry and fail every later test with no hint of where it stopped.
 */
async function boundedStep(what: string, step: () => Promise<unknown> | undefined, timeoutMs = 30_000): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`clean-up: ${what} did not finish within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    await Promise.race([step(), timedOut]);
  } finally {
    clearTimeout(timer);
  }
}

/** Runs a test's body; a failure carries the rig's state (statuses, proxy counters, logs). */
async function explained(rig: Rig, body: () => Promise<void>): Promise<void> {
  try {
    await body();
  } catch (error) {
    if (!(error instanceof Error) || error.message.includes('source status:')) throw error;
    throw new Error(`${error.message}\n${rig.describe()}`, { cause: error });
  }
}

/** Fails with the rig's state attached. */
async function within<T>(rig: Rig, what: string, timeoutMs: number, check: () => Promise<T | undefined> | T | undefined, intervalMs = 100): Promise<T> {
  try {
    return await waitFor(what, timeoutMs, check, intervalMs);
  } catch (error) {
    throw new Error(`${(error as Error).message}\n${rig.describe()}`);
  }
}

/** The RPO is under its target (writes may still run); resolves with the time it took. */
async function rpoMet(rig: Rig, what: string): Promise<number> {
  const started = Date.now();
  await within(rig, `${what}: the RPO to be under its target`, recoverMsMax, async () => {
    const status = await rig.sourceStatus();
    return status.shipper.state === 'streaming' && status.rpoMs < status.rpoMsTarget && status.queue.mode !== 'bitmap' ? status : undefined;
  });
  return Date.now() - started;
}

/** Writes have stopped: everything is acknowledged, the queue is empty and the group in sync; resolves with the status. */
async function drained(rig: Rig, what: string, timeoutMs = recoverMsMax): Promise<SourceGroupStatus> {
  return within(rig, `${what}: the queue to drain with the group in sync`, timeoutMs, async () => {
    const status = await rig.sourceStatus();
    const done =
      status.sync.state === 'in-sync' &&
      status.shipper.state === 'streaming' &&
      status.queue.mode === 'memory' &&
      status.queue.queuedEntries === 0 &&
      status.queue.resyncBytes === 0 &&
      status.rpoMs === 0 &&
      status.shipper.sequenceAcknowledged === status.queue.sequenceLast;
    return done ? status : undefined;
  });
}

/** The target's current stream holds exactly what the source had acknowledged (epochs whose stream starts at sequence 1). */
async function sequencesAgree(rig: Rig, source: SourceGroupStatus): Promise<void> {
  const target = await rig.targetStatus();
  const stream = target.streams.find((entry) => entry.epoch === source.epoch);
  assert.ok(stream, `the target has a stream for epoch ${source.epoch}: ${JSON.stringify(target.streams)}`);
  assert.ok(stream.current, `the stream of epoch ${source.epoch} is the current one`);
  assert.equal(stream.sequenceDurable, source.shipper.sequenceAcknowledged, 'the target holds exactly what the source saw acknowledged');
  assert.equal(source.queue.sequenceLast, source.shipper.sequenceAcknowledged);
}

/** Once the history window has passed, the replica equals the source byte for byte. */
async function replicaEqualsSource(rig: Rig, what: string): Promise<number> {
  const started = Date.now();
  await within(rig, `${what}: the replica to equal the source`, replicaMsMax, async () => {
    const group = await rig.targetStatus();
    return group.journal.records === 0 && filesEqual(rig.sites.replicaPath, rig.sites.sourceVolumePath) ? true : undefined;
  }, 250);
  return Date.now() - started;
}

/** Errors logged by an appliance (level error), except those a test expects. */
function errorsLogged(appliance: RunningAppliance, expected: RegExp[] = []): string[] {
  return appliance
    .logs()
    .split('\n')
    .filter((line) => /"level":"error"/.test(line))
    .filter((line) => !expected.some((pattern) => pattern.test(line)));
}

/**
 * Writes through the source's NBD export until stopped: fio runs (random 4 KiB
 * writes over a 4 MiB area, verified by reading back) and qemu-io runs of
 * overlapping writes, zeroes and discards whose final content depends on their
 * order. The area used avoids `reservedBytes` at the volume's end.
 */
class Writer {
  runs = 0;
  readonly failures: string[] = [];
  private paused = true;
  private stopped = false;
  private current: Promise<unknown> = Promise.resolve();
  /** Aborts the run in progress (fio's nbd engine spins instead of failing when its server is gone). */
  private abort = new AbortController();
  private wake: (() => void) | undefined;
  private readonly loop: Promise<void>;

  constructor(private readonly rig: Rig, private readonly options: { allowFailure?: boolean; areaBytes?: number } = {}) {
    this.loop = this.run();
  }

  resume(): void {
    this.paused = false;
    this.wake?.();
  }

  /** Resolves once the run in progress has ended. */
  async pause(): Promise<void> {
    this.paused = true;
    this.abortIfSourceGone();
    await this.current.catch(() => undefined);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.abortIfSourceGone();
    this.wake?.();
    await this.loop;
  }

  /**
   * A run against a source that is no longer running can only fail (or spin, for fio): end it now.
   * fio runs with --thread: its job processes would otherwise start sessions of their own and
   * outlive a kill of the fio we started.
   */
  private abortIfSourceGone(): void {
    const source = this.rig.source.process;
    if (source.exitCode !== null || source.signalCode !== null) this.abort.abort();
  }

  private async run(): Promise<void> {
    while (!this.stopped) {
      if (this.paused) {
        await new Promise<void>((resolve) => {
          this.wake = resolve;
          setTimeout(resolve, 200);
        });
        continue;
      }
      this.abort = new AbortController();
      const job = this.rig.random() < 0.7 ? this.fio() : this.qemuIo();
      this.current = job;
      try {
        await job;
        this.runs++;
      } catch (error) {
        if (!this.options.allowFailure && !this.abort.signal.aborted) this.failures.push((error as Error).message.slice(0, 2000));
        await sleep(100);
      }
    }
  }

  private area(): number {
    const areaBytes = this.options.areaBytes ?? 56 * MiB;
    return Math.floor(this.rig.random() * (areaBytes / MiB - 4)) * MiB;
  }

  private fio(): Promise<unknown> {
    const offset = this.area();
    const seed = Math.floor(this.rig.random() * 0x7fffffff);
    return run('fio', [
      '--name=faults', '--ioengine=nbd', '--thread', `--uri=${this.rig.source.nbd}/disk0`, '--rw=randwrite', '--bs=4k', '--iodepth=8', `--offset=${offset}`, `--size=${4 * MiB}`,
      '--rate_iops=2000', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', `--randseed=${seed}`, '--verify_state_save=0',
    ], { timeoutMs: 60_000, cwd: this.rig.dir, signal: this.abort.signal });
  }

  private qemuIo(): Promise<unknown> {
    const base = this.area();
    const random = this.rig.random;
    const commands: string[] = [];
    for (let i = 0; i < 12; i++) {
      const offset = base + Math.floor(random() * 64) * 16 * 1024;
      const lengthBytes = (1 + Math.floor(random() * 32)) * 4096;
      const choice = random();
      if (choice < 0.75) commands.push('-c', `write -P 0x${(1 + Math.floor(random() * 254)).toString(16)} ${offset} ${lengthBytes}`);
      else if (choice < 0.9) commands.push('-c', `write -z ${offset} ${lengthBytes}`);
      else commands.push('-c', `discard ${offset} ${lengthBytes}`);
    }
    return run('qemu-io', ['-f', 'raw', ...commands, `${this.rig.source.nbd}/disk0`], { timeoutMs: 60_000, signal: this.abort.signal });
  }
}

function applied(proxy: FaultProxy): ReturnType<FaultProxy['stats']>['faultsApplied'] {
  return proxy.stats().faultsApplied;
}

test('network faults between the appliances: after each heals nothing acknowledged is lost or reordered and the RPO recovers', async (t) => {
  const rig = await startRig(t, 'faults-network');
  await explained(rig, async () => {
    const initial = await drained(rig, 'initial sync', 60_000);
    assert.equal(initial.shipper.sessions, 1);
    const writer = new Writer(rig);
    t.after(() => boundedStep('stopping the writer', () => writer.stop()));
    const { proxy } = rig;
    const timings: string[] = [];

    const phase = async (name: string, act: () => Promise<void>, expectReconnect: boolean): Promise<void> => {
      const before = await rig.sourceStatus();
      const started = Date.now();
      writer.resume();
      await act();
      proxy.heal();
      const rpoMs = await rpoMet(rig, name);
      await writer.pause();
      const status = await drained(rig, name);
      timings.push(`${name}: fault ${Date.now() - started - rpoMs}ms, RPO met ${rpoMs}ms after heal, sessions ${before.shipper.sessions}→${status.shipper.sessions}, resent ${before.shipper.batchesResent}→${status.shipper.batchesResent}`);
      console.log(`# ${timings[timings.length - 1]}`);
      await sequencesAgree(rig, status);
      assert.equal(status.epoch, initial.epoch, `${name}: network faults never need a new session`);
      if (expectReconnect) assert.ok(status.shipper.sessions > before.shipper.sessions, `${name}: the fault forced a reconnect\n${rig.describe()}`);
      assert.deepEqual(writer.failures, [], `${name}: the writes through NBD succeeded and verified`);
    };

    await phase('latency 40±30 ms', async () => {
      proxy.setFaults({ latencyMs: 40, jitterMs: 30 });
      await sleep(3000);
    }, false);
    assert.ok(applied(proxy).delayedChunks > 0);

    await phase('bandwidth 1 MB/s', async () => {
      proxy.setFaults({ bytesPerSecondMax: 1_000_000 });
      await sleep(3000);
    }, false);
    assert.ok(applied(proxy).throttledWaits > 0);

    await phase('blackhole hold 2 s', async () => {
      proxy.setFaults({ blackhole: 'hold' });
      await sleep(2000);
    }, false);
    assert.ok(applied(proxy).heldBytes > 0);

    await phase(`blackhole hold beyond the silence timeout (${linkSilenceMs} ms)`, async () => {
      const sessions = (await rig.sourceStatus()).shipper.sessions;
      proxy.setFaults({ blackhole: 'hold' });
      // The source gives the silent link up and tries again (its new connection is held too).
      await within(rig, 'the source to give up the silent link', linkSilenceMs + 10_000, async () => {
        const status = await rig.sourceStatus();
        return status.shipper.state !== 'streaming' && status.shipper.sessions === sessions ? status : undefined;
      }, 200);
        await sleep(1000);
    }, true);

    await phase('blackhole drop 2 s', async () => {
      proxy.setFaults({ blackhole: 'drop' });
      await sleep(2000);
    }, true);
    assert.ok(applied(proxy).droppedBytes > 0);

    await phase('resetAll ×3', async () => {
      for (let i = 0; i < 3; i++) {
        await sleep(800);
        proxy.resetAll();
      }
      await sleep(500);
    }, true);
    assert.ok(applied(proxy).resets >= 3);

    await phase('resetAfterBytes 512 KiB', async () => {
      proxy.setFaults({ resetAfterBytes: 512 * 1024 });
      await sleep(2500);
    }, true);
    assert.ok(applied(proxy).resetsAfterBytes > 0);

    await phase('corruption', async () => {
      proxy.setFaults({ corruptProbability: 0.01 });
      await within(rig, 'a corrupted chunk', 20_000, () => (applied(proxy).corruptedChunks > 0 ? true : undefined));
      await sleep(2000);
    }, true);

    await writer.stop();
    assert.ok(writer.runs > 0);
    const status = await drained(rig, 'after the faults');
    await sequencesAgree(rig, status);
    assert.ok(status.shipper.batchesResent > 0, 'batches in flight at a break were sent again');

    // Ordering: a checkpoint view at the target equals the source as it was at the checkpoint.
    const snapshot = path.join(rig.dir, 'at-checkpoint.img');
    fs.copyFileSync(rig.sites.sourceVolumePath, snapshot);
    const checkpoint = await rig.source.api<{ id: string }>('POST', '/v1/groups/pg1/checkpoint', { kind: 'tagged', name: 'after-faults' });
    await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x77 ${MiB} ${MiB}`, `${rig.source.nbd}/disk0`], { timeoutMs: 60_000 });
    await drained(rig, 'after the checkpoint');
    const view = await rig.target.api<{ name: string; uri: string }>('POST', '/v1/groups/pg1/views', { volume: 'disk0', checkpoint: checkpoint.id });
    const copied = path.join(rig.dir, 'view.img');
    await run('nbdcopy', [view.uri, copied], { timeoutMs: 60_000 });
    assert.ok(filesEqual(copied, snapshot), 'the view at the checkpoint equals the source at the checkpoint');
    await rig.target.api('DELETE', `/v1/groups/pg1/views/${view.name}`);

    const replicaMs = await replicaEqualsSource(rig, 'after the faults');
    console.log(`# replica equal to the source ${replicaMs}ms after the writes ended; ${writer.runs} writer runs; proxy ${JSON.stringify(applied(proxy))}`);
    assert.deepEqual(errorsLogged(rig.target), [], 'target logged errors');
    assert.deepEqual(errorsLogged(rig.source), [], 'source logged errors');
  });
});

test('a graceful restart of the source under slow closes, then SIGKILL during writes: each restart is a new epoch, the crash resyncs the dirty regions, and the replica equals the source', async (t) => {
  const rig = await startRig(t, 'faults-kill-source');
  await explained(rig, async () => {
    const first = await drained(rig, 'initial sync', 60_000);
    const writer = new Writer(rig, { allowFailure: true });
    t.after(() => boundedStep('stopping the writer', () => writer.stop()));
    writer.resume();
    await sleep(2000);
    // First a graceful restart (SIGTERM: the source drains its queue, then ends its link with a FIN) while
    // FINs reach the other side late: the new session must not wait for the old connection's end.
    rig.proxy.setFaults({ slowCloseMs: 3000, latencyMs: 5 });
    await writer.pause();
    assert.equal(await rig.source.stop(), 0, 'the source stopped cleanly');
    await rig.startSource();
    const clean = await drained(rig, 'after the graceful restart');
    assert.notEqual(clean.epoch, first.epoch, 'a new process is a new epoch');
    assert.equal(clean.sync.bytesTotal, 0, `a drained stop leaves nothing to resync: ${JSON.stringify(clean.sync)}`);
    await within(rig, 'the old connection\'s FIN, late', 10_000, () => (applied(rig.proxy).slowCloses > 0 ? true : undefined));

    // Then a crash during writes.
    writer.resume();
    await sleep(2500);
    const killedPid = rig.source.pid;
    await rig.source.kill();
    await writer.pause();
    console.log(`# source ${killedPid} killed during writes`);

    await rig.startSource();
    const restarted = await rig.sourceStatus();
    assert.notEqual(restarted.epoch, clean.epoch, 'a new process is a new epoch');
    writer.resume();
    await sleep(2000);
    await writer.stop();
    rig.proxy.heal();
    const status = await drained(rig, 'after the restart');
    assert.equal(status.sync.state, 'in-sync');
    assert.match(status.sync.last?.reason ?? '', /dirty-region log/, `the restart resynced the dirty-region log's regions: ${JSON.stringify(status.sync)}`);
    assert.ok(status.sync.bytesTotal > 0);
    const logged = rig.source.logs();
    assert.match(logged, /"message":"sync started".*"state":"resync"/, 'the resync started');
    assert.match(logged, /"message":"sync finished".*"state":"resync"/, 'the resync finished');
    await sequencesAgree(rig, status);
    const target = await rig.targetStatus();
    assert.ok(target.streams.length >= 3, `one stream per epoch: ${JSON.stringify(target.streams)}`);
    const replicaMs = await replicaEqualsSource(rig, 'after the source restarted');
    console.log(`# resync of ${status.sync.bytesTotal} bytes; replica equal ${replicaMs}ms after the writes ended; proxy ${JSON.stringify(applied(rig.proxy))}`);
    assert.deepEqual(errorsLogged(rig.target), [], 'target logged errors');
    assert.deepEqual(errorsLogged(rig.source), [], 'source logged errors');
  });
});

test('SIGKILL of the source after its initial sync was read but before the target acknowledged all of it: the restart syncs again', async (t) => {
  const rig = await startRig(t, 'faults-kill-initial-sync', {
    beforeStart(sites, proxy, seed) {
      // Data before protection starts, over the whole volume: the initial sync must carry it.
      writeRandomFile(sites.sourceVolumePath, sites.volumeBytes, seed);
      // A slow link, so that the initial sync has read everything while much of it is still queued.
      proxy.setFaults({ bytesPerSecondMax: 4 * MiB });
    },
  });
  await explained(rig, async () => {
    await within(rig, 'the initial sync to have read the whole volume', 60_000, () => (/"message":"sync finished".*"state":"initial-sync"/.test(rig.source.logs()) ? true : undefined));
    const before = await rig.sourceStatus();
    assert.ok(before.queue.queuedEntries > 0 && before.shipper.sequenceAcknowledged < before.queue.sequenceLast, `part of the initial sync is still unacknowledged: ${JSON.stringify(before.queue)}`);
    await rig.source.kill();
    console.log(`# source killed with ${before.shipper.sequenceAcknowledged} of ${before.queue.sequenceLast} acknowledged (${before.queue.queuedBytes} bytes queued)`);
    rig.proxy.heal();
    await rig.startSource();
    const status = await drained(rig, 'after the restart', 60_000);
    assert.notEqual(status.sync.state, 'resync', 'the restart did not settle for a partial resync');
    const replicaMs = await replicaEqualsSource(rig, 'after the restart');
    console.log(`# restart sync: ${status.sync.last?.reason} (${status.sync.bytesTotal} bytes); replica equal ${replicaMs}ms later`);
    assert.deepEqual(errorsLogged(rig.target), [], 'target logged errors');
    assert.deepEqual(errorsLogged(rig.source), [], 'source logged errors');
  });
});

test('SIGKILL of the target during writes: the source resumes from the target durable sequence and nothing acknowledged is lost', async (t) => {
  const rig = await startRig(t, 'faults-kill-target');
  await explained(rig, async () => {
    const first = await drained(rig, 'initial sync', 60_000);
    const writer = new Writer(rig);
    t.after(() => boundedStep('stopping the writer', () => writer.stop()));
    writer.resume();
    await sleep(2500);
    rig.proxy.setFaults({ slowCloseMs: 2000 });
    const before = await rig.sourceStatus();
    const killedPid = rig.target.pid;
    await rig.target.kill();
    console.log(`# target ${killedPid} killed with ${before.shipper.sequenceAcknowledged} acknowledged (${before.shipper.sequenceSent} sent)`);
    // Writes go on while the target is down.
    await sleep(2500);
    await rig.startTarget();
    const reopened = await rig.targetStatus();
    const stream = reopened.streams.find((entry) => entry.epoch === first.epoch);
    assert.ok(stream, `the target still has the stream of epoch ${first.epoch}`);
    assert.ok(stream.sequenceDurable >= before.shipper.sequenceAcknowledged, `the target durably holds ${stream.sequenceDurable}, at least the ${before.shipper.sequenceAcknowledged} it acknowledged before the kill`);
    await rpoMet(rig, 'after the target restarted');
    await sleep(1000);
    await writer.stop();
    rig.proxy.heal();
    const status = await drained(rig, 'after the target restarted');
    assert.equal(status.epoch, first.epoch, 'a target restart does not change the session');
    assert.ok(status.shipper.sessions > 1);
    await sequencesAgree(rig, status);
    assert.deepEqual(writer.failures, [], 'the writes through NBD succeeded and verified');
    const replicaMs = await replicaEqualsSource(rig, 'after the target restarted');
    console.log(`# sessions ${status.shipper.sessions}, resent ${status.shipper.batchesResent}; replica equal ${replicaMs}ms after the writes ended; proxy ${JSON.stringify(applied(rig.proxy))}`);
    assert.deepEqual(errorsLogged(rig.target), [], 'target logged errors');
    assert.deepEqual(errorsLogged(rig.source), [], 'source logged errors');
  });
});

test('queue overflow while the target is blackholed: bitmap mode, then a new session resyncs, and the replica equals the source', async (t) => {
  const rig = await startRig(t, 'faults-overflow', { memoryBytesMax: MiB, spillBytesMax: 0 });
  await explained(rig, async () => {
    const first = await drained(rig, 'initial sync', 60_000);
    rig.proxy.setFaults({ blackhole: 'hold' });
    // Watch the status while more than fits in the queue is written.
    let bitmap: SourceGroupStatus | undefined;
    let watching = true;
    const watcher = (async () => {
      while (watching) {
        const status = await rig.sourceStatus().catch(() => undefined);
        if (status?.queue.mode === 'bitmap' && !bitmap) bitmap = status;
        await sleep(25);
      }
    })();
    t.after(async () => {
      watching = false;
      await watcher;
    });
    const writer = new Writer(rig, { areaBytes: 16 * MiB });
    writer.resume();
    await within(rig, 'the queue to go to bitmap mode', 30_000, () => bitmap);
    await sleep(1000);
    await writer.stop();
    watching = false;
    await watcher;
    assert.ok(bitmap);
    assert.match(bitmap.queue.modeReason, /memory limit/, `the status says why: ${bitmap.queue.modeReason}`);
    assert.ok(bitmap.queue.resyncBytes > 0, 'the status says how much must be resynced');
    assert.ok(bitmap.rpoMs >= 0);
    rig.proxy.heal();
    const status = await drained(rig, 'after the overflow healed', 60_000);
    assert.notEqual(status.epoch, first.epoch, 'the overflow started a new session');
    assert.ok(status.queue.bitmapEpisodes >= 1);
    assert.match(status.sync.last?.reason ?? '', /discarded/, `the resync says why: ${JSON.stringify(status.sync)}`);
    assert.ok(status.rpoMs < status.rpoMsTarget);
    // The target lacks the discarded writes until the resync ends: its sync window opens with the new
    // session (whose epoch begins with the source's time in base 36), not when the resync starts later.
    const epochMs = parseInt(status.epoch.split('-')[0]!, 36);
    const { syncWindows } = await rig.target.api<TargetGroupStatus>('GET', '/v1/groups/pg1');
    const window = syncWindows[syncWindows.length - 1]!;
    assert.ok(window.beginTimeMs <= epochMs && window.endTimeMs !== undefined, `the window opens by ${epochMs} and has closed: ${JSON.stringify(syncWindows)}`);
    assert.deepEqual(writer.failures, [], 'the writes through NBD succeeded and verified');
    const replicaMs = await replicaEqualsSource(rig, 'after the overflow');
    console.log(`# ${status.queue.bitmapEpisodes} bitmap episodes; last resync ${status.sync.bytesTotal} bytes; replica equal ${replicaMs}ms after the writes ended`);
    assert.deepEqual(errorsLogged(rig.target), [], 'target logged errors');
    assert.deepEqual(errorsLogged(rig.source), [], 'source logged errors');
  });
});

test('queue overflow during a resync, then SIGKILL of the source: the regions of discarded writes are still resynced after the restart', async (t) => {
  const rig = await startRig(t, 'faults-overflow-kill', { memoryBytesMax: MiB, spillBytesMax: 0 });
  await explained(rig, async () => {
    await drained(rig, 'initial sync', 60_000);
    // fio fills its buffers with random bytes: the resyncs below cannot be compressed away.
    const fioWrite = (offset: number, sizeBytes: number, blockBytes: number): Promise<unknown> =>
      run('fio', ['--name=overflow', '--ioengine=nbd', '--thread', `--uri=${rig.source.nbd}/disk0`, '--rw=write', `--bs=${blockBytes}`, '--iodepth=1', `--offset=${offset}`, `--size=${sizeBytes}`, `--randseed=${rig.seed}`], {
        timeoutMs: 60_000,
        cwd: rig.dir,
      });
    // The link stalls: the session's bytes are held and new connections refused.
    rig.proxy.setFaults({ blackhole: 'hold', refuse: true });
    // A first overflow (one 4 MiB request): a new session, whose resync of [0, 4 MiB) waits for room in the queue.
    await fioWrite(0, 4 * MiB, 4 * MiB);
    const overflowed = await within(rig, 'the resync after the first overflow', 10_000, async () => {
      const status = await rig.sourceStatus();
      return status.queue.bitmapEpisodes >= 1 && status.queue.mode === 'memory' && status.sync.state === 'resync' ? status : undefined;
    });
    // A small write that gets a sequence in the new session...
    await fioWrite(16 * MiB, 64 * 1024, 64 * 1024);
    assert.equal((await rig.sourceStatus()).queue.bitmapEpisodes, overflowed.queue.bitmapEpisodes, 'the small write was queued');
    // ...and a second overflow (one 2 MiB request) that discards it and the resync's reads (the resync then ends in bitmap mode).
    await fioWrite(32 * MiB, 2 * MiB, 2 * MiB);
    await within(rig, 'the second overflow to be taken', 20_000, async () => {
      const status = await rig.sourceStatus();
      return status.queue.bitmapEpisodes > overflowed.queue.bitmapEpisodes && status.queue.mode === 'memory' ? status : undefined;
    });
    // The link comes back slowly: the resync of the discarded ranges takes a while.
    rig.proxy.setFaults({ blackhole: 'off', refuse: false, bytesPerSecondMax: 256 * 1024 });
    await within(rig, 'the newest session to stream', 20_000, async () => {
      const status = await rig.sourceStatus();
      return status.shipper.state === 'streaming' ? status : undefined;
    });
    // Past the dirty-region log's delay for persisting clears (5 s).
    await sleep(6500);
    const before = await rig.sourceStatus();
    assert.equal(before.sync.state, 'resync', `a resync still runs: ${JSON.stringify(before.sync)}`);
    await rig.source.kill();
    rig.proxy.heal();
    await rig.startSource();
    const status = await drained(rig, 'after the restart', 60_000);
    const replicaMs = await replicaEqualsSource(rig, 'after the restart');
    console.log(`# restart resync of ${status.sync.bytesTotal} bytes; replica equal ${replicaMs}ms later`);
    assert.deepEqual(errorsLogged(rig.target), [], 'target logged errors');
    assert.deepEqual(errorsLogged(rig.source), [], 'source logged errors');
  });
});
