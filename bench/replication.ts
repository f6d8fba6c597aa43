/**
 * Replication benchmark (run by hand with `npm run bench:replication`; never part of the tests).
 *
 * Two `lifeline appliance` processes on loopback, as in src/appliance/testing.ts: the source
 * serves a preallocated raw volume over NBD (TCP) and ships every write over mutual TLS to the
 * target, which journals it and promotes it into its replica. fio writes into the source through
 * its nbd engine, and the same fio run is repeated with protection off.
 *
 * Protection off is the same appliance program with the same volume file in its configuration but
 * no `protect` entry: it then exports the raw FileBackingStore through the same NBD server, on the
 * same kind of TCP listener, under the same export name. The only difference to a protected run is
 * the protection stack (quiesce gate, tap, dirty gate, stream queue, shipper) and the target
 * appliance working on the same machine. (`lifeline nbd serve --tap off` would also serve the file
 * without the tap, but it is another program with its own listener setup, and a Unix socket in
 * bench:nbd; the appliance without `protect` differs from the protected one in nothing else.)
 *
 * Phases, per run (on/off order alternates from run to run):
 *   throughput  fio 4 KiB random writes (iodepth 32) and 1 MiB sequential writes (iodepth 8),
 *               time-based, with protection on and off; fio refills its buffers with fresh
 *               random data for every write (--refill_buffers), so nothing compresses and the
 *               codec pays its worst case. While a protected run writes, GET /v1/groups/pg1 on
 *               the source is sampled every 100 ms (rpoMs, queue mode, shipper totals). After fio
 *               stops the bench waits for the source to drain and the target to promote, then
 *               reads both processes' CPU time (/proc/PID/stat utime + stime).
 *   paced       1 MiB sequential writes at a rate the link can carry: --paced-fraction (default
 *               0.5) of the ship rate the protected 1 MiB runs sustained so far (raw bytes
 *               shipped from fio's start until the queue drained, over that time), or
 *               --paced-rate. RPO median and p99 here are the figures the goals are about.
 *   mixed       a 'vm-mix' data set (as in bench/codec.ts: 4 KiB blocks drawn at random, 30 %
 *               zeros, 15 % random, 15 % log text, 25 % binaries of this machine, 15 % inode-table
 *               records) copied into the source with `nbdcopy --sparse=0` (every block a WRITE with
 *               data, zeros included), once per codec (lz4, brotli, none): wire bytes over bytes
 *               written, and CPU seconds per GiB shipped.
 *
 * Before every fio run the source volume's dirty pages are written back and its page cache dropped
 * (`sync --data`, then `dd iflag=nocache count=0`). The volume is preallocated with 4 MiB writes, and
 * on kernels whose ext4 page cache keeps large folios (6.18 here) every 4 KiB write into such a
 * folio cost about 45 us in ext4_block_write_begin (perf), protected or not: that hid most of what
 * protection costs (0.61x measured so, against 0.30x with the cache dropped). --keep-volume-cache
 * keeps the old behaviour.
 *
 * The appliances run from a copy of the build taken at start, so a rebuild of the shared work tree
 * during the run cannot change the code under test. Every process the bench starts is tracked and
 * stopped by its pid, also on failure and on SIGINT/SIGTERM.
 *
 *   node dist/bench/replication.js [--runs N] [--duration S] [--quick] [--size SIZE]
 *        [--phases throughput,paced,mixed] [--workloads randwrite-4k,seqwrite-1m] [--codecs lz4,brotli,none]
 *        [--mixed-size SIZE] [--paced-fraction F] [--paced-rate MiB/s] [--dir DIR]
 *        [--profile-dir DIR] [--no-save]
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { freePort, prng, repositoryRoot, run } from '../test/helpers.js';
import { parseSizeBytes } from '../src/util/size.js';
import type { SourceGroupStatus } from '../src/appliance/source-group.js';
import type { TargetGroupStatus } from '../src/appliance/target-group.js';
import { systemBinaries, vmMix } from './datasets.js';
import { snapshotLifeline } from './snapshot.js';

// ------------------------------------------------------------------ options

const workloadIds = ['randwrite-4k', 'seqwrite-1m'] as const;
type WorkloadId = (typeof workloadIds)[number];
const phaseIds = ['throughput', 'paced', 'mixed'] as const;
type PhaseId = (typeof phaseIds)[number];
const codecIds = ['lz4', 'brotli', 'none'] as const;
type CodecId = (typeof codecIds)[number];

interface Options {
  runs: number;
  durationS: number;
  rampS: number;
  volumeBytes: number;
  mixedBytes: number;
  dir: string;
  quick: boolean;
  phases: PhaseId[];
  workloads: WorkloadId[];
  codecs: CodecId[];
  pacedFraction: number;
  pacedRateBytesPerSecond: number | undefined;
  historyMs: number;
  profileDir: string | undefined;
  /** Drop the source volume's pages from the page cache before every fio run. */
  dropVolumeCache: boolean;
  save: boolean;
}

const usage = `Usage: node dist/bench/replication.js [options]   (or: npm run bench:replication -- [options])

  --runs N             runs of every phase (default 3; --quick: 1)
  --duration S         seconds each fio run writes (default 60; --quick: 5)
  --ramp S             of which fio's first S seconds are not counted in its figures (default 0: CPU
                       and shipped bytes are read over the whole run, so fio's figures cover it too)
  --quick              smoke run: 1 run, 5 s fio runs, 256 MiB volume, 32 MiB mixed set (not marked latest)
  --size SIZE          size of the protected volume (default 1G; --quick: 256M)
  --mixed-size SIZE    size of the vm-mix data set (default 256M; --quick: 32M)
  --phases LIST        comma-separated subset of: ${phaseIds.join(', ')}
  --workloads LIST     comma-separated subset of: ${workloadIds.join(', ')}
  --codecs LIST        codecs for the mixed phase, subset of: ${codecIds.join(', ')}
  --paced-fraction F   paced run writes at F times the measured ship rate (default 0.5)
  --paced-rate MIBPS   paced run writes at this many MiB/s instead
  --history S          target's history window in seconds (default 5: promotion follows soon after)
  --dir DIR            where the data directories live (default: the OS temporary directory)
  --profile-dir DIR    run the appliances with node --cpu-prof --cpu-prof-dir=DIR (profiles, not figures)
  --keep-volume-cache  do not write back and drop the source volume's page cache before every fio run
                       (by default it is dropped: the volume is preallocated with large writes, and on
                       kernels whose ext4 page cache keeps large folios a 4 KiB write into one costs
                       tens of microseconds in the kernel, which hides the cost of protection)
  --no-save            print only; do not write bench/results/`;

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      runs: { type: 'string' },
      duration: { type: 'string' },
      ramp: { type: 'string' },
      quick: { type: 'boolean', default: false },
      size: { type: 'string' },
      'mixed-size': { type: 'string' },
      phases: { type: 'string' },
      workloads: { type: 'string' },
      codecs: { type: 'string' },
      'paced-fraction': { type: 'string' },
      'paced-rate': { type: 'string' },
      history: { type: 'string' },
      dir: { type: 'string' },
      'profile-dir': { type: 'string' },
      'keep-volume-cache': { type: 'boolean', default: false },
      'no-save': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) {
    console.log(usage);
    process.exit(0);
  }
  const quick = values.quick!;
  const number = (what: string, text: string | undefined, fallback: number, minimum: number, integer: boolean): number => {
    if (text === undefined) return fallback;
    const value = Number(text);
    if (!Number.isFinite(value) || value < minimum || (integer && !Number.isInteger(value))) {
      throw new Error(`Cannot read --${what} '${text}': expected a ${integer ? 'whole ' : ''}number of at least ${minimum}`);
    }
    return value;
  };
  const pick = <T extends string>(what: string, text: string | undefined, known: readonly T[]): T[] => {
    if (!text) return [...known];
    const chosen = text.split(',').map((item) => item.trim()).filter(Boolean);
    for (const item of chosen) {
      if (!known.includes(item as T)) throw new Error(`Cannot read --${what}: unknown '${item}' (known: ${known.join(', ')})`);
    }
    return known.filter((item) => chosen.includes(item));
  };
  const pacedRate = values['paced-rate'] === undefined ? undefined : number('paced-rate', values['paced-rate'], 0, 0.001, false) * mib;
  return {
    runs: number('runs', values.runs, quick ? 1 : 3, 1, true),
    durationS: number('duration', values.duration, quick ? 5 : 60, 1, true),
    // No ramp by default: the CPU readings and the shipped bytes cover the whole fio run, so its
    // figures must too (a protected run's first seconds, with an empty queue, are part of the story).
    rampS: number('ramp', values.ramp, 0, 0, true),
    volumeBytes: parseSizeBytes(values.size ?? (quick ? '256M' : '1G')),
    mixedBytes: parseSizeBytes(values['mixed-size'] ?? (quick ? '32M' : '256M')),
    dir: path.resolve(values.dir ?? os.tmpdir()),
    quick,
    phases: pick('phases', values.phases, phaseIds),
    workloads: pick('workloads', values.workloads, workloadIds),
    codecs: pick('codecs', values.codecs, codecIds),
    pacedFraction: number('paced-fraction', values['paced-fraction'], 0.5, 0.01, false),
    pacedRateBytesPerSecond: pacedRate,
    historyMs: number('history', values.history, 5, 0, false) * 1000,
    profileDir: values['profile-dir'] ? path.resolve(values['profile-dir']) : undefined,
    dropVolumeCache: !values['keep-volume-cache']!,
    save: !values['no-save'],
  };
}

// ------------------------------------------------------------------ constants

const mib = 1024 * 1024;
const gib = 1024 * mib;
/** The group's name in both configurations. */
const group = 'pg1';
/** How often the source's status is sampled while fio writes. */
const sampleIntervalMs = 100;
/** Longest wait for a drain, a sync or a promotion before the bench gives up on it. */
const settleMsMax = 300_000;
/** Longest wait for an appliance to exit after SIGTERM (it drains for up to 10 s itself). */
const stopMsMax = 60_000;
const clockTicksPerSecond = 100; // USER_HZ, 100 on Linux x86-64 and arm64

interface WorkloadDefinition {
  id: WorkloadId;
  title: string;
  unit: 'IOPS' | 'MiB/s';
  rw: 'randwrite' | 'write';
  blockSize: string;
  iodepth: number;
  /** Protected throughput over unprotected, at least. */
  goal: number;
}

const workloads: Record<WorkloadId, WorkloadDefinition> = {
  'randwrite-4k': { id: 'randwrite-4k', title: '4 KiB random write, iodepth 32', unit: 'IOPS', rw: 'randwrite', blockSize: '4k', iodepth: 32, goal: 0.7 },
  'seqwrite-1m': { id: 'seqwrite-1m', title: '1 MiB sequential write, iodepth 8', unit: 'MiB/s', rw: 'write', blockSize: '1m', iodepth: 8, goal: 0.8 },
};

const rpoMedianGoalMs = 1000;
const rpoP99GoalMs = 5000;

// ------------------------------------------------------------------ processes

/** Every child process the bench started and has not seen exit, by pid (for the clean-up on failure). */
const children = new Map<number, ChildProcess>();

function track(child: ChildProcess): void {
  if (child.pid === undefined) return;
  const pid = child.pid;
  children.set(pid, child);
  child.once('exit', () => children.delete(pid));
}

function killAll(): void {
  for (const [pid, child] of children) {
    if (child.exitCode === null && child.signalCode === null) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // Already gone.
      }
    }
  }
}

/** `bin/lifeline` of the snapshot the run uses (see `snapshotLifeline`). */
let lifelineBin = path.join(repositoryRoot, 'bin', 'lifeline');

interface Appliance {
  name: string;
  pid: number;
  control: string;
  nbd: string | undefined;
  api<T>(route: string): Promise<T>;
  /** SIGTERM by pid; SIGKILL after stopMsMax. Resolves with the exit code (or signal). */
  stop(): Promise<string>;
  logTail(): string;
}

async function startAppliance(options: { name: string; dataDir: string; configPath: string; profileDir: string | undefined }): Promise<Appliance> {
  const profile = options.profileDir ? ['--cpu-prof', `--cpu-prof-dir=${options.profileDir}`, `--cpu-prof-name=${options.name}-${Date.now()}.cpuprofile`] : [];
  const args = [...profile, lifelineBin, 'appliance', '--data', options.dataDir, '--config', options.configPath, '--log-format', 'json'];
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  track(child);
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (chunk) => (stdout += chunk));
  // Keep the end of the log only: a long run at info level must not grow without bound.
  child.stderr!.on('data', (chunk) => (stderr = (stderr + chunk).slice(-64 * 1024)));
  child.once('error', () => undefined);
  const exited = new Promise<string>((resolve) => child.once('exit', (code, signal) => resolve(code !== null ? String(code) : String(signal))));
  const deadline = Date.now() + 30_000;
  while (!/^listening control /m.test(stdout)) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`Cannot start appliance ${options.name}: it exited with ${child.exitCode ?? child.signalCode}\nstdout: ${stdout}\nstderr: ${stderr}`);
    if (Date.now() > deadline) {
      process.kill(child.pid!, 'SIGKILL');
      throw new Error(`Cannot start appliance ${options.name}: not listening after 30 s\nstdout: ${stdout}\nstderr: ${stderr}`);
    }
    await sleep(20);
  }
  const control = /^listening control (\S+)/m.exec(stdout)![1]!;
  const nbd = /^listening nbd (\S+)/m.exec(stdout)?.[1];
  const pid = child.pid!;
  return {
    name: options.name,
    pid,
    control,
    nbd,
    async api<T>(route: string): Promise<T> {
      const response = await fetch(`${control}${route}`);
      const text = await response.text();
      if (!response.ok) throw new Error(`GET ${route} on ${options.name} answered ${response.status}: ${text}`);
      return JSON.parse(text) as T;
    },
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return exited;
      process.kill(pid, 'SIGTERM');
      const timer = setTimeout(() => {
        if (child.exitCode === null && child.signalCode === null) process.kill(pid, 'SIGKILL');
      }, stopMsMax);
      const result = await exited;
      clearTimeout(timer);
      return result;
    },
    logTail: () => stderr,
  };
}

/**
 * Runs a command to completion (fio, nbdcopy, certs), tracked by pid so that a failure or a
 * signal stops it too; rejects on a non-zero exit or after `timeoutMs`.
 */
function runTracked(command: string, args: string[], options: { timeoutMs: number; cwd?: string }): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { cwd: options.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    track(child);
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (chunk) => (stdout += chunk));
    child.stderr!.on('data', (chunk) => (stderr = (stderr + chunk).slice(-64 * 1024)));
    const timer = setTimeout(() => {
      if (child.pid !== undefined && child.exitCode === null) process.kill(child.pid, 'SIGKILL');
      reject(new Error(`Cannot finish '${command} ${args.join(' ')}' as it ran longer than ${options.timeoutMs} ms\nstderr: ${stderr}`));
    }, options.timeoutMs);
    child.once('error', (error) => {
      clearTimeout(timer);
      reject(new Error(`Cannot run ${command}: ${error.message}`, { cause: error }));
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve({ stdout, stderr });
      else reject(new Error(`'${command} ${args.join(' ')}' exited with ${code ?? signal}\nstdout: ${stdout.slice(-4000)}\nstderr: ${stderr.slice(-4000)}`));
    });
  });
}

interface CpuTimes {
  userS: number;
  systemS: number;
  /** Minor page faults (every thread): a fresh page mapped, often one the kernel had to zero. */
  minorFaults: number;
}

/** CPU seconds in user and system mode (every thread) of a process, from /proc. */
function cpuTimes(pid: number): CpuTimes {
  const text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  return { userS: Number(fields[11]) / clockTicksPerSecond, systemS: Number(fields[12]) / clockTicksPerSecond, minorFaults: Number(fields[7]) };
}

/** CPU seconds (user + system) per thread name of a process (threads of one name summed), from /proc. */
function threadCpuTimes(pid: number): Map<string, number> {
  const byName = new Map<string, number>();
  let tasks: string[];
  try {
    tasks = fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return byName;
  }
  for (const task of tasks) {
    let text: string;
    try {
      text = fs.readFileSync(`/proc/${pid}/task/${task}/stat`, 'utf8');
    } catch {
      continue; // the thread ended meanwhile
    }
    const name = task === String(pid) ? 'main' : text.slice(text.indexOf('(') + 1, text.lastIndexOf(')')).trim();
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
    byName.set(name, (byName.get(name) ?? 0) + (Number(fields[11]) + Number(fields[12])) / clockTicksPerSecond);
  }
  return byName;
}

/** Seconds per thread name between two readings, largest first, as "name 1.2 s" (threads that ended before the second reading are not counted). */
function threadCpuSpent(before: Map<string, number>, after: Map<string, number>): string {
  return [...after]
    .map(([name, seconds]) => [name, seconds - (before.get(name) ?? 0)] as const)
    .filter(([, seconds]) => seconds >= 0.05)
    .sort((a, b) => b[1] - a[1])
    .map(([name, seconds]) => `${name} ${seconds.toFixed(1)} s`)
    .join(', ');
}

/** User + system seconds between two readings, and the system part. */
function cpuSpent(before: CpuTimes, after: CpuTimes): { totalS: number; systemS: number; minorFaults: number } {
  return { totalS: round3(after.userS + after.systemS - before.userS - before.systemS), systemS: round3(after.systemS - before.systemS), minorFaults: after.minorFaults - before.minorFaults };
}

// ------------------------------------------------------------------ sites

interface Sites {
  dir: string;
  volumePath: string;
  sourceDataDir: string;
  plainDataDir: string;
  targetDataDir: string;
  targetConfigPath: string;
  plainConfigPath: string;
  sourceConfigPath(codec: CodecId): string;
}

/**
 * Writes the certificates and the three configurations: the target, the source with the
 * protection group (one file per codec), and the unprotected appliance serving the same file.
 */
async function makeSites(dir: string, options: Options): Promise<Sites> {
  const certs = path.join(dir, 'certs');
  await runTracked(process.execPath, [lifelineBin, 'certs', 'demo', '--dir', certs], { timeoutMs: 60_000 });
  const replicationPort = await freePort();
  const sourceDataDir = path.join(dir, 'site-a');
  const plainDataDir = path.join(dir, 'site-a-unprotected');
  const targetDataDir = path.join(dir, 'site-b');
  for (const directory of [sourceDataDir, plainDataDir, path.join(targetDataDir, 'journal')]) fs.mkdirSync(directory, { recursive: true });
  const volumePath = path.join(sourceDataDir, 'disk0.img');
  const sourceTls = { cert: `${certs}/site-a/site-a-appliance.crt`, key: `${certs}/site-a/site-a-appliance.key`, trustedCas: [`${certs}/site-b/ca.crt`] };
  const common = {
    appliance: { name: 'site-a-appliance', site: 'site-a' },
    control: { listen: '127.0.0.1:0' },
    tls: sourceTls,
    nbd: { listen: '127.0.0.1:0' },
    volumes: [{ name: 'disk0', path: volumePath }],
  };
  const sourceConfig = (codec: CodecId): unknown => ({
    ...common,
    protect: [
      {
        group,
        volumes: ['disk0'],
        target: { address: `127.0.0.1:${replicationPort}`, appliance: 'site-b-appliance' },
        codec,
        rpoMsTarget: '5s',
        rateLimitBytesPerSecond: 0,
        // The product's defaults (config.ts), written out so the report can name them.
        queue: { memoryBytesMax: '256MiB', spillBytesMax: '4GiB' },
      },
    ],
  });
  const targetConfig = {
    appliance: { name: 'site-b-appliance', site: 'site-b' },
    control: { listen: '127.0.0.1:0' },
    tls: { cert: `${certs}/site-b/site-b-appliance.crt`, key: `${certs}/site-b/site-b-appliance.key`, trustedCas: [`${certs}/site-a/ca.crt`] },
    nbd: { listen: '127.0.0.1:0' },
    receive: {
      listen: `127.0.0.1:${replicationPort}`,
      groups: [
        {
          group,
          sources: ['site-a-appliance'],
          volumes: [{ name: 'disk0', sizeBytes: options.volumeBytes, replica: 'replica-disk0.img' }],
          historyMs: options.historyMs,
          journal: { unitBytes: '256MiB', sizeLimitBytes: '8GiB', datastores: [{ path: 'journal', capacityBytes: '16GiB', freeBytesMin: '1GiB' }] },
        },
      ],
    },
  };
  const write = (name: string, config: unknown): string => {
    const file = path.join(dir, name);
    fs.writeFileSync(file, `${JSON.stringify(config, null, 2)}\n`);
    return file;
  };
  const sourceConfigPaths = new Map<CodecId, string>(codecIds.map((codec) => [codec, write(`site-a-${codec}.json`, sourceConfig(codec))]));
  return {
    dir,
    volumePath,
    sourceDataDir,
    plainDataDir,
    targetDataDir,
    targetConfigPath: write('site-b.json', targetConfig),
    plainConfigPath: write('site-a-unprotected.json', common),
    sourceConfigPath: (codec) => sourceConfigPaths.get(codec)!,
  };
}

interface Pair {
  source: Appliance;
  target: Appliance;
}

async function startPair(sites: Sites, codec: CodecId, options: Options): Promise<Pair> {
  const target = await startAppliance({ name: 'target', dataDir: sites.targetDataDir, configPath: sites.targetConfigPath, profileDir: options.profileDir });
  let source: Appliance;
  try {
    source = await startAppliance({ name: `source-${codec}`, dataDir: sites.sourceDataDir, configPath: sites.sourceConfigPath(codec), profileDir: options.profileDir });
  } catch (error) {
    await target.stop();
    throw error;
  }
  return { source, target };
}

/** Stops the source first (it drains into the running target), then the target. */
async function stopPair(pair: Pair): Promise<void> {
  const sourceExit = await pair.source.stop();
  const targetExit = await pair.target.stop();
  if (sourceExit !== '0') log(`warning: the source exited with ${sourceExit}: ${pair.source.logTail().slice(-1000)}`);
  if (targetExit !== '0') log(`warning: the target exited with ${targetExit}: ${pair.target.logTail().slice(-1000)}`);
}

function drained(status: SourceGroupStatus): boolean {
  return status.sync.state === 'in-sync' && status.queue.queuedEntries === 0 && status.rpoMs === 0 && status.shipper.state === 'streaming';
}

/** Waits until the source has nothing queued, no sync running and a streaming shipper. */
async function waitDrained(pair: Pair, what: string, onStatus?: (status: SourceGroupStatus) => void): Promise<SourceGroupStatus> {
  let last: SourceGroupStatus | undefined;
  const deadline = Date.now() + settleMsMax;
  for (;;) {
    last = await pair.source.api<SourceGroupStatus>(`/v1/groups/${group}`);
    onStatus?.(last);
    if (drained(last)) return last;
    if (Date.now() > deadline) {
      throw new Error(`Timed out after ${settleMsMax} ms waiting for ${what}\nstatus: ${JSON.stringify(last)}\nsource log: ${pair.source.logTail().slice(-3000)}\ntarget log: ${pair.target.logTail().slice(-3000)}`);
    }
    await sleep(sampleIntervalMs);
  }
}

/** Waits (bounded) until the target's journal has promoted every record; returns whether it did. */
async function waitPromoted(pair: Pair, options: Options): Promise<boolean> {
  const deadline = Date.now() + options.historyMs + 120_000;
  for (;;) {
    const status = await pair.target.api<TargetGroupStatus>(`/v1/groups/${group}`);
    if (status.journal.records === 0) return true;
    if (Date.now() > deadline) return false;
    await sleep(250);
  }
}

// ------------------------------------------------------------------ sampling

interface Sample {
  /** ms since the measurement started. */
  atMs: number;
  rpoMs: number;
  mode: string;
  modeReason: string;
  queuedBytes: number;
  spillBytes: number;
  bitmapEpisodes: number;
}

/**
 * Totals shipped by the source since a baseline. The status reports the current shipper only, and
 * the group replaces its shipper (new epoch) when the queue went to bitmap mode, so the totals are
 * kept per epoch from the last status seen of each: after a bitmap episode they miss what the old
 * shipper sent in its last sampling interval (a lower bound, flagged in the report).
 */
class ShippedTotals {
  private readonly perEpoch = new Map<string, { raw: number; wire: number }>();
  private readonly baseline: { epoch: string; raw: number; wire: number };

  constructor(status: SourceGroupStatus) {
    this.baseline = { epoch: status.epoch, raw: status.shipper.rawBytesSent, wire: status.shipper.wireBytesSent };
    this.note(status);
  }

  note(status: SourceGroupStatus): void {
    this.perEpoch.set(status.epoch, { raw: status.shipper.rawBytesSent, wire: status.shipper.wireBytesSent });
  }

  get epochs(): number {
    return this.perEpoch.size;
  }

  totals(): { rawBytes: number; wireBytes: number } {
    let rawBytes = 0;
    let wireBytes = 0;
    for (const [epoch, sent] of this.perEpoch) {
      rawBytes += sent.raw - (epoch === this.baseline.epoch ? this.baseline.raw : 0);
      wireBytes += sent.wire - (epoch === this.baseline.epoch ? this.baseline.wire : 0);
    }
    return { rawBytes, wireBytes };
  }
}

/** Polls the source's status every sampleIntervalMs until stopped. */
function startSampler(source: Appliance, startedMs: number, shipped: ShippedTotals): { stop(): Promise<Sample[]>; errors: () => number } {
  const samples: Sample[] = [];
  let running = true;
  let errors = 0;
  const loop = (async () => {
    while (running) {
      const due = Date.now() + sampleIntervalMs;
      try {
        const status = await source.api<SourceGroupStatus>(`/v1/groups/${group}`);
        shipped.note(status);
        samples.push({
          atMs: Date.now() - startedMs,
          rpoMs: status.rpoMs,
          mode: status.queue.mode,
          modeReason: status.queue.modeReason,
          queuedBytes: status.queue.queuedBytes,
          spillBytes: status.queue.spillBytes,
          bitmapEpisodes: status.queue.bitmapEpisodes,
        });
      } catch {
        errors++;
      }
      await sleep(Math.max(0, due - Date.now()));
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      return samples;
    },
    errors: () => errors,
  };
}

// ------------------------------------------------------------------ fio

interface FioResult {
  iops: number;
  mibPerS: number;
  bytes: number;
  runtimeMs: number;
  clatP50Us: number;
  clatP99Us: number;
}

interface FioReport {
  jobs: {
    error: number;
    write: { iops: number; bw_bytes: number; io_bytes: number; runtime: number; clat_ns: { percentile?: Record<string, number> } };
  }[];
}

function fioArgs(workload: WorkloadDefinition, uri: string, options: Options, output: string, rateBytesPerSecond?: number): string[] {
  const args = [
    `--name=${workload.id}`,
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${workload.rw}`,
    `--bs=${workload.blockSize}`,
    `--iodepth=${workload.iodepth}`,
    '--numjobs=1',
    // The job as a thread of the fio we start: a job process of its own outlives a kill of that fio.
    '--thread',
    '--norandommap',
    '--refill_buffers',
    '--time_based',
    `--runtime=${options.durationS}`,
    `--ramp_time=${options.rampS}`,
    '--output-format=json',
    `--output=${output}`,
  ];
  if (rateBytesPerSecond !== undefined) args.push(`--rate=${Math.round(rateBytesPerSecond)}`);
  return args;
}

/** Writes back the file's dirty pages and drops its pages from the page cache (posix_fadvise DONTNEED through dd). */
async function dropPageCache(file: string): Promise<void> {
  await runTracked('sync', ['--data', file], { timeoutMs: 120_000 });
  await runTracked('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none'], { timeoutMs: 60_000 });
}

async function runFio(workload: WorkloadDefinition, uri: string, options: Options, dir: string, rateBytesPerSecond?: number): Promise<FioResult> {
  const output = path.join(dir, `${workload.id}.fio.json`);
  await runTracked('fio', fioArgs(workload, uri, options, output, rateBytesPerSecond), { timeoutMs: (options.durationS + options.rampS + 120) * 1000, cwd: dir });
  // With --thread, the nbd engine's "fio: connected to NBD server" lands in the output file before the report.
  const text = fs.readFileSync(output, 'utf8');
  const reportAt = text.search(/^\{/m);
  if (reportAt < 0) throw new Error(`fio wrote no JSON report to ${output}: ${text.slice(0, 2000)}`);
  const report = JSON.parse(text.slice(reportAt)) as FioReport;
  fs.rmSync(output, { force: true });
  const job = report.jobs[0]!;
  if (job.error !== 0) throw new Error(`fio ${workload.id} reported error ${job.error}`);
  const percentile = job.write.clat_ns.percentile ?? {};
  return {
    iops: job.write.iops,
    mibPerS: job.write.bw_bytes / mib,
    bytes: job.write.io_bytes,
    runtimeMs: job.write.runtime,
    clatP50Us: (percentile['50.000000'] ?? NaN) / 1000,
    clatP99Us: (percentile['99.000000'] ?? NaN) / 1000,
  };
}

// ------------------------------------------------------------------ measurements

interface ProtectedRecord {
  run: number;
  phase: 'throughput' | 'paced';
  workload: WorkloadId;
  protection: 'on';
  codec: CodecId;
  fio: FioResult;
  rateBytesPerSecond?: number;
  /** Sampled while fio ran. */
  rpoMedianMs: number;
  rpoP99Ms: number;
  rpoMaxMs: number;
  samples: number;
  sampleErrors: number;
  modesSeen: string[];
  /** Why the queue left memory mode, as it said. */
  modeReasons: string[];
  spillBytesMax: number;
  queuedBytesMax: number;
  bitmapEpisodes: number;
  /** From fio's end until the source had nothing queued. */
  drainMs: number;
  promoted: boolean;
  rawBytesShipped: number;
  wireBytesShipped: number;
  shipperEpochs: number;
  /** Raw bytes shipped over the time from fio's start until drained. */
  shipRateBytesPerSecond: number;
  sourceCpuS: number;
  targetCpuS: number;
  /** The system-mode part of the above. */
  sourceSystemCpuS: number;
  targetSystemCpuS: number;
  cpuSPerGiBShipped: number;
  sourceMinorFaults: number;
  targetMinorFaults: number;
  /** Dirty-region marks during the measurement that had to write and sync the log (slow) or found the region durable (fast). */
  dirtyMarksSlow: number;
  dirtyMarksFast: number;
  /** CPU per thread name, e.g. "main 9.1 s, libuv-worker 2.0 s". */
  sourceThreadCpu: string;
  targetThreadCpu: string;
  loadAverage1m: number;
}

interface PlainRecord {
  run: number;
  phase: 'throughput';
  workload: WorkloadId;
  protection: 'off';
  fio: FioResult;
  applianceCpuS: number;
  applianceSystemCpuS: number;
  applianceMinorFaults: number;
  applianceThreadCpu: string;
  cpuSPerGiBWritten: number;
  loadAverage1m: number;
}

interface MixedRecord {
  run: number;
  phase: 'mixed';
  codec: CodecId;
  bytesWritten: number;
  copyS: number;
  drainMs: number;
  promoted: boolean;
  rawBytesShipped: number;
  wireBytesShipped: number;
  wirePerByteWritten: number;
  rawPerByteWritten: number;
  sourceCpuS: number;
  targetCpuS: number;
  sourceSystemCpuS: number;
  targetSystemCpuS: number;
  cpuSPerGiBShipped: number;
  /** Over the data set's bytes: whole zero blocks ship as zero entries, so fewer raw bytes are shipped than written. */
  cpuSPerGiBWritten: number;
  modesSeen: string[];
  loadAverage1m: number;
}

async function measureProtected(context: Context, workload: WorkloadDefinition, run: number, phase: 'throughput' | 'paced', rateBytesPerSecond?: number): Promise<ProtectedRecord> {
  const { sites, options } = context;
  const loadAverage1m = round2(os.loadavg()[0]!);
  const pair = await startPair(sites, 'lz4', options);
  try {
    const ready = await waitDrained(pair, 'the source to be in sync with nothing queued before fio');
    // The target promotes what it holds (an initial sync's records, say) before fio starts, so that the
    // measurement sees only the work fio causes.
    const idleStartMs = Date.now();
    const idleBefore = await waitPromoted(pair, options);
    log(`  before fio: the source shipped ${formatMiB(ready.shipper.rawBytesSent)} raw since it started (sync: ${JSON.stringify(ready.sync)}); the target promoted it all: ${idleBefore ? 'yes' : 'NO'} after ${((Date.now() - idleStartMs) / 1000).toFixed(1)} s`);
    if (options.dropVolumeCache) await dropPageCache(sites.volumePath);
    const shipped = new ShippedTotals(ready);
    const cpuBefore = { source: cpuTimes(pair.source.pid), target: cpuTimes(pair.target.pid) };
    const threadsBefore = { source: threadCpuTimes(pair.source.pid), target: threadCpuTimes(pair.target.pid) };
    const startedMs = Date.now();
    const sampler = startSampler(pair.source, startedMs, shipped);
    let fio: FioResult;
    let samples: Sample[];
    try {
      fio = await runFio(workload, `${pair.source.nbd}/disk0`, options, sites.dir, rateBytesPerSecond);
    } finally {
      samples = await sampler.stop();
    }
    const fioEndMs = Date.now();
    let bitmapEpisodes = samples.reduce((most, sample) => Math.max(most, sample.bitmapEpisodes), 0);
    const modeReasons = new Set(samples.filter((sample) => sample.mode !== 'memory').map((sample) => sample.modeReason));
    const final = await waitDrained(pair, 'the source to drain after fio', (status) => {
      shipped.note(status);
      bitmapEpisodes = Math.max(bitmapEpisodes, status.queue.bitmapEpisodes);
      if (status.queue.mode !== 'memory') modeReasons.add(status.queue.modeReason);
    });
    const drainedMs = Date.now();
    shipped.note(final);
    const promoted = await waitPromoted(pair, options);
    const cpuAfter = { source: cpuTimes(pair.source.pid), target: cpuTimes(pair.target.pid) };
    const threadsAfter = { source: threadCpuTimes(pair.source.pid), target: threadCpuTimes(pair.target.pid) };
    const { rawBytes, wireBytes } = shipped.totals();
    const rpo = samples.map((sample) => sample.rpoMs);
    const sourceCpu = cpuSpent(cpuBefore.source, cpuAfter.source);
    const targetCpu = cpuSpent(cpuBefore.target, cpuAfter.target);
    const sourceCpuS = sourceCpu.totalS;
    const targetCpuS = targetCpu.totalS;
    const record: ProtectedRecord = {
      run,
      phase,
      workload: workload.id,
      protection: 'on',
      codec: 'lz4',
      fio,
      rpoMedianMs: median(rpo),
      rpoP99Ms: percentile(rpo, 0.99),
      rpoMaxMs: Math.max(...rpo),
      samples: samples.length,
      sampleErrors: sampler.errors(),
      modesSeen: [...new Set(samples.map((sample) => sample.mode))],
      modeReasons: [...modeReasons],
      spillBytesMax: samples.reduce((most, sample) => Math.max(most, sample.spillBytes), 0),
      queuedBytesMax: samples.reduce((most, sample) => Math.max(most, sample.queuedBytes), 0),
      bitmapEpisodes,
      drainMs: drainedMs - fioEndMs,
      promoted,
      rawBytesShipped: rawBytes,
      wireBytesShipped: wireBytes,
      shipperEpochs: shipped.epochs,
      shipRateBytesPerSecond: (rawBytes * 1000) / (drainedMs - startedMs),
      sourceCpuS: round3(sourceCpuS),
      targetCpuS: round3(targetCpuS),
      sourceSystemCpuS: sourceCpu.systemS,
      targetSystemCpuS: targetCpu.systemS,
      cpuSPerGiBShipped: rawBytes > 0 ? round3((sourceCpuS + targetCpuS) / (rawBytes / gib)) : NaN,
      dirtyMarksSlow: final.dirtyLog.marksSlow - ready.dirtyLog.marksSlow,
      dirtyMarksFast: final.dirtyLog.marksFast - ready.dirtyLog.marksFast,
      sourceMinorFaults: sourceCpu.minorFaults,
      targetMinorFaults: targetCpu.minorFaults,
      sourceThreadCpu: threadCpuSpent(threadsBefore.source, threadsAfter.source),
      targetThreadCpu: threadCpuSpent(threadsBefore.target, threadsAfter.target),
      loadAverage1m,
    };
    if (rateBytesPerSecond !== undefined) record.rateBytesPerSecond = Math.round(rateBytesPerSecond);
    return record;
  } finally {
    await stopPair(pair);
  }
}

async function measurePlain(context: Context, workload: WorkloadDefinition, run: number): Promise<PlainRecord> {
  const { sites, options } = context;
  const loadAverage1m = round2(os.loadavg()[0]!);
  const appliance = await startAppliance({ name: 'unprotected', dataDir: sites.plainDataDir, configPath: sites.plainConfigPath, profileDir: options.profileDir });
  try {
    if (options.dropVolumeCache) await dropPageCache(sites.volumePath);
    const cpuBefore = cpuTimes(appliance.pid);
    const threadsBefore = threadCpuTimes(appliance.pid);
    const fio = await runFio(workload, `${appliance.nbd}/disk0`, options, sites.dir);
    const cpu = cpuSpent(cpuBefore, cpuTimes(appliance.pid));
    const applianceThreadCpu = threadCpuSpent(threadsBefore, threadCpuTimes(appliance.pid));
    return { run, phase: 'throughput', workload: workload.id, protection: 'off', fio, applianceCpuS: cpu.totalS, applianceSystemCpuS: cpu.systemS, applianceMinorFaults: cpu.minorFaults, applianceThreadCpu, cpuSPerGiBWritten: round3(cpu.totalS / (fio.bytes / gib)), loadAverage1m };
  } finally {
    const exit = await appliance.stop();
    if (exit !== '0') log(`warning: the unprotected appliance exited with ${exit}: ${appliance.logTail().slice(-1000)}`);
  }
}

async function measureMixed(context: Context, codec: CodecId, run: number): Promise<MixedRecord> {
  const { sites, options } = context;
  const loadAverage1m = round2(os.loadavg()[0]!);
  const pair = await startPair(sites, codec, options);
  try {
    const ready = await waitDrained(pair, 'the source to be in sync with nothing queued before the copy');
    const shipped = new ShippedTotals(ready);
    const modes = new Set<string>([ready.queue.mode]);
    const cpuBefore = { source: cpuTimes(pair.source.pid), target: cpuTimes(pair.target.pid) };
    const started = Date.now();
    // --sparse=0: every block goes as a WRITE with its data, zeros included, so the codec sees the whole mix.
    await runTracked('nbdcopy', ['--sparse=0', context.mixedFile, `${pair.source.nbd}/disk0`], { timeoutMs: 600_000 });
    const copiedMs = Date.now();
    const final = await waitDrained(pair, `the source to drain after the ${codec} copy`, (status) => {
      shipped.note(status);
      modes.add(status.queue.mode);
    });
    const drainedMs = Date.now();
    shipped.note(final);
    const promoted = await waitPromoted(pair, options);
    const cpuAfter = { source: cpuTimes(pair.source.pid), target: cpuTimes(pair.target.pid) };
    const { rawBytes, wireBytes } = shipped.totals();
    const sourceCpu = cpuSpent(cpuBefore.source, cpuAfter.source);
    const targetCpu = cpuSpent(cpuBefore.target, cpuAfter.target);
    const sourceCpuS = sourceCpu.totalS;
    const targetCpuS = targetCpu.totalS;
    return {
      run,
      phase: 'mixed',
      codec,
      bytesWritten: options.mixedBytes,
      copyS: round3((copiedMs - started) / 1000),
      drainMs: drainedMs - copiedMs,
      promoted,
      rawBytesShipped: rawBytes,
      wireBytesShipped: wireBytes,
      wirePerByteWritten: round4(wireBytes / options.mixedBytes),
      rawPerByteWritten: round4(rawBytes / options.mixedBytes),
      sourceCpuS: round3(sourceCpuS),
      targetCpuS: round3(targetCpuS),
      sourceSystemCpuS: sourceCpu.systemS,
      targetSystemCpuS: targetCpu.systemS,
      cpuSPerGiBShipped: round3((sourceCpuS + targetCpuS) / (rawBytes / gib)),
      cpuSPerGiBWritten: round3((sourceCpuS + targetCpuS) / (options.mixedBytes / gib)),
      modesSeen: [...modes],
      loadAverage1m,
    };
  } finally {
    await stopPair(pair);
  }
}

// ------------------------------------------------------------------ data

/** The vm-mix data set of bench/codec.ts (same proportions and kinds of block), written to a file. */
function writeVmMix(file: string, bytes: number, seed: number): string {
  const random = prng(seed);
  const binaries = systemBinaries(64 * mib);
  const fd = fs.openSync(file, 'w', 0o600);
  try {
    const chunk = Buffer.alloc(4 * mib);
    for (let done = 0; done < bytes; ) {
      const step = Math.min(chunk.length, bytes - done);
      vmMix(step, random, binaries.data).copy(chunk);
      let written = 0;
      while (written < step) written += fs.writeSync(fd, chunk, written, step - written, done + written);
      done += step;
    }
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  return `4 KiB blocks drawn at random (seed ${seed}): 30 % zeros, 15 % random, 15 % log text, 25 % binaries (64 MiB of ${binaries.source}), 15 % inode-table records`;
}





/** Writes every block of the volume (zeros), so that no run pays for allocating the file. */
function preallocate(file: string, bytes: number): void {
  const fd = fs.openSync(file, 'w', 0o600);
  try {
    const chunk = Buffer.alloc(4 * mib);
    for (let done = 0; done < bytes; ) {
      const step = Math.min(chunk.length, bytes - done);
      let written = 0;
      while (written < step) written += fs.writeSync(fd, chunk, written, step - written, done + written);
      done += step;
    }
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

// ------------------------------------------------------------------ machine

interface Machine {
  cpuModel: string;
  cores: number;
  memoryGiB: number;
  kernel: string;
  node: string;
  fio: string;
  nbdcopy: string;
  filesystem: string;
  gitCommit: string;
  gitDirty: boolean;
  buildSha256?: string;
  loadAverageStart: number[];
  loadAverageEnd?: number[];
}

async function firstLine(command: string, args: string[]): Promise<string> {
  try {
    const result = await run(command, args, { allowFailure: true, timeoutMs: 20_000 });
    return (result.stdout || result.stderr).trim().split('\n')[0] ?? '';
  } catch (error) {
    return `unavailable (${(error as Error).message.split('\n')[0]})`;
  }
}

async function describeMachine(dir: string): Promise<Machine> {
  const cpuinfo = fs.readFileSync('/proc/cpuinfo', 'utf8');
  const model = /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1] ?? os.cpus()[0]?.model ?? 'unknown';
  const df = await run('df', ['--output=source,fstype,target', dir], { allowFailure: true });
  const dfLine = df.stdout.trim().split('\n')[1]?.trim().split(/\s+/) ?? [];
  const commit = await run('git', ['-C', repositoryRoot, 'rev-parse', '--short', 'HEAD'], { allowFailure: true });
  const status = await run('git', ['-C', repositoryRoot, 'status', '--porcelain', '--untracked-files=no', '--', 'src', 'bin', 'binding.gyp'], { allowFailure: true });
  return {
    cpuModel: model.trim(),
    cores: os.cpus().length,
    memoryGiB: Math.round((os.totalmem() / gib) * 10) / 10,
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
    fio: await firstLine('fio', ['--version']),
    nbdcopy: await firstLine('nbdcopy', ['--version']),
    filesystem: dfLine.length >= 3 ? `${dfLine[1]} on ${dfLine[0]} mounted at ${dfLine[2]}` : 'unknown',
    gitCommit: commit.stdout.trim() || 'unknown',
    gitDirty: status.stdout.trim().length > 0,
    loadAverageStart: os.loadavg().map(round2),
  };
}

// ------------------------------------------------------------------ report

interface Context {
  options: Options;
  sites: Sites;
  mixedFile: string;
}

interface Row {
  what: string;
  on: string;
  off: string;
  ratio: string;
  goal: string;
  met: string;
}

interface Results {
  protectedRuns: ProtectedRecord[];
  plainRuns: PlainRecord[];
  mixedRuns: MixedRecord[];
}

function summarise(options: Options, results: Results): { rows: Row[]; notes: string[]; medians: Record<string, unknown> } {
  const rows: Row[] = [];
  const notes: string[] = [];
  const medians: Record<string, unknown> = {};
  const range = (values: number[], format: (value: number) => string): string => (values.length > 1 ? ` (${format(Math.min(...values))}-${format(Math.max(...values))})` : '');
  const seconds = (ms: number): string => (ms >= 10_000 ? `${(ms / 1000).toFixed(1)} s` : `${(ms / 1000).toFixed(2)} s`);

  for (const workloadId of options.workloads) {
    const workload = workloads[workloadId];
    const on = results.protectedRuns.filter((record) => record.phase === 'throughput' && record.workload === workloadId);
    const off = results.plainRuns.filter((record) => record.workload === workloadId);
    if (on.length === 0 && off.length === 0) continue;
    const value = (fio: FioResult): number => (workload.unit === 'IOPS' ? fio.iops : fio.mibPerS);
    const onValues = on.map((record) => value(record.fio));
    const offValues = off.map((record) => value(record.fio));
    const onMedian = median(onValues);
    const offMedian = median(offValues);
    const ratio = onMedian / offMedian;
    const ok = ratio >= workload.goal;
    rows.push({
      what: `${workload.title}, ${workload.unit}`,
      on: on.length ? `${formatValue(onMedian)}${range(onValues, formatValue)}` : 'n/a',
      off: off.length ? `${formatValue(offMedian)}${range(offValues, formatValue)}` : 'n/a',
      ratio: Number.isFinite(ratio) ? `${ratio.toFixed(2)}x` : 'n/a',
      goal: `>= ${workload.goal.toFixed(1)}x`,
      met: Number.isFinite(ratio) ? (ok ? 'met' : 'MISSED') : 'n/a',
    });
    medians[`${workloadId}.on`] = onMedian;
    medians[`${workloadId}.off`] = offMedian;
    medians[`${workloadId}.ratio`] = round3(ratio);
    if (on.length === 0) continue;

    // RPO under the unthrottled load: the goal applies only where the link carried the write rate,
    // i.e. the queue never left memory mode and drained within a second of fio's end.
    const carried = on.every((record) => record.modesSeen.every((mode) => mode === 'memory') && record.bitmapEpisodes === 0 && record.drainMs <= 1000);
    const rpoMedian = median(on.map((record) => record.rpoMedianMs));
    const rpoP99 = median(on.map((record) => record.rpoP99Ms));
    const unthrottledNote = carried ? '' : ' (the stream fell behind the writes: the goal is for the paced rows)';
    rows.push({
      what: `RPO median, ${workload.title} unthrottled`,
      on: `${seconds(rpoMedian)}${range(on.map((record) => record.rpoMedianMs), seconds)}`,
      off: '-',
      ratio: '-',
      goal: `< 1 s${unthrottledNote}`,
      met: carried ? (rpoMedian < rpoMedianGoalMs ? 'met' : 'MISSED') : '-',
    });
    rows.push({
      what: `RPO p99, ${workload.title} unthrottled`,
      on: `${seconds(rpoP99)}${range(on.map((record) => record.rpoP99Ms), seconds)}`,
      off: '-',
      ratio: '-',
      goal: `< 5 s${unthrottledNote}`,
      met: carried ? (rpoP99 < rpoP99GoalMs ? 'met' : 'MISSED') : '-',
    });
    const shipRate = median(on.map((record) => record.shipRateBytesPerSecond)) / mib;
    const writeRate = median(on.map((record) => record.fio.mibPerS));
    rows.push({
      what: `Raw MiB/s shipped, ${workload.title} (fio start to drained)`,
      on: `${formatValue(shipRate)} (source accepted ${formatValue(writeRate)})`,
      off: '-',
      ratio: '-',
      goal: '-',
      met: '-',
    });
    const wirePerByte = median(on.map((record) => record.wireBytesShipped / record.rawBytesShipped));
    rows.push({ what: `Wire bytes per raw byte shipped, ${workload.title}, fresh random data, lz4`, on: wirePerByte.toFixed(3), off: '-', ratio: '-', goal: '-', met: '-' });
    const cpu = median(on.map((record) => record.cpuSPerGiBShipped));
    const cpuSource = median(on.map((record) => (record.sourceCpuS / record.rawBytesShipped) * gib));
    const cpuTarget = median(on.map((record) => (record.targetCpuS / record.rawBytesShipped) * gib));
    const cpuOff = median(off.map((record) => record.cpuSPerGiBWritten));
    rows.push({
      what: `CPU s per GiB shipped, ${workload.title} (on: source + target; off: the appliance per GiB written)`,
      on: `${cpu.toFixed(2)} (${cpuSource.toFixed(2)} + ${cpuTarget.toFixed(2)})`,
      off: off.length ? cpuOff.toFixed(2) : 'n/a',
      ratio: '-',
      goal: '-',
      met: '-',
    });
    medians[`${workloadId}.rpoMedianMs`] = rpoMedian;
    medians[`${workloadId}.rpoP99Ms`] = rpoP99;
    medians[`${workloadId}.shipRateMiBPerS`] = round2(shipRate);
    medians[`${workloadId}.cpuSPerGiBShipped`] = cpu;
    medians[`${workloadId}.cpuSPerGiBWrittenOff`] = cpuOff;
    const modes = [...new Set(on.flatMap((record) => record.modesSeen))];
    const episodes = on.map((record) => record.bitmapEpisodes);
    const reasons = [...new Set(on.flatMap((record) => record.modeReasons.map((reason) => reason.replace(/ at \S+Z?$/, '').replace(/ at [0-9T:.\-]+Z?/, ''))))];
    const systemShare = (system: number, total: number): string => `${Math.round((100 * system) / total)} %`;
    notes.push(
      `${workload.title}: share of CPU time in system mode: protected source ${systemShare(sum(on.map((record) => record.sourceSystemCpuS)), sum(on.map((record) => record.sourceCpuS)))}, target ${systemShare(sum(on.map((record) => record.targetSystemCpuS)), sum(on.map((record) => record.targetCpuS)))}` +
        (off.length ? `, unprotected appliance ${systemShare(sum(off.map((record) => record.applianceSystemCpuS)), sum(off.map((record) => record.applianceCpuS)))}` : ''),
    );
    notes.push(
      `${workload.title}: CPU by thread, run by run: protected source ${on.map((record) => `[${record.sourceThreadCpu}]`).join(' ')}; target ${on.map((record) => `[${record.targetThreadCpu}]`).join(' ')}` +
        (off.length ? `; unprotected appliance ${off.map((record) => `[${record.applianceThreadCpu}]`).join(' ')}` : ''),
    );
    notes.push(
      `${workload.title}, protected: dirty-region marks that wrote and synced the log, run by run: ${on.map((record) => `${record.dirtyMarksSlow.toLocaleString('en-US')} of ${(record.dirtyMarksSlow + record.dirtyMarksFast).toLocaleString('en-US')}`).join(', ')}`,
    );
    const faultsPerMiB = (faults: number, bytes: number): string => Math.round(faults / (bytes / mib)).toLocaleString('en-US');
    notes.push(
      `${workload.title}: minor page faults per MiB, run by run: protected source ${on.map((record) => faultsPerMiB(record.sourceMinorFaults, record.rawBytesShipped)).join(', ')}; target ${on.map((record) => faultsPerMiB(record.targetMinorFaults, record.rawBytesShipped)).join(', ')}` +
        (off.length ? `; unprotected appliance ${off.map((record) => faultsPerMiB(record.applianceMinorFaults, record.fio.bytes)).join(', ')}` : ''),
    );
    if (reasons.length) notes.push(`${workload.title}: the queue left memory mode because: ${reasons.join('; ')}`);
    notes.push(
      `${workload.title}, protected: queue modes seen ${modes.join(', ')}; most queued ${formatMiB(Math.max(...on.map((record) => record.queuedBytesMax)))}, most spilled ${formatMiB(Math.max(...on.map((record) => record.spillBytesMax)))}; bitmap episodes per run ${episodes.join(', ')}; drain after fio ${on.map((record) => seconds(record.drainMs)).join(', ')}; RPO max ${on.map((record) => seconds(record.rpoMaxMs)).join(', ')}` +
        (on.some((record) => record.shipperEpochs > 1) ? '; shipped totals are a lower bound (the shipper changed epoch, see the method)' : '') +
        (on.some((record) => !record.promoted) ? '; the target had not promoted everything when CPU was read in some runs' : ''),
    );
  }

  const paced = results.protectedRuns.filter((record) => record.phase === 'paced');
  if (paced.length > 0) {
    const rate = median(paced.map((record) => record.rateBytesPerSecond ?? NaN)) / mib;
    const rpoMedian = median(paced.map((record) => record.rpoMedianMs));
    const rpoP99 = median(paced.map((record) => record.rpoP99Ms));
    const carried = paced.every((record) => record.modesSeen.every((mode) => mode === 'memory') && record.bitmapEpisodes === 0);
    const how = options.pacedRateBytesPerSecond !== undefined ? 'as given' : `${options.pacedFraction}x the measured ship rate`;
    rows.push({
      what: `RPO median, 1 MiB writes paced at ${formatValue(rate)} MiB/s (${how})`,
      on: `${seconds(rpoMedian)}${range(paced.map((record) => record.rpoMedianMs), seconds)}`,
      off: '-',
      ratio: '-',
      goal: '< 1 s',
      met: rpoMedian < rpoMedianGoalMs ? 'met' : 'MISSED',
    });
    rows.push({
      what: `RPO p99, 1 MiB writes paced at ${formatValue(rate)} MiB/s`,
      on: `${seconds(rpoP99)}${range(paced.map((record) => record.rpoP99Ms), seconds)}`,
      off: '-',
      ratio: '-',
      goal: '< 5 s',
      met: rpoP99 < rpoP99GoalMs ? 'met' : 'MISSED',
    });
    medians['paced.rateMiBPerS'] = round2(rate);
    medians['paced.rpoMedianMs'] = rpoMedian;
    medians['paced.rpoP99Ms'] = rpoP99;
    notes.push(
      `Paced runs: fio achieved ${paced.map((record) => formatValue(record.fio.mibPerS)).join(', ')} MiB/s; queue modes seen ${[...new Set(paced.flatMap((record) => record.modesSeen))].join(', ')}${carried ? '' : ' (the queue left memory mode: the pace was above what the link carried)'}; RPO max ${paced.map((record) => seconds(record.rpoMaxMs)).join(', ')}; CPU s per GiB shipped ${paced.map((record) => record.cpuSPerGiBShipped.toFixed(2)).join(', ')}`,
    );
  }

  for (const codec of options.codecs) {
    const mixed = results.mixedRuns.filter((record) => record.codec === codec);
    if (mixed.length === 0) continue;
    const wire = median(mixed.map((record) => record.wirePerByteWritten));
    // Per byte written, not shipped: whole zero blocks go as zero entries, so the raw bytes shipped are fewer.
    const cpu = median(mixed.map((record) => record.cpuSPerGiBWritten));
    const cpuSource = median(mixed.map((record) => (record.sourceCpuS / record.bytesWritten) * gib));
    const cpuTarget = median(mixed.map((record) => (record.targetCpuS / record.bytesWritten) * gib));
    rows.push({ what: `Wire bytes per byte written, vm-mix, ${codec}`, on: wire.toFixed(3), off: '-', ratio: '-', goal: '-', met: '-' });
    rows.push({ what: `CPU s per GiB written, vm-mix, ${codec} (source + target)`, on: `${cpu.toFixed(2)} (${cpuSource.toFixed(2)} + ${cpuTarget.toFixed(2)})`, off: '-', ratio: '-', goal: '-', met: '-' });
    medians[`mixed.${codec}.wirePerByteWritten`] = wire;
    medians[`mixed.${codec}.cpuSPerGiBWritten`] = cpu;
    notes.push(
      `vm-mix with ${codec}: raw bytes shipped per byte written ${mixed.map((record) => record.rawPerByteWritten.toFixed(3)).join(', ')}; nbdcopy took ${mixed.map((record) => `${record.copyS.toFixed(1)} s`).join(', ')}, drain after it ${mixed.map((record) => seconds(record.drainMs)).join(', ')}; queue modes ${[...new Set(mixed.flatMap((record) => record.modesSeen))].join(', ')}`,
    );
  }
  return { rows, notes, medians };
}

function buildReport(options: Options, machine: Machine, startedAt: Date, mixedDescription: string, summary: ReturnType<typeof summarise>): string {
  const lines: string[] = [];
  const met = summary.rows.filter((row) => row.met === 'met').length;
  const missed = summary.rows.filter((row) => row.met === 'MISSED').length;
  lines.push(`# Replication benchmark ${startedAt.toISOString()}${options.quick ? ' (quick smoke run, not representative)' : ''}`);
  lines.push('');
  lines.push(`- Machine: ${machine.cpuModel}, ${machine.cores} cores, ${machine.memoryGiB} GiB RAM, ${machine.kernel}, node ${machine.node}; load average at start ${machine.loadAverageStart.join(' / ')}${machine.loadAverageEnd ? `, at end ${machine.loadAverageEnd.join(' / ')}` : ''} (shared machine: ratios matter more than absolutes)`);
  lines.push(`- Tools: ${machine.fio}; ${machine.nbdcopy}`);
  lines.push(`- Lifeline: git ${machine.gitCommit}${machine.gitDirty ? ' with uncommitted changes in src/' : ''}, run from a snapshot of the build taken at start (build sha256 ${machine.buildSha256 ?? 'n/a'})`);
  lines.push(`- Sites: two \`lifeline appliance\` processes on loopback, mutual TLS; source volume a preallocated ${formatMiB(options.volumeBytes)} raw file, ${machine.filesystem}, ${options.dropVolumeCache ? 'its page cache written back and dropped before every fio run' : 'its page cache as the preallocation (4 MiB writes) and the runs before left it (--keep-volume-cache)'}; queue 256 MiB memory / 4 GiB spill (the defaults); target journal 256 MiB units, 8 GiB limit, history ${options.historyMs / 1000} s; codec lz4 unless named`);
  lines.push(`- Protection off: the same appliance program with the same volume file but no \`protect\` entry (the NBD server exports the raw file, no tap), and no target running`);
  lines.push(`- fio: nbd engine over TCP (nbd://127.0.0.1:PORT/disk0), 1 job (--thread), ${options.durationS} s time-based${options.rampS > 0 ? ` of which the first ${options.rampS} s are a ramp fio does not count (CPU per GiB written is then overstated)` : ', no ramp (fio counts the whole run, as the CPU readings do)'}, --norandommap, --refill_buffers (fresh random data for every write)`);
  lines.push(`- Method: ${options.runs} run(s); in each run every workload runs with protection on and off, the order alternating from run to run; fresh appliance processes per measurement (SIGTERM by pid); with protection on, fio starts once the source is in sync with nothing queued and the target has promoted everything its journal held; figures are medians over runs, (min-max) where there are several`);
  lines.push(`- RPO: GET /v1/groups/${group} on the source every ${sampleIntervalMs} ms while fio runs; rpoMs = now - source time of the oldest unacknowledged entry (0 with nothing queued)`);
  lines.push(`- CPU: utime + stime of both appliance processes (every thread) from fio's start until the source drained and the target promoted everything, over the raw bytes shipped (shipper.rawBytesSent, resends and sync reads included)`);
  if (options.phases.includes('mixed')) lines.push(`- Mixed data set (${formatMiB(options.mixedBytes)}): ${mixedDescription}; written with \`nbdcopy --sparse=0\` (every block a WRITE with its data; the source ships whole 4 KiB zero blocks as zero entries, so its CPU is given per GiB written); wire bytes = shipper.wireBytesSent (batch headers and entry headers included, TLS framing not)`);
  if (options.profileDir) lines.push(`- The appliances ran with --cpu-prof (profiling overhead included: these figures are not comparable)`);
  lines.push('');
  lines.push('| what | protection on | protection off | ratio | goal | met? |');
  lines.push('|---|---:|---:|---:|---|---|');
  for (const row of summary.rows) lines.push(`| ${row.what} | ${row.on} | ${row.off} | ${row.ratio} | ${row.goal} | ${row.met} |`);
  lines.push('');
  lines.push(`Goals: ${met} met, ${missed} missed. For comparison, Ceph's journaled RBD mirroring keeps 41-68 % of the unprotected write throughput.`);
  lines.push('');
  lines.push('Notes:');
  for (const note of summary.notes) lines.push(`- ${note}`);
  return lines.join('\n');
}

// ------------------------------------------------------------------ helpers

function sum(values: number[]): number {
  return values.reduce((total, value) => total + value, 0);
}

function median(values: number[]): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const middle = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

/** Nearest-rank percentile. */
function percentile(values: number[], fraction: number): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(fraction * sorted.length) - 1))]!;
}

function round2(value: number): number {
  return Math.round(value * 100) / 100;
}

function round3(value: number): number {
  return Math.round(value * 1000) / 1000;
}

function round4(value: number): number {
  return Math.round(value * 10000) / 10000;
}

function formatValue(value: number): string {
  if (!Number.isFinite(value)) return 'n/a';
  return value >= 100 ? Math.round(value).toLocaleString('en-US') : value.toFixed(1);
}

function formatMiB(bytes: number): string {
  if (bytes >= gib && bytes % gib === 0) return `${bytes / gib} GiB`;
  return `${Math.round((bytes / mib) * 10) / 10} MiB`;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function stamp(date: Date): string {
  const pad = (n: number): string => String(n).padStart(2, '0');
  return `${date.getFullYear()}${pad(date.getMonth() + 1)}${pad(date.getDate())}-${pad(date.getHours())}${pad(date.getMinutes())}${pad(date.getSeconds())}`;
}

function log(message: string): void {
  process.stderr.write(`${message}\n`);
}

// ------------------------------------------------------------------ main

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const startedAt = new Date();
  for (const tool of ['fio', 'nbdcopy']) {
    await run(tool, ['--version'], { timeoutMs: 20_000 }).catch((error: Error) => {
      throw new Error(`Cannot run ${tool} (install it: see scripts/ensure-peers.sh): ${error.message.split('\n')[0]}`);
    });
  }
  if (!fs.existsSync(path.join(repositoryRoot, 'dist', 'src', 'cli', 'main.js'))) throw new Error("Cannot run the benchmark as Lifeline is not built: run 'npx tsc -p tsconfig.json' first");
  fs.mkdirSync(options.dir, { recursive: true });
  if (options.profileDir) fs.mkdirSync(options.profileDir, { recursive: true });
  const dir = fs.mkdtempSync(path.join(options.dir, 'lifeline-bench-replication-'));

  const cleanUp = (): void => {
    killAll();
    fs.rmSync(dir, { recursive: true, force: true });
  };
  const onSignal = (signal: NodeJS.Signals): void => {
    log(`\n${signal}: stopping the appliances and fio by pid and removing ${dir}`);
    cleanUp();
    process.exit(130);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  try {
    const machine = await describeMachine(options.dir);
    const snapshot = snapshotLifeline(dir);
    lifelineBin = snapshot.bin;
    machine.buildSha256 = snapshot.sha256;
    if (snapshot.staleSources.length > 0) log(`warning: dist/ is older than ${snapshot.staleSources.join(', ')}: run 'npx tsc -p tsconfig.json' (npm run bench:replication does)`);
    log(`lifeline: git ${machine.gitCommit}${machine.gitDirty ? ' (+ uncommitted src changes)' : ''}, build ${snapshot.sha256}`);
    log(`machine: ${machine.cpuModel}, ${machine.cores} cores, ${machine.kernel}, node ${machine.node}, load ${machine.loadAverageStart.join(' / ')}`);
    log(`files in ${dir} (${machine.filesystem})`);

    const sites = await makeSites(dir, options);
    log(`writing the ${formatMiB(options.volumeBytes)} source volume (every block allocated) ...`);
    preallocate(sites.volumePath, options.volumeBytes);
    const mixedFile = path.join(dir, 'vm-mix.raw');
    let mixedDescription = '';
    if (options.phases.includes('mixed')) {
      log(`writing the ${formatMiB(options.mixedBytes)} vm-mix data set ...`);
      mixedDescription = writeVmMix(mixedFile, options.mixedBytes, 20261122);
    }
    const context: Context = { options, sites, mixedFile };

    // The first start of the group syncs the whole volume; later starts after a drained stop sync nothing.
    log('initial sync of the volume to the target ...');
    {
      const syncStarted = Date.now();
      const pair = await startPair(sites, 'lz4', options);
      try {
        await waitDrained(pair, 'the initial sync');
      } finally {
        await stopPair(pair);
      }
      log(`initial sync done in ${((Date.now() - syncStarted) / 1000).toFixed(1)} s`);
    }

    const results: Results = { protectedRuns: [], plainRuns: [], mixedRuns: [] };
    const shipRates = (): number[] => results.protectedRuns.filter((record) => record.phase === 'throughput' && record.workload === 'seqwrite-1m').map((record) => record.shipRateBytesPerSecond);
    for (let runIndex = 1; runIndex <= options.runs; runIndex++) {
      if (options.phases.includes('throughput')) {
        for (const workloadId of options.workloads) {
          const workload = workloads[workloadId];
          // Alternate which goes first, so that drift on a shared machine hits both alike.
          const order: ('on' | 'off')[] = runIndex % 2 === 1 ? ['on', 'off'] : ['off', 'on'];
          for (const protection of order) {
            if (protection === 'on') {
              const record = await measureProtected(context, workload, runIndex, 'throughput');
              results.protectedRuns.push(record);
              log(
                `[run ${runIndex}] ${workloadId.padEnd(13)} on   ${formatValue(workload.unit === 'IOPS' ? record.fio.iops : record.fio.mibPerS).padStart(8)} ${workload.unit}  ` +
                  `RPO median ${record.rpoMedianMs} ms p99 ${record.rpoP99Ms} ms, modes ${record.modesSeen.join('/')}, bitmap ${record.bitmapEpisodes}, drain ${record.drainMs} ms, ` +
                  `shipped ${formatMiB(record.rawBytesShipped)} raw (${formatValue(record.shipRateBytesPerSecond / mib)} MiB/s), wire/raw ${(record.wireBytesShipped / record.rawBytesShipped).toFixed(3)}, ` +
                  `CPU ${record.sourceCpuS.toFixed(1)} + ${record.targetCpuS.toFixed(1)} s = ${record.cpuSPerGiBShipped.toFixed(2)} s/GiB (load ${record.loadAverage1m})`,
              );
            } else {
              const record = await measurePlain(context, workload, runIndex);
              results.plainRuns.push(record);
              log(`[run ${runIndex}] ${workloadId.padEnd(13)} off  ${formatValue(workload.unit === 'IOPS' ? record.fio.iops : record.fio.mibPerS).padStart(8)} ${workload.unit}  CPU ${record.applianceCpuS.toFixed(1)} s = ${record.cpuSPerGiBWritten.toFixed(2)} s/GiB written (load ${record.loadAverage1m})`);
            }
          }
        }
      }
      if (options.phases.includes('paced')) {
        const rates = shipRates();
        const rate = options.pacedRateBytesPerSecond ?? (rates.length ? options.pacedFraction * median(rates) : undefined);
        if (rate === undefined) {
          log(`[run ${runIndex}] paced: skipped (no measured ship rate: include the seqwrite-1m throughput runs or give --paced-rate)`);
        } else {
          const record = await measureProtected(context, workloads['seqwrite-1m'], runIndex, 'paced', rate);
          results.protectedRuns.push(record);
          log(`[run ${runIndex}] paced ${formatValue(rate / mib)} MiB/s: fio ${formatValue(record.fio.mibPerS)} MiB/s, RPO median ${record.rpoMedianMs} ms p99 ${record.rpoP99Ms} ms max ${record.rpoMaxMs} ms, modes ${record.modesSeen.join('/')}, drain ${record.drainMs} ms (load ${record.loadAverage1m})`);
        }
      }
      if (options.phases.includes('mixed')) {
        const shift = (runIndex - 1) % options.codecs.length;
        for (const codec of [...options.codecs.slice(shift), ...options.codecs.slice(0, shift)]) {
          const record = await measureMixed(context, codec, runIndex);
          results.mixedRuns.push(record);
          log(`[run ${runIndex}] vm-mix ${codec.padEnd(6)} wire/written ${record.wirePerByteWritten.toFixed(3)}, raw/written ${record.rawPerByteWritten.toFixed(3)}, copy ${record.copyS.toFixed(1)} s, drain ${record.drainMs} ms, CPU ${record.sourceCpuS.toFixed(1)} + ${record.targetCpuS.toFixed(1)} s = ${record.cpuSPerGiBWritten.toFixed(2)} s/GiB written (load ${record.loadAverage1m})`);
        }
      }
    }

    machine.loadAverageEnd = os.loadavg().map(round2);
    const summary = summarise(options, results);
    const report = buildReport(options, machine, startedAt, mixedDescription, summary);
    console.log(`\n${report}`);

    if (options.save && !options.profileDir) {
      const resultsDir = path.join(repositoryRoot, 'bench', 'results');
      fs.mkdirSync(resultsDir, { recursive: true });
      const base = `replication-${stamp(startedAt)}${options.quick ? '-quick' : ''}`;
      const json = {
        benchmark: 'replication',
        startedAt: startedAt.toISOString(),
        finishedAt: new Date().toISOString(),
        command: `node dist/bench/replication.js ${process.argv.slice(2).join(' ')}`.trim(),
        options,
        machine,
        workloads: Object.fromEntries(options.workloads.map((id) => [id, { ...workloads[id], command: `fio ${fioArgs(workloads[id], 'URI', options, 'OUT.json').join(' ')}` }])),
        mixedDataSet: mixedDescription || undefined,
        medians: summary.medians,
        table: summary.rows,
        runs: results,
      };
      fs.writeFileSync(path.join(resultsDir, `${base}.json`), `${JSON.stringify(json, null, 2)}\n`);
      fs.writeFileSync(path.join(resultsDir, `${base}.md`), `${report}\n`);
      if (!options.quick) fs.writeFileSync(path.join(resultsDir, 'replication-latest.md'), `${report}\n`);
      log(`\nsaved bench/results/${base}.json and bench/results/${base}.md${options.quick ? '' : ' (and bench/results/replication-latest.md)'}`);
    }
    if (options.profileDir) log(`\nCPU profiles of the appliances are in ${options.profileDir} (summarise with: node dist/bench/cpuprofile-summary.js ${options.profileDir}/source-*.cpuprofile)`);
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    cleanUp();
  }
}

main().catch((error: unknown) => {
  console.error(`bench/replication: ${(error as Error).stack ?? String(error)}`);
  killAll();
  process.exit(1);
});
