import { after, before, describe, test, type TestContext } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as tls from 'node:tls';
import { lifelineBin, makeTempDir, run } from '../../test/helpers.js';
import {
  clientTlsOptions,
  createReplicationServer,
  loadTlsIdentity,
  peerName,
  PeerRefusedError,
  type PeerNamePolicy,
  type TlsIdentity,
} from './tls.js';

// Certificates come from the real command, as an operator would make them:
// site-a and site-b each with their own CA (certs demo), plus a rogue
// appliance signed by site B's CA, a site-b-appliance signed by an unrelated
// CA, one appliance reachable only at a DNS name, and an expired certificate.
let root: string;
let siteA: string;
let siteB: string;
let otherSite: string;

before(async () => {
  root = makeTempDir('lifeline-tls-');
  await run(lifelineBin, ['certs', 'demo', '--dir', root]);
  siteA = path.join(root, 'site-a');
  siteB = path.join(root, 'site-b');
  otherSite = path.join(root, 'other');
  await run(lifelineBin, ['certs', 'issue', '--dir', siteB, '--name', 'rogue-appliance']);
  await run(lifelineBin, ['certs', 'issue', '--dir', siteA, '--name', 'site-a-far', '--host', 'replica.example.net']);
  await run(lifelineBin, ['certs', 'init-ca', '--dir', otherSite, '--site', 'other']);
  await run(lifelineBin, ['certs', 'issue', '--dir', otherSite, '--name', 'site-b-appliance']);
  await makeExpiredCertificate(siteB, 'site-b-appliance');
});

after(() => fs.rmSync(root, { recursive: true, force: true }));

/**
 * openssl 3.0's `x509 -req` cannot set a validity in the past, but `openssl ca`
 * takes -startdate and -enddate: sign the appliance's own key again, with the
 * same extensions, valid only for one day in 2020.
 */
async function makeExpiredCertificate(directory: string, name: string): Promise<void> {
  const scratch = path.join(directory, 'expired-ca');
  fs.mkdirSync(scratch);
  fs.writeFileSync(path.join(scratch, 'index.txt'), '');
  fs.writeFileSync(path.join(scratch, 'serial'), '1000\n');
  fs.writeFileSync(path.join(scratch, 'ca.cnf'), [
    '[ca]',
    'default_ca = expired_ca',
    '[expired_ca]',
    `database = ${path.join(scratch, 'index.txt')}`,
    `new_certs_dir = ${scratch}`,
    `serial = ${path.join(scratch, 'serial')}`,
    `certificate = ${path.join(directory, 'ca.crt')}`,
    `private_key = ${path.join(directory, 'ca.key')}`,
    'default_md = sha256',
    'policy = any_name',
    '[any_name]',
    'commonName = supplied',
    '[appliance]',
    'basicConstraints = critical, CA:FALSE',
    'keyUsage = critical, digitalSignature',
    'extendedKeyUsage = serverAuth, clientAuth',
    'subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1',
    '',
  ].join('\n'));
  const request = path.join(scratch, 'request.csr');
  await run('openssl', ['req', '-new', '-key', path.join(directory, `${name}.key`), '-subj', `/CN=${name}`, '-out', request]);
  await run('openssl', ['ca', '-batch', '-notext', '-config', path.join(scratch, 'ca.cnf'), '-extensions', 'appliance',
    '-startdate', '20200101000000Z', '-enddate', '20200102000000Z', '-in', request, '-out', path.join(directory, `${name}-expired.crt`)]);
}

function identityOf(directory: string, name: string, trustedCaDirectory: string): TlsIdentity {
  return loadTlsIdentity({ certPath: path.join(directory, `${name}.crt`), keyPath: path.join(directory, `${name}.key`), trustedCaPaths: [path.join(trustedCaDirectory, 'ca.crt')] });
}

/** The expired certificate cannot pass loadTlsIdentity, so its identity is put together by hand. */
function expiredIdentity(): TlsIdentity {
  return {
    name: 'site-b-appliance',
    certificatePem: fs.readFileSync(path.join(siteB, 'site-b-appliance-expired.crt')),
    keyPem: fs.readFileSync(path.join(siteB, 'site-b-appliance.key')),
    trustedCaPems: [fs.readFileSync(path.join(siteA, 'ca.crt'))],
    validTo: new Date('2020-01-02T00:00:00Z'),
  };
}

interface TestServer {
  port: number;
  peers: string[];
  refusals: Error[];
}

/** Site A's appliance, accepting only the given peers; every accepted peer is greeted by name. */
async function startServer(t: TestContext, options: { identity?: TlsIdentity; allowedPeers?: PeerNamePolicy } = {}): Promise<TestServer> {
  const peers: string[] = [];
  const refusals: Error[] = [];
  const sockets = new Set<tls.TLSSocket>();
  const server = createReplicationServer({
    identity: options.identity ?? identityOf(siteA, 'site-a-appliance', siteB),
    allowedPeers: options.allowedPeers ?? ['site-b-appliance'],
    onPeer(socket, name) {
      sockets.add(socket);
      socket.on('error', () => {});
      socket.on('close', () => sockets.delete(socket));
      peers.push(name);
      socket.end(`hello ${name}\n`);
    },
    onRefused(error) {
      refusals.push(error);
    },
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(async () => {
    for (const socket of sockets) socket.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return { port: (server.address() as { port: number }).port, peers, refusals };
}

interface Attempt {
  /** The server greeted the client: the connection passed every check on both sides. */
  accepted: boolean;
  greeting?: string;
  /** The server's name as the client saw it, if the client's checks passed. */
  serverName?: string;
  protocol?: string;
  error?: Error;
}

function attempt(port: number, options: tls.ConnectionOptions, host = '127.0.0.1'): Promise<Attempt> {
  return new Promise((resolve) => {
    const result: Attempt = { accepted: false };
    let received = '';
    let settled = false;
    const settle = (): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      resolve(result);
    };
    const timer = setTimeout(() => {
      result.error = new Error('no answer within 10 s');
      settle();
    }, 10_000);
    const socket = tls.connect({ ...options, host, port });
    socket.on('secureConnect', () => {
      result.serverName = peerName(socket);
      result.protocol = socket.getProtocol() ?? undefined;
    });
    socket.on('data', (chunk) => {
      received += chunk;
      if (received.endsWith('\n')) {
        result.accepted = true;
        result.greeting = received.trim();
        settle();
      }
    });
    socket.on('error', (error) => {
      result.error = error;
      settle();
    });
    socket.on('close', settle);
  });
}

/** The server records a refusal in the same turn it closes the socket, or, for handshake errors, close to it. */
async function refusalOf(server: TestServer, count = 1): Promise<Error> {
  const deadlineMs = Date.now() + 5_000;
  while (server.refusals.length < count && Date.now() < deadlineMs) await new Promise((resolve) => setTimeout(resolve, 10));
  assert.equal(server.refusals.length, count, 'the server records the refusal');
  return server.refusals[count - 1]!;
}

const siteBClient = (expectedPeerName = 'site-a-appliance'): tls.ConnectionOptions => clientTlsOptions(identityOf(siteB, 'site-b-appliance', siteA), { expectedPeerName });

describe('replication TLS', () => {
  test('a client with a good certificate connects over TLS 1.3 and both sides see the right peer names', async (t) => {
    const server = await startServer(t);
    const result = await attempt(server.port, siteBClient());
    assert.equal(result.error, undefined);
    assert.equal(result.accepted, true);
    assert.equal(result.greeting, 'hello site-b-appliance');
    assert.equal(result.serverName, 'site-a-appliance');
    assert.equal(result.protocol, 'TLSv1.3');
    assert.deepEqual(server.peers, ['site-b-appliance']);
    assert.deepEqual(server.refusals, []);
  });

  test('the link also works over IPv6 loopback (the default ::1 subjectAltName)', async (t) => {
    const peers: string[] = [];
    const server = createReplicationServer({
      identity: identityOf(siteA, 'site-a-appliance', siteB),
      allowedPeers: ['site-b-appliance'],
      onPeer(socket, name) {
        peers.push(name);
        socket.end(`hello ${name}\n`);
      },
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '::1', resolve);
    }).catch((error: NodeJS.ErrnoException) => {
      if (error.code === 'EADDRNOTAVAIL' || error.code === 'EAFNOSUPPORT') t.skip('this machine has no IPv6 loopback');
      else throw error;
    });
    if (!server.listening) return;
    t.after(() => new Promise<void>((resolve) => server.close(() => resolve())));
    const result = await attempt((server.address() as { port: number }).port, siteBClient(), '::1');
    assert.equal(result.accepted, true, String(result.error));
    assert.deepEqual(peers, ['site-b-appliance']);
  });

  test('a client without a certificate is refused in the handshake', async (t) => {
    const server = await startServer(t);
    const { cert: _cert, key: _key, ...withoutCertificate } = siteBClient();
    const result = await attempt(server.port, withoutCertificate);
    assert.equal(result.accepted, false);
    assert.match(String(result.error), /certificate required|ECONNRESET|socket hang up/i);
    assert.match((await refusalOf(server)).message, /did not return a certificate|certificate required/i);
    assert.deepEqual(server.peers, []);
  });

  test('a client whose certificate comes from another CA is refused, even with an allowed name', async (t) => {
    const server = await startServer(t);
    const result = await attempt(server.port, clientTlsOptions(identityOf(otherSite, 'site-b-appliance', siteA), { expectedPeerName: 'site-a-appliance' }));
    assert.equal(result.accepted, false);
    const refusal = await refusalOf(server);
    assert.ok(refusal instanceof PeerRefusedError);
    assert.match(refusal.message, /Cannot accept the peer as its certificate does not verify against the trusted CAs \((UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT_LOCALLY)\)/);
    assert.deepEqual(server.peers, []);
  });

  test('a client with a valid certificate but a name the server does not allow is refused by the name check', async (t) => {
    const server = await startServer(t);
    const result = await attempt(server.port, clientTlsOptions(identityOf(siteB, 'rogue-appliance', siteA), { expectedPeerName: 'site-a-appliance' }));
    assert.equal(result.accepted, false);
    const refusal = await refusalOf(server);
    assert.ok(refusal instanceof PeerRefusedError);
    assert.match(refusal.message, /Cannot accept the peer 'rogue-appliance' at 127\.0\.0\.1 as it is not an allowed appliance/);
    assert.deepEqual(server.peers, []);
  });

  test('a callback decides which peers the server allows, given the name and the certificate', async (t) => {
    const seen: string[] = [];
    const server = await startServer(t, {
      allowedPeers: (name, certificate) => {
        seen.push(`${name} from ${certificate.issuer.OU}`);
        return name === 'site-b-appliance';
      },
    });
    assert.equal((await attempt(server.port, siteBClient())).accepted, true);
    assert.equal((await attempt(server.port, clientTlsOptions(identityOf(siteB, 'rogue-appliance', siteA), { expectedPeerName: 'site-a-appliance' }))).accepted, false);
    assert.deepEqual(seen, ['site-b-appliance from site site-b', 'rogue-appliance from site site-b']);
    assert.deepEqual(server.peers, ['site-b-appliance']);
    assert.ok((await refusalOf(server)) instanceof PeerRefusedError);
  });

  test('a client refuses a server whose certificate names another appliance', async (t) => {
    const server = await startServer(t);
    const result = await attempt(server.port, siteBClient('site-c-appliance'));
    assert.equal(result.accepted, false);
    assert.ok(result.error instanceof PeerRefusedError, String(result.error));
    assert.match(result.error.message, /Cannot accept the peer at 127\.0\.0\.1 as its certificate names 'site-a-appliance', not the expected appliance 'site-c-appliance'/);
    assert.deepEqual(server.peers, []);
  });

  test('a client refuses a server whose certificate does not list the address, unless told not to check it', async (t) => {
    const server = await startServer(t, { identity: identityOf(siteA, 'site-a-far', siteB) });
    const identity = identityOf(siteB, 'site-b-appliance', siteA);
    const strict = await attempt(server.port, clientTlsOptions(identity, { expectedPeerName: 'site-a-far' }));
    assert.equal(strict.accepted, false);
    assert.match(String(strict.error), /Cannot accept the peer 'site-a-far' at 127\.0\.0\.1 as its certificate does not list that address \(it lists DNS:replica\.example\.net\)/);
    const lenient = await attempt(server.port, clientTlsOptions(identity, { expectedPeerName: 'site-a-far', checkHostAddress: false }));
    assert.equal(lenient.accepted, true, String(lenient.error));
    assert.equal(lenient.serverName, 'site-a-far');
  });

  test('an expired client certificate is refused by the server', async (t) => {
    const server = await startServer(t);
    const result = await attempt(server.port, clientTlsOptions(expiredIdentity(), { expectedPeerName: 'site-a-appliance' }));
    assert.equal(result.accepted, false);
    const refusal = await refusalOf(server);
    assert.ok(refusal instanceof PeerRefusedError);
    assert.match(refusal.message, /as its certificate does not verify against the trusted CAs \(CERT_HAS_EXPIRED\)/);
    assert.deepEqual(server.peers, []);
  });

  test('an expired server certificate is refused by the client', async (t) => {
    const expiredServer: TlsIdentity = { ...expiredIdentity(), trustedCaPems: [fs.readFileSync(path.join(siteB, 'ca.crt'))] };
    const server = await startServer(t, { identity: expiredServer, allowedPeers: ['site-a-appliance'] });
    const result = await attempt(server.port, clientTlsOptions(identityOf(siteA, 'site-a-appliance', siteB), { expectedPeerName: 'site-b-appliance' }));
    assert.equal(result.accepted, false);
    assert.equal((result.error as NodeJS.ErrnoException | undefined)?.code, 'CERT_HAS_EXPIRED');
  });

  test('a client limited to TLS 1.2 is refused', async (t) => {
    const server = await startServer(t);
    const result = await attempt(server.port, { ...siteBClient(), minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2' });
    assert.equal(result.accepted, false);
    assert.match((await refusalOf(server)).message, /unsupported protocol|version/i);
  });
});

describe('loadTlsIdentity()', () => {
  test('loads a certificate, its key and the peer site\'s CA', () => {
    const identity = identityOf(siteA, 'site-a-appliance', siteB);
    assert.equal(identity.name, 'site-a-appliance');
    assert.equal(identity.trustedCaPems.length, 1);
    assert.match(identity.trustedCaPems[0]!.toString(), /^-----BEGIN CERTIFICATE-----/);
    assert.ok(identity.validTo.getTime() > Date.now());
  });

  test('takes every CA of a file that holds several, and several files', () => {
    const bundle = path.join(root, 'bundle.crt');
    fs.writeFileSync(bundle, Buffer.concat([fs.readFileSync(path.join(siteA, 'ca.crt')), fs.readFileSync(path.join(siteB, 'ca.crt'))]));
    const identity = loadTlsIdentity({
      certPath: path.join(siteA, 'site-a-appliance.crt'),
      keyPath: path.join(siteA, 'site-a-appliance.key'),
      trustedCaPaths: [bundle, path.join(otherSite, 'ca.crt')],
    });
    assert.equal(identity.trustedCaPems.length, 3);
  });

  test('names the file that is missing, not PEM, mismatched, not a CA or expired', () => {
    const garbage = path.join(root, 'garbage.pem');
    fs.writeFileSync(garbage, 'not a certificate\n');
    const certPath = path.join(siteA, 'site-a-appliance.crt');
    const keyPath = path.join(siteA, 'site-a-appliance.key');
    const caPath = path.join(siteB, 'ca.crt');
    const cases: { paths: Parameters<typeof loadTlsIdentity>[0]; message: RegExp }[] = [
      { paths: { certPath: path.join(root, 'nope.crt'), keyPath, trustedCaPaths: [caPath] }, message: /its certificate file is missing: path is .*nope\.crt$/ },
      { paths: { certPath: garbage, keyPath, trustedCaPaths: [caPath] }, message: /its certificate file is not a PEM certificate: path is .*garbage\.pem$/ },
      { paths: { certPath, keyPath: path.join(root, 'nope.key'), trustedCaPaths: [caPath] }, message: /its key file is missing: path is .*nope\.key$/ },
      { paths: { certPath, keyPath: garbage, trustedCaPaths: [caPath] }, message: /its key is not a PEM private key: path is .*garbage\.pem$/ },
      { paths: { certPath, keyPath: path.join(siteB, 'site-b-appliance.key'), trustedCaPaths: [caPath] }, message: /its key does not belong to its certificate: paths are .*site-b-appliance\.key and .*site-a-appliance\.crt$/ },
      { paths: { certPath, keyPath, trustedCaPaths: [] }, message: /no trusted CA is given/ },
      { paths: { certPath, keyPath, trustedCaPaths: [path.join(root, 'nope-ca.crt')] }, message: /its trusted CA file is missing: path is .*nope-ca\.crt$/ },
      { paths: { certPath, keyPath, trustedCaPaths: [garbage] }, message: /its trusted CA file is not a PEM certificate: path is .*garbage\.pem$/ },
      { paths: { certPath, keyPath, trustedCaPaths: [path.join(siteB, 'site-b-appliance.crt')] }, message: /holds a certificate that is not a CA \(site-b-appliance\): path is .*site-b-appliance\.crt$/ },
      {
        paths: { certPath: path.join(siteB, 'site-b-appliance-expired.crt'), keyPath: path.join(siteB, 'site-b-appliance.key'), trustedCaPaths: [path.join(siteA, 'ca.crt')] },
        message: /its certificate expired on Jan {1,2}2 00:00:00 2020 GMT: path is .*site-b-appliance-expired\.crt$/,
      },
    ];
    for (const { paths, message } of cases) {
      assert.throws(() => loadTlsIdentity(paths), (error: Error) => {
        assert.match(error.message, /^Cannot load the TLS identity as /);
        assert.match(error.message, message);
        return true;
      });
    }
  });
});
