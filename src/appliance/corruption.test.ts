/**
 * A seeded corruption matrix of the target's journal, run in process with the real SourceGroup,
 * Shipper, Receiver, TargetGroup and Journal on real files, joined over loopback TCP (no TLS: the
 * appliance tests cover it).
 *
 * Each case protects group pg1 (one or two volumes) and pg2 (one volume, its own journal) on the
 * same target, writes random data in rounds (with overwrites) through the source groups' exports,
 * takes tagged checkpoints (snapshotting the source volumes at each), waits until everything is
 * acknowledged, stops the target (cleanly as SIGTERM would, or as a crash would: the journal's
 * metadata is put back as it was before the close), corrupts pg1's journal units (one flipped byte,
 * a zeroed 4 KiB page, or a truncated record: zeroes from a record boundary + k to the end of the
 * unit's used part) in the newest unit, an older unit, or a unit's first record header, reopens
 * the target and lets the sources reconnect. It asserts:
 *  - no silent loss: the loss shows as an alert (target `acknowledged-records-lost` and/or source
 *    `target-lost-acknowledged`) with the lsn range, and every checkpoint with a marker at or after
 *    the damage is listed not recoverable (`lost` or `inconsistent`);
 *  - every checkpoint listed recoverable opens a view equal to the source when it was taken;
 *  - the stream heals by itself within `healMsMax`: a latest view equals the source, alerts clear;
 *  - pg2 keeps running: its latest equals its source and it shows no loss.
 * Replay a run with LIFELINE_SEED=<seed>; LIFELINE_CORRUPTION_CASES sets the number of cases.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { makeTempDir, prng, testSeed } from '../../test/helpers.js';
import { nodeFileSystem } from '../journal/file-system.js';
import { decodeHeader, recordDataBytes, recordHeaderBytes } from '../journal/record.js';
import { SocketFrameLink, type FrameLink } from '../replication/link.js';
import { TokenBucket } from '../replication/rate.js';
import { Receiver } from '../replication/receiver.js';
import { systemScheduler } from '../replication/scheduler.js';
import { FileBackingStore, type BackingStore } from '../tap/backing-store.js';
import type { Logger, LogFields } from '../util/logger.js';
import { parseProtectConfig, type ProtectConfig, type ReceiveGroupConfig } from './config.js';
import { SourceGroup } from './source-group.js';
import { TargetGroup } from './target-group.js';
import { MiB, waitFor } from './testing.js';

const KiB = 1024;
/** Small units so that a case fills several (the appliance's minimum is 4 MiB; the journal takes these). */
const unitBytes = 512 * KiB;
/** The queue's memory, so that a sync piece (a quarter of it, 128 KiB) fits half a unit. */
const queueMemoryBytes = 512 * KiB;
/**
 * Bound on the heal, from the target's reopen until the source is in sync with its alerts cleared
 * and the target's latest view equals the source. A torn tail heals in under 1 s here (reconnect
 * backoff from 100 ms, a delta sync of at most 8 MiB on loopback, maintenance rounds of 200 ms). A
 * damage loss takes about 10.5 s: while the loss is unhealed the target refuses the latest view its
 * checksum answers are read from, so the first piece of the delta sync asks 40 times 250 ms apart
 * before it ships whole (see the report of this test). 60 s leaves room for a slow, loaded machine
 * with 16 cases running side by side.
 */
const healMsMax = 60_000;
/** Bound on the initial sync and on a drain: generous, a loaded machine must not fail them. */
const drainMsMax = 30_000;
const latestTimeMs = 8_640_000_000_000_000;

const kinds = ['flip', 'zero-page', 'truncate'] as const;
const places = ['newest', 'older', 'first-header'] as const;
const closings = ['clean', 'crash'] as const;
type Kind = (typeof kinds)[number];
type Place = (typeof places)[number];
type Closing = (typeof closings)[number];

class CapturingLogger implements Logger {
  readonly lines: { level: string; message: string; fields?: LogFields }[] = [];
  constructor(private readonly onLine?: (message: string) => void) {}
  debug(): void {}
  info(message: string, fields?: LogFields): void {
    this.add('info', message, fields);
  }
  warn(message: string, fields?: LogFields): void {
    this.add('warn', message, fields);
  }
  error(message: string, fields?: LogFields): void {
    this.add('error', message, fields);
  }
  private add(level: string, message: string, fields?: LogFields): void {
    this.lines.push({ level, message: `${Date.now() % 100_000} ${message}`, ...(fields ? { fields } : {}) });
    if (this.lines.length > 400) this.lines.splice(0, 100);
    this.onLine?.(message);
  }
  tail(count = 30): string {
    return this.lines.slice(-count).map((line) => `${line.level} ${line.message} ${line.fields ? JSON.stringify(line.fields) : ''}`).join('\n');
  }
}

interface RecordPlace {
  unit: number;
  position: number;
  bytes: number;
  lsn: number;
}

interface UnitFile {
  number: number;
  path: string;
  usedBytes: number;
  records: RecordPlace[];
}

/** Walks the journal's unit files record by record (as written: one generation, no stale records). */
function scanJournalFiles(directory: string): UnitFile[] {
  const units: UnitFile[] = [];
  for (const name of fs.readdirSync(directory).filter((entry) => /^\d{12}\.unit$/.test(entry)).sort()) {
    const filePath = path.join(directory, name);
    const content = fs.readFileSync(filePath);
    const unit: UnitFile = { number: Number(name.slice(0, 12)), path: filePath, usedBytes: 0, records: [] };
    let position = 0;
    while (position + recordHeaderBytes <= content.length) {
      const header = decodeHeader(content, position);
      if (typeof header === 'string') break;
      const bytes = recordHeaderBytes + recordDataBytes(header.kind, header.lengthBytes);
      unit.records.push({ unit: unit.number, position, bytes, lsn: header.lsn });
      position += bytes;
    }
    unit.usedBytes = position;
    units.push(unit);
  }
  return units;
}

interface Corruption {
  kind: Kind;
  place: Place;
  unit: number;
  /** Where the bytes changed: [from, to) in the unit file. */
  from: number;
  to: number;
  /** The first record whose bytes changed (every record from it on is lost). */
  lsnFirstChanged: number;
}

function describeCorruption(corruption: Corruption): string {
  return `${corruption.kind} at ${corruption.place} (unit ${corruption.unit}, bytes ${corruption.from}..${corruption.to - 1}, first changed record lsn ${corruption.lsnFirstChanged})`;
}

/** Corrupts one unit file as `kind` says, at a place chosen by `random`; returns what changed. */
function corrupt(units: UnitFile[], kind: Kind, place: Place, random: () => number): Corruption {
  const used = units.filter((unit) => unit.records.length > 0);
  const pick = <T>(list: readonly T[]): T => list[Math.floor(random() * list.length)]!;
  const unit = place === 'newest' ? used[used.length - 1]! : place === 'older' ? pick(used.slice(0, -1)) : pick(used);
  let from: number;
  let to: number;
  let data: Buffer;
  const fd = fs.openSync(unit.path, 'r+');
  try {
    const before = Buffer.alloc(unit.usedBytes);
    fs.readSync(fd, before, 0, unit.usedBytes, 0);
    if (kind === 'flip') {
      from = place === 'first-header' ? Math.floor(random() * recordHeaderBytes) : Math.floor(random() * unit.usedBytes);
      to = from + 1;
      data = Buffer.from([before[from]! ^ (1 + Math.floor(random() * 255))]);
    } else if (kind === 'zero-page') {
      from = place === 'first-header' ? 0 : Math.floor((random() * unit.usedBytes) / 4096) * 4096;
      to = Math.min(from + 4096, unit.usedBytes);
      data = Buffer.alloc(to - from);
    } else {
      const record = place === 'first-header' ? unit.records[0]! : pick(unit.records);
      from = record.position + Math.floor(random() * (place === 'first-header' ? recordHeaderBytes : record.bytes));
      to = unit.usedBytes;
      data = Buffer.alloc(to - from);
    }
    fs.writeSync(fd, data, 0, data.length, from);
    fs.fsyncSync(fd);
    // The first record whose bytes actually changed (a zeroed page may cover zeroes of a record's data).
    const changed = unit.records.find((record) => {
      const start = Math.max(record.position, from);
      const end = Math.min(record.position + record.bytes, to);
      return start < end && !before.subarray(start, end).equals(data.subarray(start - from, end - from));
    });
    assert.ok(changed, `the ${kind} at ${from}..${to - 1} of unit ${unit.number} changed no record`);
    return { kind, place, unit: unit.number, from, to, lsnFirstChanged: changed.lsn };
  } finally {
    fs.closeSync(fd);
  }
}

interface Site {
  dir: string;
  port: number;
  server: net.Server;
  receiver: Receiver | undefined;
  pending: net.Socket[];
  targets: Map<string, TargetGroup>;
  targetConfigs: Map<string, ReceiveGroupConfig>;
  targetLoggers: Map<string, CapturingLogger>;
}

interface Source {
  group: SourceGroup;
  files: FileBackingStore[];
  volumes: { name: string; sizeBytes: number }[];
  logger: CapturingLogger;
}

function receiveConfig(dir: string, group: string, volumes: { name: string; sizeBytes: number }[]): ReceiveGroupConfig {
  return {
    group,
    sources: ['site-a-appliance'],
    volumes: volumes.map((volume) => ({ name: volume.name, sizeBytes: volume.sizeBytes, replica: path.join(dir, `replica-${group}-${volume.name}.img`) })),
    historyMs: 3_600_000,
    journal: { unitBytes, sizeLimitBytes: 64 * MiB, sizeWarningBytes: 48 * MiB, datastores: [{ path: path.join(dir, 'journal'), capacityBytes: 256 * MiB, freeBytesMin: 0 }] },
  };
}

async function openTargets(site: Site): Promise<void> {
  for (const [group, config] of site.targetConfigs) {
    const logger = site.targetLoggers.get(group)!;
    site.targets.set(group, await TargetGroup.open({ config, directory: path.join(site.dir, 'target', group), fileSystem: nodeFileSystem, clock: systemScheduler, logger }));
  }
  const receiver = new Receiver({
    target: {
      openStream: async (hello, peer) => {
        const target = site.targets.get(hello.group);
        if (!target) return { refuse: { code: 'unknown-group', message: `no group '${hello.group}'` } };
        return target.openStream(hello, peer);
      },
    },
    scheduler: systemScheduler,
    appliance: 'site-b-appliance',
    logger: new CapturingLogger(),
  });
  site.receiver = receiver;
  for (const socket of site.pending.splice(0)) if (!socket.destroyed) receiver.accept(new SocketFrameLink(socket, 'from the source'));
}

/** Stops the target groups: the receiver first (no append after), then each journal, cleanly or as a crash leaves it. */
async function stopTargets(site: Site, closing: Closing): Promise<void> {
  const receiver = site.receiver;
  site.receiver = undefined;
  await receiver?.close();
  for (const [group, target] of site.targets) {
    // A crash leaves the files as they are now; close() would only record the clean end in the
    // metadata (and close the files), so the metadata from before the close is put back.
    const metaPath = path.join(site.dir, 'target', group, 'journal', 'journal.meta');
    const before = closing === 'crash' ? fs.readFileSync(metaPath) : undefined;
    await target.close();
    if (before) {
      fs.writeFileSync(metaPath, before);
      const fd = fs.openSync(metaPath, 'r');
      fs.fsyncSync(fd);
      fs.closeSync(fd);
    }
  }
  site.targets.clear();
}

async function openSource(dir: string, port: number, group: string, volumes: { name: string; sizeBytes: number }[], onLine: (source: Source, message: string) => void): Promise<Source> {
  const parsed = parseProtectConfig({ group, volumes: volumes.map((volume) => volume.name), target: { address: `127.0.0.1:${port}`, appliance: 'site-b-appliance' } }, 'protect', dir);
  // Below the parser's 1 MiB minimum on purpose: a sync piece then fits half a small unit.
  const config: ProtectConfig = { ...parsed, queue: { memoryBytesMax: queueMemoryBytes, spillBytesMax: 64 * MiB } };
  const connect = (): Promise<FrameLink> =>
    new Promise((resolve, reject) => {
      const socket = net.connect(port, '127.0.0.1', () => resolve(new SocketFrameLink(socket, 'to the target')));
      socket.once('error', reject);
    });
  const files = volumes.map((volume) => FileBackingStore.open({ path: path.join(dir, `source-${group}-${volume.name}.img`), readOnly: false, createSizeBytes: volume.sizeBytes }));
  const source = { files, volumes } as Source;
  source.logger = new CapturingLogger((message) => onLine(source, message));
  source.group = await SourceGroup.open({
    config,
    site: 'site-a',
    appliance: 'site-a-appliance',
    volumes: volumes.map((volume, id) => ({ id, name: volume.name, file: files[id]! })),
    directory: path.join(dir, 'source', group),
    fileSystem: nodeFileSystem,
    scheduler: systemScheduler,
    connect,
    applianceRateLimit: new TokenBucket(systemScheduler, 0),
    logger: source.logger,
  });
  source.group.begin();
  return source;
}

async function readAll(store: BackingStore): Promise<Buffer> {
  const data = Buffer.alloc(store.sizeBytes);
  await store.read(data, 0);
  return data;
}

async function sourceContent(source: Source): Promise<Buffer[]> {
  const out: Buffer[] = [];
  for (const volume of source.volumes) out.push(await readAll(source.group.exports.get(volume.name)!));
  return out;
}

/** A view of a target volume at a point, read whole; throws as the appliance would refuse it. */
async function viewContent(target: TargetGroup, volume: number, at: { checkpoint: string } | { timeMs: number }): Promise<Buffer> {
  target.checkConsistentPoint(volume, at);
  const view = await target.journal.openView({ volume, at, scratchBytesMax: 0 });
  try {
    return await readAll(view);
  } finally {
    await view.close();
  }
}

function firstDifference(a: Buffer, b: Buffer): number {
  for (let at = 0; at < a.length; at++) if (a[at] !== b[at]) return at;
  return -1;
}

/** Random writes (4..64 KiB, 4 KiB aligned, overwrites likely on small volumes) through the exports. */
async function writeRound(source: Source, random: () => number, count: number): Promise<number> {
  let bytes = 0;
  const writes: Promise<void>[] = [];
  for (let index = 0; index < count; index++) {
    const volume = source.volumes[Math.floor(random() * source.volumes.length)]!;
    const lengthBytes = (1 + Math.floor(random() * 16)) * 4 * KiB;
    const offset = Math.floor(random() * ((volume.sizeBytes - lengthBytes) / (4 * KiB) + 1)) * 4 * KiB;
    const data = Buffer.alloc(lengthBytes);
    for (let at = 0; at < lengthBytes; at += 4) data.writeUInt32LE(Math.floor(random() * 0x1_0000_0000), at);
    writes.push(source.group.exports.get(volume.name)!.write(data, offset));
    bytes += lengthBytes;
  }
  await Promise.all(writes);
  return bytes;
}

function drained(source: Source): boolean {
  const status = source.group.status();
  return status.sync.state === 'in-sync' && status.queue.queuedEntries === 0 && status.shipper.sequenceAcknowledged === status.queue.sequenceLast;
}

interface CaseResult {
  kind: Kind;
  place: Place;
  closing: Closing;
  verdict: 'damage' | 'torn-tail' | 'end';
  healMs: number;
  recoverableChecked: number;
  lostChecked: number;
  vanished: number;
  deltaBytesMatched: number;
  deltaBytesShipped: number;
}

async function runCase(seed: number, caseNumber: number, kind: Kind, place: Place, closing: Closing): Promise<CaseResult> {
  const random = prng((seed ^ Math.imul(caseNumber + 1, 0x9e3779b1)) >>> 0);
  const dir = makeTempDir('lifeline-corruption-');
  const pg1Volumes = Array.from({ length: random() < 0.5 ? 1 : 2 }, (_, index) => ({ name: `disk${index}`, sizeBytes: (1 + Math.floor(random() * 4)) * MiB }));
  const pg2Volumes = [{ name: 'disk0', sizeBytes: 1 * MiB }];
  const site: Site = {
    dir,
    port: 0,
    server: net.createServer(),
    receiver: undefined,
    pending: [],
    targets: new Map(),
    targetConfigs: new Map([
      ['pg1', receiveConfig(dir, 'pg1', pg1Volumes)],
      ['pg2', receiveConfig(dir, 'pg2', pg2Volumes)],
    ]),
    targetLoggers: new Map(),
  };
  // What the alerts said while the loss was shown (a heal may clear them before a poll would see them).
  const seen = { targetAlerts: [] as string[], sourceAlerts: [] as string[] };
  site.targetLoggers.set('pg1', new CapturingLogger((message) => {
    if (message.startsWith('a source reports entries this target acknowledged')) {
      // The window is written before this line: the alert shows from here until the delta sync ends.
      void Promise.resolve().then(() => seen.targetAlerts.push(...(site.targets.get('pg1')?.status().alerts ?? []).map((alert) => `${alert.condition}: ${alert.message}`)));
    }
  }));
  site.targetLoggers.set('pg2', new CapturingLogger());
  site.server.on('connection', (socket) => {
    if (site.receiver) site.receiver.accept(new SocketFrameLink(socket, 'from the source'));
    else site.pending.push(socket);
  });
  await new Promise<void>((resolve) => site.server.listen(0, '127.0.0.1', resolve));
  site.port = (site.server.address() as net.AddressInfo).port;
  const sources: Source[] = [];
  const where = (): string => `seed ${seed} case ${caseNumber} (${kind} at ${place}, ${closing} close)`;
  try {
    await openTargets(site);
    const onSourceLine = (source: Source, message: string): void => {
      if (message.startsWith('the target lost entries it had acknowledged')) {
        seen.sourceAlerts.push(...source.group.status().alerts.map((alert) => `${alert.condition}: ${alert.message}`));
      }
    };
    const pg1 = await openSource(dir, site.port, 'pg1', pg1Volumes, onSourceLine);
    sources.push(pg1);
    const pg2 = await openSource(dir, site.port, 'pg2', pg2Volumes, onSourceLine);
    sources.push(pg2);
    await waitFor(`${where()}: the initial syncs`, drainMsMax, () => (drained(pg1) && drained(pg2) ? true : undefined), 20);

    // Rounds of writes with overwrites; one or two tagged checkpoints among them, each with the source's content then.
    const model = new Map<string, Buffer[]>();
    const rounds = 3 + Math.floor(random() * 3);
    const checkpointRounds = new Set([Math.floor(random() * rounds)]);
    if (random() < 0.6) checkpointRounds.add(Math.floor(random() * rounds));
    for (let round = 0; round < rounds; round++) {
      await Promise.all([writeRound(pg1, random, 6 + Math.floor(random() * 10)), writeRound(pg2, random, 2 + Math.floor(random() * 3))]);
      if (checkpointRounds.has(round)) {
        const checkpoint = pg1.group.checkpoint('tagged', `round-${round}`);
        model.set(checkpoint.id, await sourceContent(pg1));
      }
    }
    await waitFor(`${where()}: everything acknowledged`, drainMsMax, () => (drained(pg1) && drained(pg2) ? true : undefined), 20);

    // The lsn of every checkpoint marker before the damage (to know which ones it takes).
    const markersBefore = site.targets.get('pg1')!.journal.markerRecords();
    await stopTargets(site, closing);
    const units = scanJournalFiles(path.join(dir, 'journal', 'pg1'));
    const lsnLastBefore = Math.max(0, ...units.flatMap((unit) => unit.records.map((record) => record.lsn)));
    if (place === 'older') assert.ok(units.filter((unit) => unit.records.length > 0).length >= 2, `${where()}: the journal fills at least two units`);
    const corruption = corrupt(units, kind, place, random);
    const what = `${where()}: ${describeCorruption(corruption)}`;
    const lostMarkers = markersBefore.filter((marker) => marker.lsn >= corruption.lsnFirstChanged);

    const reopenedMs = Date.now();
    await openTargets(site);
    const target = site.targets.get('pg1')!;
    const report = target.journal.openReport;
    assert.equal(target.journal.lsnDurable, corruption.lsnFirstChanged - 1, `${what}: the journal keeps exactly the records before the damaged one (log ended: ${JSON.stringify(report.cut)})`);
    const verdict = report.damage ? 'damage' : report.cut ? 'torn-tail' : 'end';
    if (closing === 'clean') assert.equal(verdict, 'damage', `${what}: after a clean close every record was acknowledged, so the cut is damage`);
    if (report.damage) {
      const damage = report.damage;
      assert.equal(damage.lsnFirst, corruption.lsnFirstChanged, `${what}: the loss starts at the damaged record`);
      assert.ok(damage.lsnLast >= damage.lsnFirst && damage.lsnLast <= lsnLastBefore, `${what}: the loss's lsn range ${damage.lsnFirst}..${damage.lsnLast} lies in the log (last ${lsnLastBefore})`);
      assert.ok(target.status().losses.some((loss) => loss.id === damage.id), `${what}: the target status lists the loss`);
      const alerts = target.status().alerts.filter((alert) => alert.condition === 'acknowledged-records-lost');
      assert.ok(alerts.length > 0, `${what}: the target shows the loss as an alert at once: ${JSON.stringify(target.status().alerts)}`);
      seen.targetAlerts.push(...alerts.map((alert) => `${alert.condition}: ${alert.message}`));
      assert.ok(alerts.some((alert) => alert.message.includes(`${damage.lsnFirst}..${damage.lsnLast}`)), `${what}: the alert names the lsn range: ${JSON.stringify(alerts)}`);
    }
    // Otherwise a torn tail was cut (nothing past the end claims it was committed), or the log ended
    // cleanly at a unit's end (the next unit's first record is gone and nothing past it is whole):
    // after a crash the journal cannot tell either from a write that never completed, and it is the
    // source, told less is held than was acknowledged, that reports the loss.
    // Checkpoints whose markers were lost are listed, not recoverable, with why.
    // A checkpoint whose marker lay in the damaged bytes themselves (or past a torn tail with no
    // marker past it) is known to the journal no more, but the target recorded it when it was
    // acknowledged and lists it as lost; a sync marker is not listed (its window stands for it).
    let vanished = 0;
    const checkLost = async (moment: string): Promise<number> => {
      const listed = target.checkpoints();
      for (const marker of lostMarkers) {
        const entry = listed.find((checkpoint) => checkpoint.id === marker.id);
        if (!entry) {
          // Only the sync markers (the windows stand for them) may go unlisted; a checkpoint the target acknowledged never does.
          assert.ok(marker.kind.startsWith('sync-'), `${what}: ${moment}: checkpoint ${marker.id} (marker lsn ${marker.lsn}), acknowledged before the damage, is no longer listed`);
          await assert.rejects(viewContent(target, 0, { checkpoint: marker.id }), /no marker of it|not recoverable|lost|inside a sync/, `${what}: ${moment}: a view at checkpoint ${marker.id} (marker lsn ${marker.lsn}), which is no longer listed, is refused`);
          if (moment === 'on reopen') vanished++;
          continue;
        }
        assert.equal(entry.recoverable, false, `${what}: ${moment}: checkpoint ${marker.id} (marker lsn ${marker.lsn}) is listed recoverable`);
        assert.ok(entry.lost || entry.inconsistent, `${what}: ${moment}: checkpoint ${marker.id} says why it is not recoverable: ${JSON.stringify(entry)}`);
      }
      return lostMarkers.length;
    };
    // Every checkpoint listed recoverable shows the source as it was when the checkpoint was taken.
    const checkRecoverable = async (moment: string): Promise<number> => {
      let checked = 0;
      for (const entry of target.checkpoints()) {
        if (!entry.recoverable) continue;
        assert.ok(!lostMarkers.some((marker) => marker.id === entry.id), `${what}: ${moment}: checkpoint ${entry.id}, whose marker was damaged, is listed recoverable`);
        const expected = model.get(entry.id);
        if (!expected) continue;
        for (let volume = 0; volume < expected.length; volume++) {
          const content = await viewContent(target, volume, { checkpoint: entry.id });
          const at = firstDifference(content, expected[volume]!);
          assert.equal(at, -1, `${what}: ${moment}: a view of volume ${volume} at recoverable checkpoint ${entry.id} differs from the source then at byte ${at}`);
        }
        checked++;
      }
      return checked;
    };
    await checkLost('on reopen');
    let recoverableChecked = await checkRecoverable('on reopen');

    // Writes go on while the target heals.
    await Promise.all([writeRound(pg1, random, 2 + Math.floor(random() * 4)), writeRound(pg2, random, 2 + Math.floor(random() * 3))]);
    let healMs = 0;
    try {
      await waitFor(`${what}: the stream to heal`, healMsMax, async () => {
        if (!drained(pg1) || !drained(pg2)) return undefined;
        if (pg1.group.status().alerts.length > 0) return undefined;
        const status = target.status();
        if (status.alerts.some((alert) => alert.condition === 'acknowledged-records-lost')) return undefined;
        if (status.losses.some((loss) => loss.kind === 'damage' && loss.healedTimeMs === undefined)) return undefined;
        const expected = await sourceContent(pg1);
        for (let volume = 0; volume < expected.length; volume++) {
          const content = await viewContent(target, volume, { timeMs: latestTimeMs }).catch(() => undefined);
          if (!content || !content.equals(expected[volume]!)) return undefined;
        }
        healMs = Date.now() - reopenedMs;
        return true;
      }, 20);
    } catch (error) {
      throw new Error(`${(error as Error).message}\nsource pg1: ${JSON.stringify(pg1.group.status())}\ntarget pg1: ${JSON.stringify(target.status())}\nsource log:\n${pg1.logger.tail()}\ntarget log:\n${site.targetLoggers.get('pg1')!.tail()}`);
    }
    // Never a silent loss: every case lost acknowledged records, so one side showed it.
    assert.ok(seen.targetAlerts.length + seen.sourceAlerts.length > 0, `${what}: the loss of acknowledged records showed no alert at the target or the source`);
    if (verdict !== 'damage') {
      assert.ok(seen.sourceAlerts.some((alert) => alert.startsWith('target-lost-acknowledged')), `${what}: a torn tail of acknowledged records shows at the source: ${JSON.stringify(seen)}`);
    }
    const lostChecked = await checkLost('after the heal');
    recoverableChecked += await checkRecoverable('after the heal');

    // The other group on the same target ran on: in sync, its latest equals its source, no loss.
    const other = site.targets.get('pg2')!;
    assert.equal(other.journal.openReport.damage, undefined, `${what}: pg2 found no damage`);
    assert.deepEqual(other.status().losses, [], `${what}: pg2 lists no loss`);
    assert.deepEqual(other.status().alerts, [], `${what}: pg2 shows no alert`);
    assert.deepEqual(pg2.group.status().alerts, [], `${what}: pg2's source shows no alert`);
    const expected = await sourceContent(pg2);
    const latest = await viewContent(other, 0, { timeMs: latestTimeMs });
    assert.equal(firstDifference(latest, expected[0]!), -1, `${what}: pg2's latest equals its source`);

    if (process.env['LIFELINE_CORRUPTION_VERBOSE'] === '2') console.log(`source:\n${pg1.logger.tail(60)}\ntarget:\n${site.targetLoggers.get('pg1')!.tail(30)}`);
    const delta = pg1.group.status().sync.delta;
    return { kind, place, closing, verdict, healMs, recoverableChecked, lostChecked, vanished, deltaBytesMatched: delta?.bytesMatched ?? 0, deltaBytesShipped: delta?.bytesShipped ?? 0 };
  } finally {
    for (const source of sources) {
      await source.group.stop(2_000).catch(() => undefined);
      for (const file of source.files) await file.close().catch(() => undefined);
    }
    await site.receiver?.close();
    for (const target of site.targets.values()) await target.close().catch(() => undefined);
    for (const socket of site.pending) socket.destroy();
    await new Promise<void>((resolve) => site.server.close(() => resolve()));
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

test('a corrupted target journal never loses acknowledged writes silently, serves no wrong point, and heals by itself', async () => {
  const seed = testSeed('corruption-matrix');
  const cases = Number(process.env['LIFELINE_CORRUPTION_CASES'] ?? 108);
  const concurrency = Number(process.env['LIFELINE_CORRUPTION_CONCURRENCY'] ?? 16);
  const combos = kinds.flatMap((kind) => places.flatMap((place) => closings.map((closing) => ({ kind, place, closing }))));
  const order = prng(seed);
  const startedMs = Date.now();
  const plan: (typeof combos)[number][] = [];
  let block: typeof combos = [];
  while (plan.length < cases) {
    // Every combination once per block of cases, in an order the seed shuffles.
    if (block.length === 0) {
      block = [...combos];
      for (let at = block.length - 1; at > 0; at--) {
        const other = Math.floor(order() * (at + 1));
        [block[at], block[other]] = [block[other]!, block[at]!];
      }
    }
    plan.push(block.pop()!);
  }
  // Cases run side by side (each with its own directory, port and groups): most of a case is waiting
  // on the link, the journal's syncs and the source's timers, not on the CPU.
  const results: CaseResult[] = [];
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < plan.length) {
      const caseNumber = next++;
      const combo = plan[caseNumber]!;
      const caseStartedMs = Date.now();
      results[caseNumber] = await runCase(seed, caseNumber, combo.kind, combo.place, combo.closing);
      if (process.env['LIFELINE_CORRUPTION_VERBOSE']) console.log(`# case ${caseNumber} ${combo.kind} ${combo.place} ${combo.closing}: ${Date.now() - caseStartedMs} ms, ${JSON.stringify(results[caseNumber])}`);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, plan.length) }, () => worker()));
  const counts = new Map<string, number>();
  for (const result of results) counts.set(`${result.kind}×${result.place}`, (counts.get(`${result.kind}×${result.place}`) ?? 0) + 1);
  const damage = results.filter((result) => result.verdict === 'damage').length;
  const torn = results.filter((result) => result.verdict === 'torn-tail').length;
  const healMax = Math.max(...results.map((result) => result.healMs));
  console.log(
    `# corruption matrix seed ${seed}: ${results.length} cases in ${Date.now() - startedMs} ms; by kind×place ${[...counts].map(([key, count]) => `${key} ${count}`).join(', ')}; ` +
      `judged damage ${damage}, torn tail ${torn}, clean end at a unit's end ${results.length - damage - torn}; max heal ${healMax} ms (damage ${Math.max(0, ...results.filter((result) => result.verdict === 'damage').map((result) => result.healMs))}, torn tail or unit end ${Math.max(0, ...results.filter((result) => result.verdict !== 'damage').map((result) => result.healMs))}); ` +
      `recoverable checkpoints checked ${results.reduce((sum, result) => sum + result.recoverableChecked, 0)}, lost markers checked ${results.reduce((sum, result) => sum + result.lostChecked, 0)} (of them no longer listed ${results.reduce((sum, result) => sum + result.vanished, 0)}); ` +
      `delta bytes matched ${results.reduce((sum, result) => sum + result.deltaBytesMatched, 0)}, shipped ${results.reduce((sum, result) => sum + result.deltaBytesShipped, 0)}`,
  );
});
