/**
 * A simulated source appliance: one stream of one protection group. The
 * workload's writes, zero ranges, trims and checkpoint markers go into a real
 * `StreamQueue` (spilling to a simulated disk of its own when its memory is
 * full) and a real `Shipper` sends them over the simulated network. The
 * oracle records every entry with the sequence the queue gave it, and every
 * acknowledgement the shipper saw.
 *
 * The source never crashes in this simulation (see README: a source crash
 * starts a new epoch and a resync, which the shipper does not do by itself).
 */
import { SimulatedDisk } from '../../src/journal/sim-disk.js';
import type { CodecName } from '../../src/replication/codec.js';
import type { LinkConnector } from '../../src/replication/link.js';
import { StreamQueue, type StreamEntryInput } from '../../src/replication/queue.js';
import { TokenBucket } from '../../src/replication/rate.js';
import { Shipper } from '../../src/replication/shipper.js';
import type { Logger } from '../../src/util/logger.js';
import type { SimHost } from './network.js';
import type { Oracle, OracleVolume } from './oracle.js';
import type { SimScheduler, SimScope } from './scheduler.js';

export interface SourceSettings {
  codec: CodecName;
  batchBytesMax: number;
  batchAgeMsMax: number;
  windowBytesMax: number;
  /** 0: no rate limit. */
  rateBytesPerSecond: number;
  queueMemoryBytesMax: number;
  spillBytesMax: number;
  spillSegmentBytes: number;
}

export class SimSource implements SimHost {
  readonly up = true;
  readonly incarnation = 1;
  readonly scope: SimScope;
  readonly spillDisk = new SimulatedDisk();
  queue!: StreamQueue;
  shipper!: Shipper;
  /** Entries the queue refused a sequence for (bitmap mode): the simulation keeps the queue out of it. */
  pushesWithoutSequence = 0;

  private constructor(
    readonly index: number,
    readonly name: string,
    readonly volumes: readonly OracleVolume[],
    private readonly oracle: Oracle,
    scheduler: SimScheduler,
  ) {
    this.scope = scheduler.scope(name);
  }

  static async start(options: {
    index: number;
    name: string;
    group: string;
    epoch: string;
    volumes: readonly OracleVolume[];
    oracle: Oracle;
    scheduler: SimScheduler;
    connect: (source: SimSource) => LinkConnector;
    settings: SourceSettings;
    logger: Logger;
  }): Promise<SimSource> {
    const source = new SimSource(options.index, options.name, options.volumes, options.oracle, options.scheduler);
    const { settings } = options;
    source.queue = await StreamQueue.open({
      name: `${options.group}/${options.name}`,
      fileSystem: source.spillDisk,
      spillDirectory: '/spill',
      volumes: new Map(options.volumes.map((volume) => [volume.sourceVolume, volume.sizeBytes])),
      memoryBytesMax: settings.queueMemoryBytesMax,
      spillBytesMax: settings.spillBytesMax,
      spillSegmentBytes: settings.spillSegmentBytes,
      clock: source.scope,
    });
    const rateLimits = settings.rateBytesPerSecond > 0 ? [new TokenBucket(source.scope, settings.rateBytesPerSecond)] : [];
    source.shipper = new Shipper({
      hello: {
        site: 'site-a',
        appliance: options.name,
        group: options.group,
        epoch: options.epoch,
        sequenceBase: 0,
        volumes: options.volumes.map((volume) => ({ id: volume.sourceVolume, name: volume.name, sizeBytes: volume.sizeBytes })),
      },
      queue: source.queue,
      connect: options.connect(source),
      scheduler: source.scope,
      codec: settings.codec,
      rateLimits,
      batchBytesMax: settings.batchBytesMax,
      batchAgeMsMax: settings.batchAgeMsMax,
      windowBytesMax: settings.windowBytesMax,
      logger: options.logger,
      onAcknowledged: (sequence) => options.oracle.acknowledged(options.index, sequence),
    });
    source.shipper.start();
    return source;
  }

  /** Pushes one entry (the tap's or the checkpoint engine's) and records it in the oracle. */
  push(input: StreamEntryInput & { checkpointId?: string }): number | undefined {
    const sequence = this.queue.push(input);
    if (sequence === undefined) {
      this.pushesWithoutSequence++;
      return undefined;
    }
    const entry = {
      sequence,
      kind: input.kind,
      volume: input.kind === 'checkpoint' ? 0 : input.volume,
      offset: input.kind === 'checkpoint' ? 0 : input.offset,
      lengthBytes: input.kind === 'checkpoint' ? 0 : input.lengthBytes,
      timeMs: input.timeMs,
      ...(input.kind === 'write' ? { data: Buffer.from(input.data as Buffer) } : {}),
      ...(input.checkpoint ? { checkpointId: input.checkpoint.id } : {}),
    };
    this.oracle.record(this.index, entry);
    this.shipper.wake();
    return sequence;
  }

  /** Every entry pushed is acknowledged, in the queue and at the shipper. */
  get drained(): boolean {
    const stats = this.queue.stats();
    return stats.sequenceAcknowledged === stats.sequenceLast && this.shipper.stats().sequenceAcknowledged === stats.sequenceLast;
  }
}
