/**
 * Simulated time: a virtual clock and a heap of timers, implementing the
 * replication `Scheduler` (and the journal's `Clock`).
 *
 * The run loop alternates two things: it lets every pending promise reaction
 * run (one turn of the real event loop, through a `setImmediate` captured when
 * this module loads, so a patched global cannot interfere), then it fires the
 * earliest timer, setting the clock to its time. Nothing in the simulated
 * world does real I/O or sets real timers, so after that turn the world is
 * quiescent and the next timer is the next thing that happens: the order of
 * events depends only on the seed. Timers due at the same time fire in the
 * order they were set.
 *
 * Scopes. A target appliance that crashes must stop at once: its timers never
 * fire again and its pending disk operations never complete. Each incarnation
 * of it gets a `SimScope`; `kill()` cancels the scope's timers and ignores
 * any it sets later.
 */
import type { Scheduler, Timer } from '../../src/replication/scheduler.js';

const realSetImmediate = globalThis.setImmediate;

/** One turn of the real event loop: every promise reaction queued so far (and those they queue) has run. */
export function drainMicrotasks(): Promise<void> {
  return new Promise((resolve) => realSetImmediate(resolve));
}

interface TimerEntry {
  at: number;
  id: number;
  callback: () => void;
  cancelled: boolean;
}

/** Events at one virtual instant beyond this mean a livelock (a timer that re-arms itself at 0 ms forever). */
export const eventsPerInstantMax = 200_000;

export class SimulationFailure extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'SimulationFailure';
  }
}

export class SimScheduler implements Scheduler {
  private timeMs: number;
  private readonly heap: TimerEntry[] = [];
  private idNext = 0;
  private live = 0;
  private eventsAtInstant = 0;
  /** Timers fired so far. */
  events = 0;
  /** A checksum of every timer fired (its time and its creation order): part of the run's fingerprint. */
  trace = 0;
  /** The first exception a timer callback threw (a bug: in the appliance it would end the process). */
  failure: unknown;

  constructor(startMs: number) {
    this.timeMs = startMs;
  }

  nowMs(): number {
    return this.timeMs;
  }

  /** Delays are rounded up to whole milliseconds, as `Date.now()` counts them. */
  setTimer(delayMs: number, callback: () => void): Timer {
    const entry: TimerEntry = { at: this.timeMs + Math.max(0, Math.ceil(Number.isFinite(delayMs) ? delayMs : 0)), id: this.idNext++, callback, cancelled: false };
    this.push(entry);
    this.live++;
    return {
      cancel: () => {
        if (entry.cancelled) return;
        entry.cancelled = true;
        this.live--;
      },
    };
  }

  /** Timers set and not yet fired or cancelled. */
  get pendingTimers(): number {
    return this.live;
  }

  scope(name: string): SimScope {
    return new SimScope(this, name);
  }

  /**
   * Runs events until `until()` holds (checked whenever the world is quiescent),
   * `settled` has settled, no timer is left, or the next timer is past `untilMs`
   * (the clock then stops at `untilMs`). Returns why it stopped.
   */
  async run(options: { untilMs?: number; until?: () => boolean; settled?: Promise<unknown> }): Promise<'condition' | 'settled' | 'time' | 'idle'> {
    let settled = false;
    options.settled?.then(
      () => (settled = true),
      () => (settled = true),
    );
    const untilMs = options.untilMs ?? Infinity;
    for (;;) {
      await drainMicrotasks();
      if (this.failure !== undefined) throw new SimulationFailure(`a timer callback threw: ${describe(this.failure)}`, { cause: this.failure });
      if (settled) return 'settled';
      if (options.until?.()) return 'condition';
      const next = this.peek();
      if (!next) return 'idle';
      if (next.at > untilMs) {
        this.timeMs = Math.max(this.timeMs, untilMs);
        return 'time';
      }
      this.pop();
      this.live--;
      if (next.at > this.timeMs) {
        this.timeMs = next.at;
        this.eventsAtInstant = 0;
      } else if (++this.eventsAtInstant > eventsPerInstantMax) {
        throw new SimulationFailure(`livelock: more than ${eventsPerInstantMax} events at virtual time ${this.timeMs}`);
      }
      this.events++;
      this.trace = (Math.imul(this.trace ^ next.id, 0x01000193) + (next.at % 0x1_0000_0000)) >>> 0;
      try {
        next.callback();
      } catch (error) {
        this.failure ??= error;
      }
    }
  }

  /** Runs the world until the promise settles (or `untilMs` passes), and returns its value. */
  async await<T>(promise: Promise<T>, what: string, limitMs = 600_000): Promise<T> {
    const untilMs = this.timeMs + limitMs;
    const outcome = await this.run({ settled: promise, untilMs });
    if (outcome !== 'settled') throw new SimulationFailure(`${what} did not finish within ${limitMs} ms of virtual time (${outcome})`);
    return promise;
  }

  private peek(): TimerEntry | undefined {
    while (this.heap.length > 0 && this.heap[0]!.cancelled) this.pop();
    return this.heap[0];
  }

  private push(entry: TimerEntry): void {
    const heap = this.heap;
    heap.push(entry);
    let at = heap.length - 1;
    while (at > 0) {
      const parent = (at - 1) >> 1;
      if (!before(heap[at]!, heap[parent]!)) break;
      [heap[at], heap[parent]] = [heap[parent]!, heap[at]!];
      at = parent;
    }
  }

  private pop(): TimerEntry | undefined {
    const heap = this.heap;
    const top = heap[0];
    const last = heap.pop();
    if (heap.length > 0 && last) {
      heap[0] = last;
      let at = 0;
      for (;;) {
        const left = at * 2 + 1;
        const right = left + 1;
        let smallest = at;
        if (left < heap.length && before(heap[left]!, heap[smallest]!)) smallest = left;
        if (right < heap.length && before(heap[right]!, heap[smallest]!)) smallest = right;
        if (smallest === at) break;
        [heap[at], heap[smallest]] = [heap[smallest]!, heap[at]!];
        at = smallest;
      }
    }
    return top;
  }
}

function before(a: TimerEntry, b: TimerEntry): boolean {
  return a.at < b.at || (a.at === b.at && a.id < b.id);
}

/** A scheduler whose timers all stop when the scope is killed (a crashed process). */
export class SimScope implements Scheduler {
  private readonly timers = new Set<Timer>();
  private killed = false;

  constructor(private readonly parent: SimScheduler, readonly name: string) {}

  get alive(): boolean {
    return !this.killed;
  }

  nowMs(): number {
    return this.parent.nowMs();
  }

  setTimer(delayMs: number, callback: () => void): Timer {
    if (this.killed) return { cancel() {} };
    let timer: Timer | undefined = undefined;
    timer = this.parent.setTimer(delayMs, () => {
      this.timers.delete(timer!);
      callback();
    });
    this.timers.add(timer);
    const own = timer;
    return {
      cancel: () => {
        own.cancel();
        this.timers.delete(own);
      },
    };
  }

  /** A promise that resolves after `delayMs` on this scope, or never if the scope is killed first. */
  after<T>(delayMs: number, value: T): Promise<T> {
    return new Promise((resolve) => this.setTimer(delayMs, () => resolve(value)));
  }

  kill(): void {
    this.killed = true;
    for (const timer of this.timers) timer.cancel();
    this.timers.clear();
  }
}

export function describe(error: unknown): string {
  return error instanceof Error ? `${error.name}: ${error.message}` : String(error);
}
