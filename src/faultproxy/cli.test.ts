import { test, type TestContext } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { setTimeout as delay } from 'node:timers/promises';
import { lifelineBin, run } from '../../test/helpers.js';
import { connectClient, startServer, until } from './testing.js';

interface ProxyProcess {
  child: ChildProcess;
  port: number;
  stdoutLines(): string[];
  stderr(): string;
  /** Writes one control line and waits for the reply carrying its id. */
  command(body: Record<string, unknown> | string): Promise<Record<string, unknown>>;
  /** SIGTERM by pid; resolves with the exit code. */
  stop(): Promise<number | null>;
}

/** Starts `lifeline fault-proxy` as a process, with stdin open for control lines; it is killed after the test. */
async function startFaultProxy(t: TestContext, args: string[]): Promise<ProxyProcess> {
  const child = spawn(lifelineBin, ['fault-proxy', ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (chunk) => (stdout += chunk));
  child.stderr!.on('data', (chunk) => (stderr += chunk));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) process.kill(child.pid!, 'SIGKILL');
  });
  const lines = (): string[] => stdout.split('\n').filter((line) => line !== '');
  await until(() => /^listening /m.test(stdout) || child.exitCode !== null, 'the fault proxy to listen', 15_000);
  const match = /^listening 127\.0\.0\.1:(\d+)$/m.exec(stdout);
  if (!match) throw new Error(`fault-proxy did not start\nstdout: ${stdout}\nstderr: ${stderr}`);
  let idLast = 0;
  return {
    child,
    port: Number(match[1]),
    stdoutLines: lines,
    stderr: () => stderr,
    async command(body) {
      const id = ++idLast;
      child.stdin!.write((typeof body === 'string' ? body : JSON.stringify({ id, ...body })) + '\n');
      const find = (): Record<string, unknown> | undefined =>
        lines()
          .filter((line) => line.startsWith('{'))
          .map((line) => JSON.parse(line) as Record<string, unknown>)
          .find((reply) => (typeof body === 'string' ? reply.id === undefined && reply.ok === false : reply.id === id));
      await until(() => find() !== undefined, `the reply to ${JSON.stringify(body)}`);
      return find()!;
    },
    async stop() {
      if (child.exitCode === null && child.signalCode === null) process.kill(child.pid!, 'SIGTERM');
      return exited;
    },
  };
}

test('lifeline fault-proxy forwards with faults from flags and obeys JSON control lines on stdin', async (t) => {
  const echo = await startServer('echo');
  t.after(() => echo.close());
  const latencyMs = 100;
  const proxy = await startFaultProxy(t, ['--listen', '127.0.0.1:0', '--target', `127.0.0.1:${echo.port}`, '--latency-ms', String(latencyMs), '--seed', '7']);
  // stderr is a separate pipe: the seed line may arrive after 'listening'.
  await until(() => /seed 7 \(replay with --seed 7\)/.test(proxy.stderr()), 'the seed on stderr');
  const recorder = await connectClient(proxy.port);
  t.after(() => recorder.socket.destroy());

  const started = performance.now();
  recorder.socket.write('ping|');
  await until(() => recorder.length >= 5, 'the delayed echo');
  const roundTripMs = performance.now() - started;
  assert.ok(roundTripMs >= 2 * latencyMs - 5, `a round trip took ${roundTripMs.toFixed(1)} ms, expected ≥ ${2 * latencyMs}`);

  const set = await proxy.command({ setFaults: { latencyMs: 0, blackhole: 'hold' } });
  assert.equal(set.ok, true);
  assert.deepEqual((set.faults as Record<string, unknown>).blackhole, 'hold');
  recorder.socket.write('held');
  await delay(150);
  assert.equal(recorder.length, 5, 'held bytes do not come back');
  assert.equal((await proxy.command({ heal: true })).ok, true);
  await until(() => recorder.length >= 9, 'the held bytes after heal');
  assert.equal(recorder.received().toString(), 'ping|held');

  const stats = (await proxy.command({ stats: true })).stats as { connectionsOpen: number; bytesForwarded: { upstream: number; downstream: number } };
  assert.equal(stats.connectionsOpen, 1);
  assert.deepEqual(stats.bytesForwarded, { upstream: 9, downstream: 9 });

  const refused = await proxy.command({ setFaults: { latencyMs: -1 } });
  assert.equal(refused.ok, false);
  assert.match(String(refused.error), /'latencyMs' to -1/);
  assert.match(String((await proxy.command({ frobnicate: true })).error), /unknown control command 'frobnicate'/);
  assert.match(String((await proxy.command('not json')).error), /Cannot read the control line as JSON/);

  const reset = await proxy.command({ resetAll: true });
  assert.equal(reset.connectionsReset, 1);
  await recorder.closed;
  assert.equal(recorder.error?.code, 'ECONNRESET');

  assert.equal(await proxy.stop(), 0);
  const summary = proxy.stdoutLines().map((line) => (line.startsWith('{') ? (JSON.parse(line) as Record<string, unknown>) : {})).find((line) => line.event === 'fault-proxy-summary');
  assert.ok(summary, `a summary line on exit: ${proxy.stdoutLines().join('\n')}`);
  assert.equal(summary.seed, 7);
  assert.equal((summary.faultsApplied as { resets: number }).resets, 1);
});

test('lifeline fault-proxy refuses bad arguments with exit code 2 and is listed in the help', async () => {
  const cases: { args: string[]; message: RegExp }[] = [
    { args: [], message: /Give --target HOST:PORT/ },
    { args: ['--target', 'nowhere'], message: /Cannot read --target 'nowhere': expected HOST:PORT/ },
    { args: ['--target', '127.0.0.1:1', '--blackhole', 'sometimes'], message: /'blackhole' to "sometimes"/ },
    { args: ['--target', '127.0.0.1:1', '--latency-ms', 'soon'], message: /Cannot read --latency-ms 'soon'/ },
    { args: ['--target', '127.0.0.1:1', '--corrupt-probability', '3'], message: /'corruptProbability' to 3/ },
  ];
  for (const { args, message } of cases) {
    const result = await run(lifelineBin, ['fault-proxy', ...args], { allowFailure: true, timeoutMs: 15_000 });
    assert.equal(result.code, 2, `exit code for ${args.join(' ')}: ${result.stderr}`);
    assert.match(result.stderr, message, `message for ${args.join(' ')}`);
  }
  const help = await run(lifelineBin, ['help']);
  assert.match(help.stdout, /fault-proxy/);
  const usage = await run(lifelineBin, ['fault-proxy', '--help']);
  assert.match(usage.stdout, /--rate BYTES\/s/);
});
