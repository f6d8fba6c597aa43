/**
 * Reading the log back: the scan that open (crash recovery) and the offline
 * tool share. It walks the units in order and stops at the first record that
 * fails a check; see README for why every check is there.
 */
import type { JournalFile, JournalFileSystem } from './file-system.js';
import { checkRecord, claimedCommitLsn, decodeHeader, decodeMarker, recordDataBytes, recordHeaderBytes, RecordKind, type RecordHeader } from './record.js';

const scanWindowBytes = 4 * 1024 * 1024;

/** Reads a file through a window so that a scan does one large read per window, not two per record. */
class WindowReader {
  private window = Buffer.alloc(0);
  private windowStart = 0;
  constructor(private readonly file: JournalFile, private readonly fileBytes: number) {}

  async read(position: number, lengthBytes: number): Promise<Buffer | undefined> {
    if (position + lengthBytes > this.fileBytes) return undefined;
    if (position < this.windowStart || position + lengthBytes > this.windowStart + this.window.length) {
      const size = Math.min(Math.max(scanWindowBytes, lengthBytes), this.fileBytes - position);
      const buffer = Buffer.alloc(size);
      const got = await this.file.pread(buffer, position);
      this.window = buffer.subarray(0, got);
      this.windowStart = position;
      if (got < lengthBytes) return undefined;
    }
    return this.window.subarray(position - this.windowStart, position - this.windowStart + lengthBytes);
  }

  /**
   * The bytes from `position` to the end of the current window when at least `lengthBytes` of them
   * are there, else a new window from `position` (a search steps through a window without reading
   * it again at every step).
   */
  async readAvailable(position: number, lengthBytes: number): Promise<Buffer | undefined> {
    const end = this.windowStart + this.window.length;
    if (position >= this.windowStart && position + lengthBytes <= end) return this.window.subarray(position - this.windowStart);
    return this.read(position, Math.min(scanWindowBytes, this.fileBytes - position));
  }
}

export interface UnitRef {
  number: number;
  path: string;
}

export interface ScannedUnit extends UnitRef {
  records: number;
  firstLsn: number;
  lastLsn: number;
  /** Where the next record would go. */
  endPosition: number;
  /** Why the scan left this unit (the last unit's reason is where the log ends). */
  stopReason: string;
  timeMsMin: number;
  timeMsMax: number;
}

export interface ScanResult {
  units: ScannedUnit[];
  /** Units past the end of the log (a spare, or units of a cut batch). */
  unitsBeyond: UnitRef[];
  lsnLast: number;
  generationLast: number;
  /** True when the log ends at bytes that are not zero: a torn or damaged record (the cut). */
  endIsDamage: boolean;
}

export interface ScanOptions {
  fileSystem: JournalFileSystem;
  units: UnitRef[];
  unitBytes: number;
  /** Lsn of the first record expected; undefined accepts the first valid record's. */
  lsnFirst?: number;
  generationMin?: number;
  /** Called for every valid record; `data` only for checkpoint markers unless `withData`. */
  onRecord(header: RecordHeader, unit: number, position: number, data: Buffer | undefined): void;
  withData?: boolean;
  /** Where the first unit's scan starts (default: its beginning). */
  fromPosition?: number;
}

interface UnitCursor {
  reader: WindowReader;
  close(): Promise<void>;
}

export async function scanUnits(options: ScanOptions): Promise<ScanResult> {
  const { fileSystem, units, unitBytes } = options;
  let lsnExpected = options.lsnFirst;
  let generation = options.generationMin ?? 0;
  const scanned: ScannedUnit[] = [];
  let endIsDamage = false;
  let index = 0;
  for (; index < units.length; index++) {
    const ref = units[index]!;
    const file = await fileSystem.open(ref.path, 'read');
    const cursor: UnitCursor = { reader: new WindowReader(file, Math.min(unitBytes, await file.sizeBytes())), close: () => file.close() };
    const unit: ScannedUnit = { ...ref, records: 0, firstLsn: 0, lastLsn: 0, endPosition: 0, stopReason: '', timeMsMin: Infinity, timeMsMax: -Infinity };
    let position = index === 0 ? options.fromPosition ?? 0 : 0;
    try {
      for (;;) {
        const raw = await cursor.reader.read(position, recordHeaderBytes);
        if (!raw) {
          unit.stopReason = 'end of unit';
          break;
        }
        const header = decodeHeader(raw);
        if (typeof header === 'string') {
          unit.stopReason = header;
          endIsDamage = !raw.equals(Buffer.alloc(recordHeaderBytes));
          break;
        }
        const problem =
          header.unit !== ref.number ? `record of unit ${header.unit}`
          : lsnExpected !== undefined && header.lsn !== lsnExpected ? `lsn ${header.lsn} where ${lsnExpected} was expected`
          : header.generation < generation ? `stale record of generation ${header.generation} after generation ${generation}`
          : position + recordHeaderBytes + recordDataBytes(header.kind, header.lengthBytes) > unitBytes ? 'length past the end of the unit'
          : undefined;
        if (problem) {
          unit.stopReason = problem;
          // A stale record from before a cut, or from a released unit, is a clean end; anything else is damage.
          // Only a whole record (CRC good) can be stale: a bit flip in lsn or generation is damage.
          const stale = header.generation < generation || (lsnExpected !== undefined && header.lsn < lsnExpected);
          let whole = false;
          if (stale) {
            const staleBytes = recordDataBytes(header.kind, header.lengthBytes);
            const staleData = staleBytes > 0 && position + recordHeaderBytes + staleBytes <= unitBytes ? await cursor.reader.read(position + recordHeaderBytes, staleBytes) : undefined;
            whole = (staleBytes === 0 || staleData !== undefined) && checkRecord(Buffer.from(raw), staleData);
          }
          endIsDamage = !(stale && whole);
          break;
        }
        const headerCopy = Buffer.from(raw);
        const dataBytes = recordDataBytes(header.kind, header.lengthBytes);
        const data = dataBytes > 0 ? await cursor.reader.read(position + recordHeaderBytes, dataBytes) : undefined;
        if ((dataBytes > 0 && !data) || !checkRecord(headerCopy, data)) {
          unit.stopReason = `checksum mismatch in record lsn ${header.lsn}`;
          endIsDamage = true;
          break;
        }
        const keep = options.withData || header.kind === RecordKind.checkpoint ? data && Buffer.from(data) : undefined;
        options.onRecord(header, ref.number, position, keep);
        if (unit.records === 0) unit.firstLsn = header.lsn;
        unit.records++;
        unit.lastLsn = header.lsn;
        unit.timeMsMin = Math.min(unit.timeMsMin, header.timeMs);
        unit.timeMsMax = Math.max(unit.timeMsMax, header.timeMs);
        lsnExpected = header.lsn + 1;
        generation = header.generation;
        position += recordHeaderBytes + dataBytes;
      }
    } finally {
      await cursor.close();
    }
    unit.endPosition = position;
    scanned.push(unit);
    // The log goes on in the next unit only if that unit starts with the next record.
    const next = units[index + 1];
    if (!next || lsnExpected === undefined) {
      index++;
      break;
    }
    if (!(await startsWith(fileSystem, next, lsnExpected, generation))) {
      index++;
      break;
    }
    endIsDamage = false;
  }
  return {
    units: scanned,
    unitsBeyond: units.slice(index),
    lsnLast: lsnExpected === undefined ? 0 : lsnExpected - 1,
    generationLast: generation,
    endIsDamage,
  };
}

async function startsWith(fileSystem: JournalFileSystem, unit: UnitRef, lsn: number, generation: number): Promise<boolean> {
  const file = await fileSystem.open(unit.path, 'read');
  try {
    const raw = Buffer.alloc(recordHeaderBytes);
    if ((await file.pread(raw, 0)) < recordHeaderBytes) return false;
    const header = decodeHeader(raw);
    return typeof header !== 'string' && header.unit === unit.number && header.lsn === lsn && header.generation >= generation;
  } finally {
    await file.close();
  }
}

/** Valid records of this log found past where the scan ended: a later group's, or records beyond a damaged one. */
export interface PastEnd {
  records: number;
  /** Largest lsn among them (0: none). */
  lsnMax: number;
  /** Largest commit point any of them claims (see record.ts): every lsn up to it had been acknowledged. */
  claimMax: number;
  timeMsMin: number;
  timeMsMax: number;
  /** Per stream, the sequences seen and how many. */
  streams: Map<number, { sequenceMin: number; sequenceMax: number; records: number }>;
  /** Checkpoint markers among them (their checkpoints cannot be recovered once the log is cut before them). */
  markers: { id: string; kind: string; name?: string; stream: number; lsn: number }[];
  /** Where the first of them lies. */
  first: { unit: number; position: number; lsn: number } | undefined;
}

export interface PastEndOptions {
  fileSystem: JournalFileSystem;
  /** The unit the log ended in (searched from `from`) and every unit after it (from 0). */
  units: { ref: UnitRef; from: number }[];
  unitBytes: number;
  /** Only records with a larger lsn count. */
  lsnAfter: number;
  /** Only records of this generation or newer count (older ones are stale leftovers of a cut). */
  generationMin: number;
}

const magicBytes = Buffer.alloc(4);
magicBytes.writeUInt32LE(0x3152_4a4c);

/**
 * Searches past the end of the log for whole records of it (magic, header, unit number, lsn,
 * generation and CRC all sound). Used by open to tell a torn tail from damage: a torn tail is the
 * end of the last group commit, so nothing after it can claim it was committed; a record after it
 * that does proves the end is damage. The search goes byte by byte only where no record is found,
 * and jumps over the data of every record it accepts.
 */
export async function scanPastEnd(options: PastEndOptions): Promise<PastEnd> {
  const past: PastEnd = { records: 0, lsnMax: 0, claimMax: 0, timeMsMin: Infinity, timeMsMax: -Infinity, streams: new Map(), markers: [], first: undefined };
  for (const { ref, from } of options.units) {
    const file = await options.fileSystem.open(ref.path, 'read');
    try {
      const fileBytes = Math.min(options.unitBytes, await file.sizeBytes());
      const reader = new WindowReader(file, fileBytes);
      let position = from;
      while (position + recordHeaderBytes <= fileBytes) {
        const chunk = await reader.readAvailable(position, recordHeaderBytes);
        if (!chunk) break;
        const found = chunk.indexOf(magicBytes);
        if (found < 0) {
          // The magic may straddle the window's end: look again from its last 3 bytes.
          position += Math.max(1, chunk.length - 3);
          continue;
        }
        const at = position + found;
        const raw = await reader.read(at, recordHeaderBytes);
        const header = raw && decodeHeader(raw);
        if (!raw || !header || typeof header === 'string' || header.unit !== ref.number || header.lsn <= options.lsnAfter || header.generation < options.generationMin) {
          position = at + 1;
          continue;
        }
        const dataBytes = recordDataBytes(header.kind, header.lengthBytes);
        if (at + recordHeaderBytes + dataBytes > fileBytes) {
          position = at + 1;
          continue;
        }
        const headerCopy = Buffer.from(raw);
        const data = dataBytes > 0 ? await reader.read(at + recordHeaderBytes, dataBytes) : undefined;
        if ((dataBytes > 0 && !data) || !checkRecord(headerCopy, data)) {
          position = at + 1;
          continue;
        }
        past.records++;
        past.first ??= { unit: ref.number, position: at, lsn: header.lsn };
        past.lsnMax = Math.max(past.lsnMax, header.lsn);
        past.claimMax = Math.max(past.claimMax, claimedCommitLsn(header));
        past.timeMsMin = Math.min(past.timeMsMin, header.timeMs);
        past.timeMsMax = Math.max(past.timeMsMax, header.timeMs);
        const stream = past.streams.get(header.stream);
        if (stream) {
          stream.sequenceMin = Math.min(stream.sequenceMin, header.sequence);
          stream.sequenceMax = Math.max(stream.sequenceMax, header.sequence);
          stream.records++;
        } else past.streams.set(header.stream, { sequenceMin: header.sequence, sequenceMax: header.sequence, records: 1 });
        if (header.kind === RecordKind.checkpoint && data) {
          try {
            const marker = decodeMarker(data);
            const noted: PastEnd['markers'][number] = { id: String(marker.id), kind: String(marker.kind), stream: header.stream, lsn: header.lsn };
            if (marker.name !== undefined) noted.name = String(marker.name);
            past.markers.push(noted);
          } catch {
            // A marker whose CRC holds but whose JSON does not parse was never written by us; nothing to name.
          }
        }
        position = at + recordHeaderBytes + dataBytes;
      }
    } finally {
      await file.close();
    }
  }
  return past;
}

/**
 * How the log ends, from what open and the offline tool both know: `damage` when the metadata's
 * commit point or a record past the end proves that the end was acknowledged; `torn-tail` when
 * bytes or records lie past the end but none claims it was committed (the end of the last group
 * commit, torn by a crash); `end` when nothing lies past it.
 */
export function judgeEnd(input: { lsnEnd: number; lsnCommitted: number; past: PastEnd | undefined; endIsDamage: boolean }): { verdict: 'end' | 'torn-tail' | 'damage'; proofLsn: number } {
  const proofLsn = Math.max(input.lsnCommitted, input.past?.claimMax ?? 0);
  if (proofLsn > input.lsnEnd) return { verdict: 'damage', proofLsn };
  if (input.endIsDamage || (input.past?.records ?? 0) > 0) return { verdict: 'torn-tail', proofLsn };
  return { verdict: 'end', proofLsn };
}

/**
 * How the scanned log ends, as open and the offline tool both judge it: searches past the end
 * (unless a clean close vouches that nothing lies there) and weighs what it finds against the
 * metadata's commit points (`lsnCommitted`, and a promotion intent: only durable records are promoted).
 */
export async function judgeLogEnd(
  fileSystem: JournalFileSystem,
  scan: ScanResult,
  meta: { watermarkLsn: number; promotingToLsn: number; lsnCommitted?: number; lsnClosed?: number },
  unitBytes: number,
): Promise<{ lsnEnd: number; past: PastEnd | undefined; verdict: 'end' | 'torn-tail' | 'damage'; proofLsn: number }> {
  const lsnEnd = Math.max(scan.lsnLast, meta.watermarkLsn);
  const last = scan.units[scan.units.length - 1];
  const cleanEnd = meta.lsnClosed !== undefined && meta.lsnClosed === lsnEnd;
  const past = cleanEnd || !last
    ? undefined
    : await scanPastEnd({ fileSystem, units: [{ ref: last, from: last.endPosition }, ...scan.unitsBeyond.map((ref) => ({ ref, from: 0 }))], unitBytes, lsnAfter: lsnEnd, generationMin: scan.generationLast });
  const { verdict, proofLsn } = judgeEnd({ lsnEnd, lsnCommitted: Math.max(meta.lsnCommitted ?? 0, meta.promotingToLsn), past, endIsDamage: scan.endIsDamage });
  return { lsnEnd, past, verdict, proofLsn };
}
