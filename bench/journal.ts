/**
 * Journal benchmark (run by hand with `npm run bench:journal`; never part of the tests).
 *
 * 1. Append throughput of 4 KiB and 1 MiB write records through the real journal (node:fs,
 *    group commit, fdatasync per group, 8 batches in flight), against fio's sequential
 *    write of the same block size to the same filesystem (psync, one fdatasync at the end,
 *    so fio is given every advantage).
 * 2. Time to build a recovery view over 1 million and 10 million indexed records (the index
 *    filled directly, as open would fill it; a view reads no data to build).
 * 3. Read throughput of a view (replica + journal records over 25 % of the volume) against
 *    reading the replica file directly, 1 MiB sequential reads, page cache warm for both.
 * 4. Index bytes per record (the arrays' byteLength over the record count).
 *
 * Medians of --runs (default 3). Results: bench/results/journal-<stamp>.{json,md} and
 * journal-latest.md.
 *
 * Fairness. The journal and fio run on the same filesystem, in alternating order (journal first
 * in even rounds, last in odd ones), after one unmeasured warm-up round of each, and every run is
 * preceded by the same settling step (`settle`): on this VM the speed of a run otherwise depended
 * on what ran before it. fio lays its file out with fallocate as the journal does with its units,
 * and its bandwidth includes the final fsync. View reads alternate view and replica pass by pass,
 * after a warming pass of each.
 *
 *   node dist/bench/journal.js [--runs N] [--dir DIR] [--quick] [--no-save] [--only append-4k,append-1m,view-build,view-read]
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { repositoryRoot, run } from '../test/helpers.js';
import { cachedReadBytesMax, FileBackingStore } from '../src/tap/backing-store.js';
import { Journal, type AppendRecord } from '../src/journal/journal.js';
import { JournalPool } from '../src/journal/pool.js';
import { nodeFileSystem } from '../src/journal/file-system.js';
import { RecordIndex } from '../src/journal/record-index.js';
import { RecoveryView, type ViewHost } from '../src/journal/view.js';
import { RecordKind } from '../src/journal/record.js';

const { values } = parseArgs({
  options: { runs: { type: 'string' }, dir: { type: 'string' }, quick: { type: 'boolean' }, 'no-save': { type: 'boolean' }, only: { type: 'string' } },
});
/** Parts to run (all by default); a partial run is never saved as the latest results. */
const only = values.only ? new Set(values.only.split(',')) : undefined;
const runsPart = (name: string): boolean => only === undefined || only.has(name);
const runs = Number(values.runs ?? 3);
const quick = values.quick ?? false;
const baseDir = values.dir ?? path.join(os.tmpdir(), 'lifeline-bench-journal');

const median = (list: number[]): number => {
  const sorted = [...list].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
};
const mib = 1024 * 1024;
/** Bytes of batches the driver keeps in flight (8 batches of 4 MiB), like a receiver's window. */
const appendWindowBytes = 32 * mib;

async function appendRun(recordBytes: number, totalBytes: number, dir: string): Promise<number> {
  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(path.join(dir, 'datastore'), { recursive: true });
  const volumeBytes = 1024 * mib;
  const replica = FileBackingStore.open({ path: path.join(dir, 'replica.img'), readOnly: false, createSizeBytes: volumeBytes });
  const unitBytes = 256 * mib;
  const journal = await Journal.open({
    name: 'bench',
    directory: path.join(dir, 'meta'),
    fileSystem: nodeFileSystem,
    pool: new JournalPool(nodeFileSystem, [{ path: path.join(dir, 'datastore'), capacityBytes: 64 * 1024 * mib }]),
    replicas: new Map([[1, replica]]),
    unitBytes,
    historyMs: 3_600_000,
    sizeLimitBytes: 64 * 1024 * mib,
    sizeWarningBytes: 32 * 1024 * mib,
  });
  const data = Buffer.alloc(recordBytes, 0x5a);
  const perBatch = Math.max(1, Math.floor((4 * mib) / recordBytes));
  const batches = Math.ceil(totalBytes / (perBatch * recordBytes));
  let sequence = 0;
  const started = process.hrtime.bigint();
  const inFlight = new Set<Promise<unknown>>();
  for (let batch = 0; batch < batches; batch++) {
    const records: AppendRecord[] = [];
    for (let i = 0; i < perBatch; i++) {
      sequence++;
      records.push({ kind: 'write', stream: 0, sequence, timeMs: Date.now(), volume: 1, offset: (sequence * recordBytes) % volumeBytes, data });
    }
    const promise = journal.append(records).finally(() => inFlight.delete(promise));
    inFlight.add(promise);
    if (inFlight.size >= 8) await Promise.race(inFlight);
  }
  await Promise.all(inFlight);
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  await journal.close();
  await replica.close();
  fs.rmSync(dir, { recursive: true, force: true });
  return (batches * perBatch * recordBytes) / mib / seconds;
}

/** Bytes written and deleted before each measured append run, per byte the run writes. */
const settleBytesPerRunByte = 2;
/** Writes of the settling file. */
const settleChunkBytes = 16 * mib;

/**
 * Puts the machine in the same state before every measured append run, journal or fio: writes a
 * file of twice the run's size, deletes it and syncs the directory. Measured on this VM: writing
 * into the page cache ran at 3 GiB/s with pages another process had just freed but at 100–300
 * MiB/s with pages that had lain free for a few seconds (the host takes freed guest memory back),
 * and the first journal commit after a large delete waited 100 ms for its discards. Without this,
 * a run's speed depended on what ran before it (the journal ran at 250 MiB/s after fio and at 750
 * MiB/s after itself), not on what it does.
 */
function settle(dir: string, runBytes: number): void {
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, 'settle.dat');
  const chunk = Buffer.alloc(settleChunkBytes, 0xa5);
  const fd = fs.openSync(file, 'w');
  try {
    for (let at = 0; at < settleBytesPerRunByte * runBytes; at += settleChunkBytes) fs.writeSync(fd, chunk, 0, settleChunkBytes, at);
  } finally {
    fs.closeSync(fd);
  }
  fs.rmSync(file);
  const directory = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(directory);
  } finally {
    fs.closeSync(directory);
  }
}

/** fio sequential write: one fsync at the end, or (`syncEveryBytes`) an fdatasync as often as the journal's window. */
async function fioRun(blockBytes: number, totalBytes: number, dir: string, syncEveryBytes?: number): Promise<number> {
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, 'fio.dat');
  const sync = syncEveryBytes ? `--fdatasync=${Math.max(1, Math.floor(syncEveryBytes / blockBytes))}` : '--end_fsync=1';
  const result = await run('fio', ['--name=seq', `--filename=${file}`, '--rw=write', `--bs=${blockBytes}`, `--size=${totalBytes}`, '--ioengine=psync', sync, '--output-format=json'], { timeoutMs: 600_000 });
  fs.rmSync(file, { force: true });
  const job = JSON.parse(result.stdout).jobs[0];
  return job.write.bw_bytes / mib;
}

/** A journal stand-in for a view build: only the index and the watermark are read. */
function fakeHost(index: RecordIndex, replica: FileBackingStore | { sizeBytes: number }): ViewHost {
  const journal = { index, watermarkLsn: 0, viewReadsInFlight: 0 } as unknown as Journal;
  return { journal, replica: replica as FileBackingStore, fileSystem: nodeFileSystem, scratchPath: '/nonexistent', closed: () => {} };
}

function fillIndex(count: number, volumeBytes: number): RecordIndex {
  const index = new RecordIndex(1);
  let state = 12345;
  for (let lsn = 1; lsn <= count; lsn++) {
    state = (state * 1103515245 + 12345) >>> 0;
    const offset = (state % (volumeBytes / 4096)) * 4096;
    index.add({ lsn, offset, lengthBytes: 4096, timeMs: 1_700_000_000_000 + lsn, sequence: lsn, stream: lsn % 4, volume: 1 + (lsn % 2), kind: RecordKind.write }, 1 + Math.floor(lsn / 60000), (lsn % 60000) * 4160);
  }
  return index;
}

async function viewBuildMs(index: RecordIndex, volumeBytes: number, timeMs: number | undefined): Promise<number> {
  const cut = new Float64Array(65536).fill(Infinity);
  const started = process.hrtime.bigint();
  await RecoveryView.build({ host: fakeHost(index, { sizeBytes: volumeBytes }), name: 'bench', volume: 1, cut, timeMs, lsnLast: index.lastLsn, scratchBytesMax: 0 });
  return Number(process.hrtime.bigint() - started) / 1e6;
}

async function viewReadRun(dir: string, volumeBytes: number): Promise<{ viewMiBs: number; replicaMiBs: number; replicaPiecesMiBs: number }> {
  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(path.join(dir, 'datastore'), { recursive: true });
  const replicaPath = path.join(dir, 'replica.img');
  const chunk = Buffer.alloc(mib);
  for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 7) & 0xff;
  const fd = fs.openSync(replicaPath, 'w');
  for (let at = 0; at < volumeBytes; at += mib) fs.writeSync(fd, chunk, 0, mib, at);
  fs.closeSync(fd);
  const replica = FileBackingStore.open({ path: replicaPath, readOnly: false });
  const journal = await Journal.open({
    name: 'bench',
    directory: path.join(dir, 'meta'),
    fileSystem: nodeFileSystem,
    pool: new JournalPool(nodeFileSystem, [{ path: path.join(dir, 'datastore'), capacityBytes: 64 * 1024 * mib }]),
    replicas: new Map([[1, replica]]),
    unitBytes: 256 * mib,
    historyMs: 3_600_000,
    sizeLimitBytes: 64 * 1024 * mib,
    sizeWarningBytes: 32 * 1024 * mib,
  });
  // 64 KiB writes over a quarter of the volume, spread out.
  const data = Buffer.alloc(64 * 1024, 0x33);
  let sequence = 0;
  for (let at = 0; at < volumeBytes; at += 256 * 1024) {
    const records: AppendRecord[] = [];
    records.push({ kind: 'write', stream: 0, sequence: ++sequence, timeMs: Date.now(), volume: 1, offset: at, data });
    await journal.append(records);
  }
  const view = await journal.openView({ volume: 1, at: { timeMs: Date.now() + 1 }, scratchBytesMax: 0 });
  const target = Buffer.alloc(mib);
  const readPass = async (store: { read(target: Buffer, offset: number): Promise<void> }): Promise<number> => {
    const started = process.hrtime.bigint();
    for (let at = 0; at < volumeBytes; at += mib) await store.read(target, at);
    return volumeBytes / mib / (Number(process.hrtime.bigint() - started) / 1e9);
  };
  // One warming pass each (the page cache holds both files already; this warms the code paths),
  // then passes alternating view and replica, so that a burst of load from other users of the
  // machine hits both alike. Several passes, median: one pass of a cached file is short enough for
  // a scheduler hiccup to matter.
  await readPass(view);
  await readPass(replica);
  // The replica read as the view reads it: each 1 MiB request in pieces of `cachedReadBytesMax`,
  // which the file store copies from the page cache on the event loop (a 1 MiB request goes to
  // the thread pool). Not the goal's reference; printed so that the view's cost over the same
  // access path shows.
  const replicaInPieces = {
    read: async (into: Buffer, offset: number): Promise<void> => {
      const pieces: Promise<void>[] = [];
      for (let at = 0; at < into.length; at += cachedReadBytesMax) pieces.push(replica.read(into.subarray(at, at + cachedReadBytesMax), offset + at));
      await Promise.all(pieces);
    },
  };
  await readPass(replicaInPieces);
  const viewPasses: number[] = [];
  const replicaPasses: number[] = [];
  const replicaPiecesPasses: number[] = [];
  for (let pass = 0; pass < 7; pass++) {
    viewPasses.push(await readPass(view));
    replicaPasses.push(await readPass(replica));
    replicaPiecesPasses.push(await readPass(replicaInPieces));
  }
  const viewMiBs = median(viewPasses);
  const replicaMiBs = median(replicaPasses);
  const replicaPiecesMiBs = median(replicaPiecesPasses);
  await view.close();
  await journal.close();
  await replica.close();
  fs.rmSync(dir, { recursive: true, force: true });
  return { viewMiBs, replicaMiBs, replicaPiecesMiBs };
}

async function main(): Promise<void> {
  fs.mkdirSync(baseDir, { recursive: true });
  const machine = `${os.cpus()[0]?.model ?? 'cpu'} x${os.cpus().length}, ${Math.round(os.totalmem() / 1024 ** 3)} GiB, Node ${process.version}, ${os.release()}, load ${os.loadavg()[0]!.toFixed(2)}`;
  console.log(`# journal benchmark on ${machine}; dir ${baseDir}; ${runs} runs, medians`);
  const rows: { what: string; lifeline: string; reference: string; ratio: string; goal: string }[] = [];
  const raw: Record<string, unknown> = { machine, runs };
  for (const [recordBytes, totalBytes, goal] of [[4096, quick ? 64 * mib : 256 * mib, 0.5], [mib, quick ? 256 * mib : 512 * mib, 0.8]] as const) {
    if (!runsPart(recordBytes === mib ? 'append-1m' : 'append-4k')) continue;
    const journalRuns: number[] = [];
    const fioRuns: number[] = [];
    const fioSyncRuns: number[] = [];
    const settled = <T>(run: () => Promise<T>) => (): Promise<T> => {
      settle(path.join(baseDir, 'settle'), totalBytes);
      return run();
    };
    const measure = {
      journal: settled(() => appendRun(recordBytes, totalBytes, path.join(baseDir, 'append'))),
      fio: settled(() => fioRun(recordBytes, totalBytes, path.join(baseDir, 'fio'))),
      fioSync: settled(() => fioRun(recordBytes, totalBytes, path.join(baseDir, 'fio'), appendWindowBytes)),
    };
    // Unmeasured, so that the memory the measured runs use has been touched recently by both sides.
    const warm = [await measure.journal(), await measure.fio()];
    console.log(`  append ${recordBytes} B warm-up (not counted): journal ${warm[0]!.toFixed(0)} MiB/s, fio ${warm[1]!.toFixed(0)} MiB/s`);
    for (let r = 0; r < runs; r++) {
      // Interleaved, so that a burst of load from other users of the machine hits all three alike,
      // and in alternating order, so that neither side always runs first.
      const order = r % 2 === 0 ? (['journal', 'fio', 'fioSync'] as const) : (['fioSync', 'fio', 'journal'] as const);
      for (const which of order) {
        const result = await measure[which]();
        (which === 'journal' ? journalRuns : which === 'fio' ? fioRuns : fioSyncRuns).push(result);
      }
      console.log(`  append ${recordBytes} B run ${r + 1} (${order.join(', ')}): journal ${journalRuns[r]!.toFixed(0)} MiB/s, fio ${fioRuns[r]!.toFixed(0)} MiB/s, fio with fdatasync per 32 MiB ${fioSyncRuns[r]!.toFixed(0)} MiB/s, ratio ${(journalRuns[r]! / fioRuns[r]!).toFixed(2)}`);
    }
    const j = median(journalRuns);
    const f = median(fioRuns);
    const fs2 = median(fioSyncRuns);
    raw[`append-${recordBytes}`] = { journalRuns, fioRuns, fioSyncRuns };
    const label = recordBytes === mib ? '1 MiB' : '4 KiB';
    rows.push({ what: `append ${label} records (${totalBytes / mib} MiB, 32 MiB in flight)`, lifeline: `${j.toFixed(0)} MiB/s`, reference: `fio seq write, end_fsync: ${f.toFixed(0)} MiB/s`, ratio: `${(j / f).toFixed(2)}x`, goal: `>= ${goal}x` });
    rows.push({ what: `append ${label} records, same durability as fio with fdatasync every 32 MiB`, lifeline: `${j.toFixed(0)} MiB/s`, reference: `fio seq write, fdatasync per 32 MiB: ${fs2.toFixed(0)} MiB/s`, ratio: `${(j / fs2).toFixed(2)}x`, goal: '-' });
  }
  const volumeBytes = 1024 * 1024 * mib; // 1 TiB volume address space (index only)
  for (const count of !runsPart('view-build') ? [] : quick ? [1_000_000] : [1_000_000, 10_000_000]) {
    const index = fillIndex(count, volumeBytes);
    const buildRuns: number[] = [];
    for (let r = 0; r < runs; r++) buildRuns.push(await viewBuildMs(index, volumeBytes, 1_700_000_000_000 + count));
    const ms = median(buildRuns);
    raw[`view-build-${count}`] = buildRuns;
    rows.push({ what: `build a view over ${count.toLocaleString('en')} records (time view, 2 volumes, 4 streams)`, lifeline: `${ms.toFixed(0)} ms`, reference: '-', ratio: '-', goal: count === 10_000_000 ? '< 1000 ms' : '-' });
    if (count === (quick ? 1_000_000 : 10_000_000)) {
      const perRecord = index.allocatedBytes() / count;
      raw.indexBytesPerRecord = perRecord;
      rows.push({ what: `index bytes per record (at ${count.toLocaleString('en')})`, lifeline: perRecord.toFixed(1), reference: '-', ratio: '-', goal: '<= 48' });
    }
  }
  const readRuns: { viewMiBs: number; replicaMiBs: number; replicaPiecesMiBs: number }[] = [];
  for (let r = 0; r < (runsPart('view-read') ? runs : 0); r++) {
    readRuns.push(await viewReadRun(path.join(baseDir, 'read'), quick ? 256 * mib : 512 * mib));
    const run = readRuns[r]!;
    console.log(`  view read run ${r + 1}: view ${run.viewMiBs.toFixed(0)} MiB/s, replica ${run.replicaMiBs.toFixed(0)} MiB/s, ratio ${(run.viewMiBs / run.replicaMiBs).toFixed(2)}; replica in 64 KiB pieces ${run.replicaPiecesMiBs.toFixed(0)} MiB/s, ratio ${(run.viewMiBs / run.replicaPiecesMiBs).toFixed(2)}`);
  }
  if (readRuns.length > 0) {
    const v = median(readRuns.map((entry) => entry.viewMiBs));
    const p = median(readRuns.map((entry) => entry.replicaMiBs));
    raw.viewRead = readRuns;
    rows.push({ what: 'view read, 1 MiB sequential (25 % of the volume in 64 KiB journal records)', lifeline: `${v.toFixed(0)} MiB/s`, reference: `replica file ${p.toFixed(0)} MiB/s`, ratio: `${(v / p).toFixed(2)}x`, goal: '>= 0.8x' });
    const q = median(readRuns.map((entry) => entry.replicaPiecesMiBs));
    rows.push({ what: 'view read, as above, against the replica read the way the view reads it (each 1 MiB in 64 KiB pieces)', lifeline: `${v.toFixed(0)} MiB/s`, reference: `replica file ${q.toFixed(0)} MiB/s`, ratio: `${(v / q).toFixed(2)}x`, goal: '-' });
  }
  const table = [
    `Journal benchmark, ${new Date().toISOString()}`,
    `Machine: ${machine}`,
    `Directory: ${baseDir} (same filesystem for the journal, fio and the replica); medians of ${runs} runs.`,
    '',
    '| what | lifeline | reference | ratio | goal |',
    '|---|---|---|---|---|',
    ...rows.map((row) => `| ${row.what} | ${row.lifeline} | ${row.reference} | ${row.ratio} | ${row.goal} |`),
  ].join('\n');
  console.log(`\n${table}`);
  if (!values['no-save'] && only === undefined) {
    const stamp = new Date().toISOString().replace(/[-:]/g, '').replace('T', '-').slice(0, 15);
    const dir = path.join(repositoryRoot, 'bench', 'results');
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, `journal-${stamp}.json`), JSON.stringify(raw, null, 2));
    fs.writeFileSync(path.join(dir, `journal-${stamp}.md`), table + '\n');
    fs.writeFileSync(path.join(dir, 'journal-latest.md'), table + '\n');
  }
  fs.rmSync(baseDir, { recursive: true, force: true });
}

await main();
