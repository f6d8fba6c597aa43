/**
 * Reading the log back: the scan that open (crash recovery) and the offline
 * tool share. It walks the units in order and stops at the first record that
 * fails a check; see README for why every check is there.
 */
import type { JournalFile, JournalFileSystem } from './file-system.js';
import { checkRecord, decodeHeader, recordDataBytes, recordHeaderBytes, RecordKind, type RecordHeader } from './record.js';

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
    let position = 0;
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
