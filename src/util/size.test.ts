import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { formatBytes, parseSizeBytes } from './size.js';

test('parseSizeBytes reads plain bytes and binary suffixes', () => {
  assert.equal(parseSizeBytes('4096'), 4096);
  assert.equal(parseSizeBytes('512K'), 512 * 1024);
  assert.equal(parseSizeBytes('1G'), 1 << 30);
  assert.equal(parseSizeBytes('10GiB'), 10 * 2 ** 30);
  assert.equal(parseSizeBytes('1.5m'), 1.5 * 2 ** 20);
});

test('parseSizeBytes refuses what is not a size, saying how to write one', () => {
  assert.throws(() => parseSizeBytes('lots'), /Cannot read size 'lots'/);
  assert.throws(() => parseSizeBytes('-1G'), /Cannot read size/);
  assert.throws(() => parseSizeBytes('1.0000001K'), /whole number/);
});

test('formatBytes picks a readable unit', () => {
  assert.equal(formatBytes(512), '512 B');
  assert.equal(formatBytes(1536), '1.5 KiB');
  assert.equal(formatBytes(3 * 2 ** 30), '3.0 GiB');
});
