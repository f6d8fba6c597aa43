/**
 * Small JSON state files replaced atomically: write a temporary file, sync it,
 * rename it over the old one, sync the directory; a CRC-32C on the last line
 * makes a damaged file an error instead of a silently different state.
 */
import * as path from 'node:path';
import { native } from '../native/index.js';
import { readWholeFile, type JournalFileSystem } from '../journal/file-system.js';

export class StateFileDamagedError extends Error {
  constructor(readonly filePath: string) {
    super(`Cannot read state file as its checksum does not match: path is ${filePath}`);
    this.name = 'StateFileDamagedError';
  }
}

/** The file's JSON value, or undefined when the file does not exist. */
export async function readStateFile<T>(fileSystem: JournalFileSystem, filePath: string): Promise<T | undefined> {
  const names = await fileSystem.readdir(path.dirname(filePath));
  if (!names.includes(path.basename(filePath))) return undefined;
  const text = (await readWholeFile(fileSystem, filePath)).toString('utf8');
  const newline = text.lastIndexOf('\n', text.length - 2);
  const body = text.slice(0, newline);
  const crc = Number.parseInt(text.slice(newline + 1).trim(), 16);
  if (newline < 0 || crc !== native.crc32c(Buffer.from(body, 'utf8'), 0) >>> 0) throw new StateFileDamagedError(filePath);
  return JSON.parse(body) as T;
}

/** Writes under way, per file system and path: two writers of one file would share its temporary file. */
const writesUnderWay = new WeakMap<JournalFileSystem, Map<string, Promise<void>>>();

/**
 * Replaces the file atomically. Writes of the same file are serialised, in call order: two at once
 * would write one temporary file together and rename it twice (a torn or failed replacement).
 */
export function writeStateFile(fileSystem: JournalFileSystem, filePath: string, value: unknown): Promise<void> {
  let writes = writesUnderWay.get(fileSystem);
  if (!writes) {
    writes = new Map();
    writesUnderWay.set(fileSystem, writes);
  }
  const byPath = writes;
  const previous = byPath.get(filePath) ?? Promise.resolve();
  const run = previous.then(() => writeNow(fileSystem, filePath, value));
  const settled = run.then(() => undefined, () => undefined);
  byPath.set(filePath, settled);
  void settled.then(() => {
    if (byPath.get(filePath) === settled) byPath.delete(filePath);
  });
  return run;
}

async function writeNow(fileSystem: JournalFileSystem, filePath: string, value: unknown): Promise<void> {
  const body = JSON.stringify(value);
  const crc = native.crc32c(Buffer.from(body, 'utf8'), 0) >>> 0;
  const directory = path.dirname(filePath);
  const temporary = `${filePath}.tmp`;
  const file = await fileSystem.open(temporary, 'create');
  try {
    await file.pwrite(Buffer.from(`${body}\n${crc.toString(16)}\n`, 'utf8'), 0);
    await file.fsync();
  } finally {
    await file.close();
  }
  await fileSystem.rename(temporary, filePath);
  await fileSystem.fsyncDirectory(directory);
}
