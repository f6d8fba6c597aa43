import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as net from 'node:net';
import { NbdServer, requestsInFlightMax } from './server.js';
import { NbdClient, NbdRequestError } from './client.js';
import * as P from './protocol.js';
import { MemoryBackingStore, type BackingStore } from '../tap/backing-store.js';

/** A memory store whose writes wait until released, to hold requests in flight. */
function gatedStore(sizeBytes: number): { store: BackingStore; release(): void; started(): number } {
  const inner = new MemoryBackingStore(sizeBytes);
  const store: BackingStore = Object.create(inner) as BackingStore;
  let gate!: () => void;
  const opened = new Promise<void>((resolve) => (gate = resolve));
  let startedCount = 0;
  store.write = async (data, offset) => {
    startedCount++;
    await opened;
    return inner.write(data, offset);
  };
  return { store, release: gate, started: () => startedCount };
}

async function listen(server: NbdServer): Promise<number> {
  return ((await server.listen({ host: '127.0.0.1', port: 0 })) as net.AddressInfo).port;
}

test('server: shutdown finishes requests in flight, refuses new ones with ESHUTDOWN, then closes', async () => {
  const gated = gatedStore(1 << 20);
  const server = new NbdServer({ exports: [{ name: 'disk0', store: gated.store }] });
  const port = await listen(server);
  const client = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'disk0' });
  const inFlight = client.pwrite(Buffer.alloc(4096, 1), 0);
  while (gated.started() === 0) await new Promise((resolve) => setTimeout(resolve, 1));
  const closing = server.close();
  await new Promise((resolve) => setTimeout(resolve, 20));
  const refused = client.pwrite(Buffer.alloc(4096, 2), 8192);
  await assert.rejects(refused, (error: NbdRequestError) => error.errno === P.NBD_ESHUTDOWN);
  gated.release();
  await inFlight;
  await closing;
  assert.equal(server.connectionCount, 0);
  const bytes = Buffer.alloc(4096);
  await gated.store.read(bytes, 0);
  assert.equal(bytes[0], 1, 'the request in flight completed');
  client.destroy();
});

test('server: a connection stops reading at the in-flight limit and resumes when requests finish', async () => {
  const gated = gatedStore(1 << 20);
  const server = new NbdServer({ exports: [{ name: 'disk0', store: gated.store }] });
  const port = await listen(server);
  const client = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'disk0' });
  const total = requestsInFlightMax + 50;
  const writes = Array.from({ length: total }, (_, i) => client.pwrite(Buffer.alloc(512, i & 0xff), i * 512));
  await new Promise((resolve) => setTimeout(resolve, 100));
  assert.equal(gated.started(), requestsInFlightMax, 'no more than the limit were started');
  gated.release();
  await Promise.all(writes);
  assert.equal(gated.started(), total);
  await client.disconnect();
  await server.close();
});

test('server: multi-conn: a flush on one connection follows writes completed on another (one shared store)', async () => {
  const store = new MemoryBackingStore(1 << 20);
  let flushes = 0;
  const counting: BackingStore = Object.create(store) as BackingStore;
  counting.flush = async () => {
    flushes++;
  };
  const server = new NbdServer({ exports: [{ name: 'disk0', store: counting }] });
  const port = await listen(server);
  const writer = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'disk0' });
  const flusher = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'disk0' });
  assert.ok(writer.transmissionFlags & P.TFLAG_CAN_MULTI_CONN);
  await writer.pwrite(Buffer.alloc(4096, 9), 0);
  await flusher.flush();
  assert.equal(flushes, 1);
  const back = await flusher.pread(0, 4096);
  assert.equal(back[4095], 9, 'the other connection sees the completed write');
  await writer.disconnect();
  await flusher.disconnect();
  await server.close();
});

/** Reads exactly `bytes` from a raw socket. */
function readExactly(socket: net.Socket, bytes: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    let got = Buffer.alloc(0);
    const onData = (chunk: Buffer): void => {
      got = Buffer.concat([got, chunk]);
      if (got.length >= bytes) {
        socket.off('data', onData);
        socket.pause();
        resolve(got.subarray(0, bytes));
      }
    };
    socket.on('data', onData);
    socket.resume();
    socket.once('error', reject);
  });
}

test('server: a client that vanishes mid-payload leaves the server serving others', async () => {
  const store = new MemoryBackingStore(1 << 20);
  const server = new NbdServer({ exports: [{ name: 'disk0', store }] });
  const port = await listen(server);
  const client = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'disk0' });
  const raw = net.connect(port, '127.0.0.1');
  await new Promise((resolve) => raw.once('connect', resolve));
  await readExactly(raw, 18);
  const name = Buffer.from('disk0');
  const option = Buffer.alloc(4 + 16);
  option.writeUInt32BE(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES, 0);
  option.writeBigUInt64BE(P.IHAVEOPT, 4);
  option.writeUInt32BE(P.OPT_EXPORT_NAME, 12);
  option.writeUInt32BE(name.length, 16);
  raw.write(Buffer.concat([option, name]));
  await readExactly(raw, 10);
  const header = Buffer.alloc(28);
  header.writeUInt32BE(P.REQUEST_MAGIC, 0);
  header.writeUInt16BE(P.CMD_WRITE, 6);
  header.writeUInt32BE(65536, 24);
  raw.write(Buffer.concat([header, Buffer.alloc(100, 7)]));
  await new Promise((resolve) => setTimeout(resolve, 20));
  raw.destroy();
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(server.connectionCount, 1, 'the vanished connection is gone');
  await client.pwrite(Buffer.alloc(100, 4), 0);
  assert.equal((await client.pread(0, 100))[99], 4, 'the half write never reached the store');
  await client.disconnect();
  await server.close();
  assert.equal(server.connectionCount, 0);
});
