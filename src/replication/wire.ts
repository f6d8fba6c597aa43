/**
 * The replication wire protocol: frames over one TCP (mutual TLS) connection
 * from a source appliance (the shipper) to a target appliance (the receiver).
 *
 * Frame: a 16-byte header, then the payload.
 *
 *   0 magic u32 'LLRP'   4 type u8   5 flags u8   6 reserved u16 (0)
 *   8 payload bytes u32  12 CRC-32C of the payload u32
 *
 * TLS already protects the bytes on the wire; the CRC is there so that a bug
 * in a codec, a buffer reused too early, or a link run without TLS (the
 * simulation, a test) is caught at the receiver instead of reaching a journal.
 *
 * Session. The source sends HELLO (JSON: protocol version, site, appliance,
 * group, stream epoch, its volumes); the target answers WELCOME (JSON: the
 * highest stream sequence durable in its journal for that epoch) or REFUSE
 * (JSON: a code and a message, then it closes). Then the source sends BATCH
 * frames of consecutive stream entries and the target answers ACK frames with
 * the highest sequence made durable. PING/PONG carry times both ways so either
 * side notices a dead link. Every decoder here is given untrusted bytes: it
 * checks every length against the frame before reading, and throws a
 * `WireProtocolError` instead of reading out of bounds.
 */
import * as crypto from 'node:crypto';
import { native } from '../native/index.js';

export const frameMagic = 0x5052_4c4c; // 'LLRP' little-endian
export const frameHeaderBytes = 16;
export const protocolVersion = 2;
/** Largest payload a frame may carry; a batch is bounded well below it (batchBytesMax). */
export const framePayloadBytesMax = 64 * 1024 * 1024;
/** Largest JSON payload (HELLO, WELCOME, REFUSE). */
export const controlPayloadBytesMax = 1024 * 1024;
/** Entries in one batch. */
export const batchEntriesMax = 65_536;
/** Bytes of one entry's fixed part in a batch body. */
export const entryHeaderBytes = 32;
/** Largest data of one write entry (the NBD server's request limit is below it). */
export const entryDataBytesMax = 32 * 1024 * 1024;

export const FrameType = {
  hello: 1,
  welcome: 2,
  refuse: 3,
  batch: 4,
  ack: 5,
  ping: 6,
  pong: 7,
  sumsRequest: 8,
  sums: 9,
} as const;
export type FrameTypeName = keyof typeof FrameType;
const frameTypeNames = new Map<number, FrameTypeName>(Object.entries(FrameType).map(([name, value]) => [value, name as FrameTypeName]));

export const EntryKind = { write: 1, zero: 2, trim: 3, checkpoint: 4 } as const;
export type EntryKindName = keyof typeof EntryKind;
const entryKindNames = new Map<number, EntryKindName>(Object.entries(EntryKind).map(([name, value]) => [value, name as EntryKindName]));

export const CodecId = { none: 0, lz4: 1, brotli: 2 } as const;
export type WireCodecName = keyof typeof CodecId;
const codecNames = new Map<number, WireCodecName>(Object.entries(CodecId).map(([name, value]) => [value, name as WireCodecName]));

export class WireProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'WireProtocolError';
  }
}

export interface Frame {
  type: FrameTypeName;
  payload: Buffer;
}

const twoTo32 = 0x1_0000_0000;

export function writeU64(buffer: Buffer, value: number, at: number): void {
  buffer.writeUInt32LE(value % twoTo32, at);
  buffer.writeUInt32LE(Math.floor(value / twoTo32), at + 4);
}

export function readU64(buffer: Buffer, at: number): number {
  const high = buffer.readUInt32LE(at + 4);
  if (high >= 0x20_0000) throw new WireProtocolError(`a 64-bit field at ${at} is above 2^53`);
  return buffer.readUInt32LE(at) + high * twoTo32;
}

function payloadLength(payload: Buffer | readonly Buffer[]): number {
  if (Buffer.isBuffer(payload)) return payload.length;
  let total = 0;
  for (const chunk of payload) total += chunk.length;
  return total;
}

/** The frame's header; the payload chunks follow it on the wire unchanged. */
export function encodeFrameHeader(type: FrameTypeName, payload: Buffer | readonly Buffer[]): Buffer {
  const bytes = payloadLength(payload);
  if (bytes > framePayloadBytesMax) throw new Error(`A ${type} frame of ${bytes} bytes is over the limit of ${framePayloadBytesMax}`);
  let crc = 0;
  for (const chunk of Buffer.isBuffer(payload) ? [payload] : payload) if (chunk.length > 0) crc = native.crc32c(chunk, crc);
  const header = Buffer.alloc(frameHeaderBytes);
  header.writeUInt32LE(frameMagic, 0);
  header.writeUInt8(FrameType[type], 4);
  header.writeUInt32LE(bytes, 8);
  header.writeUInt32LE(crc >>> 0, 12);
  return header;
}

/** Header and payload as one list of buffers, ready for a vectored socket write. */
export function encodeFrame(type: FrameTypeName, payload: Buffer | readonly Buffer[]): Buffer[] {
  const header = encodeFrameHeader(type, payload);
  return Buffer.isBuffer(payload) ? [header, payload] : [header, ...payload];
}

/**
 * Incremental frame decoder: feed it the socket's chunks as they come; it
 * returns the complete frames. It holds at most one frame's bytes.
 */
export class FrameReader {
  private chunks: Buffer[] = [];
  private bufferedBytes = 0;
  private header: { type: FrameTypeName; bytes: number; crc: number } | undefined;

  push(chunk: Buffer): Frame[] {
    this.chunks.push(chunk);
    this.bufferedBytes += chunk.length;
    const frames: Frame[] = [];
    for (;;) {
      if (!this.header) {
        if (this.bufferedBytes < frameHeaderBytes) break;
        const raw = this.take(frameHeaderBytes);
        const magic = raw.readUInt32LE(0);
        if (magic !== frameMagic) throw new WireProtocolError(`bad frame magic 0x${magic.toString(16)} (is the peer a Lifeline appliance of a compatible version?)`);
        const typeId = raw.readUInt8(4);
        const type = frameTypeNames.get(typeId);
        if (!type) throw new WireProtocolError(`unknown frame type ${typeId}`);
        if (raw.readUInt8(5) !== 0 || raw.readUInt16LE(6) !== 0) throw new WireProtocolError(`a ${type} frame has flags or reserved bits set (a newer protocol?)`);
        const bytes = raw.readUInt32LE(8);
        if (bytes > framePayloadBytesMax) throw new WireProtocolError(`a ${type} frame announces ${bytes} bytes, over the limit of ${framePayloadBytesMax}`);
        if (type !== 'batch' && bytes > controlPayloadBytesMax) throw new WireProtocolError(`a ${type} frame announces ${bytes} bytes, over the limit of ${controlPayloadBytesMax}`);
        this.header = { type, bytes, crc: raw.readUInt32LE(12) };
      }
      if (this.bufferedBytes < this.header.bytes) break;
      const payload = this.take(this.header.bytes);
      const crc = payload.length > 0 ? native.crc32c(payload, 0) >>> 0 : 0;
      if (crc !== this.header.crc) throw new WireProtocolError(`a ${this.header.type} frame of ${payload.length} bytes fails its CRC`);
      frames.push({ type: this.header.type, payload });
      this.header = undefined;
    }
    return frames;
  }

  private take(bytes: number): Buffer {
    if (bytes === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    if (first.length >= bytes) {
      const out = first.subarray(0, bytes);
      if (first.length === bytes) this.chunks.shift();
      else this.chunks[0] = first.subarray(bytes);
      this.bufferedBytes -= bytes;
      return out;
    }
    const out = Buffer.allocUnsafe(bytes);
    let done = 0;
    while (done < bytes) {
      const chunk = this.chunks[0]!;
      const part = Math.min(chunk.length, bytes - done);
      chunk.copy(out, done, 0, part);
      done += part;
      if (part === chunk.length) this.chunks.shift();
      else this.chunks[0] = chunk.subarray(part);
    }
    this.bufferedBytes -= bytes;
    return out;
  }
}

// ---------------------------------------------------------------- control frames

export interface HelloVolume {
  /** Volume id within the protection group (the journal's volume number). */
  id: number;
  name: string;
  sizeBytes: number;
}

export interface Hello {
  protocolVersion: number;
  site: string;
  appliance: string;
  group: string;
  /** Names one protection session of this stream; a new session (new epoch) never continues an old history. */
  epoch: string;
  /**
   * The epoch's first entry has sequence sequenceBase + 1. A session starts at 1; a session the
   * source begins after its queue discarded entries (bitmap mode) continues the numbering.
   */
  sequenceBase: number;
  volumes: HelloVolume[];
  /**
   * The target lost entries of this source's previous epoch that it had acknowledged (its WELCOME
   * said less than it acknowledged): the new epoch opens a sync window at the target from the
   * newest point the target still holds, which the delta sync that follows closes.
   */
  lossReported?: LossReported;
  /**
   * What the target had acknowledged of this source's previous epoch when the source last recorded
   * it (a restart starts a new epoch): a target that now holds less lost acknowledged entries, and
   * treats it as a reported loss.
   */
  previousEpoch?: PreviousEpoch;
}

export interface PreviousEpoch {
  epoch: string;
  sequenceAcknowledged: number;
}

export interface LossReported extends PreviousEpoch {
  sequenceDurable: number;
}

export interface Welcome {
  protocolVersion: number;
  /** The epoch the target accepted (the one in HELLO). */
  epoch: string;
  /** Highest stream sequence durable in the target's journal for this epoch (0: none). */
  sequenceDurable: number;
  /** The target appliance's name. */
  appliance: string;
  /**
   * The target holds a sync window of this source appliance open (a `sync-begin` with no `sync-end`
   * durable): no point after `beginTimeMs` is consistent there until a sync of the source ends.
   * Absent: no window is open.
   */
  syncWindowOpen?: SyncWindowOpen;
}

/** A sync window of the source open at the target: the sync's kind as the source named it, and its begin time. */
export interface SyncWindowOpen {
  sync: string;
  beginTimeMs: number;
  /**
   * Only a delta sync closes the window: the target lost records it had acknowledged (journal
   * damage), so regions the source believes shipped differ there.
   */
  deltaSyncNeeded?: boolean;
  /** With `deltaSyncNeeded`: the begin marker of the sync that heals it must carry this token (a sync begun before the target asked does not count). */
  healToken?: string;
}

/** `cannot-store`: the target could not make a batch durable (journal full, failed, or the batch refused); sent before the link closes, so the source can say why. */
export type RefuseCode = 'version' | 'unknown-group' | 'not-allowed' | 'epoch-diverged' | 'volumes-differ' | 'busy' | 'journal-failed' | 'bad-request' | 'cannot-store';

export interface Refuse {
  code: RefuseCode;
  message: string;
}

export function encodeJson(value: unknown): Buffer {
  const payload = Buffer.from(JSON.stringify(value), 'utf8');
  if (payload.length > controlPayloadBytesMax) throw new Error(`A control frame of ${payload.length} bytes is over the limit of ${controlPayloadBytesMax}`);
  return payload;
}

function parseJson(frame: Frame): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(frame.payload.toString('utf8'));
  } catch {
    throw new WireProtocolError(`a ${frame.type} frame is not valid JSON`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new WireProtocolError(`a ${frame.type} frame is not a JSON object`);
  return value as Record<string, unknown>;
}

const namePattern = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

function field<T>(object: Record<string, unknown>, name: string, check: (value: unknown) => value is T, what: string, frame: string): T {
  const value = object[name];
  if (!check(value)) throw new WireProtocolError(`a ${frame} frame's '${name}' is not ${what}`);
  return value;
}
const isName = (value: unknown): value is string => typeof value === 'string' && namePattern.test(value);
const isCount = (value: unknown): value is number => typeof value === 'number' && Number.isSafeInteger(value) && value >= 0;
const isText = (value: unknown): value is string => typeof value === 'string' && value.length <= 4096;

export function decodeHello(frame: Frame): Hello {
  const object = parseJson(frame);
  const volumesRaw = object['volumes'];
  if (!Array.isArray(volumesRaw) || volumesRaw.length > 0xffff) throw new WireProtocolError(`a hello frame's 'volumes' is not a list`);
  const volumes = volumesRaw.map((raw: unknown): HelloVolume => {
    if (typeof raw !== 'object' || raw === null) throw new WireProtocolError(`a hello frame's volume is not an object`);
    const volume = raw as Record<string, unknown>;
    return {
      id: field(volume, 'id', isCount, 'a volume id', 'hello'),
      name: field(volume, 'name', isName, 'a name', 'hello'),
      sizeBytes: field(volume, 'sizeBytes', isCount, 'a size', 'hello'),
    };
  });
  return {
    protocolVersion: field(object, 'protocolVersion', isCount, 'a version', 'hello'),
    site: field(object, 'site', isName, 'a name', 'hello'),
    appliance: field(object, 'appliance', isName, 'a name', 'hello'),
    group: field(object, 'group', isName, 'a name', 'hello'),
    epoch: field(object, 'epoch', isName, 'an epoch', 'hello'),
    sequenceBase: field(object, 'sequenceBase', isCount, 'a sequence', 'hello'),
    volumes,
    ...(object['lossReported'] === undefined ? {} : { lossReported: decodeLossReported(object['lossReported']) }),
    ...(object['previousEpoch'] === undefined ? {} : { previousEpoch: decodePreviousEpoch(object['previousEpoch']) }),
  };
}

function decodePreviousEpoch(value: unknown): PreviousEpoch {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new WireProtocolError("a hello frame's 'previousEpoch' is not an object");
  const object = value as Record<string, unknown>;
  return { epoch: field(object, 'epoch', isName, 'an epoch', 'hello'), sequenceAcknowledged: field(object, 'sequenceAcknowledged', isCount, 'a sequence', 'hello') };
}

function decodeLossReported(value: unknown): LossReported {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new WireProtocolError("a hello frame's 'lossReported' is not an object");
  const object = value as Record<string, unknown>;
  return {
    epoch: field(object, 'epoch', isName, 'an epoch', 'hello'),
    sequenceDurable: field(object, 'sequenceDurable', isCount, 'a sequence', 'hello'),
    sequenceAcknowledged: field(object, 'sequenceAcknowledged', isCount, 'a sequence', 'hello'),
  };
}

export function decodeWelcome(frame: Frame): Welcome {
  const object = parseJson(frame);
  return {
    protocolVersion: field(object, 'protocolVersion', isCount, 'a version', 'welcome'),
    epoch: field(object, 'epoch', isName, 'an epoch', 'welcome'),
    sequenceDurable: field(object, 'sequenceDurable', isCount, 'a sequence', 'welcome'),
    appliance: field(object, 'appliance', isName, 'a name', 'welcome'),
    ...(object['syncWindowOpen'] === undefined ? {} : { syncWindowOpen: decodeSyncWindowOpen(object['syncWindowOpen']) }),
  };
}

function decodeSyncWindowOpen(value: unknown): SyncWindowOpen {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new WireProtocolError("a welcome frame's 'syncWindowOpen' is not an object");
  const object = value as Record<string, unknown>;
  const deltaSyncNeeded = object['deltaSyncNeeded'];
  if (deltaSyncNeeded !== undefined && typeof deltaSyncNeeded !== 'boolean') throw new WireProtocolError("a welcome frame's 'deltaSyncNeeded' is not a boolean");
  return {
    sync: field(object, 'sync', isName, 'a name', 'welcome'),
    beginTimeMs: field(object, 'beginTimeMs', isCount, 'a time', 'welcome'),
    ...(deltaSyncNeeded === true ? { deltaSyncNeeded: true } : {}),
    ...(object['healToken'] === undefined ? {} : { healToken: field(object, 'healToken', isName, 'a token', 'welcome') }),
  };
}

export function decodeRefuse(frame: Frame): Refuse {
  const object = parseJson(frame);
  return { code: field(object, 'code', isText, 'a code', 'refuse') as RefuseCode, message: field(object, 'message', isText, 'a message', 'refuse') };
}

// ---------------------------------------------------------------- acknowledgements and pings

/** ACK: the highest stream sequence durable at the target, and the source time of that entry. */
export interface Ack {
  sequenceDurable: number;
  timeMsDurable: number;
}

export function encodeAck(ack: Ack): Buffer {
  const payload = Buffer.alloc(16);
  writeU64(payload, ack.sequenceDurable, 0);
  payload.writeDoubleLE(ack.timeMsDurable, 8);
  return payload;
}

export function decodeAck(frame: Frame): Ack {
  if (frame.payload.length !== 16) throw new WireProtocolError(`an ack frame has ${frame.payload.length} bytes, not 16`);
  const timeMsDurable = frame.payload.readDoubleLE(8);
  if (!Number.isFinite(timeMsDurable)) throw new WireProtocolError('an ack frame has a time that is not a number');
  return { sequenceDurable: readU64(frame.payload, 0), timeMsDurable };
}

export function encodePing(timeMs: number): Buffer {
  const payload = Buffer.alloc(8);
  payload.writeDoubleLE(timeMs, 0);
  return payload;
}

export function decodePing(frame: Frame): number {
  if (frame.payload.length !== 8) throw new WireProtocolError(`a ${frame.type} frame has ${frame.payload.length} bytes, not 8`);
  return frame.payload.readDoubleLE(0);
}

// ---------------------------------------------------------------- block checksums (delta sync)

/** Bytes of one block checksum (SHA-256, first 16 bytes). */
export const blockSumBytes = 16;
/** Blocks one request may ask for. */
export const sumsBlocksMax = 4096;

/** The source asks for the checksums of a range of a volume as the target holds it now. */
export interface SumsRequest {
  requestId: number;
  /** The volume's id in the HELLO. */
  volume: number;
  offset: number;
  lengthBytes: number;
  /** Block size; the last block may be shorter. */
  blockBytes: number;
}

export function encodeSumsRequest(request: SumsRequest): Buffer {
  const payload = Buffer.alloc(28);
  payload.writeUInt32LE(request.requestId, 0);
  payload.writeUInt32LE(request.volume, 4);
  writeU64(payload, request.offset, 8);
  writeU64(payload, request.lengthBytes, 16);
  payload.writeUInt32LE(request.blockBytes, 24);
  return payload;
}

export function decodeSumsRequest(frame: Frame): SumsRequest {
  if (frame.payload.length !== 28) throw new WireProtocolError(`a sums request has ${frame.payload.length} bytes, not 28`);
  const request = { requestId: frame.payload.readUInt32LE(0), volume: frame.payload.readUInt32LE(4), offset: readU64(frame.payload, 8), lengthBytes: readU64(frame.payload, 16), blockBytes: frame.payload.readUInt32LE(24) };
  if (!(request.blockBytes >= 512 && request.blockBytes % 512 === 0)) throw new WireProtocolError(`a sums request asks for blocks of ${request.blockBytes} bytes (a multiple of 512 is needed)`);
  if (!(request.lengthBytes > 0 && Math.ceil(request.lengthBytes / request.blockBytes) <= sumsBlocksMax)) throw new WireProtocolError(`a sums request asks for ${request.lengthBytes} bytes in blocks of ${request.blockBytes} (at most ${sumsBlocksMax} blocks)`);
  return request;
}

/** The target's answer: one checksum per block, or why it has none. */
export type Sums = { requestId: number; sums: Buffer } | { requestId: number; error: string };

export function encodeSums(reply: Sums): Buffer[] {
  const head = Buffer.alloc(9);
  head.writeUInt32LE(reply.requestId, 0);
  if ('error' in reply) {
    head.writeUInt8(1, 4);
    const text = Buffer.from(reply.error.slice(0, 2000), 'utf8');
    head.writeUInt32LE(text.length, 5);
    return [head, text];
  }
  head.writeUInt8(0, 4);
  head.writeUInt32LE(reply.sums.length / blockSumBytes, 5);
  return [head, reply.sums];
}

export function decodeSums(frame: Frame): Sums {
  const payload = frame.payload;
  if (payload.length < 9) throw new WireProtocolError(`a sums frame has ${payload.length} bytes, fewer than 9`);
  const requestId = payload.readUInt32LE(0);
  const failed = payload.readUInt8(4);
  const count = payload.readUInt32LE(5);
  if (failed === 1) {
    if (payload.length !== 9 + count) throw new WireProtocolError(`a sums frame says its error has ${count} bytes but carries ${payload.length - 9}`);
    return { requestId, error: payload.toString('utf8', 9) };
  }
  if (failed !== 0) throw new WireProtocolError(`a sums frame has status ${failed}`);
  if (count > sumsBlocksMax || payload.length !== 9 + count * blockSumBytes) throw new WireProtocolError(`a sums frame says ${count} checksums but carries ${payload.length - 9} bytes`);
  return { requestId, sums: payload.subarray(9) };
}

/** The checksums of `data` in blocks of `blockBytes` (the last may be shorter), one after another. */
export function blockSums(data: Buffer, blockBytes: number): Buffer {
  const count = Math.ceil(data.length / blockBytes);
  const sums = Buffer.allocUnsafe(count * blockSumBytes);
  for (let block = 0; block < count; block++) {
    const digest = crypto.createHash('sha256').update(data.subarray(block * blockBytes, Math.min(data.length, (block + 1) * blockBytes))).digest();
    digest.copy(sums, block * blockSumBytes, 0, blockSumBytes);
  }
  return sums;
}

// ---------------------------------------------------------------- batches

/** One write, zero range, trim, or checkpoint marker of a stream. */
export interface StreamEntry {
  sequence: number;
  kind: EntryKindName;
  volume: number;
  offset: number;
  lengthBytes: number;
  /** Source time, ms since the epoch. */
  timeMs: number;
  /** Write data (kind write), or the checkpoint marker's JSON (kind checkpoint). */
  data?: Buffer;
}

/** Bytes an entry takes in a batch body. */
export function entryEncodedBytes(entry: StreamEntry): number {
  return entryHeaderBytes + (entry.data?.length ?? 0);
}

/**
 * The body of a batch (before compression) as a list of buffers: each entry's
 * 32-byte fixed part, then its data, with the data buffers not copied.
 *
 *   0 kind u8  1 reserved u8  2 volume u16  4 length u32  8 offset u64
 *  16 source time f64  24 data bytes u32  28 reserved u32
 */
export function encodeBatchBody(entries: readonly StreamEntry[]): Buffer[] {
  const fixed = Buffer.alloc(entryHeaderBytes * entries.length);
  const chunks: Buffer[] = [];
  let runStart = 0;
  for (let index = 0; index < entries.length; index++) {
    const entry = entries[index]!;
    const at = index * entryHeaderBytes;
    fixed.writeUInt8(EntryKind[entry.kind], at);
    fixed.writeUInt16LE(entry.volume, at + 2);
    fixed.writeUInt32LE(entry.lengthBytes, at + 4);
    writeU64(fixed, entry.offset, at + 8);
    fixed.writeDoubleLE(entry.timeMs, at + 16);
    fixed.writeUInt32LE(entry.data?.length ?? 0, at + 24);
    if (entry.data && entry.data.length > 0) {
      chunks.push(fixed.subarray(runStart, at + entryHeaderBytes), entry.data);
      runStart = at + entryHeaderBytes;
    }
  }
  if (runStart < fixed.length || chunks.length === 0) chunks.push(fixed.subarray(runStart));
  return chunks;
}

export interface BatchHeader {
  sequenceFirst: number;
  count: number;
  codec: WireCodecName;
  /** Bytes of the body before compression. */
  rawBytes: number;
}

/** 24 bytes: sequence first u64, count u32, codec u8, 3 reserved, raw bytes u32, reserved u32. */
export const batchHeaderBytes = 24;

export function encodeBatchHeader(header: BatchHeader): Buffer {
  const raw = Buffer.alloc(batchHeaderBytes);
  writeU64(raw, header.sequenceFirst, 0);
  raw.writeUInt32LE(header.count, 8);
  raw.writeUInt8(CodecId[header.codec], 12);
  raw.writeUInt32LE(header.rawBytes, 16);
  return raw;
}

export function decodeBatchHeader(frame: Frame): { header: BatchHeader; body: Buffer } {
  if (frame.payload.length < batchHeaderBytes) throw new WireProtocolError(`a batch frame of ${frame.payload.length} bytes is shorter than its header`);
  const payload = frame.payload;
  const codecId = payload.readUInt8(12);
  const codec = codecNames.get(codecId);
  if (!codec) throw new WireProtocolError(`a batch uses unknown codec ${codecId}`);
  const header: BatchHeader = { sequenceFirst: readU64(payload, 0), count: payload.readUInt32LE(8), codec, rawBytes: payload.readUInt32LE(16) };
  if (header.sequenceFirst < 1) throw new WireProtocolError('a batch starts at sequence 0');
  if (header.count < 1 || header.count > batchEntriesMax) throw new WireProtocolError(`a batch has ${header.count} entries (1..${batchEntriesMax})`);
  if (header.rawBytes < header.count * entryHeaderBytes || header.rawBytes > framePayloadBytesMax) {
    throw new WireProtocolError(`a batch of ${header.count} entries claims ${header.rawBytes} raw bytes`);
  }
  return { header, body: payload.subarray(batchHeaderBytes) };
}

/** Decodes an uncompressed body; the entries' data are views into `body`. */
export function decodeBatchBody(header: BatchHeader, body: Buffer): StreamEntry[] {
  if (body.length !== header.rawBytes) throw new WireProtocolError(`a batch body has ${body.length} bytes, not the ${header.rawBytes} announced`);
  const entries: StreamEntry[] = [];
  let at = 0;
  for (let index = 0; index < header.count; index++) {
    if (body.length - at < entryHeaderBytes) throw new WireProtocolError(`a batch ends inside entry ${index}`);
    const kindId = body.readUInt8(at);
    const kind = entryKindNames.get(kindId);
    if (!kind) throw new WireProtocolError(`entry ${index} of a batch has unknown kind ${kindId}`);
    const volume = body.readUInt16LE(at + 2);
    const lengthBytes = body.readUInt32LE(at + 4);
    const offset = readU64(body, at + 8);
    const timeMs = body.readDoubleLE(at + 16);
    const dataBytes = body.readUInt32LE(at + 24);
    if (!Number.isFinite(timeMs) || timeMs < 0) throw new WireProtocolError(`entry ${index} of a batch has a bad source time`);
    if (dataBytes > entryDataBytesMax) throw new WireProtocolError(`entry ${index} of a batch carries ${dataBytes} bytes, over ${entryDataBytesMax}`);
    if (kind === 'write' && dataBytes !== lengthBytes) throw new WireProtocolError(`write entry ${index} has ${dataBytes} data bytes for a length of ${lengthBytes}`);
    if ((kind === 'zero' || kind === 'trim') && dataBytes !== 0) throw new WireProtocolError(`${kind} entry ${index} carries data`);
    if (kind === 'checkpoint' && dataBytes !== lengthBytes) throw new WireProtocolError(`checkpoint entry ${index} has ${dataBytes} data bytes for a length of ${lengthBytes}`);
    at += entryHeaderBytes;
    if (body.length - at < dataBytes) throw new WireProtocolError(`the data of entry ${index} runs past the batch`);
    const entry: StreamEntry = { sequence: header.sequenceFirst + index, kind, volume, offset, lengthBytes, timeMs };
    if (dataBytes > 0) entry.data = body.subarray(at, at + dataBytes);
    at += dataBytes;
    entries.push(entry);
  }
  if (at !== body.length) throw new WireProtocolError(`a batch has ${body.length - at} bytes after its last entry`);
  return entries;
}
