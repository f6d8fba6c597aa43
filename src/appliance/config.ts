/**
 * The appliance's configuration: which volumes it serves and where each
 * protection group replicates to (source role), and which groups it receives,
 * with their history window, journal pool and limits (target role).
 *
 * The file (`--config FILE`, JSON) and the control API (`PUT /v1/config`,
 * `POST /v1/protect`) use this one model; `parseApplianceConfig` is the single
 * place where outside input becomes a trusted `ApplianceConfig`, with an error
 * that names the field. Sizes are bytes or strings such as "64MiB"; durations
 * are milliseconds or strings such as "30s", "5m", "1h", "30d". Relative paths
 * are resolved against the appliance's data directory.
 */
import { createHash } from 'node:crypto';
import * as path from 'node:path';
import { parseSizeBytes } from '../util/size.js';
import type { CodecName } from '../replication/codec.js';
import { linkSilenceMsMax, pingIntervalMs } from '../replication/shipper.js';
import { connectionsMax as nbdConnectionsMax, connectionsPerExportMaxDefault } from '../nbd/server.js';

export interface Address {
  host: string;
  port: number;
}

export interface VolumeConfig {
  name: string;
  /** Raw image file. */
  path: string;
  /** Creates the file sparse at this size when it is missing. */
  sizeBytes?: number;
}

export interface QueueConfig {
  memoryBytesMax: number;
  spillBytesMax: number;
}

export interface ProtectConfig {
  group: string;
  /** Names of this appliance's volumes in the group. */
  volumes: string[];
  target: { address: Address; appliance: string };
  codec: CodecName;
  /** 0: no limit of its own (the appliance's limit still applies). */
  rateLimitBytesPerSecond: number;
  rpoMsTarget: number;
  queue: QueueConfig;
  /**
   * Nothing heard from the target for this long (it answers the pings sent
   * every 2 s) ends the replication session and the source reconnects: how
   * soon a link that went silent (a blackhole, a dead peer whose connection
   * was not closed) is given up. Default 15 s; at least 4 s.
   */
  linkSilenceMs: number;
}

export interface DatastoreConfigEntry {
  path: string;
  capacityBytes: number;
  freeBytesMin: number;
}

export interface ReceiveGroupConfig {
  group: string;
  /** Appliance names (certificate CNs) allowed to send streams into the group. */
  sources: string[];
  volumes: { name: string; sizeBytes: number; replica: string }[];
  historyMs: number;
  journal: {
    unitBytes: number;
    sizeLimitBytes: number;
    sizeWarningBytes: number;
    datastores: DatastoreConfigEntry[];
  };
}

export interface ReceiveConfig {
  listen: Address;
  groups: ReceiveGroupConfig[];
  /** Recovery views open at once on this appliance (over all groups). */
  viewsMax: number;
  /** Recovery views open at once of one group. */
  viewsPerGroupMax: number;
  /** The sum of the open views' `scratchBytesMax` (the scratch space each may fill with test writes). */
  viewsScratchBytesMax: number;
}

export interface ApplianceConfig {
  appliance: { name: string; site: string };
  /** `requestsInFlightMax`: control API requests handled at once; more are answered 429. */
  control: { listen: Address; requestsInFlightMax: number };
  tls: { cert: string; key: string; trustedCas: string[] };
  /** `connectionsPerExportMax`: NBD connections one export (volume or view) serves at once. */
  nbd?: { listen: Address; connectionsPerExportMax: number };
  rateLimitBytesPerSecond: number;
  volumes: VolumeConfig[];
  protect: ProtectConfig[];
  receive?: ReceiveConfig;
  /**
   * SHA-256 of the file's `volumes`, `protect` and `rateLimitBytesPerSecond` as written (set by
   * `parseApplianceConfig`): what changes made through the control API are made over. Taken before
   * defaults and `--data` fill anything in, so that neither moves it.
   */
  fileDigest?: string;
}

export const queueMemoryBytesDefault = 256 * 1024 * 1024;
export const queueSpillBytesDefault = 4 * 1024 * 1024 * 1024;
export const rpoMsTargetDefault = 10_000;
export const unitBytesDefault = 256 * 1024 * 1024;
/** A unit holds whole batches of half its size; stream entries are at most 1 MiB (source-group.ts). */
export const unitBytesMin = 4 * 1024 * 1024;
export const datastoreFreeBytesMinDefault = 1024 * 1024 * 1024;
/** Control API requests handled at once by default (`control.requestsInFlightMax`). */
export const controlRequestsInFlightMaxDefault = 32;
/** The most `control.requestsInFlightMax` may be. */
export const controlRequestsInFlightMaxLimit = 1024;
/** NBD connections per export by default (`nbd.connectionsPerExportMax`); at most the server's `connectionsMax`. */
export const nbdConnectionsPerExportMaxDefault = connectionsPerExportMaxDefault;
/** Recovery views open at once on the appliance (`receive.viewsMax`) and of one group (`receive.viewsPerGroupMax`), by default. */
export const viewsMaxDefault = 64;
export const viewsPerGroupMaxDefault = 16;
/** The most `receive.viewsMax` may be. */
export const viewsMaxLimit = 4096;
/**
 * Scratch space reserved by all open views together by default (`receive.viewsScratchBytesMax`):
 * 64 views at the default 1 GiB each. A view's scratch is a sparse file beside the journal's
 * metadata that grows with the test writes made to the view, up to the view's `scratchBytesMax`.
 */
export const viewsScratchBytesMaxDefault = 64 * 1024 * 1024 * 1024;

export class ConfigError extends Error {
  constructor(readonly field: string, message: string) {
    super(`${field}: ${message}`);
    this.name = 'ConfigError';
  }
}

const namePattern = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
const codecs: readonly CodecName[] = ['none', 'lz4', 'brotli'];

type Json = Record<string, unknown>;

class Reader {
  constructor(private readonly baseDirectory: string) {}

  object(value: unknown, field: string, known: readonly string[]): Json {
    if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new ConfigError(field, 'expected an object');
    for (const key of Object.keys(value)) {
      if (!known.includes(key)) throw new ConfigError(`${field}.${key}`, `unknown setting (known: ${known.join(', ')})`);
    }
    return value as Json;
  }

  list(value: unknown, field: string): unknown[] {
    if (!Array.isArray(value)) throw new ConfigError(field, 'expected a list');
    return value;
  }

  name(value: unknown, field: string): string {
    if (typeof value !== 'string' || !namePattern.test(value)) throw new ConfigError(field, `expected a name of letters, digits, '.', '_' or '-' (at most 128), not ${JSON.stringify(value)}`);
    return value;
  }

  text(value: unknown, field: string): string {
    if (typeof value !== 'string' || value.length === 0) throw new ConfigError(field, 'expected a non-empty string');
    return value;
  }

  path(value: unknown, field: string): string {
    return path.resolve(this.baseDirectory, this.text(value, field));
  }

  address(value: unknown, field: string): Address {
    const text = this.text(value, field);
    const colon = text.lastIndexOf(':');
    const port = Number(text.slice(colon + 1));
    if (colon <= 0 || !Number.isInteger(port) || port < 0 || port > 65535) throw new ConfigError(field, `expected HOST:PORT with a port 0-65535, not '${text}'`);
    return { host: text.slice(0, colon).replace(/^\[(.*)\]$/, '$1'), port };
  }

  size(value: unknown, field: string, minimum = 0): number {
    let bytes: number;
    if (typeof value === 'number') bytes = value;
    else if (typeof value === 'string') {
      try {
        bytes = parseSizeBytes(value);
      } catch (error) {
        throw new ConfigError(field, (error as Error).message);
      }
    } else throw new ConfigError(field, 'expected a size (bytes, or a string such as "64MiB")');
    if (!Number.isSafeInteger(bytes) || bytes < minimum) throw new ConfigError(field, `expected a whole number of bytes of at least ${minimum}, not ${value}`);
    return bytes;
  }

  duration(value: unknown, field: string, minimum = 0): number {
    let ms: number;
    if (typeof value === 'number') ms = value;
    else if (typeof value === 'string') {
      const match = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$/.exec(value);
      if (!match) throw new ConfigError(field, `expected a duration such as "500ms", "30s", "5m", "1h" or "30d", not '${value}'`);
      const unitMs = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[match[2] as 'ms' | 's' | 'm' | 'h' | 'd'];
      ms = Math.round(Number(match[1]) * unitMs);
    } else throw new ConfigError(field, 'expected a duration (milliseconds, or a string such as "30s")');
    if (!Number.isSafeInteger(ms) || ms < minimum) throw new ConfigError(field, `expected a duration of at least ${minimum} ms`);
    return ms;
  }

  /** A whole number from `minimum` to `maximum`. */
  count(value: unknown, field: string, minimum: number, maximum: number): number {
    if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < minimum || value > maximum) {
      throw new ConfigError(field, `expected a whole number from ${minimum} to ${maximum}, not ${JSON.stringify(value)}`);
    }
    return value;
  }

  codec(value: unknown, field: string): CodecName {
    if (value === undefined) return 'lz4';
    if (typeof value !== 'string' || !codecs.includes(value as CodecName)) throw new ConfigError(field, `expected one of ${codecs.join(', ')}`);
    return value as CodecName;
  }
}

function unique(values: string[], field: string, what: string): void {
  const seen = new Set<string>();
  for (const value of values) {
    if (seen.has(value)) throw new ConfigError(field, `${what} '${value}' is given twice`);
    seen.add(value);
  }
}

/** Validates one protection entry (also used by the control API's `POST /v1/protect`). */
export function parseProtectConfig(value: unknown, field: string, baseDirectory: string): ProtectConfig {
  const read = new Reader(baseDirectory);
  const raw = read.object(value, field, ['group', 'volumes', 'target', 'codec', 'rateLimitBytesPerSecond', 'rpoMsTarget', 'queue', 'linkSilenceMs']);
  const target = read.object(raw['target'], `${field}.target`, ['address', 'appliance']);
  const queue = read.object(raw['queue'] ?? {}, `${field}.queue`, ['memoryBytesMax', 'spillBytesMax']);
  const volumes = read.list(raw['volumes'], `${field}.volumes`).map((name, index) => read.name(name, `${field}.volumes[${index}]`));
  if (volumes.length === 0) throw new ConfigError(`${field}.volumes`, 'a protection group needs at least one volume');
  unique(volumes, `${field}.volumes`, 'volume');
  return {
    group: read.name(raw['group'], `${field}.group`),
    volumes,
    target: { address: read.address(target['address'], `${field}.target.address`), appliance: read.name(target['appliance'], `${field}.target.appliance`) },
    codec: read.codec(raw['codec'], `${field}.codec`),
    rateLimitBytesPerSecond: raw['rateLimitBytesPerSecond'] === undefined ? 0 : read.size(raw['rateLimitBytesPerSecond'], `${field}.rateLimitBytesPerSecond`),
    rpoMsTarget: raw['rpoMsTarget'] === undefined ? rpoMsTargetDefault : read.duration(raw['rpoMsTarget'], `${field}.rpoMsTarget`, 1),
    queue: {
      memoryBytesMax: queue['memoryBytesMax'] === undefined ? queueMemoryBytesDefault : read.size(queue['memoryBytesMax'], `${field}.queue.memoryBytesMax`, 1024 * 1024),
      spillBytesMax: queue['spillBytesMax'] === undefined ? queueSpillBytesDefault : read.size(queue['spillBytesMax'], `${field}.queue.spillBytesMax`),
    },
    linkSilenceMs: raw['linkSilenceMs'] === undefined ? linkSilenceMsMax : read.duration(raw['linkSilenceMs'], `${field}.linkSilenceMs`, 2 * pingIntervalMs),
  };
}

/** SHA-256 (hex) of a JSON value. */
export function digestOf(value: unknown): string {
  return createHash('sha256').update(JSON.stringify(value)).digest('hex');
}

/** A protection entry as the configuration file (and POST /v1/protect) writes it: `parseProtectConfig` reads it back unchanged. */
export function protectConfigAsFileEntry(entry: ProtectConfig): Record<string, unknown> {
  const { host, port } = entry.target.address;
  return {
    group: entry.group,
    volumes: [...entry.volumes],
    target: { address: host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`, appliance: entry.target.appliance },
    codec: entry.codec,
    rateLimitBytesPerSecond: entry.rateLimitBytesPerSecond,
    rpoMsTarget: entry.rpoMsTarget,
    queue: { ...entry.queue },
    linkSilenceMs: entry.linkSilenceMs,
  };
}

function parseReceiveGroup(value: unknown, field: string, read: Reader): ReceiveGroupConfig {
  const raw = read.object(value, field, ['group', 'sources', 'volumes', 'historyMs', 'journal']);
  const journal = read.object(raw['journal'], `${field}.journal`, ['unitBytes', 'sizeLimitBytes', 'sizeWarningBytes', 'datastores']);
  const unitBytes = journal['unitBytes'] === undefined ? unitBytesDefault : read.size(journal['unitBytes'], `${field}.journal.unitBytes`, unitBytesMin);
  const sizeLimitBytes = read.size(journal['sizeLimitBytes'], `${field}.journal.sizeLimitBytes`, 4 * unitBytes);
  const sizeWarningBytes = journal['sizeWarningBytes'] === undefined ? Math.floor(sizeLimitBytes * 0.8) : read.size(journal['sizeWarningBytes'], `${field}.journal.sizeWarningBytes`);
  if (sizeWarningBytes > sizeLimitBytes) throw new ConfigError(`${field}.journal.sizeWarningBytes`, 'the warning threshold is above the hard limit');
  const datastores = read.list(journal['datastores'], `${field}.journal.datastores`).map((entry, index) => {
    const at = `${field}.journal.datastores[${index}]`;
    const store = read.object(entry, at, ['path', 'capacityBytes', 'freeBytesMin']);
    return {
      path: read.path(store['path'], `${at}.path`),
      capacityBytes: read.size(store['capacityBytes'], `${at}.capacityBytes`, unitBytes),
      freeBytesMin: store['freeBytesMin'] === undefined ? datastoreFreeBytesMinDefault : read.size(store['freeBytesMin'], `${at}.freeBytesMin`),
    };
  });
  if (datastores.length === 0) throw new ConfigError(`${field}.journal.datastores`, 'a journal needs at least one datastore');
  const volumes = read.list(raw['volumes'], `${field}.volumes`).map((entry, index) => {
    const at = `${field}.volumes[${index}]`;
    const volume = read.object(entry, at, ['name', 'sizeBytes', 'replica']);
    return { name: read.name(volume['name'], `${at}.name`), sizeBytes: read.size(volume['sizeBytes'], `${at}.sizeBytes`, 512), replica: read.path(volume['replica'], `${at}.replica`) };
  });
  if (volumes.length === 0) throw new ConfigError(`${field}.volumes`, 'a protection group needs at least one volume');
  unique(volumes.map((volume) => volume.name), `${field}.volumes`, 'volume');
  const sources = read.list(raw['sources'], `${field}.sources`).map((name, index) => read.name(name, `${field}.sources[${index}]`));
  if (sources.length === 0) throw new ConfigError(`${field}.sources`, 'name at least one source appliance');
  return {
    group: read.name(raw['group'], `${field}.group`),
    sources,
    volumes,
    historyMs: read.duration(raw['historyMs'], `${field}.historyMs`, 0),
    journal: { unitBytes, sizeLimitBytes, sizeWarningBytes, datastores },
  };
}

/** Turns parsed JSON into a checked configuration; relative paths resolve against `baseDirectory`. */
export function parseApplianceConfig(value: unknown, baseDirectory: string): ApplianceConfig {
  const read = new Reader(baseDirectory);
  const raw = read.object(value, 'config', ['appliance', 'control', 'tls', 'nbd', 'rateLimitBytesPerSecond', 'volumes', 'protect', 'receive', '$comment']);
  const appliance = read.object(raw['appliance'], 'appliance', ['name', 'site']);
  const control = read.object(raw['control'] ?? {}, 'control', ['listen', 'requestsInFlightMax']);
  const tlsRaw = read.object(raw['tls'], 'tls', ['cert', 'key', 'trustedCas']);
  const volumes = read.list(raw['volumes'] ?? [], 'volumes').map((entry, index) => {
    const at = `volumes[${index}]`;
    const volume = read.object(entry, at, ['name', 'path', 'sizeBytes']);
    const config: VolumeConfig = { name: read.name(volume['name'], `${at}.name`), path: read.path(volume['path'], `${at}.path`) };
    if (volume['sizeBytes'] !== undefined) config.sizeBytes = read.size(volume['sizeBytes'], `${at}.sizeBytes`, 512);
    return config;
  });
  unique(volumes.map((volume) => volume.name), 'volumes', 'volume');
  const protect = read.list(raw['protect'] ?? [], 'protect').map((entry, index) => parseProtectConfig(entry, `protect[${index}]`, baseDirectory));
  unique(protect.map((entry) => entry.group), 'protect', 'group');
  checkProtectVolumes(protect, volumes);
  const config: ApplianceConfig = {
    appliance: { name: read.name(appliance['name'], 'appliance.name'), site: read.name(appliance['site'], 'appliance.site') },
    control: {
      listen: read.address(control['listen'] ?? '127.0.0.1:0', 'control.listen'),
      requestsInFlightMax: control['requestsInFlightMax'] === undefined ? controlRequestsInFlightMaxDefault : read.count(control['requestsInFlightMax'], 'control.requestsInFlightMax', 1, controlRequestsInFlightMaxLimit),
    },
    tls: {
      cert: read.path(tlsRaw['cert'], 'tls.cert'),
      key: read.path(tlsRaw['key'], 'tls.key'),
      trustedCas: read.list(tlsRaw['trustedCas'], 'tls.trustedCas').map((entry, index) => read.path(entry, `tls.trustedCas[${index}]`)),
    },
    rateLimitBytesPerSecond: raw['rateLimitBytesPerSecond'] === undefined ? 0 : read.size(raw['rateLimitBytesPerSecond'], 'rateLimitBytesPerSecond'),
    volumes,
    protect,
    fileDigest: digestOf({ volumes: raw['volumes'] ?? [], protect: raw['protect'] ?? [], rateLimitBytesPerSecond: raw['rateLimitBytesPerSecond'] ?? 0 }),
  };
  if (config.tls.trustedCas.length === 0) throw new ConfigError('tls.trustedCas', 'name at least one CA that peer certificates must chain to');
  if (raw['nbd'] !== undefined) {
    const nbd = read.object(raw['nbd'], 'nbd', ['listen', 'connectionsPerExportMax']);
    config.nbd = {
      listen: read.address(nbd['listen'], 'nbd.listen'),
      connectionsPerExportMax: nbd['connectionsPerExportMax'] === undefined ? nbdConnectionsPerExportMaxDefault : read.count(nbd['connectionsPerExportMax'], 'nbd.connectionsPerExportMax', 1, nbdConnectionsMax),
    };
  } else if (volumes.length > 0) {
    throw new ConfigError('nbd.listen', 'an appliance that serves volumes needs an NBD address');
  }
  if (raw['receive'] !== undefined) {
    const receive = read.object(raw['receive'], 'receive', ['listen', 'groups', 'viewsMax', 'viewsPerGroupMax', 'viewsScratchBytesMax']);
    const groups = read.list(receive['groups'], 'receive.groups').map((entry, index) => parseReceiveGroup(entry, `receive.groups[${index}]`, read));
    unique(groups.map((group) => group.group), 'receive.groups', 'group');
    const viewsMax = receive['viewsMax'] === undefined ? viewsMaxDefault : read.count(receive['viewsMax'], 'receive.viewsMax', 1, viewsMaxLimit);
    const viewsPerGroupMax = receive['viewsPerGroupMax'] === undefined ? Math.min(viewsPerGroupMaxDefault, viewsMax) : read.count(receive['viewsPerGroupMax'], 'receive.viewsPerGroupMax', 1, viewsMaxLimit);
    if (viewsPerGroupMax > viewsMax) throw new ConfigError('receive.viewsPerGroupMax', `${viewsPerGroupMax} views per group is above the ${viewsMax} of the whole appliance (receive.viewsMax), so it could never be reached`);
    const viewsScratchBytesMax = receive['viewsScratchBytesMax'] === undefined ? viewsScratchBytesMaxDefault : read.size(receive['viewsScratchBytesMax'], 'receive.viewsScratchBytesMax');
    config.receive = { listen: read.address(receive['listen'], 'receive.listen'), groups, viewsMax, viewsPerGroupMax, viewsScratchBytesMax };
  }
  return config;
}

/** Every protected volume is one this appliance serves, and in one group only. */
export function checkProtectVolumes(protect: readonly ProtectConfig[], volumes: readonly VolumeConfig[]): void {
  const served = new Set(volumes.map((volume) => volume.name));
  const owner = new Map<string, string>();
  protect.forEach((entry, index) => {
    for (const name of entry.volumes) {
      if (!served.has(name)) throw new ConfigError(`protect[${index}].volumes`, `volume '${name}' is not one of this appliance's volumes`);
      const other = owner.get(name);
      if (other !== undefined) throw new ConfigError(`protect[${index}].volumes`, `volume '${name}' is already protected by group '${other}'`);
      owner.set(name, entry.group);
    }
  });
}
