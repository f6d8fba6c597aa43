/**
 * `lifeline appliance`: run one appliance (source and/or target role) from a
 * configuration file. See docs/appliance.md and examples/appliance-*.json.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { Appliance } from '../appliance/appliance.js';
import { ConfigError, parseApplianceConfig, type ApplianceConfig } from '../appliance/config.js';
import { controlChangesFileName, protectionInForce, type ControlChanges } from '../appliance/control-changes.js';
import { nodeFileSystem } from '../journal/file-system.js';
import { readStateFile } from '../util/state-file.js';
import { createLogger, type LogLevel } from '../util/logger.js';
import { UsageError } from './usage-error.js';

export const applianceUsage = `Usage: lifeline appliance --data DIR --config FILE [options]

Runs one appliance: serves its volumes over NBD through the tap and ships each
protection group's writes to its target appliance (source role), and/or
receives streams into journals and keeps replicas (target role), as the
configuration file says (JSON; see docs/appliance.md). Relative paths in the
file are taken from the data directory.

  --data DIR               the appliance's data directory (created if missing)
  --config FILE            configuration file (JSON)
  --check                  validate the configuration (and the control API changes recorded in --data) and exit
  --log-level LEVEL        debug, info, warn or error (default info)
  --log-format text|json   (default json)

Prints one line per address once listening ("listening nbd nbd://…",
"listening replication …", and last "listening control http://…"). On SIGINT or SIGTERM it
stops serving, waits (bounded) for the target to acknowledge what is queued,
and exits.`;

export function loadApplianceConfig(configPath: string, dataDirectory: string): ApplianceConfig {
  let text: string;
  try {
    text = fs.readFileSync(configPath, 'utf8');
  } catch (error) {
    throw new Error(`Cannot read the appliance configuration: path is ${configPath}`, { cause: error });
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (error) {
    throw new Error(`Cannot use the appliance configuration as it is not valid JSON (${(error as Error).message}): path is ${configPath}`);
  }
  try {
    return parseApplianceConfig(raw, dataDirectory);
  } catch (error) {
    if (error instanceof ConfigError) throw new Error(`Cannot use the appliance configuration: ${error.message}; path is ${configPath}`);
    throw error;
  }
}

/** What the next start makes of the control API's recorded changes in `dataDirectory`, if there are any (throws as the start would). */
async function describeControlChanges(config: ApplianceConfig, dataDirectory: string): Promise<string | undefined> {
  const recordPath = path.join(dataDirectory, controlChangesFileName);
  if (!fs.existsSync(recordPath)) return undefined;
  const recorded = (await readStateFile<ControlChanges>(nodeFileSystem, recordPath))!;
  const inForce = protectionInForce(config, recorded, recordPath);
  const when = new Date(recorded.recordedMs).toISOString();
  if (inForce.dropped) {
    return `control API changes recorded ${when} (groups: ${inForce.dropped.groups.join(', ') || 'none'}) will be dropped at the next start, as the configuration file changed since: path is ${recordPath}`;
  }
  return `protection in force at the next start: the control API changes recorded ${when} (groups: ${inForce.protect.map((entry) => entry.group).join(', ') || 'none'}; appliance rate limit ${inForce.rateLimitBytesPerSecond} bytes/s) over this file: path is ${recordPath}`;
}

export async function runAppliance(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      data: { type: 'string' },
      config: { type: 'string' },
      check: { type: 'boolean' },
      'log-level': { type: 'string' },
      'log-format': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
  });
  if (values.help) {
    console.log(applianceUsage);
    return 0;
  }
  if (!values.data) throw new UsageError('--data DIR is required');
  if (!values.config) throw new UsageError('--config FILE is required');
  const level = (values['log-level'] ?? 'info') as LogLevel;
  if (!['debug', 'info', 'warn', 'error'].includes(level)) throw new UsageError(`--log-level must be debug, info, warn or error, not '${level}'`);
  const format = values['log-format'] ?? 'json';
  if (format !== 'text' && format !== 'json') throw new UsageError(`--log-format must be text or json, not '${format}'`);
  const dataDirectory = path.resolve(values.data);
  const config = loadApplianceConfig(path.resolve(values.config), dataDirectory);
  if (values.check) {
    console.log(`configuration ok: appliance '${config.appliance.name}' of site '${config.appliance.site}', ${config.volumes.length} volumes, ${config.protect.length} protected groups, ${config.receive?.groups.length ?? 0} received groups`);
    const recorded = await describeControlChanges(config, dataDirectory);
    if (recorded) console.log(recorded);
    return 0;
  }
  const logger = createLogger({ level, format });
  const appliance = await Appliance.start({ config, dataDirectory, logger });
  if (appliance.addresses.nbd) console.log(`listening nbd nbd://${appliance.addresses.nbd}`);
  if (appliance.addresses.receive) console.log(`listening replication ${appliance.addresses.receive}`);
  // Last, so a script that waits for it has every address.
  console.log(`listening control http://${appliance.addresses.control}`);
  await new Promise<void>((resolve) => {
    const stop = (signal: string): void => {
      logger.info('stopping', { signal });
      resolve();
    };
    process.once('SIGINT', () => stop('SIGINT'));
    process.once('SIGTERM', () => stop('SIGTERM'));
  });
  await appliance.stop();
  logger.info('stopped');
  return 0;
}
