/** One-line summaries and failure reports of simulation runs. */
import { replayCommand, type SimulationResult } from './simulation.js';

export function describeResult(result: SimulationResult): string {
  const { stats } = result;
  const faults = Object.entries(stats.faults)
    .filter(([, count]) => count > 0)
    .map(([kind, count]) => `${kind} ${count}`)
    .join(', ');
  return (
    `seed ${result.seed}: ${result.ok ? 'ok' : 'FAILED'} in ${stats.virtualMs} virtual ms, ${stats.events} events; ` +
    `${stats.sources} sources, ${stats.volumes} volumes, ${stats.entries} entries, ${stats.bytesWritten} bytes, ${stats.checkpoints} checkpoints; ` +
    `faults: ${faults}; target boots ${stats.targetBoots} (power ${stats.powerCrashes}, kill ${stats.processKills}, while booting ${stats.crashesWhileBooting}, tails cut ${stats.tailCuts}); ` +
    `views ${stats.viewsChecked} + ${stats.checkpointViewsChecked} at checkpoints; digest ${result.digest.slice(0, 16)}`
  );
}

export function failureReport(result: SimulationResult): string {
  return [
    `seed ${result.seed} FAILED:`,
    ...result.violations.map((violation) => `  - ${violation}`),
    `  parameters: ${JSON.stringify(result.parameters)}`,
    '  last events:',
    ...result.recent.map((line) => `    ${line}`),
    `  replay: ${replayCommand(result.seed)}`,
  ].join('\n');
}
