import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import fc from 'fast-check';
import { Tap, type TapEvent } from './tap.js';
import { FileBackingStore, MemoryBackingStore, type BackingStore, type Extent, type WriteData, type ZeroOptions } from './backing-store.js';
import { CountingConsumer, ReplayConsumer } from './consumers.js';
import { NbdServer } from '../nbd/server.js';
import { NbdClient } from '../nbd/client.js';
import { makeTempDir, prng, testSeed } from '../../test/helpers.js';

/** Wraps a store and delays every mutation by a random time, so completions come back out of order. */
class JitterStore implements BackingStore {
  constructor(
    private readonly inner: BackingStore,
    private readonly random: () => number,
  ) {}
  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  private delay(): Promise<void> {
    const ms = Math.floor(this.random() * 4);
    return ms === 0 ? Promise.resolve() : new Promise((resolve) => setTimeout(resolve, ms));
  }
  read(target: Buffer, offset: number): Promise<void> {
    return this.inner.read(target, offset);
  }
  async write(data: WriteData, offset: number): Promise<void> {
    await this.delay();
    await this.inner.write(data, offset);
  }
  async writeZeroes(offset: number, lengthBytes: number, options: ZeroOptions): Promise<void> {
    await this.delay();
    await this.inner.writeZeroes(offset, lengthBytes, options);
  }
  async trim(offset: number, lengthBytes: number): Promise<void> {
    await this.delay();
    await this.inner.trim(offset, lengthBytes);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  cache(offset: number, lengthBytes: number): Promise<void> {
    return this.inner.cache(offset, lengthBytes);
  }
  extents(offset: number, lengthBytes: number, extentCountMax: number): Extent[] {
    return this.inner.extents(offset, lengthBytes, extentCountMax);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

type Mutation = { kind: 'write'; offset: number; lengthBytes: number; fill: number } | { kind: 'zero' | 'trim'; offset: number; lengthBytes: number };

const volumeBytes = 64 * 1024;

const mutationArbitrary: fc.Arbitrary<Mutation> = fc
  .record({
    kind: fc.constantFrom('write', 'write', 'write', 'zero', 'trim'),
    offset: fc.integer({ min: 0, max: volumeBytes - 1 }),
    lengthBytes: fc.integer({ min: 1, max: 16 * 1024 }),
    fill: fc.integer({ min: 1, max: 255 }),
  })
  .map((raw) => {
    const lengthBytes = Math.min(raw.lengthBytes, volumeBytes - raw.offset);
    return raw.kind === 'write'
      ? { kind: 'write', offset: raw.offset, lengthBytes, fill: raw.fill }
      : { kind: raw.kind as 'zero' | 'trim', offset: raw.offset, lengthBytes };
  });

test('tap: replaying events in sequence order reproduces the store under random concurrent overlapping mutations', async () => {
  const seed = testSeed('tap replay property');
  await fc.assert(
    fc.asyncProperty(fc.array(mutationArbitrary, { minLength: 1, maxLength: 60 }), fc.integer(), async (mutations, jitterSeed) => {
      const inner = new MemoryBackingStore(volumeBytes);
      const replica = new MemoryBackingStore(volumeBytes);
      const replay = new ReplayConsumer(replica);
      const tap = new Tap(new JitterStore(inner, prng(jitterSeed)), { volume: 'v', consumer: replay });
      // Issue every mutation at once: they are all in flight together.
      await Promise.all(
        mutations.map((mutation) => {
          if (mutation.kind === 'write') return tap.write(Buffer.alloc(mutation.lengthBytes, mutation.fill), mutation.offset);
          if (mutation.kind === 'zero') return tap.writeZeroes(mutation.offset, mutation.lengthBytes, { mayDeallocate: false, fastOnly: false });
          return tap.trim(mutation.offset, mutation.lengthBytes);
        }),
      );
      await replay.drained();
      assert.equal(tap.sequenceDeliveredLast, mutations.length);
      assert.ok(replica.bytes.equals(inner.bytes), 'replica differs from the store');
      // And the store holds the arrival-order result: the model applies mutations one by one.
      const model = Buffer.alloc(volumeBytes);
      for (const mutation of mutations) {
        model.fill(mutation.kind === 'write' ? mutation.fill : 0, mutation.offset, mutation.offset + mutation.lengthBytes);
      }
      assert.ok(model.equals(inner.bytes), 'store does not hold the arrival-order result');
    }),
    { seed, numRuns: 300 },
  );
});

test('tap: events arrive with consecutive sequence numbers, source times and the request bytes uncopied', async () => {
  const events: TapEvent[] = [];
  let now = 1000;
  const tap = new Tap(new MemoryBackingStore(8192), { volume: 'disk0', consumer: { accept: (event) => events.push(event) }, clock: { nowMs: () => now++ } });
  const data = Buffer.alloc(512, 7);
  await tap.write(data, 100);
  await tap.writeZeroes(0, 4096, { mayDeallocate: true, fastOnly: false });
  await tap.trim(4096, 4096);
  assert.deepEqual(
    events.map(({ sequence, kind, offset, lengthBytes, sourceTimeMs, volume }) => ({ sequence, kind, offset, lengthBytes, sourceTimeMs, volume })),
    [
      { sequence: 1, kind: 'write', offset: 100, lengthBytes: 512, sourceTimeMs: 1000, volume: 'disk0' },
      { sequence: 2, kind: 'zero', offset: 0, lengthBytes: 4096, sourceTimeMs: 1001, volume: 'disk0' },
      { sequence: 3, kind: 'trim', offset: 4096, lengthBytes: 4096, sourceTimeMs: 1002, volume: 'disk0' },
    ],
  );
  assert.equal(events[0]!.data, data, 'the event carries the caller\'s buffer, not a copy');
  assert.equal(events[1]!.data, undefined, 'zero ranges travel as ranges');
});

test('tap: a mutation the store fails is delivered as failed, in order, and does not block later ones', async () => {
  const inner = new MemoryBackingStore(8192);
  const failing: BackingStore = Object.create(inner) as BackingStore;
  let calls = 0;
  failing.write = async (data, offset) => {
    if (++calls === 2) throw Object.assign(new Error('injected EIO'), { code: 'EIO' });
    return inner.write(data, offset);
  };
  const counter = new CountingConsumer();
  const kinds: string[] = [];
  counter.onEvent((event) => kinds.push(event.kind));
  const tap = new Tap(failing, { volume: 'v', consumer: counter });
  const results = await Promise.allSettled([tap.write(Buffer.alloc(10, 1), 0), tap.write(Buffer.alloc(10, 2), 5), tap.write(Buffer.alloc(10, 3), 8)]);
  assert.deepEqual(results.map((result) => result.status), ['fulfilled', 'rejected', 'fulfilled']);
  assert.deepEqual(kinds, ['write', 'failed', 'write']);
  assert.equal(counter.counts.count.failed, 1);
});

test('tap: overlapping writes reach the store in arrival order even when the first is slowest', async () => {
  const inner = new MemoryBackingStore(4096);
  const order: number[] = [];
  const slowFirst: BackingStore = Object.create(inner) as BackingStore;
  slowFirst.write = async (data, offset) => {
    const first = (Buffer.isBuffer(data) ? data : data[0]!)[0]!;
    if (first === 1) await new Promise((resolve) => setTimeout(resolve, 30));
    order.push(first);
    return inner.write(data, offset);
  };
  const tap = new Tap(slowFirst, { volume: 'v', consumer: { accept() {} } });
  await Promise.all([tap.write(Buffer.alloc(100, 1), 0), tap.write(Buffer.alloc(100, 2), 50), tap.write(Buffer.alloc(10, 3), 1000)]);
  assert.deepEqual(order, [3, 1, 2], 'the non-overlapping write ran at once; the overlapping one waited');
  assert.equal(inner.bytes[60], 2);
});

test('tap through NBD: several connections of random overlapping writes, zeroes and trims replay to the backing file', async (t) => {
  const seed = testSeed('tap over NBD');
  const random = prng(seed);
  const dir = makeTempDir();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const sizeBytes = 4 * 1024 * 1024;
  const file = FileBackingStore.open({ path: path.join(dir, 'disk0.img'), readOnly: false, createSizeBytes: sizeBytes });
  const replica = new MemoryBackingStore(sizeBytes);
  const replay = new ReplayConsumer(replica);
  const server = new NbdServer({ exports: [{ name: 'disk0', store: new Tap(file, { volume: 'disk0', consumer: replay }) }] });
  const address = (await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number };
  t.after(async () => {
    await server.close();
    await file.close();
  });
  const connections = await Promise.all(
    Array.from({ length: 4 }, () => NbdClient.connect({ host: '127.0.0.1', port: address.port }, { exportName: 'disk0' })),
  );
  // Writes concentrate on a small hot region so that requests in flight overlap often.
  const hotBytes = 256 * 1024;
  let operations = 0;
  await Promise.all(
    connections.map(async (client, index) => {
      for (let round = 0; round < 40; round++) {
        const batch: Promise<void>[] = [];
        for (let i = 0; i < 16; i++) {
          const offset = Math.floor(random() * hotBytes);
          const lengthBytes = 1 + Math.floor(random() * 64 * 1024);
          const roll = random();
          operations++;
          if (roll < 0.7) batch.push(client.pwrite(Buffer.alloc(lengthBytes, 1 + ((index * 64 + round + i) % 255)), offset));
          else if (roll < 0.85) batch.push(client.zero(offset, lengthBytes, roll < 0.8 ? 2 /* NO_HOLE */ : 0));
          else batch.push(client.trim(offset, lengthBytes));
        }
        await Promise.all(batch);
      }
    }),
  );
  await Promise.all(connections.map((client) => client.disconnect()));
  await replay.drained();
  const onDisk = Buffer.alloc(sizeBytes);
  await file.read(onDisk, 0);
  assert.equal(replay.failedRanges.length, 0);
  assert.ok(onDisk.equals(replica.bytes), `replay differs from the backing file after ${operations} operations (seed ${seed})`);
});
