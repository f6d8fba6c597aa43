/**
 * Damage in the target's journal, with real appliance processes: a flipped byte, a zeroed 4 KiB
 * page or a truncated record in the newest unit, an older unit or a unit's first header, after a
 * clean stop (SIGTERM) or a crash (SIGKILL) of the target. Every acknowledged write is either still
 * there or its loss is an alert with the range, the checkpoints after it are not recoverable, the
 * source heals the stream by itself (a delta sync) so that `latest` equals the source, and a second
 * group on the same target runs through all of it. A group whose journal cannot open at all fails
 * alone, with the reason and the commands to repair it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { lifelineBin, makeTempDir, prng, run, testSeed } from '../../test/helpers.js';
import type { SourceGroupStatus } from './source-group.js';
import type { TargetGroupStatus } from './target-group.js';
import { makeTwoSites, MiB, startAppliance, waitFor, type RunningAppliance } from './testing.js';

const peerMsMax = 60_000;
/** How long the stream may take to heal after the target restarts: reconnect (≤ 5 s), a delta sync of 16 MiB, its acknowledgement. */
const healMsMax = 90_000;

type Corruption = 'flip' | 'zero-page' | 'truncate';
type Place = 'newest' | 'older' | 'header';

interface UnitInfo {
  unit: number;
  path: string;
  state: string;
  records: number;
  lsn: [number, number] | null;
  bytesUsed: number;
}

async function inspect(metaDir: string): Promise<{ units: UnitInfo[]; lsnLast: number }> {
  const result = await run(lifelineBin, ['journal', 'inspect', '--json', metaDir], { timeoutMs: peerMsMax, allowFailure: true });
  return JSON.parse(result.stdout) as { units: UnitInfo[]; lsnLast: number };
}

/** Damages the journal and says where (unit path, offset). */
function corrupt(units: UnitInfo[], kind: Corruption, place: Place, random: () => number): { unit: number; offset: number; what: string } {
  const used = units.filter((unit) => unit.state === 'in use' && unit.records > 0);
  assert.ok(used.length >= 2, `the journal holds records in at least two units (${JSON.stringify(units.map((unit) => [unit.unit, unit.records]))})`);
  const unit = place === 'older' ? used[0]! : used[used.length - 1]!;
  const bytes = fs.readFileSync(unit.path);
  // Somewhere in the used part's middle half, so that records follow the damage; a header: the unit's first.
  const offset = place === 'header' ? Math.floor(random() * 64) : Math.floor(unit.bytesUsed / 4 + random() * (unit.bytesUsed / 2));
  if (kind === 'flip') bytes[offset]! ^= 1 << Math.floor(random() * 8);
  else if (kind === 'zero-page') bytes.fill(0, offset - (offset % 4096), offset - (offset % 4096) + 4096);
  else bytes.fill(0, offset, Math.min(offset + 64 + 4096, unit.bytesUsed));
  fs.writeFileSync(unit.path, bytes);
  return { unit: unit.unit, offset, what: `${kind} in the ${place} unit (${unit.unit}) at offset ${offset}` };
}

async function sameBytes(uri: string, file: string): Promise<boolean> {
  const compared = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, file], { timeoutMs: peerMsMax, allowFailure: true });
  return compared.code === 0;
}

test('journal damage on the target is never a silent loss: alerted with its range, checkpoints after it not recoverable, healed by the source alone; a second group runs throughout', async (t) => {
  const seed = testSeed('damage-heal');
  const random = prng(seed);
  const dir = makeTempDir('lifeline-damage-heal-');
  const volumeBytes = 16 * MiB;
  const sites = await makeTwoSites(dir, { volumeBytes, historyMs: 3_600_000, unitBytes: 4 * MiB });
  // A second group, pg2 (disk1), on the same pair of appliances.
  const sourceConfig = JSON.parse(fs.readFileSync(sites.sourceConfigPath, 'utf8'));
  sourceConfig.volumes.push({ name: 'disk1', path: 'disk1.img', sizeBytes: volumeBytes });
  sourceConfig.protect.push({ ...sites.protectEntry, group: 'pg2', volumes: ['disk1'] });
  fs.writeFileSync(sites.sourceConfigPath, JSON.stringify(sourceConfig, null, 2));
  const targetConfig = JSON.parse(fs.readFileSync(sites.targetConfigPath, 'utf8'));
  const pg1 = targetConfig.receive.groups[0];
  targetConfig.receive.groups.push({ ...pg1, group: 'pg2', volumes: [{ name: 'disk1', sizeBytes: volumeBytes, replica: 'replica-disk1.img' }] });
  fs.writeFileSync(sites.targetConfigPath, JSON.stringify(targetConfig, null, 2));

  let target = await startAppliance({ dataDir: sites.targetDataDir, configPath: sites.targetConfigPath });
  let source = await startAppliance({ dataDir: sites.sourceDataDir, configPath: sites.sourceConfigPath });
  t.after(async () => {
    await source.kill();
    await target.kill();
  });
  const metaDir = (group: string) => path.join(sites.targetDataDir, 'target', group, 'journal');
  const sourceFile = (volume: string) => path.join(sites.sourceDataDir, `${volume}.img`);
  const group = <T>(appliance: RunningAppliance, name: string) => appliance.api<T>('GET', `/v1/groups/${name}`);
  const drained = (name: string) =>
    waitFor(`group ${name} to be in sync and drained`, healMsMax, async () => {
      const status = await group<SourceGroupStatus>(source, name);
      return status.sync.state === 'in-sync' && status.queue.queuedEntries === 0 && status.alerts.length === 0 ? status : undefined;
    });
  const write = async (volume: string, count: number): Promise<void> => {
    const commands: string[] = [];
    for (let i = 0; i < count; i++) {
      const offset = Math.floor(random() * (volumeBytes / MiB - 1)) * MiB + Math.floor(random() * 16) * 4096;
      commands.push('-c', `write -P 0x${Math.floor(1 + random() * 254).toString(16)} ${offset} ${256 * 1024}`);
    }
    await run('qemu-io', ['-f', 'raw', ...commands, `${source.nbd}/${volume}`], { timeoutMs: peerMsMax });
  };
  const latestEqualsSource = async (name: string, volume: string): Promise<boolean> => {
    const view = await target.api<{ name: string; uri: string }>('POST', `/v1/groups/${name}/views`, { volume, latest: true }).catch(() => undefined);
    if (!view) return false;
    try {
      return await sameBytes(view.uri, sourceFile(volume));
    } finally {
      await target.api('DELETE', `/v1/groups/${name}/views/${view.name}`);
    }
  };

  await drained('pg1');
  await drained('pg2');
  const cases: { kind: Corruption; place: Place; crash: boolean }[] = [
    { kind: 'flip', place: 'newest', crash: false },
    { kind: 'zero-page', place: 'newest', crash: false },
    { kind: 'flip', place: 'older', crash: false },
    { kind: 'flip', place: 'header', crash: false },
    { kind: 'truncate', place: 'newest', crash: true },
    { kind: 'zero-page', place: 'older', crash: true },
  ];
  const outcomes: string[] = [];
  /** Every tagged checkpoint taken, with a copy of the source volume as it was then. */
  const taken: { id: string; image: string }[] = [];
  const checkCheckpoints = async (where: string): Promise<void> => {
    const { checkpoints } = await target.api<{ checkpoints: { id: string; recoverable: boolean; lost?: string; inconsistent?: string }[] }>('GET', '/v1/groups/pg1/checkpoints');
    for (const { id, image } of taken) {
      const listed = checkpoints.find((candidate) => candidate.id === id);
      assert.ok(listed, `${where}: checkpoint ${id} is still listed (recoverable or lost), never gone without a word`);
      if (!listed.recoverable) {
        assert.ok(listed.lost || listed.inconsistent, `${where}: checkpoint ${id} says why it is not recoverable: ${JSON.stringify(listed)}`);
        continue;
      }
      const view = await target.api<{ name: string; uri: string }>('POST', '/v1/groups/pg1/views', { volume: 'disk0', checkpoint: id });
      try {
        assert.ok(await sameBytes(view.uri, image), `${where}: the view at checkpoint ${id} differs from the source as it was then`);
      } finally {
        await target.api('DELETE', `/v1/groups/pg1/views/${view.name}`);
      }
    }
  };
  for (const [index, corruptionCase] of cases.entries()) {
    const context = `seed ${seed}, case ${index}`;
    // Two units' worth of writes, a tagged checkpoint in the middle, on both groups.
    await write('disk0', 12);
    const { id: checkpoint } = await source.api<{ id: string }>('POST', '/v1/groups/pg1/checkpoint', { kind: 'tagged', name: `case-${index}` });
    const image = path.join(dir, `checkpoint-${index}.img`);
    fs.copyFileSync(sourceFile('disk0'), image);
    taken.push({ id: checkpoint, image });
    await write('disk0', 12);
    await write('disk1', 8);
    await drained('pg1');
    await drained('pg2');
    if (corruptionCase.crash) await target.kill();
    else assert.equal(await target.stop(), 0, `${context}: the target stops cleanly`);
    const before = await inspect(metaDir('pg1'));
    const damage = corrupt(before.units, corruptionCase.kind, corruptionCase.place, random);
    const where = `${context}: ${damage.what}`;
    const verify = await run(lifelineBin, ['journal', 'verify', metaDir('pg1')], { timeoutMs: peerMsMax, allowFailure: true });
    assert.equal(verify.code, 1, `${where}: verify finds the damage\n${verify.stdout}`);
    target = await startAppliance({ dataDir: sites.targetDataDir, configPath: sites.targetConfigPath });
    const reopened = await group<TargetGroupStatus>(target, 'pg1');
    const loss = reopened.losses.find((candidate) => candidate.kind === 'damage' && candidate.healedTimeMs === undefined);
    if (loss) {
      // Verify named the same first damaged record as the open.
      assert.ok(verify.stderr.includes(`unit ${loss.unit} at offset ${loss.position}: ${loss.reason}`), `${where}: verify and open name the same record\nverify: ${verify.stderr}\nopen: ${JSON.stringify(loss)}`);
      assert.ok(loss.lsnLast >= loss.lsnFirst && loss.lsnLast <= before.lsnLast, `${where}: the lost range lies in the log`);
      const alert = reopened.alerts.find((candidate) => candidate.condition === 'acknowledged-records-lost');
      assert.ok(alert, `${where}: an error alert says acknowledged records were lost: ${JSON.stringify(reopened.alerts)}`);
      assert.match(alert.message, new RegExp(`journal records ${loss.lsnFirst}\\.\\.${loss.lsnLast} were lost`));
      const { checkpoints } = await target.api<{ checkpoints: { id: string; recoverable: boolean; lost?: string }[] }>('GET', '/v1/groups/pg1/checkpoints');
      const tagged = checkpoints.find((candidate) => candidate.id === checkpoint);
      if (loss.checkpoints.some((candidate) => candidate.id === checkpoint)) {
        assert.ok(tagged && !tagged.recoverable && tagged.lost, `${where}: the tagged checkpoint after the damage is listed as lost`);
      }
      outcomes.push(`case ${index} ${damage.what}: damage, records ${loss.lsnFirst}..${loss.lsnLast} lost, ${loss.checkpoints.length} checkpoints`);
    } else {
      outcomes.push(`case ${index} ${damage.what}: ${reopened.losses.length > 0 ? 'torn tail cut' : 'no loss'}`);
    }
    // No view at a tagged checkpoint serves bytes other than the source's at that point without saying so.
    await checkCheckpoints(`${where}, after the restart`);
    const startedMs = Date.now();
    await waitFor(`${where}: the stream to heal (latest equals the source, no alert)`, healMsMax, async () => {
      const [targetStatus, sourceStatus] = await Promise.all([group<TargetGroupStatus>(target, 'pg1'), group<SourceGroupStatus>(source, 'pg1')]);
      if (targetStatus.alerts.some((alert) => alert.severity === 'error') || sourceStatus.alerts.length > 0) return undefined;
      if (sourceStatus.sync.state !== 'in-sync' || sourceStatus.queue.queuedEntries > 0) return undefined;
      return (await latestEqualsSource('pg1', 'disk0')) ? true : undefined;
    }, 500);
    outcomes[outcomes.length - 1] += `, healed in ${Date.now() - startedMs} ms`;
    await checkCheckpoints(`${where}, after the heal`);
    const healed = await group<TargetGroupStatus>(target, 'pg1');
    for (const earlier of healed.losses.filter((candidate) => candidate.kind === 'damage')) assert.ok(earlier.healedTimeMs !== undefined, `${where}: every loss is healed`);
    // The second group ran through the damage and the restart of its target.
    const second = await group<TargetGroupStatus>(target, 'pg2');
    assert.deepEqual(second.losses, [], `${where}: pg2 lost nothing`);
    await drained('pg2');
    assert.ok(await latestEqualsSource('pg2', 'disk1'), `${where}: pg2's latest equals its source`);
  }
  for (const outcome of outcomes) t.diagnostic(`damage-heal (seed ${seed}): ${outcome}`);

  // Both appliances down, and the target's datastore replaced meanwhile (journal and group state of
  // pg1 gone, the replica left as it was): the source's next HELLO says what was acknowledged of its
  // previous epoch, the target finds it holds less, and the delta sync heals it.
  await write('disk0', 12);
  await drained('pg1');
  await drained('pg2');
  assert.equal(await source.stop(), 0);
  assert.equal(await target.stop(), 0);
  fs.rmSync(path.join(sites.targetDataDir, 'target', 'pg1'), { recursive: true, force: true });
  fs.rmSync(path.join(sites.targetDataDir, 'journal', 'pg1'), { recursive: true, force: true });
  target = await startAppliance({ dataDir: sites.targetDataDir, configPath: sites.targetConfigPath });
  source = await startAppliance({ dataDir: sites.sourceDataDir, configPath: sites.sourceConfigPath });
  // The window the loss opened stays listed (closed, once healed) while the journal holds its points.
  const replaced = await waitFor('the target to find it holds less than it had acknowledged', healMsMax, async () => {
    const status = await group<TargetGroupStatus>(target, 'pg1');
    return status.syncWindows.find((window) => window.deltaSyncNeeded && /found when the source began a new epoch/.test(window.lossReason ?? ''));
  });
  assert.match(replaced.lossReason!, /the target acknowledged sequence [1-9]\d* of epoch \S+ of 'site-a-appliance' but holds 0/);
  await waitFor('pg1 to heal after the datastore was replaced', healMsMax, async () => {
    const [targetStatus, sourceStatus] = await Promise.all([group<TargetGroupStatus>(target, 'pg1'), group<SourceGroupStatus>(source, 'pg1')]);
    if (targetStatus.alerts.some((alert) => alert.severity === 'error') || sourceStatus.alerts.length > 0) return undefined;
    if (sourceStatus.sync.state !== 'in-sync' || sourceStatus.queue.queuedEntries > 0) return undefined;
    return (await latestEqualsSource('pg1', 'disk0')) ? true : undefined;
  }, 500);

  // A journal that cannot open at all (its metadata damaged) fails its group alone.
  assert.equal(await target.stop(), 0);
  const metaFile = path.join(metaDir('pg2'), 'journal.meta');
  const meta = fs.readFileSync(metaFile);
  meta[Math.floor(meta.length / 2)]! ^= 0x20;
  fs.writeFileSync(metaFile, meta);
  target = await startAppliance({ dataDir: sites.targetDataDir, configPath: sites.targetConfigPath });
  const failed = await target.api<{ groups: { group: string; state?: string; reason?: string; repair?: string[] }[] }>('GET', '/v1/status');
  const pg2 = failed.groups.find((candidate) => candidate.group === 'pg2');
  assert.equal(pg2?.state, 'failed');
  assert.match(pg2!.reason!, /checksum/);
  assert.ok(pg2!.repair!.some((line) => line.includes(`journal verify ${metaDir('pg2')}`)), JSON.stringify(pg2));
  // pg1 still receives.
  await write('disk0', 4);
  await drained('pg1');
  assert.ok(await latestEqualsSource('pg1', 'disk0'), 'pg1 runs beside the failed group');
});
