/**
 * `lifeline demo`: a fresh volume served over NBD with the tap on, a built-in
 * workload writing to it like a guest would, and a live view of the writes the
 * tap intercepts. Any NBD client (qemu-io, nbdsh, fio) can write to it too.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { randomBytes } from 'node:crypto';
import { NbdServer } from '../nbd/server.js';
import { NbdClient } from '../nbd/client.js';
import type { TapEvent } from '../tap/tap.js';
import { parseSizeBytes, formatBytes } from '../util/size.js';
import { createLogger } from '../util/logger.js';
import { closeVolumes, describeAddress, openVolumes, parseListen } from './nbd-serve.js';
import { UsageError } from './usage-error.js';

export const demoUsage = `Usage: lifeline demo [options]

  --data DIR             where the demo volume lives (default ./lifeline-demo)
  --listen HOST:PORT     NBD address (default 127.0.0.1:10809)
  --size SIZE            volume size (default 1G)
  --no-workload          do not run the built-in writer; write with your own client
  --duration SECONDS     stop after this long (default: run until Ctrl-C)`;

/** The built-in workload's pace: a gentle guest, so the display stays readable. */
const workloadWritesPerSecond = 40;
const displayIntervalMs = 1000;
const recentEventsShown = 6;

export async function runDemo(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      data: { type: 'string', default: './lifeline-demo' },
      listen: { type: 'string', default: '127.0.0.1:10809' },
      size: { type: 'string', default: '1G' },
      'no-workload': { type: 'boolean', default: false },
      duration: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
  });
  if (values.help) {
    console.log(demoUsage);
    return;
  }
  const sizeBytes = parseSizeBytes(values.size!);
  const durationMs = values.duration !== undefined ? Number(values.duration) * 1000 : undefined;
  if (durationMs !== undefined && !(durationMs > 0)) throw new UsageError('--duration must be a positive number of seconds');
  const listen = parseListen(values.listen!);
  const dataDir = path.resolve(values.data!);
  fs.mkdirSync(dataDir, { recursive: true });
  const volumePath = path.join(dataDir, 'disk0.img');
  // A fresh volume every run, so the display starts from nothing.
  fs.rmSync(volumePath, { force: true });

  const logger = createLogger({ level: 'warn', format: 'text' });
  const volumes = openVolumes([{ name: 'disk0', path: volumePath, sizeBytes, readOnly: false, description: 'Lifeline demo volume' }], true);
  const volume = volumes[0]!;
  const counter = volume.counter!;
  const recent: TapEvent[] = [];
  counter.onEvent((event) => {
    recent.push({ ...event, data: undefined as never });
    if (recent.length > recentEventsShown) recent.shift();
  });
  const server = new NbdServer({ exports: [{ name: 'disk0', store: volume.store, description: 'Lifeline demo volume' }], logger });
  let bound;
  try {
    bound = await server.listen(listen);
  } catch (error) {
    await closeVolumes(volumes, logger);
    throw new Error(`Cannot listen on ${values.listen}: ${(error as Error).message} (pick another with --listen)`, { cause: error });
  }
  const uri = `${describeAddress(listen, bound)}/disk0`;
  console.log(`Lifeline demo: serving a fresh ${formatBytes(sizeBytes)} volume at ${uri}`);
  console.log(`  backing file: ${volumePath}`);
  console.log('  write to it with any NBD client, for example:');
  console.log(`    qemu-io -f raw ${uri} -c 'write -P 0xab 0 1M'`);
  console.log(`    nbdinfo --map ${uri}`);
  console.log(`  built-in workload: ${values['no-workload'] ? 'off' : `${workloadWritesPerSecond} writes/s with zeroes and trims`}; Ctrl-C stops\n`);

  let stopping = false;
  const boundPort = (bound as { port: number }).port;
  const workload = values['no-workload']
    ? undefined
    : runWorkload({ host: listen.host, port: boundPort }, () => stopping).catch((error: unknown) => {
        process.exitCode = 1;
        console.error(`lifeline demo: the built-in workload stopped: ${(error as Error).message}`);
      });
  const started = Date.now();
  let lastEvents = 0;
  let lastBytes = 0;
  const interactive = process.stdout.isTTY === true;
  const render = (): void => {
    const counts = counter.counts;
    const bytes = counts.bytes.write + counts.bytes.zero + counts.bytes.trim;
    const eventsPerSecond = counts.events - lastEvents;
    const bytesPerSecond = bytes - lastBytes;
    lastEvents = counts.events;
    lastBytes = bytes;
    const lines = [
      `[${((Date.now() - started) / 1000).toFixed(0).padStart(4)} s] tap on disk0: ${counts.events} events (${eventsPerSecond}/s, ${formatBytes(bytesPerSecond)}/s), sequence ${counts.sequenceLast}, checksum ${counts.checksum.toString(16).padStart(8, '0')}`,
      `         writes ${counts.count.write} (${formatBytes(counts.bytes.write)})  zeroes ${counts.count.zero} (${formatBytes(counts.bytes.zero)})  trims ${counts.count.trim} (${formatBytes(counts.bytes.trim)})  failed ${counts.count.failed}  connections ${server.connectionCount}`,
      ...recent.map((event) => `         #${event.sequence} ${event.kind.padEnd(5)} offset ${event.offset} length ${event.lengthBytes}`),
    ];
    if (interactive) process.stdout.write(`\x1b[J${lines.join('\n')}\n\x1b[${lines.length}A`);
    else console.log(lines.slice(0, 2).join('\n'));
  };
  const timer = setInterval(render, displayIntervalMs);
  await new Promise<void>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
    if (durationMs !== undefined) setTimeout(resolve, durationMs).unref();
  });
  stopping = true;
  clearInterval(timer);
  await workload;
  render();
  if (interactive) process.stdout.write(`\x1b[${2 + recent.length}B\n`);
  await server.close();
  await closeVolumes(volumes, logger);
  console.log(`stopped: ${counter.counts.events} events intercepted, checksum ${counter.counts.checksum.toString(16).padStart(8, '0')}; volume kept at ${volumePath}`);
}

/** A guest-like writer: random writes of 4 KiB-1 MiB, some zeroes and trims, a flush each second. */
async function runWorkload(address: { host: string; port: number }, stopped: () => boolean): Promise<void> {
  const client = await NbdClient.connect(address, { exportName: 'disk0' });
  const blocks = Math.floor(client.sizeBytes / 4096);
  const pattern = randomBytes(1 << 20);
  let count = 0;
  try {
    while (!stopped()) {
      const lengthBytes = 4096 * (1 + Math.floor(Math.random() ** 3 * 255));
      const offset = 4096 * Math.floor(Math.random() * (blocks - lengthBytes / 4096));
      const roll = Math.random();
      if (roll < 0.85) await client.pwrite(pattern.subarray(0, lengthBytes), offset);
      else if (roll < 0.95) await client.zero(offset, lengthBytes);
      else await client.trim(offset, lengthBytes);
      if (++count % workloadWritesPerSecond === 0) await client.flush();
      await new Promise((resolve) => setTimeout(resolve, 1000 / workloadWritesPerSecond));
    }
    await client.flush();
  } finally {
    await client.disconnect();
  }
}
