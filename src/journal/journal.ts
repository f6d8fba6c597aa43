/**
 * The journal of one protection group at the target site: durable ordered
 * history in storage units from a pool, promotion of aged writes to the
 * replicas, limits and alerts, checkpoints, and recovery views.
 *
 * Concurrency. Appends are validated at once and queued; one commit loop
 * writes the queued batches as groups (one write per unit touched, one sync
 * per unit) and acknowledges each group after its sync, in order. The next
 * group is written while earlier ones sync, and up to four syncs run at once;
 * what is not yet acknowledged stays within half a unit. Promotion runs one step at a
 * time behind its own queue, reading only durable records, so it never waits
 * for appends and appends wait for it only when the hard limit needs room.
 */
import * as path from 'node:path';
import type { BackingStore } from '../tap/backing-store.js';
import { systemClock, type Clock } from '../tap/tap.js';
import {
  DuplicateSequenceError,
  InvalidRecordError,
  JournalDamagedError,
  JournalFailedError,
  RecoveryPointUnavailableError,
  SequenceGapError,
  DatastoreFullError,
} from './errors.js';
import type { JournalFile, JournalFileSystem } from './file-system.js';
import { readMetadata, writeMetadata, type JournalLoss, type JournalMetadata } from './metadata.js';
import type { JournalPool, PoolUnit } from './pool.js';
import { RecordIndex, type IndexEntry } from './record-index.js';
import {
  decodeHeader,
  decodeMarker,
  encodeHeaderAt,
  encodeMarker,
  recordDataBytes,
  recordHeaderBytes,
  RecordKind,
  type CheckpointMarker,
  type RecordKindName,
} from './record.js';
import { judgeLogEnd, scanPastEnd, scanUnits, type PastEnd, type ScanOptions } from './scan.js';
import { RecoveryView, type ViewHost } from './view.js';

/** Streams and volumes are 16-bit in the index. */
export const streamIdMax = 0xffff;
export const volumeIdMax = 0xffff;
/** Records promoted per metadata step (each step is restartable on its own). */
export const promoteStepRecordsMax = 4096;
/** Checkpoints promoted past that stay listed (not recoverable); older ones are forgotten. */
export const promotedCheckpointsListedMax = 64;
/** Promotion reads records that lie one after another in a unit with one pread of at most this (a larger record alone). */
export const promoteReadBytesMax = 4 * 1024 * 1024;
/** Fractions of the configured history under which the history alerts are raised. */
export const historyWarningRatio = 0.85;
export const historyErrorRatio = 0.75;
/** The hard limit must leave room for at least this many units (oldest, current, spare, one more). */
export const sizeLimitUnitsMin = 4;
/** Losses kept in the metadata (older ones are forgotten). */
export const lossesKeptMax = 32;

export interface AppendRecord {
  kind: RecordKindName;
  stream: number;
  sequence: number;
  /** Source time, ms since the epoch. */
  timeMs: number;
  volume: number;
  offset: number;
  /** Range length for zero and trim; for writes, the data's length. */
  lengthBytes?: number;
  data?: Buffer;
  checkpoint?: CheckpointMarker;
}

export interface JournalOptions {
  name: string;
  /** Where the metadata lives (and view scratch files). */
  directory: string;
  fileSystem: JournalFileSystem;
  pool: JournalPool;
  /** Replica volumes by volume id. */
  replicas: ReadonlyMap<number, BackingStore>;
  clock?: Clock;
  unitBytes: number;
  historyMs: number;
  sizeLimitBytes: number;
  sizeWarningBytes: number;
}

export type JournalAlertCondition = 'size-warning' | 'history-warning' | 'history-error';

export interface JournalAlert {
  condition: JournalAlertCondition;
  message: string;
}

export type JournalEvent =
  | { type: 'alert-raised'; alert: JournalAlert }
  | { type: 'alert-cleared'; condition: JournalAlertCondition }
  | { type: 'history-shortened'; oldestRecoverableMs: number; configuredHistoryMs: number; actualHistoryMs: number }
  | { type: 'unit-taken'; unit: number; datastore: string }
  | { type: 'unit-released'; unit: number; datastore: string }
  | { type: 'view-invalidated'; view: string; reason: string }
  | { type: 'tail-cut'; unit: number; position: number; reason: string }
  | { type: 'damage-found'; loss: JournalLoss };

export interface JournalStatus {
  name: string;
  configuredHistoryMs: number;
  actualHistoryMs: number;
  oldestRecoverableMs: number;
  sizeBytes: number;
  sizeLimitBytes: number;
  sizeWarningBytes: number;
  units: number;
  records: number;
  durableLsn: number;
  watermarkLsn: number;
  streams: { stream: number; sequenceLast: number; sequencePromoted: number }[];
  alerts: JournalAlert[];
}

export interface CheckpointInfo {
  id: string;
  kind: string;
  name?: string;
  streams: number[];
  /** Source time of the newest of its markers. */
  timeMs: number;
  /** Every stream's marker is durable and none is promoted. */
  recoverable: boolean;
  /** Why it cannot be recovered although its markers were written: a cut on open lost one of them. */
  lost?: string;
}

export type ViewPoint = { timeMs: number } | { checkpoint: string };

export interface OpenViewOptions {
  volume: number;
  at: ViewPoint;
  /** Bytes the view's scratch file may hold. */
  scratchBytesMax: number;
  name?: string;
  /**
   * The target's current image, loss or not (a delta sync's checksums compare it with the source to
   * heal a loss): no refusal for a time inside an unhealed loss. Never for a recovery view.
   */
  currentImage?: boolean;
}

interface Unit extends PoolUnit {
  file: JournalFile;
  /** Where the next record goes (records placed and being written count). */
  writtenBytes: number;
  /** Lsn of the last record placed in the unit (durable or not yet), 0 when none. */
  lastLsn: number;
}

interface QueuedRecord {
  kind: number;
  lsn: number;
  stream: number;
  sequence: number;
  timeMs: number;
  volume: number;
  offset: number;
  lengthBytes: number;
  data: Buffer | undefined;
}

interface QueuedBatch {
  records: QueuedRecord[];
  bytes: number;
  resolve(range: { lsnFirst: number; lsnLast: number }): void;
  reject(error: unknown): void;
}

/** The records of a group that go into one unit, and where. */
interface GroupPart {
  unit: Unit;
  /** Where the part starts and ends in the unit. */
  position: number;
  end: number;
  /** Header and data buffers, back to back from `position`. */
  buffers: Buffer[];
  records: QueuedRecord[];
  positions: number[];
}

/** A group whose records are written and wait for their sync. */
interface WrittenGroup {
  batches: QueuedBatch[];
  parts: GroupPart[];
  bytes: number;
}

interface CheckpointState {
  marker: CheckpointMarker;
  markers: Map<number, { sequence: number; lsn: number; timeMs: number }>;
}

/**
 * The losses the metadata keeps: every unhealed one, and the newest healed ones up to
 * `lossesKeptMax` in all (a healed loss still refuses the points inside it while they are in the window).
 */
function keepLosses(losses: JournalLoss[]): JournalLoss[] {
  const healed = losses.filter((loss) => loss.healedTimeMs !== undefined);
  const room = Math.max(0, lossesKeptMax - (losses.length - healed.length));
  const keptHealed = new Set(healed.slice(-room));
  return losses.filter((loss) => loss.healedTimeMs === undefined || keptHealed.has(loss));
}

/** Where a loss was found, for messages. */
export function describeLossPlace(loss: JournalLoss): string {
  return `the log ended in unit ${loss.unit} at offset ${loss.position}: ${loss.reason}`;
}

/**
 * Syncs of successive groups that may run at once. Each fdatasync waits for its writeback and then
 * for a journal commit and device flushes; with several under way the next group's writeback
 * reaches the device while the one before waits, and waiting syncs share commits. Measured by
 * bench:journal (1 MiB records, 32 MiB in flight, ext4 over virtio, medians of three, one after
 * the other): write and sync in turn as before 1,040 MiB/s; the next write overlapping one sync
 * 1,410; two syncs at a time 1,590; four 1,730 (groups then settle at about 8 MiB); fio 1,750–1,870.
 */
const syncsInFlightMax = 4;

/**
 * While groups sync, the next group is cut from what waits down to this size, not below: a group
 * costs a sync, and below a few MiB the sync's fixed cost outweighs the overlap it buys.
 */
const overlapGroupBytesMin = 4 * 1024 * 1024;

/** Buffers up to this size are copied into one staging buffer before writing (fewer iovecs; memcpy is cheap). */
const coalesceBytesMax = 512;

/** Joins runs of small buffers so that a group of small records is written from a few large buffers. */
function coalesce(buffers: Buffer[]): Buffer[] {
  const out: Buffer[] = [];
  let run: Buffer[] = [];
  let runBytes = 0;
  const flush = (): void => {
    if (run.length === 1) out.push(run[0]!);
    else if (run.length > 1) out.push(Buffer.concat(run, runBytes));
    run = [];
    runBytes = 0;
  };
  for (const buffer of buffers) {
    if (buffer.length > coalesceBytesMax) {
      flush();
      out.push(buffer);
    } else {
      run.push(buffer);
      runBytes += buffer.length;
      if (runBytes >= 8 * 1024 * 1024) flush();
    }
  }
  flush();
  return out;
}

export class Journal {
  readonly name: string;
  readonly unitBytes: number;
  readonly historyMs: number;
  readonly sizeLimitBytes: number;
  readonly sizeWarningBytes: number;
  private readonly fileSystem: JournalFileSystem;
  private readonly pool: JournalPool;
  private readonly directory: string;
  private readonly replicas: ReadonlyMap<number, BackingStore>;
  private readonly clock: Clock;
  private meta: JournalMetadata;
  readonly index: RecordIndex;
  private readonly units: Unit[] = [];
  private readonly unitByNumber = new Map<number, Unit>();
  private spare: Promise<Unit> | undefined;
  private durableLsn: number;
  private queuedLsn: number;
  private readonly streamsDurable = new Map<number, number>();
  private readonly streamsQueued = new Map<number, number>();
  private readonly queue: QueuedBatch[] = [];
  private committing = false;
  /** Wakes the commit loop when it waits for a sync with nothing queued (see `commitLoop`). */
  private batchQueued: (() => void) | undefined;
  private failure: JournalFailedError | undefined;
  private promotion: Promise<void> = Promise.resolve();
  private readonly views = new Set<RecoveryView>();
  private viewNext = 1;
  /** View reads in progress: units are not released under them. */
  viewReadsInFlight = 0;
  private readonly checkpointStates = new Map<string, CheckpointState>();
  private readonly listeners = new Set<(event: JournalEvent) => void>();
  private readonly activeAlerts = new Map<JournalAlertCondition, JournalAlert>();
  private closed = false;
  /** What open found and did (for the caller's log). */
  readonly openReport: {
    recordsScanned: number;
    cut?: { unit: number; position: number; reason: string };
    damage?: JournalLoss;
    /** Damage in records already promoted, passed over (nothing of it is needed). */
    promotedDamage?: { unit: number; position: number; reason: string };
    promotionResumed: boolean;
    unitsDiscarded: number;
  } = {
    recordsScanned: 0,
    promotionResumed: false,
    unitsDiscarded: 0,
  };

  private constructor(options: JournalOptions, meta: JournalMetadata) {
    this.name = options.name;
    this.unitBytes = options.unitBytes;
    this.historyMs = options.historyMs;
    this.sizeLimitBytes = options.sizeLimitBytes;
    this.sizeWarningBytes = options.sizeWarningBytes;
    this.fileSystem = options.fileSystem;
    this.pool = options.pool;
    this.directory = options.directory;
    this.replicas = options.replicas;
    this.clock = options.clock ?? systemClock;
    this.meta = meta;
    this.index = new RecordIndex(meta.watermarkLsn + 1);
    this.durableLsn = meta.watermarkLsn;
    this.queuedLsn = meta.watermarkLsn;
  }

  /** Opens (or creates) a journal, recovering from a crash: scan, cut the torn tail, rebuild the index, finish promotion. */
  static async open(options: JournalOptions): Promise<Journal> {
    const { unitBytes, sizeLimitBytes, sizeWarningBytes } = options;
    if (!(unitBytes >= 4096 && unitBytes <= 0xffff_ffff)) throw new Error(`Cannot open journal '${options.name}' as its unit size ${unitBytes} is outside 4 KiB..4 GiB`);
    if (sizeLimitBytes < sizeLimitUnitsMin * unitBytes) {
      throw new Error(`Cannot open journal '${options.name}' as its hard limit ${sizeLimitBytes} is below ${sizeLimitUnitsMin} units of ${unitBytes} bytes`);
    }
    if (sizeWarningBytes > sizeLimitBytes) throw new Error(`Cannot open journal '${options.name}' as its warning threshold is above its hard limit`);
    for (const [volume] of options.replicas) if (volume > volumeIdMax) throw new Error(`Cannot open journal '${options.name}' as volume id ${volume} is above ${volumeIdMax}`);
    await options.fileSystem.mkdir(options.directory);
    let meta = await readMetadata(options.fileSystem, options.directory);
    if (!meta) {
      meta = {
        version: 1,
        name: options.name,
        createdMs: (options.clock ?? systemClock).nowMs(),
        unitBytes,
        unitDirectories: options.pool.unitDirectories(options.name),
        generation: 0,
        watermarkLsn: 0,
        promotingToLsn: 0,
        unitFirst: 1,
        promotedTimeMsMax: 0,
        streamsPromoted: {},
        historyShortenedMs: 0,
      };
    } else if (meta.unitBytes !== unitBytes) {
      throw new Error(`Cannot open journal '${options.name}' with unit size ${unitBytes} as it was created with ${meta.unitBytes}`);
    }
    const journal = new Journal(options, meta);
    await journal.recover();
    return journal;
  }

  private async recover(): Promise<void> {
    const meta = this.meta;
    // Scratch files of views open at a crash are thrown away, as a closed view's would be.
    for (const name of await this.fileSystem.readdir(this.directory)) {
      if (name.startsWith('scratch-') && name.endsWith('.tmp')) await this.fileSystem.unlink(path.join(this.directory, name));
    }
    const found = await this.pool.discover(this.name, this.unitBytes);
    // Units below unitFirst were released before the crash; their removal may not have reached the disk.
    const stale = found.filter((unit) => unit.number < meta.unitFirst);
    const live = found.filter((unit) => unit.number >= meta.unitFirst);
    for (const unit of stale) await this.pool.giveBack(this.name, unit, this.unitBytes);
    for (let at = 1; at < live.length; at++) {
      if (live[at]!.number !== live[at - 1]!.number + 1) throw new JournalDamagedError(this.name, `unit ${live[at - 1]!.number + 1} is missing`);
    }
    // A process that died may have left writes in the page cache that never reached the disk; they read
    // as if they had, and what is acknowledged after this open must not depend on them. Sync first.
    for (const unit of live) {
      const file = await this.fileSystem.open(unit.path, 'write');
      try {
        await file.fsync();
      } finally {
        await file.close();
      }
    }
    for (const directory of new Set([this.directory, ...live.map((unit) => path.dirname(unit.path))])) await this.fileSystem.fsyncDirectory(directory);
    for (const [stream, sequence] of Object.entries(meta.streamsPromoted)) this.streamsDurable.set(Number(stream), sequence);
    /** Source time of each stream's last record kept (for a loss: from when points are not images of the source). */
    const streamLastTimeMs = new Map<number, number>();
    const onRecord: ScanOptions['onRecord'] = (header, unit, position, data) => {
      if (header.lsn <= meta.watermarkLsn) {
        // Promoted but still in a unit not yet released: not indexed.
        return;
      }
      if (header.lsn !== this.index.lastLsn + 1) {
        throw new JournalDamagedError(this.name, `record ${this.index.lastLsn + 1} is missing (found ${header.lsn} in unit ${unit} at ${position})`);
      }
      this.index.add(header, unit, position);
      this.streamsDurable.set(header.stream, header.sequence);
      streamLastTimeMs.set(header.stream, header.timeMs);
      if (header.kind === RecordKind.checkpoint && data) this.noteMarker(header.stream, header.sequence, header.lsn, header.timeMs, data);
    };
    let scan = await scanUnits({ fileSystem: this.fileSystem, units: live, unitBytes: this.unitBytes, generationMin: 0, onRecord });
    const stopUnit = scan.units[scan.units.length - 1];
    if (stopUnit && scan.lsnLast < meta.watermarkLsn) {
      // The log stopped inside records already promoted (damage there costs nothing): go on from the
      // first record not promoted, wherever it lies, rather than cut everything after it.
      const found = await scanPastEnd({
        fileSystem: this.fileSystem,
        units: [{ ref: stopUnit, from: stopUnit.endPosition }, ...scan.unitsBeyond.map((ref) => ({ ref, from: 0 }))],
        unitBytes: this.unitBytes,
        lsnAfter: meta.watermarkLsn,
        generationMin: 0,
      });
      const first = found.first;
      if (first && first.lsn === meta.watermarkLsn + 1) {
        const rest = await scanUnits({ fileSystem: this.fileSystem, units: live.filter((unit) => unit.number >= first.unit), unitBytes: this.unitBytes, lsnFirst: first.lsn, generationMin: 0, fromPosition: first.position, onRecord });
        const promotedOnly = live
          .filter((unit) => unit.number < first.unit)
          .map((unit) => ({ number: unit.number, path: unit.path, records: 0, firstLsn: 0, lastLsn: 0, endPosition: this.unitBytes, stopReason: 'holds promoted records only', timeMsMin: Infinity, timeMsMax: -Infinity }));
        this.openReport.promotedDamage = { unit: stopUnit.number, position: stopUnit.endPosition, reason: stopUnit.stopReason };
        scan = { ...rest, units: [...promotedOnly, ...rest.units] };
      }
    }
    this.openReport.recordsScanned = scan.units.reduce((sum, unit) => sum + unit.records, 0);
    const firstScanned = scan.units.find((unit) => unit.records > 0);
    if (firstScanned && firstScanned.firstLsn > meta.watermarkLsn + 1) {
      throw new JournalDamagedError(this.name, `records ${meta.watermarkLsn + 1}..${firstScanned.firstLsn - 1} are missing (watermark ${meta.watermarkLsn})`);
    }
    const lsnEnd = Math.max(scan.lsnLast, meta.watermarkLsn);
    this.durableLsn = this.queuedLsn = lsnEnd;
    for (const [stream, sequence] of this.streamsDurable) this.streamsQueued.set(stream, sequence);
    const last = scan.units[scan.units.length - 1];
    // Torn tail or damage? A torn tail is only ever the end of the last group commit, so no record
    // after it can claim to have been written after it was committed, and the metadata's commit
    // point cannot be past it. Whatever lies past the end is searched for such claims, unless a
    // clean close vouches that nothing lies past it.
    const { past, verdict, proofLsn } = await judgeLogEnd(this.fileSystem, scan, meta, this.unitBytes);
    const damaged = verdict === 'damage';
    const stop = { unit: last?.number ?? meta.unitFirst, position: last?.endPosition ?? 0, reason: last?.stopReason ?? 'no storage unit is left' };
    if (damaged || (past !== undefined && past.markers.length > 0)) {
      const loss = this.describeLoss(damaged ? 'damage' : 'tail-cut', stop, lsnEnd, proofLsn, past, streamLastTimeMs);
      if (meta.promotingToLsn > lsnEnd) {
        // A promotion step was applying records past the damage to the replicas when the journal
        // stopped: the replicas may hold part of what is lost, so no point is an image of the source,
        // however old, until the streams heal. The step is finished up to what was kept.
        loss.replicasTouched = true;
        loss.timeMsFrom = 0;
        loss.reason += `; a promotion into the replicas was under way to lsn ${meta.promotingToLsn}, so they may hold part of the lost records`;
        meta.promotingToLsn = lsnEnd;
      }
      // The same loss found again (a crash came before the cut was finished) is merged, never narrowed.
      const again = (meta.losses ?? []).find((earlier) => earlier.lsnFirst === loss.lsnFirst && earlier.kind === loss.kind && earlier.healedTimeMs === undefined);
      if (again) {
        loss.id = again.id;
        loss.lsnLast = Math.max(loss.lsnLast, again.lsnLast);
        loss.timeMsFrom = Math.min(loss.timeMsFrom, again.timeMsFrom);
        loss.streamsUnknown ||= again.streamsUnknown;
        for (const entry of again.streams) if (!loss.streams.some((candidate) => candidate.stream === entry.stream)) loss.streams.push(entry);
        for (const checkpoint of again.checkpoints) if (!loss.checkpoints.some((candidate) => candidate.id === checkpoint.id)) loss.checkpoints.push(checkpoint);
        if (again.replicasTouched) {
          loss.replicasTouched = true;
          loss.timeMsFrom = 0;
        }
        if (again.reason.length > loss.reason.length && again.reason.startsWith(loss.reason)) loss.reason = again.reason;
      }
      meta.losses = keepLosses([...(meta.losses ?? []).filter((earlier) => earlier !== again), loss]);
      // Recorded before anything past the end is cleared: a crash in between finds the same loss again.
      meta.lsnCommitted = lsnEnd;
      delete meta.lsnClosed;
      await this.persist();
      if (damaged) {
        this.openReport.damage = loss;
        this.emit({ type: 'damage-found', loss });
      }
    }
    if (last && verdict !== 'end') {
      this.openReport.cut = { unit: last.number, position: last.endPosition, reason: last.stopReason };
      if (!damaged) this.emit({ type: 'tail-cut', unit: last.number, position: last.endPosition, reason: last.stopReason });
    }
    // Units past the end of the log hold nothing acknowledged.
    for (const beyond of scan.unitsBeyond) {
      const unit = live.find((candidate) => candidate.number === beyond.number)!;
      await this.pool.giveBack(this.name, unit, this.unitBytes);
      this.openReport.unitsDiscarded++;
    }
    for (const scanned of scan.units) {
      const unit: Unit = {
        number: scanned.number,
        path: scanned.path,
        datastore: live.find((candidate) => candidate.number === scanned.number)!.datastore,
        file: await this.fileSystem.open(scanned.path, 'write'),
        writtenBytes: scanned.endPosition,
        lastLsn: scanned.records > 0 ? scanned.lastLsn : 0,
      };
      this.units.push(unit);
      this.unitByNumber.set(unit.number, unit);
    }
    // Clear what lies past a cut (the torn record and anything after it), so that the log ends in
    // zero bytes there: later appends may be shorter than what they overwrite, and a leftover
    // must never read as damage to `journal verify` or to the next open.
    const cutUnit = this.openReport.cut && last ? this.unitByNumber.get(last.number) : undefined;
    if (cutUnit) {
      const zeroes = Buffer.alloc(Math.min(1 << 20, this.unitBytes));
      for (let position = cutUnit.writtenBytes; position < this.unitBytes; position += zeroes.length) {
        await cutUnit.file.pwrite(zeroes.subarray(0, Math.min(zeroes.length, this.unitBytes - position)), position);
      }
      await cutUnit.file.fsync();
    }
    // A new generation makes any record left past the cut stale for good.
    meta.generation = Math.max(meta.generation, scan.generationLast) + 1;
    delete meta.lsnClosed;
    meta.unitDirectories = this.pool.unitDirectories(this.name);
    if (meta.promotingToLsn > meta.watermarkLsn) {
      this.openReport.promotionResumed = true;
      await this.promoteStep(meta.promotingToLsn, false);
    }
    await this.persist();
    if (this.units.length === 0) {
      const first = await this.allocateUnit(Math.max(meta.unitFirst, 1));
      this.units.push(first);
    }
    this.startSpare();
  }

  on(listener: (event: JournalEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private emit(event: JournalEvent): void {
    for (const listener of this.listeners) listener(event);
  }

  private persist(): Promise<void> {
    // Every lsn up to the durable one is acknowledged (or about to be, its sync done): open may rely on it.
    this.meta.lsnCommitted = Math.max(this.meta.lsnCommitted ?? 0, this.durableLsn);
    return writeMetadata(this.fileSystem, this.directory, this.meta);
  }

  /**
   * What a cut at the end of the scanned log loses: the lsn range, the streams that may have lost
   * records (all of them when the records past the end do not show which), the source time from
   * which no point is an image of the source, and the checkpoints whose markers lay past the end.
   */
  private describeLoss(kind: JournalLoss['kind'], stop: { unit: number; position: number; reason: string }, lsnEnd: number, proofLsn: number, past: PastEnd | undefined, streamLastTimeMs: ReadonlyMap<number, number>): JournalLoss {
    const streams: JournalLoss['streams'] = [];
    const known = new Set<number>([...this.streamsDurable.keys(), ...(past?.streams.keys() ?? [])]);
    // Records past the end were seen up to lsnMax; any lsn between it and the proven commit point is unseen (stream unknown).
    const unseenTail = proofLsn > (past?.lsnMax ?? 0);
    let missing = 0;
    for (const stream of [...known].sort((a, b) => a - b)) {
      const sequenceKept = this.streamsDurable.get(stream) ?? 0;
      const seen = past?.streams.get(stream);
      const contiguous = seen !== undefined && seen.sequenceMin === sequenceKept + 1 && seen.records === seen.sequenceMax - seen.sequenceMin + 1;
      if (seen) missing += seen.sequenceMin - sequenceKept - 1 + (seen.sequenceMax - seen.sequenceMin + 1 - seen.records);
      if (!contiguous || unseenTail) streams.push({ stream, sequenceKept, sequenceSeenMax: seen?.sequenceMax ?? 0 });
    }
    const lsnLast = Math.max(proofLsn, past?.lsnMax ?? 0, lsnEnd + 1);
    // The lost lsns the seen gaps do not account for belong to streams no record names.
    const streamsUnknown = unseenTail || lsnLast - lsnEnd - (past?.records ?? 0) > missing;
    const lost = streamsUnknown ? [...known] : streams.map((entry) => entry.stream);
    if (streamsUnknown) for (const stream of known) if (!streams.some((entry) => entry.stream === stream)) streams.push({ stream, sequenceKept: this.streamsDurable.get(stream) ?? 0, sequenceSeenMax: past?.streams.get(stream)?.sequenceMax ?? 0 });
    let timeMsFrom = past && past.records > 0 ? past.timeMsMin : Infinity;
    for (const stream of lost) timeMsFrom = Math.min(timeMsFrom, streamLastTimeMs.get(stream) ?? this.meta.promotedTimeMsMax);
    if (timeMsFrom === Infinity) timeMsFrom = this.meta.promotedTimeMsMax;
    const checkpoints = new Map<string, { id: string; kind: string; name?: string }>();
    for (const marker of past?.markers ?? []) {
      const entry: { id: string; kind: string; name?: string } = { id: marker.id, kind: marker.kind };
      if (marker.name !== undefined) entry.name = marker.name;
      checkpoints.set(marker.id, entry);
    }
    return {
      id: `${kind}-${this.meta.generation}-${lsnEnd + 1}`,
      kind,
      detectedMs: this.clock.nowMs(),
      unit: stop.unit,
      position: stop.position,
      reason: stop.reason,
      lsnFirst: lsnEnd + 1,
      lsnLast,
      timeMsFrom,
      streams: streams.sort((a, b) => a.stream - b.stream),
      streamsUnknown,
      checkpoints: [...checkpoints.values()],
    };
  }

  /** Cuts that open made (damage and torn tails with markers past them), oldest first. */
  losses(): readonly JournalLoss[] {
    return this.meta.losses ?? [];
  }

  /**
   * Says that the streams a damage loss touched have healed: the source resent what differed, and
   * points at or after `healedTimeMs` (source time) are images of the source again.
   */
  async lossHealed(id: string, healedTimeMs: number): Promise<void> {
    // On the promotion queue, like every other metadata write after open.
    const run = this.promotion.then(async () => {
      const loss = this.meta.losses?.find((candidate) => candidate.id === id);
      if (!loss || loss.healedTimeMs !== undefined) return;
      this.meta.losses = this.meta.losses!.map((candidate) => (candidate === loss ? { ...candidate, healedTimeMs } : candidate));
      await this.persist();
    });
    this.promotion = run.catch(() => {});
    await run;
  }

  // ---- units -------------------------------------------------------------

  private async allocateUnit(number: number): Promise<Unit> {
    const { unit, file } = await this.pool.take(this.name, number, this.unitBytes);
    const live: Unit = { ...unit, file, writtenBytes: 0, lastLsn: 0 };
    this.unitByNumber.set(number, live);
    this.emit({ type: 'unit-taken', unit: number, datastore: unit.datastore });
    return live;
  }

  /** Takes the next unit in the background, making room under the hard limit first. */
  private startSpare(): void {
    const number = this.units[this.units.length - 1]!.number + 1;
    const spare = (async () => {
      await this.makeRoom();
      return this.allocateUnit(number);
    })();
    spare.catch(() => {});
    this.spare = spare;
  }

  private async takeSpare(): Promise<Unit> {
    if (!this.spare) this.startSpare();
    const spare = this.spare!;
    this.spare = undefined;
    const unit = await spare;
    this.units.push(unit);
    this.startSpare();
    return unit;
  }

  /** Promotes the oldest units early while one more unit would pass the hard limit. */
  private async makeRoom(): Promise<void> {
    while ((this.units.length + 1) * this.unitBytes > this.sizeLimitBytes) {
      const oldest = this.units[0]!;
      if (this.units.length < 3 || oldest.lastLsn === 0) throw new Error('assertion: hard limit reached with fewer than three units');
      const released = this.units.length;
      await this.promote(oldest.lastLsn, { forced: true });
      if (this.units.length === released) {
        // A view read held the unit; let it finish and try again.
        await new Promise((resolve) => setTimeout(resolve, 1));
      }
    }
  }

  // ---- append and group commit ---------------------------------------------

  /** Appends a batch; resolves once it is durable (after its group's sync). */
  append(records: readonly AppendRecord[]): Promise<{ lsnFirst: number; lsnLast: number }> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.closed) return Promise.reject(new Error(`Cannot append to journal '${this.name}' as it is closed`));
    if (records.length === 0) return Promise.resolve({ lsnFirst: this.queuedLsn + 1, lsnLast: this.queuedLsn });
    const batchBytesMax = Math.floor(this.unitBytes / 2);
    const expected = new Map<number, number>();
    const queued: QueuedRecord[] = [];
    let bytes = 0;
    try {
      for (const record of records) {
        const kind = RecordKind[record.kind];
        if (kind === undefined) throw new InvalidRecordError(`Cannot append a record of unknown kind '${record.kind}'`);
        if (!Number.isInteger(record.stream) || record.stream < 0 || record.stream > streamIdMax) throw new InvalidRecordError(`Cannot append a record of stream ${record.stream}: stream ids are 0..${streamIdMax}`);
        if (!Number.isSafeInteger(record.sequence) || record.sequence < 1) throw new InvalidRecordError(`Cannot append a record of stream ${record.stream} with sequence ${record.sequence}: sequences are integers from 1`);
        const last = expected.get(record.stream) ?? this.streamsQueued.get(record.stream) ?? 0;
        if (record.sequence > last + 1) throw new SequenceGapError(record.stream, last + 1, record.sequence);
        if (record.sequence <= last) throw new DuplicateSequenceError(record.stream, last + 1, record.sequence);
        expected.set(record.stream, record.sequence);
        let data: Buffer | undefined;
        let lengthBytes: number;
        if (kind === RecordKind.checkpoint) {
          if (!record.checkpoint) throw new InvalidRecordError('Cannot append a checkpoint marker without its checkpoint');
          data = encodeMarker(record.checkpoint);
          lengthBytes = data.length;
        } else {
          const replica = this.replicas.get(record.volume);
          if (!replica) throw new InvalidRecordError(`Cannot append a record for volume ${record.volume} as the journal has no replica for it`);
          if (kind === RecordKind.write) {
            if (!record.data) throw new InvalidRecordError('Cannot append a write without data');
            data = record.data;
            lengthBytes = data.length;
          } else lengthBytes = record.lengthBytes ?? -1;
          if (!(Number.isInteger(record.offset) && record.offset >= 0 && lengthBytes > 0 && record.offset + lengthBytes <= replica.sizeBytes)) {
            throw new InvalidRecordError(`Cannot append a ${record.kind} of ${lengthBytes} bytes at ${record.offset} to volume ${record.volume} of ${replica.sizeBytes} bytes`);
          }
        }
        if (!(Number.isInteger(record.timeMs) && record.timeMs >= 0)) throw new InvalidRecordError(`Cannot append a record with source time ${record.timeMs}`);
        bytes += recordHeaderBytes + recordDataBytes(kind, lengthBytes);
        queued.push({ kind, lsn: 0, stream: record.stream, sequence: record.sequence, timeMs: record.timeMs, volume: kind === RecordKind.checkpoint ? 0 : record.volume, offset: kind === RecordKind.checkpoint ? 0 : record.offset, lengthBytes, data });
      }
      if (bytes > batchBytesMax) throw new InvalidRecordError(`Cannot append a batch of ${bytes} bytes: the limit is half a unit, ${batchBytesMax} bytes`);
    } catch (error) {
      return Promise.reject(error);
    }
    for (const record of queued) record.lsn = ++this.queuedLsn;
    for (const [stream, sequence] of expected) this.streamsQueued.set(stream, sequence);
    return new Promise((resolve, reject) => {
      this.queue.push({ records: queued, bytes, resolve, reject });
      if (!this.committing) void this.commitLoop();
      else this.batchQueued?.();
    });
  }

  /**
   * Writes queued batches as groups and syncs each group as soon as it is written, so that the
   * CPU work and the copy into the page cache of one group overlap the syncs of the groups before,
   * and up to `syncsInFlightMax` syncs overlap each other (the second one's writeback goes to the
   * device while the first waits for its journal commit). A group is acknowledged only when a sync
   * that began after its write completed has finished, and groups are acknowledged in order. The
   * groups not yet acknowledged stay within `unsyncedBytesMax()`, which keeps the crash analysis
   * of open (everything not yet synced lies within half a unit) true.
   */
  private async commitLoop(): Promise<void> {
    this.committing = true;
    /** Syncs under way, oldest first; each acknowledges its group (or fails it) and never rejects. */
    const syncs: { done: Promise<void>; bytes: number; finished: boolean }[] = [];
    let unackedBytes = 0;
    const settle = (): void => {
      while (syncs.length > 0 && syncs[0]!.finished) unackedBytes -= syncs.shift()!.bytes;
    };
    try {
      for (;;) {
        settle();
        if (this.failure) {
          for (const batch of this.queue.splice(0)) batch.reject(this.failure);
          break;
        }
        const next = this.queue[0];
        if (next === undefined) {
          if (syncs.length === 0) break;
          // Batches acknowledged by a sync come back while the next one runs; waiting for the sync
          // alone would leave them queued through it.
          await Promise.race([syncs[0]!.done, new Promise<void>((resolve) => (this.batchQueued = resolve))]);
          this.batchQueued = undefined;
          continue;
        }
        if (syncs.length > 0 && unackedBytes + next.bytes > this.unsyncedBytesMax()) {
          await syncs[0]!.done;
          continue;
        }
        // While groups sync, the next one takes a share of what is unacknowledged (one per sync
        // that may run at once, but never less than `overlapGroupBytesMin`), so that the syncs
        // carry similar loads. Taking all that waited would lock into alternating tiny and huge
        // groups (the batches one sync acknowledges all come back while the next is written), and
        // a tiny group's sync hides little of a huge group's.
        let groupBytesMax = this.unsyncedBytesMax() - unackedBytes;
        if (syncs.length > 0) {
          let queuedBytes = 0;
          for (const batch of this.queue) queuedBytes += batch.bytes;
          const shareBytes = Math.ceil((unackedBytes + queuedBytes) / syncsInFlightMax);
          groupBytesMax = Math.min(groupBytesMax, Math.max(next.bytes, overlapGroupBytesMin, shareBytes));
        }
        const group: QueuedBatch[] = [];
        let bytes = 0;
        while (this.queue.length > 0 && (group.length === 0 || bytes + this.queue[0]!.bytes <= groupBytesMax)) {
          bytes += this.queue[0]!.bytes;
          group.push(this.queue.shift()!);
        }
        unackedBytes += bytes;
        let written: WrittenGroup;
        try {
          written = await this.writeGroup(group);
        } catch (error) {
          // The groups before are acknowledged (or failed) first, so that what is durable is what was written.
          await Promise.all(syncs.map((sync) => sync.done));
          syncs.length = 0;
          unackedBytes = 0;
          const rest = [...group, ...this.queue.splice(0)];
          if (this.failure) {
            for (const batch of rest) batch.reject(this.failure);
          } else if (error instanceof DatastoreFullError) {
            // Nothing of the group was written: forget the queued state and refuse every waiting batch.
            this.queuedLsn = this.durableLsn;
            this.streamsQueued.clear();
            for (const [stream, sequence] of this.streamsDurable) this.streamsQueued.set(stream, sequence);
            for (const batch of rest) batch.reject(error);
          } else {
            // After a failed write or sync the page cache cannot be trusted: stop until reopened.
            this.failure = new JournalFailedError(this.name, error);
            for (const batch of rest) batch.reject(this.failure);
          }
          continue;
        }
        settle();
        if (syncs.length >= syncsInFlightMax) {
          await syncs[0]!.done;
          settle();
        }
        const sync = { done: Promise.resolve(), bytes, finished: false };
        sync.done = this.syncGroup(written, syncs[syncs.length - 1]?.done).then(() => {
          sync.finished = true;
        });
        syncs.push(sync);
      }
    } finally {
      this.committing = false;
    }
  }

  /**
   * Bytes of records that may be written but not yet covered by a finished sync: half a unit, so
   * that a torn record and every record written after it lie within half a unit (see `recover`).
   */
  private unsyncedBytesMax(): number {
    return Math.floor(this.unitBytes / 2);
  }

  /** Places the group's records (taking the spare when the current unit is full), encodes their headers and writes them. */
  private async writeGroup(group: QueuedBatch[]): Promise<WrittenGroup> {
    let unit = this.units[this.units.length - 1]!;
    const parts: GroupPart[] = [];
    let part: GroupPart = { unit, position: unit.writtenBytes, end: unit.writtenBytes, buffers: [], records: [], positions: [] };
    let position = unit.writtenBytes;
    let recordCount = 0;
    let bytes = 0;
    for (const batch of group) {
      recordCount += batch.records.length;
      bytes += batch.bytes;
    }
    const headers = Buffer.allocUnsafe(recordCount * recordHeaderBytes);
    let headerAt = 0;
    for (const batch of group) {
      for (const record of batch.records) {
        const size = recordHeaderBytes + recordDataBytes(record.kind, record.lengthBytes);
        if (position + size > this.unitBytes) {
          if (part.records.length > 0) parts.push(part);
          unit = await this.takeSpare();
          position = 0;
          part = { unit, position: 0, end: 0, buffers: [], records: [], positions: [] };
        }
        encodeHeaderAt(headers, headerAt, record, unit.number, this.meta.generation, record.data, this.durableLsn);
        part.buffers.push(headers.subarray(headerAt, headerAt + recordHeaderBytes));
        headerAt += recordHeaderBytes;
        if (record.data) part.buffers.push(record.data);
        part.records.push(record);
        part.positions.push(position);
        position += size;
        part.end = position;
      }
    }
    if (part.records.length > 0) parts.push(part);
    // Placement is settled: the next group goes after this one even before this one is durable. A
    // unit's last lsn counts these records at once, so that it is not released before they are promoted.
    for (const placed of parts) {
      placed.unit.writtenBytes = placed.end;
      placed.unit.lastLsn = placed.records[placed.records.length - 1]!.lsn;
    }
    await Promise.all(parts.map((placed) => placed.unit.file.pwrite(coalesce(placed.buffers), placed.position)));
    return { batches: group, parts, bytes };
  }

  /**
   * Syncs every unit the group touched, waits for the group before (`previous`) to be settled, then
   * indexes and acknowledges it; a failed sync fails the journal and every group after it.
   */
  private async syncGroup(group: WrittenGroup, previous: Promise<void> | undefined): Promise<void> {
    let error: unknown;
    try {
      await Promise.all(group.parts.map((part) => part.unit.file.fsync()));
    } catch (caught) {
      error = caught;
    }
    await previous;
    if (error !== undefined) this.failure ??= new JournalFailedError(this.name, error);
    if (this.failure) {
      for (const batch of group.batches) batch.reject(this.failure);
      return;
    }
    for (const part of group.parts) {
      const unitNumber = part.unit.number;
      for (let i = 0; i < part.records.length; i++) {
        const record = part.records[i]!;
        this.index.add(record, unitNumber, part.positions[i]!);
        this.streamsDurable.set(record.stream, record.sequence);
        if (record.kind === RecordKind.checkpoint) this.noteMarker(record.stream, record.sequence, record.lsn, record.timeMs, record.data!);
      }
    }
    const lastBatch = group.batches[group.batches.length - 1]!;
    this.durableLsn = lastBatch.records[lastBatch.records.length - 1]!.lsn;
    this.evaluateAlerts();
    for (const batch of group.batches) batch.resolve({ lsnFirst: batch.records[0]!.lsn, lsnLast: batch.records[batch.records.length - 1]!.lsn });
  }

  // ---- checkpoints -----------------------------------------------------------

  private noteMarker(stream: number, sequence: number, lsn: number, timeMs: number, data: Buffer): void {
    const marker = decodeMarker(data);
    let state = this.checkpointStates.get(marker.id);
    if (!state) {
      state = { marker, markers: new Map() };
      this.checkpointStates.set(marker.id, state);
    } else {
      // A later marker knows every source that had connected by then (one that had not is stream 0 in an earlier marker).
      state.marker = { ...state.marker, streams: marker.streams };
    }
    state.markers.set(stream, { sequence, lsn, timeMs });
  }

  /** Every checkpoint marker record the journal holds (not promoted), in lsn order. */
  markerRecords(): { id: string; kind: string; name?: string; heal?: string; stream: number; lsn: number; timeMs: number }[] {
    const out: { id: string; kind: string; name?: string; heal?: string; stream: number; lsn: number; timeMs: number }[] = [];
    for (const [id, state] of this.checkpointStates) {
      for (const [stream, marker] of state.markers) {
        if (marker.lsn <= this.meta.watermarkLsn) continue;
        const record: { id: string; kind: string; name?: string; heal?: string; stream: number; lsn: number; timeMs: number } = { id, kind: state.marker.kind, stream, lsn: marker.lsn, timeMs: marker.timeMs };
        if (state.marker.name !== undefined) record.name = state.marker.name;
        if (state.marker.heal !== undefined) record.heal = state.marker.heal;
        out.push(record);
      }
    }
    return out.sort((a, b) => a.lsn - b.lsn);
  }

  /** Checkpoints whose markers are in the journal, oldest first. */
  checkpoints(): CheckpointInfo[] {
    const out: CheckpointInfo[] = [];
    for (const [id, state] of this.checkpointStates) {
      let timeMs = 0;
      let complete = true;
      let promoted = false;
      for (const stream of state.marker.streams) {
        const marker = state.markers.get(stream);
        if (!marker) {
          complete = false;
          continue;
        }
        timeMs = Math.max(timeMs, marker.timeMs);
        if (marker.lsn <= this.meta.watermarkLsn) promoted = true;
      }
      const info: CheckpointInfo = { id, kind: state.marker.kind, streams: state.marker.streams, timeMs, recoverable: complete && !promoted };
      if (state.marker.name !== undefined) info.name = state.marker.name;
      const lost = this.lostCheckpoints().get(id) ?? this.replicasTouchedBy(timeMs);
      if (lost) {
        info.recoverable = false;
        info.lost = lost.why;
      }
      out.push(info);
    }
    for (const [id, lost] of this.lostCheckpoints()) {
      if (this.checkpointStates.has(id)) continue;
      const info: CheckpointInfo = { id, kind: lost.kind, streams: [], timeMs: lost.timeMs, recoverable: false, lost: lost.why };
      if (lost.name !== undefined) info.name = lost.name;
      out.push(info);
    }
    return out.sort((a, b) => a.timeMs - b.timeMs);
  }

  /** A loss that left the replicas holding part of its records spoils every point before its heal. */
  private replicasTouchedBy(timeMs: number): { why: string } | undefined {
    for (const loss of this.meta.losses ?? []) {
      if (!loss.replicasTouched || (loss.healedTimeMs !== undefined && timeMs >= loss.healedTimeMs)) continue;
      return { why: `the replicas may hold part of journal records ${loss.lsnFirst}..${loss.lsnLast}, which were lost (${describeLossPlace(loss)})` };
    }
    return undefined;
  }

  /** Checkpoints a cut on open lost a marker of, with why (newest loss wins). */
  private lostCheckpoints(): Map<string, { kind: string; name?: string; timeMs: number; why: string }> {
    const out = new Map<string, { kind: string; name?: string; timeMs: number; why: string }>();
    for (const loss of this.meta.losses ?? []) {
      const why = loss.kind === 'damage'
        ? `a marker of it was lost with journal records ${loss.lsnFirst}..${loss.lsnLast}: ${describeLossPlace(loss)}`
        : `a marker of it lay past a torn tail cut on open (${describeLossPlace(loss)}); it was never acknowledged`;
      for (const checkpoint of loss.checkpoints) {
        // Markers past a torn tail were never acknowledged: the source sends them again, and once they
        // are here the checkpoint is whole again.
        if (loss.kind === 'tail-cut' && this.checkpointStates.has(checkpoint.id)) continue;
        const entry: { kind: string; name?: string; timeMs: number; why: string } = { kind: checkpoint.kind, timeMs: loss.timeMsFrom, why };
        if (checkpoint.name !== undefined) entry.name = checkpoint.name;
        out.set(checkpoint.id, entry);
      }
    }
    return out;
  }

  // ---- promotion ---------------------------------------------------------------

  /** Promotes aged records and re-evaluates alerts; the owner calls it on its own schedule. */
  async tick(): Promise<void> {
    const cutoffMs = this.clock.nowMs() - this.historyMs;
    let target = this.meta.watermarkLsn;
    for (let lsn = Math.max(target + 1, this.index.baseLsn); lsn <= this.durableLsn; lsn++) {
      const { chunk, at } = this.index.locate(lsn);
      if (chunk.timeMs[at]! >= cutoffMs) break;
      target = lsn;
    }
    if (target > this.meta.watermarkLsn) await this.promote(target, { forced: false });
    else if (this.durableLsn > (this.meta.lsnCommitted ?? 0) && !this.failure && !this.closed) {
      // The commit point in the metadata is what proves damage in the last groups of a journal that
      // crashed (nothing after them claims them): keep it within one tick of the log's end. On the
      // promotion queue, so that metadata writes never overlap.
      const run = this.promotion.then(() => this.persist());
      this.promotion = run.catch(() => {});
      await run;
    }
    this.evaluateAlerts();
  }

  /**
   * Promotes records through `lsn`. Unforced promotion stops where an open view
   * needs the replica unchanged; forced promotion (the hard limit) goes on and
   * invalidates such views.
   */
  promote(lsn: number, options: { forced: boolean }): Promise<void> {
    const run = this.promotion.then(() => this.promoteNow(lsn, options.forced));
    this.promotion = run.catch(() => {});
    return run;
  }

  private async promoteNow(lsnTarget: number, forced: boolean): Promise<void> {
    if (this.failure) throw this.failure;
    let target = Math.min(lsnTarget, this.durableLsn);
    for (const view of this.views) {
      if (view.capLsn >= target) continue;
      if (forced) {
        const reason = `the hard size limit promoted the journal to lsn ${target}, past the view's point`;
        view.invalidate(reason);
        this.emit({ type: 'view-invalidated', view: view.name, reason });
      } else target = Math.min(target, view.capLsn);
    }
    while (this.meta.watermarkLsn < target) {
      const stepEnd = Math.min(target, this.meta.watermarkLsn + promoteStepRecordsMax);
      this.meta.promotingToLsn = stepEnd;
      await this.persist();
      await this.promoteStep(stepEnd, forced);
      await this.persist();
      await this.releaseUnits();
    }
    // Units held back by a view read last time go now.
    await this.releaseUnits();
    this.forgetPromotedCheckpoints();
  }

  /**
   * Checkpoints whose every marker is promoted are listed (not recoverable) until
   * `promotedCheckpointsListedMax` newer ones are promoted too; older ones are forgotten, so that
   * the list and its memory do not grow for the life of the journal.
   */
  private forgetPromotedCheckpoints(): void {
    const promoted: { id: string; lsn: number }[] = [];
    for (const [id, state] of this.checkpointStates) {
      let lsnMax = 0;
      let all = state.markers.size > 0;
      for (const marker of state.markers.values()) {
        if (marker.lsn > this.meta.watermarkLsn) {
          all = false;
          break;
        }
        lsnMax = Math.max(lsnMax, marker.lsn);
      }
      if (all) promoted.push({ id, lsn: lsnMax });
    }
    if (promoted.length <= promotedCheckpointsListedMax) return;
    promoted.sort((a, b) => a.lsn - b.lsn);
    for (const { id } of promoted.slice(0, promoted.length - promotedCheckpointsListedMax)) this.checkpointStates.delete(id);
  }

  /**
   * Applies records (watermark, end] to the replicas, flushes them and moves the watermark (in memory).
   * Records that lie one after another in a unit are read with one pread of up to
   * `promoteReadBytesMax`; a write, zero or trim that a later record of the step replaces exactly
   * (same volume, offset and length) is not applied, as the later one decides the range.
   */
  private async promoteStep(end: number, forced: boolean): Promise<void> {
    const meta = this.meta;
    const touched = new Set<BackingStore>();
    const replacedLsns = this.replacedWithinStep(meta.watermarkLsn + 1, end);
    let lsn = meta.watermarkLsn + 1;
    while (lsn <= end) {
      const run: IndexEntry[] = [];
      let runUnit = 0;
      let runStart = 0;
      let runEnd = 0;
      let runHasData = false;
      for (; lsn <= end; lsn++) {
        if (!this.index.has(lsn)) throw new JournalDamagedError(this.name, `record ${lsn} to promote is not in the journal`);
        const entry = this.index.get(lsn);
        const size = recordHeaderBytes + recordDataBytes(entry.kind, entry.lengthBytes);
        if (run.length > 0 && (entry.unit !== runUnit || entry.position !== runEnd || runEnd + size - runStart > promoteReadBytesMax)) break;
        if (run.length === 0) {
          runUnit = entry.unit;
          runStart = runEnd = entry.position;
        }
        run.push(entry);
        runEnd += size;
        if (entry.kind === RecordKind.write && !replacedLsns.has(lsn)) runHasData = true;
      }
      const records = runHasData ? Buffer.allocUnsafe(runEnd - runStart) : undefined;
      if (records) await this.readUnitBytes(runUnit, runStart, records);
      for (const entry of run) {
        const replica = this.replicas.get(entry.volume);
        if (entry.kind !== RecordKind.checkpoint && !replacedLsns.has(entry.lsn)) {
          if (!replica) throw new JournalDamagedError(this.name, `record ${entry.lsn} is for volume ${entry.volume}, which has no replica`);
          touched.add(replica);
          if (entry.kind === RecordKind.write) {
            const dataAt = entry.position - runStart + recordHeaderBytes;
            await replica.write(records!.subarray(dataAt, dataAt + entry.lengthBytes), entry.offset);
          } else if (entry.kind === RecordKind.zero) {
            await replica.writeZeroes(entry.offset, entry.lengthBytes, { mayDeallocate: false, fastOnly: false });
          } else {
            await replica.trim(entry.offset, entry.lengthBytes);
          }
        }
        meta.streamsPromoted[entry.stream] = entry.sequence;
        meta.promotedTimeMsMax = Math.max(meta.promotedTimeMsMax, entry.timeMs);
      }
    }
    for (const replica of touched) await replica.flush();
    meta.watermarkLsn = end;
    meta.promotingToLsn = 0;
    if (forced) {
      meta.historyShortenedMs = this.clock.nowMs();
      const status = this.status();
      this.emit({ type: 'history-shortened', oldestRecoverableMs: status.oldestRecoverableMs, configuredHistoryMs: this.historyMs, actualHistoryMs: status.actualHistoryMs });
    }
    this.index.dropThrough(end);
  }

  /** Gives back units whose records are all promoted (never the current one, nor under a view read). */
  private async releaseUnits(): Promise<void> {
    let count = 0;
    while (count < this.units.length - 1 && this.units[count]!.lastLsn <= this.meta.watermarkLsn && this.viewReadsInFlight === 0) count++;
    if (count === 0) return;
    const released = this.units.splice(0, count);
    this.meta.unitFirst = this.units[0]!.number;
    await this.persist();
    for (const unit of released) {
      this.unitByNumber.delete(unit.number);
      await unit.file.close();
      await this.pool.giveBack(this.name, unit, this.unitBytes);
      this.emit({ type: 'unit-released', unit: unit.number, datastore: unit.datastore });
    }
  }

  /** Lsns in [first, last] whose write, zero or trim a later record in the range replaces exactly. */
  private replacedWithinStep(first: number, last: number): Set<number> {
    const replaced = new Set<number>();
    const latest = new Map<string, number>();
    for (let lsn = last; lsn >= first; lsn--) {
      if (!this.index.has(lsn)) continue; // promoteStep reports the gap
      const entry = this.index.get(lsn);
      if (entry.kind === RecordKind.checkpoint) continue;
      const key = `${entry.volume}:${entry.offset}:${entry.lengthBytes}`;
      if (latest.has(key)) replaced.add(lsn);
      else latest.set(key, lsn);
    }
    return replaced;
  }

  /** Reads `target.length` bytes of a unit from `position` (whole records, headers included). */
  private async readUnitBytes(unitNumber: number, position: number, target: Buffer): Promise<void> {
    const unit = this.unitByNumber.get(unitNumber);
    if (!unit) throw new Error(`assertion: unit ${unitNumber} is not held`);
    const got = await unit.file.pread(target, position);
    if (got !== target.length) throw new JournalDamagedError(this.name, `short read in unit ${unitNumber} at ${position}`);
  }

  /** Like `readRecordData`, from the page cache only and at once; false when it could not. */
  readRecordDataCached(unitNumber: number, position: number, dataOffset: number, target: Buffer): boolean {
    const unit = this.unitByNumber.get(unitNumber);
    return unit?.file.preadCached?.(target, position + recordHeaderBytes + dataOffset) ?? false;
  }

  /** Reads `target.length` bytes of a record's data, from `dataOffset` into it. */
  async readRecordData(unitNumber: number, position: number, dataOffset: number, target: Buffer): Promise<void> {
    const unit = this.unitByNumber.get(unitNumber);
    if (!unit) throw new Error(`assertion: unit ${unitNumber} is not held`);
    const got = await unit.file.pread(target, position + recordHeaderBytes + dataOffset);
    if (got !== target.length) throw new JournalDamagedError(this.name, `short read in unit ${unitNumber} at ${position}`);
  }

  // ---- status and alerts ------------------------------------------------------

  get watermarkLsn(): number {
    return this.meta.watermarkLsn;
  }

  get lsnDurable(): number {
    return this.durableLsn;
  }

  get generation(): number {
    return this.meta.generation;
  }

  /**
   * Source time of the newest record of `stream` the journal holds (an upper bound, the newest
   * promoted time, when all of it was promoted); undefined when it holds nothing of it.
   */
  streamNewestTimeMs(stream: number): number | undefined {
    for (let lsn = this.durableLsn; lsn > this.meta.watermarkLsn && lsn >= this.index.baseLsn; lsn--) {
      const { chunk, at } = this.index.locate(lsn);
      if (chunk.stream[at] === stream) return chunk.timeMs[at]!;
    }
    return this.streamPromoted(stream) > 0 ? this.meta.promotedTimeMsMax : undefined;
  }

  streamPromoted(stream: number): number {
    return this.meta.streamsPromoted[stream] ?? 0;
  }

  status(): JournalStatus {
    const nowMs = this.clock.nowMs();
    const oldestRecoverableMs = this.meta.watermarkLsn > 0 ? this.meta.promotedTimeMsMax : this.meta.createdMs;
    const unitsHeld = this.units.length + (this.spareReady ? 1 : 0);
    const streams = [...this.streamsDurable].sort((a, b) => a[0] - b[0]).map(([stream, sequenceLast]) => ({ stream, sequenceLast, sequencePromoted: this.streamPromoted(stream) }));
    return {
      name: this.name,
      configuredHistoryMs: this.historyMs,
      actualHistoryMs: Math.max(0, nowMs - oldestRecoverableMs),
      oldestRecoverableMs,
      sizeBytes: unitsHeld * this.unitBytes,
      sizeLimitBytes: this.sizeLimitBytes,
      sizeWarningBytes: this.sizeWarningBytes,
      units: unitsHeld,
      records: this.durableLsn - this.meta.watermarkLsn,
      durableLsn: this.durableLsn,
      watermarkLsn: this.meta.watermarkLsn,
      streams,
      alerts: [...this.activeAlerts.values()],
    };
  }

  private get spareReady(): boolean {
    return this.pool.usage().journals[this.name]!.units > this.units.length;
  }

  private evaluateAlerts(): void {
    const status = this.status();
    const conditions = new Map<JournalAlertCondition, string>();
    if (status.sizeBytes > this.sizeWarningBytes) {
      conditions.set('size-warning', `Journal '${this.name}' holds ${status.sizeBytes} bytes, over its warning threshold of ${this.sizeWarningBytes} (limit ${this.sizeLimitBytes})`);
    }
    const expectedMs = Math.min(this.historyMs, this.clock.nowMs() - this.meta.createdMs);
    if (expectedMs > 0) {
      const ratio = status.actualHistoryMs / expectedMs;
      const text = `Journal '${this.name}' covers ${Math.round(status.actualHistoryMs / 1000)} s of history, ${Math.round(ratio * 100)} % of the ${Math.round(expectedMs / 1000)} s expected`;
      if (ratio < historyErrorRatio) conditions.set('history-error', text);
      else if (ratio < historyWarningRatio) conditions.set('history-warning', text);
    }
    for (const [condition, message] of conditions) {
      if (!this.activeAlerts.has(condition)) {
        const alert = { condition, message };
        this.activeAlerts.set(condition, alert);
        this.emit({ type: 'alert-raised', alert });
      }
    }
    for (const condition of [...this.activeAlerts.keys()]) {
      if (!conditions.has(condition)) {
        this.activeAlerts.delete(condition);
        this.emit({ type: 'alert-cleared', condition });
      }
    }
  }

  // ---- views -----------------------------------------------------------------------

  /** Builds a recovery view of a volume from the index alone. */
  openView(options: OpenViewOptions): Promise<RecoveryView> {
    // Built on the promotion queue: no promotion starts between reading the watermark and registering the view.
    const opened = this.promotion.then(() => this.openViewNow(options));
    this.promotion = opened.then(() => {}, () => {});
    return opened;
  }

  private async openViewNow(options: OpenViewOptions): Promise<RecoveryView> {
    const replica = this.replicas.get(options.volume);
    if (!replica) throw new Error(`Cannot open a view of volume ${options.volume} as journal '${this.name}' has no replica for it`);
    const cut = new Float64Array(streamIdMax + 1);
    let timeMs: number | undefined;
    let what: string;
    if ('checkpoint' in options.at) {
      what = `checkpoint '${options.at.checkpoint}'`;
      const state = this.checkpointStates.get(options.at.checkpoint);
      const info = this.checkpoints().find((checkpoint) => checkpoint.id === (options.at as { checkpoint: string }).checkpoint);
      if (info?.lost) throw new RecoveryPointUnavailableError(what, info.lost);
      if (!state || !info) throw new RecoveryPointUnavailableError(what, 'the journal holds no marker of it');
      if (info.lost) throw new RecoveryPointUnavailableError(what, info.lost);
      if (!info.recoverable) throw new RecoveryPointUnavailableError(what, 'not every stream has its marker durable, or it was promoted');
      for (const [stream] of this.streamsDurable) cut[stream] = this.streamPromoted(stream);
      for (const stream of state.marker.streams) cut[stream] = state.markers.get(stream)!.sequence - 1;
      // A stream the checkpoint does not name (a source's earlier epoch, which ended before its
      // current one began) counts up to the checkpoint's last marker in journal order: leaving it at
      // its promoted point would serve the replica's older bytes where that epoch wrote.
      const named = new Set(state.marker.streams);
      let lsnMarkerMax = 0;
      for (const stream of named) lsnMarkerMax = Math.max(lsnMarkerMax, state.markers.get(stream)!.lsn);
      for (let lsn = Math.max(this.meta.watermarkLsn + 1, this.index.baseLsn); lsn < lsnMarkerMax; lsn++) {
        const { chunk, at } = this.index.locate(lsn);
        const stream = chunk.stream[at]!;
        if (!named.has(stream)) cut[stream] = chunk.sequence[at]!;
      }
      for (const [stream] of this.streamsDurable) {
        if (cut[stream]! < this.streamPromoted(stream)) throw new RecoveryPointUnavailableError(what, `stream ${stream} was promoted past it`);
      }
    } else {
      timeMs = options.at.timeMs;
      what = `time ${new Date(timeMs).toISOString()}`;
      const oldest = this.status().oldestRecoverableMs;
      if (this.meta.watermarkLsn > 0 && timeMs < oldest) {
        throw new RecoveryPointUnavailableError(what, `the oldest recoverable point is ${new Date(oldest).toISOString()}`);
      }
      for (const loss of options.currentImage ? [] : this.meta.losses ?? []) {
        if (loss.kind !== 'damage' || timeMs < loss.timeMsFrom || (loss.healedTimeMs !== undefined && timeMs >= loss.healedTimeMs)) continue;
        const until = loss.healedTimeMs === undefined ? 'the streams heal' : new Date(loss.healedTimeMs).toISOString();
        throw new RecoveryPointUnavailableError(what, `journal records ${loss.lsnFirst}..${loss.lsnLast} were lost (${describeLossPlace(loss)}): no point from ${new Date(loss.timeMsFrom).toISOString()} until ${until} is an image of the source`);
      }
      cut.fill(Infinity);
    }
    const name = options.name ?? `${this.name}-view-${this.viewNext++}`;
    if (!/^[A-Za-z0-9._-]{1,128}$/.test(name)) throw new Error(`Cannot open a view named '${name}': use 1 to 128 letters, digits, '.', '_' or '-'`);
    if ([...this.views].some((view) => view.name === name)) throw new Error(`Cannot open a view named '${name}' as one with that name is open`);
    const host: ViewHost = {
      journal: this,
      replica,
      fileSystem: this.fileSystem,
      scratchPath: path.join(this.directory, `scratch-${name}.tmp`),
      closed: (view) => this.views.delete(view),
    };
    const view = await RecoveryView.build({ host, name, volume: options.volume, cut, timeMs, lsnLast: this.durableLsn, scratchBytesMax: options.scratchBytesMax });
    this.views.add(view);
    return view;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    while (this.committing) await new Promise((resolve) => setTimeout(resolve, 1));
    await this.promotion;
    for (const view of [...this.views]) await view.close();
    if (!this.failure) {
      // Nothing lies past the durable end: the next open need not search past it, and damage before it is proven.
      this.meta.lsnClosed = this.durableLsn;
      await this.persist().catch(() => {
        delete this.meta.lsnClosed;
      });
    }
    const spare = this.spare;
    this.spare = undefined;
    if (spare) {
      try {
        this.units.push(await spare);
      } catch {
        // A spare that could not be taken leaves nothing to close.
      }
    }
    for (const unit of this.units) await unit.file.close();
  }
}
