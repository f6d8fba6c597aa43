import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { lifelineBin, makeTempDir, run, startLifeline } from '../../test/helpers.js';

test('lifeline help lists the commands; an unknown command exits 2 with a hint', async () => {
  const help = await run(lifelineBin, ['help']);
  assert.match(help.stdout, /nbd serve/);
  assert.match(help.stdout, /demo/);
  const unknown = await run(lifelineBin, ['frobnicate'], { allowFailure: true });
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /Unknown command 'frobnicate'/);
  assert.match(unknown.stderr, /lifeline help/);
});

test('nbd serve refuses bad input with a clear error and creates nothing', async (t) => {
  const dir = makeTempDir();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const cases: { args: string[]; code: number; message: RegExp }[] = [
    { args: [], code: 2, message: /at least one --export/ },
    { args: ['--export', 'disk0'], code: 2, message: /expected NAME=PATH/ },
    { args: ['--export', `disk0=${dir}/a.img,size=lots`], code: 1, message: /Cannot read size 'lots'/ },
    { args: ['--export', `disk0=${dir}/a.img,bogus`], code: 2, message: /unknown option 'bogus'/ },
    { args: ['--export', `disk0=${dir}/missing.img`], code: 1, message: /missing and no size was given.*missing\.img/ },
    { args: ['--export', `disk0=${dir}/a.img,size=1M`, '--listen', '127.0.0.1:99999'], code: 2, message: /port must be 0-65535/ },
    { args: ['--export', `disk0=${dir}/a.img,size=1M`, '--tls', 'require'], code: 2, message: /needs --tls-cert and --tls-key/ },
    { args: ['--export', `disk0=${dir}/a.img,size=1M`, '--no-such-flag'], code: 2, message: /Unknown option '--no-such-flag'/ },
    { args: ['--export', `disk0=${dir}/b.img,size=1M`, '--export', `disk0=${dir}/c.img,size=1M`], code: 1, message: /given twice/ },
  ];
  for (const { args, code, message } of cases) {
    const result = await run(lifelineBin, ['nbd', 'serve', ...args], { allowFailure: true, timeoutMs: 15_000 });
    assert.equal(result.code, code, `exit code for ${args.join(' ')}: ${result.stderr}`);
    assert.match(result.stderr, message, `message for ${args.join(' ')}`);
  }
  assert.ok(!fs.existsSync(path.join(dir, 'missing.img')), 'a refused export creates no file');
});

test('nbd serve says which address is taken when it cannot listen', async (t) => {
  const dir = makeTempDir();
  const blocker = net.createServer();
  await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', resolve));
  t.after(() => {
    blocker.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const port = (blocker.address() as net.AddressInfo).port;
  const result = await run(lifelineBin, ['nbd', 'serve', '--listen', `127.0.0.1:${port}`, '--export', `disk0=${dir}/a.img,size=1M`], { allowFailure: true, timeoutMs: 15_000 });
  assert.equal(result.code, 1);
  assert.match(result.stderr, new RegExp(`Cannot listen on 127\\.0\\.0\\.1:${port}.*EADDRINUSE`));
});

test('nbd serve prints a tap summary per export on SIGTERM', async (t) => {
  const dir = makeTempDir();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const server = await startLifeline(['--listen', '127.0.0.1:0', '--export', `disk0=${dir}/a.img,size=1M`, '--export', `base=${dir}/a.img,ro`]);
  t.after(() => server.stop());
  await run('qemu-io', ['-f', 'raw', `${server.tcpUri}/disk0`, '-c', 'write -P 0x61 0 64k', '-c', 'write -z 65536 64k', '-c', 'discard 131072 64k']);
  const summaries = await server.stop();
  assert.deepEqual(summaries.map((summary) => summary.export), ['disk0', 'base']);
  assert.equal(summaries[0]!.events, 3);
  assert.deepEqual(summaries[0]!.count, { write: 1, zero: 1, trim: 1, failed: 0 });
  assert.equal(summaries[1]!.events, 0);
});

test('demo serves a fresh volume, runs its workload and shows the intercepted writes', async (t) => {
  const dir = makeTempDir();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const result = await run(lifelineBin, ['demo', '--data', dir, '--listen', '127.0.0.1:0', '--size', '64M', '--duration', '3'], { timeoutMs: 30_000 });
  assert.match(result.stdout, /serving a fresh 64\.0 MiB volume at nbd:\/\/127\.0\.0\.1:\d+\/disk0/);
  const stopped = /stopped: (\d+) events intercepted, checksum ([0-9a-f]{8})/.exec(result.stdout);
  assert.ok(stopped, result.stdout);
  assert.ok(Number(stopped[1]) > 20, `the workload wrote: ${stopped[1]} events`);
  assert.match(result.stdout, /tap on disk0: \d+ events/);
  assert.equal(fs.statSync(path.join(dir, 'disk0.img')).size, 64 * 2 ** 20);
});
