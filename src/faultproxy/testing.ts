/**
 * Test fixtures for the fault proxy's tests: a real TCP echo or sink server
 * that records what each connection received and how it ended, a client that
 * records the same, and a polling wait. Not used by the proxy itself.
 */
import * as net from 'node:net';
import { setTimeout as delay } from 'node:timers/promises';

/** What one side of a test connection saw. */
export class Recorder {
  private chunks: Buffer[] = [];
  length = 0;
  endedAt: number | undefined;
  error: NodeJS.ErrnoException | undefined;
  isClosed = false;
  readonly closed: Promise<void>;

  constructor(readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.chunks.push(chunk);
      this.length += chunk.length;
    });
    socket.on('end', () => (this.endedAt = performance.now()));
    socket.on('error', (error) => (this.error = error));
    this.closed = new Promise((resolve) =>
      socket.once('close', () => {
        this.isClosed = true;
        resolve();
      }),
    );
  }

  received(): Buffer {
    if (this.chunks.length > 1) this.chunks = [Buffer.concat(this.chunks)];
    return this.chunks[0] ?? Buffer.alloc(0);
  }
}

export interface TestServer {
  port: number;
  /** One recorder per accepted connection, in accept order. */
  connections: Recorder[];
  /** Bytes received over all connections. */
  receivedBytes(): number;
  close(): Promise<void>;
}

/**
 * Starts a loopback server. 'echo' writes back what it reads; 'sink' keeps it.
 * Both end their side once the peer has ended its own (half-close is kept).
 */
export async function startServer(mode: 'echo' | 'sink'): Promise<TestServer> {
  const connections: Recorder[] = [];
  const server = net.createServer({ allowHalfOpen: true, noDelay: true }, (socket) => {
    const recorder = new Recorder(socket);
    connections.push(recorder);
    if (mode === 'echo') socket.on('data', (chunk: Buffer) => socket.write(chunk));
    socket.on('end', () => socket.end());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    connections,
    receivedBytes: () => connections.reduce((sum, connection) => sum + connection.length, 0),
    async close() {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const connection of connections) connection.socket.destroy();
      await closed;
    },
  };
}

/**
 * Starts connecting a recording client to a loopback port without waiting: a
 * peer that resets at once may fail the connect itself.
 */
export function openClient(port: number): Recorder {
  return new Recorder(net.connect({ host: '127.0.0.1', port, allowHalfOpen: true, noDelay: true }));
}

/** Connects a recording client to a loopback port. */
export async function connectClient(port: number): Promise<Recorder> {
  const recorder = openClient(port);
  const socket = recorder.socket;
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', () => resolve());
    socket.once('error', reject);
  });
  return recorder;
}

/** Polls until `condition` holds; fails naming `what` after `timeoutMs`. */
export async function until(condition: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!condition()) {
    if (performance.now() > deadline) throw new Error(`Timed out after ${timeoutMs} ms waiting for ${what}`);
    await delay(2);
  }
}
