/**
 * Differential conformance: the same protocol edge cases (conformance_cases.py,
 * run with the system Python and its libnbd binding) against a real
 * `lifeline nbd serve` and against nbdkit's file plugin on identical images,
 * comparing error codes, reply types, data and whether the connection survives.
 *
 * Every case has its expected outcome below. Where nbdkit answers differently,
 * the expectation carries nbdkit's answer and a verdict arguing from the spec
 * (doc/proto.md of the NetworkBlockDevice project) why Lifeline's answer is
 * allowed; a difference that is not documented here fails the test. The test
 * prints a table: case, Lifeline, nbdkit, verdict.
 *
 * nbdkit runs as `nbdkit --filter=exportname file FILE` so that it knows the
 * same export names as Lifeline ('disk', the default, and 'ro' on a second,
 * read-only instance) and refuses others.
 */
import { test, type TestContext } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { makeTempDir, prng, repositoryRoot, run, startLifeline, systemPython } from '../../test/helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const driverPath = path.join(repositoryRoot, 'src', 'nbd', 'conformance_cases.py');
/** Longest one run of the driver (every case against one server) may take. */
const driverMsMax = 90_000;
/** Longest a server may take to accept connections, or to exit once told to. */
const serverMsMax = 15_000;
const description = 'Lifeline conformance disk';

/**
 * The image both servers serve: data, a hole, data followed by a hole, and
 * scratch space from which every writing case takes its own region.
 */
const layout = {
  sizeBytes: 128 * MiB,
  dataOffset: 0,
  dataBytes: 1 * MiB,
  holeOffset: 1 * MiB,
  holeBytes: 1 * MiB,
  mixOffset: 2 * MiB,
  mixDataBytes: 64 * KiB,
  scratchOffset: 4 * MiB,
};

interface Expectation {
  /** Lifeline's outcome (or the outcomes allowed where it depends on the filesystem). */
  lifeline: string | string[];
  /** nbdkit's outcome where it differs from Lifeline's. */
  nbdkit?: string | string[];
  /** Why both answers are allowed, for the table (differences only). */
  verdict?: string;
}

// ---------------------------------------------------------------- expectations

const expectations: Record<string, Expectation> = {
  // --- handshake: client flags and option framing
  hs_greeting_flags: { lifeline: 'handshake flags 3' },
  hs_client_flags_unknown: { lifeline: 'closed' },
  // Client flags: NBD_FLAG_C_FIXED_NEWSTYLE "SHOULD be set by clients that support the
  // fixed newstyle protocol. Servers MAY choose to honour fixed newstyle from clients
  // that didn't set this bit". Serving non-fixed clients is optional (Baseline lists
  // only the fixed newstyle handshake), and a non-fixed client can only send
  // NBD_OPT_EXPORT_NAME, where "If the server is unwilling to allow the export, it MUST
  // terminate the session" — closing is the only refusal non-fixed newstyle has, and
  // with --tls require it is the only safe one ("The server MUST operate in NOTLS mode
  // unless ... the client replied with NBD_FLAG_C_FIXED_NEWSTYLE").
  hs_client_flags_not_fixed: {
    lifeline: 'closed',
    nbdkit: 'served size 134217728; alive',
    verdict: 'both allowed: non-fixed newstyle is optional; its only refusal is to close',
  },
  hs_bad_option_magic: { lifeline: 'closed' },
  hs_unknown_option: { lifeline: 'ERR_UNSUP; continues' },
  hs_unknown_option_large: { lifeline: 'ERR_UNSUP; continues' },
  hs_option_length_short: { lifeline: 'ERR_INVALID; continues' },
  hs_info_request_count_mismatch: { lifeline: 'ERR_INVALID; continues' },

  // --- handshake: LIST, ABORT, EXPORT_NAME
  hs_list: { lifeline: 'lists disk' },
  hs_list_with_data: { lifeline: 'ERR_INVALID; continues' },
  hs_abort: { lifeline: 'ACK; closed' },
  hs_abort_with_data: { lifeline: 'ACK; closed' },
  hs_export_name_unknown: { lifeline: 'closed' },
  hs_export_name_too_long: { lifeline: 'closed' },
  hs_export_name_zeroes: { lifeline: 'size 134217728, 124 zero bytes True, read ok' },
  hs_export_name_no_zeroes: { lifeline: 'size 134217728, read ok' },

  // --- handshake: INFO and GO
  hs_info_unknown_export: { lifeline: 'ERR_UNKNOWN; continues' },
  hs_go_unknown_export: { lifeline: 'ERR_UNKNOWN; continues' },
  hs_info_name_too_long: { lifeline: 'ERR_INVALID; continues' },
  hs_info_export: { lifeline: 'size 134217728, flags 0x6d, read-only False, DF False' },
  hs_info_name_description: { lifeline: `name disk, description ${description}` },
  // "The server MUST send this info if it is requested and it intends to enforce size
  // constraints other than the defaults." nbdkit's file plugin has none and stays silent;
  // Lifeline sends the defaults (1, 4096, 2^25) anyway, which "the server MAY send ...
  // not explicitly requested" allows.
  hs_info_block_size: {
    lifeline: 'block size 1/4096/33554432; ACK',
    nbdkit: 'no block size; ACK',
    verdict: 'both allowed: BLOCK_SIZE is optional with default constraints',
  },
  hs_info_unknown_request: { lifeline: 'info types include export True; ACK' },
  hs_info_then_go: { lifeline: 'same info True; GO ACK; alive' },

  // --- handshake: STRUCTURED_REPLY, STARTTLS
  hs_structured_reply_with_data: { lifeline: 'ERR_INVALID; continues' },
  hs_structured_reply_twice: { lifeline: 'ACK, ACK; continues' },
  hs_starttls_without_tls: { lifeline: 'ERR_POLICY; continues' },
  hs_starttls_with_data: { lifeline: 'ERR_INVALID; continues' },

  // --- handshake: metadata contexts
  // NBD_OPT_LIST_META_CONTEXT "SHOULD NOT be requested unless structured replies have
  // been negotiated first. If a client attempts to do so, a server MAY send
  // NBD_REP_ERR_INVALID." Lifeline does, nbdkit lists.
  hs_list_meta_before_structured: {
    lifeline: 'ERR_INVALID; continues',
    nbdkit: 'META_CONTEXT(base:allocation) ACK; continues',
    verdict: 'both allowed: "a server MAY send NBD_REP_ERR_INVALID"',
  },
  hs_set_meta_before_structured: { lifeline: 'ERR_INVALID; continues' },
  hs_list_meta_no_queries: { lifeline: 'META_CONTEXT(base:allocation) ACK; continues' },
  hs_list_meta_base_wildcard: { lifeline: 'META_CONTEXT(base:allocation) ACK; continues' },
  hs_list_meta_unknown_namespace: { lifeline: 'ACK; continues' },
  hs_list_meta_libnbd: { lifeline: '1: base:allocation' },
  // Neither option's text obliges the server to check the export name, but the
  // contexts "available to the client to select on the given export" of an export
  // that does not exist are none, and NBD_REP_ERR_UNKNOWN ("The requested export is not
  // available") says so; nbdkit 1.32 answers without looking the export up. A
  // selection made for an unknown export cannot be used anyway: the later GO fails.
  hs_list_meta_unknown_export: {
    lifeline: 'ERR_UNKNOWN; continues',
    nbdkit: 'META_CONTEXT(base:allocation) ACK; continues',
    verdict: 'both allowed: the spec does not say; ERR_UNKNOWN is the more precise',
  },
  hs_set_meta_base_allocation: { lifeline: 'META_CONTEXT(base:allocation) ACK; continues' },
  hs_set_meta_base_wildcard: { lifeline: 'ACK; continues' },
  hs_set_meta_no_queries: { lifeline: 'ACK; continues' },
  hs_set_meta_unknown_leaf: { lifeline: 'ACK; continues' },
  hs_set_meta_empty_query: { lifeline: 'META_CONTEXT(base:allocation) ACK; continues' },
  // As for LIST above; for SET the spec also foresees failure ("Issuing this command
  // replaces all previously-set metadata contexts (including when this command fails)").
  hs_set_meta_unknown_export: {
    lifeline: 'ERR_UNKNOWN; continues',
    nbdkit: 'META_CONTEXT(base:allocation) ACK; continues',
    verdict: 'both allowed: the spec does not say; ERR_UNKNOWN is the more precise',
  },
  hs_meta_query_overruns: { lifeline: 'ERR_INVALID; continues' },
  // "If the option request is syntactically invalid ... the server MUST fail the request
  // with NBD_REP_ERR_INVALID" — both do; nbdkit first sends the context it matched from
  // the first query, which the client must drop: "If an error is returned, the client
  // MUST disregard any context replies that may have been sent."
  hs_meta_query_count_overruns: {
    lifeline: 'ERR_INVALID; continues',
    nbdkit: 'META_CONTEXT(base:allocation) ERR_INVALID; continues',
    verdict: 'both allowed: context replies before an error are disregarded',
  },
  hs_meta_truncated: { lifeline: 'ERR_INVALID; continues' },
  // A name over 4096 bytes breaks "MUST be no longer than 4096 bytes"; no export has
  // such a name, so ERR_UNKNOWN ("The requested export is not available") is true, and
  // ERR_INVALID ("syntactically or semantically invalid") too. No error is mandated.
  hs_meta_name_too_long: {
    lifeline: 'ERR_UNKNOWN; continues',
    nbdkit: 'ERR_INVALID; continues',
    verdict: 'both allowed: an error either way; the spec names none for it',
  },
  // For `base:[leaf-name]`: "If a [leaf-name] requested by the client is not recognized,
  // the server MUST ignore it rather than report an error." Lifeline ignores the 5000-byte
  // leaf; nbdkit refuses the over-long string, which "For requests that are semantically
  // invalid ... the server MAY fail the request with NBD_REP_ERR_INVALID" allows.
  hs_meta_query_too_long: {
    lifeline: 'ACK; continues',
    nbdkit: 'ERR_INVALID; continues',
    verdict: 'both allowed: unknown base: leaf MUST be ignored; over-long string MAY be refused',
  },

  // --- transmission: bounds
  tx_read_past_end: { lifeline: 'EINVAL; alive' },
  tx_read_straddles_end: { lifeline: 'EINVAL; alive' },
  tx_read_past_end_structured: { lifeline: 'chunks ERROR(EINVAL); alive' },
  tx_write_past_end: { lifeline: 'ENOSPC; alive' },
  tx_trim_past_end: { lifeline: 'EINVAL; alive' },
  tx_zero_past_end: { lifeline: 'ENOSPC; alive' },
  tx_cache_past_end: { lifeline: 'EINVAL; alive' },
  tx_block_status_past_end: { lifeline: 'chunks ERROR(EINVAL); alive' },
  tx_read_offset_overflow: { lifeline: 'EINVAL; alive' },
  tx_write_offset_overflow: { lifeline: 'ENOSPC; alive' },

  // --- transmission: zero-length requests
  tx_read_zero_length: { lifeline: 'EINVAL; alive' },
  // "The client SHOULD NOT request a write length of 0; the behavior of a server on such
  // a request is unspecified although the server SHOULD NOT disconnect." Neither does;
  // nbdkit files it under its out-of-range check (ENOSPC for writes), Lifeline under
  // invalid arguments, as for every other zero-length request.
  tx_write_zero_length: {
    lifeline: 'EINVAL; alive',
    nbdkit: 'ENOSPC; alive',
    verdict: 'both allowed: behaviour unspecified; neither disconnects',
  },
  tx_trim_zero_length: { lifeline: 'EINVAL; alive' },
  // The same words stand under NBD_CMD_WRITE_ZEROES.
  tx_zero_zero_length: {
    lifeline: 'EINVAL; alive',
    nbdkit: 'ENOSPC; alive',
    verdict: 'both allowed: behaviour unspecified; neither disconnects',
  },
  tx_block_status_zero_length: { lifeline: 'chunks ERROR(EINVAL); alive' },

  // --- transmission: commands and flags
  tx_unknown_command: { lifeline: 'EINVAL; alive' },
  tx_unknown_flag: { lifeline: 'EINVAL; alive' },
  tx_no_hole_on_write: { lifeline: 'EINVAL; alive' },
  tx_fua_on_read: { lifeline: 'ok; alive' },
  tx_fua_on_flush: { lifeline: 'ok; alive' },
  tx_fua_on_cache: { lifeline: 'ok; alive' },
  tx_fua_on_block_status: { lifeline: 'chunks BS; alive' },
  tx_df_without_structured: { lifeline: 'EINVAL; alive' },
  tx_req_one_on_read: { lifeline: 'chunks ERROR(EINVAL); alive' },
  tx_flush_nonzero_offset: { lifeline: 'EINVAL; alive' },
  tx_flush_nonzero_length: { lifeline: 'EINVAL; alive' },
  tx_block_status_without_structured: { lifeline: 'EINVAL; alive' },
  tx_block_status_without_meta: { lifeline: 'chunks ERROR(EINVAL); alive' },
  tx_block_status_meta_other_export: { lifeline: 'chunks ERROR(EINVAL); alive' },
  tx_block_status_req_one: { lifeline: 'extents [[65536, 0]]' },
  tx_block_status_layout: { lifeline: 'extents [[(1048576, 0)], [(1048576, 3)], [(65536, 0), (65536, 3)]]' },
  tx_unknown_command_structured: { lifeline: 'EINVAL; alive' },
  tx_read_error_structured: { lifeline: 'chunks ERROR(EINVAL); alive' },

  // --- transmission: read-only export
  tx_write_read_only: { lifeline: 'EPERM; alive' },
  tx_trim_read_only: { lifeline: 'EPERM; alive' },
  tx_zero_read_only: { lifeline: 'EPERM; alive' },

  // --- transmission: payload sizes (32 MiB + 4 KiB, over Lifeline's advertised maximum)
  // Lifeline's maximum payload is 2^25, the default ("a maximum payload size that is at
  // least 2^25"); nbdkit 1.32 takes up to 64 MiB. With simple replies "the client MUST
  // NOT request a length larger than the maximum payload size", and such a request
  // "will fail"; Lifeline fails it cleanly without disconnecting.
  tx_read_oversized: {
    lifeline: 'EINVAL; alive',
    nbdkit: 'ok; alive',
    verdict: 'both allowed: over the 2^25 maximum payload the client may not assume',
  },
  // With structured replies "A server MAY support read requests larger than the maximum
  // payload size by splitting the response ...; however, the server is also permitted
  // to reject large read requests up front"; it names NBD_EOVERFLOW for that, but
  // mandates no error value ("Which error to return in any other case is not specified").
  tx_read_oversized_structured: {
    lifeline: 'chunks ERROR(EINVAL); alive',
    nbdkit: 'chunks DATA; alive',
    verdict: 'both allowed: a server MAY reject reads over its maximum payload',
  },
  // "the client MUST NOT request a length larger than the maximum payload size" for
  // NBD_CMD_WRITE; Lifeline reads and drops the payload and answers EINVAL, so the
  // connection stays in step.
  tx_write_oversized: {
    lifeline: 'EINVAL; alive',
    nbdkit: 'ok; alive',
    verdict: 'both allowed: client broke the advertised 2^25 maximum payload',
  },
  tx_zero_large: { lifeline: 'ok; alive' },

  // --- transmission: data paths
  tx_write_fua_read_back: { lifeline: 'write ok, reads back True' },
  tx_zero_no_hole: { lifeline: 'zero ok, reads zero True, block status ok' },
  tx_zero_may_trim: { lifeline: 'zero ok, reads zero True' },
  // NBD_FLAG_SEND_FAST_ZERO: "Servers MAY set this this transmission flag even if it will
  // always use NBD_ENOTSUP failures"; nbdkit's file plugin does not set it. Lifeline
  // zeroes with fallocate(ZERO_RANGE) where the filesystem has it, else fails fast with
  // ENOTSUP and leaves the data ("SHOULD NOT alter the contents of the export").
  tx_fast_zero: {
    lifeline: ['advertised, zero ok, content zero', 'advertised, zero ENOTSUP, content unchanged'],
    nbdkit: 'not advertised',
    verdict: 'both allowed: FAST_ZERO is optional',
  },
  tx_trim: { lifeline: 'trim ok; alive' },
  tx_cache: { lifeline: 'cache ok' },
  // "The server MAY split the reply into any number of content chunks"; a hole may be
  // sent as NBD_REPLY_TYPE_OFFSET_HOLE ("read as all zeroes") or as zero data. nbdkit
  // 1.32 always sends data; the bytes are the same.
  tx_read_hole_structured: {
    lifeline: 'chunks 1 (HOLE), covers True, bytes match True',
    nbdkit: 'chunks 1 (DATA), covers True, bytes match True',
    verdict: 'both allowed: OFFSET_HOLE or zero OFFSET_DATA; same bytes',
  },
  tx_read_data_structured: { lifeline: 'chunks 1 (DATA), covers True, bytes match True' },
  tx_read_mixed_structured: {
    lifeline: 'chunks 2 (DATA,HOLE), covers True, bytes match True',
    nbdkit: 'chunks 1 (DATA), covers True, bytes match True',
    verdict: 'both allowed: any number of content chunks; same bytes',
  },
  tx_read_mixed_df: { lifeline: 'chunks 1 (DATA), covers True, bytes match True' },
  tx_cookie_echo: { lifeline: 'cookie echoed, ok' },
  tx_pipelined: { lifeline: 'answered 9, errors 0, unmatched 0' },
  tx_disc: { lifeline: 'closed without reply' },

  // --- transmission: misbehaving clients
  tx_bad_request_magic: { lifeline: 'closed' },
  tx_request_in_pieces: { lifeline: 'waited, then ok' },
  tx_client_vanishes_mid_header: { lifeline: 'server still serving' },
  tx_client_vanishes_mid_payload: { lifeline: 'server still serving, region unchanged True' },
};

// -------------------------------------------------------------------- fixtures

/** Writes the layout's image: the same bytes and the same holes every time. */
function makeImage(filePath: string): void {
  const random = prng(0x4c1fe);
  const fill = (bytes: number): Buffer => {
    const out = Buffer.allocUnsafe(bytes);
    for (let i = 0; i < bytes; i += 4) out.writeUInt32LE(Math.floor(random() * 0x100000000), i);
    return out;
  };
  const fd = fs.openSync(filePath, 'w');
  try {
    fs.ftruncateSync(fd, layout.sizeBytes);
    fs.writeSync(fd, fill(layout.dataBytes), 0, layout.dataBytes, layout.dataOffset);
    fs.writeSync(fd, fill(layout.mixDataBytes), 0, layout.mixDataBytes, layout.mixOffset);
  } finally {
    fs.closeSync(fd);
  }
}

/** Resolves once a Unix socket accepts connections. */
async function waitForSocket(socketPath: string, child: ChildProcess, what: string): Promise<void> {
  const deadline = Date.now() + serverMsMax;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`${what} exited before listening`);
    const connected = await new Promise<boolean>((resolve) => {
      const socket = net.connect(socketPath);
      socket.once('connect', () => {
        socket.destroy();
        resolve(true);
      });
      socket.once('error', () => resolve(false));
    });
    if (connected) return;
    if (Date.now() > deadline) throw new Error(`${what} did not listen on ${socketPath} in time`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** Starts nbdkit's file plugin on a Unix socket, stopped by pid after the test. */
async function startNbdkit(t: TestContext, socketPath: string, image: string, name: string, readOnly: boolean): Promise<void> {
  const args = [
    '-f', '--exit-with-parent', '-U', socketPath, ...(readOnly ? ['-r'] : []),
    '--filter=exportname', 'file', image,
    // The same names as Lifeline: NAME and the default (empty) export, nothing else.
    `exportname=${name}`, 'exportname=', `default-export=${name}`,
    'exportname-strict=true', 'exportname-list=explicit', `exportdesc=fixed:${description}`,
  ];
  const child = spawn('nbdkit', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (chunk) => (stderr += chunk));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.once('error', () => undefined);
  t.after(async () => {
    if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) process.kill(child.pid, 'SIGTERM');
    const timer = setTimeout(() => {
      if (child.pid !== undefined && child.exitCode === null) process.kill(child.pid, 'SIGKILL');
    }, serverMsMax);
    await exited;
    clearTimeout(timer);
  });
  try {
    await waitForSocket(socketPath, child, 'nbdkit');
  } catch (error) {
    throw new Error(`${(error as Error).message}\nstderr: ${stderr}`);
  }
}

interface Outcome {
  case: string;
  outcome: string;
  ms: number;
}

async function runDriver(rw: string, ro: string): Promise<{ outcomes: Map<string, Outcome>; order: string[]; ms: number }> {
  const started = Date.now();
  const result = await run(systemPython, [driverPath, '--rw', rw, '--ro', ro, '--layout', JSON.stringify(layout)], { timeoutMs: driverMsMax });
  const outcomes = new Map<string, Outcome>();
  const order: string[] = [];
  for (const line of result.stdout.split('\n')) {
    if (line.trim() === '') continue;
    const outcome = JSON.parse(line) as Outcome;
    outcomes.set(outcome.case, outcome);
    order.push(outcome.case);
  }
  return { outcomes, order, ms: Date.now() - started };
}

function allowed(expected: string | string[], actual: string | undefined): boolean {
  return actual !== undefined && (Array.isArray(expected) ? expected.includes(actual) : expected === actual);
}

function shown(expected: string | string[]): string {
  return Array.isArray(expected) ? expected.map((text) => `'${text}'`).join(' or ') : `'${expected}'`;
}

// ------------------------------------------------------------------------ test

test('Lifeline and nbdkit answer the same protocol edge cases as the spec allows', { timeout: 150_000 }, async (t) => {
  const dir = makeTempDir('lifeline-conformance-');
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const images = { lifeline: path.join(dir, 'lifeline.img'), lifelineRo: path.join(dir, 'lifeline-ro.img'), nbdkit: path.join(dir, 'nbdkit.img'), nbdkitRo: path.join(dir, 'nbdkit-ro.img') };
  for (const image of Object.values(images)) makeImage(image);

  const lifelineSocket = path.join(dir, 'lifeline.sock');
  const lifeline = await startLifeline([
    '--socket', lifelineSocket,
    '--export', `disk=${images.lifeline},description=${description}`,
    '--export', `ro=${images.lifelineRo},ro`,
  ]);
  t.after(() => lifeline.stop());
  const nbdkitSocket = path.join(dir, 'nbdkit.sock');
  const nbdkitRoSocket = path.join(dir, 'nbdkit-ro.sock');
  await startNbdkit(t, nbdkitSocket, images.nbdkit, 'disk', false);
  await startNbdkit(t, nbdkitRoSocket, images.nbdkitRo, 'ro', true);

  const [ours, theirs] = await Promise.all([runDriver(lifelineSocket, lifelineSocket), runDriver(nbdkitSocket, nbdkitRoSocket)]);

  const rows: string[][] = [];
  const failures: string[] = [];
  let agreements = 0;
  let differences = 0;
  for (const name of ours.order) {
    const expected = expectations[name];
    const lifelineOutcome = ours.outcomes.get(name)?.outcome;
    const nbdkitOutcome = theirs.outcomes.get(name)?.outcome;
    if (lifelineOutcome === nbdkitOutcome) agreements++;
    else differences++;
    let verdict: string;
    if (!expected) {
      verdict = 'NO EXPECTATION';
      failures.push(`${name}: no expectation for it (Lifeline '${lifelineOutcome}', nbdkit '${nbdkitOutcome}')`);
    } else {
      const lifelineOk = allowed(expected.lifeline, lifelineOutcome);
      const nbdkitOk = allowed(expected.nbdkit ?? expected.lifeline, nbdkitOutcome);
      if (!lifelineOk) failures.push(`${name}: Lifeline answered '${lifelineOutcome}', expected ${shown(expected.lifeline)}`);
      if (!nbdkitOk) failures.push(`${name}: nbdkit answered '${nbdkitOutcome}', expected ${shown(expected.nbdkit ?? expected.lifeline)} (an undocumented difference: decide from the spec who is right)`);
      verdict = !lifelineOk ? 'FAIL: Lifeline' : !nbdkitOk ? 'FAIL: nbdkit differs' : expected.nbdkit === undefined ? 'agree' : expected.verdict ?? 'differ';
    }
    rows.push([name, lifelineOutcome ?? '(missing)', nbdkitOutcome ?? '(missing)', verdict]);
  }
  for (const name of Object.keys(expectations)) {
    if (!ours.outcomes.has(name)) failures.push(`${name}: the driver did not run it`);
  }

  const header = ['case', 'lifeline', 'nbdkit', 'verdict'];
  const widths = header.map((title, column) => Math.min(60, Math.max(title.length, ...rows.map((row) => row[column]!.length))));
  const format = (row: string[]): string => row.map((cell, column) => cell.padEnd(widths[column]!)).join(' | ');
  console.log(
    [
      format(header),
      widths.map((width) => '-'.repeat(width)).join('-|-'),
      ...rows.map(format),
      `${rows.length} cases: ${agreements} agree, ${differences} differ; driver ran ${ours.ms} ms against Lifeline, ${theirs.ms} ms against nbdkit`,
    ].join('\n'),
  );

  assert.ok(rows.length >= 40, `expected at least 40 cases, ran ${rows.length}`);
  assert.deepEqual(failures, []);
});
