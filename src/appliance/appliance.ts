/**
 * One appliance (DESIGN.md: one daemon per host). Source role: serves its
 * volumes over NBD through the tap and ships each protection group's writes to
 * its target appliance. Target role: receives streams over mutual TLS into
 * protection groups' journals and keeps the replicas. A control API (HTTP/JSON
 * on a local address) reports status and takes commands.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as tls from 'node:tls';
import { NbdServer, type ExportConfig } from '../nbd/server.js';
import { nodeFileSystem, type JournalFileSystem } from '../journal/file-system.js';
import { FileBackingStore } from '../tap/backing-store.js';
import type { Logger } from '../util/logger.js';
import { formatAddress } from '../util/address.js';
import { SocketFrameLink, type FrameLink } from '../replication/link.js';
import { TokenBucket } from '../replication/rate.js';
import { Receiver, type ReceiverTarget } from '../replication/receiver.js';
import { systemScheduler, type Scheduler, type Timer } from '../replication/scheduler.js';
import { clientTlsOptions, createReplicationServer, loadTlsIdentity, type TlsIdentity } from '../replication/tls.js';
import type { Hello } from '../replication/wire.js';
import type { RecoveryView } from '../journal/view.js';
import type { ViewPoint } from '../journal/journal.js';
import { checkProtectVolumes, type ApplianceConfig, type ProtectConfig } from './config.js';
import { controlChangesFileName, controlChangesNow, protectionInForce, type ControlChanges, type ProtectionInForce } from './control-changes.js';
import { ControlApi } from './control-api.js';
import { SourceGroup, type SourceGroupStatus, type SyncState } from './source-group.js';
import { TargetGroup, type TargetGroupStatus } from './target-group.js';
import { VolumeSwitch } from './volume-switch.js';
import { readStateFile, writeStateFile } from '../util/state-file.js';

/** How often the journals are ticked (promotion of aged writes, alerts). */
export const journalTickMs = 1_000;
/** How long a stopping appliance waits for its queues to be acknowledged. */
export const stopDrainMsMax = 10_000;
/** A connection to the target that takes longer than this is given up (then retried). */
export const connectMsMax = 10_000;

export interface ApplianceOptions {
  config: ApplianceConfig;
  dataDirectory: string;
  logger: Logger;
  scheduler?: Scheduler;
  fileSystem?: JournalFileSystem;
}

export interface ApplianceStatus {
  appliance: string;
  site: string;
  startedMs: number;
  addresses: { control: string; nbd?: string; receive?: string };
  rateLimitBytesPerSecond: number;
  volumes: { name: string; sizeBytes: number; group: string | undefined; path: string }[];
  groups: (SourceGroupStatus | TargetGroupStatus | FailedGroupStatus)[];
  /** The replication receiver's counters since start (present when the appliance receives groups). */
  receiver?: Receiver['counters'];
  /**
   * Where the protection and limits come from: the configuration file alone, or with the changes made
   * through the control API (`<data>/control-changes.json`, last recorded at `recordedMs`). `dropped`:
   * a record made over an older version of the file, set aside at this start.
   */
  configuration: { from: ProtectionInForce['from']; recordedMs?: number; dropped?: ProtectionInForce['dropped'] };
  /** Use of each bounded resource against its limit. */
  limits: ApplianceLimitsStatus;
}

/** A target group that could not open: the appliance runs without it until it is repaired. */
export interface FailedGroupStatus {
  group: string;
  role: 'target';
  state: 'failed';
  reason: string;
  /** What an operator can do, as commands to run. */
  repair: string[];
  alerts: { condition: string; severity: 'error'; message: string }[];
}

function failedTargetGroup(group: string, directory: string, error: unknown): FailedGroupStatus {
  const reason = error instanceof Error ? error.message : String(error);
  const journal = path.join(directory, 'journal');
  return {
    group,
    role: 'target',
    state: 'failed',
    reason,
    repair: [
      `bin/lifeline journal verify ${journal}    # names the first damaged record or missing unit`,
      `bin/lifeline journal inspect ${journal}   # units, streams, checkpoints and earlier losses`,
      `# restore the unit or datastore named above and restart the appliance; or, to start the group's history anew from its replica,`,
      `# stop the appliance, move ${journal} and its unit directories (inspect lists them) aside and start it: the sources see the loss and heal the replica by a delta sync`,
    ],
    alerts: [{ condition: 'group-failed', severity: 'error', message: `Group '${group}' failed to open and receives nothing: ${reason}` }],
  };
}

export interface ApplianceLimitsStatus {
  /** Control API requests being handled, this one included, and `control.requestsInFlightMax`. */
  controlRequests: { inFlight: number; max: number };
  /** NBD connections past the handshake of each export (volume or view), and `nbd.connectionsPerExportMax`. */
  nbdConnections?: { perExportMax: number; exports: Record<string, number> };
  /**
   * Recovery views open (and being opened, which hold their place) on the appliance and per group,
   * against `receive.viewsMax` and `receive.viewsPerGroupMax`.
   */
  views?: { open: number; opening: number; max: number; perGroupMax: number; groups: Record<string, number> };
  /** The open views' scratch: reserved (the sum of their `scratchBytesMax`), written so far, and `receive.viewsScratchBytesMax`. */
  viewsScratch?: { bytesReserved: number; bytesUsed: number; bytesMax: number };
}

/** A bounded resource is at its limit: the request would pass it. */
export class LimitReached extends Error {
  constructor(readonly limit: string, message: string) {
    super(message);
    this.name = 'LimitReached';
  }
}

/** An open recovery view, as `GET /v1/groups/:group/views` lists it. */
export interface ViewListing {
  name: string;
  volume: string;
  at: ViewPoint;
  uri: string | undefined;
  scratchBytesMax: number;
  scratchBytesUsed: number;
  nbdConnections: number;
}

/** A change made through the control API is in force but could not be recorded, so it would not outlive a restart. */
export class ControlChangeNotRecorded extends Error {
  constructor(what: string, filePath: string, cause: Error) {
    super(`${what}, but cannot record the change (${cause.message}), so a restart of the appliance would undo it: path is ${filePath}`, { cause });
    this.name = 'ControlChangeNotRecorded';
  }
}

interface ServedVolume {
  name: string;
  path: string;
  file: FileBackingStore;
  /** What the NBD server exports: the file, or the stack of the group that protects the volume. */
  switch: VolumeSwitch;
}

/**
 * `<data>/volumes-protection.json`: for every volume this appliance has served, under which
 * protection its writes go, since when: a group's name, or null for none. Written before the first
 * request reaches a volume served without protection, and once a group has begun on it. A group that
 * starts on a volume whose writes went anywhere else since it last ran (no protection, or another
 * group's stream) owes a delta sync: its own state cannot account for those writes.
 */
export const volumeProtectionFileName = 'volumes-protection.json';
interface VolumeProtectionState {
  version: 1;
  volumes: Record<string, { group: string | null; sinceMs: number }>;
}
/** The record's name before it named the protecting group (its volumes were served without protection). */
const unprotectedVolumesFileNameBefore = 'volumes-unprotected.json';

/** A protection change refused: the group is unknown here, or the change cannot be made now. */
export class ProtectionChangeRefused extends Error {
  constructor(readonly code: 'unknown-group' | 'refused', message: string) {
    super(message);
    this.name = 'ProtectionChangeRefused';
  }
}

/** What removing protection from a group did. */
export interface ProtectionRemoved {
  group: string;
  volumes: string[];
  /** Entries the target had not acknowledged when the group stopped (0: it holds every write made under protection). */
  entriesNotAcknowledged: number;
  bytesNotAcknowledged: number;
  /** The sync that was running, cut short (the target's replica stays inconsistent until the next protection's sync ends). */
  syncInterrupted: SyncState | undefined;
  /** The checkpoint marking the end of protection, when one could be taken (not during a sync). */
  endCheckpoint: string | undefined;
}

export class Appliance {
  readonly config: ApplianceConfig;
  readonly startedMs: number;
  private readonly options: ApplianceOptions;
  private readonly logger: Logger;
  private readonly scheduler: Scheduler;
  private readonly fileSystem: JournalFileSystem;
  private readonly identity: TlsIdentity;
  readonly rateLimit: TokenBucket;
  private readonly volumes = new Map<string, ServedVolume>();
  readonly sources = new Map<string, SourceGroup>();
  readonly targets = new Map<string, TargetGroup>();
  /** Target groups that could not open at start, with why and how to repair them. */
  readonly failedTargets = new Map<string, FailedGroupStatus>();
  private nbd: NbdServer | undefined;
  private receiveServer: tls.Server | undefined;
  private receiver: Receiver | undefined;
  private control: ControlApi | undefined;
  private tickTimer: Timer | undefined;
  private readonly views = new Map<string, { group: string; volume: string; view: RecoveryView; at: ViewPoint; scratchBytesMax: number }>();
  /**
   * The places views hold against the limits: one per view open or being opened, taken before the
   * view is opened (so requests that arrive together cannot all pass a limit) and given back once it
   * has closed (its scratch file removed) or failed to open.
   */
  private readonly viewPlaces = new Map<string, { group: string; scratchBytesMax: number }>();
  private viewNumber = 0;
  private stopped = false;
  private volumeProtection: VolumeProtectionState = { version: 1, volumes: {} };
  /** Protection changes (add, remove) run one after another. */
  private protectionChanges: Promise<unknown> = Promise.resolve();
  /** Writes of `<data>/control-changes.json`, one after another. */
  private controlChangesWriting: Promise<unknown> = Promise.resolve();
  private configuration: ApplianceStatus['configuration'] = { from: 'file' };
  readonly addresses: ApplianceStatus['addresses'] = { control: '' };

  private constructor(options: ApplianceOptions, identity: TlsIdentity) {
    this.options = options;
    this.config = options.config;
    this.logger = options.logger;
    this.scheduler = options.scheduler ?? systemScheduler;
    this.fileSystem = options.fileSystem ?? nodeFileSystem;
    this.identity = identity;
    this.startedMs = this.scheduler.nowMs();
    this.rateLimit = new TokenBucket(this.scheduler, options.config.rateLimitBytesPerSecond);
  }

  static async start(options: ApplianceOptions): Promise<Appliance> {
    const { config } = options;
    const identity = loadTlsIdentity({ certPath: config.tls.cert, keyPath: config.tls.key, trustedCaPaths: config.tls.trustedCas });
    if (identity.name !== config.appliance.name) {
      throw new Error(`Cannot start appliance '${config.appliance.name}' as its certificate names '${identity.name}': path is ${config.tls.cert}`);
    }
    fs.mkdirSync(options.dataDirectory, { recursive: true });
    const appliance = new Appliance(options, identity);
    try {
      await appliance.startParts();
    } catch (error) {
      await appliance.stop().catch(() => {});
      throw error;
    }
    return appliance;
  }

  private async startParts(): Promise<void> {
    const config = this.config;
    for (const volume of config.volumes) {
      const file = FileBackingStore.open({ path: volume.path, readOnly: false, createSizeBytes: volume.sizeBytes });
      this.volumes.set(volume.name, { name: volume.name, path: volume.path, file, switch: new VolumeSwitch(file) });
    }
    this.volumeProtection = await this.readVolumeProtection();
    if (config.receive) {
      for (const group of config.receive.groups) {
        const directory = path.join(this.options.dataDirectory, 'target', group.group);
        let target: TargetGroup;
        try {
          target = await TargetGroup.open({ config: group, directory, fileSystem: this.fileSystem, clock: this.scheduler, logger: this.logger });
        } catch (error) {
          // One group that cannot open (a damaged journal that open cannot salvage, a missing unit or
          // replica) fails alone: the appliance starts, and every other group runs.
          const failed = failedTargetGroup(group.group, directory, error);
          this.failedTargets.set(group.group, failed);
          this.logger.error('target group failed to open; every other group runs', { group: group.group, reason: failed.reason, repair: failed.repair });
          continue;
        }
        target.journal.on((event) => this.logger.info('journal event', { group: group.group, ...flatten(event) }));
        this.targets.set(group.group, target);
      }
      await this.startReceiving(config.receive.listen);
    }
    const inForce = await this.readProtectionInForce();
    this.rateLimit.setRate(inForce.rateLimitBytesPerSecond);
    for (const protect of inForce.protect) await this.serially(() => this.addSourceNow(protect));
    if (config.nbd) await this.startNbd(config.nbd.listen);
    this.control = new ControlApi(this, this.logger);
    this.addresses.control = await this.control.listen(config.control.listen);
    this.tickTimer = this.scheduler.setTimer(journalTickMs, () => void this.tick());
  }

  private async tick(): Promise<void> {
    for (const target of this.targets.values()) {
      try {
        await target.journal.tick();
      } catch (error) {
        this.logger.error('journal tick failed', { group: target.name, error: (error as Error).message });
      }
    }
    if (!this.stopped) this.tickTimer = this.scheduler.setTimer(journalTickMs, () => void this.tick());
  }

  private async startReceiving(listen: { host: string; port: number }): Promise<void> {
    const allowed = new Set<string>();
    for (const target of this.targets.values()) for (const source of target.config.sources) allowed.add(source);
    const receiverTarget: ReceiverTarget = {
      openStream: async (hello: Hello, peerName: string | undefined) => {
        const target = this.targets.get(hello.group);
        const failed = this.failedTargets.get(hello.group);
        if (failed) return { refuse: { code: 'journal-failed', message: `group '${hello.group}' failed to open at '${this.config.appliance.name}': ${failed.reason}` } };
        if (!target) return { refuse: { code: 'unknown-group', message: `appliance '${this.config.appliance.name}' receives no group '${hello.group}'` } };
        return target.openStream(hello, peerName);
      },
    };
    this.receiver = new Receiver({ target: receiverTarget, scheduler: this.scheduler, appliance: this.config.appliance.name, logger: this.logger });
    const receiver = this.receiver;
    this.receiveServer = createReplicationServer({
      identity: this.identity,
      allowedPeers: (name) => allowed.has(name),
      onPeer: (socket, name) => {
        const link: FrameLink = new SocketFrameLink(socket, `from ${name} at ${socket.remoteAddress ?? '?'}:${socket.remotePort ?? '?'}`);
        receiver.accept(link);
      },
      onRefused: (error, remoteAddress) => this.logger.warn('replication peer refused', { remoteAddress, error: error.message }),
    });
    const server = this.receiveServer;
    server.on('tlsClientError', (error) => this.logger.warn('replication TLS handshake failed', { error: error.message }));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(listen.port, listen.host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    this.addresses.receive = formatAddress(server.address());
    this.logger.info('receiving replication', { address: this.addresses.receive });
  }

  private connector(protect: ProtectConfig): () => Promise<FrameLink> {
    const { host, port } = protect.target.address;
    return () =>
      new Promise<FrameLink>((resolve, reject) => {
        const socket = tls.connect({ host, port, ...clientTlsOptions(this.identity, { expectedPeerName: protect.target.appliance }) });
        const timer = setTimeout(() => socket.destroy(new Error(`no TLS session with ${host}:${port} within ${connectMsMax} ms`)), connectMsMax);
        socket.once('secureConnect', () => {
          clearTimeout(timer);
          socket.removeAllListeners('error');
          resolve(new SocketFrameLink(socket, `to ${protect.target.appliance} at ${host}:${port}`));
        });
        socket.once('error', (error) => {
          clearTimeout(timer);
          socket.destroy();
          reject(error);
        });
      });
  }

  private async readVolumeProtection(): Promise<VolumeProtectionState> {
    const stored = await readStateFile<VolumeProtectionState>(this.fileSystem, path.join(this.options.dataDirectory, volumeProtectionFileName));
    if (stored) return stored;
    // A data directory from before the record named groups: its volumes were served without protection.
    const before = await readStateFile<{ volumes: Record<string, { sinceMs: number }> }>(this.fileSystem, path.join(this.options.dataDirectory, unprotectedVolumesFileNameBefore));
    const volumes: VolumeProtectionState['volumes'] = {};
    for (const [name, entry] of Object.entries(before?.volumes ?? {})) volumes[name] = { group: null, sinceMs: entry.sinceMs };
    return { version: 1, volumes };
  }

  /** Records (durably) that the writes of these volumes go to `group`'s stream from now on (null: to no stream). */
  private async recordProtection(names: string[], group: string | null): Promise<void> {
    const changed = names.filter((name) => this.volumeProtection.volumes[name]?.group !== group);
    if (changed.length === 0) return;
    const volumes = { ...this.volumeProtection.volumes };
    for (const name of changed) volumes[name] = { group, sinceMs: this.scheduler.nowMs() };
    const next: VolumeProtectionState = { version: 1, volumes };
    await writeStateFile(this.fileSystem, path.join(this.options.dataDirectory, volumeProtectionFileName), next);
    this.volumeProtection = next;
  }

  private get controlChangesPath(): string {
    return path.join(this.options.dataDirectory, controlChangesFileName);
  }

  /** The file's protection, or the one the control API left in force over this same file. */
  private async readProtectionInForce(): Promise<ProtectionInForce> {
    const recordPath = this.controlChangesPath;
    const recorded = await readStateFile<ControlChanges>(this.fileSystem, recordPath);
    const inForce = protectionInForce(this.config, recorded, recordPath);
    this.configuration = { from: inForce.from, ...(inForce.from === 'control-changes' ? { recordedMs: recorded!.recordedMs } : {}) };
    if (inForce.dropped) {
      this.configuration.dropped = inForce.dropped;
      this.logger.warn('the configuration file changed since protection or limits were changed through the control API: the file is used, and those changes are dropped', {
        path: recordPath,
        recordedMs: inForce.dropped.recordedMs,
        droppedGroups: inForce.dropped.groups,
        droppedRateLimitBytesPerSecond: inForce.dropped.rateLimitBytesPerSecond,
      });
      await this.fileSystem.unlink(recordPath);
      await this.fileSystem.fsyncDirectory(this.options.dataDirectory);
    } else if (inForce.from === 'control-changes') {
      this.logger.info('using the protection and limits last changed through the control API', { path: recordPath, recordedMs: recorded!.recordedMs, groups: inForce.protect.map((entry) => entry.group) });
    }
    return inForce;
  }

  /**
   * Records (durably) the protection and limits in force now, so that a restart keeps what the
   * control API changed. Writes run one after another, each with the state when it begins.
   */
  private recordControlChanges(what: string): Promise<void> {
    const write = async (): Promise<void> => {
      const protect = [...this.sources.values()].map((source) => ({ ...source.config, rateLimitBytesPerSecond: source.rateLimit.rateBytesPerSecond }));
      const record = controlChangesNow(this.config, protect, this.rateLimit.rateBytesPerSecond, this.scheduler.nowMs());
      try {
        await writeStateFile(this.fileSystem, this.controlChangesPath, record);
      } catch (error) {
        this.logger.error('cannot record a change made through the control API; a restart would undo it', { change: what, path: this.controlChangesPath, error: (error as Error).message });
        throw new ControlChangeNotRecorded(what, this.controlChangesPath, error as Error);
      }
      this.configuration = { from: 'control-changes', recordedMs: record.recordedMs };
    };
    const done = this.controlChangesWriting.then(write);
    this.controlChangesWriting = done.catch(() => undefined);
    return done;
  }

  /** Sets the appliance's rate limit (0: none) and records it. */
  async setRateLimit(bytesPerSecond: number): Promise<void> {
    this.rateLimit.setRate(bytesPerSecond);
    await this.recordControlChanges(`The appliance's rate limit is ${bytesPerSecond} bytes/s`);
  }

  /** Sets a source group's own rate limit (0: none) and records it. */
  async setGroupRateLimit(groupName: string, bytesPerSecond: number): Promise<void> {
    const group = this.sources.get(groupName);
    if (!group) throw this.noSuchSource(groupName);
    group.setRate(bytesPerSecond);
    await this.recordControlChanges(`Group '${groupName}' has a rate limit of ${bytesPerSecond} bytes/s`);
  }

  private noSuchSource(groupName: string): ProtectionChangeRefused {
    return new ProtectionChangeRefused('unknown-group', `Appliance '${this.config.appliance.name}' protects no group '${groupName}' as a source`);
  }

  /** Runs protection changes one at a time. */
  private serially<T>(change: () => Promise<T>): Promise<T> {
    const done = this.protectionChanges.then(change);
    this.protectionChanges = done.catch(() => undefined);
    return done;
  }

  /**
   * Starts protecting a group of this appliance's volumes (from the file or the control API), also
   * while they are served: clients stay connected, and the group's first sync sees every write.
   */
  addSource(protect: ProtectConfig): Promise<SourceGroup> {
    return this.serially(async () => {
      const group = await this.addSourceNow(protect);
      await this.recordControlChanges(`Group '${protect.group}' is protected`);
      return group;
    });
  }

  private async addSourceNow(protect: ProtectConfig): Promise<SourceGroup> {
    if (this.stopped) throw new ProtectionChangeRefused('refused', `Cannot protect group '${protect.group}' as the appliance is stopping`);
    if (this.sources.has(protect.group)) throw new ProtectionChangeRefused('refused', `Group '${protect.group}' is already protected by this appliance`);
    const volumeConfigs = this.config.volumes;
    checkProtectVolumes([...[...this.sources.values()].map((source) => source.config), protect], volumeConfigs);
    const writtenElsewhere: { volume: string; group: string | null; sinceMs: number }[] = [];
    for (const name of protect.volumes) {
      const entry = this.volumeProtection.volumes[name];
      if (entry && entry.group !== protect.group) writtenElsewhere.push({ volume: name, ...entry });
    }
    const group = await SourceGroup.open({
      config: protect,
      site: this.config.appliance.site,
      appliance: this.config.appliance.name,
      volumes: protect.volumes.map((name, id) => ({ id, name, file: this.volumes.get(name)!.file })),
      directory: path.join(this.options.dataDirectory, 'source', protect.group),
      fileSystem: this.fileSystem,
      scheduler: this.scheduler,
      connect: this.connector(protect),
      applianceRateLimit: this.rateLimit,
      logger: this.logger,
      writtenElsewhere,
    });
    // Every write that went to a volume beside the tap completes before the group's first sync read.
    const switched: ServedVolume[] = [];
    try {
      for (const name of protect.volumes) {
        const volume = this.volumes.get(name)!;
        await volume.switch.switchTo(group.exports.get(name)!);
        switched.push(volume);
      }
    } catch (error) {
      for (const volume of switched) await volume.switch.switchTo(volume.file);
      await group.stop(0);
      throw error;
    }
    group.begin();
    this.sources.set(protect.group, group);
    // The group's state owes what writes made elsewhere require (see SourceGroup.open). Not recorded: the
    // next start of this group owes a needless delta sync, which is safe, so the group runs on.
    await this.recordProtection(protect.volumes, protect.group).catch((error: unknown) =>
      this.logger.error('cannot record which group protects the volumes; the next start of the group runs a delta sync', { group: protect.group, error: (error as Error).message }),
    );
    if (this.nbd) this.logger.info('protection started', { group: protect.group, volumes: protect.volumes, writtenElsewhere });
    return group;
  }

  /**
   * Ends the protection of a group while its volumes stay served: new writes go to the files
   * directly, the group waits up to `drainMs` for the target to acknowledge what it queued, and
   * stops. Its state is kept, so a later protection of the same volumes starts with a delta sync
   * rather than a full one.
   */
  removeSource(groupName: string, drainMs: number): Promise<ProtectionRemoved> {
    return this.serially(async () => {
      if (this.stopped) throw new ProtectionChangeRefused('refused', `Cannot remove the protection of group '${groupName}' as the appliance is stopping (the group stops with it)`);
      const group = this.sources.get(groupName);
      if (!group) throw this.noSuchSource(groupName);
      const names = group.config.volumes;
      await this.recordProtection(names, null);
      // A quiesce holds write completions, which the switch waits for: none is taken from here on.
      group.endQuiesces();
      for (const name of names) {
        const volume = this.volumes.get(name)!;
        await volume.switch.switchTo(volume.file);
      }
      let endCheckpoint: string | undefined;
      try {
        const marker = group.checkpoint('protection-end', 'protection removed');
        // Sequence 0: the queue discarded it (bitmap mode), so the target never sees it.
        if (marker.sequence > 0) endCheckpoint = marker.id;
      } catch (error) {
        // A sync runs or waits: no point of the group is consistent at the target until a later sync ends.
        this.logger.info('no protection-end checkpoint', { group: groupName, reason: (error as Error).message });
      }
      let stopped: Awaited<ReturnType<SourceGroup['stop']>>;
      try {
        stopped = await group.stop(drainMs);
      } catch (error) {
        // The volumes are served from their files already: the group is gone whether or not it stopped cleanly.
        this.sources.delete(groupName);
        await this.recordControlChanges(`The protection of group '${groupName}' is removed`).catch(() => undefined);
        throw error;
      }
      this.sources.delete(groupName);
      const removed: ProtectionRemoved = { group: groupName, volumes: [...names], ...stopped, endCheckpoint };
      this.logger.info('protection removed', { ...removed });
      await this.recordControlChanges(`The protection of group '${groupName}' is removed`);
      return removed;
    });
  }

  private async startNbd(listen: { host: string; port: number }): Promise<void> {
    const exports: ExportConfig[] = [];
    const unprotected: string[] = [];
    for (const volume of this.volumes.values()) {
      if (volume.switch.store === volume.file) unprotected.push(volume.name);
      exports.push({ name: volume.name, store: volume.switch, description: `Lifeline volume ${volume.name}` });
    }
    // A target serves recovery views on the same server, added while it runs.
    if (exports.length === 0 && this.targets.size === 0) return;
    await this.recordProtection(unprotected, null);
    this.nbd = new NbdServer({ exports, logger: this.logger, allowNoExports: true, connectionsPerExportMax: this.config.nbd?.connectionsPerExportMax });
    const address = await this.nbd.listen({ host: listen.host, port: listen.port });
    this.addresses.nbd = formatAddress(address);
    this.logger.info('serving volumes over NBD', { address: this.addresses.nbd, volumes: exports.map((entry) => entry.name) });
  }

  status(): ApplianceStatus {
    const owner = new Map<string, string>();
    for (const source of this.sources.values()) for (const name of source.config.volumes) owner.set(name, source.name);
    return {
      appliance: this.config.appliance.name,
      site: this.config.appliance.site,
      startedMs: this.startedMs,
      addresses: this.addresses,
      rateLimitBytesPerSecond: this.rateLimit.rateBytesPerSecond,
      volumes: [...this.volumes.values()].map((volume) => ({ name: volume.name, sizeBytes: volume.file.sizeBytes, group: owner.get(volume.name), path: volume.path })),
      groups: [...[...this.sources.values()].map((source) => source.status()), ...[...this.targets.values()].map((target) => target.status()), ...this.failedTargets.values()],
      ...(this.receiver ? { receiver: { ...this.receiver.counters } } : {}),
      configuration: { ...this.configuration },
      limits: this.limitsStatus(),
    };
  }

  private limitsStatus(): ApplianceLimitsStatus {
    const limits: ApplianceLimitsStatus = { controlRequests: { inFlight: this.control?.requestsInFlight ?? 0, max: this.config.control.requestsInFlightMax } };
    if (this.nbd) limits.nbdConnections = { perExportMax: this.nbd.connectionsPerExportMax, exports: this.nbd.connectionsByExport() };
    const receive = this.config.receive;
    if (receive) {
      const groups: Record<string, number> = {};
      for (const group of this.targets.keys()) groups[group] = 0;
      let bytesReserved = 0;
      for (const place of this.viewPlaces.values()) {
        groups[place.group] = (groups[place.group] ?? 0) + 1;
        bytesReserved += place.scratchBytesMax;
      }
      let bytesUsed = 0;
      for (const entry of this.views.values()) bytesUsed += entry.view.scratchBytes;
      limits.views = { open: this.views.size, opening: this.viewPlaces.size - this.views.size, max: receive.viewsMax, perGroupMax: receive.viewsPerGroupMax, groups };
      limits.viewsScratch = { bytesReserved, bytesUsed, bytesMax: receive.viewsScratchBytesMax };
    }
    return limits;
  }

  /**
   * Takes a view's place against the limits (views on the appliance, views of the group, scratch
   * reserved), or throws `LimitReached` naming the limit and its use.
   */
  private takeViewPlace(name: string, group: string, scratchBytesMax: number): void {
    const receive = this.config.receive!;
    const ofGroup = [...this.viewPlaces.values()].filter((place) => place.group === group).length;
    if (this.viewPlaces.size >= receive.viewsMax) {
      throw new LimitReached('receive.viewsMax', `Cannot open another recovery view as appliance '${this.config.appliance.name}' has ${this.viewPlaces.size} of its ${receive.viewsMax} views open (receive.viewsMax); close one first`);
    }
    if (ofGroup >= receive.viewsPerGroupMax) {
      throw new LimitReached('receive.viewsPerGroupMax', `Cannot open another recovery view of group '${group}' as it has ${ofGroup} of its ${receive.viewsPerGroupMax} views open (receive.viewsPerGroupMax); close one first`);
    }
    let reserved = 0;
    for (const place of this.viewPlaces.values()) reserved += place.scratchBytesMax;
    if (reserved + scratchBytesMax > receive.viewsScratchBytesMax) {
      throw new LimitReached(
        'receive.viewsScratchBytesMax',
        `Cannot reserve ${scratchBytesMax} bytes of scratch for another recovery view as the open views reserve ${reserved} of the appliance's ${receive.viewsScratchBytesMax} (receive.viewsScratchBytesMax); ${Math.max(0, receive.viewsScratchBytesMax - reserved)} are left: ask for less ('scratchBytesMax') or close a view`,
      );
    }
    this.viewPlaces.set(name, { group, scratchBytesMax });
  }

  /** Opens a recovery view of a received volume and exports it over NBD. */
  async openView(options: { group: string; volume: string; at: ViewPoint; scratchBytesMax: number }): Promise<{ name: string; uri: string | undefined }> {
    const target = this.targets.get(options.group);
    if (!target) throw new Error(`Cannot open a view as appliance '${this.config.appliance.name}' receives no group '${options.group}'`);
    const volumeId = target.config.volumes.findIndex((volume) => volume.name === options.volume);
    if (volumeId < 0) throw new Error(`Cannot open a view as group '${options.group}' has no volume '${options.volume}'`);
    if (!this.nbd) throw new Error(`Cannot export a view as appliance '${this.config.appliance.name}' has no NBD address (set nbd.listen)`);
    if (this.stopped) throw new Error(`Cannot open a view as appliance '${this.config.appliance.name}' is stopping`);
    const name = `view-${options.group}-${options.volume}-${++this.viewNumber}`;
    this.takeViewPlace(name, options.group, options.scratchBytesMax);
    try {
      target.checkConsistentPoint(volumeId, options.at);
      const view = await target.journal.openView({ volume: volumeId, at: options.at, scratchBytesMax: options.scratchBytesMax, name });
      try {
        // The appliance began to stop while the view opened: its views are being closed.
        if (this.stopped || !this.nbd) throw new Error(`Cannot export a view as appliance '${this.config.appliance.name}' is stopping`);
        this.nbd.addExport({ name, store: view, description: `recovery view of ${options.group}/${options.volume} at ${JSON.stringify(options.at)}` });
      } catch (error) {
        await view.close().catch(() => undefined);
        throw error;
      }
      this.views.set(name, { group: options.group, volume: options.volume, view, at: options.at, scratchBytesMax: options.scratchBytesMax });
    } catch (error) {
      this.viewPlaces.delete(name);
      throw error;
    }
    this.logger.info('recovery view opened', { group: options.group, volume: options.volume, view: name, at: options.at, scratchBytesMax: options.scratchBytesMax });
    return { name, uri: this.viewUri(name) };
  }

  private viewUri(name: string): string | undefined {
    return this.addresses.nbd ? `nbd://${this.addresses.nbd}/${name}` : undefined;
  }

  /** The group an open view belongs to (undefined: no such view open). */
  viewGroup(name: string): string | undefined {
    return this.views.get(name)?.group;
  }

  async closeView(name: string): Promise<boolean> {
    const entry = this.views.get(name);
    if (!entry) return false;
    this.nbd?.removeExport(name);
    this.views.delete(name);
    try {
      await entry.view.close();
    } finally {
      // Its scratch is gone (or cannot be removed, which a new view does not fill): the place is free.
      this.viewPlaces.delete(name);
    }
    this.logger.info('recovery view closed', { view: name });
    return true;
  }

  listViews(group: string): ViewListing[] {
    const connections = this.nbd?.connectionsByExport() ?? {};
    return [...this.views]
      .filter(([, entry]) => entry.group === group)
      .map(([name, entry]) => ({
        name,
        volume: entry.volume,
        at: entry.at,
        uri: this.viewUri(name),
        scratchBytesMax: entry.scratchBytesMax,
        scratchBytesUsed: entry.view.scratchBytes,
        nbdConnections: connections[name] ?? 0,
      }));
  }

  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.tickTimer?.cancel();
    await this.control?.close();
    // A protection change under way finishes first (a new one is refused now), so no group is left half
    // started; a removal's drain is cut to what a stop allows.
    for (const source of this.sources.values()) source.limitDrain(stopDrainMsMax);
    await this.protectionChanges;
    await this.controlChangesWriting;
    if (this.nbd) await this.nbd.close();
    // A view that cannot be closed (its scratch file cannot be removed) must not keep the others
    // open, nor the groups from stopping and the journals from closing cleanly.
    for (const name of [...this.views.keys()]) {
      try {
        await this.closeView(name);
      } catch (error) {
        this.logger.error('cannot close recovery view', { view: name, error: error instanceof Error ? error.message : String(error) });
      }
    }
    await Promise.all([...this.sources.values()].map((source) => source.stop(stopDrainMsMax)));
    // No new connections, then end the sessions: the server's close completes only once its
    // connections have ended, so waiting for it before the receiver closes them never ends.
    const server = this.receiveServer;
    const serverClosed = server ? new Promise<void>((resolve) => server.close(() => resolve())) : Promise.resolve();
    await this.receiver?.close();
    await serverClosed;
    for (const target of this.targets.values()) await target.close();
    for (const volume of this.volumes.values()) await volume.file.close();
  }
}

function flatten(event: object): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(event)) out[key === 'type' ? 'event' : key] = value;
  return out;
}
