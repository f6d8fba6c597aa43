/**
 * Compression of replication batches.
 *
 * - `lz4` (the default): the LZ4 block format, by the native addon (`src/native/lz4_block.c`).
 *   Hundreds of MB/s to compress and GB/s to decompress on one core, so it costs less than the
 *   link it saves.
 * - `brotli` (the stronger option, for slow links): node:zlib's Brotli at quality 3, chosen over
 *   deflate, the other codec Node 20 has (zstd is not in Node 20), by `npm run bench:codec` on a
 *   mix of VM-like blocks (zeros, random, logs, binaries, inode tables): Brotli quality 3 gives a
 *   ratio of 3.06 against 2.94 for deflate level 6 and compresses 1.5 to 2.5 times faster; it
 *   decompresses at about half deflate's speed, 100 to 200 MB/s, still above the links it is
 *   meant for. Quality 1 is faster but compresses less than deflate; qualities 4 and 5 gain 3 to
 *   11 % for 3 to 6 times the time.
 * - `none`: the chunks as they are.
 *
 * A batch whose compressed form does not save at least `incompressibleRatioMin` of its size is
 * sent as it is (codec `none`), so that incompressible data (encrypted or already compressed
 * disks) costs neither the target's CPU nor a larger frame. lz4 learns this early: its output
 * buffer is only as large as the most it may produce, and it stops when that is full.
 *
 * Both directions are synchronous. The shipper and receiver call them in their pump loops, which
 * keeps batches in order without queueing. A 4 MiB batch takes 5 to 15 ms with lz4, and 30 to 100
 * ms with Brotli, which is the price of picking the stronger codec: the event loop waits that
 * long. (zlib's asynchronous calls would move the work to the libuv thread pool, where it would
 * queue in front of the journal's file I/O, and the pump would have to keep batches in order.)
 *
 * Decompression treats its input as hostile (it comes from the network): sizes are checked
 * before anything is allocated, output is bounded by the announced raw size, and every failure is
 * a `CorruptBatchError`.
 */
import * as zlib from 'node:zlib';
import { native } from '../native/index.js';

export type CodecName = 'none' | 'lz4' | 'brotli';
export const codecNames: readonly CodecName[] = ['none', 'lz4', 'brotli'];

export function isCodecName(value: string): value is CodecName {
  return (codecNames as readonly string[]).includes(value);
}

/**
 * Compression must make a batch at least this fraction smaller (1/16, 6.25 %) or the batch is
 * sent uncompressed: a smaller saving is not worth the target's decompression.
 */
export const incompressibleRatioMin = 1 / 16;
/** Largest raw batch either direction accepts (the largest frame payload of the wire). */
export const batchRawBytesMax = 64 * 1024 * 1024;
/** Brotli quality for the `brotli` codec (0 to 11); see the measurement above. */
export const brotliQuality = 3;
/**
 * lz4 gathers the chunks into, and compresses into, buffers reused from batch to batch (fresh
 * memory costs a page fault per 4 KiB, as much as compressing it); larger ones are not kept.
 */
const lz4ScratchBytesRetainedMax = 8 * 1024 * 1024;

export interface CompressedBatch {
  /** The codec actually used: `none` when the requested one did not save enough. */
  codec: CodecName;
  /** The compressed bytes, or for `none` the chunks themselves (not copied). */
  payload: Buffer | Buffer[];
  /** Bytes of the batch before compression (the sum of the chunks' lengths). */
  rawBytes: number;
}

/** A batch that does not decompress to exactly its announced size with its announced codec. */
export class CorruptBatchError extends Error {
  override readonly name = 'CorruptBatchError';
  constructor(
    readonly codec: string,
    readonly payloadBytes: number,
    readonly rawBytesExpected: number,
    /** Bytes the codec produced, when it produced any before the fault showed. */
    readonly rawBytesProduced: number | undefined,
    readonly reason: string,
    options?: { cause?: unknown },
  ) {
    super(
      `Cannot decompress a ${codec} batch as it is corrupt: ${reason}: payload ${payloadBytes} bytes, raw bytes expected ${rawBytesExpected}` +
        (rawBytesProduced === undefined ? '' : `, produced ${rawBytesProduced}`),
      options,
    );
  }
}

let lz4Target: Buffer = Buffer.alloc(0);
let lz4Gathered: Buffer = Buffer.alloc(0);

/**
 * An lz4 batch of at least this many bytes is probed first: `lz4ProbeSamples` slices of
 * `lz4ProbeSampleBytes`, spread evenly over it, are compressed together, and when they do not save
 * `incompressibleRatioMin` the batch goes as it is without compressing (and gathering) the whole.
 * Fresh random or encrypted data then costs a sixteenth of a full attempt; a batch whose only
 * compressible stretch lies between the samples is sent as it is.
 */
export const lz4ProbeBatchBytesMin = 256 * 1024;
export const lz4ProbeSampleBytes = 4 * 1024;
export const lz4ProbeSamples = 8;
const lz4ProbeSample = Buffer.alloc(lz4ProbeSampleBytes * lz4ProbeSamples);
const lz4ProbeTarget = Buffer.alloc(lz4ProbeSample.length);
/** Probes made and batches they sent as they are (for tests and the curious). */
export const lz4ProbeCounters = { probes: 0, sentAsTheyAre: 0 };

/** Copies `target.length` bytes of the concatenation of `chunks` from `offset` into `target`. */
function copyFromChunks(chunks: readonly Buffer[], offset: number, target: Buffer): void {
  let skip = offset;
  let done = 0;
  for (const chunk of chunks) {
    if (done >= target.length) return;
    if (skip >= chunk.length) {
      skip -= chunk.length;
      continue;
    }
    done += chunk.copy(target, done, skip, Math.min(chunk.length, skip + target.length - done));
    skip = 0;
  }
}

/** Whether samples of the batch compress by at least `incompressibleRatioMin` with lz4. */
function lz4SamplesCompress(chunks: readonly Buffer[], rawBytes: number): boolean {
  lz4ProbeCounters.probes++;
  const stride = (rawBytes - lz4ProbeSampleBytes) / (lz4ProbeSamples - 1);
  for (let sample = 0; sample < lz4ProbeSamples; sample++) {
    const at = sample * lz4ProbeSampleBytes;
    copyFromChunks(chunks, Math.floor(sample * stride), lz4ProbeSample.subarray(at, at + lz4ProbeSampleBytes));
  }
  const limit = Math.floor(lz4ProbeSample.length * (1 - incompressibleRatioMin));
  const compresses = native.lz4Compress(lz4ProbeSample, lz4ProbeTarget.subarray(0, limit)) !== 0;
  if (!compresses) lz4ProbeCounters.sentAsTheyAre++;
  return compresses;
}

/**
 * Compresses a batch given as a list of chunks (compressed as their concatenation, so that
 * repetitions across chunks are found). Falls back to `none` when the result would not be at
 * least `incompressibleRatioMin` smaller; an empty batch is always `none`. The chunks are not
 * modified, and not copied for `none`.
 */
export function compressBatch(codec: CodecName, chunks: readonly Buffer[]): CompressedBatch {
  let rawBytes = 0;
  for (const chunk of chunks) rawBytes += chunk.length;
  if (rawBytes > batchRawBytesMax) {
    throw new RangeError(`Cannot compress a batch of ${rawBytes} bytes: the limit is ${batchRawBytesMax} bytes`);
  }
  const none: CompressedBatch = { codec: 'none', payload: [...chunks], rawBytes };
  if (codec === 'none' || rawBytes === 0) return none;
  // The largest payload worth sending compressed.
  const payloadBytesMax = Math.floor(rawBytes * (1 - incompressibleRatioMin));
  if (codec === 'lz4') {
    if (rawBytes >= lz4ProbeBatchBytesMin && !lz4SamplesCompress(chunks, rawBytes)) return none;
    if (lz4Target.length < payloadBytesMax) lz4Target = Buffer.allocUnsafeSlow(payloadBytesMax);
    const target = lz4Target.subarray(0, payloadBytesMax);
    let written: number;
    if (chunks.length === 1) {
      written = native.lz4Compress(chunks[0]!, target);
    } else {
      if (lz4Gathered.length < rawBytes) lz4Gathered = Buffer.allocUnsafeSlow(rawBytes);
      written = native.lz4CompressChunks(chunks, target, lz4Gathered);
    }
    const payload = written === 0 ? undefined : Buffer.from(target.subarray(0, written));
    if (lz4Target.length > lz4ScratchBytesRetainedMax) lz4Target = Buffer.alloc(0);
    if (lz4Gathered.length > lz4ScratchBytesRetainedMax) lz4Gathered = Buffer.alloc(0);
    return payload === undefined ? none : { codec: 'lz4', payload, rawBytes };
  }
  if (codec === 'brotli') {
    const input = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, rawBytes);
    const payload = zlib.brotliCompressSync(input, {
      params: {
        [zlib.constants.BROTLI_PARAM_QUALITY]: brotliQuality,
        [zlib.constants.BROTLI_PARAM_SIZE_HINT]: rawBytes,
      },
    });
    return payload.length <= payloadBytesMax ? { codec: 'brotli', payload, rawBytes } : none;
  }
  throw new TypeError(`Cannot compress a batch with codec '${String(codec)}': the codecs are ${codecNames.join(', ')}`);
}

/**
 * Decompresses a batch received with `codec` and an announced size of `rawBytes`. Returns exactly
 * `rawBytes` bytes (for `none`, the payload itself when it is one buffer, not a copy); anything else
 * (a malformed payload, more or fewer bytes, an unknown codec, a size over the limit) throws a
 * CorruptBatchError.
 */
export function decompressBatch(codec: CodecName, payload: Buffer | readonly Buffer[], rawBytes: number): Buffer {
  const input = Buffer.isBuffer(payload) ? payload : payload.length === 1 ? payload[0]! : Buffer.concat(payload);
  const corrupt = (reason: string, produced?: number, cause?: unknown): CorruptBatchError =>
    new CorruptBatchError(codec, input.length, rawBytes, produced, reason, cause === undefined ? undefined : { cause });
  if (!Number.isSafeInteger(rawBytes) || rawBytes < 0 || rawBytes > batchRawBytesMax) {
    throw corrupt(`the raw size is not from 0 to ${batchRawBytesMax}`);
  }
  let output: Buffer;
  switch (codec) {
    case 'none':
      output = input;
      break;
    case 'lz4': {
      output = Buffer.allocUnsafe(rawBytes);
      let produced: number;
      try {
        produced = native.lz4Decompress(input, output);
      } catch (error) {
        const reason = (error as { reason?: unknown }).reason;
        throw corrupt(typeof reason === 'string' ? reason : 'the lz4 decoder failed', undefined, error);
      }
      if (produced !== rawBytes) throw corrupt('the payload decodes to fewer bytes than announced', produced);
      return output;
    }
    case 'brotli':
      try {
        // The bound keeps a hostile payload from expanding without limit (at least 1: zlib's minimum).
        output = zlib.brotliDecompressSync(input, { maxOutputLength: Math.max(1, rawBytes) });
      } catch (error) {
        const tooLarge = (error as { code?: unknown }).code === 'ERR_BUFFER_TOO_LARGE';
        throw corrupt(tooLarge ? 'the payload decodes to more bytes than announced' : `brotli failed: ${(error as Error).message}`, undefined, error);
      }
      break;
    default:
      throw corrupt(`the codec is not one of ${codecNames.join(', ')}`);
  }
  if (output.length !== rawBytes) {
    throw corrupt(`the payload ${codec === 'none' ? 'is' : 'decodes to'} ${output.length < rawBytes ? 'fewer' : 'more'} bytes than announced`, output.length);
  }
  return output;
}
