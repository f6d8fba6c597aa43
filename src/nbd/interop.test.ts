/**
 * Interoperability: real NBD peers (qemu-io, qemu-img, nbdcopy, nbdinfo, nbdsh,
 * fio, nbdfuse) against a real `lifeline nbd serve`, each over TCP and over a
 * Unix socket. Every test starts its own server on a fresh sparse image, checks
 * the bytes the peer sees and the bytes that reach the backing file, and where
 * the peer's request sequence is deterministic, the tap's counters and checksum.
 */
import { describe, test, before, after, type TestContext } from 'node:test';
import * as assert from 'node:assert/strict';
import { nbdfuseMount } from '../../test/nbdfuse.js';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { CountingConsumer } from '../tap/consumers.js';
import type { TapEventKind } from '../tap/tap.js';
import {
  makeTempDir,
  makeTlsFiles,
  prng,
  run,
  startLifeline,
  systemPython,
  testSeed,
  writeRandomFile,
  type RunningServer,
  type TapSummary,
  type TlsFiles,
} from '../../test/helpers.js';

type Transport = 'tcp' | 'unix';
const transports: Transport[] = ['tcp', 'unix'];
const KiB = 1024;
const MiB = 1024 * 1024;
/** Longest a single peer run may take before the test fails (rather than hangs). */
const peerMsMax = 60_000;

// ------------------------------------------------------------------ fixtures

/** Runs cleanups in reverse order of registration, all of them, once, after the test. */
function cleanups(t: TestContext): (cleanup: () => unknown) => void {
  const stack: (() => unknown)[] = [];
  t.after(async () => {
    const errors: unknown[] = [];
    while (stack.length > 0) {
      try {
        await stack.pop()!();
      } catch (error) {
        errors.push(error);
      }
    }
    if (errors.length > 0) throw new AggregateError(errors, 'cleanup failed');
  });
  return (cleanup) => stack.push(cleanup);
}

interface ExportOptions {
  name: string;
  sizeBytes?: number;
  readOnly?: boolean;
  description?: string;
  /** An existing image to serve (else a fresh sparse one is created). */
  file?: string;
}

interface Served {
  server: RunningServer;
  dir: string;
  transport: Transport;
  /** Backing file of each export, by name. */
  image(name?: string): string;
  /** libnbd / qemu URI of an export (nbds… with the TLS directory when tls is given). */
  uri(name?: string, tls?: TlsFiles): string;
  /** qemu `--image-opts` string for the nbd protocol driver. */
  imageOpts(name?: string, tlsObjectId?: string): string;
  /** Stops the server (idempotent) and returns the summary of the named export. */
  stop(name?: string): Promise<TapSummary>;
}

async function serve(
  t: TestContext,
  transport: Transport,
  options: { exports?: (dir: string) => ExportOptions[]; args?: string[] } = {},
): Promise<Served> {
  const defer = cleanups(t);
  const dir = makeTempDir('lifeline-interop-');
  defer(() => fs.rmSync(dir, { recursive: true, force: true }));
  const exportList = options.exports?.(dir) ?? [{ name: 'disk0', sizeBytes: 16 * MiB }];
  const images = new Map<string, string>();
  const args: string[] = [];
  for (const spec of exportList) {
    const file = spec.file ?? path.join(dir, `${spec.name}.img`);
    images.set(spec.name, file);
    let text = `${spec.name}=${file}`;
    if (spec.sizeBytes !== undefined && !spec.file) text += `,size=${spec.sizeBytes}`;
    if (spec.readOnly) text += ',ro';
    if (spec.description) text += `,description=${spec.description}`;
    args.push('--export', text);
  }
  const socketPath = path.join(dir, 'nbd.sock');
  args.push(...(transport === 'tcp' ? ['--listen', '127.0.0.1:0'] : ['--socket', socketPath]));
  args.push(...(options.args ?? []));
  const server = await startLifeline(args);
  defer(() => server.stop());
  const first = exportList[0]!.name;
  return {
    server,
    dir,
    transport,
    image: (name = first) => images.get(name)!,
    uri(name = first, tls?: TlsFiles) {
      if (transport === 'tcp') {
        return tls
          ? `nbds://localhost:${server.port}/${name}?tls-certificates=${tls.dir}`
          : `nbd://127.0.0.1:${server.port}/${name}`;
      }
      return tls
        ? `nbds+unix:///${name}?socket=${socketPath}&tls-certificates=${tls.dir}`
        : `nbd+unix:///${name}?socket=${socketPath}`;
    },
    imageOpts(name = first, tlsObjectId?: string) {
      const where =
        transport === 'tcp'
          ? `server.type=inet,server.host=127.0.0.1,server.port=${server.port}`
          : `server.type=unix,server.path=${socketPath}`;
      const tls = tlsObjectId ? `,tls-creds=${tlsObjectId},tls-hostname=localhost` : '';
      return `driver=nbd,${where},export=${name}${tls}`;
    },
    async stop(name = first) {
      const summaries = await server.stop();
      assert.equal(server.process.exitCode, 0, `lifeline exited with ${server.process.exitCode ?? server.process.signalCode}\nstderr: ${server.stderr()}`);
      assert.doesNotMatch(server.stderr(), /^\S+ (WARN|ERROR) /m, 'the server logged no warning or error');
      const summary = summaries.find((entry) => entry.export === name);
      assert.ok(summary, `no tap summary for export '${name}' in:\n${server.stdout()}`);
      return summary;
    },
  };
}

/**
 * The expected disk and tap stream: every mutation applied in order to a byte
 * image and fed to a `CountingConsumer`, the same consumer the server uses, so
 * its counters and chained checksum must match the server's summary exactly.
 */
class Model {
  readonly bytes: Buffer;
  readonly tap = new CountingConsumer();

  constructor(sizeBytes: number) {
    this.bytes = Buffer.alloc(sizeBytes);
  }

  write(offset: number, data: Buffer): void {
    data.copy(this.bytes, offset);
    this.event('write', offset, data.length, data);
  }

  zero(offset: number, lengthBytes: number): void {
    this.bytes.fill(0, offset, offset + lengthBytes);
    this.event('zero', offset, lengthBytes);
  }

  trim(offset: number, lengthBytes: number): void {
    this.bytes.fill(0, offset, offset + lengthBytes);
    this.event('trim', offset, lengthBytes);
  }

  private event(kind: TapEventKind, offset: number, lengthBytes: number, data?: Buffer): void {
    this.tap.accept({ volume: 'model', sequence: this.tap.counts.sequenceLast + 1, sourceTimeMs: 0, offset, lengthBytes, kind, ...(data ? { data } : {}) });
  }

  /** Runs of equal bytes: [offset, length, byte]. */
  runs(): [number, number, number][] {
    const out: [number, number, number][] = [];
    let start = 0;
    for (let i = 1; i <= this.bytes.length; i++) {
      if (i === this.bytes.length || this.bytes[i] !== this.bytes[start]) {
        out.push([start, i - start, this.bytes[start]!]);
        start = i;
      }
    }
    return out;
  }
}

function assertTapMatches(summary: TapSummary, model: Model): void {
  const expected = model.tap.counts;
  assert.equal(summary.events, expected.events, 'tap event count');
  assert.deepEqual(summary.count, expected.count, 'tap events by kind');
  assert.deepEqual(summary.bytes, expected.bytes, 'tap bytes by kind');
  assert.equal(summary.sequenceLast, expected.sequenceLast, 'tap last sequence');
  assert.equal(summary.checksum, expected.checksum, 'tap checksum over the whole stream');
}

function assertFileEquals(file: string, expected: Buffer, what: string): void {
  const actual = fs.readFileSync(file);
  assert.equal(actual.length, expected.length, `${what}: size`);
  if (!actual.equals(expected)) {
    let first = 0;
    while (actual[first] === expected[first]) first++;
    assert.fail(`${what}: first difference at byte ${first} (got ${actual[first]}, expected ${expected[first]})`);
  }
}

function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** A random integer in [low, high]. */
function between(random: () => number, low: number, high: number): number {
  return low + Math.floor(random() * (high - low + 1));
}

/** Parses the JSON a peer printed, failing with its whole output when it is not JSON. */
function parseJson<T>(text: string, what: string): T {
  try {
    return JSON.parse(text) as T;
  } catch (error) {
    assert.fail(`${what} printed no JSON (${(error as Error).message}):\n${text}`);
  }
}

interface QemuMapEntry {
  start: number;
  length: number;
  zero: boolean;
  data: boolean;
}

/** Checks that a map's entries tile [0, size) with no gap or overlap. */
function assertTiles(entries: { start: number; length: number }[], sizeBytes: number, what: string): void {
  let cursor = 0;
  for (const entry of entries) {
    assert.equal(entry.start, cursor, `${what}: entry starts where the previous ended`);
    assert.ok(entry.length > 0, `${what}: entry is not empty`);
    cursor += entry.length;
  }
  assert.equal(cursor, sizeBytes, `${what}: entries cover the export`);
}

/** Every map entry overlapping [start, start+length) satisfies `check`. */
function assertRegion<E extends { start: number; length: number }>(entries: E[], start: number, length: number, check: (entry: E) => boolean, what: string): void {
  const overlapping = entries.filter((entry) => entry.start < start + length && start < entry.start + entry.length);
  assert.ok(overlapping.length > 0, `${what}: no entry covers ${start}+${length}`);
  for (const entry of overlapping) assert.ok(check(entry), `${what}: ${JSON.stringify(entry)} over ${start}+${length}`);
}

function qemuIo(args: string[], commands: string[]): Promise<void> {
  return run('qemu-io', [...args, ...commands.flatMap((command) => ['-c', command])], { timeoutMs: peerMsMax }).then((result) => {
    assert.doesNotMatch(result.stdout + result.stderr, /verification failed|error|failed/i, 'qemu-io reported a failure');
  });
}

/** `read -P` commands checking every run of equal bytes of the model. */
function patternReads(model: Model): string[] {
  return model.runs().map(([offset, length, byte]) => `read -q -P 0x${byte.toString(16)} ${offset} ${length}`);
}

// ------------------------------------------------------------------- tests

for (const transport of transports) {
  describe(`interop over ${transport}`, () => {
    test(`qemu-io: pattern writes with and without FUA, writev, zeroes, discards and flushes read back with read -P (${transport})`, async (t) => {
      const sizeBytes = 16 * MiB;
      const served = await serve(t, transport, { exports: () => [{ name: 'disk0', sizeBytes }] });
      const random = prng(testSeed(`qemu-io ${transport}`));
      const model = new Model(sizeBytes);
      const commands: string[] = [];
      for (let i = 0; i < 48; i++) {
        // Unaligned offsets and lengths on purpose: the server advertises a 1-byte minimum block.
        const lengthBytes = random() < 0.3 ? between(random, 1, 4 * KiB) : between(random, 1, 256) * 512 + between(random, 0, 1) * between(random, 1, 511);
        const offset = between(random, 0, sizeBytes - lengthBytes);
        const roll = random();
        const byte = between(random, 1, 255);
        const fua = random() < 0.5 ? '-f ' : '';
        if (roll < 0.15) {
          // -u may unmap (punch), -n is NBD_CMD_FLAG_FAST_ZERO, -f is FUA; without -u qemu sends NO_HOLE.
          const flags = ['', '-u ', '-n ', '-u -n ', '-f ', '-u -f '][between(random, 0, 5)]!;
          commands.push(`write -q -z ${flags}${offset} ${lengthBytes}`);
          model.zero(offset, lengthBytes);
        } else if (roll < 0.25) {
          commands.push(`discard -q ${offset} ${lengthBytes}`);
          model.trim(offset, lengthBytes);
        } else if (roll < 0.35 && lengthBytes > 1) {
          // One request from several buffers.
          const split = between(random, 1, lengthBytes - 1);
          commands.push(`writev -q ${fua}-P 0x${byte.toString(16)} ${offset} ${split} ${lengthBytes - split}`);
          model.write(offset, Buffer.alloc(lengthBytes, byte));
        } else {
          commands.push(`write -q ${fua}-P 0x${byte.toString(16)} ${offset} ${lengthBytes}`);
          model.write(offset, Buffer.alloc(lengthBytes, byte));
        }
        if (i % 10 === 9) commands.push('flush');
      }
      // --discard=unmap, else qemu drops discards and the unmap flag before they reach the server.
      await qemuIo(['-f', 'raw', '-d', 'unmap', served.uri()], commands);
      // A second connection sees every byte the first wrote.
      await qemuIo(['-f', 'raw', served.uri()], patternReads(model));
      // And through the --image-opts form of the same export, reads of what was written.
      const [offset, length, byte] = model.runs().find(([, , value]) => value !== 0)!;
      await qemuIo(['--image-opts', served.imageOpts()], [`read -q -P 0x${byte.toString(16)} ${offset} ${length}`]);
      const summary = await served.stop();
      assertTapMatches(summary, model);
      assertFileEquals(served.image(), model.bytes, 'backing file after qemu-io');
    });

    test(`qemu-img convert of a random image onto the export, then qemu-img compare (${transport})`, async (t) => {
      const sizeBytes = 16 * MiB;
      const served = await serve(t, transport, { exports: () => [{ name: 'disk0', sizeBytes }] });
      const seed = testSeed(`qemu-img convert ${transport}`);
      const source = path.join(served.dir, 'source.img');
      writeRandomFile(source, sizeBytes, seed);
      // Zero runs (one sparse, one written) so that convert's zero detection is exercised.
      const fd = fs.openSync(source, 'r+');
      fs.writeSync(fd, Buffer.alloc(2 * MiB), 0, 2 * MiB, 4 * MiB);
      fs.writeSync(fd, Buffer.alloc(1 * MiB), 0, 1 * MiB, 11 * MiB);
      fs.closeSync(fd);
      await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', source, served.uri()], { timeoutMs: peerMsMax });
      const compared = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', source, served.uri()], { timeoutMs: peerMsMax });
      assert.match(compared.stdout, /Images are identical/);
      // A difference must be found too: the comparison is real.
      const other = path.join(served.dir, 'other.img');
      fs.copyFileSync(source, other);
      const differentAt = 9 * MiB + 12_345;
      const otherFd = fs.openSync(other, 'r+');
      const original = Buffer.alloc(1);
      fs.readSync(otherFd, original, 0, 1, differentAt);
      fs.writeSync(otherFd, Buffer.from([original[0]! ^ 0xff]), 0, 1, differentAt);
      fs.closeSync(otherFd);
      const differs = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', other, served.uri()], { timeoutMs: peerMsMax, allowFailure: true });
      assert.equal(differs.code, 1, `qemu-img compare found the difference: ${differs.stdout}${differs.stderr}`);
      // qemu-img compares in 512-byte sectors and names the first differing sector.
      assert.match(differs.stdout, new RegExp(`Content mismatch at offset ${differentAt - (differentAt % 512)}!`));
      const summary = await served.stop();
      assert.equal(summary.count.failed, 0);
      assert.equal(summary.events, summary.sequenceLast);
      assert.ok(summary.bytes.write >= 13 * MiB && summary.bytes.write <= sizeBytes, `convert wrote the data: ${JSON.stringify(summary.bytes)}`);
      await run('cmp', [source, served.image()], { timeoutMs: peerMsMax });
    });

    test(`qemu-img map --output=json separates data from trimmed and zeroed regions (${transport})`, async (t) => {
      const sizeBytes = 16 * MiB;
      const served = await serve(t, transport, { exports: () => [{ name: 'disk0', sizeBytes }] });
      const model = new Model(sizeBytes);
      const write = (byte: number, offset: number, length: number): string => {
        model.write(offset, Buffer.alloc(length, byte));
        return `write -q -P 0x${byte.toString(16)} ${offset} ${length}`;
      };
      const commands = [
        write(0x11, 0, 4 * MiB),
        write(0x22, 8 * MiB, 4 * MiB),
        write(0x33, 15 * MiB, 1 * MiB),
        write(0x44, 13 * MiB + 100, 4097),
      ];
      // --discard=unmap, else qemu drops discards and the unmap flag before they reach the server.
      commands.push(`discard -q ${1 * MiB} ${1 * MiB}`);
      model.trim(1 * MiB, 1 * MiB);
      commands.push(`write -q -z -u ${9 * MiB} ${1 * MiB}`);
      model.zero(9 * MiB, 1 * MiB);
      commands.push(`write -q -z ${10 * MiB} ${512 * KiB}`);
      model.zero(10 * MiB, 512 * KiB);
      await qemuIo(['-f', 'raw', '-d', 'unmap', served.uri()], commands);
      const mapped = await run('qemu-img', ['map', '--output=json', '-f', 'raw', served.uri()], { timeoutMs: peerMsMax });
      const map = parseJson<QemuMapEntry[]>(mapped.stdout, 'qemu-img map');
      assertTiles(map, sizeBytes, 'qemu-img map');
      const isData = (entry: QemuMapEntry): boolean => entry.data && !entry.zero;
      const isZero = (entry: QemuMapEntry): boolean => entry.zero && !entry.data;
      assertRegion(map, 0, 1 * MiB, isData, 'written');
      assertRegion(map, 1 * MiB, 1 * MiB, isZero, 'trimmed');
      assertRegion(map, 2 * MiB, 2 * MiB, isData, 'written');
      assertRegion(map, 4 * MiB, 4 * MiB, isZero, 'never written');
      assertRegion(map, 8 * MiB, 1 * MiB, isData, 'written');
      assertRegion(map, 9 * MiB, 1 * MiB, isZero, 'zeroed with unmap');
      // Zeroed without unmap (NO_HOLE): whether the filesystem reports it allocated is its business;
      // the soundness check below covers it, and read -P checks its bytes.
      assertRegion(map, 10 * MiB + 512 * KiB, 1536 * KiB, isData, 'written');
      assertRegion(map, 12 * MiB, 1 * MiB, isZero, 'never written');
      assertRegion(map, 13 * MiB + 100, 4097, isData, 'written (unaligned)');
      assertRegion(map, 15 * MiB, 1 * MiB, isData, 'written at the end');
      // Sound: nothing reported as zero holds data.
      for (const entry of map.filter((item) => item.zero)) {
        assert.ok(model.bytes.subarray(entry.start, entry.start + entry.length).every((value) => value === 0), `reported zero but written: ${JSON.stringify(entry)}`);
      }
      await qemuIo(['-f', 'raw', served.uri()], patternReads(model));
      const summary = await served.stop();
      assertTapMatches(summary, model);
      assertFileEquals(served.image(), model.bytes, 'backing file after map test');
    });

    test(`nbdcopy copies a file onto the export and the export back to a file, byte for byte (${transport})`, async (t) => {
      const sizeBytes = 16 * MiB;
      const served = await serve(t, transport, { exports: () => [{ name: 'disk0', sizeBytes }] });
      const seed = testSeed(`nbdcopy ${transport}`);
      const source = path.join(served.dir, 'source.img');
      writeRandomFile(source, sizeBytes, seed);
      const fd = fs.openSync(source, 'r+');
      fs.writeSync(fd, Buffer.alloc(3 * MiB), 0, 3 * MiB, 5 * MiB);
      fs.closeSync(fd);
      // Default settings use multi-conn (the server advertises it) and several requests in flight.
      await run('nbdcopy', ['--flush', source, served.uri()], { timeoutMs: peerMsMax });
      const back = path.join(served.dir, 'back.img');
      await run('nbdcopy', [served.uri(), back], { timeoutMs: peerMsMax });
      await run('cmp', [source, back], { timeoutMs: peerMsMax });
      // Through a pipe, with one connection and synchronous requests.
      const piped = await run('bash', ['-c', `nbdcopy --synchronous -C 1 "$1" - | cmp - "$2"`, 'copy', served.uri(), source], { timeoutMs: peerMsMax });
      assert.equal(piped.code, 0);
      const summary = await served.stop();
      assert.equal(summary.count.failed, 0);
      assert.ok(summary.bytes.write >= 13 * MiB, `nbdcopy wrote the data: ${JSON.stringify(summary.bytes)}`);
      assert.equal(summary.bytes.write + summary.bytes.zero + summary.bytes.trim >= sizeBytes - 3 * MiB, true);
      await run('cmp', [source, served.image()], { timeoutMs: peerMsMax });
    });

    test(`nbdinfo --list, --json and --map describe the exports and their allocation (${transport})`, async (t) => {
      const sizeBytes = 16 * MiB;
      const served = await serve(t, transport, {
        exports: (dir) => {
          const base = path.join(dir, 'base.img');
          fs.writeFileSync(base, Buffer.alloc(4 * MiB, 0x7e));
          return [
            { name: 'disk0', sizeBytes, description: 'Lifeline test disk' },
            { name: 'base', file: base, readOnly: true },
          ];
        },
      });
      await qemuIo(['-f', 'raw', served.uri()], [`write -q -P 0x44 ${2 * MiB} ${1 * MiB}`, `write -q -P 0x45 ${5 * MiB + 4 * KiB} ${1 * MiB - 4 * KiB}`]);

      type ExportInfo = Record<string, unknown> & { 'export-name': string; contexts: string[] };
      type Info = { protocol: string; TLS: boolean; structured: boolean; exports: ExportInfo[] };
      const listed = parseJson<Info>((await run('nbdinfo', ['--list', '--json', served.uri('')], { timeoutMs: peerMsMax })).stdout, 'nbdinfo --list --json');
      assert.equal(listed.protocol, 'newstyle-fixed');
      assert.equal(listed.TLS, false);
      assert.equal(listed.structured, true);
      assert.deepEqual(listed.exports.map((entry) => entry['export-name']), ['disk0', 'base']);
      const [disk, ro] = listed.exports as [ExportInfo, ExportInfo];
      assert.equal(disk.description, 'Lifeline test disk');
      assert.equal(disk['export-size'], sizeBytes);
      assert.equal(ro['export-size'], 4 * MiB);
      assert.deepEqual(disk.contexts, ['base:allocation']);
      const writable = { is_read_only: false, can_flush: true, can_fua: true, can_trim: true, can_zero: true, can_fast_zero: true, can_multi_conn: true, can_cache: true, can_df: true };
      for (const [flag, value] of Object.entries(writable)) assert.equal(disk[flag], value, `disk0 ${flag}`);
      const readOnly = { is_read_only: true, can_trim: false, can_zero: false, can_fast_zero: false, can_multi_conn: true };
      for (const [flag, value] of Object.entries(readOnly)) assert.equal(ro[flag], value, `base ${flag}`);
      assert.equal(disk.block_size_minimum, 1);
      assert.equal(disk.block_size_preferred, 4096);
      assert.equal(disk.block_size_maximum, 32 * MiB);

      const text = (await run('nbdinfo', ['--list', served.uri('')], { timeoutMs: peerMsMax })).stdout;
      assert.match(text, /^export="disk0":$/m);
      assert.match(text, /^export="base":$/m);
      assert.match(text, /^\s+description: Lifeline test disk$/m);

      const single = parseJson<Info>((await run('nbdinfo', ['--json', '--no-content', served.uri('disk0')], { timeoutMs: peerMsMax })).stdout, 'nbdinfo --json');
      assert.equal(single.exports.length, 1);
      assert.equal(single.exports[0]!['export-name'], 'disk0');
      assert.equal(single.exports[0]!['export-size'], sizeBytes);
      assert.equal(single.exports[0]!.can_trim, true);
      // The empty name selects the default (first) export.
      assert.equal((await run('nbdinfo', ['--size', served.uri('')], { timeoutMs: peerMsMax })).stdout.trim(), String(sizeBytes));
      assert.equal((await run('nbdinfo', ['--size', served.uri('base')], { timeoutMs: peerMsMax })).stdout.trim(), String(4 * MiB));
      assert.equal((await run('nbdinfo', ['--is', 'read-only', served.uri('base')], { timeoutMs: peerMsMax, allowFailure: true })).code, 0);
      assert.equal((await run('nbdinfo', ['--is', 'read-only', served.uri('disk0')], { timeoutMs: peerMsMax, allowFailure: true })).code, 2);
      assert.equal((await run('nbdinfo', ['--can', 'trim', served.uri('base')], { timeoutMs: peerMsMax, allowFailure: true })).code, 2);

      type MapEntry = { offset: number; length: number; type: number; description: string };
      const map = parseJson<MapEntry[]>((await run('nbdinfo', ['--map', '--json', served.uri('disk0')], { timeoutMs: peerMsMax })).stdout, 'nbdinfo --map --json');
      assert.deepEqual(
        map.map(({ offset, length, type, description }) => ({ offset, length, type, description })),
        [
          { offset: 0, length: 2 * MiB, type: 3, description: 'hole,zero' },
          { offset: 2 * MiB, length: 1 * MiB, type: 0, description: 'data' },
          { offset: 3 * MiB, length: 2 * MiB + 4 * KiB, type: 3, description: 'hole,zero' },
          { offset: 5 * MiB + 4 * KiB, length: 1 * MiB - 4 * KiB, type: 0, description: 'data' },
          { offset: 6 * MiB, length: 10 * MiB, type: 3, description: 'hole,zero' },
        ],
      );
      const textMap = (await run('nbdinfo', ['--map', served.uri('base')], { timeoutMs: peerMsMax })).stdout;
      assert.match(textMap, new RegExp(`^\\s*0\\s+${4 * MiB}\\s+0\\s+data$`, 'm'));
      const totals = (await run('nbdinfo', ['--map', '--totals', served.uri('disk0')], { timeoutMs: peerMsMax })).stdout;
      assert.match(totals, new RegExp(`^\\s*${2 * MiB - 4 * KiB}\\s+\\S+%\\s+0\\s+data$`, 'm'));
      assert.match(totals, new RegExp(`^\\s*${sizeBytes - 2 * MiB + 4 * KiB}\\s+\\S+%\\s+3\\s+hole,zero$`, 'm'));

      const summary = await served.stop();
      assert.equal(summary.count.write, 2);
      assert.equal(summary.bytes.write, 2 * MiB - 4 * KiB);
    });

    test(`nbdsh: pwrite, zero, trim, cache, pread, pread_structured and block_status agree with the model (${transport})`, async (t) => {
      const sizeBytes = 16 * MiB;
      const served = await serve(t, transport, { exports: () => [{ name: 'disk0', sizeBytes }] });
      const random = prng(testSeed(`nbdsh ${transport}`));
      const model = new Model(sizeBytes);
      // Work in 64 KiB units so allocation is exact on any filesystem block size up to 64 KiB.
      const unit = 64 * KiB;
      const units = sizeBytes / unit;
      /** Per unit: 0 hole, 1 data, 2 either (zeroed with NO_HOLE: allocated or not is the filesystem's choice). */
      const allocation = new Uint8Array(units);
      type Op = { kind: 'write' | 'zero' | 'trim' | 'cache'; offset: number; length: number; byte?: number; flags: string[] };
      const plan: Op[] = [];
      for (let i = 0; i < 40; i++) {
        const count = between(random, 1, 16);
        const first = between(random, 0, units - count);
        const offset = first * unit;
        const length = count * unit;
        const roll = random();
        const fua = random() < 0.5 ? ['CMD_FLAG_FUA'] : [];
        if (roll < 0.55) {
          const byte = between(random, 1, 255);
          plan.push({ kind: 'write', offset, length, byte, flags: fua });
          model.write(offset, Buffer.alloc(length, byte));
          allocation.fill(1, first, first + count);
        } else if (roll < 0.8) {
          const noHole = random() < 0.3;
          const fast = random() < 0.5;
          plan.push({ kind: 'zero', offset, length, flags: [...fua, ...(noHole ? ['CMD_FLAG_NO_HOLE'] : []), ...(fast ? ['CMD_FLAG_FAST_ZERO'] : [])] });
          model.zero(offset, length);
          allocation.fill(noHole ? 2 : 0, first, first + count);
        } else if (roll < 0.93) {
          plan.push({ kind: 'trim', offset, length, flags: fua });
          model.trim(offset, length);
          allocation.fill(0, first, first + count);
        } else {
          plan.push({ kind: 'cache', offset, length, flags: [] });
        }
      }
      const script = `
import json, os, hashlib
plan = json.loads(os.environ['LIFELINE_PLAN'])
for op in plan:
    flags = 0
    for name in op['flags']:
        flags |= getattr(nbd, name)
    if op['kind'] == 'write':
        h.pwrite(bytes([op['byte']]) * op['length'], op['offset'], flags)
    elif op['kind'] == 'zero':
        h.zero(op['length'], op['offset'], flags)
    elif op['kind'] == 'trim':
        h.trim(op['length'], op['offset'], flags)
    else:
        h.cache(op['length'], op['offset'])
h.flush()
size = h.get_size()
extents = []
def collect(context, offset, entries, error):
    assert context == nbd.CONTEXT_BASE_ALLOCATION, context
    cursor = offset
    for i in range(0, len(entries), 2):
        extents.append([cursor, entries[i], entries[i + 1]])
        cursor += entries[i]
    return 0
cursor = 0
while cursor < size:
    before = len(extents)
    h.block_status(size - cursor, cursor, collect)
    assert len(extents) > before
    assert extents[before][0] == cursor
    cursor = extents[-1][0] + extents[-1][1]
one = []
def collect_one(context, offset, entries, error):
    one.append(list(entries))
    return 0
h.block_status(size, 0, collect_one, nbd.CMD_FLAG_REQ_ONE)
data = h.pread(size, 0)
# Structured reads in odd-sized pieces, with and without DF; holes arrive as hole chunks.
structured = {}
for df in (False, True):
    chunks = []
    rebuilt = bytearray()
    piece = 3 * 1024 * 1024 + 12345
    for start in range(0, size, piece):
        count = min(piece, size - start)
        got = []
        def chunk(buf, offset, status, error):
            got.append([offset, len(buf), status, bytes(buf)])
            return 0
        buf = h.pread_structured(count, start, chunk, nbd.CMD_FLAG_DF if df else 0)
        got.sort()
        cursor = start
        for offset, length, status, content in got:
            assert offset == cursor, (offset, cursor)
            if status == nbd.READ_HOLE:
                assert content == bytes(length)
            cursor += length
            chunks.append([offset, length, status])
        assert cursor == start + count, (cursor, start, count)
        assert bytes(buf) == data[start:start + count]
        rebuilt += buf
    structured['df' if df else 'plain'] = {'chunks': chunks, 'sha256': hashlib.sha256(rebuilt).hexdigest()}
print(json.dumps({
    'size': size,
    'can_meta_context': h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION),
    'structured': h.get_structured_replies_negotiated(),
    'extents': extents,
    'req_one': one,
    'sha256': hashlib.sha256(data).hexdigest(),
    'reads': structured,
    'hole': nbd.READ_HOLE,
}))
`;
      const result = await run(systemPython, ['-m', 'nbd', '--base-allocation', '-u', served.uri(), '-c', script], {
        timeoutMs: peerMsMax,
        env: { ...process.env, LIFELINE_PLAN: JSON.stringify(plan) },
      });
      type Reads = { chunks: [number, number, number][]; sha256: string };
      type Out = {
        size: number; can_meta_context: boolean; structured: boolean; extents: [number, number, number][];
        req_one: number[][]; sha256: string; reads: { plain: Reads; df: Reads }; hole: number;
      };
      const out = parseJson<Out>(result.stdout, 'nbdsh');
      assert.equal(out.size, sizeBytes);
      assert.equal(out.can_meta_context, true);
      assert.equal(out.structured, true);
      const expectedSha = sha256(model.bytes);
      assert.equal(out.sha256, expectedSha, 'pread of the whole export matches the model');
      // Block status, expanded per unit, against the model's allocation.
      assertTiles(out.extents.map(([start, length]) => ({ start, length })), sizeBytes, 'block status');
      const reported = new Uint8Array(units).fill(255);
      for (const [offset, length, flags] of out.extents) {
        assert.equal(offset % unit, 0, `extent ${offset}+${length} starts on a ${unit}-byte unit`);
        assert.equal(length % unit, 0, `extent ${offset}+${length} ends on a ${unit}-byte unit`);
        reported.fill(flags, offset / unit, (offset + length) / unit);
      }
      for (let i = 0; i < units; i++) {
        const expected = allocation[i] === 1 ? [0] : allocation[i] === 0 ? [3] : [0, 3];
        assert.ok(expected.includes(reported[i]!), `unit ${i} (offset ${i * unit}): block status flags ${reported[i]}, expected ${expected.join(' or ')}`);
      }
      assert.equal(out.req_one.length, 1, 'one reply for REQ_ONE');
      assert.equal(out.req_one[0]!.length, 2, 'REQ_ONE returns exactly one extent');
      assert.equal(out.req_one[0]![1], out.extents[0]![2]);
      assert.ok(out.req_one[0]![0]! > 0 && out.req_one[0]![0]! <= out.extents[0]![1]);
      // Structured reads: the same bytes; holes only where the model holds zeroes; DF gives one data chunk per read.
      for (const mode of ['plain', 'df'] as const) {
        assert.equal(out.reads[mode].sha256, expectedSha, `${mode} structured reads match the model`);
        for (const [offset, length, status] of out.reads[mode].chunks) {
          if (status === out.hole) {
            assert.ok(model.bytes.subarray(offset, offset + length).every((value) => value === 0), `hole chunk ${offset}+${length} over written data`);
          }
        }
      }
      assert.ok(out.reads.plain.chunks.some(([, , status]) => status === out.hole) || allocation.every((value) => value !== 0), 'plain structured reads answer holes as holes');
      assert.equal(out.reads.df.chunks.length, Math.ceil(sizeBytes / (3 * MiB + 12_345)), 'DF reads arrive as one chunk each');
      assert.ok(out.reads.df.chunks.every(([, , status]) => status !== out.hole));
      const summary = await served.stop();
      assertTapMatches(summary, model);
      assertFileEquals(served.image(), model.bytes, 'backing file after nbdsh');
    });

    test(`fio: randwrite with crc32c verification on two connections (${transport})`, async (t) => {
      const sizeBytes = 16 * MiB;
      const served = await serve(t, transport, { exports: () => [{ name: 'disk0', sizeBytes }] });
      const seed = testSeed(`fio ${transport}`);
      const output = path.join(served.dir, 'fio.json');
      const half = sizeBytes / 2;
      // Two jobs, each its own NBD connection, on disjoint halves; each verifies its own half.
      await run('fio', [
        '--name=interop', '--ioengine=nbd', `--uri=${served.uri()}`, '--rw=randwrite', '--bs=4k', '--iodepth=16',
        '--numjobs=2', `--size=${half}`, `--offset_increment=${half}`, '--verify=crc32c', '--do_verify=1', '--verify_fatal=1',
        `--randseed=${seed}`, '--verify_state_save=0', '--output-format=json', `--output=${output}`,
      ], { timeoutMs: peerMsMax, cwd: served.dir });
      type FioJob = { jobname: string; error: number; write: { io_bytes: number }; read: { io_bytes: number } };
      const report = parseJson<{ jobs: FioJob[] }>(fs.readFileSync(output, 'utf8').replace(/^[^{]*/, ''), 'fio');
      assert.equal(report.jobs.length, 2);
      for (const job of report.jobs) {
        assert.equal(job.error, 0, `fio job error ${job.error}`);
        assert.equal(job.write.io_bytes, half, 'each job wrote its half');
        assert.equal(job.read.io_bytes, half, 'each job read its half back to verify it');
      }
      const summary = await served.stop();
      assert.equal(summary.count.write, sizeBytes / (4 * KiB), 'one tap event per 4 KiB write');
      assert.equal(summary.bytes.write, sizeBytes);
      assert.equal(summary.events, summary.count.write);
      assert.equal(summary.count.failed, 0);
    });

    test(`nbdfuse: a mount written with dd reads back the same bytes (${transport})`, async (t) => {
      const sizeBytes = 16 * MiB;
      const served = await serve(t, transport, { exports: () => [{ name: 'disk0', sizeBytes }] });
      const seed = testSeed(`nbdfuse ${transport}`);
      const chunk = path.join(served.dir, 'chunk.bin');
      writeRandomFile(chunk, 4 * MiB, seed);
      const small = path.join(served.dir, 'small.bin');
      writeRandomFile(small, 1000, seed + 1);
      const mountpoint = path.join(served.dir, 'mnt');
      const mount = await nbdfuseMount(mountpoint, served.uri(), path.join(served.dir, 'nbdfuse.pid'));
      try {
        assert.equal(fs.statSync(mount.file).size, sizeBytes);
        await run('dd', [`if=${chunk}`, `of=${mount.file}`, 'bs=1M', 'seek=3', 'conv=notrunc,fsync', 'oflag=direct', 'status=none'], { timeoutMs: peerMsMax });
        // Unaligned, through the page cache, then synced.
        await run('dd', [`if=${small}`, `of=${mount.file}`, 'bs=1000', `seek=${12 * MiB + 12_345}`, 'oflag=seek_bytes', 'conv=notrunc,fsync', 'status=none'], { timeoutMs: peerMsMax });
        const readBack = path.join(served.dir, 'read-back.bin');
        await run('dd', [`if=${mount.file}`, `of=${readBack}`, 'bs=1M', 'skip=3', 'count=4', 'iflag=direct', 'status=none'], { timeoutMs: peerMsMax });
        await run('cmp', [chunk, readBack], { timeoutMs: peerMsMax });
        await run('cmp', ['-n', '1000', `--ignore-initial=${12 * MiB + 12_345}:0`, mount.file, small], { timeoutMs: peerMsMax });
      } finally {
        await mount.unmount();
      }
      assert.equal(fs.readdirSync(mountpoint).length, 0, 'unmounted');
      // Another peer sees the same bytes through the server.
      const copy = path.join(served.dir, 'copy.img');
      await run('nbdcopy', [served.uri(), copy], { timeoutMs: peerMsMax });
      const summary = await served.stop();
      const expected = Buffer.alloc(sizeBytes);
      fs.readFileSync(chunk).copy(expected, 3 * MiB);
      fs.readFileSync(small).copy(expected, 12 * MiB + 12_345);
      assertFileEquals(copy, expected, 'export copied after the nbdfuse writes');
      assertFileEquals(served.image(), expected, 'backing file after the nbdfuse writes');
      assert.equal(summary.count.failed, 0);
      assert.ok(summary.count.write >= 2);
      assert.equal(summary.bytes.trim + summary.bytes.zero, 0);
    });

    describe(`TLS (${transport})`, () => {
      let tlsFiles!: TlsFiles;
      let noClientCert!: TlsFiles;
      let tlsRoot!: string;
      before(async () => {
        tlsRoot = makeTempDir('lifeline-interop-tls-');
        tlsFiles = await makeTlsFiles(path.join(tlsRoot, 'pki'));
        // The same CA but no client certificate, which a server with --tls-ca must refuse.
        const bare = path.join(tlsRoot, 'ca-only');
        fs.mkdirSync(bare);
        fs.copyFileSync(tlsFiles.caCert, path.join(bare, 'ca-cert.pem'));
        noClientCert = { ...tlsFiles, dir: bare };
      });
      after(() => fs.rmSync(tlsRoot, { recursive: true, force: true }));

      const tlsArgs = (): string[] => ['--tls', 'require', '--tls-cert', tlsFiles.serverCert, '--tls-key', tlsFiles.serverKey, '--tls-ca', tlsFiles.caCert];

      test(`nbdinfo over TLS with --tls require; plain and certificate-less clients fail cleanly (${transport})`, async (t) => {
        const sizeBytes = 16 * MiB;
        const served = await serve(t, transport, { exports: () => [{ name: 'disk0', sizeBytes }], args: tlsArgs() });
        type Info = { TLS: boolean; structured: boolean; exports: Record<string, unknown>[] };
        const info = parseJson<Info>((await run('nbdinfo', ['--json', '--no-content', served.uri('disk0', tlsFiles)], { timeoutMs: peerMsMax })).stdout, 'nbdinfo --json over TLS');
        assert.equal(info.TLS, true);
        assert.equal(info.structured, true);
        assert.equal(info.exports[0]!['export-size'], sizeBytes);
        assert.equal(info.exports[0]!.can_trim, true);

        const plain = await run('nbdinfo', [served.uri('disk0')], { timeoutMs: 20_000, allowFailure: true });
        assert.notEqual(plain.code, 0, `plain nbdinfo must fail against --tls require:\n${plain.stdout}`);
        assert.match(plain.stderr, /server replied with error|TLS/i, 'refused in the handshake');
        const plainList = await run('nbdinfo', ['--list', served.uri('')], { timeoutMs: 20_000, allowFailure: true });
        assert.notEqual(plainList.code, 0, 'plain nbdinfo --list must fail against --tls require');
        const qemuPlain = await run('qemu-img', ['info', '-f', 'raw', served.uri('disk0')], { timeoutMs: 20_000, allowFailure: true });
        assert.notEqual(qemuPlain.code, 0);
        assert.match(qemuPlain.stderr, /TLS/, 'qemu-img says that TLS is needed');
        const bare = await run('nbdinfo', [served.uri('disk0', noClientCert)], { timeoutMs: 20_000, allowFailure: true });
        assert.notEqual(bare.code, 0, `a client without a certificate must be refused:\n${bare.stdout}`);

        // The server is still healthy after the refusals.
        const listed = parseJson<Info>((await run('nbdinfo', ['--list', '--json', served.uri('', tlsFiles)], { timeoutMs: peerMsMax })).stdout, 'nbdinfo --list over TLS');
        assert.deepEqual(listed.exports.map((entry) => entry['export-name']), ['disk0']);
        const tlsObject = ['--object', `tls-creds-x509,id=tls0,dir=${tlsFiles.dir},endpoint=client`];
        await qemuIo([...tlsObject, '--image-opts', served.imageOpts('disk0', 'tls0')], [`write -q -P 0x6c ${1 * MiB} ${64 * KiB}`]);
        const map = parseJson<{ offset: number; length: number; type: number }[]>(
          (await run('nbdinfo', ['--map', '--json', served.uri('disk0', tlsFiles)], { timeoutMs: peerMsMax })).stdout,
          'nbdinfo --map over TLS',
        );
        assert.deepEqual(map.map(({ offset, length, type }) => [offset, length, type]), [[0, 1 * MiB, 3], [1 * MiB, 64 * KiB, 0], [1 * MiB + 64 * KiB, sizeBytes - 1 * MiB - 64 * KiB, 3]]);
        const summary = await served.stop();
        assert.equal(summary.count.write, 1);
        assert.equal(summary.bytes.write, 64 * KiB);
        assert.equal(summary.events, 1, 'the refused clients reached no export');
      });

      test(`qemu-io, qemu-img and nbdcopy through TLS credentials (${transport})`, async (t) => {
        const sizeBytes = 16 * MiB;
        const served = await serve(t, transport, { exports: () => [{ name: 'disk0', sizeBytes }], args: tlsArgs() });
        const tlsObject = ['--object', `tls-creds-x509,id=tls0,dir=${tlsFiles.dir},endpoint=client`];
        const model = new Model(sizeBytes);
        const commands: string[] = [];
        for (const [byte, offset, length, fua] of [[0x21, 0, 1 * MiB, false], [0x22, 3 * MiB + 17, 100_000, true], [0x23, 15 * MiB, 1 * MiB, true]] as const) {
          commands.push(`write -q ${fua ? '-f ' : ''}-P 0x${byte.toString(16)} ${offset} ${length}`);
          model.write(offset, Buffer.alloc(length, byte));
        }
        await qemuIo([...tlsObject, '--image-opts', served.imageOpts('disk0', 'tls0')], commands);
        await qemuIo([...tlsObject, '--image-opts', served.imageOpts('disk0', 'tls0')], patternReads(model));
        const mapped = await run('qemu-img', ['map', '--output=json', ...tlsObject, '--image-opts', served.imageOpts('disk0', 'tls0')], { timeoutMs: peerMsMax });
        const map = parseJson<QemuMapEntry[]>(mapped.stdout, 'qemu-img map over TLS');
        assertTiles(map, sizeBytes, 'qemu-img map over TLS');
        assertRegion(map, 0, 1 * MiB, (entry) => entry.data && !entry.zero, 'written');
        assertRegion(map, 1 * MiB, 2 * MiB, (entry) => entry.zero && !entry.data, 'never written');
        assertRegion(map, 3 * MiB + 17, 100_000, (entry) => entry.data, 'written');
        assertRegion(map, 15 * MiB, 1 * MiB, (entry) => entry.data && !entry.zero, 'written');
        // nbdcopy over nbds: the export back to a file, byte for byte.
        const back = path.join(served.dir, 'back.img');
        await run('nbdcopy', [served.uri('disk0', tlsFiles), back], { timeoutMs: peerMsMax });
        assertFileEquals(back, model.bytes, 'nbdcopy over TLS');
        const summary = await served.stop();
        assertTapMatches(summary, model);
        assertFileEquals(served.image(), model.bytes, 'backing file after TLS writes');
      });
    });
  });
}
