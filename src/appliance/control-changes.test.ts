import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { repositoryRoot } from '../../test/helpers.js';
import { parseApplianceConfig, parseProtectConfig, protectConfigAsFileEntry } from './config.js';
import { controlChangesNow, protectionInForce } from './control-changes.js';

const recordPath = '/data/a/control-changes.json';

function sampleFile(): Record<string, any> {
  return JSON.parse(fs.readFileSync(path.join(repositoryRoot, 'examples', 'appliance-site-a.json'), 'utf8')) as Record<string, any>;
}

function sampleConfig(file = sampleFile(), dataDirectory = '/data/a'): ReturnType<typeof parseApplianceConfig> {
  return parseApplianceConfig(file, dataDirectory);
}

test('a protection entry written as the file writes it reads back unchanged (IPv4 and IPv6 targets)', () => {
  const entry = sampleConfig().protect[0]!;
  assert.deepEqual(parseProtectConfig(protectConfigAsFileEntry(entry), 'protect', '/elsewhere'), entry);
  const v6 = { ...entry, target: { ...entry.target, address: { host: '::1', port: 7100 } } };
  assert.deepEqual(protectConfigAsFileEntry(v6)['target'], { address: '[::1]:7100', appliance: entry.target.appliance });
  assert.deepEqual(parseProtectConfig(protectConfigAsFileEntry(v6), 'protect', '/'), v6);
});

test('the control API record is used over the file it was made over, set aside when the file changed, and refused with its path when it does not check out', () => {
  const config = sampleConfig();
  assert.deepEqual(protectionInForce(config, undefined, recordPath), { protect: config.protect, rateLimitBytesPerSecond: config.rateLimitBytesPerSecond, from: 'file' });

  // Removed the file's group, added another with a limit of its own, set the appliance's limit.
  const added = { ...config.protect[0]!, group: 'pg-api', rateLimitBytesPerSecond: 5_000_000 };
  const record = controlChangesNow(config, [added], 12_345, 1_000);
  const inForce = protectionInForce(config, record, recordPath);
  assert.equal(inForce.from, 'control-changes');
  assert.deepEqual(inForce.protect, [added]);
  assert.equal(inForce.rateLimitBytesPerSecond, 12_345);
  assert.equal(inForce.dropped, undefined);
  // Everything removed is a change too: no group at all.
  assert.deepEqual(protectionInForce(config, controlChangesNow(config, [], 0, 1_000), recordPath).protect, []);

  // The same file read with another --data (its relative paths resolve elsewhere): still the same file.
  assert.equal(protectionInForce(sampleConfig(sampleFile(), '/moved/a'), record, recordPath).from, 'control-changes');
  // The operator edited the file since (any of its volumes, protection or limit): the file wins.
  for (const edit of [
    (c: Record<string, any>) => (c['rateLimitBytesPerSecond'] = 1),
    (c: Record<string, any>) => (c['protect'][0].rpoMsTarget = 1),
    (c: Record<string, any>) => (c['volumes'][0].path = '/elsewhere.img'),
  ]) {
    const file = sampleFile();
    edit(file);
    const edited = sampleConfig(file);
    const used = protectionInForce(edited, record, recordPath);
    assert.equal(used.from, 'file');
    assert.deepEqual(used.protect, edited.protect);
    assert.deepEqual(used.dropped, { recordedMs: 1_000, groups: ['pg-api'], rateLimitBytesPerSecond: 12_345 });
  }

  // A record that does not check out is an error naming it, never a silent change of protection.
  const twice = controlChangesNow(config, [added, { ...added, group: 'pg-other' }], 0, 1_000);
  assert.throws(() => protectionInForce(config, twice, recordPath), /Cannot use the control API's recorded changes \(protect\[1\]\.volumes: volume 'disk0' is already protected by group 'pg-api'\): path is \/data\/a\/control-changes\.json/);
  const badCodec = controlChangesNow(config, [added], 0, 1_000);
  badCodec.protect[0]!['codec'] = 'zip';
  assert.throws(() => protectionInForce(config, badCodec, recordPath), /protect\[0\]\.codec: expected one of .*: path is \/data\/a\/control-changes\.json/);
  assert.throws(() => protectionInForce(config, { ...record, version: 2 as 1 }, recordPath), /version 2 is unknown: path is/);
  // A record of another version over an edited file is set aside like any other.
  const file = sampleFile();
  file['rateLimitBytesPerSecond'] = 1;
  assert.equal(protectionInForce(sampleConfig(file), { ...record, version: 2 as 1 }, recordPath).from, 'file');
});
