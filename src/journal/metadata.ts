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
  /**
   * A commit point known to be acknowledged (every lsn up to it), written with every metadata
   * update: a log that ends before it on open is damaged, not torn.
   */
  lsnCommitted?: number;
  /** Set by a clean close to the last acknowledged lsn (removed at the next open): nothing lies past it. */
  lsnClosed?: number;
  /** What open had to cut from the log, newest last (see `JournalLoss`). */
  losses?: JournalLoss[];
}

/**
 * Records that open cut from the log. `damage`: the log ended at a record that was acknowledged (a
 * later record or the metadata says so): every record from `lsnFirst` on is gone although the
 * source was told it was durable. `tail-cut`: a torn tail was cut, and checkpoint markers lay past
 * it (never acknowledged, or the source reports the loss when it reconnects).
 */
export interface JournalLoss {
  id: string;
  kind: 'damage' | 'tail-cut';
  detectedMs: number;
  /** Where the log ended, and why (the first damaged record). */
  unit: number;
  position: number;
  reason: string;
  /** The first lsn lost, and the last known to have existed (claimed committed or found past the end). */
  lsnFirst: number;
  lsnLast: number;
  /** Source time from which no point is an image of the source until the streams heal. */
  timeMsFrom: number;
  /** Streams that may have lost records: the sequence kept, and the largest seen past the end (0: none seen). */
  streams: { stream: number; sequenceKept: number; sequenceSeenMax: number }[];
  /** True when records past the end were seen but which stream lost the damaged record is not known. */
  streamsUnknown: boolean;
  /** Checkpoints with a marker past the end: not recoverable. */
  checkpoints: { id: string; kind: string; name?: string }[];
  /** A promotion into the replicas was under way past the damage: they may hold part of the lost records. */
  replicasTouched?: boolean;
  /** Source time from which points are images of the source again (the heal's end); absent until then. */
  healedTimeMs?: number;
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
