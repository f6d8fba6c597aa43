/**
 * The journal pool: one or more directories ("journal datastores"), each with
 * a capacity, from which journals take fixed-size storage units and to which
 * they give them back. The pool keeps the books (units and bytes per journal
 * and per datastore) and refuses a unit, with `DatastoreFullError`, before a
 * datastore passes its capacity or its filesystem's free space falls below a
 * floor, so that a journal never fills a disk.
 */
import * as path from 'node:path';
import { DatastoreFullError } from './errors.js';
import type { JournalFile, JournalFileSystem } from './file-system.js';

export interface DatastoreConfig {
  path: string;
  /** Bytes of units this datastore may hold, over all journals. */
  capacityBytes: number;
  /** Free bytes the filesystem must keep after a unit is taken. */
  freeBytesMin?: number;
}

export interface PoolUnit {
  number: number;
  path: string;
  datastore: string;
}

export interface PoolUsage {
  datastores: { path: string; capacityBytes: number; units: number; usedBytes: number }[];
  journals: Record<string, { units: number; usedBytes: number }>;
}

const unitFilePattern = /^(\d{12})\.unit$/;

export function unitFileName(number: number): string {
  return `${String(number).padStart(12, '0')}.unit`;
}

export function parseUnitFileName(name: string): number | undefined {
  const match = unitFilePattern.exec(name);
  return match ? Number(match[1]) : undefined;
}

export class JournalPool {
  private readonly datastores: DatastoreConfig[];
  /** datastore path → journal → unit count and unit size. */
  private readonly books = new Map<string, Map<string, { units: number; unitBytes: number }>>();

  constructor(readonly fileSystem: JournalFileSystem, datastores: DatastoreConfig[]) {
    if (datastores.length === 0) throw new Error('Cannot create a journal pool without datastores');
    this.datastores = datastores.map((datastore) => ({ ...datastore, path: path.normalize(datastore.path) }));
    for (const datastore of this.datastores) this.books.set(datastore.path, new Map());
  }

  unitDirectories(journal: string): string[] {
    return this.datastores.map((datastore) => path.join(datastore.path, journal));
  }

  private usedBytes(datastore: string): number {
    let total = 0;
    for (const entry of this.books.get(datastore)!.values()) total += entry.units * entry.unitBytes;
    return total;
  }

  private count(datastore: string, journal: string, unitBytes: number, delta: number): void {
    const journals = this.books.get(datastore)!;
    const entry = journals.get(journal) ?? { units: 0, unitBytes };
    entry.units += delta;
    journals.set(journal, entry);
  }

  /** Finds the journal's unit files in every datastore and adds them to the books. */
  async discover(journal: string, unitBytes: number): Promise<PoolUnit[]> {
    const found: PoolUnit[] = [];
    for (const datastore of this.datastores) {
      // Counted afresh: a journal reopened with the same pool must not be counted twice.
      this.books.get(datastore.path)!.delete(journal);
      const directory = path.join(datastore.path, journal);
      for (const name of await this.fileSystem.readdir(directory)) {
        const number = parseUnitFileName(name);
        if (number === undefined) continue;
        found.push({ number, path: path.join(directory, name), datastore: datastore.path });
        this.count(datastore.path, journal, unitBytes, 1);
      }
    }
    return found.sort((a, b) => a.number - b.number);
  }

  /** Creates, sizes and syncs a new unit file in the datastore with the most room. */
  async take(journal: string, number: number, unitBytes: number): Promise<{ unit: PoolUnit; file: JournalFile }> {
    const reasons: string[] = [];
    const candidates = [...this.datastores].sort((a, b) => (b.capacityBytes - this.usedBytes(b.path)) - (a.capacityBytes - this.usedBytes(a.path)));
    for (const datastore of candidates) {
      const used = this.usedBytes(datastore.path);
      if (used + unitBytes > datastore.capacityBytes) {
        reasons.push(`${datastore.path} holds ${used} of ${datastore.capacityBytes} bytes`);
        continue;
      }
      let free: number;
      try {
        free = await this.fileSystem.freeBytes(datastore.path);
      } catch (error) {
        // A missing datastore directory (an unmounted disk, say) is not created here: it would land on the wrong filesystem.
        reasons.push(`${datastore.path} cannot be used (${(error as Error).message})`);
        continue;
      }
      const floor = datastore.freeBytesMin ?? 0;
      if (free - unitBytes < floor) {
        reasons.push(`${datastore.path} has ${free} bytes free and must keep ${floor}`);
        continue;
      }
      // Counted before the awaits below so that concurrent takes cannot overbook.
      this.count(datastore.path, journal, unitBytes, 1);
      try {
        const directory = path.join(datastore.path, journal);
        await this.fileSystem.mkdir(directory);
        const unitPath = path.join(directory, unitFileName(number));
        const file = await this.fileSystem.open(unitPath, 'create');
        try {
          await file.allocate(unitBytes);
        } catch (error) {
          await file.close().catch(() => {});
          throw error;
        }
        await this.fileSystem.fsyncDirectory(directory);
        return { unit: { number, path: unitPath, datastore: datastore.path }, file };
      } catch (error) {
        this.count(datastore.path, journal, unitBytes, -1);
        if ((error as { code?: string }).code !== 'ENOSPC') throw error;
        // The filesystem could not reserve the unit: this datastore is full; try the next.
        await this.fileSystem.unlink(path.join(datastore.path, journal, unitFileName(number))).catch(() => {});
        reasons.push(`${datastore.path} has no room for a unit of ${unitBytes} bytes (ENOSPC)`);
        continue;
      }
    }
    throw new DatastoreFullError(journal, unitBytes, reasons);
  }

  /** Removes a unit file and takes it off the books. */
  async giveBack(journal: string, unit: PoolUnit, unitBytes: number): Promise<void> {
    try {
      await this.fileSystem.unlink(unit.path);
    } catch (error) {
      if ((error as { code?: string }).code !== 'ENOENT') throw error;
    }
    await this.fileSystem.fsyncDirectory(path.dirname(unit.path));
    this.count(unit.datastore, journal, unitBytes, -1);
  }

  usage(): PoolUsage {
    const journals: PoolUsage['journals'] = {};
    const datastores = this.datastores.map((datastore) => {
      let units = 0;
      for (const [journal, entry] of this.books.get(datastore.path)!) {
        units += entry.units;
        const total = (journals[journal] ??= { units: 0, usedBytes: 0 });
        total.units += entry.units;
        total.usedBytes += entry.units * entry.unitBytes;
      }
      return { path: datastore.path, capacityBytes: datastore.capacityBytes, units, usedBytes: this.usedBytes(datastore.path) };
    });
    return { datastores, journals };
  }
}
