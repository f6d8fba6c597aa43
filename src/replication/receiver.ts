/**
 * The receiver: the target side of every stream that reaches this appliance.
 * For each link it reads HELLO, asks the target (the appliance's protection
 * groups) to open the stream of that epoch, answers WELCOME with the highest
 * sequence durable in the journal, then appends each batch to the journal in
 * order and answers ACK once the journal has made it durable.
 *
 * One session per stream at a time: a new HELLO for a stream that already has
 * a session closes the old link and waits until every append the old session
 * started has settled, so that the sequence the new session is told is exact
 * and two sessions never append the same entries.
 */
import type { Logger } from '../util/logger.js';
import { silentLogger } from '../util/logger.js';
import { decompressBatch } from './codec.js';
import type { FrameLink } from './link.js';
import type { Scheduler, Timer } from './scheduler.js';
import { helloTimeoutMsMax, linkSilenceMsMax } from './shipper.js';
import {
  decodeBatchBody,
  decodeBatchHeader,
  decodeHello,
  decodeSumsRequest,
  encodeSums,
  encodeAck,
  encodeJson,
  protocolVersion,
  WireProtocolError,
  type Frame,
  type Hello,
  type Refuse,
  type StreamEntry,
  type SyncWindowOpen,
  type Welcome,
} from './wire.js';

/** Bytes of batches received and not yet durable, per link; the shipper's window keeps below it. */
export const receiveBytesPendingMax = 256 * 1024 * 1024;

export interface ReceiverStream {
  /** Highest sequence of this stream and epoch durable in the journal (0: none). */
  readonly sequenceDurable: number;
  /** The source appliance's sync window open at the target when the stream opened (told in the WELCOME). */
  readonly syncWindowOpen?: SyncWindowOpen;
  /**
   * Appends entries (consecutive, starting at sequenceDurable + 1); resolves once they are durable.
   * The receiver calls it again before an earlier call has resolved (pipelining, so that the
   * journal commits several batches per sync): an implementation takes the entries in call order
   * before it returns, resolves calls in that order, and rejects every later call once one failed.
   */
  append(entries: StreamEntry[]): Promise<void>;
  /**
   * The checksums (`blockSums`) of a range of a volume (its id in the HELLO) as the target holds it
   * at some durable point of this stream: every entry of the stream after that point is still to be
   * applied. Used by delta sync.
   */
  sums(volume: number, offset: number, lengthBytes: number, blockBytes: number): Promise<Buffer>;
  /** The session using the stream is over. */
  release(): void;
}

export interface ReceiverTarget {
  /** Checks a HELLO (group, peer, volumes, epoch) and opens its stream, or says why not. */
  openStream(hello: Hello, peerName: string | undefined): Promise<{ stream: ReceiverStream } | { refuse: Refuse }>;
}

export interface ReceiverOptions {
  target: ReceiverTarget;
  scheduler: Scheduler;
  /** This appliance's name (told to the source in WELCOME). */
  appliance: string;
  logger?: Logger;
}

interface Session {
  link: FrameLink;
  /** Settles when every append the session started has settled (never rejects). */
  idle(): Promise<void>;
}

export class Receiver {
  private readonly sessions = new Map<string, Session>();
  private readonly links = new Set<FrameLink>();
  private readonly logger: Logger;
  private closed = false;
  readonly counters = { links: 0, batches: 0, entries: 0, duplicatesSkipped: 0, rawBytes: 0, wireBytes: 0, protocolErrors: 0, sumsRequests: 0, sumsRequestsInFlightMax: 0, storeFailures: 0 };

  constructor(private readonly options: ReceiverOptions) {
    this.logger = options.logger ?? silentLogger;
  }

  /** Serves one new link until it closes. */
  accept(link: FrameLink): void {
    if (this.closed) {
      link.close();
      return;
    }
    this.counters.links++;
    this.links.add(link);
    new ReceiverSession(this, link).start();
  }

  /** @internal */
  async claim(key: string, link: FrameLink, idle: () => Promise<void>): Promise<void> {
    const previous = this.sessions.get(key);
    this.sessions.set(key, { link, idle });
    if (previous) {
      previous.link.close(new Error('superseded by a new session of the same stream'));
      await previous.idle();
    }
  }

  /** @internal */
  unclaim(key: string, link: FrameLink): void {
    if (this.sessions.get(key)?.link === link) this.sessions.delete(key);
  }

  /** @internal */
  forget(link: FrameLink): void {
    this.links.delete(link);
  }

  /** @internal */
  get settings(): ReceiverOptions {
    return this.options;
  }

  get log(): Logger {
    return this.logger;
  }

  /** Closes every link and waits for the appends in flight. */
  async close(): Promise<void> {
    this.closed = true;
    const idle = [...this.sessions.values()].map((session) => session.idle());
    for (const link of this.links) link.close();
    await Promise.allSettled(idle);
  }
}

class ReceiverSession {
  private stream: ReceiverStream | undefined;
  private key: string | undefined;
  private helloSeen = false;
  private ended = false;
  /** Next sequence this session will append. */
  private sequenceNext = 0;
  /** Checksum requests of this session being answered. */
  private sumsInFlight = 0;
  /** Batches in arrival order: each is checked and handed to the journal after the one before. */
  private chain: Promise<void> = Promise.resolve();
  /** Acknowledgements in order: each waits for its batch to be durable and for the one before. */
  private acks: Promise<void> = Promise.resolve();
  private bytesPending = 0;
  private lastHeardMs: number;
  private silenceTimer: Timer | undefined;
  private readonly scheduler: Scheduler;

  constructor(private readonly receiver: Receiver, private readonly link: FrameLink) {
    this.scheduler = receiver.settings.scheduler;
    this.lastHeardMs = this.scheduler.nowMs();
  }

  start(): void {
    const helloTimer = this.scheduler.setTimer(helloTimeoutMsMax, () => {
      if (!this.helloSeen) this.fail(new WireProtocolError(`no HELLO within ${helloTimeoutMsMax} ms`));
    });
    this.watchSilence();
    this.link.start({
      frame: (frame) => {
        this.lastHeardMs = this.scheduler.nowMs();
        try {
          this.onFrame(frame, helloTimer);
        } catch (error) {
          this.fail(error);
        }
      },
      closed: (error) => {
        helloTimer.cancel();
        this.end(error);
      },
    });
  }

  private watchSilence(): void {
    this.silenceTimer = this.scheduler.setTimer(linkSilenceMsMax / 2, () => {
      if (this.ended) return;
      if (this.scheduler.nowMs() - this.lastHeardMs > linkSilenceMsMax) {
        this.fail(new Error(`nothing heard from the source for ${linkSilenceMsMax} ms`));
        return;
      }
      this.watchSilence();
    });
  }

  private onFrame(frame: Frame, helloTimer: Timer): void {
    if (this.ended) return;
    switch (frame.type) {
      case 'hello': {
        if (this.helloSeen) throw new WireProtocolError('a second HELLO on one link');
        this.helloSeen = true;
        helloTimer.cancel();
        const hello = decodeHello(frame);
        void this.open(hello);
        return;
      }
      case 'batch':
        this.onBatch(frame);
        return;
      case 'ping':
        this.link.send('pong', frame.payload);
        return;
      case 'sumsRequest':
        this.onSumsRequest(frame);
        return;
      case 'pong':
        return;
      default:
        throw new WireProtocolError(`unexpected ${frame.type} frame from a source`);
    }
  }

  private async open(hello: Hello): Promise<void> {
    const receiver = this.receiver;
    if (hello.protocolVersion !== protocolVersion) {
      this.refuse({ code: 'version', message: `this appliance speaks replication protocol ${protocolVersion}, the source ${hello.protocolVersion}` });
      return;
    }
    this.key = `${hello.group}\u0000${hello.appliance}`;
    let releaseIdle!: () => void;
    const idle = new Promise<void>((resolve) => (releaseIdle = resolve));
    this.chain = idle;
    await receiver.claim(this.key, this.link, () => this.appendsSettled());
    let opened: Awaited<ReturnType<ReceiverTarget['openStream']>>;
    try {
      opened = await receiver.settings.target.openStream(hello, this.link.peerName);
    } catch (error) {
      releaseIdle();
      this.refuse({ code: 'journal-failed', message: error instanceof Error ? error.message : String(error) });
      return;
    }
    if ('refuse' in opened) {
      releaseIdle();
      this.refuse(opened.refuse);
      return;
    }
    this.stream = opened.stream;
    if (this.ended) {
      this.stream.release();
      releaseIdle();
      return;
    }
    this.sequenceNext = this.stream.sequenceDurable + 1;
    const welcome: Welcome = { protocolVersion, epoch: hello.epoch, sequenceDurable: this.stream.sequenceDurable, appliance: receiver.settings.appliance };
    if (this.stream.syncWindowOpen) welcome.syncWindowOpen = this.stream.syncWindowOpen;
    this.link.send('welcome', encodeJson(welcome));
    receiver.log.info('replication session accepted', { group: hello.group, source: hello.appliance, epoch: hello.epoch, sequenceDurable: welcome.sequenceDurable });
    releaseIdle();
  }

  /** Settles when every append queued so far has settled. */
  private appendsSettled(): Promise<void> {
    const settled = (): undefined => undefined;
    // A batch joins the acknowledgement chain only once the hand-over chain has reached it.
    return this.chain.then(settled, settled).then(() => this.acks.then(settled, settled));
  }

  private onBatch(frame: Frame): void {
    if (!this.helloSeen) throw new WireProtocolError('a batch before HELLO');
    const { header, body } = decodeBatchHeader(frame);
    const counters = this.receiver.counters;
    counters.batches++;
    counters.wireBytes += frame.payload.length;
    this.bytesPending += frame.payload.length;
    if (this.bytesPending > receiveBytesPendingMax) throw new WireProtocolError(`the source has ${this.bytesPending} bytes waiting for the journal, over ${receiveBytesPendingMax}`);
    const payloadBytes = frame.payload.length;
    this.chain = this.chain.then(() => {
      if (this.ended) return;
      const stream = this.stream;
      if (!stream) throw new WireProtocolError('a batch on a stream that was not opened');
      const raw = decompressBatch(header.codec, body, header.rawBytes);
      let entries = decodeBatchBody(header, raw);
      counters.rawBytes += header.rawBytes;
      const last = entries[entries.length - 1]!.sequence;
      if (header.sequenceFirst > this.sequenceNext) throw new WireProtocolError(`a batch starts at sequence ${header.sequenceFirst}; ${this.sequenceNext} was expected`);
      let durable: Promise<void> = Promise.resolve();
      if (last < this.sequenceNext) {
        // Everything in it is already durable or on its way (a resend after a reconnect): acknowledge again.
        counters.duplicatesSkipped += entries.length;
      } else {
        const skip = this.sequenceNext - header.sequenceFirst;
        counters.duplicatesSkipped += skip;
        entries = skip > 0 ? entries.slice(skip) : entries;
        // The data are views into the decompressed body, which nothing else holds: the journal may
        // keep them. The next batch is handed over without waiting for this one's sync.
        const sequenceFirst = entries[0]!.sequence;
        durable = stream.append(entries).catch((error: unknown) => {
          throw new StoreFailedError(sequenceFirst, last, error);
        });
        const count = entries.length;
        durable.then(() => (counters.entries += count), () => undefined);
        this.sequenceNext = last + 1;
      }
      const sequenceDurable = this.sequenceNext - 1;
      const timeMsDurable = entries[entries.length - 1]!.timeMs;
      this.acks = Promise.all([this.acks, durable]).then(() => {
        this.bytesPending -= payloadBytes;
        if (!this.ended) this.link.send('ack', encodeAck({ sequenceDurable, timeMsDurable }));
      });
      this.acks.catch((error: unknown) => this.fail(error));
    });
    this.chain.catch((error: unknown) => this.fail(error));
  }

  private onSumsRequest(frame: Frame): void {
    const request = decodeSumsRequest(frame);
    const stream = this.stream;
    if (!stream) throw new WireProtocolError('a checksum request on a stream that was not opened');
    const counters = this.receiver.counters;
    counters.sumsRequests++;
    this.sumsInFlight++;
    counters.sumsRequestsInFlightMax = Math.max(counters.sumsRequestsInFlightMax, this.sumsInFlight);
    stream
      .sums(request.volume, request.offset, request.lengthBytes, request.blockBytes)
      .then(
        (sums) => {
          if (!this.ended) this.link.send('sums', encodeSums({ requestId: request.requestId, sums }));
        },
        (error: unknown) => {
          if (!this.ended) this.link.send('sums', encodeSums({ requestId: request.requestId, error: error instanceof Error ? error.message : String(error) }));
        },
      )
      .finally(() => this.sumsInFlight--);
  }

  private refuse(refuse: Refuse): void {
    this.receiver.log.warn('replication session refused', { code: refuse.code, message: refuse.message });
    this.link.send('refuse', encodeJson(refuse));
    this.link.close();
  }

  private fail(error: unknown): void {
    if (this.ended) return;
    const cause = error instanceof Error ? error : new Error(String(error));
    if (error instanceof WireProtocolError) this.receiver.counters.protocolErrors++;
    if (error instanceof StoreFailedError) {
      // The source resends the batch after it reconnects; tell it why this one was not stored, so that
      // its status says so rather than a closed link.
      this.receiver.counters.storeFailures++;
      this.receiver.log.error('replication batch not stored', { error: cause.message });
      this.link.send('refuse', encodeJson({ code: 'cannot-store', message: cause.message } satisfies Refuse));
      this.link.close(); // an orderly close, so that the refusal reaches the source
      this.end(cause);
      return;
    }
    this.receiver.log.warn('replication session failed', { error: cause.message });
    this.link.close(cause);
    this.end(cause);
  }

  private end(_error: Error | undefined): void {
    if (this.ended) return;
    this.ended = true;
    this.silenceTimer?.cancel();
    this.receiver.forget(this.link);
    const key = this.key;
    const stream = this.stream;
    void this.appendsSettled().then(() => {
      stream?.release();
      if (key) this.receiver.unclaim(key, this.link);
    });
  }
}

/** The target's store (journal) refused or failed a batch. */
class StoreFailedError extends Error {
  constructor(sequenceFirst: number, sequenceLast: number, cause: unknown) {
    super(`entries ${sequenceFirst} to ${sequenceLast} could not be stored: ${cause instanceof Error ? cause.message : String(cause)}`, { cause });
    this.name = 'StoreFailedError';
  }
}
