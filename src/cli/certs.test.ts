import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { lifelineBin, makeTempDir, run } from '../../test/helpers.js';

const certs = (args: string[]) => run(lifelineBin, ['certs', ...args], { allowFailure: true, timeoutMs: 60_000 });
const modeOf = (file: string): number => fs.statSync(file).mode & 0o777;
const certificate = (file: string): crypto.X509Certificate => new crypto.X509Certificate(fs.readFileSync(file));
const serverAuth = '1.3.6.1.5.5.7.3.1';
const clientAuth = '1.3.6.1.5.5.7.3.2';

test('certs init-ca makes a P-256 CA certificate for keyCertSign and a 0600 key', async (t) => {
  const dir = makeTempDir();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const caDir = path.join(dir, 'new', 'site-a');
  const result = await certs(['init-ca', '--dir', caDir, '--site', 'site-a']);
  assert.equal(result.code, 0, result.stderr);
  assert.equal(result.stdout, `created ${caDir}/ca.key\ncreated ${caDir}/ca.crt\n`);
  assert.equal(modeOf(path.join(caDir, 'ca.key')), 0o600);
  assert.deepEqual(fs.readdirSync(caDir).sort(), ['ca.crt', 'ca.key'], 'no scratch files or serial files are left behind');
  const ca = certificate(path.join(caDir, 'ca.crt'));
  assert.equal(ca.ca, true);
  assert.equal(ca.subject, 'O=Lifeline\nOU=site site-a\nCN=Lifeline CA of site site-a');
  assert.equal(ca.issuer, ca.subject);
  assert.ok(ca.verify(ca.publicKey), 'self-signed');
  const validityDays = (Date.parse(ca.validTo) - Date.parse(ca.validFrom)) / 86_400_000;
  assert.equal(validityDays, 3650);
  assert.equal(ca.publicKey.asymmetricKeyType, 'ec');
  assert.equal(ca.publicKey.asymmetricKeyDetails?.namedCurve, 'prime256v1');
  const extensions = await run('openssl', ['x509', '-in', path.join(caDir, 'ca.crt'), '-noout', '-ext', 'basicConstraints,keyUsage']);
  assert.match(extensions.stdout, /Basic Constraints: critical\s+CA:TRUE, pathlen:0/);
  assert.match(extensions.stdout, /Key Usage: critical\s+Certificate Sign, CRL Sign/);
});

test('certs issue makes an appliance certificate that openssl verifies against the CA', async (t) => {
  const dir = makeTempDir();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  assert.equal((await certs(['init-ca', '--dir', dir, '--site', 'east'])).code, 0);
  const result = await certs(['issue', '--dir', dir, '--name', 'east-1']);
  assert.equal(result.code, 0, result.stderr);
  assert.equal(result.stdout, `created ${dir}/east-1.key\ncreated ${dir}/east-1.crt\n`);
  assert.equal(modeOf(path.join(dir, 'east-1.key')), 0o600);
  assert.equal(modeOf(path.join(dir, 'east-1.crt')), 0o644);
  assert.deepEqual(fs.readdirSync(dir).sort(), ['ca.crt', 'ca.key', 'east-1.crt', 'east-1.key']);
  const verify = await run('openssl', ['verify', '-CAfile', path.join(dir, 'ca.crt'), path.join(dir, 'east-1.crt')], { allowFailure: true });
  assert.equal(verify.code, 0, verify.stderr);
  assert.equal(verify.stdout.trim(), `${dir}/east-1.crt: OK`);
  const appliance = certificate(path.join(dir, 'east-1.crt'));
  const ca = certificate(path.join(dir, 'ca.crt'));
  assert.equal(appliance.subject, 'CN=east-1');
  assert.ok(appliance.checkIssued(ca) && appliance.verify(ca.publicKey));
  assert.equal(appliance.ca, false);
  assert.equal(appliance.subjectAltName, 'DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1');
  assert.deepEqual([...(appliance.keyUsage ?? [])].sort(), [serverAuth, clientAuth].sort());
  assert.ok(appliance.checkPrivateKey(crypto.createPrivateKey(fs.readFileSync(path.join(dir, 'east-1.key')))));
  assert.equal((Date.parse(appliance.validTo) - Date.parse(appliance.validFrom)) / 86_400_000, 730);
  assert.notEqual(appliance.serialNumber, certificate(path.join(dir, 'ca.crt')).serialNumber);
});

test('certs issue --host replaces the default names; --days sets the validity', async (t) => {
  const dir = makeTempDir();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  assert.equal((await certs(['init-ca', '--dir', dir, '--site', 'west'])).code, 0);
  const result = await certs(['issue', '--dir', dir, '--name', 'west-1', '--host', 'replica.west.example', '--host', '10.1.2.3', '--host', 'fd00::7', '--days', '30']);
  assert.equal(result.code, 0, result.stderr);
  const appliance = certificate(path.join(dir, 'west-1.crt'));
  assert.equal(appliance.subjectAltName, 'DNS:replica.west.example, IP Address:10.1.2.3, IP Address:FD00:0:0:0:0:0:0:7');
  assert.equal((Date.parse(appliance.validTo) - Date.parse(appliance.validFrom)) / 86_400_000, 30);
});

test('certs refuses to replace existing files unless --force, and --force keeps keys at 0600', async (t) => {
  const dir = makeTempDir();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  assert.equal((await certs(['init-ca', '--dir', dir, '--site', 'a'])).code, 0);
  assert.equal((await certs(['issue', '--dir', dir, '--name', 'a-1'])).code, 0);
  const read = (name: string): string => fs.readFileSync(path.join(dir, name), 'utf8');
  const before = { caKey: read('ca.key'), caCertificate: read('ca.crt'), key: read('a-1.key'), certificate: read('a-1.crt') };

  const again = await certs(['init-ca', '--dir', dir, '--site', 'a']);
  assert.equal(again.code, 1);
  assert.equal(again.stderr, `lifeline: Cannot create the CA for site 'a' as files already exist (use --force to replace): paths are ${dir}/ca.key, ${dir}/ca.crt\n`);
  const issueAgain = await certs(['issue', '--dir', dir, '--name', 'a-1']);
  assert.equal(issueAgain.code, 1);
  assert.match(issueAgain.stderr, /Cannot issue certificate for 'a-1' as files already exist \(use --force to replace\)/);
  // One of the two files is enough to refuse; the other is not made either.
  fs.rmSync(path.join(dir, 'a-1.crt'));
  const half = await certs(['issue', '--dir', dir, '--name', 'a-1']);
  assert.equal(half.code, 1);
  assert.match(half.stderr, new RegExp(`as a file already exists \\(use --force to replace\\): path is ${dir}/a-1\\.key\\n`));
  assert.ok(!fs.existsSync(path.join(dir, 'a-1.crt')));
  assert.deepEqual({ caKey: read('ca.key'), caCertificate: read('ca.crt'), key: read('a-1.key') }, { caKey: before.caKey, caCertificate: before.caCertificate, key: before.key });

  assert.equal((await certs(['init-ca', '--dir', dir, '--site', 'a', '--force'])).code, 0);
  assert.equal((await certs(['issue', '--dir', dir, '--name', 'a-1', '--force'])).code, 0);
  assert.notEqual(read('ca.key'), before.caKey);
  assert.notEqual(read('a-1.key'), before.key);
  assert.equal(modeOf(path.join(dir, 'ca.key')), 0o600);
  assert.equal(modeOf(path.join(dir, 'a-1.key')), 0o600);
  const verify = await run('openssl', ['verify', '-CAfile', path.join(dir, 'ca.crt'), path.join(dir, 'a-1.crt')], { allowFailure: true });
  assert.equal(verify.code, 0, verify.stderr);
  assert.deepEqual(fs.readdirSync(dir).sort(), ['a-1.crt', 'a-1.key', 'ca.crt', 'ca.key']);
});

test('certs issue says which CA file is missing or wrong', async (t) => {
  const dir = makeTempDir();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const missing = await certs(['issue', '--dir', dir, '--name', 'x']);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, new RegExp(`^lifeline: Cannot issue certificate for 'x' as the CA key is missing: path is ${dir}/ca\\.key`));
  assert.equal((await certs(['init-ca', '--dir', dir, '--site', 'a'])).code, 0);
  fs.rmSync(path.join(dir, 'ca.crt'));
  const noCertificate = await certs(['issue', '--dir', dir, '--name', 'x']);
  assert.match(noCertificate.stderr, new RegExp(`as the CA certificate is missing: path is ${dir}/ca\\.crt`));
  const other = makeTempDir();
  t.after(() => fs.rmSync(other, { recursive: true, force: true }));
  assert.equal((await certs(['init-ca', '--dir', other, '--site', 'b'])).code, 0);
  fs.copyFileSync(path.join(other, 'ca.crt'), path.join(dir, 'ca.crt'));
  const mismatch = await certs(['issue', '--dir', dir, '--name', 'x']);
  assert.equal(mismatch.code, 1);
  assert.match(mismatch.stderr, /as the CA key does not belong to the CA certificate/);
  assert.deepEqual(fs.readdirSync(dir).sort(), ['ca.crt', 'ca.key'], 'a refused issue leaves nothing behind');
});

test('certs refuses bad command lines with exit 2 and creates nothing', async (t) => {
  const dir = makeTempDir();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  assert.equal((await certs(['init-ca', '--dir', dir, '--site', 'a'])).code, 0);
  const cases: { args: string[]; message: RegExp }[] = [
    { args: [], message: /Give a 'certs' subcommand: init-ca, issue or demo/ },
    { args: ['frobnicate'], message: /Unknown 'certs' subcommand 'frobnicate'/ },
    { args: ['init-ca', '--site', 'a'], message: /'certs init-ca' needs --dir DIR/ },
    { args: ['init-ca', '--dir', path.join(dir, 'b')], message: /'certs init-ca' needs --site NAME/ },
    { args: ['init-ca', '--dir', path.join(dir, 'b'), '--site', 'a/b'], message: /Cannot use 'a\/b' as a site name/ },
    { args: ['init-ca', '--dir', path.join(dir, 'b'), '--site', 'b', '--days', '0'], message: /Cannot use a validity of 0 days/ },
    { args: ['init-ca', '--dir', path.join(dir, 'b'), '--site', 'b', '--days', 'soon'], message: /Cannot read --days 'soon'/ },
    { args: ['init-ca', '--dir', path.join(dir, 'b'), '--site', 'b', '--name', 'x'], message: /'certs init-ca' takes no --name/ },
    { args: ['issue', '--dir', dir], message: /'certs issue' needs --name APPLIANCE/ },
    { args: ['issue', '--dir', dir, '--name', '../escape'], message: /Cannot use '\.\.\/escape' as an appliance name/ },
    { args: ['issue', '--dir', dir, '--name', 'ca'], message: /'ca' is the name of the CA's own files/ },
    { args: ['issue', '--dir', dir, '--name', 'x', '--host', 'bad host,DNS:evil'], message: /host 'bad host,DNS:evil' is neither an IP address nor a DNS name/ },
    { args: ['demo', '--dir', path.join(dir, 'b'), '--site', 'x'], message: /'certs demo' takes no --site/ },
    { args: ['issue', '--dir', dir, '--name', 'x', '--bogus'], message: /Unknown option '--bogus'/ },
  ];
  for (const { args, message } of cases) {
    const result = await certs(args);
    assert.equal(result.code, 2, `exit code for ${args.join(' ')}: ${result.stderr}`);
    assert.match(result.stderr, message, `message for ${args.join(' ')}`);
    assert.match(result.stderr, /Run 'lifeline help' for usage/);
  }
  assert.deepEqual(fs.readdirSync(dir).sort(), ['ca.crt', 'ca.key']);
  assert.ok(!fs.existsSync(path.join(dir, 'b')));
  const notADirectory = await certs(['init-ca', '--dir', path.join(dir, 'ca.crt', 'sub'), '--site', 'b']);
  assert.equal(notADirectory.code, 1);
  assert.match(notADirectory.stderr, /Cannot create the CA for site 'b' as its directory cannot be made \(ENOTDIR\): path is .*ca\.crt\/sub/);
});

test('certs issue refuses a validity that would outlast the CA', async (t) => {
  const dir = makeTempDir();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  assert.equal((await certs(['init-ca', '--dir', dir, '--site', 'a', '--days', '10'])).code, 0);
  const result = await certs(['issue', '--dir', dir, '--name', 'a-1']);
  assert.equal(result.code, 1);
  assert.match(result.stderr, /Cannot issue certificate for 'a-1' as 730 days would outlast the CA, which expires on .*: give a smaller --days or renew the CA/);
  assert.equal((await certs(['issue', '--dir', dir, '--name', 'a-1', '--days', '5'])).code, 0);
});

test('certs demo makes one CA per site; each appliance verifies against its own CA only', async (t) => {
  const dir = makeTempDir();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const result = await certs(['demo', '--dir', dir]);
  assert.equal(result.code, 0, result.stderr);
  assert.match(result.stdout, /site-a-appliance: certificate .*site-a\/site-a-appliance\.crt\n\s+key .*site-a\/site-a-appliance\.key, trusts .*site-b\/ca\.crt/);
  for (const site of ['site-a', 'site-b']) {
    const siteDir = path.join(dir, site);
    assert.deepEqual(fs.readdirSync(siteDir).sort(), ['ca.crt', 'ca.key', `${site}-appliance.crt`, `${site}-appliance.key`]);
    assert.equal(modeOf(path.join(siteDir, 'ca.key')), 0o600);
    assert.equal(modeOf(path.join(siteDir, `${site}-appliance.key`)), 0o600);
    assert.equal(certificate(path.join(siteDir, `${site}-appliance.crt`)).subject, `CN=${site}-appliance`);
  }
  const verify = (ca: string, appliance: string) => run('openssl', ['verify', '-CAfile', path.join(dir, ca, 'ca.crt'), path.join(dir, appliance, `${appliance}-appliance.crt`)], { allowFailure: true });
  assert.equal((await verify('site-a', 'site-a')).code, 0);
  assert.equal((await verify('site-b', 'site-b')).code, 0);
  assert.notEqual((await verify('site-b', 'site-a')).code, 0, "site B's CA does not vouch for site A's appliance");

  const again = await certs(['demo', '--dir', dir]);
  assert.equal(again.code, 1);
  assert.match(again.stderr, /Cannot create the demo certificates of site-a as files already exist \(use --force to replace\)/);
  assert.equal((await certs(['demo', '--dir', dir, '--force'])).code, 0);
});

test('certs --help prints the usage; lifeline help lists certs', async () => {
  const help = await certs(['--help']);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /^Usage: lifeline certs init-ca --dir DIR --site NAME/);
  assert.match(help.stdout, /trusts the peer\s+site's CA/);
  assert.match((await certs(['issue', '--help'])).stdout, /--host HOST/);
  assert.match((await run(lifelineBin, ['help'])).stdout, /certs init-ca\|issue\|demo/);
});
