/**
 * The shipper: the source side of one stream (one protection group on this
 * appliance). It connects to the target appliance, says which stream and epoch
 * it carries, learns the highest sequence the target's journal holds, and from
 * there sends batches of queued entries, keeping at most a window of bytes
 * unacknowledged. Each ACK lets the queue drop what the target made durable.
 * After any break it reconnects with a backoff and resumes from the target's
 * answer, so nothing is lost (the queue keeps every entry until it is
 * acknowledged) and nothing is applied twice (the target skips sequences it
 * already holds).
 *
 * Batches go on the shipper's own schedule: a batch leaves when it is full
 * (`batchBytesMax`), or when its oldest entry has waited `batchAgeMsMax`, and
 * only when the window and the rate limits allow it.
 */
import type { Logger } from '../util/logger.js';
import { silentLogger } from '../util/logger.js';
import { compressBatch, type CodecName } from './codec.js';
import type { FrameLink, LinkConnector } from './link.js';
import type { TokenBucket } from './rate.js';
import { sleep, type Scheduler, type Timer } from './scheduler.js';
import {
  decodeAck,
  decodeRefuse,
  decodeSums,
  decodeWelcome,
  encodeSumsRequest,
  encodeBatchBody,
  entryHeaderBytes,
  encodeBatchHeader,
  encodeJson,
  encodePing,
  entryEncodedBytes,
  protocolVersion,
  type Frame,
  type Hello,
  type LossReported,
  type Welcome,
  type Refuse,
  type StreamEntry,
  type SumsRequest,
  type WireCodecName,
} from './wire.js';

/** A batch's body (before compression) is at most this size. */
export const batchBytesMaxDefault = 4 * 1024 * 1024;
/** A batch that is not full leaves once its oldest entry has waited this long. */
export const batchAgeMsMaxDefault = 20;
/** Unacknowledged bytes (as sent, after compression) in flight. */
export const windowBytesMaxDefault = 64 * 1024 * 1024;
/** From HELLO to WELCOME. */
export const helloTimeoutMsMax = 10_000;
/** A link with nothing received for this long is taken as dead (the peer answers pings); the shipper's default (`linkSilenceMs`). */
export const linkSilenceMsMax = 15_000;
export const pingIntervalMs = 2_000;
/** Reconnection backoff: doubles from the minimum up to the maximum, reset by a successful session. */
export const reconnectDelayMsMin = 100;
export const reconnectDelayMsMax = 5_000;

/** What the shipper needs of the stream queue (`queue.ts`). */
export interface ShipperQueueEntry {
  sequence: number;
  kind: 'write' | 'zero' | 'trim' | 'checkpoint';
  volume: number;
  offset: number;
  lengthBytes: number;
  timeMs: number;
  data?: Buffer;
  checkpoint?: { id: string; kind: string; name?: string };
}

export interface ShipperQueue {
  read(fromSequence: number, bytesMax: number): Promise<ShipperQueueEntry[]>;
  acknowledge(sequence: number): void;
  stats(): { sequenceLast: number };
}

export type ShipperState = 'idle' | 'connecting' | 'handshake' | 'streaming' | 'waiting' | 'refused' | 'stopped';

export interface ShipperOptions {
  hello: Omit<Hello, 'protocolVersion'>;
  queue: ShipperQueue;
  connect: LinkConnector;
  scheduler: Scheduler;
  codec: CodecName;
  /** Buckets that must all allow a batch (the appliance's and the group's). */
  rateLimits: TokenBucket[];
  batchBytesMax?: number;
  batchAgeMsMax?: number;
  windowBytesMax?: number;
  /** Nothing heard from the target for this long ends the session (default linkSilenceMsMax; more than pingIntervalMs). */
  linkSilenceMs?: number;
  logger?: Logger;
  /** Called after the queue has dropped everything up to `sequence` (the dirty-region log clears with it). */
  onAcknowledged?(sequence: number, timeMsDurable: number): void;
  /** A session began: the target's WELCOME (after its sequence was checked and acknowledged). */
  onWelcome?(welcome: Welcome): void;
  /**
   * The target's WELCOME holds less than it acknowledged before (journal damage, a restored unit, a
   * replaced datastore). The session ends; the caller heals the stream (a new epoch and a delta
   * sync). Without it the session ends and is retried, as before.
   */
  onTargetLost?(loss: LossReported & { target: string }): void;
}

export interface ShipperStats {
  state: ShipperState;
  /** Why the shipper is not streaming (last error or refusal), if it is not. */
  reason: string | undefined;
  sequenceSent: number;
  sequenceAcknowledged: number;
  /** Source time of the newest entry the target acknowledged as durable. */
  timeMsDurable: number;
  bytesUnacknowledged: number;
  /** Body bytes (before compression) and wire bytes (after) of every batch sent, resends included. */
  rawBytesSent: number;
  wireBytesSent: number;
  batchesSent: number;
  batchesResent: number;
  sessions: number;
  connectFailures: number;
}

interface InFlightBatch {
  sequenceLast: number;
  wireBytes: number;
}

class SessionEnded extends Error {}

export class Shipper {
  private readonly options: ShipperOptions;
  private readonly scheduler: Scheduler;
  private readonly logger: Logger;
  private readonly batchBytesMax: number;
  private readonly batchAgeMsMax: number;
  private readonly windowBytesMax: number;
  private readonly linkSilenceMs: number;
  private stateNow: ShipperState = 'idle';
  private reason: string | undefined;
  private link: FrameLink | undefined;
  /** Checksum requests of the current session waiting for their answer. */
  private readonly sumsPending = new Map<number, { resolve: (sums: Buffer) => void; reject: (error: Error) => void }>();
  private sumsRequestIdLast = 0;
  private stopped = false;
  private running: Promise<void> | undefined;
  private sequenceSent = 0;
  private sequenceAcknowledged = 0;
  /** Highest sequence ever sent (across sessions), to count resends. */
  private sequenceSentMax = 0;
  private timeMsDurable = 0;
  private readonly inFlight: InFlightBatch[] = [];
  private bytesUnacknowledged = 0;
  private pumping = false;
  private pumpAgain = false;
  private pumpTimer: Timer | undefined;
  private readonly counters = { rawBytesSent: 0, wireBytesSent: 0, batchesSent: 0, batchesResent: 0, sessions: 0, connectFailures: 0 };
  private wakeSession: (() => void) | undefined;
  /** Set while a batch that is not full waits for its age limit: its raw bytes so far (see `wake`). */
  private ageWait: { rawBytes: number } | undefined;

  constructor(options: ShipperOptions) {
    this.options = options;
    this.scheduler = options.scheduler;
    this.logger = options.logger ?? silentLogger;
    this.batchBytesMax = options.batchBytesMax ?? batchBytesMaxDefault;
    this.batchAgeMsMax = options.batchAgeMsMax ?? batchAgeMsMaxDefault;
    this.windowBytesMax = options.windowBytesMax ?? windowBytesMaxDefault;
    this.linkSilenceMs = options.linkSilenceMs ?? linkSilenceMsMax;
    if (!(this.linkSilenceMs > pingIntervalMs)) throw new RangeError(`A shipper's silence timeout (${this.linkSilenceMs} ms) must be longer than its ping interval (${pingIntervalMs} ms)`);
    if (!(this.batchBytesMax > 0 && this.windowBytesMax >= this.batchBytesMax)) {
      throw new RangeError(`A shipper's window (${this.windowBytesMax} bytes) must hold at least one batch (${this.batchBytesMax} bytes)`);
    }
  }

  get state(): ShipperState {
    return this.stateNow;
  }

  stats(): ShipperStats {
    return {
      state: this.stateNow,
      reason: this.reason,
      sequenceSent: this.sequenceSent,
      sequenceAcknowledged: this.sequenceAcknowledged,
      timeMsDurable: this.timeMsDurable,
      bytesUnacknowledged: this.bytesUnacknowledged,
      ...this.counters,
    };
  }

  start(): void {
    if (this.running) return;
    this.running = this.run();
  }

  /**
   * Asks the target for the checksums of a range of a volume as it holds it now (delta sync).
   * Rejects when no session is streaming, or when the session ends before the answer.
   */
  requestSums(request: Omit<SumsRequest, 'requestId'>): Promise<Buffer> {
    const link = this.link;
    if (!link || this.stateNow !== 'streaming') return Promise.reject(new Error(`no replication session is streaming (${this.stateNow})`));
    const requestId = (this.sumsRequestIdLast = (this.sumsRequestIdLast + 1) >>> 0);
    return new Promise((resolve, reject) => {
      this.sumsPending.set(requestId, { resolve, reject });
      link.send('sumsRequest', encodeSumsRequest({ ...request, requestId }));
    });
  }

  /**
   * New entries are in the queue: `dataBytes` of data in all, when the caller knows it. While a
   * batch that is not full waits for its age limit, entries that cannot fill it do not make the
   * shipper read the queue again; they go with it when the timer fires.
   */
  wake(dataBytes?: number, entries = 1): void {
    const waiting = this.ageWait;
    if (waiting && this.pumpTimer && dataBytes !== undefined) {
      waiting.rawBytes += dataBytes + entries * entryHeaderBytes;
      if (waiting.rawBytes < this.batchBytesMax) return;
    }
    this.schedulePump(0);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.pumpTimer?.cancel();
    this.link?.close();
    this.wakeSession?.();
    await this.running;
    this.setState('stopped', undefined);
  }

  private setState(state: ShipperState, reason: string | undefined): void {
    this.stateNow = state;
    this.reason = reason;
  }

  private async run(): Promise<void> {
    let delayMs = reconnectDelayMsMin;
    while (!this.stopped) {
      this.setState('connecting', this.reason);
      let link: FrameLink;
      try {
        link = await this.options.connect();
      } catch (error) {
        this.counters.connectFailures++;
        this.setState('waiting', `cannot connect to the target: ${describe(error)}`);
        this.logger.warn('shipper cannot connect', { group: this.options.hello.group, error: describe(error), retryMs: delayMs });
        await sleep(this.scheduler, delayMs);
        delayMs = Math.min(reconnectDelayMsMax, delayMs * 2);
        continue;
      }
      if (this.stopped) {
        link.close();
        break;
      }
      const outcome = await this.session(link);
      if (outcome.streamed) delayMs = reconnectDelayMsMin;
      if (this.stopped) break;
      if (outcome.refused) {
        this.setState('refused', `the target refused the stream (${outcome.refused.code}): ${outcome.refused.message}`);
        this.logger.error('target refused the stream', { group: this.options.hello.group, code: outcome.refused.code, message: outcome.refused.message });
        // A refusal may clear (the target's operator adds the group); ask again slowly.
        await sleep(this.scheduler, reconnectDelayMsMax);
        continue;
      }
      this.setState('waiting', outcome.reason);
      this.logger.warn('replication link lost', { group: this.options.hello.group, reason: outcome.reason, retryMs: delayMs });
      await sleep(this.scheduler, delayMs);
      delayMs = Math.min(reconnectDelayMsMax, delayMs * 2);
    }
  }

  /** One connection, from HELLO until the link breaks. */
  private session(link: FrameLink): Promise<{ streamed: boolean; refused?: Refuse; reason: string }> {
    return new Promise((resolve) => {
      this.link = link;
      this.setState('handshake', undefined);
      let streamed = false;
      let lastHeardMs = this.scheduler.nowMs();
      let finished = false;
      let pingTimer: Timer | undefined;
      const finish = (outcome: { refused?: Refuse; reason: string }): void => {
        if (finished) return;
        finished = true;
        pingTimer?.cancel();
        helloTimer.cancel();
        this.link = undefined;
        this.wakeSession = undefined;
        this.inFlight.length = 0;
        this.bytesUnacknowledged = 0;
        for (const pending of this.sumsPending.values()) pending.reject(new Error(`the replication session ended (${outcome.reason})`));
        this.sumsPending.clear();
        link.close();
        resolve({ streamed, ...outcome });
      };
      this.wakeSession = () => finish({ reason: 'stopped' });
      const helloTimer = this.scheduler.setTimer(helloTimeoutMsMax, () => finish({ reason: `no answer to HELLO within ${helloTimeoutMsMax} ms` }));
      const ping = (): void => {
        if (finished) return;
        if (this.scheduler.nowMs() - lastHeardMs > this.linkSilenceMs) {
          finish({ reason: `nothing heard from the target for ${this.linkSilenceMs} ms` });
          link.close(new Error('link silent'));
          return;
        }
        link.send('ping', encodePing(this.scheduler.nowMs()));
        pingTimer = this.scheduler.setTimer(pingIntervalMs, ping);
      };
      link.start({
        frame: (frame: Frame) => {
          lastHeardMs = this.scheduler.nowMs();
          try {
            if (frame.type === 'welcome' && !streamed) {
              helloTimer.cancel();
              this.onWelcome(frame);
              streamed = true;
              this.counters.sessions++;
              this.setState('streaming', undefined);
              pingTimer = this.scheduler.setTimer(pingIntervalMs, ping);
              this.schedulePump(0);
            } else if (frame.type === 'refuse') {
              finish({ refused: decodeRefuse(frame), reason: 'refused' });
            } else if (frame.type === 'ack' && streamed) {
              this.onAck(frame);
            } else if (frame.type === 'sums' && streamed) {
              const reply = decodeSums(frame);
              const pending = this.sumsPending.get(reply.requestId);
              if (!pending) throw new SessionEnded(`an answer to checksum request ${reply.requestId}, which this session did not send`);
              this.sumsPending.delete(reply.requestId);
              if ('error' in reply) pending.reject(new Error(`the target has no checksums: ${reply.error}`));
              else pending.resolve(Buffer.from(reply.sums));
            } else if (frame.type === 'pong' || frame.type === 'ping') {
              if (frame.type === 'ping') link.send('pong', frame.payload);
            } else {
              throw new SessionEnded(`unexpected ${frame.type} frame from the target`);
            }
          } catch (error) {
            this.logger.error('replication protocol error', { group: this.options.hello.group, error: describe(error) });
            finish({ reason: `protocol error: ${describe(error)}` });
          }
        },
        closed: (error) => finish({ reason: error ? `link closed: ${describe(error)}` : 'link closed by the target' }),
      });
      link.send('hello', encodeJson({ protocolVersion, ...this.options.hello }));
    });
  }

  private onWelcome(frame: Frame): void {
    const welcome = decodeWelcome(frame);
    if (welcome.epoch !== this.options.hello.epoch) throw new SessionEnded(`the target welcomed epoch ${welcome.epoch}, not ${this.options.hello.epoch}`);
    const sequenceLast = this.options.queue.stats().sequenceLast;
    if (welcome.sequenceDurable > sequenceLast) {
      // The target holds entries this source never produced in this epoch: two histories.
      throw new SessionEnded(`the target holds sequence ${welcome.sequenceDurable} of epoch ${welcome.epoch} but this source has only produced ${sequenceLast}`);
    }
    if (welcome.sequenceDurable < this.sequenceAcknowledged) {
      // The target acknowledged more before: it lost durable entries. The queue has dropped them, so this
      // epoch cannot go on; the owner heals the stream in a new one.
      this.options.onTargetLost?.({ epoch: welcome.epoch, sequenceDurable: welcome.sequenceDurable, sequenceAcknowledged: this.sequenceAcknowledged, target: welcome.appliance });
      throw new SessionEnded(`the target now holds sequence ${welcome.sequenceDurable} but acknowledged ${this.sequenceAcknowledged} before`);
    }
    this.acknowledge(welcome.sequenceDurable, this.timeMsDurable);
    this.sequenceSent = welcome.sequenceDurable;
    this.logger.info('replication session started', { group: this.options.hello.group, epoch: welcome.epoch, target: welcome.appliance, resumeFrom: welcome.sequenceDurable + 1 });
    this.options.onWelcome?.(welcome);
  }

  private onAck(frame: Frame): void {
    const ack = decodeAck(frame);
    if (ack.sequenceDurable > this.sequenceSent) throw new SessionEnded(`the target acknowledged sequence ${ack.sequenceDurable}, beyond ${this.sequenceSent} sent`);
    if (ack.sequenceDurable < this.sequenceAcknowledged) throw new SessionEnded(`the target acknowledged sequence ${ack.sequenceDurable} after ${this.sequenceAcknowledged}`);
    while (this.inFlight.length > 0 && this.inFlight[0]!.sequenceLast <= ack.sequenceDurable) {
      this.bytesUnacknowledged -= this.inFlight.shift()!.wireBytes;
    }
    this.acknowledge(ack.sequenceDurable, ack.timeMsDurable);
    this.schedulePump(0);
  }

  private acknowledge(sequence: number, timeMsDurable: number): void {
    if (sequence > this.sequenceAcknowledged) {
      this.sequenceAcknowledged = sequence;
      this.timeMsDurable = Math.max(this.timeMsDurable, timeMsDurable);
      this.options.queue.acknowledge(sequence);
      this.options.onAcknowledged?.(sequence, timeMsDurable);
    }
  }

  private schedulePump(delayMs: number): void {
    if (this.stopped) return;
    if (delayMs > 0) {
      if (this.pumpTimer) return;
      this.pumpTimer = this.scheduler.setTimer(delayMs, () => {
        this.pumpTimer = undefined;
        void this.pump();
      });
      return;
    }
    void this.pump();
  }

  private async pump(): Promise<void> {
    if (this.pumping) {
      this.pumpAgain = true;
      return;
    }
    this.pumping = true;
    try {
      do {
        this.pumpAgain = false;
        await this.pumpOnce();
      } while (this.pumpAgain && !this.stopped);
    } catch (error) {
      if ((error as { code?: string }).code === 'ENODATA') {
        // The queue discarded entries (bitmap mode): this epoch cannot go on; the group starts a new session with a resync.
        this.logger.warn('shipper stopped: the queue discarded entries of this session', { group: this.options.hello.group, error: describe(error) });
        return;
      }
      this.logger.error('shipper failed to read its queue', { group: this.options.hello.group, error: describe(error) });
      this.link?.close(error instanceof Error ? error : new Error(String(error)));
    } finally {
      this.pumping = false;
    }
  }

  private async pumpOnce(): Promise<void> {
    for (;;) {
      const link = this.link;
      if (!link || this.stateNow !== 'streaming' || this.stopped) return;
      if (this.bytesUnacknowledged + this.batchBytesMax > this.windowBytesMax && this.inFlight.length > 0) return;
      this.ageWait = undefined;
      const sequenceLast = this.options.queue.stats().sequenceLast;
      if (sequenceLast <= this.sequenceSent) return;
      const delayMs = Math.max(0, ...this.options.rateLimits.map((bucket) => bucket.delayMs()));
      if (delayMs > 0) {
        this.schedulePump(delayMs);
        return;
      }
      const entries = await this.options.queue.read(this.sequenceSent + 1, this.batchBytesMax);
      if (this.link !== link || entries.length === 0) return;
      if (entries[0]!.sequence !== this.sequenceSent + 1) throw new Error(`the queue returned sequence ${entries[0]!.sequence} for ${this.sequenceSent + 1}`);
      const wire = entries.map(toWireEntry);
      let rawBytes = 0;
      for (const entry of wire) rawBytes += entryEncodedBytes(entry);
      // A batch that is not full (the queue had nothing more to give) waits for more entries
      // until its oldest is batchAgeMsMax old; a resend after a reconnect goes at once.
      const last = entries[entries.length - 1]!.sequence;
      const resend = last <= this.sequenceSentMax;
      const full = last < sequenceLast || rawBytes >= this.batchBytesMax;
      const ageMs = this.scheduler.nowMs() - entries[0]!.timeMs;
      if (!resend && !full && ageMs < this.batchAgeMsMax) {
        this.ageWait = { rawBytes };
        this.schedulePump(this.batchAgeMsMax - ageMs);
        return;
      }
      const body = encodeBatchBody(wire);
      const compressed = compressBatch(this.options.codec, body);
      const header = encodeBatchHeader({ sequenceFirst: entries[0]!.sequence, count: entries.length, codec: compressed.codec as WireCodecName, rawBytes: compressed.rawBytes });
      const payload = Buffer.isBuffer(compressed.payload) ? [header, compressed.payload] : [header, ...compressed.payload];
      let wireBytes = 0;
      for (const chunk of payload) wireBytes += chunk.length;
      link.send('batch', payload);
      for (const bucket of this.options.rateLimits) bucket.take(wireBytes);
      this.sequenceSent = last;
      if (resend) this.counters.batchesResent++;
      this.sequenceSentMax = Math.max(this.sequenceSentMax, last);
      this.inFlight.push({ sequenceLast: last, wireBytes });
      this.bytesUnacknowledged += wireBytes;
      this.counters.rawBytesSent += compressed.rawBytes;
      this.counters.wireBytesSent += wireBytes;
      this.counters.batchesSent++;
    }
  }
}

export function toWireEntry(entry: ShipperQueueEntry): StreamEntry {
  const wire: StreamEntry = { sequence: entry.sequence, kind: entry.kind, volume: entry.volume, offset: entry.offset, lengthBytes: entry.lengthBytes, timeMs: entry.timeMs };
  if (entry.kind === 'write' && entry.data) wire.data = entry.data;
  if (entry.kind === 'checkpoint') {
    const marker = Buffer.from(JSON.stringify(entry.checkpoint ?? {}), 'utf8');
    wire.data = marker;
    wire.lengthBytes = marker.length;
  }
  return wire;
}

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
