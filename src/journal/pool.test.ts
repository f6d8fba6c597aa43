/**
 * The pool grows and shrinks with the history window; the hard limit shortens
 * history with the right events; a full datastore is refused cleanly.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SimulatedDisk } from './sim-disk.js';
import { closeTestJournal, createReplicas, ManualClock, openTestJournal, type TestJournalConfig } from './testing.js';
import { DatastoreFullError, ViewInvalidatedError } from './errors.js';
import type { JournalEvent } from './journal.js';
import { JournalPool } from './pool.js';

const unitBytes = 8192;
const secondMs = 1000;

function writeRecord(stream: number, sequence: number, timeMs: number, offset: number) {
  return { kind: 'write' as const, stream, sequence, timeMs, volume: 1, offset, data: Buffer.alloc(1024, sequence & 0xff) };
}

test('units are taken as the window fills and given back as it moves on and empties', async () => {
  const disk = new SimulatedDisk();
  const clock = new ManualClock();
  const config: TestJournalConfig = { fileSystem: disk, clock, volumes: new Map([[1, 1 << 20]]), unitBytes, historyMs: 60 * secondMs, sizeLimitBytes: 1 << 30, sizeWarningBytes: 1 << 29 };
  await createReplicas(config);
  const opened = await openTestJournal(config);
  const { journal, pool } = opened;
  const events: JournalEvent[] = [];
  journal.on((event) => events.push(event));
  const held: number[] = [];
  // 10 minutes of writes, one 1 KiB write a second: the window holds 60 of them (about 8 units).
  for (let second = 1; second <= 600; second++) {
    clock.timeMs += secondMs;
    await journal.append([writeRecord(0, second, clock.timeMs, (second * 4096) % (1 << 20))]);
    if (second % 10 === 0) await journal.tick();
    held.push(pool.usage().journals['group1']!.units);
  }
  const taken = events.filter((event) => event.type === 'unit-taken').length;
  const released = events.filter((event) => event.type === 'unit-released').length;
  const steady = held.slice(300);
  console.log(`# pool window: ${taken} units taken, ${released} given back, held ${Math.min(...steady)}..${Math.max(...steady)} in steady state (peak ${Math.max(...held)})`);
  assert.ok(taken >= 70, `units are taken as history grows (${taken})`);
  assert.ok(released >= 60, `units are given back as the window moves (${released})`);
  const windowUnits = Math.ceil((60 * (1024 + 64)) / unitBytes);
  assert.ok(Math.max(...steady) <= windowUnits + 4, `the journal holds about one window of units (${Math.max(...steady)} vs ${windowUnits})`);
  const status = journal.status();
  assert.ok(status.actualHistoryMs >= 60 * secondMs && status.actualHistoryMs <= 71 * secondMs, `actual history is the window (${status.actualHistoryMs})`);
  assert.deepEqual(status.alerts, []);
  // Writes stop; the window moves past them and the journal shrinks to its current unit and spare.
  clock.timeMs += 120 * secondMs;
  await journal.tick();
  const usage = pool.usage();
  assert.equal(usage.journals['group1']!.units, 2);
  assert.equal(usage.datastores[0]!.usedBytes, 2 * unitBytes);
  assert.equal(journal.status().records, 0);
  await closeTestJournal(opened);
});

test('the hard limit promotes early, shortens history with events, invalidates a view it passes, and alerts clear later', async () => {
  const disk = new SimulatedDisk();
  const clock = new ManualClock();
  const config: TestJournalConfig = {
    fileSystem: disk,
    clock,
    volumes: new Map([[1, 1 << 20]]),
    unitBytes,
    historyMs: 3600 * secondMs,
    sizeLimitBytes: 6 * unitBytes,
    sizeWarningBytes: 4 * unitBytes,
  };
  await createReplicas(config);
  const opened = await openTestJournal(config);
  const { journal, pool } = opened;
  const events: JournalEvent[] = [];
  journal.on((event) => events.push(event));
  // An hour of history is first filled slowly (a write a minute), so the window is whole.
  let sequence = 0;
  for (let minute = 1; minute <= 60; minute++) {
    clock.timeMs += 60 * secondMs;
    await journal.append([writeRecord(0, ++sequence, clock.timeMs, sequence * 4096)]);
  }
  await journal.tick();
  assert.ok(events.some((event) => event.type === 'alert-raised' && event.alert.condition === 'size-warning'), 'size over the warning threshold raises an alert');
  const early = await journal.openView({ volume: 1, at: { timeMs: clock.timeMs - 30 * 60 * secondMs }, scratchBytesMax: 1 << 20 });
  // Then a burst: far more than the limit within a minute.
  for (let i = 0; i < 200; i++) {
    clock.timeMs += 100;
    await journal.append([writeRecord(0, ++sequence, clock.timeMs, (sequence * 4096) % (1 << 20))]);
    assert.ok(pool.usage().journals['group1']!.units * unitBytes <= config.sizeLimitBytes, 'the journal never passes its hard limit');
  }
  await journal.tick();
  const status = journal.status();
  console.log(`# pool hard limit: history ${Math.round(status.actualHistoryMs / 1000)} s of ${status.configuredHistoryMs / 1000} s configured, size ${status.sizeBytes} of ${status.sizeLimitBytes}, alerts ${status.alerts.map((alert) => alert.condition).join(',')}`);
  assert.ok(status.actualHistoryMs < 0.75 * status.configuredHistoryMs, 'history is shorter than configured');
  assert.ok(events.some((event) => event.type === 'history-shortened'), 'a history-shortened event is emitted');
  assert.ok(events.some((event) => event.type === 'alert-raised' && event.alert.condition === 'history-error'), 'the history error alert is raised');
  assert.ok(status.alerts.some((alert) => alert.condition === 'history-error'));
  assert.ok(events.some((event) => event.type === 'view-invalidated' && event.view === early.name), 'the view the limit passed is invalidated');
  await assert.rejects(early.read(Buffer.alloc(4096), 0), ViewInvalidatedError);
  await early.close();
  // A view inside the shortened history still works.
  const recent = await journal.openView({ volume: 1, at: { timeMs: clock.timeMs }, scratchBytesMax: 1 << 20 });
  const block = Buffer.alloc(1024);
  await recent.read(block, (sequence * 4096) % (1 << 20));
  assert.ok(block.equals(Buffer.alloc(1024, sequence & 0xff)));
  await recent.close();
  // Quiet time: the history grows back and the alert clears.
  clock.timeMs += 3600 * secondMs;
  await journal.tick();
  assert.ok(events.some((event) => event.type === 'alert-cleared' && event.condition === 'history-error'), 'the history alert clears when the window is whole again');
  await closeTestJournal(opened);
});

test('a full datastore refuses new units with a typed error, and appends resume once units are given back', async () => {
  const disk = new SimulatedDisk();
  const clock = new ManualClock();
  const config: TestJournalConfig = {
    fileSystem: disk,
    clock,
    volumes: new Map([[1, 1 << 20]]),
    unitBytes,
    historyMs: 10 * secondMs,
    sizeLimitBytes: 1 << 30,
    datastores: [
      { path: '/pool-a', capacityBytes: 3 * unitBytes },
      { path: '/pool-b', capacityBytes: 2 * unitBytes },
    ],
  };
  await createReplicas(config);
  const opened = await openTestJournal(config);
  const { journal, pool } = opened;
  let sequence = 0;
  let refused: unknown;
  for (let i = 0; i < 100 && !refused; i++) {
    try {
      await journal.append([writeRecord(0, sequence + 1, clock.timeMs, 0)]);
      sequence++;
    } catch (error) {
      refused = error;
    }
  }
  assert.ok(refused instanceof DatastoreFullError, `a typed error (${String(refused)})`);
  assert.match((refused as Error).message, /pool-a holds 24576 of 24576 bytes/);
  assert.match((refused as Error).message, /pool-b holds 16384 of 16384 bytes/);
  const usage = pool.usage();
  console.log(`# pool full: refused after ${sequence} records; ${usage.datastores.map((datastore) => `${datastore.path} ${datastore.units} units`).join(', ')}`);
  assert.equal(usage.datastores[0]!.units, 3);
  assert.equal(usage.datastores[1]!.units, 2);
  assert.equal(usage.journals['group1']!.usedBytes, 5 * unitBytes);
  // Everything acknowledged is still there; once the window moves on, units come back and appends go on.
  assert.equal(journal.lsnDurable, sequence);
  clock.timeMs += 20 * secondMs;
  await journal.tick();
  await journal.append([writeRecord(0, sequence + 1, clock.timeMs, 0)]);
  await closeTestJournal(opened);
});

test('a datastore whose filesystem would fall below its free-space floor refuses the unit', async () => {
  const disk = new SimulatedDisk({ capacityBytes: 10 * unitBytes });
  const pool = new JournalPool(disk, [{ path: '/small', capacityBytes: 100 * unitBytes, freeBytesMin: 4 * unitBytes }]);
  for (let number = 1; number <= 6; number++) await pool.take('group1', number, unitBytes);
  await assert.rejects(pool.take('group1', 7, unitBytes), (error: unknown) => {
    assert.ok(error instanceof DatastoreFullError);
    assert.match(error.message, /\/small has 32768 bytes free and must keep 32768/);
    return true;
  });
  assert.equal(pool.usage().datastores[0]!.units, 6);
});
