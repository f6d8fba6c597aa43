import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { repositoryRoot } from '../../test/helpers.js';
import { ConfigError, parseApplianceConfig } from './config.js';

function example(name: string): Record<string, unknown> {
  return JSON.parse(fs.readFileSync(path.join(repositoryRoot, 'examples', name), 'utf8')) as Record<string, unknown>;
}

test('the sample configurations in examples/ are valid, with sizes, durations and paths resolved', () => {
  const source = parseApplianceConfig(example('appliance-site-a.json'), '/data/a');
  assert.equal(source.volumes[0]!.path, '/data/a/disk0.img');
  assert.equal(source.volumes[0]!.sizeBytes, 1024 ** 3);
  assert.equal(source.tls.trustedCas[0], '/data/certs/site-b/ca.crt');
  assert.deepEqual(source.protect[0]!.target, { address: { host: '127.0.0.1', port: 7100 }, appliance: 'site-b-appliance' });
  assert.equal(source.protect[0]!.rpoMsTarget, 5000);
  assert.equal(source.protect[0]!.rateLimitBytesPerSecond, 100 * 1024 ** 2);
  const target = parseApplianceConfig(example('appliance-site-b.json'), '/data/b');
  assert.equal(target.receive!.groups[0]!.historyMs, 600_000);
  assert.equal(target.receive!.groups[0]!.journal.datastores[0]!.path, '/data/b/journal');
});

test('mistakes are refused with the field that is wrong', () => {
  const cases: [string, (config: Record<string, any>) => void, RegExp][] = [
    ['unknown setting', (c) => (c['volume'] = []), /^config\.volume: unknown setting/],
    ['bad address', (c) => (c['protect'][0].target.address = 'nowhere'), /^protect\[0\]\.target\.address: expected HOST:PORT/],
    ['bad size', (c) => (c['volumes'][0].sizeBytes = '1 parsec'), /^volumes\[0\]\.sizeBytes: Cannot read size/],
    ['bad duration', (c) => (c['protect'][0].rpoMsTarget = 'soon'), /^protect\[0\]\.rpoMsTarget: expected a duration/],
    ['unknown codec', (c) => (c['protect'][0].codec = 'zip'), /^protect\[0\]\.codec: expected one of none, lz4, brotli/],
    ['volume not served', (c) => (c['protect'][0].volumes = ['disk9']), /volume 'disk9' is not one of this appliance's volumes/],
    ['volume twice', (c) => c['volumes'].push({ name: 'disk0', path: 'x.img' }), /^volumes: volume 'disk0' is given twice/],
    ['no trusted CA', (c) => (c['tls'].trustedCas = []), /^tls\.trustedCas: name at least one CA/],
    ['bad name', (c) => (c['appliance'].name = 'a b'), /^appliance\.name: expected a name/],
    ['tiny queue', (c) => (c['protect'][0].queue.memoryBytesMax = 10), /memoryBytesMax: expected a whole number of bytes of at least 1048576/],
  ];
  for (const [what, change, expected] of cases) {
    const config = example('appliance-site-a.json') as Record<string, any>;
    change(config);
    assert.throws(() => parseApplianceConfig(config, '/data'), (error: unknown) => error instanceof ConfigError && expected.test(error.message), what);
  }
  const target = example('appliance-site-b.json') as Record<string, any>;
  target['receive'].groups[0].journal.sizeWarningBytes = '9GiB';
  assert.throws(() => parseApplianceConfig(target, '/data'), /sizeWarningBytes: the warning threshold is above the hard limit/);
  target['receive'].groups[0].journal.sizeWarningBytes = '1GiB';
  target['receive'].groups[0].journal.sizeLimitBytes = '64MiB';
  assert.throws(() => parseApplianceConfig(target, '/data'), /sizeLimitBytes: expected a whole number of bytes of at least 268435456/);
});

test('lifeline appliance --check validates a file and names the field at fault', async () => {
  const { run, lifelineBin, makeTempDir } = await import('../../test/helpers.js');
  const dir = makeTempDir();
  const ok = await run(lifelineBin, ['appliance', '--data', dir, '--config', path.join(repositoryRoot, 'examples', 'appliance-site-a.json'), '--check']);
  assert.match(ok.stdout, /configuration ok: appliance 'site-a-appliance' of site 'site-a', 1 volumes, 1 protected groups/);
  const bad = path.join(dir, 'bad.json');
  fs.writeFileSync(bad, JSON.stringify({ ...example('appliance-site-a.json'), rateLimitBytesPerSecond: -1 }));
  const refused = await run(lifelineBin, ['appliance', '--data', dir, '--config', bad, '--check'], { allowFailure: true });
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /rateLimitBytesPerSecond: expected a whole number of bytes of at least 0/);
  const missing = await run(lifelineBin, ['appliance', '--data', dir], { allowFailure: true });
  assert.equal(missing.code, 2);
  assert.match(missing.stderr, /--config FILE is required/);
});

test('the limits: defaults when left out, and out-of-range values refused with the field', () => {
  const source = parseApplianceConfig(example('appliance-site-a.json'), '/data/a');
  assert.equal(source.control.requestsInFlightMax, 32);
  assert.equal(source.nbd!.connectionsPerExportMax, 64);
  const target = parseApplianceConfig(example('appliance-site-b.json'), '/data/b');
  assert.deepEqual(
    { viewsMax: target.receive!.viewsMax, viewsPerGroupMax: target.receive!.viewsPerGroupMax, viewsScratchBytesMax: target.receive!.viewsScratchBytesMax },
    { viewsMax: 64, viewsPerGroupMax: 16, viewsScratchBytesMax: 64 * 1024 ** 3 },
  );
  const set = example('appliance-site-b.json') as Record<string, any>;
  set['control'].requestsInFlightMax = 8;
  set['nbd'].connectionsPerExportMax = 4;
  Object.assign(set['receive'], { viewsMax: 10, viewsPerGroupMax: 3, viewsScratchBytesMax: '100GiB' });
  const parsed = parseApplianceConfig(set, '/data/b');
  assert.equal(parsed.control.requestsInFlightMax, 8);
  assert.equal(parsed.nbd!.connectionsPerExportMax, 4);
  assert.deepEqual([parsed.receive!.viewsMax, parsed.receive!.viewsPerGroupMax, parsed.receive!.viewsScratchBytesMax], [10, 3, 100 * 1024 ** 3]);
  // A views-per-appliance limit under the default per group lowers the per-group default with it.
  const few = example('appliance-site-b.json') as Record<string, any>;
  few['receive'].viewsMax = 4;
  assert.equal(parseApplianceConfig(few, '/data/b').receive!.viewsPerGroupMax, 4);

  const cases: [string, (config: Record<string, any>) => void, RegExp][] = [
    ['no control requests', (c) => (c['control'].requestsInFlightMax = 0), /^control\.requestsInFlightMax: expected a whole number from 1 to 1024, not 0/],
    ['fractional', (c) => (c['control'].requestsInFlightMax = 2.5), /^control\.requestsInFlightMax: expected a whole number/],
    ['connections past the server', (c) => (c['nbd'].connectionsPerExportMax = 513), /^nbd\.connectionsPerExportMax: expected a whole number from 1 to 512, not 513/],
    ['connections as text', (c) => (c['nbd'].connectionsPerExportMax = '8'), /^nbd\.connectionsPerExportMax: expected a whole number from 1 to 512, not "8"/],
    ['no views', (c) => (c['receive'].viewsMax = 0), /^receive\.viewsMax: expected a whole number from 1 to 4096/],
    ['per group above all', (c) => Object.assign(c['receive'], { viewsMax: 8, viewsPerGroupMax: 9 }), /^receive\.viewsPerGroupMax: 9 views per group is above the 8 of the whole appliance \(receive\.viewsMax\)/],
    ['bad scratch', (c) => (c['receive'].viewsScratchBytesMax = 'lots'), /^receive\.viewsScratchBytesMax: Cannot read size/],
    ['unknown limit', (c) => (c['receive'].viewMax = 3), /^receive\.viewMax: unknown setting/],
  ];
  for (const [what, change, expected] of cases) {
    const config = example('appliance-site-b.json') as Record<string, any>;
    change(config);
    assert.throws(() => parseApplianceConfig(config, '/data'), (error: unknown) => error instanceof ConfigError && expected.test(error.message), what);
  }
});
