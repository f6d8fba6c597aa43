/**
 * Changes made through the control API (protection added or removed, rate limits set) outlive a
 * restart: `<data>/control-changes.json` records the protection and limits in force after each
 * change, with a digest of what the configuration file said at the time. At the next start:
 *  - the file unchanged since: the recorded protection and limits are used, so a group protected
 *    through the API stays protected, and a removed one stays removed;
 *  - the file edited since (its volumes, protection or limit differ): the operator's newer word
 *    wins; the record is dropped and the log names what it held.
 */
import { checkProtectVolumes, ConfigError, digestOf, parseProtectConfig, protectConfigAsFileEntry, type ApplianceConfig, type ProtectConfig } from './config.js';

export const controlChangesFileName = 'control-changes.json';

export interface ControlChanges {
  version: 1;
  /** `configFileDigest` of the configuration file the changes were made over. */
  fileDigest: string;
  /** When the last change was recorded (ms since the epoch). */
  recordedMs: number;
  rateLimitBytesPerSecond: number;
  /** Every group protected as a source, in the order they were added, with its current limit, as the file writes it. */
  protect: Record<string, unknown>[];
}

/** The record of what is in force now. */
export function controlChangesNow(config: ApplianceConfig, protect: readonly ProtectConfig[], rateLimitBytesPerSecond: number, nowMs: number): ControlChanges {
  return { version: 1, fileDigest: configFileDigest(config), recordedMs: nowMs, rateLimitBytesPerSecond, protect: protect.map(protectConfigAsFileEntry) };
}

/** What the control API's changes are made over: the file's volumes, protection and limit (as written, when read from a file). */
export function configFileDigest(config: ApplianceConfig): string {
  return config.fileDigest ?? digestOf({ volumes: config.volumes, protect: config.protect, rateLimitBytesPerSecond: config.rateLimitBytesPerSecond });
}

export interface ProtectionInForce {
  protect: ProtectConfig[];
  rateLimitBytesPerSecond: number;
  /** Where it came from: the file alone, or the file with the recorded changes. */
  from: 'file' | 'control-changes';
  /** The record was made over another version of the file, so it was not used. */
  dropped?: { recordedMs: number; groups: string[]; rateLimitBytesPerSecond: number };
}

/**
 * The protection and appliance limit to start with, given the file and the record (if any).
 * A record made over this very file is checked as a control API request would be; one that does
 * not check out is an error naming `recordPath`, never a silent change of protection.
 */
export function protectionInForce(config: ApplianceConfig, recorded: ControlChanges | undefined, recordPath: string): ProtectionInForce {
  const fromFile: ProtectionInForce = { protect: config.protect, rateLimitBytesPerSecond: config.rateLimitBytesPerSecond, from: 'file' };
  if (!recorded) return fromFile;
  if (recorded.fileDigest !== configFileDigest(config)) {
    const groups = Array.isArray(recorded.protect) ? recorded.protect.map((entry) => String((entry as Record<string, unknown> | null)?.['group'])) : [];
    return { ...fromFile, dropped: { recordedMs: recorded.recordedMs, groups, rateLimitBytesPerSecond: recorded.rateLimitBytesPerSecond } };
  }
  if (recorded.version !== 1) throw new Error(`Cannot use the control API's recorded changes as their version ${String(recorded.version)} is unknown: path is ${recordPath}`);
  try {
    if (!Array.isArray(recorded.protect)) throw new ConfigError('protect', 'expected a list');
    const protect = recorded.protect.map((entry, index) => parseProtectConfig(entry, `protect[${index}]`, '/'));
    checkProtectVolumes(protect, config.volumes);
    const rate = recorded.rateLimitBytesPerSecond;
    if (!Number.isSafeInteger(rate) || rate < 0) throw new ConfigError('rateLimitBytesPerSecond', 'expected a whole number of at least 0');
    return { protect, rateLimitBytesPerSecond: rate, from: 'control-changes' };
  } catch (error) {
    throw new Error(`Cannot use the control API's recorded changes (${(error as Error).message}): path is ${recordPath}`, { cause: error });
  }
}
