import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import fc from 'fast-check';
import { ByteQueue } from './byte-queue.js';
import { testSeed } from '../../test/helpers.js';

test('ByteQueue: any split into chunks and any take/peek/drop sequence yields the original bytes in order', () => {
  const seed = testSeed('ByteQueue');
  fc.assert(
    fc.property(
      fc.uint8Array({ minLength: 0, maxLength: 2000 }),
      fc.array(fc.integer({ min: 1, max: 300 }), { minLength: 1, maxLength: 40 }),
      fc.array(fc.tuple(fc.constantFrom('take', 'peek', 'drop', 'chunks'), fc.integer({ min: 0, max: 400 })), { maxLength: 60 }),
      (bytes, splits, operations) => {
        const source = Buffer.from(bytes);
        const queue = new ByteQueue();
        let cursor = 0;
        for (const split of splits) {
          if (cursor >= source.length) break;
          queue.push(source.subarray(cursor, cursor + split));
          cursor += split;
        }
        if (cursor < source.length) queue.push(source.subarray(cursor));
        let read = 0;
        for (const [operation, count] of operations) {
          const n = Math.min(count, queue.length);
          if (operation === 'peek') {
            assert.ok(queue.peek(n).equals(source.subarray(read, read + n)));
          } else if (operation === 'take') {
            assert.ok(queue.take(n).equals(source.subarray(read, read + n)));
            read += n;
          } else if (operation === 'chunks') {
            assert.ok(Buffer.concat(queue.takeChunks(n)).equals(source.subarray(read, read + n)));
            read += n;
          } else {
            assert.equal(queue.drop(count), Math.min(count, source.length - read));
            read += Math.min(count, source.length - read);
          }
          assert.equal(queue.length, source.length - read);
        }
      },
    ),
    { seed, numRuns: 500 },
  );
});

test('ByteQueue: take inside one chunk does not copy', () => {
  const queue = new ByteQueue();
  const chunk = Buffer.from('hello world');
  queue.push(chunk);
  const taken = queue.take(5);
  taken[0] = 0x48;
  assert.equal(chunk.toString(), 'Hello world');
});
