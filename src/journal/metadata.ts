/**
 * Journal metadata: one small JSON document, replaced atomically (write a
 * temporary file, sync it, rename it over the old one, sync the directory), with
 * a CRC-32C so that a damaged file is noticed rather than trusted.
 */
import * as path from 'node:path';
import { native } from '../native/index.js';
import { readWholeFile, type JournalFileSystem } from './file-system.js';

export const metadataFileName = 'journal.meta';

export interface JournalMetadata {
  version: 1;
  name: string;
  createdMs: number;
  unitBytes: number;
  /** Directories the units live in (`<datastore>/<journal name>/`), for the offline tool. */
  unitDirectories: string[];
  /** Bumped on every open; records carry it (see README: stale records after a cut). */
  generation: number;
  /** Every record with lsn <= watermark is in the replicas (flushed). */
  watermarkLsn: number;
  /** Promotion in progress up to this lsn: on open, it is finished before anything else. */
  promotingToLsn: number;
  /** Units numbered below this were released (their files may linger after a crash). */
  unitFirst: number;
  /** Largest source time among promoted records: the oldest recoverable point. */
  promotedTimeMsMax: number;
  /** Per stream, the last promoted sequence number. */
  streamsPromoted: Record<string, number>;
  /** Set when the hard limit promoted history early; cleared when the window is whole again. */
  historyShortenedMs: number;
}

export async function readMetadata(fileSystem: JournalFileSystem, directory: string): Promise<JournalMetadata | undefined> {
  const names = await fileSystem.readdir(directory);
  if (!names.includes(metadataFileName)) return undefined;
  const text = (await readWholeFile(fileSystem, path.join(directory, metadataFileName))).toString('utf8');
  const newline = text.lastIndexOf('\n', text.length - 2);
  const body = text.slice(0, newline);
  const crc = Number.parseInt(text.slice(newline + 1).trim(), 16);
  if (newline < 0 || crc !== native.crc32c(Buffer.from(body, 'utf8'), 0) >>> 0) {
    throw new Error(`Cannot read journal metadata as its checksum does not match: path is ${path.join(directory, metadataFileName)}`);
  }
  return JSON.parse(body) as JournalMetadata;
}

export async function writeMetadata(fileSystem: JournalFileSystem, directory: string, metadata: JournalMetadata): Promise<void> {
  const body = JSON.stringify(metadata);
  const crc = native.crc32c(Buffer.from(body, 'utf8'), 0) >>> 0;
  const temporary = path.join(directory, `${metadataFileName}.tmp`);
  const file = await fileSystem.open(temporary, 'create');
  try {
    await file.pwrite(Buffer.from(`${body}\n${crc.toString(16)}\n`, 'utf8'), 0);
    await file.fsync();
  } finally {
    await file.close();
  }
  await fileSystem.rename(temporary, path.join(directory, metadataFileName));
  await fileSystem.fsyncDirectory(directory);
}
