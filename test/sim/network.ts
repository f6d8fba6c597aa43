/**
 * The simulated network between source appliances and the target appliance:
 * connections that carry whole frames (`FrameLink`s, the only transport the
 * shipper and the receiver see), encoded and decoded by the real wire code.
 *
 * What a connection can do is what TCP can do. Within one connection, bytes
 * arrive in order, once, or not at all after a break; they are never lost
 * silently, duplicated or reordered. Each direction has a latency with jitter
 * and a bandwidth (frames leave one after another). Faults:
 * - break: the connection is reset (a middlebox, a NIC reset): frames in flight
 *   are lost and each end hears ECONNRESET after a short while.
 * - partition: connection attempts fail at once or hang until the connector's
 *   timeout; open connections go silent. At the heal, what a live sender still
 *   retransmits arrives; what a sender that gave up (destroyed) had in flight is lost.
 * - stall: a delay spike on one connection (frames queued in the network). At
 *   its end everything held arrives, even if the sender gave up meanwhile: this
 *   is how an old connection delivers after a new one superseded it, the only
 *   reordering across connections that TCP allows.
 * - slow link: latency and bandwidth get worse for a while.
 * A frame that reaches a destroyed end is answered by a reset (as a kernel
 * does), except at a host that is down: a crashed host answers nothing until it
 * is back, and then resets the connections it no longer knows.
 */
import type { FrameLink, FrameLinkHandlers, LinkConnector } from '../../src/replication/link.js';
import { closeLingerMsMax } from '../../src/replication/link.js';
import type { Timer } from '../../src/replication/scheduler.js';
import { encodeFrame, FrameReader, WireProtocolError, type Frame, type FrameTypeName } from '../../src/replication/wire.js';
import type { SimRandom } from './random.js';
import type { SimScheduler, SimScope } from './scheduler.js';

/** As the appliance's connector (`connectMsMax` in src/appliance/appliance.ts): a connection attempt that hangs fails after this. */
export const connectTimeoutMs = 10_000;

export interface LinkQuality {
  latencyMs: number;
  jitterMs: number;
  bytesPerMs: number;
}

/** A host as the network sees it: up (listening or not) or down (crashed), and which incarnation runs. */
export interface SimHost {
  readonly name: string;
  readonly up: boolean;
  readonly incarnation: number;
  /** The scope of the running incarnation (its endpoints' timers die with it). */
  readonly scope: SimScope;
}

export interface SimListener extends SimHost {
  /** Accepts a connection, or undefined when nothing listens (ECONNREFUSED). */
  readonly accept: ((link: FrameLink) => void) | undefined;
}

export type EventSink = (kind: string, detail: string) => void;

interface Item {
  kind: 'data' | 'fin' | 'rst';
  bytes: Buffer | undefined;
  type: FrameTypeName | undefined;
  departMs: number;
  arriveMs: number;
}

export interface NetworkCounters {
  connections: number;
  connectFailures: number;
  frames: number;
  bytes: number;
  framesLost: number;
  framesStale: number;
  /** Frames delivered after their sender had been destroyed or closed (an old connection delivering late). */
  framesFromGoneSenders: number;
  resets: number;
}

export class SimNetwork {
  private readonly connections = new Set<SimConnection>();
  private connectionNext = 1;
  partitionedUntilMs = -Infinity;
  private partitionActive = false;
  quality: LinkQuality;
  readonly baseQuality: LinkQuality;
  readonly counters: NetworkCounters = { connections: 0, connectFailures: 0, frames: 0, bytes: 0, framesLost: 0, framesStale: 0, framesFromGoneSenders: 0, resets: 0 };

  constructor(
    readonly scheduler: SimScheduler,
    readonly random: SimRandom,
    quality: LinkQuality,
    readonly log: EventSink,
  ) {
    this.baseQuality = { ...quality };
    this.quality = { ...quality };
  }

  get partitioned(): boolean {
    return this.partitionActive;
  }

  /** The shipper's connector from `source` to `target`. */
  connector(source: SimHost, target: SimListener): LinkConnector {
    return () =>
      new Promise<FrameLink>((resolve, reject) => {
        const fail = (delayMs: number, reason: string): void => {
          this.counters.connectFailures++;
          source.scope.setTimer(delayMs, () => {
            this.log('connect-failed', `${source.name}->${target.name}: ${reason}`);
            reject(Object.assign(new Error(`connect to ${target.name}: ${reason}`), { code: reason.split(' ')[0] }));
          });
        };
        const blocked = (): boolean => {
          if (!this.partitionActive) return false;
          if (this.random.chance(0.5)) fail(this.random.real(1, 200), 'EHOSTUNREACH no route to host');
          else fail(connectTimeoutMs, `ETIMEDOUT no TLS session within ${connectTimeoutMs} ms`);
          return true;
        };
        if (blocked()) return;
        const roundTripMs = 2 * this.quality.latencyMs + this.random.real(0, this.quality.jitterMs);
        if (!target.up) {
          // A host that is down answers nothing: the neighbour lookup fails after a while, or the attempt hangs.
          if (this.random.chance(0.5)) fail(3000, 'EHOSTUNREACH no route to host');
          else fail(connectTimeoutMs, `ETIMEDOUT no TLS session within ${connectTimeoutMs} ms`);
          return;
        }
        if (!target.accept) {
          fail(roundTripMs, 'ECONNREFUSED connection refused');
          return;
        }
        // TCP and TLS handshakes: about three round trips.
        source.scope.setTimer(3 * roundTripMs, () => {
          if (blocked()) return;
          const accept = target.up ? target.accept : undefined;
          if (!accept) {
            // The host went down or stopped listening during the handshake: the peer's kernel resets it, or nothing answers.
            if (target.up) fail(0, 'ECONNREFUSED connection refused');
            else fail(connectTimeoutMs - 3 * roundTripMs, `ETIMEDOUT no TLS session within ${connectTimeoutMs} ms`);
            return;
          }
          const connection = new SimConnection(this, this.connectionNext++, source, target);
          this.connections.add(connection);
          this.counters.connections++;
          this.log('connected', `c${connection.id} ${source.name}->${target.name}`);
          accept(connection.targetEnd);
          resolve(connection.sourceEnd);
        });
      });
  }

  /** Connections that may still carry something. */
  get open(): SimConnection[] {
    return [...this.connections].filter((connection) => !connection.finished);
  }

  forget(connection: SimConnection): void {
    this.connections.delete(connection);
  }

  startPartition(durationMs: number): void {
    this.partitionActive = true;
    this.partitionedUntilMs = Math.max(this.partitionedUntilMs, this.scheduler.nowMs() + durationMs);
    for (const connection of this.open) connection.block('partition');
  }

  healPartition(): void {
    if (!this.partitionActive) return;
    this.partitionActive = false;
    this.partitionedUntilMs = -Infinity;
    for (const connection of this.open) connection.unblock('partition');
  }

  /** Every connection: stalls end, quality returns to normal, the partition heals. */
  healAll(): void {
    this.healPartition();
    this.quality = { ...this.baseQuality };
    for (const connection of this.open) connection.unblock('stall');
  }

  /** A host crashed: what its endpoints had not sent yet is gone, and they never act again. */
  hostCrashed(host: SimHost, incarnation: number): void {
    for (const connection of this.open) connection.hostCrashed(host, incarnation);
  }
}

type BlockReason = 'partition' | 'stall';

/** One direction of a connection. */
class Pipe {
  readonly items: Item[] = [];
  busyUntilMs = 0;
  lastArriveMs = 0;
  timer: Timer | undefined;
  readonly blocked = new Set<BlockReason>();

  constructor(
    readonly connection: SimConnection,
    readonly from: SimEndpoint,
    readonly to: SimEndpoint,
  ) {}
}

export class SimConnection {
  readonly sourceEnd: SimEndpoint;
  readonly targetEnd: SimEndpoint;
  private readonly pipes: Pipe[];

  constructor(
    readonly network: SimNetwork,
    readonly id: number,
    source: SimHost,
    target: SimHost,
  ) {
    this.sourceEnd = new SimEndpoint(this, source, `c${id}:${source.name}`, target.name);
    this.targetEnd = new SimEndpoint(this, target, `c${id}:${target.name}`, source.name);
    const forward = new Pipe(this, this.sourceEnd, this.targetEnd);
    const backward = new Pipe(this, this.targetEnd, this.sourceEnd);
    this.sourceEnd.outgoing = forward;
    this.targetEnd.outgoing = backward;
    this.pipes = [forward, backward];
    if (network.partitioned) for (const pipe of this.pipes) pipe.blocked.add('partition');
  }

  get finished(): boolean {
    return this.sourceEnd.state === 'ended' && this.targetEnd.state === 'ended' && this.pipes.every((pipe) => pipe.items.length === 0);
  }

  private log(kind: string, detail: string): void {
    this.network.log(kind, `c${this.id} ${detail}`);
  }

  /** Reset by the network: nothing more travels on it (its ends hear of it a little later). */
  broken = false;

  /** Queues an item on the endpoint's outgoing pipe. */
  enqueue(pipe: Pipe, kind: Item['kind'], bytes: Buffer | undefined, type: FrameTypeName | undefined): void {
    if (this.broken) {
      this.network.counters.framesLost++;
      return;
    }
    const now = this.network.scheduler.nowMs();
    const quality = this.network.quality;
    const departMs = Math.max(now, pipe.busyUntilMs) + (bytes ? bytes.length / quality.bytesPerMs : 0);
    pipe.busyUntilMs = departMs;
    const arriveMs = Math.max(pipe.lastArriveMs, Math.ceil(departMs + quality.latencyMs + this.network.random.real(0, quality.jitterMs)));
    pipe.lastArriveMs = arriveMs;
    pipe.items.push({ kind, bytes, type, departMs, arriveMs });
    this.schedule(pipe);
  }

  private schedule(pipe: Pipe): void {
    if (pipe.timer || pipe.blocked.size > 0 || pipe.items.length === 0) return;
    const now = this.network.scheduler.nowMs();
    pipe.timer = this.network.scheduler.setTimer(Math.max(0, pipe.items[0]!.arriveMs - now), () => {
      pipe.timer = undefined;
      this.deliverDue(pipe);
    });
  }

  private deliverDue(pipe: Pipe): void {
    const now = this.network.scheduler.nowMs();
    while (pipe.blocked.size === 0 && pipe.items.length > 0 && pipe.items[0]!.arriveMs <= now) {
      const item = pipe.items.shift()!;
      pipe.to.arrive(item);
    }
    this.schedule(pipe);
    if (this.finished) this.network.forget(this);
  }

  /** Bytes the endpoint's transport has not sent yet. */
  unsentBytes(pipe: Pipe): number {
    const now = this.network.scheduler.nowMs();
    let total = 0;
    for (const item of pipe.items) if (item.departMs > now && item.bytes) total += item.bytes.length;
    return total;
  }

  /** Drops what the endpoint had not sent yet (it was destroyed or its host died). */
  dropUnsent(pipe: Pipe): void {
    const now = this.network.scheduler.nowMs();
    const kept = pipe.items.filter((item) => item.departMs <= now);
    this.network.counters.framesLost += pipe.items.length - kept.length;
    pipe.items.length = 0;
    pipe.items.push(...kept);
    pipe.busyUntilMs = Math.min(pipe.busyUntilMs, now);
  }

  block(reason: BlockReason): void {
    for (const pipe of this.pipes) {
      pipe.blocked.add(reason);
      pipe.timer?.cancel();
      pipe.timer = undefined;
    }
  }

  /** Blocks one direction or both for a while (a delay spike). */
  stall(durationMs: number, directions: 'forward' | 'backward' | 'both'): void {
    const pipes = directions === 'both' ? this.pipes : directions === 'forward' ? [this.pipes[0]!] : [this.pipes[1]!];
    for (const pipe of pipes) {
      pipe.blocked.add('stall');
      pipe.timer?.cancel();
      pipe.timer = undefined;
    }
    this.log('stall', `${directions} for ${Math.round(durationMs)} ms`);
    this.network.scheduler.setTimer(durationMs, () => {
      for (const pipe of pipes) this.unblockPipe(pipe, 'stall');
    });
  }

  unblock(reason: BlockReason): void {
    for (const pipe of this.pipes) this.unblockPipe(pipe, reason);
  }

  private unblockPipe(pipe: Pipe, reason: BlockReason): void {
    if (!pipe.blocked.delete(reason)) return;
    const now = this.network.scheduler.nowMs();
    if (reason === 'partition' && pipe.from.state === 'ended') {
      // A sender that gave up during the partition no longer retransmits: what it had in flight is lost.
      this.network.counters.framesLost += pipe.items.length;
      pipe.items.length = 0;
    }
    if (reason === 'stall') this.network.counters.framesStale += pipe.items.filter((item) => item.kind === 'data').length;
    // Held items arrive from now on, in order.
    const quality = this.network.quality;
    let arriveMs = Math.max(now, pipe.lastArriveMs);
    for (const item of pipe.items) {
      arriveMs = Math.max(arriveMs, item.arriveMs, Math.ceil(now + quality.latencyMs + this.network.random.real(0, quality.jitterMs)));
      item.arriveMs = arriveMs;
    }
    pipe.lastArriveMs = arriveMs;
    this.schedule(pipe);
  }

  /** The connection is reset by the network: both ends hear ECONNRESET, nothing in flight arrives. */
  reset(): void {
    this.network.counters.resets++;
    this.broken = true;
    this.log('reset', 'by the network');
    for (const pipe of this.pipes) {
      this.network.counters.framesLost += pipe.items.length;
      pipe.items.length = 0;
      pipe.timer?.cancel();
      pipe.timer = undefined;
    }
    for (const end of [this.sourceEnd, this.targetEnd]) {
      end.host.scope.setTimer(this.network.random.real(0, 50), () => end.fail(resetError('read ECONNRESET')));
    }
  }

  hostCrashed(host: SimHost, incarnation: number): void {
    for (const end of [this.sourceEnd, this.targetEnd]) {
      if (end.host !== host || end.incarnation !== incarnation) continue;
      end.die();
      this.dropUnsent(end.outgoing!);
    }
  }
}

function resetError(message: string): Error {
  return Object.assign(new Error(message), { code: 'ECONNRESET' });
}

export class SimEndpoint implements FrameLink {
  state: 'open' | 'closing' | 'ended' = 'open';
  /** The process behind this end died with its host (a crash): it never acts again. */
  dead = false;
  outgoing: Pipe | undefined;
  readonly incarnation: number;
  private handlers: FrameLinkHandlers | undefined;
  private readonly reader = new FrameReader();
  private readonly early: Item[] = [];
  private lingerTimer: Timer | undefined;
  private closedError: Error | undefined;

  constructor(
    readonly connection: SimConnection,
    readonly host: SimHost,
    readonly description: string,
    /** The peer's verified name (the CN of its certificate under mutual TLS). */
    readonly peerName: string,
  ) {
    this.incarnation = host.incarnation;
  }

  /** Ended or dead (read through a getter: a handler may have ended it meanwhile). */
  get isEnded(): boolean {
    return this.state === 'ended' || this.dead;
  }

  get bufferedBytes(): number {
    return this.outgoing ? this.connection.unsentBytes(this.outgoing) : 0;
  }

  private log(kind: string, detail: string): void {
    this.connection.network.log(kind, `${this.description} ${detail}`);
  }

  start(handlers: FrameLinkHandlers): void {
    if (this.handlers) throw new Error('assertion: a link started twice');
    this.handlers = handlers;
    if (this.state === 'ended') {
      const error = this.closedError;
      this.host.scope.setTimer(0, () => handlers.closed(error));
      return;
    }
    if (this.early.length > 0) {
      const early = this.early.splice(0);
      this.host.scope.setTimer(0, () => {
        for (const item of early) this.arrive(item);
      });
    }
  }

  send(type: FrameTypeName, payload: Buffer | readonly Buffer[]): void {
    if (this.state !== 'open' || this.dead) return;
    // The bytes are copied: what the peer receives is its own, as from a socket.
    const bytes = Buffer.concat(encodeFrame(type, payload));
    const counters = this.connection.network.counters;
    counters.frames++;
    counters.bytes += bytes.length;
    this.connection.enqueue(this.outgoing!, 'data', bytes, type);
  }

  close(error?: Error): void {
    if (this.state === 'ended' || this.dead) return;
    if (error) {
      // Destroyed: unsent bytes are dropped and the peer gets a reset.
      this.log('destroy', error.message);
      this.connection.dropUnsent(this.outgoing!);
      this.connection.enqueue(this.outgoing!, 'rst', undefined, undefined);
      this.finish(error);
      return;
    }
    if (this.state === 'closing') return;
    this.log('close', 'orderly');
    this.state = 'closing';
    this.connection.enqueue(this.outgoing!, 'fin', undefined, undefined);
    // An orderly end that the peer never completes does not hold the socket forever.
    this.lingerTimer = this.host.scope.setTimer(closeLingerMsMax, () => {
      this.lingerTimer = undefined;
      if (this.state !== 'ended') this.finish(undefined);
    });
  }

  /** A reset or a local failure: ends the link with `error`. */
  fail(error: Error): void {
    if (this.state === 'ended' || this.dead) return;
    this.finish(error);
  }

  die(): void {
    this.dead = true;
    this.lingerTimer?.cancel();
  }

  private finish(error: Error | undefined): void {
    if (this.state === 'ended') return;
    this.state = 'ended';
    this.closedError = error;
    this.lingerTimer?.cancel();
    this.handlers?.closed(error);
  }

  /** An item reached this end's host. */
  arrive(item: Item): void {
    if (this.dead || this.host.incarnation !== this.incarnation) {
      // The process is gone: a host that is down answers nothing; a rebooted one resets what it does not know.
      if (this.host.up && item.kind !== 'rst') this.connection.enqueue(this.outgoing!, 'rst', undefined, undefined);
      else this.connection.network.counters.framesLost++;
      return;
    }
    if (this.state === 'ended') {
      if (item.kind === 'data' || item.kind === 'fin') this.connection.enqueue(this.outgoing!, 'rst', undefined, undefined);
      return;
    }
    if (!this.handlers) {
      this.early.push(item);
      return;
    }
    if (item.kind === 'rst') {
      this.log('reset', 'by the peer');
      this.finish(resetError('read ECONNRESET'));
      return;
    }
    if (item.kind === 'fin') {
      if (this.state === 'closing') {
        this.finish(undefined);
      } else {
        // The peer ended: this end ends too (its FIN follows what it still has to send).
        this.state = 'closing';
        this.connection.enqueue(this.outgoing!, 'fin', undefined, undefined);
        const waitMs = Math.max(0, this.outgoing!.busyUntilMs - this.host.scope.nowMs());
        this.host.scope.setTimer(waitMs, () => this.finish(undefined));
      }
      return;
    }
    const sender = this === this.connection.sourceEnd ? this.connection.targetEnd : this.connection.sourceEnd;
    const late = sender.state !== 'open' || sender.dead;
    if (late) this.connection.network.counters.framesFromGoneSenders++;
    this.log('deliver', `${item.type} ${item.bytes!.length}B${late ? ' (its sender is gone)' : ''}`);
    let frames: Frame[];
    try {
      frames = this.reader.push(item.bytes!);
    } catch (error) {
      this.close(error instanceof Error ? error : new WireProtocolError(String(error)));
      return;
    }
    for (const frame of frames) {
      if (this.isEnded) return;
      this.handlers.frame(frame);
    }
  }
}
