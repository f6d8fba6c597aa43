/**
 * NBD speed benchmark (run by hand with `npm run bench:nbd`; never part of the tests).
 *
 * Compares four servers on the same preallocated raw file, over the same
 * transport (a Unix socket):
 *   lifeline-tap-off  `lifeline nbd serve --tap off`
 *   lifeline-tap-on   `lifeline nbd serve --tap on` (counting consumer, CRC over every written byte)
 *   nbdkit            `nbdkit -f -U SOCKET file FILE` (page cache, multi-conn)
 *   qemu-nbd          `qemu-nbd -f raw -t --cache=writeback --aio=threads -e 8` (page cache,
 *                     no O_DIRECT, flushes honoured, multi-conn advertised because -e > 1)
 *
 * Workloads: fio's nbd engine (4 KiB random writes at iodepth 1 and 32, 1 MiB
 * sequential writes at iodepth 32, time-based with a ramp), a 1 GiB nbdcopy from
 * a random-content file to the export, and a 1 GiB nbdcopy from the export to null:.
 *
 * Each round runs every workload against every server, one fresh server
 * process per measurement, in round-robin order whose start rotates each round.
 * The file is synced (fdatasync) after every measurement so that no server pays
 * for the previous one's dirty pages. Medians over the rounds are compared, and
 * each server's CPU use (whole process and main thread, from /proc) is reported.
 * Lifeline runs from a copy of the build taken at start, so a rebuild of the
 * shared work tree during the run cannot change the code under test.
 *
 *   node dist/bench/nbd.js [--rounds N] [--quick] [--duration S] [--ramp S] [--size SIZE]
 *                          [--dir DIR] [--servers a,b] [--workloads a,b]
 *                          [--profile-dir DIR] [--no-save]
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { repositoryRoot, run } from '../test/helpers.js';
import { parseSizeBytes } from '../src/util/size.js';
import { snapshotLifeline } from './snapshot.js';

// ------------------------------------------------------------------ options

interface Options {
  rounds: number;
  durationS: number;
  rampS: number;
  fileBytes: number;
  dir: string;
  quick: boolean;
  servers: ServerId[];
  workloads: WorkloadId[];
  profileDir: string | undefined;
  save: boolean;
  sync: boolean;
}

const serverIds = ['lifeline-tap-off', 'lifeline-tap-on', 'nbdkit', 'qemu-nbd'] as const;
type ServerId = (typeof serverIds)[number];
const workloadIds = ['randwrite-4k-qd1', 'randwrite-4k-qd32', 'seqwrite-1m-qd32', 'nbdcopy-file-to-nbd', 'nbdcopy-nbd-to-null'] as const;
type WorkloadId = (typeof workloadIds)[number];

const usage = `Usage: node dist/bench/nbd.js [options]   (or: npm run bench:nbd -- [options])

  --rounds N         rounds over every server and workload (default 3; env LIFELINE_BENCH_ROUNDS)
  --quick            smoke run: 1 round, 3 s fio runs with a 1 s ramp (results not marked latest)
  --duration S       seconds each fio run measures (default 12)
  --ramp S           seconds of fio ramp before measuring (default 3)
  --size SIZE        size of the served file and of each nbdcopy (default 1G)
  --dir DIR          where the files and sockets live (default: the OS temporary directory)
  --servers LIST     comma-separated subset of: ${serverIds.join(', ')}
  --workloads LIST   comma-separated subset of: ${workloadIds.join(', ')}
  --profile-dir DIR  run Lifeline with node --cpu-prof --cpu-prof-dir=DIR (profiles, not figures)
  --no-sync          do not fdatasync the file between measurements
  --no-save          print only; do not write bench/results/`;

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      rounds: { type: 'string' },
      quick: { type: 'boolean', default: false },
      duration: { type: 'string' },
      ramp: { type: 'string' },
      size: { type: 'string', default: '1G' },
      dir: { type: 'string' },
      servers: { type: 'string' },
      workloads: { type: 'string' },
      'profile-dir': { type: 'string' },
      'no-sync': { type: 'boolean', default: false },
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
  const positiveNumber = (what: string, text: string | undefined, fallback: number, integer: boolean): number => {
    if (text === undefined) return fallback;
    const value = Number(text);
    if (!Number.isFinite(value) || value < (what === 'ramp' ? 0 : 1) || (integer && !Number.isInteger(value))) {
      throw new Error(`Cannot read --${what} '${text}': expected a ${integer ? 'whole ' : ''}number`);
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
  return {
    rounds: positiveNumber('rounds', values.rounds ?? process.env.LIFELINE_BENCH_ROUNDS, quick ? 1 : 3, true),
    durationS: positiveNumber('duration', values.duration, quick ? 3 : 12, true),
    rampS: positiveNumber('ramp', values.ramp, quick ? 1 : 3, true),
    fileBytes: parseSizeBytes(values.size!),
    dir: path.resolve(values.dir ?? os.tmpdir()),
    quick,
    servers: pick('servers', values.servers, serverIds),
    workloads: pick('workloads', values.workloads, workloadIds),
    profileDir: values['profile-dir'] ? path.resolve(values['profile-dir']) : undefined,
    save: !values['no-save'],
    sync: !values['no-sync'],
  };
}

// ------------------------------------------------------------------ servers

interface ServerDefinition {
  id: ServerId;
  /** How it is run, for the report. */
  settings: string;
  command(file: string, socket: string, options: Options): { command: string; args: string[] };
}

const qemuNbdShared = 8;

const servers: Record<ServerId, ServerDefinition> = {
  'lifeline-tap-off': {
    id: 'lifeline-tap-off',
    settings: 'lifeline nbd serve --tap off: buffered I/O through the page cache (no O_DIRECT), flush = fdatasync, multi-conn advertised',
    command: (file, socket, options) => lifelineCommand(file, socket, 'off', options),
  },
  'lifeline-tap-on': {
    id: 'lifeline-tap-on',
    settings: 'lifeline nbd serve --tap on: as tap-off, every write/zero/trim handed in order to the counting consumer (counts + a running CRC over every written byte)',
    command: (file, socket, options) => lifelineCommand(file, socket, 'on', options),
  },
  nbdkit: {
    id: 'nbdkit',
    settings: 'nbdkit -f -U SOCKET file FILE: defaults (16 threads, parallel thread model, cache=default i.e. page cache, fadvise=normal), multi-conn advertised',
    command: (file, socket) => ({ command: 'nbdkit', args: ['-f', '-U', socket, 'file', `file=${file}`] }),
  },
  'qemu-nbd': {
    id: 'qemu-nbd',
    settings: `qemu-nbd -f raw -t --cache=writeback --aio=threads --discard=unmap -e ${qemuNbdShared}: page cache, no O_DIRECT, flushes honoured, detect-zeroes off; -e ${qemuNbdShared} (> 1) makes it advertise multi-conn`,
    command: (file, socket) => ({
      command: 'qemu-nbd',
      args: ['-f', 'raw', '-t', '-k', socket, '--cache=writeback', '--aio=threads', '--discard=unmap', '-e', String(qemuNbdShared), file],
    }),
  },
};

/** `bin/lifeline` of the snapshot the run uses (see `snapshotLifeline`). */
let lifelineBin = path.join(repositoryRoot, 'bin', 'lifeline');

function lifelineCommand(file: string, socket: string, tap: 'on' | 'off', options: Options): { command: string; args: string[] } {
  const profile = options.profileDir ? ['--cpu-prof', `--cpu-prof-dir=${options.profileDir}`] : [];
  return {
    command: process.execPath,
    args: [...profile, lifelineBin, 'nbd', 'serve', '--socket', socket, '--export', `disk=${file}`, '--tap', tap],
  };
}

interface RunningServer {
  id: ServerId;
  pid: number;
  uri: string;
  stop(): Promise<{ code: number | null; signal: string | null; stdout: string; stderr: string }>;
}

let current: { child: ChildProcess; socket: string } | undefined;

async function startServer(definition: ServerDefinition, file: string, socket: string, options: Options): Promise<RunningServer> {
  fs.rmSync(socket, { force: true });
  const { command, args } = definition.command(file, socket, options);
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  current = { child, socket };
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (chunk) => (stdout += chunk));
  child.stderr!.on('data', (chunk) => (stderr += chunk));
  const exited = new Promise<{ code: number | null; signal: string | null }>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  child.once('error', () => undefined);
  const uri = `nbd+unix:///?socket=${socket}`;
  const deadline = Date.now() + 20_000;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) {
      throw new Error(`${definition.id} exited before serving\ncommand: ${command} ${args.join(' ')}\nstdout: ${stdout}\nstderr: ${stderr}`);
    }
    if (fs.existsSync(socket)) {
      // A full handshake proves the server is ready (a bare connect would not).
      const probe = await run('nbdinfo', ['--size', uri], { allowFailure: true, timeoutMs: 10_000 });
      if (probe.code === 0) break;
    }
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`${definition.id} did not start serving in 20 s\nstdout: ${stdout}\nstderr: ${stderr}`);
    }
    await sleep(25);
  }
  const pid = child.pid;
  return {
    id: definition.id,
    pid,
    uri,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) process.kill(pid, 'SIGTERM');
      const timer = setTimeout(() => {
        if (child.exitCode === null && child.signalCode === null) process.kill(pid, 'SIGKILL');
      }, 60_000);
      const result = await exited;
      clearTimeout(timer);
      current = undefined;
      fs.rmSync(socket, { force: true });
      return { ...result, stdout, stderr };
    },
  };
}

// ---------------------------------------------------------------- workloads

interface Measurement {
  /** IOPS or MiB/s: bigger is better. */
  value: number;
  details: Record<string, unknown>;
}

interface WorkloadDefinition {
  id: WorkloadId;
  title: string;
  unit: 'IOPS' | 'MiB/s';
  describe(options: Options): string;
  run(uri: string, context: { dir: string; source: string; options: Options }): Promise<Measurement>;
}

const mib = 1024 * 1024;

function fioWorkload(id: WorkloadId, title: string, rw: 'randwrite' | 'write', bs: string, iodepth: number, unit: 'IOPS' | 'MiB/s'): WorkloadDefinition {
  const fioArgs = (uri: string, options: Options, output: string): string[] => [
    `--name=${id}`,
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${rw}`,
    `--bs=${bs}`,
    `--iodepth=${iodepth}`,
    '--numjobs=1',
    '--norandommap',
    '--time_based',
    `--runtime=${options.durationS}`,
    `--ramp_time=${options.rampS}`,
    '--output-format=json',
    `--output=${output}`,
  ];
  return {
    id,
    title,
    unit,
    describe: (options) => `fio ${fioArgs('URI', options, 'OUT.json').join(' ')}`,
    async run(uri, { dir, options }) {
      const output = path.join(dir, `${id}.fio.json`);
      await run('fio', fioArgs(uri, options, output), { timeoutMs: (options.durationS + options.rampS + 60) * 1000 });
      const report = JSON.parse(fs.readFileSync(output, 'utf8')) as FioReport;
      fs.rmSync(output, { force: true });
      const job = report.jobs[0]!;
      if (job.error !== 0) throw new Error(`fio ${id} reported error ${job.error}`);
      const write = job.write;
      const percentile = write.clat_ns.percentile ?? {};
      const details = {
        iops: write.iops,
        mibPerS: write.bw_bytes / mib,
        ios: write.total_ios,
        runtimeMs: write.runtime,
        clatMeanUs: write.clat_ns.mean / 1000,
        clatP50Us: (percentile['50.000000'] ?? NaN) / 1000,
        clatP99Us: (percentile['99.000000'] ?? NaN) / 1000,
        fioCpuUser: job.usr_cpu,
        fioCpuSys: job.sys_cpu,
      };
      return { value: unit === 'IOPS' ? write.iops : write.bw_bytes / mib, details };
    },
  };
}

interface FioReport {
  jobs: {
    error: number;
    usr_cpu: number;
    sys_cpu: number;
    write: { iops: number; bw_bytes: number; total_ios: number; runtime: number; clat_ns: { mean: number; percentile?: Record<string, number> } };
  }[];
}

async function timedNbdcopy(args: string[], bytes: number): Promise<Measurement> {
  const started = process.hrtime.bigint();
  await run('nbdcopy', args, { timeoutMs: 600_000 });
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  return { value: bytes / mib / seconds, details: { seconds, bytes } };
}

const workloads: Record<WorkloadId, WorkloadDefinition> = {
  'randwrite-4k-qd1': fioWorkload('randwrite-4k-qd1', 'fio 4 KiB random write, iodepth 1', 'randwrite', '4k', 1, 'IOPS'),
  'randwrite-4k-qd32': fioWorkload('randwrite-4k-qd32', 'fio 4 KiB random write, iodepth 32', 'randwrite', '4k', 32, 'IOPS'),
  'seqwrite-1m-qd32': fioWorkload('seqwrite-1m-qd32', 'fio 1 MiB sequential write, iodepth 32', 'write', '1m', 32, 'MiB/s'),
  'nbdcopy-file-to-nbd': {
    id: 'nbdcopy-file-to-nbd',
    title: 'nbdcopy random file -> export',
    unit: 'MiB/s',
    describe: (options) => `nbdcopy SOURCE URI (${formatBytes(options.fileBytes)} of random data; defaults: up to 4 connections with multi-conn, 64 requests each, threads = cores, no --flush)`,
    run: (uri, { source, options }) => timedNbdcopy([source, uri], options.fileBytes),
  },
  'nbdcopy-nbd-to-null': {
    id: 'nbdcopy-nbd-to-null',
    title: 'nbdcopy export -> null:',
    unit: 'MiB/s',
    describe: (options) => `nbdcopy URI null: (${formatBytes(options.fileBytes)}, fully allocated export)`,
    run: (uri, { options }) => timedNbdcopy([uri, 'null:'], options.fileBytes),
  },
};

// ------------------------------------------------------------------ machine

interface Machine {
  cpuModel: string;
  cores: number;
  memoryGiB: number;
  kernel: string;
  node: string;
  tools: Record<string, string>;
  filesystem: string;
  dir: string;
  gitCommit: string;
  gitDirty: boolean;
  /** SHA-256 (first 16 hex digits) of the snapshot of the built Lifeline that ran. */
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

async function describeMachine(options: Options): Promise<Machine> {
  const cpuinfo = fs.readFileSync('/proc/cpuinfo', 'utf8');
  const model = /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1] ?? os.cpus()[0]?.model ?? 'unknown';
  const df = await run('df', ['--output=source,fstype,target', options.dir], { allowFailure: true });
  const dfLine = df.stdout.trim().split('\n')[1]?.trim().split(/\s+/) ?? [];
  const commit = await run('git', ['-C', repositoryRoot, 'rev-parse', '--short', 'HEAD'], { allowFailure: true });
  const status = await run('git', ['-C', repositoryRoot, 'status', '--porcelain', '--untracked-files=no', '--', 'src', 'bin', 'binding.gyp'], { allowFailure: true });
  return {
    cpuModel: model.trim(),
    cores: os.cpus().length,
    memoryGiB: Math.round((os.totalmem() / 1024 ** 3) * 10) / 10,
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
    tools: {
      fio: await firstLine('fio', ['--version']),
      nbdkit: await firstLine('nbdkit', ['--version']),
      'qemu-nbd': await firstLine('qemu-nbd', ['--version']),
      nbdcopy: await firstLine('nbdcopy', ['--version']),
    },
    filesystem: dfLine.length >= 3 ? `${dfLine[1]} on ${dfLine[0]} mounted at ${dfLine[2]}` : 'unknown',
    dir: options.dir,
    gitCommit: commit.stdout.trim() || 'unknown',
    gitDirty: status.stdout.trim().length > 0,
    loadAverageStart: os.loadavg().map(round2),
  };
}

// ------------------------------------------------------------------ files

function writeFile(file: string, bytes: number, fill: (chunk: Buffer) => void): void {
  const fd = fs.openSync(file, 'w', 0o600);
  try {
    const chunk = Buffer.alloc(4 * mib);
    for (let done = 0; done < bytes; ) {
      const step = Math.min(chunk.length, bytes - done);
      fill(chunk);
      let written = 0;
      while (written < step) written += fs.writeSync(fd, chunk, written, step - written, done + written);
      done += step;
    }
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

async function syncFile(file: string): Promise<void> {
  const fd = fs.openSync(file, 'r+');
  try {
    await new Promise<void>((resolve, reject) => fs.fdatasync(fd, (error) => (error ? reject(error) : resolve())));
  } finally {
    fs.closeSync(fd);
  }
}

// ------------------------------------------------------------------ running

interface RunRecord {
  round: number;
  order: number;
  server: ServerId;
  workload: WorkloadId;
  value: number;
  unit: string;
  details: Record<string, unknown>;
  loadAverage1m: number;
  syncMs?: number;
  tapSummary?: unknown;
}

interface Summary {
  /** Medians of the server's CPU use, % of one core: whole process and main thread. */
  cpuPercent?: number;
  mainThreadCpuPercent?: number;
  median: number;
  min: number;
  max: number;
  values: number[];
}

interface Ratio {
  name: string;
  numerator: ServerId;
  denominator: ServerId;
  goal: number;
}

const ratios: Ratio[] = [
  { name: 'tap-off / nbdkit', numerator: 'lifeline-tap-off', denominator: 'nbdkit', goal: 0.8 },
  { name: 'tap-off / qemu-nbd', numerator: 'lifeline-tap-off', denominator: 'qemu-nbd', goal: 1.0 },
  { name: 'tap-on / nbdkit', numerator: 'lifeline-tap-on', denominator: 'nbdkit', goal: 0.8 },
  { name: 'tap-on / qemu-nbd', numerator: 'lifeline-tap-on', denominator: 'qemu-nbd', goal: 1.0 },
  { name: 'tap-on / tap-off', numerator: 'lifeline-tap-on', denominator: 'lifeline-tap-off', goal: 0.9 },
];

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

function round2(value: number): number {
  return Math.round(value * 100) / 100;
}

function formatValue(value: number): string {
  if (!Number.isFinite(value)) return 'n/a';
  return value >= 100 ? Math.round(value).toLocaleString('en-US') : value.toFixed(1);
}

function formatBytes(bytes: number): string {
  if (bytes % 1024 ** 3 === 0) return `${bytes / 1024 ** 3} GiB`;
  if (bytes % mib === 0) return `${bytes / mib} MiB`;
  return `${bytes} bytes`;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

const clockTicksPerSecond = 100; // USER_HZ, 100 on Linux x86-64 and arm64

/** CPU seconds (user + system) of a process, and of its main thread, from /proc. */
function cpuSeconds(pid: number): { process: number; mainThread: number } | undefined {
  const read = (file: string): number => {
    const text = fs.readFileSync(file, 'utf8');
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / clockTicksPerSecond;
  };
  try {
    return { process: read(`/proc/${pid}/stat`), mainThread: read(`/proc/${pid}/task/${pid}/stat`) };
  } catch {
    return undefined;
  }
}

function stamp(date: Date): string {
  const pad = (n: number): string => String(n).padStart(2, '0');
  return `${date.getFullYear()}${pad(date.getMonth() + 1)}${pad(date.getDate())}-${pad(date.getHours())}${pad(date.getMinutes())}${pad(date.getSeconds())}`;
}

function log(message: string): void {
  process.stderr.write(`${message}\n`);
}

async function probeFlags(definition: ServerDefinition, file: string, socket: string, options: Options): Promise<Record<string, unknown>> {
  const server = await startServer(definition, file, socket, options);
  try {
    const info = await run('nbdinfo', ['--json', server.uri], { timeoutMs: 20_000 });
    const parsed = JSON.parse(info.stdout) as { exports?: Record<string, unknown>[] };
    const exported = parsed.exports?.[0] ?? {};
    const keep = ['export-size', 'can_multi_conn', 'can_flush', 'can_fua', 'can_zero', 'can_fast_zero', 'can_trim', 'can_cache', 'can_df', 'block_size_minimum', 'block_size_preferred', 'block_size_maximum'];
    return Object.fromEntries(keep.filter((key) => key in exported).map((key) => [key, exported[key]]));
  } finally {
    await server.stop();
  }
}

function buildReport(
  options: Options,
  machine: Machine,
  summaries: Map<WorkloadId, Map<ServerId, Summary>>,
  flags: Record<string, Record<string, unknown>>,
  startedAt: Date,
  sourceFilesystemNote: string,
): string {
  const lines: string[] = [];
  lines.push(`# NBD benchmark ${startedAt.toISOString()}${options.quick ? ' (quick smoke run, not representative)' : ''}`);
  lines.push('');
  lines.push(`- Machine: ${machine.cpuModel}, ${machine.cores} cores, ${machine.memoryGiB} GiB RAM, ${machine.kernel}, node ${machine.node}`);
  lines.push(`- Tools: ${Object.entries(machine.tools).map(([name, version]) => `${name}: ${version}`).join('; ')}`);
  lines.push(`- Lifeline: git ${machine.gitCommit}${machine.gitDirty ? ' with uncommitted changes in src/' : ''}, run from a snapshot of the build taken at start (build sha256 ${machine.buildSha256 ?? 'n/a'})`);
  lines.push(`- File: one preallocated ${formatBytes(options.fileBytes)} raw file (every block written before the runs) in ${machine.dir}, ${machine.filesystem}; ${sourceFilesystemNote}`);
  lines.push(`- Transport: Unix socket, same for every server; URI nbd+unix:///?socket=SOCKET (default export)`);
  lines.push(`- Method: ${options.rounds} round(s); in each, every workload runs against every server in round-robin order whose start rotates each round; one fresh server process per measurement (SIGTERM by pid at the end); ${options.sync ? 'the file is fdatasync-ed after each measurement (page cache cannot be dropped here, so the file stays cached for all servers alike)' : 'no sync between measurements'}; figures are medians, (min-max) over rounds`);
  lines.push(`- fio: ${options.durationS} s measured after a ${options.rampS} s ramp, 1 job, 1 NBD connection, --norandommap`);
  lines.push(`- Load average at start ${machine.loadAverageStart.join(' / ')}${machine.loadAverageEnd ? `, at end ${machine.loadAverageEnd.join(' / ')}` : ''} (shared machine: ratios matter more than absolutes)`);
  if (options.profileDir) lines.push(`- Lifeline ran with --cpu-prof (profiling overhead included: these figures are not comparable)`);
  lines.push('');
  lines.push('Servers:');
  for (const id of options.servers) {
    const flagText = flags[id] ? ` — advertised: multi-conn ${String(flags[id]!.can_multi_conn)}, fua ${String(flags[id]!.can_fua)}, fast zero ${String(flags[id]!.can_fast_zero)}` : '';
    lines.push(`- ${id}: ${servers[id].settings}${flagText}`);
  }
  lines.push('');
  lines.push('Workloads:');
  for (const id of options.workloads) lines.push(`- ${id}: ${workloads[id].describe(options)}`);
  lines.push('');
  lines.push('## Medians (higher is better)');
  lines.push('');
  lines.push(`| workload | unit | ${options.servers.join(' | ')} |`);
  lines.push(`|---|---|${options.servers.map(() => '---:').join('|')}|`);
  for (const workloadId of options.workloads) {
    const row = summaries.get(workloadId)!;
    const cells = options.servers.map((serverId) => {
      const summary = row.get(serverId);
      if (!summary || summary.values.length === 0) return 'n/a';
      return `${formatValue(summary.median)} (${formatValue(summary.min)}-${formatValue(summary.max)})`;
    });
    lines.push(`| ${workloadId} | ${workloads[workloadId].unit} | ${cells.join(' | ')} |`);
  }
  lines.push('');
  lines.push(`Server CPU while the client ran, median % of one core (${machine.cores} cores in all): whole process / main thread`);
  lines.push('');
  lines.push(`| workload | ${options.servers.join(' | ')} |`);
  lines.push(`|---|${options.servers.map(() => '---:').join('|')}|`);
  for (const workloadId of options.workloads) {
    const row = summaries.get(workloadId)!;
    const cells = options.servers.map((serverId) => {
      const summary = row.get(serverId);
      return summary?.cpuPercent !== undefined ? `${Math.round(summary.cpuPercent)}% / ${Math.round(summary.mainThreadCpuPercent ?? NaN)}%` : 'n/a';
    });
    lines.push(`| ${workloadId} | ${cells.join(' | ')} |`);
  }
  lines.push('');
  lines.push('## Ratios of medians, against the goals');
  lines.push('');
  lines.push(`| workload | ${ratios.map((ratio) => `${ratio.name} (goal >= ${ratio.goal.toFixed(1)})`).join(' | ')} |`);
  lines.push(`|---|${ratios.map(() => '---:').join('|')}|`);
  let met = 0;
  let missed = 0;
  for (const workloadId of options.workloads) {
    const row = summaries.get(workloadId)!;
    const cells = ratios.map((ratio) => {
      const numerator = row.get(ratio.numerator);
      const denominator = row.get(ratio.denominator);
      if (!numerator?.values.length || !denominator?.values.length) return 'n/a';
      const value = numerator.median / denominator.median;
      const ok = value >= ratio.goal;
      if (ok) met++;
      else missed++;
      return `${value.toFixed(2)}x ${ok ? 'met' : 'MISSED'}`;
    });
    lines.push(`| ${workloadId} | ${cells.join(' | ')} |`);
  }
  lines.push('');
  lines.push(`Goals: Lifeline (tap off and tap on) >= 0.8x nbdkit and >= 1.0x qemu-nbd on every figure; tap-on >= 0.9x tap-off. ${met} met, ${missed} missed.`);
  return lines.join('\n');
}

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const startedAt = new Date();
  for (const tool of ['fio', 'nbdkit', 'qemu-nbd', 'nbdcopy', 'nbdinfo']) {
    await run(tool, ['--version'], { timeoutMs: 20_000 }).catch((error: Error) => {
      throw new Error(`Cannot run ${tool} (install it: see scripts/ensure-peers.sh): ${error.message.split('\n')[0]}`);
    });
  }
  if (!fs.existsSync(path.join(repositoryRoot, 'dist', 'src', 'cli', 'main.js'))) throw new Error("Lifeline is not built: run 'npx tsc -p .' first");
  fs.mkdirSync(options.dir, { recursive: true });
  if (options.profileDir) fs.mkdirSync(options.profileDir, { recursive: true });
  const dir = fs.mkdtempSync(path.join(options.dir, 'lifeline-bench-nbd-'));
  const file = path.join(dir, 'disk.raw');
  const source = path.join(dir, 'source-random.raw');
  const socket = path.join(dir, 'nbd.sock');

  const cleanUp = (): void => {
    if (current) {
      try {
        process.kill(current.child.pid!, 'SIGKILL');
      } catch {
        // Already gone.
      }
    }
    fs.rmSync(dir, { recursive: true, force: true });
  };
  const onSignal = (signal: NodeJS.Signals): void => {
    log(`\n${signal}: stopping the server under test and removing ${dir}`);
    cleanUp();
    process.exit(130);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  try {
    const machine = await describeMachine(options);
    const snapshot = snapshotLifeline(dir);
    lifelineBin = snapshot.bin;
    machine.buildSha256 = snapshot.sha256;
    if (snapshot.staleSources.length > 0) log(`warning: dist/ is older than ${snapshot.staleSources.join(', ')}: run 'npx tsc -p .' (npm run bench:nbd does)`);
    log(`lifeline: git ${machine.gitCommit}${machine.gitDirty ? ' (+ uncommitted src changes)' : ''}, build ${snapshot.sha256}, snapshot ${snapshot.bin}`);
    log(`machine: ${machine.cpuModel}, ${machine.cores} cores, ${machine.kernel}, node ${machine.node}`);
    log(`tools: ${Object.entries(machine.tools).map(([name, version]) => `${name}: ${version}`).join('; ')}`);
    log(`files in ${dir} (${machine.filesystem})`);
    log(`writing the ${formatBytes(options.fileBytes)} served file (every block allocated) and the random nbdcopy source ...`);
    writeFile(file, options.fileBytes, () => undefined);
    writeFile(source, options.fileBytes, (chunk) => crypto.randomFillSync(chunk));

    const flags: Record<string, Record<string, unknown>> = {};
    for (const id of options.servers) {
      flags[id] = await probeFlags(servers[id], file, socket, options);
      log(`${id}: ${JSON.stringify(flags[id])}`);
    }

    const records: RunRecord[] = [];
    const total = options.rounds * options.workloads.length * options.servers.length;
    let done = 0;
    for (let round = 0; round < options.rounds; round++) {
      for (const workloadId of options.workloads) {
        const shift = round % options.servers.length;
        const order = [...options.servers.slice(shift), ...options.servers.slice(0, shift)];
        for (let index = 0; index < order.length; index++) {
          const serverId = order[index]!;
          const workload = workloads[workloadId];
          const loadAverage1m = round2(os.loadavg()[0]!);
          const server = await startServer(servers[serverId], file, socket, options);
          let measurement: Measurement;
          let stopped: Awaited<ReturnType<RunningServer['stop']>>;
          const cpuBefore = cpuSeconds(server.pid);
          const wallBefore = process.hrtime.bigint();
          try {
            measurement = await workload.run(server.uri, { dir, source, options });
            const cpuAfter = cpuSeconds(server.pid);
            const wallS = Number(process.hrtime.bigint() - wallBefore) / 1e9;
            if (cpuBefore && cpuAfter) {
              // Share of one core the server used while the client ran (ramp included).
              measurement.details.serverCpuPercent = round2((100 * (cpuAfter.process - cpuBefore.process)) / wallS);
              measurement.details.serverMainThreadCpuPercent = round2((100 * (cpuAfter.mainThread - cpuBefore.mainThread)) / wallS);
              measurement.details.clientWallS = round2(wallS);
            }
          } finally {
            stopped = await server.stop();
          }
          if (stopped.code !== 0) {
            log(`warning: ${serverId} exited with ${stopped.code ?? stopped.signal}: ${stopped.stderr.trim().slice(-400)}`);
          }
          const tapSummary = stopped.stdout
            .split('\n')
            .filter((line) => line.startsWith('{"event":"tap-summary"'))
            .map((line) => JSON.parse(line) as unknown)[0];
          const record: RunRecord = { round: round + 1, order: index + 1, server: serverId, workload: workloadId, value: measurement.value, unit: workload.unit, details: measurement.details, loadAverage1m };
          if (tapSummary) record.tapSummary = tapSummary;
          if (options.sync) {
            const syncStarted = Date.now();
            await syncFile(file);
            record.syncMs = Date.now() - syncStarted;
          }
          records.push(record);
          done++;
          log(`[${done}/${total}] round ${round + 1} ${workloadId.padEnd(20)} ${serverId.padEnd(17)} ${formatValue(measurement.value).padStart(9)} ${workload.unit}  (server CPU ${measurement.details.serverCpuPercent ?? '?'}%, main thread ${measurement.details.serverMainThreadCpuPercent ?? '?'}%; load ${loadAverage1m}${record.syncMs !== undefined ? `, sync ${record.syncMs} ms` : ''})`);
        }
      }
    }

    machine.loadAverageEnd = os.loadavg().map(round2);
    const summaries = new Map<WorkloadId, Map<ServerId, Summary>>();
    for (const workloadId of options.workloads) {
      const row = new Map<ServerId, Summary>();
      for (const serverId of options.servers) {
        const runs = records.filter((record) => record.workload === workloadId && record.server === serverId);
        const values = runs.map((record) => record.value);
        const cpu = runs.map((record) => record.details.serverCpuPercent).filter((value): value is number => typeof value === 'number');
        const main = runs.map((record) => record.details.serverMainThreadCpuPercent).filter((value): value is number => typeof value === 'number');
        const summary: Summary = { median: median(values), min: Math.min(...values), max: Math.max(...values), values };
        if (cpu.length) summary.cpuPercent = round2(median(cpu));
        if (main.length) summary.mainThreadCpuPercent = round2(median(main));
        row.set(serverId, summary);
      }
      summaries.set(workloadId, row);
    }
    const sourceNote = 'the nbdcopy source is a random-content file of the same size beside it';
    const report = buildReport(options, machine, summaries, flags, startedAt, sourceNote);
    console.log(report);

    if (options.save && !options.profileDir) {
      const resultsDir = path.join(repositoryRoot, 'bench', 'results');
      fs.mkdirSync(resultsDir, { recursive: true });
      const base = `nbd-${stamp(startedAt)}${options.quick ? '-quick' : ''}`;
      const json = {
        benchmark: 'nbd',
        startedAt: startedAt.toISOString(),
        finishedAt: new Date().toISOString(),
        command: `node dist/bench/nbd.js ${process.argv.slice(2).join(' ')}`.trim(),
        options: { ...options },
        machine,
        servers: Object.fromEntries(options.servers.map((id) => [id, { settings: servers[id].settings, advertised: flags[id] }])),
        workloads: Object.fromEntries(options.workloads.map((id) => [id, { title: workloads[id].title, unit: workloads[id].unit, command: workloads[id].describe(options) }])),
        medians: Object.fromEntries(
          options.workloads.map((workloadId) => [workloadId, Object.fromEntries(options.servers.map((serverId) => [serverId, summaries.get(workloadId)!.get(serverId)]))]),
        ),
        ratios: Object.fromEntries(
          options.workloads.map((workloadId) => {
            const row = summaries.get(workloadId)!;
            return [
              workloadId,
              Object.fromEntries(
                ratios
                  .filter((ratio) => row.get(ratio.numerator)?.values.length && row.get(ratio.denominator)?.values.length)
                  .map((ratio) => {
                    const value = row.get(ratio.numerator)!.median / row.get(ratio.denominator)!.median;
                    return [ratio.name, { value: Math.round(value * 1000) / 1000, goal: ratio.goal, met: value >= ratio.goal }];
                  }),
              ),
            ];
          }),
        ),
        runs: records,
      };
      fs.writeFileSync(path.join(resultsDir, `${base}.json`), `${JSON.stringify(json, null, 2)}\n`);
      fs.writeFileSync(path.join(resultsDir, `${base}.md`), `${report}\n`);
      if (!options.quick) fs.writeFileSync(path.join(resultsDir, 'nbd-latest.md'), `${report}\n`);
      log(`\nsaved bench/results/${base}.json and bench/results/${base}.md${options.quick ? '' : ' (and bench/results/nbd-latest.md)'}`);
    }
    if (options.profileDir) log(`\nCPU profiles of Lifeline are in ${options.profileDir} (summarise with: node dist/bench/cpuprofile-summary.js ${options.profileDir}/*.cpuprofile)`);
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    cleanUp();
  }
}

main().catch((error: unknown) => {
  console.error(`bench/nbd: ${(error as Error).stack ?? String(error)}`);
  process.exit(1);
});
