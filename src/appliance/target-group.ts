/**
 * A protection group in the target role: its journal (units from the group's
 * pool, replicas as raw files) and the streams that feed it.
 *
 * Streams and epochs. Every protection session of a source appliance has its
 * own epoch. Each (source appliance, epoch) gets its own journal stream id, so
 * a new session starts at sequence 1 in a stream of its own and two histories
 * are never mixed in one stream. Only the newest epoch of a source may append:
 * a HELLO with an older epoch (a stale process, a restored source) is refused
 * as diverged. The mapping is persisted before the WELCOME that depends on it.
 */
import * as crypto from 'node:crypto';
import * as path from 'node:path';
import { describeLossPlace, Journal, type AppendRecord, type CheckpointInfo, type JournalStatus } from '../journal/journal.js';
import type { JournalLoss } from '../journal/metadata.js';
import { RecoveryPointUnavailableError } from '../journal/errors.js';
import type { JournalFileSystem } from '../journal/file-system.js';
import { JournalPool } from '../journal/pool.js';
import type { CheckpointMarker } from '../journal/record.js';
import type { RecoveryView } from '../journal/view.js';
import { FileBackingStore, type BackingStore } from '../tap/backing-store.js';
import type { Clock } from '../tap/tap.js';
import type { Logger } from '../util/logger.js';
import { readStateFile, writeStateFile } from '../util/state-file.js';
import type { ReceiverStream } from '../replication/receiver.js';
import { blockSums, type Hello, type Refuse, type StreamEntry } from '../replication/wire.js';
import type { ReceiveGroupConfig } from './config.js';

/** Journal stream ids are 16-bit (see journal.ts); 0 is not used. */
export const journalStreamIdMax = 0xffff;
const stateFileName = 'group-state.json';

export interface StreamRecord {
  /** Journal stream id. */
  stream: number;
  appliance: string;
  site: string;
  epoch: string;
  /** Wire sequence of the epoch's first entry minus 1; the journal numbers the stream from 1. */
  sequenceBase: number;
  startedMs: number;
  /** The source's volume id → the journal's volume id (index in the group's volume list). */
  volumes: Record<string, number>;
}

/**
 * A stretch of a source's stream during which a sync ran (from its `sync-begin` marker to its
 * `sync-end`): the target's image of the group is not consistent there, so no checkpoint there is
 * recoverable and no view opens at a time there. An initial sync's window starts at the beginning
 * (before its end, nothing at the target is an image of that source's volumes). A sync that starts
 * while the source's window is open (the previous one never ended) extends that window.
 */
export interface SyncWindow {
  appliance: string;
  /** The sync's kind as the source named it ('initial-sync', 'resync', 'delta-sync'). */
  sync: string;
  /** Journal lsn and source time of the `sync-begin` marker (0 for an initial sync). */
  beginLsn: number;
  beginTimeMs: number;
  beginIds: string[];
  /** Of the `sync-end` marker; absent while the sync runs. */
  endLsn?: number;
  endTimeMs?: number;
  endId?: string;
  /**
   * The journal lost records of this source it had acknowledged (damage found on open, or the
   * source reported the loss): only a delta or initial sync that begins inside the window ends it
   * (`deltaBegun`), since the regions the lost records wrote are known nowhere.
   */
  deltaSyncNeeded?: boolean;
  deltaBegun?: boolean;
  /**
   * Told to the source in the WELCOME; only a sync of every volume whose begin marker carries it
   * ends the window (one that began before the target asked, or a resync of a few regions, does not).
   */
  healToken?: string;
  /** The journal losses (`JournalLoss.id`) this window stands for; healed when it ends. */
  lossIds?: string[];
  /** Why the window was opened by a loss, for the alert. */
  lossReason?: string;
}

export interface GroupState {
  version: 1;
  streams: StreamRecord[];
  syncWindows?: SyncWindow[];
  /**
   * Every checkpoint marker acknowledged and not yet promoted, recorded before its batch is
   * acknowledged: a marker destroyed with the records around it (or cut with an acknowledged tail)
   * is then still listed, as lost, instead of vanishing.
   */
  markersAcknowledged?: AcknowledgedMarker[];
  /** Checkpoints whose markers the journal lost, with why (newest last, at most `lostCheckpointsKeptMax`). */
  checkpointsLost?: { id: string; kind: string; name?: string; timeMs: number; why: string }[];
}

interface AcknowledgedMarker {
  id: string;
  kind: string;
  name?: string;
  lsn: number;
  timeMs: number;
}

/** Lost checkpoints the group state keeps listing. */
export const lostCheckpointsKeptMax = 256;

export interface TargetGroupOptions {
  config: ReceiveGroupConfig;
  /** `<data>/groups/<group>/`: the group's state and journal metadata. */
  directory: string;
  fileSystem: JournalFileSystem;
  clock: Clock;
  logger: Logger;
  /** Replicas by journal volume id; default: the configured raw files. */
  replicas?: Map<number, BackingStore>;
}

export interface TargetGroupStatus {
  group: string;
  role: 'target';
  streams: { stream: number; appliance: string; epoch: string; current: boolean; sequenceDurable: number; sequencePromoted: number; timeMsDurable: number | undefined; connected: boolean }[];
  /** Source time of the newest entry durable in every current stream (the target's newest recoverable point). */
  timeMsNewestDurable: number | undefined;
  /** Syncs whose points are not consistent (running ones, and ended ones the journal still holds points of). */
  syncWindows: SyncWindow[];
  /** The group's active alerts: the journal's, and a loss of acknowledged records until its streams heal. */
  alerts: TargetGroupAlert[];
  /** What the journal had to cut on open (damage and torn tails with checkpoints past them). */
  losses: readonly JournalLoss[];
  journal: JournalStatus;
}

export interface TargetGroupAlert {
  condition: string;
  severity: 'warning' | 'error';
  message: string;
}

export class TargetGroup {
  readonly name: string;
  readonly config: ReceiveGroupConfig;
  readonly journal: Journal;
  private readonly options: TargetGroupOptions;
  private state: GroupState;
  private readonly replicas: Map<number, BackingStore>;
  private stateWrites: Promise<void> = Promise.resolve();
  private readonly timeMsDurable = new Map<number, number>();
  private readonly connected = new Set<number>();
  /** The HELLO being handled (see openStream). */
  private opening: Promise<unknown> = Promise.resolve();

  private constructor(options: TargetGroupOptions, journal: Journal, state: GroupState, replicas: Map<number, BackingStore>) {
    this.options = options;
    this.config = options.config;
    this.name = options.config.group;
    this.journal = journal;
    this.state = state;
    this.replicas = replicas;
  }

  static async open(options: TargetGroupOptions): Promise<TargetGroup> {
    const { config, fileSystem } = options;
    await fileSystem.mkdir(options.directory);
    const state = (await readStateFile<GroupState>(fileSystem, path.join(options.directory, stateFileName))) ?? { version: 1, streams: [] };
    // A process that died may have renamed the state into place without syncing the directory: what
    // was just read must be durable before a WELCOME depends on it.
    await fileSystem.fsyncDirectory(options.directory);
    const replicas = options.replicas ?? new Map<number, BackingStore>();
    const opened: BackingStore[] = [];
    try {
      if (!options.replicas) {
        config.volumes.forEach((volume, index) => {
          const store = FileBackingStore.open({ path: volume.replica, readOnly: false, createSizeBytes: volume.sizeBytes });
          opened.push(store);
          if (store.sizeBytes !== volume.sizeBytes) {
            throw new Error(`Cannot use replica of volume '${volume.name}' of group '${config.group}' as it has ${store.sizeBytes} bytes, not ${volume.sizeBytes}: path is ${volume.replica}`);
          }
          replicas.set(index, store);
        });
      }
      for (const datastore of config.journal.datastores) await fileSystem.mkdir(datastore.path);
      const journal = await Journal.open({
        name: config.group,
        directory: path.join(options.directory, 'journal'),
        fileSystem,
        pool: new JournalPool(fileSystem, config.journal.datastores),
        replicas,
        clock: options.clock,
        unitBytes: config.journal.unitBytes,
        historyMs: config.historyMs,
        sizeLimitBytes: config.journal.sizeLimitBytes,
        sizeWarningBytes: config.journal.sizeWarningBytes,
      });
      const damage = journal.openReport.damage;
      if (damage) {
        options.logger.error('journal damage found on open: acknowledged records were lost; the sources resend what differs by a delta sync', {
          group: config.group,
          lsnFirst: damage.lsnFirst,
          lsnLast: damage.lsnLast,
          where: describeLossPlace(damage),
          checkpointsLost: damage.checkpoints.map((checkpoint) => checkpoint.id),
        });
      } else if (journal.openReport.cut) options.logger.warn('journal tail cut on open', { group: config.group, ...journal.openReport.cut });
      if (journal.openReport.promotedDamage) options.logger.warn('damage in journal records already promoted, passed over (nothing of them is needed)', { group: config.group, ...journal.openReport.promotedDamage });
      const group = new TargetGroup(options, journal, state, replicas);
      await group.reconcileSyncWindows();
      await group.reconcileAcknowledgedMarkers();
      await group.openLossWindows();
      return group;
    } catch (error) {
      for (const store of opened) await store.close().catch(() => {});
      throw error;
    }
  }

  private currentStreamOf(appliance: string): StreamRecord | undefined {
    let current: StreamRecord | undefined;
    for (const record of this.state.streams) if (record.appliance === appliance && (!current || record.stream > current.stream)) current = record;
    return current;
  }

  /**
   * Checks a HELLO for this group and opens (or creates) its stream. HELLOs are handled one at a
   * time: each reads the group state, extends it and writes it back, so two sources arriving
   * together can never be given the same journal stream.
   */
  openStream(hello: Hello, peerName: string | undefined): Promise<{ stream: ReceiverStream } | { refuse: Refuse }> {
    const run = this.opening.then(() => this.openStreamNow(hello, peerName));
    this.opening = run.catch(() => {});
    return run;
  }

  private async openStreamNow(hello: Hello, peerName: string | undefined): Promise<{ stream: ReceiverStream } | { refuse: Refuse }> {
    if (peerName !== undefined && peerName !== hello.appliance) {
      return { refuse: { code: 'not-allowed', message: `the certificate names appliance '${peerName}' but the stream claims '${hello.appliance}'` } };
    }
    if (!this.config.sources.includes(hello.appliance)) {
      return { refuse: { code: 'not-allowed', message: `appliance '${hello.appliance}' is not a source of group '${this.name}' (sources: ${this.config.sources.join(', ')})` } };
    }
    const volumes: Record<string, number> = {};
    for (const volume of hello.volumes) {
      const index = this.config.volumes.findIndex((candidate) => candidate.name === volume.name);
      if (index < 0) return { refuse: { code: 'volumes-differ', message: `group '${this.name}' has no volume '${volume.name}' here` } };
      const sizeBytes = this.config.volumes[index]!.sizeBytes;
      if (sizeBytes !== volume.sizeBytes) {
        return { refuse: { code: 'volumes-differ', message: `volume '${volume.name}' has ${volume.sizeBytes} bytes at the source and ${sizeBytes} here` } };
      }
      volumes[String(volume.id)] = index;
    }
    let record = this.state.streams.find((candidate) => candidate.appliance === hello.appliance && candidate.epoch === hello.epoch);
    const current = this.currentStreamOf(hello.appliance);
    if (record && record !== current) {
      return { refuse: { code: 'epoch-diverged', message: `epoch ${hello.epoch} of '${hello.appliance}' was superseded by epoch ${current!.epoch}` } };
    }
    if (record && record.sequenceBase !== hello.sequenceBase) {
      return { refuse: { code: 'epoch-diverged', message: `epoch ${hello.epoch} began at sequence ${record.sequenceBase + 1}, not ${hello.sequenceBase + 1}` } };
    }
    if (record && JSON.stringify(record.volumes) !== JSON.stringify(volumes)) {
      return { refuse: { code: 'volumes-differ', message: `the volumes of epoch ${hello.epoch} changed within the session` } };
    }
    const epochIsNew = !record;
    // Once, when the epoch that follows the loss begins (a reconnect of it must not widen the window
    // again), and before the epoch is recorded (a crash in between leaves the window, never the epoch alone).
    const reported = hello.lossReported ?? hello.previousEpoch;
    if (reported && epochIsNew) {
      const lost = this.state.streams.find((candidate) => candidate.appliance === hello.appliance && candidate.epoch === reported.epoch);
      const lostStream = lost?.stream;
      const kept = lostStream === undefined ? 0 : (this.journal.status().streams.find((entry) => entry.stream === lostStream)?.sequenceLast ?? 0) + lost!.sequenceBase;
      if (kept < reported.sequenceAcknowledged) {
        // The source was told more was durable than this journal holds: no point past what is kept is an image of it until its delta sync ends.
        // From the newest record of that epoch still held (none: no point of this source is an image at all).
        const timeMsFrom = lostStream === undefined ? 0 : this.journal.streamNewestTimeMs(lostStream) ?? 0;
        const reason = `the target acknowledged sequence ${reported.sequenceAcknowledged} of epoch ${reported.epoch} of '${hello.appliance}' but holds ${kept}${hello.lossReported ? '' : ' (found when the source began a new epoch)'}`;
        await this.updateState((state) => withLossWindow(state, hello.appliance, { lsnKept: this.journal.lsnDurable, timeMsFrom, reason, lossId: undefined }));
        this.options.logger.error('a source reports entries this target acknowledged and no longer holds; its delta sync heals them', { group: this.name, source: hello.appliance, epoch: reported.epoch, sequenceAcknowledged: reported.sequenceAcknowledged, sequenceHeld: kept });
      }
    }
    if (!record) {
      const streamIdLast = this.state.streams.reduce((max, candidate) => Math.max(max, candidate.stream), 0);
      if (streamIdLast >= journalStreamIdMax) return { refuse: { code: 'busy', message: `group '${this.name}' has used all ${journalStreamIdMax} stream ids` } };
      const created: StreamRecord = { stream: streamIdLast + 1, appliance: hello.appliance, site: hello.site, epoch: hello.epoch, sequenceBase: hello.sequenceBase, startedMs: this.options.clock.nowMs(), volumes };
      record = created;
      await this.updateState((state) => ({ ...state, streams: [...state.streams, created] }));
      this.options.logger.info('new stream epoch', { group: this.name, source: hello.appliance, epoch: hello.epoch, stream: record.stream, previousEpoch: current?.epoch });
    }
    const streamRecord = record;
    const journalStream = streamRecord.stream;
    const sequenceDurable = streamRecord.sequenceBase + (this.journal.status().streams.find((entry) => entry.stream === journalStream)?.sequenceLast ?? 0);
    // A sync-end durable in the journal is in the windows once its state write is done.
    await this.stateWrites;
    const window = (this.state.syncWindows ?? []).find((candidate) => candidate.appliance === hello.appliance && candidate.endLsn === undefined);
    this.connected.add(journalStream);
    const group = this;
    const sums = new SumsReader(this.journal, streamRecord.volumes, this.name, this.options.clock);
    return {
      stream: {
        sequenceDurable,
        ...(window ? { syncWindowOpen: { sync: window.sync, beginTimeMs: window.beginTimeMs, ...(window.deltaSyncNeeded && !window.deltaBegun ? { deltaSyncNeeded: true, ...(window.healToken ? { healToken: window.healToken } : {}) } : {}) } } : {}),
        append: (entries) => group.append(streamRecord, entries),
        sums: (volume, offset, lengthBytes, blockBytes) => sums.sums(volume, offset, lengthBytes, blockBytes),
        release: () => {
          group.connected.delete(journalStream);
          void sums.close();
        },
      },
    };
  }

  /** Appends a stream's entries to the journal in pieces of at most half a unit; resolves once all are durable. */
  private async append(record: StreamRecord, entries: StreamEntry[]): Promise<void> {
    const pieceBytesMax = Math.floor(this.config.journal.unitBytes / 2) - 64 * 1024;
    const pieces: AppendRecord[][] = [];
    let piece: AppendRecord[] = [];
    let pieceBytes = 0;
    for (const entry of entries) {
      const appendRecord = this.toAppendRecord(record, entry);
      const bytes = 64 + (entry.data?.length ?? 0);
      if (piece.length > 0 && pieceBytes + bytes > pieceBytesMax) {
        pieces.push(piece);
        piece = [];
        pieceBytes = 0;
      }
      piece.push(appendRecord);
      pieceBytes += bytes;
    }
    if (piece.length > 0) pieces.push(piece);
    // Queued together, committed in order; the last one's durability covers the rest.
    const placed = await Promise.all(pieces.map((records) => this.journal.append(records)));
    const syncMarkers: SyncMarker[] = [];
    const markers: AcknowledgedMarker[] = [];
    pieces.forEach((records, index) => {
      records.forEach((appended, at) => {
        const checkpoint = appended.checkpoint;
        if (appended.kind !== 'checkpoint' || !checkpoint) return;
        if (!isSyncMarkerKind(checkpoint.kind)) {
          const acknowledged: AcknowledgedMarker = { id: checkpoint.id, kind: checkpoint.kind, lsn: placed[index]!.lsnFirst + at, timeMs: appended.timeMs };
          if (checkpoint.name !== undefined) acknowledged.name = checkpoint.name;
          markers.push(acknowledged);
          return;
        }
        const marker: SyncMarker = { id: checkpoint.id, kind: checkpoint.kind, lsn: placed[index]!.lsnFirst + at, timeMs: appended.timeMs };
        if (checkpoint.name !== undefined) marker.name = checkpoint.name;
        if (checkpoint.heal !== undefined) marker.heal = checkpoint.heal;
        syncMarkers.push(marker);
      });
    });
    // Durable in the group's state before the batch is acknowledged (and rebuilt from the journal at open).
    if (syncMarkers.length > 0 || markers.length > 0) {
      await this.updateState((state) => {
        const next = withSyncMarkers(state, record.appliance, syncMarkers);
        if (markers.length === 0) return next;
        const watermark = this.journal.watermarkLsn;
        return { ...next, markersAcknowledged: [...(next.markersAcknowledged ?? []).filter((marker) => marker.lsn > watermark), ...markers] };
      });
      if (syncMarkers.some((marker) => marker.kind === 'sync-end')) await this.healEndedLosses();
    }
    const last = entries[entries.length - 1];
    if (last) this.timeMsDurable.set(record.stream, last.timeMs);
  }

  /** Applies `change` to the group's state and writes it, one change at a time. */
  private updateState(change: (state: GroupState) => GroupState): Promise<void> {
    const run = this.stateWrites.then(async () => {
      const next = change(this.state);
      if (next === this.state) return;
      await writeStateFile(this.options.fileSystem, path.join(this.options.directory, stateFileName), next);
      this.state = next;
    });
    this.stateWrites = run.catch(() => {});
    return run;
  }

  /**
   * Checkpoints in the journal, with those whose point lies inside a sync window not recoverable
   * (`inconsistent` says why).
   */
  checkpoints(): (CheckpointInfo & { inconsistent?: string })[] {
    const markers = this.journal.markerRecords();
    const listed = this.journal.checkpoints();
    const lost = new Map((this.state.checkpointsLost ?? []).map((entry) => [entry.id, entry]));
    for (const entry of lost.values()) {
      const info: CheckpointInfo = { id: entry.id, kind: entry.kind, streams: [], timeMs: entry.timeMs, recoverable: false, lost: entry.why };
      if (entry.name !== undefined) info.name = entry.name;
      const at = listed.findIndex((candidate) => candidate.id === entry.id);
      if (at < 0) listed.push(info);
      else if (!listed[at]!.lost) listed[at] = { ...listed[at]!, recoverable: false, lost: entry.why };
    }
    listed.sort((a, b) => a.timeMs - b.timeMs);
    return listed.map((checkpoint) => {
      if (!checkpoint.recoverable) return checkpoint;
      for (const marker of markers) {
        if (marker.id !== checkpoint.id) continue;
        const appliance = this.state.streams.find((stream) => stream.stream === marker.stream)?.appliance;
        const window = appliance === undefined ? undefined : this.windowAt(appliance, (candidate) => candidate.beginLsn < marker.lsn && (candidate.endLsn === undefined || marker.lsn < candidate.endLsn));
        if (window) return { ...checkpoint, recoverable: false, inconsistent: describeWindow(window) };
      }
      return checkpoint;
    });
  }

  /**
   * Throws when a recovery view of `volume` (journal volume id) at `at` would show a point inside a
   * sync window: at a checkpoint, any source's window (a checkpoint stands for the whole group); at
   * a time, a window of the source whose stream carries that volume.
   */
  checkConsistentPoint(volume: number, at: { checkpoint: string } | { timeMs: number }): void {
    if ('checkpoint' in at) {
      const checkpoint = this.checkpoints().find((candidate) => candidate.id === at.checkpoint);
      if (checkpoint?.lost) throw new RecoveryPointUnavailableError(`checkpoint '${at.checkpoint}'`, checkpoint.lost);
      if (checkpoint?.inconsistent) throw new RecoveryPointUnavailableError(`checkpoint '${at.checkpoint}'`, `it lies inside a sync: ${checkpoint.inconsistent}`);
      return;
    }
    const sources = new Set(this.state.streams.filter((stream) => Object.values(stream.volumes).includes(volume)).map((stream) => stream.appliance));
    for (const window of this.state.syncWindows ?? []) {
      if (sources.has(window.appliance) && window.beginTimeMs <= at.timeMs && (window.endTimeMs === undefined || at.timeMs < window.endTimeMs)) {
        const before = window.beginTimeMs > 0
          ? `; the newest consistent point before it is timeMs ${window.beginTimeMs - 1} (${new Date(window.beginTimeMs - 1).toISOString()}), while it is in the history window`
          : '; no point of this volume is consistent before that initial sync ends';
        throw new RecoveryPointUnavailableError(`time ${new Date(at.timeMs).toISOString()}`, `it lies inside a sync: ${describeWindow(window)}${before}`);
      }
    }
  }

  private windowAt(appliance: string, inside: (window: SyncWindow) => boolean): SyncWindow | undefined {
    return (this.state.syncWindows ?? []).find((window) => window.appliance === appliance && inside(window));
  }

  /**
   * Markers acknowledged past the end of the journal as opened were lost with the records around
   * them (damage, or an acknowledged tail the journal could not tell from a torn one): their
   * checkpoints are listed as lost from now on. Markers promoted past are forgotten.
   */
  private async reconcileAcknowledgedMarkers(): Promise<void> {
    const end = this.journal.lsnDurable;
    const watermark = this.journal.watermarkLsn;
    const acknowledged = this.state.markersAcknowledged ?? [];
    const gone = acknowledged.filter((marker) => marker.lsn > end);
    const kept = acknowledged.filter((marker) => marker.lsn <= end && marker.lsn > watermark);
    if (gone.length === 0 && kept.length === acknowledged.length) return;
    const losses = this.journal.losses();
    const lost = gone.map((marker) => {
      const loss = [...losses].reverse().find((candidate) => candidate.lsnFirst <= marker.lsn);
      const why = loss && loss.kind === 'damage'
        ? `its marker (lsn ${marker.lsn}) was lost with journal records ${loss.lsnFirst}..${loss.lsnLast}: ${describeLossPlace(loss)}`
        : `its marker (lsn ${marker.lsn}) was acknowledged but the journal now ends at lsn ${end}: the target lost records it had acknowledged`;
      const entry: { id: string; kind: string; name?: string; timeMs: number; why: string } = { id: marker.id, kind: marker.kind, timeMs: marker.timeMs, why };
      if (marker.name !== undefined) entry.name = marker.name;
      return entry;
    });
    if (lost.length > 0) this.options.logger.error('checkpoints lost with journal records the target had acknowledged', { group: this.name, checkpoints: lost.map((entry) => entry.id) });
    await this.updateState((state) => ({ ...state, markersAcknowledged: kept, checkpointsLost: [...(state.checkpointsLost ?? []), ...lost].slice(-lostCheckpointsKeptMax) }));
  }

  /**
   * Opens (or widens) a window for every source a damage loss of the journal may have touched, so
   * that no point past the loss is served until that source's delta sync ends, and the WELCOME
   * asks the source for that delta sync. Runs at open, after the windows are rebuilt.
   */
  private async openLossWindows(): Promise<void> {
    // A window recorded before heal tokens existed gets one, or no sync could ever end it.
    await this.updateState((state) =>
      (state.syncWindows ?? []).some((window) => window.deltaSyncNeeded && window.endLsn === undefined && window.healToken === undefined)
        ? { ...state, syncWindows: state.syncWindows!.map((window) => (window.deltaSyncNeeded && window.endLsn === undefined && window.healToken === undefined ? { ...window, healToken: newHealToken(), deltaBegun: false } : window)) }
        : state,
    );
    for (const loss of this.journal.losses()) {
      if (loss.kind !== 'damage' || loss.healedTimeMs !== undefined) continue;
      const appliances = new Set<string>();
      const streams = new Set(loss.streams.map((entry) => entry.stream));
      for (const record of this.state.streams) if (loss.streamsUnknown || streams.has(record.stream)) appliances.add(record.appliance);
      if (loss.streamsUnknown || appliances.size === 0) for (const source of this.config.sources) appliances.add(source);
      const reason = `journal records ${loss.lsnFirst}..${loss.lsnLast} were lost: ${describeLossPlace(loss)}`;
      await this.updateState((state) => {
        let next = state;
        for (const appliance of appliances) {
          if ((next.syncWindows ?? []).some((window) => window.appliance === appliance && window.lossIds?.includes(loss.id))) continue;
          next = withLossWindow(next, appliance, { lsnKept: loss.lsnFirst - 1, timeMsFrom: loss.timeMsFrom, reason, lossId: loss.id });
        }
        return next;
      });
    }
    await this.healEndedLosses();
  }

  /** A loss whose every window has ended is healed in the journal from the latest end on. */
  private async healEndedLosses(): Promise<void> {
    const windows = this.state.syncWindows ?? [];
    for (const loss of this.journal.losses()) {
      if (loss.healedTimeMs !== undefined) continue;
      const mine = windows.filter((window) => window.lossIds?.includes(loss.id));
      if (mine.length === 0 || mine.some((window) => window.endLsn === undefined)) continue;
      await this.journal.lossHealed(loss.id, Math.max(...mine.map((window) => window.endTimeMs ?? 0)));
      this.options.logger.info('journal loss healed: the sources resent what differed', { group: this.name, loss: loss.id });
    }
  }

  /** Rebuilds windows from the sync markers the journal holds (a crash may have come between the append and the state write), and drops windows the journal has promoted past. */
  private async reconcileSyncWindows(): Promise<void> {
    const byAppliance = new Map<string, SyncMarker[]>();
    for (const marker of this.journal.markerRecords()) {
      if (!isSyncMarkerKind(marker.kind)) continue;
      const appliance = this.state.streams.find((stream) => stream.stream === marker.stream)?.appliance;
      if (appliance === undefined) continue;
      const list = byAppliance.get(appliance) ?? [];
      const entry: SyncMarker = { id: marker.id, kind: marker.kind, lsn: marker.lsn, timeMs: marker.timeMs };
      if (marker.name !== undefined) entry.name = marker.name;
      if (marker.heal !== undefined) entry.heal = marker.heal;
      list.push(entry);
      byAppliance.set(appliance, list);
    }
    const watermarkLsn = this.journal.watermarkLsn;
    await this.updateState((state) => {
      let next = state;
      for (const [appliance, markers] of byAppliance) next = withSyncMarkers(next, appliance, markers);
      const kept = (next.syncWindows ?? []).filter((window) => window.endLsn === undefined || window.endLsn > watermarkLsn);
      return kept.length === (next.syncWindows ?? []).length ? next : { ...next, syncWindows: kept };
    });
  }

  private toAppendRecord(record: StreamRecord, entry: StreamEntry): AppendRecord {
    const base = { stream: record.stream, sequence: entry.sequence - record.sequenceBase, timeMs: Math.round(entry.timeMs) };
    if (entry.kind === 'checkpoint') {
      let parsed: { id?: unknown; kind?: unknown; name?: unknown; heal?: unknown };
      try {
        parsed = JSON.parse((entry.data ?? Buffer.alloc(0)).toString('utf8')) as typeof parsed;
      } catch {
        throw new Error(`Checkpoint marker ${entry.sequence} of stream ${record.stream} is not JSON`);
      }
      if (typeof parsed.id !== 'string' || typeof parsed.kind !== 'string') throw new Error(`Checkpoint marker ${entry.sequence} of stream ${record.stream} has no id or kind`);
      const checkpoint: CheckpointMarker = { id: parsed.id, kind: parsed.kind, streams: this.markerStreams() };
      if (typeof parsed.name === 'string') checkpoint.name = parsed.name;
      if (typeof parsed.heal === 'string' && isSyncMarkerKind(parsed.kind)) checkpoint.heal = parsed.heal;
      return { ...base, kind: 'checkpoint', volume: 0, offset: 0, checkpoint };
    }
    const volume = record.volumes[entry.volume];
    if (volume === undefined) throw new Error(`Stream ${record.stream} sent an entry for volume ${entry.volume}, which its HELLO did not name`);
    // Built field by field (no spread): this runs for every entry received.
    if (entry.kind === 'write') return { stream: base.stream, sequence: base.sequence, timeMs: base.timeMs, kind: 'write', volume, offset: entry.offset, data: entry.data! };
    return { stream: base.stream, sequence: base.sequence, timeMs: base.timeMs, kind: entry.kind, volume, offset: entry.offset, lengthBytes: entry.lengthBytes };
  }

  /**
   * The streams a checkpoint needs a marker from: the newest epoch of every configured source, and 0
   * for a source that has not connected yet (no marker ever comes on stream 0, so such a checkpoint
   * is not recoverable until a later marker of it names that source's stream).
   */
  private markerStreams(): number[] {
    return this.config.sources.map((appliance) => this.currentStreamOf(appliance)?.stream ?? 0);
  }

  /** Journal stream ids of the newest epoch of every source that has connected. */
  private currentStreams(): number[] {
    const streams: number[] = [];
    for (const appliance of this.config.sources) {
      const current = this.currentStreamOf(appliance);
      if (current) streams.push(current.stream);
    }
    return streams;
  }

  status(): TargetGroupStatus {
    const journal = this.journal.status();
    const currentStreams = new Set(this.currentStreams());
    const streams = this.state.streams.map((record) => {
      const entry = journal.streams.find((candidate) => candidate.stream === record.stream);
      return {
        stream: record.stream,
        appliance: record.appliance,
        epoch: record.epoch,
        current: currentStreams.has(record.stream),
        sequenceDurable: entry?.sequenceLast ?? 0,
        sequencePromoted: entry?.sequencePromoted ?? 0,
        timeMsDurable: this.timeMsDurable.get(record.stream),
        connected: this.connected.has(record.stream),
      };
    });
    const times = streams.filter((stream) => stream.current).map((stream) => stream.timeMsDurable);
    const timeMsNewestDurable = times.length > 0 && times.every((time) => time !== undefined) ? Math.min(...(times as number[])) : undefined;
    const alerts: TargetGroupAlert[] = journal.alerts.map((alert) => ({ condition: alert.condition, severity: alert.condition === 'history-error' ? 'error' : 'warning', message: alert.message }));
    for (const window of this.state.syncWindows ?? []) {
      if (!window.deltaSyncNeeded || window.endLsn !== undefined) continue;
      alerts.push({
        condition: 'acknowledged-records-lost',
        severity: 'error',
        message: `Group '${this.name}' lost records of '${window.appliance}' that it had acknowledged (${window.lossReason ?? 'reason not recorded'}): no point from ${new Date(window.beginTimeMs).toISOString()} on is recoverable until the ${window.deltaBegun ? 'delta sync now running' : 'delta sync the source runs on reconnecting'} ends`,
      });
    }
    return { group: this.name, role: 'target', streams, timeMsNewestDurable, syncWindows: this.state.syncWindows ?? [], alerts, losses: this.journal.losses(), journal };
  }

  replica(volume: number): BackingStore | undefined {
    return this.replicas.get(volume);
  }

  async close(): Promise<void> {
    await this.journal.close();
    for (const replica of this.replicas.values()) await replica.close();
  }
}

/** How long one recovery view serves the checksum requests of a delta sync before a newer one is opened. */
export const sumsViewAgeMsMax = 10_000;
/** A view no request used for this long is closed: an open view holds back promotion. */
export const sumsViewIdleMsMax = 1_000;

/**
 * Answers a session's checksum requests from a recovery view at the newest durable point (the
 * replica with every durable journal record over it). Any durable point will do: the stream's
 * entries after it are applied after it, and the source reads its side only once it has the answer.
 * One view serves requests for up to `sumsViewAgeMsMax`, so that a delta sync does not build an
 * index per request nor hold the journal's units for long.
 */
class SumsReader {
  private current: { volume: number; view: RecoveryView; openedMs: number } | undefined;
  private turn: Promise<unknown> = Promise.resolve();
  private idleTimer: NodeJS.Timeout | undefined;
  private closed = false;

  constructor(
    private readonly journal: Journal,
    private readonly volumes: Record<string, number>,
    private readonly group: string,
    private readonly clock: Clock,
  ) {}

  sums(volume: number, offset: number, lengthBytes: number, blockBytes: number): Promise<Buffer> {
    clearTimeout(this.idleTimer);
    const run = this.turn.then(() => this.sumsNow(volume, offset, lengthBytes, blockBytes));
    this.turn = run.catch(() => undefined).then(() => {
      clearTimeout(this.idleTimer);
      this.idleTimer = setTimeout(() => {
        this.turn = this.turn.then(() => this.drop());
      }, sumsViewIdleMsMax);
      this.idleTimer.unref();
    });
    return run;
  }

  private async sumsNow(volume: number, offset: number, lengthBytes: number, blockBytes: number): Promise<Buffer> {
    if (this.closed) throw new Error('the session has ended');
    const index = this.volumes[String(volume)];
    if (index === undefined) throw new Error(`volume ${volume} is not part of this stream of group '${this.group}'`);
    for (let attempt = 0; ; attempt++) {
      const view = await this.viewOf(index);
      if (!(Number.isSafeInteger(offset) && offset >= 0 && offset + lengthBytes <= view.sizeBytes)) {
        throw new Error(`${lengthBytes} bytes at ${offset} are not inside volume ${volume} of ${view.sizeBytes} bytes`);
      }
      const data = Buffer.allocUnsafe(lengthBytes);
      try {
        await view.read(data, offset);
        return blockSums(data, blockBytes);
      } catch (error) {
        // The journal may have invalidated the view (hard limit): once more with a new one.
        await this.drop();
        if (attempt > 0) throw error;
      }
    }
  }

  private async viewOf(index: number): Promise<RecoveryView> {
    const current = this.current;
    if (current && current.volume === index && this.clock.nowMs() - current.openedMs < sumsViewAgeMsMax) return current.view;
    await this.drop();
    // The latest valid time: the view holds every durable record.
    const view = await this.journal.openView({ volume: index, at: { timeMs: 8.64e15 }, scratchBytesMax: 0, currentImage: true });
    this.current = { volume: index, view, openedMs: this.clock.nowMs() };
    return view;
  }

  private async drop(): Promise<void> {
    const current = this.current;
    this.current = undefined;
    await current?.view.close().catch(() => undefined);
  }

  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.idleTimer);
    await this.turn;
    await this.drop();
  }
}

interface SyncMarker {
  id: string;
  kind: 'sync-begin' | 'sync-end';
  name?: string;
  /** The heal token a sync's begin carries (see `SyncWindow.healToken`). */
  heal?: string;
  lsn: number;
  timeMs: number;
}

function isSyncMarkerKind(kind: string): kind is 'sync-begin' | 'sync-end' {
  return kind === 'sync-begin' || kind === 'sync-end';
}

/** The state with a source's sync markers applied, in order; a marker already applied (by id) changes nothing. */
export function withSyncMarkers(state: GroupState, appliance: string, markers: readonly SyncMarker[]): GroupState {
  const before = state.syncWindows ?? [];
  let windows = before;
  for (const marker of markers) {
    if (windows.some((window) => window.appliance === appliance && (window.beginIds.includes(marker.id) || window.endId === marker.id))) continue;
    const open = windows.find((window) => window.appliance === appliance && window.endLsn === undefined);
    if (marker.kind === 'sync-begin') {
      if (open) {
        // A sync that compares or ships every block heals what a loss of acknowledged records left behind.
        const heals = open.deltaSyncNeeded === true && marker.heal !== undefined && marker.heal === open.healToken;
        windows = windows.map((window) => (window === open ? { ...window, beginIds: [...window.beginIds, marker.id], ...(heals ? { deltaBegun: true } : {}) } : window));
      } else {
        const initial = marker.name === 'initial-sync';
        windows = [...windows, { appliance, sync: marker.name ?? 'sync', beginLsn: initial ? 0 : marker.lsn, beginTimeMs: initial ? 0 : marker.timeMs, beginIds: [marker.id] }];
      }
    } else if (open && (!open.deltaSyncNeeded || open.deltaBegun)) {
      windows = windows.map((window) => (window === open ? { ...window, endLsn: marker.lsn, endTimeMs: marker.timeMs, endId: marker.id } : window));
    }
  }
  return windows === before ? state : { ...state, syncWindows: windows };
}

function newHealToken(): string {
  return `heal-${crypto.randomBytes(8).toString('hex')}`;
}

/**
 * The state with a window of `appliance` that only a delta sync beginning after now ends: a new
 * one from the loss, or the open one widened back to it (a sync under way may have begun before
 * the loss, so it no longer counts as the heal).
 */
export function withLossWindow(state: GroupState, appliance: string, loss: { lsnKept: number; timeMsFrom: number; reason: string; lossId: string | undefined }): GroupState {
  const windows = state.syncWindows ?? [];
  const open = windows.find((window) => window.appliance === appliance && window.endLsn === undefined);
  const lossIds = loss.lossId === undefined ? [] : [loss.lossId];
  if (open) {
    const widened: SyncWindow = {
      ...open,
      beginLsn: Math.min(open.beginLsn, loss.lsnKept),
      beginTimeMs: Math.min(open.beginTimeMs, loss.timeMsFrom),
      deltaSyncNeeded: true,
      deltaBegun: false,
      healToken: newHealToken(),
      lossIds: [...(open.lossIds ?? []), ...lossIds],
      lossReason: loss.reason,
    };
    return { ...state, syncWindows: windows.map((window) => (window === open ? widened : window)) };
  }
  const created: SyncWindow = { appliance, sync: 'loss-heal', beginLsn: loss.lsnKept, beginTimeMs: loss.timeMsFrom, beginIds: [], deltaSyncNeeded: true, deltaBegun: false, healToken: newHealToken(), lossIds, lossReason: loss.reason };
  return { ...state, syncWindows: [...windows, created] };
}

function describeWindow(window: SyncWindow): string {
  const from = window.beginTimeMs === 0 ? 'the start of the protection' : new Date(window.beginTimeMs).toISOString();
  const to = window.endTimeMs === undefined ? 'now (it is still running)' : new Date(window.endTimeMs).toISOString();
  return `the ${window.sync} of '${window.appliance}' ran from ${from} to ${to}`;
}
