/**
 * Test fixtures: two sites on loopback (demo certificates, a source appliance
 * with one volume, a target appliance receiving its group), started as real
 * `bin/lifeline appliance` processes and stopped by pid.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { freePort, lifelineBin, run } from '../../test/helpers.js';
import type { SourceGroupStatus } from './source-group.js';

export const MiB = 1024 * 1024;

export interface TwoSites {
  dir: string;
  sourceConfigPath: string;
  targetConfigPath: string;
  sourceDataDir: string;
  targetDataDir: string;
  sourceVolumePath: string;
  replicaPath: string;
  /** Where the source ships to (change it to route through a fault proxy before starting the source). */
  replicationPort: number;
  volumeBytes: number;
  /** The source's `protect` entry for group pg1 (in its configuration unless `protect: false`; the body of POST /v1/protect). */
  protectEntry: Record<string, unknown>;
}

export interface TwoSitesOptions {
  volumeBytes?: number;
  historyMs?: number;
  unitBytes?: number;
  /** Port the source connects to (default: the target's replication port). */
  sourceTargetPort?: number;
  memoryBytesMax?: number;
  spillBytesMax?: number;
  rateLimitBytesPerSecond?: number;
  codec?: string;
  /** The target's journal datastore capacity (default 4 GiB). */
  datastoreCapacityBytes?: number;
  /** false: the source's configuration serves disk0 without protecting it (default true). */
  protect?: boolean;
}

export async function makeTwoSites(dir: string, options: TwoSitesOptions = {}): Promise<TwoSites> {
  const volumeBytes = options.volumeBytes ?? 64 * MiB;
  await run(lifelineBin, ['certs', 'demo', '--dir', path.join(dir, 'certs')]);
  const replicationPort = await freePort();
  const sourceDataDir = path.join(dir, 'site-a');
  const targetDataDir = path.join(dir, 'site-b');
  fs.mkdirSync(sourceDataDir, { recursive: true });
  fs.mkdirSync(path.join(targetDataDir, 'journal'), { recursive: true });
  const certs = path.join(dir, 'certs');
  const protectEntry = {
    group: 'pg1',
    volumes: ['disk0'],
    target: { address: `127.0.0.1:${options.sourceTargetPort ?? replicationPort}`, appliance: 'site-b-appliance' },
    codec: options.codec ?? 'lz4',
    rpoMsTarget: '5s',
    rateLimitBytesPerSecond: options.rateLimitBytesPerSecond ?? 0,
    queue: { memoryBytesMax: options.memoryBytesMax ?? 64 * MiB, spillBytesMax: options.spillBytesMax ?? 256 * MiB },
  };
  const sourceConfig = {
    appliance: { name: 'site-a-appliance', site: 'site-a' },
    control: { listen: '127.0.0.1:0' },
    tls: { cert: `${certs}/site-a/site-a-appliance.crt`, key: `${certs}/site-a/site-a-appliance.key`, trustedCas: [`${certs}/site-b/ca.crt`] },
    nbd: { listen: '127.0.0.1:0' },
    volumes: [{ name: 'disk0', path: 'disk0.img', sizeBytes: volumeBytes }],
    protect: options.protect === false ? [] : [protectEntry],
  };
  const targetConfig = {
    appliance: { name: 'site-b-appliance', site: 'site-b' },
    control: { listen: '127.0.0.1:0' },
    tls: { cert: `${certs}/site-b/site-b-appliance.crt`, key: `${certs}/site-b/site-b-appliance.key`, trustedCas: [`${certs}/site-a/ca.crt`] },
    nbd: { listen: '127.0.0.1:0' },
    receive: {
      listen: `127.0.0.1:${replicationPort}`,
      groups: [
        {
          group: 'pg1',
          sources: ['site-a-appliance'],
          volumes: [{ name: 'disk0', sizeBytes: volumeBytes, replica: 'replica-disk0.img' }],
          historyMs: options.historyMs ?? 3000,
          journal: {
            unitBytes: options.unitBytes ?? 8 * MiB,
            sizeLimitBytes: '2GiB',
            datastores: [{ path: 'journal', capacityBytes: options.datastoreCapacityBytes ?? '4GiB', freeBytesMin: 0 }],
          },
        },
      ],
    },
  };
  const sourceConfigPath = path.join(dir, 'site-a.json');
  const targetConfigPath = path.join(dir, 'site-b.json');
  fs.writeFileSync(sourceConfigPath, JSON.stringify(sourceConfig, null, 2));
  fs.writeFileSync(targetConfigPath, JSON.stringify(targetConfig, null, 2));
  return {
    dir,
    sourceConfigPath,
    targetConfigPath,
    sourceDataDir,
    targetDataDir,
    sourceVolumePath: path.join(sourceDataDir, 'disk0.img'),
    replicaPath: path.join(targetDataDir, 'replica-disk0.img'),
    replicationPort,
    volumeBytes,
    protectEntry,
  };
}

/**
 * Rewrites the source's configuration with or without its protect entry for pg1, or with another
 * entry in its place (takes effect at its next start).
 */
export function setSourceProtection(sites: TwoSites, protect: boolean | Record<string, unknown>): void {
  const config = JSON.parse(fs.readFileSync(sites.sourceConfigPath, 'utf8')) as { protect: unknown[] };
  config.protect = protect === false ? [] : [protect === true ? sites.protectEntry : protect];
  fs.writeFileSync(sites.sourceConfigPath, JSON.stringify(config, null, 2));
}

export interface RunningAppliance {
  pid: number;
  control: string;
  nbd: string | undefined;
  process: ChildProcess;
  logs(): string;
  /** GET or send JSON to the control API; throws on a status other than 2xx. */
  api<T = unknown>(method: string, route: string, body?: unknown): Promise<T>;
  /** SIGTERM by pid; resolves with the exit code. */
  stop(): Promise<number | null>;
  /** SIGKILL by pid (a crash). */
  kill(): Promise<void>;
}

export async function startAppliance(options: { dataDir: string; configPath: string; startMsMax?: number }): Promise<RunningAppliance> {
  const child = spawn(lifelineBin, ['appliance', '--data', options.dataDir, '--config', options.configPath, '--log-format', 'json'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (chunk) => (stdout += chunk));
  child.stderr!.on('data', (chunk) => (stderr += chunk));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`appliance did not start in time\nstdout: ${stdout}\nstderr: ${stderr}`)), options.startMsMax ?? 20_000);
    const check = (): void => {
      if (/^listening control /m.test(stdout)) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stdout!.on('data', check);
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`appliance exited with ${code} before listening\nstdout: ${stdout}\nstderr: ${stderr}`));
    });
  });
  const control = /^listening control (\S+)/m.exec(stdout)![1]!;
  const nbd = /^listening nbd (\S+)/m.exec(stdout)?.[1];
  return {
    pid: child.pid!,
    control,
    nbd,
    process: child,
    logs: () => stderr,
    async api<T>(method: string, route: string, body?: unknown): Promise<T> {
      const init: RequestInit = { method };
      if (body !== undefined) {
        init.body = JSON.stringify(body);
        init.headers = { 'content-type': 'application/json' };
      }
      const response = await fetch(`${control}${route}`, init);
      const text = await response.text();
      if (!response.ok) throw new Error(`${method} ${route} answered ${response.status}: ${text}`);
      return JSON.parse(text) as T;
    },
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
      process.kill(child.pid!, 'SIGTERM');
      return exited;
    },
    async kill() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      process.kill(child.pid!, 'SIGKILL');
      await exited;
    },
  };
}

/** Starts the target, then the source, of `sites`; both are killed (by pid) when the test ends. */
export async function startSites(t: { after(fn: () => Promise<unknown>): void }, sites: TwoSites): Promise<{ source: RunningAppliance; target: RunningAppliance }> {
  const target = await startAppliance({ dataDir: sites.targetDataDir, configPath: sites.targetConfigPath });
  const source = await startAppliance({ dataDir: sites.sourceDataDir, configPath: sites.sourceConfigPath });
  t.after(async () => {
    await source.kill();
    await target.kill();
  });
  return { source, target };
}

/** Waits until group pg1 at `source` is in sync with nothing queued; resolves with its status. */
export function waitInSync(source: RunningAppliance, what: string, timeoutMs = 60_000): Promise<SourceGroupStatus> {
  return waitFor(what, timeoutMs, async () => {
    const status = await source.api<SourceGroupStatus>('GET', '/v1/groups/pg1');
    return status.sync.state === 'in-sync' && status.queue.queuedEntries === 0 ? status : undefined;
  });
}

/** Polls `check` until it returns a value other than undefined, or fails after `timeoutMs` with `what`. */
export async function waitFor<T>(what: string, timeoutMs: number, check: () => Promise<T | undefined> | T | undefined, intervalMs = 100): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  for (;;) {
    try {
      const value = await check();
      if (value !== undefined) return value;
    } catch (error) {
      lastError = error;
    }
    if (Date.now() > deadline) throw new Error(`Timed out after ${timeoutMs} ms waiting for ${what}${lastError ? ` (last error: ${(lastError as Error).message})` : ''}`);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

/** True when two files have the same bytes (compared in 1 MiB pieces). */
export function filesEqual(a: string, b: string): boolean {
  const sizeA = fs.statSync(a).size;
  if (sizeA !== fs.statSync(b).size) return false;
  const fa = fs.openSync(a, 'r');
  const fb = fs.openSync(b, 'r');
  try {
    const bufferA = Buffer.alloc(MiB);
    const bufferB = Buffer.alloc(MiB);
    for (let offset = 0; offset < sizeA; offset += MiB) {
      const length = Math.min(MiB, sizeA - offset);
      fs.readSync(fa, bufferA, 0, length, offset);
      fs.readSync(fb, bufferB, 0, length, offset);
      if (!bufferA.subarray(0, length).equals(bufferB.subarray(0, length))) return false;
    }
    return true;
  } finally {
    fs.closeSync(fa);
    fs.closeSync(fb);
  }
}
