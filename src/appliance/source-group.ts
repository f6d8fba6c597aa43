/**
 * A protection group in the source role on this appliance: its volumes' taps
 * feed one stream queue, a shipper sends the queue to the target appliance,
 * and a dirty-region log remembers which regions hold writes the target has
 * not acknowledged.
 *
 * Stacking per volume, from the NBD server down:
 *   quiesce gate → tap → dirty gate (marks the region durable first) → file
 *
 * Sessions and sync. Every start of the group is a new protection session with
 * a new epoch: the target gives it a stream of its own starting at sequence 1,
 * so what the previous process queued but never had acknowledged can neither
 * be lost silently nor applied twice. What the new session must send first:
 *   - nothing, after a clean stop (the dirty-region log is empty);
 *   - the regions of the dirty-region log, after a crash (bitmap resync);
 *   - the whole volume, the first time the group is protected or when an
 *     initial sync never finished (initial sync);
 *   - every block that differs from the target (delta sync), when the state
 *     owes one: the dirty-region log was damaged, a volume was served without
 *     protection since the group last ran, or an operator asked, and the end of
 *     that delta sync has not been acknowledged yet.
 * A sync reads through the tap (`readForSync`), so its reads take their place
 * in the stream between the guest's writes and the target applies both in the
 * right order. While a sync runs the group is not consistent at the target:
 * the stream carries `sync-begin` and `sync-end` markers around it.
 */
import * as crypto from 'node:crypto';
import * as path from 'node:path';
import { writeDataLength, type BackingStore, type Extent, type WriteData, type ZeroOptions } from '../tap/backing-store.js';
import { Tap, type TapConsumer, type TapEvent } from '../tap/tap.js';
import type { JournalFileSystem } from '../journal/file-system.js';
import type { Logger } from '../util/logger.js';
import { readStateFile, writeStateFile } from '../util/state-file.js';
import type { LinkConnector } from '../replication/link.js';
import { TokenBucket } from '../replication/rate.js';
import { sleep, type Scheduler } from '../replication/scheduler.js';
import { Shipper, type ShipperStats } from '../replication/shipper.js';
import { StreamQueue, type ByteRange } from '../replication/queue.js';
import { blockSumBytes, blockSums, type LossReported, type PreviousEpoch, type Welcome } from '../replication/wire.js';
import { DirtyGateStore, DirtyLogDamagedError, DirtyRegionLog } from '../replication/dirty-log.js';
import type { ProtectConfig } from './config.js';

/** Largest write entry in the stream; a larger guest write is split (journal units must hold whole records). */
export const streamEntryDataBytesMax = 1024 * 1024;
/** A sync reads (and ships) the volume in pieces of this size. */
export const syncPieceBytes = 1024 * 1024;
/** A sync waits while the queue holds more than this, so it never pushes the queue into bitmap mode. */
export const syncQueuedBytesMax = 32 * 1024 * 1024;
/** A failed sync starts again after this pause. */
export const syncRetryDelayMs = 5_000;
/** How often the group checks its queue's mode and pending resyncs. */
export const maintenanceIntervalMs = 200;
/** How often at most the group state records the sequence the target acknowledged (a lower bound is enough). */
export const acknowledgedRecordMs = 5_000;
/** Extents looked at per sync piece. */
export const syncExtentsMax = 64;
/** How long a quiesce may hold write completions at most, whatever the caller asks. */
export const quiesceMsMax = 60_000;

export type SyncState = 'initial-sync' | 'resync' | 'delta-sync' | 'in-sync';

/** Block size of delta sync: the source and the target compare one checksum per block. */
export const deltaBlockBytes = 64 * 1024;
/** Checksum requests a delta sync keeps in flight ahead of the piece it works on, so that a long round trip is paid once per window of pieces rather than once per piece. */
export const deltaSumsAheadMax = 8;
/** Attempts at a piece's checksums (the link may be down) before the piece is shipped whole. */
export const deltaSumsAttemptsMax = 40;

export interface SyncProgress {
  state: SyncState;
  /** Why the current sync runs (undefined once the group is in sync: see `last`). */
  reason: string | undefined;
  /** Bytes of the volumes the sync covers, has covered (read, or found to read as zeroes) and has left. */
  bytesTotal: number;
  bytesDone: number;
  bytesLeft: number;
  /**
   * Bytes the sync read from the volumes so far: ranges that hold data (initial sync, resync), every
   * byte compared (delta sync). Ranges the volume reports as holes or zeroes are not read (they go as
   * zero entries) and are not counted.
   */
  bytesRead?: number;
  /** `bytesRead` per second over the sync so far: what the sync costs the volumes' storage (a sparse volume is covered far faster). */
  rateBytesPerSecond: number;
  /**
   * Estimated time left, ms: `bytesLeft` at the pace the sync has covered the volumes so far (read or
   * skipped as zeroes), so it assumes the rest holds data in the proportion seen so far (undefined
   * until there is progress).
   */
  etaMs: number | undefined;
  startedMs: number | undefined;
  /** Delta sync: bytes whose checksum matched the target's (not shipped), and bytes shipped. */
  delta?: { bytesMatched: number; bytesShipped: number; piecesShippedWhole: number };
  /** In sync after a sync of this run: which one ended last, why it ran, and when it ended (the figures above are its). */
  last?: { state: SyncState; reason: string | undefined; endedMs: number };
}

export interface SourceVolume {
  /** Id within the group (index in the group's volume list). */
  id: number;
  name: string;
  /** The file (or any store) under the stack. */
  file: BackingStore;
}

export interface SourceGroupOptions {
  config: ProtectConfig;
  site: string;
  appliance: string;
  volumes: SourceVolume[];
  /** `<data>/source/<group>/`: dirty-region log, spill file, group state. */
  directory: string;
  fileSystem: JournalFileSystem;
  scheduler: Scheduler;
  connect: LinkConnector;
  /** The appliance-wide bandwidth limit (shared by every group). */
  applianceRateLimit: TokenBucket;
  logger: Logger;
  /**
   * Volumes of the group whose writes went elsewhere since the group last ran: served without
   * protection (`group` null) or protected by another group. The group's state cannot account for
   * those writes, so a group past its initial sync owes a delta sync of every volume.
   */
  writtenElsewhere?: { volume: string; group: string | null; sinceMs: number }[];
}

/** What a sync's acknowledged end settles in the group's state. */
interface SyncSettles {
  /** The initial sync is done. */
  initial: boolean;
  /**
   * The owed delta sync it settles, by generation (`SourceGroup.deltaOwedGeneration` when the sync
   * started), or undefined: a delta sync owed after this one started is not settled by its end.
   */
  delta: number | undefined;
}

/** What two syncs settle together (a follow-up resync settles what the sync it completes would have). */
function mergeSettles(a: SyncSettles | undefined, b: SyncSettles): SyncSettles {
  if (!a) return b;
  const delta = a.delta === undefined ? b.delta : b.delta === undefined ? a.delta : Math.max(a.delta, b.delta);
  return { initial: a.initial || b.initial, delta };
}

type SyncRegion = { volume: number; offset: number; lengthBytes: number };

interface SyncPlan {
  state: SyncState;
  reason: string;
  regions: SyncRegion[];
  settles: SyncSettles;
}

interface SourceGroupState {
  version: 1;
  createdMs: number;
  /** The first full sync reached the end; until then every start syncs the whole volume again. */
  initialSyncDone: boolean;
  /**
   * Why a delta sync of every volume is owed (the dirty-region log was damaged, a volume was served
   * without protection, an operator asked), until the end of one is acknowledged: a start while it
   * is owed runs it again, since a delta sync leaves no trace in the dirty-region log of the blocks
   * it has not compared yet.
   */
  deltaSyncOwed?: string;
  /**
   * What the target had acknowledged of the current epoch when last recorded (at most every
   * `acknowledgedRecordMs`, and at stop): the next start's HELLO tells it, so that a target that lost
   * acknowledged entries while this appliance was down says so, instead of the loss passing unseen.
   */
  acknowledged?: { epoch: string; sequence: number };
  /**
   * A flush of the source volumes failed (when, and the error): writes made before it may be missing
   * from the volumes although the target holds them, and no later flush proves otherwise, so the
   * next start owes a delta sync, which compares what the volumes really hold with the target.
   */
  volumeFlushFailed?: string;
}

/** Holds new write completions while a quiesce is on (the checkpoint engine's hold). */
class QuiesceGate implements BackingStore {
  private hold: Promise<void> | undefined;

  constructor(private readonly inner: Tap) {}

  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  setHold(hold: Promise<void> | undefined): void {
    this.hold = hold;
  }
  private async after(done: Promise<void>): Promise<void> {
    await done;
    while (this.hold) await this.hold;
  }
  read(target: Buffer, offset: number): Promise<void> {
    return this.inner.read(target, offset);
  }
  write(data: WriteData, offset: number): Promise<void> {
    return this.after(this.inner.write(data, offset));
  }
  writeZeroes(offset: number, lengthBytes: number, options: ZeroOptions): Promise<void> {
    return this.after(this.inner.writeZeroes(offset, lengthBytes, options));
  }
  trim(offset: number, lengthBytes: number): Promise<void> {
    return this.after(this.inner.trim(offset, lengthBytes));
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  cache(offset: number, lengthBytes: number): Promise<void> {
    return this.inner.cache(offset, lengthBytes);
  }
  extents(offset: number, lengthBytes: number, extentCountMax: number): Extent[] {
    return this.inner.extents(offset, lengthBytes, extentCountMax);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

export interface SourceGroupStatus {
  group: string;
  role: 'source';
  epoch: string;
  target: string;
  sync: SyncProgress;
  queue: ReturnType<StreamQueue['stats']>;
  /** The dirty-region log: regions a crash now would resync, and how marks went (fast: region already durable; slow: a log write and sync). */
  dirtyLog: ReturnType<DirtyRegionLog['stats']>;
  shipper: ShipperStats;
  rpoMs: number;
  rpoMsTarget: number;
  rpoMet: boolean;
  /** Bytes per second shipped (wire bytes, after compression) over the last interval. */
  throughputBytesPerSecond: number;
  /** Raw bytes over wire bytes, of everything shipped. */
  compressionRatio: number;
  rateLimitBytesPerSecond: number;
  quiesced: boolean;
  volumes: { id: number; name: string; sizeBytes: number }[];
  /** Active alerts: the target lost entries it had acknowledged, until the delta sync that heals them is acknowledged. */
  alerts: { condition: string; severity: 'warning' | 'error'; message: string; sinceMs: number }[];
}

export class SourceGroup {
  readonly name: string;
  readonly config: ProtectConfig;
  /** The current protection session (changes when the queue had to discard entries). */
  epoch: string;
  /** The stores the NBD server exports, by volume name. */
  readonly exports = new Map<string, BackingStore>();
  private readonly options: SourceGroupOptions;
  private readonly queue: StreamQueue;
  private readonly dirtyLog: DirtyRegionLog;
  private shipper: Shipper;
  private readonly taps = new Map<number, Tap>();
  private readonly gates = new Map<number, QuiesceGate>();
  readonly rateLimit: TokenBucket;
  private state: SourceGroupState;
  private sync: SyncProgress = { state: 'in-sync', reason: undefined, bytesTotal: 0, bytesDone: 0, bytesLeft: 0, rateBytesPerSecond: 0, etaMs: undefined, startedMs: undefined };
  private syncRunning: Promise<void> | undefined;
  private stopping = false;
  private releaseQuiesce: (() => void) | undefined;
  private quiesceTimer: ReturnType<Scheduler['setTimer']> | undefined;
  private throughputSample = { timeMs: 0, wireBytes: 0, bytesPerSecond: 0 };
  /** Ranges to resync that no sync has taken yet (failed writes, a queue in bitmap mode). */
  private resyncPending: SyncRegion[] = [];
  private resyncPendingReason: string | undefined;
  /** Whether the last checksum request of a delta sync was answered. */
  private deltaAnswered = true;
  /** Checksum requests sent ahead for the pieces a delta sync works on next, by `volume:offset:length`. */
  private readonly deltaAhead = new Map<string, Promise<Buffer>>();
  /** A delta sync was asked for and is being recorded as owed (a second request is refused meanwhile). */
  private deltaRequested = false;
  /** When `stop` gives up waiting for the target (see `limitDrain`). */
  private drainUntilMs = Infinity;
  private volumeFlushFailedThisRun = false;
  /** The group's protection is being removed: quiesces are refused. */
  private ending = false;
  /** The sync `begin` starts (decided at open, its begin marker already queued). */
  private syncAtBegin: SyncPlan | undefined;
  /** Counts the delta syncs owed in this run: a sync's end settles the debt only if none was owed after it started. */
  private deltaOwedGeneration = 0;
  /**
   * Source time of the oldest write the queue discarded (bitmap mode) whose resync has not been
   * acknowledged yet: the RPO counts it, since the target has no newer copy of that region.
   */
  private resyncOldestTimeMs: number | undefined;
  /** The sequence whose acknowledgement ends `resyncOldestTimeMs` (the end marker of the resync that covers it). */
  private resyncOldestClearAt: number | undefined;
  /**
   * A sync ended after the queue had discarded entries: the next resync must run (with the discarded
   * ranges, or none) so that its end settles this one's regions in the dirty-region log, and what
   * this one would have settled in the group's state (the initial sync, an owed delta sync).
   */
  private resyncFollowUp: SyncSettles | undefined;
  /** The sequence of the last `sync-end` marker this group queued (0: none yet). */
  private syncEndSequenceLast = 0;
  /** A sync's end marker, and what its acknowledgement settles in the group's state (persisted then). */
  private syncEndPending: { sequence: number; settles: SyncSettles; started: number } | undefined;
  private stateWriting: Promise<void> = Promise.resolve();
  private maintenanceTimer: ReturnType<Scheduler['setTimer']> | undefined;
  /**
   * A sync's piece size and the queue level it waits at, scaled down for a small queue so that a
   * sync alone never overflows it (a 1 MiB piece could never fit a 1 MiB queue without a spill).
   */
  private readonly syncPieceBytes: number;
  private readonly syncQueuedBytesMax: number;
  /** Wire bytes shipped by shippers of earlier epochs (for the totals). */
  private readonly shippedBefore = { rawBytesSent: 0, wireBytesSent: 0 };

  private constructor(options: SourceGroupOptions, queue: StreamQueue, dirtyLog: DirtyRegionLog, state: SourceGroupState) {
    this.options = options;
    this.config = options.config;
    this.name = options.config.group;
    this.queue = queue;
    this.dirtyLog = dirtyLog;
    this.state = state;
    this.epoch = `${options.scheduler.nowMs().toString(36)}-${crypto.randomBytes(6).toString('hex')}`;
    this.rateLimit = new TokenBucket(options.scheduler, options.config.rateLimitBytesPerSecond);
    const { memoryBytesMax, spillBytesMax } = options.config.queue;
    this.syncPieceBytes = Math.max(4096, Math.min(syncPieceBytes, Math.floor(memoryBytesMax / 4 / 4096) * 4096));
    this.syncQueuedBytesMax = Math.min(syncQueuedBytesMax, Math.floor((memoryBytesMax + spillBytesMax) / 2));
    const consumer: TapConsumer = { accept: (event) => this.accept(event) };
    for (const volume of options.volumes) {
      const gated = new DirtyGateStore(volume.file, { log: dirtyLog, volume: volume.id });
      const tap = new Tap(gated, { volume: volume.name, consumer, clock: options.scheduler });
      const gate = new QuiesceGate(tap);
      this.taps.set(volume.id, tap);
      this.gates.set(volume.id, gate);
      this.exports.set(volume.name, gate);
    }
    this.shipper = this.makeShipper(0, undefined, state.acknowledged && state.acknowledged.sequence > 0 ? { epoch: state.acknowledged.epoch, sequenceAcknowledged: state.acknowledged.sequence } : undefined);
  }

  private makeShipper(sequenceBase: number, lossReported?: LossReported, previousEpoch?: PreviousEpoch): Shipper {
    const options = this.options;
    this.shipperCarries = lossReported ?? previousEpoch;
    return new Shipper({
      hello: {
        site: options.site,
        appliance: options.appliance,
        group: this.name,
        epoch: this.epoch,
        sequenceBase,
        volumes: options.volumes.map((volume) => ({ id: volume.id, name: volume.name, sizeBytes: volume.file.sizeBytes })),
        ...(lossReported ? { lossReported } : {}),
        ...(previousEpoch ? { previousEpoch } : {}),
      },
      queue: this.queue,
      connect: options.connect,
      scheduler: options.scheduler,
      codec: options.config.codec,
      rateLimits: [options.applianceRateLimit, this.rateLimit],
      linkSilenceMs: options.config.linkSilenceMs,
      logger: options.logger,
      onAcknowledged: (sequence) => {
        this.dirtyLog.acknowledged(sequence);
        this.acknowledged(sequence);
      },
      onWelcome: (welcome) => this.targetWelcomed(welcome),
      onTargetLost: (loss) => this.targetLost(loss),
    });
  }

  /** The target lost entries it had acknowledged, while this group was waiting for them to be healed (cleared when the owed delta sync is acknowledged). */
  private targetLoss: { message: string; sinceMs: number; syncsStartedAtLoss: number } | undefined;
  /** The target's token for the heal (from its WELCOME): the begin marker of a sync of every volume that starts after it carries it. */
  private healToken: string | undefined;
  /** Syncs started in this run; a loss is healed only by a sync of every volume started after it was noted. */
  private syncsStarted = 0;
  /** What the current shipper's HELLO carried of an earlier epoch (a reported loss or the previous epoch's acknowledgement). */
  private shipperCarries: PreviousEpoch | undefined;
  /** Source time from which the target lacks entries it had acknowledged (the RPO counts from it until the heal is acknowledged). */
  private lossOldestTimeMs: number | undefined;
  private noteTargetLoss(message: string): void {
    // A loss noted again while an earlier one heals restarts the heal: only a sync begun after it counts.
    const syncsStartedAtLoss = this.syncsStarted;
    if (this.targetLoss) {
      this.targetLoss.syncsStartedAtLoss = syncsStartedAtLoss;
      return;
    }
    this.targetLoss = { message, sinceMs: this.options.scheduler.nowMs(), syncsStartedAtLoss };
    this.options.logger.error('the target lost entries it had acknowledged: a delta sync heals them', { group: this.name, reason: message });
  }

  /**
   * Owes the sync that heals a loss at the target: a delta sync of every volume, or, before the
   * initial sync is done, a resync of every volume after the one under way (it may have begun before
   * the loss). A delta sync that waits to start will do; one running began before the loss.
   */
  private async oweHeal(message: string): Promise<void> {
    if (!this.state.initialSyncDone) {
      this.resyncPending.push(...this.everyVolume());
      this.resyncFollowUp = mergeSettles(this.resyncFollowUp, { initial: true, delta: undefined });
      this.resyncPendingReason ??= message;
      return;
    }
    if (this.deltaSyncWaiting()) return;
    try {
      await this.oweDeltaSync(message);
    } catch (error) {
      // Owed in memory still (the next start does not know): the delta sync runs in this run.
      this.options.logger.error('cannot record the delta sync owed to heal the target; it runs all the same', { group: this.name, error: (error as Error).message });
    }
  }

  /**
   * The target's WELCOME says it holds less of this epoch than it acknowledged. Those entries are
   * gone from the queue and their regions from the dirty-region log, so the stream cannot go on in
   * this epoch: a new one starts right after what this side saw acknowledged (the queue resends
   * everything after it), its HELLO reports the loss so that the target opens a window from what it
   * still holds, and a delta sync of every volume, owed durably first, finds and resends what differs.
   */
  private targetLost(loss: LossReported & { target: string }): void {
    // A session change under way (a queue overflow's) carries what this epoch had acknowledged in its HELLO.
    if (this.stopping || this.sessionChanging) return;
    this.sessionChanging = true;
    const message = `the target '${loss.target}' holds sequence ${loss.sequenceDurable} of epoch ${loss.epoch} but had acknowledged ${loss.sequenceAcknowledged}`;
    this.noteTargetLoss(message);
    // Until the new epoch's WELCOME says from when the target lacks them, the RPO counts from now at least.
    this.lossOldestTimeMs = Math.min(this.lossOldestTimeMs ?? Infinity, this.options.scheduler.nowMs());
    void (async () => {
      const old = this.shipper;
      await old.stop();
      const stats = old.stats();
      this.shippedBefore.rawBytesSent += stats.rawBytesSent;
      this.shippedBefore.wireBytesSent += stats.wireBytesSent;
      await this.oweHeal(message);
      if (this.stopping) return;
      this.epoch = `${this.options.scheduler.nowMs().toString(36)}-${crypto.randomBytes(6).toString('hex')}`;
      this.shipper = this.makeShipper(loss.sequenceAcknowledged, { epoch: loss.epoch, sequenceDurable: loss.sequenceDurable, sequenceAcknowledged: loss.sequenceAcknowledged });
      this.shipper.start();
      this.options.logger.warn('new session after the target lost acknowledged entries', { group: this.name, epoch: this.epoch, resumeAfter: loss.sequenceAcknowledged });
    })()
      .catch((error: unknown) => this.options.logger.error('cannot start the session that heals the target', { group: this.name, error: (error as Error).message }))
      .finally(() => {
        this.sessionChanging = false;
      });
  }

  /**
   * The target says a sync window of this appliance is open there. A sync running, waiting or owed
   * here ends it, as does a `sync-end` still on its way; when none is, the window would stay open for
   * good (every later point unrecoverable), as after a crash that came between a `sync-begin` and
   * its resync's end when the resync had nothing to read. Then an empty resync runs: the dirty-region
   * log still owes every region the target has not acknowledged, so nothing else is missing there,
   * and its end closes the window.
   */
  private targetWelcomed(welcome: Welcome): void {
    const window = welcome.syncWindowOpen;
    if (!window || this.stopping) return;
    if (window.deltaSyncNeeded) {
      // The target lost records it had acknowledged (it found damage in its journal): only a delta sync
      // that begins now tells what differs. One running began before the target knew; one waiting will do.
      const since = new Date(window.beginTimeMs).toISOString();
      const message = `the target '${welcome.appliance}' lost records it had acknowledged; no point there from ${since} is recoverable until a delta sync ends`;
      this.noteTargetLoss(message);
      // From the start of the protection means the target holds no image of it at all: count from when protection began.
      this.lossOldestTimeMs = Math.min(this.lossOldestTimeMs ?? Infinity, Math.max(window.beginTimeMs, this.state.createdMs));
      if (window.healToken !== undefined) this.healToken = window.healToken;
      void this.oweHeal(message);
      return;
    }
    if (this.syncEndSequenceLast > welcome.sequenceDurable) return;
    if (this.syncActive || this.sync.state !== 'in-sync' || this.syncRetry || this.resyncFollowUp || this.resyncPending.length > 0) return;
    if (this.overflowUnderway() || this.deltaSyncWaiting()) return;
    const since = window.beginTimeMs === 0 ? 'the start of the protection' : new Date(window.beginTimeMs).toISOString();
    this.resyncFollowUp = { initial: false, delta: undefined };
    this.resyncPendingReason = `the target holds the ${window.sync} window open since ${since}, and no sync here would end it`;
    this.options.logger.warn('the target holds a sync window open that no sync here would end: an empty resync ends it', { group: this.name, sync: window.sync, beginTimeMs: window.beginTimeMs });
  }

  /**
   * Opens the group's state, dirty-region log and queue, and builds its stores (`exports`), without
   * shipping or syncing yet: an appliance that already serves the volumes switches their exports to
   * these stores first, then calls `begin`, so that no sync read can miss a write made beside the tap.
   * Records in the group's state, before anything else, a delta sync owed for a damaged dirty-region
   * log or for volumes served without protection.
   */
  static async open(options: SourceGroupOptions): Promise<SourceGroup> {
    const { fileSystem, directory } = options;
    // Assigned once the dirty-region log is open (its flush callback needs the group).
    let group: SourceGroup;
    await fileSystem.mkdir(directory);
    const statePath = path.join(directory, 'state.json');
    const stored = await readStateFile<SourceGroupState>(fileSystem, statePath);
    const state: SourceGroupState = stored ?? { version: 1, createdMs: options.scheduler.nowMs(), initialSyncDone: false };
    // Before the initial sync is done every start ships every block anyway.
    if (!state.initialSyncDone) delete state.volumeFlushFailed;
    if (!stored) await writeStateFile(fileSystem, statePath, state);
    const dirtyLogOptions = {
      fileSystem,
      directory: path.join(directory, 'dirty-log'),
      scheduler: options.scheduler,
      volumes: new Map(options.volumes.map((volume) => [volume.id, volume.file.sizeBytes])),
      // A region is cleared only once its acknowledged writes are durable on the volume too (see dirty-log.ts).
      flushVolumes: () => group.flushVolumes(),
      onVolumeFlushFailed: (error: unknown) => group.recordVolumeFlushFailed(error),
    };
    let dirtyLog: DirtyRegionLog;
    let dirtyLogDamaged: string | undefined;
    try {
      dirtyLog = await DirtyRegionLog.open(dirtyLogOptions);
    } catch (error) {
      if (!(error instanceof DirtyLogDamagedError)) throw error;
      // The regions the target may lack are unknown: start a new log and compare every block with
      // the target (delta sync) instead of trusting the damaged one or shipping every block.
      dirtyLogDamaged = error.message;
      options.logger.warn('the dirty-region log is damaged; a delta sync of every volume follows', { group: options.config.group, error: error.message });
      dirtyLog = await DirtyRegionLog.open({ ...dirtyLogOptions, discardExisting: true });
    }
    const queue = await StreamQueue.open({
      name: options.config.group,
      fileSystem,
      spillDirectory: path.join(directory, 'spill'),
      volumes: new Map(options.volumes.map((volume) => [volume.id, volume.file.sizeBytes])),
      memoryBytesMax: options.config.queue.memoryBytesMax,
      spillBytesMax: options.config.queue.spillBytesMax,
      sequenceNext: 1,
      clock: options.scheduler,
    });
    group = new SourceGroup(options, queue, dirtyLog, state);
    const elsewhere = options.writtenElsewhere ?? [];
    let owed: string | undefined;
    if (dirtyLogDamaged !== undefined) owed = `the dirty-region log could not be trusted after a crash (${dirtyLogDamaged})`;
    else if (state.volumeFlushFailed !== undefined) owed = `a flush of the source volumes failed in an earlier run (${state.volumeFlushFailed})`;
    else if (elsewhere.length > 0) {
      owed = elsewhere
        .map((entry) => `volume '${entry.volume}' ${entry.group === null ? 'served without protection' : `protected by group '${entry.group}'`} since ${new Date(entry.sinceMs).toISOString()}`)
        .join('; ');
    }
    if (owed !== undefined && state.initialSyncDone) {
      // The delta sync owed now is what an earlier run's failed flush called for (one in this run is recorded again).
      delete group.state.volumeFlushFailed;
      try {
        await group.oweDeltaSync(owed);
      } catch (error) {
        await group.close();
        throw error;
      }
    }
    // The sync's window at the target opens before any write reaches the stream: an appliance that
    // serves the volumes switches them to this group's stores before `begin`, and a write completed in
    // between would otherwise sit before the window, at a point claimed consistent although the target
    // lacks what the sync is for. The sync's own begin marker then extends the same window.
    group.syncAtBegin = group.syncOwedAtOpen();
    if (group.syncAtBegin) group.pushMarker('sync-begin', group.syncMarkerName(group.syncAtBegin.state, group.syncAtBegin.settles));
    return group;
  }

  /** Starts shipping, and the sync the group's state owes. */
  begin(): void {
    this.shipper.start();
    const sync = this.syncAtBegin;
    this.syncAtBegin = undefined;
    if (sync) this.startSync(sync.state, sync.reason, sync.regions, sync.settles);
    this.maintain();
  }

  /** The tap's events, in order per volume. */
  private accept(event: TapEvent): void {
    const volume = this.volumeIdOf(event.volume);
    if (event.kind === 'failed') {
      // A sync read that failed: the sync fails with it and starts again; the region was never marked.
      if (event.origin === 'sync') return;
      // The store failed the mutation: the range's content is unknown, so it must be read and sent again.
      this.options.logger.error('a write failed at the source; its range will be resynced', { group: this.name, volume: event.volume, offset: event.offset, lengthBytes: event.lengthBytes });
      this.dirtyLog.noteWritten(volume, event.offset, event.lengthBytes, undefined);
      this.resyncPending.push({ volume, offset: event.offset, lengthBytes: event.lengthBytes });
      this.resyncPendingReason ??= 'a write failed at the source backing store';
      return;
    }
    let sequence: number | undefined;
    if (event.kind === 'write' && event.data !== undefined) {
      // Blocks that hold only zeroes travel as zero entries (a few bytes each, no journal data, and a
      // zero range at the target): every one a sync reads; of a guest's write, all of it or long runs.
      sequence = this.pushData(volume, event.offset, event.data, event.sourceTimeMs, event.origin === 'sync' ? syncZeroBlockBytes : guestZeroRunBytesMin);
    } else {
      const input: Parameters<StreamQueue['push']>[0] = { kind: event.kind, volume, offset: event.offset, lengthBytes: event.lengthBytes, timeMs: event.sourceTimeMs };
      if (event.data !== undefined) input.data = event.data;
      sequence = this.queue.push(input);
    }
    // One note per guest write, with its last entry's sequence (acknowledgements are cumulative). A sync read
    // copies the volume's current content and passed no mark, so it is not noted (see dirty-log.ts).
    if (event.origin !== 'sync') this.dirtyLog.noteWritten(volume, event.offset, event.lengthBytes, sequence);
    const dataBytes = event.data !== undefined ? event.lengthBytes : 0;
    this.shipper.wake(dataBytes, Math.max(1, Math.ceil(dataBytes / streamEntryDataBytesMax)));
  }

  /**
   * Queues written data as zero entries for its whole zero blocks and write entries (at most
   * `streamEntryDataBytesMax` each, so that every journal record fits well inside a unit) for the
   * rest. Returns the last entry's sequence, or undefined when the queue discarded any of them.
   */
  private pushData(volume: number, offset: number, data: WriteData, timeMs: number, zeroRunBytesMin: number): number | undefined {
    const lengthBytes = writeDataLength(data);
    // Most data holds no zero run to send as such: it goes as it came (a write in the socket's chunks is not copied).
    if (lengthBytes <= streamEntryDataBytesMax && !holdsZeroRun(data, zeroRunBytesMin)) return this.queue.push({ kind: 'write', volume, offset, lengthBytes, timeMs, data });
    const whole = Buffer.isBuffer(data) ? data : Buffer.concat(data);
    let sequence: number | undefined;
    let discarded = false;
    for (const run of zeroAndDataRuns(whole, zeroRunBytesMin)) {
      if (run.zero) {
        sequence = this.queue.push({ kind: 'zero', volume, offset: offset + run.at, lengthBytes: run.lengthBytes, timeMs });
        if (sequence === undefined) discarded = true;
        continue;
      }
      for (let at = run.at; at < run.at + run.lengthBytes; at += streamEntryDataBytesMax) {
        const pieceBytes = Math.min(streamEntryDataBytesMax, run.at + run.lengthBytes - at);
        sequence = this.queue.push({ kind: 'write', volume, offset: offset + at, lengthBytes: pieceBytes, timeMs, data: whole.subarray(at, at + pieceBytes) });
        if (sequence === undefined) discarded = true;
      }
    }
    return discarded ? undefined : sequence;
  }

  /**
   * Runs every maintenanceIntervalMs: when the queue had to discard entries (bitmap mode), the
   * stream cannot continue in this epoch, so the group starts a new session whose first job is
   * to resync the discarded regions; pending resyncs start once no sync runs.
   */
  /** When the acknowledged sequence was last recorded in the group state. */
  private acknowledgedRecordedMs = 0;

  /** Records what the target acknowledged of this epoch, if it moved (see `SourceGroupState.acknowledged`). */
  private recordAcknowledged(): Promise<void> | undefined {
    const sequence = this.shipper.stats().sequenceAcknowledged;
    const recorded = this.state.acknowledged;
    if (sequence === 0 || (recorded?.epoch === this.epoch && recorded.sequence >= sequence)) return undefined;
    this.acknowledgedRecordedMs = this.options.scheduler.nowMs();
    this.state = { ...this.state, acknowledged: { epoch: this.epoch, sequence } };
    return this.writeState('the sequence the target acknowledged');
  }

  private maintain(): void {
    if (this.stopping) return;
    if (this.options.scheduler.nowMs() - this.acknowledgedRecordedMs >= acknowledgedRecordMs) void this.recordAcknowledged()?.catch(() => undefined);
    try {
      if (this.queue.mode === 'bitmap') {
        void this.newSessionAfterBitmap();
      } else if (this.syncRetry && !this.syncActive && this.options.scheduler.nowMs() >= this.syncRetry.atMs) {
        const retry = this.syncRetry;
        this.syncRetry = undefined;
        this.startSync(this.sync.state === 'in-sync' ? 'resync' : this.sync.state, this.sync.reason ?? 'retry', retry.regions, retry.settles);
      } else if (this.awaitingHealToken()) {
        // A heal is owed: its sync starts once the target's WELCOME gave the token that lets it end the loss window.
      } else if ((this.resyncPending.length > 0 || this.resyncFollowUp) && this.sync.state === 'in-sync' && !this.syncActive) {
        const regions = this.resyncPending;
        const settles = this.resyncFollowUp ?? { initial: false, delta: undefined };
        this.resyncPending = [];
        this.resyncFollowUp = undefined;
        this.startSync('resync', this.resyncPendingReason ?? 'the previous sync ended after the queue discarded entries', regions, settles);
        this.resyncPendingReason = undefined;
      } else if (this.deltaSyncWaiting()) {
        this.startSync('delta-sync', this.state.deltaSyncOwed!, this.everyVolume(), { initial: false, delta: this.deltaOwedGeneration });
      }
    } finally {
      this.maintenanceTimer = this.options.scheduler.setTimer(maintenanceIntervalMs, () => this.maintain());
    }
  }

  /** The target lost entries, and no WELCOME of the current session has come yet to say how to heal them. */
  private awaitingHealToken(): boolean {
    return this.targetLoss !== undefined && this.healToken === undefined && this.shipper.state !== 'streaming';
  }

  /** The group's state owes a delta sync that neither runs nor waits for an acknowledgement, and nothing else runs. */
  private deltaSyncWaiting(): boolean {
    if (this.state.deltaSyncOwed === undefined || !this.state.initialSyncDone || this.deltaRequested) return false;
    if (this.syncActive || this.sync.state !== 'in-sync' || this.syncRetry || this.resyncFollowUp || this.resyncPending.length > 0) return false;
    return this.syncEndPending?.settles.delta !== this.deltaOwedGeneration;
  }

  /** The queue is discarding entries, or the new session after that has not begun yet. */
  private overflowUnderway(): boolean {
    return this.queue.mode === 'bitmap' || this.sessionChanging;
  }

  /** Every volume of the group, whole (what an initial or delta sync covers). */
  private everyVolume(): SyncRegion[] {
    return this.options.volumes.map((volume) => ({ volume: volume.id, offset: 0, lengthBytes: volume.file.sizeBytes }));
  }

  private sessionChanging = false;
  private syncRetry: { regions: SyncRegion[]; settles: SyncSettles; atMs: number } | undefined;
  private syncActive = false;

  private async newSessionAfterBitmap(): Promise<void> {
    if (this.sessionChanging) return;
    this.sessionChanging = true;
    try {
      const old = this.shipper;
      await old.stop();
      const stats = old.stats();
      this.shippedBefore.rawBytesSent += stats.rawBytesSent;
      this.shippedBefore.wireBytesSent += stats.wireBytesSent;
      const regions = this.queue.takeResyncRegions();
      const sequenceBase = regions.sequenceDiscardedLast >= regions.sequenceDiscardedFirst ? regions.sequenceDiscardedLast : this.queue.sequenceLast;
      // The new session's first entry opens (or extends) a sync window at the target: until the resync of the
      // discarded ranges ends, no point after them is an image of the source, even one before that resync starts.
      this.pushMarker('sync-begin', this.syncMarkerName('resync', { initial: false, delta: undefined }));
      // A resync runs even when nothing was discarded but markers: its end closes the window.
      this.resyncFollowUp ??= { initial: false, delta: undefined };
      // The new session's WELCOME acknowledges the discarded sequences: their regions must be owed a resync
      // in the dirty-region log before (the resync of the discarded ranges clears them when it ends).
      this.dirtyLog.beginResync();
      if (this.syncEndPending !== undefined) {
        // The end of an initial or delta sync was not acknowledged, so the queue discarded part of it: the
        // resync of the discarded ranges settles what that sync would have.
        const { settles } = this.syncEndPending;
        this.syncEndPending = undefined;
        this.resyncFollowUp = mergeSettles(this.resyncFollowUp, settles);
      }
      // The new epoch's HELLO says what the target had acknowledged of the old one (or what the old one's
      // HELLO carried, when it never got an acknowledgement): a target that lost any of it says so.
      const carried: PreviousEpoch | undefined = stats.sequenceAcknowledged > 0 ? { epoch: this.epoch, sequenceAcknowledged: stats.sequenceAcknowledged } : this.shipperCarries;
      this.epoch = `${this.options.scheduler.nowMs().toString(36)}-${crypto.randomBytes(6).toString('hex')}`;
      this.shipper = this.makeShipper(sequenceBase, undefined, carried);
      this.shipper.start();
      this.options.logger.warn('queue overflowed: new session with a resync of the discarded regions', { group: this.name, epoch: this.epoch, reason: regions.reason, resyncBytes: regions.resyncBytes });
      for (const [volume, ranges] of regions.volumes) for (const range of ranges) this.resyncPending.push({ volume, offset: range.offset, lengthBytes: range.lengthBytes });
      this.resyncPendingReason = `the queue discarded entries: ${regions.reason}`;
      this.resyncOldestTimeMs = Math.min(this.resyncOldestTimeMs ?? Infinity, regions.oldestTimeMs ?? this.options.scheduler.nowMs());
      this.resyncOldestClearAt = undefined;
    } finally {
      this.sessionChanging = false;
    }
  }

  private volumeIdOf(name: string): number {
    for (const volume of this.options.volumes) if (volume.name === name) return volume.id;
    throw new Error(`Volume '${name}' is not in group '${this.name}'`);
  }

  private pushMarker(kind: string, name?: string, heal?: string): { id: string; sequence: number } {
    const id = `${kind}-${this.options.scheduler.nowMs()}-${crypto.randomBytes(4).toString('hex')}`;
    const checkpoint: { id: string; kind: string; name?: string; heal?: string } = { id, kind };
    if (name !== undefined) checkpoint.name = name;
    if (heal !== undefined) checkpoint.heal = heal;
    const sequence = this.queue.push({ kind: 'checkpoint', volume: 0, offset: 0, lengthBytes: 0, timeMs: this.options.scheduler.nowMs(), checkpoint });
    this.shipper.wake();
    return { id, sequence: sequence ?? 0 };
  }

  /** The sync the group's state and dirty-region log owe when the group opens, if any. */
  private syncOwedAtOpen(): SyncPlan | undefined {
    if (!this.state.initialSyncDone) {
      return { state: 'initial-sync', reason: 'the group has not completed an initial sync', regions: this.everyVolume(), settles: { initial: true, delta: this.deltaOwedGeneration } };
    }
    if (this.state.deltaSyncOwed !== undefined) {
      return { state: 'delta-sync', reason: this.state.deltaSyncOwed, regions: this.everyVolume(), settles: { initial: false, delta: this.deltaOwedGeneration } };
    }
    const dirty = this.dirtyLog.dirtyRegions();
    if (dirty.length === 0) return undefined;
    return { state: 'resync', reason: 'the dirty-region log holds regions the target never acknowledged (the appliance stopped without draining)', regions: dirty, settles: { initial: false, delta: undefined } };
  }

  /** The name a sync's begin marker gives it at the target ('initial-sync' makes its window start at the beginning). */
  private syncMarkerName(state: SyncState, settles: SyncSettles): string {
    return settles.initial || !this.state.initialSyncDone ? 'initial-sync' : state;
  }

  /** Persists that a delta sync of every volume is owed (before it starts, so that a crash during it runs it again). */
  private async oweDeltaSync(reason: string): Promise<void> {
    this.deltaOwedGeneration++;
    this.state = { ...this.state, deltaSyncOwed: reason };
    await this.writeState('a delta sync is owed');
  }

  /**
   * Makes every write completed on the volumes so far durable there. A failure is recorded in the
   * group's state (the next start owes a delta sync) and rethrown.
   */
  private async flushVolumes(): Promise<void> {
    try {
      await Promise.all(this.options.volumes.map((volume) => volume.file.flush()));
    } catch (error) {
      this.dirtyLog.noteVolumeFlushFailed(error);
      throw error;
    }
  }

  /** A flush of the volumes failed (here, for the guest, or for a clear): recorded once per run in the group's state. */
  private recordVolumeFlushFailed(error: unknown): void {
    if (this.volumeFlushFailedThisRun) return;
    this.volumeFlushFailedThisRun = true;
    const message = error instanceof Error ? error.message : String(error);
    this.options.logger.error('cannot flush the source volumes: what was written before may be missing from them; the next start runs a delta sync', { group: this.name, error: message });
    this.state = { ...this.state, volumeFlushFailed: `${new Date(this.options.scheduler.nowMs()).toISOString()}: ${message}` };
    void this.writeState('a failed flush of the volumes').catch(() => undefined);
  }

  /** Queues a write of the group's state file after the ones before it; resolves once it is durable. */
  private writeState(what: string, options: { flushVolumesFirst?: boolean } = {}): Promise<void> {
    const state = this.state;
    const written = this.stateWriting.then(async () => {
      if (options.flushVolumesFirst) await this.flushVolumes();
      await writeStateFile(this.options.fileSystem, path.join(this.options.directory, 'state.json'), state);
    });
    this.stateWriting = written.then(
      () => undefined,
      (error: unknown) => this.options.logger.error('cannot persist the group state', { group: this.name, what, error: (error as Error).message }),
    );
    return written;
  }

  private startSync(state: SyncState, reason: string, regions: SyncRegion[], settles: SyncSettles): void {
    let bytesTotal = 0;
    for (const region of regions) bytesTotal += region.lengthBytes;
    this.sync = { state, reason, bytesTotal, bytesDone: 0, bytesLeft: bytesTotal, bytesRead: 0, rateBytesPerSecond: 0, etaMs: undefined, startedMs: this.options.scheduler.nowMs() };
    if (state === 'delta-sync') this.sync.delta = { bytesMatched: 0, bytesShipped: 0, piecesShippedWhole: 0 };
    this.options.logger.info('sync started', { group: this.name, state, reason, bytesTotal });
    this.syncActive = true;
    this.syncsStarted++;
    this.syncRunning = this.runSync(regions, settles, this.syncsStarted)
      .catch((error: unknown) => {
        // The sync starts again from its beginning after a pause; until it ends the group stays in its sync state.
        const message = (error as Error).message;
        this.options.logger.error('sync failed; it will start again', { group: this.name, error: message, retryMs: syncRetryDelayMs });
        this.sync.reason = `${this.sync.state} failed (${message}); it starts again in ${syncRetryDelayMs} ms`;
        this.syncRetry = { regions, settles, atMs: this.options.scheduler.nowMs() + syncRetryDelayMs };
      })
      .finally(() => {
        this.syncActive = false;
        this.deltaAhead.clear();
      });
  }

  private async runSync(regions: SyncRegion[], settles: SyncSettles, started: number): Promise<void> {
    // Regions owed a resync stay dirty in the log until the resync's last write is acknowledged.
    const resyncToken = this.dirtyLog.beginResync();
    // An episode under way (its new session not started yet) discards this sync's first entries too.
    const bitmapEpisodes = this.queue.stats().bitmapEpisodes - (this.overflowUnderway() ? 1 : 0);
    // The marker names the sync: the target marks the stretch up to sync-end as not consistent, from the start for an initial sync.
    // A sync of every volume that begins after the target asked for a heal carries its token: only such a sync ends the target's loss window.
    const coversEveryVolume = this.sync.state === 'delta-sync' || settles.initial;
    this.pushMarker('sync-begin', this.syncMarkerName(this.sync.state, settles), coversEveryVolume ? this.healToken : undefined);
    for (const region of regions) {
      const tap = this.taps.get(region.volume);
      if (!tap) continue;
      const end = region.offset + region.lengthBytes;
      for (let offset = region.offset; offset < end && !this.stopping; ) {
        const lengthBytes = Math.min(this.syncPieceBytes, end - offset);
        while (this.queue.stats().queuedBytes > this.syncQueuedBytesMax && !this.stopping) await new Promise((resolve) => this.options.scheduler.setTimer(20, () => resolve(undefined)));
        if (this.stopping) break;
        if (this.sync.state === 'delta-sync') {
          this.requestDeltaSumsAhead(region.volume, offset, end);
          await this.deltaPiece(tap, region.volume, offset, lengthBytes);
          offset += lengthBytes;
          this.noteSyncProgress(lengthBytes, lengthBytes);
          continue;
        }
        // Ranges that read as zeroes need no read: a zero entry says the same in a few bytes. It is
        // pushed in the same turn as the extents were read, so a guest write that lands there later
        // comes after it in the stream (see readForSync for the ranges with data).
        const extents = tap.extents(offset, lengthBytes, syncExtentsMax);
        const reads: { offset: number; lengthBytes: number }[] = [];
        let at = offset;
        for (const extent of extents) {
          const extentEnd = Math.min(at + extent.lengthBytes, offset + lengthBytes);
          if (extent.zero) this.queue.push({ kind: 'zero', volume: region.volume, offset: at, lengthBytes: extentEnd - at, timeMs: this.options.scheduler.nowMs() });
          else reads.push({ offset: at, lengthBytes: extentEnd - at });
          at = extentEnd;
          if (at >= offset + lengthBytes) break;
        }
        if (at < offset + lengthBytes) reads.push({ offset: at, lengthBytes: offset + lengthBytes - at });
        this.shipper.wake();
        let bytesRead = 0;
        for (const read of reads) {
          await tap.readForSync(read.offset, read.lengthBytes);
          bytesRead += read.lengthBytes;
        }
        offset += lengthBytes;
        this.noteSyncProgress(lengthBytes, bytesRead);
      }
      if (this.stopping) return;
    }
    // No end marker when the queue discarded entries while this sync ran: the target lacks them until
    // the resync of the discarded ranges ends, so the sync's window must stay open until then.
    const end = this.queue.stats().bitmapEpisodes !== bitmapEpisodes ? { sequence: 0 } : this.pushMarker('sync-end');
    if (end.sequence === 0) {
      // The queue discarded entries while this sync ran (some of its reads, or its end): the discarded ranges
      // are resynced next, so this sync's regions stay owed in the dirty-region log until that resync ends,
      // and an initial sync is not done until then either.
      this.resyncFollowUp = mergeSettles(this.resyncFollowUp, settles);
      this.options.logger.warn('sync ended after the queue discarded entries; the discarded ranges are resynced next', { group: this.name, state: this.sync.state });
    } else {
      this.syncEndSequenceLast = end.sequence;
      // The regions are clean, and the initial (or owed delta) sync done, once the end marker is acknowledged.
      this.dirtyLog.endResync(resyncToken, end.sequence);
      if (settles.initial || settles.delta !== undefined) this.syncEndPending = { sequence: end.sequence, settles, started };
      if (this.resyncOldestTimeMs !== undefined && this.resyncPending.length === 0 && !this.resyncFollowUp) this.resyncOldestClearAt = end.sequence;
    }
    this.options.logger.info('sync finished', { group: this.name, state: this.sync.state, bytesTotal: this.sync.bytesTotal, ...(this.sync.delta ? { delta: this.sync.delta } : {}) });
    // In sync: why the sync ran no longer holds; it is kept as the last sync's, with its figures.
    const last = { state: this.sync.state, reason: this.sync.reason, endedMs: this.options.scheduler.nowMs() };
    this.sync = { ...this.sync, state: 'in-sync', reason: undefined, bytesLeft: 0, etaMs: 0, last };
  }

  /** The target holds every entry up to `sequence`: an initial or owed delta sync whose end it covers is done. */
  private acknowledged(sequence: number): void {
    if (this.resyncOldestClearAt !== undefined && sequence >= this.resyncOldestClearAt) {
      this.resyncOldestTimeMs = undefined;
      this.resyncOldestClearAt = undefined;
    }
    const pending = this.syncEndPending;
    if (pending === undefined || sequence < pending.sequence) return;
    this.syncEndPending = undefined;
    const { settles } = pending;
    const next = { ...this.state };
    if (settles.initial) next.initialSyncDone = true;
    if (settles.delta === this.deltaOwedGeneration) delete next.deltaSyncOwed;
    if (this.targetLoss && pending.started > this.targetLoss.syncsStartedAtLoss && next.deltaSyncOwed === undefined) {
      this.options.logger.info('the target holds every entry again: the loss it reported is healed', { group: this.name, reason: this.targetLoss.message });
      this.targetLoss = undefined;
      this.lossOldestTimeMs = undefined;
      this.healToken = undefined;
    }
    if (next.initialSyncDone === this.state.initialSyncDone && next.deltaSyncOwed === this.state.deltaSyncOwed) return;
    this.state = next;
    // Not persisted (an error is logged): the next start runs the sync again, which is safe. The volumes
    // are flushed first: the sync shipped what it read from the page cache, and once the state says done no
    // later start would look at those blocks again, so they must survive a power loss at the source.
    void this.writeState(settles.initial ? 'the end of the initial sync' : 'the end of the owed delta sync', { flushVolumesFirst: true }).then(
      () => this.options.logger.info(settles.initial ? 'initial sync acknowledged by the target' : 'delta sync acknowledged by the target', { group: this.name, sequence: pending.sequence }),
      () => undefined,
    );
  }

  /**
   * Sends the checksum requests of the next `deltaSumsAheadMax` pieces of a region from `offset`
   * (those not sent yet), while the link streams. Each piece still reads its own content only after
   * its answer came (see deltaPiece), so asking early changes nothing but the waiting.
   */
  private requestDeltaSumsAhead(volume: number, offset: number, end: number): void {
    if (!this.deltaAnswered || this.shipper.state !== 'streaming') return;
    for (let ahead = 0, at = offset; ahead < deltaSumsAheadMax && at < end; ahead++) {
      const lengthBytes = Math.min(this.syncPieceBytes, end - at);
      const key = `${volume}:${at}:${lengthBytes}`;
      if (!this.deltaAhead.has(key)) {
        const request = this.shipper.requestSums({ volume, offset: at, lengthBytes, blockBytes: deltaBlockBytes });
        request.catch(() => undefined); // taken (or dropped) by the piece
        this.deltaAhead.set(key, request);
      }
      at += lengthBytes;
    }
  }

  /**
   * Delta sync of one piece: the target's checksums of the piece as it holds it, then the source's
   * content read after that answer; only the blocks that differ are read again through the tap
   * (in stream order) and shipped. A block that matches needs nothing: the target holds it at a
   * durable point, every entry after that point reaches it in order, and the source's content is
   * that point's content with those same entries applied. Without an answer (the link is down for
   * long) the piece is shipped whole.
   */
  private async deltaPiece(tap: Tap, volume: number, offset: number, lengthBytes: number): Promise<void> {
    const delta = this.sync.delta!;
    let sums: Buffer | undefined;
    // The answer to the request sent ahead, if it came; one that failed (the session ended since) is not an attempt.
    const key = `${volume}:${offset}:${lengthBytes}`;
    const ahead = this.deltaAhead.get(key);
    this.deltaAhead.delete(key);
    if (ahead) {
      sums = await ahead.catch(() => undefined);
      if (sums) this.deltaAnswered = true;
    }
    // After a piece went unanswered, the next ones ask once each until an answer comes again.
    const attemptsMax = delta.piecesShippedWhole > 0 && !this.deltaAnswered ? 1 : deltaSumsAttemptsMax;
    for (let attempt = 1; !sums && !this.stopping; attempt++) {
      try {
        sums = await this.shipper.requestSums({ volume, offset, lengthBytes, blockBytes: deltaBlockBytes });
        this.deltaAnswered = true;
        break;
      } catch (error) {
        this.deltaAnswered = false;
        if (attempt >= attemptsMax) {
          this.options.logger.warn('delta sync: no checksums from the target; the piece is shipped whole', { group: this.name, volume, offset, lengthBytes, error: (error as Error).message });
          break;
        }
        await sleep(this.options.scheduler, 250);
      }
    }
    if (this.stopping) return;
    if (!sums) {
      delta.piecesShippedWhole++;
      delta.bytesShipped += lengthBytes;
      this.shipper.wake();
      await tap.readForSync(offset, lengthBytes);
      return;
    }
    const local = Buffer.allocUnsafe(lengthBytes);
    await tap.read(local, offset);
    const localSums = blockSums(local, deltaBlockBytes);
    for (let at = 0; at < lengthBytes; at += deltaBlockBytes) {
      const blockLength = Math.min(deltaBlockBytes, lengthBytes - at);
      const sumAt = (at / deltaBlockBytes) * blockSumBytes;
      if (localSums.compare(sums, sumAt, sumAt + blockSumBytes, sumAt, sumAt + blockSumBytes) === 0) {
        delta.bytesMatched += blockLength;
        continue;
      }
      delta.bytesShipped += blockLength;
      this.shipper.wake();
      await tap.readForSync(offset + at, blockLength);
    }
  }

  /**
   * Starts a delta sync of every volume (on demand, or when the dirty-region log cannot be
   * trusted). Refused while another sync runs or waits, and before the initial sync is done.
   */
  async requestDeltaSync(reason: string): Promise<SyncProgress> {
    if (!this.state.initialSyncDone) throw new Error(`group '${this.name}' has not completed its initial sync; that sync ships every block anyway`);
    const busy = (): boolean =>
      this.syncActive || this.sync.state !== 'in-sync' || this.syncStatus().state !== 'in-sync' || this.deltaRequested || this.overflowUnderway();
    if (busy()) {
      const why = this.overflowUnderway() ? `its queue overflowed (${this.queue.stats().modeReason}); the resync of the discarded ranges comes first` : `it is in ${this.syncStatus().state} (${this.syncStatus().reason ?? 'no reason given'})`;
      throw new Error(`group '${this.name}' cannot start a delta sync now: ${why}; it can start once the group is in sync`);
    }
    // Owed first, durably: a crash before its end runs it again at the next start.
    this.deltaRequested = true;
    try {
      await this.oweDeltaSync(reason);
    } finally {
      this.deltaRequested = false;
    }
    if (this.stopping) throw new Error(`group '${this.name}' is stopping; the delta sync runs at its next start`);
    if (busy()) return this.syncStatus();
    this.startSync('delta-sync', reason, this.everyVolume(), { initial: false, delta: this.deltaOwedGeneration });
    return this.syncStatus();
  }

  /** `bytes` of the volumes covered, of which `bytesRead` were read (the rest read as zeroes: not read, a zero entry). */
  private noteSyncProgress(bytes: number, bytesRead: number): void {
    const sync = this.sync;
    sync.bytesDone += bytes;
    sync.bytesRead = (sync.bytesRead ?? 0) + bytesRead;
    sync.bytesLeft = Math.max(0, sync.bytesTotal - sync.bytesDone);
    const elapsedMs = this.options.scheduler.nowMs() - (sync.startedMs ?? 0);
    // The rate counts what was read: holes skipped in no time would make a sparse volume's sync show many GB/s.
    sync.rateBytesPerSecond = elapsedMs > 0 ? Math.round((sync.bytesRead * 1000) / elapsedMs) : 0;
    sync.etaMs = elapsedMs > 0 && sync.bytesDone > 0 ? Math.round((sync.bytesLeft * elapsedMs) / sync.bytesDone) : undefined;
  }

  /** Holds write completions for at most `timeoutMs`, puts a checkpoint marker in the stream, and returns its id. */
  quiesce(timeoutMs: number): { checkpointSequence: number } {
    if (!(timeoutMs > 0 && timeoutMs <= quiesceMsMax)) throw new RangeError(`A quiesce timeout must be 1..${quiesceMsMax} ms, not ${timeoutMs}`);
    if (this.releaseQuiesce) throw new Error(`Group '${this.name}' is already quiesced`);
    if (this.ending) throw new Error(`Group '${this.name}' is ending its protection; a quiesce would hold the writes its volumes switch over with`);
    const hold = new Promise<void>((resolve) => (this.releaseQuiesce = resolve));
    for (const gate of this.gates.values()) gate.setHold(hold);
    this.quiesceTimer = this.options.scheduler.setTimer(timeoutMs, () => this.release());
    return { checkpointSequence: 0 };
  }

  /** From now on the group refuses quiesces (its protection is being removed), and one that is on ends. */
  endQuiesces(): void {
    this.ending = true;
    this.release();
  }

  /** Ends a quiesce (also when its timeout passes). */
  release(): boolean {
    const release = this.releaseQuiesce;
    if (!release) return false;
    this.releaseQuiesce = undefined;
    this.quiesceTimer?.cancel();
    for (const gate of this.gates.values()) gate.setHold(undefined);
    release();
    return true;
  }

  /** Puts a checkpoint marker into the stream after every write completed so far. */
  checkpoint(kind: string, name?: string): { id: string; sequence: number } {
    const sync = this.syncStatus();
    if (sync.state !== 'in-sync') throw new Error(`Cannot take a checkpoint of group '${this.name}' while it is in ${sync.state} (${sync.reason ?? 'no reason given'}): the target is not consistent until that sync ends`);
    return this.pushMarker(kind, name);
  }

  setRate(bytesPerSecond: number): void {
    this.rateLimit.setRate(bytesPerSecond);
  }

  rpoMs(): number {
    const queued = this.queue.stats().oldestUnacknowledgedTimeMs;
    const oldest = Math.min(queued ?? Infinity, this.resyncOldestTimeMs ?? Infinity, this.lossOldestTimeMs ?? Infinity);
    return oldest === Infinity ? 0 : Math.max(0, this.options.scheduler.nowMs() - oldest);
  }

  /** The sync state, counting a resync that waits to start (the group is not in sync until it has run). */
  private syncStatus(): SyncProgress {
    const waiting = this.resyncPending.length > 0 || this.resyncFollowUp !== undefined || this.syncRetry !== undefined;
    if (this.sync.state === 'in-sync' && !waiting && this.deltaSyncWaiting()) {
      let bytesTotal = 0;
      for (const volume of this.options.volumes) bytesTotal += volume.file.sizeBytes;
      return { state: 'delta-sync', reason: `${this.state.deltaSyncOwed} (waiting to start)`, bytesTotal, bytesDone: 0, bytesLeft: bytesTotal, rateBytesPerSecond: 0, etaMs: undefined, startedMs: undefined };
    }
    if (this.sync.state !== 'in-sync' || !waiting) return { ...this.sync };
    let bytesLeft = 0;
    for (const region of this.syncRetry?.regions ?? this.resyncPending) bytesLeft += region.lengthBytes;
    const reason = this.resyncPendingReason ?? this.sync.reason ?? 'a resync waits to start';
    return { state: 'resync', reason: `${reason} (waiting to start)`, bytesTotal: bytesLeft, bytesDone: 0, bytesLeft, rateBytesPerSecond: 0, etaMs: undefined, startedMs: undefined };
  }

  status(): SourceGroupStatus {
    const now = this.options.scheduler.nowMs();
    const shipper = this.shipper.stats();
    const sample = this.throughputSample;
    if (now - sample.timeMs >= 1000) {
      sample.bytesPerSecond = sample.timeMs === 0 ? 0 : ((shipper.wireBytesSent - sample.wireBytes) * 1000) / (now - sample.timeMs);
      sample.timeMs = now;
      sample.wireBytes = shipper.wireBytesSent;
    }
    const rpoMs = this.rpoMs();
    return {
      group: this.name,
      role: 'source',
      epoch: this.epoch,
      target: `${this.config.target.appliance} at ${this.config.target.address.host}:${this.config.target.address.port}`,
      sync: this.syncStatus(),
      queue: this.queue.stats(),
      dirtyLog: this.dirtyLog.stats(),
      shipper,
      rpoMs,
      rpoMsTarget: this.config.rpoMsTarget,
      rpoMet: rpoMs <= this.config.rpoMsTarget,
      throughputBytesPerSecond: Math.round(sample.bytesPerSecond),
      compressionRatio: shipper.wireBytesSent > 0 ? shipper.rawBytesSent / shipper.wireBytesSent : 1,
      rateLimitBytesPerSecond: this.rateLimit.rateBytesPerSecond,
      quiesced: this.releaseQuiesce !== undefined,
      volumes: this.options.volumes.map((volume) => ({ id: volume.id, name: volume.name, sizeBytes: volume.file.sizeBytes })),
      alerts: this.targetLoss ? [{ condition: 'target-lost-acknowledged', severity: 'error', message: this.targetLoss.message, sinceMs: this.targetLoss.sinceMs }] : [],
    };
  }

  /**
   * Stops the group: waits up to `drainMs` for the target to acknowledge everything queued (so that
   * the next start need not resync), then stops the shipper and persists the dirty-region log.
   */
  async stop(drainMs: number): Promise<{ entriesNotAcknowledged: number; bytesNotAcknowledged: number; syncInterrupted: SyncState | undefined }> {
    this.stopping = true;
    this.maintenanceTimer?.cancel();
    this.release();
    const syncInterrupted = this.syncActive ? this.sync.state : undefined;
    await this.syncRunning;
    this.limitDrain(drainMs);
    while (this.queue.stats().queuedEntries > 0 && this.options.scheduler.nowMs() < this.drainUntilMs) {
      await new Promise((resolve) => this.options.scheduler.setTimer(20, () => resolve(undefined)));
    }
    await this.shipper.stop();
    await this.recordAcknowledged()?.catch(() => undefined);
    const queued = this.queue.stats();
    await this.close();
    return { entriesNotAcknowledged: queued.queuedEntries, bytesNotAcknowledged: queued.queuedBytes, syncInterrupted };
  }

  /** Makes a drain under way (or a later one) end within `drainMs` from now (an appliance that stops cuts a long one short). */
  limitDrain(drainMs: number): void {
    this.drainUntilMs = Math.min(this.drainUntilMs, this.options.scheduler.nowMs() + drainMs);
  }

  /** Closes the state, the dirty-region log (its regions kept for the next start) and the queue. */
  private async close(): Promise<void> {
    await this.stateWriting;
    await this.dirtyLog.flushClears();
    await this.dirtyLog.close();
    // The last clears may have failed a flush, which the state records.
    await this.stateWriting;
    await this.queue.close();
  }
}

/** Blocks of this size that read as zeroes make a sync read's zero runs. */
export const syncZeroBlockBytes = 4096;
/**
 * Within a guest's write, the shortest run of zero blocks sent as a zero entry (a write of zeroes
 * alone always is). Each entry is a journal record and a separate write at promotion, so splitting
 * a write at every zero block costs the target more than the zero bytes it saves (measured with
 * the vm-mix data set: about a quarter more CPU per byte written with the codec off).
 */
export const guestZeroRunBytesMin = 64 * 1024;
const zeroBlock = Buffer.alloc(syncZeroBlockBytes);

/**
 * Whether `data` holds a run of whole zero blocks (`syncZeroBlockBytes`, counted from its start)
 * that `zeroAndDataRuns` would send as a zero entry: one of at least `zeroRunBytesMin`, or all of
 * `data`. Compares in place, allocating nothing (it runs for every guest write; a write held in the
 * socket's chunks is not copied to find out); a block of data is passed over at its first non-zero byte.
 */
export function holdsZeroRun(data: WriteData, zeroRunBytesMin = syncZeroBlockBytes): boolean {
  const lengthBytes = writeDataLength(data);
  let runBytes = 0;
  if (Buffer.isBuffer(data)) {
    for (let at = 0; at + syncZeroBlockBytes <= lengthBytes; at += syncZeroBlockBytes) {
      runBytes = zeroBlock.compare(data, at, at + syncZeroBlockBytes) === 0 ? runBytes + syncZeroBlockBytes : 0;
      if (runBytes >= zeroRunBytesMin) return true;
    }
  } else {
    const chunks = data as readonly Buffer[];
    // The chunk holding the block's next byte, found moving forward only.
    let chunk = 0;
    let chunkStart = 0;
    for (let at = 0; at + syncZeroBlockBytes <= lengthBytes; at += syncZeroBlockBytes) {
      let zero = true;
      for (let position = at; zero && position < at + syncZeroBlockBytes; ) {
        while (chunkStart + chunks[chunk]!.length <= position) chunkStart += chunks[chunk++]!.length;
        const from = position - chunkStart;
        const to = Math.min(chunks[chunk]!.length, at + syncZeroBlockBytes - chunkStart);
        zero = zeroBlock.compare(chunks[chunk]!, from, to, 0, to - from) === 0;
        position += to - from;
      }
      runBytes = zero ? runBytes + syncZeroBlockBytes : 0;
      if (runBytes >= zeroRunBytesMin) return true;
    }
  }
  return lengthBytes >= syncZeroBlockBytes && runBytes === lengthBytes;
}

/**
 * Splits `data` into runs of whole zero blocks (`syncZeroBlockBytes`, counted from the start of
 * `data`) and runs of everything else, in order; a short last block counts as data. A zero run
 * shorter than `zeroRunBytesMin` counts as data too, unless it is all of `data`.
 */
export function zeroAndDataRuns(data: Buffer, zeroRunBytesMin = syncZeroBlockBytes): { at: number; lengthBytes: number; zero: boolean }[] {
  const blocks: { at: number; lengthBytes: number; zero: boolean }[] = [];
  for (let at = 0; at < data.length; at += syncZeroBlockBytes) {
    const end = Math.min(data.length, at + syncZeroBlockBytes);
    const zero = end - at === syncZeroBlockBytes && zeroBlock.compare(data, at, end) === 0;
    const last = blocks[blocks.length - 1];
    if (last && last.zero === zero) last.lengthBytes += end - at;
    else blocks.push({ at, lengthBytes: end - at, zero });
  }
  if (blocks.length === 1) return blocks;
  const runs: typeof blocks = [];
  for (const run of blocks) {
    const zero = run.zero && run.lengthBytes >= zeroRunBytesMin;
    const last = runs[runs.length - 1];
    if (last && last.zero === zero) last.lengthBytes += run.lengthBytes;
    else runs.push({ ...run, zero });
  }
  return runs;
}
