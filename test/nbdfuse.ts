/**
 * nbdfuse for tests: mounts an NBD export as a file (the FUSE mount is ended by
 * unmounting, with signals by pid as the fallback).
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { run } from './helpers.js';

export interface FuseMount {
  /** The virtual file in the mountpoint. */
  file: string;
  unmount(): Promise<void>;
}

/** Mounts an NBD URI with nbdfuse (foreground, by pid) and waits until it serves. */
export async function nbdfuseMount(mountpoint: string, uri: string, pidFile: string): Promise<FuseMount> {
  fs.mkdirSync(mountpoint, { recursive: true });
  const child = spawn('nbdfuse', ['-P', pidFile, mountpoint, uri], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout!.on('data', (chunk) => (output += chunk));
  child.stderr!.on('data', (chunk) => (output += chunk));
  const exited = new Promise<void>((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve();
    else child.once('exit', () => resolve());
  });
  child.once('error', (error) => (output += `\nspawn failed: ${error.message}`));
  const alive = (): boolean => child.exitCode === null && child.signalCode === null && child.pid !== undefined;
  const waitExit = async (ms: number): Promise<boolean> => {
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
    try {
      return await Promise.race([exited.then(() => true), timedOut]);
    } finally {
      clearTimeout(timer);
    }
  };
  let unmounted = false;
  const unmount = async (): Promise<void> => {
    if (unmounted) return;
    unmounted = true;
    // The documented way to end nbdfuse is to unmount; signals by pid are the fallback.
    await run('fusermount3', ['-u', mountpoint], { allowFailure: true, timeoutMs: 15_000 }).catch(() => undefined);
    if (await waitExit(10_000)) return;
    if (alive()) process.kill(child.pid!, 'SIGTERM');
    if (await waitExit(5_000)) return;
    await run('fusermount3', ['-u', '-z', mountpoint], { allowFailure: true, timeoutMs: 15_000 }).catch(() => undefined);
    if (alive()) process.kill(child.pid!, 'SIGKILL');
    await waitExit(5_000);
  };
  const deadline = Date.now() + 15_000;
  for (;;) {
    if (fs.existsSync(pidFile) && fs.readFileSync(pidFile, 'utf8').trim() !== '') break;
    if (!alive()) throw new Error(`nbdfuse exited before serving (${child.exitCode ?? child.signalCode}):\n${output}`);
    if (Date.now() > deadline) {
      await unmount();
      throw new Error(`nbdfuse did not start in time:\n${output}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return { file: path.join(mountpoint, 'nbd'), unmount };
}

