/**
 * Journal metadata: one small JSON document, replaced atomically (write a
 * temporary file, sync it, rename it over the old one, sync the directory), with
 * a CRC-32C so that a damaged file is noticed rather than trusted.
 */
import * as path from 'node:path';
import { readStateFile, StateFileDamagedError, writeStateFile } from '../util/state-file.js';
import type { JournalFileSystem } from './file-system.js';

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
  try {
    return await readStateFile<JournalMetadata>(fileSystem, path.join(directory, metadataFileName));
  } catch (error) {
    if (error instanceof StateFileDamagedError) throw new Error(`Cannot read journal metadata as its checksum does not match: path is ${error.filePath}`);
    throw error;
  }
}

export async function writeMetadata(fileSystem: JournalFileSystem, directory: string, metadata: JournalMetadata): Promise<void> {
  await writeStateFile(fileSystem, path.join(directory, metadataFileName), metadata);
}
