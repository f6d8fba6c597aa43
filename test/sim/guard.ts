/**
 * A tripwire for nondeterminism. While armed, calls of `Date.now`,
 * `Math.random`, `setTimeout`, `setInterval`, `setImmediate` and crypto's
 * random functions made from the code under test (a stack frame in
 * `dist/src/`) are recorded as leaks: such a call would make the run depend
 * on the real clock, the real event loop or real randomness instead of the
 * seed. The calls still go through, so that nothing else (the test runner)
 * breaks; the run is then failed with the leak's stack.
 */
import { createRequire, syncBuiltinESMExports } from 'node:module';
import * as path from 'node:path';

const require = createRequire(import.meta.url);
const cryptoModule = require('node:crypto') as Record<string, unknown>;
const productMarker = `${path.sep}dist${path.sep}src${path.sep}`;

export interface Leak {
  api: string;
  stack: string;
}

let armed = 0;
const leaks: Leak[] = [];
let installed = false;

function check(api: string): void {
  if (armed === 0) return;
  const stack = new Error().stack ?? '';
  // Lines: the message, this function, the wrapper, then the caller.
  const frames = stack.split('\n').slice(3);
  if (frames.some((frame) => frame.includes(productMarker))) {
    leaks.push({ api, stack: frames.slice(0, 8).join('\n') });
  }
}

function wrap<T extends (...args: never[]) => unknown>(api: string, original: T): T {
  const wrapped = function (this: unknown, ...args: never[]): unknown {
    check(api);
    return original.apply(this, args);
  };
  Object.assign(wrapped, original);
  return wrapped as unknown as T;
}

function install(): void {
  if (installed) return;
  installed = true;
  Date.now = wrap('Date.now', Date.now);
  Math.random = wrap('Math.random', Math.random);
  const timers = globalThis as unknown as Record<string, (...args: never[]) => unknown>;
  for (const name of ['setTimeout', 'setInterval', 'setImmediate']) timers[name] = wrap(name, timers[name]!);
  for (const name of ['randomBytes', 'randomUUID', 'randomInt', 'randomFillSync']) {
    const original = cryptoModule[name];
    if (typeof original === 'function') cryptoModule[name] = wrap(`crypto.${name}`, original as (...args: never[]) => unknown);
  }
  syncBuiltinESMExports();
}

/** Arms the tripwire for the duration of `run`; returns its value and the leaks seen. */
export async function guarded<T>(run: () => Promise<T>): Promise<{ value: T; leaks: Leak[] }> {
  install();
  const start = leaks.length;
  armed++;
  try {
    const value = await run();
    return { value, leaks: leaks.slice(start) };
  } finally {
    armed--;
  }
}
