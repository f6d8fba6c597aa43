/**
 * Tests of batch compression (codec.ts) and of the native LZ4 block codec under it
 * (src/native/lz4_block.c):
 * - round trips of random, zero, repetitive, text-like and mixed data of many sizes, through the
 *   native calls and through compressBatch/decompressBatch with every codec;
 * - a fast-check property over data built from literals, runs and back-references;
 * - interoperation with the reference LZ4 (Debian's python3-lz4, liblz4 underneath): our blocks
 *   decode with it, and its blocks (fast, accelerated and high-compression modes) with ours;
 * - malformed input (truncated, bit-flipped, spliced, random, crafted lengths and offsets): the
 *   decoder throws or returns a count, agrees with a decoder written here from the format
 *   description, and writes nothing outside its target; the same cases run again through the C
 *   code built with AddressSanitizer, which catches any read or write out of bounds;
 * - the fallback to `none` and the CorruptBatchError of every codec.
 *
 * Seeds are printed; replay with LIFELINE_SEED. Cases of the malformed-input fuzz:
 * LIFELINE_CODEC_FUZZ_CASES (default 20000).
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import fc from 'fast-check';
import { native, isLz4MalformedError } from '../native/index.js';
import {
  batchRawBytesMax,
  codecNames,
  compressBatch,
  CorruptBatchError,
  decompressBatch,
  incompressibleRatioMin,
  lz4ProbeBatchBytesMin,
  lz4ProbeCounters,
  type CodecName,
} from './codec.js';
import { makeTempDir, prng, repositoryRoot, run, systemPython, testSeed } from '../../test/helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const fuzzCases = Number(process.env.LIFELINE_CODEC_FUZZ_CASES ?? 20_000);

const kinds = ['random', 'zero', 'repetitive', 'text', 'mixed'] as const;
type Kind = (typeof kinds)[number];
/** Sizes around the format's thresholds (4-byte matches, 5 last literals, 12-byte margin, 15-nibbles, 64 KiB window). */
const sizes = [
  0, 1, 2, 3, 4, 5, 11, 12, 13, 14, 15, 16, 17, 19, 31, 32, 33, 63, 64, 65, 100, 255, 256, 257, 1000, 4095, 4096, 4097,
  65535, 65536, 65537, 3 * 65536 + 5, MiB + 7, 4 * MiB,
];

const words = 'the of and disk volume block write journal replica offset sector checksum lifeline recovery point snapshot data zero trim flush a to in is that for it as with'.split(' ');

function makeData(kind: Kind, size: number, random: () => number): Buffer {
  const out = Buffer.alloc(size);
  if (kind === 'zero') return out;
  if (kind === 'random') {
    for (let i = 0; i < size; i++) out[i] = (random() * 256) | 0;
    return out;
  }
  if (kind === 'repetitive') {
    // A short pattern repeated, with a rare changed byte so that matches end at odd places.
    const period = 1 + ((random() * 40) | 0);
    for (let i = 0; i < size; i++) out[i] = i < period ? (random() * 256) | 0 : out[i - period]!;
    for (let i = 0; i < size / 500; i++) out[(random() * size) | 0] = (random() * 256) | 0;
    return out;
  }
  if (kind === 'text') {
    let at = 0;
    while (at < size) {
      const word = words[(random() * words.length) | 0]!;
      const separator = random() < 0.1 ? '.\n' : ' ';
      at += out.write(word + separator, at, 'latin1');
    }
    return out;
  }
  // Mixed: pieces of each kind, and copies of earlier content from near and far.
  let at = 0;
  while (at < size) {
    const length = Math.min(size - at, 16 + ((random() * 8192) | 0));
    const choice = random();
    if (choice < 0.2 && at > 0) {
      const from = Math.max(0, at - 1 - ((random() * 100_000) | 0));
      for (let i = 0; i < length; i++) out[at + i] = out[from + (i % (at - from))]!;
    } else {
      const pieceKind = kinds[(choice * 4) | 0]!;
      makeData(pieceKind === 'mixed' ? 'text' : pieceKind, length, random).copy(out, at);
    }
    at += length;
  }
  return out;
}

/** Splits data into 1 to 8 chunks at random points (some empty). */
function split(data: Buffer, random: () => number): Buffer[] {
  const count = 1 + ((random() * 8) | 0);
  const cuts = Array.from({ length: count - 1 }, () => (random() * (data.length + 1)) | 0).sort((a, b) => a - b);
  const chunks: Buffer[] = [];
  let from = 0;
  for (const cut of [...cuts, data.length]) {
    chunks.push(data.subarray(from, cut));
    from = cut;
  }
  return chunks;
}

function lz4Compress(data: Buffer): Buffer {
  const target = Buffer.alloc(native.lz4CompressBound(data.length));
  const written = native.lz4Compress(data, target);
  assert.ok(written > 0, `lz4Compress of ${data.length} bytes into its bound returned 0`);
  return target.subarray(0, written);
}

function lz4Decompress(block: Buffer, rawBytes: number): Buffer {
  const target = Buffer.alloc(rawBytes);
  assert.equal(native.lz4Decompress(block, target), rawBytes);
  return target;
}

/**
 * An LZ4 block decoder written from the format description, one byte at a time, as the oracle
 * of the fuzz test. It applies the same rules as the native decoder: input must end right after
 * the literals of a sequence, and every length and offset must stay inside the buffers. (Like
 * the native decoder it does not insist on the end-of-block margins, which only help fast
 * decoders.)
 */
function oracleDecompress(block: Uint8Array, targetBytes: number): Buffer | 'error' {
  if (block.length === 0) return 'error';
  const out = Buffer.alloc(targetBytes);
  let ip = 0;
  let op = 0;
  for (;;) {
    if (ip >= block.length) return 'error';
    const token = block[ip++]!;
    let literals = token >> 4;
    if (literals === 15) {
      for (;;) {
        if (ip >= block.length) return 'error';
        const more = block[ip++]!;
        literals += more;
        if (more !== 255) break;
      }
    }
    if (literals > block.length - ip || literals > targetBytes - op) return 'error';
    for (let i = 0; i < literals; i++) out[op++] = block[ip++]!;
    if (ip === block.length) return out.subarray(0, op);
    if (block.length - ip < 2) return 'error';
    const offset = block[ip]! | (block[ip + 1]! << 8);
    ip += 2;
    if (offset === 0 || offset > op) return 'error';
    let length = token & 15;
    if (length === 15) {
      for (;;) {
        if (ip >= block.length) return 'error';
        const more = block[ip++]!;
        length += more;
        if (more !== 255) break;
      }
    }
    length += 4;
    if (length > targetBytes - op) return 'error';
    for (let i = 0; i < length; i++, op++) out[op] = out[op - offset]!;
  }
}

test('lz4: round trips of random, zero, repetitive, text-like and mixed data of every size', () => {
  const seed = testSeed('lz4 round trips');
  const random = prng(seed);
  let cases = 0;
  for (const kind of kinds) {
    for (const size of sizes) {
      const data = makeData(kind, size, random);
      const block = lz4Compress(data);
      assert.ok(block.length <= native.lz4CompressBound(size));
      assert.ok(lz4Decompress(block, size).equals(data), `${kind} ${size}`);
      // A larger target: the same count, the same bytes.
      const roomy = Buffer.alloc(size + 100);
      assert.equal(native.lz4Decompress(block, roomy), size);
      assert.ok(roomy.subarray(0, size).equals(data));
      // A smaller target cannot hold the output.
      if (size > 0) assert.throws(() => native.lz4Decompress(block, Buffer.alloc(size - 1)), isLz4MalformedError);
      // The chunked variant compresses the concatenation to the same block, with or without a scratch buffer.
      const chunked = Buffer.alloc(native.lz4CompressBound(size));
      const written = native.lz4CompressChunks(split(data, random), chunked);
      assert.ok(chunked.subarray(0, written).equals(block), `chunked ${kind} ${size}`);
      const scratched = native.lz4CompressChunks(split(data, random), chunked, Buffer.alloc(size + 7));
      assert.ok(chunked.subarray(0, scratched).equals(block), `chunked with scratch ${kind} ${size}`);
      if (kind === 'zero' && size >= 4096) assert.ok(block.length < size / 100, `zeros compress: ${size} -> ${block.length}`);
      if (kind === 'random' && size >= 4096) assert.ok(block.length <= size + size / 255 + 16);
      cases++;
    }
  }
  console.log(`# lz4 round trips: ${cases} cases`);
});

test('lz4 native calls refuse overlapping buffers and a scratch buffer too small, and return 0 when the target is too small', () => {
  const arena = Buffer.alloc(1000, 7);
  assert.throws(() => native.lz4Compress(arena.subarray(0, 500), arena.subarray(400)), RangeError);
  assert.throws(() => native.lz4Decompress(arena.subarray(0, 500), arena.subarray(499)), RangeError);
  const chunks = [Buffer.alloc(300, 1), Buffer.alloc(300, 2)];
  assert.throws(() => native.lz4CompressChunks(chunks, Buffer.alloc(700), Buffer.alloc(599)), RangeError);
  assert.throws(() => native.lz4CompressChunks([arena.subarray(0, 100), arena.subarray(100, 200)], Buffer.alloc(300), arena.subarray(150, 400)), RangeError);
  // 600 bytes of two runs take about 20 bytes: 10 do not fit, 0 never does.
  assert.equal(native.lz4CompressChunks(chunks, Buffer.alloc(10)), 0);
  assert.equal(native.lz4Compress(Buffer.alloc(0), Buffer.alloc(0)), 0);
  assert.equal(native.lz4Compress(Buffer.alloc(0), Buffer.alloc(1)), 1);
  assert.throws(() => native.lz4CompressBound(-1), RangeError);
});

test('compressBatch/decompressBatch: every codec round-trips every kind and size of batch, split in chunks', () => {
  const seed = testSeed('batch round trips');
  const random = prng(seed);
  const used: Record<string, number> = {};
  for (const kind of kinds) {
    for (const size of sizes) {
      const data = makeData(kind, size, random);
      for (const codec of codecNames) {
        const chunks = split(data, random);
        const batch = compressBatch(codec, chunks);
        assert.equal(batch.rawBytes, size);
        used[`${codec}->${batch.codec}`] = (used[`${codec}->${batch.codec}`] ?? 0) + 1;
        if (batch.codec !== 'none') {
          assert.equal(batch.codec, codec);
          assert.ok(Buffer.isBuffer(batch.payload));
          assert.ok(batch.payload.length <= Math.floor(size * (1 - incompressibleRatioMin)), `${codec} ${kind} ${size} saved too little to be used`);
        } else {
          // Sent as they are: the same chunk objects, not copies.
          assert.ok(Array.isArray(batch.payload));
          assert.equal(batch.payload.length, chunks.length);
          batch.payload.forEach((chunk, index) => assert.equal(chunk, chunks[index]));
        }
        const back = decompressBatch(batch.codec, batch.payload, batch.rawBytes);
        assert.ok(back.equals(data), `${codec} ${kind} ${size}`);
      }
    }
  }
  // Compressible kinds were compressed and random data fell back to none.
  assert.ok((used['lz4->lz4'] ?? 0) > 50 && (used['brotli->brotli'] ?? 0) > 50 && (used['lz4->none'] ?? 0) > 0, JSON.stringify(used));
  console.log(`# batch round trips: ${JSON.stringify(used)}`);
});

test('compressBatch falls back to none below the minimum saving, and keeps batches that save more', () => {
  const seed = testSeed('fallback');
  const random = prng(seed);
  const noise = makeData('random', 64 * KiB, random);
  // About 2 % zeros saves too little; about 30 % is well over the minimum of 1/16.
  for (const [zeroBytes, expected] of [[1300, 'none'], [20 * KiB, 'compressed']] as const) {
    const data = Buffer.concat([noise, Buffer.alloc(zeroBytes)]);
    for (const codec of ['lz4', 'brotli'] as const) {
      const batch = compressBatch(codec, [data]);
      assert.equal(batch.codec, expected === 'none' ? 'none' : codec, `${codec} with ${zeroBytes} zero bytes`);
      assert.ok(decompressBatch(batch.codec, batch.payload, batch.rawBytes).equals(data));
    }
  }
  assert.deepEqual(compressBatch('lz4', []), { codec: 'none', payload: [], rawBytes: 0 });
  assert.equal(decompressBatch('none', [], 0).length, 0);
  assert.throws(() => compressBatch('lz4', [Buffer.alloc(batchRawBytesMax + 1)]), RangeError);
});

test('lz4 probes a large batch by samples: random data goes as it is without a full attempt, a batch that compresses anywhere the samples see is compressed', () => {
  const seed = testSeed('lz4-probe');
  const random = prng(seed);
  // 4 KiB entries behind 32-byte headers, as the shipper hands them over.
  const entries = (count: number, block: (index: number) => Buffer): Buffer[] => Array.from({ length: count }, (_, index) => [Buffer.alloc(32, index & 0xff), block(index)]).flat();
  const noise = entries(256, () => makeData('random', 4 * KiB, random));
  const before = { ...lz4ProbeCounters };
  const asTheyAre = compressBatch('lz4', noise);
  assert.equal(asTheyAre.codec, 'none');
  assert.equal(lz4ProbeCounters.probes - before.probes, 1);
  assert.equal(lz4ProbeCounters.sentAsTheyAre - before.sentAsTheyAre, 1, 'the samples decided: no full attempt');
  assert.ok(decompressBatch(asTheyAre.codec, asTheyAre.payload, asTheyAre.rawBytes).equals(Buffer.concat(noise)));
  // Every fourth block text-like: every sample sees some, and the whole saves well over 1/16.
  const mixed = entries(256, (index) => makeData(index % 4 === 0 ? 'text' : 'random', 4 * KiB, random));
  const compressed = compressBatch('lz4', mixed);
  assert.equal(compressed.codec, 'lz4');
  assert.ok(decompressBatch(compressed.codec, compressed.payload, compressed.rawBytes).equals(Buffer.concat(mixed)));
  // Below the probe size the whole is tried as before.
  const small = compressBatch('lz4', [makeData('random', lz4ProbeBatchBytesMin - 1, random)]);
  assert.equal(small.codec, 'none');
  assert.equal(lz4ProbeCounters.probes - before.probes, 2, 'only the two large batches were probed');
});

test('property: compressBatch then decompressBatch returns the batch, for data of literals, runs and back-references', () => {
  const seed = testSeed('codec property');
  const segment = fc.oneof(
    fc.uint8Array({ minLength: 1, maxLength: 300 }).map((bytes) => ({ kind: 'bytes' as const, bytes })),
    fc.record({ kind: fc.constant('run' as const), byte: fc.integer({ min: 0, max: 255 }), length: fc.integer({ min: 1, max: 3000 }) }),
    fc.record({ kind: fc.constant('copy' as const), distance: fc.integer({ min: 1, max: 70_000 }), length: fc.integer({ min: 1, max: 600 }) }),
  );
  fc.assert(
    fc.property(
      fc.array(segment, { maxLength: 60 }),
      fc.array(fc.integer({ min: 0, max: 1 << 20 }), { maxLength: 6 }),
      fc.constantFrom<CodecName>(...codecNames),
      (segments, cuts, codec) => {
        const parts: number[] = [];
        for (const piece of segments) {
          if (piece.kind === 'bytes') parts.push(...piece.bytes);
          else if (piece.kind === 'run') for (let i = 0; i < piece.length; i++) parts.push(piece.byte);
          else if (parts.length > 0) {
            const from = Math.max(0, parts.length - piece.distance);
            for (let i = 0; i < piece.length; i++) parts.push(parts[from + i]!);
          }
        }
        const data = Buffer.from(parts);
        const points = cuts.map((cut) => cut % (data.length + 1)).sort((a, b) => a - b);
        const chunks = [...points, data.length].map((end, index, all) => data.subarray(index === 0 ? 0 : all[index - 1]!, end));
        const batch = compressBatch(codec, chunks);
        assert.ok(decompressBatch(batch.codec, batch.payload, batch.rawBytes).equals(data));
        const block = lz4Compress(data);
        assert.ok(lz4Decompress(block, data.length).equals(data));
        const oracle = oracleDecompress(block, data.length);
        assert.ok(oracle !== 'error' && oracle.equals(data));
      },
    ),
    { seed, numRuns: 400 },
  );
});

test('lz4 interoperates with the reference (python3-lz4): each decodes the blocks of the other', async () => {
  const seed = testSeed('lz4 interop');
  const random = prng(seed);
  const dir = makeTempDir('lifeline-lz4-interop-');
  try {
    const inputs: Buffer[] = [];
    for (const kind of kinds) for (const size of sizes) inputs.push(makeData(kind, size, random));
    inputs.forEach((data, index) => {
      fs.writeFileSync(path.join(dir, `${index}.raw`), data);
      fs.writeFileSync(path.join(dir, `${index}.ours`), lz4Compress(data));
    });
    // One Python run: check our blocks, write the reference's blocks in three modes.
    const script = [
      'import json, os, sys',
      'import lz4.block',
      'directory, count = sys.argv[1], int(sys.argv[2])',
      'failures = []',
      'for index in range(count):',
      '    raw = open(os.path.join(directory, f"{index}.raw"), "rb").read()',
      '    ours = open(os.path.join(directory, f"{index}.ours"), "rb").read()',
      '    try:',
      '        back = lz4.block.decompress(ours, uncompressed_size=len(raw))',
      '        if back != raw: failures.append([index, "different bytes"])',
      '    except Exception as error:',
      '        failures.append([index, str(error)])',
      '    modes = {"fast": dict(mode="default"), "accelerated": dict(mode="fast", acceleration=8), "high": dict(mode="high_compression", compression=12)}',
      '    for name, options in modes.items():',
      '        open(os.path.join(directory, f"{index}.{name}"), "wb").write(lz4.block.compress(raw, store_size=False, **options))',
      'print(json.dumps({"failures": failures, "version": lz4.library_version_string()}))',
    ].join('\n');
    const result = await run(systemPython, ['-c', script, dir, String(inputs.length)], { timeoutMs: 240_000 });
    const report = JSON.parse(result.stdout) as { failures: [number, string][]; version: string };
    assert.deepEqual(report.failures, [], 'the reference could not decode some of our blocks');
    let ourBytes = 0;
    let referenceBytes = 0;
    inputs.forEach((data, index) => {
      for (const mode of ['fast', 'accelerated', 'high']) {
        const block = fs.readFileSync(path.join(dir, `${index}.${mode}`));
        assert.ok(lz4Decompress(block, data.length).equals(data), `reference ${mode} block ${index} (${data.length} bytes)`);
      }
      ourBytes += fs.statSync(path.join(dir, `${index}.ours`)).size;
      referenceBytes += fs.statSync(path.join(dir, `${index}.fast`)).size;
    });
    // The greedy matcher should compress about as well as the reference's default mode.
    assert.ok(ourBytes <= referenceBytes * 1.05, `ours ${ourBytes} bytes against the reference's ${referenceBytes}`);
    console.log(`# lz4 interop with liblz4 ${report.version}: ${inputs.length} inputs, 3 reference modes; ours ${ourBytes} bytes, reference ${referenceBytes}`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

/** Fuzz cases: blocks mutated or made up, with the target size to decode them into. */
function fuzzCorpus(seed: number, count: number): { block: Buffer; targetBytes: number }[] {
  const random = prng(seed);
  const integer = (below: number): number => (random() * below) | 0;
  const valid: Buffer[] = [];
  const rawSizes: number[] = [];
  for (const kind of kinds) {
    for (const size of [0, 1, 13, 20, 100, 1000, 5000, 70_000]) {
      valid.push(lz4Compress(makeData(kind, size, random)));
      rawSizes.push(size);
    }
  }
  const lengthBytes = (length: number): number[] => [...Array<number>(Math.floor(length / 255)).fill(255), length % 255];
  const cases: { block: Buffer; targetBytes: number }[] = [];
  while (cases.length < count) {
    const pick = integer(valid.length);
    const base = valid[pick]!;
    const rawBytes = rawSizes[pick]!;
    const block = Buffer.from(base);
    let mutated: Buffer;
    switch (integer(9)) {
      case 0: // truncated
        mutated = block.subarray(0, integer(block.length));
        break;
      case 1: // bits flipped
        for (let i = 1 + integer(8); i > 0; i--) block[integer(block.length)]! ^= 1 << integer(8);
        mutated = block;
        break;
      case 2: // bytes overwritten with extremes
        for (let i = 1 + integer(4); i > 0; i--) block[integer(block.length)] = [0, 255, 0xf0, 0x0f, 0xff][integer(5)]!;
        mutated = block;
        break;
      case 3: // bytes inserted or deleted
        {
          const at = integer(block.length + 1);
          mutated = random() < 0.5
            ? Buffer.concat([block.subarray(0, at), Buffer.from(Array.from({ length: 1 + integer(8) }, () => integer(256))), block.subarray(at)])
            : Buffer.concat([block.subarray(0, at), block.subarray(Math.min(block.length, at + 1 + integer(8)))]);
        }
        break;
      case 4: // two blocks spliced
        {
          const other = valid[integer(valid.length)]!;
          mutated = Buffer.concat([block.subarray(0, integer(block.length + 1)), other.subarray(integer(other.length + 1))]);
        }
        break;
      case 5: // random bytes
        mutated = Buffer.from(Array.from({ length: integer(300) }, () => integer(256)));
        break;
      case 6: // a huge literal length
        mutated = Buffer.from([0xf0, ...lengthBytes(integer(200_000)), ...Array.from({ length: integer(40) }, () => integer(256))]);
        break;
      case 7: // a huge match length, or an offset of 0, or one before the start
        {
          const literals = integer(15);
          const offset = [0, literals + 1, 65535, integer(65536)][integer(4)]!;
          mutated = Buffer.from([
            (literals << 4) | 15, ...Array.from({ length: literals }, () => integer(256)), offset & 255, offset >> 8,
            ...lengthBytes(integer(300_000)), ...Array.from({ length: integer(4) }, () => integer(256)),
          ]);
        }
        break;
      default: // a valid block into a wrong target size
        mutated = block;
        break;
    }
    const targetChoice = integer(5);
    const targetBytes = targetChoice === 0 ? 0 : targetChoice === 1 ? Math.max(0, rawBytes - 1 - integer(16)) : targetChoice === 2 ? rawBytes + integer(64) : targetChoice === 3 ? integer(300_000) : rawBytes;
    cases.push({ block: mutated, targetBytes });
  }
  return cases;
}

test('lz4Decompress on malformed input: throws or returns a count, agrees with the oracle, writes only its target', () => {
  const seed = testSeed('lz4 fuzz');
  const guardBytes = 64;
  let thrown = 0;
  let decoded = 0;
  for (const { block, targetBytes } of fuzzCorpus(seed, fuzzCases)) {
    // The target sits between guard bytes; the source is copied to its own exact-size buffer.
    const arena = Buffer.alloc(targetBytes + 2 * guardBytes, 0xa5);
    const target = arena.subarray(guardBytes, guardBytes + targetBytes);
    const source = Buffer.from(block);
    const expected = oracleDecompress(source, targetBytes);
    let produced: number | 'error';
    try {
      produced = native.lz4Decompress(source, target);
    } catch (error) {
      assert.ok(isLz4MalformedError(error), `unexpected error: ${String(error)}`);
      assert.ok(error.position >= 0 && error.position <= source.length);
      produced = 'error';
    }
    for (let i = 0; i < guardBytes; i++) {
      assert.equal(arena[i], 0xa5, 'a byte before the target was written');
      assert.equal(arena[guardBytes + targetBytes + i], 0xa5, 'a byte after the target was written');
    }
    if (expected === 'error') {
      assert.equal(produced, 'error', `the oracle refuses a block of ${source.length} bytes (target ${targetBytes}) that was decoded: ${source.subarray(0, 64).toString('hex')}`);
      thrown++;
    } else {
      assert.equal(produced, expected.length, `block ${source.subarray(0, 64).toString('hex')}`);
      assert.ok(target.subarray(0, expected.length).equals(expected));
      decoded++;
    }
  }
  console.log(`# lz4 fuzz: ${fuzzCases} cases, ${thrown} refused, ${decoded} decoded (as the oracle did)`);
});

/** A driver for lz4_block.c built with AddressSanitizer: every buffer is malloc'ed at its exact size. */
const sanitizerDriver = String.raw`
#include "lz4_block.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static unsigned read_u32(FILE *f) { unsigned char b[4]; if (fread(b, 1, 4, f) != 4) exit(3); return b[0] | b[1] << 8 | b[2] << 16 | (unsigned)b[3] << 24; }
int main(int argc, char **argv) {
  FILE *f = fopen(argv[1], "rb");
  if (!f) return 2;
  unsigned count = read_u32(f), refused = 0, decoded = 0, compressed = 0;
  for (unsigned i = 0; i < count; i++) {
    unsigned kind = read_u32(f), source_bytes = read_u32(f), target_bytes = read_u32(f);
    unsigned char *source = malloc(source_bytes ? source_bytes : 1), *target = malloc(target_bytes ? target_bytes : 1);
    if (source_bytes && fread(source, 1, source_bytes, f) != source_bytes) return 3;
    if (kind == 0) {
      int64_t produced = lz4_block_decompress(source, source_bytes, target, target_bytes, NULL);
      if (produced < 0) refused++; else decoded++;
    } else {
      /* The block made with room to spare; a tight target gets the same block, or 0 exactly when it is smaller. */
      size_t bound = lz4_block_compress_bound(source_bytes);
      unsigned char *roomy = malloc(bound);
      size_t full = lz4_block_compress(source, source_bytes, roomy, bound);
      size_t written = lz4_block_compress(source, source_bytes, target, target_bytes);
      if (full == 0) return 5;
      if (written == 0 ? target_bytes >= full : written != full || memcmp(target, roomy, full) != 0) return 6;
      if (written > 0) {
        unsigned char *block = malloc(written), *back = malloc(source_bytes ? source_bytes : 1);
        memcpy(block, target, written);
        if (lz4_block_decompress(block, written, back, source_bytes, NULL) != (int64_t)source_bytes || memcmp(back, source, source_bytes) != 0) return 4;
        compressed++;
        free(block);
        free(back);
      }
      free(roomy);
    }
    free(source);
    free(target);
  }
  printf("%u %u %u\n", refused, decoded, compressed);
  return 0;
}
`;

test('lz4_block.c under AddressSanitizer: the fuzz cases, and compression into targets of every size (0 exactly when the block does not fit), never touch memory outside the buffers', async () => {
  const seed = testSeed('lz4 sanitizer');
  const random = prng(seed);
  const dir = makeTempDir('lifeline-lz4-asan-');
  try {
    fs.writeFileSync(path.join(dir, 'driver.c'), sanitizerDriver);
    const nativeDir = path.join(repositoryRoot, 'src', 'native');
    const driver = path.join(dir, 'driver');
    await run('cc', ['-O1', '-g', '-fsanitize=address,undefined', '-fno-sanitize-recover=all', '-fno-omit-frame-pointer', '-I', nativeDir,
      '-o', driver, path.join(dir, 'driver.c'), path.join(nativeDir, 'lz4_block.c')]);
    const records: Buffer[] = [];
    const header = (kind: number, sourceBytes: number, targetBytes: number): Buffer => {
      const bytes = Buffer.alloc(12);
      bytes.writeUInt32LE(kind, 0);
      bytes.writeUInt32LE(sourceBytes, 4);
      bytes.writeUInt32LE(targetBytes, 8);
      return bytes;
    };
    const decompressions = fuzzCorpus(seed, fuzzCases);
    for (const { block, targetBytes } of decompressions) records.push(header(0, block.length, targetBytes), block);
    let compressions = 0;
    for (const kind of kinds) {
      for (const size of [0, 1, 12, 13, 14, 17, 64, 1000, 4096, 65536 + 3, 300_000]) {
        const data = makeData(kind, size, random);
        const bound = native.lz4CompressBound(size);
        // Every target size from 0 to the bound for small inputs, a spread for large ones.
        const targets = size <= 64 ? Array.from({ length: bound + 1 }, (_, i) => i) : [0, 1, size >> 4, size >> 1, size - 1, size, bound - 1, bound, ...Array.from({ length: 8 }, () => (random() * bound) | 0)];
        for (const targetBytes of targets) {
          records.push(header(1, size, targetBytes), data);
          compressions++;
        }
      }
    }
    const count = Buffer.alloc(4);
    count.writeUInt32LE(decompressions.length + compressions);
    fs.writeFileSync(path.join(dir, 'cases.bin'), Buffer.concat([count, ...records]));
    const result = await run(driver, [path.join(dir, 'cases.bin')], { timeoutMs: 240_000, allowFailure: true });
    assert.equal(result.code, 0, `the sanitizer driver failed (exit ${result.code ?? result.signal}):\n${result.stderr.slice(0, 4000)}`);
    const [refused, decoded, compressed] = result.stdout.trim().split(' ').map(Number);
    assert.equal(refused! + decoded!, decompressions.length);
    console.log(`# lz4 under AddressSanitizer: ${decompressions.length} decompressions (${refused} refused, ${decoded} decoded), ${compressions} compressions (${compressed} fitted)`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('decompressBatch throws CorruptBatchError, with codec and sizes, for every kind of damage', () => {
  const seed = testSeed('corrupt batches');
  const random = prng(seed);
  const data = makeData('text', 100 * KiB, random);
  const expectCorrupt = (codec: CodecName, payload: Buffer | Buffer[], rawBytes: number, reason: RegExp): void => {
    assert.throws(() => decompressBatch(codec, payload, rawBytes), (error: unknown) => {
      assert.ok(error instanceof CorruptBatchError, `not a CorruptBatchError: ${String(error)}`);
      assert.equal(error.codec, codec);
      assert.equal(error.rawBytesExpected, rawBytes);
      assert.match(error.reason, reason);
      assert.match(error.message, /^Cannot decompress a \w+ batch as it is corrupt: /);
      return true;
    });
  };
  for (const codec of ['lz4', 'brotli'] as const) {
    const batch = compressBatch(codec, [data]);
    assert.equal(batch.codec, codec);
    const payload = batch.payload as Buffer;
    // Announced size one too small or too large.
    expectCorrupt(codec, payload, data.length - 1, /more|past the end/);
    expectCorrupt(codec, payload, data.length + 1, /fewer/);
    // Truncated, and garbage.
    expectCorrupt(codec, payload.subarray(0, payload.length >> 1), data.length, /./);
    expectCorrupt(codec, Buffer.from(Array.from({ length: 1000 }, () => (random() * 256) | 0)), data.length, /./);
    expectCorrupt(codec, Buffer.alloc(0), data.length, /./);
    // Sizes that are not sizes.
    expectCorrupt(codec, payload, -1, /raw size/);
    expectCorrupt(codec, payload, 1.5, /raw size/);
    expectCorrupt(codec, payload, batchRawBytesMax + 1, /raw size/);
  }
  // A brotli payload that expands far beyond its announced size stops at the announced size.
  const bomb = zlib.brotliCompressSync(Buffer.alloc(32 * MiB));
  expectCorrupt('brotli', bomb, 4096, /more bytes than announced/);
  expectCorrupt('none', [data, data], data.length, /more bytes/);
  expectCorrupt('none', data, data.length + 1, /fewer bytes/);
  assert.throws(() => decompressBatch('deflate' as CodecName, data, data.length), CorruptBatchError);
  // Bit flips in an lz4 payload: refused, or (LZ4 has no checksum; the wire's checksum covers
  // that) exactly the announced size.
  const lz4Payload = compressBatch('lz4', [data]).payload as Buffer;
  for (let i = 0; i < 2000; i++) {
    const damaged = Buffer.from(lz4Payload);
    damaged[(random() * damaged.length) | 0]! ^= 1 << ((random() * 8) | 0);
    try {
      assert.equal(decompressBatch('lz4', damaged, data.length).length, data.length);
    } catch (error) {
      assert.ok(error instanceof CorruptBatchError, String(error));
    }
  }
});
