/**
 * The NBD server: listeners, connections, the fixed newstyle handshake and
 * the transmission phase. Storage is a `BackingStore` per export (the tap is
 * one); this file owns the protocol, validation at the edge and resource limits.
 */
import * as net from 'node:net';
import * as tls from 'node:tls';
import type { Duplex } from 'node:stream';
import * as P from './protocol.js';
import { ByteQueue } from './byte-queue.js';
import { BufferPool } from './buffer-pool.js';
import { native } from '../native/index.js';
import { FastZeroUnsupportedError, syncWriteBytesMax, type BackingStore, type WriteData } from '../tap/backing-store.js';
import { type Logger, silentLogger } from '../util/logger.js';

/** Maximum connections served at once; more are closed at accept. */
export const connectionsMax = 512;
/**
 * Connections one export serves at once unless the server is configured otherwise
 * (`NbdServerOptions.connectionsPerExportMax`); past it a client is refused at NBD_OPT_GO.
 */
export const connectionsPerExportMaxDefault = 64;
/** Maximum requests of one connection being processed at once; reading pauses beyond it. */
export const requestsInFlightMax = 256;
/** Largest READ or WRITE payload accepted, and advertised as the maximum payload size. */
export const payloadBytesMax = 32 * 1024 * 1024;
/** Bytes one connection may hold in requests and replies before reading pauses. */
export const connectionBufferedBytesMax = 96 * 1024 * 1024;
/** Largest option payload read during the handshake; larger ones are skipped and refused. */
export const optionBytesMax = 64 * 1024;
/** Longest string (export name, query) the protocol allows. */
export const stringBytesMax = 4096;
/** Options one connection may send before it is cut off. */
export const optionsPerConnectionMax = 4096;
/** Time a client may take from connecting to the end of the handshake. */
export const handshakeMsMax = 60_000;
/** Extents returned by one BLOCK_STATUS reply. */
export const blockStatusExtentsMax = 4096;
/** Kernel send and receive buffer asked for on each connection (the kernel may cap it). */
export const socketBufferBytes = 4 * 1024 * 1024;
/** Extents looked up to split one structured READ reply into data and hole chunks. */
export const readExtentsMax = 64;
/** Metadata-context queries accepted in one option. */
export const metaContextQueriesMax = 256;
/** Minimum and preferred block sizes advertised (the protocol's defaults). */
export const blockBytesMinimum = 1;
export const blockBytesPreferred = 4096;
/** Time a shutdown waits for requests in flight before closing connections. */
export const shutdownDrainMsMax = 10_000;

if (connectionBufferedBytesMax < 2 * payloadBytesMax + P.REQUEST_HEADER_BYTES) {
  throw new Error('connectionBufferedBytesMax must hold two full payloads');
}

export interface ExportConfig {
  name: string;
  description?: string;
  store: BackingStore;
}

export interface TlsConfig {
  /** PEM certificate and key of the server. */
  cert: Buffer;
  key: Buffer;
  /** PEM CA that client certificates must chain to; when set, clients must present one. */
  ca?: Buffer;
  /** Refuse every option but STARTTLS and ABORT until TLS is on. */
  required: boolean;
}

export interface NbdServerOptions {
  exports: ExportConfig[];
  /** Start with no exports (they are added later, as recovery views are). */
  allowNoExports?: boolean;
  tls?: TlsConfig;
  logger?: Logger;
  /** Connections one export serves at once, 1 to `connectionsMax` (default `connectionsPerExportMaxDefault`). */
  connectionsPerExportMax?: number;
}

export type ListenAddress = { host: string; port: number } | { socketPath: string };

class ConnectionClosedError extends Error {
  constructor() {
    super('connection closed');
  }
}

export class NbdServer {
  private readonly exportsByName = new Map<string, ExportConfig>();
  private readonly exportList: ExportConfig[];
  private readonly secureContext: tls.SecureContext | undefined;
  readonly tls: TlsConfig | undefined;
  readonly logger: Logger;
  private readonly listeners: net.Server[] = [];
  private readonly connections = new Set<Connection>();
  private connectionIdLast = 0;
  /** Connections past the handshake (or selecting an export), per export. */
  private readonly exportConnections = new Map<ExportConfig, number>();
  readonly connectionsPerExportMax: number;
  shuttingDown = false;
  readonly bufferPool = new BufferPool();

  constructor(options: NbdServerOptions) {
    if (options.exports.length === 0 && !options.allowNoExports) throw new Error('Cannot start an NBD server with no exports');
    for (const config of options.exports) {
      if (Buffer.byteLength(config.name) > stringBytesMax) throw new Error(`Export name is longer than ${stringBytesMax} bytes: '${config.name.slice(0, 40)}…'`);
      if (this.exportsByName.has(config.name)) throw new Error(`Export '${config.name}' is given twice`);
      this.exportsByName.set(config.name, config);
    }
    this.exportList = [...options.exports];
    const perExportMax = options.connectionsPerExportMax ?? connectionsPerExportMaxDefault;
    if (!Number.isSafeInteger(perExportMax) || perExportMax < 1 || perExportMax > connectionsMax) {
      throw new Error(`Connections per export must be a whole number from 1 to ${connectionsMax} (the server's limit), not ${perExportMax}`);
    }
    this.connectionsPerExportMax = perExportMax;
    this.tls = options.tls;
    this.logger = options.logger ?? silentLogger;
    if (options.tls) {
      this.secureContext = tls.createSecureContext({
        cert: options.tls.cert,
        key: options.tls.key,
        ...(options.tls.ca ? { ca: options.tls.ca } : {}),
        minVersion: 'TLSv1.2',
      });
    }
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  /** Connections each current export serves (past the handshake), by export name. */
  connectionsByExport(): Record<string, number> {
    const out: Record<string, number> = {};
    for (const config of this.exportList) out[config.name] = this.exportConnections.get(config) ?? 0;
    return out;
  }

  /**
   * Takes one of an export's connection places for a connection that selects it; undefined when the
   * export serves `connectionsPerExportMax` connections already, else the function that gives the
   * place back (once) when the connection closes.
   */
  claimExport(config: ExportConfig): (() => void) | undefined {
    const count = this.exportConnections.get(config) ?? 0;
    if (count >= this.connectionsPerExportMax) return undefined;
    this.exportConnections.set(config, count + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const left = (this.exportConnections.get(config) ?? 1) - 1;
      if (left > 0) this.exportConnections.set(config, left);
      else this.exportConnections.delete(config);
    };
  }

  /** The export a name selects: the empty name selects the first (default) export. */
  findExport(name: string): ExportConfig | undefined {
    if (name === '') return this.exportList[0];
    return this.exportsByName.get(name);
  }

  /** Adds an export while the server runs (a recovery view); new connections can select it at once. */
  addExport(config: ExportConfig): void {
    if (Buffer.byteLength(config.name) > stringBytesMax) throw new Error(`Export name is longer than ${stringBytesMax} bytes: '${config.name.slice(0, 40)}…'`);
    if (this.exportsByName.has(config.name)) throw new Error(`Export '${config.name}' already exists`);
    this.exportsByName.set(config.name, config);
    this.exportList.push(config);
  }

  /** Removes an export from the list; connections already using it keep their store until they close. */
  removeExport(name: string): boolean {
    const config = this.exportsByName.get(name);
    if (!config) return false;
    this.exportsByName.delete(name);
    this.exportList.splice(this.exportList.indexOf(config), 1);
    return true;
  }

  get exports(): readonly ExportConfig[] {
    return this.exportList;
  }

  createTlsSocket(raw: Duplex): tls.TLSSocket {
    const config = this.tls!;
    return new tls.TLSSocket(raw as net.Socket, {
      isServer: true,
      secureContext: this.secureContext!,
      requestCert: config.ca !== undefined,
      rejectUnauthorized: config.ca !== undefined,
    });
  }

  /** Starts listening; resolves with the bound address (port 0 picks a free port). */
  listen(address: ListenAddress): Promise<net.AddressInfo | string> {
    const listener = net.createServer({ noDelay: true }, (socket) => this.accept(socket));
    listener.maxConnections = connectionsMax;
    this.listeners.push(listener);
    return new Promise((resolve, reject) => {
      listener.once('error', reject);
      const onListening = (): void => {
        listener.off('error', reject);
        listener.on('error', (error) => this.logger.error('listener failed', { error: String(error) }));
        resolve(listener.address()!);
      };
      if ('socketPath' in address) listener.listen(address.socketPath, onListening);
      else listener.listen(address.port, address.host, onListening);
    });
  }

  private accept(socket: net.Socket): void {
    if (this.shuttingDown) {
      socket.destroy();
      return;
    }
    const connection = new Connection(this, socket, ++this.connectionIdLast);
    this.connections.add(connection);
    connection.closed.then(() => this.connections.delete(connection));
    connection.start();
  }

  /**
   * Stops accepting, answers new requests with ESHUTDOWN, waits (bounded) for
   * requests in flight, then closes every connection. Stores are not closed: the
   * caller owns them.
   */
  async close(): Promise<void> {
    this.shuttingDown = true;
    // net.Server.close() calls back only once its connections are gone, so both run together.
    const listenersClosed = this.listeners.map((listener) => new Promise<void>((resolve) => listener.close(() => resolve())));
    await Promise.all([...this.connections].map((connection) => connection.shutdown()));
    await Promise.all(listenersClosed);
  }
}

interface Request {
  flags: number;
  type: number;
  cookie: Buffer;
  offset: number;
  lengthBytes: number;
  data?: WriteData;
}

/** Offsets past 2^53 cannot be addressed; they map to this and fail range checks. */
const offsetUnaddressable = Number.MAX_SAFE_INTEGER;

class Connection {
  private readonly server: NbdServer;
  private socket: Duplex;
  private readonly raw: net.Socket;
  readonly id: number;
  private readonly queue = new ByteQueue();
  private phase: 'handshake' | 'transmission' | 'closing' = 'handshake';
  private waiter: { bytes: number; resolve: () => void; reject: (error: Error) => void } | undefined;
  private handshakeTimer: NodeJS.Timeout | undefined;
  private tlsActive = false;
  private structuredReplies = false;
  private metaContextExport: string | undefined;
  private metaContextSelected = false;
  private exportConfig: ExportConfig | undefined;
  /** Gives back this connection's place among its export's connections (see NbdServer.claimExport). */
  private exportPlaceRelease: (() => void) | undefined;
  private store: BackingStore | undefined;
  private blockStatusActive = false;
  private transmissionFlags = 0;
  private inFlightCount = 0;
  private inFlightBytes = 0;
  private readPaused = false;
  private discardBytesLeft = 0;
  private discardReply: Request | undefined;
  private disconnectRequested = false;
  private closedResolve!: () => void;
  readonly closed: Promise<void>;
  private drainedResolvers: (() => void)[] = [];
  private readonly onDataBound = (chunk: Buffer): void => this.onData(chunk);
  private readonly onDrainBound = (): void => this.maybeResume();
  private corked = false;
  private readonly uncorkBound = (): void => {
    this.corked = false;
    this.socket.uncork();
  };

  constructor(server: NbdServer, socket: net.Socket, id: number) {
    this.server = server;
    this.raw = socket;
    this.socket = socket;
    this.id = id;
    this.closed = new Promise((resolve) => (this.closedResolve = resolve));
  }

  start(): void {
    const socket = this.raw;
    socket.setNoDelay(true);
    // Larger kernel buffers let a big read reply leave in fewer writes, each waking the client once.
    const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
    if (typeof fd === 'number' && fd >= 0) {
      try {
        native.setSocketBuffers(fd, socketBufferBytes);
      } catch (error) {
        this.server.logger.debug('cannot enlarge socket buffers', { connection: this.id, error: String(error) });
      }
    }
    socket.on('data', this.onDataBound);
    socket.on('drain', this.onDrainBound);
    socket.on('error', (error) => this.server.logger.debug('connection error', { connection: this.id, error: error.message }));
    socket.on('close', () => this.onClose());
    this.handshakeTimer = setTimeout(() => {
      this.server.logger.warn('handshake took too long; closing', { connection: this.id });
      this.destroy();
    }, handshakeMsMax);
    this.handshakeTimer.unref();
    this.handshake().catch((error: unknown) => {
      if (!(error instanceof ConnectionClosedError)) {
        this.server.logger.warn('handshake failed', { connection: this.id, error: String(error) });
      }
      this.destroy();
    });
  }

  private onClose(): void {
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.phase = 'closing';
    const waiter = this.waiter;
    this.waiter = undefined;
    waiter?.reject(new ConnectionClosedError());
    this.queue.clear();
    this.exportPlaceRelease?.();
    this.exportPlaceRelease = undefined;
    this.closedResolve();
    this.notifyDrained();
  }

  private destroy(): void {
    this.phase = 'closing';
    this.raw.destroy();
    if (this.socket !== this.raw) this.socket.destroy();
  }

  private get isOpen(): boolean {
    return !this.socket.destroyed && this.phase !== 'closing';
  }

  async shutdown(): Promise<void> {
    if (this.phase === 'handshake') {
      this.destroy();
      return this.closed;
    }
    if (this.inFlightCount > 0) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        new Promise<void>((resolve) => this.drainedResolvers.push(resolve)),
        new Promise<void>((resolve) => (timer = setTimeout(resolve, shutdownDrainMsMax))),
      ]);
      clearTimeout(timer);
    }
    this.socket.end();
    const timer = setTimeout(() => this.destroy(), 1000);
    await this.closed;
    clearTimeout(timer);
  }

  // ---------------------------------------------------------------- input

  private onData(chunk: Buffer): void {
    if (this.phase === 'closing') return;
    this.queue.push(chunk);
    if (this.phase === 'transmission') {
      this.pump();
      return;
    }
    const waiter = this.waiter;
    if (waiter && this.queue.length >= waiter.bytes) {
      this.waiter = undefined;
      waiter.resolve();
    }
    // A client must wait for each option's reply; one flooding the handshake is paused.
    if (this.queue.length > optionBytesMax + 2 * P.OPTION_HEADER_BYTES) this.pauseReading();
  }

  private pauseReading(): void {
    if (!this.readPaused) {
      this.readPaused = true;
      this.socket.pause();
    }
  }

  private resumeReading(): void {
    if (this.readPaused) {
      this.readPaused = false;
      this.socket.resume();
    }
  }

  /** Waits until `bytes` are queued (handshake phase only). */
  private async need(bytes: number): Promise<void> {
    if (this.queue.length >= bytes) return;
    if (this.phase === 'closing') throw new ConnectionClosedError();
    this.resumeReading();
    await new Promise<void>((resolve, reject) => (this.waiter = { bytes, resolve, reject }));
  }

  private async read(bytes: number): Promise<Buffer> {
    await this.need(bytes);
    return Buffer.from(this.queue.take(bytes));
  }

  private async skip(bytes: number): Promise<void> {
    let left = bytes;
    while (left > 0) {
      await this.need(1);
      left -= this.queue.drop(left);
    }
  }

  private send(data: Buffer): void {
    if (this.isOpen) this.socket.write(data);
  }

  // ------------------------------------------------------------ handshake

  private async handshake(): Promise<void> {
    const greeting = Buffer.alloc(18);
    greeting.writeBigUInt64BE(P.NBDMAGIC, 0);
    greeting.writeBigUInt64BE(P.IHAVEOPT, 8);
    greeting.writeUInt16BE(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES, 16);
    this.send(greeting);
    const clientFlags = (await this.read(4)).readUInt32BE(0);
    if ((clientFlags & ~P.CLIENT_FLAGS_KNOWN) !== 0 || (clientFlags & P.FLAG_C_FIXED_NEWSTYLE) === 0) {
      // Unknown client flags: the spec says to close. Old (non-fixed) newstyle is not offered.
      this.server.logger.info('client flags refused; closing', { connection: this.id, clientFlags });
      this.destroy();
      return;
    }
    const noZeroes = (clientFlags & P.FLAG_C_NO_ZEROES) !== 0;
    for (let optionCount = 0; ; optionCount++) {
      if (optionCount >= optionsPerConnectionMax) {
        this.server.logger.warn('too many options; closing', { connection: this.id });
        this.destroy();
        return;
      }
      const header = await this.read(P.OPTION_HEADER_BYTES);
      if (header.readBigUInt64BE(0) !== P.IHAVEOPT) {
        this.server.logger.info('bad option magic; closing', { connection: this.id });
        this.destroy();
        return;
      }
      const option = header.readUInt32BE(8);
      const lengthBytes = header.readUInt32BE(12);
      if (this.server.shuttingDown) {
        await this.skip(lengthBytes);
        this.send(P.optionReply(option, P.REP_ERR_SHUTDOWN));
        this.destroy();
        return;
      }
      if (lengthBytes > optionBytesMax) {
        if (option === P.OPT_EXPORT_NAME) return this.destroy();
        await this.skip(lengthBytes);
        // The baseline says an option the server does not implement MUST get ERR_UNSUP, whatever its size.
        if (!P.OPTIONS_KNOWN.has(option)) this.send(P.optionReply(option, P.REP_ERR_UNSUP, Buffer.from(`option ${option} is not supported`)));
        else this.send(P.optionReply(option, P.REP_ERR_TOO_BIG, Buffer.from('option payload too large')));
        continue;
      }
      const data = await this.read(lengthBytes);
      if (this.server.tls?.required && !this.tlsActive && option !== P.OPT_STARTTLS && option !== P.OPT_ABORT) {
        if (option === P.OPT_EXPORT_NAME) return this.destroy();
        this.send(P.optionReply(option, P.REP_ERR_TLS_REQD, Buffer.from('TLS is required: send NBD_OPT_STARTTLS first')));
        continue;
      }
      const done = await this.handleOption(option, data, noZeroes);
      if (done) return;
    }
  }

  /** Handles one option; returns true when the handshake is over. */
  private async handleOption(option: number, data: Buffer, noZeroes: boolean): Promise<boolean> {
    switch (option) {
      case P.OPT_EXPORT_NAME: {
        const config = this.server.findExport(data.toString('utf8'));
        if (!config) {
          // The only answer the spec allows to an unknown name here is to close. end(), not
          // destroy(): replies to earlier options may still be queued (always so under TLS).
          this.socket.end();
          this.phase = 'closing';
          this.resumeReading();
          return true;
        }
        if (!this.claimPlace(config)) {
          // NBD_OPT_EXPORT_NAME has no error reply: the spec's only refusal is to close.
          this.server.logger.warn('export at its connection limit; closing', { connection: this.id, export: config.name, connectionsPerExportMax: this.server.connectionsPerExportMax });
          this.socket.end();
          this.phase = 'closing';
          this.resumeReading();
          return true;
        }
        this.selectExport(config, false);
        const reply = Buffer.alloc(noZeroes ? 10 : 134);
        reply.writeBigUInt64BE(BigInt(config.store.sizeBytes), 0);
        reply.writeUInt16BE(this.transmissionFlags, 8);
        this.send(reply);
        this.enterTransmission();
        return true;
      }
      case P.OPT_ABORT:
        // "The server MUST reply with NBD_REP_ACK" and SHOULD ignore any data rather than refuse it.
        this.send(P.optionReply(option, P.REP_ACK));
        this.socket.end();
        this.phase = 'closing';
        // Read on (onData drops it) so the client's close is seen even if a flood paused reading.
        this.resumeReading();
        return true;
      case P.OPT_LIST: {
        if (data.length !== 0) return this.optionError(option, P.REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
        for (const config of this.server.exports) {
          const name = Buffer.from(config.name, 'utf8');
          const description = Buffer.from(config.description ?? '', 'utf8');
          const payload = Buffer.alloc(4 + name.length + description.length);
          payload.writeUInt32BE(name.length, 0);
          name.copy(payload, 4);
          description.copy(payload, 4 + name.length);
          this.send(P.optionReply(option, P.REP_SERVER, payload));
        }
        this.send(P.optionReply(option, P.REP_ACK));
        return false;
      }
      case P.OPT_STARTTLS:
        return this.startTls(option, data);
      case P.OPT_INFO:
      case P.OPT_GO:
        return this.infoOrGo(option, data);
      case P.OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return this.optionError(option, P.REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        this.structuredReplies = true;
        this.send(P.optionReply(option, P.REP_ACK));
        return false;
      case P.OPT_LIST_META_CONTEXT:
      case P.OPT_SET_META_CONTEXT:
        return this.metaContext(option, data);
      default:
        return this.optionError(option, P.REP_ERR_UNSUP, `option ${option} is not supported`);
    }
  }

  private optionError(option: number, replyType: number, message: string): false {
    this.send(P.optionReply(option, replyType, Buffer.from(message, 'utf8')));
    return false;
  }

  private async startTls(option: number, data: Buffer): Promise<boolean> {
    if (data.length !== 0) return this.optionError(option, P.REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
    if (!this.server.tls) return this.optionError(option, P.REP_ERR_POLICY, 'TLS is not configured on this server');
    if (this.tlsActive) return this.optionError(option, P.REP_ERR_INVALID, 'TLS is already active');
    this.send(P.optionReply(option, P.REP_ACK));
    if (this.queue.length !== 0) {
      // Bytes sent before our ACK cannot belong to the TLS session.
      this.destroy();
      return true;
    }
    const raw = this.raw;
    raw.off('data', this.onDataBound);
    raw.off('drain', this.onDrainBound);
    const secure = this.server.createTlsSocket(raw);
    this.socket = secure;
    this.tlsActive = true;
    // Everything negotiated before STARTTLS is discarded.
    this.structuredReplies = false;
    this.metaContextExport = undefined;
    this.metaContextSelected = false;
    secure.on('data', this.onDataBound);
    secure.on('drain', this.onDrainBound);
    secure.on('error', (error) => {
      this.server.logger.info('TLS session failed', { connection: this.id, error: error.message });
      this.destroy();
    });
    secure.on('close', () => this.raw.destroy());
    await new Promise<void>((resolve, reject) => {
      secure.once('secure', resolve);
      secure.once('close', () => reject(new ConnectionClosedError()));
    });
    return false;
  }

  private parseName(data: Buffer): { name: string; rest: number } | undefined {
    if (data.length < 4) return undefined;
    const nameBytes = data.readUInt32BE(0);
    if (nameBytes > data.length - 4) return undefined;
    return { name: data.toString('utf8', 4, 4 + nameBytes), rest: 4 + nameBytes };
  }

  private async infoOrGo(option: number, data: Buffer): Promise<boolean> {
    const parsed = this.parseName(data);
    if (!parsed || data.length < parsed.rest + 2) return this.optionError(option, P.REP_ERR_INVALID, 'malformed NBD_OPT_INFO/GO');
    const requestCount = data.readUInt16BE(parsed.rest);
    if (data.length !== parsed.rest + 2 + 2 * requestCount) return this.optionError(option, P.REP_ERR_INVALID, 'NBD_OPT_INFO/GO length does not match its requests');
    if (Buffer.byteLength(parsed.name) > stringBytesMax) return this.optionError(option, P.REP_ERR_INVALID, 'export name is longer than 4096 bytes');
    const config = this.server.findExport(parsed.name);
    if (!config) return this.optionError(option, P.REP_ERR_UNKNOWN, `no export named '${parsed.name.slice(0, 256)}'`);
    // NBD_REP_ERR_POLICY: the spec's "the option sent is not allowed by server policy", and a configured
    // limit is policy. Not ERR_SHUTDOWN (the server is not going away: the client would wrongly give up
    // on it), nor ERR_TOO_BIG (about the size of a request or reply), nor ERR_UNKNOWN (the export exists).
    // Checked before any NBD_REP_INFO, so a refused GO sends nothing but the error; the client may go on
    // negotiating (NBD_OPT_INFO or NBD_OPT_LIST still answer). What clients show: qemu "Denied by server
    // for option 7 (go)" and this message; libnbd "server policy prevents NBD_OPT_GO" (nbdinfo 1.14: "server
    // replied with error to opt_go request"), with this message under LIBNBD_DEBUG=1. ERR_SHUTDOWN would
    // have them say the server is shutting down.
    if (option === P.OPT_GO && !this.claimPlace(config)) {
      this.server.logger.warn('export at its connection limit; NBD_OPT_GO refused', { connection: this.id, export: config.name, connectionsPerExportMax: this.server.connectionsPerExportMax });
      return this.optionError(
        option,
        P.REP_ERR_POLICY,
        `export '${config.name.slice(0, 256)}' already serves ${this.server.connectionsPerExportMax} connections, the limit per export (connectionsPerExportMax); try again once one of them closes`,
      );
    }
    const requested = new Set<number>();
    for (let i = 0; i < requestCount; i++) requested.add(data.readUInt16BE(parsed.rest + 2 + 2 * i));
    const flags = this.transmissionFlagsFor(config);
    this.send(P.optionReply(option, P.REP_INFO, P.infoExport(BigInt(config.store.sizeBytes), flags)));
    if (requested.has(P.INFO_NAME)) this.send(P.optionReply(option, P.REP_INFO, P.infoText(P.INFO_NAME, config.name)));
    if (requested.has(P.INFO_DESCRIPTION) && config.description) {
      this.send(P.optionReply(option, P.REP_INFO, P.infoText(P.INFO_DESCRIPTION, config.description)));
    }
    // Our constraints are the protocol's defaults, so sending them unasked is harmless and helps clients.
    this.send(P.optionReply(option, P.REP_INFO, P.infoBlockSize(blockBytesMinimum, blockBytesPreferred, payloadBytesMax)));
    this.send(P.optionReply(option, P.REP_ACK));
    if (option === P.OPT_INFO) return false;
    this.selectExport(config, this.metaContextSelected && this.metaContextExport === config.name);
    this.enterTransmission();
    return true;
  }

  private async metaContext(option: number, data: Buffer): Promise<boolean> {
    if (!this.structuredReplies) return this.optionError(option, P.REP_ERR_INVALID, 'negotiate structured replies first');
    const parsed = this.parseName(data);
    if (!parsed || data.length < parsed.rest + 4) return this.optionError(option, P.REP_ERR_INVALID, 'malformed metadata context request');
    const queryCount = data.readUInt32BE(parsed.rest);
    if (queryCount > metaContextQueriesMax) return this.optionError(option, P.REP_ERR_TOO_BIG, 'too many queries');
    const queries: string[] = [];
    let cursor = parsed.rest + 4;
    for (let i = 0; i < queryCount; i++) {
      if (cursor + 4 > data.length) return this.optionError(option, P.REP_ERR_INVALID, 'query runs past the option');
      const queryBytes = data.readUInt32BE(cursor);
      cursor += 4;
      if (queryBytes > data.length - cursor) return this.optionError(option, P.REP_ERR_INVALID, 'query runs past the option');
      queries.push(data.toString('utf8', cursor, cursor + queryBytes));
      cursor += queryBytes;
    }
    if (cursor !== data.length) return this.optionError(option, P.REP_ERR_INVALID, 'trailing bytes after the queries');
    const config = this.server.findExport(parsed.name);
    if (!config) return this.optionError(option, P.REP_ERR_UNKNOWN, `no export named '${parsed.name.slice(0, 256)}'`);
    const isSet = option === P.OPT_SET_META_CONTEXT;
    const matches =
      queries.some((query) => query === P.META_CONTEXT_BASE_ALLOCATION || (!isSet && query === 'base:')) ||
      (!isSet && queries.length === 0);
    if (isSet) {
      this.metaContextExport = config.name;
      this.metaContextSelected = matches;
    }
    if (matches) {
      const name = Buffer.from(P.META_CONTEXT_BASE_ALLOCATION);
      const payload = Buffer.alloc(4 + name.length);
      payload.writeUInt32BE(isSet ? P.META_CONTEXT_ID_BASE_ALLOCATION : 0, 0);
      name.copy(payload, 4);
      this.send(P.optionReply(option, P.REP_META_CONTEXT, payload));
    }
    this.send(P.optionReply(option, P.REP_ACK));
    return false;
  }

  private transmissionFlagsFor(config: ExportConfig): number {
    let flags =
      P.TFLAG_HAS_FLAGS | P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | P.TFLAG_CAN_MULTI_CONN | P.TFLAG_SEND_CACHE;
    if (config.store.readOnly) flags |= P.TFLAG_READ_ONLY;
    else flags |= P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES | P.TFLAG_SEND_FAST_ZERO;
    if (this.structuredReplies) flags |= P.TFLAG_SEND_DF;
    return flags;
  }

  /** Takes a place among the export's connections for this connection (false: the export is at its limit). */
  private claimPlace(config: ExportConfig): boolean {
    const release = this.server.claimExport(config);
    if (!release) return false;
    this.exportPlaceRelease = release;
    // The socket may have closed while the option was read: give the place back at once.
    if (this.phase === 'closing') {
      release();
      this.exportPlaceRelease = undefined;
    }
    return true;
  }

  private selectExport(config: ExportConfig, blockStatus: boolean): void {
    this.exportConfig = config;
    this.store = config.store;
    this.blockStatusActive = blockStatus;
    this.transmissionFlags = this.transmissionFlagsFor(config);
  }

  private enterTransmission(): void {
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.phase = 'transmission';
    this.server.logger.debug('transmission started', { connection: this.id, export: this.exportConfig!.name, tls: this.tlsActive });
    this.resumeReading();
    if (this.queue.length > 0) this.pump();
  }

  // --------------------------------------------------------- transmission

  private maybeResume(): void {
    if (this.phase !== 'transmission' || !this.readPaused) return;
    if (this.overBudget()) return;
    this.resumeReading();
    this.pump();
  }

  private overBudget(): boolean {
    return (
      this.inFlightCount >= requestsInFlightMax ||
      this.inFlightBytes + this.socket.writableLength >= connectionBufferedBytesMax
    );
  }

  private pump(): void {
    const queue = this.queue;
    // Replies produced while handling this batch of input leave in one write
    // (a writev) when the event loop turns, not one system call each.
    if (!this.corked && this.phase === 'transmission' && queue.length >= P.REQUEST_HEADER_BYTES) {
      this.corked = true;
      this.socket.cork();
      setImmediate(this.uncorkBound);
    }
    while (this.phase === 'transmission') {
      if (this.discardBytesLeft > 0) {
        this.discardBytesLeft -= queue.drop(this.discardBytesLeft);
        if (this.discardBytesLeft > 0) return;
        const request = this.discardReply!;
        this.discardReply = undefined;
        this.replyError(request, P.NBD_EINVAL, `payload of ${request.lengthBytes} bytes is over the maximum of ${payloadBytesMax}`);
        continue;
      }
      if (this.disconnectRequested) {
        // Nothing may follow NBD_CMD_DISC: drop it rather than buffer it without bound.
        queue.clear();
        return;
      }
      if (this.overBudget()) {
        this.pauseReading();
        return;
      }
      if (queue.length < P.REQUEST_HEADER_BYTES) return;
      const header = queue.peek(P.REQUEST_HEADER_BYTES);
      if (header.readUInt32BE(0) !== P.REQUEST_MAGIC) {
        this.server.logger.info('bad request magic; closing', { connection: this.id });
        this.destroy();
        return;
      }
      const flags = header.readUInt16BE(4);
      const type = header.readUInt16BE(6);
      const offsetHigh = header.readUInt32BE(16);
      const offset = offsetHigh >= 0x200000 ? offsetUnaddressable : offsetHigh * 0x100000000 + header.readUInt32BE(20);
      const lengthBytes = header.readUInt32BE(24);
      if (type === P.CMD_WRITE) {
        if (lengthBytes > payloadBytesMax) {
          const cookie = Buffer.from(header.subarray(8, 16));
          queue.drop(P.REQUEST_HEADER_BYTES);
          this.discardBytesLeft = lengthBytes;
          this.discardReply = { flags, type, cookie, offset, lengthBytes };
          continue;
        }
        if (queue.length < P.REQUEST_HEADER_BYTES + lengthBytes) return;
      }
      const cookie = Buffer.from(header.subarray(8, 16));
      queue.drop(P.REQUEST_HEADER_BYTES);
      const request: Request = { flags, type, cookie, offset, lengthBytes };
      // Large payloads stay in the chunks the socket delivered and are written vectored.
      if (type === P.CMD_WRITE) request.data = lengthBytes <= syncWriteBytesMax ? queue.take(lengthBytes) : queue.takeChunks(lengthBytes);
      this.dispatch(request);
    }
  }

  private dispatch(request: Request): void {
    if (request.type === P.CMD_DISC) {
      this.disconnectRequested = true;
      this.server.logger.debug('client disconnected', { connection: this.id });
      if (this.inFlightCount === 0) this.socket.end();
      return;
    }
    const error = this.validate(request);
    if (error !== 0) {
      this.replyError(request, error, validationMessage(request, error));
      return;
    }
    if (this.server.shuttingDown) {
      this.replyError(request, P.NBD_ESHUTDOWN, 'server is shutting down');
      return;
    }
    const reservedBytes = request.type === P.CMD_READ ? request.lengthBytes : request.type === P.CMD_WRITE ? request.lengthBytes : 0;
    this.inFlightCount++;
    this.inFlightBytes += reservedBytes;
    this.execute(request).then(
      () => this.finish(reservedBytes),
      (failure: unknown) => {
        const code = failure instanceof FastZeroUnsupportedError ? P.NBD_ENOTSUP : P.nbdErrorFromSystem(failure);
        if (code === P.NBD_EIO) {
          this.server.logger.error('request failed', { connection: this.id, command: P.COMMAND_NAMES[request.type], offset: request.offset, lengthBytes: request.lengthBytes, error: String(failure) });
        }
        // Reply before finish(): the last request finishing after NBD_CMD_DISC ends the socket.
        this.replyError(request, code, String((failure as Error)?.message ?? failure));
        this.finish(reservedBytes);
      },
    );
  }

  private finish(reservedBytes: number): void {
    this.inFlightCount--;
    this.inFlightBytes -= reservedBytes;
    if (this.inFlightCount === 0) {
      this.notifyDrained();
      if (this.disconnectRequested && this.isOpen) this.socket.end();
    }
    if (this.readPaused) this.maybeResume();
  }

  private notifyDrained(): void {
    const resolvers = this.drainedResolvers;
    this.drainedResolvers = [];
    for (const resolve of resolvers) resolve();
  }

  /** Returns 0 when the request may run, else the NBD error to answer. */
  private validate(request: Request): number {
    const { type, flags, offset, lengthBytes } = request;
    const allowed = P.CMD_FLAGS_ALLOWED[type];
    if (allowed === undefined) return P.NBD_EINVAL;
    if ((flags & ~allowed) !== 0) return P.NBD_EINVAL;
    const store = this.store!;
    const size = store.sizeBytes;
    const mutating = type === P.CMD_WRITE || type === P.CMD_TRIM || type === P.CMD_WRITE_ZEROES;
    if (mutating && store.readOnly) return P.NBD_EPERM;
    if (type === P.CMD_FLUSH) return offset === 0 && lengthBytes === 0 ? 0 : P.NBD_EINVAL;
    if ((flags & P.CMD_FLAG_DF) !== 0 && !this.structuredReplies) return P.NBD_EINVAL;
    if (type === P.CMD_BLOCK_STATUS && !this.blockStatusActive) return P.NBD_EINVAL;
    if (lengthBytes === 0) return P.NBD_EINVAL;
    if ((type === P.CMD_READ) && lengthBytes > payloadBytesMax) return P.NBD_EINVAL;
    // The spec asks ENOSPC for writes and write-zeroes past the end, EINVAL for reads and trims.
    if (offset > size || lengthBytes > size - offset) return type === P.CMD_WRITE || type === P.CMD_WRITE_ZEROES ? P.NBD_ENOSPC : P.NBD_EINVAL;
    return 0;
  }

  private async execute(request: Request): Promise<void> {
    const store = this.store!;
    const { type, flags, offset, lengthBytes } = request;
    switch (type) {
      case P.CMD_READ:
        return this.read_(request);
      case P.CMD_WRITE:
        await store.write(request.data!, offset);
        if (flags & P.CMD_FLAG_FUA) await store.flush();
        return this.replyOk(request);
      case P.CMD_FLUSH:
        await store.flush();
        return this.replyOk(request);
      case P.CMD_TRIM:
        await store.trim(offset, lengthBytes);
        if (flags & P.CMD_FLAG_FUA) await store.flush();
        return this.replyOk(request);
      case P.CMD_WRITE_ZEROES:
        await store.writeZeroes(offset, lengthBytes, {
          mayDeallocate: (flags & P.CMD_FLAG_NO_HOLE) === 0,
          fastOnly: (flags & P.CMD_FLAG_FAST_ZERO) !== 0,
        });
        if (flags & P.CMD_FLAG_FUA) await store.flush();
        return this.replyOk(request);
      case P.CMD_CACHE:
        await store.cache(offset, lengthBytes);
        return this.replyOk(request);
      case P.CMD_BLOCK_STATUS:
        return this.blockStatus(request);
      default:
        throw new Error(`unreachable command ${type}`);
    }
  }

  private async read_(request: Request): Promise<void> {
    const store = this.store!;
    const { offset, lengthBytes, cookie } = request;
    const pooled = this.server.bufferPool.acquire(lengthBytes);
    const buffer = pooled.buffer;
    const parts: Buffer[] = [];
    try {
      if (!this.structuredReplies) {
        await store.read(buffer, offset);
        parts.push(P.simpleReplyHeader(0, cookie), buffer);
      } else {
        const extents = (request.flags & P.CMD_FLAG_DF) !== 0 ? undefined : store.extents(offset, lengthBytes, readExtentsMax);
        if (!extents || (extents.length === 1 && !extents[0]!.hole)) {
          await store.read(buffer, offset);
          parts.push(dataChunkHeader(cookie, offset, lengthBytes, true), buffer);
        } else {
          // Read the data extents, then answer holes as holes and data as data.
          const reads: Promise<void>[] = [];
          let cursor = 0;
          for (const extent of extents) {
            if (!extent.hole) reads.push(store.read(buffer.subarray(cursor, cursor + extent.lengthBytes), offset + cursor));
            cursor += extent.lengthBytes;
          }
          if (cursor < lengthBytes) reads.push(store.read(buffer.subarray(cursor), offset + cursor));
          await Promise.all(reads);
          cursor = 0;
          for (const extent of extents) {
            const last = cursor + extent.lengthBytes === lengthBytes;
            if (extent.hole) {
              const header = P.structuredReplyHeader(last ? P.REPLY_FLAG_DONE : 0, P.REPLY_TYPE_OFFSET_HOLE, cookie, 12, 12);
              header.writeBigUInt64BE(BigInt(offset + cursor), 20);
              header.writeUInt32BE(extent.lengthBytes, 28);
              parts.push(header);
            } else {
              parts.push(dataChunkHeader(cookie, offset + cursor, extent.lengthBytes, last), buffer.subarray(cursor, cursor + extent.lengthBytes));
            }
            cursor += extent.lengthBytes;
          }
          if (cursor < lengthBytes) parts.push(dataChunkHeader(cookie, offset + cursor, lengthBytes - cursor, true), buffer.subarray(cursor));
        }
      }
    } catch (error) {
      pooled.release();
      throw error;
    }
    if (!this.isOpen) {
      pooled.release();
      return;
    }
    // One reply's parts go out together; the buffer returns to the pool once the socket has them.
    const socket = this.socket;
    socket.cork();
    for (let i = 0; i < parts.length - 1; i++) socket.write(parts[i]!);
    socket.write(parts[parts.length - 1]!, () => pooled.release());
    socket.uncork();
  }

  private async blockStatus(request: Request): Promise<void> {
    const { offset, lengthBytes, cookie, flags } = request;
    const extentCountMax = (flags & P.CMD_FLAG_REQ_ONE) !== 0 ? 1 : blockStatusExtentsMax;
    const extents = this.store!.extents(offset, lengthBytes, extentCountMax);
    const payloadBytes = 4 + 8 * extents.length;
    const out = P.structuredReplyHeader(P.REPLY_FLAG_DONE, P.REPLY_TYPE_BLOCK_STATUS, cookie, payloadBytes, payloadBytes);
    out.writeUInt32BE(P.META_CONTEXT_ID_BASE_ALLOCATION, 20);
    let cursor = 24;
    for (const extent of extents) {
      out.writeUInt32BE(extent.lengthBytes, cursor);
      out.writeUInt32BE((extent.hole ? P.STATE_HOLE : 0) | (extent.zero ? P.STATE_ZERO : 0), cursor + 4);
      cursor += 8;
    }
    this.send(out);
  }

  private replyOk(request: Request): void {
    this.send(P.simpleReplyHeader(0, request.cookie));
  }

  private replyError(request: Request, error: number, message: string): void {
    if (!this.isOpen) return;
    if (this.structuredReplies && (request.type === P.CMD_READ || request.type === P.CMD_BLOCK_STATUS)) {
      this.send(P.structuredError(request.cookie, error, message));
    } else {
      this.send(P.simpleReplyHeader(error, request.cookie));
    }
  }
}

function dataChunkHeader(cookie: Buffer, offset: number, dataBytes: number, last: boolean): Buffer {
  const header = P.structuredReplyHeader(last ? P.REPLY_FLAG_DONE : 0, P.REPLY_TYPE_OFFSET_DATA, cookie, 8 + dataBytes, 8);
  header.writeBigUInt64BE(BigInt(offset), 20);
  return header;
}

function validationMessage(request: Request, error: number): string {
  const name = P.COMMAND_NAMES[request.type] ?? `command ${request.type}`;
  switch (error) {
    case P.NBD_EPERM:
      return `${name} refused: the export is read-only`;
    case P.NBD_ENOSPC:
    case P.NBD_EINVAL:
      return `${name} refused: offset ${request.offset} length ${request.lengthBytes} flags ${request.flags} are not valid for this export`;
    default:
      return `${name} refused`;
  }
}
