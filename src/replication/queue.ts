/**
 * The stream queue (DESIGN.md step 3): on the source appliance, the writes of
 * one stream (one protection group on this appliance, possibly several
 * volumes) wait here, in order, until the target acknowledges them as durable.
 *
 * Decisions.
 * - Sequence numbers. The queue assigns them: `sequenceNext` (given on open, so
 *   a restarted appliance continues its stream), then +1 per queued entry, with
 *   no gaps. A push in bitmap mode gets no sequence.
 * - Three modes, one direction under pressure. `push` is synchronous and never
 *   blocks the tap. Entries are held in memory up to `memoryBytesMax` (cost of
 *   an entry: its data plus `entryOverheadBytes`). Once memory is full the queue
 *   *spills*: every later entry is appended to the spill file until the spill
 *   holds no unacknowledged entry again; then new entries go to memory again.
 *   This hysteresis keeps a simple invariant (the queue is the oldest entries in
 *   memory followed by the newest in the spill), so the shipper's next batches
 *   come from memory while the spill is read sequentially later. When the spill
 *   would pass `spillBytesMax` (or is disabled with 0, or falls too far behind,
 *   or fails, or is found damaged) the queue goes to *bitmap* mode: it discards
 *   every queued entry, marks their ranges in a per-volume region bitmap
 *   (`queueRegionBytes`), and later pushes only mark the bitmap. The mode, its
 *   cause with the time (`modeReason`) and the bytes to resync are in `stats()`.
 *   `takeResyncRegions()` hands the dirty ranges to the resync and returns to
 *   memory mode; sequence numbers then continue after the last one assigned, so
 *   the discarded range (`sequenceDiscardedFirst..Last`) is never reused: a
 *   target that already holds some of those sequences can never mistake a
 *   resync write for one of them. Bridging that range at the target is the
 *   shipper's business (a resync is a state of the stream, DESIGN.md step 4).
 *   Checkpoint markers that were discarded are lost (counted in
 *   `checkpointsDiscarded`): a checkpoint whose marker is not in the stream is
 *   simply never committed at the target.
 * - `markForResync` marks a range in the same bitmap in any mode (a write the
 *   backing store failed: its content is unknown, so it is read and sent
 *   again); `takeResyncRegions` hands out whatever the bitmap holds, and leaves
 *   bitmap mode if the queue was in it.
 * - Spill file: a sequence of segment files rather than a ring. A segment
 *   (`spill-<number>.seg`, up to `spillSegmentBytes`, or one record if larger)
 *   is deleted as soon as every entry in it is acknowledged, which gives the
 *   space back to the filesystem without wrap-around logic or records split at
 *   the end of a ring. The price is that acknowledged records share a segment
 *   with unacknowledged ones until the segment's last entry is acknowledged;
 *   `spillBytes` (what `spillBytesMax` bounds) counts the whole live segments,
 *   so the limit is an honest bound on disk use. Writes go through
 *   `JournalFileSystem` in the background, in order, batched into one vectored
 *   write per segment (`spillWriteBatchBytesMax`); a spilled entry keeps its
 *   data in memory until its write has completed, and those pending bytes are
 *   bounded too (`spillWriteBytesPendingMax`; past it the queue goes to bitmap
 *   mode, since push must not block). There is no fsync: the spill is not a
 *   durability mechanism (the dirty-region log is), so on open any old spill
 *   segment is deleted unread.
 * - Spill records are self-checking: a 56-byte header (magic, record length,
 *   CRC-32C over the rest of the header and the payload, kind, sequence,
 *   volume, payload length, offset, length, source time) and the payload (write
 *   data, or a checkpoint as JSON). A read checks every field against the
 *   in-memory index; on a mismatch the spill is not trusted: the queue goes to
 *   bitmap mode (the index still knows every discarded range, so nothing is
 *   lost) and the read fails with `SpillDamagedError`.
 * - Reads (`read(fromSequence, bytesMax)`) serve the first send and any resend
 *   after a reconnect alike: entries stay until acknowledged. Returned data
 *   buffers belong to the queue and must not be modified.
 * - Validation: options are validated when the queue opens (limits are
 *   positive, relations hold); entries are asserted in `push`, since the tap
 *   validated them at the edge (NBD request checks).
 */
import * as path from 'node:path';
import { native } from '../native/index.js';
import type { JournalFile, JournalFileSystem } from '../journal/file-system.js';
import { writeDataLength, type WriteData } from '../tap/backing-store.js';
import { systemClock, type Clock } from '../tap/tap.js';
import { formatBytes } from '../util/size.js';

/** Granularity of the bitmap kept in bitmap mode. */
export const queueRegionBytes = 64 * 1024;
/** Bookkeeping counted per entry on top of its data in `queuedBytes` and `memoryBytes`. */
export const entryOverheadBytes = 128;
/** Nominal size of one spill segment file (a larger record gets a segment of its own). */
export const spillSegmentBytesDefault = 64 * 1024 * 1024;
/** Data of spilled entries whose background write has not completed yet. */
export const spillWriteBytesPendingMaxDefault = 64 * 1024 * 1024;
/** One background spill write covers at most this many bytes of records. */
export const spillWriteBatchBytesMax = 8 * 1024 * 1024;
/** Size of a spill record's header. */
export const spillRecordHeaderBytes = 56;
/** A checkpoint's id and name, each, in UTF-8. */
export const checkpointTextBytesMax = 1024;

const spillRecordMagic = 0x4c4c5351; // 'LLSQ'
const spillFilePattern = /^spill-\d{12}\.seg$/;
const volumeIdMax = 0xffffffff;

export type StreamEntryKind = 'write' | 'zero' | 'trim' | 'checkpoint';

export interface StreamCheckpoint {
  id: string;
  kind: 'automatic' | 'tagged' | (string & {});
  name?: string;
}

export interface StreamEntry {
  sequence: number;
  kind: StreamEntryKind;
  /** Volume id within the stream (0 for a checkpoint). */
  volume: number;
  offset: number;
  lengthBytes: number;
  /** Source time, ms since the epoch. */
  timeMs: number;
  /** The written bytes (write only). Owned by the queue: do not modify. */
  data?: Buffer;
  checkpoint?: StreamCheckpoint;
}

/** What `push` takes: an entry without its sequence; data may be borrowed chunks (they are copied). */
export interface StreamEntryInput {
  kind: StreamEntryKind;
  volume: number;
  offset: number;
  lengthBytes: number;
  timeMs: number;
  data?: WriteData;
  checkpoint?: StreamCheckpoint;
}

export type QueueMode = 'memory' | 'spill' | 'bitmap';

export interface ByteRange {
  offset: number;
  lengthBytes: number;
}

export interface ResyncRegions {
  /** Per volume id (ascending), coalesced ranges clipped to the volume's size. */
  volumes: Map<number, ByteRange[]>;
  /** Sum of the ranges' lengths. */
  resyncBytes: number;
  /** Why the ranges need a resync (why the queue went to bitmap mode, or the last `markForResync` reason). */
  reason: string;
  /**
   * When this take ends a bitmap episode: the sequences assigned before it whose
   * entries were discarded (first > last when none). They are never reused; the
   * next push continues after `sequenceDiscardedLast`.
   */
  sequenceDiscardedFirst: number;
  sequenceDiscardedLast: number;
  /** Source time of the oldest write covered by the ranges (undefined when none). */
  oldestTimeMs: number | undefined;
}

export interface StreamQueueStats {
  mode: QueueMode;
  modeReason: string;
  queuedEntries: number;
  /** Data plus `entryOverheadBytes` per entry, over every queued entry (memory and spill). */
  queuedBytes: number;
  /** The same, over the entries held in memory. */
  memoryBytes: number;
  /** Size of the live spill segments (what `spillBytesMax` bounds). */
  spillBytes: number;
  /** Data of spilled entries still waiting for their background write (held in memory meanwhile). */
  spillWriteBytesPending: number;
  /** Dirty regions × region size, clipped to each volume's size (bitmap mode, or `markForResync`). */
  resyncBytes: number;
  /** Source time of the oldest write not yet acknowledged, queued or covered by the bitmap. */
  oldestUnacknowledgedTimeMs: number | undefined;
  sequenceLast: number;
  sequenceAcknowledged: number;
  /** Checkpoint markers discarded by bitmap mode since the queue opened. */
  checkpointsDiscarded: number;
  /** Times the queue went to bitmap mode since it opened. */
  bitmapEpisodes: number;
  /** The last spill error that did not change the mode (a segment that could not be deleted), if any. */
  spillErrorLast: string | undefined;
}

export interface StreamQueueOptions {
  /** Names the stream in messages (e.g. the protection group). */
  name: string;
  fileSystem: JournalFileSystem;
  /** Directory owned by this queue for its spill segments; old segments in it are deleted on open. */
  spillDirectory: string;
  /** Volume sizes by volume id; entries must fall inside them. */
  volumes: ReadonlyMap<number, number>;
  memoryBytesMax: number;
  /** 0: no spill file (memory full → bitmap mode). */
  spillBytesMax: number;
  /** Sequence of the first entry pushed (default 1). Entries up to sequenceNext - 1 count as acknowledged. */
  sequenceNext?: number;
  clock?: Clock;
  regionBytes?: number;
  spillSegmentBytes?: number;
  spillWriteBytesPendingMax?: number;
}

/** A spill record failed its checks: the spill is not trusted and the queue went to bitmap mode. */
export class SpillDamagedError extends Error {
  readonly code = 'EIO';
  constructor(readonly stream: string, readonly filePath: string, detail: string) {
    super(`Cannot read stream '${stream}' from its spill file as it is damaged: ${detail}; path is ${filePath} (the queue went to bitmap mode; resync the dirty regions)`);
  }
}

/** The requested entries were discarded when the queue went to bitmap mode. */
export class EntriesDiscardedError extends Error {
  readonly code = 'ENODATA';
  constructor(readonly stream: string, readonly sequence: number, readonly sequenceDiscardedFirst: number, readonly sequenceDiscardedLast: number) {
    super(
      `Cannot read sequence ${sequence} of stream '${stream}' as sequences ${sequenceDiscardedFirst}..${sequenceDiscardedLast} were discarded in bitmap mode (take the resync regions and resync them)`,
    );
  }
}

// ---- private types ----------------------------------------------------------

interface SpillSegment {
  number: number;
  path: string;
  file: JournalFile | undefined;
  /** Bytes reserved so far (records are appended back to back). */
  sizeBytes: number;
  sequenceLast: number;
  readsActive: number;
  /** Fully acknowledged or discarded: no more writes; deleted once no read uses it. */
  retired: boolean;
  deleteQueued: boolean;
}

interface SpillPlace {
  segment: SpillSegment;
  position: number;
  recordBytes: number;
  written: boolean;
}

interface QueuedEntry {
  sequence: number;
  kind: StreamEntryKind;
  volume: number;
  offset: number;
  lengthBytes: number;
  timeMs: number;
  checkpoint?: StreamCheckpoint;
  /** Memory entries; spilled entries until their write has completed. */
  data: Buffer | undefined;
  /** Encoded checkpoint (spilled checkpoints only). */
  payload: Buffer | undefined;
  costBytes: number;
  spill: SpillPlace | undefined;
}

interface VolumeBitmap {
  sizeBytes: number;
  bits: Uint8Array | undefined;
}

const kindCode: Record<StreamEntryKind, number> = { write: 1, zero: 2, trim: 3, checkpoint: 4 };

function nowText(clock: Clock): string {
  return new Date(clock.nowMs()).toISOString();
}

function assertInteger(value: number, what: string, minimum: number): void {
  if (!Number.isSafeInteger(value) || value < minimum) throw new RangeError(`Cannot use ${what} ${value}: it must be an integer >= ${minimum}`);
}

export class StreamQueue {
  readonly name: string;
  readonly memoryBytesMax: number;
  readonly spillBytesMax: number;
  readonly regionBytes: number;
  readonly spillSegmentBytes: number;
  readonly spillWriteBytesPendingMax: number;
  private readonly fileSystem: JournalFileSystem;
  private readonly spillDirectory: string;
  private readonly clock: Clock;
  private readonly bitmaps = new Map<number, VolumeBitmap>();

  /** Queued entries are `entries[head..]`, in sequence order with no gaps. */
  private entries: QueuedEntry[] = [];
  private head = 0;
  private sequenceLastValue: number;
  private sequenceAcknowledgedValue: number;
  private modeValue: QueueMode = 'memory';
  private modeReasonValue = 'entries fit in memory';
  private spilling = false;
  private queuedBytes = 0;
  private memoryBytes = 0;
  private spillBytes = 0;
  private resyncBytes = 0;
  private bitmapOldestTimeMs: number | undefined;
  private resyncReason = '';
  /** The sequences discarded by the latest bitmap episode (for read errors). */
  private sequenceDiscardedFirst = 1;
  private sequenceDiscardedLast = 0;
  /** Set while a bitmap episode's discarded range has not been handed out by takeResyncRegions. */
  private episodeDiscarded: { first: number; last: number } | undefined;
  private checkpointsDiscarded = 0;
  private bitmapEpisodes = 0;
  private spillErrorLast: string | undefined;

  private readonly segments: SpillSegment[] = [];
  private segmentNumberNext = 1;
  /** Spilled entries whose write has not been issued yet, in order. */
  private spillPending: QueuedEntry[] = [];
  private spillWriteBytesPending = 0;
  private spillWriteScheduled = false;
  /** Every file operation runs on this chain, one at a time, in order. */
  private io: Promise<void> = Promise.resolve();
  private closed = false;

  private constructor(options: StreamQueueOptions) {
    this.name = options.name;
    this.fileSystem = options.fileSystem;
    this.spillDirectory = options.spillDirectory;
    this.clock = options.clock ?? systemClock;
    this.memoryBytesMax = options.memoryBytesMax;
    this.spillBytesMax = options.spillBytesMax;
    this.regionBytes = options.regionBytes ?? queueRegionBytes;
    this.spillSegmentBytes = options.spillSegmentBytes ?? Math.min(spillSegmentBytesDefault, Math.max(options.spillBytesMax, 1));
    this.spillWriteBytesPendingMax = options.spillWriteBytesPendingMax ?? spillWriteBytesPendingMaxDefault;
    const sequenceNext = options.sequenceNext ?? 1;
    this.sequenceLastValue = sequenceNext - 1;
    this.sequenceAcknowledgedValue = sequenceNext - 1;
    this.sequenceDiscardedFirst = sequenceNext;
    this.sequenceDiscardedLast = sequenceNext - 1;
    for (const [volume, sizeBytes] of options.volumes) this.bitmaps.set(volume, { sizeBytes, bits: undefined });
  }

  /** Validates the options, deletes any spill segment left by an earlier run, and returns an empty queue. */
  static async open(options: StreamQueueOptions): Promise<StreamQueue> {
    const what = `the stream queue of '${options.name}'`;
    assertInteger(options.memoryBytesMax, `${what} with memoryBytesMax`, 1);
    assertInteger(options.spillBytesMax, `${what} with spillBytesMax`, 0);
    assertInteger(options.sequenceNext ?? 1, `${what} with sequenceNext`, 1);
    assertInteger(options.regionBytes ?? queueRegionBytes, `${what} with regionBytes`, 512);
    assertInteger(options.spillSegmentBytes ?? 1, `${what} with spillSegmentBytes`, 1);
    assertInteger(options.spillWriteBytesPendingMax ?? 1, `${what} with spillWriteBytesPendingMax`, 1);
    for (const [volume, sizeBytes] of options.volumes) {
      assertInteger(volume, `${what} with volume id`, 0);
      if (volume > volumeIdMax) throw new RangeError(`Cannot use ${what} with volume id ${volume}: it must fit in 32 bits`);
      assertInteger(sizeBytes, `${what} with the size of volume ${volume}`, 0);
    }
    await options.fileSystem.mkdir(options.spillDirectory);
    // The spill is not a durability mechanism: whatever an earlier run left is discarded unread
    // (the dirty-region log says what to resync after a crash).
    for (const name of await options.fileSystem.readdir(options.spillDirectory)) {
      if (spillFilePattern.test(name)) await options.fileSystem.unlink(path.join(options.spillDirectory, name));
    }
    return new StreamQueue(options);
  }

  get mode(): QueueMode {
    return this.modeValue;
  }

  get sequenceLast(): number {
    return this.sequenceLastValue;
  }

  get sequenceAcknowledged(): number {
    return this.sequenceAcknowledgedValue;
  }

  /**
   * Queues an entry and returns its sequence, or returns undefined in bitmap
   * mode (the entry's range is only marked dirty). Synchronous; copies the data.
   */
  push(input: StreamEntryInput): number | undefined {
    if (this.closed) throw new Error(`Cannot push to the stream queue of '${this.name}' as it is closed`);
    const dataBytes = this.checkEntry(input);
    if (this.modeValue === 'bitmap') {
      this.markEntry(input);
      return undefined;
    }
    const costBytes = dataBytes + entryOverheadBytes;
    let payload: Buffer | undefined;
    let place: 'memory' | 'spill' = 'memory';
    if (this.spilling || this.memoryBytes + costBytes > this.memoryBytesMax) {
      if (this.spillBytesMax === 0) {
        this.enterBitmap(`memory limit ${formatBytes(this.memoryBytesMax)} reached at ${nowText(this.clock)} and no spill file is configured`, input);
        return undefined;
      }
      payload = input.kind === 'checkpoint' ? Buffer.from(JSON.stringify(input.checkpoint), 'utf8') : undefined;
      const recordBytes = spillRecordHeaderBytes + (payload ? payload.length : dataBytes);
      if (this.spillBytes + recordBytes > this.spillBytesMax) {
        this.enterBitmap(`spill limit ${formatBytes(this.spillBytesMax)} reached at ${nowText(this.clock)}`, input);
        return undefined;
      }
      if (this.spillWriteBytesPending > 0 && this.spillWriteBytesPending + dataBytes > this.spillWriteBytesPendingMax) {
        this.enterBitmap(
          `spill file writes fell ${formatBytes(this.spillWriteBytesPending)} behind (limit ${formatBytes(this.spillWriteBytesPendingMax)}) at ${nowText(this.clock)}`,
          input,
        );
        return undefined;
      }
      place = 'spill';
    }
    const entry: QueuedEntry = {
      sequence: ++this.sequenceLastValue,
      kind: input.kind,
      volume: input.kind === 'checkpoint' ? 0 : input.volume,
      offset: input.kind === 'checkpoint' ? 0 : input.offset,
      lengthBytes: input.kind === 'checkpoint' ? 0 : input.lengthBytes,
      timeMs: input.timeMs,
      data: input.kind === 'write' ? copyData(input.data!, dataBytes) : undefined,
      payload,
      costBytes,
      spill: undefined,
    };
    if (input.checkpoint) entry.checkpoint = { ...input.checkpoint };
    this.entries.push(entry);
    this.queuedBytes += costBytes;
    if (place === 'memory') {
      this.memoryBytes += costBytes;
    } else {
      if (!this.spilling) {
        this.spilling = true;
        this.modeValue = 'spill';
        this.modeReasonValue = `memory limit ${formatBytes(this.memoryBytesMax)} reached at ${nowText(this.clock)}`;
      }
      this.appendToSpill(entry, spillRecordHeaderBytes + (payload ? payload.length : dataBytes));
    }
    return entry.sequence;
  }

  /**
   * Entries with sequence >= fromSequence, in order, up to about `bytesMax`
   * (counted as in `queuedBytes`; at least one entry). Empty when nothing at or
   * after fromSequence is queued yet.
   */
  async read(fromSequence: number, bytesMax: number): Promise<StreamEntry[]> {
    assertInteger(fromSequence, `read of stream '${this.name}' from sequence`, 1);
    assertInteger(bytesMax, `read of stream '${this.name}' with bytesMax`, 1);
    if (fromSequence <= this.sequenceAcknowledgedValue) {
      throw new RangeError(`Cannot read sequence ${fromSequence} of stream '${this.name}' as it is acknowledged: the queue holds sequences after ${this.sequenceAcknowledgedValue}`);
    }
    if (fromSequence > this.sequenceLastValue) return [];
    const first = this.entries[this.head];
    if (!first || fromSequence < first.sequence) {
      throw new EntriesDiscardedError(this.name, fromSequence, this.sequenceDiscardedFirst, this.sequenceDiscardedLast);
    }
    // Pick the entries synchronously, so that a write completing or an acknowledgement arriving
    // meanwhile cannot change what this read returns.
    const picked: { entry: QueuedEntry; data: Buffer | undefined }[] = [];
    let total = 0;
    for (let index = this.head + (fromSequence - first.sequence); index < this.entries.length; index++) {
      const entry = this.entries[index]!;
      if (picked.length > 0 && total + entry.costBytes > bytesMax) break;
      total += entry.costBytes;
      picked.push({ entry, data: entry.data });
    }
    const out: StreamEntry[] = new Array(picked.length);
    const fromSpill: { at: number; entry: QueuedEntry; place: SpillPlace }[] = [];
    for (let at = 0; at < picked.length; at++) {
      const { entry, data } = picked[at]!;
      // Only a write's data is ever read back: the index in memory holds everything else.
      if (entry.spill && entry.kind === 'write' && !data) {
        fromSpill.push({ at, entry, place: entry.spill });
      } else {
        out[at] = toStreamEntry(entry, data);
      }
    }
    if (fromSpill.length > 0) await this.readSpilled(fromSpill, out);
    return out;
  }

  /**
   * Marks a range for resync without queuing anything, in any mode (e.g. a
   * write the backing store failed, whose content is now unknown). The range is
   * handed out by the next `takeResyncRegions`.
   */
  markForResync(volume: number, offset: number, lengthBytes: number, reason: string): void {
    if (this.closed) throw new Error(`Cannot mark a range of the stream queue of '${this.name}' for resync as it is closed`);
    this.checkEntry({ kind: 'zero', volume, offset, lengthBytes, timeMs: 0 });
    this.markEntry({ kind: 'zero', volume, offset, lengthBytes, timeMs: this.clock.nowMs() });
    this.resyncReason = `${reason} (marked at ${nowText(this.clock)})`;
  }

  /** The target holds every entry up to `sequence` durably: drop them. Older acknowledgements are ignored. */
  acknowledge(sequence: number): void {
    assertInteger(sequence, `acknowledgement of stream '${this.name}' for sequence`, 0);
    if (sequence > this.sequenceLastValue) {
      throw new RangeError(`Cannot acknowledge sequence ${sequence} of stream '${this.name}' as only ${this.sequenceLastValue} were assigned`);
    }
    if (sequence <= this.sequenceAcknowledgedValue) return;
    this.sequenceAcknowledgedValue = sequence;
    while (this.head < this.entries.length && this.entries[this.head]!.sequence <= sequence) {
      const entry = this.entries[this.head]!;
      this.entries[this.head] = undefined as unknown as QueuedEntry;
      this.head++;
      this.queuedBytes -= entry.costBytes;
      if (!entry.spill) this.memoryBytes -= entry.costBytes;
      // A spilled entry's data (if its write is still pending) stays referenced by the pending
      // list only until the writer skips or writes it.
    }
    if (this.head > 1024 && this.head * 2 > this.entries.length) {
      this.entries = this.entries.slice(this.head);
      this.head = 0;
    }
    while (this.segments.length > 0 && this.segments[0]!.sequenceLast <= sequence) this.retireSegment(this.segments.shift()!);
    if (this.spilling && this.segments.length === 0) {
      this.spilling = false;
      this.modeValue = 'memory';
      this.modeReasonValue = `spill drained at ${nowText(this.clock)}`;
    }
  }

  /**
   * The dirty ranges per volume, leaving an empty bitmap; in bitmap mode the
   * queue returns to memory mode. The caller reads those ranges from the
   * volumes and pushes them as writes (sequences continue after the last one
   * assigned).
   */
  takeResyncRegions(): ResyncRegions {
    const discarded = this.episodeDiscarded ?? { first: this.sequenceLastValue + 1, last: this.sequenceLastValue };
    const result: ResyncRegions = {
      volumes: new Map(),
      resyncBytes: 0,
      reason: this.modeValue === 'bitmap' ? this.modeReasonValue : this.resyncReason,
      sequenceDiscardedFirst: discarded.first,
      sequenceDiscardedLast: discarded.last,
      oldestTimeMs: this.bitmapOldestTimeMs,
    };
    this.episodeDiscarded = undefined;
    const volumes = [...this.bitmaps.keys()].sort((a, b) => a - b);
    for (const volume of volumes) {
      const bitmap = this.bitmaps.get(volume)!;
      if (!bitmap.bits) continue;
      const ranges = bitmapRanges(bitmap.bits, this.regionBytes, bitmap.sizeBytes);
      for (const range of ranges) result.resyncBytes += range.lengthBytes;
      if (ranges.length > 0) result.volumes.set(volume, ranges);
      bitmap.bits = undefined;
    }
    if (result.resyncBytes !== this.resyncBytes) {
      throw new Error(`Stream queue '${this.name}' counted ${this.resyncBytes} bytes to resync but its bitmap holds ${result.resyncBytes}`);
    }
    this.resyncBytes = 0;
    this.bitmapOldestTimeMs = undefined;
    this.resyncReason = '';
    if (this.modeValue === 'bitmap') {
      this.modeValue = 'memory';
      this.modeReasonValue = `resync of ${formatBytes(result.resyncBytes)} taken at ${nowText(this.clock)}`;
    }
    return result;
  }

  stats(): StreamQueueStats {
    const first = this.entries[this.head];
    return {
      mode: this.modeValue,
      modeReason: this.modeReasonValue,
      queuedEntries: this.entries.length - this.head,
      queuedBytes: this.queuedBytes,
      memoryBytes: this.memoryBytes,
      spillBytes: this.spillBytes,
      spillWriteBytesPending: this.spillWriteBytesPending,
      resyncBytes: this.resyncBytes,
      oldestUnacknowledgedTimeMs: minDefined(first?.timeMs, this.bitmapOldestTimeMs),
      sequenceLast: this.sequenceLastValue,
      sequenceAcknowledged: this.sequenceAcknowledgedValue,
      checkpointsDiscarded: this.checkpointsDiscarded,
      bitmapEpisodes: this.bitmapEpisodes,
      spillErrorLast: this.spillErrorLast,
    };
  }

  /** Resolves when the background spill work queued so far has finished (tests, shutdown). */
  async idle(): Promise<void> {
    for (;;) {
      const io = this.io;
      await io;
      if (io === this.io && !this.spillWriteScheduled) return;
    }
  }

  /** Stops accepting pushes, finishes background work and deletes the spill segments. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const segment of this.segments.splice(0)) this.retireSegment(segment);
    for (const entry of this.spillPending) this.spillWriteBytesPending -= entry.data ? entry.data.length : 0;
    this.spillPending = [];
    await this.idle();
  }

  // ---- private ---------------------------------------------------------------

  /** Asserts what the tap validated at the edge; returns the data length. */
  private checkEntry(input: StreamEntryInput): number {
    const what = `push to stream '${this.name}'`;
    if (!(input.kind in kindCode)) throw new TypeError(`Cannot ${what} an entry of kind '${String(input.kind)}'`);
    assertInteger(input.timeMs, `${what} with time`, 0);
    if (input.kind === 'checkpoint') {
      const checkpoint = input.checkpoint;
      if (!checkpoint || typeof checkpoint.id !== 'string' || typeof checkpoint.kind !== 'string') {
        throw new TypeError(`Cannot ${what} a checkpoint entry without a checkpoint id and kind`);
      }
      if (Buffer.byteLength(checkpoint.id) > checkpointTextBytesMax || Buffer.byteLength(checkpoint.name ?? '') > checkpointTextBytesMax) {
        throw new RangeError(`Cannot ${what} checkpoint '${checkpoint.id.slice(0, 64)}' as its id or name is longer than ${checkpointTextBytesMax} bytes`);
      }
      if (input.data !== undefined) throw new TypeError(`Cannot ${what} a checkpoint entry with data`);
      return 0;
    }
    const bitmap = this.bitmaps.get(input.volume);
    if (!bitmap) throw new RangeError(`Cannot ${what} an entry for volume ${input.volume} as the stream has no such volume`);
    assertInteger(input.offset, `${what} with offset`, 0);
    assertInteger(input.lengthBytes, `${what} with length`, 0);
    if (input.offset + input.lengthBytes > bitmap.sizeBytes) {
      throw new RangeError(`Cannot ${what} ${input.lengthBytes} bytes at offset ${input.offset} of volume ${input.volume} as it holds ${bitmap.sizeBytes} bytes`);
    }
    if (input.kind === 'write') {
      if (input.data === undefined) throw new TypeError(`Cannot ${what} a write without data`);
      const dataBytes = writeDataLength(input.data);
      if (dataBytes !== input.lengthBytes) throw new RangeError(`Cannot ${what} a write of ${input.lengthBytes} bytes with ${dataBytes} bytes of data`);
      return dataBytes;
    }
    if (input.data !== undefined) throw new TypeError(`Cannot ${what} a ${input.kind} entry with data`);
    return 0;
  }

  private appendToSpill(entry: QueuedEntry, recordBytes: number): void {
    let segment = this.segments[this.segments.length - 1];
    if (!segment || (segment.sizeBytes > 0 && segment.sizeBytes + recordBytes > this.spillSegmentBytes)) {
      const number = this.segmentNumberNext++;
      segment = {
        number,
        path: path.join(this.spillDirectory, `spill-${String(number).padStart(12, '0')}.seg`),
        file: undefined,
        sizeBytes: 0,
        sequenceLast: 0,
        readsActive: 0,
        retired: false,
        deleteQueued: false,
      };
      this.segments.push(segment);
    }
    entry.spill = { segment, position: segment.sizeBytes, recordBytes, written: false };
    segment.sizeBytes += recordBytes;
    segment.sequenceLast = entry.sequence;
    this.spillBytes += recordBytes;
    this.spillPending.push(entry);
    this.spillWriteBytesPending += entry.data ? entry.data.length : 0;
    this.scheduleSpillWrite();
  }

  private scheduleSpillWrite(): void {
    if (this.spillWriteScheduled) return;
    this.spillWriteScheduled = true;
    this.io = this.io.then(() => this.writeSpillBatch());
  }

  /** One background write: the pending records of one segment, up to the batch limit. */
  private async writeSpillBatch(): Promise<void> {
    this.spillWriteScheduled = false;
    // Entries of retired segments (acknowledged or discarded) are never written.
    let skip = 0;
    while (skip < this.spillPending.length && this.spillPending[skip]!.spill!.segment.retired) {
      const entry = this.spillPending[skip++]!;
      this.spillWriteBytesPending -= entry.data ? entry.data.length : 0;
      entry.data = undefined;
    }
    if (skip > 0) this.spillPending.splice(0, skip);
    if (this.spillPending.length === 0) return;
    const segment = this.spillPending[0]!.spill!.segment;
    const batch: QueuedEntry[] = [];
    let bytes = 0;
    for (const entry of this.spillPending) {
      if (entry.spill!.segment !== segment) break;
      if (batch.length > 0 && bytes + entry.spill!.recordBytes > spillWriteBatchBytesMax) break;
      batch.push(entry);
      bytes += entry.spill!.recordBytes;
    }
    this.spillPending.splice(0, batch.length);
    if (this.spillPending.length > 0) this.scheduleSpillWrite();
    const chunks: Buffer[] = [];
    for (const entry of batch) {
      const payload = entry.kind === 'write' ? entry.data! : entry.payload ?? Buffer.alloc(0);
      chunks.push(encodeSpillHeader(entry, payload));
      if (payload.length > 0) chunks.push(payload);
    }
    try {
      if (!segment.file) segment.file = await this.fileSystem.open(segment.path, 'create');
      await segment.file.pwrite(chunks, batch[0]!.spill!.position);
    } catch (error) {
      for (const entry of batch) this.spillWriteBytesPending -= entry.data ? entry.data.length : 0;
      if (!segment.retired) {
        this.enterBitmap(`spill file write failed at ${nowText(this.clock)}: ${(error as Error).message}`, undefined);
      }
      return;
    }
    for (const entry of batch) {
      this.spillWriteBytesPending -= entry.data ? entry.data.length : 0;
      entry.spill!.written = true;
      entry.data = undefined;
      entry.payload = undefined;
    }
  }

  /** Reads spilled entries, grouping records that lie back to back in one segment into one read. */
  private async readSpilled(items: { at: number; entry: QueuedEntry; place: SpillPlace }[], out: StreamEntry[]): Promise<void> {
    const segments = new Set(items.map((item) => item.place.segment));
    for (const segment of segments) segment.readsActive++;
    try {
      let start = 0;
      while (start < items.length) {
        const segment = items[start]!.place.segment;
        let end = start + 1;
        while (
          end < items.length &&
          items[end]!.place.segment === segment &&
          items[end]!.place.position === items[end - 1]!.place.position + items[end - 1]!.place.recordBytes
        ) {
          end++;
        }
        const position = items[start]!.place.position;
        const last = items[end - 1]!.place;
        const buffer = Buffer.allocUnsafe(last.position + last.recordBytes - position);
        let got = 0;
        try {
          if (!segment.file) throw new Error('the segment file is not open');
          got = await segment.file.pread(buffer, position);
        } catch (error) {
          throw this.spillDamaged(segment, `reading ${buffer.length} bytes at ${position} failed: ${(error as Error).message}`, error);
        }
        if (got < buffer.length) throw this.spillDamaged(segment, `it ends at ${position + got}, before the record at ${position} ends`);
        for (let index = start; index < end; index++) {
          const { at, entry, place } = items[index]!;
          const record = buffer.subarray(place.position - position, place.position - position + place.recordBytes);
          const problem = checkSpillRecord(record, entry);
          if (problem) throw this.spillDamaged(segment, `record of sequence ${entry.sequence} at ${place.position}: ${problem}`);
          out[at] = toStreamEntry(entry, record.subarray(spillRecordHeaderBytes));
        }
        start = end;
      }
    } finally {
      for (const segment of segments) {
        segment.readsActive--;
        if (segment.retired) this.queueSegmentDelete(segment);
      }
    }
  }

  private spillDamaged(segment: SpillSegment, detail: string, cause?: unknown): SpillDamagedError {
    if (this.modeValue !== 'bitmap' && !segment.retired) this.enterBitmap(`spill file damaged at ${nowText(this.clock)}: ${detail}`, undefined);
    const error = new SpillDamagedError(this.name, segment.path, detail);
    if (cause !== undefined) (error as { cause?: unknown }).cause = cause;
    return error;
  }

  private retireSegment(segment: SpillSegment): void {
    segment.retired = true;
    this.spillBytes -= segment.sizeBytes;
    this.queueSegmentDelete(segment);
  }

  private queueSegmentDelete(segment: SpillSegment): void {
    if (segment.readsActive > 0 || segment.deleteQueued) return;
    segment.deleteQueued = true;
    this.io = this.io.then(async () => {
      const file = segment.file;
      if (!file) return;
      segment.file = undefined;
      try {
        await file.close();
        await this.fileSystem.unlink(segment.path);
      } catch (error) {
        // Leaked space, not lost data: say so in the stats rather than change the mode.
        this.spillErrorLast = `Cannot delete spill segment ${segment.path}: ${(error as Error).message}`;
      }
    });
  }

  /** Discards every queued entry into the bitmap (with `current`, the entry being pushed). */
  private enterBitmap(reason: string, current: StreamEntryInput | undefined): void {
    if (this.modeValue === 'bitmap') return;
    this.bitmapEpisodes++;
    const first = this.entries[this.head];
    this.sequenceDiscardedFirst = first ? first.sequence : this.sequenceLastValue + 1;
    this.sequenceDiscardedLast = this.sequenceLastValue;
    this.episodeDiscarded = { first: this.sequenceDiscardedFirst, last: this.sequenceDiscardedLast };
    for (let index = this.head; index < this.entries.length; index++) {
      this.markEntry(this.entries[index]!);
    }
    this.entries = [];
    this.head = 0;
    this.queuedBytes = 0;
    this.memoryBytes = 0;
    for (const segment of this.segments.splice(0)) this.retireSegment(segment);
    for (const entry of this.spillPending) this.spillWriteBytesPending -= entry.data ? entry.data.length : 0;
    this.spillPending = [];
    this.spilling = false;
    this.modeValue = 'bitmap';
    this.modeReasonValue = reason;
    if (current) this.markEntry(current);
  }

  /** Marks an entry's range dirty; a checkpoint marker has no range and is counted as discarded. */
  private markEntry(entry: { kind: StreamEntryKind; volume: number; offset: number; lengthBytes: number; timeMs: number }): void {
    if (entry.kind === 'checkpoint') {
      this.checkpointsDiscarded++;
      return;
    }
    if (this.bitmapOldestTimeMs === undefined || entry.timeMs < this.bitmapOldestTimeMs) this.bitmapOldestTimeMs = entry.timeMs;
    if (entry.lengthBytes === 0) return;
    const bitmap = this.bitmaps.get(entry.volume)!;
    const regionCount = Math.ceil(bitmap.sizeBytes / this.regionBytes);
    bitmap.bits ??= new Uint8Array(Math.ceil(regionCount / 8));
    const bits = bitmap.bits;
    const firstRegion = Math.floor(entry.offset / this.regionBytes);
    const lastRegion = Math.floor((entry.offset + entry.lengthBytes - 1) / this.regionBytes);
    for (let region = firstRegion; region <= lastRegion; region++) {
      const byte = region >>> 3;
      // Whole bytes at a time where the range covers them (a large trim marks millions of regions).
      if ((region & 7) === 0 && region + 7 <= lastRegion && region + 7 < regionCount - 1) {
        const before = bits[byte]!;
        if (before !== 0xff) {
          this.resyncBytes += (8 - popCount8(before)) * this.regionBytes;
          bits[byte] = 0xff;
        }
        region += 7;
        continue;
      }
      const mask = 1 << (region & 7);
      if ((bits[byte]! & mask) === 0) {
        bits[byte] = bits[byte]! | mask;
        this.resyncBytes += Math.min(this.regionBytes, bitmap.sizeBytes - region * this.regionBytes);
      }
    }
  }
}

function copyData(data: WriteData, lengthBytes: number): Buffer {
  const copy = Buffer.allocUnsafe(lengthBytes);
  if (Buffer.isBuffer(data)) {
    data.copy(copy);
    return copy;
  }
  let at = 0;
  for (const chunk of data) at += chunk.copy(copy, at);
  return copy;
}

function toStreamEntry(entry: QueuedEntry, data: Buffer | undefined): StreamEntry {
  const out: StreamEntry = { sequence: entry.sequence, kind: entry.kind, volume: entry.volume, offset: entry.offset, lengthBytes: entry.lengthBytes, timeMs: entry.timeMs };
  if (entry.kind === 'write') out.data = data!;
  if (entry.checkpoint) out.checkpoint = { ...entry.checkpoint };
  return out;
}

function encodeSpillHeader(entry: QueuedEntry, payload: Buffer): Buffer {
  const header = Buffer.alloc(spillRecordHeaderBytes);
  header.writeUInt32LE(spillRecordMagic, 0);
  header.writeUInt32LE(spillRecordHeaderBytes + payload.length, 4);
  header.writeUInt8(kindCode[entry.kind], 12);
  header.writeBigUInt64LE(BigInt(entry.sequence), 16);
  header.writeUInt32LE(entry.volume, 24);
  header.writeUInt32LE(payload.length, 28);
  header.writeBigUInt64LE(BigInt(entry.offset), 32);
  header.writeBigUInt64LE(BigInt(entry.lengthBytes), 40);
  header.writeDoubleLE(entry.timeMs, 48);
  const crc = native.crc32c(payload, native.crc32c(header.subarray(12), 0)) >>> 0;
  header.writeUInt32LE(crc, 8);
  return header;
}

/** What is wrong with a spill record, checked against the in-memory index; undefined when it is whole. */
function checkSpillRecord(record: Buffer, entry: QueuedEntry): string | undefined {
  if (record.readUInt32LE(0) !== spillRecordMagic) return 'bad magic';
  if (record.readUInt32LE(4) !== record.length) return `length ${record.readUInt32LE(4)} where ${record.length} was written`;
  const crc = native.crc32c(record.subarray(spillRecordHeaderBytes), native.crc32c(record.subarray(12, spillRecordHeaderBytes), 0)) >>> 0;
  if (crc !== record.readUInt32LE(8)) return 'checksum mismatch';
  // With the checksum right, a mismatch below means the record is not the one the index placed here.
  if (record.readUInt8(12) !== kindCode[entry.kind]) return 'wrong kind';
  if (record.readBigUInt64LE(16) !== BigInt(entry.sequence)) return `sequence ${record.readBigUInt64LE(16)}`;
  if (record.readUInt32LE(24) !== entry.volume) return 'wrong volume';
  if (record.readUInt32LE(28) !== record.length - spillRecordHeaderBytes) return 'wrong payload length';
  if (record.readBigUInt64LE(32) !== BigInt(entry.offset)) return 'wrong offset';
  if (record.readBigUInt64LE(40) !== BigInt(entry.lengthBytes)) return 'wrong length';
  if (record.readDoubleLE(48) !== entry.timeMs) return 'wrong time';
  return undefined;
}

function minDefined(a: number | undefined, b: number | undefined): number | undefined {
  if (a === undefined) return b;
  if (b === undefined) return a;
  return Math.min(a, b);
}

function popCount8(value: number): number {
  let count = 0;
  for (let bits = value; bits !== 0; bits &= bits - 1) count++;
  return count;
}

/** Coalesced dirty ranges of one volume's bitmap, clipped to its size. */
function bitmapRanges(bits: Uint8Array, regionBytes: number, sizeBytes: number): ByteRange[] {
  const out: ByteRange[] = [];
  const regionCount = Math.ceil(sizeBytes / regionBytes);
  let runStart = -1;
  for (let region = 0; region <= regionCount; region++) {
    const byte = region >>> 3;
    if ((region & 7) === 0 && runStart < 0 && region + 8 <= regionCount && bits[byte] === 0) {
      region += 7;
      continue;
    }
    const dirty = region < regionCount && (bits[byte]! & (1 << (region & 7))) !== 0;
    if (dirty && runStart < 0) runStart = region;
    else if (!dirty && runStart >= 0) {
      const offset = runStart * regionBytes;
      out.push({ offset, lengthBytes: Math.min(region * regionBytes, sizeBytes) - offset });
      runStart = -1;
    }
  }
  return out;
}
