/**
 * A recovery view: one volume at a point in time or at a checkpoint, built
 * from the index alone, served with the replica's block semantics.
 *
 * Build. The view includes, per stream, a prefix of that stream (its cut):
 * at a time T, the stream's records up to the first one newer than T; at a
 * checkpoint, everything before the stream's marker. The included records of
 * the volume are bucketed by volume range (compressed rows, two counting
 * passes over typed arrays, no object per record); a read walks a bucket from
 * newest to oldest and stops once its range is covered.
 *
 * Promotion under a view. The replica holds every record up to the journal's
 * watermark W. While W stays at or below the view's cap (the record before the
 * first one of this volume the view excludes), every promoted record is one the
 * view includes, so a byte whose newest included record is promoted reads the
 * same from the replica, and a byte the view reads from the replica is never
 * rewritten. Unforced promotion therefore stops at the cap of every open view
 * (the view pins the replica, not the units). Reads find records at or below W
 * in the replica, so their units can be released; a unit is not released while
 * a view read is in flight. When the hard limit forces promotion past the cap,
 * the view is invalidated (ViewInvalidatedError on every later read): copying
 * the old bytes aside would need more space exactly when space has run out,
 * and a recovery view must never return bytes of the wrong point.
 *
 * Writes go to a scratch file in 4 KiB blocks (read-modify-write at the edges),
 * limited to `scratchBytesMax`, removed when the view closes.
 */
import { cachedReadBytesMax, writeDataLength, type BackingStore, type Extent, type WriteData, type ZeroOptions } from '../tap/backing-store.js';
import { ScratchFullError, ViewInvalidatedError } from './errors.js';
import type { JournalFile, JournalFileSystem } from './file-system.js';
import type { Journal } from './journal.js';
import { indexChunkRecords, indexChunkShift } from './record-index.js';
import { RecordKind } from './record.js';

export const scratchBlockBytes = 4096;
const bucketBytesMin = 64 * 1024;
const bucketCountTarget = 1 << 20;

export interface ViewHost {
  journal: Journal;
  replica: BackingStore;
  fileSystem: JournalFileSystem;
  scratchPath: string;
  closed(view: RecoveryView): void;
}

export interface ViewBuildOptions {
  host: ViewHost;
  name: string;
  volume: number;
  /** Per stream, the last included sequence; Infinity for a time view (computed here). */
  cut: Float64Array;
  timeMs: number | undefined;
  lsnLast: number;
  scratchBytesMax: number;
}

const chunkMask = indexChunkRecords - 1;
/** Numbers per piece of a read: unit (or `zeroPiece`), position, offset in the record's data, volume start, volume end. */
const pieceFields = 5;
/** The unit of a piece that reads as zeroes (a zero or trim record). */
const zeroPiece = -1;
/** Reads up to this size ask the replica in page-cache-sized pieces (see `readBase`); about 0.1 ms of copying. */
const loopReadBytesMax = 1024 * 1024;

/** Calls `visit(chunk, at, lsn)` for every index row with lsn in [from, to]. */
function forRows(journal: Journal, from: number, to: number, visit: (chunk: Journal['index']['chunks'][number], at: number, lsn: number) => void): void {
  const index = journal.index;
  if (from > to) return;
  const rowFirst = from - index.baseLsn;
  const rowLast = to - index.baseLsn;
  for (let c = rowFirst >>> indexChunkShift; c <= rowLast >>> indexChunkShift; c++) {
    const chunk = index.chunks[c]!;
    const low = c === rowFirst >>> indexChunkShift ? rowFirst & chunkMask : 0;
    const high = c === rowLast >>> indexChunkShift ? rowLast & chunkMask : chunkMask;
    const lsnBase = index.baseLsn + c * indexChunkRecords;
    for (let at = low; at <= high; at++) visit(chunk, at, lsnBase + at);
  }
}

export class RecoveryView implements BackingStore {
  readonly name: string;
  readonly volume: number;
  readonly sizeBytes: number;
  readonly readOnly = false;
  /** Promotion up to this lsn keeps the view correct. */
  readonly capLsn: number;
  readonly recordsIncluded: number;
  private readonly host: ViewHost;
  private readonly bucketBytes: number;
  private readonly bucketStart: Uint32Array;
  private readonly rows: Uint32Array;
  private readonly rowBaseLsn: number;
  private invalidReason: string | undefined;
  private readonly scratchBlocks = new Map<number, number>();
  private readonly scratchFree: number[] = [];
  private scratchSlots = 0;
  private scratch: JournalFile | undefined;
  private readonly scratchBytesMax: number;
  private isClosed = false;

  private constructor(options: ViewBuildOptions, layout: { bucketBytes: number; bucketStart: Uint32Array; rows: Uint32Array; rowBaseLsn: number; capLsn: number }) {
    this.host = options.host;
    this.name = options.name;
    this.volume = options.volume;
    this.sizeBytes = options.host.replica.sizeBytes;
    this.scratchBytesMax = options.scratchBytesMax;
    this.bucketBytes = layout.bucketBytes;
    this.bucketStart = layout.bucketStart;
    this.rows = layout.rows;
    this.rowBaseLsn = layout.rowBaseLsn;
    this.capLsn = layout.capLsn;
    this.recordsIncluded = layout.rows.length;
  }

  static async build(options: ViewBuildOptions): Promise<RecoveryView> {
    const { journal } = options.host;
    const { cut, volume, lsnLast } = options;
    const sizeBytes = options.host.replica.sizeBytes;
    let bucketBytes = bucketBytesMin;
    while (sizeBytes / bucketBytes > bucketCountTarget) bucketBytes *= 2;
    const bucketCount = Math.max(1, Math.ceil(sizeBytes / bucketBytes));
    const from = Math.max(journal.watermarkLsn + 1, journal.index.baseLsn);
    const timeMs = options.timeMs;
    if (timeMs !== undefined) {
      // A stream's prefix ends before its first record newer than T.
      forRows(journal, from, lsnLast, (chunk, at) => {
        const stream = chunk.stream[at]!;
        if (cut[stream] === Infinity && chunk.timeMs[at]! > timeMs) cut[stream] = chunk.sequence[at]! - 1;
      });
    }
    const bucketStart = new Uint32Array(bucketCount + 1);
    let excludedFirst = Infinity;
    forRows(journal, from, lsnLast, (chunk, at, lsn) => {
      if (chunk.volume[at] !== volume || chunk.kind[at] === RecordKind.checkpoint) return;
      if (chunk.sequence[at]! > cut[chunk.stream[at]!]!) {
        if (excludedFirst === Infinity) excludedFirst = lsn;
        return;
      }
      const offset = chunk.offset[at]!;
      const last = Math.floor((offset + chunk.lengthBytes[at]! - 1) / bucketBytes);
      for (let bucket = Math.floor(offset / bucketBytes); bucket <= last; bucket++) bucketStart[bucket + 1]!++;
    });
    for (let bucket = 0; bucket < bucketCount; bucket++) bucketStart[bucket + 1]! += bucketStart[bucket]!;
    const rows = new Uint32Array(bucketStart[bucketCount]!);
    const fill = bucketStart.slice(0, bucketCount);
    const rowBaseLsn = journal.index.baseLsn;
    forRows(journal, from, lsnLast, (chunk, at, lsn) => {
      if (chunk.volume[at] !== volume || chunk.kind[at] === RecordKind.checkpoint) return;
      if (chunk.sequence[at]! > cut[chunk.stream[at]!]!) return;
      const offset = chunk.offset[at]!;
      const last = Math.floor((offset + chunk.lengthBytes[at]! - 1) / bucketBytes);
      for (let bucket = Math.floor(offset / bucketBytes); bucket <= last; bucket++) rows[fill[bucket]!++] = lsn - rowBaseLsn;
    });
    const capLsn = Math.min(excludedFirst, lsnLast + 1) - 1;
    return new RecoveryView(options, { bucketBytes, bucketStart, rows, rowBaseLsn, capLsn });
  }

  get invalidated(): boolean {
    return this.invalidReason !== undefined;
  }

  invalidate(reason: string): void {
    this.invalidReason ??= reason;
  }

  private checkUsable(): void {
    if (this.isClosed) throw new Error(`Cannot use recovery view '${this.name}' as it is closed`);
    if (this.invalidReason !== undefined) throw new ViewInvalidatedError(this.name, this.invalidReason);
  }

  private checkRange(offset: number, lengthBytes: number): void {
    if (!(offset >= 0 && lengthBytes >= 0 && offset + lengthBytes <= this.sizeBytes)) {
      throw new RangeError(`Cannot access ${lengthBytes} bytes at ${offset} of recovery view '${this.name}' of ${this.sizeBytes} bytes`);
    }
  }

  /**
   * The view's bytes before scratch writes: the pieces that come from the journal or are zero are
   * found first, the rest comes from the replica. For reads up to `loopReadBytesMax` the replica is
   * asked in pieces of at most `cachedReadBytesMax`, which a file replica copies from the page
   * cache at once on this thread; a thread pool request per range instead cost more than the copy
   * it carried (on a 2-core VM a 1 MiB view read with four replica ranges took 190 µs of CPU that
   * way against 130 µs in pieces, and reading the replica file directly 100 µs). Larger reads ask
   * for each range whole, so the event loop is never held for long. Replica requests go first,
   * then the journal's pieces are copied while any that missed the page cache run.
   */
  private async readBase(target: Buffer, offset: number): Promise<void> {
    const journal = this.host.journal;
    journal.viewReadsInFlight++;
    try {
      const end = offset + target.length;
      const pieces: number[] = [];
      const fromReplica: number[] = [];
      let cursor = offset;
      while (cursor < end) {
        const bucket = Math.floor(cursor / this.bucketBytes);
        const segmentEnd = Math.min(end, (bucket + 1) * this.bucketBytes);
        this.resolveSegment(bucket, cursor, segmentEnd, pieces, fromReplica);
        cursor = segmentEnd;
      }
      const tasks: Promise<unknown>[] = [];
      const requestBytesMax = target.length <= loopReadBytesMax ? cachedReadBytesMax : Infinity;
      const replica = this.host.replica;
      for (let i = 0; i < fromReplica.length; i += 2) {
        const stop = fromReplica[i + 1]!;
        for (let start = fromReplica[i]!; start < stop; start += requestBytesMax) {
          const requestEnd = Math.min(stop, start + requestBytesMax);
          tasks.push(replica.read(target.subarray(start - offset, requestEnd - offset), start));
        }
      }
      for (let i = 0; i < pieces.length; i += pieceFields) this.copyPiece(pieces, i, target.subarray(pieces[i + 3]! - offset, pieces[i + 4]! - offset), tasks);
      await Promise.all(tasks);
    } finally {
      journal.viewReadsInFlight--;
    }
  }

  /** Fills `into` with the piece at `i`: zeroes, or the record's data (from the page cache at once when it can). */
  private copyPiece(pieces: number[], i: number, into: Buffer, tasks: Promise<unknown>[]): void {
    const unit = pieces[i]!;
    if (unit === zeroPiece) {
      into.fill(0);
      return;
    }
    const journal = this.host.journal;
    if (!journal.readRecordDataCached(unit, pieces[i + 1]!, pieces[i + 2]!, into)) tasks.push(journal.readRecordData(unit, pieces[i + 1]!, pieces[i + 2]!, into));
  }

  /**
   * Finds what covers [start, end) of one bucket: records are added to `pieces` (unit or
   * `zeroPiece`, position, offset in the data, volume start and end), the rest to `fromReplica` as
   * [start, end) pairs, joined with the pair before when they meet.
   */
  private resolveSegment(bucket: number, start: number, end: number, pieces: number[], fromReplica: number[]): void {
    const journal = this.host.journal;
    const index = journal.index;
    const watermark = journal.watermarkLsn;
    // Uncovered intervals, as flat [start, end) pairs.
    let uncovered = [start, end];
    for (let k = this.bucketStart[bucket + 1]! - 1; k >= this.bucketStart[bucket]! && uncovered.length > 0; k--) {
      const lsn = this.rowBaseLsn + this.rows[k]!;
      // This and every older record of the bucket are in the replica already.
      if (lsn <= watermark) break;
      const { chunk, at } = index.locate(lsn);
      const recordStart = chunk.offset[at]!;
      const recordEnd = recordStart + chunk.lengthBytes[at]!;
      const kind = chunk.kind[at]!;
      const next: number[] = [];
      for (let i = 0; i < uncovered.length; i += 2) {
        const a = uncovered[i]!;
        const b = uncovered[i + 1]!;
        const low = Math.max(a, recordStart);
        const high = Math.min(b, recordEnd);
        if (low >= high) {
          next.push(a, b);
          continue;
        }
        if (a < low) next.push(a, low);
        if (high < b) next.push(high, b);
        if (kind === RecordKind.write) pieces.push(chunk.unit[at]!, chunk.position[at]!, low - recordStart, low, high);
        else pieces.push(zeroPiece, 0, 0, low, high);
      }
      uncovered = next;
    }
    // Pairs are disjoint and sorted within the segment; segments come in order.
    for (let i = 0; i < uncovered.length; i += 2) {
      if (fromReplica.length > 0 && fromReplica[fromReplica.length - 1] === uncovered[i]) fromReplica[fromReplica.length - 1] = uncovered[i + 1]!;
      else fromReplica.push(uncovered[i]!, uncovered[i + 1]!);
    }
  }

  async read(target: Buffer, offset: number): Promise<void> {
    this.checkUsable();
    this.checkRange(offset, target.length);
    await this.readBase(target, offset);
    if (this.scratchBlocks.size > 0) {
      const end = offset + target.length;
      for (let block = Math.floor(offset / scratchBlockBytes); block * scratchBlockBytes < end; block++) {
        const slot = this.scratchBlocks.get(block);
        if (slot === undefined) continue;
        const blockStart = block * scratchBlockBytes;
        const low = Math.max(offset, blockStart);
        const high = Math.min(end, blockStart + scratchBlockBytes);
        const piece = target.subarray(low - offset, high - offset);
        if (slot < 0) piece.fill(0);
        else await this.scratch!.pread(piece, slot * scratchBlockBytes + (low - blockStart));
      }
    }
    // A forced promotion during the read may have changed what it saw.
    this.checkUsable();
  }

  private async putBlock(block: number, content: Buffer | undefined): Promise<void> {
    if (content === undefined) {
      const slot = this.scratchBlocks.get(block);
      if (slot !== undefined && slot >= 0) this.scratchFree.push(slot);
      this.scratchBlocks.set(block, -1);
      return;
    }
    let slot = this.scratchBlocks.get(block);
    if (slot === undefined || slot < 0) {
      slot = this.scratchFree.pop();
      if (slot === undefined) {
        if ((this.scratchSlots + 1) * scratchBlockBytes > this.scratchBytesMax) throw new ScratchFullError(this.name, this.scratchBytesMax);
        slot = this.scratchSlots++;
      }
    }
    this.scratch ??= await this.host.fileSystem.open(this.host.scratchPath, 'create');
    await this.scratch.pwrite(content, slot * scratchBlockBytes);
    this.scratchBlocks.set(block, slot);
  }

  /** Writes `source` (or zeroes when undefined) to the scratch, block by block. */
  private async mutate(offset: number, lengthBytes: number, source: Buffer | undefined): Promise<void> {
    this.checkUsable();
    this.checkRange(offset, lengthBytes);
    const end = offset + lengthBytes;
    for (let block = Math.floor(offset / scratchBlockBytes); block * scratchBlockBytes < end; block++) {
      const blockStart = block * scratchBlockBytes;
      const blockBytes = Math.min(scratchBlockBytes, this.sizeBytes - blockStart);
      const low = Math.max(offset, blockStart);
      const high = Math.min(end, blockStart + blockBytes);
      if (low === blockStart && high === blockStart + blockBytes) {
        await this.putBlock(block, source ? Buffer.from(source.subarray(low - offset, high - offset)) : undefined);
        continue;
      }
      const content = Buffer.alloc(blockBytes);
      await this.read(content, blockStart);
      if (source) source.copy(content, low - blockStart, low - offset, high - offset);
      else content.fill(0, low - blockStart, high - blockStart);
      await this.putBlock(block, content);
    }
  }

  async write(data: WriteData, offset: number): Promise<void> {
    const whole = Buffer.isBuffer(data) ? data : Buffer.concat(data as Buffer[], writeDataLength(data));
    await this.mutate(offset, whole.length, whole);
  }

  async writeZeroes(offset: number, lengthBytes: number, _options: ZeroOptions): Promise<void> {
    await this.mutate(offset, lengthBytes, undefined);
  }

  async trim(offset: number, lengthBytes: number): Promise<void> {
    await this.mutate(offset, lengthBytes, undefined);
  }

  /** Scratch writes are thrown away at close, so there is nothing to make durable. */
  async flush(): Promise<void> {
    this.checkUsable();
  }

  async cache(): Promise<void> {}

  /** The view reports every range as data: allocation hints from journal and replica would cost a merge for little gain. */
  extents(offset: number, lengthBytes: number, _extentCountMax: number): Extent[] {
    return [{ lengthBytes: Math.min(lengthBytes, this.sizeBytes - offset), hole: false, zero: false }];
  }

  get scratchBytes(): number {
    return (this.scratchSlots - this.scratchFree.length) * scratchBlockBytes;
  }

  async close(): Promise<void> {
    if (this.isClosed) return;
    this.isClosed = true;
    this.host.closed(this);
    if (this.scratch) {
      await this.scratch.close();
      await this.host.fileSystem.unlink(this.host.scratchPath);
    }
  }
}
