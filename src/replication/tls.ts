/**
 * TLS for the replication link: both appliances present a certificate, both
 * verify the other's against the CAs they trust, and both check the other's
 * name (its certificate's CN) against the appliance they mean to talk to.
 *
 * Trust: each site has its own CA (see `lifeline certs`). An appliance
 * presents the certificate its own site's CA signed and trusts the peer
 * site's CA. A chain to a trusted CA alone is not enough: any appliance of the
 * peer site has one, so the name is checked as well.
 *
 * node:tls verifies a client's certificate during the handshake but offers no
 * hook to check its name there, so a server built from `serverTlsOptions`
 * alone accepts any appliance the trusted CAs signed. `createReplicationServer`
 * adds the name check; a server built by hand must call `authorizePeer` first
 * thing on every 'secureConnection'.
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as tls from 'node:tls';

export interface TlsIdentityPaths {
  /** This appliance's certificate (PEM), optionally followed by intermediates. */
  certPath: string;
  /** Its private key (PEM, without a passphrase). */
  keyPath: string;
  /** The CA certificates (PEM) a peer's certificate must chain to: the peer site's CA. */
  trustedCaPaths: readonly string[];
}

export interface TlsIdentity {
  /** This appliance's name: its certificate's CN. */
  name: string;
  certificatePem: Buffer;
  keyPem: Buffer;
  /** One PEM certificate per entry. */
  trustedCaPems: Buffer[];
  /** When this appliance's certificate expires. */
  validTo: Date;
}

/** Who may connect to a server: a list of appliance names, or a decision per peer. */
export type PeerNamePolicy = readonly string[] | ((name: string, certificate: tls.PeerCertificate) => boolean);

export interface ClientTlsPeer {
  /** The name (certificate CN) of the appliance the client means to reach. */
  expectedPeerName: string;
  /**
   * Also require the address connected to (the host, or servername when
   * given) to be in the server's subjectAltName (default true). Turn it off
   * only where the peer is reached at an address its certificate cannot list,
   * such as through NAT; the name check still applies.
   */
  checkHostAddress?: boolean;
}

/** A peer that completed the handshake but is not one this side talks to. */
export class PeerRefusedError extends Error {
  override name = 'PeerRefusedError';
}

const minVersion = 'TLSv1.3';
const trustedCaFileCountMax = 64;
const certificatePemPattern = /-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----/g;
const extendedKeyUsageServerAuth = '1.3.6.1.5.5.7.3.1';
const extendedKeyUsageClientAuth = '1.3.6.1.5.5.7.3.2';

/**
 * Reads and checks an appliance's certificate, key and trusted CAs: every
 * file must be readable PEM, the key must belong to the certificate, the
 * certificate must be valid now and usable as TLS server and client, and
 * every trusted certificate must be a CA.
 */
export function loadTlsIdentity(paths: TlsIdentityPaths, options: { nowMs?: number } = {}): TlsIdentity {
  const nowMs = options.nowMs ?? Date.now();
  const certificatePem = readFile('certificate', paths.certPath);
  const chain = parseCertificates('certificate', paths.certPath, certificatePem);
  const certificate = chain[0]!;
  const name = commonName(certificate.subject);
  if (!name) throw new Error(`Cannot load the TLS identity as its certificate has no CN (subject is '${certificate.subject.replace(/\n/g, ', ')}'): path is ${paths.certPath}`);
  const validFromMs = Date.parse(certificate.validFrom);
  const validToMs = Date.parse(certificate.validTo);
  if (nowMs < validFromMs) throw new Error(`Cannot load the TLS identity as its certificate is not valid before ${certificate.validFrom}: path is ${paths.certPath}`);
  if (nowMs >= validToMs) throw new Error(`Cannot load the TLS identity as its certificate expired on ${certificate.validTo}: path is ${paths.certPath}`);
  const usages = certificate.keyUsage;
  if (usages !== undefined && !(usages.includes(extendedKeyUsageServerAuth) && usages.includes(extendedKeyUsageClientAuth))) {
    throw new Error(`Cannot load the TLS identity as its certificate is not for both TLS server and client use (extendedKeyUsage serverAuth and clientAuth): path is ${paths.certPath}`);
  }

  const keyPem = readFile('key', paths.keyPath);
  if (!/-----BEGIN [A-Z ]*PRIVATE KEY-----/.test(keyPem.toString('latin1'))) throw new Error(`Cannot load the TLS identity as its key is not a PEM private key: path is ${paths.keyPath}`);
  let key: crypto.KeyObject;
  try {
    key = crypto.createPrivateKey(keyPem);
  } catch (error) {
    throw new Error(`Cannot load the TLS identity as its key is not a PEM private key without a passphrase: path is ${paths.keyPath}`, { cause: error });
  }
  if (!certificate.checkPrivateKey(key)) throw new Error(`Cannot load the TLS identity as its key does not belong to its certificate: paths are ${paths.keyPath} and ${paths.certPath}`);

  if (paths.trustedCaPaths.length === 0) throw new Error('Cannot load the TLS identity as no trusted CA is given: give the peer site\'s ca.crt');
  if (paths.trustedCaPaths.length > trustedCaFileCountMax) throw new Error(`Cannot load the TLS identity as ${paths.trustedCaPaths.length} trusted CA files are more than the ${trustedCaFileCountMax} allowed`);
  const trustedCaPems: Buffer[] = [];
  for (const caPath of paths.trustedCaPaths) {
    const text = readFile('trusted CA', caPath);
    for (const caCertificate of parseCertificates('trusted CA', caPath, text)) {
      if (!caCertificate.ca) throw new Error(`Cannot load the TLS identity as a trusted CA file holds a certificate that is not a CA (${commonName(caCertificate.subject) ?? caCertificate.subject}): path is ${caPath}`);
      trustedCaPems.push(Buffer.from(caCertificate.toString()));
    }
  }
  return { name, certificatePem, keyPem, trustedCaPems, validTo: new Date(validToMs) };
}

/**
 * Options for `tls.createServer`: the client must present a certificate that
 * chains to a trusted CA, over TLS 1.3. The name check is not in here (see the
 * file comment): use `createReplicationServer` or call `authorizePeer`.
 */
export function serverTlsOptions(identity: TlsIdentity): tls.TlsOptions {
  return {
    cert: identity.certificatePem,
    key: identity.keyPem,
    ca: identity.trustedCaPems,
    requestCert: true,
    rejectUnauthorized: true,
    minVersion,
  };
}

/**
 * Options for `tls.connect` (add host and port): the server must present a
 * certificate that chains to a trusted CA, over TLS 1.3, whose CN is the
 * expected appliance name and, unless turned off, whose subjectAltName lists
 * the address connected to.
 */
export function clientTlsOptions(identity: TlsIdentity, peer: ClientTlsPeer): tls.ConnectionOptions {
  const checkHostAddress = peer.checkHostAddress ?? true;
  return {
    cert: identity.certificatePem,
    key: identity.keyPem,
    ca: identity.trustedCaPems,
    rejectUnauthorized: true,
    minVersion,
    // Called by node:tls only after the chain verified.
    checkServerIdentity(host: string, certificate: tls.PeerCertificate): Error | undefined {
      const name = commonName(certificate.subject);
      if (name !== peer.expectedPeerName) {
        return new PeerRefusedError(`Cannot accept the peer at ${host} as its certificate names '${name ?? '(no CN)'}', not the expected appliance '${peer.expectedPeerName}'`);
      }
      if (!checkHostAddress) return undefined;
      const error = tls.checkServerIdentity(host, certificate);
      if (error) {
        return new PeerRefusedError(`Cannot accept the peer '${name}' at ${host} as its certificate does not list that address (it lists ${certificate.subjectaltname ?? 'none'}); issue it with --host ${host}`, { cause: error });
      }
      return undefined;
    },
  };
}

/** The CN of the peer's verified certificate; throws when the peer is not verified. */
export function peerName(socket: tls.TLSSocket): string {
  if (!socket.authorized) {
    throw new PeerRefusedError(`Cannot name the peer at ${socket.remoteAddress ?? 'an unknown address'} as its certificate is not verified (${String(socket.authorizationError ?? 'no certificate')})`);
  }
  const name = commonName(socket.getPeerCertificate().subject);
  if (!name) throw new PeerRefusedError(`Cannot name the peer at ${socket.remoteAddress ?? 'an unknown address'} as its certificate has no single CN`);
  return name;
}

/**
 * The server's name check: returns the verified peer's name, or throws
 * PeerRefusedError when the peer is not verified or not allowed.
 */
export function authorizePeer(socket: tls.TLSSocket, allowedPeers: PeerNamePolicy): string {
  const name = peerName(socket);
  const allowed = typeof allowedPeers === 'function' ? allowedPeers(name, socket.getPeerCertificate()) : allowedPeers.includes(name);
  if (!allowed) throw new PeerRefusedError(`Cannot accept the peer '${name}' at ${socket.remoteAddress ?? 'an unknown address'} as it is not an allowed appliance`);
  return name;
}

export interface ReplicationServerOptions {
  identity: TlsIdentity;
  allowedPeers: PeerNamePolicy;
  /** A peer that passed every check, with its name. */
  onPeer(socket: tls.TLSSocket, peerName: string): void;
  /**
   * A connection refused in the handshake (no, untrusted or expired certificate) or by the name
   * check. The address is unknown for most handshake refusals: node:tls closes the socket first.
   */
  onRefused?(error: Error, remoteAddress: string | undefined): void;
}

/** A `tls.Server` (not yet listening) that hands on only allowed, verified peers. */
export function createReplicationServer(options: ReplicationServerOptions): tls.Server {
  const server = tls.createServer(serverTlsOptions(options.identity));
  server.on('secureConnection', (socket: tls.TLSSocket) => {
    const remoteAddress = socket.remoteAddress;
    let name: string;
    try {
      name = authorizePeer(socket, options.allowedPeers);
    } catch (error) {
      socket.destroy();
      options.onRefused?.(error as Error, remoteAddress);
      return;
    }
    options.onPeer(socket, name);
  });
  // Without a listener node:tls drops the connection silently; with one, it is ours to close.
  server.on('tlsClientError', (error: Error, socket: tls.TLSSocket) => {
    const remoteAddress = socket.remoteAddress;
    socket.destroy();
    // node:tls refuses a certificate that does not verify (untrusted, expired) by closing the
    // socket without an alert, then reports only a hang-up: the reason is left on the socket,
    // the peer's address is not (the socket is closed by then).
    const reason = socket.authorizationError;
    const refusal = reason
      ? new PeerRefusedError(`Cannot accept the peer${remoteAddress ? ` at ${remoteAddress}` : ''} as its certificate does not verify against the trusted CAs (${String(reason)})`, { cause: error })
      : error;
    options.onRefused?.(refusal, remoteAddress);
  });
  return server;
}

function readFile(kind: string, file: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new Error(`Cannot load the TLS identity as its ${kind} file is missing: path is ${file}`, { cause: error });
    throw new Error(`Cannot load the TLS identity as its ${kind} file is unreadable (${code ?? 'error'}): path is ${file}`, { cause: error });
  }
}

function parseCertificates(kind: string, file: string, text: Buffer): crypto.X509Certificate[] {
  const blocks = text.toString('latin1').match(certificatePemPattern) ?? [];
  if (blocks.length === 0) throw new Error(`Cannot load the TLS identity as its ${kind} file is not a PEM certificate: path is ${file}`);
  return blocks.map((block, index) => {
    try {
      return new crypto.X509Certificate(block);
    } catch (error) {
      throw new Error(`Cannot load the TLS identity as certificate ${index + 1} in its ${kind} file is damaged: path is ${file}`, { cause: error });
    }
  });
}

/** The single CN of a subject, from node:crypto's text form or node:tls's object form. */
function commonName(subject: string | tls.Certificate | undefined): string | undefined {
  if (subject === undefined) return undefined;
  if (typeof subject === 'string') {
    const names = subject.split('\n').filter((line) => line.startsWith('CN=')).map((line) => line.slice(3));
    return names.length === 1 ? names[0] : undefined;
  }
  // node:tls gives an array when the subject holds several CNs; such a certificate names no one appliance.
  const name: unknown = subject.CN;
  return typeof name === 'string' && name !== '' ? name : undefined;
}
