/**
 * A small NBD client: fixed newstyle, NBD_OPT_GO, optional structured replies
 * and base:allocation, many requests in flight. Used by the demo's built-in
 * workload and by tests that need exact control over requests; users' own
 * clients (qemu, libnbd) are what the interop tests drive.
 */
import * as net from 'node:net';
import * as P from './protocol.js';
import { ByteQueue } from './byte-queue.js';

export interface NbdClientOptions {
  exportName: string;
  structuredReplies?: boolean;
  blockStatus?: boolean;
}

export type NbdConnectAddress = { host: string; port: number } | { socketPath: string };

export class NbdRequestError extends Error {
  readonly errno: number;
  constructor(command: string, errno: number, message?: string) {
    super(`NBD ${command} failed with error ${errno}${message ? `: ${message}` : ''}`);
    this.errno = errno;
  }
}

interface Pending {
  command: number;
  offset: number;
  lengthBytes: number;
  resolve: (value: Buffer | BlockStatusExtent[] | undefined) => void;
  reject: (error: Error) => void;
  data?: Buffer;
  error?: NbdRequestError;
  extents?: BlockStatusExtent[];
}

export interface BlockStatusExtent {
  lengthBytes: number;
  flags: number;
}

export class NbdClient {
  sizeBytes = 0;
  transmissionFlags = 0;
  structuredReplies = false;
  private readonly socket: net.Socket;
  private readonly queue = new ByteQueue();
  private waiter: { bytes: number; resolve: () => void; reject: (error: Error) => void } | undefined;
  private readonly pending = new Map<bigint, Pending>();
  private cookieLast = 0n;
  private closedError: Error | undefined;
  private transmission = false;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => {
      this.queue.push(chunk);
      if (this.transmission) this.parseReplies();
      else if (this.waiter && this.queue.length >= this.waiter.bytes) {
        const waiter = this.waiter;
        this.waiter = undefined;
        waiter.resolve();
      }
    });
    const fail = (error: Error): void => {
      this.closedError ??= error;
      this.waiter?.reject(error);
      this.waiter = undefined;
      for (const pending of this.pending.values()) pending.reject(error);
      this.pending.clear();
    };
    socket.on('error', fail);
    socket.on('close', () => fail(new Error('NBD connection closed')));
  }

  static async connect(address: NbdConnectAddress, options: NbdClientOptions): Promise<NbdClient> {
    const socket = 'socketPath' in address ? net.connect(address.socketPath) : net.connect(address.port, address.host);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    const client = new NbdClient(socket);
    try {
      await client.handshake(options);
    } catch (error) {
      socket.destroy();
      throw error;
    }
    return client;
  }

  private async read(bytes: number): Promise<Buffer> {
    if (this.queue.length < bytes) {
      if (this.closedError) throw this.closedError;
      await new Promise<void>((resolve, reject) => (this.waiter = { bytes, resolve, reject }));
    }
    return Buffer.from(this.queue.take(bytes));
  }

  private sendOption(option: number, payload: Buffer): void {
    const header = Buffer.alloc(16);
    header.writeBigUInt64BE(P.IHAVEOPT, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(payload.length, 12);
    this.socket.write(Buffer.concat([header, payload]));
  }

  private async readOptionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const header = await this.read(20);
    if (header.readBigUInt64BE(0) !== P.OPTION_REPLY_MAGIC) throw new Error('bad option reply magic');
    const length = header.readUInt32BE(16);
    return { option: header.readUInt32BE(8), type: header.readUInt32BE(12), data: await this.read(length) };
  }

  private async handshake(options: NbdClientOptions): Promise<void> {
    const greeting = await this.read(18);
    if (greeting.readBigUInt64BE(0) !== P.NBDMAGIC || greeting.readBigUInt64BE(8) !== P.IHAVEOPT) {
      throw new Error('server is not a newstyle NBD server');
    }
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES);
    this.socket.write(flags);
    if (options.structuredReplies || options.blockStatus) {
      this.sendOption(P.OPT_STRUCTURED_REPLY, Buffer.alloc(0));
      const reply = await this.readOptionReply();
      this.structuredReplies = reply.type === P.REP_ACK;
    }
    const name = Buffer.from(options.exportName, 'utf8');
    if (options.blockStatus && this.structuredReplies) {
      const query = Buffer.from(P.META_CONTEXT_BASE_ALLOCATION);
      const payload = Buffer.alloc(4 + name.length + 4 + 4 + query.length);
      payload.writeUInt32BE(name.length, 0);
      name.copy(payload, 4);
      payload.writeUInt32BE(1, 4 + name.length);
      payload.writeUInt32BE(query.length, 8 + name.length);
      query.copy(payload, 12 + name.length);
      this.sendOption(P.OPT_SET_META_CONTEXT, payload);
      for (;;) {
        const reply = await this.readOptionReply();
        if (reply.type === P.REP_ACK) break;
        if (reply.type !== P.REP_META_CONTEXT) throw new Error(`meta context refused: reply ${reply.type}`);
      }
    }
    const go = Buffer.alloc(4 + name.length + 2);
    go.writeUInt32BE(name.length, 0);
    name.copy(go, 4);
    go.writeUInt16BE(0, 4 + name.length);
    this.sendOption(P.OPT_GO, go);
    for (;;) {
      const reply = await this.readOptionReply();
      if (reply.type === P.REP_ACK) break;
      if (reply.type === P.REP_INFO) {
        if (reply.data.readUInt16BE(0) === P.INFO_EXPORT) {
          this.sizeBytes = Number(reply.data.readBigUInt64BE(2));
          this.transmissionFlags = reply.data.readUInt16BE(10);
        }
        continue;
      }
      throw new Error(`export '${options.exportName}' refused: reply ${reply.type >>> 0} ${reply.data.toString('utf8')}`);
    }
    this.transmission = true;
    if (this.queue.length > 0) this.parseReplies();
  }

  private parseReplies(): void {
    const queue = this.queue;
    for (;;) {
      if (queue.length < 4) return;
      const magic = queue.peek(4).readUInt32BE(0);
      if (magic === P.SIMPLE_REPLY_MAGIC) {
        if (queue.length < 16) return;
        const header = queue.peek(16);
        const error = header.readUInt32BE(4);
        const cookie = header.readBigUInt64BE(8);
        const pending = this.pending.get(cookie);
        if (!pending) return this.protocolError(`reply for unknown cookie ${cookie}`);
        const dataBytes = pending.command === P.CMD_READ && error === 0 ? pending.lengthBytes : 0;
        if (queue.length < 16 + dataBytes) return;
        queue.drop(16);
        const data = dataBytes > 0 ? Buffer.from(queue.take(dataBytes)) : undefined;
        this.pending.delete(cookie);
        if (error !== 0) pending.reject(new NbdRequestError(P.COMMAND_NAMES[pending.command] ?? '?', error));
        else pending.resolve(data);
      } else if (magic === P.STRUCTURED_REPLY_MAGIC) {
        if (queue.length < 20) return;
        const header = queue.peek(20);
        const flags = header.readUInt16BE(4);
        const type = header.readUInt16BE(6);
        const cookie = header.readBigUInt64BE(8);
        const length = header.readUInt32BE(16);
        if (queue.length < 20 + length) return;
        queue.drop(20);
        const payload = queue.take(length);
        const pending = this.pending.get(cookie);
        if (!pending) return this.protocolError(`chunk for unknown cookie ${cookie}`);
        this.applyChunk(pending, type, payload);
        if (flags & P.REPLY_FLAG_DONE) {
          this.pending.delete(cookie);
          if (pending.error) pending.reject(pending.error);
          else if (pending.command === P.CMD_READ) pending.resolve(pending.data);
          else if (pending.command === P.CMD_BLOCK_STATUS) pending.resolve(pending.extents ?? []);
          else pending.resolve(undefined);
        }
      } else {
        return this.protocolError(`bad reply magic ${magic.toString(16)}`);
      }
    }
  }

  private applyChunk(pending: Pending, type: number, payload: Buffer): void {
    switch (type) {
      case P.REPLY_TYPE_NONE:
        return;
      case P.REPLY_TYPE_OFFSET_DATA: {
        const offset = Number(payload.readBigUInt64BE(0));
        payload.copy(pending.data!, offset - pending.offset, 8);
        return;
      }
      case P.REPLY_TYPE_OFFSET_HOLE: {
        const offset = Number(payload.readBigUInt64BE(0));
        const length = payload.readUInt32BE(8);
        pending.data!.fill(0, offset - pending.offset, offset - pending.offset + length);
        return;
      }
      case P.REPLY_TYPE_BLOCK_STATUS: {
        const extents: BlockStatusExtent[] = [];
        for (let cursor = 4; cursor + 8 <= payload.length; cursor += 8) {
          extents.push({ lengthBytes: payload.readUInt32BE(cursor), flags: payload.readUInt32BE(cursor + 4) });
        }
        pending.extents = extents;
        return;
      }
      case P.REPLY_TYPE_ERROR:
      case P.REPLY_TYPE_ERROR_OFFSET: {
        const errno = payload.readUInt32BE(0);
        const messageBytes = payload.readUInt16BE(4);
        pending.error = new NbdRequestError(P.COMMAND_NAMES[pending.command] ?? '?', errno, payload.toString('utf8', 6, 6 + messageBytes));
        return;
      }
      default:
        this.protocolError(`unknown chunk type ${type}`);
    }
  }

  private protocolError(message: string): void {
    this.socket.destroy(new Error(`NBD protocol error: ${message}`));
  }

  private request(command: number, flags: number, offset: number, lengthBytes: number, payload?: Buffer): Promise<Buffer | BlockStatusExtent[] | undefined> {
    if (this.closedError) return Promise.reject(this.closedError);
    const cookie = ++this.cookieLast;
    const header = Buffer.allocUnsafe(28);
    header.writeUInt32BE(P.REQUEST_MAGIC, 0);
    header.writeUInt16BE(flags, 4);
    header.writeUInt16BE(command, 6);
    header.writeBigUInt64BE(cookie, 8);
    header.writeBigUInt64BE(BigInt(offset), 16);
    header.writeUInt32BE(lengthBytes, 24);
    return new Promise((resolve, reject) => {
      const pending: Pending = { command, offset, lengthBytes, resolve, reject };
      if (command === P.CMD_READ && this.structuredReplies) pending.data = Buffer.alloc(lengthBytes);
      this.pending.set(cookie, pending);
      if (payload) {
        this.socket.cork();
        this.socket.write(header);
        this.socket.write(payload);
        this.socket.uncork();
      } else this.socket.write(header);
    });
  }

  async pread(offset: number, lengthBytes: number, flags = 0): Promise<Buffer> {
    return (await this.request(P.CMD_READ, flags, offset, lengthBytes)) as Buffer;
  }

  async pwrite(data: Buffer, offset: number, flags = 0): Promise<void> {
    await this.request(P.CMD_WRITE, flags, offset, data.length, data);
  }

  async flush(): Promise<void> {
    await this.request(P.CMD_FLUSH, 0, 0, 0);
  }

  async trim(offset: number, lengthBytes: number, flags = 0): Promise<void> {
    await this.request(P.CMD_TRIM, flags, offset, lengthBytes);
  }

  async zero(offset: number, lengthBytes: number, flags = 0): Promise<void> {
    await this.request(P.CMD_WRITE_ZEROES, flags, offset, lengthBytes);
  }

  async blockStatus(offset: number, lengthBytes: number, flags = 0): Promise<BlockStatusExtent[]> {
    return (await this.request(P.CMD_BLOCK_STATUS, flags, offset, lengthBytes)) as BlockStatusExtent[];
  }

  /** Sends NBD_CMD_DISC and waits for the server to close. */
  async disconnect(): Promise<void> {
    if (this.closedError) return;
    const header = Buffer.alloc(28);
    header.writeUInt32BE(P.REQUEST_MAGIC, 0);
    header.writeUInt16BE(P.CMD_DISC, 6);
    const closed = new Promise<void>((resolve) => this.socket.once('close', () => resolve()));
    this.socket.write(header);
    this.socket.end();
    await closed;
  }

  destroy(): void {
    this.socket.destroy();
  }
}
