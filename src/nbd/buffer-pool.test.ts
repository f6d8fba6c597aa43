import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { BufferPool, poolFreeBytesMax, pooledBytesMin } from './buffer-pool.js';

test('BufferPool: a released buffer is handed out again for the same size class', () => {
  const pool = new BufferPool();
  const first = pool.acquire(100_000);
  assert.equal(first.buffer.length, 100_000);
  first.buffer[0] = 42;
  first.release();
  assert.equal(pool.freeBytesHeld, 131072);
  const second = pool.acquire(120_000);
  assert.equal(second.buffer.buffer, first.buffer.buffer, 'same memory reused');
  assert.equal(pool.freeBytesHeld, 0);
  second.release();
});

test('BufferPool: small and over-large requests are not pooled; double release is refused; free bytes are bounded', () => {
  const pool = new BufferPool();
  const small = pool.acquire(pooledBytesMin - 1);
  small.release();
  assert.equal(pool.freeBytesHeld, 0);
  const buffer = pool.acquire(1 << 20);
  buffer.release();
  assert.throws(() => buffer.release(), /released twice/);
  const many = Array.from({ length: 10 }, () => pool.acquire(32 << 20));
  for (const item of many) item.release();
  assert.ok(pool.freeBytesHeld <= poolFreeBytesMax);
});
