import { describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { FileBackingStore, MemoryBackingStore, type BackingStore } from './backing-store.js';
import { Tap } from './tap.js';
import { makeTempDir } from '../../test/helpers.js';

const sizeBytes = 1024 * 1024;

const implementations: { name: string; open(dir: string): BackingStore }[] = [
  { name: 'FileBackingStore', open: (dir) => FileBackingStore.open({ path: path.join(dir, 'v.img'), readOnly: false, createSizeBytes: sizeBytes }) },
  { name: 'MemoryBackingStore', open: () => new MemoryBackingStore(sizeBytes) },
  { name: 'Tap over MemoryBackingStore', open: () => new Tap(new MemoryBackingStore(sizeBytes), { volume: 'v', consumer: { accept() {} } }) },
];

function totalBytes(extents: { lengthBytes: number }[]): number {
  return extents.reduce((sum, extent) => sum + extent.lengthBytes, 0);
}

for (const implementation of implementations) {
  describe(`BackingStore contract: ${implementation.name}`, () => {
    const withStore = async (body: (store: BackingStore) => Promise<void>): Promise<void> => {
      const dir = makeTempDir();
      const store = implementation.open(dir);
      try {
        await body(store);
      } finally {
        await store.close();
        fs.rmSync(dir, { recursive: true, force: true });
      }
    };

    test('a fresh store reads as zeroes and reports one hole', () =>
      withStore(async (store) => {
        assert.equal(store.sizeBytes, sizeBytes);
        const buffer = Buffer.alloc(8192, 0xff);
        await store.read(buffer, 4096);
        assert.ok(buffer.every((byte) => byte === 0));
        assert.deepEqual(store.extents(0, sizeBytes, 16), [{ lengthBytes: sizeBytes, hole: true, zero: true }]);
      }));

    test('write then read returns the bytes; extents show data where written', () =>
      withStore(async (store) => {
        const data = Buffer.alloc(65536, 0x5a);
        await store.write(data, 131072);
        const back = Buffer.alloc(65536);
        await store.read(back, 131072);
        assert.ok(back.equals(data));
        const extents = store.extents(0, sizeBytes, 16);
        assert.equal(totalBytes(extents), sizeBytes);
        assert.deepEqual(extents.map((extent) => extent.hole), [true, false, true]);
        assert.equal(extents[0]!.lengthBytes, 131072);
      }));

    test('a write given as several chunks lands back to back', () =>
      withStore(async (store) => {
        const chunks = [Buffer.alloc(1000, 1), Buffer.alloc(3000, 2), Buffer.alloc(70000, 3)];
        await store.write(chunks, 5000);
        const back = Buffer.alloc(74000);
        await store.read(back, 5000);
        assert.ok(back.equals(Buffer.concat(chunks)));
      }));

    test('writeZeroes and trim leave zeroes behind, with and without deallocation', () =>
      withStore(async (store) => {
        await store.write(Buffer.alloc(sizeBytes, 0x11), 0);
        await store.writeZeroes(4096, 8192, { mayDeallocate: false, fastOnly: false });
        await store.writeZeroes(65536, 65536, { mayDeallocate: true, fastOnly: false });
        await store.trim(262144, 4096);
        await store.trim(300001, 999); // unaligned: still zero
        const all = Buffer.alloc(sizeBytes);
        await store.read(all, 0);
        const zeroRanges = [[4096, 12288], [65536, 131072], [262144, 266240], [300001, 301000]] as const;
        for (let offset = 0; offset < sizeBytes; offset += 997) {
          const zero = zeroRanges.some(([start, end]) => offset >= start && offset < end);
          assert.equal(all[offset], zero ? 0 : 0x11, `byte at ${offset}`);
        }
        const hole = store.extents(65536, 65536, 4);
        assert.equal(hole[0]!.zero, true, 'a deallocated zero range reports zero');
      }));

    test('extents never exceed the request nor the extent limit', () =>
      withStore(async (store) => {
        for (let i = 0; i < 8; i++) await store.write(Buffer.alloc(4096, 1), i * 65536);
        const extents = store.extents(1000, 300000, 3);
        assert.ok(extents.length <= 3 && extents.length >= 1);
        assert.ok(totalBytes(extents) <= 300000);
        const one = store.extents(sizeBytes - 10, 10, 1);
        assert.equal(totalBytes(one), 10);
      }));

    test('flush and cache succeed', () =>
      withStore(async (store) => {
        await store.write(Buffer.alloc(100, 3), 0);
        await store.flush();
        await store.cache(0, sizeBytes);
      }));
  });
}

describe('FileBackingStore.open', () => {
  test('refuses a missing file without a size, a size that disagrees, and a directory, with the path in the message', () => {
    const dir = makeTempDir();
    try {
      const missing = path.join(dir, 'missing.img');
      assert.throws(() => FileBackingStore.open({ path: missing, readOnly: false }), new RegExp(`missing.*${missing}`));
      const existing = path.join(dir, 'existing.img');
      fs.writeFileSync(existing, Buffer.alloc(4096));
      assert.throws(() => FileBackingStore.open({ path: existing, readOnly: false, createSizeBytes: 8192 }), /already holds 4096 bytes/);
      assert.throws(() => FileBackingStore.open({ path: dir, readOnly: false }), /not a regular file/);
      assert.equal(fs.statSync(existing).size, 4096, 'a refused open changes nothing');
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  test('creates a missing file sparse at the given size', async () => {
    const dir = makeTempDir();
    try {
      const file = path.join(dir, 'new.img');
      const store = FileBackingStore.open({ path: file, readOnly: false, createSizeBytes: 1 << 30 });
      assert.equal(store.sizeBytes, 1 << 30);
      assert.ok(fs.statSync(file).blocks * 512 < 1 << 20, 'the file is sparse');
      await store.close();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
