import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBackingStore, type BackingStore, type WriteData } from '../tap/backing-store.js';
import { VolumeSwitch } from './volume-switch.js';

/** A store whose writes complete only when the test lets them, recording the order of events. */
class HeldStore extends MemoryBackingStore {
  readonly events: string[] = [];
  private readonly releases: (() => void)[] = [];

  constructor(private readonly label: string) {
    super(1024 * 1024);
  }
  override write(data: WriteData, offset: number): Promise<void> {
    this.events.push(`${this.label} write ${offset} begins`);
    return new Promise<void>((resolve) => this.releases.push(resolve)).then(async () => {
      await super.write(data, offset);
      this.events.push(`${this.label} write ${offset} done`);
    });
  }
  releaseAll(): void {
    for (const release of this.releases.splice(0)) release();
  }
}

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

test('a switch waits for the writes in flight on the old store; writes during it go to the new store, reads are not held', async () => {
  const old = new HeldStore('old');
  const next = new HeldStore('next');
  const volume = new VolumeSwitch(old);
  const first = volume.write(Buffer.alloc(4096, 1), 0);
  const second = volume.write(Buffer.alloc(4096, 2), 4096);
  await tick();
  let switched = false;
  const switching = volume.switchTo(next).then(() => (switched = true));
  const during = volume.write(Buffer.alloc(4096, 3), 8192);
  await tick();
  assert.equal(switched, false, 'the switch waits for the writes in flight');
  assert.deepEqual(next.events, [], 'a write made during the switch waits for it');
  // A read is served at once, by the old store while the switch waits.
  const read = Buffer.alloc(4096);
  await volume.read(read, 0);

  old.releaseAll();
  await Promise.all([first, second, switching]);
  assert.equal(switched, true);
  assert.equal(volume.store, next);
  await tick();
  assert.deepEqual(next.events, ['next write 8192 begins'], 'the held write went to the new store once the switch was done');
  next.releaseAll();
  await during;
  assert.deepEqual(old.events, ['old write 0 begins', 'old write 4096 begins', 'old write 0 done', 'old write 4096 done']);
});

test('a failed write still counts as finished for a switch, and a store of another size is refused', async () => {
  const failing: BackingStore = Object.assign(new MemoryBackingStore(8192), {
    write: () => Promise.reject(new Error('EIO')),
  });
  const volume = new VolumeSwitch(failing);
  await assert.rejects(volume.write(Buffer.alloc(4096), 0), /EIO/);
  await volume.switchTo(new MemoryBackingStore(8192));
  await assert.rejects(volume.switchTo(new MemoryBackingStore(4096)), /Cannot switch a volume of 8192 bytes to a store of 4096 bytes/);
  await volume.write(Buffer.alloc(4096, 7), 4096);
  const read = Buffer.alloc(4096);
  await volume.read(read, 4096);
  assert.equal(read[0], 7);
});
