/**
 * Consumers of tap events that need nothing beyond the tap itself: a counter
 * with a running checksum (used by the live display and the benchmark), and a
 * replayer that applies events to another store (used to prove ordering).
 */
import type { BackingStore } from './backing-store.js';
import { native } from '../native/index.js';
import type { TapConsumer, TapEvent, TapEventKind } from './tap.js';

export interface TapCounts {
  events: number;
  bytes: Record<TapEventKind, number>;
  count: Record<TapEventKind, number>;
  sequenceLast: number;
  /** CRC-32C chained over every event's header fields and data, in order. */
  checksum: number;
}

/** Counts events by kind and keeps a running checksum over the whole stream. */
export class CountingConsumer implements TapConsumer {
  readonly counts: TapCounts = {
    events: 0,
    bytes: { write: 0, zero: 0, trim: 0, failed: 0 },
    count: { write: 0, zero: 0, trim: 0, failed: 0 },
    sequenceLast: 0,
    checksum: 0,
  };
  private readonly header = Buffer.alloc(24);
  private readonly listeners: ((event: TapEvent) => void)[] = [];

  accept(event: TapEvent): void {
    const counts = this.counts;
    if (event.sequence !== counts.sequenceLast + 1) {
      throw new Error(`Tap delivered event ${event.sequence} after ${counts.sequenceLast} for volume '${event.volume}'`);
    }
    counts.sequenceLast = event.sequence;
    counts.events++;
    counts.count[event.kind]++;
    counts.bytes[event.kind] += event.lengthBytes;
    const header = this.header;
    header.writeDoubleBE(event.sequence, 0);
    header.writeDoubleBE(event.offset, 8);
    header.writeUInt32BE(event.lengthBytes, 16);
    header.writeUInt32BE(kindCode[event.kind], 20);
    let checksum = native.crc32c(header, counts.checksum);
    if (Buffer.isBuffer(event.data)) checksum = native.crc32c(event.data, checksum);
    else if (event.data) for (const chunk of event.data) checksum = native.crc32c(chunk, checksum);
    counts.checksum = checksum;
    for (const listener of this.listeners) listener(event);
  }

  onEvent(listener: (event: TapEvent) => void): void {
    this.listeners.push(listener);
  }
}

const kindCode: Record<TapEventKind, number> = { write: 1, zero: 2, trim: 3, failed: 4 };

/**
 * Applies events, in the order received, to a replica store. Data is copied
 * before the event returns, as the tap's contract asks.
 */
export class ReplayConsumer implements TapConsumer {
  private readonly replica: BackingStore;
  private chain: Promise<void> = Promise.resolve();
  private sequenceLast = 0;
  failedRanges: { offset: number; lengthBytes: number }[] = [];

  constructor(replica: BackingStore) {
    this.replica = replica;
  }

  accept(event: TapEvent): void {
    if (event.sequence !== this.sequenceLast + 1) {
      throw new Error(`Replay got event ${event.sequence} after ${this.sequenceLast} for volume '${event.volume}'`);
    }
    this.sequenceLast = event.sequence;
    const { offset, lengthBytes } = event;
    switch (event.kind) {
      case 'write': {
        const data = event.data!;
        const copy = Buffer.isBuffer(data) ? Buffer.from(data) : Buffer.concat(data);
        this.chain = this.chain.then(() => this.replica.write(copy, offset));
        break;
      }
      case 'zero':
      case 'trim':
        this.chain = this.chain.then(() => this.replica.writeZeroes(offset, lengthBytes, { mayDeallocate: true, fastOnly: false }));
        break;
      case 'failed':
        this.failedRanges.push({ offset, lengthBytes });
        break;
    }
  }

  /** Resolves once every accepted event has been applied. */
  drained(): Promise<void> {
    return this.chain;
  }
}
