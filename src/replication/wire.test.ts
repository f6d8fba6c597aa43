import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { testSeed } from '../../test/helpers.js';
import {
  blockSumBytes,
  blockSums,
  decodeAck,
  decodeSums,
  decodeSumsRequest,
  encodeSums,
  encodeSumsRequest,
  decodeBatchBody,
  decodeBatchHeader,
  decodeHello,
  decodeWelcome,
  encodeAck,
  encodeBatchBody,
  encodeBatchHeader,
  encodeFrame,
  encodeJson,
  FrameReader,
  frameHeaderBytes,
  protocolVersion,
  WireProtocolError,
  type StreamEntry,
} from './wire.js';

const entryArbitrary = fc.oneof(
  fc.record({ kind: fc.constant('write' as const), volume: fc.integer({ min: 0, max: 0xffff }), offset: fc.integer({ min: 0, max: 2 ** 40 }), data: fc.uint8Array({ minLength: 1, maxLength: 3000 }), timeMs: fc.integer({ min: 0, max: 2 ** 45 }) }),
  fc.record({ kind: fc.constantFrom('zero' as const, 'trim' as const), volume: fc.integer({ min: 0, max: 0xffff }), offset: fc.integer({ min: 0, max: 2 ** 40 }), lengthBytes: fc.integer({ min: 1, max: 2 ** 31 }), timeMs: fc.integer({ min: 0, max: 2 ** 45 }) }),
);

type RawEntry = typeof entryArbitrary extends fc.Arbitrary<infer T> ? T : never;

function toEntries(raw: RawEntry[], sequenceFirst: number): StreamEntry[] {
  return raw.map((entry, index) => {
    if (entry.kind === 'write') {
      const data = Buffer.from(entry.data);
      return { sequence: sequenceFirst + index, kind: 'write', volume: entry.volume, offset: entry.offset, lengthBytes: data.length, timeMs: entry.timeMs, data };
    }
    return { sequence: sequenceFirst + index, kind: entry.kind, volume: entry.volume, offset: entry.offset, lengthBytes: entry.lengthBytes, timeMs: entry.timeMs };
  });
}

test('batches round-trip through frames split at any byte', () => {
  const seed = testSeed('wire round-trip');
  fc.assert(
    fc.property(fc.array(entryArbitrary, { minLength: 1, maxLength: 40 }), fc.integer({ min: 1, max: 2 ** 40 }), fc.integer({ min: 1, max: 97 }), (raw, sequenceFirst, splitBytes) => {
      const entries = toEntries(raw, sequenceFirst);
      const body = Buffer.concat(encodeBatchBody(entries));
      const header = encodeBatchHeader({ sequenceFirst, count: entries.length, codec: 'none', rawBytes: body.length });
      const wire = Buffer.concat(encodeFrame('batch', [header, body]));
      const reader = new FrameReader();
      const frames = [];
      for (let at = 0; at < wire.length; at += splitBytes) frames.push(...reader.push(wire.subarray(at, at + splitBytes)));
      assert.equal(frames.length, 1);
      const decoded = decodeBatchHeader(frames[0]!);
      assert.deepEqual(decodeBatchBody(decoded.header, decoded.body).map((entry) => (entry.data ? { ...entry, data: Buffer.from(entry.data) } : entry)), entries);
    }),
    { seed, numRuns: 300 },
  );
});

test('a damaged frame is refused by its CRC, its magic or its limits, never read out of bounds', () => {
  const seed = testSeed('wire damage');
  const entries: StreamEntry[] = [{ sequence: 5, kind: 'write', volume: 1, offset: 4096, lengthBytes: 8, timeMs: 1, data: Buffer.from('abcdefgh') }];
  const body = Buffer.concat(encodeBatchBody(entries));
  const wire = Buffer.concat(encodeFrame('batch', [encodeBatchHeader({ sequenceFirst: 5, count: 1, codec: 'none', rawBytes: body.length }), body]));
  fc.assert(
    fc.property(fc.integer({ min: 0, max: wire.length * 8 - 1 }), (bit) => {
      const damaged = Buffer.from(wire);
      damaged[bit >> 3]! ^= 1 << (bit & 7);
      const reader = new FrameReader();
      try {
        const frames = reader.push(damaged);
        // A flip in the length field may leave the reader waiting for more bytes: nothing is decoded.
        for (const frame of frames) {
          const decoded = decodeBatchHeader(frame);
          decodeBatchBody(decoded.header, decoded.body);
        }
        // Only a flip in the type byte can leave a well-formed frame (of another type).
        assert.ok(frames.length === 0 || (bit >= 8 * 4 && bit < 8 * 5), `bit ${bit} flipped and the frame was still accepted`);
      } catch (error) {
        assert.ok(error instanceof WireProtocolError, `bit ${bit}: ${(error as Error).message}`);
      }
    }),
    { seed, numRuns: 500 },
  );
});

test('hand-made bodies that lie about their sizes are refused', () => {
  const fixed = Buffer.alloc(32);
  fixed.writeUInt8(1, 0);
  fixed.writeUInt32LE(100, 4);
  fixed.writeUInt32LE(100, 24);
  assert.throws(() => decodeBatchBody({ sequenceFirst: 1, count: 1, codec: 'none', rawBytes: 32 }, fixed), /runs past the batch/);
  fixed.writeUInt32LE(0, 24);
  assert.throws(() => decodeBatchBody({ sequenceFirst: 1, count: 1, codec: 'none', rawBytes: 32 }, fixed), /0 data bytes for a length of 100/);
  fixed.writeUInt8(9, 0);
  assert.throws(() => decodeBatchBody({ sequenceFirst: 1, count: 1, codec: 'none', rawBytes: 32 }, fixed), /unknown kind 9/);
  assert.throws(() => decodeBatchBody({ sequenceFirst: 1, count: 2, codec: 'none', rawBytes: 32 }, Buffer.alloc(32)), /unknown kind 0/);
  const oversized = Buffer.alloc(frameHeaderBytes);
  oversized.writeUInt32LE(0x5052_4c4c, 0);
  oversized.writeUInt8(1, 4);
  oversized.writeUInt32LE(2 * 1024 * 1024, 8);
  assert.throws(() => new FrameReader().push(oversized), /over the limit/);
});

test('HELLO and ACK decode what was encoded and refuse malformed fields', () => {
  const hello = { protocolVersion, site: 'site-a', appliance: 'a1', group: 'pg1', epoch: 'e-1', sequenceBase: 0, volumes: [{ id: 0, name: 'disk0', sizeBytes: 1 << 20 }] };
  assert.deepEqual(decodeHello({ type: 'hello', payload: encodeJson(hello) }), hello);
  assert.throws(() => decodeHello({ type: 'hello', payload: encodeJson({ ...hello, group: '../x' }) }), /'group' is not a name/);
  assert.throws(() => decodeHello({ type: 'hello', payload: Buffer.from('{') }), /not valid JSON/);
  assert.throws(() => decodeHello({ type: 'hello', payload: encodeJson({ ...hello, sequenceBase: -1 }) }), /'sequenceBase'/);
  assert.deepEqual(decodeAck({ type: 'ack', payload: encodeAck({ sequenceDurable: 2 ** 40 + 3, timeMsDurable: 1234.5 }) }), { sequenceDurable: 2 ** 40 + 3, timeMsDurable: 1234.5 });
  assert.throws(() => decodeAck({ type: 'ack', payload: Buffer.alloc(15) }), /not 16/);
});

test('WELCOME decodes what was encoded, with and without an open sync window, and refuses a malformed window', () => {
  const welcome = { protocolVersion, epoch: 'e-1', sequenceDurable: 42, appliance: 'b1' };
  assert.deepEqual(decodeWelcome({ type: 'welcome', payload: encodeJson(welcome) }), welcome);
  const open = { ...welcome, syncWindowOpen: { sync: 'resync', beginTimeMs: 1_700_000_000_000 } };
  assert.deepEqual(decodeWelcome({ type: 'welcome', payload: encodeJson(open) }), open);
  assert.throws(() => decodeWelcome({ type: 'welcome', payload: encodeJson({ ...welcome, syncWindowOpen: true }) }), /'syncWindowOpen' is not an object/);
  assert.throws(() => decodeWelcome({ type: 'welcome', payload: encodeJson({ ...welcome, syncWindowOpen: { sync: 'resync', beginTimeMs: -1 } }) }), /'beginTimeMs' is not a time/);
});

test('checksum requests and answers decode what was encoded; block checksums see a change of one byte anywhere in a block', () => {
  const request = { requestId: 7, volume: 3, offset: 2 ** 33 + 65536, lengthBytes: 1 << 20, blockBytes: 65536 };
  assert.deepEqual(decodeSumsRequest({ type: 'sumsRequest', payload: encodeSumsRequest(request) }), request);
  assert.throws(() => decodeSumsRequest({ type: 'sumsRequest', payload: encodeSumsRequest({ ...request, blockBytes: 1000 }) }), /multiple of 512/);
  assert.throws(() => decodeSumsRequest({ type: 'sumsRequest', payload: encodeSumsRequest({ ...request, lengthBytes: 4097 * 512, blockBytes: 512 }) }), /at most 4096 blocks/);
  assert.throws(() => decodeSumsRequest({ type: 'sumsRequest', payload: Buffer.alloc(27) }), /not 28/);

  const data = Buffer.alloc(3 * 4096 + 100, 0x5a);
  const sums = blockSums(data, 4096);
  assert.equal(sums.length, 4 * blockSumBytes, 'the last, shorter block has a checksum too');
  const joined = (reply: ReturnType<typeof encodeSums>): Buffer => Buffer.concat(reply);
  assert.deepEqual(decodeSums({ type: 'sums', payload: joined(encodeSums({ requestId: 9, sums })) }), { requestId: 9, sums });
  assert.deepEqual(decodeSums({ type: 'sums', payload: joined(encodeSums({ requestId: 9, error: 'no view' })) }), { requestId: 9, error: 'no view' });
  assert.throws(() => decodeSums({ type: 'sums', payload: joined(encodeSums({ requestId: 9, sums })).subarray(0, 9 + 20) }), /says 4 checksums/);
  for (const at of [0, 4095, 4096, 2 * 4096 + 17, data.length - 1]) {
    const changed = Buffer.from(data);
    changed[at] ^= 1;
    const other = blockSums(changed, 4096);
    const block = Math.floor(at / 4096);
    for (let index = 0; index < 4; index++) {
      const same = other.subarray(index * blockSumBytes, (index + 1) * blockSumBytes).equals(sums.subarray(index * blockSumBytes, (index + 1) * blockSumBytes));
      assert.equal(same, index !== block, `byte ${at} changed: block ${index} ${same ? 'matches' : 'differs'}`);
    }
  }
});
