/**
 * The in-memory index of record headers (never data), in journal order.
 *
 * Struct of arrays in chunks of 65,536 records: 41 bytes per record (unit 4,
 * position 4, offset 8, length 4, time 8, sequence 8, stream 2, volume 2,
 * kind 1), and at most one partly filled chunk of slack. Row r of the index is
 * lsn `baseLsn + r`; whole chunks at the front are dropped once promoted.
 */

export const indexChunkShift = 16;
export const indexChunkRecords = 1 << indexChunkShift;
const chunkMask = indexChunkRecords - 1;

export interface IndexChunk {
  unit: Uint32Array;
  position: Uint32Array;
  offset: Float64Array;
  lengthBytes: Uint32Array;
  timeMs: Float64Array;
  sequence: Float64Array;
  stream: Uint16Array;
  volume: Uint16Array;
  kind: Uint8Array;
}

function newChunk(): IndexChunk {
  return {
    unit: new Uint32Array(indexChunkRecords),
    position: new Uint32Array(indexChunkRecords),
    offset: new Float64Array(indexChunkRecords),
    lengthBytes: new Uint32Array(indexChunkRecords),
    timeMs: new Float64Array(indexChunkRecords),
    sequence: new Float64Array(indexChunkRecords),
    stream: new Uint16Array(indexChunkRecords),
    volume: new Uint16Array(indexChunkRecords),
    kind: new Uint8Array(indexChunkRecords),
  };
}

export const indexBytesPerRecord = 4 + 4 + 8 + 4 + 8 + 8 + 2 + 2 + 1;

export interface IndexEntry {
  lsn: number;
  unit: number;
  position: number;
  offset: number;
  lengthBytes: number;
  timeMs: number;
  sequence: number;
  stream: number;
  volume: number;
  kind: number;
}

export class RecordIndex {
  /** Lsn of row 0. */
  baseLsn: number;
  /** Rows held (from baseLsn). */
  count = 0;
  readonly chunks: IndexChunk[] = [];

  constructor(baseLsn: number) {
    this.baseLsn = baseLsn;
  }

  /** Lsn of the newest record held (baseLsn - 1 when empty). */
  get lastLsn(): number {
    return this.baseLsn + this.count - 1;
  }

  add(entry: Omit<IndexEntry, 'unit' | 'position'>, unit: number, position: number): void {
    if (entry.lsn !== this.baseLsn + this.count) throw new Error(`assertion: index expected lsn ${this.baseLsn + this.count}, got ${entry.lsn}`);
    const row = this.count;
    if ((row >>> indexChunkShift) === this.chunks.length) this.chunks.push(newChunk());
    const chunk = this.chunks[row >>> indexChunkShift]!;
    const at = row & chunkMask;
    chunk.unit[at] = unit;
    chunk.position[at] = position;
    chunk.offset[at] = entry.offset;
    chunk.lengthBytes[at] = entry.lengthBytes;
    chunk.timeMs[at] = entry.timeMs;
    chunk.sequence[at] = entry.sequence;
    chunk.stream[at] = entry.stream;
    chunk.volume[at] = entry.volume;
    chunk.kind[at] = entry.kind;
    this.count++;
  }

  has(lsn: number): boolean {
    return lsn >= this.baseLsn && lsn < this.baseLsn + this.count;
  }

  /** Chunk and slot of an lsn the index holds. */
  locate(lsn: number): { chunk: IndexChunk; at: number } {
    const row = lsn - this.baseLsn;
    return { chunk: this.chunks[row >>> indexChunkShift]!, at: row & chunkMask };
  }

  get(lsn: number): IndexEntry {
    const { chunk, at } = this.locate(lsn);
    return {
      lsn,
      unit: chunk.unit[at]!,
      position: chunk.position[at]!,
      offset: chunk.offset[at]!,
      lengthBytes: chunk.lengthBytes[at]!,
      timeMs: chunk.timeMs[at]!,
      sequence: chunk.sequence[at]!,
      stream: chunk.stream[at]!,
      volume: chunk.volume[at]!,
      kind: chunk.kind[at]!,
    };
  }

  /** Drops whole chunks whose records all have lsn <= `lsn` (promoted). */
  dropThrough(lsn: number): void {
    while (this.chunks.length > 1 && this.baseLsn + indexChunkRecords - 1 <= lsn) {
      this.chunks.shift();
      this.baseLsn += indexChunkRecords;
      this.count -= indexChunkRecords;
    }
    if (this.count > 0 && this.lastLsn <= lsn) {
      // Everything held is promoted: start again at the next lsn.
      this.baseLsn = this.lastLsn + 1;
      this.chunks.length = 0;
      this.count = 0;
    }
  }

  /** Bytes of memory the arrays take (their byteLength, including the last chunk's slack). */
  allocatedBytes(): number {
    let total = 0;
    for (const chunk of this.chunks) for (const column of Object.values(chunk) as ArrayBufferView[]) total += column.byteLength;
    return total;
  }
}
