/**
 * `lifeline fault-proxy`: run a FaultProxy as a process, with faults from the
 * command line and control commands (JSON lines) on stdin, so that a test in
 * another process can drive it.
 */
import * as readline from 'node:readline';
import { parseArgs } from 'node:util';
import { FaultProxy, checkFaults, type Faults, type HostPort } from './proxy.js';
import { parseSizeBytes } from '../util/size.js';
import { createLogger, type LogLevel } from '../util/logger.js';
import { UsageError } from '../cli/usage-error.js';

export const faultProxyUsage = `Usage: lifeline fault-proxy --target HOST:PORT [options]

Forwards every TCP connection accepted on --listen to --target, byte for byte
(TLS passes through unchanged), and injects the faults asked for. For tests.

  --listen HOST:PORT          address to listen on (default 127.0.0.1:0, a free port);
                              prints 'listening HOST:PORT' on stdout once bound
  --target HOST:PORT          address to forward to (required)
  --direction D               both, upstream (client → target) or downstream (default both)
  --latency-ms N              delay added to each chunk
  --jitter-ms N               each delay is drawn from latency ± jitter; order is kept
  --rate BYTES/s              bandwidth cap per direction, shared by all connections
                              (e.g. 1048576, 512K, 1MiB/s)
  --blackhole off|drop|hold   stop forwarding; drop discards, hold buffers until healed
  --reset-after-bytes SIZE    reset a connection once it has forwarded SIZE bytes
  --slow-close-ms N           delay passing on a FIN by N ms
  --corrupt-probability P     chance per chunk of flipping one random bit (0 to 1)
  --refuse                    accept new connections and reset them at once
  --seed N                    seed of the PRNG behind corruption and jitter (default random)
  --log-level LEVEL           debug, info, warn or error (default warn)
  --log-format text|json      (default text)

Control commands, one JSON object per line on stdin; each gets one JSON line on stdout
({"ok":true,...} or {"ok":false,"error":...}), with the command's "id" if it had one:
  {"setFaults":{"latencyMs":50,"blackhole":"hold"}}   change some faults
  {"heal":true}                                       clear every fault
  {"resetAll":true}                                   reset every open connection
  {"stats":true}                                      bytes forwarded, connections, faults applied
  {"faults":true}                                     the faults in force

On SIGINT or SIGTERM it closes every connection and prints one JSON line
{"event":"fault-proxy-summary",...} with the final stats. End of stdin does not stop it.`;

function parseHostPort(flag: string, text: string): HostPort {
  const colon = text.lastIndexOf(':');
  if (colon < 0) throw new UsageError(`Cannot read ${flag} '${text}': expected HOST:PORT`);
  const host = text.slice(0, colon).replace(/^\[(.*)\]$/, '$1');
  const port = Number(text.slice(colon + 1));
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new UsageError(`Cannot read ${flag} '${text}': port must be 0-65535`);
  return { host: host || '127.0.0.1', port };
}

function parseWholeNumber(flag: string, text: string): number {
  const value = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(value)) throw new UsageError(`Cannot read ${flag} '${text}': expected a whole number`);
  return value;
}

/** Turns the fault flags into faults; the proxy checks the ranges. */
function faultsFromFlags(values: Record<string, string | boolean | undefined>): Partial<Faults> {
  const faults: Partial<Faults> = {};
  if (values.direction !== undefined) faults.direction = values.direction as Faults['direction'];
  if (values['latency-ms'] !== undefined) faults.latencyMs = parseWholeNumber('--latency-ms', values['latency-ms'] as string);
  if (values['jitter-ms'] !== undefined) faults.jitterMs = parseWholeNumber('--jitter-ms', values['jitter-ms'] as string);
  if (values.rate !== undefined) faults.bytesPerSecondMax = parseSizeBytes((values.rate as string).replace(/\/s$/i, ''));
  if (values.blackhole !== undefined) faults.blackhole = values.blackhole as Faults['blackhole'];
  if (values['reset-after-bytes'] !== undefined) faults.resetAfterBytes = parseSizeBytes(values['reset-after-bytes'] as string);
  if (values['slow-close-ms'] !== undefined) faults.slowCloseMs = parseWholeNumber('--slow-close-ms', values['slow-close-ms'] as string);
  if (values['corrupt-probability'] !== undefined) faults.corruptProbability = Number(values['corrupt-probability']);
  if (values.refuse) faults.refuse = true;
  try {
    return checkFaults(faults);
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
}

type Reply = Record<string, unknown>;

/** Runs one control command; errors become {"ok":false} replies, never a crash. */
function control(proxy: FaultProxy, line: string): Reply {
  let command: Record<string, unknown>;
  try {
    command = JSON.parse(line) as Record<string, unknown>;
  } catch (error) {
    return { ok: false, error: `Cannot read the control line as JSON: ${(error as Error).message}` };
  }
  if (typeof command !== 'object' || command === null || Array.isArray(command)) return { ok: false, error: 'Cannot run a control line that is not a JSON object' };
  const id = command.id;
  const names = Object.keys(command).filter((name) => name !== 'id');
  const withId = (reply: Reply): Reply => (id === undefined ? reply : { id, ...reply });
  if (names.length !== 1) {
    return withId({ ok: false, error: `Cannot run a control line with ${names.length} commands: give exactly one of setFaults, heal, resetAll, stats, faults` });
  }
  const name = names[0]!;
  try {
    switch (name) {
      case 'setFaults':
        return withId({ ok: true, command: name, faults: proxy.setFaults(command.setFaults as Partial<Faults>) });
      case 'heal':
        proxy.heal();
        return withId({ ok: true, command: name, faults: proxy.faults });
      case 'resetAll':
        return withId({ ok: true, command: name, connectionsReset: proxy.resetAll() });
      case 'stats':
        return withId({ ok: true, command: name, stats: proxy.stats() });
      case 'faults':
        return withId({ ok: true, command: name, faults: proxy.faults });
      default:
        return withId({ ok: false, error: `Cannot run unknown control command '${name}': known are setFaults, heal, resetAll, stats, faults` });
    }
  } catch (error) {
    return withId({ ok: false, command: name, error: (error as Error).message });
  }
}

export async function runFaultProxy(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      listen: { type: 'string', default: '127.0.0.1:0' },
      target: { type: 'string' },
      direction: { type: 'string' },
      'latency-ms': { type: 'string' },
      'jitter-ms': { type: 'string' },
      rate: { type: 'string' },
      blackhole: { type: 'string' },
      'reset-after-bytes': { type: 'string' },
      'slow-close-ms': { type: 'string' },
      'corrupt-probability': { type: 'string' },
      refuse: { type: 'boolean' },
      seed: { type: 'string' },
      'log-level': { type: 'string', default: 'warn' },
      'log-format': { type: 'string', default: 'text' },
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) {
    console.log(faultProxyUsage);
    return 0;
  }
  const level = values['log-level'] as LogLevel;
  if (!['debug', 'info', 'warn', 'error'].includes(level)) throw new UsageError(`Cannot read --log-level '${level}'`);
  const format = values['log-format'];
  if (format !== 'text' && format !== 'json') throw new UsageError(`Cannot read --log-format '${format}': use text or json`);
  const logger = createLogger({ level, format });
  if (!values.target) throw new UsageError('Give --target HOST:PORT, the address to forward to');
  const listen = parseHostPort('--listen', values.listen!);
  const target = parseHostPort('--target', values.target);
  const faults = faultsFromFlags(values);
  const seed = values.seed === undefined ? undefined : parseWholeNumber('--seed', values.seed);

  const proxy = new FaultProxy({ target, faults, ...(seed !== undefined ? { seed } : {}), logger });
  let bound: HostPort;
  try {
    bound = await proxy.listen(listen);
  } catch (error) {
    throw new Error(`Cannot listen on ${listen.host}:${listen.port}: ${(error as Error).message}`, { cause: error });
  }
  const host = bound.host.includes(':') ? `[${bound.host}]` : bound.host;
  console.log(`listening ${host}:${bound.port}`);
  // The seed goes to stderr so that stdout stays 'listening' and JSON replies; it is needed to replay a corruption run.
  console.error(`fault-proxy: seed ${proxy.seed} (replay with --seed ${proxy.seed})`);
  logger.info('fault proxy started', { target: `${target.host}:${target.port}`, seed: proxy.seed, ...proxy.faults });

  const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  lines.on('line', (line) => {
    if (line.trim() === '') return;
    console.log(JSON.stringify(control(proxy, line)));
  });

  await new Promise<void>((resolve) => {
    const stop = (signal: string): void => {
      logger.info('stopping', { signal });
      resolve();
    };
    process.once('SIGINT', () => stop('SIGINT'));
    process.once('SIGTERM', () => stop('SIGTERM'));
  });
  lines.close();
  await proxy.close();
  console.log(JSON.stringify({ event: 'fault-proxy-summary', seed: proxy.seed, ...proxy.stats() }));
  return 0;
}
