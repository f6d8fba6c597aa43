/**
 * Codec benchmark (run by hand with `npm run bench:codec`; never part of the tests).
 *
 * Data sets of --mib MiB each (default 16), cut into 4 MiB batches (the shipper's default batch
 * size) of chunks of 4 to 64 KiB, as the shipper hands them to compressBatch:
 *   random      incompressible (encrypted or already compressed disks)
 *   zeros       never-written or trimmed blocks
 *   text        log lines with timestamps, levels and numbers
 *   binaries    real files of this machine (/usr/lib/x86_64-linux-gnu, then /usr/bin), in path order
 *   vm-mix      4 KiB blocks drawn at random: 30 % zeros, 15 % random, 15 % text, 25 % binaries,
 *               15 % inode-table-like records
 *
 * For each data set:
 *   lz4_block.c      our C codec against liblz4 (Debian's, which python3-lz4 uses; default mode:
 *   liblz4           LZ4_compress_default / LZ4_decompress_safe) in one Python process through
 *                    ctypes, both on the same batches and preallocated buffers, alternating batch
 *                    by batch, so that load from other users of the machine hits both alike.
 *                    Ours is lz4_block.c compiled here with `cc -O3 -fPIC -shared`, the flags
 *                    node-gyp uses for the addon.
 *   lz4 N-API        the addon's lz4Compress/lz4Decompress from Node on the same batches
 *   lz4 CLI          `lz4 -b1 -B4194304` on the data set's file: its own fastest-of-runs figures
 *   batch lz4        compressBatch/decompressBatch('lz4'): what the shipper and receiver get,
 *                    with the fallback to none (which the receiver takes as it is), the copy out
 *                    and a fresh output buffer per batch (page faults included)
 *   batch brotli     the same with the stronger codec
 * and on vm-mix the candidates for the stronger codec: deflate (zlib level 6, the default) and
 * Brotli qualities 1, 4 and 5 (the codec uses 3), on each batch's concatenation.
 *
 * Ratio is raw bytes over compressed (or sent) bytes. Speeds are of raw bytes, MB = 10^6 bytes,
 * one core. Medians of --runs (default 7). Results: bench/results/codec-<stamp>.md and .json, and
 * codec-latest.md.
 *
 *   node dist/bench/codec.js [--runs N] [--mib M] [--no-save]
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { parseArgs } from 'node:util';
import { prng, repositoryRoot, run, systemPython } from '../test/helpers.js';
import { native } from '../src/native/index.js';
import { brotliQuality, compressBatch, decompressBatch, type CodecName } from '../src/replication/codec.js';
import { blockBytes, logText, randomBytes, systemBinaries, vmMix } from './datasets.js';

const { values } = parseArgs({ options: { runs: { type: 'string' }, mib: { type: 'string' }, 'no-save': { type: 'boolean' } } });
const runs = Number(values.runs ?? 7);
const mib = 1024 * 1024;
const dataSetBytes = Number(values.mib ?? 16) * mib;
const batchBytes = 4 * mib;
const workDir = path.join(os.tmpdir(), 'lifeline-bench-codec');

const median = (list: number[]): number => {
  const sorted = [...list].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
};
const nowSeconds = (): number => Number(process.hrtime.bigint()) / 1e9;

// ------------------------------------------------------------------ data sets






/** Cuts a data set into batches of chunks of 4 to 64 KiB (whole 4 KiB blocks). */
function toBatches(data: Buffer, random: () => number): Buffer[][] {
  const batches: Buffer[][] = [];
  for (let start = 0; start < data.length; start += batchBytes) {
    const end = Math.min(data.length, start + batchBytes);
    const chunks: Buffer[] = [];
    for (let at = start; at < end; ) {
      const length = Math.min(end - at, blockBytes * (1 + Math.floor(random() * 16)));
      chunks.push(data.subarray(at, at + length));
      at += length;
    }
    batches.push(chunks);
  }
  return batches;
}

// ------------------------------------------------------------------ measurements

interface Sample {
  compressSeconds: number;
  decompressSeconds: number;
  compressedBytes: number;
}

interface Row {
  dataSet: string;
  codec: string;
  ratio: number;
  compressMBs: number;
  decompressMBs: number;
  note: string;
}

/** Our codec on each whole batch, into buffers allocated (and touched) once, as the reference's. */
function measureOurLz4(batches: Buffer[][]): Sample {
  const block = Buffer.alloc(native.lz4CompressBound(batchBytes));
  const back = Buffer.alloc(batchBytes);
  let compressSeconds = 0;
  let decompressSeconds = 0;
  let compressedBytes = 0;
  for (const chunks of batches) {
    const raw = Buffer.concat(chunks);
    let started = nowSeconds();
    const written = native.lz4Compress(raw, block);
    compressSeconds += nowSeconds() - started;
    compressedBytes += written;
    started = nowSeconds();
    const produced = native.lz4Decompress(block.subarray(0, written), back);
    decompressSeconds += nowSeconds() - started;
    if (produced !== raw.length || !back.subarray(0, produced).equals(raw)) throw new Error('lz4 round trip failed in the benchmark');
  }
  return { compressSeconds, decompressSeconds, compressedBytes };
}

function measureBatch(codec: CodecName, batches: Buffer[][]): Sample {
  let compressSeconds = 0;
  let decompressSeconds = 0;
  let compressedBytes = 0;
  for (const chunks of batches) {
    let started = nowSeconds();
    const batch = compressBatch(codec, chunks);
    compressSeconds += nowSeconds() - started;
    compressedBytes += Buffer.isBuffer(batch.payload) ? batch.payload.length : batch.rawBytes;
    // The receiver gets the payload as one frame body (for none, the batch itself, not copied).
    const received = Buffer.isBuffer(batch.payload) ? batch.payload : Buffer.concat(batch.payload);
    started = nowSeconds();
    decompressBatch(batch.codec, received, batch.rawBytes);
    decompressSeconds += nowSeconds() - started;
  }
  return { compressSeconds, decompressSeconds, compressedBytes };
}

function measureZlib(batches: Buffer[][], compress: (raw: Buffer) => Buffer, decompress: (packed: Buffer) => Buffer): Sample {
  let compressSeconds = 0;
  let decompressSeconds = 0;
  let compressedBytes = 0;
  for (const chunks of batches) {
    const raw = Buffer.concat(chunks);
    let started = nowSeconds();
    const packed = compress(raw);
    compressSeconds += nowSeconds() - started;
    compressedBytes += packed.length;
    started = nowSeconds();
    decompress(packed);
    decompressSeconds += nowSeconds() - started;
  }
  return { compressSeconds, decompressSeconds, compressedBytes };
}

/**
 * Ours against liblz4 in one process, batch by batch on the same buffers (python3-lz4's own calls
 * allocate a new output object each time, which would time the allocator).
 */
const headToHeadScript = `
import ctypes, json, sys, time
import lz4.block
reference = ctypes.CDLL('liblz4.so.1')
for name in ('LZ4_compress_default', 'LZ4_decompress_safe'):
    getattr(reference, name).argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    getattr(reference, name).restype = ctypes.c_int
reference.LZ4_versionString.restype = ctypes.c_char_p
ours = ctypes.CDLL(sys.argv[1])
ours.lz4_block_compress.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
ours.lz4_block_compress.restype = ctypes.c_size_t
ours.lz4_block_decompress.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p]
ours.lz4_block_decompress.restype = ctypes.c_int64
data = open(sys.argv[2], 'rb').read()
batch, runs = int(sys.argv[3]), int(sys.argv[4])
block = ctypes.create_string_buffer(reference.LZ4_compressBound(batch))
back = ctypes.create_string_buffer(batch)
def one(name, raw):
    started = time.perf_counter()
    if name == 'ours': written = ours.lz4_block_compress(raw, len(raw), block, len(block))
    else: written = reference.LZ4_compress_default(raw, block, len(raw), len(block))
    compressed = time.perf_counter() - started
    started = time.perf_counter()
    if name == 'ours': produced = ours.lz4_block_decompress(block, written, back, len(back), None)
    else: produced = reference.LZ4_decompress_safe(block, back, written, len(back))
    decompressed = time.perf_counter() - started
    assert produced == len(raw) and back.raw[:produced] == raw
    assert lz4.block.decompress(block.raw[:written], uncompressed_size=len(raw)) == raw
    return compressed, decompressed, written
samples = {'ours': [], 'reference': []}
batches = [data[start:start + batch] for start in range(0, len(data), batch)]
for run in range(runs):
    totals = {'ours': [0.0, 0.0, 0], 'reference': [0.0, 0.0, 0]}
    for index, raw in enumerate(batches):
        for name in (('ours', 'reference') if (run + index) % 2 == 0 else ('reference', 'ours')):
            for slot, value in enumerate(one(name, raw)): totals[name][slot] += value
    for name, (c, d, b) in totals.items():
        samples[name].append({'compressSeconds': c, 'decompressSeconds': d, 'compressedBytes': b})
print(json.dumps({'samples': samples, 'version': reference.LZ4_versionString().decode()}))
`;

async function measureHeadToHead(library: string, file: string): Promise<{ ours: Sample[]; reference: Sample[]; version: string }> {
  const result = await run(systemPython, ['-c', headToHeadScript, library, file, String(batchBytes), String(runs)], { timeoutMs: 900_000 });
  const parsed = JSON.parse(result.stdout) as { samples: { ours: Sample[]; reference: Sample[] }; version: string };
  return { ...parsed.samples, version: parsed.version };
}

/** `lz4 -b1` on the file, 4 MiB blocks: its own ratio and fastest speeds, or undefined without the CLI. */
async function measureCli(file: string): Promise<{ ratio: number; compressMBs: number; decompressMBs: number; version: string } | undefined> {
  const version = await run('lz4', ['--version'], { allowFailure: true }).catch(() => undefined);
  if (!version || version.code !== 0) return undefined;
  const result = await run('lz4', ['-b1', '-i2', `-B${batchBytes}`, file], { timeoutMs: 300_000 });
  // The last progress line: "name : raw -> compressed (ratio), C MB/s ,D MB/s".
  const lines = (result.stdout + result.stderr).split(/[\r\n]/).filter((line) => /MB\/s ,/.test(line));
  const match = /\(\s*([\d.]+)\),\s*([\d.]+) MB\/s ,\s*([\d.]+) MB\/s/.exec(lines[lines.length - 1] ?? '');
  if (!match) throw new Error(`Cannot read the lz4 CLI's benchmark output: ${result.stdout}${result.stderr}`);
  return { ratio: Number(match[1]), compressMBs: Number(match[2]), decompressMBs: Number(match[3]), version: /v[\d.]+/.exec(version.stdout + version.stderr)?.[0] ?? '?' };
}

function toRow(dataSet: string, codec: string, rawBytes: number, samples: Sample[], note: string): Row {
  return {
    dataSet,
    codec,
    ratio: rawBytes / samples[0]!.compressedBytes,
    compressMBs: rawBytes / median(samples.map((sample) => sample.compressSeconds)) / 1e6,
    decompressMBs: rawBytes / median(samples.map((sample) => sample.decompressSeconds)) / 1e6,
    note,
  };
}

async function main(): Promise<void> {
  const machine = `${os.cpus()[0]?.model ?? 'cpu'} x${os.cpus().length}, ${Math.round(os.totalmem() / 1024 ** 3)} GiB, Node ${process.version}, ${os.release()}, load ${os.loadavg()[0]!.toFixed(2)}`;
  console.log(`# codec benchmark on ${machine}; ${dataSetBytes / mib} MiB per data set in ${batchBytes / mib} MiB batches; ${runs} runs, medians`);
  fs.rmSync(workDir, { recursive: true, force: true });
  fs.mkdirSync(workDir, { recursive: true });
  const random = prng(20261122);
  const binaries = systemBinaries(dataSetBytes);
  const dataSets: [string, Buffer][] = [
    ['random', randomBytes(dataSetBytes, random)],
    ['zeros', Buffer.alloc(dataSetBytes)],
    ['text', logText(dataSetBytes, random)],
    ['binaries', binaries.data],
    ['vm-mix', vmMix(dataSetBytes, random, binaries.data)],
  ];
  // Our codec as a plain shared library for the head-to-head run, with the addon's optimisation.
  const library = path.join(workDir, 'lz4_block.so');
  await run('cc', ['-O3', '-fPIC', '-shared', '-o', library, path.join(repositoryRoot, 'src', 'native', 'lz4_block.c')]);
  const rows: Row[] = [];
  const raw: Record<string, unknown> = { machine, runs, dataSetBytes, batchBytes, binariesFrom: binaries.source };
  let referenceVersion = '?';
  let cliVersion: string | undefined;
  for (const [name, data] of dataSets) {
    const file = path.join(workDir, `${name}.bin`);
    fs.writeFileSync(file, data);
    const batches = toBatches(data, random);
    const samples: Record<string, Sample[]> = { napi: [], batchLz4: [], batchBrotli: [] };
    const candidates: [string, (raw: Buffer) => Buffer, (packed: Buffer) => Buffer][] =
      name !== 'vm-mix'
        ? []
        : [
            ['deflate level 6', (input) => zlib.deflateRawSync(input, { level: 6 }), (packed) => zlib.inflateRawSync(packed)],
            ...[1, 4, 5].map((quality): [string, (raw: Buffer) => Buffer, (packed: Buffer) => Buffer] => [
              `brotli quality ${quality}`,
              (input) => zlib.brotliCompressSync(input, { params: { [zlib.constants.BROTLI_PARAM_QUALITY]: quality, [zlib.constants.BROTLI_PARAM_SIZE_HINT]: input.length } }),
              (packed) => zlib.brotliDecompressSync(packed),
            ]),
          ];
    const candidateSamples = candidates.map((): Sample[] => []);
    for (let r = 0; r < runs; r++) {
      samples.napi!.push(measureOurLz4(batches));
      samples.batchLz4!.push(measureBatch('lz4', batches));
      samples.batchBrotli!.push(measureBatch('brotli', batches));
      candidates.forEach(([, compress, decompress], index) => candidateSamples[index]!.push(measureZlib(batches, compress, decompress)));
    }
    const headToHead = await measureHeadToHead(library, file);
    referenceVersion = headToHead.version;
    const cli = await measureCli(file);
    cliVersion = cli?.version;
    const ours = toRow(name, 'lz4_block.c (ours)', data.length, headToHead.ours, 'same process as liblz4, batch by batch');
    const reference = toRow(name, `liblz4 ${referenceVersion}`, data.length, headToHead.reference, 'LZ4_compress_default / LZ4_decompress_safe');
    rows.push(ours, reference);
    rows.push(toRow(name, 'lz4 N-API', data.length, samples.napi!, 'lz4Compress / lz4Decompress from Node'));
    if (cli) rows.push({ dataSet: name, codec: `lz4 CLI ${cli.version}`, ratio: cli.ratio, compressMBs: cli.compressMBs, decompressMBs: cli.decompressMBs, note: '`lz4 -b1 -B4194304`, its fastest run' });
    rows.push(toRow(name, 'batch lz4', data.length, samples.batchLz4!, 'compressBatch, fallback to none'));
    rows.push(toRow(name, `batch brotli`, data.length, samples.batchBrotli!, `compressBatch, quality ${brotliQuality}`));
    candidates.forEach(([label], index) => rows.push(toRow(name, label, data.length, candidateSamples[index]!, 'candidate, node:zlib sync')));
    raw[name] = { headToHead, samples, candidateSamples, cli };
    console.log(`  ${name}: lz4 ours ${ours.compressMBs.toFixed(0)}/${ours.decompressMBs.toFixed(0)} MB/s ratio ${ours.ratio.toFixed(3)}; liblz4 ${reference.compressMBs.toFixed(0)}/${reference.decompressMBs.toFixed(0)} MB/s ratio ${reference.ratio.toFixed(3)}`);
  }
  const table = [
    `Codec benchmark, ${new Date().toISOString()}`,
    `Machine: ${machine}`,
    `Data: ${dataSetBytes / mib} MiB per data set, ${batchBytes / mib} MiB batches of 4-64 KiB chunks; binaries from ${binaries.source}; ` +
      `reference liblz4 ${referenceVersion}${cliVersion ? `, lz4 CLI ${cliVersion}` : ', lz4 CLI not installed'}. ` +
      `Medians of ${runs} runs (the CLI: its fastest), MB = 10^6 bytes, one core. "vs liblz4": ours over liblz4, measured in one process, alternating batch by batch.`,
    '',
    '| data set | codec | ratio | compress MB/s | decompress MB/s | vs liblz4 (compress, decompress) | note |',
    '|---|---|---|---|---|---|---|',
    ...rows.map((row) => {
      const reference = rows.find((other) => other.dataSet === row.dataSet && other.codec.startsWith('liblz4'))!;
      const versus = row.codec === 'lz4_block.c (ours)' ? `${(row.compressMBs / reference.compressMBs).toFixed(2)}x, ${(row.decompressMBs / reference.decompressMBs).toFixed(2)}x` : '-';
      return `| ${row.dataSet} | ${row.codec} | ${row.ratio.toFixed(3)} | ${row.compressMBs.toFixed(0)} | ${row.decompressMBs.toFixed(0)} | ${versus} | ${row.note} |`;
    }),
  ].join('\n');
  console.log(`\n${table}`);
  if (!values['no-save']) {
    const stamp = new Date().toISOString().replace(/[-:]/g, '').replace('T', '-').slice(0, 15);
    const dir = path.join(repositoryRoot, 'bench', 'results');
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, `codec-${stamp}.json`), JSON.stringify(raw, null, 2));
    fs.writeFileSync(path.join(dir, `codec-${stamp}.md`), table + '\n');
    fs.writeFileSync(path.join(dir, 'codec-latest.md'), table + '\n');
  }
  fs.rmSync(workDir, { recursive: true, force: true });
}

await main();
