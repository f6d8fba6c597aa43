/**
 * The oracle: what the sources did, independently of the code under test.
 * Every entry pushed into a stream queue is recorded with its sequence, source
 * time and data; every acknowledgement a shipper saw is recorded too. From
 * that it computes what a volume must hold at any point of its stream.
 *
 * Each volume belongs to one source (one host writes a disk), so a volume's
 * state at a point is its owner's entries up to a sequence, applied in order;
 * zero and trim ranges read as zeroes (the replica's block semantics).
 */

export type OracleEntryKind = 'write' | 'zero' | 'trim' | 'checkpoint';

export interface OracleEntry {
  sequence: number;
  kind: OracleEntryKind;
  /** The source's volume id (0 for a checkpoint marker). */
  volume: number;
  offset: number;
  lengthBytes: number;
  /** Source time, whole ms. */
  timeMs: number;
  /** A private copy of the written bytes. */
  data?: Buffer;
  checkpointId?: string;
}

export interface OracleVolume {
  /** Journal volume id: the index in the target group's volume list. */
  journalVolume: number;
  source: number;
  /** The volume's id within its source's stream. */
  sourceVolume: number;
  name: string;
  sizeBytes: number;
}

export interface OracleCheckpoint {
  id: string;
  /** Source index → sequence of its marker. */
  markers: Map<number, number>;
  /** Pushed into every source's stream (a committed checkpoint), or only some (abandoned). */
  complete: boolean;
}

export class OracleStream {
  readonly entries: OracleEntry[] = [];
  /** Highest sequence a shipper was told is durable. */
  acknowledged = 0;

  get sequenceLast(): number {
    return this.entries.length;
  }

  entry(sequence: number): OracleEntry | undefined {
    return this.entries[sequence - 1];
  }

  /** The last sequence whose source time is at most `timeMs` (times never go down within a stream). */
  sequenceAtTime(timeMs: number): number {
    let low = 0;
    let high = this.entries.length;
    while (low < high) {
      const middle = (low + high) >> 1;
      if (this.entries[middle]!.timeMs <= timeMs) low = middle + 1;
      else high = middle;
    }
    return low;
  }
}

export class Oracle {
  readonly streams: OracleStream[];
  readonly checkpoints = new Map<string, OracleCheckpoint>();
  bytesWritten = 0;

  constructor(readonly volumes: readonly OracleVolume[], sourceCount: number) {
    this.streams = Array.from({ length: sourceCount }, () => new OracleStream());
  }

  record(source: number, entry: OracleEntry): void {
    const stream = this.streams[source]!;
    if (entry.sequence !== stream.sequenceLast + 1) throw new Error(`assertion: source ${source} pushed sequence ${entry.sequence} after ${stream.sequenceLast}`);
    const last = stream.entries[stream.entries.length - 1];
    if (last && entry.timeMs < last.timeMs) throw new Error('assertion: source time went down');
    stream.entries.push(entry);
    if (entry.kind === 'write') this.bytesWritten += entry.lengthBytes;
  }

  acknowledged(source: number, sequence: number): void {
    const stream = this.streams[source]!;
    stream.acknowledged = Math.max(stream.acknowledged, sequence);
  }

  volume(journalVolume: number): OracleVolume {
    return this.volumes[journalVolume]!;
  }

  /** The volumes' contents after their owners' entries up to each requested sequence (inclusive). */
  states(requests: readonly { journalVolume: number; sequence: number }[]): Buffer[] {
    const out: Buffer[] = new Array(requests.length);
    const byVolume = new Map<number, number[]>();
    requests.forEach((request, at) => {
      const list = byVolume.get(request.journalVolume) ?? [];
      list.push(at);
      byVolume.set(request.journalVolume, list);
    });
    for (const [journalVolume, indexes] of byVolume) {
      const volume = this.volume(journalVolume);
      const entries = this.streams[volume.source]!.entries;
      indexes.sort((a, b) => requests[a]!.sequence - requests[b]!.sequence);
      const bytes = Buffer.alloc(volume.sizeBytes);
      let applied = 0;
      for (const at of indexes) {
        const until = Math.min(requests[at]!.sequence, entries.length);
        for (; applied < until; applied++) {
          const entry = entries[applied]!;
          if (entry.kind === 'checkpoint' || entry.volume !== volume.sourceVolume) continue;
          if (entry.kind === 'write') entry.data!.copy(bytes, entry.offset);
          else bytes.fill(0, entry.offset, entry.offset + entry.lengthBytes);
        }
        out[at] = Buffer.from(bytes);
      }
    }
    return out;
  }
}

/** Where two buffers first differ, for messages. */
export function firstDifference(actual: Buffer, expected: Buffer): string {
  const length = Math.min(actual.length, expected.length);
  for (let at = 0; at < length; at++) {
    if (actual[at] !== expected[at]) return `first difference at byte ${at}: ${actual[at]} where ${expected[at]} was expected`;
  }
  return actual.length === expected.length ? 'no difference' : `lengths ${actual.length} and ${expected.length}`;
}
