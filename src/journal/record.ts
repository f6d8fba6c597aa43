/**
 * The journal record: a 64-byte self-checking header followed by its data.
 *
 *   0 magic u32 'LJR1'   4 version u8   5 kind u8   6 header bytes u16
 *   8 unit u32  (the storage unit the record was written into)
 *  12 generation u32 (bumped on every open; never decreases along the log)
 *  16 lsn u64 (journal order: 1, 2, 3, … without gaps)
 *  24 stream sequence u64   32 source time ms u64   40 volume offset u64
 *  48 volume u16   50 stream u16   52 uncommitted u32   56 length u32   60 CRC-32C u32
 *
 * `uncommitted` (version 2) is lsn minus the journal's commit point when the
 * record was encoded: every record up to `lsn - uncommitted` had been synced
 * and acknowledged by then. It is what lets open tell a torn tail (nothing
 * after it claims it was committed) from damage (a later record, or the
 * metadata, says it was). Version 1 records (volume u32 at 48, stream u32 at
 * 52) carry no such claim and are still read.
 *
 * The CRC covers header bytes 0–59 and then the data. `length` is the range
 * length for write/zero/trim and the payload length of a checkpoint marker;
 * only write and checkpoint records carry data. The unit number, lsn and
 * generation let a scan tell a record of this log from a stale one left behind
 * by a torn batch that was cut (see README).
 */
import { native } from '../native/index.js';

export const recordHeaderBytes = 64;
export const recordMagic = 0x3152_4a4c; // 'LJR1' little-endian
export const recordVersion = 2;
/** Records written before the commit claim existed. */
export const recordVersionWithoutClaim = 1;

export const RecordKind = { write: 1, zero: 2, trim: 3, checkpoint: 4 } as const;
export type RecordKindName = keyof typeof RecordKind;
export const recordKindNames: readonly RecordKindName[] = ['write', 'write', 'zero', 'trim', 'checkpoint'];

export interface RecordHeader {
  kind: number;
  unit: number;
  generation: number;
  lsn: number;
  sequence: number;
  timeMs: number;
  offset: number;
  volume: number;
  stream: number;
  lengthBytes: number;
  /** Lsn minus the commit point when the record was encoded; 0 when unknown (version 1). */
  uncommitted?: number;
}

const twoTo32 = 0x1_0000_0000;

function writeU64(buffer: Buffer, value: number, at: number): void {
  buffer.writeUInt32LE(value % twoTo32, at);
  buffer.writeUInt32LE(Math.floor(value / twoTo32), at + 4);
}

function readU64(buffer: Buffer, at: number): number {
  return buffer.readUInt32LE(at) + buffer.readUInt32LE(at + 4) * twoTo32;
}

export function recordDataBytes(kind: number, lengthBytes: number): number {
  return kind === RecordKind.write || kind === RecordKind.checkpoint ? lengthBytes : 0;
}

/** Encodes the header (with its CRC over header and data) into `target` at `at`. */
export function encodeHeader(header: RecordHeader, data: Buffer | undefined, target: Buffer = Buffer.alloc(recordHeaderBytes), at = 0): Buffer {
  encodeHeaderAt(target, at, header, header.unit, header.generation, data, claimedCommitLsn(header));
  return target;
}

/** Fields of a header that the writer knows before placement. */
export type RecordFields = Omit<RecordHeader, 'unit' | 'generation' | 'uncommitted'>;

/** The commit point a record claims (every lsn up to it was acknowledged before it was written), 0 when it claims none. */
export function claimedCommitLsn(header: RecordHeader): number {
  const uncommitted = header.uncommitted ?? 0;
  return uncommitted > 0 ? Math.max(0, header.lsn - uncommitted) : 0;
}

/**
 * Encodes a header at `at` without building a header object (the append path). `commitLsn` is the
 * journal's commit point (every lsn up to it acknowledged) as the record is encoded.
 */
export function encodeHeaderAt(target: Buffer, at: number, fields: RecordFields, unit: number, generation: number, data: Buffer | undefined, commitLsn: number): void {
  const dataBytes = recordDataBytes(fields.kind, fields.lengthBytes);
  if ((data?.length ?? 0) !== dataBytes) throw new Error(`assertion: record data is ${data?.length ?? 0} bytes, header says ${dataBytes}`);
  target.writeUInt32LE(recordMagic, at);
  target[at + 4] = recordVersion;
  target[at + 5] = fields.kind;
  target.writeUInt16LE(recordHeaderBytes, at + 6);
  target.writeUInt32LE(unit, at + 8);
  target.writeUInt32LE(generation, at + 12);
  writeU64(target, fields.lsn, at + 16);
  writeU64(target, fields.sequence, at + 24);
  writeU64(target, fields.timeMs, at + 32);
  writeU64(target, fields.offset, at + 40);
  if (fields.volume > 0xffff || fields.stream > 0xffff) throw new Error(`assertion: volume ${fields.volume} and stream ${fields.stream} must be 16-bit`);
  if (!(commitLsn >= 0 && commitLsn < fields.lsn || fields.lsn === 0)) throw new Error(`assertion: commit point ${commitLsn} is not below lsn ${fields.lsn}`);
  target.writeUInt16LE(fields.volume, at + 48);
  target.writeUInt16LE(fields.stream, at + 50);
  // A distance past 32 bits (never seen: at most half a unit is unacknowledged) is stored as 0, no
  // claim: a smaller distance would claim more than was committed.
  const distance = fields.lsn - commitLsn;
  target.writeUInt32LE(distance > 0xffff_ffff ? 0 : distance, at + 52);
  target.writeUInt32LE(fields.lengthBytes, at + 56);
  let crc = native.crc32c(target.subarray(at, at + 60), 0);
  if (data && data.length > 0) crc = native.crc32c(data, crc);
  target.writeUInt32LE(crc >>> 0, at + 60);
}

/** Decodes a header without checking the CRC; returns a reason string when the header cannot be one. */
export function decodeHeader(buffer: Buffer, at = 0): RecordHeader | string {
  if (buffer.length - at < recordHeaderBytes) return 'short header';
  const magic = buffer.readUInt32LE(at);
  if (magic !== recordMagic) return magic === 0 ? 'zero bytes (end of log)' : `bad magic 0x${magic.toString(16)}`;
  const version = buffer.readUInt8(at + 4);
  if (version !== recordVersion && version !== recordVersionWithoutClaim) return `unknown version ${version}`;
  const kind = buffer.readUInt8(at + 5);
  if (kind < RecordKind.write || kind > RecordKind.checkpoint) return `unknown kind ${kind}`;
  if (buffer.readUInt16LE(at + 6) !== recordHeaderBytes) return 'bad header length';
  return {
    kind,
    unit: buffer.readUInt32LE(at + 8),
    generation: buffer.readUInt32LE(at + 12),
    lsn: readU64(buffer, at + 16),
    sequence: readU64(buffer, at + 24),
    timeMs: readU64(buffer, at + 32),
    offset: readU64(buffer, at + 40),
    volume: version === recordVersion ? buffer.readUInt16LE(at + 48) : buffer.readUInt32LE(at + 48),
    stream: version === recordVersion ? buffer.readUInt16LE(at + 50) : buffer.readUInt32LE(at + 52),
    lengthBytes: buffer.readUInt32LE(at + 56),
    uncommitted: version === recordVersion ? buffer.readUInt32LE(at + 52) : 0,
  };
}

/** True when the stored CRC matches header bytes 0–59 and the data. */
export function checkRecord(header: Buffer, data: Buffer | undefined, at = 0): boolean {
  let crc = native.crc32c(header.subarray(at, at + 60), 0);
  if (data && data.length > 0) crc = native.crc32c(data, crc);
  return (crc >>> 0) === header.readUInt32LE(at + 60);
}

/** A checkpoint marker's payload. */
export interface CheckpointMarker {
  /** Names the checkpoint across streams. */
  id: string;
  kind: 'automatic' | 'tagged' | (string & {});
  /** User's tag for tagged checkpoints. */
  name?: string;
  /** Every stream of the group at the time; the checkpoint is recoverable once each has its marker durable. */
  streams: number[];
  /** A sync's begin marker: the token of the loss window at the target that this sync heals. */
  heal?: string;
}

export function encodeMarker(marker: CheckpointMarker): Buffer {
  return Buffer.from(JSON.stringify(marker), 'utf8');
}

export function decodeMarker(data: Buffer): CheckpointMarker {
  return JSON.parse(data.toString('utf8')) as CheckpointMarker;
}
