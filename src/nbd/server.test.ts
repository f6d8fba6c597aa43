import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as net from 'node:net';
import { connectionsPerExportMaxDefault, NbdServer, requestsInFlightMax } from './server.js';
import { NbdClient, NbdRequestError } from './client.js';
import * as P from './protocol.js';
import { MemoryBackingStore, type BackingStore } from '../tap/backing-store.js';
import { lifelineBin, makeTempDir, run, startLifeline } from '../../test/helpers.js';
import { waitFor } from '../appliance/testing.js';

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

/** Sends the old NBD_OPT_EXPORT_NAME for `name` on a raw socket; resolves with the bytes the server sent after its greeting until it closed (or 10 s passed). */
async function exportNameAnswer(port: number, name: string): Promise<{ bytes: number; closed: boolean }> {
  const socket = net.connect(port, '127.0.0.1');
  await new Promise((resolve) => socket.once('connect', resolve));
  await readExactly(socket, 18);
  const nameBytes = Buffer.from(name);
  const option = Buffer.alloc(4 + 16);
  option.writeUInt32BE(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES, 0);
  option.writeBigUInt64BE(P.IHAVEOPT, 4);
  option.writeUInt32BE(P.OPT_EXPORT_NAME, 12);
  option.writeUInt32BE(nameBytes.length, 16);
  socket.write(Buffer.concat([option, nameBytes]));
  return new Promise((resolve) => {
    let bytes = 0;
    const timer = setTimeout(() => {
      socket.destroy();
      resolve({ bytes, closed: false });
    }, 10_000);
    socket.on('data', (chunk: Buffer) => (bytes += chunk.length));
    socket.on('error', () => undefined);
    socket.once('close', () => {
      clearTimeout(timer);
      resolve({ bytes, closed: true });
    });
    socket.resume();
  });
}

test('server: an export serves at most connectionsPerExportMax connections; nbdinfo and qemu-io past it are refused at NBD_OPT_GO with ERR_POLICY, others are served, and a closed connection frees its place', async (t) => {
  assert.throws(() => new NbdServer({ exports: [], allowNoExports: true, connectionsPerExportMax: 0 }), /Connections per export must be a whole number from 1/);
  assert.equal(new NbdServer({ exports: [], allowNoExports: true }).connectionsPerExportMax, connectionsPerExportMaxDefault);
  const server = new NbdServer({ exports: [{ name: 'disk0', store: new MemoryBackingStore(1 << 20) }, { name: 'disk1', store: new MemoryBackingStore(1 << 20) }], connectionsPerExportMax: 2 });
  const port = await listen(server);
  t.after(() => server.close());
  const uri = `nbd://127.0.0.1:${port}`;
  const held = [await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'disk0' }), await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'disk0' })];
  assert.deepEqual(server.connectionsByExport(), { disk0: 2, disk1: 0 });

  // libnbd and qemu see a refusal by server policy; qemu prints the server's words.
  const nbdinfo = await run('nbdinfo', ['--size', `${uri}/disk0`], { allowFailure: true, timeoutMs: 30_000 });
  assert.notEqual(nbdinfo.code, 0, `nbdinfo past the limit must fail: ${nbdinfo.stdout}`);
  assert.match(nbdinfo.stderr, /server policy prevents NBD_OPT_GO/, nbdinfo.stderr);
  const qemu = await run('qemu-io', ['-f', 'raw', '-c', 'read 0 4k', `${uri}/disk0`], { allowFailure: true, timeoutMs: 30_000 });
  assert.notEqual(qemu.code, 0);
  assert.match(qemu.stderr, /Denied by server for option 7 \(go\)[\s\S]*export 'disk0' already serves 2 connections, the limit per export \(connectionsPerExportMax\)/, qemu.stderr);
  // The old NBD_OPT_EXPORT_NAME has no error reply: the server closes without sending the export's size.
  assert.deepEqual(await exportNameAnswer(port, 'disk0'), { bytes: 0, closed: true });
  // Another export is served; the list, and NBD_OPT_INFO of the export at its limit, still answer
  // (nbdinfo --list asks NBD_OPT_INFO of each export: disk0's size is there only if it was answered).
  assert.equal((await run('nbdinfo', ['--size', `${uri}/disk1`], { timeoutMs: 30_000 })).stdout.trim(), String(1 << 20));
  assert.match((await run('nbdinfo', ['--list', `${uri}/`], { timeoutMs: 30_000 })).stdout, /export="disk0":\s*export-size: 1048576 [\s\S]*export="disk1":\s*export-size: 1048576 /);
  // nbdinfo has exited, but the server may see its connection close a little later.
  await waitFor('the finished client of disk1 to give its place back', 10_000, () => (server.connectionsByExport()['disk1'] === 0 ? true : undefined), 20);
  assert.deepEqual(server.connectionsByExport(), { disk0: 2, disk1: 0 }, 'refused and finished clients hold no place');

  // A held connection closes: its place is free for the next client, and the limit holds again after it.
  await held[0]!.disconnect();
  await waitFor('the closed connection to free its place', 10_000, () => (server.connectionsByExport()['disk0'] === 1 ? true : undefined), 20);
  const third = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'disk0' });
  assert.equal((await third.pread(0, 512)).length, 512);
  assert.notEqual((await run('nbdinfo', ['--size', `${uri}/disk0`], { allowFailure: true, timeoutMs: 30_000 })).code, 0);
  await third.disconnect();
  await held[1]!.disconnect();
  await waitFor('every connection to be gone', 10_000, () => (server.connectionsByExport()['disk0'] === 0 ? true : undefined), 20);
  assert.equal((await run('nbdinfo', ['--size', `${uri}/disk0`], { timeoutMs: 30_000 })).stdout.trim(), String(1 << 20));
});

test('lifeline nbd serve --connections-per-export-max: the flag sets the limit (nbdsh past it is refused by policy) and a bad value is a usage error', async (t) => {
  const dir = makeTempDir('lifeline-nbd-limit-');
  const bad = await run(lifelineBin, ['nbd', 'serve', '--export', `d=${dir}/d.img,size=1M`, '--connections-per-export-max', '0'], { allowFailure: true });
  assert.equal(bad.code, 2, bad.stderr);
  assert.match(bad.stderr, /--connections-per-export-max '0': expected a whole number from 1 to 512/);
  const served = await startLifeline(['--listen', '127.0.0.1:0', '--export', `disk0=${dir}/disk0.img,size=1M`, '--connections-per-export-max', '1']);
  t.after(() => served.stop());
  const held = await NbdClient.connect({ host: '127.0.0.1', port: served.port! }, { exportName: 'disk0' });
  t.after(() => held.destroy());
  const python = [
    'import nbd, sys',
    'h = nbd.NBD()',
    'try:',
    '    h.connect_uri(sys.argv[1])',
    '    print("connected")',
    'except nbd.Error as error:',
    '    print("refused:", error.string)',
  ].join('\n');
  const refused = await run('/usr/bin/python3', ['-c', python, `${served.tcpUri}/disk0`], { timeoutMs: 30_000 });
  assert.match(refused.stdout, /^refused: .*server policy prevents NBD_OPT_GO/m, refused.stdout);
  await held.disconnect();
  await waitFor('nbdsh to connect once the held connection closed', 10_000, async () => (/^connected/m.test((await run('/usr/bin/python3', ['-c', python, `${served.tcpUri}/disk0`], { timeoutMs: 30_000 })).stdout) ? true : undefined), 50);
  assert.match(served.stderr(), /export at its connection limit; NBD_OPT_GO refused/);
});
