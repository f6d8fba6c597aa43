/**
 * Shared test fixtures: start and stop a real `bin/lifeline nbd serve` process
 * (stopped by its pid), run real peers with a timeout, make temporary
 * directories and TLS certificates.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as net from 'node:net';
import { fileURLToPath } from 'node:url';

export const repositoryRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const lifelineBin = path.join(repositoryRoot, 'bin', 'lifeline');
/** The system Python, which has the libnbd binding (a pyenv python3 may not). */
export const systemPython = '/usr/bin/python3';

export function makeTempDir(prefix = 'lifeline-test-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  timeoutMs?: number;
  input?: string | Buffer;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Resolve even when the exit code is not 0. */
  allowFailure?: boolean;
  /** Kills the command (SIGKILL) when aborted; the promise then rejects (or resolves with allowFailure). */
  signal?: AbortSignal;
}

/** Runs a command to completion; rejects on a non-zero exit unless allowFailure. */
export function run(command: string, args: string[], options: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = options.timeoutMs ?? 120_000;
  return new Promise((resolve, reject) => {
    // A process group of its own, so that a kill reaches the command's children too (fio's job
    // processes outlive a killed parent, keep its pipes open and spin when their server is gone).
    const child = spawn(command, args, { env: options.env ?? process.env, cwd: options.cwd, stdio: ['pipe', 'pipe', 'pipe'], detached: true });
    const killGroup = (): void => {
      try {
        if (child.pid !== undefined) process.kill(-child.pid, 'SIGKILL');
      } catch {
        // The group has already gone.
      }
    };
    let stdout = '';
    let stderr = '';
    // Keeps the last MiB of each stream: a command that loops on an error must not fill the test's memory.
    const outputCharsMax = 1024 * 1024;
    child.stdout.on('data', (chunk) => (stdout = (stdout + chunk).slice(-outputCharsMax)));
    child.stderr.on('data', (chunk) => (stderr = (stderr + chunk).slice(-outputCharsMax)));
    const timer = setTimeout(() => {
      killGroup();
      reject(new Error(`${command} ${args.join(' ')} timed out after ${timeoutMs} ms\nstdout: ${stdout}\nstderr: ${stderr}`));
    }, timeoutMs);
    options.signal?.addEventListener('abort', killGroup, { once: true });
    if (options.signal?.aborted) killGroup();
    child.on('error', (error) => {
      clearTimeout(timer);
      reject(new Error(`Cannot run ${command}: ${error.message}`, { cause: error }));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      killGroup();
      const result = { code, signal, stdout, stderr };
      if (code !== 0 && !options.allowFailure) {
        reject(new Error(`${command} ${args.join(' ')} exited with ${code ?? signal}\nstdout: ${stdout}\nstderr: ${stderr}`));
      } else resolve(result);
    });
    if (options.input !== undefined) child.stdin.end(options.input);
    else child.stdin.end();
  });
}

export interface TapSummary {
  export: string;
  events: number;
  sequenceLast: number;
  checksum: number;
  count: Record<string, number>;
  bytes: Record<string, number>;
}

export interface RunningServer {
  pid: number;
  /** `nbd://127.0.0.1:PORT` for the first TCP listener, if any. */
  tcpUri?: string;
  port?: number;
  socketPath?: string;
  process: ChildProcess;
  stdout(): string;
  stderr(): string;
  /** SIGTERM by pid, wait for exit; returns the tap summaries printed at exit. */
  stop(): Promise<TapSummary[]>;
}

/**
 * Starts `bin/lifeline nbd serve` with the given arguments. Add
 * `--listen 127.0.0.1:0` and/or `--socket PATH` yourself.
 */
export async function startLifeline(args: string[], options: { startMsMax?: number } = {}): Promise<RunningServer> {
  const child = spawn(lifelineBin, ['nbd', 'serve', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (chunk) => (stdout += chunk));
  child.stderr!.on('data', (chunk) => (stderr += chunk));
  const expectedListeners = args.filter((arg) => arg === '--listen' || arg === '--socket').length || 1;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`lifeline did not start in time\nstdout: ${stdout}\nstderr: ${stderr}`)), options.startMsMax ?? 15_000);
    const check = (): void => {
      if ((stdout.match(/^listening /gm) ?? []).length >= expectedListeners) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stdout!.on('data', check);
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`lifeline exited with ${code} before listening\nstdout: ${stdout}\nstderr: ${stderr}`));
    });
  });
  const tcp = /^listening nbd:\/\/([^\s]+):(\d+)$/m.exec(stdout);
  const unix = /^listening nbd\+unix:\/\/\/\?socket=(.+)$/m.exec(stdout);
  const server: RunningServer = {
    pid: child.pid!,
    process: child,
    stdout: () => stdout,
    stderr: () => stderr,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) process.kill(child.pid!, 'SIGTERM');
      const timer = setTimeout(() => {
        if (child.exitCode === null) process.kill(child.pid!, 'SIGKILL');
      }, 15_000);
      await exited;
      clearTimeout(timer);
      return stdout
        .split('\n')
        .filter((line) => line.startsWith('{"event":"tap-summary"'))
        .map((line) => JSON.parse(line) as TapSummary);
    },
  };
  if (tcp) {
    server.port = Number(tcp[2]);
    server.tcpUri = `nbd://${tcp[1]}:${tcp[2]}`;
  }
  if (unix) server.socketPath = unix[1]!;
  return server;
}

/** Ports this process has handed out, never handed out twice. */
const portsGiven = new Set<number>();

/**
 * A TCP port that was free a moment ago (for peers that cannot pick their own). It is drawn below
 * the kernel's ephemeral range (32768-60999 here), so that no outgoing connection of another test
 * can take it between this probe and the peer's listen.
 */
export async function freePort(): Promise<number> {
  const low = 10_000;
  const high = 32_767;
  for (let attempt = 0; attempt < 200; attempt++) {
    const port = low + Math.floor(Math.random() * (high - low + 1));
    if (portsGiven.has(port)) continue;
    const free = await new Promise<boolean>((resolve) => {
      const probe = net.createServer();
      probe.once('error', () => resolve(false));
      probe.listen(port, '127.0.0.1', () => probe.close(() => resolve(true)));
    });
    if (free) {
      portsGiven.add(port);
      return port;
    }
  }
  throw new Error(`no free TCP port found between ${low} and ${high}`);
}

/** Creates a file of `sizeBytes` with pseudo-random content from a seed. */
export function writeRandomFile(filePath: string, sizeBytes: number, seed: number): void {
  const fd = fs.openSync(filePath, 'w');
  const chunk = Buffer.alloc(1 << 20);
  let state = seed >>> 0 || 1;
  try {
    for (let done = 0; done < sizeBytes; done += chunk.length) {
      for (let i = 0; i < chunk.length; i += 4) {
        state ^= state << 13;
        state ^= state >>> 17;
        state ^= state << 5;
        chunk.writeUInt32LE(state >>> 0, i);
      }
      fs.writeSync(fd, chunk, 0, Math.min(chunk.length, sizeBytes - done));
    }
  } finally {
    fs.closeSync(fd);
  }
}

export interface TlsFiles {
  /** Directory laid out as libnbd and qemu expect: ca-cert.pem, server-*.pem, client-*.pem. */
  dir: string;
  caCert: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
}

/** Makes a throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate. */
export async function makeTlsFiles(dir: string): Promise<TlsFiles> {
  fs.mkdirSync(dir, { recursive: true });
  const file = (name: string): string => path.join(dir, name);
  const openssl = (args: string[]): Promise<RunResult> => run('openssl', args, { cwd: dir });
  await openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', '/CN=Lifeline test CA', '-keyout', file('ca-key.pem'), '-out', file('ca-cert.pem'),
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
  for (const role of ['server', 'client'] as const) {
    await openssl(['req', '-newkey', 'rsa:2048', '-nodes', '-subj', `/CN=${role === 'server' ? 'localhost' : 'lifeline-test-client'}`, '-keyout', file(`${role}-key.pem`), '-out', file(`${role}.csr`)]);
    const extensions = role === 'server'
      ? 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n'
      : 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n';
    fs.writeFileSync(file(`${role}.ext`), extensions);
    await openssl(['x509', '-req', '-in', file(`${role}.csr`), '-CA', file('ca-cert.pem'), '-CAkey', file('ca-key.pem'), '-CAcreateserial', '-days', '2', '-extfile', file(`${role}.ext`), '-out', file(`${role}-cert.pem`)]);
  }
  return {
    dir,
    caCert: file('ca-cert.pem'),
    serverCert: file('server-cert.pem'),
    serverKey: file('server-key.pem'),
    clientCert: file('client-cert.pem'),
    clientKey: file('client-key.pem'),
  };
}

/** True when the run explores fresh seeds (`npm run test:explore`) instead of the fixed ones. */
export function exploringSeeds(): boolean {
  return process.env.LIFELINE_EXPLORE === '1';
}

/**
 * Seed for a randomised test: LIFELINE_SEED if set; a fresh random one when exploring
 * (LIFELINE_EXPLORE=1, `npm run test:explore`); else a fixed one derived from the test's name, so
 * that `npm test` (and CI) runs the same cases every time. Always printed.
 */
export function testSeed(name: string): number {
  const fromEnv = process.env.LIFELINE_SEED;
  const seed = fromEnv ? Number(fromEnv) : exploringSeeds() ? Math.floor(Math.random() * 0x7fffffff) : fixedSeed(name);
  console.log(`# ${name}: seed ${seed} (replay with LIFELINE_SEED=${seed})`);
  return seed;
}

/** FNV-1a of the name, as a positive 31-bit seed. */
export function fixedSeed(name: string): number {
  let hash = 0x811c9dc5;
  for (const byte of Buffer.from(name, 'utf8')) {
    hash ^= byte;
    hash = Math.imul(hash, 0x01000193) >>> 0;
  }
  return (hash & 0x7fffffff) || 1;
}

/** A small deterministic PRNG (xorshift32) for tests. */
export function prng(seed: number): () => number {
  let state = seed >>> 0 || 0x9e3779b9;
  return () => {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    return state / 0x100000000;
  };
}
