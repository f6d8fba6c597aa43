/**
 * Robustness fuzz test of the NBD server, run in-process so that every
 * exception is visible.
 *
 * Inputs come from a grammar of the protocol (greeting flags, options,
 * transmission requests) with random fields, and from mutations of what that
 * grammar produces (bit flips, overwritten header fields, truncation, inserted
 * and deleted bytes, duplicated messages, random bytes), written in random
 * chunks over TCP and a Unix socket, many requests pipelined per connection and
 * many connections in parallel. Well-formed streams are checked against an
 * oracle written from the spec (`doc/proto.md`), not from the server: every
 * option and request gets exactly one well-formed final reply with an allowed
 * error, read data matches the export, and the server closes when it should.
 * Every stream must end (or be closed by the server) within a bound; there must
 * be no uncaught exception or unhandled rejection; memory stays under a bound;
 * the connection count returns to 0; and a well-formed client still works at the
 * end. A few cases go through STARTTLS when openssl is available.
 *
 * Cases per run: LIFELINE_FUZZ_CASES (default 100000). Replay with the printed
 * LIFELINE_SEED; LIFELINE_FUZZ_ONLY=N runs only the connection numbered N
 * (tls:N for the TLS cases), and LIFELINE_FUZZ_LOG=1 prints the server's log.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import * as tls from 'node:tls';
import * as P from './protocol.js';
import { NbdServer, optionBytesMax, optionsPerConnectionMax, payloadBytesMax } from './server.js';
import { FastZeroUnsupportedError, MemoryBackingStore, writeDataLength, type BackingStore, type Extent, type WriteData, type ZeroOptions } from '../tap/backing-store.js';
import { Tap } from '../tap/tap.js';
import { CountingConsumer } from '../tap/consumers.js';
import { createLogger, silentLogger } from '../util/logger.js';
import { makeTempDir, prng, testSeed } from '../../test/helpers.js';

const KiB = 1024;
const MiB = 1024 * 1024;

/** Cases (handshakes, options and requests fed to the server) per run. */
const casesTarget = Number(process.env.LIFELINE_FUZZ_CASES ?? 100_000);
/** Connections running at once. */
const parallelConnections = Number(process.env.LIFELINE_FUZZ_PARALLEL ?? 12);
/** Replay one connection by its number: N for the random phase, tls:N for the TLS cases. */
const onlyText = process.env.LIFELINE_FUZZ_ONLY;
const onlyConnection = onlyText === undefined || onlyText.startsWith('tls:') ? undefined : Number(onlyText);
const onlyTlsConnection = onlyText?.startsWith('tls:') ? Number(onlyText.slice(4)) : undefined;
/** Time a connection may take, from connect to closed; longer is reported as a hang. */
const connectionMsMax = 30_000;
/**
 * Memory bounds: growth of the resident set over the baseline during the random
 * phase (which grows with the connections in parallel: each holds its stream and
 * replies) and over the whole test (whose targeted cases push 32 MiB payloads
 * and make the server hold its 96 MiB per-connection buffer), and the JS heap.
 */
const fuzzRssGrowthBytesMax = 160 * MiB + parallelConnections * 6 * MiB;
const rssGrowthBytesMax = 512 * MiB;
const heapUsedBytesMax = 256 * MiB;
/** Growth of the resident set allowed while one connection streams far more than that into a dead end. */
const floodRssGrowthBytesMax = 64 * MiB;
const floodBytes = 256 * MiB;

// ------------------------------------------------------------------ exports

interface ExportSpec {
  name: string;
  sizeBytes: number;
  readOnly: boolean;
  kind: 'disk' | 'ro' | 'flaky';
}

/** disk0 and ro have sizes that are not a multiple of the 4 KiB block, to reach the tail cases. */
const exportSpecs: readonly ExportSpec[] = [
  { name: 'disk0', sizeBytes: MiB + 512, readOnly: false, kind: 'disk' },
  { name: 'ro', sizeBytes: 256 * KiB + 100, readOnly: true, kind: 'ro' },
  { name: 'flaky/ünïcode vol', sizeBytes: 512 * KiB, readOnly: false, kind: 'flaky' },
];
const exportDescriptions: Record<string, string> = { ro: 'a read-only export' };

/** The read-only export's content: a pattern in two blocks of three, holes elsewhere. */
const roContent = Buffer.alloc(exportSpecs[1]!.sizeBytes);
function roBlockHasData(block: number): boolean {
  return block % 3 !== 2;
}
for (let i = 0; i < roContent.length; i++) {
  if (roBlockHasData(Math.floor(i / 4096))) roContent[i] = ((i * 131) ^ (i >>> 9) ^ 0x5a) & 0xff || 1;
}

/** The flaky export fails reads and writes in one range, mutations with ENOSPC in another, and fast zeroing always. */
const flakyEio = { start: 128 * KiB, end: 192 * KiB };
const flakyNoSpace = { start: 256 * KiB, end: 320 * KiB };

function overlaps(offset: number, lengthBytes: number, range: { start: number; end: number }): boolean {
  return offset < range.end && range.start < offset + lengthBytes;
}

function injected(code: string): Error {
  return Object.assign(new Error(`injected ${code}`), { code });
}

class FlakyStore implements BackingStore {
  private readonly inner: MemoryBackingStore;
  readonly readOnly = false;

  constructor(sizeBytes: number) {
    this.inner = new MemoryBackingStore(sizeBytes);
  }

  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }

  /** Every other block completes a turn later, so replies come back out of order. */
  private async gate(offset: number, lengthBytes: number, mutating: boolean): Promise<void> {
    if (Math.floor(offset / 4096) % 2 === 1) await new Promise<void>((resolve) => setImmediate(resolve));
    if (overlaps(offset, lengthBytes, flakyEio)) throw injected('EIO');
    if (mutating && overlaps(offset, lengthBytes, flakyNoSpace)) throw injected('ENOSPC');
  }

  async read(target: Buffer, offset: number): Promise<void> {
    await this.gate(offset, target.length, false);
    return this.inner.read(target, offset);
  }

  async write(data: WriteData, offset: number): Promise<void> {
    await this.gate(offset, writeDataLength(data), true);
    return this.inner.write(data, offset);
  }

  async writeZeroes(offset: number, lengthBytes: number, options: ZeroOptions): Promise<void> {
    if (options.fastOnly) throw new FastZeroUnsupportedError('the flaky test store');
    await this.gate(offset, lengthBytes, true);
    return this.inner.writeZeroes(offset, lengthBytes, options);
  }

  async trim(offset: number, lengthBytes: number): Promise<void> {
    await this.gate(offset, lengthBytes, true);
    return this.inner.trim(offset, lengthBytes);
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }

  cache(): Promise<void> {
    return this.inner.cache();
  }

  extents(offset: number, lengthBytes: number, extentCountMax: number): Extent[] {
    return this.inner.extents(offset, lengthBytes, extentCountMax);
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}

function findExportSpec(name: Buffer): ExportSpec | undefined {
  if (name.length === 0) return exportSpecs[0];
  return exportSpecs.find((spec) => Buffer.from(spec.name, 'utf8').equals(name));
}

// ------------------------------------------------------------------- random

class Rand {
  private readonly source: () => number;

  constructor(seed: number) {
    this.source = prng(seed >>> 0 || 1);
    for (let i = 0; i < 4; i++) this.source();
  }

  float(): number {
    return this.source();
  }

  /** An integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.source() * n);
  }

  /** An integer in [low, high]. */
  between(low: number, high: number): number {
    return low + this.int(high - low + 1);
  }

  chance(probability: number): boolean {
    return this.source() < probability;
  }

  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }

  u16(): number {
    return this.int(0x10000);
  }

  u32(): number {
    return Math.floor(this.source() * 0x100000000) >>> 0;
  }

  u64(): bigint {
    return (BigInt(this.u32()) << 32n) | BigInt(this.u32());
  }

  bytes(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) out[i] = this.int(256);
    return out;
  }

  weighted<T>(choices: readonly (readonly [number, T])[]): T {
    let total = 0;
    for (const [weight] of choices) total += weight;
    let roll = this.float() * total;
    for (const [weight, value] of choices) {
      roll -= weight;
      if (roll < 0) return value;
    }
    return choices[choices.length - 1]![1];
  }
}

function mixSeed(seed: number, index: number): number {
  return (seed ^ Math.imul(index + 1, 0x9e3779b1) ^ Math.imul(index >>> 16, 0x85ebca6b)) >>> 0 || 1;
}

// ----------------------------------------------------------------- encoders

function u16(value: number): Buffer {
  const out = Buffer.alloc(2);
  out.writeUInt16BE(value & 0xffff, 0);
  return out;
}

function u32(value: number): Buffer {
  const out = Buffer.alloc(4);
  out.writeUInt32BE(value >>> 0, 0);
  return out;
}

function encodeOption(option: number, payload: Buffer, declaredBytes = payload.length): Buffer {
  const out = Buffer.alloc(P.OPTION_HEADER_BYTES + payload.length);
  out.writeBigUInt64BE(P.IHAVEOPT, 0);
  out.writeUInt32BE(option >>> 0, 8);
  out.writeUInt32BE(declaredBytes >>> 0, 12);
  payload.copy(out, P.OPTION_HEADER_BYTES);
  return out;
}

function encodeRequest(flags: number, type: number, cookie: bigint, offset: bigint, lengthBytes: number): Buffer {
  const out = Buffer.alloc(P.REQUEST_HEADER_BYTES);
  out.writeUInt32BE(P.REQUEST_MAGIC, 0);
  out.writeUInt16BE(flags & 0xffff, 4);
  out.writeUInt16BE(type & 0xffff, 6);
  out.writeBigUInt64BE(cookie & 0xffffffffffffffffn, 8);
  out.writeBigUInt64BE(offset & 0xffffffffffffffffn, 16);
  out.writeUInt32BE(lengthBytes >>> 0, 24);
  return out;
}

/** NBD_OPT_INFO / NBD_OPT_GO payload. */
function infoPayload(name: Buffer, infoRequests: readonly number[]): Buffer {
  return Buffer.concat([u32(name.length), name, u16(infoRequests.length), ...infoRequests.map(u16)]);
}

/** NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload. */
function metaPayload(name: Buffer, queries: readonly Buffer[]): Buffer {
  return Buffer.concat([u32(name.length), name, u32(queries.length), ...queries.flatMap((query) => [u32(query.length), query])]);
}

// ------------------------------------------------------------------- oracle

const REP_ERROR_BIT = 0x80000000;
const flagsDocumented = P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_DF | P.CMD_FLAG_REQ_ONE | P.CMD_FLAG_FAST_ZERO;
/**
 * The flags the spec documents as applicable to each command. FUA "is valid for
 * all commands, provided NBD_FLAG_SEND_FUA has been negotiated, in which case
 * the server MUST accept all commands with this bit set".
 */
const flagsApplicable: Readonly<Record<number, number>> = {
  [P.CMD_READ]: P.CMD_FLAG_FUA | P.CMD_FLAG_DF,
  [P.CMD_WRITE]: P.CMD_FLAG_FUA,
  [P.CMD_FLUSH]: P.CMD_FLAG_FUA,
  [P.CMD_TRIM]: P.CMD_FLAG_FUA,
  [P.CMD_CACHE]: P.CMD_FLAG_FUA,
  [P.CMD_WRITE_ZEROES]: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO,
  [P.CMD_BLOCK_STATUS]: P.CMD_FLAG_FUA | P.CMD_FLAG_REQ_ONE,
};

/** What a client knows once in transmission. */
interface TransmissionContext {
  spec: ExportSpec;
  structured: boolean;
  /** base:allocation was selected for this export (`unknown` after a refused SET). */
  blockStatus: boolean | 'unknown';
}

/** Error values a request may be answered with (0 is success), or `any` where the spec leaves it open. */
type Allowed = ReadonlySet<number> | 'any';

interface RequestExpect {
  cookie: bigint;
  type: number;
  flags: number;
  offset: bigint;
  lengthBytes: number;
  allowed: Allowed;
  /** Keep the data read (the sanity client compares it). */
  keep?: boolean;
}

/**
 * The spec's answer to a request, computed from the request and the context
 * alone. Several violations allow the union of their errors; a request whose
 * handling the spec leaves unspecified (the client broke a MUST NOT) may get any
 * answer, but still exactly one well-formed reply.
 */
function allowedOutcome(context: TransmissionContext, type: number, flags: number, offset: bigint, lengthBytes: number): Allowed {
  const applicable = flagsApplicable[type];
  if (applicable === undefined) return new Set([P.NBD_EINVAL]);
  const { spec } = context;
  const errors = new Set<number>();
  let unspecified = false;
  if ((flags & ~applicable) !== 0) errors.add(P.NBD_EINVAL);
  if ((flags & P.CMD_FLAG_DF) !== 0 && type === P.CMD_READ && !context.structured) unspecified = true; // NBD_FLAG_SEND_DF not advertised
  if ((flags & P.CMD_FLAG_FAST_ZERO) !== 0 && type === P.CMD_WRITE_ZEROES && spec.readOnly) unspecified = true; // SEND_FAST_ZERO not advertised
  if (type === P.CMD_BLOCK_STATUS && context.blockStatus !== true) unspecified = true;
  if (type === P.CMD_FLUSH) {
    if (offset !== 0n || lengthBytes !== 0) unspecified = true; // "MUST be set to all-zero"
  } else {
    if (lengthBytes === 0) unspecified = true;
    const mutating = type === P.CMD_WRITE || type === P.CMD_TRIM || type === P.CMD_WRITE_ZEROES;
    if (mutating && spec.readOnly) {
      errors.add(P.NBD_EPERM);
      if (type !== P.CMD_WRITE) errors.add(P.NBD_EINVAL); // SEND_TRIM / SEND_WRITE_ZEROES not advertised
    }
    if (offset + BigInt(lengthBytes) > BigInt(spec.sizeBytes)) {
      errors.add(P.NBD_EINVAL);
      if (type === P.CMD_WRITE || type === P.CMD_WRITE_ZEROES) errors.add(P.NBD_ENOSPC);
    }
    if ((type === P.CMD_READ || type === P.CMD_WRITE) && lengthBytes > payloadBytesMax) {
      errors.add(P.NBD_EINVAL);
      errors.add(P.NBD_EOVERFLOW);
    }
  }
  if (unspecified) return 'any';
  if (errors.size > 0) return errors;
  if (spec.kind !== 'flaky') return new Set([0]);
  const start = Number(offset);
  if (type === P.CMD_WRITE_ZEROES && (flags & P.CMD_FLAG_FAST_ZERO) !== 0) return new Set([P.NBD_ENOTSUP]);
  if (type === P.CMD_READ || type === P.CMD_WRITE || type === P.CMD_TRIM || type === P.CMD_WRITE_ZEROES) {
    // A structured read need not read a range it knows is a hole, so it may succeed.
    if (overlaps(start, lengthBytes, flakyEio)) return new Set(type === P.CMD_READ && context.structured ? [P.NBD_EIO, 0] : [P.NBD_EIO]);
    if (type !== P.CMD_READ && overlaps(start, lengthBytes, flakyNoSpace)) return new Set([P.NBD_ENOSPC]);
  }
  return new Set([0]);
}

/** Handshake state as the client tracks it. */
interface HandshakeState {
  structured: boolean;
  meta: { kind: 'none' } | { kind: 'set'; exportName: string; selected: boolean } | { kind: 'unknown' };
  /** The server is TLS-capable and TLS is on: STARTTLS again is an error. */
  tls: boolean;
}

interface OptionExpect {
  option: number;
  /** Allowed final reply types, or any error type. */
  finals: readonly number[] | 'anyError';
  /** NBD_REP_SERVER replies may precede the final one. */
  list?: boolean;
  /** NBD_REP_INFO replies may precede the final one, and one must describe this export on success. */
  info?: ExportSpec;
  /** NBD_REP_META_CONTEXT replies may precede the final one: must (true), must not (false) or may. */
  meta?: { set: boolean; context: boolean | 'maybe' };
  /** On success the transmission phase starts with this context. */
  go?: TransmissionContext;
}

type HandshakeEnd =
  | { kind: 'transmission'; context: TransmissionContext; exportName?: { noZeroes: boolean } }
  | { kind: 'serverCloses' }
  | { kind: 'abort' }
  | { kind: 'leave' };

interface CheckedPlan {
  greeting: boolean;
  options: OptionExpect[];
  end: HandshakeEnd;
  requests: RequestExpect[];
  disc: boolean;
}

/** A byte stream for the server and where its cases (messages) start. */
class StreamBuilder {
  private readonly parts: Buffer[] = [];
  size = 0;
  readonly starts: number[] = [];

  message(...parts: Buffer[]): void {
    this.starts.push(this.size);
    for (const part of parts) this.raw(part);
  }

  raw(part: Buffer): void {
    this.parts.push(part);
    this.size += part.length;
  }

  bytes(): Buffer {
    return Buffer.concat(this.parts, this.size);
  }
}

// ---------------------------------------------------------------- generator

const queryPool = ['base:allocation', 'base:', 'qemu:dirty-bitmap:sda', 'x-lifeline:none', 'base:allocationX', 'BASE:ALLOCATION'];
const setQueryPool = ['base:allocation', 'qemu:dirty-bitmap:sda', 'x-lifeline:none', 'base:allocationX'];

function unknownName(rand: Rand): Buffer {
  return rand.weighted<() => Buffer>([
    [3, () => Buffer.from('nope')],
    [2, () => Buffer.from('DISK0')],
    [2, () => Buffer.from('disk0\u0000')],
    [2, () => Buffer.from('disk0 ')],
    [2, () => Buffer.from([0x64, 0x69, 0x73, 0x6b, 0xff])],
    [3, () => Buffer.from(Array.from({ length: rand.between(1, 40) }, () => rand.between(0x21, 0x7e)))],
    [1, () => Buffer.alloc(4097, 'x')],
  ])();
}

function anyName(rand: Rand): Buffer {
  return rand.weighted<() => Buffer>([
    [6, () => Buffer.from(rand.pick(exportSpecs).name, 'utf8')],
    [2, () => Buffer.alloc(0)],
    [3, () => unknownName(rand)],
  ])();
}

function infoRequests(rand: Rand): number[] {
  return Array.from({ length: rand.int(5) }, () => (rand.chance(0.8) ? rand.int(4) : rand.u16()));
}

function transmissionContext(state: HandshakeState, spec: ExportSpec, viaGo: boolean): TransmissionContext {
  let blockStatus: boolean | 'unknown' = false;
  if (viaGo && state.meta.kind === 'set') blockStatus = state.meta.selected && state.meta.exportName === spec.name;
  if (viaGo && state.meta.kind === 'unknown') blockStatus = 'unknown';
  return { spec, structured: state.structured, blockStatus };
}

/** One non-final option with its expected answer; updates the state as the spec says it changes. */
function genOption(rand: Rand, state: HandshakeState, out: StreamBuilder): OptionExpect {
  const kind = rand.weighted<string>([
    [10, 'list'],
    [3, 'listData'],
    [10, 'unknown'],
    [14, 'structured'],
    [3, 'structuredData'],
    [9, 'info'],
    [6, 'infoMalformed'],
    [5, 'goRefused'],
    [7, 'listMeta'],
    [10, 'setMeta'],
    [4, 'metaMalformed'],
    [3, 'starttls'],
    [0.4, 'oversized'],
  ]);
  switch (kind) {
    case 'list':
      out.message(encodeOption(P.OPT_LIST, Buffer.alloc(0)));
      return { option: P.OPT_LIST, finals: [P.REP_ACK], list: true };
    case 'listData':
      out.message(encodeOption(P.OPT_LIST, rand.bytes(rand.between(1, 40))));
      return { option: P.OPT_LIST, finals: 'anyError' };
    case 'unknown': {
      const option = rand.weighted<number>([
        [2, 0],
        [2, 4],
        [2, 11],
        [1, 12],
        [3, rand.between(11, 0xffffffff)],
        [1, 0x80000000 + rand.between(1, 10)],
      ]);
      out.message(encodeOption(option, rand.bytes(rand.weighted([[3, 0], [3, rand.int(64)], [1, rand.int(2000)]]))));
      return { option, finals: [P.REP_ERR_UNSUP] };
    }
    case 'structured': {
      out.message(encodeOption(P.OPT_STRUCTURED_REPLY, Buffer.alloc(0)));
      const finals = state.structured ? [P.REP_ACK, P.REP_ERR_INVALID] : [P.REP_ACK];
      state.structured = true;
      return { option: P.OPT_STRUCTURED_REPLY, finals };
    }
    case 'structuredData':
      out.message(encodeOption(P.OPT_STRUCTURED_REPLY, rand.bytes(rand.between(1, 16))));
      return { option: P.OPT_STRUCTURED_REPLY, finals: 'anyError' };
    case 'info':
    case 'goRefused': {
      const option = kind === 'info' ? P.OPT_INFO : P.OPT_GO;
      const name = kind === 'info' ? anyName(rand) : unknownName(rand);
      out.message(encodeOption(option, infoPayload(name, infoRequests(rand))));
      const spec = findExportSpec(name);
      if (name.length > 4096) return { option, finals: 'anyError' };
      if (!spec) return { option, finals: [P.REP_ERR_UNKNOWN] };
      return { option, finals: [P.REP_ACK], info: spec };
    }
    case 'infoMalformed': {
      const option = rand.pick([P.OPT_INFO, P.OPT_GO]);
      const name = anyName(rand);
      const requests = infoRequests(rand);
      const payload = rand.weighted<() => Buffer>([
        [2, () => rand.bytes(rand.int(6))],
        [2, () => { const good = infoPayload(name, requests); good.writeUInt32BE(rand.chance(0.5) ? 0xffffffff : good.length - 4 + rand.between(1, 100), 0); return good; }],
        [2, () => Buffer.concat([u32(name.length), name, u16(requests.length + rand.between(1, 3)), ...requests.map(u16)])],
        [1, () => Buffer.concat([u32(name.length), name, u16(requests.length + 1), ...requests.map(u16)]).subarray(0, 4 + name.length + 2 + 2 * requests.length)],
        [2, () => Buffer.concat([infoPayload(name, requests), rand.bytes(1)])],
      ])();
      out.message(encodeOption(option, payload));
      return { option, finals: 'anyError' };
    }
    case 'listMeta':
    case 'setMeta': {
      const set = kind === 'setMeta';
      const option = set ? P.OPT_SET_META_CONTEXT : P.OPT_LIST_META_CONTEXT;
      const name = anyName(rand);
      const queries = Array.from({ length: rand.weighted([[1, 0], [4, 1], [2, rand.between(2, 5)]]) }, () => rand.pick(set ? setQueryPool : queryPool));
      out.message(encodeOption(option, metaPayload(name, queries.map((query) => Buffer.from(query)))));
      const spec = findExportSpec(name);
      if (!state.structured || !spec) {
        if (set) state.meta = { kind: 'unknown' };
        return { option, finals: 'anyError' };
      }
      const context = set
        ? queries.includes('base:allocation')
        : queries.length === 0 || queries.includes('base:allocation') || queries.includes('base:');
      if (set) state.meta = { kind: 'set', exportName: spec.name, selected: context };
      return { option, finals: [P.REP_ACK], meta: { set, context } };
    }
    case 'metaMalformed': {
      const set = rand.chance(0.5);
      const option = set ? P.OPT_SET_META_CONTEXT : P.OPT_LIST_META_CONTEXT;
      const name = anyName(rand);
      const query = Buffer.from(rand.pick(queryPool));
      const payload = rand.weighted<() => Buffer>([
        [2, () => rand.bytes(rand.int(8))],
        [2, () => Buffer.concat([u32(name.length), name, u32(rand.between(2, 50)), u32(query.length), query])],
        [2, () => Buffer.concat([u32(name.length), name, u32(1), u32(query.length + rand.between(1, 1000)), query])],
        [2, () => Buffer.concat([metaPayload(name, [query]), rand.bytes(rand.between(1, 3))])],
        [1, () => Buffer.concat([u32(name.length + 10), name])],
      ])();
      out.message(encodeOption(option, payload));
      if (set) state.meta = { kind: 'unknown' };
      return { option, finals: 'anyError' };
    }
    case 'starttls': {
      const data = rand.chance(0.7) ? Buffer.alloc(0) : rand.bytes(rand.between(1, 8));
      out.message(encodeOption(P.OPT_STARTTLS, data));
      return { option: P.OPT_STARTTLS, finals: 'anyError' };
    }
    default: {
      // An option over the server's payload limit, payload sent in full.
      const option = rand.pick([P.OPT_LIST, P.OPT_INFO, P.OPT_SET_META_CONTEXT, 77]);
      out.message(encodeOption(option, rand.bytes(optionBytesMax + rand.between(1, 600))));
      if (option === P.OPT_SET_META_CONTEXT) state.meta = { kind: 'unknown' };
      return { option, finals: 'anyError' };
    }
  }
}

const interestingOffsets = (rand: Rand, size: number): bigint =>
  rand.weighted<() => bigint>([
    [6, () => 0n],
    [20, () => BigInt(rand.int(size))],
    [10, () => BigInt(rand.int(Math.ceil(size / 4096)) * 4096)],
    [6, () => BigInt(Math.max(0, size - rand.between(0, 4096)))],
    [3, () => BigInt(size)],
    [4, () => BigInt(size + rand.between(1, 1 << 20))],
    [2, () => (1n << 32n) + BigInt(rand.int(4096))],
    [2, () => rand.pick([(1n << 53n) - 1n, 1n << 53n, (1n << 53n) + 1n, 1n << 63n, (1n << 64n) - 1n, (1n << 64n) - 4096n])],
    [2, () => rand.u64()],
  ])();

function genLength(rand: Rand, type: number, offset: bigint, size: number): number {
  const room = offset <= BigInt(size) ? size - Number(offset) : 0;
  if (type === P.CMD_WRITE) {
    // The payload is sent, so keep it affordable.
    return rand.weighted<() => number>([
      [3, () => 0],
      [30, () => rand.between(1, 4096)],
      [10, () => rand.between(1, 16) * 4096],
      [4, () => Math.min(room, 65536)],
      [3, () => Math.min(room, 65536) + rand.between(1, 512)],
      [0.3, () => room],
    ])();
  }
  return rand.weighted<() => number>([
    [3, () => 0],
    [25, () => rand.between(1, 4096)],
    [10, () => rand.between(1, 16) * 4096],
    [5, () => Math.min(room, 65536)],
    [4, () => room + 1],
    [type === P.CMD_READ ? 0.5 : 3, () => room],
    [3, () => rand.u32()],
    [2, () => 0xffffffff],
    [1, () => payloadBytesMax],
    [1, () => payloadBytesMax + 1],
  ])();
}

function genFlags(rand: Rand, type: number): number {
  const applicable = flagsApplicable[type] ?? 0;
  return rand.weighted<() => number>([
    [55, () => applicable & rand.int(32)],
    [20, () => 0],
    [12, () => 1 << rand.int(16)],
    [8, () => rand.int(32)],
    [5, () => rand.u16()],
  ])();
}

/** A random transmission request with its payload, and the spec's answer to it. */
function genRequest(rand: Rand, context: TransmissionContext, cookie: bigint, pool: Buffer, out: StreamBuilder): RequestExpect {
  const size = context.spec.sizeBytes;
  const type = rand.weighted<number>([
    [24, P.CMD_READ],
    [22, P.CMD_WRITE],
    [6, P.CMD_FLUSH],
    [8, P.CMD_TRIM],
    [5, P.CMD_CACHE],
    [10, P.CMD_WRITE_ZEROES],
    [10, P.CMD_BLOCK_STATUS],
    [6, rand.pick([8, 9, 12, 0x7fff, 0xffff, rand.between(8, 0xffff)])],
  ]);
  const flags = genFlags(rand, type);
  let offset: bigint;
  let lengthBytes: number;
  if (type === P.CMD_FLUSH && rand.chance(0.85)) {
    offset = 0n;
    lengthBytes = 0;
  } else {
    offset = interestingOffsets(rand, size);
    lengthBytes = genLength(rand, type, offset, size);
  }
  out.message(encodeRequest(flags, type, cookie, offset, lengthBytes));
  if (type === P.CMD_WRITE) {
    const start = rand.int(pool.length - lengthBytes + 1);
    out.raw(pool.subarray(start, start + lengthBytes));
  }
  return { cookie, type, flags, offset, lengthBytes, allowed: allowedOutcome(context, type, flags, offset, lengthBytes) };
}

interface GeneratedStream {
  bytes: Buffer;
  starts: number[];
  plan: CheckedPlan;
}

/** A well-formed conversation with random content, and what the server must answer. */
function genConversation(rand: Rand, pool: Buffer, options: { afterTls?: boolean; noZeroes?: boolean } = {}): GeneratedStream {
  const out = new StreamBuilder();
  const state: HandshakeState = { structured: false, meta: { kind: 'none' }, tls: options.afterTls === true };
  const plan: CheckedPlan = { greeting: !options.afterTls, options: [], end: { kind: 'leave' }, requests: [], disc: false };
  let noZeroes = options.noZeroes ?? false;
  if (!options.afterTls) {
    const badFlags = rand.chance(0.03);
    if (badFlags) {
      const flags = rand.pick([0, P.FLAG_C_NO_ZEROES, 1 << rand.between(2, 31), rand.u32() | 4]);
      out.message(u32(flags));
      if (rand.chance(0.5)) out.raw(encodeOption(P.OPT_LIST, Buffer.alloc(0)));
      plan.end = { kind: 'serverCloses' };
      return { bytes: out.bytes(), starts: out.starts, plan };
    }
    noZeroes = rand.chance(0.5);
    out.message(u32(P.FLAG_C_FIXED_NEWSTYLE | (noZeroes ? P.FLAG_C_NO_ZEROES : 0)));
  }
  const optionCount = rand.weighted<() => number>([[3, () => 0], [5, () => rand.between(1, 4)], [3, () => rand.between(5, 14)], [1, () => rand.between(15, 60)]])();
  for (let i = 0; i < optionCount; i++) plan.options.push(genOption(rand, state, out));
  const ending = rand.weighted<string>([
    [50, 'go'],
    [18, 'exportName'],
    [5, 'exportNameUnknown'],
    [5, 'abort'],
    [2, 'abortData'],
    [10, 'leave'],
  ]);
  switch (ending) {
    case 'go': {
      const name = rand.chance(0.15) ? Buffer.alloc(0) : Buffer.from(rand.pick(exportSpecs).name, 'utf8');
      const spec = findExportSpec(name)!;
      out.message(encodeOption(P.OPT_GO, infoPayload(name, infoRequests(rand))));
      const context = transmissionContext(state, spec, true);
      plan.options.push({ option: P.OPT_GO, finals: [P.REP_ACK], info: spec, go: context });
      plan.end = { kind: 'transmission', context };
      break;
    }
    case 'exportName': {
      const name = rand.chance(0.15) ? Buffer.alloc(0) : Buffer.from(rand.pick(exportSpecs).name, 'utf8');
      out.message(encodeOption(P.OPT_EXPORT_NAME, name));
      plan.end = { kind: 'transmission', context: transmissionContext(state, findExportSpec(name)!, false), exportName: { noZeroes } };
      break;
    }
    case 'exportNameUnknown':
      out.message(encodeOption(P.OPT_EXPORT_NAME, unknownName(rand)));
      plan.end = { kind: 'serverCloses' };
      break;
    case 'abort':
    case 'abortData':
      out.message(encodeOption(P.OPT_ABORT, ending === 'abort' ? Buffer.alloc(0) : rand.bytes(rand.between(1, 8))));
      plan.end = { kind: 'abort' };
      break;
    default:
      plan.end = { kind: 'leave' };
  }
  if (plan.end.kind === 'transmission') {
    const context = plan.end.context;
    const count = rand.weighted<() => number>([[2, () => rand.between(0, 8)], [4, () => rand.between(10, 100)], [4, () => rand.between(100, 400)]])();
    const cookieBase = BigInt(rand.u32()) << 32n;
    for (let i = 0; i < count; i++) plan.requests.push(genRequest(rand, context, cookieBase + BigInt(i), pool, out));
    if (rand.chance(0.6)) {
      plan.disc = true;
      out.message(encodeRequest(rand.chance(0.8) ? 0 : rand.u16(), P.CMD_DISC, cookieBase + BigInt(count), rand.chance(0.9) ? 0n : rand.u64(), rand.chance(0.9) ? 0 : rand.u32()));
      // A client must send nothing after NBD_CMD_DISC; some do.
      if (rand.chance(0.2)) out.raw(rand.bytes(rand.between(1, 4096)));
    }
  }
  return { bytes: out.bytes(), starts: out.starts, plan };
}

// ----------------------------------------------------------------- mutation

const interestingWords = [0, 1, 2, 0x7f, 0x80, 0xff, 0x7fff, 0x8000, 0xffff, 0x10000, optionBytesMax, optionBytesMax + 1, payloadBytesMax, payloadBytesMax + 1, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff];

/** Mutates a valid stream: bit flips, header fields overwritten, truncation, insertions, deletions, duplicated messages. */
function mutate(rand: Rand, bytes: Buffer, starts: readonly number[]): Buffer {
  let data = Buffer.from(bytes);
  const mutations = rand.weighted([[5, 1], [3, 2], [2, rand.between(3, 8)]]);
  const anchor = (): number => {
    if (data.length === 0) return 0;
    if (starts.length > 0 && rand.chance(0.6)) return Math.min(data.length - 1, rand.pick(starts) + rand.int(P.REQUEST_HEADER_BYTES));
    return rand.int(data.length);
  };
  for (let i = 0; i < mutations; i++) {
    const kind = rand.weighted<string>([[6, 'flip'], [4, 'byte'], [6, 'word'], [2, 'truncate'], [3, 'insert'], [3, 'delete'], [3, 'resize'], [2, 'duplicate'], [1, 'splice']]);
    if (data.length === 0) break;
    const at = anchor();
    switch (kind) {
      case 'flip':
        data[at] = data[at]! ^ (1 << rand.int(8));
        break;
      case 'byte':
        data[at] = rand.pick([0, 0xff, 0x80, 0x7f, rand.int(256)]);
        break;
      case 'word':
        if (at + 4 <= data.length) data.writeUInt32BE(rand.pick(interestingWords) >>> 0, at);
        break;
      case 'truncate':
        data = data.subarray(0, at);
        break;
      case 'insert':
        data = Buffer.concat([data.subarray(0, at), rand.bytes(rand.weighted([[4, rand.between(1, 8)], [2, rand.between(9, 64)], [1, rand.between(65, 2000)]])), data.subarray(at)]);
        break;
      case 'delete':
        data = Buffer.concat([data.subarray(0, at), data.subarray(Math.min(data.length, at + rand.weighted([[4, rand.between(1, 8)], [2, rand.between(9, 64)], [1, rand.between(65, 4000)]])))]);
        break;
      case 'resize': {
        // A message (say a write's payload) shorter or longer than its header declares.
        const end = Math.min(data.length, starts.length > 1 ? rand.pick(starts.slice(1)) : data.length);
        const bytesChanged = rand.weighted([[4, rand.between(1, 4)], [2, rand.between(5, 64)], [1, rand.between(65, 5000)]]);
        data = rand.chance(0.5)
          ? Buffer.concat([data.subarray(0, Math.max(0, end - bytesChanged)), data.subarray(end)])
          : Buffer.concat([data.subarray(0, end), rand.chance(0.5) ? Buffer.alloc(bytesChanged) : rand.bytes(bytesChanged), data.subarray(end)]);
        break;
      }
      case 'duplicate': {
        const from = rand.pick(starts.length > 0 ? starts : [0]);
        const piece = data.subarray(Math.min(from, data.length), Math.min(data.length, from + rand.between(1, 600)));
        data = Buffer.concat([data.subarray(0, at), piece, data.subarray(at)]);
        break;
      }
      default:
        data = Buffer.concat([data.subarray(0, at), rand.bytes(rand.between(1, 256))]);
    }
  }
  return data;
}

// ------------------------------------------------------------------ sockets

type Target = { port: number; host: string } | { path: string };

async function connect(target: Target, options: { allowHalfOpen?: boolean } = {}): Promise<net.Socket> {
  const socket = net.connect({ ...target, allowHalfOpen: options.allowHalfOpen ?? false });
  socket.on('error', () => {}); // resets and broken pipes are expected when the server hangs up on garbage
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', () => resolve());
    socket.once('close', () => reject(new Error('connection failed')));
  });
  socket.setNoDelay(true);
  return socket;
}

function closed(socket: net.Socket): Promise<void> {
  if (socket.destroyed && socket.closed) return Promise.resolve();
  return new Promise((resolve) => socket.once('close', () => resolve()));
}

function immediate(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** Waits until the socket takes more writes, or closes. */
function drained(socket: net.Socket): Promise<void> {
  return new Promise<void>((resolve) => {
    const done = (): void => {
      socket.off('drain', done);
      socket.off('close', done);
      resolve();
    };
    socket.on('drain', done);
    socket.on('close', done);
  });
}

/**
 * Writes `bytes` in random pieces, sometimes yielding so the server sees
 * partial messages. Stops early if the socket is closed; returns the bytes written.
 */
async function writeChunked(socket: net.Socket, bytes: Buffer, rand: Rand, limit = bytes.length): Promise<number> {
  const style = rand.weighted<string>([[3, 'whole'], [3, 'tiny'], [4, 'medium'], [2, 'large']]);
  let written = 0;
  while (written < limit) {
    if (socket.destroyed || !socket.writable) break;
    let step: number;
    switch (style) {
      case 'whole':
        step = limit - written;
        break;
      case 'tiny':
        step = written < 2048 ? rand.between(1, 16) : rand.between(1, 8192);
        break;
      case 'medium':
        step = rand.between(1, 2048);
        break;
      default:
        step = rand.between(1, 65536);
    }
    step = Math.min(step, limit - written);
    const ok = socket.write(bytes.subarray(written, written + step));
    written += step;
    if (!ok) {
      await drained(socket);
    } else if (style !== 'whole' && rand.chance(0.3)) {
      await immediate();
    }
  }
  return written;
}

class CheckFailure extends Error {}

/** Received bytes, read with `await need(n)` then `take(n)`. */
class Reader {
  private chunks: Buffer[] = [];
  private headOffset = 0;
  length = 0;
  ended = false;
  private wake: (() => void) | undefined;

  constructor(socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.chunks.push(chunk);
      this.length += chunk.length;
      this.notify();
    });
    const end = (): void => {
      this.ended = true;
      this.notify();
    };
    socket.on('end', end);
    socket.on('close', end);
  }

  private notify(): void {
    const wake = this.wake;
    this.wake = undefined;
    wake?.();
  }

  /** Resolves true once `n` bytes are buffered, false if the stream ends first. */
  async need(n: number): Promise<boolean> {
    while (this.length < n) {
      if (this.ended) return false;
      await new Promise<void>((resolve) => (this.wake = resolve));
    }
    return true;
  }

  take(n: number): Buffer {
    const first = this.chunks[0];
    if (first && first.length - this.headOffset >= n) {
      const out = first.subarray(this.headOffset, this.headOffset + n);
      this.advance(n);
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let written = 0;
    while (written < n) {
      const chunk = this.chunks[0]!;
      const step = Math.min(chunk.length - this.headOffset, n - written);
      chunk.copy(out, written, this.headOffset, this.headOffset + step);
      written += step;
      this.advance(step);
    }
    return out;
  }

  private advance(n: number): void {
    this.headOffset += n;
    this.length -= n;
    if (this.headOffset === this.chunks[0]!.length) {
      this.chunks.shift();
      this.headOffset = 0;
    }
  }

  async read(n: number, what: string): Promise<Buffer> {
    if (!(await this.need(n))) throw new CheckFailure(`server closed the connection before ${what}`);
    return this.take(n);
  }

  /** The server must send nothing more and close. */
  async expectClose(what: string): Promise<void> {
    if (await this.need(1)) throw new CheckFailure(`server sent ${this.length}+ unexpected bytes ${what}`);
  }
}

// ------------------------------------------------------------------ checker

interface Session {
  /** Context id of base:allocation from the last successful SET_META_CONTEXT. */
  metaId: number | undefined;
}

async function checkGreeting(reader: Reader): Promise<void> {
  const greeting = await reader.read(18, 'the greeting');
  if (greeting.readBigUInt64BE(0) !== P.NBDMAGIC || greeting.readBigUInt64BE(8) !== P.IHAVEOPT) throw new CheckFailure('bad greeting magic');
  if ((greeting.readUInt16BE(16) & P.FLAG_FIXED_NEWSTYLE) === 0) throw new CheckFailure('server does not offer fixed newstyle');
}

function describeOption(expect: OptionExpect): string {
  return `option ${expect.option}`;
}

/** Reads every reply to one option and checks it; returns the final reply type. */
async function checkOptionReplies(reader: Reader, expect: OptionExpect, session: Session): Promise<number> {
  const what = describeOption(expect);
  const servers: string[] = [];
  let sawExport = false;
  const contexts: { id: number; name: string }[] = [];
  for (;;) {
    const header = await reader.read(20, `the reply to ${what}`);
    if (header.readBigUInt64BE(0) !== P.OPTION_REPLY_MAGIC) throw new CheckFailure(`bad option reply magic answering ${what}`);
    const option = header.readUInt32BE(8);
    const type = header.readUInt32BE(12);
    const lengthBytes = header.readUInt32BE(16);
    if (option !== expect.option >>> 0) throw new CheckFailure(`reply for option ${option} while answering ${what}`);
    if (lengthBytes > 64 * KiB) throw new CheckFailure(`option reply of ${lengthBytes} bytes answering ${what}`);
    const payload = await reader.read(lengthBytes, `the reply payload to ${what}`);
    if (type === P.REP_ACK || (type & REP_ERROR_BIT) !== 0) {
      if (type === P.REP_ACK && lengthBytes !== 0) throw new CheckFailure(`ACK with a payload answering ${what}`);
      const ok = expect.finals === 'anyError' ? (type & REP_ERROR_BIT) !== 0 : expect.finals.includes(type);
      if (!ok) throw new CheckFailure(`${what} answered with reply type 0x${type.toString(16)}, expected ${expect.finals === 'anyError' ? 'an error' : expect.finals.map((final) => '0x' + final.toString(16)).join(' or ')}`);
      if (type === P.REP_ACK) {
        if (expect.list) {
          const want = exportSpecs.map((spec) => spec.name).sort();
          if (JSON.stringify(servers.sort()) !== JSON.stringify(want)) throw new CheckFailure(`NBD_OPT_LIST named ${JSON.stringify(servers)}`);
        }
        if (expect.info && !sawExport) throw new CheckFailure(`${what} succeeded without NBD_INFO_EXPORT`);
        if (expect.meta) {
          if (expect.meta.context === true && contexts.length !== 1) throw new CheckFailure(`${what} returned ${contexts.length} contexts, expected base:allocation`);
          if (expect.meta.context === false && contexts.length !== 0) throw new CheckFailure(`${what} returned a context for queries that match none`);
          if (expect.meta.set) session.metaId = contexts[0]?.id;
        }
      }
      return type;
    }
    switch (type) {
      case P.REP_SERVER: {
        if (!expect.list) throw new CheckFailure(`NBD_REP_SERVER answering ${what}`);
        if (lengthBytes < 4 || payload.readUInt32BE(0) > lengthBytes - 4) throw new CheckFailure('malformed NBD_REP_SERVER');
        servers.push(payload.toString('utf8', 4, 4 + payload.readUInt32BE(0)));
        break;
      }
      case P.REP_INFO: {
        if (!expect.info) throw new CheckFailure(`NBD_REP_INFO answering ${what}`);
        if (lengthBytes < 2) throw new CheckFailure('NBD_REP_INFO without a type');
        const infoType = payload.readUInt16BE(0);
        if (infoType === P.INFO_EXPORT) {
          if (lengthBytes !== 12) throw new CheckFailure(`NBD_INFO_EXPORT of ${lengthBytes} bytes`);
          checkExportInfo(payload.readBigUInt64BE(2), payload.readUInt16BE(10), expect.info);
          sawExport = true;
        } else if (infoType === P.INFO_NAME) {
          if (payload.toString('utf8', 2) !== expect.info.name) throw new CheckFailure(`NBD_INFO_NAME '${payload.toString('utf8', 2)}' for export '${expect.info.name}'`);
        } else if (infoType === P.INFO_BLOCK_SIZE) {
          if (lengthBytes !== 14) throw new CheckFailure(`NBD_INFO_BLOCK_SIZE of ${lengthBytes} bytes`);
          const minimum = payload.readUInt32BE(2);
          const preferred = payload.readUInt32BE(6);
          const maximum = payload.readUInt32BE(10);
          if (!(minimum >= 1 && minimum <= preferred && minimum <= maximum)) throw new CheckFailure(`block sizes ${minimum}/${preferred}/${maximum}`);
        } else if (infoType !== P.INFO_DESCRIPTION) {
          throw new CheckFailure(`unknown NBD_REP_INFO type ${infoType}`);
        }
        break;
      }
      case P.REP_META_CONTEXT: {
        if (!expect.meta) throw new CheckFailure(`NBD_REP_META_CONTEXT answering ${what}`);
        if (lengthBytes < 5) throw new CheckFailure('malformed NBD_REP_META_CONTEXT');
        const name = payload.toString('utf8', 4);
        if (name !== P.META_CONTEXT_BASE_ALLOCATION) throw new CheckFailure(`unexpected metadata context '${name}'`);
        if (expect.meta.set && payload.readUInt32BE(0) === 0) throw new CheckFailure('SET_META_CONTEXT gave context id 0'); // not forbidden, but the server uses 1
        contexts.push({ id: payload.readUInt32BE(0), name });
        break;
      }
      default:
        throw new CheckFailure(`unexpected option reply type ${type} answering ${what}`);
    }
  }
}

function checkExportInfo(size: bigint, flags: number, spec: ExportSpec): void {
  if (size !== BigInt(spec.sizeBytes)) throw new CheckFailure(`export '${spec.name}' announced with size ${size}, expected ${spec.sizeBytes}`);
  if ((flags & P.TFLAG_HAS_FLAGS) === 0) throw new CheckFailure('transmission flags lack NBD_FLAG_HAS_FLAGS');
  if (((flags & P.TFLAG_READ_ONLY) !== 0) !== spec.readOnly) throw new CheckFailure(`export '${spec.name}' read-only flag is wrong (flags 0x${flags.toString(16)})`);
}

interface RequestResult {
  error: number;
  data?: Buffer;
  extents?: { lengthBytes: number; flags: number }[];
}

interface RequestState {
  expect: RequestExpect;
  error: number | undefined;
  ranges: [number, number][];
  contentChunks: number;
  blockStatusChunks: number;
  data?: Buffer;
  extents?: { lengthBytes: number; flags: number }[];
  resolve?: (result: RequestResult) => void;
}

function describeRequest(expect: RequestExpect): string {
  const name = P.COMMAND_NAMES[expect.type] ?? `command ${expect.type}`;
  return `${name} flags 0x${expect.flags.toString(16)} offset ${expect.offset} length ${expect.lengthBytes}`;
}

function allowedText(allowed: Allowed): string {
  return allowed === 'any' ? 'anything' : [...allowed].join(' or ');
}

/** Parses transmission replies, matching them to the requests registered with `expect`. */
class ReplyChecker {
  private readonly pending = new Map<bigint, RequestState>();
  private readonly reader: Reader;
  private readonly context: TransmissionContext;
  private readonly session: Session;
  completed = 0;

  constructor(reader: Reader, context: TransmissionContext, session: Session) {
    this.reader = reader;
    this.context = context;
    this.session = session;
  }

  get outstanding(): number {
    return this.pending.size;
  }

  expect(request: RequestExpect): Promise<RequestResult> {
    return new Promise((resolve) => {
      this.pending.set(request.cookie, { expect: request, error: undefined, ranges: [], contentChunks: 0, blockStatusChunks: 0, resolve });
    });
  }

  register(request: RequestExpect): void {
    this.pending.set(request.cookie, { expect: request, error: undefined, ranges: [], contentChunks: 0, blockStatusChunks: 0 });
  }

  /** Reads replies until none is outstanding, or with `untilClosed` until the server closes with none outstanding. */
  async run(untilClosed = false): Promise<void> {
    const reader = this.reader;
    for (;;) {
      if (this.pending.size === 0 && !untilClosed) return;
      if (!(await reader.need(4))) {
        if (this.pending.size === 0) return;
        const first = this.pending.values().next().value!;
        throw new CheckFailure(`server closed with ${this.pending.size} replies outstanding, e.g. to ${describeRequest(first.expect)}`);
      }
      const magic = reader.take(4).readUInt32BE(0);
      if (magic === P.SIMPLE_REPLY_MAGIC) await this.simpleReply();
      else if (magic === P.STRUCTURED_REPLY_MAGIC) await this.structuredChunk();
      else throw new CheckFailure(`bad reply magic 0x${magic.toString(16)}`);
    }
  }

  private lookup(cookie: bigint): RequestState {
    const state = this.pending.get(cookie);
    if (!state) throw new CheckFailure(`reply with cookie 0x${cookie.toString(16)} that matches no request in flight`);
    return state;
  }

  private async simpleReply(): Promise<void> {
    const rest = await this.reader.read(12, 'a simple reply header');
    const error = rest.readUInt32BE(0);
    const state = this.lookup(rest.readBigUInt64BE(4));
    const { expect } = state;
    if (this.context.structured && expect.type === P.CMD_READ) throw new CheckFailure(`simple reply to a read with structured replies negotiated: ${describeRequest(expect)}`);
    if (error === 0 && expect.type === P.CMD_BLOCK_STATUS) throw new CheckFailure('successful block status without a structured reply');
    if (error === 0 && expect.type === P.CMD_READ) {
      if (expect.lengthBytes > payloadBytesMax) throw new CheckFailure(`success for an oversized read: ${describeRequest(expect)}`);
      const data = await this.reader.read(expect.lengthBytes, 'read data');
      this.checkData(expect, Number(expect.offset), data);
      if (expect.keep) state.data = Buffer.from(data);
      state.ranges.push([Number(expect.offset), Number(expect.offset) + expect.lengthBytes]);
    }
    state.error = error;
    this.complete(state);
  }

  private async structuredChunk(): Promise<void> {
    const rest = await this.reader.read(16, 'a structured reply header');
    const flags = rest.readUInt16BE(0);
    const type = rest.readUInt16BE(2);
    const state = this.lookup(rest.readBigUInt64BE(4));
    const lengthBytes = rest.readUInt32BE(12);
    const { expect } = state;
    const what = describeRequest(expect);
    if (!this.context.structured) throw new CheckFailure(`structured reply without negotiating it, to ${what}`);
    if ((flags & ~P.REPLY_FLAG_DONE) !== 0) throw new CheckFailure(`unknown structured reply flags 0x${flags.toString(16)}`);
    if (lengthBytes > payloadBytesMax + 64) throw new CheckFailure(`structured chunk of ${lengthBytes} bytes`);
    const payload = await this.reader.read(lengthBytes, `a chunk of the reply to ${what}`);
    const start = Number(expect.offset);
    const end = start + expect.lengthBytes;
    switch (type) {
      case P.REPLY_TYPE_NONE:
        if (lengthBytes !== 0 || (flags & P.REPLY_FLAG_DONE) === 0) throw new CheckFailure('malformed NBD_REPLY_TYPE_NONE');
        break;
      case P.REPLY_TYPE_OFFSET_DATA:
      case P.REPLY_TYPE_OFFSET_HOLE: {
        if (expect.type !== P.CMD_READ) throw new CheckFailure(`read content chunk answering ${what}`);
        const hole = type === P.REPLY_TYPE_OFFSET_HOLE;
        if (hole ? lengthBytes !== 12 : lengthBytes <= 8) throw new CheckFailure(`content chunk of ${lengthBytes} bytes`);
        const chunkOffset = Number(payload.readBigUInt64BE(0));
        const chunkBytes = hole ? payload.readUInt32BE(8) : lengthBytes - 8;
        if (chunkBytes === 0 || chunkOffset < start || chunkOffset + chunkBytes > end) throw new CheckFailure(`content chunk [${chunkOffset}, +${chunkBytes}) outside ${what}`);
        if (hole) this.checkData(expect, chunkOffset, undefined, chunkBytes);
        else this.checkData(expect, chunkOffset, payload.subarray(8));
        if (expect.keep) {
          state.data ??= Buffer.alloc(expect.lengthBytes);
          if (!hole) payload.copy(state.data, chunkOffset - start, 8);
        }
        state.ranges.push([chunkOffset, chunkOffset + chunkBytes]);
        state.contentChunks++;
        break;
      }
      case P.REPLY_TYPE_BLOCK_STATUS: {
        if (expect.type !== P.CMD_BLOCK_STATUS) throw new CheckFailure(`block status chunk answering ${what}`);
        if (lengthBytes < 12 || (lengthBytes - 4) % 8 !== 0) throw new CheckFailure(`block status chunk of ${lengthBytes} bytes`);
        if (this.session.metaId !== undefined && payload.readUInt32BE(0) !== this.session.metaId) throw new CheckFailure(`block status for context ${payload.readUInt32BE(0)}, selected ${this.session.metaId}`);
        const extents: { lengthBytes: number; flags: number }[] = [];
        let cursor = start;
        for (let at = 4; at < lengthBytes; at += 8) {
          const extentBytes = payload.readUInt32BE(at);
          const extentFlags = payload.readUInt32BE(at + 4);
          if (extentBytes === 0) throw new CheckFailure('block status descriptor of length 0');
          if ((extentFlags & ~(P.STATE_HOLE | P.STATE_ZERO)) !== 0) throw new CheckFailure(`block status flags 0x${extentFlags.toString(16)}`);
          if (cursor >= end) throw new CheckFailure(`block status descriptors past the end of ${what}`);
          if (this.context.spec.kind === 'ro' && (extentFlags & P.STATE_ZERO) !== 0) {
            const last = Math.min(cursor + extentBytes, roContent.length);
            if (roContent.subarray(cursor, last).some((byte) => byte !== 0)) throw new CheckFailure(`block status says [${cursor}, +${extentBytes}) reads as zeroes, but it holds data`);
          }
          extents.push({ lengthBytes: extentBytes, flags: extentFlags });
          cursor += extentBytes;
        }
        if ((expect.flags & P.CMD_FLAG_REQ_ONE) !== 0 && (extents.length !== 1 || extents[0]!.lengthBytes > expect.lengthBytes)) {
          throw new CheckFailure(`block status with NBD_CMD_FLAG_REQ_ONE returned ${extents.length} descriptors`);
        }
        state.extents = extents;
        state.blockStatusChunks++;
        break;
      }
      case P.REPLY_TYPE_ERROR:
      case P.REPLY_TYPE_ERROR_OFFSET: {
        if (lengthBytes < 6) throw new CheckFailure('error chunk too short');
        const error = payload.readUInt32BE(0);
        const messageBytes = payload.readUInt16BE(4);
        const extra = type === P.REPLY_TYPE_ERROR_OFFSET ? 8 : 0;
        if (lengthBytes !== 6 + messageBytes + extra) throw new CheckFailure(`error chunk of ${lengthBytes} bytes with a message of ${messageBytes}`);
        if (error === 0) throw new CheckFailure('error chunk with error 0');
        state.error ??= error;
        break;
      }
      default:
        throw new CheckFailure(`unknown structured reply type ${type} answering ${what}`);
    }
    if ((flags & P.REPLY_FLAG_DONE) !== 0) {
      state.error ??= 0;
      if (state.error === 0 && expect.type === P.CMD_READ) {
        const ranges = state.ranges.sort((a, b) => a[0] - b[0]);
        let cursor = start;
        for (const [from, to] of ranges) {
          if (from !== cursor) throw new CheckFailure(`read chunks leave a gap or overlap at ${cursor} answering ${what}`);
          cursor = to;
        }
        if (cursor !== end) throw new CheckFailure(`read chunks cover up to ${cursor} of [${start}, ${end}) answering ${what}`);
        if ((expect.flags & P.CMD_FLAG_DF) !== 0 && state.contentChunks > 1) throw new CheckFailure(`read with NBD_CMD_FLAG_DF sent in ${state.contentChunks} chunks`);
      }
      if (state.error === 0 && expect.type === P.CMD_BLOCK_STATUS && state.blockStatusChunks !== 1) {
        throw new CheckFailure(`successful block status with ${state.blockStatusChunks} block status chunks`);
      }
      this.complete(state);
    }
  }

  /** For the read-only export, data must match its content, holes must read as zeroes. */
  private checkData(expect: RequestExpect, offset: number, data: Buffer | undefined, holeBytes = 0): void {
    if (this.context.spec.kind !== 'ro') return;
    if (data) {
      if (!roContent.subarray(offset, offset + data.length).equals(data)) throw new CheckFailure(`read of [${offset}, +${data.length}) returned wrong data answering ${describeRequest(expect)}`);
    } else if (roContent.subarray(offset, offset + holeBytes).some((byte) => byte !== 0)) {
      throw new CheckFailure(`read reports a hole at [${offset}, +${holeBytes}) over data answering ${describeRequest(expect)}`);
    }
  }

  private complete(state: RequestState): void {
    const { expect } = state;
    const error = state.error!;
    if (expect.allowed !== 'any' && !expect.allowed.has(error)) {
      throw new CheckFailure(`${describeRequest(expect)} on '${this.context.spec.name}' (structured ${this.context.structured}) answered with error ${error}, expected ${allowedText(expect.allowed)}`);
    }
    this.pending.delete(expect.cookie);
    this.completed++;
    state.resolve?.({ error, ...(state.data ? { data: state.data } : {}), ...(state.extents ? { extents: state.extents } : {}) });
  }
}

/** Checks the server's side of a well-formed conversation, start to end. */
async function checkConversation(reader: Reader, plan: CheckedPlan, session: Session = { metaId: undefined }): Promise<void> {
  if (plan.greeting) await checkGreeting(reader);
  for (const option of plan.options) await checkOptionReplies(reader, option, session);
  const end = plan.end;
  switch (end.kind) {
    case 'serverCloses':
      await reader.expectClose('where the server must close');
      return;
    case 'abort': {
      if (await reader.need(1)) {
        await checkOptionReplies(reader, { option: P.OPT_ABORT, finals: [P.REP_ACK, ...[1, 2, 3, 4, 5, 6, 7, 8, 9].map((n) => REP_ERROR_BIT + n)] }, session);
      }
      await reader.expectClose('after NBD_OPT_ABORT');
      return;
    }
    case 'leave':
      return;
    case 'transmission': {
      if (end.exportName) {
        const reply = await reader.read(end.exportName.noZeroes ? 10 : 134, 'the NBD_OPT_EXPORT_NAME reply');
        checkExportInfo(reply.readBigUInt64BE(0), reply.readUInt16BE(8), end.context.spec);
        if (!end.exportName.noZeroes && reply.subarray(10).some((byte) => byte !== 0)) throw new CheckFailure('NBD_OPT_EXPORT_NAME padding is not zero');
      }
      const checker = new ReplyChecker(reader, end.context, session);
      for (const request of plan.requests) checker.register(request);
      await checker.run();
      if (plan.disc) await reader.expectClose('after NBD_CMD_DISC');
    }
  }
}

// -------------------------------------------------------------------- state

interface Memory {
  rss: number;
  heapUsed: number;
  arrayBuffers: number;
}

class MemorySampler {
  readonly baseline: Memory;
  peak: Memory;
  private readonly timer: NodeJS.Timeout;

  constructor() {
    this.baseline = this.sample();
    this.peak = { ...this.baseline };
    this.timer = setInterval(() => this.sample(), 20);
  }

  sample(): Memory {
    const usage = process.memoryUsage();
    const now = { rss: usage.rss, heapUsed: usage.heapUsed, arrayBuffers: usage.arrayBuffers };
    if (this.peak) {
      this.peak.rss = Math.max(this.peak.rss, now.rss);
      this.peak.heapUsed = Math.max(this.peak.heapUsed, now.heapUsed);
      this.peak.arrayBuffers = Math.max(this.peak.arrayBuffers, now.arrayBuffers);
    }
    return now;
  }

  stop(): void {
    clearInterval(this.timer);
    this.sample();
  }
}

function mb(bytes: number): string {
  return `${(bytes / MiB).toFixed(1)} MiB`;
}

interface Fixture {
  server: NbdServer;
  /** Which case each TCP client port carried, to name a connection the server keeps. */
  ports: Map<number, string>;
  tcp: Target;
  unix: Target;
  pool: Buffer;
  failures: string[];
  cases: Record<string, number>;
}

function fail(fixture: Fixture, where: string, error: unknown): void {
  const message = error instanceof CheckFailure ? error.message : error instanceof Error ? error.stack ?? error.message : String(error);
  fixture.failures.push(`${where}: ${message}`);
}

function count(fixture: Fixture, kind: string, cases: number): void {
  fixture.cases[kind] = (fixture.cases[kind] ?? 0) + cases;
}

function casesTotal(fixture: Fixture): number {
  return Object.values(fixture.cases).reduce((sum, value) => sum + value, 0);
}

/** Runs `body` on one connection; a connection not closed within the bound is a hang. */
async function withConnection(fixture: Fixture, where: string, target: Target, body: (socket: net.Socket, reader: Reader) => Promise<void>, options: { allowHalfOpen?: boolean } = {}): Promise<void> {
  let socket: net.Socket;
  try {
    socket = await connect(target, options);
  } catch (error) {
    fail(fixture, where, error);
    return;
  }
  if (socket.localPort !== undefined) fixture.ports.set(socket.localPort, where);
  const reader = new Reader(socket);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    fail(fixture, where, new CheckFailure(`hang: not finished and not closed by the server after ${connectionMsMax} ms (${reader.length} bytes unread, ended ${reader.ended})`));
    socket.destroy();
  }, connectionMsMax);
  try {
    await body(socket, reader);
    await closed(socket);
  } catch (error) {
    if (!timedOut) fail(fixture, where, error);
    socket.destroy();
  } finally {
    clearTimeout(timer);
  }
}

/** The state of connections a server still holds, read from its internals, to explain a leak. */
function describeConnections(server: NbdServer, ports: Map<number, string>): string {
  const connections = (server as unknown as { connections: Set<Record<string, unknown>> }).connections;
  return [...connections]
    .map((connection) => {
      const raw = connection['raw'] as net.Socket;
      const socket = connection['socket'] as net.Socket;
      const queue = connection['queue'] as { length: number };
      const fields = ['id', 'phase', 'readPaused', 'inFlightCount', 'inFlightBytes', 'disconnectRequested', 'discardBytesLeft', 'tlsActive'].map((key) => `${key}=${String(connection[key])}`);
      const state = `queue=${queue.length} destroyed=${socket.destroyed} flowing=${String(socket.readableFlowing)} readableEnded=${socket.readableEnded} writableEnded=${socket.writableEnded} writableLength=${socket.writableLength}`;
      const origin = raw.remotePort !== undefined ? ports.get(raw.remotePort) ?? `port ${raw.remotePort}` : 'unix socket';
      return `{${fields.join(' ')} ${state}} from ${origin}`;
    })
    .join('; ');
}

// --------------------------------------------------------------- scenarios

type Kind = 'checked' | 'mutated' | 'random' | 'abrupt';

/** One connection of the random phase, fully determined by the seed and its number. */
async function fuzzConnection(fixture: Fixture, seed: number, index: number): Promise<void> {
  const rand = new Rand(mixSeed(seed, index));
  const kind = rand.weighted<Kind>([[50, 'checked'], [30, 'mutated'], [8, 'random'], [12, 'abrupt']]);
  const target = rand.chance(0.6) ? fixture.tcp : fixture.unix;
  const where = `connection ${index} (${kind}, ${'path' in target ? 'unix' : 'tcp'}; replay with LIFELINE_SEED=${seed} LIFELINE_FUZZ_ONLY=${index})`;
  switch (kind) {
    case 'checked': {
      const stream = genConversation(rand, fixture.pool);
      count(fixture, 'checked', stream.starts.length);
      const clientEnd = rand.chance(0.7) ? 'end' : 'destroy';
      await withConnection(fixture, where, target, async (socket, reader) => {
        const checking = checkConversation(reader, stream.plan);
        checking.catch(() => {}); // awaited below; the write may fail first
        await writeChunked(socket, stream.bytes, rand);
        await checking;
        // Conversations the server does not end itself are ended by the client.
        if (clientEnd === 'end') socket.end();
        else socket.destroy();
        if (!socket.destroyed) await reader.expectClose('after the client ended its side');
      });
      return;
    }
    case 'mutated':
    case 'abrupt': {
      const stream = genConversation(rand, fixture.pool);
      const bytes = kind === 'mutated' ? mutate(rand, stream.bytes, stream.starts) : stream.bytes;
      const cut = kind === 'abrupt' ? rand.int(bytes.length + 1) : bytes.length;
      count(fixture, kind, Math.max(1, stream.starts.filter((start) => start < cut).length));
      await withConnection(fixture, where, target, async (socket) => {
        socket.resume(); // replies are read and dropped
        await writeChunked(socket, bytes, rand, cut);
        if (kind === 'abrupt') {
          if (rand.chance(0.5)) for (let i = rand.int(4); i > 0; i--) await immediate();
          if (rand.chance(0.3) && !('path' in target)) socket.resetAndDestroy();
          else socket.destroy();
        } else {
          socket.end(); // the server must finish (or give up) and close
        }
      });
      return;
    }
    default: {
      // Random bytes, after nothing, after the flags, or after a handshake.
      const prefix = new StreamBuilder();
      const where2 = rand.int(3);
      if (where2 >= 1) prefix.message(u32(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES));
      if (where2 === 2) prefix.message(encodeOption(P.OPT_EXPORT_NAME, Buffer.from(rand.pick(exportSpecs).name)));
      const tail = rand.chance(0.5) ? rand.bytes(rand.between(1, 64)) : rand.bytes(rand.between(65, 8192));
      if (where2 === 2 && rand.chance(0.5) && tail.length >= 4) tail.writeUInt32BE(P.REQUEST_MAGIC, 0);
      if (where2 === 1 && rand.chance(0.5) && tail.length >= 8) tail.writeBigUInt64BE(P.IHAVEOPT, 0);
      prefix.message(tail);
      count(fixture, 'random', prefix.starts.length);
      await withConnection(fixture, where, target, async (socket) => {
        socket.resume();
        await writeChunked(socket, prefix.bytes(), rand);
        socket.end();
      });
    }
  }
}

/** After NBD_CMD_DISC, bytes the client goes on sending must not pile up in the server. */
async function floodAfterDisconnect(fixture: Fixture, memory: MemorySampler): Promise<string> {
  let growth = 0;
  await withConnection(fixture, 'flood after NBD_CMD_DISC', fixture.tcp, async (socket, reader) => {
    socket.write(Buffer.concat([u32(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES), encodeOption(P.OPT_EXPORT_NAME, Buffer.from('disk0')), encodeRequest(0, P.CMD_DISC, 1n, 0n, 0)]));
    await reader.read(28, 'the handshake');
    const junk = Buffer.alloc(MiB, 0x55);
    const before = memory.sample().rss;
    for (let sent = 0; sent < floodBytes && !socket.destroyed; sent += junk.length) {
      if (!socket.write(junk)) await drained(socket);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
    growth = memory.sample().rss - before;
    socket.end();
  }, { allowHalfOpen: true });
  count(fixture, 'special', 2);
  if (growth > floodRssGrowthBytesMax) fail(fixture, 'flood after NBD_CMD_DISC', new CheckFailure(`resident set grew by ${mb(growth)} while the client sent ${mb(floodBytes)} after NBD_CMD_DISC (bound ${mb(floodRssGrowthBytesMax)})`));
  return `flood after DISC: rss +${mb(growth)}`;
}

/** Waits until the server holds no connection; false after the bound. */
async function serverIdle(server: NbdServer | undefined, msMax = 10_000): Promise<boolean> {
  const deadline = Date.now() + msMax;
  while ((server?.connectionCount ?? 0) > 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
  return (server?.connectionCount ?? 0) === 0;
}

/**
 * The server stops reading while a large option arrives; the options after it
 * end the handshake (NBD_OPT_ABORT, an unknown NBD_OPT_EXPORT_NAME) with more
 * bytes behind them. Once the client has gone the server must let go too, not
 * hold the connection until its handshake timeout.
 */
async function closeWhilePaused(fixture: Fixture): Promise<string> {
  for (const [option, name] of [[P.OPT_ABORT, ''], [P.OPT_EXPORT_NAME, 'nope']] as const) {
    const where = `graceful close with reading paused (option ${option})`;
    await withConnection(fixture, where, fixture.tcp, async (socket) => {
      socket.resume();
      const infoBytes = 60_000;
      socket.write(Buffer.concat([u32(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES), encodeOption(P.OPT_INFO, Buffer.alloc(0), infoBytes), Buffer.alloc(infoBytes / 2)]));
      await new Promise((resolve) => setTimeout(resolve, 50));
      socket.write(Buffer.concat([Buffer.alloc(infoBytes / 2), encodeOption(option, Buffer.from(name)), Buffer.alloc(400_000)]));
    });
    count(fixture, 'special', 3);
    if (!(await serverIdle(fixture.server, 5_000))) fail(fixture, where, new CheckFailure(`the client is gone but the server still holds: ${describeConnections(fixture.server, fixture.ports)}`));
  }
  return 'graceful close with reading paused: checked';
}

/** A huge option is skipped, not buffered. */
async function hugeOptionSkipped(fixture: Fixture, memory: MemorySampler): Promise<string> {
  let growth = 0;
  await withConnection(fixture, 'huge option', fixture.unix, async (socket) => {
    socket.write(Buffer.concat([u32(P.FLAG_C_FIXED_NEWSTYLE), encodeOption(P.OPT_LIST, Buffer.alloc(0), 0xfffffff0)]));
    const junk = Buffer.alloc(MiB, 0x33);
    const before = memory.sample().rss;
    for (let sent = 0; sent < 128 * MiB && !socket.destroyed; sent += junk.length) {
      if (!socket.write(junk)) await drained(socket);
    }
    growth = memory.sample().rss - before;
    socket.end();
  });
  count(fixture, 'special', 2);
  if (growth > floodRssGrowthBytesMax) fail(fixture, 'huge option', new CheckFailure(`resident set grew by ${mb(growth)} while skipping a 4 GiB option (bound ${mb(floodRssGrowthBytesMax)})`));
  return `huge option: rss +${mb(growth)}`;
}

/** More options than the server allows on one connection: it must cut the client off. */
async function tooManyOptions(fixture: Fixture): Promise<string> {
  const total = optionsPerConnectionMax + 500;
  let acks = 0;
  await withConnection(fixture, 'too many options', fixture.tcp, async (socket, reader) => {
    const one = encodeOption(P.OPT_STRUCTURED_REPLY, Buffer.alloc(0));
    const bytes = Buffer.concat([u32(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES), ...Array.from({ length: total }, () => one)]);
    const reading = (async () => {
      await checkGreeting(reader);
      while (await reader.need(20)) {
        const header = reader.take(20);
        if (header.readBigUInt64BE(0) !== P.OPTION_REPLY_MAGIC) throw new CheckFailure('bad option reply magic');
        await reader.read(header.readUInt32BE(16), 'option reply payload');
        acks++;
      }
    })();
    await writeChunked(socket, bytes, new Rand(7));
    await reading;
  });
  count(fixture, 'special', total);
  if (acks > optionsPerConnectionMax) fail(fixture, 'too many options', new CheckFailure(`${acks} options answered, the limit is ${optionsPerConnectionMax}`));
  return `too many options: ${acks} answered then closed`;
}

async function transmissionSession(socket: net.Socket, reader: Reader, exportName: string, structured: boolean): Promise<ReplyChecker> {
  const spec = findExportSpec(Buffer.from(exportName))!;
  const session: Session = { metaId: undefined };
  const out = new StreamBuilder();
  out.message(u32(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES));
  const plan: CheckedPlan = { greeting: true, options: [], end: { kind: 'leave' }, requests: [], disc: false };
  const context: TransmissionContext = { spec, structured, blockStatus: structured };
  if (structured) {
    out.message(encodeOption(P.OPT_STRUCTURED_REPLY, Buffer.alloc(0)));
    plan.options.push({ option: P.OPT_STRUCTURED_REPLY, finals: [P.REP_ACK] });
    out.message(encodeOption(P.OPT_SET_META_CONTEXT, metaPayload(Buffer.from(exportName), [Buffer.from('base:allocation')])));
    plan.options.push({ option: P.OPT_SET_META_CONTEXT, finals: [P.REP_ACK], meta: { set: true, context: true } });
  }
  out.message(encodeOption(P.OPT_GO, infoPayload(Buffer.from(exportName), [P.INFO_BLOCK_SIZE])));
  plan.options.push({ option: P.OPT_GO, finals: [P.REP_ACK], info: spec, go: context });
  socket.write(out.bytes());
  await checkConversation(reader, plan, session);
  return new ReplyChecker(reader, context, session);
}

function sendRequest(socket: net.Socket, checker: ReplyChecker, context: TransmissionContext, request: { type: number; flags?: number; offset: number; lengthBytes: number; data?: Buffer; allowed?: Allowed; keep?: boolean }, cookie: bigint): Promise<RequestResult> {
  const flags = request.flags ?? 0;
  const expect: RequestExpect = {
    cookie,
    type: request.type,
    flags,
    offset: BigInt(request.offset),
    lengthBytes: request.lengthBytes,
    allowed: request.allowed ?? allowedOutcome(context, request.type, flags, BigInt(request.offset), request.lengthBytes),
    keep: request.keep ?? false,
  };
  const result = checker.expect(expect);
  socket.write(encodeRequest(flags, request.type, cookie, BigInt(request.offset), request.lengthBytes));
  if (request.data) socket.write(request.data);
  return result;
}

/** Payloads at and over the limit: the oversized one is skipped and refused, and the stream stays in step. */
async function bigPayloads(fixture: Fixture): Promise<string> {
  await withConnection(fixture, 'big payloads', fixture.tcp, async (socket, reader) => {
    const checker = await transmissionSession(socket, reader, 'disk0', false);
    const context: TransmissionContext = { spec: exportSpecs[0]!, structured: false, blockStatus: false };
    const running = checker.run(true);
    const ended = running.then(() => {
      throw new CheckFailure('the server closed early');
    });
    ended.catch(() => {});
    const zeros = Buffer.alloc(MiB);
    const results: Promise<RequestResult>[] = [];
    for (const [cookie, lengthBytes, offset] of [[1n, payloadBytesMax + 1, 0], [2n, payloadBytesMax, 4096]] as const) {
      const done = checker.expect({ cookie, type: P.CMD_WRITE, flags: 0, offset: BigInt(offset), lengthBytes, allowed: allowedOutcome(context, P.CMD_WRITE, 0, BigInt(offset), lengthBytes) });
      results.push(done);
      socket.write(encodeRequest(0, P.CMD_WRITE, cookie, BigInt(offset), lengthBytes));
      for (let sent = 0; sent < lengthBytes; sent += zeros.length) {
        if (!socket.write(zeros.subarray(0, Math.min(zeros.length, lengthBytes - sent)))) await drained(socket);
      }
    }
    results.push(sendRequest(socket, checker, context, { type: P.CMD_READ, offset: 0, lengthBytes: 4096 }, 3n));
    await Promise.race([Promise.all(results), ended]);
    socket.end();
    await running;
  });
  count(fixture, 'special', 3);
  return 'big payloads: checked';
}

/** A client that stops reading while asking for far more than the buffer limit: the server must pause, then finish. */
async function slowReader(fixture: Fixture): Promise<string> {
  const readCount = 128;
  await withConnection(fixture, 'slow reader', fixture.unix, async (socket, reader) => {
    const checker = await transmissionSession(socket, reader, 'disk0', false);
    const context: TransmissionContext = { spec: exportSpecs[0]!, structured: false, blockStatus: false };
    const results: Promise<RequestResult>[] = [];
    socket.pause();
    for (let i = 0; i < readCount; i++) results.push(sendRequest(socket, checker, context, { type: P.CMD_READ, offset: 512, lengthBytes: MiB }, BigInt(i + 1)));
    await new Promise((resolve) => setTimeout(resolve, 300));
    socket.resume();
    await Promise.all([checker.run(), ...results]);
    socket.end();
  });
  count(fixture, 'special', readCount);
  return `slow reader: ${readCount} reads of 1 MiB`;
}

/** A well-formed client still gets correct answers after the fuzzing. */
async function sanityClient(fixture: Fixture, rand: Rand): Promise<void> {
  await withConnection(fixture, 'sanity client (disk0)', fixture.tcp, async (socket, reader) => {
    const checker = await transmissionSession(socket, reader, 'disk0', true);
    const context: TransmissionContext = { spec: exportSpecs[0]!, structured: true, blockStatus: true };
    const running = checker.run(true);
    const ended = running.then((): never => {
      throw new CheckFailure('the server closed early');
    });
    ended.catch(() => {});
    let cookie = 100n;
    const send = (request: Parameters<typeof sendRequest>[3]): Promise<RequestResult> => Promise.race([sendRequest(socket, checker, context, request, cookie++), ended]);
    const data = rand.bytes(3 * 4096);
    const offset = 40 * 4096;
    assert.equal((await send({ type: P.CMD_WRITE, offset, lengthBytes: data.length, data })).error, 0);
    const readBack = await send({ type: P.CMD_READ, offset, lengthBytes: data.length, keep: true });
    assert.equal(readBack.error, 0);
    assert.ok(readBack.data!.equals(data), 'data written is read back');
    const status = await send({ type: P.CMD_BLOCK_STATUS, offset, lengthBytes: data.length });
    assert.equal(status.extents![0]!.flags & P.STATE_HOLE, 0, 'written range is allocated');
    assert.equal((await send({ type: P.CMD_WRITE_ZEROES, flags: P.CMD_FLAG_FUA, offset: offset + 4096, lengthBytes: 4096 })).error, 0);
    const zeroed = await send({ type: P.CMD_READ, offset, lengthBytes: data.length, keep: true });
    assert.ok(zeroed.data!.subarray(4096, 8192).every((byte) => byte === 0), 'zeroed range reads as zeroes');
    assert.ok(zeroed.data!.subarray(0, 4096).equals(data.subarray(0, 4096)), 'neighbouring data is untouched');
    assert.equal((await send({ type: P.CMD_FLUSH, offset: 0, lengthBytes: 0 })).error, 0);
    assert.equal((await send({ type: P.CMD_READ, offset: exportSpecs[0]!.sizeBytes, lengthBytes: 1 })).error, P.NBD_EINVAL);
    socket.write(encodeRequest(0, P.CMD_DISC, cookie, 0n, 0));
    await running;
    await reader.expectClose('after NBD_CMD_DISC');
  });
  await withConnection(fixture, 'sanity client (ro)', fixture.unix, async (socket, reader) => {
    const plan: CheckedPlan = {
      greeting: true,
      options: [],
      end: { kind: 'transmission', context: { spec: exportSpecs[1]!, structured: false, blockStatus: false }, exportName: { noZeroes: false } },
      requests: [{ cookie: 1n, type: P.CMD_READ, flags: 0, offset: 0n, lengthBytes: roContent.length, allowed: new Set([0]) }, { cookie: 2n, type: P.CMD_WRITE, flags: 0, offset: 0n, lengthBytes: 1, allowed: new Set([P.NBD_EPERM]) }],
      disc: true,
    };
    socket.write(Buffer.concat([u32(P.FLAG_C_FIXED_NEWSTYLE), encodeOption(P.OPT_EXPORT_NAME, Buffer.from('ro')), encodeRequest(0, P.CMD_READ, 1n, 0n, roContent.length), encodeRequest(0, P.CMD_WRITE, 2n, 0n, 1), Buffer.alloc(1), encodeRequest(0, P.CMD_DISC, 3n, 0n, 0)]));
    await checkConversation(reader, plan);
  });
}

// -------------------------------------------------------------------- TLS

function makeCertificate(dir: string): { cert: Buffer; key: Buffer } | undefined {
  try {
    execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2', '-subj', '/CN=localhost', '-keyout', path.join(dir, 'key.pem'), '-out', path.join(dir, 'cert.pem')], { stdio: 'ignore', timeout: 20_000 });
    return { cert: fs.readFileSync(path.join(dir, 'cert.pem')), key: fs.readFileSync(path.join(dir, 'key.pem')) };
  } catch {
    return undefined;
  }
}

async function upgrade(socket: net.Socket): Promise<tls.TLSSocket> {
  const secure = tls.connect({ socket, rejectUnauthorized: false });
  secure.on('error', () => {});
  await new Promise<void>((resolve, reject) => {
    secure.once('secureConnect', () => resolve());
    secure.once('close', () => reject(new CheckFailure('TLS handshake failed')));
  });
  return secure;
}

/** A few cases over STARTTLS on a server that requires TLS. */
async function tlsCases(fixture: Fixture, target: Target, seed: number): Promise<string> {
  const connections = 24;
  for (let index = onlyTlsConnection ?? 0; index < (onlyTlsConnection ?? connections - 1) + 1; index++) {
    const rand = new Rand(mixSeed(seed ^ 0x7175, index));
    const kind = index === 0 ? 'closeAfterOptions' : rand.weighted<string>([[10, 'conversation'], [3, 'garbage'], [2, 'pipelined'], [2, 'exportName'], [2, 'dropped']]);
    const where = `TLS connection ${index} (${kind}; replay with LIFELINE_SEED=${seed} LIFELINE_FUZZ_ONLY=tls:${index})`;
    await withConnection(fixture, where, target, async (socket, reader) => {
      const before = new StreamBuilder();
      before.message(u32(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES));
      const refused: OptionExpect[] = [];
      for (let i = rand.int(4); i > 0; i--) {
        const option = rand.pick([P.OPT_LIST, P.OPT_INFO, P.OPT_GO, P.OPT_STRUCTURED_REPLY, P.OPT_SET_META_CONTEXT, 99]);
        before.message(encodeOption(option, option === P.OPT_INFO || option === P.OPT_GO ? infoPayload(Buffer.from('disk0'), []) : Buffer.alloc(0)));
        refused.push({ option, finals: option === 99 ? [P.REP_ERR_TLS_REQD, P.REP_ERR_UNSUP] : [P.REP_ERR_TLS_REQD] });
      }
      count(fixture, 'tls', before.starts.length + 1);
      if (kind === 'exportName') {
        before.message(encodeOption(P.OPT_EXPORT_NAME, Buffer.from('disk0')));
        socket.write(before.bytes());
        await checkConversation(reader, { greeting: true, options: refused, end: { kind: 'serverCloses' }, requests: [], disc: false });
        return;
      }
      before.message(encodeOption(P.OPT_STARTTLS, Buffer.alloc(0)));
      if (kind === 'pipelined') {
        before.raw(rand.bytes(rand.between(1, 300)));
        socket.resume();
        socket.write(before.bytes());
        socket.end();
        return;
      }
      socket.write(before.bytes());
      await checkConversation(reader, { greeting: true, options: [...refused, { option: P.OPT_STARTTLS, finals: [P.REP_ACK] }], end: { kind: 'leave' }, requests: [], disc: false });
      socket.removeAllListeners('data');
      socket.removeAllListeners('end');
      if (kind === 'garbage') {
        socket.resume();
        socket.write(rand.bytes(rand.between(1, 2000)));
        socket.end();
        return;
      }
      if (kind === 'dropped') {
        const secure = tls.connect({ socket, rejectUnauthorized: false });
        secure.on('error', () => {});
        await immediate();
        socket.destroy();
        return;
      }
      const secure = await upgrade(socket);
      const inner = new Reader(secure);
      if (kind === 'closeAfterOptions') {
        // Replies to options sent ahead of an unknown export name must not be lost when the server closes.
        secure.write(Buffer.concat([encodeOption(P.OPT_LIST, Buffer.alloc(0)), encodeOption(P.OPT_STRUCTURED_REPLY, Buffer.alloc(0)), encodeOption(99, Buffer.alloc(0)), encodeOption(P.OPT_EXPORT_NAME, Buffer.from('nope'))]));
        count(fixture, 'tls', 4);
        await checkConversation(inner, {
          greeting: false,
          options: [{ option: P.OPT_LIST, finals: [P.REP_ACK], list: true }, { option: P.OPT_STRUCTURED_REPLY, finals: [P.REP_ACK] }, { option: 99, finals: [P.REP_ERR_UNSUP] }],
          end: { kind: 'serverCloses' },
          requests: [],
          disc: false,
        });
        return;
      }
      const stream = genConversation(rand, fixture.pool, { afterTls: true, noZeroes: true });
      count(fixture, 'tls', stream.starts.length);
      const checking = checkConversation(inner, stream.plan);
      checking.catch(() => {});
      secure.write(stream.bytes);
      await checking;
      secure.end();
      await inner.expectClose('after the client ended its side (TLS)');
    });
  }
  return `${connections} TLS connections`;
}

// --------------------------------------------------------------------- test

test('nbd fuzz: random and mutated handshakes and requests neither crash, hang nor leak', { timeout: 300_000 }, async () => {
  const seed = testSeed('nbd fuzz');
  const started = Date.now();
  const problems: string[] = [];
  const onUncaught = (error: unknown): void => void problems.push(`uncaught exception: ${error instanceof Error ? error.stack : String(error)}`);
  const onRejection = (reason: unknown): void => void problems.push(`unhandled rejection: ${reason instanceof Error ? reason.stack : String(reason)}`);
  const onWarning = (warning: Error): void => {
    if (warning.name === 'MaxListenersExceededWarning') problems.push(`listener leak: ${warning.message}`);
  };
  process.on('uncaughtException', onUncaught);
  process.on('unhandledRejection', onRejection);
  process.on('warning', onWarning);
  const dir = makeTempDir('lifeline-fuzz-');
  const memory = new MemorySampler();
  const consumers = exportSpecs.map(() => new CountingConsumer());
  const taps: Tap[] = [];
  const roInner = new MemoryBackingStore(roContent.length, { readOnly: true });
  for (let block = 0; block * 4096 < roContent.length; block++) {
    if (roBlockHasData(block)) await roInner.write(roContent.subarray(block * 4096, (block + 1) * 4096), block * 4096);
  }
  const inners: BackingStore[] = [new MemoryBackingStore(exportSpecs[0]!.sizeBytes), roInner, new FlakyStore(exportSpecs[2]!.sizeBytes)];
  const exports = exportSpecs.map((spec, i) => {
    const tap = new Tap(inners[i]!, { volume: spec.name, consumer: consumers[i]! });
    taps.push(tap);
    return { name: spec.name, store: tap, ...(exportDescriptions[spec.name] ? { description: exportDescriptions[spec.name] } : {}) };
  });
  const logger = process.env.LIFELINE_FUZZ_LOG ? createLogger({ level: 'debug', format: 'text' }) : silentLogger;
  const server = new NbdServer({ exports, logger });
  const tcpAddress = (await server.listen({ host: '127.0.0.1', port: 0 })) as net.AddressInfo;
  const socketPath = path.join(dir, 'nbd.sock');
  await server.listen({ socketPath });
  const poolRand = new Rand(seed ^ 0x5eed);
  const fixture: Fixture = {
    server,
    tcp: { host: '127.0.0.1', port: tcpAddress.port },
    unix: { path: socketPath },
    pool: poolRand.bytes(2 * MiB),
    failures: [],
    cases: {},
    ports: new Map(),
  };
  const notes: string[] = [];
  let fuzzPeakRss = memory.baseline.rss;
  let tlsServer: NbdServer | undefined;
  try {
    // Random phase: many connections in parallel until the case budget is spent.
    let next = 0;
    let connections = 0;
    const worker = async (): Promise<void> => {
      while (casesTotal(fixture) < casesTarget && fixture.failures.length < 10 && problems.length === 0) {
        const index = next++;
        connections++;
        await fuzzConnection(fixture, seed, index);
      }
    };
    if (onlyConnection !== undefined) {
      await fuzzConnection(fixture, seed, onlyConnection);
      connections = 1;
    } else if (onlyTlsConnection === undefined) {
      await Promise.all(Array.from({ length: parallelConnections }, worker));
    }
    fuzzPeakRss = memory.peak.rss;
    // The random phase is shorter than the handshake timeout: a connection the server keeps after its client left is still here.
    if (!(await serverIdle(server))) fail(fixture, 'after the random phase', new CheckFailure(`every client is gone but the server still holds: ${describeConnections(server, fixture.ports)}`));
    notes.push(`random phase: ${connections} connections, ${casesTotal(fixture)} cases in ${Date.now() - started} ms, rss peak ${mb(fuzzPeakRss)} (+${mb(fuzzPeakRss - memory.baseline.rss)}, bound +${mb(fuzzRssGrowthBytesMax)})`);

    // Targeted cases: resource limits and back-pressure.
    if (onlyConnection === undefined) {
      if (onlyTlsConnection === undefined) notes.push(await floodAfterDisconnect(fixture, memory));
      if (onlyTlsConnection === undefined) notes.push(await closeWhilePaused(fixture));
      if (onlyTlsConnection === undefined) notes.push(await hugeOptionSkipped(fixture, memory));
      if (onlyTlsConnection === undefined) notes.push(await tooManyOptions(fixture));
      if (onlyTlsConnection === undefined) notes.push(await bigPayloads(fixture));
      if (onlyTlsConnection === undefined) notes.push(await slowReader(fixture));
      const certificate = makeCertificate(dir);
      if (certificate) {
        tlsServer = new NbdServer({ exports, logger, tls: { ...certificate, required: true } });
        const tlsAddress = (await tlsServer.listen({ host: '127.0.0.1', port: 0 })) as net.AddressInfo;
        notes.push(await tlsCases(fixture, { host: '127.0.0.1', port: tlsAddress.port }, seed));
      } else {
        notes.push('TLS cases skipped: openssl is not available');
      }
    }

    // The server still serves a well-formed client correctly.
    await sanityClient(fixture, new Rand(seed ^ 0xc1e7));

    // Every connection is gone once its client is.
    await serverIdle(server);
    await serverIdle(tlsServer);
    assert.equal(server.connectionCount, 0, `the server still holds connections after every client closed: ${describeConnections(server, fixture.ports)}`);
    assert.equal(tlsServer?.connectionCount ?? 0, 0, 'the TLS server still counts connections after every client closed');

    // Shutting down with clients mid-handshake and mid-request completes.
    const idle = await Promise.all([connect(fixture.tcp), connect(fixture.unix), connect(fixture.tcp)]);
    idle[1]!.write(Buffer.concat([u32(P.FLAG_C_FIXED_NEWSTYLE), encodeOption(P.OPT_EXPORT_NAME, Buffer.from('disk0'))]));
    idle[2]!.write(Buffer.concat([u32(P.FLAG_C_FIXED_NEWSTYLE), encodeOption(P.OPT_EXPORT_NAME, Buffer.from('disk0')), encodeRequest(0, P.CMD_WRITE, 1n, 0n, 65536), Buffer.alloc(100)]));
    for (const socket of idle) socket.resume();
    await new Promise((resolve) => setTimeout(resolve, 50));
    const closing = Promise.all([server.close(), tlsServer?.close()]);
    const shutdownTimer = new Promise<'timeout'>((resolve) => setTimeout(() => resolve('timeout'), 20_000).unref());
    assert.notEqual(await Promise.race([closing.then(() => 'closed' as const), shutdownTimer]), 'timeout', 'server.close() did not finish with clients connected');
    assert.equal(server.connectionCount, 0);
    for (const socket of idle) socket.destroy();
  } finally {
    memory.stop();
    await server.close();
    await tlsServer?.close();
    process.off('uncaughtException', onUncaught);
    process.off('unhandledRejection', onRejection);
    process.off('warning', onWarning);
    fs.rmSync(dir, { recursive: true, force: true });
  }

  // The tap delivered every mutation it accepted, in order.
  for (const [i, tap] of taps.entries()) {
    assert.equal(consumers[i]!.counts.sequenceLast, tap.sequenceDeliveredLast, `tap of '${exportSpecs[i]!.name}' delivered in order`);
  }
  const peak = memory.peak;
  const elapsed = Date.now() - started;
  console.log(`# nbd fuzz: ${casesTotal(fixture)} cases (${Object.entries(fixture.cases).map(([kind, n]) => `${kind} ${n}`).join(', ')}) in ${elapsed} ms`);
  for (const note of notes) console.log(`# nbd fuzz: ${note}`);
  console.log(`# nbd fuzz: memory peak rss ${mb(peak.rss)} (+${mb(peak.rss - memory.baseline.rss)}, bound +${mb(rssGrowthBytesMax)}), heap ${mb(peak.heapUsed)} (bound ${mb(heapUsedBytesMax)}), array buffers ${mb(peak.arrayBuffers)}`);
  console.log(`# nbd fuzz: tap events ${consumers.map((consumer, i) => `${exportSpecs[i]!.name}=${consumer.counts.events}`).join(' ')}`);
  assert.deepEqual(problems, [], 'no uncaught exception, unhandled rejection or listener leak');
  assert.deepEqual(fixture.failures.slice(0, 10), [], `${fixture.failures.length} failures`);
  if (onlyText === undefined) assert.ok(casesTotal(fixture) >= casesTarget, `ran ${casesTotal(fixture)} cases, wanted ${casesTarget}`);
  assert.ok(fuzzPeakRss - memory.baseline.rss <= fuzzRssGrowthBytesMax, `resident set grew by ${mb(fuzzPeakRss - memory.baseline.rss)} in the random phase`);
  assert.ok(peak.rss - memory.baseline.rss <= rssGrowthBytesMax, `resident set grew by ${mb(peak.rss - memory.baseline.rss)}`);
  assert.ok(peak.heapUsed <= heapUsedBytesMax, `heap reached ${mb(peak.heapUsed)}`);
});
