/**
 * `lifeline nbd serve`: serve backing files over NBD, through the tap.
 */
import * as fs from 'node:fs';
import { parseArgs } from 'node:util';
import { connectionsMax, connectionsPerExportMaxDefault, NbdServer, type ExportConfig, type ListenAddress, type TlsConfig } from '../nbd/server.js';
import { FileBackingStore, type BackingStore } from '../tap/backing-store.js';
import { Tap } from '../tap/tap.js';
import { CountingConsumer } from '../tap/consumers.js';
import { parseSizeBytes } from '../util/size.js';
import { createLogger, type LogLevel, type Logger } from '../util/logger.js';
import { UsageError } from './usage-error.js';

export const nbdServeUsage = `Usage: lifeline nbd serve [options]

Serves raw image files over NBD. Every write, zero and trim passes through the tap.

  --listen HOST:PORT       TCP address to listen on (repeatable; default 127.0.0.1:10809
                           unless --socket is given; port 0 picks a free port)
  --socket PATH            Unix socket to listen on (repeatable)
  --export SPEC            NAME=PATH[,size=SIZE][,ro][,description=TEXT] (repeatable).
                           A missing file is created sparse when size= is given.
                           The first export is also the default (empty name) export.
  --connections-per-export-max N
                           connections one export serves at once, 1-${connectionsMax} (default
                           ${connectionsPerExportMaxDefault}); past it NBD_OPT_GO is refused with
                           NBD_REP_ERR_POLICY and a message naming the limit
  --tap on|off             hand every mutation to the tap's counting consumer (default on)
  --tap-stats-ms MS        log the tap's counters every MS milliseconds (default off)
  --tls off|on|require     offer STARTTLS (on) or refuse everything before it (require)
  --tls-cert FILE          server certificate (PEM), needed with --tls on|require
  --tls-key FILE           server private key (PEM)
  --tls-ca FILE            CA (PEM) that client certificates must chain to; when given,
                           clients must present a certificate
  --log-level LEVEL        debug, info, warn or error (default info)
  --log-format text|json   (default text)

On SIGINT or SIGTERM it stops accepting, finishes requests in flight, flushes the
files and prints, per export, one JSON line with the tap's counters and checksum.`;

export interface ExportSpec {
  name: string;
  path: string;
  sizeBytes?: number;
  readOnly: boolean;
  description?: string;
}

export function parseExportSpec(text: string): ExportSpec {
  const equals = text.indexOf('=');
  if (equals <= 0) throw new UsageError(`Cannot read --export '${text}': expected NAME=PATH[,size=SIZE][,ro]`);
  const name = text.slice(0, equals);
  const [path, ...options] = text.slice(equals + 1).split(',');
  if (!path) throw new UsageError(`Cannot read --export '${text}': the path is empty`);
  const spec: ExportSpec = { name, path, readOnly: false };
  for (const option of options) {
    if (option === 'ro') spec.readOnly = true;
    else if (option === 'rw') spec.readOnly = false;
    else if (option.startsWith('size=')) spec.sizeBytes = parseSizeBytes(option.slice(5));
    else if (option.startsWith('description=')) spec.description = option.slice(12);
    else throw new UsageError(`Cannot read --export '${text}': unknown option '${option}' (known: size=, ro, description=)`);
  }
  return spec;
}

export function parseListen(text: string): { host: string; port: number } {
  const colon = text.lastIndexOf(':');
  if (colon < 0) throw new UsageError(`Cannot read --listen '${text}': expected HOST:PORT`);
  const host = text.slice(0, colon).replace(/^\[(.*)\]$/, '$1');
  const port = Number(text.slice(colon + 1));
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new UsageError(`Cannot read --listen '${text}': port must be 0-65535`);
  return { host: host || '127.0.0.1', port };
}

/** `--connections-per-export-max`: a whole number from 1 to the server's `connectionsMax`. */
export function parseConnectionsPerExportMax(text: string | undefined): number {
  if (text === undefined) return connectionsPerExportMaxDefault;
  const value = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(value) || value < 1 || value > connectionsMax) {
    throw new UsageError(`Cannot read --connections-per-export-max '${text}': expected a whole number from 1 to ${connectionsMax}`);
  }
  return value;
}

export interface ServedVolume {
  spec: ExportSpec;
  file: FileBackingStore;
  store: BackingStore;
  counter?: CountingConsumer;
}

export function openVolumes(specs: ExportSpec[], tapOn: boolean): ServedVolume[] {
  const volumes: ServedVolume[] = [];
  try {
    for (const spec of specs) {
      const file = FileBackingStore.open({ path: spec.path, readOnly: spec.readOnly, ...(spec.sizeBytes !== undefined ? { createSizeBytes: spec.sizeBytes } : {}) });
      if (!tapOn) {
        volumes.push({ spec, file, store: file });
        continue;
      }
      const counter = new CountingConsumer();
      volumes.push({ spec, file, store: new Tap(file, { volume: spec.name, consumer: counter }), counter });
    }
  } catch (error) {
    for (const volume of volumes) void volume.file.close();
    throw error;
  }
  return volumes;
}

export function tlsConfigFrom(mode: string, certPath?: string, keyPath?: string, caPath?: string): TlsConfig | undefined {
  if (mode === 'off') return undefined;
  if (mode !== 'on' && mode !== 'require') throw new UsageError(`Cannot read --tls '${mode}': use off, on or require`);
  if (!certPath || !keyPath) throw new UsageError('--tls on|require needs --tls-cert and --tls-key');
  const readPem = (what: string, path: string): Buffer => {
    try {
      return fs.readFileSync(path);
    } catch (error) {
      throw new Error(`Cannot read the TLS ${what}: path is ${path}`, { cause: error });
    }
  };
  const config: TlsConfig = { cert: readPem('certificate', certPath), key: readPem('key', keyPath), required: mode === 'require' };
  if (caPath) config.ca = readPem('CA', caPath);
  return config;
}

export function describeAddress(address: ListenAddress, bound: unknown): string {
  if ('socketPath' in address) return `nbd+unix:///?socket=${address.socketPath}`;
  const info = bound as { address: string; port: number; family: string };
  const host = info.family === 'IPv6' ? `[${info.address}]` : info.address;
  return `nbd://${host}:${info.port}`;
}

export async function closeVolumes(volumes: ServedVolume[], logger: Logger): Promise<void> {
  for (const volume of volumes) {
    try {
      if (!volume.spec.readOnly) await volume.file.flush();
    } catch (error) {
      logger.error('flush on shutdown failed', { export: volume.spec.name, error: String(error) });
      process.exitCode = 1;
    }
    await volume.file.close();
  }
}

export async function runNbdServe(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      listen: { type: 'string', multiple: true },
      socket: { type: 'string', multiple: true },
      export: { type: 'string', multiple: true },
      'connections-per-export-max': { type: 'string' },
      tap: { type: 'string', default: 'on' },
      'tap-stats-ms': { type: 'string' },
      tls: { type: 'string', default: 'off' },
      'tls-cert': { type: 'string' },
      'tls-key': { type: 'string' },
      'tls-ca': { type: 'string' },
      'log-level': { type: 'string', default: 'info' },
      'log-format': { type: 'string', default: 'text' },
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) {
    console.log(nbdServeUsage);
    return;
  }
  const level = values['log-level'] as LogLevel;
  if (!['debug', 'info', 'warn', 'error'].includes(level)) throw new UsageError(`Cannot read --log-level '${level}'`);
  const format = values['log-format'];
  if (format !== 'text' && format !== 'json') throw new UsageError(`Cannot read --log-format '${format}': use text or json`);
  const logger = createLogger({ level, format });
  if (!values.export?.length) throw new UsageError('Give at least one --export NAME=PATH[,size=SIZE][,ro]');
  if (values.tap !== 'on' && values.tap !== 'off') throw new UsageError(`Cannot read --tap '${values.tap}': use on or off`);
  const specs = values.export.map(parseExportSpec);
  const tls = tlsConfigFrom(values.tls!, values['tls-cert'], values['tls-key'], values['tls-ca']);
  const addresses: ListenAddress[] = [
    ...(values.listen ?? []).map(parseListen),
    ...(values.socket ?? []).map((socketPath) => ({ socketPath })),
  ];
  if (addresses.length === 0) addresses.push({ host: '127.0.0.1', port: 10809 });
  const statsMs = values['tap-stats-ms'] ? Number(values['tap-stats-ms']) : 0;
  if (!Number.isFinite(statsMs) || statsMs < 0) throw new UsageError('--tap-stats-ms must be a number of milliseconds');

  const connectionsPerExportMax = parseConnectionsPerExportMax(values['connections-per-export-max']);

  const volumes = openVolumes(specs, values.tap === 'on');
  const exports: ExportConfig[] = volumes.map((volume) => ({
    name: volume.spec.name,
    store: volume.store,
    ...(volume.spec.description ? { description: volume.spec.description } : {}),
  }));
  const server = new NbdServer({ exports, ...(tls ? { tls } : {}), logger, connectionsPerExportMax });
  for (const address of addresses) {
    if ('socketPath' in address) {
      try {
        if (fs.statSync(address.socketPath).isSocket()) fs.unlinkSync(address.socketPath);
      } catch {
        // No stale socket to remove.
      }
    }
    let bound;
    try {
      bound = await server.listen(address);
    } catch (error) {
      await closeVolumes(volumes, logger);
      throw new Error(`Cannot listen on ${'socketPath' in address ? address.socketPath : `${address.host}:${address.port}`}: ${(error as Error).message}`, { cause: error });
    }
    console.log(`listening ${describeAddress(address, bound)}`);
  }
  for (const volume of volumes) {
    logger.info('serving export', { export: volume.spec.name, path: volume.spec.path, sizeBytes: volume.file.sizeBytes, readOnly: volume.spec.readOnly, tap: volume.counter !== undefined, tls: values.tls });
  }
  const statsTimer =
    statsMs > 0
      ? setInterval(() => {
          for (const volume of volumes) if (volume.counter) logger.info('tap', { export: volume.spec.name, ...volume.counter.counts });
        }, statsMs)
      : undefined;

  await new Promise<void>((resolve) => {
    const stop = (signal: string): void => {
      logger.info('stopping', { signal });
      resolve();
    };
    process.once('SIGINT', () => stop('SIGINT'));
    process.once('SIGTERM', () => stop('SIGTERM'));
  });
  if (statsTimer) clearInterval(statsTimer);
  await server.close();
  await closeVolumes(volumes, logger);
  for (const volume of volumes) {
    if (volume.counter) console.log(JSON.stringify({ event: 'tap-summary', export: volume.spec.name, ...volume.counter.counts }));
  }
}
