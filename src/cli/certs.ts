/**
 * `lifeline certs init-ca|issue|demo`: the X.509 files for the replication
 * link's mutual TLS, made with the openssl command (run without a shell).
 *
 * Keys are EC P-256: a TLS 1.3 peer verifies an ECDSA P-256 signature as
 * readily as an RSA one, the strength (about 128 bits) matches RSA 3072, and
 * a key is made in milliseconds instead of seconds, which matters for tests
 * that make many.
 *
 * Every file is made in a private scratch directory inside the target
 * directory and only moved into place once all of a command's files exist, so
 * a failure halfway leaves nothing half-written; without --force a file that
 * already exists is never replaced.
 */
import { execFile } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { UsageError } from './usage-error.js';

export const caValidityDaysDefault = 3650;
export const applianceValidityDaysDefault = 730;
export const validityDaysMax = 36500;
export const defaultHosts: readonly string[] = ['localhost', '127.0.0.1', '::1'];
/** One openssl run makes or signs one P-256 key; a minute means it is stuck. */
const opensslRunMsMax = 60_000;
const hostCountMax = 100;
/** An X.509 CN holds at most 64 characters (RFC 5280 ub-common-name). */
const namePattern = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const dnsNamePattern = /^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;

export const certsUsage = `Usage: lifeline certs init-ca --dir DIR --site NAME [--days N] [--force]
       lifeline certs issue --dir DIR --name APPLIANCE [--host HOST]... [--days N] [--force]
       lifeline certs demo --dir DIR [--force]

Makes the certificates for the mutual TLS between appliances, with the openssl
command. Keys are EC P-256 and are written with mode 0600.

  init-ca   a site's certificate authority: DIR/ca.key and DIR/ca.crt
            (CA:TRUE with path length 0, keyUsage keyCertSign and cRLSign;
            valid ${caValidityDaysDefault} days unless --days)
  issue     an appliance's key and certificate, signed by the CA in DIR:
            DIR/APPLIANCE.key and DIR/APPLIANCE.crt with CN=APPLIANCE, for use
            as TLS server and client (valid ${applianceValidityDaysDefault} days unless --days)
  demo      two sites, each with its own CA and one appliance:
            DIR/site-a/{ca,site-a-appliance}.{key,crt} and the same for site-b

  --dir DIR     directory of the files (init-ca and demo create it)
  --site NAME   the site the CA belongs to
  --name NAME   the appliance's name; peers check it against the certificate's CN
  --host HOST   DNS name or IP address the appliance is reached at, written to
                the certificate's subjectAltName, which a connecting peer checks
                (repeatable; default localhost, 127.0.0.1 and ::1)
  --days N      validity in days (1-${validityDaysMax})
  --force       replace existing files (certificates signed by a replaced CA no
                longer verify)

Names are 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.

Trust: each site has its own CA. An appliance presents the certificate its own
site's CA signed and trusts the peer site's CA: copy the peer's ca.crt (never
its ca.key) and give it as the trusted CA.`;


export interface InitCaOptions {
  directory: string;
  site: string;
  validityDays?: number;
  force?: boolean;
}

export interface IssueOptions {
  directory: string;
  name: string;
  /** DNS names and IP addresses for the subjectAltName; defaults to `defaultHosts`. */
  hosts?: readonly string[];
  validityDays?: number;
  force?: boolean;
}

export interface DemoOptions {
  directory: string;
  force?: boolean;
}

export interface CaFiles {
  keyPath: string;
  certificatePath: string;
}

export interface ApplianceFiles extends CaFiles {
  name: string;
}

export interface DemoSite {
  site: string;
  ca: CaFiles;
  appliance: ApplianceFiles;
}

/** Makes DIR/ca.key and DIR/ca.crt, a site's certificate authority. */
export async function initCa(options: InitCaOptions): Promise<CaFiles> {
  checkName('site', options.site);
  const validityDays = checkValidityDays(options.validityDays ?? caValidityDaysDefault);
  const files = caFiles(options.directory);
  refuseToOverwrite(`Cannot create the CA for site '${options.site}'`, [files.keyPath, files.certificatePath], options.force);
  try {
    fs.mkdirSync(options.directory, { recursive: true, mode: 0o700 });
  } catch (error) {
    throw new Error(`Cannot create the CA for site '${options.site}' as its directory cannot be made (${(error as NodeJS.ErrnoException).code ?? 'error'}): path is ${options.directory}`, { cause: error });
  }
  await inScratchDirectory(options.directory, async (scratch) => {
    const keyPath = path.join(scratch, 'ca.key');
    const certificatePath = path.join(scratch, 'ca.crt');
    const configPath = path.join(scratch, 'ca.cnf');
    // Our own configuration, so the system's openssl.cnf adds no extensions of its own.
    fs.writeFileSync(configPath, [
      '[req]',
      'prompt = no',
      'distinguished_name = subject',
      'x509_extensions = ca_extensions',
      '[subject]',
      'O = Lifeline',
      `OU = site ${options.site}`,
      `CN = Lifeline CA of site ${options.site}`,
      '[ca_extensions]',
      // Path length 0: the CA signs appliance certificates, never another CA.
      'basicConstraints = critical, CA:TRUE, pathlen:0',
      'keyUsage = critical, keyCertSign, cRLSign',
      'subjectKeyIdentifier = hash',
      'authorityKeyIdentifier = keyid:always',
      '',
    ].join('\n'));
    const what = `Cannot create the CA for site '${options.site}'`;
    await generateKey(what, keyPath);
    await openssl(what, ['req', '-new', '-x509', '-config', configPath, '-key', keyPath, '-sha256', '-days', String(validityDays), '-set_serial', randomSerial(), '-out', certificatePath]);
    publish(what, [[keyPath, files.keyPath, 0o600], [certificatePath, files.certificatePath, 0o644]], options.force);
  });
  return files;
}

/** Makes DIR/NAME.key and DIR/NAME.crt, signed by the CA in DIR. */
export async function issueCertificate(options: IssueOptions): Promise<ApplianceFiles> {
  const what = `Cannot issue certificate for '${options.name}'`;
  checkName('appliance', options.name);
  // The appliance's files sit beside the CA's: 'ca' would replace the CA itself.
  if (options.name === 'ca') throw new UsageError(`${what} as 'ca' is the name of the CA's own files: choose another name`);
  const hosts = options.hosts?.length ? [...new Set(options.hosts)] : [...defaultHosts];
  if (hosts.length > hostCountMax) throw new UsageError(`${what} as ${hosts.length} hosts are more than the ${hostCountMax} allowed`);
  for (const host of hosts) {
    if (net.isIP(host) === 0 && !dnsNamePattern.test(host)) throw new UsageError(`${what} as host '${host}' is neither an IP address nor a DNS name`);
  }
  const validityDays = checkValidityDays(options.validityDays ?? applianceValidityDaysDefault);
  const ca = caFiles(options.directory);
  const caKeyPem = readCaFile(what, 'key', ca.keyPath);
  const caCertificatePem = readCaFile(what, 'certificate', ca.certificatePath);
  let caCertificate: crypto.X509Certificate;
  try {
    caCertificate = new crypto.X509Certificate(caCertificatePem);
  } catch (error) {
    throw new Error(`${what} as the CA certificate is not a PEM certificate: path is ${ca.certificatePath}`, { cause: error });
  }
  if (!caCertificate.ca) throw new Error(`${what} as the CA certificate is not a CA (basicConstraints CA:FALSE): path is ${ca.certificatePath}`);
  let caKeyMatches: boolean;
  try {
    caKeyMatches = caCertificate.checkPrivateKey(crypto.createPrivateKey(caKeyPem));
  } catch (error) {
    throw new Error(`${what} as the CA key is not a PEM private key without a passphrase: path is ${ca.keyPath}`, { cause: error });
  }
  if (!caKeyMatches) throw new Error(`${what} as the CA key does not belong to the CA certificate: paths are ${ca.keyPath} and ${ca.certificatePath}`);
  const caValidToMs = Date.parse(caCertificate.validTo);
  if (caValidToMs <= Date.now()) throw new Error(`${what} as the CA certificate expired on ${caCertificate.validTo}: path is ${ca.certificatePath}`);
  // A certificate that outlives its CA stops verifying when the CA expires; say so now, not then.
  if (Date.now() + validityDays * 86_400_000 > caValidToMs) {
    throw new Error(`${what} as ${validityDays} days would outlast the CA, which expires on ${caCertificate.validTo}: give a smaller --days or renew the CA`);
  }

  const files: ApplianceFiles = { name: options.name, keyPath: path.join(options.directory, `${options.name}.key`), certificatePath: path.join(options.directory, `${options.name}.crt`) };
  refuseToOverwrite(what, [files.keyPath, files.certificatePath], options.force);
  await inScratchDirectory(options.directory, async (scratch) => {
    const keyPath = path.join(scratch, 'appliance.key');
    const requestPath = path.join(scratch, 'appliance.csr');
    const certificatePath = path.join(scratch, 'appliance.crt');
    const requestConfigPath = path.join(scratch, 'request.cnf');
    const extensionsPath = path.join(scratch, 'extensions.cnf');
    fs.writeFileSync(requestConfigPath, ['[req]', 'prompt = no', 'distinguished_name = subject', '[subject]', `CN = ${options.name}`, ''].join('\n'));
    let dnsCount = 0;
    let ipCount = 0;
    const alternativeNames = hosts.map((host) => (net.isIP(host) ? `IP.${++ipCount} = ${host}` : `DNS.${++dnsCount} = ${host}`));
    fs.writeFileSync(extensionsPath, [
      '[appliance_extensions]',
      'basicConstraints = critical, CA:FALSE',
      'keyUsage = critical, digitalSignature',
      // Both: an appliance accepts connections from its peer and makes them.
      'extendedKeyUsage = serverAuth, clientAuth',
      'subjectKeyIdentifier = hash',
      'authorityKeyIdentifier = keyid',
      'subjectAltName = @alternative_names',
      '[alternative_names]',
      ...alternativeNames,
      '',
    ].join('\n'));
    await generateKey(what, keyPath);
    await openssl(what, ['req', '-new', '-config', requestConfigPath, '-key', keyPath, '-out', requestPath]);
    await openssl(what, ['x509', '-req', '-in', requestPath, '-CA', ca.certificatePath, '-CAkey', ca.keyPath, '-set_serial', randomSerial(), '-sha256',
      '-days', String(validityDays), '-extfile', extensionsPath, '-extensions', 'appliance_extensions', '-out', certificatePath]);
    publish(what, [[keyPath, files.keyPath, 0o600], [certificatePath, files.certificatePath, 0o644]], options.force);
  });
  return files;
}

/**
 * Two sites, each with its own CA and one appliance. The appliance of site A
 * presents site-a/site-a-appliance.crt and trusts site-b/ca.crt; the other way
 * round for site B.
 */
export async function makeDemoCertificates(options: DemoOptions): Promise<DemoSite[]> {
  const sites: DemoSite[] = [];
  const plan = ['site-a', 'site-b'].map((site) => ({ site, directory: path.join(options.directory, site), name: `${site}-appliance` }));
  // Check every file first, so a refusal leaves the first site untouched as well.
  for (const { site, directory, name } of plan) {
    refuseToOverwrite(`Cannot create the demo certificates of ${site}`, [...Object.values(caFiles(directory)), path.join(directory, `${name}.key`), path.join(directory, `${name}.crt`)], options.force);
  }
  for (const { site, directory, name } of plan) {
    const ca = await initCa({ directory, site, force: options.force ?? false });
    const appliance = await issueCertificate({ directory, name, force: options.force ?? false });
    sites.push({ site, ca, appliance });
  }
  return sites;
}

export async function runCerts(argv: string[]): Promise<number> {
  const [action, ...rest] = argv;
  if (action === '--help' || action === '-h' || action === 'help') {
    console.log(certsUsage);
    return 0;
  }
  if (action === undefined) throw new UsageError("Give a 'certs' subcommand: init-ca, issue or demo (see 'lifeline certs --help')");
  if (action !== 'init-ca' && action !== 'issue' && action !== 'demo') throw new UsageError(`Unknown 'certs' subcommand '${action}': try 'lifeline certs --help'`);
  const { values } = parseArgs({
    args: rest,
    options: {
      dir: { type: 'string' },
      site: { type: 'string' },
      name: { type: 'string' },
      host: { type: 'string', multiple: true },
      days: { type: 'string' },
      force: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) {
    console.log(certsUsage);
    return 0;
  }
  const allowed: Record<'init-ca' | 'issue' | 'demo', string[]> = { 'init-ca': ['dir', 'site', 'days', 'force'], issue: ['dir', 'name', 'host', 'days', 'force'], demo: ['dir', 'force'] };
  for (const [option, value] of Object.entries(values)) {
    if (value !== undefined && value !== false && option !== 'help' && !allowed[action].includes(option)) throw new UsageError(`'certs ${action}' takes no --${option}`);
  }
  if (!values.dir) throw new UsageError(`'certs ${action}' needs --dir DIR`);
  const directory = path.resolve(values.dir);
  const force = values.force ?? false;
  let validityDays: number | undefined;
  if (values.days !== undefined) {
    if (!/^\d+$/.test(values.days)) throw new UsageError(`Cannot read --days '${values.days}': give a whole number of days`);
    validityDays = Number(values.days);
  }
  switch (action) {
    case 'init-ca': {
      if (!values.site) throw new UsageError("'certs init-ca' needs --site NAME");
      const ca = await initCa({ directory, site: values.site, force, ...(validityDays !== undefined ? { validityDays } : {}) });
      console.log(`created ${ca.keyPath}\ncreated ${ca.certificatePath}`);
      return 0;
    }
    case 'issue': {
      if (!values.name) throw new UsageError("'certs issue' needs --name APPLIANCE");
      const appliance = await issueCertificate({ directory, name: values.name, force, ...(values.host ? { hosts: values.host } : {}), ...(validityDays !== undefined ? { validityDays } : {}) });
      console.log(`created ${appliance.keyPath}\ncreated ${appliance.certificatePath}`);
      return 0;
    }
    case 'demo': {
      const sites = await makeDemoCertificates({ directory, force });
      for (const { ca, appliance } of sites) console.log(`created ${ca.keyPath}\ncreated ${ca.certificatePath}\ncreated ${appliance.keyPath}\ncreated ${appliance.certificatePath}`);
      const [siteA, siteB] = sites as [DemoSite, DemoSite];
      console.log(`
Each site has its own CA; an appliance trusts the peer site's CA:
  ${siteA.appliance.name}: certificate ${siteA.appliance.certificatePath}
      key ${siteA.appliance.keyPath}, trusts ${siteB.ca.certificatePath}
  ${siteB.appliance.name}: certificate ${siteB.appliance.certificatePath}
      key ${siteB.appliance.keyPath}, trusts ${siteA.ca.certificatePath}`);
      return 0;
    }
  }
}

function caFiles(directory: string): CaFiles {
  return { keyPath: path.join(directory, 'ca.key'), certificatePath: path.join(directory, 'ca.crt') };
}

function checkName(kind: 'site' | 'appliance', name: string): void {
  if (!namePattern.test(name)) {
    throw new UsageError(`Cannot use '${name}' as ${kind === 'site' ? 'a site' : 'an appliance'} name: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit`);
  }
}

function checkValidityDays(days: number): number {
  if (!Number.isInteger(days) || days < 1 || days > validityDaysMax) throw new UsageError(`Cannot use a validity of ${days} days: give 1-${validityDaysMax}`);
  return days;
}

function refuseToOverwrite(what: string, paths: readonly string[], force: boolean | undefined): void {
  if (force) return;
  const existing = paths.filter((file) => fs.existsSync(file));
  if (existing.length > 0) throw new Error(`${what} as ${existing.length === 1 ? 'a file' : 'files'} already exist${existing.length === 1 ? 's' : ''} (use --force to replace): ${existing.length === 1 ? 'path is' : 'paths are'} ${existing.join(', ')}`);
}

function readCaFile(what: string, kind: 'key' | 'certificate', file: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new Error(`${what} as the CA ${kind} is missing: path is ${file}`, { cause: error });
    throw new Error(`${what} as the CA ${kind} is unreadable (${code ?? 'error'}): path is ${file}`, { cause: error });
  }
}

/** A positive 127-bit serial: unique without a serial file beside the CA. */
function randomSerial(): string {
  const bytes = crypto.randomBytes(16);
  bytes[0] = (bytes[0]! & 0x7f) | 0x01;
  return `0x${bytes.toString('hex')}`;
}

async function inScratchDirectory<T>(directory: string, body: (scratch: string) => Promise<T>): Promise<T> {
  // In the target directory, so that the final rename never crosses filesystems; mkdtemp makes it 0700.
  const scratch = fs.mkdtempSync(path.join(directory, '.lifeline-certs-'));
  try {
    return await body(scratch);
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
}

/** Moves finished files into place; without force, a hard link refuses an existing target atomically. */
function publish(what: string, moves: readonly (readonly [string, string, number])[], force: boolean | undefined): void {
  const published: string[] = [];
  try {
    for (const [source, target, mode] of moves) {
      fs.chmodSync(source, mode);
      if (force) fs.renameSync(source, target);
      else fs.linkSync(source, target);
      published.push(target);
    }
  } catch (error) {
    if (!force) for (const target of published) fs.rmSync(target, { force: true });
    const code = (error as NodeJS.ErrnoException).code;
    const target = moves[published.length]![1];
    if (code === 'EEXIST') throw new Error(`${what} as a file already exists (use --force to replace): path is ${target}`, { cause: error });
    throw new Error(`${what} as the file cannot be written (${code ?? 'error'}): path is ${target}`, { cause: error });
  }
}

async function generateKey(what: string, keyPath: string): Promise<void> {
  await openssl(what, ['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', keyPath]);
}

function openssl(what: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile('openssl', args, { timeout: opensslRunMsMax, maxBuffer: 1 << 20 }, (error, _stdout, stderr) => {
      if (!error) return resolve();
      const code = (error as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return reject(new Error(`${what} as the openssl command is not installed (install the 'openssl' package)`, { cause: error }));
      // Not the cause: its message repeats the whole command line; openssl's last lines say what went wrong.
      const detail = String(stderr).trim().split('\n').slice(-3).join(' | ') || error.message;
      reject(new Error(`${what} as 'openssl ${args[0]}' failed (exit ${error.code ?? error.signal}): ${detail}`));
    });
  });
}
