/**
 * The tap: a backing-store decorator that hands every mutation, in one total
 * order per volume, to a consumer (the patents' "tapping driver").
 *
 * Ordering rule. Each mutation gets its sequence number when it arrives. A
 * mutation that overlaps one still in flight waits until every earlier
 * overlapping mutation has reached the backing store, so overlapping writes
 * reach the store in sequence order; mutations that do not overlap commute, so
 * they run concurrently. Events are delivered to the consumer strictly in
 * sequence order once the store has completed them. A consumer that applies
 * the events in order therefore ends with the same bytes as the store.
 *
 * A mutation that the store fails is still delivered, as kind `failed`, so a
 * consumer knows that range's content is unknown and must be resynchronised
 * (a sync read that fails keeps its origin 'sync': it changed nothing).
 */
import { writeDataLength, type BackingStore, type Extent, type WriteData, type ZeroOptions } from './backing-store.js';

export type TapEventKind = 'write' | 'zero' | 'trim' | 'failed';

export interface TapEvent {
  volume: string;
  /** 1, 2, 3, … per volume, with no gaps. */
  sequence: number;
  /** Wall-clock time (ms since the epoch) when the mutation arrived at the tap. */
  sourceTimeMs: number;
  offset: number;
  lengthBytes: number;
  kind: TapEventKind;
  /**
   * The written bytes, for kind `write`: one buffer or several chunks back to
   * back. These are the buffers the NBD request arrived in, not a copy: a
   * consumer must not modify them, and must copy them if it keeps them beyond
   * a bounded time.
   */
  data?: WriteData;
  /**
   * 'sync' marks a write the tap made up from a read of the backing store
   * (`readForSync`): the volume's current content of that range, placed in
   * the stream at the point of the read, for initial sync and resync.
   */
  origin?: 'sync';
}

export interface TapConsumer {
  accept(event: TapEvent): void;
}

export interface Clock {
  nowMs(): number;
}

export const systemClock: Clock = { nowMs: () => Date.now() };

interface InFlight {
  sequence: number;
  offset: number;
  end: number;
  done: Promise<void>;
}

export interface TapOptions {
  volume: string;
  consumer: TapConsumer;
  clock?: Clock;
}

export class Tap implements BackingStore {
  readonly volume: string;
  private readonly inner: BackingStore;
  private readonly consumer: TapConsumer;
  private readonly clock: Clock;
  private sequenceLast = 0;
  private sequenceDelivered = 0;
  private readonly inFlight = new Map<number, InFlight>();
  private readonly completed = new Map<number, TapEvent>();

  constructor(inner: BackingStore, options: TapOptions) {
    this.inner = inner;
    this.volume = options.volume;
    this.consumer = options.consumer;
    this.clock = options.clock ?? systemClock;
  }

  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }

  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  /** The sequence number of the newest event delivered to the consumer. */
  get sequenceDeliveredLast(): number {
    return this.sequenceDelivered;
  }

  read(target: Buffer, offset: number): Promise<void> {
    return this.inner.read(target, offset);
  }

  write(data: WriteData, offset: number): Promise<void> {
    return this.mutate('write', offset, writeDataLength(data), data, () => this.inner.write(data, offset));
  }

  writeZeroes(offset: number, lengthBytes: number, options: ZeroOptions): Promise<void> {
    return this.mutate('zero', offset, lengthBytes, undefined, () => this.inner.writeZeroes(offset, lengthBytes, options));
  }

  trim(offset: number, lengthBytes: number): Promise<void> {
    return this.mutate('trim', offset, lengthBytes, undefined, () => this.inner.trim(offset, lengthBytes));
  }

  /**
   * Reads a range for a sync and hands it to the consumer as a write event of
   * origin 'sync', in sequence with the volume's mutations: it waits for every
   * earlier overlapping mutation, and later overlapping ones wait for the read,
   * so applying the events in order gives the store's content even while the
   * guest keeps writing.
   */
  readForSync(offset: number, lengthBytes: number): Promise<void> {
    if (!(Number.isSafeInteger(offset) && Number.isSafeInteger(lengthBytes) && offset >= 0 && lengthBytes > 0 && offset + lengthBytes <= this.inner.sizeBytes)) {
      return Promise.reject(new RangeError(`Cannot read ${lengthBytes} bytes at ${offset} for a sync of volume '${this.volume}' of ${this.inner.sizeBytes} bytes`));
    }
    const data = Buffer.allocUnsafe(lengthBytes);
    return this.mutate('write', offset, lengthBytes, data, () => this.inner.read(data, offset), 'sync');
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }

  cache(offset: number, lengthBytes: number): Promise<void> {
    return this.inner.cache(offset, lengthBytes);
  }

  extents(offset: number, lengthBytes: number, extentCountMax: number): Extent[] {
    return this.inner.extents(offset, lengthBytes, extentCountMax);
  }

  close(): Promise<void> {
    return this.inner.close();
  }

  private mutate(
    kind: TapEventKind,
    offset: number,
    lengthBytes: number,
    data: WriteData | undefined,
    apply: () => Promise<void>,
    origin?: 'sync',
  ): Promise<void> {
    const sequence = ++this.sequenceLast;
    const event: TapEvent = { volume: this.volume, sequence, sourceTimeMs: this.clock.nowMs(), offset, lengthBytes, kind };
    if (data) event.data = data;
    if (origin) event.origin = origin;
    const end = offset + lengthBytes;
    let blockers: Promise<void>[] | undefined;
    for (const other of this.inFlight.values()) {
      if (other.offset < end && offset < other.end) (blockers ??= []).push(other.done);
    }
    const run = async (): Promise<void> => {
      if (blockers) await Promise.all(blockers);
      try {
        await apply();
      } catch (error) {
        const failed: TapEvent = { volume: event.volume, sequence, sourceTimeMs: event.sourceTimeMs, offset, lengthBytes, kind: 'failed' };
        if (origin) failed.origin = origin;
        this.complete(failed);
        throw error;
      }
      this.complete(event);
    };
    const result = run();
    // `done` settles either way, so a failed write never blocks later ones.
    const entry: InFlight = { sequence, offset, end, done: result.then(noop, noop) };
    this.inFlight.set(sequence, entry);
    return result;
  }

  private complete(event: TapEvent): void {
    this.inFlight.delete(event.sequence);
    this.completed.set(event.sequence, event);
    for (;;) {
      const next = this.completed.get(this.sequenceDelivered + 1);
      if (!next) break;
      this.completed.delete(next.sequence);
      this.sequenceDelivered = next.sequence;
      this.consumer.accept(next);
    }
  }
}

function noop(): void {}
