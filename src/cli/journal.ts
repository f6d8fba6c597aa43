/**
 * `lifeline journal inspect DIR` and `lifeline journal verify DIR`: the offline
 * tool for a journal's metadata directory. Both only read.
 */
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { nodeFileSystem } from '../journal/file-system.js';
import { readMetadata, type JournalMetadata } from '../journal/metadata.js';
import { parseUnitFileName } from '../journal/pool.js';
import { decodeMarker, type CheckpointMarker } from '../journal/record.js';
import { judgeLogEnd, scanUnits, type ScanResult, type UnitRef } from '../journal/scan.js';
import { UsageError } from './usage-error.js';

export const journalUsage = `Usage: lifeline journal inspect|verify DIR [--json]

  inspect   list the journal's units, streams with their sequence ranges, the time
            range of its records and its checkpoints
  verify    check every record (header, checksum, order); exit 1 on damage, naming
            the unit and offset of the first damaged record, and on a torn tail

inspect exits 1 too when the journal is damaged (a record that was acknowledged, as
a later record or the metadata proves, cannot be read); the next open keeps what
precedes it, records the loss and cuts there, and the source resends what differs.

DIR is the journal's metadata directory (it holds journal.meta). Neither command
changes anything; a torn tail after a crash (nothing past it claims to be committed)
is reported by verify and cut when the journal next opens.`;

interface Survey {
  meta: JournalMetadata;
  units: (UnitRef & { released: boolean })[];
  scan: ScanResult;
  streams: Map<number, { first: number; last: number; records: number }>;
  timeMsMin: number;
  timeMsMax: number;
  markers: Map<string, { marker: CheckpointMarker; streams: Map<number, { sequence: number; timeMs: number; lsn: number }> }>;
  /** Damage: what open would refuse to cut silently (it records the loss and cuts). */
  problems: string[];
  /** A torn tail that the next open cuts (not damage: nothing past it was acknowledged). */
  tornTail: string | undefined;
}

async function survey(directory: string): Promise<Survey> {
  const meta = await readMetadata(nodeFileSystem, directory);
  if (!meta) throw new Error(`Cannot inspect the journal as its metadata is missing: path is ${path.join(directory, 'journal.meta')}`);
  const units: Survey['units'] = [];
  for (const unitDirectory of meta.unitDirectories) {
    for (const name of await nodeFileSystem.readdir(unitDirectory)) {
      const number = parseUnitFileName(name);
      if (number !== undefined) units.push({ number, path: path.join(unitDirectory, name), released: number < meta.unitFirst });
    }
  }
  units.sort((a, b) => a.number - b.number);
  const live = units.filter((unit) => !unit.released);
  const problems: string[] = [];
  for (let at = 1; at < live.length; at++) {
    if (live[at]!.number !== live[at - 1]!.number + 1) problems.push(`unit ${live[at - 1]!.number + 1} is missing`);
  }
  const streams: Survey['streams'] = new Map();
  const markers: Survey['markers'] = new Map();
  let timeMsMin = Infinity;
  let timeMsMax = -Infinity;
  const scan = await scanUnits({
    fileSystem: nodeFileSystem,
    units: live,
    unitBytes: meta.unitBytes,
    onRecord(header, _unit, _position, data) {
      const stream = streams.get(header.stream) ?? { first: header.sequence, last: header.sequence, records: 0 };
      stream.last = header.sequence;
      stream.records++;
      streams.set(header.stream, stream);
      timeMsMin = Math.min(timeMsMin, header.timeMs);
      timeMsMax = Math.max(timeMsMax, header.timeMs);
      if (data && header.kind === 4) {
        const marker = decodeMarker(data);
        const entry = markers.get(marker.id) ?? { marker, streams: new Map() };
        entry.streams.set(header.stream, { sequence: header.sequence, timeMs: header.timeMs, lsn: header.lsn });
        markers.set(marker.id, entry);
      }
    },
  });
  const last = scan.units[scan.units.length - 1];
  const { lsnEnd, past, verdict, proofLsn } = await judgeLogEnd(nodeFileSystem, scan, meta, meta.unitBytes);
  // The same words as the journal's open (describeLossPlace), so that both name the same first damaged record.
  const place = last ? `unit ${last.number} at offset ${last.endPosition}: ${last.stopReason}` : 'no storage unit is left';
  const proof = (past?.claimMax ?? 0) > lsnEnd ? `records past it (the first in unit ${past!.first!.unit} at offset ${past!.first!.position}) claim lsn ${proofLsn} was committed` : `the metadata says lsn ${proofLsn} was committed`;
  if (verdict === 'damage') problems.push(`damaged record: the log ended in ${place}, but ${proof}; records ${lsnEnd + 1}..${Math.max(proofLsn, past?.lsnMax ?? 0)} were acknowledged (${last?.path ?? meta.unitDirectories.join(', ')})`);
  const tornTail = verdict === 'torn-tail' ? `torn tail: the log ended in ${place}; nothing past it claims to be committed (${past?.records ?? 0} records of the last group past it), so the next open cuts it` : undefined;
  const firstLsn = scan.units.find((unit) => unit.records > 0)?.firstLsn;
  if (firstLsn !== undefined && firstLsn > meta.watermarkLsn + 1) problems.push(`records ${meta.watermarkLsn + 1}..${firstLsn - 1} are missing`);
  return { meta, units, scan, streams, timeMsMin, timeMsMax, markers, problems, tornTail };
}

const iso = (timeMs: number): string => (Number.isFinite(timeMs) ? new Date(timeMs).toISOString() : '-');

function report(result: Survey): object {
  const { meta, scan } = result;
  return {
    journal: meta.name,
    unitBytes: meta.unitBytes,
    generation: meta.generation,
    watermarkLsn: meta.watermarkLsn,
    promotingToLsn: meta.promotingToLsn,
    lsnLast: scan.lsnLast,
    oldestRecoverable: meta.watermarkLsn > 0 ? iso(meta.promotedTimeMsMax) : iso(meta.createdMs),
    units: result.units.map((unit) => {
      const scanned = scan.units.find((candidate) => candidate.number === unit.number);
      return {
        unit: unit.number,
        path: unit.path,
        state: unit.released ? 'released' : scanned ? 'in use' : 'beyond the log (spare)',
        records: scanned?.records ?? 0,
        lsn: scanned && scanned.records > 0 ? [scanned.firstLsn, scanned.lastLsn] : null,
        bytesUsed: scanned?.endPosition ?? 0,
        time: scanned && scanned.records > 0 ? [iso(scanned.timeMsMin), iso(scanned.timeMsMax)] : null,
      };
    }),
    streams: [...result.streams].sort((a, b) => a[0] - b[0]).map(([stream, entry]) => ({ stream, sequences: [entry.first, entry.last], records: entry.records, promotedThrough: meta.streamsPromoted[stream] ?? 0 })),
    time: [iso(result.timeMsMin), iso(result.timeMsMax)],
    checkpoints: [...result.markers.values()].map(({ marker, streams }) => ({
      id: marker.id,
      kind: marker.kind,
      name: marker.name,
      time: iso(Math.max(...[...streams.values()].map((entry) => entry.timeMs))),
      complete: marker.streams.every((stream) => streams.has(stream)),
      markers: Object.fromEntries([...streams].map(([stream, entry]) => [stream, entry.sequence])),
    })),
    problems: result.problems,
    tornTail: result.tornTail ?? null,
    losses: (meta.losses ?? []).map((loss) => ({ ...loss, timeFrom: iso(loss.timeMsFrom), healed: loss.healedTimeMs === undefined ? null : iso(loss.healedTimeMs) })),
  };
}

function printText(out: ReturnType<typeof report> & Record<string, any>): void {
  const lines: string[] = [];
  lines.push(`journal ${out.journal}: unit ${out.unitBytes} bytes, generation ${out.generation}, records through lsn ${out.lsnLast}, promoted through lsn ${out.watermarkLsn}${out.promotingToLsn ? ` (promoting to ${out.promotingToLsn})` : ''}`);
  lines.push(`oldest recoverable point ${out.oldestRecoverable}; records from ${out.time[0]} to ${out.time[1]}`);
  lines.push(`units (${out.units.length}):`);
  for (const unit of out.units) lines.push(`  ${String(unit.unit).padStart(6)}  ${unit.state.padEnd(22)} ${String(unit.records).padStart(8)} records  lsn ${unit.lsn ? unit.lsn.join('..') : '-'}  ${unit.bytesUsed} bytes used  ${unit.path}`);
  lines.push(`streams (${out.streams.length}):`);
  for (const stream of out.streams) lines.push(`  stream ${stream.stream}: sequences ${stream.sequences.join('..')} (${stream.records} records), promoted through ${stream.promotedThrough}`);
  lines.push(`checkpoints (${out.checkpoints.length}):`);
  for (const checkpoint of out.checkpoints) {
    lines.push(`  ${checkpoint.id}  ${checkpoint.kind}${checkpoint.name ? ` '${checkpoint.name}'` : ''}  ${checkpoint.time}  ${checkpoint.complete ? 'complete' : 'incomplete'}  markers ${JSON.stringify(checkpoint.markers)}`);
  }
  for (const loss of out.losses) {
    lines.push(`earlier ${loss.kind === 'damage' ? 'damage' : 'tail cut'} ${loss.id}: records ${loss.lsnFirst}..${loss.lsnLast} cut on open (unit ${loss.unit} at offset ${loss.position}: ${loss.reason}); points from ${loss.timeFrom} ${loss.healed ? `healed at ${loss.healed}` : 'not healed yet'}${loss.checkpoints.length > 0 ? `; checkpoints lost: ${loss.checkpoints.map((checkpoint: { id: string }) => checkpoint.id).join(', ')}` : ''}`);
  }
  if (out.tornTail) lines.push(`note: ${out.tornTail}`);
  for (const problem of out.problems) lines.push(`damage: ${problem}`);
  console.log(lines.join('\n'));
}

export async function runJournal(argv: string[]): Promise<number> {
  const [action, ...rest] = argv;
  if (action === '--help' || action === '-h' || action === 'help') {
    console.log(journalUsage);
    return 0;
  }
  if (action !== 'inspect' && action !== 'verify') throw new UsageError(`Unknown 'journal' subcommand '${action ?? ''}': try 'lifeline journal --help'`);
  const { values, positionals } = parseArgs({ args: rest, options: { json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } }, allowPositionals: true });
  if (values.help) {
    console.log(journalUsage);
    return 0;
  }
  if (positionals.length !== 1) throw new UsageError(`'journal ${action}' takes one directory`);
  const result = await survey(positionals[0]!);
  const out = report(result);
  if (action === 'inspect') {
    if (values.json) console.log(JSON.stringify(out, null, 2));
    else printText(out as ReturnType<typeof report> & Record<string, any>);
    // Damage is an error whichever command finds it; the first damaged record goes to stderr too.
    for (const problem of result.problems) console.error(`damage: ${problem}`);
    return result.problems.length === 0 ? 0 : 1;
  }
  const records = result.scan.units.reduce((sum, unit) => sum + unit.records, 0);
  const problems = result.tornTail ? [...result.problems, result.tornTail] : result.problems;
  if (values.json) console.log(JSON.stringify({ ok: problems.length === 0, records, units: result.scan.units.length, problems: result.problems, tornTail: result.tornTail ?? null }));
  else if (problems.length === 0) console.log(`ok: ${records} records in ${result.scan.units.length} units verified, lsn through ${result.scan.lsnLast}`);
  else {
    for (const problem of result.problems) console.error(`damage: ${problem}`);
    if (result.tornTail) console.error(result.tornTail);
  }
  return problems.length === 0 ? 0 : 1;
}
