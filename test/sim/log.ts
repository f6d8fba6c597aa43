/**
 * The event log of one simulation run: every fault, connection, frame
 * delivered, log line of the code under test, crash and check, stamped with
 * virtual time. Its SHA-256 is the run's fingerprint: the same seed must give
 * the same fingerprint. The last lines are kept for a failure report; with
 * `verbose` every line is printed as it happens.
 */
import { createHash, type Hash } from 'node:crypto';
import type { LogFields, Logger } from '../../src/util/logger.js';

export const tailLinesMax = 80;

export class SimLog {
  private readonly hash: Hash = createHash('sha256');
  private readonly tail: string[] = [];
  lines = 0;

  constructor(
    private readonly clock: { nowMs(): number },
    private readonly startMs: number,
    private readonly verbose: boolean,
    private readonly write: (line: string) => void = (line) => process.stdout.write(`${line}\n`),
  ) {}

  event(kind: string, detail: string): void {
    const line = `${(this.clock.nowMs() - this.startMs).toString().padStart(7)} ${kind} ${detail}`;
    this.hash.update(line);
    this.hash.update('\n');
    this.lines++;
    if (this.verbose) this.write(line);
    this.tail.push(line);
    if (this.tail.length > tailLinesMax) this.tail.shift();
  }

  digest(): string {
    return this.hash.copy().digest('hex');
  }

  recent(): string[] {
    return [...this.tail];
  }

  /** A `Logger` for the code under test; `observe` sees every line (to spot violations). */
  logger(who: string, observe?: (level: string, message: string, fields: LogFields) => void): Logger {
    const emit = (level: string, message: string, fields: LogFields = {}): void => {
      this.event(`${who}.${level}`, `${message} ${JSON.stringify(fields)}`);
      observe?.(level, message, fields);
    };
    return {
      debug: (message, fields) => emit('debug', message, fields),
      info: (message, fields) => emit('info', message, fields),
      warn: (message, fields) => emit('warn', message, fields),
      error: (message, fields) => emit('error', message, fields),
    };
  }
}
