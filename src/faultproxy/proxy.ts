/**
 * FaultProxy: a byte-transparent TCP proxy that sits between two peers in
 * tests and injects network faults (latency with jitter, a bandwidth cap,
 * blackholes, resets, slow closes, bit flips, refused connections). It never
 * looks inside the stream, so TLS passes through it unchanged.
 *
 * Each accepted connection becomes a pair of sockets joined by two pipes:
 * upstream (client → target) and downstream (target → client). A pipe keeps
 * the chunks it has read in arrival order and releases only the oldest one, so
 * delays and caps never reorder bytes within a connection.
 */
import * as net from 'node:net';
import { randomInt } from 'node:crypto';
import { type Logger, silentLogger } from '../util/logger.js';

/** Connections forwarded at once; more are reset at accept. */
export const connectionsMax = 64;
/** Bytes one direction of a connection may queue (delayed or throttled) before reading from its source pauses. */
export const queuedBytesMax = 4 * 1024 * 1024;
/** Bytes one direction of a connection may hold during a 'hold' blackhole before reading from its source pauses. */
export const holdBytesMax = 8 * 1024 * 1024;
/** Bytes the whole proxy may buffer at worst; the per-connection limits must fit inside it. */
export const bufferedBytesTotalMax = 1024 * 1024 * 1024;
/** Largest latency, jitter and slow-close delay accepted. */
export const latencyMsMax = 60_000;
export const slowCloseMsMax = 60_000;
/** Time a connection to the target may take before the client is reset. */
export const connectMsMax = 10_000;
/** Burst a bandwidth cap allows, as the time it takes to earn it: the bucket holds this many milliseconds of traffic. */
export const bucketMs = 50;

if (connectionsMax * 2 * Math.max(queuedBytesMax, holdBytesMax) > bufferedBytesTotalMax) {
  throw new Error('connectionsMax × 2 directions × max(queuedBytesMax, holdBytesMax) must fit in bufferedBytesTotalMax');
}

/** Upstream is client → target; downstream is target → client. */
export type Direction = 'upstream' | 'downstream';
export const directions: readonly Direction[] = ['upstream', 'downstream'];

export interface Faults {
  /** The directions the byte faults below apply to. `refuse` and `resetAll()` act on whole connections. */
  direction: 'both' | Direction;
  /** Delay added to each chunk. */
  latencyMs: number;
  /** Each chunk's delay is drawn uniformly from latencyMs ± jitterMs (at least 0); chunks are never reordered. */
  jitterMs: number;
  /** Token-bucket cap per direction, shared by all connections; null is no cap. */
  bytesPerSecondMax: number | null;
  /** 'drop' discards bytes read; 'hold' keeps them (up to holdBytesMax per connection) and sends them once lifted. Both keep connections open and withhold FIN. */
  blackhole: 'off' | 'drop' | 'hold';
  /** Reset a connection once it has forwarded this many bytes (in the faulted directions, counted since it opened); null is off. */
  resetAfterBytes: number | null;
  /** Delay between reading a FIN from one side and passing it on to the other. */
  slowCloseMs: number;
  /** Chance, per chunk read, of flipping one random bit in it. Draws come from the seeded PRNG. */
  corruptProbability: number;
  /** Accept new connections and reset them at once. */
  refuse: boolean;
}

export const noFaults: Readonly<Faults> = Object.freeze({
  direction: 'both',
  latencyMs: 0,
  jitterMs: 0,
  bytesPerSecondMax: null,
  blackhole: 'off',
  resetAfterBytes: null,
  slowCloseMs: 0,
  corruptProbability: 0,
  refuse: false,
});

export interface FaultsApplied {
  /** Chunks read while latency or jitter was set. */
  delayedChunks: number;
  /** Times a direction waited for the bandwidth cap. */
  throttledWaits: number;
  /** Bytes discarded by a 'drop' blackhole. */
  droppedBytes: number;
  /** Bytes read while a 'hold' blackhole was on. */
  heldBytes: number;
  /** Times a 'hold' buffer reached holdBytesMax and reading from its source paused. */
  holdBufferFull: number;
  /** Connections reset by resetAll(). */
  resets: number;
  /** Connections reset by resetAfterBytes. */
  resetsAfterBytes: number;
  /** FINs passed on late because of slowCloseMs. */
  slowCloses: number;
  /** Chunks with one bit flipped. */
  corruptedChunks: number;
  /** Connections reset at accept because `refuse` was on. */
  refusedConnections: number;
}

export interface FaultProxyStats {
  connectionsAccepted: number;
  connectionsOpen: number;
  /** Connections reset at accept because connectionsMax were open. */
  connectionsOverLimit: number;
  /** Connections whose target could not be reached; their clients were reset. */
  targetConnectFailures: number;
  bytesForwarded: Record<Direction, number>;
  /** Bytes read but not yet forwarded (delayed, throttled or held), now. */
  bytesQueued: Record<Direction, number>;
  faultsApplied: FaultsApplied;
}

export interface HostPort {
  host: string;
  port: number;
}

export interface FaultProxyOptions {
  target: HostPort;
  faults?: Partial<Faults>;
  /** Seed of the PRNG behind corruption and jitter; random when not given (read it back from `seed`). */
  seed?: number;
  logger?: Logger;
}

/**
 * Checks a partial set of faults (which may come from JSON) and returns it
 * typed. Throws a RangeError or TypeError naming the field.
 */
export function checkFaults(partial: unknown): Partial<Faults> {
  if (typeof partial !== 'object' || partial === null || Array.isArray(partial)) {
    throw new TypeError(`Cannot set faults from ${JSON.stringify(partial)}: expected an object such as {"latencyMs":50}`);
  }
  const fields = partial as Record<string, unknown>;
  const fail = (name: string, expected: string): never => {
    throw new RangeError(`Cannot set fault '${name}' to ${JSON.stringify(fields[name])}: it must be ${expected}`);
  };
  const wholeNumber = (name: string, max: number): void => {
    const value = fields[name];
    if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0 || value > max) fail(name, `a whole number from 0 to ${max}`);
  };
  const known = Object.keys(noFaults);
  for (const [name, value] of Object.entries(fields)) {
    switch (name) {
      case 'direction':
        if (value !== 'both' && value !== 'upstream' && value !== 'downstream') fail(name, "'both', 'upstream' or 'downstream'");
        break;
      case 'latencyMs':
      case 'jitterMs':
        wholeNumber(name, latencyMsMax);
        break;
      case 'slowCloseMs':
        wholeNumber(name, slowCloseMsMax);
        break;
      case 'bytesPerSecondMax':
        if (value !== null && (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 1)) fail(name, 'a whole number of bytes per second from 1, or null for no cap');
        break;
      case 'resetAfterBytes':
        if (value !== null && (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 1)) fail(name, 'a whole number of bytes from 1, or null for off');
        break;
      case 'blackhole':
        if (value !== 'off' && value !== 'drop' && value !== 'hold') fail(name, "'off', 'drop' or 'hold'");
        break;
      case 'corruptProbability':
        if (typeof value !== 'number' || !(value >= 0 && value <= 1)) fail(name, 'a number from 0 to 1');
        break;
      case 'refuse':
        if (typeof value !== 'boolean') fail(name, 'true or false');
        break;
      default:
        throw new TypeError(`Cannot set unknown fault '${name}': known faults are ${known.join(', ')}`);
    }
  }
  return fields as Partial<Faults>;
}

/** A small deterministic PRNG (xorshift32) returning numbers in [0, 1). */
function xorshift32(seed: number): () => number {
  let state = seed >>> 0 || 0x6d2b79f5;
  return () => {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    return state / 0x1_0000_0000;
  };
}

const clock = (): number => performance.now();

/**
 * A token bucket for one direction. It starts full and holds `bucketMs` worth
 * of bytes, so a cap allows only a short burst above its rate.
 */
class TokenBucket {
  private bytesPerSecond: number | null = null;
  private capacityBytes = 0;
  private tokens = 0;
  private refilledAt = 0;

  configure(bytesPerSecond: number | null, now: number): void {
    if (bytesPerSecond === this.bytesPerSecond) return;
    const wasCapped = this.bytesPerSecond !== null;
    if (wasCapped) this.refill(now);
    this.bytesPerSecond = bytesPerSecond;
    if (bytesPerSecond === null) return;
    this.capacityBytes = Math.max(1, Math.floor((bytesPerSecond * bucketMs) / 1000));
    this.tokens = wasCapped ? Math.min(this.tokens, this.capacityBytes) : this.capacityBytes;
    this.refilledAt = now;
  }

  /** Takes up to `wantedBytes` tokens; returns how many it took (0: wait `waitMs(wantedBytes)`). */
  take(wantedBytes: number, now: number): number {
    this.refill(now);
    if (this.tokens < this.threshold(wantedBytes)) return 0;
    const grantedBytes = Math.min(wantedBytes, Math.floor(this.tokens));
    this.tokens -= grantedBytes;
    return grantedBytes;
  }

  waitMs(wantedBytes: number): number {
    return ((this.threshold(wantedBytes) - this.tokens) * 1000) / this.bytesPerSecond!;
  }

  /** Waits for a quarter bucket rather than a byte, so a capped stream moves in pieces, not byte by byte. */
  private threshold(wantedBytes: number): number {
    return Math.min(wantedBytes, Math.max(1, Math.floor(this.capacityBytes / 4)));
  }

  private refill(now: number): void {
    this.tokens = Math.min(this.capacityBytes, this.tokens + ((now - this.refilledAt) * this.bytesPerSecond!) / 1000);
    this.refilledAt = now;
  }
}

/** Resets a socket with RST when it is connected; destroys it otherwise. */
function resetSocket(socket: net.Socket): void {
  if (socket.destroyed) return;
  if (socket.connecting) {
    socket.destroy();
    return;
  }
  try {
    socket.resetAndDestroy();
  } catch {
    socket.destroy();
  }
}

export class FaultProxy {
  readonly target: HostPort;
  readonly seed: number;
  private readonly logger: Logger;
  private current: Readonly<Faults> = noFaults;
  private effective: Record<Direction, Readonly<Faults>> = { upstream: noFaults, downstream: noFaults };
  private listener: net.Server | undefined;
  private bound: HostPort | undefined;
  private readonly pairs = new Set<Pair>();
  private pairIdLast = 0;
  private closing: Promise<void> | undefined;
  /** @internal */ readonly buckets: Record<Direction, TokenBucket> = { upstream: new TokenBucket(), downstream: new TokenBucket() };
  /** @internal Separate streams so that turning jitter on does not move the corrupted positions. */
  readonly corruptionRandom: () => number;
  /** @internal */ readonly jitterRandom: () => number;
  /** @internal */ readonly counters = {
    connectionsAccepted: 0,
    connectionsOverLimit: 0,
    targetConnectFailures: 0,
    bytesForwarded: { upstream: 0, downstream: 0 },
    bytesQueued: { upstream: 0, downstream: 0 },
    faultsApplied: {
      delayedChunks: 0,
      throttledWaits: 0,
      droppedBytes: 0,
      heldBytes: 0,
      holdBufferFull: 0,
      resets: 0,
      resetsAfterBytes: 0,
      slowCloses: 0,
      corruptedChunks: 0,
      refusedConnections: 0,
    } satisfies FaultsApplied,
  };

  constructor(options: FaultProxyOptions) {
    this.target = { ...options.target };
    this.logger = options.logger ?? silentLogger;
    const seed = options.seed ?? randomInt(1, 0x1_0000_0000);
    if (!Number.isSafeInteger(seed) || seed < 0 || seed > 0xffff_ffff) throw new RangeError(`Cannot use seed ${seed}: it must be a whole number from 0 to ${0xffff_ffff}`);
    this.seed = seed;
    this.corruptionRandom = xorshift32(seed);
    this.jitterRandom = xorshift32(seed ^ 0x9e37_79b9);
    if (options.faults) this.setFaults(options.faults);
  }

  /** Starts listening; resolves with the bound address (port 0 picks a free port). */
  listen(address: HostPort): Promise<HostPort> {
    if (this.listener) throw new Error(`Cannot listen on ${address.host}:${address.port}: the fault proxy is already listening`);
    const listener = net.createServer({ allowHalfOpen: true, noDelay: true }, (socket) => this.accept(socket));
    this.listener = listener;
    return new Promise((resolve, reject) => {
      listener.once('error', reject);
      listener.listen(address.port, address.host, () => {
        listener.off('error', reject);
        listener.on('error', (error) => this.logger.error('fault proxy listener failed', { error: String(error) }));
        const info = listener.address() as net.AddressInfo;
        this.bound = { host: info.address, port: info.port };
        resolve(this.address());
      });
    });
  }

  /** The address the proxy listens on. */
  address(): HostPort {
    if (!this.bound) throw new Error('Cannot report the fault proxy address: it is not listening');
    return { ...this.bound };
  }

  get faults(): Readonly<Faults> {
    return this.current;
  }

  /** Changes some faults (the others stay); takes effect at once, also on bytes already queued. Returns the faults now in force. */
  setFaults(partial: Partial<Faults>): Readonly<Faults> {
    const checked = checkFaults(partial);
    this.current = Object.freeze({ ...this.current, ...checked });
    const applies = (direction: Direction): boolean => this.current.direction === 'both' || this.current.direction === direction;
    const now = clock();
    for (const direction of directions) {
      this.effective[direction] = applies(direction) ? this.current : noFaults;
      this.buckets[direction].configure(this.effective[direction].bytesPerSecondMax, now);
    }
    this.logger.info('faults set', { ...this.current });
    for (const pair of this.pairs) pair.reconsider();
    return this.current;
  }

  /** Clears every fault: held bytes and withheld FINs go out, delayed chunks are released. */
  heal(): void {
    this.setFaults(noFaults);
  }

  /** Resets every open connection (RST to both peers). Returns how many. */
  resetAll(): number {
    let count = 0;
    for (const pair of this.pairs) {
      if (pair.reset('resetAll')) count++;
    }
    this.counters.faultsApplied.resets += count;
    return count;
  }

  stats(): FaultProxyStats {
    const counters = this.counters;
    return {
      connectionsAccepted: counters.connectionsAccepted,
      connectionsOpen: this.pairs.size,
      connectionsOverLimit: counters.connectionsOverLimit,
      targetConnectFailures: counters.targetConnectFailures,
      bytesForwarded: { ...counters.bytesForwarded },
      bytesQueued: { ...counters.bytesQueued },
      faultsApplied: { ...counters.faultsApplied },
    };
  }

  /** Stops listening and destroys every connection; resolves once all sockets and timers are gone. */
  close(): Promise<void> {
    this.closing ??= this.closeOnce();
    return this.closing;
  }

  private async closeOnce(): Promise<void> {
    const listener = this.listener;
    const listenerClosed = listener?.listening ? new Promise<void>((resolve) => listener.close(() => resolve())) : Promise.resolve();
    const pairsClosed = [...this.pairs].map((pair) => pair.destroy());
    await Promise.all(pairsClosed);
    await listenerClosed;
  }

  /** @internal */
  faultsFor(direction: Direction): Readonly<Faults> {
    return this.effective[direction];
  }

  /** @internal */
  get log(): Logger {
    return this.logger;
  }

  private accept(socket: net.Socket): void {
    // A reset can race with the peer; the error it may raise is of no interest.
    socket.on('error', () => {});
    this.counters.connectionsAccepted++;
    if (this.closing) {
      socket.destroy();
      return;
    }
    if (this.current.refuse) {
      this.counters.faultsApplied.refusedConnections++;
      resetSocket(socket);
      return;
    }
    if (this.pairs.size >= connectionsMax) {
      this.counters.connectionsOverLimit++;
      this.logger.warn('too many connections; resetting the new one', { connectionsMax });
      resetSocket(socket);
      return;
    }
    const pair = new Pair(this, socket, ++this.pairIdLast);
    this.pairs.add(pair);
    void pair.closed.then(() => this.pairs.delete(pair));
  }
}

interface QueuedChunk {
  bytes: Buffer;
  receivedAt: number;
  /** Where in latencyMs ± jitterMs this chunk's delay falls, from -1 to 1; drawn once so a chunk's delay is stable. */
  jitterUnit: number;
}

/** One accepted connection: the client socket, the socket to the target and a pipe each way. */
class Pair {
  readonly id: number;
  private readonly proxy: FaultProxy;
  readonly client: net.Socket;
  readonly target: net.Socket;
  private readonly pipes: Record<Direction, Pipe>;
  private targetConnected = false;
  /** Set once the pair is being reset or destroyed: nothing more is forwarded. */
  ending = false;
  /** Set once resetAfterBytes is reached: the last bytes are on their way and the reset follows. */
  resetPending = false;
  readonly bytesForwarded: Record<Direction, number> = { upstream: 0, downstream: 0 };
  readonly closed: Promise<void>;

  constructor(proxy: FaultProxy, client: net.Socket, id: number) {
    this.proxy = proxy;
    this.id = id;
    this.client = client;
    const target = net.connect({ host: proxy.target.host, port: proxy.target.port, allowHalfOpen: true, noDelay: true });
    this.target = target;
    this.pipes = {
      upstream: new Pipe({ proxy, pair: this, direction: 'upstream', source: client, destination: target }),
      downstream: new Pipe({ proxy, pair: this, direction: 'downstream', source: target, destination: client }),
    };
    target.setTimeout(connectMsMax, () => target.destroy(new Error(`connecting to the target took longer than ${connectMsMax} ms`)));
    target.once('connect', () => {
      this.targetConnected = true;
      target.setTimeout(0);
    });
    const clientClosed = new Promise<void>((resolve) => client.once('close', () => resolve()));
    const targetClosed = new Promise<void>((resolve) => target.once('close', () => resolve()));
    client.on('error', (error) => this.onError('client', error));
    target.on('error', (error) => this.onError('target', error));
    this.closed = Promise.all([clientClosed, targetClosed]).then(() => {
      for (const direction of directions) this.pipes[direction].dispose();
    });
    proxy.log.debug('connection accepted', { connection: id, client: `${client.remoteAddress}:${client.remotePort}` });
  }

  /** Re-reads the faults: releases held bytes, reschedules delayed ones, applies a new cap. */
  reconsider(): void {
    for (const direction of directions) this.pipes[direction].reconsider();
  }

  /** True once nothing more may be forwarded. */
  get stopped(): boolean {
    return this.ending || this.resetPending;
  }

  forwardedIn(direction: Faults['direction']): number {
    return direction === 'both' ? this.bytesForwarded.upstream + this.bytesForwarded.downstream : this.bytesForwarded[direction];
  }

  /** Resets both sockets with RST. Returns false when the pair was already ending. */
  reset(reason: string): boolean {
    if (this.ending) return false;
    this.ending = true;
    this.proxy.log.debug('connection reset', { connection: this.id, reason });
    resetSocket(this.client);
    resetSocket(this.target);
    return true;
  }

  destroy(): Promise<void> {
    this.ending = true;
    this.client.destroy();
    this.target.destroy();
    return this.closed;
  }

  private onError(side: 'client' | 'target', error: NodeJS.ErrnoException): void {
    if (side === 'target' && !this.targetConnected && !this.ending) {
      this.proxy.counters.targetConnectFailures++;
      this.proxy.log.warn('cannot connect to the target; resetting the client', { connection: this.id, target: `${this.proxy.target.host}:${this.proxy.target.port}`, error: error.message });
    } else {
      this.proxy.log.debug('connection failed; resetting the other side', { connection: this.id, side, error: error.message });
    }
    // A transparent proxy passes a failure on as the peer would see it without the proxy: as a reset.
    this.ending = true;
    resetSocket(this.client);
    resetSocket(this.target);
  }
}

interface PipeOptions {
  proxy: FaultProxy;
  pair: Pair;
  direction: Direction;
  source: net.Socket;
  destination: net.Socket;
}

/** One direction of a connection: reads chunks from its source, applies the faults, writes them to its destination in order. */
class Pipe {
  private readonly proxy: FaultProxy;
  private readonly pair: Pair;
  private readonly direction: Direction;
  private readonly source: net.Socket;
  private readonly destination: net.Socket;
  private chunks: QueuedChunk[] = [];
  private head = 0;
  private queuedBytes = 0;
  private timer: NodeJS.Timeout | undefined;
  private waitingForDrain = false;
  private pausedByProxy = false;
  private sourceEndedAt: number | undefined;
  private finSent = false;
  private slowCloseCounted = false;
  private disposed = false;
  private readonly onDrainBound = (): void => {
    this.waitingForDrain = false;
    this.pump();
  };

  constructor(options: PipeOptions) {
    this.proxy = options.proxy;
    this.pair = options.pair;
    this.direction = options.direction;
    this.source = options.source;
    this.destination = options.destination;
    this.source.on('data', (chunk: Buffer) => this.onData(chunk));
    this.source.on('end', () => {
      this.sourceEndedAt = clock();
      this.pump();
    });
  }

  reconsider(): void {
    if (this.disposed) return;
    this.clearTimer();
    this.pump();
  }

  dispose(): void {
    this.disposed = true;
    this.clearTimer();
    this.destination.off('drain', this.onDrainBound);
    this.discardQueue();
  }

  private onData(chunk: Buffer): void {
    if (this.disposed || this.pair.stopped) return;
    const faults = this.proxy.faultsFor(this.direction);
    const applied = this.proxy.counters.faultsApplied;
    if (faults.blackhole === 'drop') {
      applied.droppedBytes += chunk.length;
      return;
    }
    if (faults.blackhole === 'hold') applied.heldBytes += chunk.length;
    let bytes = chunk;
    if (faults.corruptProbability > 0 && this.proxy.corruptionRandom() < faults.corruptProbability) {
      bytes = Buffer.from(chunk);
      const bit = Math.floor(this.proxy.corruptionRandom() * bytes.length * 8);
      bytes[bit >>> 3]! ^= 1 << (bit & 7);
      applied.corruptedChunks++;
    }
    if (faults.latencyMs > 0 || faults.jitterMs > 0) applied.delayedChunks++;
    this.chunks.push({ bytes, receivedAt: clock(), jitterUnit: this.proxy.jitterRandom() * 2 - 1 });
    this.queuedBytes += bytes.length;
    this.proxy.counters.bytesQueued[this.direction] += bytes.length;
    this.updateFlow();
    this.pump();
  }

  /** Forwards what the faults let through now and sets a timer for the rest. */
  private pump(): void {
    if (this.disposed || this.timer) return;
    const now = clock();
    let waitMs: number | undefined;
    while (this.head < this.chunks.length && waitMs === undefined) {
      if (this.pair.stopped || this.destination.destroyed || this.destination.writableEnded) {
        this.discardQueue();
        break;
      }
      if (this.waitingForDrain) break;
      const faults = this.proxy.faultsFor(this.direction);
      if (faults.blackhole === 'hold') break;
      if (faults.blackhole === 'drop') {
        this.proxy.counters.faultsApplied.droppedBytes += this.queuedBytes;
        this.discardQueue();
        break;
      }
      const chunk = this.chunks[this.head]!;
      const dueAt = chunk.receivedAt + Math.max(0, faults.latencyMs + chunk.jitterUnit * faults.jitterMs);
      if (dueAt > now) {
        waitMs = dueAt - now;
        break;
      }
      let piece = chunk.bytes;
      if (faults.resetAfterBytes !== null) {
        const leftBytes = faults.resetAfterBytes - this.pair.forwardedIn(faults.direction);
        if (leftBytes <= 0) {
          if (this.pair.reset('resetAfterBytes')) this.proxy.counters.faultsApplied.resetsAfterBytes++;
          continue;
        }
        if (piece.length > leftBytes) piece = piece.subarray(0, leftBytes);
      }
      if (faults.bytesPerSecondMax !== null) {
        const bucket = this.proxy.buckets[this.direction];
        const grantedBytes = bucket.take(piece.length, now);
        if (grantedBytes === 0) {
          this.proxy.counters.faultsApplied.throttledWaits++;
          waitMs = bucket.waitMs(piece.length);
          break;
        }
        piece = piece.subarray(0, grantedBytes);
      }
      this.forward(chunk, piece, faults);
    }
    this.compact();
    this.updateFlow();
    if (waitMs !== undefined) this.wakeIn(waitMs);
    else if (this.head === this.chunks.length) this.maybeSendFin(now);
  }

  private forward(chunk: QueuedChunk, piece: Buffer, faults: Readonly<Faults>): void {
    if (piece.length === chunk.bytes.length) this.head++;
    else chunk.bytes = chunk.bytes.subarray(piece.length);
    this.queuedBytes -= piece.length;
    this.proxy.counters.bytesQueued[this.direction] -= piece.length;
    this.proxy.counters.bytesForwarded[this.direction] += piece.length;
    this.pair.bytesForwarded[this.direction] += piece.length;
    if (faults.resetAfterBytes !== null && this.pair.forwardedIn(faults.direction) >= faults.resetAfterBytes) {
      // Reset only once the last allowed bytes are with the kernel, so that the peer can receive them.
      this.pair.resetPending = true;
      this.destination.write(piece, () => {
        if (this.pair.reset('resetAfterBytes')) this.proxy.counters.faultsApplied.resetsAfterBytes++;
      });
      return;
    }
    if (!this.destination.write(piece)) {
      this.waitingForDrain = true;
      this.destination.once('drain', this.onDrainBound);
    }
  }

  /** Passes the source's FIN on once everything before it went out, unless a blackhole withholds it or slowCloseMs delays it. */
  private maybeSendFin(now: number): void {
    if (this.sourceEndedAt === undefined || this.finSent || this.pair.stopped) return;
    const faults = this.proxy.faultsFor(this.direction);
    if (faults.blackhole !== 'off') return;
    const dueAt = this.sourceEndedAt + faults.slowCloseMs;
    if (dueAt > now) {
      if (!this.slowCloseCounted) {
        this.slowCloseCounted = true;
        this.proxy.counters.faultsApplied.slowCloses++;
      }
      return this.wakeIn(dueAt - now);
    }
    this.finSent = true;
    this.destination.end();
  }

  /** Pauses reading from the source while the queue is at its limit, so that a stalled direction pushes back on the sender as TCP would. */
  private updateFlow(): void {
    if (this.disposed) return;
    const holding = this.proxy.faultsFor(this.direction).blackhole === 'hold';
    const limitBytes = holding ? holdBytesMax : queuedBytesMax;
    if (this.queuedBytes >= limitBytes && !this.pausedByProxy) {
      this.pausedByProxy = true;
      this.source.pause();
      if (holding) {
        this.proxy.counters.faultsApplied.holdBufferFull++;
        this.proxy.log.warn('hold buffer full; reading paused until the blackhole is lifted', { connection: this.pair.id, direction: this.direction, holdBytesMax });
      }
    } else if (this.queuedBytes < limitBytes && this.pausedByProxy) {
      this.pausedByProxy = false;
      this.source.resume();
    }
  }

  private wakeIn(ms: number): void {
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.pump();
    }, Math.max(1, Math.ceil(ms)));
  }

  private clearTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  private discardQueue(): void {
    this.proxy.counters.bytesQueued[this.direction] -= this.queuedBytes;
    this.queuedBytes = 0;
    this.chunks = [];
    this.head = 0;
  }

  private compact(): void {
    if (this.head === this.chunks.length) {
      this.chunks = [];
      this.head = 0;
    } else if (this.head > 1024 && this.head * 2 > this.chunks.length) {
      this.chunks = this.chunks.slice(this.head);
      this.head = 0;
    }
  }
}
