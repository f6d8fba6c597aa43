import { test, type TestContext } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as tls from 'node:tls';
import { randomBytes } from 'node:crypto';
import { setTimeout as delay } from 'node:timers/promises';
import { FaultProxy, connectionsMax, holdBytesMax, noFaults, type Faults } from './proxy.js';
import { connectClient, openClient, startServer, until, type Recorder, type TestServer } from './testing.js';
import { freePort, makeTempDir, makeTlsFiles, testSeed } from '../../test/helpers.js';

const MiB = 1024 * 1024;

/** Starts an echo or sink server and a proxy in front of it; both are stopped after the test. */
async function setUp(t: TestContext, mode: 'echo' | 'sink', faults: Partial<Faults> = {}, seed?: number): Promise<{ server: TestServer; proxy: FaultProxy; port: number }> {
  const server = await startServer(mode);
  const proxy = new FaultProxy({ target: { host: '127.0.0.1', port: server.port }, faults, ...(seed !== undefined ? { seed } : {}) });
  t.after(async () => {
    await proxy.close();
    await server.close();
  });
  const { port } = await proxy.listen({ host: '127.0.0.1', port: 0 });
  return { server, proxy, port };
}

async function client(t: TestContext, port: number): Promise<Recorder> {
  const recorder = await connectClient(port);
  t.after(() => recorder.socket.destroy());
  return recorder;
}

/** Sends `text` and returns the milliseconds until the client holds `length` bytes in all. */
async function roundTripMs(recorder: Recorder, text: string): Promise<number> {
  const expected = recorder.length + text.length;
  const started = performance.now();
  recorder.socket.write(text);
  await until(() => recorder.length >= expected, `the echo of '${text}'`);
  return performance.now() - started;
}

/** A stream of consecutive 32-bit counters, so that a reordered or lost piece shows where. */
function numberedStream(countersCount: number, first = 0): Buffer {
  const bytes = Buffer.alloc(countersCount * 4);
  for (let i = 0; i < countersCount; i++) bytes.writeUInt32BE(first + i, i * 4);
  return bytes;
}

function firstMismatch(actual: Buffer, expected: Buffer): number {
  for (let i = 0; i < Math.min(actual.length, expected.length); i++) if (actual[i] !== expected[i]) return i;
  return actual.length === expected.length ? -1 : Math.min(actual.length, expected.length);
}

test('FaultProxy forwards bytes both ways unchanged and counts connections and bytes', async (t) => {
  const { proxy, port } = await setUp(t, 'echo');
  assert.equal(proxy.address().host, '127.0.0.1');
  assert.ok(port > 0, 'port 0 picked a free port');
  const recorder = await client(t, port);
  const payload = randomBytes(MiB);
  recorder.socket.write(payload);
  await until(() => recorder.length >= payload.length, 'the echo of 1 MiB');
  assert.ok(recorder.received().equals(payload), 'the echo is the payload, byte for byte');
  const stats = proxy.stats();
  assert.equal(stats.connectionsAccepted, 1);
  assert.equal(stats.connectionsOpen, 1);
  assert.deepEqual(stats.bytesForwarded, { upstream: MiB, downstream: MiB });
  assert.deepEqual(stats.bytesQueued, { upstream: 0, downstream: 0 });
  recorder.socket.end();
  await recorder.closed;
  assert.equal(recorder.error, undefined, 'a clean close passes through as FINs, not a reset');
  await until(() => proxy.stats().connectionsOpen === 0, 'the proxy to forget the closed connection');
});

test('latencyMs delays each faulted direction by at least the configured time', async (t) => {
  const latencyMs = 100;
  const { proxy, port } = await setUp(t, 'echo', { latencyMs });
  const recorder = await client(t, port);
  const both = await roundTripMs(recorder, 'ping');
  // Timers may fire a millisecond early against performance.now(); allow that much, never an upper bound.
  assert.ok(both >= 2 * latencyMs - 5, `a round trip through both delayed directions took ${both.toFixed(1)} ms, expected ≥ ${2 * latencyMs}`);
  proxy.setFaults({ direction: 'upstream' });
  const upstreamOnly = await roundTripMs(recorder, 'pong');
  assert.ok(upstreamOnly >= latencyMs - 5, `a round trip with only upstream delayed took ${upstreamOnly.toFixed(1)} ms, expected ≥ ${latencyMs}`);
  assert.ok(recorder.received().equals(Buffer.from('pingpong')));
  assert.equal(proxy.stats().faultsApplied.delayedChunks, 3, 'ping both ways, pong upstream only');
});

test('jitter never reorders bytes: a numbered stream arrives intact and in order', async (t) => {
  const { proxy, port } = await setUp(t, 'echo', { latencyMs: 10, jitterMs: 10 });
  const recorder = await client(t, port);
  const burstsCount = 150;
  const countersPerBurst = 256;
  const sent = numberedStream(burstsCount * countersPerBurst);
  const burstBytes = countersPerBurst * 4;
  for (let burst = 0; burst < burstsCount; burst++) {
    recorder.socket.write(sent.subarray(burst * burstBytes, (burst + 1) * burstBytes));
    // Separate writes into separate chunks so that each draws its own jitter.
    if (burst % 3 === 0) await delay(1);
  }
  await until(() => recorder.length >= sent.length, 'the numbered stream to come back');
  const mismatch = firstMismatch(recorder.received(), sent);
  assert.equal(mismatch, -1, `the stream differs at byte ${mismatch} (counter ${Math.floor(mismatch / 4)})`);
  const delayed = proxy.stats().faultsApplied.delayedChunks;
  assert.ok(delayed >= burstsCount / 3, `many chunks drew a jitter (${delayed})`);
});

test('bytesPerSecondMax caps a direction across all its connections', async (t) => {
  const rate = MiB;
  const { server, proxy, port } = await setUp(t, 'sink', { bytesPerSecondMax: rate, direction: 'upstream' });
  const clients = [await client(t, port), await client(t, port)];
  const payloads = clients.map(() => randomBytes(MiB));
  const started = performance.now();
  clients.forEach((recorder, i) => recorder.socket.end(payloads[i]));
  await until(() => server.receivedBytes() >= 2 * MiB, '2 MiB to reach the sink', 20_000);
  const elapsedMs = performance.now() - started;
  const measured = (2 * MiB) / (elapsedMs / 1000);
  // 2 MiB at 1 MiB/s with a 50 ms burst takes at least 1.95 s; the bounds below leave room for a noisy machine.
  assert.ok(elapsedMs >= 1800, `2 MiB at 1 MiB/s took only ${elapsedMs.toFixed(0)} ms`);
  assert.ok(measured <= 1.1 * rate && measured >= 0.2 * rate, `measured ${(measured / MiB).toFixed(3)} MiB/s for a cap of 1 MiB/s`);
  for (let i = 0; i < 2; i++) {
    await until(() => server.connections[i]?.endedAt !== undefined, `connection ${i} to end`);
  }
  const receivedByConnection = server.connections.map((connection) => connection.received());
  for (const payload of payloads) assert.ok(receivedByConnection.some((received) => received.equals(payload)), 'each connection delivered its payload intact');
  const stats = proxy.stats();
  assert.ok(stats.faultsApplied.throttledWaits > 0);
  assert.equal(stats.bytesForwarded.upstream, 2 * MiB);
});

test("blackhole 'drop' discards bytes but keeps the connection open; heal restores forwarding", async (t) => {
  const { server, proxy, port } = await setUp(t, 'echo');
  const recorder = await client(t, port);
  await roundTripMs(recorder, 'before|');
  proxy.setFaults({ blackhole: 'drop' });
  recorder.socket.write('lost|');
  await delay(150);
  assert.equal(server.receivedBytes(), 'before|'.length, 'nothing reached the server');
  assert.equal(recorder.length, 'before|'.length, 'nothing came back');
  assert.equal(recorder.isClosed, false, 'the connection stays open');
  proxy.heal();
  await roundTripMs(recorder, 'after');
  assert.equal(recorder.received().toString(), 'before|after');
  assert.equal(proxy.stats().faultsApplied.droppedBytes, 'lost|'.length);
});

test("blackhole 'hold' keeps bytes (one direction only) and releases them in order when healed", async (t) => {
  const { server, proxy, port } = await setUp(t, 'echo', { blackhole: 'hold', direction: 'downstream' });
  const recorder = await client(t, port);
  recorder.socket.write('held-1|');
  await delay(50);
  recorder.socket.write('held-2|');
  await until(() => server.receivedBytes() === 14, 'upstream, which is not held, to deliver');
  await delay(100);
  assert.equal(recorder.length, 0, 'nothing came back while downstream was held');
  assert.equal(proxy.stats().bytesQueued.downstream, 14);
  proxy.heal();
  await until(() => recorder.length >= 14, 'the held bytes after heal');
  await roundTripMs(recorder, 'after');
  assert.equal(recorder.received().toString(), 'held-1|held-2|after');
  const stats = proxy.stats();
  assert.equal(stats.faultsApplied.heldBytes, 14);
  assert.deepEqual(stats.bytesQueued, { upstream: 0, downstream: 0 });
});

test("blackhole 'hold' stops reading at holdBytesMax and says so; nothing is lost after heal", async (t) => {
  const { server, proxy, port } = await setUp(t, 'sink', { blackhole: 'hold', direction: 'upstream' });
  const recorder = await client(t, port);
  const payload = randomBytes(holdBytesMax + 4 * MiB);
  recorder.socket.end(payload);
  await until(() => proxy.stats().faultsApplied.holdBufferFull === 1, 'the hold buffer to fill');
  await delay(50);
  const queued = proxy.stats().bytesQueued.upstream;
  assert.ok(queued >= holdBytesMax && queued <= holdBytesMax + MiB, `held ${queued} bytes with holdBytesMax ${holdBytesMax}`);
  assert.equal(server.receivedBytes(), 0);
  proxy.heal();
  await until(() => server.connections[0]?.endedAt !== undefined, 'the sink to receive everything and the FIN');
  assert.ok(server.connections[0]!.received().equals(payload), 'the sink received the payload intact');
  assert.equal(proxy.stats().faultsApplied.holdBufferFull, 1);
});

test('resetAll() resets every connection: both peers see ECONNRESET', async (t) => {
  const { server, proxy, port } = await setUp(t, 'echo');
  const clients = [await client(t, port), await client(t, port)];
  for (const recorder of clients) await roundTripMs(recorder, 'hello');
  assert.equal(proxy.resetAll(), 2);
  for (const recorder of clients) {
    await recorder.closed;
    assert.equal(recorder.error?.code, 'ECONNRESET', 'the client saw a reset');
  }
  for (const connection of server.connections) {
    await connection.closed;
    assert.equal(connection.error?.code, 'ECONNRESET', 'the server saw a reset');
  }
  await until(() => proxy.stats().connectionsOpen === 0, 'the pairs to go');
  assert.equal(proxy.stats().faultsApplied.resets, 2);
  const fresh = await client(t, port);
  await roundTripMs(fresh, 'still accepting');
});

test('resetAfterBytes resets a connection once it has forwarded that many bytes', async (t) => {
  const resetAfterBytes = 10_000;
  const { server, proxy, port } = await setUp(t, 'sink', { resetAfterBytes, direction: 'upstream' });
  const recorder = await client(t, port);
  const payload = randomBytes(64 * 1024);
  recorder.socket.write(payload);
  await recorder.closed;
  assert.ok(['ECONNRESET', 'EPIPE'].includes(recorder.error?.code ?? ''), `the client saw ${recorder.error?.code ?? 'no error'}`);
  await until(() => server.connections[0]?.isClosed === true, 'the sink connection to close');
  // The reset follows the last allowed bytes into the kernel, so the sink reads all of them. (Linux then
  // reports end-of-stream, not ECONNRESET, to a reader that still had data queued when the RST came.)
  assert.ok(server.connections[0]!.received().equals(payload.subarray(0, resetAfterBytes)), 'the sink got exactly the first resetAfterBytes bytes');
  const stats = proxy.stats();
  assert.equal(stats.bytesForwarded.upstream, resetAfterBytes, 'exactly the limit was forwarded');
  assert.equal(stats.faultsApplied.resetsAfterBytes, 1);
});

test('slowCloseMs delays passing on each FIN', async (t) => {
  const slowCloseMs = 300;
  const { server, proxy, port } = await setUp(t, 'sink', { slowCloseMs });
  const recorder = await client(t, port);
  recorder.socket.write('bye');
  await until(() => server.receivedBytes() === 3, 'the data before the FIN');
  const started = performance.now();
  recorder.socket.end();
  await until(() => server.connections[0]?.endedAt !== undefined, 'the server to see the FIN');
  const serverEndMs = server.connections[0]!.endedAt! - started;
  assert.ok(serverEndMs >= slowCloseMs - 5, `the FIN reached the server after ${serverEndMs.toFixed(1)} ms, expected ≥ ${slowCloseMs}`);
  // The sink answers with its own FIN, which is slowed on the way back as well.
  await until(() => recorder.endedAt !== undefined, 'the client to see the FIN back');
  const clientEndMs = recorder.endedAt! - started;
  assert.ok(clientEndMs >= 2 * slowCloseMs - 5, `the FIN came back after ${clientEndMs.toFixed(1)} ms, expected ≥ ${2 * slowCloseMs}`);
  await recorder.closed;
  assert.equal(recorder.error, undefined);
  assert.equal(proxy.stats().faultsApplied.slowCloses, 2);
});

/** Sends `messagesCount` messages one at a time through a corrupting proxy; returns the flipped bit positions. */
async function corruptedBits(t: TestContext, seed: number, messagesCount: number): Promise<number[]> {
  const { proxy, port } = await setUp(t, 'echo', { corruptProbability: 0.5, direction: 'upstream' }, seed);
  const recorder = await client(t, port);
  const messageBytes = 512;
  const sent = randomBytes(messagesCount * messageBytes);
  // One write, one echo at a time: each message is one chunk, so the PRNG draws the same way on every run.
  for (let i = 0; i < messagesCount; i++) {
    recorder.socket.write(sent.subarray(i * messageBytes, (i + 1) * messageBytes));
    await until(() => recorder.length >= (i + 1) * messageBytes, `echo of message ${i}`);
  }
  const received = recorder.received();
  const bits: number[] = [];
  let corruptedMessages = 0;
  for (let i = 0; i < messagesCount; i++) {
    let flipped = 0;
    for (let offset = i * messageBytes; offset < (i + 1) * messageBytes; offset++) {
      const difference = received[offset]! ^ sent[offset]!;
      for (let bit = 0; bit < 8; bit++) {
        if (difference & (1 << bit)) {
          bits.push(offset * 8 + bit);
          flipped++;
        }
      }
    }
    assert.ok(flipped <= 1, `message ${i} has ${flipped} flipped bits; at most one is flipped per chunk`);
    if (flipped) corruptedMessages++;
  }
  assert.equal(proxy.stats().faultsApplied.corruptedChunks, corruptedMessages);
  await proxy.close();
  return bits;
}

test('corruptProbability flips one bit per chosen chunk; the same seed flips the same bits', async (t) => {
  const seed = testSeed('fault proxy corruption');
  const first = await corruptedBits(t, seed, 40);
  assert.ok(first.length > 0, `seed ${seed}: some bytes differ`);
  const second = await corruptedBits(t, seed, 40);
  assert.deepEqual(second, first, `seed ${seed}: a second run flips the same bits`);
});

test('refuse accepts and resets new connections; turning it off accepts again', async (t) => {
  const { server, proxy, port } = await setUp(t, 'echo', { refuse: true });
  const refused = openClient(port);
  t.after(() => refused.socket.destroy());
  refused.socket.write('anyone?');
  await refused.closed;
  assert.equal(refused.length, 0);
  assert.equal(refused.error?.code, 'ECONNRESET');
  assert.equal(server.connections.length, 0, 'the target never saw the connection');
  proxy.setFaults({ refuse: false });
  const accepted = await client(t, port);
  await roundTripMs(accepted, 'welcome');
  const stats = proxy.stats();
  assert.equal(stats.connectionsAccepted, 2);
  assert.equal(stats.faultsApplied.refusedConnections, 1);
});

test('heal() clears every fault and releases what was held or delayed at once', async (t) => {
  const { proxy, port } = await setUp(t, 'echo', { latencyMs: 30_000, blackhole: 'hold', slowCloseMs: 30_000 });
  const recorder = await client(t, port);
  recorder.socket.write('waiting');
  await delay(100);
  assert.equal(recorder.length, 0);
  proxy.setFaults({ bytesPerSecondMax: 10, corruptProbability: 1, resetAfterBytes: 1_000_000 });
  proxy.heal();
  assert.deepEqual(proxy.faults, noFaults);
  // Well under the 30 s latency, yet loose enough for a slow machine.
  await until(() => recorder.length >= 7, 'the held, delayed bytes after heal', 5_000);
  const payload = randomBytes(MiB);
  recorder.socket.end(payload);
  await until(() => recorder.endedAt !== undefined, 'the echo of 1 MiB and the FIN, no longer capped or slowed', 5_000);
  assert.ok(recorder.received().equals(Buffer.concat([Buffer.from('waiting'), payload])), 'nothing corrupted after heal');
});

test('setFaults() refuses bad values with a message naming the field', async (t) => {
  const { proxy } = await setUp(t, 'echo');
  const cases: [unknown, RegExp][] = [
    [{ latencyMs: -1 }, /'latencyMs' to -1: it must be a whole number from 0 to 60000/],
    [{ jitterMs: 1.5 }, /'jitterMs'/],
    [{ bytesPerSecondMax: 0 }, /'bytesPerSecondMax' to 0/],
    [{ blackhole: 'sometimes' }, /'blackhole' to "sometimes": it must be 'off', 'drop' or 'hold'/],
    [{ corruptProbability: 2 }, /'corruptProbability'/],
    [{ direction: 'sideways' }, /'direction'/],
    [{ refuse: 'yes' }, /'refuse'/],
    [{ resetAfterBytes: 0 }, /'resetAfterBytes'/],
    [{ latency: 5 }, /unknown fault 'latency': known faults are direction, latencyMs/],
    [[1], /expected an object/],
  ];
  for (const [faults, message] of cases) {
    assert.throws(() => proxy.setFaults(faults as Partial<Faults>), message, JSON.stringify(faults));
  }
  assert.deepEqual(proxy.faults, noFaults, 'a refused change changes nothing');
  assert.throws(() => new FaultProxy({ target: { host: '127.0.0.1', port: 1 }, seed: -1 }), /seed -1/);
});

test('mutual TLS passes through a jittery proxy unchanged', async (t) => {
  const dir = makeTempDir();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const files = await makeTlsFiles(dir);
  const read = (file: string): Buffer => fs.readFileSync(file);
  let clientName = '';
  const server = tls.createServer({ cert: read(files.serverCert), key: read(files.serverKey), ca: read(files.caCert), requestCert: true, rejectUnauthorized: true }, (socket) => {
    clientName = String(socket.getPeerCertificate().subject?.CN);
    socket.pipe(socket);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const proxy = new FaultProxy({ target: { host: '127.0.0.1', port: (server.address() as { port: number }).port }, faults: { latencyMs: 5, jitterMs: 5 } });
  t.after(async () => {
    await proxy.close();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  const { port } = await proxy.listen({ host: '127.0.0.1', port: 0 });
  const socket = tls.connect({ host: '127.0.0.1', port, servername: 'localhost', ca: read(files.caCert), cert: read(files.clientCert), key: read(files.clientKey) });
  t.after(() => socket.destroy());
  await new Promise<void>((resolve, reject) => {
    socket.once('secureConnect', resolve);
    socket.once('error', reject);
  });
  assert.ok(socket.authorized, `the server certificate was accepted: ${String(socket.authorizationError)}`);
  const payload = randomBytes(256 * 1024);
  const chunks: Buffer[] = [];
  let length = 0;
  socket.on('data', (chunk: Buffer) => {
    chunks.push(chunk);
    length += chunk.length;
  });
  socket.write(payload);
  await until(() => length >= payload.length, 'the TLS echo');
  assert.ok(Buffer.concat(chunks).equals(payload), 'the echo through TLS is the payload');
  assert.equal(clientName, 'lifeline-test-client', 'the server saw the client certificate');
  assert.ok(proxy.stats().bytesForwarded.upstream > payload.length, 'the proxy forwarded the TLS records (payload plus overhead)');
});

test('a target that cannot be reached makes the proxy reset the client', async (t) => {
  const closedPort = await freePort();
  const proxy = new FaultProxy({ target: { host: '127.0.0.1', port: closedPort } });
  t.after(() => proxy.close());
  const { port } = await proxy.listen({ host: '127.0.0.1', port: 0 });
  const recorder = await client(t, port);
  await recorder.closed;
  assert.equal(recorder.error?.code, 'ECONNRESET');
  assert.equal(proxy.stats().targetConnectFailures, 1);
});

test('connections past connectionsMax are reset at accept', async (t) => {
  const { proxy, port } = await setUp(t, 'echo');
  const clients: Recorder[] = [];
  for (let i = 0; i < connectionsMax; i++) clients.push(await client(t, port));
  await until(() => proxy.stats().connectionsOpen === connectionsMax, 'all connections to be accepted');
  const extra = openClient(port);
  t.after(() => extra.socket.destroy());
  await extra.closed;
  assert.equal(extra.error?.code, 'ECONNRESET');
  assert.equal(proxy.stats().connectionsOverLimit, 1);
  await roundTripMs(clients[0]!, 'the others still work');
});

test('close() leaves no sockets or timers behind, even with bytes delayed and a FIN slowed', async (t) => {
  const resources = (): Map<string, number> => {
    const counts = new Map<string, number>();
    for (const name of process.getActiveResourcesInfo()) counts.set(name, (counts.get(name) ?? 0) + 1);
    return counts;
  };
  const before = resources();
  const server = await startServer('echo');
  t.after(() => server.close());
  const proxy = new FaultProxy({ target: { host: '127.0.0.1', port: server.port }, faults: { latencyMs: 5_000, slowCloseMs: 5_000, bytesPerSecondMax: 1000, direction: 'downstream' } });
  const { port } = await proxy.listen({ host: '127.0.0.1', port: 0 });
  const recorder = await connectClient(port);
  recorder.socket.end(randomBytes(64 * 1024));
  await until(() => server.receivedBytes() === 64 * 1024 && proxy.stats().bytesQueued.downstream > 0, 'bytes to wait in the proxy');
  await proxy.close();
  assert.equal(proxy.stats().connectionsOpen, 0);
  await recorder.closed;
  await server.close();
  const leftOver = (): string[] => {
    const after = resources();
    return [...after].filter(([name, count]) => count > (before.get(name) ?? 0)).map(([name, count]) => `${name}×${count - (before.get(name) ?? 0)}`);
  };
  await until(() => leftOver().length === 0, 'resources to be released', 2_000).catch(() => undefined);
  assert.deepEqual(leftOver(), [], 'resources still active after close()');
});
