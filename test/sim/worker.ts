/**
 * A worker thread that runs simulation seeds for the test (one per core), so
 * that hundreds of seeds fit in the suite's time. Each seed is as
 * deterministic in a worker as anywhere: a run shares nothing with the others.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { runSimulation, type SimulationResult } from './simulation.js';

export interface WorkerRequest {
  seeds: number[];
  workarounds: string[];
}

/** What a worker sends back per seed: the result without the bulky parts of a passing run. */
export type WorkerReply = { type: 'result'; result: SimulationResult } | { type: 'done' };

const request = workerData as WorkerRequest;
for (const seed of request.seeds) {
  const result = await runSimulation({ seed, workarounds: request.workarounds });
  if (result.ok) {
    result.recent = [];
    result.parameters = {};
  }
  parentPort!.postMessage({ type: 'result', result } satisfies WorkerReply);
}
parentPort!.postMessage({ type: 'done' } satisfies WorkerReply);
