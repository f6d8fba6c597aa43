/**
 * Time for the replication code: the current time and timers, behind one small
 * interface so that the deterministic simulation can run the real shipper and
 * receiver on a simulated clock.
 */
import type { Clock } from '../tap/tap.js';

export interface Timer {
  cancel(): void;
}

export interface Scheduler extends Clock {
  /** Runs `callback` once after `delayMs` (0: on a later turn, never synchronously). */
  setTimer(delayMs: number, callback: () => void): Timer;
}

export const systemScheduler: Scheduler = {
  nowMs: () => Date.now(),
  setTimer(delayMs, callback) {
    const handle = setTimeout(callback, Math.max(0, delayMs));
    return { cancel: () => clearTimeout(handle) };
  },
};

/** Resolves after `delayMs` on the scheduler's clock. */
export function sleep(scheduler: Scheduler, delayMs: number): Promise<void> {
  return new Promise((resolve) => scheduler.setTimer(delayMs, resolve));
}
