/**
 * Disk time for the simulated disk. `SimulatedDisk` (src/journal/sim-disk.ts)
 * completes every operation at once, so a crash could only ever land between
 * two whole batches. This wrapper gives each operation a simulated latency:
 * writes and directory changes reach the disk's page cache when issued (as in
 * a real kernel) and complete later; a sync takes effect when it completes
 * (only then is it recorded), so a crash while it runs keeps any subset of the
 * writes it would have made durable. Completions can come in any order.
 *
 * All timers belong to the target incarnation's scope: when it crashes,
 * operations in flight never complete, and nothing the dead process does
 * afterwards completes either.
 */
import type { JournalFile, JournalFileSystem } from '../../src/journal/file-system.js';
import type { SimulatedDisk } from '../../src/journal/sim-disk.js';
import type { SimRandom } from './random.js';
import type { SimScope } from './scheduler.js';

export interface DiskTiming {
  /** Latency of a write, read or directory change, ms (uniform in [0, max]). */
  operationMsMax: number;
  /** Latency of a sync, ms (uniform in [min, max]). */
  syncMsMin: number;
  syncMsMax: number;
}

export class TimedFileSystem implements JournalFileSystem {
  /** Syncs still to fail (fault injection): each fails with EIO instead of taking effect. */
  syncFailuresPending = 0;
  syncFailures = 0;
  /** Operations complete without simulated latency (the checks at the end, which only read). */
  instant = false;
  private crashCountdown = 0;
  private crashArmed: (() => void) | undefined;

  constructor(
    readonly disk: SimulatedDisk,
    private readonly scope: SimScope,
    private readonly random: SimRandom,
    private readonly timing: DiskTiming,
  ) {}

  /** Calls `crash` (on a later turn) once `operations` more operations have been issued: a crash in the middle of I/O. */
  armCrash(operations: number, crash: () => void): void {
    this.crashCountdown = operations;
    this.crashArmed = crash;
  }

  disarmCrash(): void {
    this.crashArmed = undefined;
  }

  private issued(): void {
    if (!this.crashArmed || --this.crashCountdown > 0) return;
    const crash = this.crashArmed;
    this.crashArmed = undefined;
    this.scope.setTimer(0, crash);
  }

  private operationDelay(): number {
    return this.random.real(0, this.timing.operationMsMax);
  }

  private syncDelay(): number {
    return this.random.real(this.timing.syncMsMin, this.timing.syncMsMax);
  }

  /** Issues `issue` now and completes with its value after `delayMs`; a rejection also waits. */
  private async timed<T>(delayMs: number, issue: () => Promise<T>): Promise<T> {
    this.issued();
    let outcome: { value: T } | { error: unknown };
    try {
      outcome = { value: await issue() };
    } catch (error) {
      outcome = { error };
    }
    if (!this.instant) await this.scope.after(delayMs, undefined);
    if ('error' in outcome) throw outcome.error;
    return outcome.value;
  }

  async open(filePath: string, mode: 'read' | 'write' | 'create'): Promise<JournalFile> {
    const inner = await this.timed(this.operationDelay(), () => this.disk.open(filePath, mode));
    const system = this;
    return {
      path: inner.path,
      pwrite: (data, position) => system.timed(system.operationDelay(), () => inner.pwrite(data, position)),
      pread: (target, position) => system.timed(system.operationDelay(), () => inner.pread(target, position)),
      async fsync() {
        system.issued();
        // The sync takes effect when it completes: a crash before then may keep any subset of the writes.
        if (!system.instant) await system.scope.after(system.syncDelay(), undefined);
        if (system.syncFailuresPending > 0) {
          system.syncFailuresPending--;
          system.syncFailures++;
          throw Object.assign(new Error(`EIO: simulated sync failure, path is ${inner.path}`), { code: 'EIO' });
        }
        await inner.fsync();
      },
      truncate: (sizeBytes) => system.timed(system.operationDelay(), () => inner.truncate(sizeBytes)),
      allocate: (sizeBytes) => system.timed(system.syncDelay(), () => inner.allocate(sizeBytes)),
      sizeBytes: () => inner.sizeBytes(),
      close: () => inner.close(),
    };
  }

  rename(from: string, to: string): Promise<void> {
    return this.timed(this.operationDelay(), () => this.disk.rename(from, to));
  }

  unlink(filePath: string): Promise<void> {
    return this.timed(this.operationDelay(), () => this.disk.unlink(filePath));
  }

  readdir(directory: string): Promise<string[]> {
    return this.timed(this.operationDelay(), () => this.disk.readdir(directory));
  }

  mkdir(directory: string): Promise<void> {
    return (this.disk as JournalFileSystem).mkdir(directory);
  }

  async fsyncDirectory(directory: string): Promise<void> {
    this.issued();
    if (!this.instant) await this.scope.after(this.syncDelay(), undefined);
    await this.disk.fsyncDirectory(directory);
  }

  freeBytes(directory: string): Promise<number> {
    return (this.disk as JournalFileSystem).freeBytes(directory);
  }
}
