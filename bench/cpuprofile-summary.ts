/**
 * Summarises V8 CPU profiles (`node --cpu-prof` writes them as .cpuprofile JSON):
 * self time and total (inclusive) time per function, summed over every file given.
 *
 *   node dist/bench/cpuprofile-summary.js [--top N] FILE.cpuprofile...
 *
 * Self time of a sample is the time delta V8 recorded for it, charged to the
 * node (function) on top of the stack. Total time charges it once to every
 * distinct function on that stack. Percentages are of all sampled time; the
 * "busy" percentage leaves out (idle).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
  columnNumber: number;
}

interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

export interface FunctionTime {
  key: string;
  selfUs: number;
  totalUs: number;
}

function keyOf(frame: CallFrame): string {
  const name = frame.functionName || '(anonymous)';
  if (!frame.url) return name;
  let where = frame.url.replace(/^file:\/\//, '');
  const dist = where.indexOf('/dist/');
  if (dist >= 0) where = where.slice(dist + 1);
  return `${name} ${where}:${frame.lineNumber + 1}`;
}

export function summarise(profiles: CpuProfile[]): { functions: FunctionTime[]; totalUs: number; idleUs: number } {
  const byKey = new Map<string, FunctionTime>();
  let totalUs = 0;
  let idleUs = 0;
  for (const profile of profiles) {
    const nodes = new Map<number, ProfileNode>();
    const parent = new Map<number, number>();
    for (const node of profile.nodes) {
      nodes.set(node.id, node);
      for (const child of node.children ?? []) parent.set(child, node.id);
    }
    const stackKeys = new Map<number, string[]>();
    const keysFor = (id: number): string[] => {
      let keys = stackKeys.get(id);
      if (keys) return keys;
      const set = new Set<string>();
      for (let at: number | undefined = id; at !== undefined; at = parent.get(at)) set.add(keyOf(nodes.get(at)!.callFrame));
      keys = [...set];
      stackKeys.set(id, keys);
      return keys;
    };
    for (let i = 0; i < profile.samples.length; i++) {
      const id = profile.samples[i]!;
      const deltaUs = Math.max(0, profile.timeDeltas[i] ?? 0);
      const top = keyOf(nodes.get(id)!.callFrame);
      totalUs += deltaUs;
      if (top === '(idle)') idleUs += deltaUs;
      for (const key of keysFor(id)) {
        let entry = byKey.get(key);
        if (!entry) byKey.set(key, (entry = { key, selfUs: 0, totalUs: 0 }));
        entry.totalUs += deltaUs;
        if (key === top) entry.selfUs += deltaUs;
      }
    }
  }
  return { functions: [...byKey.values()], totalUs, idleUs };
}

function main(): void {
  const { values, positionals } = parseArgs({ options: { top: { type: 'string', default: '30' } }, allowPositionals: true });
  if (positionals.length === 0) {
    console.error('Usage: node dist/bench/cpuprofile-summary.js [--top N] FILE.cpuprofile...');
    process.exit(2);
  }
  const top = Number(values.top);
  const profiles = positionals.map((file) => JSON.parse(fs.readFileSync(file, 'utf8')) as CpuProfile);
  const { functions, totalUs, idleUs } = summarise(profiles);
  const busyUs = totalUs - idleUs;
  const pct = (us: number, of: number): string => `${((100 * us) / of).toFixed(1)}%`.padStart(6);
  console.log(`${positionals.length} profile(s): ${positionals.map((file) => path.basename(file)).join(', ')}`);
  console.log(`sampled ${(totalUs / 1e6).toFixed(2)} s, idle ${(idleUs / 1e6).toFixed(2)} s, busy ${(busyUs / 1e6).toFixed(2)} s\n`);
  console.log(`Top ${top} by self time (% of busy time, % of all time):`);
  console.log(`${'self ms'.padStart(9)} ${'busy%'.padStart(6)} ${'all%'.padStart(6)}  function`);
  for (const entry of [...functions].sort((a, b) => b.selfUs - a.selfUs).slice(0, top)) {
    const busy = entry.key === '(idle)' ? '     -' : pct(entry.selfUs, busyUs);
    console.log(`${(entry.selfUs / 1000).toFixed(1).padStart(9)} ${busy} ${pct(entry.selfUs, totalUs)}  ${entry.key}`);
  }
  console.log(`\nTop ${top} by total (inclusive) time, leaving out (root), (idle) and (program):`);
  console.log(`${'total ms'.padStart(9)} ${'busy%'.padStart(6)}  function`);
  for (const entry of [...functions]
    .filter((item) => !['(root)', '(idle)', '(program)'].includes(item.key))
    .sort((a, b) => b.totalUs - a.totalUs)
    .slice(0, top)) {
    console.log(`${(entry.totalUs / 1000).toFixed(1).padStart(9)} ${pct(entry.totalUs, busyUs)}  ${entry.key}`);
  }
}

main();
